"""Lsn parsing, formatting, arithmetic and segment math."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strata.common.errors import UserError
from strata.common.lsn import Lsn, parse_segment_file_name, segment_file_name


def test_format_and_parse() -> None:
    assert str(Lsn(0x16B3740)) == "0/16B3740"
    assert str(Lsn((1 << 32) | 0xA)) == "1/A"
    assert Lsn.parse("0/16B3740") == Lsn(0x16B3740)
    assert Lsn.parse("1/a") == Lsn((1 << 32) | 10)


@pytest.mark.parametrize("bad", ["", "0", "/1", "1/", "x/1", "1/2/3", "123456789/0"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(UserError, match="invalid LSN"):
        Lsn.parse(bad)


@given(st.integers(0, (1 << 64) - 1))
def test_round_trip(v: int) -> None:
    assert Lsn.parse(str(Lsn(v))) == Lsn(v)


def test_arithmetic() -> None:
    a = Lsn(100)
    assert a + 8 == Lsn(108)
    assert Lsn(108) - a == 8
    assert Lsn(108) - 8 == a
    assert a < Lsn(101)
    with pytest.raises(TypeError):
        a + a  # type: ignore[operator]


def test_segment_math() -> None:
    seg = 16 << 20
    lsn = Lsn(3 * seg + 5 * 8192 + 1232)
    assert lsn.segno(seg) == 3
    assert lsn.segment_offset(seg) == 5 * 8192 + 1232
    assert lsn.page_offset() == 1232
    assert lsn.page_start() == Lsn(3 * seg + 5 * 8192)
    assert lsn.segment_file_name(1, seg) == "000000010000000000000003"
    assert segment_file_name(0x100 + 2, 1, seg) == "000000010000000100000002"
    assert parse_segment_file_name("000000010000000100000002", seg) == (1, 0x102)
    big = 1 << 30
    assert segment_file_name(5, 1, big) == "000000010000000100000001"
    assert Lsn(9).align() == Lsn(16)
