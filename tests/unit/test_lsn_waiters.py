"""LsnWaiters: waits end when their LSN is reached, from the loop's thread or another."""

from __future__ import annotations

import asyncio
import threading

import pytest

from strata.storage.lsn_waiters import LsnWaiters


def test_reached_lsn_returns_at_once() -> None:
    waiters = LsnWaiters(0x200)

    async def scenario() -> None:
        await waiters.wait(0x100, timeout_s=0.01)
        await waiters.wait(0x200, timeout_s=0.01)

    asyncio.run(scenario())
    assert waiters.pending() == 0


def test_advance_wakes_only_the_waiters_it_reaches() -> None:
    waiters = LsnWaiters(0)

    async def scenario() -> None:
        low = asyncio.create_task(waiters.wait(0x100, timeout_s=30))
        high = asyncio.create_task(waiters.wait(0x300, timeout_s=30))
        await asyncio.sleep(0)
        assert waiters.pending() == 2
        waiters.advance(0x200)
        await asyncio.wait_for(low, 30)
        await asyncio.sleep(0)
        assert not high.done()
        assert waiters.pending() == 1
        waiters.advance(0x300)
        await asyncio.wait_for(high, 30)

    asyncio.run(scenario())
    assert waiters.pending() == 0
    assert waiters.reached == 0x300


def test_timeout_raises_and_forgets_the_waiter() -> None:
    waiters = LsnWaiters(0x100)

    async def scenario() -> None:
        with pytest.raises(TimeoutError):
            await waiters.wait(0x200, timeout_s=0.01)

    asyncio.run(scenario())
    assert waiters.pending() == 0
    waiters.advance(0x200)  # nothing left to wake


def test_cancelled_waiter_is_forgotten() -> None:
    waiters = LsnWaiters(0)

    async def scenario() -> None:
        task = asyncio.create_task(waiters.wait(0x100, timeout_s=30))
        await asyncio.sleep(0)
        assert waiters.pending() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert waiters.pending() == 0


def test_advance_from_another_thread_wakes_waiters_on_two_loops() -> None:
    """Ingest runs on its own thread; page requests wait on event loops of their own."""
    waiters = LsnWaiters(0)
    registered = threading.Barrier(3, timeout=60)
    results: list[str] = []

    def wait_on_own_loop(name: str) -> None:
        async def scenario() -> None:
            task = asyncio.create_task(waiters.wait(0x500, timeout_s=60))
            await asyncio.sleep(0)
            await asyncio.to_thread(registered.wait)
            await task
            results.append(name)

        asyncio.run(scenario())

    threads = [threading.Thread(target=wait_on_own_loop, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    registered.wait()
    waiters.advance(0x400)
    assert waiters.pending() == 2
    waiters.advance(0x500)
    for t in threads:
        t.join(60)
    assert sorted(results) == ["a", "b"]
    assert waiters.pending() == 0
