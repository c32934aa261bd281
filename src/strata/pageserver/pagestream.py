"""The pagestream sub-protocol: GetPage@LSN requests and responses as bytes, without I/O.

After `pagestream <tenant> <timeline>` the connection is in CopyBoth mode and every
CopyData payload is one message. The client sends requests; the server answers each
with exactly one response carrying the same request id, in request order (a client
may pipeline). Every request names the LSN it reads at.

Encoding (big-endian, as the rest of the PostgreSQL wire protocol):

    request   tag u8 | request_id u64 | lsn u64 | body
    response  tag u8 | request_id u64 | body
    rel       spcnode u32 | dbnode u32 | relnode u32 | forknum u8

    'E' Exists          rel                        'e'  exists u8 (0 or 1)
    'N' Nblocks         rel                        'n'  nblocks u32
    'P' GetPage         rel | blkno u32            'p'  page (8192 bytes)
    'B' GetPages        ngroups u16, then per      'b'  count u16 | count pages
                        group: rel | count u16 |
                        count x blkno u32
    'D' DbSize          spcnode u32 | dbnode u32   'd'  size_bytes u64
    'S' GetSlruSegment  kind u8 | segno u32        's'  npages u16 | npages pages
    'L' Lease           duration_s f64             'l'  expires_at f64 (seconds)
                                                   'x'  Error: kind u8 | message utf-8

A batch groups consecutive blocks of one relation (one group for "many blocks of one
relation", one group per block for an arbitrary list). Batches hold at most
MAX_BATCH_PAGES blocks, so a response stays under MAX_MESSAGE_BYTES. Anything that
does not decode exactly (unknown tag, wrong length, out-of-range field, trailing
bytes) raises ProtocolError: the peer is broken and the connection is closed.

`ClientCore` numbers a client's requests and matches each response to the oldest
outstanding request (ids and response kinds must agree).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from strata.common.errors import (
    CorruptionError,
    NotFound,
    ProtocolError,
    StrataError,
    Unavailable,
    UserError,
)
from strata.common.lsn import Lsn
from strata.pg.constants import BLCKSZ, ForkNumber
from strata.pg.relfile import RelTag
from strata.pg.slru import SLRU_PAGES_PER_SEGMENT, SlruKind

MAX_BATCH_PAGES = 256
"""Blocks in one GetPages request (the response is 2 MB + 11 bytes at most)."""
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""No pagestream message, request or response, may be longer than this."""
MAX_LEASE_S = 7 * 24 * 3600.0
"""A lease is renewed by its holder; a week is far beyond any renewal period."""
MAX_ERROR_MESSAGE_BYTES = 16 * 1024

_REQ_HEAD = struct.Struct(">BQQ")
_RESP_HEAD = struct.Struct(">BQ")
_REL = struct.Struct(">IIIB")
_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_U32_MAX = 0xFFFFFFFF
_U64_MAX = (1 << 64) - 1
_MAX_FORKNUM = max(ForkNumber)


# --- requests -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExistsRequest:
    lsn: Lsn
    rel: RelTag
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class NblocksRequest:
    lsn: Lsn
    rel: RelTag
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class GetPageRequest:
    lsn: Lsn
    rel: RelTag
    blkno: int
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class GetPagesRequest:
    """Many blocks in one round trip: of one relation (`for_rel`) or any (rel, blkno) list."""

    lsn: Lsn
    blocks: tuple[tuple[RelTag, int], ...]
    request_id: int = 0

    def __post_init__(self) -> None:
        if not 1 <= len(self.blocks) <= MAX_BATCH_PAGES:
            raise UserError(f"a GetPages batch holds 1 to {MAX_BATCH_PAGES} blocks, got "
                            f"{len(self.blocks)}; split it")

    @classmethod
    def for_rel(cls, lsn: Lsn, rel: RelTag, blknos: tuple[int, ...] | list[int],
                request_id: int = 0) -> GetPagesRequest:
        return cls(lsn, tuple((rel, b) for b in blknos), request_id)


@dataclass(frozen=True, slots=True)
class DbSizeRequest:
    """Total size in bytes of every fork of every relation of one database."""

    lsn: Lsn
    dbnode: int
    spcnode: int = 1663  # DEFAULTTABLESPACE_OID (pg_tablespace.dat)
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class GetSlruSegmentRequest:
    lsn: Lsn
    kind: SlruKind
    segno: int
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class LeaseRequest:
    """Acquire or renew (the same request again) an LSN lease for `duration_s`."""

    lsn: Lsn
    duration_s: float
    request_id: int = 0


