"""Where the environment's tenants live: attach a tenant to the pageserver from object
storage, detach it, and re-attach what a pageserver lost (architecture D9).

The control plane owns generations: `TenantState.generation` is the generation of the
tenant's current attachment. Every attach takes the next number, written to state.json
*before* the pageserver is asked, so a crash between the two never hands out one
generation twice. It is also written, still before the attach, to the tenant's
generation marker in object storage (`tenants/<t>/generation.json-<N>`), which every
pageserver checks before deleting objects: an attachment with a stale generation can
never delete what a newer one relies on (remote/generations.py, docs/remote-storage.md).

`reattach_lost_tenants` runs after every pageserver start (`strata start`, `strata
pageserver start|restart`): a tenant that state.json says is attached but the pageserver
does not hold (its data directory was deleted, or the disk lost) is attached from object
storage with a new generation, and its timelines follow the safekeepers again, from the
index's `disk_consistent_lsn` (the safekeepers keep WAL until `remote_consistent_lsn`
passes it, so nothing committed is lost).

`relocate_tenant` moves a tenant to another pageserver of the environment (`strata
tenant relocate --to N`): the source uploads what it has, the destination attaches it
with the next generation and follows the safekeepers until it has what the source had,
state.json switches the tenant over, then the source detaches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.failpoint import failpoint
from strata.common.ids import TenantId, TimelineId
from strata.control import output
from strata.control.endpoints import (
    endpoint_paths,
    point_at_pageserver,
    running_pid,
    safekeeper_endpoints,
    tenant_lock,
)
from strata.control.env import EnvConfig, Environment, State, WalMode
from strata.control.services import (
    PAGESERVER_PROBE_TIMEOUT_S,
    pageserver_client,
    pageserver_files,
    require_pageserver,
    safekeeper_client,
)
from strata.control.supervisor import wait_for
from strata.pageserver.api import TimelineInfo
from strata.pageserver.client import PageserverClient
from strata.remote.generations import record_generation
from strata.remote.storage import open_remote_storage

RELOCATE_TIMEOUT_S = 300.0  # each wait of a relocation (uploads, catching up)
NO_OBJECT_STORAGE = (
    "this environment has no object storage (config [pageserver.config] remote_storage); "
    "create one with `strata init --object-storage URL|local`")


def object_storage_url(config: EnvConfig) -> str | None:
    url = config.pageserver.config.get("remote_storage")
    return str(url) if url else None


def require_object_storage(config: EnvConfig) -> str:
    url = object_storage_url(config)
    if url is None:
        raise UserError(NO_OBJECT_STORAGE)
    return url


def attach_tenant(env: Environment, config: EnvConfig, client: PageserverClient,
                  tenant_id: TenantId) -> int:
    """Attach the tenant from object storage with its next generation (recorded first),
    point its timelines at the safekeepers, and mark it attached; returns the generation."""
    url = require_object_storage(config)
    with env.locked() as state:
        tenant = state.tenants[tenant_id]
        tenant.generation += 1
        generation = tenant.generation
        # Under the state lock, so markers are written in the order numbers are handed
        # out; before the attach, so a stale attachment's deletions see it first.
        record_generation_marker(url, tenant_id, generation)
    conf = {**config.tenant_defaults, **tenant.config}
    with output.step(f"attaching tenant {tenant.name} ({tenant_id}) from object storage "
                     f"with generation {generation}"):
        timelines = client.attach_tenant(tenant_id, generation, conf or None)
    if config.wal_mode is WalMode.SAFEKEEPERS:
        follow_safekeepers(config, client, tenant_id, timelines)
    else:
        output.info(f"warning: tenant {tenant.name} resumes at what object storage held; "
                    "in development mode (wal_mode = \"pageserver\") the WAL after that was "
                    "only on the pageserver's disk. Restart its primaries "
                    "(`strata endpoint stop/start`)")
    with env.locked() as state:
        state.tenants[tenant_id].attached = True
    return generation


def record_generation_marker(url: str, tenant_id: TenantId, generation: int) -> None:
    """Record `generation` as the tenant's newest in object storage (remote/generations.py):
    every pageserver checks it before deleting objects."""
    storage = open_remote_storage(url)
    try:
        record_generation(storage, tenant_id, generation)
    finally:
        storage.close()


def follow_safekeepers(config: EnvConfig, client: PageserverClient, tenant_id: TenantId,
                       timelines: list[TimelineInfo]) -> None:
    """Each timeline that the safekeepers hold takes its WAL from them again (the others
    get it when a primary first starts on them)."""
    for info in timelines:
        if _on_safekeeper(config, tenant_id, info.timeline_id):
            client.follow_safekeepers(tenant_id, info.timeline_id, safekeeper_endpoints(config))


def _on_safekeeper(config: EnvConfig, tenant_id: TenantId, timeline_id: TimelineId) -> bool:
    for sk in config.safekeepers:
        try:
            safekeeper_client(sk).timeline(tenant_id, timeline_id)
        except NotFound:
            continue
        except Unavailable:
            continue  # a majority is enough; another one answers
        return True
    return False


def detach_tenant(env: Environment, config: EnvConfig, client: PageserverClient,
                  tenant_id: TenantId) -> None:
    """Upload what is not in object storage yet, then drop the tenant from the pageserver
    (refused while an endpoint of it runs; an endpoint start waits for it)."""
    require_object_storage(config)
    with tenant_lock(env, tenant_id, exclusive=True,
                     waiting="an endpoint of the tenant is starting; detaching once it is up"):
        _detach_tenant(env, client, tenant_id)


def _detach_tenant(env: Environment, client: PageserverClient, tenant_id: TenantId) -> None:
    state = env.read_state()
    tenant = state.tenants[tenant_id]
    running = sorted(ep.name for ep in state.endpoints.values()
                     if ep.tenant_id == tenant_id and running_pid(env, ep.name) is not None)
    if running:
        raise UserError(f"endpoints {running} of tenant {tenant.name} are running; stop them "
                        "first (`strata endpoint stop NAME`)")
    with output.step(f"detaching tenant {tenant.name} ({tenant_id}): uploading what is not "
                     "in object storage yet"):
        client.detach_tenant(tenant_id)
    with env.locked() as state:
        state.tenants[tenant_id].attached = False


def reattach_lost_tenants(env: Environment, config: EnvConfig,
                          client: PageserverClient, ps_id: int = 1) -> list[TenantId]:
    """Attach (with a new generation) every tenant the state says is attached to pageserver
    `ps_id` but that it does not hold; returns their ids. Without object storage such a
    tenant is lost: one warning says so."""
    state = env.read_state()
    held = set(client.list_tenants())
    lost = [tid for tid, t in state.tenants.items()
            if t.attached and t.pageserver == ps_id and tid not in held]
    if not lost:
        return []
    names = [state.tenants[tid].name for tid in lost]
    if object_storage_url(config) is None:
        output.info(f"warning: the pageserver does not hold tenants {names} and "
                    f"{NO_OBJECT_STORAGE}: they cannot be restored")
        return []
    done = []
    for tid in lost:
        try:
            attach_tenant(env, config, client, tid)
        except StrataError as err:
            # One tenant's trouble does not keep the others away.
            output.info(f"strata: error: tenant {state.tenants[tid].name}: {err}")
            continue
        done.append(tid)
    return done


def _running_endpoints(env: Environment, tenant_id: TenantId) -> list[str]:
    state = env.read_state()
    return sorted(ep.name for ep in state.endpoints.values()
                  if ep.tenant_id == tenant_id and running_pid(env, ep.name) is not None)


def relocate_tenant(env: Environment, config: EnvConfig, tenant_id: TenantId,
                    to_id: int) -> int:
    """Move the tenant to pageserver `to_id`; returns the new generation.

    1. The source checkpoints each timeline and uploads it (so the destination's attach
       finds every timeline, at most a few seconds behind);
    2. the destination attaches it with the next generation (state.json first) and
       follows the safekeepers;
    3. wait until the destination has ingested, on every timeline, as far as the source
       had when it attached;
    4. state.json names the destination (endpoints started from now on use it) and the
       running endpoints' pageserver files are rewritten: their FUSE servers and
       walproposers go to the destination at their next read or poll;
    5. the source detaches the tenant (its uploads under the older generation never
       overwrite or delete what the destination relies on). A read that the source
       answers with an error from then on is retried at the destination.

    Running endpoints read at their start LSN (a primary's later pages are its own) or
    their read-only LSN, both at most what the source had when the destination attached,
    so the destination serves them before the source goes.

    The whole relocation holds the tenant's placement lock (`endpoints.tenant_lock`): an
    endpoint start waits for it, so none starts from the source and loses it at step 5."""
    require_object_storage(config)
    with tenant_lock(env, tenant_id, exclusive=True,
                     waiting="an endpoint of the tenant is starting; relocating once it is "
                             "up"):
        return _relocate_tenant(env, config, tenant_id, to_id)


def _relocate_tenant(env: Environment, config: EnvConfig, tenant_id: TenantId,
                     to_id: int) -> int:
    config.pageserver_by_id(to_id)  # NotFound naming the ids there are
    state = env.read_state()
    tenant = state.tenants[tenant_id]
    if not tenant.attached:
        raise UserError(f"tenant {tenant.name} is detached; attach it first (`strata tenant "
                        "attach`)")
    from_id = tenant.pageserver
    if from_id == to_id:
        raise UserError(f"tenant {tenant.name} is on pageserver {to_id} already")
    running = _running_endpoints(env, tenant_id)
    if running and config.wal_mode is not WalMode.SAFEKEEPERS:
        raise UserError(f"endpoints {running} of tenant {tenant.name} are running and in "
                        "development mode (wal_mode = \"pageserver\") the pageserver is their "
                        "WAL receiver; stop them first (`strata endpoint stop NAME`)")
    unmovable = [n for n in running if not endpoint_paths(env, n).pageserver_file.exists()]
    if unmovable:
        raise UserError(f"endpoints {unmovable} of tenant {tenant.name} were started by an "
                        "older strata and cannot follow a relocation; restart them first "
                        "(`strata endpoint stop NAME` and `start`)")
    source = require_pageserver(env, config, from_id)
    dest = require_pageserver(env, config, to_id)
    tid = tenant_id
    if tid in dest.list_tenants():
        # Left by an interrupted relocation: that attachment goes; the new one supersedes it.
        with output.step(f"pageserver {to_id} holds tenant {tenant.name} from an interrupted "
                         "relocation: detaching it there first"):
            dest.detach_tenant(tid)
    with output.step(f"pageserver {from_id}: checkpointing and uploading tenant "
                     f"{tenant.name} ({tenant_id})"):
        for info in source.list_timelines(tid):
            flushed = source.checkpoint(tid, info.timeline_id).disk_consistent_lsn

            def uploaded(tl: TimelineId = info.timeline_id, lsn: object = flushed) -> bool:
                remote = source.timeline(tid, tl).remote_consistent_lsn
                return remote is not None and remote >= lsn  # type: ignore[operator]

            wait_for(uploaded, timeout_s=RELOCATE_TIMEOUT_S, interval_s=0.2,
                     what=f"waiting for pageserver {from_id} to upload timeline "
                          f"{info.timeline_id} up to {flushed}")
    generation = attach_tenant(env, config, dest, tenant_id)
    with output.step(f"waiting for pageserver {to_id} to catch up with pageserver {from_id}"):
        for info in source.list_timelines(tid):
            target = info.last_record_lsn
            wait_for(lambda tl=info.timeline_id, lsn=target:  # type: ignore[misc]
                     dest.timeline(tid, tl).last_record_lsn >= lsn,
                     timeout_s=RELOCATE_TIMEOUT_S, interval_s=0.1,
                     what=f"waiting for pageserver {to_id} to ingest timeline "
                          f"{info.timeline_id} up to {target}")
    failpoint("relocate-before-switch")
    with env.locked() as state:
        state.tenants[tenant_id].pageserver = to_id
    for name in _running_endpoints(env, tenant_id):
        point_at_pageserver(env, config, name, to_id)
        output.info(f"endpoint {name} now reads from pageserver {to_id}")
    with output.step(f"detaching tenant {tenant.name} from pageserver {from_id}"):
        source.detach_tenant(tid)
    return generation


@dataclass(frozen=True, slots=True)
class Attachment:
    """One pageserver's attachment of a tenant, as its API reports it (`GET /v1/tenant/{t}`)."""

    pageserver: int
    generation: int
    stale: bool
    """The pageserver found a newer generation marker, or the control plane (state.json)
    has handed out a newer generation than this attachment's."""
    newer_generation: int | None

    def describe(self, tenant_name: str) -> str:
        """e.g. 'pageserver 1: current (generation 2)', or for a stale one what to do."""
        if not self.stale:
            return f"pageserver {self.pageserver}: current (generation {self.generation})"
        return (f"pageserver {self.pageserver}: stale (generation {self.generation} < "
                f"{self.newer_generation}): detach it (`strata tenant detach {tenant_name} "
                f"--pageserver {self.pageserver}`)")

    def to_json(self) -> dict[str, Any]:
        return {"pageserver": self.pageserver, "generation": self.generation,
                "generation_state": "stale" if self.stale else "current",
                "newer_generation": self.newer_generation}


def tenant_attachments(env: Environment, config: EnvConfig,
                       state: State) -> dict[TenantId, list[Attachment]]:
    """Every running pageserver's attachments of the environment's tenants (a pageserver
    that is not running or does not answer within the probe timeout is left out)."""
    out: dict[TenantId, list[Attachment]] = {tid: [] for tid in state.tenants}
    for ps in config.pageservers:
        if pageserver_files(env, ps.id).read_pid() is None:
            continue
        client = pageserver_client(config, timeout_s=PAGESERVER_PROBE_TIMEOUT_S, ps_id=ps.id)
        try:
            held = [tid for tid in client.list_tenants() if tid in state.tenants]
            infos = [(tid, client.tenant(tid)) for tid in held]
        except StrataError:
            continue  # `strata status` says what is wrong with it
        for tid, info in infos:
            generation = int(info.get("generation", 1))
            known = state.tenants[tid].generation
            reported = info.get("newer_generation")
            newer = max(int(reported) if reported is not None else 0, known)
            stale = info.get("generation_state") == "stale" or generation < known
            out[tid].append(Attachment(ps.id, generation, stale,
                                       newer if stale else None))
    return out


def detach_stale_attachment(env: Environment, config: EnvConfig, state: State,
                            tenant_id: TenantId, ps_id: int) -> None:
    """Detach the tenant from pageserver `ps_id`, which is not its current one: only a
    stale attachment (an older generation than the tenant's newest) is detached so."""
    tenant = state.tenants[tenant_id]
    client = require_pageserver(env, config, ps_id)
    if tenant_id not in client.list_tenants():
        raise UserError(f"pageserver {ps_id} does not hold tenant {tenant.name}")
    found = next((a for a in tenant_attachments(env, config, state)[tenant_id]
                  if a.pageserver == ps_id), None)
    if found is None or not found.stale:
        raise UserError(f"the attachment of tenant {tenant.name} on pageserver {ps_id} is "
                        "not stale; `strata tenant relocate` moves a tenant")
    running = sorted(ep.name for ep in state.endpoints.values()
                     if ep.tenant_id == tenant_id and running_pid(env, ep.name) is not None)
    if running and tenant.pageserver == ps_id:
        raise UserError(f"endpoints {running} of tenant {tenant.name} are running on "
                        f"pageserver {ps_id}; stop them first (`strata endpoint stop NAME`)")
    with output.step(f"detaching the stale attachment (generation {found.generation}) of "
                     f"tenant {tenant.name} ({tenant_id}) from pageserver {ps_id}"):
        client.detach_tenant(tenant_id)
