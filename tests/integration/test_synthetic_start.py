"""A stock PostgreSQL 15 starts at an LSN we choose, from our synthesized WAL (D6).

For each layout of the checkpoint record (mid-page, several segments ahead, across a page
boundary, after a long or a short page header, across a segment end, and a 1 MB segment
size) the test replaces a cleanly stopped cluster's WAL with the synthesized segment(s)
and rewrites pg_control, then proves: PostgreSQL starts as after a clean shutdown at X and
takes writes; after a crash (`-m immediate`) recovery starts right after our record and
keeps every committed row; `pg_waldump -s X` reads one unbroken prev-chain from X to the
last record; pg_xact holds the committed and aborted statuses at the offsets
`strata.pg.slru` computes; and the same data directory starts as a hot standby.
"""

import dataclasses
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from strata.common.lsn import Lsn
from strata.common.proc import chown_tree, ensure_traversable
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pg import slru
from strata.pg.controlfile import ControlFileData
from strata.pg.walwriter import (
    SyntheticWal,
    checkpoint_record_lsn,
    install_synthetic_start,
    synthesize_wal,
)

MB = 1 << 20
PAGE = 8192
# Keep every segment, so pg_waldump can read from X after the server's own checkpoints.
SETTINGS = {**STRATA_WAL_SETTINGS, "wal_keep_size": "1GB"}
WALDUMP_LINE = re.compile(r"lsn: (\S+), prev (\S+), desc: (\S+)")


@dataclass(frozen=True)
class Template:
    datadir: Path
    control: ControlFileData

    @property
    def old_end(self) -> Lsn:
        """End of the WAL after the clean stop: the shutdown checkpoint record's end."""
        return (self.control.checkpoint + 114).align(8)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, Template]]:
    """Clusters (16 MB and 1 MB segments) that were initialized, started and stopped cleanly."""
    base = tmp_path_factory.mktemp("templates")
    base.chmod(0o755)
    ensure_traversable(base)
    made: dict[int, Template] = {}
    servers = []
    try:
        for seg_mb in (16, 1):
            server = PgServer(base / f"seg{seg_mb}", log_path=base / f"seg{seg_mb}.log")
            servers.append(server)
            server.initdb(f"--wal-segsize={seg_mb}")
            server.start(SETTINGS)
            server.sql("create table before_x as select generate_series(1, 100) a")
            server.stop("fast")
            control = ControlFileData.from_bytes(
                (server.datadir / "global" / "pg_control").read_bytes())
            made[seg_mb] = Template(server.datadir, control)
        yield made
    finally:
        for server in servers:
            server.stop("immediate")


def copy_datadir(src: Path, dest: Path, template: PgServer) -> None:
    shutil.copytree(src, dest, symlinks=True)
    chown_tree(dest, template.user)


def waldump_chain(server: PgServer, start: Lsn, seg_size: int) -> list[tuple[Lsn, Lsn, str]]:
    # Name the start and end segments: without them pg_waldump takes the segment size from
    # whichever file readdir returns first, which may be a preallocated all-zero segment;
    # with only a start segment it stops at that segment's end.
    pg_wal = server.datadir / "pg_wal"
    last = max(p.name for p in pg_wal.iterdir() if re.fullmatch("[0-9A-F]{24}", p.name))
    proc = server.run_tool("pg_waldump", "-p", pg_wal, "-s", str(start),
                           start.segment_file_name(1, seg_size), last, check=False)
    records = [(Lsn.parse(m[1]), Lsn.parse(m[2]), m[3])
               for m in WALDUMP_LINE.finditer(proc.stdout.decode())]
    assert records, proc.stderr.decode()
    # pg_waldump stops with an error at the end of WAL; it must be the end, not a gap.
    assert "wanted 24, got 0" in proc.stderr.decode(), proc.stderr.decode()
    return records


def log_since(server: PgServer, offset: int) -> str:
    return server.log_path.read_text(errors="replace")[offset:]


def log_size(server: PgServer) -> int:
    return len(server.log_path.read_text(errors="replace")) if server.log_path.exists() else 0


def synthesize_into(datadir: Path, template: Template, next_lsn: Lsn) -> SyntheticWal:
    control = ControlFileData.from_bytes((datadir / "global" / "pg_control").read_bytes())
    assert control == template.control
    now = int(time.time())
    checkpoint = dataclasses.replace(control.checkpoint_copy, time=now)
    wal = synthesize_wal(next_lsn, control.checkpoint, checkpoint,
                         system_identifier=control.system_identifier,
                         seg_size=control.xlog_seg_size)
    new_control = install_synthetic_start(datadir, control, wal, time=now)
    assert ControlFileData.from_bytes((datadir / "global" / "pg_control").read_bytes()) == \
        new_control
    assert sorted(p.name for p in (datadir / "pg_wal").iterdir() if p.is_file()) == \
        sorted(wal.segments)
    return wal


