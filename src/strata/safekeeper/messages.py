"""The proposer <-> acceptor messages of the WAL quorum protocol, and their binary encoding.

Every message is a frozen dataclass whose fields each name their wire type
(`Annotated[int, Wire.U64]`). `encode(msg)` gives `tag u8` followed by the fields in
declaration order, little-endian:

| wire type | bytes |
| --- | --- |
| `U64`, `LSN` | u64 |
| `U32` | u32 |
| `BOOL` | u8, 0 or 1 |
| `TENANT_ID`, `TIMELINE_ID` | the id's 16 raw bytes |
| `BYTES` | u32 length, then the bytes (at most `MAX_DATA_BYTES`) |
| `HISTORY` | u32 count, then (term u64, start_lsn u64, prev_record_lsn u64) per entry |

`decode()` checks the tag, every length and every value range, and that nothing is left
over; anything else is a `ProtocolError` (the peer broke the protocol: close that
connection). The safekeeper and the walproposer carry one encoded message in each CopyData
of a PostgreSQL-protocol connection. The protocol itself is described in
docs/safekeeper-protocol.md.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, fields
from typing import Annotated, ClassVar, get_type_hints

from strata.common.errors import ProtocolError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn

MAX_TERM_HISTORY = 10_000  # entries; one per election that changed the log, so tiny in practice
MAX_DATA_BYTES = 16 << 20  # one message's WAL payload
MAX_READ_BYTES = 1 << 20  # one ReadWalRequest's range


class Wire(enum.Enum):
    """How one message field is encoded (the table in the module docstring)."""

    U64 = "u64"
    U32 = "u32"
    LSN = "lsn"
    BOOL = "bool"
    TENANT_ID = "tenant_id"
    TIMELINE_ID = "timeline_id"
    BYTES = "bytes"
    HISTORY = "history"


@dataclass(frozen=True, slots=True, order=True)
class TermEntry:
    """From `start_lsn` on, the log holds the WAL of the proposer that won `term`.

    `prev_record_lsn` is the start of the record that ends at `start_lsn` (a term always
    begins at a record end), so that an acceptor truncated to `start_lsn` still knows it.
    """

    term: int
    start_lsn: Lsn
    prev_record_lsn: Lsn


TermHistory = tuple[TermEntry, ...]


def history_up_to(history: TermHistory, lsn: Lsn) -> TermHistory:
    """The entries that begin at or before `lsn`: the history of a log that ends at `lsn`."""
    return tuple(e for e in history if e.start_lsn <= lsn)


def log_term(history: TermHistory, end_lsn: Lsn) -> int:
    """The term of the log that ends at `end_lsn`: its last entry beginning at or before it.

    An entry that begins exactly at the end counts: the log then holds all of that term's
    log so far (the recovered part that ends at its start), which is a prefix of that
    term's log like any other. 0 for an empty history.
    """
    up_to = history_up_to(history, end_lsn)
    return up_to[-1].term if up_to else 0


# --- proposer -> acceptor ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProposerGreeting:
    """First message on a connection: which timeline, and who the proposer is."""

    TAG: ClassVar[int] = 1
    tenant_id: Annotated[TenantId, Wire.TENANT_ID]
    timeline_id: Annotated[TimelineId, Wire.TIMELINE_ID]
    system_id: Annotated[int, Wire.U64]
    wal_seg_size: Annotated[int, Wire.U32]
    proposer_id: Annotated[int, Wire.U64]


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Promise `term` to `proposer_id` and tell it your log."""

    TAG: ClassVar[int] = 3
    term: Annotated[int, Wire.U64]
    proposer_id: Annotated[int, Wire.U64]


