"""`Safekeeper`: the safekeeper's timelines and its PostgreSQL-protocol port (architecture D8).

Commands on the PG port (any user; docs/safekeeper.md):

- `proposer <tenant> <timeline>`: CopyBoth; each CopyData in either direction carries one
  message of `strata.safekeeper.messages` (the walproposer's quorum protocol). Messages are
  handled in order by the timeline's `Acceptor` (timeline.py); replies go back on the same
  connection once what they report is durable. A protocol error closes the connection.
- `START_REPLICATION PHYSICAL <lsn> <tenant> <timeline>`: a walsender. CopyBoth; it sends
  `XLogData` with committed WAL only (never past the commit LSN, so the receiver never sees a
  tail that a later term truncates) and reads `StandbyStatusUpdate` feedback: write / flush /
  apply = what the pageserver received / fsynced / made durable in its layers
  (disk-consistent). The apply position decides which segments can be removed.

`delete_timeline` (HTTP DELETE) ends the proposer and walsender streams of that timeline
with the NotFound error that names the deletion (the other timelines' connections are not
touched), waits for a message being applied to finish its fsyncs, closes its files and
removes its directory durably (timeline.py, `remove_timeline_dir`). Afterwards the timeline
is unknown, as if never created: it may be created afresh.

A timeline whose control file or durable WAL is damaged is refused with the reason (SQLSTATE
XX001 on this port, HTTP 500) while the other timelines are served; the quorum goes on
with the other safekeepers.

The work directory is owned by one process: `WorkdirLock` holds an exclusive `flock` on
`safekeeper.lock` (a second safekeeper on the same directory refuses to start) and
`safekeeper.id` remembers the node id the directory belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.common.auth import TokenVerifier
from strata.common.durable import write_atomic
from strata.common.errors import (
    CorruptionError,
    NotFound,
    ProtocolError,
    StrataError,
    Unavailable,
    UserError,
)
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import timeline_context
from strata.common.lsn import Lsn, check_segment_size
from strata.pg import wire
from strata.pg.pgserve import CopyBoth, CopyStream, PgProtocolServer, Reply, Session
from strata.remote.storage import open_remote_storage
from strata.safekeeper import wal_backup
from strata.safekeeper.acceptor import AcceptorState
from strata.safekeeper.messages import (
    AppendRequest,
    ProposerElected,
    ProposerGreeting,
    ProposerMessage,
    PullFrom,
    PullLimit,
    ReadWalRequest,
    VoteRequest,
    decode,
)
from strata.safekeeper.timeline import (
    PULL_ANSWER_INTERVAL_S,
    Peer,
    Timeline,
    directory_bytes,
    remove_leftover,
    remove_timeline_dir,
)

log = logging.getLogger(__name__)

LOCK_FILE = "safekeeper.lock"
ID_FILE = "safekeeper.id"
TENANTS_DIR = "tenants"
_BATCH_MAX = 64  # proposer messages handled (and fsynced) together
_PROPOSER_MESSAGES = (ProposerGreeting, VoteRequest, ProposerElected, AppendRequest,
                      ReadWalRequest, PullFrom, PullLimit)
_DELETE_WAIT_S = 10.0  # for the connections of a deleted timeline to end


def _decode_proposer(payload: bytes) -> ProposerMessage:
    msg = decode(payload)
    if not isinstance(msg, _PROPOSER_MESSAGES):
        raise ProtocolError(f"a proposer sent {type(msg).__name__}, which only a "
                            "safekeeper sends")
    return msg


class WorkdirLock:
    """An exclusive lock on a safekeeper work directory, held while the process lives."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"safekeeper work directory {self.path.parent} is in use by "
                            f"another safekeeper (pid {holder}); two safekeepers must never "
                            "share a directory: stop that one or choose another --workdir") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def check_node_id(workdir: Path, node_id: int) -> None:
    """The directory belongs to one node id for ever; refuse to run it as another."""
    path = workdir / ID_FILE
    if path.exists():
        recorded = path.read_text().strip()
        if recorded != str(node_id):
            raise UserError(f"safekeeper work directory {workdir} belongs to safekeeper "
                            f"{recorded}, not {node_id}; pass --id {recorded}")
        return
    write_atomic(path, f"{node_id}\n".encode())


