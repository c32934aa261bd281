"""Our WAL reader and `strata waldump` agree with PostgreSQL 15's pg_waldump, record by record,
on the WAL of the shared workload, for every wal_compression method."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pgworkload import WORKLOAD_SETTINGS, run_workload
from strata.common.lsn import Lsn
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pg.constants import BKPIMAGE_COMPRESS_PGLZ
from strata.pg.waldump import format_block, format_record
from strata.pg.walreader import DecodedRecord, WalStreamDecoder, list_segments, read_wal_files

_DESC = re.compile(r"(, desc: \S+).*$")


def _normalize(lines: list[str]) -> list[str]:
    """Keep pg_waldump's record type name but drop its description text."""
    return [_DESC.sub(r"\1", line) if line.startswith("rmgr:") else line for line in lines]


def _pg_waldump(server: PgServer, wal_dir: Path, start: int, end: int) -> list[str]:
    out = server.run_tool("pg_waldump", "-b", "-p", wal_dir, "-s", str(Lsn(start)),
                          "-e", str(Lsn(end)))
    return _normalize(out.stdout.decode().splitlines())


def _ours(records: list[DecodedRecord]) -> list[str]:
    return "\n".join(format_record(r) for r in records).splitlines()


def _assert_same(ours: list[str], theirs: list[str]) -> None:
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    for a, b in zip(ours, theirs, strict=True):
        if a != b and "desc: info 0x" in a:  # a record type we do not name
            a, b = a.split(", desc: ")[0], b.split(", desc: ")[0]
        assert a == b


@pytest.fixture
def workload_wal(pg_factory: Callable[..., PgServer], request: pytest.FixtureRequest,
                 ) -> tuple[PgServer, Path, int, str]:
    """A server that ran the workload (then stopped cleanly), its pg_wal, the LSN at which
    the workload began and the wal_compression setting. Tests decode from the start of that
    LSN's segment (the first segment after initdb's checkpoint)."""
    server = pg_factory("pg")
    server.initdb()
    server.start({**STRATA_WAL_SETTINGS, **WORKLOAD_SETTINGS,
                  "wal_compression": request.param})
    start = Lsn.parse(server.sql("select pg_current_wal_lsn()")[0][0])
    run_workload(server)
    server.stop()
    return server, server.datadir / "pg_wal", start.value, request.param


@pytest.mark.slow
@pytest.mark.parametrize("workload_wal", ["zstd", "off", "pglz", "lz4"], indirect=True)
def test_reader_matches_pg_waldump(workload_wal: tuple[PgServer, Path, int, str]) -> None:
    """Every record (rmgr, lengths, xid, lsn, prev, type) and block ref (rel, fork, blk,
    FPW / FPW for WAL verification, hole, compression) matches pg_waldump -b; every image
    restores to a page."""
    server, wal_dir, start, compression = workload_wal
    records = list(read_wal_files(wal_dir, Lsn(start).segment_start()))
    assert len(records) > 10000
    theirs = _pg_waldump(server, wal_dir, records[0].lsn, records[-1].end_lsn)
    _assert_same(_ours(records), theirs)

    images = [b for r in records for b in r.blocks if b.has_image]
    assert len(images) > 5000
    methods = {format_block(b).rpartition("method: ")[2] for b in images if b.compressed}
    assert methods == (set() if compression == "off" else {compression})
    pglz = [b for b in images if b.bimg_info & BKPIMAGE_COMPRESS_PGLZ]
    # Our pglz decoder is pure Python (slow): check a sample of those, all of the others.
    for block in [b for b in images if not b.bimg_info & BKPIMAGE_COMPRESS_PGLZ] + pglz[::25]:
        assert len(block.page()) == 8192
    # The workload's records carry wal_consistency_checking images on every block ref of
    # the rmgrs that have a mask function (docs/postgres15.md sec 1).
    checked = [r for r in records if r.info & 0x02]
    assert checked and all(b.has_image for r in checked for b in r.blocks)


@pytest.mark.slow
@pytest.mark.parametrize("workload_wal", ["zstd"], indirect=True)
def test_stream_from_arbitrary_lsn_and_cli(
        workload_wal: tuple[PgServer, Path, int, str]) -> None:
    """Decoding a stream that starts mid-record, fed in 100 KB chunks, gives pg_waldump's
    records from that LSN on; `strata waldump` prints what pg_waldump -b prints."""
    server, wal_dir, start, _ = workload_wal
    records = list(read_wal_files(wal_dir, Lsn(start).segment_start()))
    middle = records[len(records) // 3]
    stream_start = middle.lsn + 13  # inside a record, not a page start
    data = b"".join(p.read_bytes() for p in list_segments(wal_dir))
    first_file = int(list_segments(wal_dir)[0].name[16:], 16) * 16 * 1024 * 1024
    end = records[-1].end_lsn
    decoder = WalStreamDecoder(Lsn(stream_start))
    got: list[DecodedRecord] = []
    for pos in range(stream_start - first_file, end - first_file, 100_000):
        decoder.feed(data[pos:min(pos + 100_000, end - first_file)])
        got.extend(decoder)
    assert got == [r for r in records if r.lsn >= stream_start]
    theirs = _pg_waldump(server, wal_dir, got[0].lsn, end)
    _assert_same(_ours(got), theirs)

    # The CLI on a range in the middle (-s/-e as pg_waldump takes them).
    lo, hi = records[len(records) // 2], records[len(records) // 2 + 2000]
    cli = Path(sys.executable).parent / "strata"
    out = subprocess.run([str(cli), "waldump", "--start", str(lo.start), "--end",
                          str(hi.start), str(wal_dir)], capture_output=True, check=True)
    ours = out.stdout.decode().splitlines()
    theirs = _pg_waldump(server, wal_dir, lo.lsn, hi.lsn)
    _assert_same(ours, theirs)
    assert sum(line.startswith("rmgr:") for line in ours) == 2000


@pytest.mark.slow
@pytest.mark.parametrize("workload_wal", ["zstd"], indirect=True)
def test_end_lsn_is_what_pages_carry(workload_wal: tuple[PgServer, Path, int, str]) -> None:
    """`end_lsn` is PostgreSQL's EndRecPtr: after a clean shutdown, every page of the postgres
    database changed during the workload carries in pd_lsn the end_lsn of a record that
    referenced that block."""
    server, wal_dir, start, _ = workload_wal
    records = list(read_wal_files(wal_dir, Lsn(start).segment_start()))
    db_oid = 5  # the postgres database (initdb's fixed OID in PostgreSQL 15)
    ends: dict[tuple[int, int], set[int]] = {}
    for r in records:
        for b in r.blocks:
            if b.dbnode == db_oid and b.forknum == 0:
                ends.setdefault((b.relnode, b.blkno), set()).add(r.end_lsn)
    checked = 0
    for path in (server.datadir / "base" / str(db_oid)).iterdir():
        if not path.name.isdigit():
            continue  # other forks, segments past the first, PG_VERSION, maps
        data = path.read_bytes()
        for blkno in range(len(data) // 8192):
            hi, lo = struct.unpack_from("<II", data, blkno * 8192)
            pd_lsn = hi << 32 | lo
            if pd_lsn < start:
                continue  # last changed by initdb (the postgres db is a copy of template1)
            assert pd_lsn in ends.get((int(path.name), blkno), set()), \
                (path.name, blkno, str(Lsn(pd_lsn)))
            checked += 1
    assert checked > 200
