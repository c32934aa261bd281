"""PostgreSQL 15's own regression suite (installcheck-parallel) on stock PostgreSQL and on
Strata endpoints (issue 13): wall time, ratios against stock, and where the time goes.

The suite is not in Debian's postgresql-15 package. The first run fetches the source
package of the installed version (`apt-get source --download-only` with a private
sources.list of deb-src lines, so the system's apt configuration is untouched), unpacks
it with dpkg-source, and builds the suite's C modules (regress, autoinc, refint) with
the server headers of postgresql-server-dev-15; everything is cached in
/var/tmp/strata-pg-regress (STRATA_PG_REGRESS_DIR overrides). Missing Debian packages
(dpkg-dev, postgresql-server-dev-15, gcc) are installed with apt-get. pg_regress itself
is Debian's (/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress); it runs as
the PostgreSQL service user, as the suite's COPY statements are executed by the server.

Targets, each fresh and each running the same schedule (quick: test_setup and four
groups, 36 tests; full: the whole parallel_schedule):
  - `stock`: PostgreSQL 15 alone (fsync=off, shared_buffers=32MB, as computes);
  - `stock_d2wal`: the same with the D2 WAL settings every compute has
    (wal_consistency_checking=all, wal_compression=zstd): the WAL settings' own cost;
  - `strata_lazy`, `strata_full`: `strata init` environments with three safekeepers
    (the walproposer makes commits wait for a majority), endpoint started lazy / full;
  - `strata_dev`: `wal_mode = "pageserver"` (the pageserver is the synchronous standby);
  - each Strata target again with `synchronous_commit=off` (PGOPTIONS), which leaves
    out the waits for commits: the difference is the time commits waited.
Page fetches: the pageserver's page service requests and the seconds it spent
answering them (Prometheus counters, before/after each run). The lazy targets also note
what the lazy file system server logged as it exited: pages fetched, its CPU time, and
its FUSE operations by kind with their count, seconds and errors (lazyfs/opstats.py).

The suite's own failures: each target's failed tests are a figure (`NAME failed tests`)
and a note; the differences pg_regress wrote are kept in bench/results/regress-NAME.diffs
(the run's directory is deleted); a pg_regress exit code that is not 0 although no test
failed is a note; the last note sums the failures up: "suite failures: none", "only
tests failing on stock too" (the suite's reaction to the environment, not Strata's
doing), or "SUITE FAILURES" with each target's tests that passed on stock.
A pg_regress that ran no test at all stops the run with its output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench._live import load_note
from bench.report import Report
from strata.common.errors import UserError
from strata.common.proc import ensure_traversable, make_dir_for, pg_bindir, run_as, service_user
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

CACHE = Path(os.environ.get("STRATA_PG_REGRESS_DIR", "/var/tmp/strata-pg-regress"))
PG_REGRESS = Path("/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress")
QUICK_GROUPS = ("test_setup", "boolean", "copy", "create_function_c", "create_index")
_DEB_SRC = ("deb-src http://deb.debian.org/debian bookworm main\n"
            "deb-src http://deb.debian.org/debian bookworm-updates main\n"
            "deb-src http://deb.debian.org/debian-security bookworm-security main\n")
_MODULES = ("src/test/regress/regress.c", "contrib/spi/autoinc.c", "contrib/spi/refint.c")
# As the source tree's makefiles build them: contrib/spi/Makefile adds -DREFINT_VERBOSE,
# and the `triggers` test expects refint's NOTICEs (without it, it fails everywhere).
_CFLAGS = ("-O2", "-fPIC", "-shared", "-DREFINT_VERBOSE")
RESULTS = Path(__file__).parent / "results"  # where the failed tests' diffs are kept


# --- getting the suite ---------------------------------------------------------------------
@dataclass(frozen=True)
class Suite:
    source: Path  # the unpacked source tree
    libdir: Path  # regress.so, autoinc.so, refint.so

    @property
    def regress_dir(self) -> Path:
        return self.source / "src" / "test" / "regress"


def _installed_version() -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "postgresql-15"],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout:
        raise UserError("postgresql-15 is not installed; run bash scripts/setup")
    return out.stdout.strip()


def _apt_install(*packages: str) -> None:
    print(f"installing {' '.join(packages)} with apt-get", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-upgrade", *packages], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ,
                                                    "DEBIAN_FRONTEND": "noninteractive"})


def _fetch_source(version: str, root: Path, dest: Path) -> None:
    apt = root / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "sources.list").write_text(_DEB_SRC)
    opts = [f"-oDir::Etc::SourceList={apt / 'sources.list'}", "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={apt / 'lists'}", f"-oDir::Cache={apt / 'cache'}"]
    print(f"fetching the source of postgresql-15 {version} into {root}", flush=True)
    subprocess.run(["apt-get", *opts, "update"], check=True, stdout=subprocess.DEVNULL)
    download = root / "download"
    download.mkdir(exist_ok=True)
    subprocess.run(["apt-get", *opts, "source", "--download-only", f"postgresql-15={version}"],
                   cwd=download, check=True, stdout=subprocess.DEVNULL)
    (dsc,) = download.glob("*.dsc")
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["dpkg-source", "-x", str(dsc), str(dest)], check=True,
                   stdout=subprocess.DEVNULL)


def prepare_suite() -> Suite:
    """The suite of the installed PostgreSQL 15, fetched and built once into CACHE."""
    version = _installed_version()
    root = CACHE / version
    suite = Suite(root / "src", root / "lib")
    stamp = suite.libdir / "cflags"  # the modules are rebuilt when _CFLAGS change
    if (all((suite.libdir / f"{Path(m).stem}.so").exists() for m in _MODULES)
            and stamp.exists() and stamp.read_text() == " ".join(_CFLAGS)):
        return suite
    if not PG_REGRESS.exists():
        raise UserError(f"{PG_REGRESS} is missing; reinstall postgresql-15")
    # The server headers of exactly the installed version: a newer one would upgrade the
    # server itself under every running PostgreSQL of the machine.
    missing = [pkg for pkg, path in (("dpkg-dev", "/usr/bin/dpkg-source"), ("gcc", "/usr/bin/gcc"),
                                     (f"postgresql-server-dev-15={version}",
                                      "/usr/include/postgresql/15/server/postgres.h"))
               if not Path(path).exists()]
    if missing:
        _apt_install(*missing)
    if not (suite.regress_dir / "parallel_schedule").exists():
        _fetch_source(version, root, suite.source)
    include = subprocess.run([str(pg_bindir() / "pg_config"), "--includedir-server"],
                             capture_output=True, text=True, check=True).stdout.strip()
    suite.libdir.mkdir(parents=True, exist_ok=True)
    for module in _MODULES:
        subprocess.run(["gcc", *_CFLAGS, f"-I{include}", "-o",
                        str(suite.libdir / f"{Path(module).stem}.so"),
                        str(suite.source / module)], check=True)
    stamp.write_text(" ".join(_CFLAGS))
    return suite


def quick_schedule(full: Path, out: Path) -> Path:
    """test_setup and the groups starting with QUICK_GROUPS, in the suite's order."""
    lines = [line for line in full.read_text().splitlines()
             if line.startswith("test:") and line.split()[1] in QUICK_GROUPS]
    assert len(lines) == len(QUICK_GROUPS), lines
    out.write_text("\n".join(lines) + "\n")
    return out


