"""The proposer <-> acceptor messages of the WAL quorum protocol, and their binary encoding.

Every message is a frozen dataclass. `encode(msg)` gives `tag u8` followed by the fields in
declaration order, little-endian: integers and LSNs as u64 (u32 for sizes), booleans as u8,
ids as their 16 raw bytes, byte strings and term histories with a u32 count first. `decode()`
checks the tag, every length and every value range, and that nothing is left over; anything
else is a `ProtocolError` (the peer broke the protocol: close that connection). The K2/K3
drivers carry one encoded message in each CopyData of a PostgreSQL-protocol connection. The
protocol itself is described in docs/safekeeper-protocol.md.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar

from strata.common.errors import ProtocolError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn

MAX_TERM_HISTORY = 10_000  # entries; one per election that changed the log, so tiny in practice
MAX_DATA_BYTES = 16 << 20  # one message's WAL payload
MAX_READ_BYTES = 1 << 20  # one ReadWalRequest's range


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
    tenant_id: TenantId
    timeline_id: TimelineId
    system_id: int
    wal_seg_size: int
    proposer_id: int


@dataclass(frozen=True, slots=True)
class VoteRequest:
    """Promise `term` to `proposer_id` and tell it your log."""

    TAG: ClassVar[int] = 3
    term: int
    proposer_id: int


@dataclass(frozen=True, slots=True)
class ProposerElected:
    """`term` won: truncate your log at `start_streaming_at` and adopt `term_history`.

    The history's last entry is (`term`, the agreed end E of the log, its previous record).
    `start_streaming_at` is where this acceptor's log diverges from the proposer's (<= E);
    WAL from there on follows in AppendRequests.
    """

    TAG: ClassVar[int] = 5
    term: int
    start_streaming_at: Lsn
    term_history: TermHistory


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """WAL bytes [begin_lsn, begin_lsn + len(data)) of `term`'s log, and its commit LSN.

    Empty `data` is a commit-only update. `persist_commit` asks the acceptor to make its
    commit LSN durable (its control file) before it answers; otherwise it does so only every
    `commit_persist_bytes` of commit progress (docs/safekeeper-protocol.md, step 7).
    """

    TAG: ClassVar[int] = 6
    term: int
    begin_lsn: Lsn
    commit_lsn: Lsn
    data: bytes
    persist_commit: bool = False

    @property
    def end_lsn(self) -> Lsn:
        return self.begin_lsn + len(self.data)


@dataclass(frozen=True, slots=True)
class ReadWalRequest:
    """Send me your WAL [start_lsn, end_lsn) (recovery: the proposer fetches from a donor)."""

    TAG: ClassVar[int] = 8
    term: int
    start_lsn: Lsn
    end_lsn: Lsn


# --- acceptor -> proposer ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AcceptorGreeting:
    """The acceptor's promised term, so that the proposer can pick a higher one."""

    TAG: ClassVar[int] = 2
    term: int


@dataclass(frozen=True, slots=True)
class VoteResponse:
    """The acceptor's answer to VoteRequest, with its log (all positions durable).

    `term` is the acceptor's promised term after handling the request: equal to the
    request's when `granted`, otherwise the term that beat it. `term_history` is cut at
    `last_record_end`, the end of the last complete record it holds; `flush_lsn` may be
    further (a partial record). `last_record_lsn` is the start of that last record.
    """

    TAG: ClassVar[int] = 4
    term: int
    granted: bool
    flush_lsn: Lsn
    last_record_end: Lsn
    last_record_lsn: Lsn
    commit_lsn: Lsn
    timeline_start_lsn: Lsn
    term_history: TermHistory


@dataclass(frozen=True, slots=True)
class AppendResponse:
    """State after ProposerElected or AppendRequest (also sent to refuse them).

    `term` > the proposer's: refused, the proposer is fenced. `log_term` == the proposer's
    term: the acceptor follows the proposer's log, and `flush_lsn`/`last_record_end` are
    durable positions in it. `commit_lsn` is the acceptor's durable commit LSN.
    """

    TAG: ClassVar[int] = 7
    term: int
    log_term: int
    flush_lsn: Lsn
    last_record_end: Lsn
    commit_lsn: Lsn


@dataclass(frozen=True, slots=True)
class ReadWalResponse:
    """WAL [start_lsn, start_lsn + len(data)) of the acceptor's log; empty data: refused.

    A `term` other than the request's means the acceptor's log may no longer be the one it
    voted with: the data is empty and the proposer must not use this acceptor as a donor.
    """

    TAG: ClassVar[int] = 9
    term: int
    start_lsn: Lsn
    data: bytes


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

# Field encodings by name; a field not listed is a u64.
_KIND = {
    "tenant_id": "id", "timeline_id": "id", "granted": "bool", "persist_commit": "bool",
    "wal_seg_size": "u32",
    "data": "bytes", "term_history": "history",
}
_LSN_FIELDS = {"flush_lsn", "last_record_end", "last_record_lsn", "commit_lsn",
               "timeline_start_lsn", "start_streaming_at", "begin_lsn", "start_lsn", "end_lsn"}


def _kind(name: str) -> str:
    if name in _LSN_FIELDS:
        return "lsn"
    return _KIND.get(name, "u64")


def encode(msg: Message) -> bytes:
    """The wire form of `msg`: tag, then its fields in order."""
    out = bytearray([msg.TAG])
    for f in fields(msg):
        value = getattr(msg, f.name)
        kind = _kind(f.name)
        if kind == "u64":
            assert isinstance(value, int) and 0 <= value <= _U64_MAX, (f.name, value)
            out += _U64.pack(value)
        elif kind == "lsn":
            out += _U64.pack(value.value)
        elif kind == "u32":
            out += _U32.pack(value)
        elif kind == "bool":
            out.append(1 if value else 0)
        elif kind == "id":
            out += value.raw
        elif kind == "bytes":
            assert len(value) <= MAX_DATA_BYTES, (f.name, len(value))
            out += _U32.pack(len(value))
            out += value
        else:
            assert kind == "history", kind
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


def _read_field(r: _Reader, name: str, kind: str) -> object:
    if kind == "u64":
        return r.u64()
    if kind == "lsn":
        return Lsn(r.u64())
    if kind == "u32":
        return r.u32()
    if kind == "bool":
        flag = r.take(1)[0]
        if flag > 1:
            raise ProtocolError(f"{r.what}.{name} is {flag}, expected 0 or 1")
        return flag == 1
    if kind == "id":
        raw = r.take(16)
        return TenantId(raw) if name == "tenant_id" else TimelineId(raw)
    if kind == "bytes":
        n = r.u32()
        if n > MAX_DATA_BYTES:
            raise ProtocolError(f"{r.what}.{name} has {n} bytes, limit {MAX_DATA_BYTES}")
        return r.take(n)
    assert kind == "history", kind
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
    values = {f.name: _read_field(r, f.name, _kind(f.name)) for f in fields(cls)}
    if r.pos != len(buf):
        raise ProtocolError(f"{cls.__name__} message has {len(buf) - r.pos} trailing bytes")
    return cls(**values)  # type: ignore[arg-type]
