"""Sans-IO codec of the PostgreSQL v3 frontend/backend protocol and its replication messages.

Every message is a frozen dataclass with `encode() -> bytes` giving its exact wire
form. `MessageReader` turns a byte stream (fed in arbitrary chunks) into whole
messages of one direction. Layouts come from the PostgreSQL 15 documentation,
"Message Formats" (protocol-message-formats.html), and `pqcomm.h` for the
startup codes; the replication sub-messages carried in CopyData come from
"Streaming Replication Protocol" (`walsender.c`, `walreceiver.c`).

Anything malformed (bad length, unknown type, truncated or trailing field,
oversized message) raises `ProtocolError`; nothing else escapes the decoder.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from strata.common.errors import ProtocolError

PROTOCOL_VERSION_3 = 196608  # 3 << 16 | 0 (pqcomm.h PG_PROTOCOL(3, 0))
SSL_REQUEST_CODE = 80877103  # pqcomm.h NEGOTIATE_SSL_CODE, PG_PROTOCOL(1234, 5679)
GSSENC_REQUEST_CODE = 80877104  # NEGOTIATE_GSS_CODE, PG_PROTOCOL(1234, 5680)
CANCEL_REQUEST_CODE = 80877102  # CANCEL_REQUEST_CODE, PG_PROTOCOL(1234, 5678)
MAX_STARTUP_PACKET_BYTES = 10000  # pqcomm.h MAX_STARTUP_PACKET_LENGTH
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

# Seconds from the Unix epoch to the PostgreSQL epoch, 2000-01-01 00:00:00 UTC.
PG_EPOCH_OFFSET_S = 946_684_800
# TimestampTz (pg_time.h) counts microseconds from that epoch: add this for Unix-epoch us.
POSTGRES_EPOCH_UNIX_US = PG_EPOCH_OFFSET_S * 1_000_000

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_I64 = struct.Struct("!q")
_U64 = struct.Struct("!Q")


def pg_timestamp(unix_time_s: float) -> int:
    """Microseconds since 2000-01-01 UTC, as the replication protocol sends time."""
    return int(round((unix_time_s - PG_EPOCH_OFFSET_S) * 1_000_000))


def unix_time(pg_timestamp_us: int) -> float:
    return pg_timestamp_us / 1_000_000 + PG_EPOCH_OFFSET_S


# --- decoding helpers -------------------------------------------------------

class _Fields:
    """Reads fields of one message body; every overrun is a ProtocolError."""

    def __init__(self, what: str, body: bytes) -> None:
        self.what = what
        self.body = body
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.body):
            raise ProtocolError(f"{self.what}: truncated at byte {self.pos} of {len(self.body)} "
                                f"(wanted {n} more); the peer sent a malformed message")
        chunk = self.body[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def i16(self) -> int:
        return int(_I16.unpack(self._take(2))[0])

    def i32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def u32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def i64(self) -> int:
        return int(_I64.unpack(self._take(8))[0])

    def u64(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def byte(self) -> int:
        return self._take(1)[0]

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def rest(self) -> bytes:
        return self._take(len(self.body) - self.pos)

    def cstring(self) -> str:
        end = self.body.find(b"\0", self.pos)
        if end < 0:
            raise ProtocolError(f"{self.what}: string at byte {self.pos} has no terminating NUL")
        raw = self.body[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ProtocolError(f"{self.what}: string at byte {self.pos} is not UTF-8") from err

    def done(self) -> None:
        if self.pos != len(self.body):
            raise ProtocolError(f"{self.what}: {len(self.body) - self.pos} unexpected trailing "
                                f"bytes after byte {self.pos}")


def _cstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    assert b"\0" not in raw, f"NUL inside protocol string {text!r}"
    return raw + b"\0"


def _typed(tag: bytes, body: bytes) -> bytes:
    assert len(tag) == 1, tag
    return tag + _I32.pack(len(body) + 4) + body


# --- startup phase (frontend, untyped) ---------------------------------------

@dataclass(frozen=True, slots=True)
class StartupMessage:
    """Protocol 3.0 startup packet: user, database, replication, application_name ..."""

    parameters: tuple[tuple[str, str], ...]
    protocol: int = PROTOCOL_VERSION_3

    def get(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.parameters:
            if key == name:
                return value
        return default

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol) + b"".join(
            _cstr(k) + _cstr(v) for k, v in self.parameters) + b"\0"
        return _I32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return _I32.pack(16) + _I32.pack(CANCEL_REQUEST_CODE) + _I32.pack(self.process_id) \
            + _I32.pack(self.secret_key)


def _decode_startup(body: bytes) -> StartupPacket:
    f = _Fields("startup packet", body)
    code = f.i32()
    if code == SSL_REQUEST_CODE:
        f.done()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        f.done()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        msg = CancelRequest(f.i32(), f.i32())
        f.done()
        return msg
    if code >> 16 != 3:
        raise ProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}; "
                            "only protocol 3.x is spoken")
    params: list[tuple[str, str]] = []
    while True:
        key = f.cstring()
        if key == "":
            break
        params.append((key, f.cstring()))
    f.done()
    return StartupMessage(tuple(params), code)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


# --- frontend messages (typed) ------------------------------------------------

@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p': a cleartext or md5 password (also the tag of SASL responses)."""

    password: str

    def encode(self) -> bytes:
        return _typed(b"p", _cstr(self.password))


