"""A stock PostgreSQL 15 pgbench database at scale N, cached, and its import into a
Strata environment: the cheap way to the 5 GB points of issues 13 and 16.

Loading 5 GB through a compute, the walproposer and three safekeepers takes hours on the
shared machine; stock PostgreSQL makes the same database in minutes, and `strata tenant
create --import-datadir` (docs/pageserver.md) takes it in as the tenant's base image.

`stock_pgbench_datadir(scale)` makes the database once (`pgbench -i -I dtGvp -s SCALE`
on a fresh initdb, autovacuum off, stopped with a fast shutdown, so that it is cleanly
shut down as the import requires) under `$BENCH_STOCKDB_DIR` (default
/var/tmp/strata-bench-stockdb, outside the repository), one directory per scale; later
runs reuse it (the import only reads it). A directory is used only once its build
finished (`READY`); a flock keeps two runs from building the same scale at once.
`remove_stock_datadirs()` deletes the cache (scale 320 is ~5 GB).

`import_tenant(repo, name, scale)` imports it as tenant `name` of the environment at
`repo` (made by `strata init`) and creates endpoint `name` on its branch main.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from bench.compute import _pgbench, _strata
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer

CACHE_ENV = "BENCH_STOCKDB_DIR"
DEFAULT_CACHE = Path("/var/tmp/strata-bench-stockdb")


@dataclass(frozen=True, slots=True)
class StockDb:
    """A cached, cleanly shut down stock pgbench data directory."""

    scale: int
    datadir: Path
    load_s: float
    """How long stock pgbench's load took when it was built."""
    size_mb: float
    """The data directory without pg_wal (what the import reads)."""
    reused: bool
    """Taken from the cache rather than built by this call."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, str(DEFAULT_CACHE)))


def _imported_mb(root: Path) -> float:
    return sum(p.stat().st_size for p in root.rglob("*")
               if p.is_file() and "pg_wal" not in p.relative_to(root).parts) / 1e6


def stock_pgbench_datadir(scale: int) -> StockDb:
    """The stock pgbench database at `scale`, built the first time (see the module)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    ensure_traversable(root)
    home = root / f"pg15-pgbench-s{scale}"
    with open(root / f"pg15-pgbench-s{scale}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        ready = home / "READY"
        if ready.is_file():
            meta = json.loads(ready.read_text())
            return StockDb(scale, home / "pgdata", meta["load_s"], meta["size_mb"], True)
        shutil.rmtree(home, ignore_errors=True)  # an interrupted build
        home.mkdir()
        home.chmod(0o755)
        stock = PgServer(home / "pgdata", log_path=home / "stock.log")
        stock.initdb()
        stock.start({"autovacuum": False})
        try:
            started = time.monotonic()
            _pgbench(stock, "-i", "-I", "dtGvp", "-s", str(scale), "-q")
            load_s = time.monotonic() - started
        finally:
            stock.stop("fast")  # a clean shutdown: what the import requires
        size_mb = _imported_mb(stock.datadir)
        ready.write_text(json.dumps({"scale": scale, "load_s": load_s, "size_mb": size_mb}))
        return StockDb(scale, stock.datadir, load_s, size_mb, False)


def remove_stock_datadirs() -> None:
    """Delete every cached database (the 5 GB one too)."""
    shutil.rmtree(cache_dir(), ignore_errors=True)


def import_tenant(repo: Path, name: str, db: StockDb, *endpoint_args: str) -> float:
    """Import `db` as tenant `name` with endpoint `name` on its branch main (created with
    `endpoint_args`, e.g. `--suspend-timeout-s 2`); returns the import's seconds. Its
    tables are the superuser's, in database `postgres`."""
    started = time.monotonic()
    _strata(repo, "tenant", "create", "--name", name, "--import-datadir", str(db.datadir),
            timeout=7200)
    import_s = time.monotonic() - started
    _strata(repo, "endpoint", "create", name, "--branch", "main", "--tenant", name,
            *endpoint_args)
    return import_s