def check_primary(server: PgServer, wal: SyntheticWal) -> None:
    mark = log_size(server)
    server.start(SETTINGS)
    assert "database system was shut down at" in log_since(server, mark)
    assert server.sql("select checkpoint_lsn, redo_lsn from pg_control_checkpoint()") == \
        [(str(wal.record_lsn), str(wal.record_lsn))]
    assert server.sql("select count(*) from before_x") == [(100,)]
    server.sql("create table t (a int, b text)")
    committed = server.sql("insert into t select g, 'row ' || g from generate_series(1, 500) g "
                           "returning xmin::text::int")[0][0]
    with server.connect() as conn:
        conn.execute("begin")
        conn.execute("insert into t values (-1, 'rolled back')")
        aborted = conn.execute("select txid_current()").fetchone()[0]  # type: ignore[index]
        conn.execute("rollback")
    server.sql("create sequence s")
    last = server.sql("select nextval('s') from generate_series(1, 3)")[-1][0]
    server.sql("create table t2 as select * from t where a % 2 = 0")

    server.stop("immediate")
    mark = log_size(server)
    server.start(SETTINGS)
    # Crash recovery reads our record and then the server's first one, right after it.
    first_record = checkpoint_record_lsn(wal.end_lsn, wal.seg_size)
    assert f"redo starts at {first_record}" in log_since(server, mark)
    assert server.sql("select count(*), sum(a) from t") == [(500, 500 * 501 // 2)]
    assert server.sql("select count(*) from t2") == [(250,)]
    assert server.sql("select nextval('s')")[0][0] > last
    server.stop("fast")

    records = waldump_chain(server, wal.record_lsn, wal.seg_size)
    assert records[0] == (wal.record_lsn, wal.prev_lsn, "CHECKPOINT_SHUTDOWN")
    assert records[1][0] == first_record
    for (lsn, _, _), (_, prev, _) in zip(records, records[1:], strict=False):
        assert prev == lsn, f"broken chain after {lsn}: next record's prev is {prev}"
    final = ControlFileData.from_bytes((server.datadir / "global" / "pg_control").read_bytes())
    assert records[-1] == (final.checkpoint, records[-2][0], "CHECKPOINT_SHUTDOWN")
    assert len(records) > 100

    for xid, status in ((committed, slru.XidStatus.COMMITTED),
                        (aborted, slru.XidStatus.ABORTED)):
        page = slru.clog_page(xid)
        segment = server.datadir / "pg_xact" / slru.segment_file_name(slru.segment_of_page(page))
        offset = slru.page_in_segment(page) * PAGE
        data = segment.read_bytes()[offset:offset + PAGE]
        assert slru.clog_get_status(data, xid) == status, (xid, status)


def check_standby(server: PgServer, wal: SyntheticWal) -> None:
    signal = server.datadir / "standby.signal"
    signal.touch()
    chown_tree(signal, server.user)
    server.start({**SETTINGS, "hot_standby": "on"})
    assert server.sql("select pg_is_in_recovery()") == [(True,)]
    assert server.sql("select count(*) from before_x") == [(100,)]
    assert server.sql("select pg_last_wal_replay_lsn()") == [(str(wal.end_lsn),)]
    server.stop("fast")


def layout_lsn(t: Template, layout: str) -> tuple[Lsn, int]:
    """The next-record position for `layout`, and the expected record offset from it."""
    seg = t.control.xlog_seg_size
    old_end = t.old_end
    seg_start = old_end.segment_start(seg)
    match layout:
        case "A-mid-page":
            return old_end.page_start() + 2 * PAGE + 4000, 0
        case "B-later-segment":
            return seg_start + 3 * seg + 5 * PAGE + 1232, 0
        case "C-crosses-page":
            return old_end.page_start() + 4 * PAGE - 56, 0
        case "D-after-long-header":
            return seg_start + seg, 40
        case "E-after-short-header":
            return seg_start + seg + 2 * PAGE, 24
        case "F-crosses-segment" | "F-crosses-segment-1MB":
            return seg_start + 3 * seg - 48, 0
    raise AssertionError(layout)


@pytest.mark.parametrize("layout", ["A-mid-page", "B-later-segment", "C-crosses-page",
                                    "D-after-long-header", "E-after-short-header",
                                    "F-crosses-segment", "F-crosses-segment-1MB"])
def test_start_at_synthesized_checkpoint(layout: str, templates: dict[int, Template],
                                         pg_factory: Callable[..., PgServer]) -> None:
    template = templates[1 if layout.endswith("1MB") else 16]
    next_lsn, header = layout_lsn(template, layout)
    assert next_lsn > template.old_end

    primary = pg_factory("primary")
    copy_datadir(template.datadir, primary.datadir, primary)
    wal = synthesize_into(primary.datadir, template, next_lsn)
    assert wal.record_lsn == next_lsn + header
    assert len(wal.segments) == (2 if layout.startswith("F") else 1)
    standby = pg_factory("standby")
    copy_datadir(primary.datadir, standby.datadir, standby)

    check_primary(primary, wal)
    check_standby(standby, wal)
