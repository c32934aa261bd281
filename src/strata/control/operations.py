"""The control plane's operations on names (branches, endpoints), shared by the `strata` CLI
(`commands`) and the console (`strata.console`).

Each operation takes the environment and plain arguments, reports progress through
`output` (the CLI prints it; the console shows it live with `output.progress_to`), and
returns what it made or raises a StrataError saying what to do. None of them prints a
result: the caller does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from strata.common.durable import write_atomic
from strata.common.errors import Conflict, NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.timestamp import parse_past_timestamp_us, parse_timestamp_us
from strata.control import output
from strata.control.endpoints import (
    StartResult,
    endpoint_paths,
    head_flush_lsn,
    running_pid,
    start_endpoint,
    stop_endpoint,
)
from strata.control.env import (
    DEFAULT_BRANCH,
    ComputeMode,
    EndpointState,
    EnvConfig,
    Environment,
    State,
    TenantState,
    WalMode,
    allocate_port,
)
from strata.control.services import require_pageserver, safekeeper_client, tenant_pageserver
from strata.control.supervisor import wait_for
from strata.pageserver.api import TenantConfig, TimelineInfo
from strata.pageserver.client import PageserverClient

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
INGEST_WAIT_S = 60.0
BRANCH_TIMES_FILE = "branch-times.json"
"""timeline id -> {created_at, point}: when and how each branch was made (for display)."""


def check_name(kind: str, name: str) -> str:
    if _NAME.fullmatch(name) is None:
        raise UserError(f"invalid {kind} name {name!r}: use letters, digits, '_', '.', '-' "
                        "(up to 63, starting with a letter or digit)")
    return name


def client_if_running(env: Environment,
                      tenant_id: TenantId | None = None) -> PageserverClient | None:
    """The client of the tenant's pageserver (None: pageserver 1) if it runs."""
    try:
        if tenant_id is None:
            return require_pageserver(env, env.config())
        return tenant_pageserver(env, env.config(), tenant_id)
    except StrataError:
        return None


# --- the branch tree ---------------------------------------------------------------------------
def names_by_id(tenant: TenantState) -> dict[TimelineId, str]:
    return {tl: name for name, tl in tenant.branches.items()}


def timeline_json(tenant: TenantState, info: TimelineInfo) -> dict[str, Any]:
    names = names_by_id(tenant)
    parent = info.ancestor_timeline_id
    return {"branch": names.get(info.timeline_id), "tenant_id": str(info.tenant_id),
            "timeline_id": str(info.timeline_id),
            "parent": names.get(parent) if parent else None,
            "parent_timeline_id": str(parent) if parent else None,
            "branch_lsn": str(info.ancestor_lsn) if info.ancestor_lsn else None,
            "last_record_lsn": str(info.last_record_lsn),
            "disk_consistent_lsn": str(info.disk_consistent_lsn), "state": info.state}


