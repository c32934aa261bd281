"""The proposer <-> acceptor messages of the WAL quorum protocol, and their binary encoding.

Every message is a frozen dataclass whose fields each name their wire type
(`Annotated[int, Wire.U64]`). `encode(msg)` gives `tag u8` followed by the fields in
declaration order, little-endian:

| wire type | bytes |
| --- | --- |
| `U64`, `LSN` | u64 |
| `U32` | u32 |
| `U16` | u16 |
| `BOOL` | u8, 0 or 1 |
| `TENANT_ID`, `TIMELINE_ID` | the id's 16 raw bytes |
| `BYTES` | u32 length, then the bytes (at most `MAX_DATA_BYTES`) |
| `HISTORY` | u32 count, then (term u64, start_lsn u64, prev_record_lsn u64) per entry |
| `TEXT` | u32 length, then that many bytes of UTF-8 without NUL (at most `MAX_TEXT_BYTES`) |

`decode()` checks the tag, every length and every value range (a message's own rules, its
`__post_init__`, included), and that nothing is left over; anything else is a
`ProtocolError` (the peer broke the protocol: close that connection). The safekeeper and
the walproposer carry one encoded message in each CopyData of a PostgreSQL-protocol
connection. The protocol itself is described in docs/safekeeper-protocol.md.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, NoReturn, get_type_hints

from strata.common.errors import ProtocolError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn

MAX_TERM_HISTORY = 10_000  # entries; one per election that changed the log, so tiny in practice
MAX_DATA_BYTES = 16 << 20  # one message's WAL payload
MAX_READ_BYTES = 1 << 20  # one ReadWalRequest's range
MAX_TEXT_BYTES = 255  # one TEXT field (a host name: RFC 1035's limit)
NAMEDATALEN = 64  # PostgreSQL's name length, its terminating NUL included


class Wire(enum.Enum):
    """How one message field is encoded (the table in the module docstring)."""

    U64 = "u64"
    U32 = "u32"
    U16 = "u16"
    LSN = "lsn"
    BOOL = "bool"
    TENANT_ID = "tenant_id"
    TIMELINE_ID = "timeline_id"
    BYTES = "bytes"
    HISTORY = "history"
    TEXT = "text"


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


@dataclass(frozen=True, slots=True)
class PullFrom:
    """Pull mode (docs/safekeeper-protocol.md): stream `term`'s WAL yourself.

    Sent by the proposer of `term` once this acceptor adopted its election and holds the log
    up to `start_lsn` (the term's start E): replicate from the compute at `host`:`port` on
    the physical replication slot `slot_name` (also the application name the compute's
    `synchronous_standby_names` counts) and treat every byte as an AppendRequest of `term`.
    `compute_id`, if not empty: pull only from the compute whose `strata.compute_id` setting
    has this value (a compute restarted on the same address is another one, whose WAL
    belongs to a later term: an old term's puller must not stream it or move its slot).
    """

    TAG: ClassVar[int] = 10
    term: Annotated[int, Wire.U64]
    host: Annotated[str, Wire.TEXT]
    port: Annotated[int, Wire.U16]
    slot_name: Annotated[str, Wire.TEXT]
    start_lsn: Annotated[Lsn, Wire.LSN]
    compute_id: Annotated[str, Wire.TEXT] = ""

    def __post_init__(self) -> None:
        try:
            host_bytes = self.host.encode()
        except UnicodeEncodeError:  # a lone surrogate: no UTF-8 for it on the wire
            raise ValueError(f"host {self.host!r} is not valid UTF-8 text") from None
        if not host_bytes or len(host_bytes) > MAX_TEXT_BYTES or b"\0" in host_bytes:
            raise ValueError(f"host {self.host!r} must be 1-{MAX_TEXT_BYTES} bytes without NUL")
        if not 0 < self.port < 1 << 16:
            raise ValueError(f"port {self.port} is not in 1..65535")
        name = self.slot_name
        if not (0 < len(name) < NAMEDATALEN and name.isascii()
                and all(c.islower() or c.isdigit() or c == "_" for c in name)):
            # PostgreSQL's rule for replication slot names (slot.c).
            raise ValueError(f"slot name {name!r} must be 1-{NAMEDATALEN - 1} characters of "
                             "a-z, 0-9 and _")
        if not (len(self.compute_id) <= 64 and self.compute_id.isascii()
                and self.compute_id.isalnum() or self.compute_id == ""):
            raise ValueError(f"compute id {self.compute_id!r} must be at most 64 ASCII "
                             "letters and digits")


@dataclass(frozen=True, slots=True)
class PullLimit:
    """Pull mode backpressure (docs/safekeeper-protocol.md, "Pull mode"): report at most
    `max_flush_lsn` as flushed to the compute while pulling `term`'s WAL (PostgreSQL's
    commits past it then wait, as for a slow standby). The proposer sends it from the
    pageserver's position (its lag limits); raising it releases what was held. Only what
    the acceptor tells the compute is held: its WAL, fsyncs and `AppendResponse`s are not.
    No reply unless refused (a stale term: an `AppendResponse` with the acceptor's term).
    """

    TAG: ClassVar[int] = 11
    term: Annotated[int, Wire.U64]
    max_flush_lsn: Annotated[Lsn, Wire.LSN]


ProposerMessage = (ProposerGreeting | VoteRequest | ProposerElected | AppendRequest
                   | ReadWalRequest | PullFrom | PullLimit)
AcceptorMessage = AcceptorGreeting | VoteResponse | AppendResponse | ReadWalResponse
Message = ProposerMessage | AcceptorMessage

_CLASSES: dict[int, type[Message]] = {
    cls.TAG: cls for cls in (ProposerGreeting, AcceptorGreeting, VoteRequest, VoteResponse,
                             ProposerElected, AppendRequest, AppendResponse, ReadWalRequest,
                             ReadWalResponse, PullFrom, PullLimit)
}
_U32 = struct.Struct("<I")
_ENTRY = struct.Struct("<QQQ")
_U64_MAX = (1 << 64) - 1
# The fixed-size wire types, as struct format codes: a run of them is packed and unpacked
# by one precompiled struct (`_Codec`).
_FIXED_FORMAT = {Wire.U64: "Q", Wire.LSN: "Q", Wire.U32: "I", Wire.U16: "H", Wire.BOOL: "B",
                 Wire.TENANT_ID: "16s", Wire.TIMELINE_ID: "16s"}


def _layout(cls: type[Message]) -> tuple[tuple[str, Wire], ...]:
    """`cls`'s fields in order, each with the wire type its annotation names."""
    hints = get_type_hints(cls, include_extras=True)
    layout = []
    for f in fields(cls):
        wire = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Wire)]
        assert len(wire) == 1, f"{cls.__name__}.{f.name} needs one Wire in its annotation"
        layout.append((f.name, wire[0]))
    return tuple(layout)


