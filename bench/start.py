"""Compute start as a user sees it, alone: `strata endpoint start` to the first query and
its phases against stock PostgreSQL's start, and the kill -9 restart loop (issue 13).

The same figures as the CLI part of `bench/run compute` (`cli_starts` there), without
that benchmark's library-level starts, TPS runs and GC soak: scales 1 and 10 (~22 MB and
~157 MB, loaded through a compute, the walproposer and the safekeepers), 20 kill -9
rounds (--quick 5), after the first scale. Then the 5 GB point (scale 320), made the
cheap way (bench/_stockdb.py): stock PostgreSQL's pgbench database, cached under
/var/tmp, imported with `strata tenant create --import-datadir`; `start_import_s{N}` is
the median of 3 starts of the imported tenant's endpoint to the first answered query
(against stock PostgreSQL's start at scale 1, `stock_start_s`)
(`select count(*) from pgbench_branches` as the superuser over the unix socket: the
tables are the superuser's), with its phases; the first start after the import is a
note.

Then the first start of a new branch right after a load (`start_new_branch_s`, against
stock PostgreSQL's start, with its phases and the pageserver's own basebackup time,
`.basebackup.pageserver`): `pgbench -i -s 1` and `pgbench -N -c 4` transactions on
`main`, then a new branch of `main` started (every commit put a `pg_xact` delta: the
case of docs/storage.md, "SLRU pages: bounded delta chains").

`BENCH_START_SCALES=1,10` picks the loaded scales, `BENCH_START_IMPORT_SCALES=320` the
imported ones (--quick: none, unless given; a first run builds the stock database, ~5
minutes at scale 320 on a quiet machine), `BENCH_START_KILL9=N` the kill -9 rounds (0:
none), `BENCH_START_BRANCH_XACTS=N` the transactions before the new branch (default
20,000, --quick 6,000; 0: no new-branch start).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from bench._stockdb import import_tenant, stock_pgbench_datadir
from bench.compute import _cli_start, _strata, cli_starts, stock_start_s
from bench.report import Report
from strata.common.proc import ensure_traversable, pg_bindir, run_as, service_user


def _imported_start(repo: Path, name: str) -> tuple[float, dict[str, float]]:
    """`strata endpoint start NAME --json` to the first answered query as the superuser
    (the imported tables' owner) over the unix socket."""
    t = time.monotonic()
    started = json.loads(_strata(repo, "endpoint", "start", name, "--json"))
    url = make_conninfo(started["local_connstr"], user="postgres", dbname="postgres")
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("select count(*) from pgbench_branches").fetchone()
    assert row is not None and row[0] > 0, row
    elapsed = time.monotonic() - t
    phases = dict(started["phases_s"])
    phases["first_query"] = elapsed - float(started["total_s"])
    return elapsed, phases


def imported_starts(report: Report, base: Path, scale: int, tries: int = 3) -> None:
    """The start of an endpoint on a tenant imported from stock pgbench at `scale`."""
    db = stock_pgbench_datadir(scale)
    stock_dir = base / f"imp{scale}-baseline"
    stock_dir.mkdir()
    stock_dir.chmod(0o755)
    stock = stock_start_s(stock_dir)
    report.note(f"import scale {scale}: stock database of {db.size_mb:.0f} MB "
                + ("(cached)" if db.reused else f"(stock pgbench load {db.load_s:.0f} s)"))
    repo = base / f"imp{scale}"
    _strata(repo, "init")
    try:
        name = f"imp{scale}"
        import_s = import_tenant(repo, name, db)
        report.note(f"import scale {scale}: `tenant create --import-datadir` {import_s:.1f} s")
        first, phases = _imported_start(repo, name)
        report.note(f"import scale {scale}: first start {first:.2f} s (sync_wal "
                    f"{phases.get('sync_wal', 0.0):.2f} s)")
        _strata(repo, "endpoint", "stop", name)
        times, all_phases = [], []
        for _ in range(tries):
            elapsed, phases = _imported_start(repo, name)
            times.append(elapsed)
            all_phases.append(phases)
            _strata(repo, "endpoint", "stop", name)
        report.add(f"start_import_s{scale}", statistics.median(times), "s", baseline=stock)
        for key in all_phases[-1]:
            report.add(f"start_import_s{scale}.{key}",
                       statistics.median(p.get(key, 0.0) for p in all_phases), "s")
    finally:
        _strata(repo, "stop")


def _pageserver_basebackup_s(repo: Path) -> float | None:
    """The seconds of the newest basebackup the environment's pageserver logged."""
    found = [float(m) for log in sorted(repo.rglob("*pageserver*.log"))
             for m in re.findall(r"basebackup of timeline \S+ at .* in ([0-9.]+)s",
                                 log.read_text(errors="replace"))]
    return found[-1] if found else None


def branch_starts(report: Report, base: Path, xacts: int, branches: int = 2) -> None:
    """The first start of a new branch's endpoint right after a load: `pgbench -i -s 1`
    then `pgbench -N -c 4` for `xacts` transactions on `main` (one `pg_xact` delta each),
    `main` stopped, then `branches` new branches of `main`, each created and started once
    (`start_new_branch_s`: the first; the others are notes), with the pageserver's own
    basebackup time from its log. Baseline: stock PostgreSQL's start."""
    stock_dir = base / "branch-stock"
    stock_dir.mkdir()
    stock = stock_start_s(stock_dir)
    repo = base / "branches"
    _strata(repo, "init")
    try:
        url = json.loads(_strata(repo, "endpoint", "start", "main", "--json"))["local_connstr"]
        with psycopg.connect(url, autocommit=True) as conn:
            port, socket_dir = conn.info.port, conn.info.host
        pgbench: list[str | os.PathLike[str]] = [pg_bindir() / "pgbench", "-h", socket_dir,
                                                 "-p", str(port), "-U", "strata"]
        run_as(service_user(), [*pgbench, "-i", "-I", "dtGvp", "-s", "1", "-q", "strata"],
               timeout=1200)
        run_as(service_user(), [*pgbench, "-N", "-c", "4", "-j", "2", "-t",
                                str(max(1, xacts // 4)), "strata"], timeout=3600)
        _strata(repo, "endpoint", "stop", "main")
        for i in range(branches):
            name = f"b{i}"
            _strata(repo, "timeline", "branch", name, "--parent", "main")
            _strata(repo, "endpoint", "create", name, "--branch", name)
            elapsed, phases, _url = _cli_start(repo, name)
            served = _pageserver_basebackup_s(repo)
            if served is not None:
                phases["basebackup.pageserver"] = served
            _strata(repo, "endpoint", "stop", name)
            if i == 0:
                report.add("start_new_branch_s", elapsed, "s", baseline=stock)
                for key, value in phases.items():
                    report.add(f"start_new_branch_s.{key}", value, "s")
            else:
                report.note(f"new branch {i + 1}: start {elapsed:.2f} s, basebackup "
                            f"{phases.get('basebackup', 0.0):.3f} s (pageserver "
                            f"{phases.get('basebackup.pageserver', -1.0):.3f} s)")
        report.note(f"new branches after pgbench -i -s 1 and {xacts} transactions; "
                    f"load average {os.getloadavg()[0]:.1f}")
    finally:
        _strata(repo, "stop")


def run(report: Report, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="strata-bench-start-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        scales = os.environ.get("BENCH_START_SCALES", "1,10")
        imported = os.environ.get("BENCH_START_IMPORT_SCALES", "" if quick else "320")
        kill9 = os.environ.get("BENCH_START_KILL9", "5" if quick else "20")
        if scales:
            cli_starts(report, base, [int(s) for s in scales.split(",")],
                       kill9_rounds=int(kill9))
        for scale in filter(None, imported.split(",")):
            imported_starts(report, base, int(scale))
        xacts = int(os.environ.get("BENCH_START_BRANCH_XACTS", "6000" if quick else "20000"))
        if xacts:
            branch_starts(report, base, xacts)
        report.note(f"load average at the end {os.getloadavg()[0]:.1f}")
