"""The walproposer sidecar: drives the quorum `Proposer` for one compute over real sockets.

Architecture D7. Two ways to run it, sharing the sans-IO `Proposer`:

* **sync** (`--sync`: `strata.compute.safekeeper_sync.sync_safekeepers`, blocking code that
  drives the same Proposer): a one-shot proposer that elects, recovers, makes
  the commit LSN durable on a majority at the agreed end X of the log, and returns X and the
  start of the record that ends there. The control plane then starts a compute from the
  pageserver at exactly X.
* **sidecar** (`WalProposer`, the default): PostgreSQL's only synchronous standby. It is a
  physical replication client of the local compute through the slot the basebackup made
  (restart_lsn X), elects itself, checks that the agreed end of the log is the slot's
  restart_lsn (the compute started where the quorum's log ends), streams from exactly there
  and hands each XLogData to the Proposer. It reports write = flush = apply = the quorum's
  commit LSN, so a commit returns only once a majority has it.

Backpressure: with a pageserver configured, the sidecar polls the timeline's
`last_record_lsn` (ingested) and `disk_consistent_lsn` and never reports an LSN more than
`max_write_lag_bytes` past the first (or `max_flush_lag_bytes` / `max_apply_lag_bytes`
past the second; there is no remote-consistent LSN yet, so apply uses it too). Commits then
wait, so a compute cannot outrun ingest without bound.

Fencing: only when the Proposer reports `Fenced` (a safekeeper knows a higher term: another
proposer took over) does the sidecar call `on_fence`, which stops its PostgreSQL at once (the
CLI sends SIGQUIT, PostgreSQL's immediate shutdown, to the postmaster it found at start), and
stop reporting. Losing the majority is not a reason: commits then wait in PostgreSQL's
synchronous-replication queue (reads go on), the links keep reconnecting, a warning is logged
every `quorum_warn_s`, and the waiting commits return as soon as a majority answers again.

Pull mode (`SidecarConfig.pull`, `--pull`; docs/walproposer.md): the sidecar still elects
itself and recovers the safekeepers up to the term start, then tells each one to replicate
the compute's WAL itself through its own slot `sk<id>` (`PullFrom`); PostgreSQL's
`synchronous_standby_names = 'ANY <majority> (sk1, ...)'` releases the commits. The sidecar
streams nothing and reports nothing to PostgreSQL: it keeps a plain session open (to notice
the compute is gone; not a replication connection, whose idle walsender every commit would
wake), turns the safekeepers' answers into the quorum's
commit LSN and sends that back to them in coalesced commit-only appends (at the tick), and
still stops the postmaster when a higher term fences it. Backpressure in pull mode: the
same limits past the pageserver's positions go to the safekeepers as `PullLimit` (they
report at most that LSN to PostgreSQL, so commits past it wait), raised as ingest moves;
until the pageserver's position is known they hold at the commit LSN of the election.

Safekeeper connections (the safekeeper's PG-protocol port, docs/safekeeper.md): a connection as user
`strata`, the command `proposer <tenant> <timeline>`, then one encoded
`strata.safekeeper.messages` message per CopyData in each direction. Every connection
starts with our greeting; a dropped connection is re-established with backoff, and the
Proposer's `tick` resends whatever got no answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from strata.common import eventloop
from strata.common.auth import default_token
from strata.common.errors import ProtocolError, StrataError, Unavailable, UserError
from strata.common.failpoint import FailpointHit, failpoint
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import setup_logging, timeline_context
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, Lsn
from strata.compute.quorum import (
    DEFAULT_APPLICATION_NAME,
    QuorumConfig,
    SafekeeperAddr,
    parse_safekeepers,
)
from strata.pageserver.api import DEFAULT_SLOT_NAME
from strata.pg import wire
from strata.pg.constants import SIZE_OF_XLOG_LONG_PHD, XLOG_BLCKSZ
from strata.pg.pgclient import CopyBothStream, PgConnection, ServerError
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AcceptorMessage,
    AppendRequest,
    AppendResponse,
    ProposerGreeting,
    ProposerMessage,
    ReadWalResponse,
    VoteResponse,
    decode,
    encode,
)
from strata.safekeeper.proposer import (
    CommitAdvanced,
    Elected,
    Fenced,
    Proposer,
    ProposerAction,
    ProposerConfig,
    PullTarget,
    Send,
    pull_slot_name,
)

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

EXIT_FENCED = 3  # the CLI's exit code when the sidecar was fenced
_TICK_S = 0.02
# Pull mode's tick: nothing on the commit path waits for it (the safekeepers tell
# PostgreSQL themselves); it only carries the commit LSN to the safekeepers (for their
# walsenders to the pageserver), retries and heartbeats (every `retry_interval_s`), so a
# longer one saves each of three safekeepers and the sidecar a wake-up per tick, under
# load and idle (docs/walproposer.md, "Where pull mode's time goes").
_PULL_TICK_S = 0.05
_STAGE_MAX_BYTES = 128 * 1024  # staged WAL goes out at once beyond this (one append's worth)
_COMMIT_ONLY_IDLE_S = 0.1  # held commit-only appends go once no WAL came for this long
_ACCEPTOR_MESSAGES = (AcceptorGreeting, VoteResponse, AppendResponse, ReadWalResponse)
_LINK_QUEUE_MAX = 4096  # messages; beyond this a dead link drops them (tick resends)
_ARRIVALS_MAX = 4096  # WAL pieces timed for CommitPathStats (the oldest are forgotten)


@dataclass(slots=True)
class CommitPathStats:
    """Where a commit's time goes inside the sidecar (bench/commit_path.py reads it):
    WAL from PostgreSQL until the quorum's commit LSN covers it (appends out, safekeepers'
    fsyncs, replies back), counted per piece of WAL received."""

    wal_pieces: int = 0  # XLogData payloads given to append_wal
    appends: int = 0  # appends with WAL sent (to all safekeepers together)
    quorum_waits: int = 0
    quorum_wait_s: float = 0.0  # summed over pieces: arrival -> commit LSN past their end

    def to_json(self) -> dict[str, float]:
        return {"wal_pieces": self.wal_pieces, "appends": self.appends,
                "quorum_wait_ms_avg": 1000 * self.quorum_wait_s / max(1, self.quorum_waits)}


# --- one safekeeper connection ------------------------------------------------------------
class _Link:
    """The connection to one safekeeper: (re)connects, writes messages straight into the
    socket's buffer (no writer task between the Proposer and the wire), and hands every
    message it receives to `on_message(node id, message)` as it is read.

    While the link is down, messages wait in a bounded queue and go out after the greeting
    of the next connection; beyond the bound they are dropped (the Proposer resends what
    gets no answer). What is in flight is bounded by the Proposer's window, so writing
    without waiting for the buffer to drain cannot grow it without bound."""

    def __init__(self, addr: SafekeeperAddr, config: QuorumConfig, greeting: bytes,
                 on_message: Callable[[int, AcceptorMessage], None],
                 on_connect: Callable[[int], None]) -> None:
        self.addr = addr
        self.on_connect = on_connect
        self.on_message = on_message
        self.config = config
        self.greeting = greeting
        self.waiting: deque[bytes] = deque(maxlen=_LINK_QUEUE_MAX)
        self.stream: CopyBothStream | None = None  # while connected and greeted
        self.connected = False
        self.connections = 0
        self.last_error: str | None = None

    def send(self, msg: bytes) -> None:
        if self.stream is None or not self.stream.send_nowait(msg):
            self.waiting.append(msg)  # the oldest is dropped when full

    async def run(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self._session()
            except (StrataError, OSError) as err:
                if self.connected or self.last_error != str(err):
                    log.info("safekeeper %d at %s:%d: %s; reconnecting", self.addr.node_id,
                             self.addr.host, self.addr.port, err)
                self.last_error = str(err)
            if self.connected:
                backoff = 0.05
            self.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max_s)

    async def _session(self) -> None:
        cfg = self.config
        conn = await PgConnection.connect(self.addr.host, self.addr.port, user=cfg.user,
                                          password=default_token(),
                                          application_name=DEFAULT_APPLICATION_NAME,
                                          timeout_s=cfg.connect_timeout_s)
        try:
            async with asyncio.timeout(cfg.connect_timeout_s):
                stream = await conn.start_copy_both(f"proposer {cfg.tenant_id} "
                                                    f"{cfg.timeline_id}")
            self.connected = True
            self.connections += 1
            self.on_connect(self.addr.node_id)
            await stream.send(self.greeting)
            while self.waiting:
                stream.send_nowait(self.waiting.popleft())
            self.stream = stream
            while True:
                payload = await stream.read()
                if payload is None:
                    raise Unavailable("the safekeeper ended the proposer stream")
                self.on_message(self.addr.node_id, _decode_acceptor(payload))
        finally:
            self.stream = None
            conn.abort()


def _decode_acceptor(payload: bytes) -> AcceptorMessage:
    msg = decode(payload)
    if not isinstance(msg, _ACCEPTOR_MESSAGES):
        raise ProtocolError(f"a safekeeper sent a proposer message {type(msg).__name__}")
    return msg


# --- the driver ---------------------------------------------------------------------------
class QuorumDriver:
    """Runs one `Proposer` against the safekeepers: links, timer, and the actions' effects.

    Everything that touches the Proposer runs on the event loop without awaiting in between,
    so its calls never interleave.
    """

    def __init__(self, config: QuorumConfig, system_id: int, *,
                 quorum_warn_s: float = 10.0,
                 on_commit: Callable[[Lsn], None] | None = None,
                 pull: PullTarget | None = None) -> None:
        self.config = config
        self.quorum_warn_s = quorum_warn_s
        pconf = ProposerConfig(
            tenant_id=config.tenant_id, timeline_id=config.timeline_id, system_id=system_id,
            wal_seg_size=config.wal_seg_size, proposer_id=config.proposer_id,
            acceptors=tuple(a.node_id for a in config.safekeepers),
            retry_interval_s=config.retry_interval_s, pull=pull)
        self.proposer = Proposer(pconf, random.Random(config.proposer_id))
        greeting = encode(ProposerGreeting(config.tenant_id, config.timeline_id, system_id,
                                           config.wal_seg_size, config.proposer_id))
        self.links = {a.node_id: _Link(a, config, greeting, self._on_message,
                                    self._on_connect)
                      for a in config.safekeepers}
        self._on_commit = on_commit
        self.elected: Elected | None = None
        self.elected_event = asyncio.Event()
        self.fenced: str | None = None
        self.done = asyncio.Event()  # fenced
        self.commit_lsn = Lsn(0)
        self._last_heard: dict[int, float] = {}
        self._started_s = 0.0
        self._warned_s: float | None = None  # the last "no majority" warning
        self._tasks: list[asyncio.Task[None]] = []
        self._staged = bytearray()  # WAL not yet given to the Proposer (append_wal)
        # Per node, the ends of the appends with WAL it has not acknowledged yet, and a
        # commit-only append held back meanwhile (see _send).
        self._inflight: dict[int, deque[Lsn]] = {n: deque() for n in self.links}
        self._held_commit: dict[int, bytes] = {}
        self._last_wal_s = float("-inf")  # when append_wal was last given WAL
        # How the driver spares the safekeepers (attributes, so bench/commit_ab.py can
        # compare with and without on one running cluster).
        self.defer_slowest = config.defer_slowest and pull is None
        self.commit_only_idle_s = _COMMIT_ONLY_IDLE_S
        self.tick_s = _TICK_S if pull is None else _PULL_TICK_S
        # Pull mode: the tick's commit-only appends spread over the tick, one safekeeper at
        # a time (`_release_held_commits`).
        self.stagger_commits = pull is not None
        # The last message encoded and its bytes: the same append goes to every node.
        self._encoded: tuple[ProposerMessage | None, bytes] = (None, b"")
        self.stats = CommitPathStats()
        self._arrivals: deque[tuple[Lsn, float]] = deque(maxlen=_ARRIVALS_MAX)

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        now = time.monotonic()
        self._started_s = now
        for node, link in self.links.items():
            self._tasks.append(asyncio.create_task(link.run(), name=f"sk{node}"))
        self._apply(self.proposer.start(now))
        self._tasks.append(asyncio.create_task(self._loop(), name="proposer"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def append_wal(self, data: bytes) -> None:
        """WAL from PostgreSQL. Group commit: while a majority of safekeepers is busy with
        appends (each one is an fsync there, done one after another), new WAL is staged and
        goes out as one append when a majority is free again, so that commits arriving
        during an fsync share the next one instead of queueing for one each."""
        if self.fenced is None:
            self._staged += data
            self.stats.wal_pieces += 1
            now = time.monotonic()
            self._last_wal_s = now
            self._arrivals.append((self.end_lsn, now))
            self._flush_staged(force=False)

    def _flush_staged(self, *, force: bool) -> None:
        if not self._staged or self.fenced is not None:
            return
        deferred = self.proposer.deferred
        idle = sum(1 for n, q in self._inflight.items() if not q and n != deferred)
        if force or idle >= self.config.quorum or len(self._staged) >= _STAGE_MAX_BYTES:
            data = bytes(self._staged)
            self._staged.clear()
            self.stats.appends += 1
            self._apply(self.proposer.append_wal(time.monotonic(), data))

    @property
    def end_lsn(self) -> Lsn:
        """The end of the WAL given to us (some of it may still be staged)."""
        return self.proposer.end_lsn + len(self._staged)

    # --- messages and the timer -----------------------------------------------------------
    def _on_message(self, node: int, msg: AcceptorMessage) -> None:
        """A safekeeper's message, handled as its link reads it (no queue, no task switch)."""
        if self.done.is_set():
            return
        now = time.monotonic()
        self._last_heard[node] = now
        inflight = self._inflight[node]
        if isinstance(msg, AppendResponse):
            while inflight and inflight[0] <= msg.flush_lsn:
                inflight.popleft()
        try:
            self._apply(self.proposer.handle(now, node, msg))
        except ProtocolError as err:
            # A safekeeper broke the protocol: we cannot trust our view of the quorum.
            self._fence(f"protocol error from a safekeeper: {err}")
            return
        self._flush_staged(force=False)

    async def _loop(self) -> None:
        """The timer: retries and heartbeats (`Proposer.tick`), staged WAL that waited a
        whole tick, and the no-majority warning. Nothing on the commit path waits for it."""
        while not self.done.is_set():
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            self._flush_staged(force=True)
            self._pick_deferred()
            self._apply(self.proposer.tick(now))
            # Held commit-only appends (the tick's own too: in pull mode every one comes
            # from it) go once the stream is idle: while commits keep coming (one
            # client's too) the next append carries the commit LSN anyway.
            if now - self._last_wal_s >= self.commit_only_idle_s:
                self._release_held_commits()
            self._check_quorum(now)

    def _release_held_commits(self) -> None:
        """Send the held commit-only appends. In pull mode (`stagger_commits`) the i-th
        safekeeper's goes i/n of a tick later (the latest commit LSN then), so that the
        safekeepers do not all wake for one at the same moment, next to a commit's own
        batch (docs/walproposer.md, "The commit latency tail")."""
        if not self.stagger_commits:
            for node in list(self._held_commit):
                self._release_held(node)
            return
        loop = asyncio.get_running_loop()
        step = self.tick_s / len(self.links)
        for i, node in enumerate(sorted(self.links)):
            if i == 0:
                self._release_held(node)
            else:
                loop.call_later(i * step, self._release_held, node)

    def _release_held(self, node: int) -> None:
        """Send `node` its held commit-only append, if any and nothing is in flight to it."""
        if self.done.is_set() or self._inflight[node]:
            return
        held = self._held_commit.pop(node, None)
        if held is not None:
            self.links[node].send(held)

    def _pick_deferred(self) -> None:
        """The safekeeper heard from least recently gets WAL only at the tick (see
        `Proposer.deferred`): with three, commits wait for the two quicker ones' fsyncs,
        and the third one's fsyncs (once per tick, not per commit) leave the shared disk
        to theirs. A safekeeper that stops answering so becomes the deferred one a tick
        later, and the others carry the commits."""
        if not self.defer_slowest or len(self.links) <= self.config.quorum:
            self.proposer.deferred = None
            return
        heard = self._last_heard
        self.proposer.deferred = min(self.links, key=lambda n: heard.get(n, float("-inf")))

    def _check_quorum(self, now: float) -> None:
        """Warn every `quorum_warn_s` while no majority answers (commits wait meanwhile);
        never fence for it: only a higher term does (see the module docstring)."""
        if self.fenced is not None or self.done.is_set():
            return
        window = self.quorum_warn_s
        if self.elected is None:
            lacking = now - self._started_s >= window
        else:
            heard = sum(1 for t in self._last_heard.values() if now - t <= window)
            lacking = heard < self.config.quorum
        if not lacking:
            if self._warned_s is not None:
                log.info("a majority of the safekeepers answers again; commits go on")
                self._warned_s = None
            return
        if self._warned_s is None or now - self._warned_s >= window:
            self._warned_s = now
            if self.elected is None:
                what = (f"no majority has elected us in {now - self._started_s:.0f}s (heard "
                        f"from safekeepers {sorted(self._last_heard)}")
            else:
                recent = sorted(n for n, t in self._last_heard.items() if now - t <= window)
                what = (f"only safekeepers {recent} answered in the last {window:g}s, fewer "
                        f"than a majority of {len(self.links)}")
            log.warning("%s; %s): commits wait until a majority is back", what,
                        self._link_errors() or "no connection errors")

    def _link_errors(self) -> str:
        return "; ".join(f"sk{n}: {link.last_error}" for n, link in self.links.items()
                         if not link.connected and link.last_error)

    def _apply(self, actions: list[ProposerAction]) -> None:
        for action in actions:
            match action:
                case Send(node=node, msg=msg):
                    self._send(node, msg)
                case Elected():
                    self.elected = action
                    log.info("elected in term %d: the log ends at %s (previous record %s)",
                             action.term, action.start_lsn, action.prev_record_lsn)
                    self.elected_event.set()
                case CommitAdvanced(commit_lsn=lsn):
                    self.commit_lsn = lsn
                    self._note_committed(lsn)
                    if self._on_commit is not None:
                        self._on_commit(lsn)
                case Fenced(term=term):
                    self._fence(f"a safekeeper knows term {term}, above our term "
                                f"{self.proposer.term}: another proposer took over")

    def _note_committed(self, lsn: Lsn) -> None:
        arrivals, stats = self._arrivals, self.stats
        if arrivals and arrivals[0][0] <= lsn:
            now = time.monotonic()
            while arrivals and arrivals[0][0] <= lsn:
                stats.quorum_wait_s += now - arrivals.popleft()[1]
                stats.quorum_waits += 1

    def start_pulling(self, compute_id: str = "") -> None:
        """Pull mode: the compute starts at the term start; let the safekeepers pull (from
        the compute whose `strata.compute_id` is `compute_id`, if not empty)."""
        if self.fenced is None:
            self._apply(self.proposer.start_pulling(time.monotonic(), compute_id))

    def limit_pull(self, lsn: Lsn) -> None:
        """Pull mode's backpressure (`Proposer.limit_pull`)."""
        if self.fenced is None:
            self._apply(self.proposer.limit_pull(time.monotonic(), lsn))

    def _on_connect(self, node: int) -> None:
        self._inflight[node].clear()  # what the old connection carried is lost or answered
        self._held_commit.pop(node, None)  # the Proposer's heartbeat resends the commit

    def _send(self, node: int, msg: ProposerMessage) -> None:
        """Send at once (into the link's socket buffer), except a commit-only append: it is
        held until the next tick (at most `tick_s`; longer while that node still has
        appends with WAL to answer), and dropped when an append with WAL goes first, since
        that carries a commit LSN at least as new (to the Proposer a dropped message is a
        lost one). While commits keep coming the commit LSN so rides on the next append
        instead of costing each safekeeper one more message (and answer, and wake-up) per
        commit; nothing waits for it but the safekeepers' walsenders (the pageserver), by
        one tick at most once the stream is idle. Commit-only appends cost no control-file
        write (the Proposer asks for one only when the stream is idle, and such an append
        goes at once)."""
        if isinstance(msg, AppendRequest):
            if msg.data:
                self._held_commit.pop(node, None)
                self._inflight[node].append(msg.end_lsn)
            elif not msg.persist_commit:
                self._held_commit[node] = self._encode(msg)
                return
        self.links[node].send(self._encode(msg))

    def _encode(self, msg: ProposerMessage) -> bytes:
        """`encode(msg)`, once for the copies of one message that go to every node."""
        last, data = self._encoded
        if last is None or last != msg:
            data = encode(msg)
            self._encoded = (msg, data)
        return data

    def _fence(self, reason: str) -> None:
        if self.fenced is None:
            log.warning("fenced: %s", reason)
            self.fenced = reason
            self.done.set()


