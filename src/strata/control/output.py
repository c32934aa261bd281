"""What the `strata` CLI prints: progress lines on stderr, results (tables, JSON) on stdout.

Progress goes to stderr so that stdout holds only results: the connection string that
`endpoint start` prints last, or a listing's `--json`, can be captured by a script.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

_err = Console(stderr=True, highlight=False, soft_wrap=True)
_out = Console(highlight=False, soft_wrap=True)
if not _out.is_terminal:
    _out.width = 250  # ids are 32 hex digits: never crop them in a captured listing


_progress: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "strata_progress", default=None)


@contextlib.contextmanager
def progress_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Also hand every progress line (info, step start and end) to `sink` inside the block:
    the console shows a running operation's progress this way (a thread started with the
    context, e.g. by asyncio.to_thread, inherits the sink)."""
    token = _progress.set(sink)
    try:
        yield
    finally:
        _progress.reset(token)


def _report(line: str) -> None:
    sink = _progress.get()
    if sink is not None:
        sink(line)


def info(message: str) -> None:
    _report(message)
    _err.print(message, markup=False)


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """`message ...` now, `message: done (1.2s)` when the block ends (a failure propagates;
    the caller prints the error)."""
    started = time.monotonic()
    _report(message + " ...")
    if _err.is_terminal:
        with _err.status(message + " ..."):
            yield
    else:
        _err.print(message + " ...", markup=False)
        yield
    elapsed = f"{time.monotonic() - started:.1f}s"
    _report(f"{message}: done in {elapsed}")
    _err.print(f"{message}: done ({elapsed})" if _err.is_terminal else f"  done in {elapsed}",
               markup=False)


def result(line: str) -> None:
    """One line of the command's result, on stdout."""
    print(line, flush=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    out = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column in columns:
        out.add_column(column, no_wrap=True)
    for row in rows:
        out.add_row(*("-" if cell is None else str(cell) for cell in row))
    _out.print(out)
