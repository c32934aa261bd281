"""The pagestream codec and client core: exact round trips, and that any malformed,
truncated, extended, oversized or random payload raises ProtocolError and nothing else."""

from __future__ import annotations

import math
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.common.errors import (
    CorruptionError,
    NotFound,
    ProtocolError,
    StrataError,
    Unavailable,
    UserError,
)
from strata.common.lsn import Lsn
from strata.pageserver import pagestream as ps
from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND = settings(max_examples=150, deadline=None)

u32 = st.integers(0, 0xFFFFFFFF)
lsns = st.integers(0, (1 << 64) - 1).map(Lsn)
ids = st.integers(0, (1 << 64) - 1)
rels = st.builds(RelTag, u32, u32, u32, st.integers(0, 3))
pages = st.binary(min_size=8192, max_size=8192) | st.sampled_from([bytes(8192), b"\x7f" * 8192])
durations = st.floats(min_value=1e-3, max_value=ps.MAX_LEASE_S, allow_nan=False)

requests: st.SearchStrategy[ps.Request] = st.one_of(
    st.builds(ps.ExistsRequest, lsns, rels, ids),
    st.builds(ps.NblocksRequest, lsns, rels, ids),
    st.builds(ps.GetPageRequest, lsns, rels, u32, ids),
    st.builds(ps.GetPagesRequest, lsns,
              st.lists(st.tuples(rels, u32), min_size=1, max_size=20).map(tuple), ids),
    st.builds(lambda lsn, rel, blknos, rid: ps.GetPagesRequest.for_rel(lsn, rel, blknos, rid),
              lsns, rels, st.lists(u32, min_size=1, max_size=ps.MAX_BATCH_PAGES), ids),
    st.builds(ps.DbSizeRequest, lsns, u32, u32, ids),
    st.builds(ps.GetSlruSegmentRequest, lsns, st.sampled_from(list(SlruKind)), u32, ids),
    st.builds(ps.LeaseRequest, lsns, durations, ids),
)
responses: st.SearchStrategy[ps.Response] = st.one_of(
    st.builds(ps.ExistsResponse, st.booleans(), ids),
    st.builds(ps.NblocksResponse, u32, ids),
    st.builds(ps.GetPageResponse, pages, ids),
    st.builds(ps.GetPagesResponse, st.lists(pages, max_size=4).map(tuple), ids),
    st.builds(ps.DbSizeResponse, st.integers(0, (1 << 64) - 1), ids),
    st.builds(ps.GetSlruSegmentResponse,
              st.integers(0, 32).map(lambda n: bytes(range(256)) * 32 * n), ids),
    st.builds(ps.LeaseResponse, st.floats(allow_nan=False, allow_infinity=False), ids),
    st.builds(ps.ErrorResponse, st.sampled_from(list(ps.ErrorKind)), st.text(max_size=200),
              ids),
)

REL = RelTag(1663, 5, 16384, 0)


@ROUND
@given(requests)
def test_request_round_trip(request: ps.Request) -> None:
    ps.validate_request(request)
    data = ps.encode_request(request)
    assert ps.decode_request(data) == request


@ROUND
@given(responses)
def test_response_round_trip(response: ps.Response) -> None:
    assert ps.decode_response(ps.encode_response(response)) == response


def _decodes_or_protocol_error(decode: object, data: bytes) -> None:
    """Decoding yields a message whose encoding decodes to it again, or ProtocolError."""
    assert callable(decode)
    try:
        message = decode(data)
    except ProtocolError:
        return
    encode = ps.encode_request if decode is ps.decode_request else ps.encode_response
    assert decode(encode(message)) == message


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_protocol_error(data: bytes) -> None:
    _decodes_or_protocol_error(ps.decode_request, data)
    _decodes_or_protocol_error(ps.decode_response, data)


@FUZZ
@given(requests, st.data())
def test_corrupted_requests_only_raise_protocol_error(request: ps.Request,
                                                       data: st.DataObject) -> None:
    raw = bytearray(ps.encode_request(request))
    match data.draw(st.sampled_from(["flip", "truncate", "extend"])):
        case "flip":
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        case "truncate":
            del raw[data.draw(st.integers(0, len(raw) - 1)):]
        case "extend":
            raw += data.draw(st.binary(min_size=1, max_size=16))
    _decodes_or_protocol_error(ps.decode_request, bytes(raw))