@dataclass(frozen=True, slots=True)
class Query:
    sql: str

    def encode(self) -> bytes:
        return _typed(b"Q", _cstr(self.sql))


@dataclass(frozen=True, slots=True)
class CopyData:
    """'d' in both directions; `data` is opaque (replication messages, tar bytes ...)."""

    data: bytes

    def encode(self) -> bytes:
        return _typed(b"d", self.data)


@dataclass(frozen=True, slots=True)
class CopyDone:
    def encode(self) -> bytes:
        return _typed(b"c", b"")


@dataclass(frozen=True, slots=True)
class CopyFail:
    reason: str

    def encode(self) -> bytes:
        return _typed(b"f", _cstr(self.reason))


@dataclass(frozen=True, slots=True)
class Terminate:
    def encode(self) -> bytes:
        return _typed(b"X", b"")


@dataclass(frozen=True, slots=True)
class Sync:
    def encode(self) -> bytes:
        return _typed(b"S", b"")


@dataclass(frozen=True, slots=True)
class ExtendedQueryMessage:
    """Parse/Bind/Describe/Execute/Close/Flush, kept opaque: Strata servers answer
    only simple queries, and reject these with an error until the next Sync."""

    tag: bytes
    body: bytes

    def encode(self) -> bytes:
        return _typed(self.tag, self.body)


_EXTENDED_TAGS = frozenset(b"PBDECH")

FrontendMessage = (PasswordMessage | Query | CopyData | CopyDone | CopyFail | Terminate | Sync
                   | ExtendedQueryMessage)


def _decode_frontend(tag: int, body: bytes) -> FrontendMessage:
    name = chr(tag)
    f = _Fields(f"frontend message {name!r}", body)
    msg: FrontendMessage
    if name == "Q":
        msg = Query(f.cstring())
    elif name == "d":
        msg = CopyData(f.rest())
    elif name == "c":
        msg = CopyDone()
    elif name == "f":
        msg = CopyFail(f.cstring())
    elif name == "X":
        msg = Terminate()
    elif name == "S":
        msg = Sync()
    elif name == "p":
        # SASL responses share the tag and are not NUL-terminated; we only speak
        # cleartext/md5, where the password is a C string.
        msg = PasswordMessage(f.cstring())
    elif tag in _EXTENDED_TAGS:
        msg = ExtendedQueryMessage(bytes([tag]), f.rest())
    else:
        raise ProtocolError(f"unknown frontend message type {name!r} (0x{tag:02x})")
    f.done()
    return msg


# --- backend messages ---------------------------------------------------------

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class AuthenticationOk:
    def encode(self) -> bytes:
        return _typed(b"R", _I32.pack(AUTH_OK))


@dataclass(frozen=True, slots=True)
class AuthenticationCleartextPassword:
    def encode(self) -> bytes:
        return _typed(b"R", _I32.pack(AUTH_CLEARTEXT))


