"""The environment commands of `strata`: init, start, stop, status, tenant, timeline,
endpoint, pageserver, safekeeper (click). `register(main)` adds them to the CLI group.

Commands translate names (branches, endpoints, tenant names) to ids through the state
file and call `services` / `endpoints` for processes; they print progress on stderr and
their result on stdout (see `output`).
"""

from __future__ import annotations

import re
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import free_port
from strata.control import output
from strata.control.endpoints import (
    COMPUTE_MODES,
    endpoint_paths,
    endpoint_status,
    head_flush_lsn,
    running_pid,
    start_endpoint,
    stop_endpoint,
)
from strata.control.env import (
    DEFAULT_BRANCH,
    DEFAULT_ENDPOINT,
    EndpointState,
    EnvConfig,
    Environment,
    State,
    TenantState,
    tenant_id_of,
)
from strata.control.services import (
    pageserver_client,
    pageserver_status,
    require_pageserver,
    require_safekeeper_mode,
    safekeeper_delete_timeline,
    safekeeper_status,
    start_pageserver,
    start_safekeeper,
    start_safekeepers,
    stop_pageserver,
    stop_safekeeper,
    stop_safekeepers,
)
from strata.control.supervisor import wait_for
from strata.pageserver.client import PageserverClient, TimelineInfo
from strata.storage.tenant import TenantConfig

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
DEFAULT_TENANT_NAME = "default"
INGEST_WAIT_S = 60.0


def _check_name(kind: str, name: str) -> str:
    if _NAME.fullmatch(name) is None:
        raise UserError(f"invalid {kind} name {name!r}: use letters, digits, '_', '.', '-' "
                        "(up to 63, starting with a letter or digit)")
    return name


def _env(ctx: click.Context) -> Environment:
    root = ctx.find_root().obj
    assert isinstance(root, Path), root
    return Environment.open(root)


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
tenant_option = click.option("--tenant", metavar="NAME|ID",
                             help="Tenant (default: the environment's default tenant).")


def _client_if_running(env: Environment) -> PageserverClient | None:
    try:
        return require_pageserver(env, env.config())
    except StrataError:
        return None


# --- init / start / stop / status ------------------------------------------------------------
@click.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="A config TOML to start from (ports 0 or missing are allocated).")
@click.option("--object-storage", "object_storage", metavar="URL|local",
              help="Upload the pageserver's layers to object storage: "
                   "s3://bucket/prefix?endpoint=http://host:port, file:///abs/dir, or "
                   "`local` (a directory inside the environment). Default: none.")
@click.pass_context
def init(ctx: click.Context, config_file: Path | None, object_storage: str | None) -> None:
    """Create an environment: config, pageserver, three safekeepers, a default tenant,
    branch and endpoint `main`.

    The pageserver and safekeepers are left running; `strata start` starts the endpoint."""
    root = ctx.find_root().obj
    assert isinstance(root, Path), root
    config = EnvConfig.load(config_file) if config_file else EnvConfig()
    if object_storage:
        config = _with_object_storage(config, object_storage, root)
    config = config.with_ports_allocated()
    env = Environment.create(root, config)
    output.info(f"created a Strata environment in {root} (config {env.config_path})")
    try:
        start_safekeepers(env, config)
        start_pageserver(env, config)
        client = pageserver_client(config)
        with output.step("creating the default tenant (initdb and import into the "
                         "pageserver)"):
            tenant_id, timeline_id = client.create_tenant()
    except StrataError as err:
        stop_pageserver(env, immediate=True)
        stop_safekeepers(env, config, immediate=True)
        raise UserError(f"{err}\n`strata init` did not finish; remove {root} and run it "
                        "again") from err
    with env.locked() as state:
        state.tenants[str(tenant_id)] = TenantState(DEFAULT_TENANT_NAME,
                                                    {DEFAULT_BRANCH: str(timeline_id)})
        state.default_tenant = str(tenant_id)
        state.endpoints[DEFAULT_ENDPOINT] = EndpointState(
            DEFAULT_ENDPOINT, str(tenant_id), DEFAULT_BRANCH, _allocate_port(config, state),
            autostart=True)
    output.info(f"tenant {tenant_id}: branch {DEFAULT_BRANCH} (timeline {timeline_id}), "
                f"endpoint {DEFAULT_ENDPOINT}")
    output.result(f"initialized {root}; run `strata start` to start endpoint "
                  f"{DEFAULT_ENDPOINT}")


