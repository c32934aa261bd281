"""The walproposer sidecar in pull mode against a real PostgreSQL 15 compute (a pageserver
basebackup with slots sk1..sk3 at X, `synchronous_standby_names = 'ANY 2 (sk1, sk2, sk3)'`)
and three in-process stub safekeepers (the real Acceptor with `allow_pull`) whose pull
client is a small test driver (the real one is the safekeeper's, docs/safekeeper-protocol.md).

Proves the compute side: the sidecar elects itself, tells each stub to pull from X on its
own slot (`PullFrom`), streams nothing itself, and the stubs' feedback moves the quorum's
commit LSN, which reaches them in commit-only appends; PostgreSQL releases a commit once
two stubs flushed it; with two stubs gone a commit waits (reads go on, the compute is not
stopped) and returns once one is back (re-told to pull after its restart); a newer
proposer (sync) closes the stubs' streams and fences the sidecar, which stops PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from fixtures_env import COMPUTE_SETTINGS, Env, LoopThread
from stub_rig import SLOTS, StubRig, basebackup_compute, current_lsn

from polling import wait_until
from strata.common.errors import StrataError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import ComputeConfig
from strata.compute.quorum import QuorumConfig, SafekeeperAddr
from strata.compute.safekeeper_sync import sync_safekeepers
from strata.compute.walproposer import (
    SidecarConfig,
    WalProposer,
)
from strata.pg import wire
from strata.pg.pgclient import PgConnection
from strata.pg.pgserve import CopyBoth, CopyStream, PgProtocolServer, Reply, Session
from strata.safekeeper.acceptor import (
    Acceptor,
    AcceptorAction,
    AcceptorState,
    ClosePull,
    FlushWal,
    PersistControl,
    PullFeedback,
    SendWal,
    StartPull,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import (
    AppendRequest,
    PullFrom,
    ReadWalResponse,
    decode,
    encode,
)
from strata.safekeeper.proposer import pull_slot_name


@dataclass
class PullStub:
    """An in-process safekeeper with the acceptor core (allow_pull), "durable" state in
    memory (stop + start = a restart that forgets the pull source), and a test pull client:
    each XLogData -> pulled_wal -> written; after each batch one standby status update to
    the compute and one AppendResponse to the proposer connection that sent PullFrom."""

    node_id: int
    tenant_id: TenantId
    timeline_id: TimelineId
    system_id: int
    start_lsn: Lsn
    prev_lsn: Lsn
    state: AcceptorState | None = None
    wal: bytearray = field(default_factory=bytearray)
    server: PgProtocolServer | None = None
    port: int = 0
    acceptor: Acceptor | None = None
    proposer: CopyStream | None = None  # the connection of the last PullFrom
    pull_task: asyncio.Task[None] | None = None
    pulls: int = 0  # StartPull actions executed
    commit_only: list[Lsn] = field(default_factory=list)  # commit LSNs of empty appends

    @property
    def end_lsn(self) -> Lsn:
        return self.start_lsn + len(self.wal)

    async def start(self) -> None:
        if self.state is None:
            self.state = AcceptorState.new_timeline(self.tenant_id, self.timeline_id,
                                                    self.system_id, 16 << 20,
                                                    self.start_lsn, self.prev_lsn)
        self.acceptor = Acceptor(self.state, allow_pull=True)
        self.acceptor.recover_wal(bytes(self.wal[self.state.scan_lsn - self.start_lsn:]))
        self.server = PgProtocolServer(self._handle, port=self.port)
        await self.server.start()
        self.port = self.server.port

    async def stop(self) -> None:
        await self._close_pull()
        if self.server is not None:
            await self.server.stop(grace_s=0.1)
            self.server = None

    async def _close_pull(self) -> None:
        task, self.pull_task = self.pull_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, StrataError, OSError):
                await task

    async def _handle(self, session: Session, query: str) -> Reply:
        assert query == f"proposer {self.tenant_id} {self.timeline_id}", query
        return CopyBoth(self._serve)

    async def _serve(self, stream: CopyStream) -> None:
        while (payload := await stream.read()) is not None:
            assert self.acceptor is not None
            msg = decode(payload)
            if isinstance(msg, AppendRequest) and not msg.data:
                self.commit_only.append(msg.commit_lsn)
            actions = self.acceptor.handle(msg)  # type: ignore[arg-type]
            if isinstance(msg, PullFrom):
                self.proposer = stream  # its feedback goes here from now on
            await self._execute(actions, stream)

    async def _execute(self, actions: list[AcceptorAction], stream: CopyStream | None,
                       replication: Any = None) -> None:
        for action in actions:
            match action:
                case PersistControl(state=state):
                    self.state = state
                case WriteWal(lsn=lsn, data=data):
                    assert lsn == self.end_lsn, (lsn, self.end_lsn)
                    self.wal += data
                case FlushWal():
                    pass
                case TruncateWal(lsn=lsn):
                    del self.wal[lsn - self.start_lsn:]
                case SendWal(term=term, start_lsn=s, end_lsn=e):
                    data = bytes(self.wal[s - self.start_lsn:e - self.start_lsn])
                    assert stream is not None
                    await stream.write(encode(ReadWalResponse(term, s, data)))
                case StartPull():
                    self.pulls += 1
                    self.pull_task = asyncio.create_task(self._pull(action))
                case ClosePull():
                    # Same event loop, before the promise's PersistControl is "durable".
                    await self._close_pull()
                case PullFeedback(flush_lsn=flush):
                    if replication is not None:
                        now = wire.pg_timestamp(time.time())
                        await replication.send(wire.StandbyStatusUpdate(
                            flush.value, flush.value, flush.value, now).encode())
                case _:
                    if stream is not None:
                        await stream.write(encode(action))

    async def _pull(self, start: StartPull) -> None:
        source = start.source
        conn = await PgConnection.connect(source.host, source.port, user="postgres",
                                          replication="true",
                                          application_name=source.slot_name, timeout_s=10)
        try:
            assert self.acceptor is not None
            repl = await conn.start_copy_both(f"START_REPLICATION SLOT {source.slot_name} "
                                              f"PHYSICAL {self.acceptor.flush_lsn}")
            while (payload := await repl.read()) is not None:
                msg = wire.decode_replication(payload)
                if isinstance(msg, wire.XLogData):
                    actions = self.acceptor.pulled_wal(source.term, Lsn(msg.start_lsn),
                                                       msg.data)
                    await self._execute(actions, None, repl)
                    if self.proposer is not None:  # the feedback of pull-interface.md
                        with contextlib.suppress(StrataError, OSError):
                            await self.proposer.write(encode(
                                self.acceptor._append_response()))
                elif isinstance(msg, wire.PrimaryKeepalive) and msg.reply_requested:
                    flush = self.acceptor.flush_lsn.value
                    await repl.send(wire.StandbyStatusUpdate(
                        flush, flush, flush, wire.pg_timestamp(time.time())).encode())
        finally:
            conn.abort()


class PullRig(StubRig[PullStub]):
    """A compute at X with slots sk1..sk3 and ANY 2, three pulling stubs, a sidecar."""

    pull = True

    def make_stub(self, node_id: int) -> PullStub:
        return PullStub(node_id, self.tenant, self.timeline, self.system_id, self.x,
                        self.prev)


def test_pull_mode_commits_on_two_of_three_and_waits_without_a_majority(
        env: Env, loop: LoopThread) -> None:
    rig = PullRig(env, loop, "pull1")
    sidecar = rig.start_sidecar(quorum_warn_s=1.0)
    end = rig.write_rows()
    rows = rig.compute.sql("SELECT application_name, sync_state FROM pg_stat_replication "
                           "ORDER BY 1")
    # The sidecar has no walsender (it watches the compute on a plain session).
    assert rows == [(name, "quorum") for name in SLOTS], rows
    assert [sk.pulls for sk in rig.sks] == [1, 1, 1]
    # The sidecar streamed nothing: only commit-only appends came from it after X.
    assert sidecar.driver is not None and sidecar.driver.stats.appends == 0
    rig.stub_records()
    # The commit LSN reaches the safekeepers (coalesced commit-only appends).
    wait_until(lambda: all(sk.acceptor is not None and sk.acceptor.commit_lsn >= end - 200
                           for sk in rig.sks), 10, "the commit LSN on every safekeeper")
    assert len(rig.sks[0].commit_only) < 200  # coalesced: not one per record
    # Two of three gone: a commit waits, reads go on, the compute stays; one back
    # (restarted: it forgot its source; the sidecar tells it again) is a majority.
    rig.commit_waits_without_majority(back=(0,))
    assert rig.sks[0].pulls == 2


def test_pull_mode_sidecar_watches_the_compute_without_a_walsender(
        env: Env, loop: LoopThread) -> None:
    """In pull mode the sidecar watches the compute on a plain session, not on its
    replication connection (closed once the safekeepers pull): PostgreSQL wakes every
    walsender at every commit's WAL flush (`WalSndWakeup`), streaming or not, so an idle
    one cost a process wake-up per commit. The watch still notices a lost connection: its
    backend terminated, the sidecar connects again, and the compute is not fenced."""
    rig = PullRig(env, loop, "pullwatch")
    rig.start_sidecar(status_interval_s=0.1)
    rig.write_rows()

    def sidecar_sessions() -> list[tuple[int, str]]:
        return [(int(pid), str(kind)) for pid, kind in rig.compute.sql(
            "SELECT pid, backend_type FROM pg_stat_activity "
            "WHERE application_name = 'strata_walproposer'")]

    wait_until(lambda: [kind for _, kind in sidecar_sessions()] == ["client backend"], 10,
               "the sidecar's plain session as its only connection")
    walsenders = rig.compute.sql("SELECT application_name FROM pg_stat_replication "
                                 "ORDER BY 1")
    assert walsenders == [(name,) for name in SLOTS], walsenders
    [(pid, _)] = sidecar_sessions()
    rig.compute.sql("SELECT pg_terminate_backend(%s)", pid)
    wait_until(lambda: [(p != pid, kind) for p, kind in sidecar_sessions()]
               == [(True, "client backend")], 10, "the sidecar's new plain session")
    rig.compute.sql("INSERT INTO t VALUES (1000, 'after')")  # commits go on
    assert rig.fenced == []


def test_pull_mode_newer_proposer_stops_the_compute(env: Env, loop: LoopThread) -> None:
    rig = PullRig(env, loop, "pull2")
    rig.start_sidecar()
    rig.compute.sql("CREATE TABLE t (id int)")
    rig.compute.sql("INSERT INTO t VALUES (1)")
    acked = current_lsn(rig.compute)
    term = max(sk.state.term for sk in rig.sks if sk.state is not None)  # the sidecar's
    result = sync_safekeepers(rig.quorum(), rig.system_id, timeout_s=10)
    assert result.lsn >= acked - 200
    # The promise closed the stream (ClosePull) before it was made durable, on every stub
    # that promised the sync's term: a majority at least (the sync may return before the
    # third one answered, and that one may still pull in the old term).
    promised = [sk for sk in rig.sks if sk.state is not None and sk.state.term > term]
    assert len(promised) >= 2, [sk.state for sk in rig.sks]
    assert all(sk.pull_task is None for sk in promised)
    wait_until(lambda: not rig.compute.is_running(), 10, "the fenced compute to stop")
    assert rig.fenced and "another proposer" in rig.fenced[0]


def test_pull_mode_sidecar_refuses_a_compute_without_the_slots(
        env: Env, loop: LoopThread) -> None:
    """A compute from a push-mode basebackup (one walproposer slot) is refused."""
    tenant, timeline = env.client.create_tenant()
    x, _prev = env.client.compute_start(tenant, timeline)
    compute = basebackup_compute(env, tenant, timeline, x, "noslots", ComputeConfig(
        receiver_name=None, settings=COMPUTE_SETTINGS))
    compute.start()
    quorum = QuorumConfig(tenant, timeline, (SafekeeperAddr(1, "127.0.0.1", 1),),
                          connect_timeout_s=1)
    sidecar = WalProposer(quorum, SidecarConfig(pg_host="127.0.0.1", pg_port=compute.port,
                                                pull=True), on_fence=lambda _r: None)
    with pytest.raises(StrataError, match=f"no physical slot {pull_slot_name(1)}"):
        loop.call(sidecar.run())
