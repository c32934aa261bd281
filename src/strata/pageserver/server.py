"""The pageserver process: the repository, every timeline's WAL path, and its two ports.

`python -m strata.pageserver --workdir DIR [-c key=value ...]`:

- takes `DIR/pageserver.lock` (flock): a second pageserver on the same directory
  would write the same files, so it is refused;
- loads the Repository and starts each timeline's `TimelineWal` (ingest resumes at
  disk_consistent_lsn; a compute recorded as attached is reconnected);
- serves the PostgreSQL-protocol port (`basebackup <tenant> <timeline> [lsn]
  [read_only]`, a CopyOut tar stream; `pagestream`, page_service.py) and the HTTP
  management port (http.py, with /metrics from metrics.py);
- runs timeline ticks, compaction and GC in the background (background.py);
- on SIGTERM/SIGINT stops the receivers, flushes every timeline and exits 0.

`Pageserver` is the in-process object the HTTP handlers call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from prometheus_client import Counter, Histogram

from strata.common.auth import TokenVerifier
from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import setup_logging, timeline_context
from strata.common.lsn import Lsn
from strata.common.proc import make_dir_for, service_user
from strata.pageserver import pagestream as ps
from strata.pageserver.api import DEFAULT_SLOT_NAME
from strata.pageserver.background import BackgroundWork, ReadGates
from strata.pageserver.config import PageserverConfig
from strata.pageserver.datadir import logical_size
from strata.pageserver.metrics import PageserverMetrics, TimelineState
from strata.pageserver.page_service import PageService, PageServiceConfig
from strata.pageserver.sk_receiver import SafekeeperEndpoint
from strata.pageserver.timeline_wal import ReceiverTarget, RecordApplier, TimelineWal
from strata.pg.pgserve import CopyOut, CopyStream, PgProtocolServer, Reply, Session
from strata.remote.download import remote_tenant_indexes, write_timelines
from strata.remote.generations import claim_generation, delete_markers, read_generation
from strata.remote.storage import RemoteStorage, open_remote_storage
from strata.remote.timeline_client import RemoteTimelineClient, latest_index, stale_message
from strata.storage.compaction import CompactionResult
from strata.storage.gc import GcResult
from strata.storage.leases import Lease
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)

LOCK_FILE = "pageserver.lock"
PORTS_FILE = "pageserver.ports"  # "pg_port http_port", written once both listen
_CHUNK_BYTES = 256 * 1024
MAIN_TIMELINE = "main"


def make_applier(timeline: Timeline) -> RecordApplier:
    from strata.pageserver.ingest import WalIngest

    return WalIngest(timeline)


class Conflict(UserError):
    """The request contradicts the current state (answered with HTTP 409): an existing
    id, a timeline that still has branches, a limit reached."""


def stale_attach(tenant_id: TenantId, generation: int, newer: int) -> str:
    return (f"generation {generation} of tenant {tenant_id} is stale: object storage "
            f"records generation {newer}; attach with a newer one")


@dataclass(frozen=True, slots=True)
class StaleAttachment:
    """This pageserver's attachment of a tenant was superseded by a newer generation:
    it uploads and deletes nothing more, and serves reads from what it has."""

    generation: int  # this attachment's
    newer: int  # the newer generation found
    where: str  # "generation marker" or "index"
    since: float  # time.time()


class MeasuredPageService(PageService):
    """The page service with each request's latency and outcome in the metrics."""

    def __init__(self, lookup: Callable[[TenantId, TimelineId], Timeline],
                 config: PageServiceConfig, metrics: PageserverMetrics,
                 read_gates: ReadGates) -> None:
        super().__init__(lookup, config)
        self._metrics = metrics
        self._read_gates = read_gates
        # Labelled children per request type, looked up once (labels() costs ~2 us).
        self._children: dict[type, tuple[Histogram, Counter, Counter]] = {}

    async def serve(self, timeline: Timeline, request: ps.Request) -> ps.Response:
        started = time.perf_counter()
        async with self._read_gates(timeline.tenant_id).shared():
            response = await super().serve(timeline, request)
        elapsed = time.perf_counter() - started
        children = self._children.get(type(request))
        if children is None:
            kind = type(request).__name__.removesuffix("Request")
            children = (self._metrics.getpage_seconds.labels(kind),
                        self._metrics.page_requests.labels(kind, "ok"),
                        self._metrics.page_requests.labels(kind, "error"))
            self._children[type(request)] = children
        seconds, ok, failed = children
        seconds.observe(elapsed)
        (failed if isinstance(response, ps.ErrorResponse) else ok).inc()
        return response