def _with_object_storage(config: EnvConfig, url: str, root: Path) -> EnvConfig:
    """`config` with the pageserver's remote_storage set (checked like the pageserver does)."""
    from strata.pageserver.config import PageserverConfig

    if url == "local":
        url = f"file://{root.resolve() / 'remote_storage'}"
    PageserverConfig(workdir=root, remote_storage=url)  # UserError for a bad URL
    pageserver = replace(config.pageserver,
                         config={**config.pageserver.config, "remote_storage": url})
    return replace(config, pageserver=pageserver)


@click.command()
@click.pass_context
def start(ctx: click.Context) -> None:
    """Start the safekeepers, the pageserver and every endpoint that was running (or, the
    first time, `main`)."""
    env = _env(ctx)
    config = env.config()
    start_safekeepers(env, config)
    start_pageserver(env, config)
    state = env.read_state()
    failed: list[str] = []
    for ep in state.endpoints.values():
        if not ep.autostart:
            continue
        if running_pid(env, ep.name) is not None:
            output.info(f"endpoint {ep.name} already running")
            conn = endpoint_status(env, config, ep)["connstr"]
        else:
            try:
                conn = start_endpoint(env, config, ep,
                                      state.timeline_id(ep.tenant_id, ep.branch))
            except StrataError as err:
                # One endpoint's trouble does not keep the others down.
                output.info(f"strata: error: endpoint {ep.name}: {err}")
                failed.append(ep.name)
                continue
        output.info(f"connect to endpoint {ep.name} with: psql '{conn}'")
        output.result(f"endpoint {ep.name} ({ep.branch}): {conn}")
    if failed:
        raise UserError(f"endpoints {failed} did not start (see above); the rest run")


@click.command()
@click.option("--immediate", is_flag=True,
              help="Stop without a clean shutdown (PostgreSQL `immediate`, pageserver "
                   "SIGKILL); settings and statistics are not saved.")
@click.pass_context
def stop(ctx: click.Context, immediate: bool) -> None:
    """Stop every endpoint, then the pageserver, then the safekeepers."""
    env = _env(ctx)
    client = _client_if_running(env)
    state = env.read_state()
    for ep in state.endpoints.values():
        stop_endpoint(env, ep, state.timeline_id(ep.tenant_id, ep.branch), immediate=immediate,
                      client=client)
    stop_pageserver(env, immediate=immediate)
    stop_safekeepers(env, env.config(), immediate=immediate)
    output.result(f"stopped {env.root}")


@click.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every process: its address, health and LSNs."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    ps = pageserver_status(env, config)
    timelines: list[dict[str, Any]] = []
    if ps.state == "running":
        client = pageserver_client(config, timeout_s=10)
        for tid, tenant in state.tenants.items():
            infos = client.list_timelines(tenant_id_of(tid))
            timelines += [_timeline_json(tenant, info) for info in infos]
    endpoints = [endpoint_status(env, config, ep) for ep in state.endpoints.values()]
    named = [(tid, tl, name) for tid, tenant in state.tenants.items()
             for name, tl in tenant.branches.items()]
    safekeepers = [safekeeper_status(env, sk, named) for sk in config.safekeepers] \
        if config.wal_mode == "safekeepers" else []
    data: dict[str, Any] = {"wal_mode": config.wal_mode,
            "pageserver": {**ps.to_json(), "timelines": timelines},
            "safekeepers": safekeepers, "endpoints": endpoints}
    if as_json:
        output.print_json(data)
        return
    output.table(f"Strata environment {env.root} (wal_mode {config.wal_mode})",
                 ["process", "pid", "address", "state", "LSN"],
                 [["pageserver", ps.pid, f"pg {ps.addresses['pg']}, http {ps.addresses['http']}",
                   ps.state, None],
                  *[[f"safekeeper {sk['id']}", sk["pid"],
                     f"pg {sk['addresses']['pg']}, http {sk['addresses']['http']}",
                     sk["state"], _sk_lsns(sk)] for sk in safekeepers],
                  *[[f"endpoint {e['name']}", e["pid"], e["address"], e["state"],
                     e["current_lsn"]] for e in endpoints]])
    if config.wal_mode == "pageserver":
        output.info("safekeepers: none (development mode: the pageserver receives the WAL, "
                    "D7)")
    for name, proc in [("pageserver", data["pageserver"]),
                       *[(f"safekeeper {sk['id']}", sk) for sk in safekeepers],
                       *[(f"endpoint {e['name']}", e) for e in endpoints],
                       *[(f"walproposer of endpoint {e['name']}", e["walproposer"])
                         for e in endpoints if e["walproposer"]]]:
        if proc["log_tail"] is not None:
            output.info(f"{name} {proc['state']}; last lines of {proc['log']}:\n"
                        f"{proc['log_tail']}")
    if timelines:
        output.table("Timelines on the pageserver",
                     ["branch", "timeline", "last_record_lsn", "disk_consistent_lsn", "state"],
                     [[t["branch"], t["timeline_id"], t["last_record_lsn"],
                       t["disk_consistent_lsn"], t["state"]] for t in timelines])


