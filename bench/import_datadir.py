"""`strata tenant create --import-datadir` (docs/pageserver.md): the import of a stock
PostgreSQL 15 data directory that stock pgbench filled, against that load.

Stock PostgreSQL makes the pgbench database (`pgbench -i -I dtGvp -s SCALE`, timed: the
baseline `stock_load_s`) and stops it cleanly, once per scale: bench/_stockdb.py caches
it (/var/tmp/strata-bench-stockdb), so a later run reuses it and the `stock_load_s` of
the run that built it (the note says which). `import_s` is `strata tenant create
--import-datadir` on it, `import_mb_per_s` its rate over the directory's size without
pg_wal, and `first_start_s` the first `strata endpoint start` on the imported tenant to
a query of pgbench_branches, `first_scan_s` then a `count(*)` of pgbench_accounts (every
page read from the pageserver). Scale `BENCH_IMPORT_SCALE` (default 10, ~150 MB;
--quick 2). This is the cheap way to the 5 GB point of issues 13 and 16 (scale 320).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import psycopg

from bench._stockdb import import_tenant, stock_pgbench_datadir
from bench.compute import _strata
from bench.report import Report
from strata.common.proc import ensure_traversable


def run(report: Report, quick: bool) -> None:
    scale = int(os.environ.get("BENCH_IMPORT_SCALE", "2" if quick else "10"))
    db = stock_pgbench_datadir(scale)
    report.add("stock_load_s", db.load_s, "s")
    report.note(f"scale {scale}: data directory of {db.size_mb:.0f} MB without pg_wal; "
                + ("cached: stock_load_s is from the run that built it"
                   if db.reused else "built and timed in this run"))
    with tempfile.TemporaryDirectory(prefix="strata-bench-import-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        repo = base / "cli"
        _strata(repo, "init")
        try:
            import_s = import_tenant(repo, "imp", db)
            report.add("import_s", import_s, "s", baseline=db.load_s)
            report.add("import_mb_per_s", db.size_mb / import_s, "MB/s")
            t = time.monotonic()
            _strata(repo, "endpoint", "start", "imp")
            ep = next(e for e in json.loads(_strata(repo, "endpoint", "list", "--json"))
                      if e["name"] == "imp")
            # The tables are the superuser's, in `postgres`: Strata's own way in.
            with psycopg.connect(host=ep["socket_dir"], port=ep["address"].rsplit(":", 1)[1],
                                 user="postgres", dbname="postgres", autocommit=True) as conn:
                branches = conn.execute("select count(*) from pgbench_branches").fetchone()
                report.add("first_start_s", time.monotonic() - t, "s")
                t = time.monotonic()
                row = conn.execute("select count(*) from pgbench_accounts").fetchone()
                report.add("first_scan_s", time.monotonic() - t, "s")
            assert branches is not None and branches[0] == scale, branches
            assert row is not None and row[0] == scale * 100000, row
        finally:
            _strata(repo, "stop")