# --- running it --------------------------------------------------------------------------
@dataclass
class Outcome:
    seconds: float
    tests: int
    failed: list[str]
    exit_code: int
    diffs: Path | None  # pg_regress's regression.diffs, when a test failed
    page_requests: float | None = None
    page_seconds: float | None = None
    fuse: str | None = None  # the lazy file system's exit line (lazyfs/opstats.py)


def run_suite(suite: Suite, schedule: Path, host: str, port: int, outdir: Path,
              options: str = "") -> Outcome:
    user = service_user()
    make_dir_for(outdir, user, 0o755)
    env = {"PGOPTIONS": options} if options else {}
    t0 = time.monotonic()
    out = run_as(user, [PG_REGRESS, f"--inputdir={suite.regress_dir}", f"--outputdir={outdir}",
                        f"--bindir={pg_bindir()}", f"--dlpath={suite.libdir}",
                        f"--schedule={schedule}", f"--host={host}", f"--port={port}",
                        "--user=postgres"],
                 check=False, env=env, timeout=4 * 3600)
    seconds = time.monotonic() - t0
    text = out.stdout.decode(errors="replace")
    names = re.findall(r"^[ +]*(?:test\s+)?(\S+)\s+\.\.\. (ok|FAILED|failed)", text, re.M)
    if not names:
        raise AssertionError(f"pg_regress ran no test (exit {out.returncode}):\n{text[-3000:]}"
                             f"{out.stderr.decode(errors='replace')[-2000:]}")
    diffs = outdir / "regression.diffs"
    return Outcome(seconds, len(names), [n for n, status in names if status != "ok"],
                   out.returncode, diffs if diffs.exists() and diffs.stat().st_size else None)


