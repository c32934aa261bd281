"""The safekeeper protocol codec: every message round-trips; anything malformed is a
ProtocolError that says what is wrong, never another exception."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import ProtocolError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    Message,
    ProposerElected,
    ProposerGreeting,
    PullFrom,
    PullLimit,
    ReadWalRequest,
    ReadWalResponse,
    TermEntry,
    VoteRequest,
    VoteResponse,
    decode,
    encode,
    history_up_to,
    log_term,
)

u64 = st.integers(0, (1 << 64) - 1)
lsns = st.builds(Lsn, u64)
hosts = st.text(st.characters(exclude_characters="\0", exclude_categories=("Cs",)), min_size=1,
                max_size=60)  # no lone surrogates: not text, refused when built (below)
slot_names = st.text("abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=63)


@st.composite
def histories(draw: st.DrawFn) -> tuple[TermEntry, ...]:
    n = draw(st.integers(0, 5))
    terms = sorted(draw(st.sets(st.integers(1, 1 << 40), min_size=n, max_size=n)))
    starts = sorted(draw(st.lists(u64, min_size=n, max_size=n)))
    return tuple(TermEntry(t, Lsn(s), Lsn(s // 2)) for t, s in zip(terms, starts, strict=True))


messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(ProposerGreeting, st.builds(TenantId, st.binary(min_size=16, max_size=16)),
              st.builds(TimelineId, st.binary(min_size=16, max_size=16)), u64,
              st.integers(0, (1 << 32) - 1), u64),
    st.builds(AcceptorGreeting, u64),
    st.builds(VoteRequest, u64, u64),
    st.builds(VoteResponse, u64, st.booleans(), lsns, lsns, lsns, lsns, lsns, histories()),
    st.builds(ProposerElected, u64, lsns, histories()),
    st.builds(AppendRequest, u64, lsns, lsns, st.binary(max_size=300)),
    st.builds(AppendResponse, u64, u64, lsns, lsns, lsns),
    st.builds(ReadWalRequest, u64, lsns, lsns),
    st.builds(ReadWalResponse, u64, lsns, st.binary(max_size=300)),
    st.builds(PullFrom, u64, hosts, st.integers(1, 65535), slot_names, lsns),
    st.builds(PullLimit, u64, lsns),
)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_round_trip(msg: Message) -> None:
    assert decode(encode(msg)) == msg


@settings(max_examples=100, deadline=None)
@given(messages, st.data())
def test_every_truncation_is_a_protocol_error(msg: Message, data: st.DataObject) -> None:
    wire = encode(msg)
    cut = data.draw(st.integers(0, len(wire) - 1))
    with pytest.raises(ProtocolError):
        decode(wire[:cut])
    with pytest.raises(ProtocolError, match="trailing"):
        decode(wire + b"\x00")


def test_malformed_fields() -> None:
    with pytest.raises(ProtocolError, match="unknown .* tag 99"):
        decode(b"\x63")
    vote = bytearray(encode(VoteResponse(1, True, Lsn(1), Lsn(1), Lsn(0), Lsn(0), Lsn(0), ())))
    vote[9] = 2  # the `granted` byte
    with pytest.raises(ProtocolError, match="granted is 2"):
        decode(bytes(vote))
    unordered = ProposerElected(5, Lsn(10), (TermEntry(3, Lsn(10), Lsn(1)),
                                             TermEntry(2, Lsn(20), Lsn(11))))
    with pytest.raises(ProtocolError, match="not ordered"):
        decode(encode(unordered))
    huge = bytearray(encode(AppendRequest(1, Lsn(0), Lsn(0), b"")))
    huge[-5:-1] = (1 << 30).to_bytes(4, "little")  # the data length (persist_commit last)
    with pytest.raises(ProtocolError, match="limit"):
        decode(bytes(huge))
    flag = bytearray(encode(AppendRequest(1, Lsn(0), Lsn(0), b"", True)))
    flag[-1] = 2
    with pytest.raises(ProtocolError, match="persist_commit is 2"):
        decode(bytes(flag))


def test_pull_from_is_checked_when_built_and_when_decoded() -> None:
    good = PullFrom(3, "compute-1.local", 55432, "sk1", Lsn(0x1000))
    with pytest.raises(ValueError, match="not valid UTF-8"):
        PullFrom(3, "\ud800", 55432, "sk1", Lsn(0x1000))
    for bad_id in ("a-b", "x" * 65, "é"):
        with pytest.raises(ValueError, match="compute id"):
            PullFrom(3, "compute-1.local", 55432, "sk1", Lsn(0x1000), bad_id)
    wire = encode(good)
    # Each bad value, put on the wire by hand (encode() takes only valid messages).
    host_at = 1 + 8 + 4  # tag, term, host length
    for field, bad in (("host", b""), ("host", b"a\0b"), ("host", b"\xff\xfe"),
                       ("slot_name", b"SK1"), ("slot_name", b"sk-1"), ("slot_name", b"s" * 64),
                       ("slot_name", b"")):
        host, slot = (bad, b"sk1") if field == "host" else (b"compute-1.local", bad)
        raw = (wire[:host_at - 4] + len(host).to_bytes(4, "little") + host
               + (55432).to_bytes(2, "little") + len(slot).to_bytes(4, "little") + slot
               + (0x1000).to_bytes(8, "little") + bytes(4))  # no compute id
        with pytest.raises(ProtocolError, match=f"PullFrom.*({field}|host|slot name)"):
            decode(raw)
    assert decode(wire[:host_at - 4] + (15).to_bytes(4, "little") + b"compute-1.local"
                  + (55432).to_bytes(2, "little") + (3).to_bytes(4, "little") + b"sk1"
                  + (0x1000).to_bytes(8, "little") + bytes(4)) == good
    zero_port = bytearray(wire)
    zero_port[host_at + 15:host_at + 17] = b"\0\0"
    with pytest.raises(ProtocolError, match="port 0 is not in 1..65535"):
        decode(bytes(zero_port))
    too_long = bytearray(wire)
    too_long[host_at - 4:host_at] = (256).to_bytes(4, "little")
    with pytest.raises(ProtocolError, match="host has 256 bytes, limit 255"):
        decode(bytes(too_long))
    for kwargs in ({"host": ""}, {"port": 70000}, {"slot_name": "Sk1"}):
        with pytest.raises(ValueError):
            replace(good, **kwargs)


_HISTORY = (TermEntry(2, Lsn(0x1000), Lsn(0xFF8)), TermEntry(5, Lsn(0x2000), Lsn(0x1FE0)))
# The wire form each message had before the fields named their wire types; peers of older
# and newer versions must keep understanding each other.
GOLDEN: list[tuple[Message, str]] = [
    (ProposerGreeting(TenantId(bytes(range(16))), TimelineId(bytes(range(16, 32))),
                      0x1122334455667788, 16 << 20, 7),
     "01000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f887766"
     "5544332211000000010700000000000000"),
    (AcceptorGreeting(9), "020900000000000000"),
    (VoteRequest(6, 7), "0306000000000000000700000000000000"),
    (VoteResponse(5, True, Lsn(0x2100), Lsn(0x20F0), Lsn(0x20C0), Lsn(0x2080), Lsn(0x1000),
                  _HISTORY),
     "040500000000000000010021000000000000f020000000000000c0200000000000008020"
     "00000000000000100000000000000200000002000000000000000010000000000000f80f"
     "00000000000005000000000000000020000000000000e01f000000000000"),
    (ProposerElected(6, Lsn(0x20F0), _HISTORY),
     "050600000000000000f02000000000000002000000020000000000000000100000000000"
     "00f80f00000000000005000000000000000020000000000000e01f000000000000"),
    (AppendRequest(6, Lsn(0x20F0), Lsn(0x2080), b"wal!", True),
     "060600000000000000f02000000000000080200000000000000400000077616c2101"),
    (AppendResponse(6, 6, Lsn(0x20F4), Lsn(0x20F4), Lsn(0x2080)),
     "0706000000000000000600000000000000f420000000000000f420000000000000802000"
     "0000000000"),
    (ReadWalRequest(6, Lsn(0x1000), Lsn(0x1010)),
     "08060000000000000000100000000000001010000000000000"),
    (ReadWalResponse(6, Lsn(0x1000), b"\x00\x01"),
     "0906000000000000000010000000000000020000000001"),
    (PullFrom(6, "pg", 5432, "sk2", Lsn(0x20F0)),
     "0a0600000000000000020000007067381503000000736b32f02000000000000000000000"),
    (PullFrom(6, "pg", 5432, "sk2", Lsn(0x20F0), "ab12"),
     "0a0600000000000000020000007067381503000000736b32f0200000000000000400000061623132"),
]


@pytest.mark.parametrize(("msg", "wire"), GOLDEN, ids=lambda v: type(v).__name__)
def test_golden_bytes(msg: Message, wire: str) -> None:
    assert encode(msg).hex() == wire
    assert decode(bytes.fromhex(wire)) == msg


def test_log_term_counts_an_entry_that_starts_at_the_end() -> None:
    history = (TermEntry(1, Lsn(100), Lsn(50)), TermEntry(3, Lsn(200), Lsn(150)),
               TermEntry(4, Lsn(300), Lsn(250)))
    assert log_term(history, Lsn(99)) == 0
    assert log_term(history, Lsn(100)) == 1
    assert log_term(history, Lsn(299)) == 3
    assert log_term(history, Lsn(300)) == 4
    assert history_up_to(history, Lsn(250)) == history[:2]


def test_codecs_are_made_at_first_use_for_every_class() -> None:
    """The codecs are built lazily (not at import, issue 13); each class's layout still
    names one wire type per field (asserted when its codec is made)."""
    from dataclasses import fields

    from strata.safekeeper import messages

    for tag, cls in messages._CLASSES.items():
        codec = messages._codec(tag)
        assert codec is not None and codec.cls is cls and messages._CODECS[tag] is codec
        assert [name for name, _ in messages._layout(cls)] == [f.name for f in fields(cls)]
    assert messages._codec(200) is None
    with pytest.raises(ProtocolError, match="unknown safekeeper protocol message tag 200"):
        decode(bytes([200]))
