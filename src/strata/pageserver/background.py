"""Background work of the pageserver: per-tenant timeline ticks, compaction and GC on a schedule.

One scheduler task wakes every `tick_period_s` and starts, for each tenant, whichever job
is due and not already running:

- tick: `Timeline.tick()` of every timeline (freeze an open layer older than
  checkpoint_timeout_s even while WAL keeps arriving, flush frozen layers), every
  `tick_period_s`;
- compaction: `compact()` of every timeline that is not broken, every
  `compaction_period_s` of the tenant's config;
- GC: `Tenant.gc()`, every `gc_period_s` of the tenant's config.

Jobs run in worker threads (never on the event loop) and at most `background_jobs` at a
time across all tenants (a semaphore): a pageserver with many tenants queues them
instead of starving page requests of CPU. Jobs of one kind never overlap within a tenant;
manual runs from the HTTP API (`run_compaction`, `run_gc`) take the same per-tenant
locks, so a manual and a scheduled run wait for each other. Deleting a tenant or a
timeline takes every lock of the tenant (`exclusive`), so no job touches files being
removed. A failing job is logged with its tenant and counted; the schedule goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from strata.common.errors import StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import timeline_context
from strata.pageserver.metrics import PageserverMetrics
from strata.storage.compaction import CompactionResult
from strata.storage.gc import GcResult
from strata.storage.tenant import Tenant

log = logging.getLogger(__name__)

KINDS = ("tick", "compaction", "gc")


GC_GATE_WAIT_S = 10.0
"""How long a GC run waits for a tenant's in-flight reads to finish before it is put off
to its next period."""


class ReadGate:
    """Keeps one tenant's GC apart from its reads (asyncio; reads never wait for reads).

    Why: a read that holds a layer's reader keeps reading it after GC removed it (the
    storage engine unlinks, it does not close), but a read walks the layer map one
    layer at a time: a read that checked its LSN against the GC cutoff just before GC
    raised it could find, a step later, an older layer it still needs already gone. So
    GC runs only while no read of the tenant is in flight: basebackups, page service
    requests and logical size computations hold the gate shared, GC exclusive.
    Readers are preferred (a page request never waits for a GC that is only waiting);
    GC waits at most GC_GATE_WAIT_S for a moment with no reads, else it is put off.
    """

    def __init__(self) -> None:
        self._readers = 0
        self._writing = False
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            async with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def exclusive(self, timeout_s: float) -> AsyncIterator[bool]:
        """Yields True holding the gate alone, or False if reads kept it busy."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(lambda: self._readers == 0 and not self._writing)
                self._writing = True
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            async with self._changed:
                self._writing = False
                self._changed.notify_all()


class ReadGates:
    """One `ReadGate` per tenant, made on first use."""

    def __init__(self) -> None:
        self._gates: dict[TenantId, ReadGate] = {}

    def __call__(self, tenant_id: TenantId) -> ReadGate:
        gate = self._gates.get(tenant_id)
        if gate is None:
            gate = self._gates[tenant_id] = ReadGate()
        return gate

    def forget(self, tenant_id: TenantId) -> None:
        self._gates.pop(tenant_id, None)


@dataclass
class _TenantSchedule:
    """When each job kind of one tenant last started, and the locks that keep runs apart."""

    last_start: dict[str, float]
    locks: dict[str, asyncio.Lock] = field(
        default_factory=lambda: {kind: asyncio.Lock() for kind in KINDS})


