"""The walproposer's quorum driver over real loopback sockets, against the `Acceptor` served
in-process by a minimal PG-protocol safekeeper (durable state kept in memory, so a "restart"
keeps exactly what the acceptor's actions made durable).

Proves: sync on a new timeline and after WAL was appended returns the last record end and
its record's start; commits advance with one safekeeper of three down and a restarted one
catches up; losing a majority makes commits wait (a warning, no fencing) until it is back;
a second proposer's sync fences the first; a safekeeper that never answers does not stop sync.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from polling import wait_until_async
from sim.walgen import SYSID, WalGenerator
from sk_stub import StubSafekeeper
from strata.common.errors import Unavailable
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.quorum import QuorumConfig, SafekeeperAddr, SyncResult, parse_safekeepers
from strata.compute.safekeeper_sync import sync_safekeepers
from strata.compute.walproposer import QuorumDriver
from strata.safekeeper.proposer import PullTarget

T = TypeVar("T")
SEG = 1 << 20
START = Lsn(SEG + 0x28 + 0x100)  # a record end mid-segment, as after initdb
PREV = Lsn(SEG + 0x28)
TENANT = TenantId.generate()
TIMELINE = TimelineId.generate()


def quorum_config(sks: list[StubSafekeeper], **kwargs: object) -> QuorumConfig:
    addrs = tuple(SafekeeperAddr(s.node_id, "127.0.0.1", s.port) for s in sks)
    return QuorumConfig(TENANT, TIMELINE, addrs, wal_seg_size=SEG, retry_interval_s=0.1,
                        connect_timeout_s=1, backoff_max_s=0.2, **kwargs)  # type: ignore[arg-type]


async def started(n: int) -> list[StubSafekeeper]:
    sks = [StubSafekeeper(i + 1, TENANT, TIMELINE, SYSID, SEG, START, PREV) for i in range(n)]
    for s in sks:
        await s.start()
    return sks


async def elected(sks: list[StubSafekeeper], **kwargs: Any) -> QuorumDriver:
    """A walproposer (not a sync) over `sks`, started, once it has won an election."""
    driver = QuorumDriver(quorum_config(sks), SYSID, **kwargs)
    driver.start()
    try:
        await wait_until_async(lambda: driver.elected is not None, 10, "election")
    except BaseException:
        await driver.stop()
        raise
    return driver


async def stop_all(sks: list[StubSafekeeper]) -> None:
    for s in sks:
        await s.stop()


def run(coro: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(coro(), 60))


Sync = Callable[[QuorumConfig, int, float], Awaitable[SyncResult]]


async def _sync_in_thread(config: QuorumConfig, system_id: int,
                          timeout_s: float) -> SyncResult:
    # In a thread: the sync driver blocks, and the stub safekeepers run on this event loop.
    return await asyncio.to_thread(sync_safekeepers, config, system_id, timeout_s)


@pytest.fixture
def sync() -> Sync:
    """The one-shot sync (`strata.compute.safekeeper_sync`), awaitable from the tests."""
    return _sync_in_thread


def test_parse_safekeepers() -> None:
    addrs = parse_safekeepers("127.0.0.1:5001, 7@localhost:5002")
    assert addrs == (SafekeeperAddr(1, "127.0.0.1", 5001), SafekeeperAddr(7, "localhost", 5002))


def test_sync_on_new_timeline_returns_its_start(sync: Sync) -> None:
    async def body() -> None:
        sks = await started(3)
        try:
            result = await sync(quorum_config(sks), SYSID, 10)
            assert (result.lsn, result.prev_lsn) == (START, PREV)
            durable = [s.state.commit_lsn for s in sks if s.state is not None]
            assert sum(c == START for c in durable) >= 2, durable
        finally:
            await stop_all(sks)
    run(body)


def test_commit_with_one_down_restart_catches_up_then_sync_finds_the_end(sync: Sync) -> None:
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        rng = random.Random(7)
        driver = await elected(sks)
        try:
            assert driver.elected is not None and driver.elected.start_lsn == START
            for _ in range(30):
                driver.append_wal(gen.random_record(rng)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: driver.commit_lsn == end, 10, "commit")
            await sks[2].stop()  # one of three down: commits go on
            for _ in range(30):
                driver.append_wal(gen.random_record(rng)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: driver.commit_lsn == end, 10, "commit with 2 of 3")
            assert len(sks[2].wal) < end - START
            await sks[2].start()  # restarted on the same port: catches up
            await wait_until_async(lambda: START + len(sks[2].wal) == end, 10, "catch-up")
            assert bytes(sks[2].wal) == bytes(sks[0].wal)
            assert driver.fenced is None
        finally:
            await driver.stop()
        prev = Lsn(gen.prev_lsn)
        result = await sync(quorum_config(sks), SYSID, 10)
        assert (result.lsn, result.prev_lsn) == (end, prev)
        await stop_all(sks)
    run(body)


def test_back_to_back_commits_send_no_commit_only_appends() -> None:
    """The commit LSN rides on the next append while commits keep coming: a commit-only
    append waits for the tick and is dropped when WAL goes first (one message per commit
    per safekeeper, not two); once the stream is idle the last commit LSN still reaches
    every safekeeper."""
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        commits = 60
        driver: QuorumDriver | None = None

        def append() -> None:
            assert driver is not None
            driver.append_wal(gen.record(b"c" * 40)[1])

        def next_commit(lsn: Lsn) -> None:  # the next WAL right after the last commits
            assert driver is not None
            if lsn == driver.end_lsn and gen.end_lsn < START.value + commits * 100:
                asyncio.get_running_loop().call_soon(append)

        driver = await elected(sks, on_commit=next_commit)
        try:
            before = [s.commit_only_appends for s in sks]
            append()
            end = START.value + commits * 100
            await wait_until_async(
                lambda: gen.end_lsn >= end and driver.commit_lsn == Lsn(gen.end_lsn), 30,
                "the commits")
            appended = sum(s.appends_with_wal for s in sks)
            commit_only = sum(s.commit_only_appends - b for s, b in zip(sks, before, strict=True))
            assert appended >= 2 * (gen.end_lsn - START.value) // 100, appended
            assert commit_only <= appended // 4, (commit_only, appended)
            last = Lsn(gen.end_lsn)  # idle now: the commit LSN reaches all three
            await wait_until_async(
                lambda: all(s.acceptor is not None and s.acceptor.commit_lsn == last
                            for s in sks), 10, "the last commit LSN")
        finally:
            await driver.stop()
            await stop_all(sks)
    run(body)


def test_a_deferred_safekeeper_takes_over_when_another_stops_answering() -> None:
    """One of three safekeepers is deferred (WAL only at the tick); when one of the two
    others goes down, the deferred one is given WAL at once and commits go on; the one that
    stopped answering becomes the deferred one."""
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        rng = random.Random(11)
        driver = await elected(sks)
        driver.defer_slowest = True  # off by default
        try:
            for _ in range(10):
                driver.append_wal(gen.random_record(rng)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: driver.commit_lsn == end, 10, "commit")
            deferred = driver.proposer.deferred
            assert deferred in (1, 2, 3)
            eager = next(s for s in sks if s.node_id != deferred)
            await eager.stop()
            for _ in range(10):
                driver.append_wal(gen.random_record(rng)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: driver.commit_lsn == end, 10,
                                   "commit without an eager safekeeper")
            await wait_until_async(lambda: driver.proposer.deferred == eager.node_id, 10,
                                   "the stopped safekeeper deferred")
            assert driver.fenced is None
        finally:
            await driver.stop()
            await stop_all(sks)
    run(body)


def test_pull_mode_ticks_less_often_than_push_mode() -> None:
    """In pull mode nothing on the commit path waits for the timer: it ticks every 50 ms
    (push mode every 20 ms), so its commit-only appends wake the safekeepers less often."""
    async def body() -> None:
        sks = await started(3)
        try:
            config = quorum_config(sks)
            push = QuorumDriver(config, SYSID)
            pull = QuorumDriver(config, SYSID, pull=PullTarget("127.0.0.1", 5432))
            assert (push.tick_s, pull.tick_s) == (0.02, 0.05)
        finally:
            await stop_all(sks)
    run(body)


def test_pull_mode_staggers_the_ticks_commit_only_appends() -> None:
    """In pull mode the tick's held commit-only appends go one safekeeper at a time, a
    third of a tick apart (sk1 at once), each with the latest commit LSN held for it when
    it goes; with `stagger_commits` off, all at once (push mode's way)."""
    async def body() -> None:
        sks = await started(3)
        try:
            driver = QuorumDriver(quorum_config(sks), SYSID,
                                  pull=PullTarget("127.0.0.1", 5432))
            assert driver.stagger_commits
            driver.tick_s = 0.3
            sent: list[tuple[int, bytes]] = []
            for node, link in driver.links.items():
                link.send = lambda data, node=node: sent.append((node, data))  # type: ignore[method-assign]
            driver._held_commit = {1: b"c1", 2: b"c2", 3: b"c3"}
            driver._release_held_commits()
            assert sent == [(1, b"c1")]
            driver._held_commit[3] = b"c3-newer"  # a later commit LSN, held meanwhile
            await wait_until_async(lambda: len(sent) == 3, 5, "the staggered appends")
            assert sent == [(1, b"c1"), (2, b"c2"), (3, b"c3-newer")]
            assert driver._held_commit == {}

            sent.clear()
            driver.stagger_commits = False
            driver._held_commit = {1: b"d1", 2: b"d2", 3: b"d3"}
            driver._release_held_commits()
            assert sorted(sent) == [(1, b"d1"), (2, b"d2"), (3, b"d3")]
        finally:
            await stop_all(sks)
    run(body)


def test_sync_and_two_safekeepers_defer_none() -> None:
    async def body() -> None:
        sks = await started(2)
        driver = await elected(sks)
        driver.defer_slowest = True
        try:
            await asyncio.sleep(0.1)  # a few ticks
            assert driver.proposer.deferred is None  # both are needed for a majority
        finally:
            await driver.stop()
            await stop_all(sks)
    run(body)


def test_partial_record_is_truncated_by_sync(sync: Sync) -> None:
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        driver = await elected(sks)
        try:
            driver.append_wal(gen.record(b"x" * 100)[1])
            complete_end, complete_prev = Lsn(gen.end_lsn), Lsn(gen.prev_lsn)
            _, spanning = gen.record(bytes(20000))  # spans pages
            driver.append_wal(spanning[:9000])  # the compute died mid-record
            await wait_until_async(lambda: all(START + len(s.wal) == complete_end + 9000
                                               for s in sks), 10, "partial tail on all")
        finally:
            await driver.stop()
        result = await sync(quorum_config(sks), SYSID, 10)
        assert (result.lsn, result.prev_lsn) == (complete_end, complete_prev)
        await stop_all(sks)
    run(body)


def test_majority_loss_waits_with_warnings_then_commits_resume(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="strata.compute.walproposer")

    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        driver = await elected(sks, quorum_warn_s=0.2)
        try:
            driver.append_wal(gen.record(b"a" * 100)[1])
            before = Lsn(gen.end_lsn)
            await wait_until_async(lambda: driver.commit_lsn == before, 10, "commit")
            await sks[0].stop()
            await sks[1].stop()
            driver.append_wal(gen.record(b"b" * 100)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: "commits wait until a majority is back" in caplog.text,
                                   10, "the no-majority warning")
            await asyncio.sleep(0.5)  # a while without a majority: waiting, not fenced
            assert driver.fenced is None and not driver.done.is_set()
            assert driver.commit_lsn == before
            await sks[0].start()  # restarted on the same port
            await sks[1].start()
            await wait_until_async(lambda: driver.commit_lsn == end, 20,
                                   "commit after the majority came back")
            assert driver.fenced is None
            await wait_until_async(lambda: "answers again" in caplog.text, 10, "the recovery line")
        finally:
            await driver.stop()
            await stop_all(sks)
    run(body)


def test_newer_proposer_fences_the_older(sync: Sync) -> None:
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        old = await elected(sks)
        try:
            old.append_wal(gen.record(b"a" * 50)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: old.commit_lsn == end, 10, "commit")
            result = await sync(quorum_config(sks), SYSID, 10)
            assert result.lsn == end
            # The old proposer learns the higher term at its next heartbeat or append.
            old.append_wal(gen.record(b"b" * 50)[1])
            await wait_until_async(lambda: old.fenced is not None, 5, "fencing")
            assert old.commit_lsn == end
        finally:
            await old.stop()
            await stop_all(sks)
    run(body)


def test_sync_with_one_safekeeper_unreachable(sync: Sync) -> None:
    async def body() -> None:
        sks = await started(3)
        await sks[1].stop()
        try:
            result = await sync(quorum_config(sks), SYSID, 10)
            assert result.lsn == START
        finally:
            await stop_all(sks)
    run(body)


def test_wal_arriving_while_a_majority_is_busy_shares_one_append() -> None:
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        driver = await elected(sks)
        try:
            for _ in range(100):  # all before any answer: the first goes, the rest wait
                driver.append_wal(gen.record(b"r" * 40)[1])
            end = Lsn(gen.end_lsn)
            assert driver.end_lsn == end
            await wait_until_async(lambda: driver.commit_lsn == end, 10, "commit")
            assert all(s.appends_with_wal <= 3 for s in sks), [s.appends_with_wal for s in sks]
        finally:
            await driver.stop()
            await stop_all(sks)
    run(body)


def test_sync_recovers_a_lagging_safekeeper(sync: Sync) -> None:
    """One safekeeper missed WAL that a majority committed; sync brings it up to the end
    (read from another one, ReadWal) before it commits there."""
    async def body() -> None:
        sks = await started(3)
        gen = WalGenerator(START.value, PREV.value, SEG)
        driver = await elected(sks)
        try:
            await sks[2].stop()
            for _ in range(20):
                driver.append_wal(gen.record(b"w" * 300)[1])
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: driver.commit_lsn == end, 10, "commit with 2 of 3")
        finally:
            await driver.stop()
        await sks[0].stop()  # the lagging one is needed for a majority now
        await sks[2].start()
        try:
            result = await sync(quorum_config(sks), SYSID, 10)
            assert result.lsn == end
            assert bytes(sks[2].wal) == bytes(sks[1].wal), "not recovered"
        finally:
            await stop_all(sks)
    run(body)


def test_sync_without_a_majority_is_unavailable(sync: Sync) -> None:
    async def body() -> None:
        sks = await started(3)
        await sks[0].stop()
        await sks[1].stop()
        try:
            with pytest.raises(Unavailable, match="are a majority of the safekeepers up"):
                await sync(quorum_config(sks), SYSID, 1.0)
        finally:
            await stop_all(sks)
    run(body)