def _sk_lsns(sk: dict[str, Any]) -> str | None:
    """`branch: commit LSN` of each timeline the safekeeper holds."""
    parts = [f"{t['branch']}: commit {t.get('commit_lsn')}" for t in sk["timelines"]]
    return ", ".join(parts) or None


# --- tenants -----------------------------------------------------------------------------------
@click.group()
def tenant() -> None:
    """Tenants: one initdb'ed cluster each, with its own branches."""


def _parse_settings(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"tenant setting {item!r} must look like key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = text.strip()
    return out


@tenant.command("create")
@click.option("--name", required=True, help="A name for the tenant.")
@click.option("-c", "settings", multiple=True, metavar="KEY=VALUE",
              help="Tenant config (strata.storage.tenant.TenantConfig keys), over the "
                   "environment's [tenant_defaults].")
@click.pass_context
def tenant_create(ctx: click.Context, name: str, settings: tuple[str, ...]) -> None:
    """Create a tenant with a `main` branch."""
    env = _env(ctx)
    config = env.config()
    _check_name("tenant", name)
    overrides = _parse_settings(settings)
    TenantConfig.from_dict({**config.tenant_defaults, **overrides})  # refuse typos early
    if any(t.name == name for t in env.read_state().tenants.values()):
        raise UserError(f"a tenant named {name!r} exists already; see `strata tenant list`")
    client = require_pageserver(env, config)
    with output.step(f"creating tenant {name} (initdb and import into the pageserver)"):
        conf = {**config.tenant_defaults, **overrides} if overrides else None
        tenant_id, timeline_id = client.create_tenant(config=conf)
    with env.locked() as state:
        state.tenants[str(tenant_id)] = TenantState(name, {DEFAULT_BRANCH: str(timeline_id)},
                                                    overrides)
        if state.default_tenant is None:
            state.default_tenant = str(tenant_id)
    output.result(f"created tenant {name} ({tenant_id}) with branch {DEFAULT_BRANCH} "
                  f"(timeline {timeline_id})")


@tenant.command("list")
@json_option
@click.pass_context
def tenant_list(ctx: click.Context, as_json: bool) -> None:
    """The environment's tenants."""
    state = _env(ctx).read_state()
    rows: list[dict[str, Any]] = [
        {"tenant_id": tid, "name": t.name, "default": tid == state.default_tenant,
             "branches": sorted(t.branches)} for tid, t in state.tenants.items()]
    if as_json:
        output.print_json(rows)
        return
    output.table(None, ["name", "tenant", "default", "branches"],
                 [[r["name"], r["tenant_id"], "yes" if r["default"] else "",
                   ", ".join(r["branches"])] for r in rows])


@tenant.command("config")
@click.argument("name", required=False, metavar="[TENANT]")
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE",
              help="Change a key (strata.storage.tenant.TenantConfig); repeatable.")
