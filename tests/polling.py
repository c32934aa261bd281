"""Waiting for a condition in tests: poll `check` until it is true or a generous deadline
passes (never a fixed sleep, never a timed assert: the machine is shared and loaded).

`wait_until` blocks the calling thread; `wait_until_async` awaits between polls, for a
test that runs an event loop. Both raise AssertionError naming `what` on timeout. Import
them as `from polling import wait_until` (pytest puts `tests/` on sys.path through the root
conftest).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(check: Callable[[], bool], timeout_s: float, what: str,
               interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


async def wait_until_async(check: Callable[[], bool], timeout_s: float, what: str,
                           interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
