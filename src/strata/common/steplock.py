"""`StepLock`: an asyncio lock that can also be taken synchronously when it is free.

A safekeeper timeline's steps (a proposer message, a batch of pulled WAL, a walsender's
read) run one at a time under one lock. Pull mode applies a batch of WAL straight from the
replication connection's data callback when nobody holds or waits for the lock
(`try_acquire`), which saves the coroutine hops of an `async with` for every batch
(docs/walproposer.md, "Pull mode's synchronous fast path"); otherwise it waits like
everyone else (`async with`).

Fair (first come, first served) and with direct hand-off: `release` passes the lock to the
first waiter, so `try_acquire` never jumps ahead of a waiter that was woken but has not
run yet. A waiter cancelled after it was handed the lock passes it on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import TracebackType


class StepLock:
    """A FIFO asyncio lock with a synchronous `try_acquire`."""

    __slots__ = ("_locked", "_waiters")

    def __init__(self) -> None:
        self._locked = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    def locked(self) -> bool:
        return self._locked

    def try_acquire(self) -> bool:
        """Take the lock now if nobody holds it or waits for it; False otherwise."""
        if self._locked or self._waiters:
            return False
        self._locked = True
        return True

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed the lock, then cancelled: pass it on
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        """Hand the lock to the first waiter still waiting, else free it."""
        assert self._locked, "StepLock released while not held"
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it owns the lock now (_locked stays True)
                return
        self._locked = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
