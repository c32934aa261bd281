"""Pull mode, the safekeeper side: a real safekeeper process pulls WAL from a real
PostgreSQL 15 primary (started from a pageserver basebackup at X, with a physical slot
`sk1` and `synchronous_standby_names = 'sk1'`), told to by a hand-built proposer that
elects itself and sends `PullFrom` on the proposer protocol.

Proves: a commit returns only once the safekeeper fsynced it (the primary's
pg_stat_replication shows the safekeeper's flush), the pull feedback reaches the proposer
connection, a commit-only AppendRequest moves the safekeeper's commit LSN and its walsender
(what the pageserver follows) then serves the pulled WAL; a dropped replication connection
and a restarted primary are reconnected; a higher term's VoteRequest closes the stream
before the promise, tells the old proposer, and a commit on the primary then hangs; a
`PullLimit` (backpressure) holds commits while the WAL still arrives, and raising it
releases them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures_env import COMPUTE_SETTINGS, Env, LoopThread, SafekeeperProcess

from polling import wait_until
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import Compute, ComputeConfig
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection
from strata.pg.walreader import WalStreamDecoder
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AppendRequest,
    AppendResponse,
    Message,
    ProposerElected,
    ProposerGreeting,
    ProposerMessage,
    PullFrom,
    PullLimit,
    TermEntry,
    VoteRequest,
    VoteResponse,
    decode,
    encode,
)

SEG = 16 << 20
SLOT = "sk1"


class HandProposer:
    """One proposer connection to a safekeeper, driven message by message."""

    def __init__(self, conn: PgConnection, stream: CopyBothStream) -> None:
        self.conn = conn
        self.stream = stream

    @classmethod
    async def connect(cls, sk: SafekeeperProcess, tenant: TenantId,
                      timeline: TimelineId) -> HandProposer:
        conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="proposer")
        return cls(conn, await conn.start_copy_both(f"proposer {tenant} {timeline}"))

    async def send(self, msg: ProposerMessage) -> None:
        await self.stream.send(encode(msg))

    async def recv(self, timeout_s: float = 30) -> Message:
        async with asyncio.timeout(timeout_s):
            payload = await self.stream.read()
        assert payload is not None, "the safekeeper ended the proposer stream"
        return decode(payload)

    async def ask(self, msg: ProposerMessage) -> Message:
        await self.send(msg)
        return await self.recv()

    async def close(self) -> None:
        self.conn.abort()


class Rig:
    """A primary at X with slot sk1 as its synchronous standby, one safekeeper process
    with the timeline at X, and a proposer (id 1) elected in term 1 that told it to pull."""

    def __init__(self, env: Env, loop: LoopThread, test_dir: Path,
                 sk_args: list[str] | None = None, compute_id: str = "") -> None:
        self.env, self.loop = env, loop
        self.compute_id = compute_id
        client = env.client
        self.tenant, self.timeline = client.create_tenant()
        self.x, self.prev = client.compute_start(self.tenant, self.timeline)
        tar = io.BytesIO()
        client.basebackup(self.tenant, self.timeline, tar, self.x)
        tar.seek(0)
        settings = dict(COMPUTE_SETTINGS)
        if compute_id:
            settings["strata.compute_id"] = compute_id
        config = ComputeConfig(receiver_name=SLOT, settings=settings)
        self.compute = Compute.from_basebackup(tar, test_dir / "compute", config,
                                               log_path=test_dir / "compute.log")
        env.computes.append(self.compute)
        self.compute.start()
        self.compute.sql("SELECT pg_create_physical_replication_slot(%s)", SLOT)
        self.system_id = self.compute.control().system_identifier
        self.sk = SafekeeperProcess(1, test_dir / "sk1", test_dir / "sk1.log",
                                    extra_args=sk_args)
        self.sk.start()
        self.sk.create_timeline(self.tenant, self.timeline, self.x, self.prev, self.system_id,
                                SEG)
        self.p1 = loop.call(self.elect(1, 1))
        reply = loop.call(self.p1.ask(self.pull_from(1)))
        assert isinstance(reply, AppendResponse) and reply.term == 1, reply

    async def elect(self, term: int, proposer_id: int) -> HandProposer:
        p = await HandProposer.connect(self.sk, self.tenant, self.timeline)
        greeting = await p.ask(ProposerGreeting(self.tenant, self.timeline, self.system_id,
                                                SEG, proposer_id))
        assert isinstance(greeting, AcceptorGreeting), greeting
        vote = await p.ask(VoteRequest(term, proposer_id))
        assert isinstance(vote, VoteResponse) and vote.granted, vote
        assert vote.last_record_end == self.x, vote  # the sk holds nothing past X yet
        history = (TermEntry(term, self.x, self.prev),)
        elected = await p.ask(ProposerElected(term, self.x, history))
        assert isinstance(elected, AppendResponse) and elected.log_term == term, elected
        return p

    def pull_from(self, term: int) -> PullFrom:
        return PullFrom(term, "127.0.0.1", self.compute.port, SLOT, self.x, self.compute_id)

    def status(self) -> dict[str, Any]:
        return self.sk.timeline_status(self.tenant, self.timeline)

    def sk_flush(self) -> Lsn:
        return Lsn.parse(self.status()["flush_lsn"])

    def replication(self, *, streaming: bool = False) -> list[tuple[Any, ...]]:
        """pg_stat_replication's walsenders (`streaming`: only those in that state)."""
        where = " WHERE state = 'streaming'" if streaming else ""
        return self.compute.sql("SELECT application_name, sync_state, flush_lsn::text "
                                "FROM pg_stat_replication" + where)

    def commit(self, sql: str) -> Lsn:
        """Run `sql` (which commits) with a generous bound; the WAL end after it."""
        pool = concurrent.futures.ThreadPoolExecutor(1)
        try:
            pool.submit(self.compute.sql, sql).result(60)
        finally:
            pool.shutdown(wait=False)  # a hung commit ends with the compute, at teardown
        return Lsn.parse(str(self.compute.sql("SELECT pg_current_wal_insert_lsn()")[0][0]))

    def check_log(self) -> None:
        text = self.sk.log_text()
        assert "Traceback" not in text, text
        bad = [line for line in text.splitlines() if " ERROR " in line]
        assert not bad, bad