@json_option
@click.pass_context
def tenant_config(ctx: click.Context, name: str | None, changes: tuple[str, ...],
                  as_json: bool) -> None:
    """Show a tenant's effective config, or change keys of it with --set key=value."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    tid = state.tenant_id(name)
    client = require_pageserver(env, config)
    if changes:
        updates = _parse_settings(changes)
        with output.step(f"changing {sorted(updates)} of tenant {state.tenants[tid].name}"):
            conf = client.set_tenant_config(tenant_id_of(tid), updates)
        with env.locked() as new_state:
            new_state.tenants[tid].config.update(updates)
    else:
        conf = client.tenant_config(tenant_id_of(tid))
    if as_json:
        output.print_json({"tenant_id": tid, "name": state.tenants[tid].name, "config": conf})
        return
    output.table(f"tenant {state.tenants[tid].name} ({tid})", ["key", "value"],
                 [[k, v] for k, v in conf.items()])


# --- timelines ---------------------------------------------------------------------------------
@click.group()
def timeline() -> None:
    """Timelines, named as branches."""


def _names_by_id(tenant: TenantState) -> dict[str, str]:
    return {tl: name for name, tl in tenant.branches.items()}


def _timeline_json(tenant: TenantState, info: TimelineInfo) -> dict[str, Any]:
    names = _names_by_id(tenant)
    parent = info.ancestor_timeline_id
    return {"branch": names.get(str(info.timeline_id)), "tenant_id": str(info.tenant_id),
            "timeline_id": str(info.timeline_id),
            "parent": names.get(str(parent)) if parent else None,
            "parent_timeline_id": str(parent) if parent else None,
            "branch_lsn": str(info.ancestor_lsn) if info.ancestor_lsn else None,
            "last_record_lsn": str(info.last_record_lsn),
            "disk_consistent_lsn": str(info.disk_consistent_lsn), "state": info.state}


def _primary_on(state: State, tenant_id: str, branch: str) -> EndpointState | None:
    for ep in state.endpoints.values():
        if ep.tenant_id == tenant_id and ep.branch == branch and not ep.read_only:
            return ep
    return None


def _wait_head_ingested(env: Environment, client: PageserverClient, state: State,
                        tenant_id: str, branch: str, timeline_id: TimelineId) -> None:
    """If a primary runs on the branch, wait until the pageserver has all it flushed, so a
    branch at the head holds every commit made so far."""
    ep = _primary_on(state, tenant_id, branch)
    if ep is None or running_pid(env, ep.name) is None:
        return
    target = head_flush_lsn(env, ep)
    # A flush position just past a page header: the last record ended at the page start.
    floor = target.page_start() if target.page_offset() <= 40 else target
    tid = tenant_id_of(tenant_id)
    with output.step(f"waiting for the pageserver to ingest branch {branch} up to {target}"):
        wait_for(lambda: client.timeline(tid, timeline_id).last_record_lsn >= floor,
                 timeout_s=INGEST_WAIT_S,
                 what=f"waiting for the pageserver to ingest branch {branch} up to {target}")


@timeline.command("branch")
@click.argument("name")
@click.option("--parent", default=DEFAULT_BRANCH, show_default=True, help="Parent branch.")
@click.option("--at", "at", metavar="LSN|TIMESTAMP",
              help="Branch point: an LSN that ends a record (e.g. pg_current_wal_lsn() "
                   "right after a commit) or an ISO 8601 timestamp (the last commit at or "
                   "before it). Default: the parent's head, with every commit so far.")
@tenant_option
@click.pass_context
def timeline_branch(ctx: click.Context, name: str, parent: str, at: str | None,
                    tenant: str | None) -> None:
    """Create branch NAME from a parent branch (O(1): no data is copied)."""
    env = _env(ctx)
    config = env.config()
    _check_name("branch", name)
    state = env.read_state()
    tid = state.tenant_id(tenant)
    if name in state.tenants[tid].branches:
        raise UserError(f"branch {name!r} exists already in tenant {state.tenants[tid].name}; "
                        "see `strata timeline list`")
    parent_id = state.timeline_id(tid, parent)
    client = require_pageserver(env, config)
    lsn: Lsn | None = None
    timestamp: str | None = None
    if at is None:
        _wait_head_ingested(env, client, state, tid, parent, parent_id)
    else:
        try:
            lsn = Lsn.parse(at)
        except StrataError:
            timestamp = at
        if lsn is not None and not lsn.is_aligned(8):
            raise UserError(f"--at {lsn} is not 8-byte aligned, so it cannot be the end of a "
                            "WAL record; use pg_current_wal_lsn() right after a commit")
    with output.step(f"creating branch {name} from {parent}"
                     + (f" at {at}" if at else " at its head")):
        info = client.branch(tenant_id_of(tid), parent_id, lsn=lsn, timestamp=timestamp)
    with env.locked() as new_state:
        new_state.tenants[tid].branches[name] = str(info.timeline_id)
    output.result(f"created branch {name} (timeline {info.timeline_id}) from {parent} at "
                  f"{info.ancestor_lsn}")


@timeline.command("list")
@tenant_option
@json_option
@click.pass_context
def timeline_list(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """The branches as a tree: each with its parent and branch LSN."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    tid = state.tenant_id(tenant)
    client = require_pageserver(env, config)
    rows = [_timeline_json(state.tenants[tid], info)
            for info in client.list_timelines(tenant_id_of(tid))]
    if as_json:
        output.print_json(rows)
        return
    children: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        children.setdefault(row["parent_timeline_id"], []).append(row)
    lines: list[list[object]] = []

    def walk(parent: str | None, prefix: str) -> None:
        kids = sorted(children.get(parent, []),
                      key=lambda r: (Lsn.parse(r["branch_lsn"] or "0/0"), r["branch"] or ""))
        for i, row in enumerate(kids):
            last = i == len(kids) - 1
            mark = "" if parent is None else ("└─ " if last else "├─ ")
            label = row["branch"] or f"(unnamed {row['timeline_id'][:8]})"
            at = f" @ {row['branch_lsn']}" if row["branch_lsn"] else ""
            lines.append([prefix + mark + label + at, row["timeline_id"],
                          row["last_record_lsn"], row["state"]])
            walk(row["timeline_id"], prefix + ("" if parent is None else
                                                ("   " if last else "│  ")))

    walk(None, "")
    output.table(f"tenant {state.tenants[tid].name} ({tid})",
                 ["branch @ branch LSN", "timeline", "last_record_lsn", "state"], lines)