def _bool(raw: int) -> bool:
    if raw > 1:
        raise ValueError(raw)
    return raw == 1


# How a fixed-size field's unpacked value becomes the field's value (None: as it is).
_FROM_WIRE: dict[Wire, Callable[[Any], object] | None] = {
    Wire.U64: None, Wire.U32: None, Wire.U16: None, Wire.LSN: Lsn, Wire.BOOL: _bool,
    Wire.TENANT_ID: TenantId, Wire.TIMELINE_ID: TimelineId}


@dataclass(frozen=True, slots=True)
class _Run:
    """Consecutive fixed-size fields of one message class, coded by one struct."""

    codec: struct.Struct
    fields: tuple[tuple[str, Wire], ...]
    from_wire: tuple[Callable[[Any], object] | None, ...]


class _Codec:
    """One message class's encoder and decoder, worked out once from its layout.

    Consecutive fixed-size fields form a `_Run` (one `struct` call each way); `BYTES`,
    `TEXT` and `HISTORY` fields stand alone (name, wire type). Per message, only the values
    are converted: no per-field dispatch on the wire type when decoding.
    """

    def __init__(self, cls: type[Message]) -> None:
        self.cls = cls
        self.name = cls.__name__
        self.steps: list[_Run | tuple[str, Wire]] = []
        run: list[tuple[str, Wire]] = []
        for name, wire in _layout(cls):
            if wire in _FIXED_FORMAT:
                run.append((name, wire))
                continue
            self._end_run(run)
            run = []
            self.steps.append((name, wire))
        self._end_run(run)

    def _end_run(self, run: list[tuple[str, Wire]]) -> None:
        if run:
            fmt = "<" + "".join(_FIXED_FORMAT[wire] for _, wire in run)
            self.steps.append(_Run(struct.Struct(fmt), tuple(run),
                                   tuple(_FROM_WIRE[wire] for _, wire in run)))

    def encode(self, msg: Message) -> bytes:
        out = bytearray((self.cls.TAG,))
        for step in self.steps:
            if isinstance(step, _Run):
                out += step.codec.pack(*[_to_wire(name, wire, getattr(msg, name))
                                         for name, wire in step.fields])
                continue
            name, wire = step
            value = getattr(msg, name)
            if wire is Wire.BYTES:
                assert len(value) <= MAX_DATA_BYTES, (name, len(value))
                out += _U32.pack(len(value))
                out += value
            elif wire is Wire.TEXT:
                raw = value.encode()
                assert len(raw) <= MAX_TEXT_BYTES, (name, len(raw))
                out += _U32.pack(len(raw))
                out += raw
            else:
                assert len(value) <= MAX_TERM_HISTORY, len(value)
                out += _U32.pack(len(value))
                for e in value:
                    out += _ENTRY.pack(e.term, e.start_lsn.value, e.prev_record_lsn.value)
        return bytes(out)

    def decode(self, buf: bytes) -> Message:
        pos = 1
        size = len(buf)
        values: list[object] = []
        for step in self.steps:
            if isinstance(step, _Run):
                end = pos + step.codec.size
                if end > size:
                    self._truncated(buf, end)
                raw = step.codec.unpack_from(buf, pos)
                pos = end
                for i, convert in enumerate(step.from_wire):
                    if convert is None:
                        values.append(raw[i])
                        continue
                    try:
                        values.append(convert(raw[i]))
                    except ValueError:  # only _bool raises
                        raise ProtocolError(f"{self.name}.{step.fields[i][0]} is {raw[i]}, "
                                            "expected 0 or 1") from None
                continue
            name, wire = step
            if pos + 4 > size:
                self._truncated(buf, pos + 4)
            (n,) = _U32.unpack_from(buf, pos)
            pos += 4
            if wire is Wire.TEXT:
                values.append(self._read_text(buf, pos, n, name))
                pos += n
            elif wire is Wire.BYTES:
                if n > MAX_DATA_BYTES:
                    raise ProtocolError(f"{self.name}.{name} has {n} bytes, "
                                        f"limit {MAX_DATA_BYTES}")
                if pos + n > size:
                    self._truncated(buf, pos + n)
                values.append(buf[pos:pos + n])
                pos += n
            else:
                values.append(self._read_history(buf, pos, n))
                pos += n * _ENTRY.size
        if pos != size:
            raise ProtocolError(f"{self.name} message has {size - pos} trailing bytes")
        try:
            return self.cls(*values)  # type: ignore[arg-type]
        except ValueError as err:  # the message's own checks (__post_init__)
            raise ProtocolError(f"{self.name}: {err}") from None

    def _truncated(self, buf: bytes, end: int) -> NoReturn:
        raise ProtocolError(f"{self.name} message truncated: needs {end} bytes, "
                            f"got {len(buf)}")

    def _read_text(self, buf: bytes, pos: int, n: int, name: str) -> str:
        if n > MAX_TEXT_BYTES:
            raise ProtocolError(f"{self.name}.{name} has {n} bytes, limit {MAX_TEXT_BYTES}")
        if pos + n > len(buf):
            self._truncated(buf, pos + n)
        raw = buf[pos:pos + n]
        if b"\0" in raw:
            raise ProtocolError(f"{self.name}.{name} contains a NUL byte")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"{self.name}.{name} is not valid UTF-8") from None

    def _read_history(self, buf: bytes, pos: int, n: int) -> TermHistory:
        if n > MAX_TERM_HISTORY:
            raise ProtocolError(f"{self.name} term history has {n} entries, "
                                f"limit {MAX_TERM_HISTORY}")
        end = pos + n * _ENTRY.size
        if end > len(buf):
            self._truncated(buf, end)
        entries = [TermEntry(term, Lsn(start), Lsn(prev))
                   for term, start, prev in _ENTRY.iter_unpack(buf[pos:end])]
        for a, b in zip(entries, entries[1:], strict=False):
            if b.term <= a.term or b.start_lsn < a.start_lsn:
                raise ProtocolError(f"{self.name} term history is not ordered: ({a.term}, "
                                    f"{a.start_lsn}) then ({b.term}, {b.start_lsn})")
        return tuple(entries)