@dataclass(frozen=True, slots=True)
class SafekeeperConfig:
    node_id: int
    workdir: Path
    host: str = "127.0.0.1"
    pg_port: int = 0
    wal_keep_bytes: int = 0  # kept below the removal horizon for lagging peers
    removal_interval_s: float = 1.0
    keepalive_interval_s: float = 5.0
    max_send_bytes: int = 128 << 10  # per XLogData
    send_gap_s: float = 0.01
    """A walsender sends less than max_send_bytes at most this often: commits that come
    faster go to the pageserver together (one message, fsync and status update there)."""
    auth_public_key: Path | None = None
    """Ed25519 public key (PEM) of the JWTs both ports require; None: no authentication."""
    remote_storage: str | None = None
    """Object storage URL (strata.remote.storage) for WAL offload (wal_backup.py); None:
    WAL is kept locally until the pageserver made it durable."""
    backup_interval_s: float = 1.0
    pull_user: str = "postgres"
    """Pull mode: the role a safekeeper replicates from a compute as (safekeeper/pull.py;
    the compute's pg_hba.conf must let it in for replication without a password)."""
    pull_answer_interval_s: float = PULL_ANSWER_INTERVAL_S
    """Pull mode: the `AppendResponse` to the proposer after pulled WAL goes at most this
    often, with the latest position (`Timeline.apply_pulled`); 0: one per fsync batch."""

    def __post_init__(self) -> None:
        if self.node_id <= 0:
            raise UserError(f"safekeeper id must be a positive integer, got {self.node_id}")
        if self.wal_keep_bytes < 0:
            raise UserError(f"wal_keep_bytes must be >= 0, got {self.wal_keep_bytes}")
        if self.pull_answer_interval_s < 0:
            raise UserError("the pull answer interval must be >= 0, got "
                            f"{self.pull_answer_interval_s * 1000:g} ms")


