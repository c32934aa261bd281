"""What the `strata` CLI prints: progress lines on stderr, results (tables, JSON) on stdout.

Progress goes to stderr so that stdout holds only results: the connection string that
`endpoint start` prints last, or a listing's `--json`, can be captured by a script.
`rich` (a spinner for steps on a terminal, tables) is imported only when it is used: a
script's `endpoint start` gets plain lines and does not pay for importing it.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

exit_fast = False
"""Set by a command whose process may end without Python's teardown once it succeeded
(`strata.control.cli`): `endpoint start`, whose caller waits for the process to exit."""


@functools.cache
def _err() -> Console:
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


@functools.cache
def _out() -> Console:
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = 250  # ids are 32 hex digits: never crop them in a captured listing
    return out


def _err_is_terminal() -> bool:
    return sys.stderr.isatty()


def _err_line(message: str) -> None:
    if _err_is_terminal():
        _err().print(message, markup=False)
    else:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()


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
    _err_line(message)


@contextlib.contextmanager
def step(message: str) -> Iterator[None]:
    """`message ...` now, `message: done (1.2s)` when the block ends (a failure propagates;
    the caller prints the error)."""
    started = time.monotonic()
    _report(message + " ...")
    terminal = _err_is_terminal()
    if terminal:
        with _err().status(message + " ..."):
            yield
    else:
        _err_line(message + " ...")
        yield
    elapsed = f"{time.monotonic() - started:.1f}s"
    _report(f"{message}: done in {elapsed}")
    _err_line(f"{message}: done ({elapsed})" if terminal else f"  done in {elapsed}")


def result(line: str) -> None:
    """One line of the command's result, on stdout."""
    print(line, flush=True)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.table import Table

    out = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for column in columns:
        out.add_column(column, no_wrap=True)
    for row in rows:
        out.add_row(*("-" if cell is None else str(cell) for cell in row))
    _out().print(out)
