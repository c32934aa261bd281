"""pg_xact and pg_multixact address math, checked against bytes from a real PostgreSQL 15.

The fixtures come from a cluster (15.18) where xid 725 committed, 726 aborted, 727 committed
with subtransaction 728, and a row was locked FOR SHARE by xids 731, 732 and 733 in turn,
creating multixact 1 {731, 732} and multixact 2 {731, 732, 733}; then CHECKPOINT.
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.pg import slru
from strata.pg.slru import MultiXactStatus, XidStatus

# pg_xact/0000 bytes 178..183 (xids 712..735).
XACT_178 = bytes.fromhex("555555655515")
# pg_multixact/offsets/0000 bytes 0..15 (multis 0..3: 3 is the next one).
OFFSETS_0 = bytes.fromhex("00000000010000000300000006000000")
# pg_multixact/members/0000 bytes 0..39: two 20-byte groups (offset 0 is never used).
MEMBERS_0 = bytes.fromhex("0001010100000000db020000dc020000db020000"
                          "01010000dc020000dd0200000000000000000000")


def xact_page() -> bytearray:
    page = bytearray(8192)
    page[178:184] = XACT_178
    return page


def test_constants() -> None:
    assert slru.CLOG_XACTS_PER_PAGE == 32768
    assert slru.MULTIXACT_OFFSETS_PER_PAGE == 2048
    assert slru.MULTIXACT_MEMBERGROUPS_PER_PAGE == 409
    assert slru.MULTIXACT_MEMBERS_PER_PAGE == 1636


@pytest.mark.parametrize(("xid", "status"), [
    (724, XidStatus.COMMITTED), (725, XidStatus.COMMITTED), (726, XidStatus.ABORTED),
    (727, XidStatus.COMMITTED), (728, XidStatus.COMMITTED), (735, XidStatus.IN_PROGRESS)])
def test_clog_against_postgres(xid: int, status: XidStatus) -> None:
    assert slru.clog_page(xid) == 0
    assert slru.clog_get_status(xact_page(), xid) == status


def test_clog_set_reproduces_postgres_bytes() -> None:
    page = bytearray(8192)
    page[178:181] = XACT_178[:3]
    for xid in (724, 725, 727, 728, 729, 730, 731, 732, 733, 734):
        slru.clog_set_status(xid, XidStatus.COMMITTED).apply(page)
    slru.clog_set_status(726, XidStatus.ABORTED).apply(page)
    assert page == xact_page()


def test_clog_addresses() -> None:
    assert (slru.clog_page(32767), slru.clog_byte(32767), slru.clog_bit_shift(32767)) == \
        (0, 8191, 6)
    assert (slru.clog_page(32768), slru.clog_byte(32768), slru.clog_bit_shift(32768)) == \
        (1, 0, 0)
    xid = 0xFFFFFFFF
    assert (slru.clog_page(xid), slru.clog_byte(xid), slru.clog_bit_shift(xid)) == \
        (131071, 8191, 6)
    assert slru.segment_file_name(slru.segment_of_page(131071)) == "0FFF"
    patch = slru.clog_set_status(1_000_003, XidStatus.SUB_COMMITTED)
    assert patch == slru.BitsPatch(30, (1_000_003 % 32768) // 4, 0b11 << 6, 0b11 << 6)


def test_overwriting_status_clears_old_bits() -> None:
    page = bytearray(8192)
    slru.clog_set_status(5, XidStatus.SUB_COMMITTED).apply(page)
    slru.clog_set_status(5, XidStatus.ABORTED).apply(page)
    assert slru.clog_get_status(page, 5) == XidStatus.ABORTED
    assert page[1] == 0b1000


def test_multixact_offsets_against_postgres() -> None:
    page = bytearray(8192)
    for multi, offset in ((1, 1), (2, 3), (3, 6)):
        patch = slru.multixact_set_offset(multi, offset)
        assert patch.page == 0
        patch.apply(page)
    assert page[:16] == OFFSETS_0
    assert slru.multixact_offset_page(2048) == 1
    assert slru.multixact_offset_byte(2049) == 4


def test_multixact_members_against_postgres() -> None:
    page = bytearray(8192)
    members = [(1, 731), (2, 732), (3, 731), (4, 732), (5, 733)]
    for offset, xid in members:
        for patch in slru.member_set(offset, xid, MultiXactStatus.FOR_SHARE):
            assert patch.page == 0
            patch.apply(page)
    assert page[:40] == MEMBERS_0


def test_member_addresses() -> None:
    # The last member of page 0 and the first of page 1.
    assert (slru.member_page(1635), slru.member_flags_byte(1635),
            slru.member_xid_byte(1635)) == (0, 408 * 20, 408 * 20 + 4 + 12)
    assert slru.member_flags_bit_shift(1635) == 24
    assert (slru.member_page(1636), slru.member_flags_byte(1636),
            slru.member_xid_byte(1636)) == (1, 0, 4)
    # The highest offset: page 2625285, segment 0x14078 (a 5-digit file name).
    page = slru.member_page(0xFFFFFFFF)
    assert page == 0xFFFFFFFF // 1636
    assert slru.segment_file_name(slru.segment_of_page(page)) == "14078"


def test_segment_names() -> None:
    assert slru.segment_file_name(0) == "0000"
    assert slru.segment_file_name(0x1F) == "001F"
    assert slru.parse_segment_file_name("001F") == 0x1F
    assert slru.parse_segment_file_name("14078") == 0x14078
    for bad in ("001", "001f", "pg_xact", "0000000", "00G0"):
        assert slru.parse_segment_file_name(bad) is None


@settings(max_examples=200)
@given(st.integers(0, 0xFFFFFFFF), st.sampled_from(list(XidStatus)))
def test_clog_round_trip(xid: int, status: XidStatus) -> None:
    page = bytearray(b"\xAA" * 8192)
    before = bytes(page)
    slru.clog_set_status(xid, status).apply(page)
    assert slru.clog_get_status(page, xid) == status
    changed = [i for i in range(8192) if page[i] != before[i]]
    assert changed in ([], [slru.clog_byte(xid)])
    assert slru.clog_page(xid) * 32768 + slru.clog_byte(xid) * 4 + \
        slru.clog_bit_shift(xid) // 2 == xid


@settings(max_examples=200)
@given(st.integers(0, 0xFFFFFFFF))
def test_members_cover_pages_without_overlap(offset: int) -> None:
    """Each member's xid and flags byte lie inside its page and inside its own group."""
    group_start = slru.member_flags_byte(offset)
    assert group_start + 20 <= 8192
    flags_byte = group_start + slru.member_flags_bit_shift(offset) // 8
    xid_byte = slru.member_xid_byte(offset)
    assert group_start <= flags_byte < group_start + 4 <= xid_byte <= group_start + 16
    assert slru.member_page(offset) * 1636 + group_start // 20 * 4 + (xid_byte - group_start
                                                                       - 4) // 4 == offset