Request = (ExistsRequest | NblocksRequest | GetPageRequest | GetPagesRequest | DbSizeRequest
           | GetSlruSegmentRequest | LeaseRequest)


# --- responses ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ExistsResponse:
    exists: bool
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class NblocksResponse:
    nblocks: int
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class GetPageResponse:
    page: bytes
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class GetPagesResponse:
    pages: tuple[bytes, ...]
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class DbSizeResponse:
    size_bytes: int
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class GetSlruSegmentResponse:
    data: bytes  # the segment file: a whole number of pages
    request_id: int = 0


@dataclass(frozen=True, slots=True)
class LeaseResponse:
    expires_at: float  # seconds, on the pageserver's clock (Unix time in production)
    request_id: int = 0


class ErrorKind(IntEnum):
    """Which error class the client re-raises (strata.common.errors)."""

    INTERNAL = 0
    USER = 1         # UserError: e.g. a read below the GC cutoff
    NOT_FOUND = 2    # NotFound: past a relation's size, a missing relation or segment
    UNAVAILABLE = 3  # Unavailable: the wait for the LSN timed out; retry later
    CORRUPTION = 4   # CorruptionError: a broken timeline, a failed checksum


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    kind: ErrorKind
    message: str
    request_id: int = 0

    @classmethod
    def from_exception(cls, err: BaseException, request_id: int = 0,
                       context: str = "") -> ErrorResponse:
        kind = ErrorKind.INTERNAL
        for cls_, k in _KIND_BY_CLASS:
            if isinstance(err, cls_):
                kind = k
                break
        text = str(err) if isinstance(err, StrataError) else \
            f"internal error: {type(err).__name__}: {err}"
        message = f"{context}: {text}" if context else text
        raw = message.encode()
        if len(raw) > MAX_ERROR_MESSAGE_BYTES:
            message = raw[:MAX_ERROR_MESSAGE_BYTES].decode(errors="ignore")
        return cls(kind, message, request_id)

    def to_exception(self) -> StrataError:
        exc_class = _CLASS_BY_KIND.get(self.kind, StrataError)
        return exc_class(self.message)


_KIND_BY_CLASS: tuple[tuple[type[BaseException], ErrorKind], ...] = (
    (NotFound, ErrorKind.NOT_FOUND),
    (UserError, ErrorKind.USER),
    (Unavailable, ErrorKind.UNAVAILABLE),
    (CorruptionError, ErrorKind.CORRUPTION),
)
_CLASS_BY_KIND: dict[ErrorKind, type[StrataError]] = {
    ErrorKind.NOT_FOUND: NotFound, ErrorKind.USER: UserError,
    ErrorKind.UNAVAILABLE: Unavailable, ErrorKind.CORRUPTION: CorruptionError,
}

Response = (ExistsResponse | NblocksResponse | GetPageResponse | GetPagesResponse
            | DbSizeResponse | GetSlruSegmentResponse | LeaseResponse | ErrorResponse)

RESPONSE_FOR: dict[type[Request], type[Response]] = {
    ExistsRequest: ExistsResponse, NblocksRequest: NblocksResponse,
    GetPageRequest: GetPageResponse, GetPagesRequest: GetPagesResponse,
    DbSizeRequest: DbSizeResponse, GetSlruSegmentRequest: GetSlruSegmentResponse,
    LeaseRequest: LeaseResponse,
}


def describe(request: Request) -> str:
    """The request in words, naming its key and LSN (prefix of every error message)."""
    at = f"at LSN {request.lsn}"
    match request:
        case ExistsRequest(rel=rel):
            return f"Exists {rel} {at}"
        case NblocksRequest(rel=rel):
            return f"Nblocks {rel} {at}"
        case GetPageRequest(rel=rel, blkno=blkno):
            return f"GetPage block {blkno} of {rel} {at}"
        case GetPagesRequest(blocks=blocks):
            first_rel, first_blk = blocks[0]
            return (f"GetPages of {len(blocks)} blocks (first: block {first_blk} of "
                    f"{first_rel}) {at}")
        case DbSizeRequest(spcnode=spc, dbnode=db):
            return f"DbSize of database {spc}/{db} {at}"
        case GetSlruSegmentRequest(kind=kind, segno=segno):
            return f"GetSlruSegment {kind.name} segment {segno:04X} {at}"
        case LeaseRequest(duration_s=duration_s):
            return f"Lease for {duration_s}s {at}"