@pytest.fixture
def rig(env: Env, loop: LoopThread, test_dir: Path) -> Iterator[Rig]:
    r = Rig(env, loop, test_dir)
    yield r
    loop.call(r.p1.close())
    r.sk.kill9()


async def _feedback_until(p: HandProposer, lsn: Lsn) -> AppendResponse:
    """Read the pull feedback on the proposer connection until it reports `lsn`."""
    while True:
        msg = await p.recv()
        assert isinstance(msg, AppendResponse) and msg.term == 1 and msg.log_term == 1, msg
        if msg.last_record_end >= lsn:
            return msg


async def _walsender_wal(sk: SafekeeperProcess, tenant: TenantId, timeline: TimelineId,
                         start: Lsn, upto: Lsn) -> bytes:
    conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="pageserver",
                                      replication="true")
    try:
        stream = await conn.start_copy_both(f"START_REPLICATION PHYSICAL {start} {tenant} "
                                            f"{timeline}")
        data = b""
        async with asyncio.timeout(30):
            while start + len(data) < upto:
                payload = await stream.read()
                assert payload is not None
                msg = wire.decode_replication(payload)
                if isinstance(msg, wire.XLogData):
                    assert msg.start_lsn == start.value + len(data)
                    data += msg.data
        return data
    finally:
        conn.abort()