@timeline.command("delete")
@click.argument("name")
@tenant_option
@click.pass_context
def timeline_delete(ctx: click.Context, name: str, tenant: str | None) -> None:
    """Delete branch NAME on the pageserver and on every safekeeper, then its name (refused
    while it has children or endpoints). If a safekeeper cannot be reached the branch is
    kept: start it and run the command again to finish."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    tid = state.tenant_id(tenant)
    timeline_id = state.timeline_id(tid, name)
    client = require_pageserver(env, config)
    infos = client.list_timelines(tenant_id_of(tid))
    names = _names_by_id(state.tenants[tid])
    kids = [names.get(str(i.timeline_id), str(i.timeline_id)) for i in infos
            if i.ancestor_timeline_id == timeline_id]
    if kids:
        raise UserError(f"cannot delete branch {name}: it has child branches {sorted(kids)}; "
                        "delete them first")
    eps = [ep for ep in state.endpoints.values() if ep.tenant_id == tid and ep.branch == name]
    running = [ep.name for ep in eps if running_pid(env, ep.name) is not None]
    if running:
        raise UserError(f"cannot delete branch {name}: endpoints {running} run on it; stop "
                        f"them first (`strata endpoint stop {running[0]}`)")
    if eps:
        raise UserError(f"cannot delete branch {name}: endpoints {[e.name for e in eps]} are "
                        f"defined on it; delete them first (`strata endpoint delete "
                        f"{eps[0].name}`)")
    with output.step(f"deleting timeline {timeline_id} on the pageserver"):
        try:
            client.delete_timeline(tenant_id_of(tid), timeline_id)
        except NotFound:
            output.info(f"note: the pageserver had no timeline {timeline_id} any more")
    # The safekeepers' copy (WAL and control file) goes too. Each one is tried; the branch's
    # name is dropped only once all of them are done, so that a re-run finishes the job.
    failed: list[tuple[int, str]] = []
    if config.wal_mode == "safekeepers":
        for sk in config.safekeepers:
            try:
                with output.step(f"deleting timeline {timeline_id} on safekeeper {sk.id}"):
                    deleted = safekeeper_delete_timeline(sk, str(tenant_id_of(tid)),
                                                         str(timeline_id))
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
    output.result(f"deleted branch {name} (timeline {timeline_id})")


# --- endpoints ---------------------------------------------------------------------------------
@click.group()
def endpoint() -> None:
    """Endpoints: a PostgreSQL 15 compute on a branch (primary, or read-only at an LSN)."""


def _allocate_port(config: EnvConfig, state: State) -> int:
    used = {ep.port for ep in state.endpoints.values()}
    used |= config.ports()
    for _ in range(100):
        port = free_port(config.endpoint_defaults.host)
        if port not in used:
            return port
    raise UserError("could not allocate a free port for the endpoint")


@endpoint.command("create")
@click.argument("name")
@click.option("--branch", required=True, help="The branch the endpoint runs on.")
@click.option("--lsn", metavar="LSN", help="Read-only at this LSN (a hot standby); "
                                           "without it, a read-write primary at the head.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: allocated).")
@tenant_option
@click.pass_context
def endpoint_create(ctx: click.Context, name: str, branch: str, lsn: str | None,
                    port: int | None, tenant: str | None) -> None:
    """Define endpoint NAME on a branch (start it with `strata endpoint start NAME`)."""
    env = _env(ctx)
    config = env.config()
    _check_name("endpoint", name)
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
            other = _primary_on(state, tid, branch)
            if other is not None:
                raise UserError(f"branch {branch} already has the primary endpoint "
                                f"{other.name}: a branch has one writer; use it, or create "
                                "a read-only endpoint with --lsn")
        if port is not None and any(ep.port == port for ep in state.endpoints.values()):
            raise UserError(f"port {port} is already assigned to another endpoint")
        ep = EndpointState(name, tid, branch, port or _allocate_port(config, state),
                           str(read_lsn) if read_lsn is not None else None, autostart=False)
        state.endpoints[name] = ep
    kind = f"read-only at {read_lsn}" if read_lsn is not None else "primary"
    output.result(f"created endpoint {name} on branch {branch} ({kind}, port {ep.port})")


@endpoint.command("start")
@click.argument("name")
@click.option("--mode", type=click.Choice(COMPUTE_MODES),
              help="lazy: pages fetched on demand over FUSE (a quick start whatever the "
                   "size); full: a whole basebackup. Default: the endpoint's last --mode, "
                   "else lazy where FUSE is usable (else full, with a warning saying why).")
@click.pass_context
def endpoint_start(ctx: click.Context, name: str, mode: str | None) -> None:
    """Start endpoint NAME; prints its connection string as the last line."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    ep = state.endpoint(name)
    conn = start_endpoint(env, config, ep, state.timeline_id(ep.tenant_id, ep.branch), mode)
    with env.locked() as new_state:
        if name in new_state.endpoints:
            new_state.endpoints[name] = replace(new_state.endpoints[name], autostart=True,
                                                mode=mode or new_state.endpoints[name].mode)
    output.result(conn)


