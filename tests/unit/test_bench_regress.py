"""bench/run regress's report of the suite's own failures (bench/regress.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.regress import Outcome, failure_summary  # noqa: E402


def outcome(*failed: str) -> Outcome:
    return Outcome(1.0, 217, list(failed), 1 if failed else 0, None)


def test_no_failure() -> None:
    assert failure_summary({"stock": outcome(), "strata_lazy": outcome()}) == \
        "suite failures: none (every test passed on every target)"


def test_failures_on_stock_too_are_the_environment() -> None:
    assert failure_summary({"stock": outcome("triggers"), "strata_lazy": outcome("triggers"),
                            "strata_full": outcome()}) == \
        ("suite failures: only tests failing on stock too (the suite's reaction to this "
         "environment): ['triggers']")


def test_failures_not_on_stock_come_out() -> None:
    line = failure_summary({"stock": outcome("triggers"), "stock_d2wal": outcome("triggers"),
                            "strata_lazy": outcome("triggers", "sequence", "vacuum"),
                            "strata_full": outcome("vacuum")})
    assert line == ("SUITE FAILURES, tests that did not fail on stock: "
                    "strata_lazy ['sequence', 'vacuum']; strata_full ['vacuum']; failing on "
                    "stock too (the suite's reaction to this environment): ['triggers']")