# --- the sidecar ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """The compute side: where PostgreSQL is, and the limits on how far ingest may lag."""

    pg_host: str
    pg_port: int
    pg_user: str = "postgres"
    slot_name: str = DEFAULT_SLOT_NAME
    application_name: str = DEFAULT_APPLICATION_NAME
    quorum_warn_s: float = 10.0  # a warning this often while no majority answers
    status_interval_s: float = 1.0
    pg_reconnect_timeout_s: float = 10.0
    pageserver_http: tuple[str, int] | None = None  # backpressure source; None: off
    pageserver_file: str | None = None
    """A file with the pageserver's address (strata.compute.pageserver_address), re-read
    when it changes (a relocation; stat'ed at most every 0.2 s, and at once after a failed
    poll): it overrides `pageserver_http` from then on."""
    max_write_lag_bytes: int | None = 16 << 20
    max_flush_lag_bytes: int | None = None
    max_apply_lag_bytes: int | None = None
    lag_poll_interval_s: float = 0.05  # while ingest lags by half a limit or more
    lag_poll_relaxed_s: float = 0.5  # while it lags less (a commit passing half wakes it)
    system_id: int | None = None
    """The cluster's system id, if known: the election then runs while PostgreSQL starts
    (its IDENTIFY_SYSTEM must agree); None: it waits for PostgreSQL to tell it."""
    pg_connect_retry_s: float = 0.02
    """Between attempts to connect to a PostgreSQL that does not accept connections yet
    (it is started right before the sidecar: each attempt is one local connect)."""
    pull: bool = False
    """Pull mode (module docstring): the safekeepers replicate from `pg_host:pg_port`
    through slots `sk<id>` (`slot_name` is not used); the sidecar streams nothing."""

    def __post_init__(self) -> None:
        if self.quorum_warn_s <= 0:
            raise UserError(f"walproposer quorum_warn_s = {self.quorum_warn_s}: must be "
                            "positive")
        assert self.status_interval_s > 0, self.status_interval_s
        for name in ("max_write_lag_bytes", "max_flush_lag_bytes", "max_apply_lag_bytes"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"walproposer {name} = {value}: must be positive (or unset)")


