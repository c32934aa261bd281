"""CPU of WAL ingest per record and per transaction, offline (issue 13), with an A/B.

A PostgreSQL 15 with the Strata WAL settings (wal_consistency_checking = all) runs
`pgbench -i -s 1`, then pgbench TPC-B and then -N (`-c 4 -j 2`, 500 transactions per
client; --quick: 250), and its WAL is kept. Each round, a fresh process imports the
initdb'ed directory into a new timeline, ingests the WAL of the initialization (not
timed), then the TPC-B and the -N WAL with `WalIngest` in one thread, and reports the
thread's CPU time (`time.thread_time`: the machine's other work does not count, though
it still slows the caches) for each part, and for decoding all of the WAL.

Figures: `us_per_tx_LOAD` and `us_per_record_LOAD` (LOAD = tpcb, simple), the least over
the rounds (3; --quick: 2), and `decode_us_per_record`. With `STRATA_INGEST_CPU_BASE` set
to another checkout's `src` directory, every round runs that code too, alternating with
this checkout's, and each figure gets the other code's as its baseline (ratio < 1: this
checkout ingests with less CPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Report

LOADS = (("tpcb", ()), ("simple", ("-N",)))


def _generate(root: Path, transactions: int) -> dict[str, int]:
    """pgbench's WAL in root/compute/pg_wal, the initdb'ed copy in root/bootstrap; the
    LSN marks (ints) between the parts."""
    from strata.common.proc import ensure_traversable
    from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

    root.chmod(0o755)
    ensure_traversable(root)
    pg = PgServer(root / "compute")
    pg.initdb()
    shutil.copytree(pg.datadir, root / "bootstrap")

    def pgbench(*args: str) -> None:
        pg.run_tool("pgbench", "-h", pg.host, "-p", str(pg.port), "-U", pg.superuser, *args,
                    "postgres")

    def insert_lsn() -> int:
        text = pg.sql("select pg_current_wal_insert_lsn()::text")[0][0]
        hi, lo = text.split("/")
        return (int(hi, 16) << 32) | int(lo, 16)

    pg.start({**STRATA_WAL_SETTINGS, "wal_keep_size": "4GB", "max_wal_size": "4GB",
              "autovacuum": "off"})
    try:
        pgbench("-i", "-q", "-s", "1")
        pg.sql("checkpoint")
        marks = {"init": insert_lsn()}
        for name, args in LOADS:
            pgbench(*args, "-c", "4", "-j", "2", "-n", "-t", str(transactions // 4))
            marks[name] = insert_lsn()
    finally:
        pg.stop("fast")
    return marks


def _worker(root: Path) -> None:
    """One round in this process (whichever `strata` PYTHONPATH gives): JSON on stdout."""
    from strata.common.ids import TimelineId
    from strata.pageserver.import_datadir import import_new_timeline, read_initdb_point
    from strata.pageserver.ingest import WalIngest
    from strata.pg.walreader import read_wal_files
    from strata.storage.repository import Repository

    marks = json.loads((root / "marks.json").read_text())
    start = read_initdb_point(root / "bootstrap").end_lsn
    t0 = time.thread_time()
    records = [r for r in read_wal_files(root / "compute" / "pg_wal", start=start)
               if r.lsn < marks["simple"]]
    out: dict[str, float] = {"decode_s": time.thread_time() - t0, "records": len(records)}
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        repo = Repository(Path(tmp))
        timeline = import_new_timeline(repo.create_tenant(),
                                       TimelineId(TimelineId.generate().raw), root / "bootstrap")
        ingest = WalIngest(timeline)
        begin = 0
        for name, end in (("init", marks["init"]), ("tpcb", marks["tpcb"]),
                          ("simple", marks["simple"])):
            part = [r for r in records if begin <= r.lsn < end]
            t0 = time.thread_time()
            for record in part:
                ingest.ingest(record)
            out[f"{name}_s"] = time.thread_time() - t0
            out[f"{name}_records"] = len(part)
            begin = end
        repo.close()
    print(json.dumps(out))


def _round(root: Path, src: Path | None) -> dict[str, float]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = subprocess.run([sys.executable, "-m", "bench.ingest_cpu", "--worker", str(root)],
                          env=env, capture_output=True, text=True, check=False,
                          cwd=Path(__file__).parent.parent)
    if proc.returncode != 0:
        raise RuntimeError(f"ingest_cpu worker ({src or 'this checkout'}) failed: "
                           f"{proc.stderr.strip().splitlines()[-1:]}")
    result: dict[str, float] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def run(report: Report, quick: bool) -> None:
    transactions, rounds = (1000, 2) if quick else (2000, 3)
    base_env = os.environ.get("STRATA_INGEST_CPU_BASE")
    base = Path(base_env).resolve() if base_env else None
    if base is not None and not (base / "strata").is_dir():
        raise SystemExit(f"STRATA_INGEST_CPU_BASE={base_env}: no strata package there; "
                         "give a checkout's src directory")
    with tempfile.TemporaryDirectory(prefix="strata-bench-ingest-cpu-") as tmp:
        root = Path(tmp)
        marks = _generate(root, transactions)
        (root / "marks.json").write_text(json.dumps(marks))
        ours: list[dict[str, float]] = []
        theirs: list[dict[str, float]] = []
        for i in range(rounds):
            # Alternating which goes first, so a change in the machine's load hits both.
            order = [(ours, None), (theirs, base)] if base is not None else [(ours, None)]
            for into, src in (order if i % 2 == 0 else order[::-1]):
                into.append(_round(root, src))
        report.note(f"load average after the rounds: {os.getloadavg()[0]:.1f}")

    def per(results: list[dict[str, float]], name: str, per_what: str) -> float | None:
        if not results:
            return None
        count = transactions if per_what == "tx" else results[0][f"{name}_records"]
        return min(r[f"{name}_s"] for r in results) * 1e6 / count

    for name, _ in LOADS:
        for per_what in ("tx", "record"):
            value = per(ours, name, per_what)
            assert value is not None
            report.add(f"us_per_{per_what}_{name}", value, "us", per(theirs, name, per_what))
    report.add("decode_us_per_record", min(r["decode_s"] for r in ours) * 1e6
               / ours[0]["records"], "us",
               min(r["decode_s"] for r in theirs) * 1e6 / theirs[0]["records"]
               if theirs else None)
    report.note(f"pgbench -s 1 -c 4 -j 2, {transactions} transactions each of TPC-B and -N; "
                f"{int(ours[0]['tpcb_records'])} and {int(ours[0]['simple_records'])} records; "
                f"CPU time of the ingesting thread, least of {rounds} rounds"
                + (f"; baseline: the code in {base}, alternating" if base else ""))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(Path(sys.argv[2]))
    else:
        raise SystemExit("usage: bench/run ingest_cpu [--quick]")