def test_commits_wait_for_the_pull_and_the_commit_lsn_follows(rig: Rig,
                                                              loop: LoopThread) -> None:
    end = rig.commit("CREATE TABLE t (id int primary key, v text)")
    for i in range(20):
        end = rig.commit(f"INSERT INTO t VALUES ({i}, repeat('x', 300))")
    # Synchronous commit to `sk1` returned: the safekeeper flushed the commit record, and
    # PostgreSQL saw its flush position (only a trailing non-commit record may be missing).
    assert rig.sk_flush() >= end - 200, (rig.sk_flush(), end)
    wait_until(lambda: [Lsn.parse(r[2]) >= end - 200 for r in rig.replication()
                        if r[2] is not None] == [True], 30, "pg_stat_replication")
    name, sync_state, _ = rig.replication()[0]
    assert (name, sync_state) == (SLOT, "sync")
    # The pull feedback reached the proposer that sent PullFrom.
    fb = loop.call(_feedback_until(rig.p1, rig.sk_flush()))
    assert fb.flush_lsn >= end - 200
    status = rig.status()
    assert status["pull"]["connected"] and status["pull"]["slot_name"] == SLOT
    assert status["commit_lsn"] == str(rig.x), "no commit LSN learned from pulling alone"

    # A commit-only append (design point 5) moves the commit LSN, durably, and the
    # walsender then serves the pulled WAL: one chain of PostgreSQL's records from X.
    commit = fb.last_record_end
    loop.call(rig.p1.send(AppendRequest(1, commit, commit, b"", persist_commit=True)))

    async def commit_reply() -> AppendResponse:
        while True:  # pull feedback may come first
            msg = await rig.p1.recv()
            assert isinstance(msg, AppendResponse) and msg.term == 1, msg
            if msg.commit_lsn == commit:
                return msg
    loop.call(commit_reply())
    status = rig.status()
    assert status["commit_lsn"] == status["durable_commit_lsn"] == str(commit), status
    data = loop.call(_walsender_wal(rig.sk, rig.tenant, rig.timeline, rig.x, commit))
    decoder = WalStreamDecoder(rig.x, SEG, at_record_start=True)
    decoder.feed(data)
    records = list(decoder)
    assert records[0].lsn == rig.x.value and records[0].prev == rig.prev.value
    assert records[-1].end_lsn == commit.value and len(records) > 20

    # The replication connection dropped (the walsender killed): the safekeeper reconnects.
    rig.compute.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
    end = rig.commit("INSERT INTO t VALUES (100, 'after the drop')")
    assert rig.sk_flush() >= end - 200
    wait_until(lambda: rig.status()["pull"]["connections"] >= 2, 30, "a second connection")

    # The primary restarted: the safekeeper reconnects and resumes at its flush LSN.
    rig.compute.stop()
    rig.compute.start()
    end = rig.commit("INSERT INTO t VALUES (101, 'after a restart')")
    assert rig.sk_flush() >= end - 200
    assert rig.status()["pull"]["connections"] >= 3
    rig.check_log()


def test_a_pull_with_a_compute_id_refuses_another_compute_on_its_address(
        env: Env, loop: LoopThread, test_dir: Path) -> None:
    """Told to pull from compute "first" (`PullFrom.compute_id`), the safekeeper streams
    from it and reconnects to it, but not to a compute with another `strata.compute_id` on
    the same address (a restart as another compute, whose WAL is a later term's): commits
    there wait, its slot does not move, and the safekeeper says why."""
    rig = Rig(env, loop, test_dir, compute_id="first")
    try:
        rig.commit("CREATE TABLE t (id int primary key, v text)")
        end = rig.commit("INSERT INTO t VALUES (1, 'first')")
        assert rig.sk_flush() >= end - 200
        rig.compute.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_replication")
        end = rig.commit("INSERT INTO t VALUES (2, 'first, reconnected')")
        assert rig.sk_flush() >= end - 200

        rig.compute.sql("ALTER SYSTEM SET strata.compute_id = 'second'")
        rig.compute.stop()
        rig.compute.start()
        slot = "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s"
        before = rig.compute.sql(slot, SLOT)
        flushed = rig.sk_flush()
        with pytest.raises(concurrent.futures.TimeoutError):
            pool = concurrent.futures.ThreadPoolExecutor(1)
            try:
                pool.submit(rig.compute.sql, "INSERT INTO t VALUES (3, 'second')").result(3)
            finally:
                pool.shutdown(wait=False)  # the hung commit ends with the compute
        wait_until(lambda: "not compute first" in rig.sk.log_text(), 30,
                   "the safekeeper's refusal in its log")
        assert rig.sk_flush() == flushed
        assert rig.compute.sql(slot, SLOT) == before
        # Its retries still connect now and then (a walsender in "startup" for a moment,
        # also right after the refusal is logged): none of them ever streams.
        assert rig.replication(streaming=True) == []
    finally:
        loop.call(rig.p1.close())
        rig.sk.kill9()