def _with_autostart(ep: EndpointState, value: bool) -> EndpointState:
    return replace(ep, autostart=value)


@endpoint.command("stop")
@click.argument("name")
@click.option("--immediate", is_flag=True, help="Crash-stop (settings are not saved).")
@click.pass_context
def endpoint_stop(ctx: click.Context, name: str, immediate: bool) -> None:
    """Stop endpoint NAME (a clean stop saves its ALTER SYSTEM settings and statistics)."""
    env = _env(ctx)
    state = env.read_state()
    ep = state.endpoint(name)
    stopped = stop_endpoint(env, ep, state.timeline_id(ep.tenant_id, ep.branch),
                            immediate=immediate, client=_client_if_running(env))
    with env.locked() as new_state:
        if name in new_state.endpoints:
            new_state.endpoints[name] = _with_autostart(new_state.endpoints[name], False)
    output.result(f"stopped endpoint {name}" if stopped else f"endpoint {name} was not running")


@endpoint.command("delete")
@click.argument("name")
@click.pass_context
def endpoint_delete(ctx: click.Context, name: str) -> None:
    """Delete endpoint NAME (it must be stopped), with its saved settings."""
    env = _env(ctx)
    with env.locked() as state:
        state.endpoint(name)
        pid = running_pid(env, name)
        if pid is not None:
            raise UserError(f"endpoint {name} is running (postgres pid {pid}); stop it first "
                            f"with `strata endpoint stop {name}`")
        del state.endpoints[name]
    shutil.rmtree(endpoint_paths(env, name).root, ignore_errors=True)
    output.result(f"deleted endpoint {name}")