# --- encoding -------------------------------------------------------------------------
def _rel(rel: RelTag) -> bytes:
    return _REL.pack(rel.spcnode, rel.dbnode, rel.relnode, rel.forknum)


def _groups(blocks: tuple[tuple[RelTag, int], ...]) -> list[tuple[RelTag, list[int]]]:
    groups: list[tuple[RelTag, list[int]]] = []
    for rel, blkno in blocks:
        if groups and groups[-1][0] == rel:
            groups[-1][1].append(blkno)
        else:
            groups.append((rel, [blkno]))
    return groups


def encode_request(request: Request) -> bytes:
    match request:
        case ExistsRequest(rel=rel):
            tag, body = b"E", _rel(rel)
        case NblocksRequest(rel=rel):
            tag, body = b"N", _rel(rel)
        case GetPageRequest(rel=rel, blkno=blkno):
            tag, body = b"P", _rel(rel) + _U32.pack(blkno)
        case GetPagesRequest(blocks=blocks):
            groups = _groups(blocks)
            parts = [_U16.pack(len(groups))]
            for rel, blknos in groups:
                parts.append(_rel(rel) + _U16.pack(len(blknos)))
                parts.append(struct.pack(f">{len(blknos)}I", *blknos))
            tag, body = b"B", b"".join(parts)
        case DbSizeRequest(spcnode=spc, dbnode=db):
            tag, body = b"D", _U32.pack(spc) + _U32.pack(db)
        case GetSlruSegmentRequest(kind=kind, segno=segno):
            tag, body = b"S", _U8.pack(int(kind)) + _U32.pack(segno)
        case LeaseRequest(duration_s=duration_s):
            tag, body = b"L", _F64.pack(duration_s)
    return _REQ_HEAD.pack(tag[0], request.request_id, request.lsn.value) + body


