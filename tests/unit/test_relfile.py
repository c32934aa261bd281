"""Relation file names both ways, and block-to-segment math."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.pg.constants import ForkNumber
from strata.pg.relfile import (
    RelFileLocation,
    block_file_offset,
    block_segment,
    parse_path,
    relation_path,
    segment_first_block,
)


@pytest.mark.parametrize(("loc", "path"), [
    (RelFileLocation(1663, 5, 16384), "base/5/16384"),
    (RelFileLocation(1663, 5, 16384, ForkNumber.FSM), "base/5/16384_fsm"),
    (RelFileLocation(1663, 5, 16384, ForkNumber.VISIBILITYMAP, 2), "base/5/16384_vm.2"),
    (RelFileLocation(1663, 16401, 16402, ForkNumber.INIT), "base/16401/16402_init"),
    (RelFileLocation(1664, 0, 1262), "global/1262"),
    (RelFileLocation(1664, 0, 1262, ForkNumber.MAIN, 1), "global/1262.1"),
    (RelFileLocation(16390, 5, 16391, ForkNumber.MAIN, 7),
     "pg_tblspc/16390/PG_15_202209061/5/16391.7"),
    (RelFileLocation(16390, 5, 4294967295), "pg_tblspc/16390/PG_15_202209061/5/4294967295"),
])
def test_both_ways(loc: RelFileLocation, path: str) -> None:
    assert loc.path == path
    assert relation_path(loc.spcnode, loc.dbnode, loc.relnode, loc.fork, loc.segno) == path
    assert parse_path(path) == loc
    assert parse_path("/" + path) == loc


@pytest.mark.parametrize("path", [
    "global/pg_control", "global/pg_filenode.map", "base/5/PG_VERSION", "base/5/pg_filenode.map",
    "base/5/pg_internal.init", "base/5/t3_16384", "base/5/16384.0", "base/5/016384",
    "base/5/16384_xx", "base/5/16384.", "base/05/16384", "base/0/16384", "base/5/4294967296",
    "pg_wal/000000010000000000000001", "pg_xact/0000", "base/5", "base/5/16384/1",
    "pg_tblspc/16390/PG_14_202107181/5/16391", "pg_tblspc/16390/PG_15_202209061/16391",
    "base/pgsql_tmp/pgsql_tmp123.0", "global/0", "",
    "pg_tblspc/1663/PG_15_202209061/5/16391", "pg_tblspc/1664/PG_15_202209061/5/16391",
])
def test_not_relation_files(path: str) -> None:
    assert parse_path(path) is None


def test_segments() -> None:
    assert block_segment(131071) == 0
    assert block_segment(131072) == 1
    assert block_file_offset(131073) == 8192
    assert segment_first_block(3) == 3 * 131072


oids = st.integers(1, 0xFFFFFFFF)


@st.composite
def locations(draw: st.DrawFn) -> RelFileLocation:
    spc = draw(st.one_of(st.just(1663), st.just(1664), st.integers(16384, 0xFFFFFFFF)))
    db = 0 if spc == 1664 else draw(oids)
    return RelFileLocation(spc, db, draw(oids), draw(st.sampled_from(list(ForkNumber))),
                           draw(st.integers(0, 40000)))


@settings(max_examples=200)
@given(locations())
def test_round_trip(loc: RelFileLocation) -> None:
    assert parse_path(loc.path) == loc


@settings(max_examples=200)
@given(st.integers(0, 0xFFFFFFFE))
def test_block_math(blkno: int) -> None:
    seg = block_segment(blkno)
    assert segment_first_block(seg) * 8192 + block_file_offset(blkno) == blkno * 8192
    assert 0 <= block_file_offset(blkno) < 1 << 30