class BackgroundWork:
    """Schedules and runs tick, compaction and GC jobs for the tenants `tenants()` returns."""

    def __init__(self, tenants: Callable[[], dict[TenantId, Tenant]], metrics: PageserverMetrics,
                 *, max_jobs: int, tick_period_s: float, read_gates: ReadGates | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        assert max_jobs >= 1 and tick_period_s > 0, (max_jobs, tick_period_s)
        self._tenants = tenants
        self.read_gates = read_gates if read_gates is not None else ReadGates()
        self._metrics = metrics
        self._tick_period_s = tick_period_s
        self._clock = clock
        self._slots = asyncio.Semaphore(max_jobs)
        self._schedules: dict[TenantId, _TenantSchedule] = {}
        self._jobs: set[asyncio.Task[None]] = set()
        self._scheduler: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self._scheduler is None, "already started"
        self._scheduler = asyncio.create_task(self._run(), name="background-scheduler")

    async def stop(self) -> None:
        """Stop scheduling and wait for running jobs (a job in a thread cannot be cut short)."""
        task, self._scheduler = self._scheduler, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._jobs:
            await asyncio.gather(*self._jobs, return_exceptions=True)

    def _schedule(self, tenant_id: TenantId) -> _TenantSchedule:
        sched = self._schedules.get(tenant_id)
        if sched is None:
            # The first compaction and GC come one period after the tenant is seen, not at
            # once: a restarting pageserver should not start every tenant's GC together.
            now = self._clock()
            sched = _TenantSchedule(last_start={kind: now for kind in KINDS})
            self._schedules[tenant_id] = sched
        return sched

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick_period_s)
            tenants = self._tenants()
            for gone in set(self._schedules) - set(tenants):
                del self._schedules[gone]
            now = self._clock()
            for tenant_id, tenant in list(tenants.items()):
                sched = self._schedule(tenant_id)
                periods = {"tick": self._tick_period_s,
                           "compaction": tenant.conf.compaction_period_s,
                           "gc": tenant.conf.gc_period_s}
                for kind in KINDS:
                    if sched.locks[kind].locked() or now - sched.last_start[kind] < periods[kind]:
                        continue
                    sched.last_start[kind] = now
                    job = asyncio.create_task(self._scheduled(kind, tenant),
                                              name=f"{kind}-{tenant_id}")
                    self._jobs.add(job)
                    job.add_done_callback(self._jobs.discard)

    async def _scheduled(self, kind: str, tenant: Tenant) -> None:
        try:
            if kind == "tick":
                await self.run_ticks(tenant)
            elif kind == "compaction":
                await self.run_compaction(tenant, trigger="schedule")
            else:
                await self.run_gc(tenant, trigger="schedule")
        except StrataError as err:
            # Already logged and counted by the job; the next period tries again.
            log.debug("scheduled %s of tenant %s failed: %s", kind, tenant.tenant_id, err)

    @contextlib.asynccontextmanager
    async def _job(self, kind: str, tenant: Tenant) -> AsyncIterator[bool]:
        """Hold the tenant's lock for `kind` and a job slot; yields False when the tenant
        was deleted while the job waited (it must then do nothing)."""
        sched = self._schedule(tenant.tenant_id)
        async with sched.locks[kind], self._slots:
            with timeline_context(tenant.tenant_id):
                yield self._tenants().get(tenant.tenant_id) is tenant

    @contextlib.asynccontextmanager
    async def exclusive(self, tenant_id: TenantId) -> AsyncIterator[None]:
        """Hold every job lock of the tenant (while deleting it or one of its timelines)."""
        sched = self._schedule(tenant_id)
        async with contextlib.AsyncExitStack() as stack:
            for kind in KINDS:
                await stack.enter_async_context(sched.locks[kind])
            yield

    # --- the jobs -------------------------------------------------------------------------
    async def run_ticks(self, tenant: Tenant) -> None:
        async with self._job("tick", tenant) as live:
            if not live:
                return
            outcome = await asyncio.to_thread(_tick_all, tenant)
            self._metrics.ticks.labels(outcome).inc()

    async def run_compaction(self, tenant: Tenant, timeline_id: TimelineId | None = None, *,
                             trigger: str = "manual") -> dict[TimelineId, CompactionResult]:
        """Compact one timeline of the tenant, or all that are not broken."""
        async with self._job("compaction", tenant) as live:
            if not live:
                return {}
            started = time.monotonic()
            try:
                results = await asyncio.to_thread(_compact, tenant, timeline_id)
            except Exception as err:
                self._metrics.compaction_runs.labels(trigger, "error").inc()
                _log_failure("compaction", err)
                raise
            self._metrics.compaction_runs.labels(trigger, "ok").inc()
            self._metrics.compaction_seconds.observe(time.monotonic() - started)
            created = sum(len(r.image_layers) for r in results.values())
            self._metrics.image_layers_created.inc(created)
            if created:
                log.info("%s compaction wrote %d image layers", trigger, created)
            return results

    async def run_gc(self, tenant: Tenant, *,
                     trigger: str = "manual") -> dict[TimelineId, GcResult]:
        async with self._job("gc", tenant) as live:
            if not live:
                return {}
            started = time.monotonic()
            async with self.read_gates(tenant.tenant_id).exclusive(GC_GATE_WAIT_S) as alone:
                if not alone:
                    self._metrics.gc_runs.labels(trigger, "postponed").inc()
                    if trigger != "schedule":
                        raise Unavailable(f"GC of tenant {tenant.tenant_id} waited "
                                          f"{GC_GATE_WAIT_S}s for its reads to pause; "
                                          "try again")
                    log.info("gc put off: reads kept the tenant busy for %ss",
                             GC_GATE_WAIT_S)
                    return {}
                try:
                    results = await asyncio.to_thread(tenant.gc)
                except Exception as err:
                    self._metrics.gc_runs.labels(trigger, "error").inc()
                    _log_failure("gc", err)
                    raise
            self._metrics.gc_runs.labels(trigger, "ok").inc()
            self._metrics.gc_seconds.observe(time.monotonic() - started)
            removed = sum(len(r.removed) for r in results.values())
            expired = sum(r.expired_leases for r in results.values())
            self._metrics.gc_layers_removed.inc(removed)
            self._metrics.leases_expired.inc(expired)
            if removed or expired:
                log.info("%s gc removed %d layers, dropped %d expired leases", trigger,
                         removed, expired)
            return results


def _log_failure(kind: str, err: Exception) -> None:
    if isinstance(err, StrataError):
        log.error("%s failed: %s", kind, err)
    else:
        log.exception("%s failed unexpectedly", kind)


def _tick_all(tenant: Tenant) -> str:
    outcome = "ok"
    for timeline_id, timeline in sorted(tenant.timelines.items()):
        if timeline.broken_reason is not None:
            continue
        with timeline_context(tenant.tenant_id, timeline_id):
            try:
                timeline.tick()
            except UserError as err:
                # freeze() refuses while ingest is between the puts of one record; the
                # next tick freezes it.
                log.debug("tick deferred: %s", err)
                outcome = "deferred"
            except Exception as err:  # noqa: BLE001 - one timeline's failure is logged, the rest go on
                _log_failure("tick", err)
                outcome = "error"
    return outcome


def _compact(tenant: Tenant, timeline_id: TimelineId | None) -> dict[TimelineId, CompactionResult]:
    from strata.storage.compaction import compact

    if timeline_id is not None:
        timelines = {timeline_id: tenant.get_timeline(timeline_id)}
    else:
        timelines = dict(sorted(tenant.timelines.items()))
    results = {}
    for tid, timeline in timelines.items():
        if timeline.broken_reason is not None:
            continue
        with timeline_context(tenant.tenant_id, tid):
            results[tid] = compact(timeline)
    return results