@FUZZ
@given(responses, st.data())
def test_corrupted_responses_only_raise_protocol_error(response: ps.Response,
                                                        data: st.DataObject) -> None:
    raw = bytearray(ps.encode_response(response))
    match data.draw(st.sampled_from(["flip", "truncate", "extend"])):
        case "flip":
            for _ in range(data.draw(st.integers(1, 4))):
                raw[data.draw(st.integers(0, min(len(raw) - 1, 40)))] = \
                    data.draw(st.integers(0, 255))
        case "truncate":
            del raw[data.draw(st.integers(0, len(raw) - 1)):]
        case "extend":
            raw += data.draw(st.binary(min_size=1, max_size=16))
    _decodes_or_protocol_error(ps.decode_response, bytes(raw))


def test_truncation_and_trailing_bytes_are_protocol_errors() -> None:
    raw = ps.encode_request(ps.GetPageRequest(Lsn(0x16B3740), REL, 7, request_id=9))
    assert len(raw) == 17 + 13 + 4
    for cut in range(len(raw)):
        with pytest.raises(ProtocolError, match="truncated"):
            ps.decode_request(raw[:cut])
    with pytest.raises(ProtocolError, match="1 trailing bytes"):
        ps.decode_request(raw + b"\0")


def test_field_checks() -> None:
    head = struct.pack(">BQQ", ord("P"), 1, 0x100)
    with pytest.raises(ProtocolError, match="fork 9"):
        ps.decode_request(head + struct.pack(">IIIBI", 1663, 5, 16384, 9, 0))
    with pytest.raises(ProtocolError, match="unknown pagestream request tag 0x7a"):
        ps.decode_request(struct.pack(">BQQ", ord("z"), 1, 0))
    slru = struct.pack(">BQQ", ord("S"), 1, 0) + struct.pack(">BI", 7, 0)
    with pytest.raises(ProtocolError, match="SLRU kind 7"):
        ps.decode_request(slru)
    for bad in (math.nan, math.inf, 0.0, -1.0, ps.MAX_LEASE_S * 2):
        lease = struct.pack(">BQQ", ord("L"), 1, 0) + struct.pack(">d", bad)
        with pytest.raises(ProtocolError):
            ps.decode_request(lease)
    empty_batch = struct.pack(">BQQH", ord("B"), 1, 0, 0)
    with pytest.raises(ProtocolError, match="0 groups"):
        ps.decode_request(empty_batch)
    too_many = struct.pack(">BQQH", ord("B"), 1, 0, 1) + struct.pack(">IIIBH", 1, 2, 3, 0, 257) \
        + bytes(4 * 257)
    with pytest.raises(ProtocolError, match="257 blocks"):
        ps.decode_request(too_many)
    with pytest.raises(ProtocolError, match="not UTF-8"):
        ps.decode_response(struct.pack(">BQB", ord("x"), 1, 1) + b"\xff\xfe")
    with pytest.raises(ProtocolError, match="flag is 2"):
        ps.decode_response(struct.pack(">BQB", ord("e"), 1, 2))


def test_oversized_message_is_protocol_error() -> None:
    big = ps.encode_response(ps.GetPageResponse(bytes(8192))) + bytes(ps.MAX_MESSAGE_BYTES)
    with pytest.raises(ProtocolError, match="more than the limit"):
        ps.decode_response(big)
    with pytest.raises(ProtocolError, match="more than the limit"):
        ps.decode_request(bytes(ps.MAX_MESSAGE_BYTES + 1))


def test_batch_limits_and_grouping() -> None:
    with pytest.raises(UserError, match="1 to 256 blocks"):
        ps.GetPagesRequest(Lsn(1), ())
    with pytest.raises(UserError, match="got 257"):
        ps.GetPagesRequest.for_rel(Lsn(1), REL, list(range(257)))
    one_rel = ps.GetPagesRequest.for_rel(Lsn(1), REL, list(range(256)))
    # One group: header, group count, rel, count, 256 block numbers.
    assert len(ps.encode_request(one_rel)) == 17 + 2 + 13 + 2 + 4 * 256
    other = RelTag(1663, 5, 16385, 0)
    mixed = ps.GetPagesRequest(Lsn(1), ((REL, 1), (other, 1), (REL, 2)))
    assert len(ps.encode_request(mixed)) == 17 + 2 + 3 * (13 + 2 + 4)
    assert ps.decode_request(ps.encode_request(mixed)) == mixed
    full = ps.GetPagesResponse(tuple(bytes(8192) for _ in range(ps.MAX_BATCH_PAGES)))
    assert len(ps.encode_response(full)) <= ps.MAX_MESSAGE_BYTES