class Safekeeper:
    """The timelines of one safekeeper node and its PG-protocol server."""

    def __init__(self, config: SafekeeperConfig) -> None:
        self.config = config
        self.node_id = config.node_id
        self.tenants_dir = config.workdir / TENANTS_DIR
        self.timelines: dict[tuple[TenantId, TimelineId], Timeline] = {}
        self.broken: dict[tuple[TenantId, TimelineId], str] = {}  # refused, with the reason
        self.started_at = time.time()
        self.verifier = TokenVerifier.from_file(config.auth_public_key) \
            if config.auth_public_key is not None else None
        self.pg = PgProtocolServer(self.handle_query, host=config.host, port=config.pg_port,
                                   name=f"safekeeper {config.node_id}", verifier=self.verifier)
        self.remote = open_remote_storage(config.remote_storage) \
            if config.remote_storage is not None else None
        self._create_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn_ids = 0

    # --- lifecycle --------------------------------------------------------------------------
    def load(self) -> None:
        """Open every timeline in the work directory; damaged ones are kept out of service."""
        self.tenants_dir.mkdir(parents=True, exist_ok=True)
        for tenant_dir in sorted(self.tenants_dir.iterdir()):
            if not tenant_dir.is_dir():
                continue
            for tl_dir in sorted(tenant_dir.iterdir()):
                if remove_leftover(tl_dir):  # a creation or deletion that crashed
                    continue
                try:
                    key = (TenantId.parse(tenant_dir.name), TimelineId.parse(tl_dir.name))
                except UserError:
                    log.warning("ignoring %s: not a tenant/timeline directory", tl_dir)
                    continue
                with timeline_context(key[0], key[1]):
                    self._open(key, tl_dir)

    def _open(self, key: tuple[TenantId, TimelineId], directory: Path) -> None:
        try:
            tl = Timeline.open(directory, wal_keep_bytes=self.config.wal_keep_bytes)
            tl.remote = self.remote
            tl.pull_user = self.config.pull_user
            tl.pull_answer_interval_s = self.config.pull_answer_interval_s
            self.timelines[key] = tl
        except (CorruptionError, OSError) as err:
            log.error("timeline %s/%s will not be served: %s", key[0], key[1], err)
            self.broken[key] = str(err)

    async def start(self) -> None:
        await self.pg.start()
        self._tasks.append(asyncio.create_task(self._removal_loop(), name="wal-removal"))
        if self.remote is not None:
            self._tasks.append(asyncio.create_task(self._backup_loop(), name="wal-backup"))
        log.info("safekeeper %d serving %d timelines (%d refused) on port %d", self.node_id,
                 len(self.timelines), len(self.broken), self.pg.port)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.pg.stop(grace_s=1.0)
        for tl in self.timelines.values():
            async with tl.lock:  # let a message being applied finish its fsyncs
                tl.close()
        if self.remote is not None:
            self.remote.close()

    # --- timelines --------------------------------------------------------------------------
    def timeline_dir(self, tenant_id: TenantId, timeline_id: TimelineId) -> Path:
        return self.tenants_dir / str(tenant_id) / str(timeline_id)

    def get(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        key = (tenant_id, timeline_id)
        reason = self.broken.get(key)
        if reason is not None:
            raise CorruptionError(f"safekeeper {self.node_id} refuses timeline {timeline_id} "
                                  f"of tenant {tenant_id}: {reason}")
        tl = self.timelines.get(key)
        if tl is None:
            raise NotFound(f"timeline {timeline_id} of tenant {tenant_id} is not on "
                           f"safekeeper {self.node_id}; create it with POST "
                           f"/v1/tenant/{tenant_id}/timeline")
        return tl

    async def create_timeline(self, tenant_id: TenantId, timeline_id: TimelineId, *,
                              start_lsn: Lsn, prev_lsn: Lsn, system_id: int,
                              seg_size: int) -> tuple[Timeline, bool]:
        """Create a timeline for a new branch (D7); (timeline, False) if it already exists
        with the same parameters."""
        check_segment_size(seg_size)
        if not start_lsn.is_aligned(8) or not start_lsn:
            raise UserError(f"timeline start {start_lsn} is not a record end (8-aligned, > 0)")
        if prev_lsn >= start_lsn:
            raise UserError(f"previous record {prev_lsn} must be below the start {start_lsn}")
        state = AcceptorState.new_timeline(tenant_id, timeline_id, system_id, seg_size,
                                           start_lsn, prev_lsn)
        async with self._create_lock:
            key = (tenant_id, timeline_id)
            existing = self.timelines.get(key)
            if existing is None and key in self.broken:
                self.get(tenant_id, timeline_id)  # raises: refused
            if existing is not None:
                s = existing.state
                if (s.system_id, s.wal_seg_size, s.timeline_start_lsn,
                        s.timeline_start_prev_lsn) != (system_id, seg_size, start_lsn, prev_lsn):
                    raise UserError(f"timeline {timeline_id} exists on safekeeper "
                                    f"{self.node_id} with start {s.timeline_start_lsn}, "
                                    f"previous record {s.timeline_start_prev_lsn}, system "
                                    f"{s.system_id}, segment size {s.wal_seg_size}")
                return existing, False
            directory = self.timeline_dir(tenant_id, timeline_id)
            with timeline_context(tenant_id, timeline_id):
                tl = await asyncio.to_thread(Timeline.create, directory, state,
                                             wal_keep_bytes=self.config.wal_keep_bytes)
            tl.remote = self.remote
            tl.pull_user = self.config.pull_user
            tl.pull_answer_interval_s = self.config.pull_answer_interval_s
            self.timelines[key] = tl
            return tl, True

    async def delete_timeline(self, tenant_id: TenantId,
                              timeline_id: TimelineId) -> dict[str, Any]:
        """Delete a timeline (also a refused one): end its connections, remove its files
        durably. NotFound if it is not here (a second delete); Unavailable if removing the
        files failed (the timeline is then refused; deleting it again retries). Runs to the
        end even if the caller is cancelled (an HTTP client that went away)."""
        task = asyncio.create_task(self._delete(tenant_id, timeline_id))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)

    async def _delete(self, tenant_id: TenantId, timeline_id: TimelineId) -> dict[str, Any]:
        key = (tenant_id, timeline_id)
        async with self._create_lock:
            tl = self.timelines.get(key)
            if tl is None and key not in self.broken:
                raise NotFound(f"timeline {timeline_id} of tenant {tenant_id} is not on "
                               f"safekeeper {self.node_id} (never created, or deleted "
                               "already)")
            with timeline_context(tenant_id, timeline_id):
                connections = 0
                if tl is not None:
                    connections = await self._retire(tl)
                directory = self.timeline_dir(tenant_id, timeline_id)
                try:
                    if self.remote is not None:
                        await self._delete_remote_wal(tl, tenant_id, timeline_id)
                    freed = await asyncio.to_thread(directory_bytes, directory)
                    await asyncio.to_thread(remove_timeline_dir, directory)
                except (OSError, StrataError) as err:
                    self.timelines.pop(key, None)
                    self.broken[key] = f"its deletion failed: {err}"
                    log.error("deleting timeline %s/%s failed: %s", tenant_id, timeline_id, err)
                    raise Unavailable(f"safekeeper {self.node_id} could not remove timeline "
                                      f"{timeline_id} of tenant {tenant_id} ({directory}): "
                                      f"{err}; fix the cause and delete it again") from err
                self.broken.pop(key, None)
                self.timelines.pop(key, None)
                log.info("deleted timeline %s/%s: %d connections closed, %d bytes freed",
                         tenant_id, timeline_id, connections, freed)
        return {"tenant_id": str(tenant_id), "timeline_id": str(timeline_id), "deleted": True,
                "connections_closed": connections, "freed_bytes": freed}

    async def _delete_remote_wal(self, tl: Timeline | None, tenant_id: TenantId,
                                 timeline_id: TimelineId) -> None:
        """Delete the timeline's offloaded WAL (after an upload in flight finished)."""
        assert self.remote is not None
        remote = self.remote
        prefix = wal_backup.timeline_prefix(tenant_id, timeline_id)

        def delete_all() -> int:
            keys = remote.list_keys(prefix)
            remote.delete_many(keys)
            return len(keys)

        async with tl.backup_lock if tl is not None else contextlib.nullcontext():
            deleted = await asyncio.to_thread(delete_all)
        log.info("deleted %d offloaded WAL segments of %s/%s", deleted, tenant_id, timeline_id)

    async def _retire(self, tl: Timeline) -> int:
        """Take `tl` out of service for good: its connections end with NotFound, a message
        being applied finishes, its files are closed. How many connections it had."""
        s = tl.state
        connections = len(tl.peers)
        tl.mark_deleted(f"timeline {s.timeline_id} of tenant {s.tenant_id} was deleted from "
                        f"safekeeper {self.node_id}")
        if tl.handlers:
            for work in tl.handlers:
                work.cancel()  # `_until_deleted` then ends its stream with the NotFound
            _, pending = await asyncio.wait(set(tl.handlers), timeout=_DELETE_WAIT_S)
            assert not pending, f"{len(pending)} connections of {s.timeline_id} did not end"
        async with tl.lock:  # a batch being applied finishes its fsyncs first
            tl.close()
        return connections

    # --- PG protocol ------------------------------------------------------------------------
    async def handle_query(self, session: Session, query: str) -> Reply:
        words = query.strip().rstrip(";").split()
        if len(words) == 3 and words[0].lower() == "proposer":
            session.check_tenant(words[1])  # the tenant's token or an admin token
            tl = self.get(TenantId.parse(words[1]), TimelineId.parse(words[2]))
            tl.check_usable()
            return CopyBoth(lambda stream: self._until_deleted(
                tl, self._proposer(tl, session, stream)))
        if len(words) == 5 and [w.upper() for w in words[:2]] == ["START_REPLICATION",
                                                                   "PHYSICAL"]:
            session.check_tenant(words[3])
            tl = self.get(TenantId.parse(words[3]), TimelineId.parse(words[4]))
            start = Lsn.parse(words[2])
            self._check_start(tl, start)
            return CopyBoth(lambda stream: self._until_deleted(
                tl, self._walsender(tl, start, session, stream)))
        raise UserError(f"safekeeper {self.node_id} does not understand {query!r}; commands: "
                        "`proposer <tenant> <timeline>`, `START_REPLICATION PHYSICAL <lsn> "
                        "<tenant> <timeline>`")

    @staticmethod
    async def _until_deleted(tl: Timeline, body: Coroutine[Any, Any, None]) -> None:
        """Run a connection's `body` until it ends or `tl` is deleted; then cancel it and
        end the stream with the NotFound that names the deletion."""
        work = asyncio.ensure_future(body)
        tl.handlers.add(work)
        gone = asyncio.ensure_future(tl.gone.wait())
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()  # deleted, or the server stops (this task is cancelled)
                await asyncio.wait([work])
            tl.handlers.discard(work)
        if work.cancelled():
            tl.check_usable()  # raises the NotFound of the deletion
        work.result()

    def _peer(self, tl: Timeline, kind: str, session: Session) -> tuple[int, Peer]:
        self._conn_ids += 1
        peer = Peer(kind, session.peer, session.parameters.get("application_name", ""))
        tl.peers[self._conn_ids] = peer
        return self._conn_ids, peer

    async def _proposer(self, tl: Timeline, session: Session, stream: CopyStream) -> None:
        """Handle a proposer's messages in order, read and applied in this one task (no
        queue or task switch per message). The messages that arrived while the previous
        batch was being made durable are handled as one batch (one WAL fsync), and its
        replies go out in one socket write."""
        conn_id, peer = self._peer(tl, "proposer", session)

        def reply_to(payload: bytes) -> None:  # pull feedback, from the puller's task
            stream.write_nowait(payload)

        try:
            with timeline_context(tl.state.tenant_id, tl.state.timeline_id):
                while (first := await stream.read()) is not None:
                    batch = [_decode_proposer(first)]
                    while len(batch) < _BATCH_MAX and \
                            (more := stream.next_buffered()) is not None:
                        batch.append(_decode_proposer(more))
                    for msg in batch:
                        if isinstance(msg, ProposerGreeting):
                            peer.proposer_id = msg.proposer_id
                    replies = await tl.handle_batch(batch, reply_to)
                    if replies:
                        await stream.write(*replies)
        except ProtocolError as err:
            log.info("closing proposer connection from %s: %s", session.peer, err)
            raise
        except ConnectionError as err:
            log.info("proposer connection from %s lost: %s", session.peer, err)
        finally:
            tl.forget_connection(reply_to)
            tl.peers.pop(conn_id, None)

    def _check_start(self, tl: Timeline, start: Lsn) -> None:
        if start < tl.state.timeline_start_lsn:
            raise UserError(f"timeline {tl.state.timeline_id} starts at "
                            f"{tl.state.timeline_start_lsn}; cannot stream from {start}")
        if start < tl.wal.wal_start_lsn and tl.remote is None:  # else: download (offload)
            raise NotFound(f"WAL from {start} was removed from safekeeper {self.node_id} "
                           f"(it holds WAL from {tl.wal.wal_start_lsn}); the pageserver "
                           "reported it durable already")

    async def _walsender(self, tl: Timeline, start: Lsn, session: Session,
                         stream: CopyStream) -> None:
        conn_id, peer = self._peer(tl, "walsender", session)
        peer.sent_lsn = start
        feedback = asyncio.create_task(self._read_feedback(tl, peer, stream))
        pos = start
        last_sent = time.monotonic()
        last_data = 0.0
        try:
            with timeline_context(tl.state.tenant_id, tl.state.timeline_id):
                log.info("walsender for %s (%s) from %s", session.peer,
                         peer.application_name, start)
                while not feedback.done():
                    gap = last_data + self.config.send_gap_s - time.monotonic()
                    if gap > 0 and 0 < tl.commit_lsn - pos < self.config.max_send_bytes:
                        await asyncio.sleep(gap)  # let more commits join this message
                    data = await tl.read_committed(pos, self.config.max_send_bytes)
                    now = time.monotonic()
                    if data:
                        msg = wire.XLogData(pos.value, tl.commit_lsn.value,
                                            wire.pg_timestamp(time.time()), data)
                        await stream.write(msg.encode())
                        pos += len(data)
                        peer.sent_lsn = pos
                        last_sent = last_data = now
                        continue
                    if now - last_sent >= self.config.keepalive_interval_s:
                        keepalive = wire.PrimaryKeepalive(pos.value,
                                                          wire.pg_timestamp(time.time()), False)
                        await stream.write(keepalive.encode())
                        last_sent = now
                    waiter = asyncio.create_task(tl.wait_commit_above(
                        pos, self.config.keepalive_interval_s))
                    await asyncio.wait([waiter, feedback], return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                feedback.result()  # a broken feedback stream ends the walsender with its error
        except ConnectionError as err:
            log.info("walsender connection from %s lost: %s", session.peer, err)
        finally:
            feedback.cancel()
            tl.peers.pop(conn_id, None)

    async def _read_feedback(self, tl: Timeline, peer: Peer, stream: CopyStream) -> None:
        while (payload := await stream.read()) is not None:
            msg = wire.decode_replication(payload)
            match msg:
                case wire.StandbyStatusUpdate(write_lsn=w, flush_lsn=f, apply_lsn=a):
                    peer.write_lsn, peer.flush_lsn, peer.apply_lsn = Lsn(w), Lsn(f), Lsn(a)
                    tl.on_feedback(peer)
                case wire.HotStandbyFeedback():
                    pass  # a read replica's xmin: nothing on a safekeeper depends on it
                case _:
                    raise ProtocolError(f"a walsender client sent {type(msg).__name__}")

    # --- background -------------------------------------------------------------------------
    async def _removal_loop(self) -> None:
        await self._every_timeline(self.config.removal_interval_s, Timeline.remove_old_wal,
                                   "WAL removal")

    async def _backup_loop(self) -> None:
        """Upload complete committed WAL segments of every timeline (wal_backup.py)."""
        await self._every_timeline(self.config.backup_interval_s, Timeline.backup_wal,
                                   "WAL upload")

    async def _every_timeline(self, interval_s: float,
                              work: Callable[[Timeline], Awaitable[int]], what: str) -> None:
        """Run `work` on every timeline every `interval_s` seconds; a failure is logged
        and the next pass tries again."""
        while True:
            await asyncio.sleep(interval_s)
            for tl in list(self.timelines.values()):
                try:
                    with timeline_context(tl.state.tenant_id, tl.state.timeline_id):
                        await work(tl)
                except Unavailable as err:
                    log.warning("%s failed: %s", what, err)  # passes go on
                except (StrataError, OSError) as err:
                    log.error("%s failed: %s", what, err)