def test_pull_answers_go_at_most_once_per_interval_with_the_latest_position(
        env: Env, loop: LoopThread, test_dir: Path) -> None:
    """After pulled WAL the proposer gets an AppendResponse at most once per
    `--pull-answer-interval-ms` (here 500 ms), not one per fsync batch, and the last one
    carries the position of the last batch."""
    interval_s = 0.5
    rig = Rig(env, loop, test_dir, ["--pull-answer-interval-ms", str(interval_s * 1000)])
    try:
        t0 = time.monotonic()
        end = rig.commit("CREATE TABLE t (id int primary key, v text)")
        for i in range(20):  # synchronous commits: one fsync batch each at least
            end = rig.commit(f"INSERT INTO t VALUES ({i}, 'x')")
        flushed = rig.sk_flush()
        assert flushed >= end - 200, (flushed, end)
        pull = rig.status()["pull"]
        assert pull["batches"] >= 21, pull
        # The synchronous fast path (applied in the data callback) took part of them.
        assert 1 <= pull["fast_batches"] <= pull["batches"], pull

        async def answers_until_flushed() -> int:
            count = 0
            while True:
                msg = await rig.p1.recv()
                assert isinstance(msg, AppendResponse) and msg.term == 1, msg
                count += 1
                if msg.flush_lsn >= flushed:
                    return count
        count = loop.call(answers_until_flushed())
        elapsed = time.monotonic() - t0
        # Sent at least interval_s apart; one may have left just before t0 (a record
        # PostgreSQL wrote on its own).
        assert count <= elapsed / interval_s + 2, (count, elapsed)
        rig.check_log()
    finally:
        loop.call(rig.p1.close())
        rig.sk.kill9()


def test_a_higher_term_closes_the_pull_before_its_promise(rig: Rig, loop: LoopThread) -> None:
    rig.commit("CREATE TABLE t (id int primary key, v text)")
    end = rig.commit("INSERT INTO t VALUES (1, 'pulled')")
    assert rig.sk_flush() >= end - 200
    # Another proposer asks for term 2: the pull of term 1 is closed before the promise,
    # and the old proposer hears of the new term on its own connection.
    p2 = loop.call(HandProposer.connect(rig.sk, rig.tenant, rig.timeline))
    loop.call(p2.ask(ProposerGreeting(rig.tenant, rig.timeline, rig.system_id, SEG, 2)))
    vote = loop.call(p2.ask(VoteRequest(2, 2)))
    assert isinstance(vote, VoteResponse) and vote.granted, vote

    async def fenced() -> AppendResponse:
        while True:
            msg = await rig.p1.recv()
            assert isinstance(msg, AppendResponse), msg
            if msg.term > 1:
                return msg
    notice = loop.call(fenced())
    assert notice.term == 2
    assert rig.status()["pull"] is None
    wait_until(lambda: not rig.replication(), 30, "the walsender of sk1 to end")
    # PostgreSQL's commit now waits for a standby that is gone: it hangs.
    flushed = rig.sk_flush()
    conn = psycopg.connect(rig.compute.connstr(), autocommit=True)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(conn.execute, "INSERT INTO t VALUES (2, 'hangs')")
            with pytest.raises(concurrent.futures.TimeoutError):
                pending.result(3)
            assert rig.sk_flush() == flushed  # nothing more pulled
            assert not rig.replication()
            conn.cancel()  # the wait ends (the commit is local only: a WARNING)
            pending.result(30)
    finally:
        conn.close()
    # The old term's PullFrom is refused now (the reply names term 2), nothing restarts.
    reply = loop.call(rig.p1.ask(rig.pull_from(1)))
    assert isinstance(reply, AppendResponse) and reply.term == 2, reply
    assert rig.status()["pull"] is None
    loop.call(p2.close())
    rig.check_log()


def test_a_pull_limit_holds_commits_until_it_is_raised(rig: Rig, loop: LoopThread) -> None:
    rig.commit("CREATE TABLE t (id int primary key, v text)")
    end = rig.commit("INSERT INTO t VALUES (1, 'pulled')")
    held = rig.sk_flush()
    assert held >= end - 200
    loop.call(rig.p1.send(PullLimit(1, held)))  # the pageserver lags: hold at this point
    wait_until(lambda: rig.status()["pull"]["limit"] == str(held), 30, "the limit to apply")
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pending = pool.submit(rig.compute.sql, "INSERT INTO t VALUES (2, 'held')")
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(3)
        # The WAL still arrives and is fsynced (the proposer hears of it); only the
        # compute is told no more than the limit.
        wait_until(lambda: rig.sk_flush() > held, 30, "the held commit's WAL to be pulled")
        assert Lsn.parse(rig.replication()[0][2]) == held
        assert Lsn.parse(rig.status()["pull"]["reported_lsn"]) == held
        loop.call(rig.p1.send(PullLimit(1, Lsn(1 << 60))))  # caught up: release
        pending.result(60)
    finally:
        pool.shutdown(wait=False)
    end = rig.commit("INSERT INTO t VALUES (3, 'after')")
    assert Lsn.parse(rig.status()["pull"]["reported_lsn"]) >= end - 200
    rig.check_log()