def branch_times(env: Environment) -> dict[str, dict[str, str]]:
    try:
        data = json.loads((env.root / BRANCH_TIMES_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_branch_time(env: Environment, timeline_id: TimelineId, point: str) -> None:
    """Remember when and from which point a branch was made (called under env.locked())."""
    times = branch_times(env)
    times[str(timeline_id)] = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                               "point": point}
    write_atomic(env.root / BRANCH_TIMES_FILE, (json.dumps(times, indent=2) + "\n").encode())


def primary_on(state: State, tenant_id: TenantId, branch: str) -> EndpointState | None:
    for ep in state.endpoints.values():
        if ep.tenant_id == tenant_id and ep.branch == branch and not ep.read_only:
            return ep
    return None


def wait_head_ingested(env: Environment, client: PageserverClient, state: State,
                       tenant_id: TenantId, branch: str, timeline_id: TimelineId) -> None:
    """If a primary runs on the branch, wait until the pageserver has all it flushed, so a
    branch at the head holds every commit made so far."""
    ep = primary_on(state, tenant_id, branch)
    if ep is None or running_pid(env, ep.name) is None:
        return
    target = head_flush_lsn(env, ep)
    # A flush position just past a page header: the last record ended at the page start.
    floor = target.page_start() if target.page_offset() <= 40 else target
    with output.step(f"waiting for the pageserver to ingest branch {branch} up to {target}"):
        wait_for(lambda: client.timeline(tenant_id, timeline_id).last_record_lsn >= floor,
                 timeout_s=INGEST_WAIT_S,
                 what=f"waiting for the pageserver to ingest branch {branch} up to {target}")


def parse_branch_point(at: str | None) -> tuple[Lsn | None, str | None]:
    """`at` as (LSN, None), (None, ISO timestamp) or, for None / "now", (None, None)."""
    if at is None or at.strip().lower() in ("", "now"):
        return None, None
    try:
        lsn = Lsn.parse(at.strip())
    except StrataError:
        try:
            parse_timestamp_us(at)
        except UserError:
            raise UserError(f"branch point {at!r} is neither an LSN (X/Y) nor an ISO 8601 "
                            "timestamp (2026-12-06T01:02:03+00:00)") from None
        # A time in the future would resolve to the head as if it were now: refused.
        parse_past_timestamp_us(at, time.time())
        return None, at.strip()
    if not lsn.is_aligned(8):
        raise UserError(f"--at {lsn} is not 8-byte aligned, so it cannot be the end of a "
                        "WAL record; use pg_current_wal_lsn() right after a commit")
    return lsn, None


def create_branch(env: Environment, config: EnvConfig, name: str, parent: str,
                  at: str | None, tenant: str | None) -> TimelineInfo:
    """Branch `name` from `parent` at `at` (an LSN, an ISO timestamp, or None: the head)."""
    check_name("branch", name)
    state = env.read_state()
    tid = state.tenant_id(tenant)
    if name in state.tenants[tid].branches:
        raise UserError(f"branch {name!r} exists already in tenant {state.tenants[tid].name}; "
                        "see `strata timeline list`")
    parent_id = state.timeline_id(tid, parent)
    lsn, timestamp = parse_branch_point(at)  # before any request: errors are one line
    client = tenant_pageserver(env, config, tid)
    if lsn is None and timestamp is None:
        wait_head_ingested(env, client, state, tid, parent, parent_id)
    with output.step(f"creating branch {name} from {parent}"
                     + (f" at {at}" if lsn or timestamp else " at its head")):
        info = client.branch(tid, parent_id, lsn=lsn, timestamp=timestamp)
    with env.locked() as new_state:
        new_state.tenants[tid].branches[name] = info.timeline_id
        # The roles are in the branch's catalog from the parent: so are their secrets.
        parent_roles = new_state.tenants[tid].roles.get(parent)
        if parent_roles:
            new_state.tenants[tid].roles[name] = dict(parent_roles)
        _record_branch_time(env, info.timeline_id, timestamp or (str(lsn) if lsn else "head"))
    return info


@dataclass(frozen=True, slots=True)
class Restored:
    branch: str
    timeline_id: TimelineId
    lsn: Lsn
    backup: str
    """The name the branch's previous timeline keeps."""
    restarted: tuple[str, ...]


def restore_branch(env: Environment, config: EnvConfig, name: str, timestamp: str,
                   tenant: str | None) -> Restored:
    """Point branch `name` at a new timeline holding its state as of `timestamp` (the end
    of the last commit at or before it); the previous timeline stays as branch
    `NAME-before-restore-YYYYMMDDTHHMMSS` (its children and read-only endpoints stay on it).
    A running primary of the branch is stopped first and started on the new timeline."""
    _, parsed = parse_branch_point(timestamp)
    if parsed is None:
        raise UserError(f"restore needs an ISO 8601 timestamp (2026-12-06T01:02:03+00:00), "
                        f"got {timestamp!r}")
    state = env.read_state()
    tid = state.tenant_id(tenant)
    old_id = state.timeline_id(tid, name)
    client = tenant_pageserver(env, config, tid)
    primary = primary_on(state, tid, name)
    running = primary is not None and running_pid(env, primary.name) is not None
    if running:
        assert primary is not None
        wait_head_ingested(env, client, state, tid, name, old_id)
        stop_endpoint(env, primary, old_id, client=client)
    with output.step(f"creating the timeline of branch {name} as of {parsed}"):
        info = client.branch(tid, old_id, timestamp=parsed)
    assert info.ancestor_lsn is not None, info
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    backup = f"{name[:40]}-before-restore-{stamp}"
    with env.locked() as new_state:
        branches = new_state.tenants[tid].branches
        if backup in branches:
            raise UserError(f"branch {backup} exists already; wait a second and retry")
        branches[backup] = old_id
        branches[name] = info.timeline_id
        for ep_name, ep in list(new_state.endpoints.items()):
            if ep.tenant_id == tid and ep.branch == name and ep.read_only:
                new_state.endpoints[ep_name] = replace(ep, branch=backup)
        _record_branch_time(env, info.timeline_id, f"restore to {parsed}")
    output.info(f"branch {name} now runs on timeline {info.timeline_id} (as of "
                f"{info.ancestor_lsn}); its previous timeline is branch {backup}")
    restarted: tuple[str, ...] = ()
    if running:
        assert primary is not None
        start_named_endpoint(env, config, primary.name, None)
        restarted = (primary.name,)
    return Restored(name, info.timeline_id, info.ancestor_lsn, backup, restarted)


@dataclass(frozen=True, slots=True)
class DeletableBranch:
    """A branch `check_branch_deletable` found free to delete."""

    tenant_id: TenantId
    timeline_id: TimelineId
    client: PageserverClient


def check_branch_deletable(env: Environment, config: EnvConfig, name: str,
                           tenant: str | None) -> DeletableBranch:
    """Branch `name`, or Conflict while it has child branches or endpoints (running or
    not); NotFound without it, Unavailable without the pageserver."""
    state = env.read_state()
    tid = state.tenant_id(tenant)
    timeline_id = state.timeline_id(tid, name)
    client = tenant_pageserver(env, config, tid)
    infos = client.list_timelines(tid)
    names = names_by_id(state.tenants[tid])
    kids = [names.get(i.timeline_id, str(i.timeline_id)) for i in infos
            if i.ancestor_timeline_id == timeline_id]
    if kids:
        raise Conflict(f"cannot delete branch {name}: it has child branches {sorted(kids)}; "
                       "delete them first")
    eps = [ep for ep in state.endpoints.values() if ep.tenant_id == tid and ep.branch == name]
    running = [ep.name for ep in eps if running_pid(env, ep.name) is not None]
    if running:
        raise Conflict(f"cannot delete branch {name}: endpoints {running} run on it; stop "
                       f"them first (`strata endpoint stop {running[0]}`)")
    if eps:
        raise Conflict(f"cannot delete branch {name}: endpoints {[e.name for e in eps]} are "
                       f"defined on it; delete them first (`strata endpoint delete "
                       f"{eps[0].name}`)")
    return DeletableBranch(tid, timeline_id, client)


def delete_branch(env: Environment, config: EnvConfig, name: str,
                  tenant: str | None) -> TimelineId:
    """Delete branch `name` on the pageserver and every safekeeper, then its name (refused
    while it has children or endpoints). If a safekeeper cannot be reached the branch is
    kept, so that a re-run finishes the job."""
    branch = check_branch_deletable(env, config, name, tenant)
    tid, timeline_id, client = branch.tenant_id, branch.timeline_id, branch.client
    with output.step(f"deleting timeline {timeline_id} on the pageserver"):
        try:
            client.delete_timeline(tid, timeline_id)
        except NotFound:
            output.info(f"note: the pageserver had no timeline {timeline_id} any more")
    # The safekeepers' copy (WAL and control file) goes too. Each one is tried; the branch's
    # name is dropped only once all of them are done, so that a re-run finishes the job.
    failed: list[tuple[int, str]] = []
    if config.wal_mode is WalMode.SAFEKEEPERS:
        for sk in config.safekeepers:
            try:
                with output.step(f"deleting timeline {timeline_id} on safekeeper {sk.id}"):
                    deleted = safekeeper_client(sk).delete_timeline(tid, timeline_id)
            except StrataError as err:
                output.info(f"  failed: {err}")
                failed.append((sk.id, str(err)))
                continue
            if not deleted:
                output.info(f"note: safekeeper {sk.id} had no timeline {timeline_id} (no "
                            "primary ran on it, or it was deleted there already)")
    if failed:
        ids = ", ".join(str(i) for i, _ in failed)
        reasons = "; ".join(reason for _, reason in failed)
        raise Unavailable(
            f"branch {name} (timeline {timeline_id}) is not deleted on safekeeper(s) {ids}: "
            f"{reasons}. The branch is kept: start the safekeeper (`strata safekeeper start "
            f"{failed[0][0]}`) and run `strata timeline delete {name}"
            f"{f' --tenant {tenant}' if tenant else ''}` again to finish")
    with env.locked() as new_state:
        new_state.tenants[tid].branches.pop(name, None)
        if timeline_id in new_state.tenants[tid].app_role_timelines:
            new_state.tenants[tid].app_role_timelines.remove(timeline_id)
    return timeline_id


# --- endpoints ---------------------------------------------------------------------------------
def create_endpoint(env: Environment, config: EnvConfig, name: str, branch: str,
                    lsn: str | None, port: int | None, tenant: str | None, *,
                    suspend_timeout_s: float = 300.0) -> EndpointState:
    """Define endpoint `name` on `branch`: a primary, or read-only at `lsn`; the proxy
    suspends it after `suspend_timeout_s` without a client connection (0: never)."""
    check_name("endpoint", name)
    read_lsn = Lsn.parse(lsn) if lsn is not None else None
    if read_lsn is not None and not read_lsn.is_aligned(8):
        raise UserError(f"--lsn {read_lsn} is not 8-byte aligned, so it cannot be the end of "
                        "a WAL record; use pg_current_wal_lsn() right after a commit")
    with env.locked() as state:
        if name in state.endpoints:
            raise UserError(f"endpoint {name!r} exists already; see `strata endpoint list`")
        tid = state.tenant_id(tenant)
        state.timeline_id(tid, branch)  # NotFound for an unknown branch
        if read_lsn is None:
            other = primary_on(state, tid, branch)
            if other is not None:
                raise UserError(f"branch {branch} already has the primary endpoint "
                                f"{other.name}: a branch has one writer; use it, or create "
                                "a read-only endpoint with --lsn")
        if port is not None and any(ep.port == port for ep in state.endpoints.values()):
            raise UserError(f"port {port} is already assigned to another endpoint")
        ep = EndpointState(name, tid, branch, port or allocate_port(config, state),
                           read_lsn, autostart=False,
                           suspend_timeout_s=suspend_timeout_s, port_picked=port is None)
        state.endpoints[name] = ep
    return ep


def check_attached(state: State, tenant_id: TenantId) -> None:
    tenant = state.tenants[tenant_id]
    if not tenant.attached:
        raise UserError(f"tenant {tenant.name} is detached (it is only in object storage); "
                        f"attach it first: `strata tenant attach {tenant.name}`")


def start_named_endpoint(env: Environment, config: EnvConfig, name: str,
                         mode: ComputeMode | None) -> StartResult:
    """Start endpoint `name` (remembering `mode` and that it runs, for `strata start`);
    returns its connection string and the seconds of each phase."""
    state = env.read_state()
    ep = state.endpoint(name)
    check_attached(state, ep.tenant_id)
    started = start_endpoint(env, config, ep, state.timeline_id(ep.tenant_id, ep.branch),
                             mode)
    with env.locked() as new_state:
        if name in new_state.endpoints:
            new_state.endpoints[name] = replace(new_state.endpoints[name], autostart=True,
                                                mode=mode or new_state.endpoints[name].mode)
    return started


def delete_endpoint(env: Environment, name: str) -> None:
    """Delete stopped endpoint `name` with its saved settings; refused while it runs."""
    with env.locked() as state:
        state.endpoint(name)  # NotFound
        pid = running_pid(env, name)
        if pid is not None:
            raise Conflict(f"endpoint {name} is running; stop it first with `strata "
                           f"endpoint stop {name}` (postgres pid {pid})")
        del state.endpoints[name]
    shutil.rmtree(endpoint_paths(env, name).root, ignore_errors=True)


def create_tenant(env: Environment, config: EnvConfig, name: str,
                  overrides: dict[str, Any],
                  import_datadir: Path | None = None) -> tuple[TenantId, TimelineId]:
    """Create tenant `name` with a `main` branch on the pageserver (initdb and import, or
    the import of `import_datadir`: a cleanly shut down PostgreSQL 15 data directory the
    pageserver reads, so on its machine); `overrides` are tenant config keys over the
    environment's [tenant_defaults]."""
    check_name("tenant", name)
    TenantConfig.from_dict({**config.tenant_defaults, **overrides})  # refuse typos early
    if any(t.name == name for t in env.read_state().tenants.values()):
        raise UserError(f"a tenant named {name!r} exists already; see `strata tenant list`")
    client = require_pageserver(env, config)
    conf = {**config.tenant_defaults, **overrides} if overrides else None
    if import_datadir is None:
        with output.step(f"creating tenant {name} (initdb and import into the pageserver)"):
            tenant_id, timeline_id = client.create_tenant(config=conf)
    else:
        datadir = import_datadir.absolute()
        size_mb = _tree_mb(datadir)
        client.timeout_s = IMPORT_TIMEOUT_S
        with output.step(f"creating tenant {name}: importing {datadir} "
                         f"({size_mb:.0f} MB) into the pageserver"):
            tenant_id, timeline_id = client.create_tenant(config=conf,
                                                          import_datadir=str(datadir))
    with env.locked() as state:
        state.tenants[tenant_id] = TenantState(name, {DEFAULT_BRANCH: timeline_id}, overrides)
        if state.default_tenant is None:
            state.default_tenant = tenant_id
    return tenant_id, timeline_id


IMPORT_TIMEOUT_S = 6 * 3600.0  # the pageserver reads the whole data directory


def _tree_mb(root: Path) -> float:
    """Bytes under `root` in MB, for the progress line (0 if we cannot read it: the
    pageserver says why)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total / 1e6


def stop_named_endpoint(env: Environment, name: str, immediate: bool = False) -> bool:
    """Stop endpoint `name` (and forget that it runs); False if it was not running."""
    state = env.read_state()
    ep = state.endpoint(name)
    stopped = stop_endpoint(env, ep, state.timeline_id(ep.tenant_id, ep.branch),
                            immediate=immediate, client=client_if_running(env, ep.tenant_id))
    with env.locked() as new_state:
        if name in new_state.endpoints:
            new_state.endpoints[name] = replace(new_state.endpoints[name], autostart=False)
    return stopped
