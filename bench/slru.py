"""SLRU delta chains: the first basebackup of a new branch after a load, by chain bound.

A stock PostgreSQL 15 (Strata's WAL settings) runs `pgbench -i -s 1` and then
`pgbench -N -c 4` transactions (quick: 4 x 1,500, full: 4 x 5,000); every commit sets
status bits on a `pg_xact` page, which the pageserver stores as one delta per commit.
The same WAL is ingested, in process, into a fresh timeline (imported from a copy of the
initdb) once per bound `SLRU_IMAGE_DELTAS` (docs/storage.md, "SLRU pages: bounded delta
chains"), the timeline flushed to layer files, a branch made at its end, and the
branch's first basebackup timed (no value remembered yet: the case of a new endpoint
right after a load), then its second. Baseline in the same run: the same steps with no
bound (every delta since the last image applied, as before the bound).

Figures per bound N: `first_basebackup_s_nN` (ratio to the unbounded one),
`second_basebackup_s_nN`, `ingest_s_nN` (ratio to the unbounded ingest of the same WAL),
`layer_mb_nN` (the timeline's layer files after the flush: the images' space) and
`pg_xact_deltas_nN` (deltas a read of the hot `pg_xact` page applies at the end).
Quick: bounds 128 and none; full: 64, 128, 256, 512 and none. Two rounds, in alternating
order; each figure is the lower of its two.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench._live import load_note, pgbench
from bench.basebackup import _Counter
from bench.report import Report
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pageserver.basebackup import write_basebackup
from strata.pageserver.import_datadir import import_new_timeline
from strata.pageserver.ingest import WalIngest
from strata.pg.slru import SlruKind
from strata.pg.walreader import read_wal_files
from strata.storage import timeline as timeline_module
from strata.storage.key import slru_block_key
from strata.storage.layer_name import is_layer_file_name
from strata.storage.repository import Repository
from strata.storage.timeline import Timeline

UNBOUNDED = 1 << 62
ROUNDS = 2  # each bound's figure is the lower of its rounds (they alternate)


def _time_backup(timeline: Timeline, lsn: Lsn) -> float:
    """A lazy basebackup (what `strata endpoint start` fetches), its tar counted."""
    t0 = time.monotonic()
    write_basebackup(timeline, lsn, _Counter(), mode="lazy")  # type: ignore[arg-type]
    return time.monotonic() - t0


def _variant(root: Path, initdb: Path, wal: Path, end: Lsn, bound: int) -> dict[str, float]:
    """Ingest the WAL with chains bounded at `bound` deltas into a fresh timeline, then
    time a new branch's first and second basebackups."""
    saved = timeline_module.SLRU_IMAGE_DELTAS
    timeline_module.SLRU_IMAGE_DELTAS = bound
    repo = Repository(root / "pageserver")
    try:
        tenant = repo.create_tenant(TenantId(TenantId.generate().raw))
        timeline = import_new_timeline(tenant, TimelineId(TimelineId.generate().raw), initdb)
        start = timeline.last_record_lsn
        ingest = WalIngest(timeline)
        t0 = time.monotonic()
        for record in read_wal_files(wal, start=start, end=end):
            ingest.ingest(record)
        timeline.flush()
        ingest_s = time.monotonic() - t0
        layer_mb = sum(entry.stat().st_size for entry in os.scandir(timeline.dir)
                       if is_layer_file_name(entry.name)) / 1e6
        branch = tenant.branch_timeline(TimelineId(TimelineId.generate().raw),
                                        timeline.timeline_id, end)
        first, second = _time_backup(branch, end), _time_backup(branch, end)
        deltas = branch.delta_chain(slru_block_key(SlruKind.CLOG, 0, 0), end)
    finally:
        timeline_module.SLRU_IMAGE_DELTAS = saved
        repo.close()
        shutil.rmtree(root / "pageserver", ignore_errors=True)
    return {"first_basebackup_s": first, "second_basebackup_s": second,
            "ingest_s": ingest_s, "layer_mb": layer_mb, "pg_xact_deltas": deltas,
            "wal_mb": (end - start) / 1e6}


def run(report: Report, quick: bool) -> None:
    per_client = 1500 if quick else 5000
    bounds = [UNBOUNDED, 128] if quick else [UNBOUNDED, 64, 128, 256, 512]
    with tempfile.TemporaryDirectory(prefix="strata-bench-slru-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        source = PgServer(root / "source")
        source.initdb()
        initdb = root / "initdb"
        shutil.copytree(source.datadir, initdb)
        try:
            source.start({**STRATA_WAL_SETTINGS, "wal_keep_size": "10GB",
                          "autovacuum": False})
            pgbench(source, "-i", "-q", "-s", "1")
            pgbench(source, "-N", "-c", "4", "-j", "2", "-t", str(per_client))
            end = Lsn.parse(source.sql("select pg_current_wal_insert_lsn()::text")[0][0])
        finally:
            source.stop()
        report.note(f"pgbench -i -s 1, then -N -c 4 -t {per_client}; {load_note('before')}")
        runs: dict[int, list[dict[str, float]]] = {bound: [] for bound in bounds}
        for round_no in range(ROUNDS):
            for bound in bounds if round_no % 2 == 0 else reversed(bounds):
                runs[bound].append(_variant(root, initdb, source.datadir / "pg_wal", end,
                                            bound))
        report.note(f"{runs[UNBOUNDED][0]['wal_mb']:.0f} MB of WAL ingested per run; "
                    f"{ROUNDS} rounds; {load_note('after')}")
        base = {name: min(r[name] for r in runs[UNBOUNDED]) for name in runs[UNBOUNDED][0]}
        for bound in bounds:
            label = "none" if bound == UNBOUNDED else str(bound)
            for name, unit in (("first_basebackup_s", "s"), ("second_basebackup_s", "s"),
                               ("ingest_s", "s"), ("layer_mb", "MB"),
                               ("pg_xact_deltas", "deltas")):
                value = min(r[name] for r in runs[bound])
                report.add(f"{name}_n{label}", value, unit,
                           baseline=None if bound == UNBOUNDED or unit == "deltas"
                           else base[name])