def _to_wire(name: str, wire: Wire, value: Any) -> object:
    """A fixed-size field's value as its struct code takes it."""
    if wire is Wire.LSN:
        return value.value
    if wire is Wire.U64:
        assert isinstance(value, int) and 0 <= value <= _U64_MAX, (name, value)
        return value
    if wire is Wire.BOOL:
        return 1 if value else 0
    if wire is Wire.U32 or wire is Wire.U16:
        return value
    return value.raw


_CODECS: dict[int, _Codec] = {}
"""Tag -> its class's codec, made at the first message of that class: not at import
(evaluating every class's annotations took ~2 ms of the CLI's start, issue 13)."""


def _codec(tag: int) -> _Codec | None:
    codec = _CODECS.get(tag)
    if codec is None:
        cls = _CLASSES.get(tag)
        if cls is None:
            return None
        codec = _CODECS[tag] = _Codec(cls)  # two threads may both make it: the same
    return codec


def encode(msg: Message) -> bytes:
    """The wire form of `msg`: tag, then its fields in order."""
    codec = _CODECS.get(msg.TAG) or _codec(msg.TAG)
    assert codec is not None, msg
    return codec.encode(msg)


def decode(buf: bytes) -> Message:
    """Parse one message; `ProtocolError` says what is wrong with it."""
    if not buf:
        raise ProtocolError("empty safekeeper protocol message")
    codec = _CODECS.get(buf[0]) or _codec(buf[0])
    if codec is None:
        raise ProtocolError(f"unknown safekeeper protocol message tag {buf[0]}")
    return codec.decode(bytes(buf))
