"""Where the environment's tenants live: attach a tenant to the pageserver from object
storage, detach it, and re-attach what a pageserver lost (architecture D9).

The control plane owns generations: `TenantState.generation` is the generation of the
tenant's current attachment. Every attach takes the next number, written to state.json
*before* the pageserver is asked, so a crash between the two never hands out one
generation twice; an attachment with a stale generation can never delete what a newer
one relies on (docs/remote-storage.md).

`reattach_lost_tenants` runs after every pageserver start (`strata start`, `strata
pageserver start|restart`): a tenant that state.json says is attached but the pageserver
does not hold (its data directory was deleted, or the disk lost) is attached from object
storage with a new generation, and its timelines follow the safekeepers again, from the
index's `disk_consistent_lsn` (the safekeepers keep WAL until `remote_consistent_lsn`
passes it, so nothing committed is lost).
"""

from __future__ import annotations

from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.control import output
from strata.control.endpoints import running_pid, safekeeper_endpoints
from strata.control.env import EnvConfig, Environment, WalMode
from strata.control.services import safekeeper_client
from strata.pageserver.api import TimelineInfo
from strata.pageserver.client import PageserverClient

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
    require_object_storage(config)
    with env.locked() as state:
        tenant = state.tenants[tenant_id]
        tenant.generation += 1
        generation = tenant.generation
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
    (refused while an endpoint of it runs)."""
    require_object_storage(config)
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
                          client: PageserverClient) -> list[TenantId]:
    """Attach (with a new generation) every tenant the state says is attached but the
    pageserver does not hold; returns their ids. Without object storage such a tenant is
    lost: one warning says so."""
    state = env.read_state()
    held = set(client.list_tenants())
    lost = [tid for tid, t in state.tenants.items() if t.attached and tid not in held]
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