@dataclass(frozen=True, slots=True)
class AuthenticationMD5Password:
    salt: bytes

    def __post_init__(self) -> None:
        assert len(self.salt) == 4, self.salt

    def encode(self) -> bytes:
        return _typed(b"R", _I32.pack(AUTH_MD5) + self.salt)


@dataclass(frozen=True, slots=True)
class AuthenticationOther:
    """A request we cannot answer (SASL, GSS, SSPI ...); `code` says which."""

    code: int
    data: bytes

    def encode(self) -> bytes:
        return _typed(b"R", _I32.pack(self.code) + self.data)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    name: str
    value: str

    def encode(self) -> bytes:
        return _typed(b"S", _cstr(self.name) + _cstr(self.value))


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return _typed(b"K", _I32.pack(self.process_id) + _I32.pack(self.secret_key))


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    status: Literal["I", "T", "E"] = "I"  # idle, in transaction, failed transaction

    def encode(self) -> bytes:
        return _typed(b"Z", self.status.encode("ascii"))


TEXT_OID = 25
INT8_OID = 20
INT4_OID = 23


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    type_oid: int = TEXT_OID
    table_oid: int = 0
    column_number: int = 0
    type_size: int = -1
    type_modifier: int = -1
    format_code: int = 0  # 0 text, 1 binary


@dataclass(frozen=True, slots=True)
class RowDescription:
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.fields))]
        for fd in self.fields:
            parts.append(_cstr(fd.name) + _U32.pack(fd.table_oid) + _I16.pack(fd.column_number)
                         + _U32.pack(fd.type_oid) + _I16.pack(fd.type_size)
                         + _I32.pack(fd.type_modifier) + _I16.pack(fd.format_code))
        return _typed(b"T", b"".join(parts))


@dataclass(frozen=True, slots=True)
class DataRow:
    values: tuple[bytes | None, ...]  # None is SQL NULL

    def encode(self) -> bytes:
        parts = [_I16.pack(len(self.values))]
        for value in self.values:
            parts.append(_I32.pack(-1) if value is None else _I32.pack(len(value)) + value)
        return _typed(b"D", b"".join(parts))


@dataclass(frozen=True, slots=True)
class CommandComplete:
    tag: str  # "SELECT 1", "IDENTIFY_SYSTEM", "COPY 0" ...

    def encode(self) -> bytes:
        return _typed(b"C", _cstr(self.tag))


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse:
    def encode(self) -> bytes:
        return _typed(b"I", b"")


# Field codes of ErrorResponse/NoticeResponse ("Error and Notice Message Fields").
_NAMED_FIELDS = {"S": "severity", "C": "code", "M": "message", "D": "detail", "H": "hint"}


@dataclass(frozen=True, slots=True)
class _Report:
    severity: str = "ERROR"
    code: str = "XX000"  # SQLSTATE
    message: str = ""
    detail: str | None = None
    hint: str | None = None
    # Everything else (V, P, W, s, t, F, L, R ...) in arrival order.
    other: tuple[tuple[str, str], ...] = field(default=())

    def _body(self) -> bytes:
        # 'V' is the untranslated severity PostgreSQL 9.6+ sends; clients prefer it.
        parts = [b"S" + _cstr(self.severity)]
        if not any(k == "V" for k, _ in self.other):
            parts.append(b"V" + _cstr(self.severity))
        parts += [b"C" + _cstr(self.code), b"M" + _cstr(self.message)]
        if self.detail is not None:
            parts.append(b"D" + _cstr(self.detail))
        if self.hint is not None:
            parts.append(b"H" + _cstr(self.hint))
        parts += [k.encode("ascii") + _cstr(v) for k, v in self.other]
        return b"".join(parts) + b"\0"


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Report):
    def encode(self) -> bytes:
        return _typed(b"E", self._body())


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Report):
    severity: str = "NOTICE"
    code: str = "00000"

    def encode(self) -> bytes:
        return _typed(b"N", self._body())