@dataclass(frozen=True, slots=True)
class ProposerElected:
    """`term` won: truncate your log at `start_streaming_at` and adopt `term_history`.

    The history's last entry is (`term`, the agreed end E of the log, its previous record).
    `start_streaming_at` is where this acceptor's log diverges from the proposer's (<= E);
    WAL from there on follows in AppendRequests.
    """

    TAG: ClassVar[int] = 5
    term: Annotated[int, Wire.U64]
    start_streaming_at: Annotated[Lsn, Wire.LSN]
    term_history: Annotated[TermHistory, Wire.HISTORY]


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """WAL bytes [begin_lsn, begin_lsn + len(data)) of `term`'s log, and its commit LSN.

    Empty `data` is a commit-only update. `persist_commit` asks the acceptor to make its
    commit LSN durable (its control file) before it answers; otherwise it does so only every
    `commit_persist_bytes` of commit progress (docs/safekeeper-protocol.md, step 7).
    """

    TAG: ClassVar[int] = 6
    term: Annotated[int, Wire.U64]
    begin_lsn: Annotated[Lsn, Wire.LSN]
    commit_lsn: Annotated[Lsn, Wire.LSN]
    data: Annotated[bytes, Wire.BYTES]
    persist_commit: Annotated[bool, Wire.BOOL] = False

    @property
    def end_lsn(self) -> Lsn:
        return self.begin_lsn + len(self.data)


@dataclass(frozen=True, slots=True)
class ReadWalRequest:
    """Send me your WAL [start_lsn, end_lsn) (recovery: the proposer fetches from a donor)."""

    TAG: ClassVar[int] = 8
    term: Annotated[int, Wire.U64]
    start_lsn: Annotated[Lsn, Wire.LSN]
    end_lsn: Annotated[Lsn, Wire.LSN]


# --- acceptor -> proposer ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AcceptorGreeting:
    """The acceptor's promised term, so that the proposer can pick a higher one."""

    TAG: ClassVar[int] = 2
    term: Annotated[int, Wire.U64]


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """The acceptor's answer to VoteRequest, with its log (all positions durable).

    `term` is the acceptor's promised term after handling the request: equal to the
    request's when `granted`, otherwise the term that beat it. `term_history` is cut at
    `last_record_end`, the end of the last complete record it holds; `flush_lsn` may be
    further (a partial record). `last_record_lsn` is the start of that last record.
    """

    TAG: ClassVar[int] = 4
    term: Annotated[int, Wire.U64]
    granted: Annotated[bool, Wire.BOOL]
    flush_lsn: Annotated[Lsn, Wire.LSN]
    last_record_end: Annotated[Lsn, Wire.LSN]
    last_record_lsn: Annotated[Lsn, Wire.LSN]
    commit_lsn: Annotated[Lsn, Wire.LSN]
    timeline_start_lsn: Annotated[Lsn, Wire.LSN]
    term_history: Annotated[TermHistory, Wire.HISTORY]


@dataclass(frozen=True, slots=True)
class AppendResponse:
    """State after ProposerElected or AppendRequest (also sent to refuse them).

    `term` > the proposer's: refused, the proposer is fenced. `log_term` == the proposer's
    term: the acceptor follows the proposer's log, and `flush_lsn`/`last_record_end` are
    durable positions in it. `commit_lsn` is the acceptor's durable commit LSN.
    """

    TAG: ClassVar[int] = 7
    term: Annotated[int, Wire.U64]
    log_term: Annotated[int, Wire.U64]
    flush_lsn: Annotated[Lsn, Wire.LSN]
    last_record_end: Annotated[Lsn, Wire.LSN]
    commit_lsn: Annotated[Lsn, Wire.LSN]


@dataclass(frozen=True, slots=True)
class ReadWalResponse:
    """WAL [start_lsn, start_lsn + len(data)) of the acceptor's log; empty data: refused.

    A `term` other than the request's means the acceptor's log may no longer be the one it
    voted with: the data is empty and the proposer must not use this acceptor as a donor.
    """

    TAG: ClassVar[int] = 9
    term: Annotated[int, Wire.U64]
    start_lsn: Annotated[Lsn, Wire.LSN]
    data: Annotated[bytes, Wire.BYTES]


ProposerMessage = ProposerGreeting | VoteRequest | ProposerElected | AppendRequest | ReadWalRequest
AcceptorMessage = AcceptorGreeting | VoteResponse | AppendResponse | ReadWalResponse
Message = ProposerMessage | AcceptorMessage

_CLASSES: dict[int, type[Message]] = {
    cls.TAG: cls for cls in (ProposerGreeting, AcceptorGreeting, VoteRequest, VoteResponse,
                             ProposerElected, AppendRequest, AppendResponse, ReadWalRequest,
                             ReadWalResponse)
}
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<QQQ")
_U64_MAX = (1 << 64) - 1



