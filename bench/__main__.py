"""Runner: import bench.NAME, call its `run(report, quick=...)`, write results JSON."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

from bench.report import Report


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(m.name for m in pkgutil.iter_modules([str(here)])
                  if not m.name.startswith("_") and m.name not in {"report"})


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Run one named benchmark; figures are printed and written to "
                    "bench/results/NAME.json, each with its same-run baseline and ratio.")
    parser.add_argument("name", help=f"one of: {', '.join(available())}")
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run (fewer sizes, rounds or tests: each benchmark's "
                             "docstring says which), from under a minute to several "
                             "minutes (regress) on a loaded machine")
    args = parser.parse_args()
    if args.name not in available():
        parser.error(f"unknown benchmark {args.name!r}; choose from {', '.join(available())}")
    module = importlib.import_module(f"bench.{args.name}")
    report = Report(args.name)
    module.run(report, quick=args.quick)
    path = report.write(Path(__file__).parent / "results")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