class Pageserver:
    """All tenants of this pageserver and their WAL paths (one event loop)."""

    def __init__(self, config: PageserverConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.repo = Repository(config.workdir)
        self.wals: dict[tuple[TenantId, TimelineId], TimelineWal] = {}
        self.remote_storage: RemoteStorage | None = \
            open_remote_storage(config.remote_storage) if config.remote_storage else None
        self.uploads: dict[tuple[TenantId, TimelineId], RemoteTimelineClient] = {}
        self._evictor: asyncio.Task[None] | None = None
        self._generation_checker: asyncio.Task[None] | None = None
        self.stale: dict[TenantId, StaleAttachment] = {}
        self._stale_lock = threading.Lock()  # marked from upload worker threads too
        self._start_lsns: dict[tuple[TenantId, TimelineId], int] = {}
        self._logical_sizes: dict[tuple[TenantId, TimelineId], tuple[Lsn, int]] = {}
        self._create_lock = asyncio.Lock()
        self.metrics = PageserverMetrics(self._timeline_states)
        self.read_gates = ReadGates()  # reads vs GC (see background.ReadGate)
        self.page_service: PageService = MeasuredPageService(
            self.timeline, PageServiceConfig(wait_lsn_timeout_s=config.wait_lsn_timeout_s),
            self.metrics, self.read_gates)
        self.background = BackgroundWork(lambda: dict(self.repo.tenants), self.metrics,
                                         max_jobs=config.background_jobs,
                                         tick_period_s=config.tick_period_s,
                                         read_gates=self.read_gates)

    async def start(self) -> None:
        for tenant in self.repo.tenants.values():
            newer = await self._claim_generation(tenant.tenant_id, tenant.generation)
            for timeline in tenant.timelines.values():
                await self._start_remote(timeline)
                await self._start_wal(timeline)
            if newer is not None:
                self.mark_stale(tenant.tenant_id, newer, "generation marker")
        self.background.start()
        if self.config.local_cache_bytes:
            self._evictor = asyncio.create_task(self._evict_loop(), name="layer-eviction")
        if self.remote_storage is not None and self.config.generation_check_period_s:
            self._generation_checker = asyncio.create_task(self._generation_loop(),
                                                           name="generation-check")

    # --- generations ---------------------------------------------------------------------
    async def _claim_generation(self, tenant_id: TenantId, generation: int) -> int | None:
        """Raise the tenant's generation marker to `generation` before its indexes are
        read (remote/generations.py); the newer generation it names instead, if any."""
        storage = self.remote_storage
        if storage is None:
            return None
        with timeline_context(tenant_id):
            return await asyncio.to_thread(claim_generation, storage, tenant_id, generation)

    def mark_stale(self, tenant_id: TenantId, newer: int, where: str) -> None:
        """A newer generation holds the tenant: stop its uploads and deletions (every
        timeline), say so once. Any thread."""
        tenant = self.repo.tenants.get(tenant_id)
        if tenant is None:
            return
        with self._stale_lock:
            if tenant_id in self.stale:
                return
            self.stale[tenant_id] = StaleAttachment(tenant.generation, newer, where,
                                                    time.time())
        for (tid, _), client in list(self.uploads.items()):
            if tid == tenant_id:
                client.mark_stale()
        with timeline_context(tenant_id):
            log.warning(stale_message(tenant.generation, newer, where))

    async def _generation_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.generation_check_period_s)
            try:
                await asyncio.to_thread(self.check_generations)
            except StrataError as err:
                log.warning("generation check failed: %s", err)

    def check_generations(self) -> None:
        """Read the marker of every tenant not known to be stale yet (a thread)."""
        storage = self.remote_storage
        assert storage is not None
        for tenant_id, tenant in list(self.repo.tenants.items()):
            if tenant_id in self.stale:
                continue
            with timeline_context(tenant_id):
                marker = read_generation(storage, tenant_id)
            if marker is not None and marker > tenant.generation:
                self.mark_stale(tenant_id, marker, "generation marker")

    def _check_not_stale(self, tenant_id: TenantId, what: str) -> None:
        """Refuse to delete remote objects for an attachment a newer one superseded."""
        storage = self.remote_storage
        if storage is None:
            return
        stale = self.stale.get(tenant_id)
        newer = stale.newer if stale is not None else None
        if newer is None:
            marker = read_generation(storage, tenant_id)
            generation = self.tenant(tenant_id).generation
            newer = marker if marker is not None and marker > generation else None
        if newer is not None:
            raise Conflict(f"cannot delete {what}: generation {newer} of tenant {tenant_id} "
                           "was attached elsewhere, so its objects in remote storage are no "
                           "longer this pageserver's; detach the tenant here instead")

    async def _start_remote(self, timeline: Timeline) -> None:
        """Start uploading the timeline's files (no-op without remote storage)."""
        storage = self.remote_storage
        if storage is None:
            return
        tenant = self.tenant(timeline.tenant_id)
        tenant_id = timeline.tenant_id
        client = RemoteTimelineClient(
            storage, timeline.tenant_id, timeline.timeline_id, tenant.generation, timeline.dir,
            ranged_reads_before_download=self.config.ranged_reads_before_download,
            download_wait_s=self.config.download_wait_s,
            concurrent_downloads=self.config.concurrent_downloads,
            on_stale=lambda newer, where: self.mark_stale(tenant_id, newer, where))
        if tenant_id in self.stale:
            client.mark_stale()
        with timeline_context(timeline.tenant_id, timeline.timeline_id):
            index = await asyncio.to_thread(latest_index, storage, timeline.tenant_id,
                                            timeline.timeline_id, tenant.generation)
            if index is not None:
                remote_only = timeline.add_remote_layers(index.layer_descs())
                if remote_only:
                    log.info("%d layers are in remote storage only (read on demand)",
                             remote_only)
            client.start(timeline.metadata, timeline.layers(), index)
        timeline.remote = client
        self.uploads[(timeline.tenant_id, timeline.timeline_id)] = client

    async def _evict_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_period_s)
            try:
                await asyncio.to_thread(self.evict_layers)
            except StrataError as err:
                log.error("layer eviction failed: %s", err)

    def evict_layers(self) -> int:
        """Delete the local files of the least recently read layers (those remote storage
        holds) until the local layer bytes are within local_cache_bytes; returns the
        bytes freed."""
        limit = self.config.local_cache_bytes
        files = [(tick, size, timeline, desc)
                 for tenant in list(self.repo.tenants.values())
                 for timeline in list(tenant.timelines.values())
                 for desc, size, tick in timeline.local_layer_files()]
        total = sum(size for _, size, _, _ in files)
        freed = evicted = 0
        for _, size, timeline, desc in sorted(files, key=lambda f: f[0]):
            if total - freed <= limit:
                break
            if timeline.evict_layer(desc):
                freed += size
                evicted += 1
        if evicted:
            log.info("evicted %d layers (%d bytes); local layer files now %d bytes, limit "
                     "%d", evicted, freed, total - freed, limit)
        return freed

    def tenant_size(self, tenant_id: TenantId) -> dict[str, Any]:
        """Bytes of the tenant's layer files on local disk and uploaded to remote storage
        (None without remote storage), in all and per timeline. Stats files: a thread."""
        tenant = self.tenant(tenant_id)
        timelines = []
        for timeline_id in tenant.list_timelines():
            local = sum(size for _, size, _ in
                        tenant.get_timeline(timeline_id).local_layer_files())
            client = self.uploads.get((tenant_id, timeline_id))
            remote = client.remote_size_bytes() if client is not None else None
            timelines.append({"timeline_id": str(timeline_id), "local_bytes": local,
                              "remote_bytes": remote})
        has_remote = self.remote_storage is not None
        return {"tenant_id": str(tenant_id),
                "local_bytes": sum(t["local_bytes"] for t in timelines),
                "remote_bytes": sum(t["remote_bytes"] or 0 for t in timelines)
                if has_remote else None,
                "timelines": timelines}

    async def _stop_remote(self, tenant_id: TenantId, timeline_id: TimelineId, *,
                           delete: bool) -> None:
        client = self.uploads.pop((tenant_id, timeline_id), None)
        if client is None:
            return
        with timeline_context(tenant_id, timeline_id):
            await asyncio.to_thread(client.stop, 30.0, discard=delete)
            if delete:
                await asyncio.to_thread(client.delete_all)

    async def wait_uploaded(self, tenant_id: TenantId, timeline_id: TimelineId,
                            timeout_s: float) -> None:
        """Return once every change of the timeline so far is in remote storage."""
        client = self.uploads.get((tenant_id, timeline_id))
        if client is None:
            raise UserError("this pageserver has no remote storage configured; set "
                            "remote_storage in pageserver.toml")
        if not await asyncio.to_thread(client.wait_idle, timeout_s):
            raise Unavailable(f"uploads of timeline {timeline_id} not done after "
                              f"{timeout_s}s; is remote storage reachable?")

    async def _start_wal(self, timeline: Timeline) -> TimelineWal:
        wal = TimelineWal(timeline, make_applier, batch_bytes=self.config.ingest_batch_bytes)
        key = (timeline.tenant_id, timeline.timeline_id)
        self.wals[key] = wal
        self._start_lsns[key] = timeline.last_record_lsn.value
        await wal.start()
        return wal

    def _timeline_states(self) -> list[TimelineState]:
        states = []
        for key, wal in list(self.wals.items()):
            log_ = wal.wal_log
            states.append(TimelineState(wal.timeline,
                                        log_.flush_lsn.value if log_ is not None else None,
                                        self._start_lsns.get(key, 0)))
        return states

    async def stop(self) -> None:
        """Stop background work, receivers and ingest, then flush every timeline."""
        for task in (self._evictor, self._generation_checker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._evictor = self._generation_checker = None
        await self.background.stop()
        for (tenant_id, timeline_id), wal in self.wals.items():
            with timeline_context(tenant_id, timeline_id):
                try:
                    await wal.stop(flush=True)
                except StrataError as err:
                    log.error("could not flush at shutdown: %s", err)
        self.wals.clear()
        for tenant_id, timeline_id in list(self.uploads):
            await self._stop_remote(tenant_id, timeline_id, delete=False)
        self.repo.close()

    # --- lookups ----------------------------------------------------------------------
    def tenant(self, tenant_id: TenantId) -> Tenant:
        return self.repo.get_tenant(tenant_id)

    def timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        return self.tenant(tenant_id).get_timeline(timeline_id)

    def wal(self, tenant_id: TenantId, timeline_id: TimelineId) -> TimelineWal:
        self.timeline(tenant_id, timeline_id)  # NotFound with the usual message
        return self.wals[(tenant_id, timeline_id)]

    # --- tenants and timelines ---------------------------------------------------------------
    async def create_tenant(self, tenant_id: TenantId | None = None,
                            conf: TenantConfig | None = None,
                            generation: int = 1,
                            import_datadir: Path | None = None) -> tuple[Tenant, Timeline]:
        """initdb (as the service user) in a temp dir, import it as the `main` timeline;
        or import `import_datadir` (a cleanly shut down PostgreSQL 15 data directory on this
        machine, only read) instead. A failed import leaves no tenant behind."""
        if import_datadir is not None:
            from strata.pageserver.import_datadir import check_datadir, read_initdb_point
            await asyncio.to_thread(check_datadir, import_datadir)
            await asyncio.to_thread(read_initdb_point, import_datadir)  # refuse before creating
        async with self._create_lock:
            if tenant_id is not None and tenant_id in self.repo.tenants:
                raise Conflict(f"tenant {tenant_id} already exists; pick another id or "
                               "delete it first")
            if len(self.repo.tenants) >= self.config.max_tenants:
                raise Conflict(f"this pageserver already holds {len(self.repo.tenants)} "
                               f"tenants, its max_tenants; delete one or raise the limit")
            if tenant_id is not None:
                await self._refuse_stale(tenant_id, generation)
            tenant = self.repo.create_tenant(tenant_id, conf or self.config.default_tenant_conf,
                                             generation)
            with timeline_context(tenant.tenant_id):
                if tenant_id is None:  # a new random id: only writes the marker
                    try:
                        await self._refuse_stale(tenant.tenant_id, generation)
                    except BaseException:
                        await asyncio.to_thread(self.repo.delete_tenant, tenant.tenant_id)
                        raise
                timeline_id = TimelineId(TimelineId.generate().raw)
                if import_datadir is None:
                    timeline = await asyncio.to_thread(self._initdb_and_import, tenant,
                                                       timeline_id)
                else:
                    try:
                        timeline = await asyncio.to_thread(self._import, tenant, timeline_id,
                                                           import_datadir)
                    except BaseException:
                        await asyncio.to_thread(self.repo.delete_tenant, tenant.tenant_id)
                        raise
                await self._start_remote(timeline)
                await self._start_wal(timeline)
                log.info("created tenant with timeline %s at %s", timeline_id,
                         timeline.last_record_lsn)
                return tenant, timeline

    async def attach_tenant(self, tenant_id: TenantId, generation: int,
                            conf: TenantConfig | None = None) -> Tenant:
        """Make the tenant local from remote storage (its latest index of each timeline
        with a generation at most `generation`), then resume uploads under `generation`
        and ingest from each timeline's disk_consistent_lsn."""
        storage = self.remote_storage
        if storage is None:
            raise UserError("cannot attach: this pageserver has no remote storage; set "
                            "remote_storage in pageserver.toml")
        async with self._create_lock:
            if tenant_id in self.repo.tenants:
                raise Conflict(f"tenant {tenant_id} is already attached to this pageserver; "
                               "detach it first")
            with timeline_context(tenant_id):
                started = time.monotonic()
                marker = await asyncio.to_thread(read_generation, storage, tenant_id)
                if marker is not None and marker > generation:
                    raise Conflict(stale_attach(tenant_id, generation, marker))
                if not await asyncio.to_thread(remote_tenant_indexes, storage, tenant_id,
                                               generation):
                    raise NotFound(f"tenant {tenant_id} has no timeline in remote storage "
                                   f"{storage.description} (with a generation <= "
                                   f"{generation}); check the tenant id and the URL")
                # The marker first, then the indexes this attachment resumes from (read
                # again: only those read after the marker are safe to rely on).
                await self._refuse_stale(tenant_id, generation)
                indexes = await asyncio.to_thread(remote_tenant_indexes, storage, tenant_id,
                                                  generation)
                tenant = await asyncio.to_thread(
                    self.repo.create_tenant, tenant_id,
                    conf or self.config.default_tenant_conf, generation,
                    lambda temp: write_timelines(indexes, temp))
                for timeline in _ancestors_first(tenant):
                    await self._start_remote(timeline)
                    await self._start_wal(timeline)
                log.info("attached tenant with generation %d from remote storage: %d "
                         "timelines in %.2fs", generation, len(indexes),
                         time.monotonic() - started)
                return tenant

    async def _refuse_stale(self, tenant_id: TenantId, generation: int) -> None:
        newer = await self._claim_generation(tenant_id, generation)
        if newer is not None:
            raise Conflict(stale_attach(tenant_id, generation, newer))

    async def detach_tenant(self, tenant_id: TenantId) -> None:
        """Upload what is not yet remote, then drop the tenant's local files (the remote
        copy stays: attach it here or elsewhere with a newer generation)."""
        tenant = self.tenant(tenant_id)
        if self.remote_storage is None:
            raise UserError("cannot detach: this pageserver has no remote storage, so "
                            "detaching would lose the tenant; delete it instead")
        async with self._create_lock, self.background.exclusive(tenant_id):
            for timeline_id in tenant.list_timelines():
                await self._stop_wal(tenant_id, timeline_id, flush=True)
            for timeline_id in tenant.list_timelines():
                client = self.uploads.get((tenant_id, timeline_id))
                if client is not None and not await asyncio.to_thread(client.wait_idle, 120):
                    raise Unavailable(f"uploads of timeline {timeline_id} did not finish in "
                                      "120s; the tenant stays attached (is remote storage "
                                      "reachable?)")
            for timeline_id in tenant.list_timelines():
                await self._stop_remote(tenant_id, timeline_id, delete=False)
            await asyncio.to_thread(self.repo.delete_tenant, tenant_id)
            self.read_gates.forget(tenant_id)
            self.stale.pop(tenant_id, None)
        with timeline_context(tenant_id):
            log.info("detached tenant")

    def _import(self, tenant: Tenant, timeline_id: TimelineId, datadir: Path) -> Timeline:
        from strata.pageserver.import_datadir import import_new_timeline

        started = time.monotonic()
        timeline = import_new_timeline(tenant, timeline_id, datadir)
        timeline.flush()  # not in any WAL: durable before anyone builds on it
        log.info("imported %s in %.1fs", datadir, time.monotonic() - started)
        return timeline

    def _initdb_and_import(self, tenant: Tenant, timeline_id: TimelineId) -> Timeline:
        from strata.compute.pgserver import PgServer
        from strata.pageserver.import_datadir import import_new_timeline

        scratch = self.config.workdir / "tmp"
        make_dir_for(scratch, service_user(), 0o755)
        temp = Path(tempfile.mkdtemp(prefix="initdb-", dir=scratch))
        try:
            os.chmod(temp, 0o755)
            server = PgServer(temp / "pgdata", log_path=temp / "initdb.log")
            server.initdb()
            timeline = import_new_timeline(tenant, timeline_id, server.datadir)
            # The import is not in any WAL: make it durable before anyone builds on it.
            timeline.flush()
            return timeline
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    async def branch(self, tenant_id: TenantId, ancestor_id: TimelineId, *,
                     lsn: Lsn | None = None, timestamp_us: int | None = None,
                     timeline_id: TimelineId | None = None) -> Timeline:
        """A new timeline branching `ancestor_id` at `lsn`, at the last commit at or before
        `timestamp_us`, or (neither) at its last record."""
        tenant = self.tenant(tenant_id)
        parent = tenant.get_timeline(ancestor_id)
        if lsn is not None and timestamp_us is not None:
            raise UserError("give ancestor_lsn or timestamp, not both")
        if timestamp_us is not None:
            lsn = parent.find_lsn_for_timestamp(timestamp_us)
        # An LSN beyond what has been ingested is refused (Tenant.branch_timeline), not
        # waited for: the caller asks for a point it has seen the pageserver reach.
        new_id = timeline_id or TimelineId(TimelineId.generate().raw)
        async with self._create_lock:
            if new_id in tenant.timelines:
                raise Conflict(f"timeline {new_id} already exists in tenant {tenant_id}")
            if len(tenant.timelines) >= self.config.max_timelines_per_tenant:
                raise Conflict(f"tenant {tenant_id} already has {len(tenant.timelines)} "
                               "timelines, the max_timelines_per_tenant limit; delete one "
                               "or raise the limit")
            timeline = await asyncio.to_thread(tenant.branch_timeline, new_id, ancestor_id, lsn)
            await self._start_remote(timeline)
            await self._start_wal(timeline)
        with timeline_context(tenant_id, new_id):
            log.info("branched from %s at %s", ancestor_id, timeline.ancestor_lsn)
        return timeline

    async def compute_start(self, tenant_id: TenantId,
                            timeline_id: TimelineId) -> tuple[Lsn, Lsn]:
        return await self.wal(tenant_id, timeline_id).prepare_compute_start(
            self.config.wait_lsn_timeout_s)

    async def attach_receiver(self, tenant_id: TenantId, timeline_id: TimelineId,
                              target: ReceiverTarget) -> None:
        wal = self.wal(tenant_id, timeline_id)
        with timeline_context(tenant_id, timeline_id):
            await wal.attach(target)

    async def follow_safekeepers(self, tenant_id: TenantId, timeline_id: TimelineId,
                                 safekeepers: tuple[SafekeeperEndpoint, ...]) -> None:
        wal = self.wal(tenant_id, timeline_id)
        with timeline_context(tenant_id, timeline_id):
            await wal.follow_safekeepers(safekeepers)

    async def checkpoint(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        """Ingest what the log holds, then freeze and flush the timeline."""
        wal = self.wal(tenant_id, timeline_id)
        await wal.wait_caught_up(self.config.wait_lsn_timeout_s)
        if wal.timeline.broken_reason is None:
            await wal.flush()
        return wal.timeline

    async def delete_tenant(self, tenant_id: TenantId) -> None:
        """Stop every timeline's WAL path and background job, then remove the tenant."""
        tenant = self.tenant(tenant_id)
        async with self._create_lock, self.background.exclusive(tenant_id):
            await asyncio.to_thread(self._check_not_stale, tenant_id, "the tenant")
            for timeline_id in tenant.list_timelines():
                await self._stop_wal(tenant_id, timeline_id)
                await self._stop_remote(tenant_id, timeline_id, delete=True)
            await asyncio.to_thread(self.repo.delete_tenant, tenant_id)
            self.read_gates.forget(tenant_id)
            if self.remote_storage is not None:
                # Last: until every other object is gone, the markers still guard them.
                await asyncio.to_thread(delete_markers, self.remote_storage, tenant_id)
        with timeline_context(tenant_id):
            log.info("deleted tenant")

    async def delete_timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> None:
        """Remove a timeline; refused (Conflict) while branches of it exist."""
        tenant = self.tenant(tenant_id)
        async with self._create_lock, self.background.exclusive(tenant_id):
            timeline = tenant.get_timeline(timeline_id)
            if timeline.children:
                raise Conflict(f"timeline {timeline_id} of tenant {tenant_id} has branches "
                               f"{sorted(str(c.timeline_id) for c in timeline.children)}; "
                               "delete them first")
            await asyncio.to_thread(self._check_not_stale, tenant_id,
                                    f"timeline {timeline_id}")
            await self._stop_wal(tenant_id, timeline_id)
            await self._stop_remote(tenant_id, timeline_id, delete=True)
            await asyncio.to_thread(tenant.delete_timeline, timeline_id)
        with timeline_context(tenant_id, timeline_id):
            log.info("deleted timeline")

    async def _stop_wal(self, tenant_id: TenantId, timeline_id: TimelineId,
                        *, flush: bool = False) -> None:
        """Stop the timeline's WAL ingest (with `flush`, its in-memory layers are written
        to disk first) and forget what was kept for it."""
        wal = self.wals.pop((tenant_id, timeline_id), None)
        self._start_lsns.pop((tenant_id, timeline_id), None)
        self._logical_sizes.pop((tenant_id, timeline_id), None)
        if wal is not None:
            with timeline_context(tenant_id, timeline_id):
                await wal.stop(flush=flush)

    def set_tenant_config(self, tenant_id: TenantId, conf: TenantConfig) -> None:
        self.repo.set_tenant_config(tenant_id, conf)
        with timeline_context(tenant_id):
            log.info("tenant config set: %s", conf.to_dict())

    async def compact(self, tenant_id: TenantId,
                      timeline_id: TimelineId) -> dict[TimelineId, CompactionResult]:
        timeline = self.timeline(tenant_id, timeline_id)
        timeline.check_not_broken()
        return await self.background.run_compaction(self.tenant(tenant_id), timeline_id)

    async def gc(self, tenant_id: TenantId) -> dict[TimelineId, GcResult]:
        return await self.background.run_gc(self.tenant(tenant_id))

    def lease(self, tenant_id: TenantId, timeline_id: TimelineId, lsn: Lsn,
              duration_s: float | None = None) -> tuple[Lease, bool]:
        """Acquire or renew a lease on `lsn`; returns it and whether it was a renewal."""
        timeline = self.timeline(tenant_id, timeline_id)
        timeline.check_not_broken()
        if duration_s is None:
            duration_s = timeline.conf.lease_length_s
        now = timeline.clock()
        renewal = any(lease.lsn == lsn for lease in timeline.leases.live(now))
        expires_at = timeline.leases.lease(lsn, duration_s, now, timeline.gc_cutoff)
        with timeline_context(tenant_id, timeline_id):
            log.info("%s lease on %s until %.3f (%.1fs)", "renewed" if renewal else "granted",
                     lsn, expires_at, duration_s)
        return Lease(lsn, expires_at), renewal

    def live_lease(self, tenant_id: TenantId, timeline_id: TimelineId, lsn: Lsn) -> Lease:
        """The live lease on `lsn`; NotFound names an expired (or never granted) one."""
        timeline = self.timeline(tenant_id, timeline_id)
        for lease in timeline.leases.live(timeline.clock()):
            if lease.lsn == lsn:
                return lease
        raise NotFound(f"no live lease on LSN {lsn} of timeline {timeline_id}: it expired "
                       "or was never granted; acquire a new one (GC may have passed it)")

    async def logical_size(self, timeline: Timeline) -> int:
        """Bytes of every relation fork at last_record_lsn (what `pg_database_size` sums).

        Remembered per timeline for its LSN: callers poll timeline details in loops, and
        the sum walks every relation."""
        timeline.check_not_broken()
        lsn = timeline.last_record_lsn
        key = (timeline.tenant_id, timeline.timeline_id)
        cached = self._logical_sizes.get(key)
        if cached is not None and cached[0] == lsn:
            return cached[1]
        async with self.read_gates(timeline.tenant_id).shared():
            size = await asyncio.to_thread(logical_size, timeline, lsn)
        self._logical_sizes[key] = (lsn, size)
        return size

    def status(self) -> dict[str, Any]:
        timelines = sum(len(t.timelines) for t in self.repo.tenants.values())
        broken = sum(1 for t in self.repo.tenants.values() for tl in t.timelines.values()
                     if tl.broken_reason is not None)
        return {"status": "ok", "pid": os.getpid(), "workdir": str(self.config.workdir),
                "uptime_s": round(time.time() - self.started_at, 3),
                "tenants": len(self.repo.tenants), "timelines": timelines,
                "broken_timelines": broken}

    # --- PostgreSQL-protocol commands ------------------------------------------------------
    async def handle_query(self, session: Session, query: str) -> Reply:
        words = query.strip().rstrip(";").split()
        if not words:
            raise UserError("empty command; this port answers `basebackup <tenant> "
                            "<timeline> [lsn] [read_only]`")
        if words[0].lower() in ("basebackup", "pagestream") and len(words) > 1:
            session.check_tenant(words[1])  # the tenant's token or an admin token
        if words[0].lower() == "basebackup":
            return await self._basebackup_command(words[1:])
        if words[0].lower() == "pagestream":
            return self.page_service.command(words[1:])
        raise UserError(f"unknown command {words[0]!r}; this port answers `basebackup "
                        "<tenant> <timeline> [lsn] [read_only]`")

    async def _basebackup_command(self, args: list[str]) -> Reply:
        read_only = "read_only" in args
        mode = "lazy" if "lazy" in args else "full"
        # slots=sk1,sk2,sk3: pull mode's slots, one per safekeeper, instead of the sidecar's
        slots = tuple(name for a in args if a.startswith("slots=")
                      for name in a.removeprefix("slots=").split(",")) or (DEFAULT_SLOT_NAME,)
        args = [a for a in args if a not in ("read_only", "lazy") and
                not a.startswith("slots=")]
        if len(args) not in (2, 3):
            raise UserError("usage: basebackup <tenant> <timeline> [lsn] [read_only] [lazy] "
                            "[slots=NAME,...]")
        tenant_id = TenantId(TenantId.parse(args[0]).raw)
        timeline_id = TimelineId(TimelineId.parse(args[1]).raw)
        timeline = self.timeline(tenant_id, timeline_id)
        lsn = Lsn.parse(args[2]) if len(args) == 3 else timeline.last_record_lsn
        await timeline.wait_for_lsn(lsn, self.config.wait_lsn_timeout_s)
        # Checked here too, so the client gets an ErrorResponse before any tar bytes.
        timeline.check_not_broken()
        loop = asyncio.get_running_loop()

        async def run(stream: CopyStream) -> None:
            # The gate: GC must not delete layer files this long read is walking.
            with timeline_context(tenant_id, timeline_id):
                async with self.read_gates(tenant_id).shared():
                    sink = _StreamSink(stream, loop)
                    await asyncio.to_thread(_write_basebackup, timeline, lsn, sink,
                                            read_only, mode, slots)
                    await sink.aflush()
                    log.info("sent basebackup at %s (%d bytes, read_only=%s)", lsn,
                             sink.sent, read_only)

        return CopyOut(run)


def _ancestors_first(tenant: Tenant) -> list[Timeline]:
    done: list[Timeline] = []
    pending = sorted(tenant.timelines.values(), key=lambda t: str(t.timeline_id))
    while pending:
        ready = [t for t in pending if t.ancestor is None or t.ancestor in done]
        done.extend(ready)
        pending = [t for t in pending if t not in ready]
    return done


def _write_basebackup(timeline: Timeline, lsn: Lsn, sink: _StreamSink, read_only: bool,
                      mode: str = "full",
                      slots: tuple[str, ...] = (DEFAULT_SLOT_NAME,)) -> None:
    from strata.pageserver.basebackup import write_basebackup

    write_basebackup(timeline, lsn, sink, read_only=read_only, mode=mode,  # type: ignore[arg-type]  # a write()-only sink
                     slot_names=slots)
    sink.flush()


class _StreamSink:
    """A file-like `write()` for a worker thread that sends CopyData on the event loop.

    Each full chunk waits until the socket has taken it, so a slow client slows the
    tar writer down instead of letting it fill memory."""

    def __init__(self, stream: CopyStream, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop
        self._buf = bytearray()
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        if len(self._buf) >= _CHUNK_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            asyncio.run_coroutine_threadsafe(self._stream.write(chunk), self._loop).result()
            self.sent += len(chunk)

    async def aflush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            await self._stream.write(chunk)
            self.sent += len(chunk)


# --- the process -------------------------------------------------------------------------------
def take_lock(workdir: Path) -> IO[Any]:
    """Hold `pageserver.lock` for the life of the process; UserError if another has it."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / LOCK_FILE, "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        f.close()
        raise UserError(f"another pageserver is running on {workdir} (it holds "
                        f"{workdir / LOCK_FILE}); stop it first") from err
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


async def serve(config: PageserverConfig) -> None:
    """Run until SIGTERM or SIGINT; then stop cleanly."""
    from strata.pageserver.http import start_http

    key_path = config.auth_public_key
    verifier = TokenVerifier.from_file(key_path) if key_path is not None else None
    pageserver = Pageserver(config)
    await pageserver.start()
    pg_host, pg_port = config.pg_addr
    pg_server = PgProtocolServer(pageserver.handle_query, host=pg_host, port=pg_port,
                                 name="pageserver-pg", verifier=verifier)
    await pg_server.start()
    http_runner, http_port = await start_http(pageserver, *config.http_addr,
                                              verifier=verifier)
    ports = config.workdir / PORTS_FILE
    ports.with_suffix(".tmp").write_text(f"{pg_server.port} {http_port}\n")
    os.replace(ports.with_suffix(".tmp"), ports)
    log.info("pageserver ready: pg port %d, http port %d, workdir %s, auth %s",
             pg_server.port, http_port, config.workdir,
             f"on ({key_path})" if key_path is not None else "off")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("pageserver stopping")
    await http_runner.cleanup()
    await pg_server.stop(grace_s=5)
    await pageserver.stop()
    log.info("pageserver stopped")


def lower_priority(nice: int) -> None:
    """Raise this thread's nice value to `nice` (never lower it: that needs privileges).
    Called before any other thread starts, so every thread and child inherits it.

    With sched_autogroup (Linux's default where it is built in) the scheduler shares the
    CPU between sessions first and a thread's nice counts only within its session: the
    pageserver leads a session of its own (`strata start`, the test fixtures), so the
    nice is set on its session's autogroup too, or it would not yield to the commit path's
    other processes at all (docs/walproposer.md, "The commit latency tail")."""
    if nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    autogroup = Path("/proc/self/autogroup")
    if nice > 0 and os.getsid(0) == os.getpid() and autogroup.exists():
        # "/autogroup-N nice M" (empty in the root task group: nothing to set); raising
        # it needs no privilege, lowering it does
        fields = autogroup.read_text().split()
        if fields and nice > int(fields[-1]):
            try:
                autogroup.write_text(f"{nice}\n")
            except OSError as err:
                log.info("cannot set the pageserver's autogroup nice to %d: %s", nice,
                         err.strerror)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strata.pageserver")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("-c", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a pageserver.toml setting")
    args = parser.parse_args(argv)
    try:
        config = PageserverConfig.load(args.workdir.resolve(), args.overrides)
        setup_logging(getattr(logging, config.log_level))
        lower_priority(config.nice)
        lock = take_lock(config.workdir)
    except StrataError as err:
        print(f"pageserver: {err}", flush=True)
        return 2
    try:
        asyncio.run(serve(config))
    except (NotFound, UserError) as err:
        log.error("pageserver failed to start: %s", err)
        return 2
    finally:
        lock.close()
    return 0
