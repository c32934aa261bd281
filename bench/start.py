"""Compute start as a user sees it, alone: `strata endpoint start` to the first query and
its phases against stock PostgreSQL's start, and the kill -9 restart loop (issue 13).

The same figures as the CLI part of `bench/run compute` (`cli_starts` there), without
that benchmark's library-level starts, TPS runs and GC soak: scales 1 and 320 (~15 MB and
~5 GB; --quick 1 and 10), 20 kill -9 rounds (--quick 5), after the first scale.

`BENCH_START_SCALES=1,320` picks the scales (e.g. `320` alone for the 5 GB point) and
`BENCH_START_KILL9=N` the kill -9 rounds (0: none).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.compute import cli_starts
from bench.report import Report
from strata.common.proc import ensure_traversable


def run(report: Report, quick: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="strata-bench-start-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        scales = os.environ.get("BENCH_START_SCALES", "1,10" if quick else "1,320")
        kill9 = os.environ.get("BENCH_START_KILL9", "5" if quick else "20")
        cli_starts(report, base, [int(s) for s in scales.split(",")],
                   kill9_rounds=int(kill9))