def _decode_report(f: _Fields) -> dict[str, object]:
    named: dict[str, object] = {}
    other: list[tuple[str, str]] = []
    while True:
        code = f.byte()
        if code == 0:
            break
        key = chr(code)
        value = f.cstring()
        if key in _NAMED_FIELDS:
            named[_NAMED_FIELDS[key]] = value
        elif key == "V" and value == named.get("severity"):
            continue  # regenerated by encode()
        else:
            other.append((key, value))
    named["other"] = tuple(other)
    return named


@dataclass(frozen=True, slots=True)
class _CopyResponse:
    overall_format: int = 0
    column_formats: tuple[int, ...] = ()

    def _body(self) -> bytes:
        return bytes([self.overall_format]) + _I16.pack(len(self.column_formats)) + b"".join(
            _I16.pack(c) for c in self.column_formats)


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    def encode(self) -> bytes:
        return _typed(b"H", self._body())


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    def encode(self) -> bytes:
        return _typed(b"W", self._body())


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    def encode(self) -> bytes:
        return _typed(b"G", self._body())


BackendMessage = (AuthenticationOk | AuthenticationCleartextPassword | AuthenticationMD5Password
                  | AuthenticationOther | ParameterStatus | BackendKeyData | ReadyForQuery
                  | RowDescription | DataRow | CommandComplete | EmptyQueryResponse
                  | ErrorResponse | NoticeResponse | CopyOutResponse | CopyBothResponse
                  | CopyInResponse | CopyData | CopyDone)


def _decode_auth(f: _Fields) -> BackendMessage:
    code = f.i32()
    if code == AUTH_OK:
        return AuthenticationOk()
    if code == AUTH_CLEARTEXT:
        return AuthenticationCleartextPassword()
    if code == AUTH_MD5:
        return AuthenticationMD5Password(f.raw(4))
    return AuthenticationOther(code, f.rest())


def _decode_row_description(f: _Fields) -> RowDescription:
    count = f.i16()
    if count < 0:
        raise ProtocolError(f"RowDescription: negative field count {count}")
    fields = []
    for _ in range(count):
        name = f.cstring()
        table_oid, column, type_oid = f.u32(), f.i16(), f.u32()
        size, modifier, fmt = f.i16(), f.i32(), f.i16()
        fields.append(FieldDescription(name, type_oid, table_oid, column, size, modifier, fmt))
    return RowDescription(tuple(fields))


def _decode_data_row(f: _Fields) -> DataRow:
    count = f.i16()
    if count < 0:
        raise ProtocolError(f"DataRow: negative column count {count}")
    values: list[bytes | None] = []
    for _ in range(count):
        length = f.i32()
        if length < -1:
            raise ProtocolError(f"DataRow: invalid value length {length}")
        values.append(None if length == -1 else f.raw(length))
    return DataRow(tuple(values))


def _decode_copy_response(f: _Fields) -> tuple[int, tuple[int, ...]]:
    overall = f.byte()
    count = f.i16()
    if count < 0:
        raise ProtocolError(f"copy response: negative column count {count}")
    return overall, tuple(f.i16() for _ in range(count))


def _decode_backend(tag: int, body: bytes) -> BackendMessage:
    name = chr(tag)
    f = _Fields(f"backend message {name!r}", body)
    msg: BackendMessage
    if name == "R":
        msg = _decode_auth(f)
    elif name == "S":
        msg = ParameterStatus(f.cstring(), f.cstring())
    elif name == "K":
        msg = BackendKeyData(f.i32(), f.i32())
    elif name == "Z":
        status = chr(f.byte())
        if status not in ("I", "T", "E"):
            raise ProtocolError(f"ReadyForQuery: unknown transaction status {status!r}")
        msg = ReadyForQuery(status)  # type: ignore[arg-type]
    elif name == "T":
        msg = _decode_row_description(f)
    elif name == "D":
        msg = _decode_data_row(f)
    elif name == "C":
        msg = CommandComplete(f.cstring())
    elif name == "I":
        msg = EmptyQueryResponse()
    elif name == "E":
        msg = ErrorResponse(**_decode_report(f))  # type: ignore[arg-type]
    elif name == "N":
        msg = NoticeResponse(**_decode_report(f))  # type: ignore[arg-type]
    elif name == "H":
        msg = CopyOutResponse(*_decode_copy_response(f))
    elif name == "W":
        msg = CopyBothResponse(*_decode_copy_response(f))
    elif name == "G":
        msg = CopyInResponse(*_decode_copy_response(f))
    elif name == "d":
        msg = CopyData(f.rest())
    elif name == "c":
        msg = CopyDone()
    else:
        raise ProtocolError(f"unknown backend message type {name!r} (0x{tag:02x})")
    f.done()
    return msg