def encode_response(response: Response) -> bytes:
    match response:
        case ExistsResponse(exists=exists):
            tag, body = b"e", _U8.pack(1 if exists else 0)
        case NblocksResponse(nblocks=nblocks):
            tag, body = b"n", _U32.pack(nblocks)
        case GetPageResponse(page=page):
            assert len(page) == BLCKSZ, len(page)
            tag, body = b"p", page
        case GetPagesResponse(pages=pages):
            assert len(pages) <= MAX_BATCH_PAGES, len(pages)
            assert all(len(p) == BLCKSZ for p in pages), [len(p) for p in pages]
            tag, body = b"b", _U16.pack(len(pages)) + b"".join(pages)
        case DbSizeResponse(size_bytes=size_bytes):
            tag, body = b"d", _U64.pack(size_bytes)
        case GetSlruSegmentResponse(data=data):
            assert len(data) % BLCKSZ == 0, len(data)
            tag, body = b"s", _U16.pack(len(data) // BLCKSZ) + data
        case LeaseResponse(expires_at=expires_at):
            tag, body = b"l", _F64.pack(expires_at)
        case ErrorResponse(kind=kind, message=message):
            tag, body = b"x", _U8.pack(int(kind)) + message.encode()
    return _RESP_HEAD.pack(tag[0], response.request_id) + body


# --- decoding -------------------------------------------------------------------------
class _Reader:
    """Reads fields from one message; any shortfall or excess is a ProtocolError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, fmt: struct.Struct) -> tuple[int, ...]:
        if self.pos + fmt.size > len(self.data):
            raise ProtocolError(f"{self.what} is truncated: needs {self.pos + fmt.size} bytes, "
                                f"has {len(self.data)}")
        values = fmt.unpack_from(self.data, self.pos)
        self.pos += fmt.size
        return values

    def one(self, fmt: struct.Struct) -> int:
        return self.take(fmt)[0]

    def finite_float(self) -> float:
        value: float = _F64.unpack_from(self.data, self._advance(_F64.size))[0]
        if not math.isfinite(value):
            raise ProtocolError(f"{self.what} carries a non-finite number {value}")
        return value

    def _advance(self, size: int) -> int:
        if self.pos + size > len(self.data):
            raise ProtocolError(f"{self.what} is truncated: needs {self.pos + size} bytes, "
                                f"has {len(self.data)}")
        start = self.pos
        self.pos += size
        return start

    def raw(self, size: int) -> bytes:
        start = self._advance(size)
        return self.data[start:self.pos]

    def rest(self) -> bytes:
        start, self.pos = self.pos, len(self.data)
        return self.data[start:]

    def rel(self) -> RelTag:
        spc, db, relnode, fork = self.take(_REL)
        if fork > _MAX_FORKNUM:
            raise ProtocolError(f"{self.what} names fork {fork}; forks are 0..{_MAX_FORKNUM}")
        return RelTag(spc, db, relnode, fork)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ProtocolError(f"{self.what} has {len(self.data) - self.pos} trailing bytes")


def _check_size(data: bytes, what: str) -> None:
    if len(data) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"{what} is {len(data)} bytes, more than the limit of "
                            f"{MAX_MESSAGE_BYTES}")


def decode_request(data: bytes) -> Request:
    """One request from one CopyData payload; ProtocolError if it is not exactly one."""
    _check_size(data, "pagestream request")
    r = _Reader(data, "pagestream request")
    tag, request_id, lsn_value = r.take(_REQ_HEAD)
    lsn = Lsn(lsn_value)
    request: Request
    match bytes([tag]):
        case b"E":
            request = ExistsRequest(lsn, r.rel(), request_id)
        case b"N":
            request = NblocksRequest(lsn, r.rel(), request_id)
        case b"P":
            rel = r.rel()
            request = GetPageRequest(lsn, rel, r.one(_U32), request_id)
        case b"B":
            request = GetPagesRequest(lsn, _decode_blocks(r), request_id)
        case b"D":
            spc = r.one(_U32)
            request = DbSizeRequest(lsn, r.one(_U32), spc, request_id)
        case b"S":
            kind = r.one(_U8)
            if kind not in SlruKind._value2member_map_:
                raise ProtocolError(f"pagestream request names SLRU kind {kind}; known: "
                                    f"{[int(k) for k in SlruKind]}")
            request = GetSlruSegmentRequest(lsn, SlruKind(kind), r.one(_U32), request_id)
        case b"L":
            duration_s = r.finite_float()
            if not 0 < duration_s <= MAX_LEASE_S:
                raise ProtocolError(f"lease duration {duration_s}s is outside (0, "
                                    f"{MAX_LEASE_S}]")
            request = LeaseRequest(lsn, duration_s, request_id)
        case _:
            raise ProtocolError(f"unknown pagestream request tag {tag:#04x}")
    r.end()
    return request


def _decode_blocks(r: _Reader) -> tuple[tuple[RelTag, int], ...]:
    ngroups = r.one(_U16)
    if not 1 <= ngroups <= MAX_BATCH_PAGES:
        raise ProtocolError(f"GetPages request has {ngroups} groups; 1..{MAX_BATCH_PAGES}")
    blocks: list[tuple[RelTag, int]] = []
    for _ in range(ngroups):
        rel = r.rel()
        count = r.one(_U16)
        if count == 0 or len(blocks) + count > MAX_BATCH_PAGES:
            raise ProtocolError(f"GetPages request group of {count} blocks after "
                                f"{len(blocks)}: a batch holds 1..{MAX_BATCH_PAGES} blocks")
        blknos = r.take(struct.Struct(f">{count}I"))
        blocks.extend((rel, b) for b in blknos)
    return tuple(blocks)


def decode_response(data: bytes) -> Response:
    """One response from one CopyData payload; ProtocolError if it is not exactly one."""
    _check_size(data, "pagestream response")
    r = _Reader(data, "pagestream response")
    tag, request_id = r.take(_RESP_HEAD)
    response: Response
    match bytes([tag]):
        case b"e":
            flag = r.one(_U8)
            if flag > 1:
                raise ProtocolError(f"Exists response flag is {flag}, not 0 or 1")
            response = ExistsResponse(flag == 1, request_id)
        case b"n":
            response = NblocksResponse(r.one(_U32), request_id)
        case b"p":
            response = GetPageResponse(r.raw(BLCKSZ), request_id)
        case b"b":
            count = r.one(_U16)
            if count > MAX_BATCH_PAGES:
                raise ProtocolError(f"GetPages response has {count} pages; at most "
                                    f"{MAX_BATCH_PAGES}")
            response = GetPagesResponse(tuple(r.raw(BLCKSZ) for _ in range(count)),
                                        request_id)
        case b"d":
            response = DbSizeResponse(r.one(_U64), request_id)
        case b"s":
            npages = r.one(_U16)
            if npages > SLRU_PAGES_PER_SEGMENT:
                raise ProtocolError(f"SLRU segment response has {npages} pages; a segment "
                                    f"has at most {SLRU_PAGES_PER_SEGMENT}")
            response = GetSlruSegmentResponse(r.raw(npages * BLCKSZ), request_id)
        case b"l":
            response = LeaseResponse(r.finite_float(), request_id)
        case b"x":
            kind = r.one(_U8)
            if kind not in ErrorKind._value2member_map_:
                raise ProtocolError(f"error response has unknown kind {kind}")
            raw = r.rest()
            if len(raw) > MAX_ERROR_MESSAGE_BYTES:
                raise ProtocolError(f"error message is {len(raw)} bytes; at most "
                                    f"{MAX_ERROR_MESSAGE_BYTES}")
            try:
                message = raw.decode()
            except UnicodeDecodeError as err:
                raise ProtocolError(f"error message is not UTF-8: {err}") from err
            response = ErrorResponse(ErrorKind(kind), message, request_id)
        case _:
            raise ProtocolError(f"unknown pagestream response tag {tag:#04x}")
    r.end()
    return response


def validate_request(request: Request) -> None:
    """Field ranges a request must respect to be encodable (the client checks first)."""
    if request.request_id < 0 or request.request_id > _U64_MAX:
        raise UserError(f"request id {request.request_id} is not a u64")
    blocks: tuple[tuple[RelTag, int], ...] = ()
    match request:
        case GetPageRequest(rel=rel, blkno=blkno):
            blocks = ((rel, blkno),)
        case GetPagesRequest(blocks=bs):
            blocks = bs
        case ExistsRequest(rel=rel) | NblocksRequest(rel=rel):
            blocks = ((rel, 0),)
        case DbSizeRequest(spcnode=spc, dbnode=db):
            if not (0 <= spc <= _U32_MAX and 0 <= db <= _U32_MAX):
                raise UserError(f"database {spc}/{db}: oids are u32")
        case GetSlruSegmentRequest(segno=segno):
            if not 0 <= segno <= _U32_MAX:
                raise UserError(f"SLRU segment number {segno} is not a u32")
        case LeaseRequest(duration_s=duration_s):
            if not (math.isfinite(duration_s) and 0 < duration_s <= MAX_LEASE_S):
                raise UserError(f"lease duration {duration_s}s must be in (0, {MAX_LEASE_S}]")
    for rel, blkno in blocks:
        if not (0 <= rel.spcnode <= _U32_MAX and 0 <= rel.dbnode <= _U32_MAX
                and 0 <= rel.relnode <= _U32_MAX):
            raise UserError(f"{rel}: oids are u32")
        if not 0 <= rel.forknum <= _MAX_FORKNUM:
            raise UserError(f"{rel}: forks are 0..{_MAX_FORKNUM}")
        if not 0 <= blkno <= _U32_MAX:
            raise UserError(f"block number {blkno} of {rel} is not a u32")


# --- the client side ------------------------------------------------------------------
class ClientCore:
    """Numbers a client's requests and pairs responses with them (no I/O).

    `send(request)` returns the request with its id and the bytes to send;
    `receive(payload)` decodes the next response and returns it with its request.
    Responses come in request order; anything else is a ProtocolError.
    """

    def __init__(self, first_id: int = 1) -> None:
        self._ids = itertools.count(first_id)
        self._pending: deque[Request] = deque()

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    def send(self, request: Request) -> tuple[Request, bytes]:
        request = dataclasses.replace(request, request_id=next(self._ids))
        validate_request(request)
        data = encode_request(request)
        self._pending.append(request)
        return request, data

    def receive(self, payload: bytes) -> tuple[Request, Response]:
        response = decode_response(payload)
        if not self._pending:
            raise ProtocolError(f"pagestream response {type(response).__name__} to request "
                                f"{response.request_id}, but no request is outstanding")
        request = self._pending[0]
        if response.request_id != request.request_id:
            raise ProtocolError(f"pagestream response carries request id "
                                f"{response.request_id}; expected {request.request_id}")
        expected = RESPONSE_FOR[type(request)]
        if not isinstance(response, (expected, ErrorResponse)):
            raise ProtocolError(f"pagestream answered {type(request).__name__} "
                                f"{request.request_id} with {type(response).__name__}")
        if isinstance(request, GetPagesRequest) and isinstance(response, GetPagesResponse) \
                and len(response.pages) != len(request.blocks):
            raise ProtocolError(f"GetPages request {request.request_id} asked for "
                                f"{len(request.blocks)} pages and got {len(response.pages)}")
        self._pending.popleft()
        return request, response

    def fail_all(self) -> list[Request]:
        """The connection is gone: forget (and return) every outstanding request."""
        pending = list(self._pending)
        self._pending.clear()
        return pending
