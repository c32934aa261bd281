"""`strata waldump` and the pg_waldump line format, on the committed real-WAL fixture."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from test_walreader import BASE, all_records, wal_bytes, write_segments

from strata.common.lsn import Lsn
from strata.control.cli import main
from strata.pg.waldump import format_record

# pg_waldump -b (PostgreSQL 15) on the fixture, description text after the type removed.
PG_WALDUMP_LINES = {
    0x600168: "rmgr: Heap        len (rec/tot):    175/   175, tx:        722, lsn: 0/00600168, "
              "prev 0/00600108, desc: INSERT\n"
              "\tblkref #0: rel 1664/0/1262 fork main blk 0",
    0x600218: "rmgr: Btree       len (rec/tot):     53/   177, tx:        722, lsn: 0/00600218, "
              "prev 0/00600168, desc: INSERT_LEAF\n"
              "\tblkref #0: rel 1664/0/2671 fork main blk 1 (FPW); hole: offset: 36, "
              "length: 8068",
    0x602E58: "rmgr: Heap        len (rec/tot):    218/   592, tx:        724, lsn: 0/00602E58, "
              "prev 0/006027C8, desc: INSERT\n"
              "\tblkref #0: rel 1663/5/1247 fork main blk 14 (FPW for WAL verification); "
              "hole: offset: 68, length: 6100, compression saved: 1718, method: zstd",
}


def test_format_matches_pg_waldump_lines() -> None:
    by_lsn = {r.lsn: r for r in all_records()}
    for lsn, expect in PG_WALDUMP_LINES.items():
        assert format_record(by_lsn[lsn]) == expect


def test_cli_prints_a_range(tmp_path: Path) -> None:
    write_segments(tmp_path, wal_bytes())
    records = all_records()
    result = CliRunner().invoke(main, ["waldump", "--start", str(Lsn(records[5].lsn)),
                                       "--end", str(Lsn(records[25].lsn)), str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output == "".join(format_record(r) + "\n" for r in records[5:25])


def test_cli_reports_corruption_with_the_lsn(tmp_path: Path) -> None:
    rec = all_records()[100]
    data = wal_bytes()
    data[rec.lsn - BASE + rec.tot_len - 1] ^= 1
    write_segments(tmp_path, data)
    result = CliRunner().invoke(main, ["waldump", str(tmp_path)])
    assert result.exit_code == 1
    assert f"strata waldump: error: invalid WAL at {Lsn(rec.lsn)}: incorrect resource " \
           "manager data checksum" in result.output
    assert result.output.count("rmgr: ") == 100  # the records before it were printed


def test_cli_rejects_a_bad_lsn(tmp_path: Path) -> None:
    write_segments(tmp_path, wal_bytes())
    result = CliRunner().invoke(main, ["waldump", "--start", "zz", str(tmp_path)])
    assert result.exit_code == 2
    assert "invalid LSN" in result.output