# --- the stream reader ------------------------------------------------------------

_COPY_DATA = ord("d")


class MessageReader:
    """Splits a byte stream of one direction into whole messages.

    `side="frontend"` reads what a client sends (a server uses it): untyped startup
    packets until a `StartupMessage`, then typed frontend messages.
    `side="backend"` reads what a server sends (a client uses it).
    """

    def __init__(self, side: Literal["frontend", "backend"], *,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        assert max_message_bytes >= 8, max_message_bytes
        self.side = side
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._in_startup = side == "frontend"

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered_bytes(self) -> int:
        return len(self._buf)

    def __iter__(self) -> Iterator[StartupPacket | FrontendMessage | BackendMessage]:
        while (msg := self.next()) is not None:
            yield msg

    def next(self) -> StartupPacket | FrontendMessage | BackendMessage | None:
        """The next whole message, or None until more bytes are fed."""
        if self._in_startup:
            return self._next_startup()
        if len(self._buf) < 5:
            return None
        tag = self._buf[0]
        length = int(_I32.unpack_from(self._buf, 1)[0])
        if length < 4:
            raise ProtocolError(f"message {chr(tag)!r} has invalid length {length}")
        if length > self.max_message_bytes:
            raise ProtocolError(f"message {chr(tag)!r} of {length} bytes exceeds the limit of "
                                f"{self.max_message_bytes} bytes")
        if len(self._buf) < 1 + length:
            return None
        body = bytes(self._buf[5:1 + length])
        del self._buf[:1 + length]
        if self.side == "frontend":
            return _decode_frontend(tag, body)
        return _decode_backend(tag, body)

    def take_copy_data(self, out: list[bytes]) -> None:
        """Append to `out` the payloads of the whole CopyData messages at the head of the
        stream, up to the first other or incomplete message (left for `next()`, which
        also reports a bad length). What `next()` would return as `CopyData`s, without a
        message object each: a replication stream's hot path (pgclient's diverted
        CopyBoth)."""
        assert self.side == "backend", self.side
        buf = self._buf
        n = len(buf)
        pos = 0
        while n - pos >= 5 and buf[pos] == _COPY_DATA:
            length = int(_I32.unpack_from(buf, pos + 1)[0])
            end = pos + 1 + length
            if length < 4 or length > self.max_message_bytes or end > n:
                break
            out.append(bytes(buf[pos + 5:end]))
            pos = end
        if pos:
            del buf[:pos]

    def next_backend(self) -> BackendMessage | None:
        """`next()` typed for `side="backend"`."""
        assert self.side == "backend", self.side
        return self.next()  # type: ignore[return-value]

    def next_frontend(self) -> StartupPacket | FrontendMessage | None:
        """`next()` typed for `side="frontend"`."""
        assert self.side == "frontend", self.side
        return self.next()  # type: ignore[return-value]

    def _next_startup(self) -> StartupPacket | None:
        if len(self._buf) < 4:
            return None
        length = int(_I32.unpack_from(self._buf, 0)[0])
        if length < 8 or length > min(MAX_STARTUP_PACKET_BYTES, self.max_message_bytes):
            raise ProtocolError(f"invalid startup packet length {length}")
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[4:length])
        del self._buf[:length]
        msg = _decode_startup(body)
        if isinstance(msg, StartupMessage):
            self._in_startup = False
        return msg


# --- replication messages inside CopyData --------------------------------------------