class WalProposer:
    """The compute's synchronous standby that makes its WAL durable on the safekeepers.

    `run()` returns when fenced (after `on_fence`), and raises when PostgreSQL stays
    unreachable for `pg_reconnect_timeout_s` (the compute is gone) or its slot does not
    start where the quorum's log ends."""

    def __init__(self, quorum: QuorumConfig, sidecar: SidecarConfig, *,
                 on_fence: Callable[[str], None]) -> None:
        self.quorum = quorum
        self.config = sidecar
        self._on_fence = on_fence
        self.driver: QuorumDriver | None = None
        self.compute_id = ""  # pull mode: the compute's strata.compute_id (`_identify`)
        self.reported_lsn = Lsn(0)  # what PostgreSQL was last told (write = flush = apply)
        self.pageserver_lsns: tuple[Lsn, Lsn] | None = None  # (last_record, disk_consistent)
        self._report = asyncio.Event()  # wakes the report loop (backpressure, keepalives)
        self._poll_now = asyncio.Event()  # wakes a relaxed pageserver poll (lag past half)
        self._pg_stream: CopyBothStream | None = None  # replication from PostgreSQL
        self._last_report_s = -1.0
        self._pull_limit: Lsn | None = None  # pull mode: the last PullLimit sent
        self._held_s = 0.0  # closed periods with the report held below the commit LSN
        self._held_since: float | None = None

    # --- public ---------------------------------------------------------------------------
    async def run(self) -> str:
        """Serve until fenced; returns the reason."""
        with timeline_context(self.quorum.tenant_id, self.quorum.timeline_id):
            known = self.config.system_id
            # With the system id known, the election overlaps PostgreSQL's start.
            driver = self._start_driver(known) if known is not None else None
            try:
                failpoint("walproposer-connect-pg")  # tests: a sidecar slow or failing to start
                conn = await self._connect_pg()
                try:
                    system_id, slot_lsn = await self._identify(conn)
                    if driver is None:
                        driver = self._start_driver(system_id)
                    elif system_id != known:
                        raise UserError(f"the compute at {self.config.pg_host}:"
                                        f"{self.config.pg_port} has system id {system_id}, "
                                        f"not {known} as the sidecar was told")
                    return await self._serve(driver, conn, slot_lsn)
                finally:
                    conn.abort()
            finally:
                if driver is not None:
                    await driver.stop()

    def _start_driver(self, system_id: int) -> QuorumDriver:
        cfg = self.config
        driver = QuorumDriver(self.quorum, system_id,
                              quorum_warn_s=cfg.quorum_warn_s,
                              on_commit=lambda _lsn: self._report_now(),
                              pull=PullTarget(cfg.pg_host, cfg.pg_port) if cfg.pull else None)
        self.driver = driver
        driver.start()
        return driver

    # --- PostgreSQL side ------------------------------------------------------------------
    async def _connect_pg(self, *, replication: bool = True) -> PgConnection:
        """A connection to the compute, retried while it does not accept one yet. Not
        `replication`: a plain session, for which a refusal (ServerError: no such database,
        ...) is raised at once, since the caller has a way around it (`_connect_watch`)."""
        cfg = self.config
        deadline = time.monotonic() + cfg.pg_reconnect_timeout_s
        while True:
            try:
                return await PgConnection.connect(
                    cfg.pg_host, cfg.pg_port, user=cfg.pg_user,
                    replication="true" if replication else None,
                    application_name=cfg.application_name, timeout_s=5)
            except (StrataError, OSError) as err:
                if isinstance(err, ServerError) and not replication:
                    raise
                if time.monotonic() > deadline:
                    raise Unavailable(f"the compute at {cfg.pg_host}:{cfg.pg_port} is "
                                      f"unreachable for {cfg.pg_reconnect_timeout_s}s: "
                                      f"{err}") from err
                await asyncio.sleep(cfg.pg_connect_retry_s)

    async def _identify(self, conn: PgConnection) -> tuple[int, Lsn]:
        """The compute's system id and its slot's restart_lsn (where it started, D6)."""
        ident = await conn.simple_query("IDENTIFY_SYSTEM")
        row = dict(zip(ident.columns, ident.rows[0], strict=True))
        system_id = int(row["systemid"] or 0)
        names = ([pull_slot_name(a.node_id) for a in self.quorum.safekeepers]
                 if self.config.pull else [self.config.slot_name])
        starts = set()
        for name in names:
            slot = await conn.simple_query(f"READ_REPLICATION_SLOT {name}")
            info = dict(zip(slot.columns, slot.rows[0], strict=True)) if slot.rows else {}
            if info.get("slot_type") != "physical" or not info.get("restart_lsn"):
                raise UserError(f"the compute at {self.config.pg_host}:{self.config.pg_port} "
                                f"has no physical slot {name} with a restart_lsn ({info}); it "
                                "was not started from a Strata basebackup"
                                + (" with the pull-mode slots" if self.config.pull else ""))
            starts.add(Lsn.parse(str(info["restart_lsn"])))
        if len(starts) != 1:
            raise UserError(f"the compute's slots {names} start at different LSNs "
                            f"{sorted(starts)}; they must all be at its start")
        if self.config.pull:
            self.compute_id = await _compute_id(conn)
        return system_id, starts.pop()

    async def _serve(self, driver: QuorumDriver, conn: PgConnection, slot_lsn: Lsn) -> str:
        await _first_of(driver.elected_event.wait(), driver.done.wait())
        if driver.fenced is not None:
            return self._fence(driver.fenced)
        assert driver.elected is not None
        if driver.elected.start_lsn != slot_lsn:
            return self._fence(
                f"the safekeepers' log ends at {driver.elected.start_lsn} but the compute "
                f"started at {slot_lsn}: start a compute only after sync, at the LSN it "
                "printed")
        self.reported_lsn = driver.proposer.commit_lsn
        if self.config.pull:
            # The compute starts at E (checked above): the safekeepers may pull from it now
            # (PullFrom, sent by the Proposer, followed by the PullLimit set here), and they
            # take the WAL themselves.
            self._limit_now()
            driver.start_pulling(self.compute_id)
            tasks = [asyncio.create_task(self._watch_pg(conn), name="pg-watch")]
            if self.config.pageserver_http is not None:
                tasks.append(asyncio.create_task(self._limit_loop(), name="pull-limit"))
        else:
            tasks = [asyncio.create_task(self._stream_pg(driver, conn), name="pg-stream")]
        if self.config.pageserver_http is not None:
            tasks.append(asyncio.create_task(self._poll_pageserver(), name="ps-lag"))
        try:
            done_wait = asyncio.create_task(driver.done.wait())
            finished, _ = await asyncio.wait([done_wait, *tasks],
                                             return_when=asyncio.FIRST_COMPLETED)
            done_wait.cancel()
            for task in tasks:
                if task in finished:
                    task.result()  # an error of the PostgreSQL side ends the sidecar
            assert driver.fenced is not None
            return self._fence(driver.fenced)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)

    def _fence(self, reason: str) -> str:
        log.warning("stopping the compute: %s", reason)
        self._on_fence(reason)
        return reason

    async def _watch_pg(self, conn: PgConnection) -> None:
        """Pull mode: notice that the compute is gone (a query every status interval,
        reconnecting while PostgreSQL is reachable); `_connect_pg` raises once it stays
        unreachable. The replication connection of `_identify` is closed first and the
        watch runs on a plain session (`_connect_watch`): an idle walsender is woken by
        every commit (each WAL flush sets every walsender's latch, `WalSndWakeup` in
        walsender.c, whether it streams or not), one process wake-up per commit for
        nothing (docs/walproposer.md, "Commits per batch")."""
        conn.abort()
        watch: PgConnection | None = None
        try:
            watch, query = await self._connect_watch()
            while True:
                await asyncio.sleep(self.config.status_interval_s)
                try:
                    await watch.simple_query(query)
                    continue
                except (StrataError, OSError) as err:
                    log.info("the connection to the compute ended: %s", err)
                watch.abort()
                watch = None
                watch, query = await self._connect_watch()
        finally:
            if watch is not None:
                watch.abort()

    async def _connect_watch(self) -> tuple[PgConnection, str]:
        """The watch's connection and its query: a plain session (its backend sleeps through
        commits), or, if the compute refuses one (its user's database dropped, ...), a
        replication connection as before (woken by every commit, but still a watch)."""
        try:
            return await self._connect_pg(replication=False), "SELECT 1"
        except ServerError as err:
            log.info("watching the compute on a replication connection: a plain session "
                     "was refused (%s)", err)
            return await self._connect_pg(), "IDENTIFY_SYSTEM"

    async def _stream_pg(self, driver: QuorumDriver, conn: PgConnection) -> None:
        """Stream from the log's end, reconnecting while PostgreSQL is reachable."""
        while True:
            try:
                start = driver.end_lsn
                stream = await conn.start_copy_both(
                    f"START_REPLICATION SLOT {self.config.slot_name} PHYSICAL {start}")
                log.info("streaming from the compute at %s", start)
                reporter = asyncio.create_task(self._report_loop(stream))
                try:
                    await self._read_pg(driver, stream)
                finally:
                    reporter.cancel()
                    await asyncio.wait([reporter])
            except (StrataError, OSError) as err:
                log.info("replication from the compute ended: %s", err)
            conn.abort()
            conn = await self._connect_pg()

    async def _read_pg(self, driver: QuorumDriver, stream: CopyBothStream) -> None:
        while True:
            payload = await stream.read()
            if payload is None:
                raise Unavailable("the compute ended the replication stream")
            msg = wire.decode_replication(payload)
            match msg:
                case wire.XLogData(start_lsn=start, data=data):
                    if start != driver.end_lsn.value:
                        raise ProtocolError(f"XLogData at {Lsn(start)}, expected "
                                            f"{driver.end_lsn}: the stream has a gap")
                    cut = _record_cut(start, data)
                    if cut is not None and _cut_here():
                        # Test fault: forward the head of a record that spans pages, then
                        # nothing more, as if the compute died mid-record.
                        driver.append_wal(data[:cut])
                        log.warning("failpoint: dropped the WAL tail after %s", Lsn(start + cut))
                        await asyncio.Event().wait()
                    driver.append_wal(data)
                case wire.PrimaryKeepalive(reply_requested=requested):
                    if requested:
                        self._report.set()
                case _:
                    raise ProtocolError(f"unexpected {type(msg).__name__} from a walsender")

    # --- reports and backpressure ---------------------------------------------------------
    def allowed_lsn(self, commit_lsn: Lsn) -> Lsn:
        """The LSN to report: the commit LSN, held back while ingest lags too far."""
        cfg = self.config
        allowed = commit_lsn
        if cfg.pageserver_http is not None:
            if self.pageserver_lsns is None:
                return self.reported_lsn  # no word from the pageserver yet: hold
            ingested, durable = self.pageserver_lsns
            for base, limit in ((ingested, cfg.max_write_lag_bytes),
                                (durable, cfg.max_flush_lag_bytes),
                                (durable, cfg.max_apply_lag_bytes)):
                if limit is not None:
                    allowed = min(allowed, base + limit)
        return max(allowed, self.reported_lsn)  # never moves back

    def lag_is_small(self, commit_lsn: Lsn) -> bool:
        """Whether the commit LSN is less than half of every limit past the pageserver's
        last known positions: the poller may then relax (it cannot be held back soon)."""
        cfg = self.config
        if self.pageserver_lsns is None:
            return False
        ingested, durable = self.pageserver_lsns
        return all(commit_lsn - base < limit // 2
                   for base, limit in ((ingested, cfg.max_write_lag_bytes),
                                       (durable, cfg.max_flush_lag_bytes),
                                       (durable, cfg.max_apply_lag_bytes))
                   if limit is not None)

    @property
    def held_back_s(self) -> float:
        """How long backpressure has held the reports below the commit LSN, in total."""
        ongoing = 0.0 if self._held_since is None else time.monotonic() - self._held_since
        return self._held_s + ongoing

    def _note_held(self, now: float, *, held: bool) -> None:
        if held and self._held_since is None:
            self._held_since = now
        elif not held and self._held_since is not None:
            self._held_s += now - self._held_since
            self._held_since = None

    def pull_limit_lsn(self) -> Lsn | None:
        """Pull mode: the highest flush LSN the safekeepers may report to PostgreSQL: the
        lowest of the lag limits past the pageserver's positions (not capped by the commit
        LSN, which the sidecar learns after PostgreSQL does), never lower than before; the
        election's commit LSN while the pageserver's position is unknown (as push mode
        holds its reports); None without a pageserver or limits (nothing held)."""
        cfg = self.config
        limits = [(index, limit) for index, limit in ((0, cfg.max_write_lag_bytes),
                                                      (1, cfg.max_flush_lag_bytes),
                                                      (1, cfg.max_apply_lag_bytes))
                  if limit is not None]
        if cfg.pageserver_http is None or not limits:
            return None
        if self.pageserver_lsns is None:
            return self._pull_limit if self._pull_limit is not None else self.reported_lsn
        lsn = min(self.pageserver_lsns[index] + limit for index, limit in limits)
        return lsn if self._pull_limit is None else max(lsn, self._pull_limit)

    def _limit_now(self) -> None:
        """Pull mode's report: a higher `PullLimit` to the safekeepers once the pageserver
        moved (and a faster poll once the commit LSN passed half a limit)."""
        driver = self.driver
        if driver is None or driver.fenced is not None:
            return
        limit = self.pull_limit_lsn()
        if limit is None:
            return
        commit = driver.proposer.commit_lsn
        if not self._poll_now.is_set() and not self.lag_is_small(commit):
            self._poll_now.set()
        self._note_held(time.monotonic(), held=limit < commit)
        if limit != self._pull_limit:
            self._pull_limit = limit
            driver.limit_pull(limit)

    async def _limit_loop(self) -> None:
        """Pull mode: a new limit when the pageserver's position moved (`_report`)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.status_interval_s):
                    await self._report.wait()
            self._report.clear()
            self._limit_now()

    def _report_now(self, *, periodic: bool = False) -> None:
        """Tell PostgreSQL the LSN it may release commits up to, at once (called as the
        quorum's commit LSN advances, so a commit wakes without waiting for a timer); also
        every `status_interval_s` as a keepalive, with the LSN unchanged or not. In pull
        mode the safekeepers report: this only moves their `PullLimit` (`_limit_now`)."""
        if self.config.pull:
            self._limit_now()
            return
        driver, stream = self.driver, self._pg_stream
        if driver is None or stream is None or driver.fenced is not None:
            return  # never acknowledge anything after losing the term
        commit = driver.proposer.commit_lsn
        lsn = self.allowed_lsn(commit)
        if self.config.pageserver_http is not None and not self._poll_now.is_set() and \
                not self.lag_is_small(commit):
            self._poll_now.set()
        now = time.monotonic()
        self._note_held(now, held=lsn < commit)
        if lsn != self.reported_lsn or (periodic and now - self._last_report_s >=
                                        self.config.status_interval_s):
            update = wire.StandbyStatusUpdate(lsn.value, lsn.value, lsn.value,
                                              wire.pg_timestamp(time.time()))
            if stream.send_nowait(update.encode()):
                self.reported_lsn = lsn
                self._last_report_s = now

    async def _report_loop(self, stream: CopyBothStream) -> None:
        """Reports not driven by a commit: backpressure moved, PostgreSQL asked, keepalive."""
        self._pg_stream = stream
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.config.status_interval_s):
                        await self._report.wait()
                self._report.clear()
                self._report_now(periodic=True)
        finally:
            self._pg_stream = None

    async def _poll_pageserver(self) -> None:
        import aiohttp  # only when configured

        # One session for every poll (up to 20 a second while ingest lags): its kept-alive
        # connection saves a TCP connect and close per poll on both sides.
        async with aiohttp.ClientSession() as session:
            await self._poll_pageserver_with(session)

    async def _poll_pageserver_with(self, session: aiohttp.ClientSession) -> None:
        from strata.pageserver.client import AsyncPageserverClient  # only when configured

        assert self.config.pageserver_http is not None
        host, port = self.config.pageserver_http
        client = AsyncPageserverClient(host, port, 0, timeout_s=5, session=session)
        address = None
        if self.config.pageserver_file is not None:
            from strata.compute.pageserver_address import AddressFile

            address = AddressFile(self.config.pageserver_file)
        failed = False  # the last poll failed: look at the address file now
        while True:
            if address is not None and address.http(failed) != (client.host,
                                                                client.http_port):
                log.info("the pageserver moved to %s:%d: polling it", *address.http())
                client = AsyncPageserverClient(*address.http(), 0, timeout_s=5,
                                               session=session)
            failed = False
            try:
                info = await client.timeline(self.quorum.tenant_id, self.quorum.timeline_id,
                                             logical_size=False)
                lsns = (info.last_record_lsn, info.disk_consistent_lsn)
                if lsns != self.pageserver_lsns:
                    self.pageserver_lsns = lsns
                    self._report.set()
            except StrataError as err:
                failed = True
                log.info("pageserver position unknown (%s); holding reports at %s", err,
                         self.reported_lsn)
            # Poll often only while ingest lags by half a limit or more; otherwise every
            # lag_poll_relaxed_s, or as soon as a commit passes half (`_report_now`).
            self._poll_now.clear()
            driver = self.driver
            if driver is None or not self.lag_is_small(driver.proposer.commit_lsn):
                await asyncio.sleep(self.config.lag_poll_interval_s)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.lag_poll_relaxed_s):
                    await self._poll_now.wait()


async def _first_of(*aws: object) -> None:
    tasks = [asyncio.ensure_future(a) for a in aws]  # type: ignore[call-overload]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()


def _record_cut(start: int, data: bytes) -> int | None:
    """An offset in `data` inside a record continued from the previous page (a page header
    with more than 128 bytes of `xlp_rem_len`, xlog_internal.h), or None."""
    boundary = (start | (XLOG_BLCKSZ - 1)) + 1
    while boundary + SIZE_OF_XLOG_LONG_PHD <= start + len(data):
        off = boundary - start
        rem_len = int.from_bytes(data[off + 16:off + 20], "little")
        if rem_len > 128:
            return off + SIZE_OF_XLOG_LONG_PHD + 64
        boundary += XLOG_BLCKSZ
    return None


def _cut_here() -> bool:
    try:
        failpoint("walproposer-drop-tail")
    except FailpointHit:
        return True
    return False


# --- stopping PostgreSQL ---------------------------------------------------------------------
def postmaster_pid(datadir: Path) -> int:
    """The pid in `postmaster.pid` (its first line)."""
    try:
        return int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError) as err:
        raise UserError(f"no running PostgreSQL in {datadir} (postmaster.pid: {err})") from err


def immediate_stopper(pid: int) -> Callable[[str], None]:
    """A fence action: SIGQUIT to that postmaster, PostgreSQL's immediate shutdown (what
    `pg_ctl stop -m immediate` sends); no commit waiting for us returns success."""
    def stop(reason: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGQUIT)
            log.warning("sent SIGQUIT to postmaster %d: %s", pid, reason)
    return stop


async def _compute_id(conn: PgConnection) -> str:
    """The compute's `strata.compute_id` setting (`strata endpoint start` gives every start
    its own; the safekeepers then pull from that compute only), or "" if it has none."""
    try:
        rows = (await conn.simple_query("SHOW strata.compute_id")).rows
    except ServerError:  # unrecognized: a compute not started by `strata endpoint start`
        return ""
    return str(rows[0][0] or "") if rows else ""


# --- command line -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m strata.compute.walproposer",
                                description="Strata walproposer: sync mode or compute sidecar")
    p.add_argument("--tenant", required=True)
    p.add_argument("--timeline", required=True)
    p.add_argument("--safekeepers", required=True, help="ID@HOST:PORT,... (PG ports)")
    p.add_argument("--sync", action="store_true", help="one-shot sync; print the start LSN")
    p.add_argument("--system-id", type=int,
                   help="the cluster's system id (required by --sync; a sidecar given it "
                        "elects itself while PostgreSQL starts)")
    p.add_argument("--wal-seg-size", type=int, default=DEFAULT_WAL_SEGMENT_SIZE)
    p.add_argument("--timeout-s", type=float, default=30.0, help="sync: give up after this")
    p.add_argument("--pg-host", default="127.0.0.1",
                   help="the compute's address, or its unix socket directory (a path)")
    p.add_argument("--pg-port", type=int)
    p.add_argument("--pg-user", default="postgres")
    p.add_argument("--pgdata", type=Path, help="the compute's data directory (for fencing)")
    p.add_argument("--slot", default=DEFAULT_SLOT_NAME)
    p.add_argument("--application-name", default=DEFAULT_APPLICATION_NAME)
    p.add_argument("--quorum-warn-s", type=float, default=10.0,
                   help="while no majority of safekeepers answers, commits wait and a "
                        "warning is logged this often (only a higher term stops the compute)")
    p.add_argument("--postmaster-pid", type=int,
                   help="the compute's postmaster (default: from PGDATA/postmaster.pid)")
    p.add_argument("--pg-reconnect-timeout-s", type=float,
                   default=10.0,
                   help="give up when the compute does not accept connections for this long")
    p.add_argument("--pageserver-http", help="HOST:PORT of the pageserver (backpressure)")
    p.add_argument("--pageserver-file",
                   help="a JSON file with the pageserver's address, re-read when it changes "
                        "(a relocation; strata.compute.pageserver_address)")
    p.add_argument("--pull", action="store_true",
                   help="pull mode: the safekeepers replicate from --pg-host/--pg-port "
                        "through slots sk<id>, PostgreSQL's synchronous_standby_names = "
                        "'ANY <majority> (sk1, ...)' releases commits; with "
                        "--pageserver-http the lag limits go to the safekeepers (PullLimit)")
    p.add_argument("--max-write-lag-bytes", type=int, default=16 << 20)
    p.add_argument("--max-flush-lag-bytes", type=int)
    p.add_argument("--max-apply-lag-bytes", type=int)
    p.add_argument("--log-file")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging(logging.INFO, args.log_file)
    try:
        quorum = QuorumConfig(TenantId.parse(args.tenant), TimelineId.parse(args.timeline),
                              parse_safekeepers(args.safekeepers), wal_seg_size=args.wal_seg_size)
        if args.sync:
            if args.system_id is None:
                raise UserError("--sync needs --system-id (the cluster's pg_control value)")
            from strata.compute.safekeeper_sync import sync_safekeepers
            result = sync_safekeepers(quorum, args.system_id, args.timeout_s)
            print(result.to_json(), flush=True)
            return 0
        if args.pg_port is None or args.pgdata is None:
            raise UserError("the sidecar needs --pg-port and --pgdata")
        ps = None
        if args.pageserver_http:
            host, _, port = args.pageserver_http.rpartition(":")
            ps = (host or "127.0.0.1", int(port))
        sidecar = SidecarConfig(
            pg_host=args.pg_host, pg_port=args.pg_port, pg_user=args.pg_user,
            slot_name=args.slot, application_name=args.application_name,
            quorum_warn_s=args.quorum_warn_s, pageserver_http=ps,
            pageserver_file=args.pageserver_file,
            max_write_lag_bytes=args.max_write_lag_bytes,
            max_flush_lag_bytes=args.max_flush_lag_bytes,
            max_apply_lag_bytes=args.max_apply_lag_bytes,
            pg_reconnect_timeout_s=args.pg_reconnect_timeout_s, system_id=args.system_id,
            pull=args.pull)
        stopper = immediate_stopper(args.postmaster_pid or postmaster_pid(args.pgdata))
        reason = eventloop.run(WalProposer(quorum, sidecar, on_fence=stopper).run())
        print(json.dumps({"fenced": reason}), flush=True)
        return EXIT_FENCED
    except StrataError as err:
        log.error("walproposer: %s", err)
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