def test_validate_request_refuses_unencodable_fields() -> None:
    with pytest.raises(UserError, match="not a u32"):
        ps.validate_request(ps.GetPageRequest(Lsn(1), REL, 1 << 32))
    with pytest.raises(UserError, match="forks are 0..3"):
        ps.validate_request(ps.NblocksRequest(Lsn(1), RelTag(1663, 5, 1, 4)))
    with pytest.raises(UserError, match="lease duration"):
        ps.validate_request(ps.LeaseRequest(Lsn(1), math.nan))


@pytest.mark.parametrize(("err", "kind", "cls"), [
    (NotFound("gone"), ps.ErrorKind.NOT_FOUND, NotFound),
    (UserError("below GC cutoff"), ps.ErrorKind.USER, UserError),
    (Unavailable("timed out"), ps.ErrorKind.UNAVAILABLE, Unavailable),
    (CorruptionError("broken"), ps.ErrorKind.CORRUPTION, CorruptionError),
    (ValueError("bug"), ps.ErrorKind.INTERNAL, StrataError),
])
def test_error_kinds_map_to_exception_classes(err: Exception, kind: ps.ErrorKind,
                                              cls: type[Exception]) -> None:
    request = ps.GetPageRequest(Lsn(0x16B3740), REL, 7, request_id=3)
    response = ps.ErrorResponse.from_exception(err, 3, ps.describe(request))
    assert response.kind == kind
    assert response.message.startswith(
        "GetPage block 7 of rel 1663/5/16384 fork 0 at LSN 0/16B3740: ")
    decoded = ps.decode_response(ps.encode_response(response))
    raised = decoded.to_exception() if isinstance(decoded, ps.ErrorResponse) else None
    assert type(raised) is cls
    assert str(err) in str(raised)


def test_long_error_message_is_cut_to_the_limit() -> None:
    response = ps.ErrorResponse.from_exception(UserError("é" * 20_000))
    assert len(response.message.encode()) <= ps.MAX_ERROR_MESSAGE_BYTES
    assert ps.decode_response(ps.encode_response(response)) == response


def test_client_core_pairs_responses_in_order() -> None:
    core = ps.ClientCore()
    r1, d1 = core.send(ps.GetPageRequest(Lsn(1), REL, 0))
    r2, _ = core.send(ps.NblocksRequest(Lsn(1), REL))
    assert (r1.request_id, r2.request_id) == (1, 2)
    assert ps.decode_request(d1) == r1
    assert core.outstanding == 2
    page = bytes(8192)
    assert core.receive(ps.encode_response(ps.GetPageResponse(page, 1))) == \
        (r1, ps.GetPageResponse(page, 1))
    err = ps.ErrorResponse(ps.ErrorKind.NOT_FOUND, "no such rel", 2)
    assert core.receive(ps.encode_response(err)) == (r2, err)
    assert core.outstanding == 0


def test_client_core_refuses_mismatched_responses() -> None:
    core = ps.ClientCore()
    with pytest.raises(ProtocolError, match="no request is outstanding"):
        core.receive(ps.encode_response(ps.NblocksResponse(3, 1)))
    core.send(ps.NblocksRequest(Lsn(1), REL))
    core.send(ps.ExistsRequest(Lsn(1), REL))
    with pytest.raises(ProtocolError, match="carries request id 2; expected 1"):
        core.receive(ps.encode_response(ps.ExistsResponse(True, 2)))
    with pytest.raises(ProtocolError, match="answered NblocksRequest 1 with ExistsResponse"):
        core.receive(ps.encode_response(ps.ExistsResponse(True, 1)))
    batch = ps.ClientCore()
    batch.send(ps.GetPagesRequest.for_rel(Lsn(1), REL, [0, 1]))
    with pytest.raises(ProtocolError, match="asked for 2 pages and got 1"):
        batch.receive(ps.encode_response(ps.GetPagesResponse((bytes(8192),), 1)))
    assert [r.request_id for r in core.fail_all()] == [1, 2]
    assert core.outstanding == 0