@dataclass(frozen=True, slots=True)
class XLogData:
    """'w': WAL bytes [start_lsn, start_lsn + len(data)) and the sender's end of WAL."""

    start_lsn: int
    end_lsn: int  # the server's current end of WAL (walsender's sentPtr)
    send_time_us: int
    data: bytes

    HEADER_BYTES = 25  # 'w' + 3 * int64

    def encode(self) -> bytes:
        return b"w" + _U64.pack(self.start_lsn) + _U64.pack(self.end_lsn) \
            + _I64.pack(self.send_time_us) + self.data


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """'k': the server's end of WAL; reply_requested asks for a status update now."""

    end_lsn: int
    send_time_us: int
    reply_requested: bool

    def encode(self) -> bytes:
        return b"k" + _U64.pack(self.end_lsn) + _I64.pack(self.send_time_us) \
            + bytes([self.reply_requested])


@dataclass(frozen=True, slots=True)
class StandbyStatusUpdate:
    """'r': positions the standby has written, flushed (fsynced) and applied."""

    write_lsn: int
    flush_lsn: int
    apply_lsn: int
    send_time_us: int
    reply_requested: bool = False

    def encode(self) -> bytes:
        return b"r" + _U64.pack(self.write_lsn) + _U64.pack(self.flush_lsn) \
            + _U64.pack(self.apply_lsn) + _I64.pack(self.send_time_us) \
            + bytes([self.reply_requested])


# A whole CopyData message holding a StandbyStatusUpdate: 'd', its length (4 + 34), then
# 'r', write, flush, apply, send time, reply requested.
_STATUS_COPY_DATA = struct.Struct("!cIcQQQqB")
_STATUS_COPY_DATA_LENGTH = 4 + 1 + 8 * 4 + 1


def encode_status_copy_data(write_lsn: int, flush_lsn: int, apply_lsn: int,
                            send_time_us: int, reply_requested: bool = False) -> bytes:
    """`CopyData(StandbyStatusUpdate(...).encode()).encode()` in one `struct` call, with no
    message object: a pulling safekeeper sends one per batch of WAL (safekeeper/pull.py).
    Plain ints (hot path)."""
    return _STATUS_COPY_DATA.pack(b"d", _STATUS_COPY_DATA_LENGTH, b"r", write_lsn, flush_lsn,
                                  apply_lsn, send_time_us, reply_requested)


@dataclass(frozen=True, slots=True)
class HotStandbyFeedback:
    """'h': the standby's xmin and catalog_xmin with their epochs."""

    send_time_us: int
    xmin: int
    xmin_epoch: int
    catalog_xmin: int
    catalog_xmin_epoch: int

    def encode(self) -> bytes:
        return b"h" + _I64.pack(self.send_time_us) + _U32.pack(self.xmin) \
            + _U32.pack(self.xmin_epoch) + _U32.pack(self.catalog_xmin) \
            + _U32.pack(self.catalog_xmin_epoch)


ReplicationMessage = XLogData | PrimaryKeepalive | StandbyStatusUpdate | HotStandbyFeedback


def _flag(f: _Fields) -> bool:
    value = f.byte()
    if value > 1:
        raise ProtocolError(f"{f.what}: reply-requested flag is {value}, expected 0 or 1")
    return value == 1


def decode_replication(payload: bytes) -> ReplicationMessage:
    """Decode the payload of a CopyData carrying a physical replication message."""
    if not payload:
        raise ProtocolError("empty CopyData where a replication message was expected")
    kind = chr(payload[0])
    f = _Fields(f"replication message {kind!r}", payload[1:])
    msg: ReplicationMessage
    if kind == "w":
        msg = XLogData(f.u64(), f.u64(), f.i64(), f.rest())
    elif kind == "k":
        msg = PrimaryKeepalive(f.u64(), f.i64(), _flag(f))
    elif kind == "r":
        msg = StandbyStatusUpdate(f.u64(), f.u64(), f.u64(), f.i64(), _flag(f))
    elif kind == "h":
        msg = HotStandbyFeedback(f.i64(), f.u32(), f.u32(), f.u32(), f.u32())
    else:
        raise ProtocolError(f"unknown replication message type {kind!r}")
    f.done()
    return msg
