"""The PostgreSQL wire codec: every message round-trips, chunking does not matter, and
malformed, oversized or random input raises only ProtocolError."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import ProtocolError
from strata.pg import wire

text = st.text(st.characters(exclude_characters="\0", exclude_categories=["Cs"]),
               max_size=20)
i32 = st.integers(-(2**31), 2**31 - 1)
u32 = st.integers(0, 2**32 - 1)
i16 = st.integers(-(2**15), 2**15 - 1)
u64 = st.integers(0, 2**64 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
other_fields = st.lists(st.tuples(st.sampled_from("PpqWstcdnFLR"), text), max_size=3).map(tuple)

report_kwargs: Any = dict(severity=text, code=text, message=text,
                          detail=st.none() | text, hint=st.none() | text, other=other_fields)

backend_messages = st.one_of(
    st.just(wire.AuthenticationOk()),
    st.just(wire.AuthenticationCleartextPassword()),
    st.binary(min_size=4, max_size=4).map(wire.AuthenticationMD5Password),
    st.builds(wire.AuthenticationOther, st.sampled_from([10, 11, 12, 7]), st.binary(max_size=30)),
    st.builds(wire.ParameterStatus, text, text),
    st.builds(wire.BackendKeyData, i32, i32),
    st.sampled_from("ITE").map(wire.ReadyForQuery),  # type: ignore[arg-type]
    st.lists(st.builds(wire.FieldDescription, text, u32, u32, i16, i16, i32,
                       st.sampled_from([0, 1])), max_size=4).map(
        lambda fs: wire.RowDescription(tuple(fs))),
    st.lists(st.none() | st.binary(max_size=20), max_size=5).map(
        lambda vs: wire.DataRow(tuple(vs))),
    st.builds(wire.CommandComplete, text),
    st.just(wire.EmptyQueryResponse()),
    st.builds(wire.ErrorResponse, **report_kwargs),
    st.builds(wire.NoticeResponse, **report_kwargs),
    st.builds(wire.CopyOutResponse, st.sampled_from([0, 1]),
              st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple)),
    st.builds(wire.CopyBothResponse, st.sampled_from([0, 1]),
              st.lists(st.sampled_from([0, 1]), max_size=3).map(tuple)),
    st.builds(wire.CopyInResponse, st.just(0), st.just(())),
    st.binary(max_size=100).map(wire.CopyData),
    st.just(wire.CopyDone()),
)

frontend_messages = st.one_of(
    st.builds(wire.Query, text),
    st.builds(wire.PasswordMessage, text),
    st.binary(max_size=100).map(wire.CopyData),
    st.just(wire.CopyDone()),
    st.builds(wire.CopyFail, text),
    st.just(wire.Terminate()),
    st.just(wire.Sync()),
    st.builds(wire.ExtendedQueryMessage, st.sampled_from([b"P", b"B", b"E", b"D", b"C", b"H"]),
              st.binary(max_size=30)),
)

startup_packets = st.one_of(
    st.lists(st.tuples(text.filter(bool), text), max_size=4).map(
        lambda ps: wire.StartupMessage(tuple(ps))),
    st.just(wire.SSLRequest()),
    st.just(wire.GSSENCRequest()),
    st.builds(wire.CancelRequest, i32, i32),
)

replication_messages = st.one_of(
    st.builds(wire.XLogData, u64, u64, i64, st.binary(max_size=200)),
    st.builds(wire.PrimaryKeepalive, u64, i64, st.booleans()),
    st.builds(wire.StandbyStatusUpdate, u64, u64, u64, i64, st.booleans()),
    st.builds(wire.HotStandbyFeedback, i64, u32, u32, u32, u32),
)


def split_feed(reader: wire.MessageReader, data: bytes, cuts: list[int]) -> list[Any]:
    """Feed `data` cut at `cuts`, collecting messages as they become whole."""
    out: list[Any] = []
    pos = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}) + [len(data)]:
        reader.feed(data[pos:cut])
        pos = cut
        out.extend(reader)
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(backend_messages, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_backend_messages_round_trip_in_any_chunking(msgs: list[Any], cuts: list[int]) -> None:
    data = b"".join(m.encode() for m in msgs)
    reader = wire.MessageReader("backend")
    assert split_feed(reader, data, cuts) == msgs
    assert reader.buffered_bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(startup_packets.filter(lambda p: not isinstance(p, wire.StartupMessage)),
                max_size=2),
       startup_packets.filter(lambda p: isinstance(p, wire.StartupMessage)),
       st.lists(frontend_messages, max_size=8), st.lists(st.integers(0, 10**6), max_size=6))
def test_frontend_stream_round_trips(pre: list[Any], startup: wire.StartupMessage,
                                     msgs: list[Any], cuts: list[int]) -> None:
    """SSL/GSS requests, then a startup packet, then typed messages: one stream."""
    pre = [p for p in pre if not isinstance(p, wire.CancelRequest)]
    all_msgs = [*pre, startup, *msgs]
    data = b"".join(m.encode() for m in all_msgs)
    assert split_feed(wire.MessageReader("frontend"), data, cuts) == all_msgs


@settings(deadline=None)
@given(startup_packets)
def test_each_startup_packet_round_trips(packet: Any) -> None:
    reader = wire.MessageReader("frontend")
    reader.feed(packet.encode())
    assert reader.next() == packet


@settings(max_examples=200, deadline=None)
@given(replication_messages)
def test_replication_messages_round_trip(msg: Any) -> None:
    assert wire.decode_replication(msg.encode()) == msg
    # And they travel inside CopyData.
    reader = wire.MessageReader("backend")
    reader.feed(wire.CopyData(msg.encode()).encode())
    copy = reader.next()
    assert isinstance(copy, wire.CopyData)
    assert wire.decode_replication(copy.data) == msg


def test_known_bytes_of_messages() -> None:
    """Byte layouts written out by hand from the protocol documentation."""
    assert wire.Query("select 1").encode() == b"Q\x00\x00\x00\x0dselect 1\x00"
    assert wire.ReadyForQuery("I").encode() == b"Z\x00\x00\x00\x05I"
    assert wire.SSLRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert wire.StartupMessage((("user", "u"),)).encode() == (
        b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00")
    status = wire.StandbyStatusUpdate(1, 2, 3, 4, True).encode()
    assert status == b"r" + struct.pack("!QQQq?", 1, 2, 3, 4, True)
    assert len(status) == 34
    xlog = wire.XLogData(0x1000, 0x2000, 5, b"abc").encode()
    assert xlog[:wire.XLogData.HEADER_BYTES] == b"w" + struct.pack("!QQq", 0x1000, 0x2000, 5)


def test_error_response_fields() -> None:
    err = wire.ErrorResponse(code="42P01", message="no such table", detail="d", hint="h")
    body = err.encode()
    for piece in (b"SERROR\0", b"VERROR\0", b"C42P01\0", b"Mno such table\0", b"Dd\0", b"Hh\0"):
        assert piece in body
    reader = wire.MessageReader("backend")
    reader.feed(body)
    assert reader.next() == err


def test_oversized_message_is_refused_before_its_body_arrives() -> None:
    reader = wire.MessageReader("backend", max_message_bytes=1000)
    reader.feed(b"d" + struct.pack("!i", 1001))
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        reader.next()
    reader = wire.MessageReader("backend", max_message_bytes=1000)
    reader.feed(wire.CopyData(b"x" * 995).encode())  # exactly 1000 with the length word
    assert reader.next() == wire.CopyData(b"x" * 995)


@pytest.mark.parametrize("data", [
    b"Q\x00\x00\x00\x02",                      # length below 4
    b"Q\x00\x00\x00\x08abcd",                  # query without NUL
    b"Q\x00\x00\x00\x07a\x00b",                # trailing bytes after the string
    b"?\x00\x00\x00\x04",                      # unknown type
    b"Q\x00\x00\x00\x07\xff\xfe\x00",          # not UTF-8
])
def test_malformed_frontend_messages(data: bytes) -> None:
    reader = wire.MessageReader("frontend")
    reader.feed(wire.StartupMessage((("user", "u"),)).encode())
    assert isinstance(reader.next(), wire.StartupMessage)
    reader.feed(data)
    with pytest.raises(ProtocolError):
        reader.next()


@pytest.mark.parametrize("data", [
    struct.pack("!ii", 8, 0x00020000),                 # protocol 2
    struct.pack("!ii", 4, 196608),                      # length too small
    struct.pack("!ii", 100000, 196608),                 # length too large
    struct.pack("!ii", 12, 196608) + b"ab\0\0",          # key without value
    struct.pack("!ii", 12, wire.SSL_REQUEST_CODE) + b"xxxx",
])
def test_malformed_startup_packets(data: bytes) -> None:
    reader = wire.MessageReader("frontend")
    reader.feed(data)
    with pytest.raises(ProtocolError):
        reader.next()


@pytest.mark.parametrize("payload", [b"", b"w\0\0", b"k" + bytes(17) + b"\x02", b"z",
                                     b"r" + bytes(32), b"h" + bytes(25)])
def test_malformed_replication_messages(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.decode_replication(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["frontend", "backend"]))
def test_random_bytes_raise_only_protocol_error(data: bytes, side: Any) -> None:
    reader = wire.MessageReader(side, max_message_bytes=4096)
    reader.feed(data)
    try:
        list(reader)
    except ProtocolError:
        pass
    try:
        wire.decode_replication(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(backend_messages, st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_corrupted_valid_messages_raise_only_protocol_error(msg: Any, pos: int,
                                                             junk: bytes) -> None:
    """Flip bytes inside a well-formed message (its length word too)."""
    data = bytearray(msg.encode())
    pos %= len(data)
    data[pos:pos + len(junk)] = junk
    reader = wire.MessageReader("backend", max_message_bytes=4096)
    reader.feed(bytes(data))
    try:
        list(reader)
    except ProtocolError:
        pass


def test_pg_timestamp_epoch() -> None:
    assert wire.pg_timestamp(946_684_800) == 0
    assert wire.unix_time(wire.pg_timestamp(1_700_000_000.25)) == 1_700_000_000.25
