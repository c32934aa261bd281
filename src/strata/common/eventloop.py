"""The event loop of Strata's commit-path processes (the safekeeper, the walproposer sidecar)
and of the proxy (half the CPU per relayed TLS transaction, docs/proxy.md).

uvloop (libuv) instead of asyncio's pure-Python selector loop: every commit wakes these
processes several times (a CopyData in, a few out, an fsync), and on a small machine the
loop's own per-wake-up work is a large share of a commit's latency (docs/walproposer.md,
"Where a commit's time goes"). Same asyncio API; nothing else changes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on a uvloop event loop."""
    import uvloop  # here: ~60 ms of CPU that `strata endpoint start` (no loop of its own) skips

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new uvloop event loop (for a loop run in a thread of its own)."""
    import uvloop

    return uvloop.new_event_loop()