def _layout(cls: type[Message]) -> tuple[tuple[str, Wire], ...]:
    """`cls`'s fields in order, each with the wire type its annotation names."""
    hints = get_type_hints(cls, include_extras=True)
    layout = []
    for f in fields(cls):
        wire = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Wire)]
        assert len(wire) == 1, f"{cls.__name__}.{f.name} needs one Wire in its annotation"
        layout.append((f.name, wire[0]))
    return tuple(layout)


_LAYOUTS = {cls: _layout(cls) for cls in _CLASSES.values()}


def encode(msg: Message) -> bytes:
    """The wire form of `msg`: tag, then its fields in order."""
    out = bytearray([msg.TAG])
    for name, wire in _LAYOUTS[type(msg)]:
        value = getattr(msg, name)
        match wire:
            case Wire.U64:
                assert isinstance(value, int) and 0 <= value <= _U64_MAX, (name, value)
                out += _U64.pack(value)
            case Wire.LSN:
                out += _U64.pack(value.value)
            case Wire.U32:
                out += _U32.pack(value)
            case Wire.BOOL:
                out.append(1 if value else 0)
            case Wire.TENANT_ID | Wire.TIMELINE_ID:
                out += value.raw
            case Wire.BYTES:
                assert len(value) <= MAX_DATA_BYTES, (name, len(value))
                out += _U32.pack(len(value))
                out += value
            case Wire.HISTORY:
                assert len(value) <= MAX_TERM_HISTORY, len(value)
                out += _U32.pack(len(value))
                for e in value:
                    out += _ENTRY.pack(e.term, e.start_lsn.value, e.prev_record_lsn.value)
    return bytes(out)


class _Reader:
    def __init__(self, buf: bytes, what: str) -> None:
        self.buf = buf
        self.pos = 1
        self.what = what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ProtocolError(f"{self.what} message truncated: needs {self.pos + n} bytes, "
                                f"got {len(self.buf)}")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u64(self) -> int:
        return int(_U64.unpack(self.take(8))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self.take(4))[0])


def _read_field(r: _Reader, name: str, wire: Wire) -> object:
    match wire:
        case Wire.U64:
            return r.u64()
        case Wire.LSN:
            return Lsn(r.u64())
        case Wire.U32:
            return r.u32()
        case Wire.BOOL:
            flag = r.take(1)[0]
            if flag > 1:
                raise ProtocolError(f"{r.what}.{name} is {flag}, expected 0 or 1")
            return flag == 1
        case Wire.TENANT_ID:
            return TenantId(r.take(16))
        case Wire.TIMELINE_ID:
            return TimelineId(r.take(16))
        case Wire.BYTES:
            n = r.u32()
            if n > MAX_DATA_BYTES:
                raise ProtocolError(f"{r.what}.{name} has {n} bytes, limit {MAX_DATA_BYTES}")
            return r.take(n)
        case Wire.HISTORY:
            return _read_history(r)


def _read_history(r: _Reader) -> TermHistory:
    n = r.u32()
    if n > MAX_TERM_HISTORY:
        raise ProtocolError(f"{r.what} term history has {n} entries, limit {MAX_TERM_HISTORY}")
    entries = []
    for _ in range(n):
        term, start, prev = _ENTRY.unpack(r.take(_ENTRY.size))
        entries.append(TermEntry(term, Lsn(start), Lsn(prev)))
    for a, b in zip(entries, entries[1:], strict=False):
        if b.term <= a.term or b.start_lsn < a.start_lsn:
            raise ProtocolError(f"{r.what} term history is not ordered: ({a.term}, "
                                f"{a.start_lsn}) then ({b.term}, {b.start_lsn})")
    return tuple(entries)


def decode(buf: bytes) -> Message:
    """Parse one message; `ProtocolError` says what is wrong with it."""
    if not buf:
        raise ProtocolError("empty safekeeper protocol message")
    cls = _CLASSES.get(buf[0])
    if cls is None:
        raise ProtocolError(f"unknown safekeeper protocol message tag {buf[0]}")
    r = _Reader(bytes(buf), cls.__name__)
    values = {name: _read_field(r, name, wire) for name, wire in _LAYOUTS[cls]}
    if r.pos != len(buf):
        raise ProtocolError(f"{cls.__name__} message has {len(buf) - r.pos} trailing bytes")
    return cls(**values)  # type: ignore[arg-type]
