"""Coroutines waiting for an LSN to be reached, woken from the thread that reaches it.

The timeline's ingest thread calls `advance(lsn)` after each record; page-service and
basebackup requests on event loops `await wait(lsn, timeout_s)`. A waiter registers its
future and then re-checks the reached LSN, so an `advance` between the two is never
missed; `advance` resolves each ready future through its own loop
(`call_soon_threadsafe`), as a future may only be completed on its loop's thread.
"""

from __future__ import annotations

import asyncio
import threading

_Waiter = tuple[int, asyncio.AbstractEventLoop, "asyncio.Future[None]"]


class LsnWaiters:
    """The LSN reached so far and the coroutines waiting for a later one. Thread-safe."""

    def __init__(self, reached: int) -> None:
        self._reached = reached
        self._waiters: list[_Waiter] = []
        self._lock = threading.Lock()

    @property
    def reached(self) -> int:
        return self._reached

    def pending(self) -> int:
        """How many coroutines are waiting (for tests and metrics)."""
        with self._lock:
            return len(self._waiters)

    def advance(self, lsn: int) -> None:
        """`lsn` is reached: wake every waiter for it or an earlier LSN."""
        self._reached = lsn
        if not self._waiters:
            return
        with self._lock:
            ready = [w for w in self._waiters if w[0] <= lsn]
            self._waiters = [w for w in self._waiters if w[0] > lsn]
        for _, loop, fut in ready:
            loop.call_soon_threadsafe(_resolve, fut)

    async def wait(self, lsn: int, timeout_s: float) -> None:
        """Return once `lsn` is reached; TimeoutError after `timeout_s` seconds."""
        if self._reached >= lsn:
            return
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry: _Waiter = (lsn, loop, fut)
        with self._lock:
            self._waiters.append(entry)
        try:
            if self._reached >= lsn:  # raced with advance
                return
            async with asyncio.timeout(timeout_s):
                await fut
        finally:
            with self._lock:
                if entry in self._waiters:
                    self._waiters.remove(entry)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