@endpoint.command("list")
@json_option
@click.pass_context
def endpoint_list(ctx: click.Context, as_json: bool) -> None:
    """The endpoints: branch, mode, address, state, connection string."""
    env = _env(ctx)
    config = env.config()
    rows = [endpoint_status(env, config, ep) for ep in env.read_state().endpoints.values()]
    if as_json:
        output.print_json(rows)
        return
    output.table(None, ["endpoint", "branch", "mode", "compute", "address", "state",
                        "connect"],
                 [[r["name"], r["branch"], r["mode"] + (f" @ {r['lsn']}" if r["lsn"] else ""),
                   r["compute_mode"], r["address"], r["state"], r["connstr"]] for r in rows])


# --- services ----------------------------------------------------------------------------------
@click.group()
def pageserver() -> None:
    """The pageserver process."""


@pageserver.command("start")
@click.pass_context
def pageserver_start(ctx: click.Context) -> None:
    env = _env(ctx)
    pid = start_pageserver(env, env.config())
    output.result(f"pageserver running (pid {pid})")


@pageserver.command("stop")
@click.option("--immediate", is_flag=True, help="SIGKILL instead of a clean stop.")
@click.pass_context
def pageserver_stop(ctx: click.Context, immediate: bool) -> None:
    stop_pageserver(_env(ctx), immediate=immediate)
    output.result("pageserver stopped")


@pageserver.command("restart")
@click.pass_context
def pageserver_restart(ctx: click.Context) -> None:
    env = _env(ctx)
    stop_pageserver(env)
    pid = start_pageserver(env, env.config())
    output.result(f"pageserver running (pid {pid})")


@click.group()
def safekeeper() -> None:
    """The safekeeper processes (wal_mode = "safekeepers")."""


def _safekeeper_ids(config: EnvConfig, sk_id: int | None) -> list[int]:
    require_safekeeper_mode(config)
    return [config.safekeeper(sk_id).id] if sk_id is not None else \
        [sk.id for sk in config.safekeepers]


sk_id_argument = click.argument("sk_id", required=False, metavar="[ID]", type=int)


@safekeeper.command("start")
@sk_id_argument
@click.pass_context
def safekeeper_start(ctx: click.Context, sk_id: int | None) -> None:
    """Start safekeeper ID (all without ID)."""
    env = _env(ctx)
    config = env.config()
    for i in _safekeeper_ids(config, sk_id):
        pid = start_safekeeper(env, config.safekeeper(i))
        output.result(f"safekeeper {i} running (pid {pid})")


@safekeeper.command("stop")
@sk_id_argument
@click.option("--immediate", is_flag=True, help="SIGKILL instead of a clean stop.")
@click.pass_context
def safekeeper_stop(ctx: click.Context, sk_id: int | None, immediate: bool) -> None:
    """Stop safekeeper ID (all without ID). Endpoints keep committing while a majority
    of the safekeepers runs."""
    env = _env(ctx)
    config = env.config()
    for i in _safekeeper_ids(config, sk_id):
        stop_safekeeper(env, i, immediate=immediate)
        output.result(f"safekeeper {i} stopped")


@safekeeper.command("restart")
@sk_id_argument
@click.pass_context
def safekeeper_restart(ctx: click.Context, sk_id: int | None) -> None:
    """Restart safekeeper ID (all without ID, one after the other, so that a majority
    stays up)."""
    env = _env(ctx)
    config = env.config()
    for i in _safekeeper_ids(config, sk_id):
        stop_safekeeper(env, i)
        pid = start_safekeeper(env, config.safekeeper(i))
        output.result(f"safekeeper {i} running (pid {pid})")


def register(main: click.Group) -> None:
    for command in (init, start, stop, status, tenant, timeline, endpoint, pageserver,
                    safekeeper):
        main.add_command(command)