def _metric_sums(http: str) -> tuple[float, float]:
    """(page service requests answered, seconds spent answering) from /metrics."""
    with urllib.request.urlopen(f"http://{http}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    requests = seconds = 0.0
    for line in text.splitlines():
        if line.startswith("strata_pageserver_page_requests_total"):
            requests += float(line.rsplit(" ", 1)[1])
        elif line.startswith("strata_pageserver_getpage_seconds_sum"):
            seconds += float(line.rsplit(" ", 1)[1])
    return requests, seconds


def _stock(suite: Suite, schedule: Path, root: Path, settings: dict[str, object]) -> Outcome:
    pg = PgServer(root / "pgdata")
    pg.initdb()
    try:
        pg.start(settings)
        return run_suite(suite, schedule, pg.host, pg.port, root / "out")
    finally:
        pg.stop("immediate")


def _strata(repo: Path, *args: str) -> str:
    out = subprocess.run([Path(sys.executable).parent / "strata", *args],
                         env={**os.environ, "STRATA_REPO_DIR": str(repo)},
                         capture_output=True, timeout=900, check=False)
    if out.returncode != 0:
        raise AssertionError(f"strata {' '.join(args)} failed ({out.returncode}):\n"
                             f"{out.stdout.decode()}{out.stderr.decode()}")
    return out.stdout.decode()


def _on_strata(suite: Suite, schedule: Path, root: Path, wal_mode: str, mode: str,
               options: str) -> Outcome:
    """A fresh `strata init` environment; the suite runs as the superuser over the
    endpoint's unix socket."""
    root.mkdir(parents=True)
    config = root / "config.toml"
    config.write_text(f'wal_mode = "{wal_mode}"\n')
    repo = root / "repo"
    _strata(repo, "init", "--config", str(config))
    try:
        _strata(repo, "endpoint", "start", "main", "--mode", mode)
        (endpoint,) = [e for e in json.loads(_strata(repo, "endpoint", "list", "--json"))
                       if e["name"] == "main"]
        status = json.loads(_strata(repo, "status", "--json"))
        http = status["pageserver"]["addresses"]["http"]
        before = _metric_sums(http)
        port = int(endpoint["address"].rsplit(":", 1)[1])
        outcome = run_suite(suite, schedule, endpoint["socket_dir"], port, root / "out",
                            options)
        after = _metric_sums(http)
        outcome.page_requests = after[0] - before[0]
        outcome.page_seconds = after[1] - before[1]
    finally:
        _strata(repo, "stop")
    if mode == "lazy":
        outcome.fuse = _fuse_exit_line(repo)
    return outcome


def _fuse_exit_line(repo: Path) -> str:
    """What the lazy file system server logged as it exited (pages fetched, its CPU time,
    its operations by kind: lazyfs/opstats.py)."""
    lines = [line for log in sorted(repo.rglob("lazyfs.log"))
             for line in log.read_text(errors="replace").splitlines()
             if "file system server exits:" in line]
    if not lines:
        return "no exit line in lazyfs.log"
    return lines[-1].split("file system server exits:", 1)[1].strip()


def failure_summary(results: dict[str, Outcome]) -> str:
    """One line on the suite's own failures: none; only tests that fail on stock
    PostgreSQL too (the suite's reaction to the environment, not Strata's doing); or, in
    capitals, per target the tests that failed there but not on stock."""
    if not any(o.failed for o in results.values()):
        return "suite failures: none (every test passed on every target)"
    on_stock = sorted(results["stock"].failed) if "stock" in results else []
    new = {name: [t for t in o.failed if t not in on_stock] for name, o in results.items()}
    also = (f"failing on stock too (the suite's reaction to this environment): {on_stock}"
            if on_stock else "")
    if not any(new.values()):
        return f"suite failures: only tests {also}"
    return ("SUITE FAILURES, tests that did not fail on stock: "
            + "; ".join(f"{name} {tests[:12]}" for name, tests in new.items() if tests)
            + (f"; {also}" if also else ""))


def run(report: Report, quick: bool) -> None:
    suite = prepare_suite()
    with tempfile.TemporaryDirectory(prefix="strata-bench-regress-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        schedule = suite.regress_dir / "parallel_schedule"
        if quick:
            schedule = quick_schedule(schedule, root / "quick_schedule")
        report.note(load_note("at the start"))
        results: dict[str, Outcome] = {}

        def record(name: str, outcome: Outcome) -> None:
            results[name] = outcome
            stock = results.get("stock")
            report.add(f"{name} s", outcome.seconds, "s",
                       baseline=stock.seconds if stock and name != "stock" else None)
            extra = ""
            if outcome.page_requests is not None:
                extra = (f"; page service: {outcome.page_requests:.0f} requests, "
                         f"{outcome.page_seconds:.1f} s answering")
            report.add(f"{name} failed tests", len(outcome.failed), "tests")
            report.note(f"{name}: {outcome.tests} tests, {len(outcome.failed)} failed "
                        f"{outcome.failed[:12]}{extra}")
            if outcome.fuse is not None:
                report.note(f"{name}: lazy file system: {outcome.fuse}")
            if outcome.diffs is not None:
                RESULTS.mkdir(parents=True, exist_ok=True)
                kept = RESULTS / f"regress-{name}.diffs"
                shutil.copyfile(outcome.diffs, kept)
                report.note(f"{name}: the failed tests' differences are in {kept}")
            if outcome.exit_code != 0 and not outcome.failed:
                report.note(f"{name}: pg_regress exited with {outcome.exit_code} although "
                            "no test failed")

        record("stock", _stock(suite, schedule, root / "stock", {}))
        record("stock_d2wal", _stock(suite, schedule, root / "stock_d2wal",
                                     dict(STRATA_WAL_SETTINGS)))
        for wal_mode, mode, name in (("safekeepers", "lazy", "strata_lazy"),
                                     ("safekeepers", "full", "strata_full"),
                                     ("pageserver", "lazy", "strata_dev")):
            record(name, _on_strata(suite, schedule, root / name, wal_mode, mode, ""))
            record(f"{name}_nosync", _on_strata(suite, schedule, root / f"{name}_nosync",
                                                wal_mode, mode,
                                                "-c synchronous_commit=off"))
            report.note(load_note(f"after {name}"))
        report.note(failure_summary(results))
    what = "quick schedule (test_setup + 4 groups)" if quick else "full parallel_schedule"
    report.note(f"installcheck-parallel, {what}, pg_regress of Debian's postgresql-15; "
                "ratios are against `stock` of the same run")
