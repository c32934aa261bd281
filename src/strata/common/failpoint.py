"""Named failpoints: inert markers in code that a test can arm to fail or run a callback.

Production code calls `failpoint("flush-after-write-layer")` at a step where a crash
matters. Nothing happens unless a test armed that name with `enable(name)` (raise
`FailpointHit` there) or `enable(name, action=callback)` (run the callback, which may
raise its own exception). `enable(..., count=n)` fires only on the n-th hit. Disarm with
`disable(name)`, `disable_all()`, or use the `armed(name)` context manager.

The registry is process-wide and guarded by a lock, because flush and compaction may run
on background threads. A test arms failpoints of a child process through its environment:
`STRATA_FAILPOINTS="name=sleep(0.002);other=raise"` is read when this module is imported;
`name=wait(SECONDS,PATH)` holds the step until the file PATH exists (the test creates it to
release the process), at most SECONDS: an event instead of a long fixed sleep.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from strata.common.errors import StrataError


class FailpointHit(StrataError):
    """Raised by an armed failpoint: simulates a crash or I/O failure at that step."""


@dataclass(slots=True)
class _Armed:
    action: Callable[[], None] | None
    skip: int  # hits to let through before firing
    hits: int = 0


_lock = threading.Lock()
_armed: dict[str, _Armed] = {}


def failpoint(name: str) -> None:
    """Mark a step; fire if a test armed `name`. Cheap (one dict lookup) when inert."""
    if not _armed:
        return
    with _lock:
        armed = _armed.get(name)
        if armed is None:
            return
        armed.hits += 1
        if armed.hits <= armed.skip:
            return
        action = armed.action
    if action is None:
        raise FailpointHit(f"failpoint {name!r} fired (armed by a test)")
    action()


def enable(name: str, action: Callable[[], None] | None = None, count: int = 1) -> None:
    """Arm `name`: on its `count`-th hit (and after), raise FailpointHit or run `action`."""
    assert count >= 1, count
    with _lock:
        _armed[name] = _Armed(action=action, skip=count - 1)


def disable(name: str) -> None:
    with _lock:
        _armed.pop(name, None)


def disable_all() -> None:
    with _lock:
        _armed.clear()


def is_armed(name: str) -> bool:
    """Whether a test armed `name` (code may then take its slow, observable path)."""
    return bool(_armed) and name in _armed


def hits(name: str) -> int:
    """How often an armed failpoint was reached (0 if not armed)."""
    with _lock:
        armed = _armed.get(name)
        return armed.hits if armed is not None else 0


@contextmanager
def armed(name: str, action: Callable[[], None] | None = None, count: int = 1) -> Iterator[None]:
    enable(name, action, count)
    try:
        yield
    finally:
        disable(name)


ENV_VAR = "STRATA_FAILPOINTS"
# A pattern, compiled (and cached by `re`) at the first item: most processes have none.
_ENV_ITEM = r"([a-z0-9_-]+)=(raise|sleep\(([0-9.]+)\)|wait\(([0-9.]+),([^;)]+)\))"
_WAIT_POLL_S = 0.05


def _wait_for_file(path: str, timeout_s: float) -> None:
    """Return once `path` exists, or after `timeout_s` (then go on as a sleep would)."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(_WAIT_POLL_S)


def enable_from_env(value: str | None = None) -> list[str]:
    """Arm the failpoints listed in `value` (default: $STRATA_FAILPOINTS), `;`-separated
    `name=raise`, `name=sleep(SECONDS)` or `name=wait(SECONDS,PATH)`; returns the names
    armed."""
    text = os.environ.get(ENV_VAR, "") if value is None else value
    names = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        m = re.fullmatch(_ENV_ITEM, item)
        if m is None:
            raise StrataError(f"{ENV_VAR} item {item!r}: expected name=raise, "
                              f"name=sleep(SECONDS) or name=wait(SECONDS,PATH)")
        action: Callable[[], None] | None = None
        if m.group(3):
            action = functools.partial(time.sleep, float(m.group(3)))
        elif m.group(4):
            action = functools.partial(_wait_for_file, m.group(5), float(m.group(4)))
        enable(m.group(1), action)
        names.append(m.group(1))
    return names


enable_from_env()
