"""The environment commands of `strata`: init, start, stop, status, tenant, timeline,
endpoint, pageserver, safekeeper (click). `register(main)` adds them to the CLI group.

Commands translate names (branches, endpoints, tenant names) to ids through the state
file and call `services` / `endpoints` for processes; they print progress on stderr and
their result on stdout (see `output`).
"""

from __future__ import annotations

import os
import time
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from strata.common.auth import Scope
from strata.common.errors import StrataError, UserError
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.control import output
from strata.control.auth_setup import export_cli_token, make_keys, token_for
from strata.control.endpoints import (
    APP_ROLE,
    COMPUTE_MODES,
    endpoint_status,
    running_pid,
    start_endpoint,
    stop_endpoint,
)
from strata.control.env import (
    DEFAULT_BRANCH,
    DEFAULT_ENDPOINT,
    ComputeMode,
    EndpointState,
    EnvConfig,
    Environment,
    TenantState,
    WalMode,
    allocate_port,
)
from strata.control.operations import (
    check_attached,
    client_if_running,
    create_branch,
    create_endpoint,
    create_tenant,
    delete_branch,
    delete_endpoint,
    names_by_id,
    restore_branch,
    start_named_endpoint,
    stop_named_endpoint,
    timeline_json,
)
from strata.control.services import (
    console_status,
    console_url,
    pageserver_client,
    pageserver_status,
    require_safekeeper_mode,
    safekeeper_status,
    start_console,
    start_pageserver,
    start_safekeeper,
    start_safekeepers,
    stop_console,
    stop_pageserver,
    stop_pageservers,
    stop_safekeeper,
    stop_safekeepers,
    tenant_pageserver,
)
from strata.pageserver.api import check_remote_storage_url

DEFAULT_TENANT_NAME = "default"


def _env(ctx: click.Context) -> Environment:
    root = ctx.find_root().obj
    assert isinstance(root, Path), root
    env = Environment.open(root)
    export_cli_token(env, env.config())
    return env


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, for scripts.")
tenant_option = click.option("--tenant", metavar="NAME|ID",
                             help="Tenant (default: the environment's default tenant).")


# --- init / start / stop / status ------------------------------------------------------------
@click.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False,
                                                         path_type=Path),
              help="A config TOML to start from (ports 0 or missing are allocated).")
@click.option("--object-storage", "object_storage", metavar="URL|local|seaweedfs",
              help="Upload the pageserver's layers to object storage: "
                   "s3://bucket/prefix?endpoint=http://host:port, file:///abs/dir, "
                   "`local` (a directory inside the environment), or `seaweedfs` (a "
                   "SeaweedFS S3 server on loopback, run by `strata start/stop`). "
                   "Default: none.")
@click.option("--no-auth", is_flag=True,
              help="Services accept every request (default: they require JWTs signed by "
                   "a key pair made here; docs/auth.md).")
@click.pass_context
def init(ctx: click.Context, config_file: Path | None, object_storage: str | None,
         no_auth: bool) -> None:
    """Create an environment: config, key pair, pageserver, three safekeepers, a default
    tenant, branch and endpoint `main`.

    The pageserver and safekeepers are left running; `strata start` starts the endpoint."""
    from strata.control.object_storage import start_seaweed, stop_seaweed
    from strata.control.proxy import ensure_certificate

    root = ctx.find_root().obj
    assert isinstance(root, Path), root
    config = EnvConfig.load(config_file) if config_file else EnvConfig()
    if object_storage:
        config = _with_object_storage(config, object_storage, root)
    config = replace(config.with_ports_allocated(), auth=not no_auth)
    env = Environment.create(root, config)
    env.console_token()
    if config.auth:
        make_keys(env)
    export_cli_token(env, config)
    output.info(f"created a Strata environment in {root} (config {env.config_path}, "
                f"auth {'on' if config.auth else 'off'})")
    try:
        ensure_certificate(env, config)
        start_seaweed(env, config)
        config = env.config()  # SeaweedFS's ports, if another process took one
        # A port picked above and taken meanwhile by another process is picked again.
        start_safekeepers(env, config, repick_ports=True)
        start_pageserver(env, config, repick_ports=True)
        config = env.config()
        client = pageserver_client(config)
        with output.step("creating the default tenant (initdb and import into the "
                         "pageserver)"):
            tenant_id, timeline_id = client.create_tenant()
    except StrataError as err:
        stop_pageserver(env, immediate=True)
        stop_safekeepers(env, config, immediate=True)
        stop_seaweed(env, config, immediate=True)
        raise UserError(f"{err}\n`strata init` did not finish; remove {root} and run it "
                        "again") from err
    with env.locked() as state:
        state.tenants[tenant_id] = TenantState(DEFAULT_TENANT_NAME,
                                               {DEFAULT_BRANCH: timeline_id})
        state.default_tenant = tenant_id
        state.endpoints[DEFAULT_ENDPOINT] = EndpointState(
            DEFAULT_ENDPOINT, tenant_id, DEFAULT_BRANCH, allocate_port(config, state),
            autostart=True, port_picked=True)
    output.info(f"tenant {tenant_id}: branch {DEFAULT_BRANCH} (timeline {timeline_id}), "
                f"endpoint {DEFAULT_ENDPOINT}")
    output.result(f"initialized {root}; run `strata start` to start endpoint "
                  f"{DEFAULT_ENDPOINT}")


def _with_object_storage(config: EnvConfig, url: str, root: Path) -> EnvConfig:
    """`config` with the pageserver's remote_storage set (checked like the pageserver does)."""
    from strata.control.object_storage import allocate_seaweed_ports, seaweed_url

    if url == "seaweedfs":
        ports = allocate_seaweed_ports()
        config = replace(config, seaweedfs=ports, picked_ports={
            **config.picked_ports, **{f"seaweedfs.{name}": p for name, p in ports.items()}})
        url = seaweed_url(ports)
    elif url == "local":
        url = f"file://{root.resolve() / 'remote_storage'}"
    check_remote_storage_url(url)  # UserError for a bad URL, as the pageserver would
    pageserver = replace(config.pageserver,
                         config={**config.pageserver.config, "remote_storage": url})
    return replace(config, pageserver=pageserver)


@click.command()
@click.pass_context
def start(ctx: click.Context) -> None:
    """Start SeaweedFS (if the environment runs one), the safekeepers, the pageserver
    (attaching from object storage the tenants it lost), the console, the proxy and every
    endpoint that was running (or, the first time, `main`)."""
    from strata.control.object_storage import start_seaweed
    from strata.control.proxy import start_proxy

    env = _env(ctx)
    config = env.config()
    if config.proxy.port == 0:  # an environment made before the proxy existed
        config = config.with_ports_allocated()
        env.write_config(config)
    start_seaweed(env, config)
    config = env.config()  # SeaweedFS's ports, if another process took one
    start_safekeepers(env, config)
    _start_pageservers(env, config, None)
    config = start_console(env, config)
    output.result(f"console: {console_url(config)} (log in with the token in "
                  f"{env.console_token_path})")
    start_proxy(env, config)
    config = env.config()  # the proxy's port, if it was picked again
    state = env.read_state()
    failed: list[str] = []
    for ep in state.endpoints.values():
        if not ep.autostart:
            continue
        if not state.tenants[ep.tenant_id].attached:
            output.info(f"endpoint {ep.name} not started: its tenant is detached")
            continue
        if running_pid(env, ep.name) is not None:
            output.info(f"endpoint {ep.name} already running")
            conn = endpoint_status(env, config, ep)["connstr"]
        else:
            try:
                conn = start_endpoint(env, config, ep,
                                      state.timeline_id(ep.tenant_id, ep.branch)).connstr
            except StrataError as err:
                # One endpoint's trouble does not keep the others down.
                output.info(f"strata: error: endpoint {ep.name}: {err}")
                failed.append(ep.name)
                continue
        output.info(f"connect to endpoint {ep.name} with: psql '{conn}'")
        _password_note(env, ep)
        output.result(f"endpoint {ep.name} ({ep.branch}): {conn}")
    if failed:
        raise UserError(f"endpoints {failed} did not start (see above); the rest run")


@click.command()
@click.option("--immediate", is_flag=True,
              help="Stop without a clean shutdown (PostgreSQL `immediate`, pageserver "
                   "SIGKILL); settings and statistics are not saved.")
@click.pass_context
def stop(ctx: click.Context, immediate: bool) -> None:
    """Stop the proxy, every endpoint, then the pageserver, the safekeepers and SeaweedFS
    (if the environment runs one)."""
    from strata.control.object_storage import stop_seaweed
    from strata.control.proxy import stop_proxy

    env = _env(ctx)
    stop_proxy(env, immediate=immediate)
    state = env.read_state()
    for ep in state.endpoints.values():
        stop_endpoint(env, ep, state.timeline_id(ep.tenant_id, ep.branch), immediate=immediate,
                      client=client_if_running(env, ep.tenant_id)
                      if running_pid(env, ep.name) is not None else None)
    stop_console(env, immediate=immediate)
    stop_pageservers(env, env.config(), immediate=immediate)
    stop_safekeepers(env, env.config(), immediate=immediate)
    stop_seaweed(env, env.config(), immediate=immediate)
    output.result(f"stopped {env.root}")


@click.command()
@json_option
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Every process: its address, health and LSNs."""
    from strata.control.attachments import tenant_attachments
    from strata.control.object_storage import object_storage_status
    from strata.control.proxy import proxy_status

    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    pageservers = [pageserver_status(env, config, p.id) for p in config.pageservers]
    ps = pageservers[0]
    timelines: list[dict[str, Any]] = []
    for p, p_status in zip(config.pageservers, pageservers, strict=True):
        if p_status.state != "running":
            continue
        client = pageserver_client(config, timeout_s=10, ps_id=p.id)
        for tid, tenant in state.tenants.items():
            if not tenant.attached or tenant.pageserver != p.id:
                continue  # only in object storage (`strata tenant attach`), or elsewhere
            infos = client.list_timelines(tid)
            timelines += [{**timeline_json(tenant, info), "pageserver": p.id}
                          for info in infos]
    stale = [(tid, a) for tid, found in tenant_attachments(env, config, state).items()
             for a in found if a.stale]
    proxy = proxy_status(env, config)
    console_proc = console_status(env, config)
    endpoints = [_with_proxy(endpoint_status(env, config, ep), proxy)
                 for ep in state.endpoints.values()]
    named = [(tid, tl, name) for tid, tenant in state.tenants.items()
             for name, tl in tenant.branches.items()]
    safekeepers = [safekeeper_status(env, sk, named) for sk in config.safekeepers] \
        if config.wal_mode is WalMode.SAFEKEEPERS else []
    storage = object_storage_status(env, config)
    seaweed = storage["seaweedfs"] if storage is not None else None
    data: dict[str, Any] = {"wal_mode": config.wal_mode, "commit_mode": config.commit_mode,
            "pageserver": {**ps.to_json(), "timelines": timelines},
            "pageservers": [{"id": p.id, **s.to_json()}
                            for p, s in zip(config.pageservers, pageservers, strict=True)],
            "safekeepers": safekeepers, "endpoints": endpoints, "proxy": proxy,
            "console": console_proc, "object_storage": storage,
            "stale_attachments": [{"tenant_id": str(tid), "name": state.tenants[tid].name,
                                   **a.to_json()} for tid, a in stale]}
    if as_json:
        output.print_json(data)
        return
    output.table(f"Strata environment {env.root} (wal_mode {config.wal_mode})",
                 ["process", "pid", "address", "state", "LSN", "connections"],
                 [*[[p.name, p.pid, f"pg {p.addresses['pg']}, http {p.addresses['http']}",
                     p.state, None, None] for p in pageservers],
                  *[[f"safekeeper {sk['id']}", sk["pid"],
                     f"pg {sk['addresses']['pg']}, http {sk['addresses']['http']}",
                     sk["state"], _sk_lsns(sk), None] for sk in safekeepers],
                  ["proxy", proxy["pid"], f"{proxy['address']} (*.{proxy['domain']})",
                   proxy["state"], None, None],
                  ["console", console_proc["pid"], console_proc["url"], console_proc["state"],
                   None, None],
                  *([["SeaweedFS", seaweed["pid"], f"s3 {seaweed['address']}",
                      seaweed["state"], None, None]] if seaweed is not None else []),
                  *[[f"endpoint {e['name']}", e["pid"], e["address"], e["state"],
                     e["current_lsn"], e["connections"]] for e in endpoints]])
    output.info(f"object storage: {storage['url']}" if storage is not None
                else "object storage: none")
    if config.wal_mode is WalMode.PAGESERVER:
        output.info("safekeepers: none (development mode: the pageserver receives the WAL, "
                    "D7)")
    for name, proc in [*[(p.name, p.to_json()) for p in pageservers], ("proxy", proxy),
                       ("console", console_proc),
                       *([("SeaweedFS", seaweed)] if seaweed is not None else []),
                       *[(f"safekeeper {sk['id']}", sk) for sk in safekeepers],
                       *[(f"endpoint {e['name']}", e) for e in endpoints],
                       *[(f"walproposer of endpoint {e['name']}", e["walproposer"])
                         for e in endpoints if e["walproposer"]]]:
        if proc["log_tail"] is not None:
            output.info(f"{name} {proc['state']}; last lines of {proc['log']}:\n"
                        f"{proc['log_tail']}")
    for tid, a in stale:
        name = state.tenants[tid].name
        output.info(f"warning: tenant {name} ({tid}) on {a.describe(name)}")
    if timelines:
        output.table("Timelines on the pageserver",
                     ["branch", "timeline", "last_record_lsn", "disk_consistent_lsn", "state"],
                     [[t["branch"], t["timeline_id"], t["last_record_lsn"],
                       t["disk_consistent_lsn"], t["state"]] for t in timelines])


def _with_proxy(ep: dict[str, Any], proxy: dict[str, Any]) -> dict[str, Any]:
    """An endpoint's status with what the proxy says: its client connections through the
    proxy, and "suspended" for a stopped endpoint the running proxy wakes on connect."""
    seen = proxy["endpoints"].get(ep["name"], {})
    ep["connections"] = seen.get("connections", 0)
    if seen.get("activity"):
        ep["state"] = seen["activity"]  # "starting" / "stopping"
    elif ep["state"] == "stopped" and proxy["state"] == "running":
        ep["state"] = "suspended"
    return ep


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
              help="Tenant config (strata.pageserver.api.TenantConfig keys), over the "
                   "environment's [tenant_defaults].")
@click.option("--import-datadir", "import_datadir", metavar="PATH",
              type=click.Path(path_type=Path),
              help="Start `main` from this cleanly shut down (`pg_ctl stop -m fast`) stock "
                   "PostgreSQL 15 data directory instead of a fresh initdb. The pageserver "
                   "reads PATH itself (it must run on this machine and its user must be "
                   "able to read PATH); PATH is not changed.")
@click.pass_context
def tenant_create(ctx: click.Context, name: str, settings: tuple[str, ...],
                  import_datadir: Path | None) -> None:
    """Create a tenant with a `main` branch."""
    env = _env(ctx)
    tenant_id, timeline_id = create_tenant(env, env.config(), name, _parse_settings(settings),
                                           import_datadir)
    output.result(f"created tenant {name} ({tenant_id}) with branch {DEFAULT_BRANCH} "
                  f"(timeline {timeline_id})")


@tenant.command("list")
@json_option
@click.pass_context
def tenant_list(ctx: click.Context, as_json: bool) -> None:
    """The environment's tenants, with every running pageserver's attachment of each: a
    stale one (an older generation than the tenant's newest) should be detached."""
    from strata.control.attachments import tenant_attachments

    env = _env(ctx)
    state = env.read_state()
    attachments = tenant_attachments(env, env.config(), state)
    rows: list[dict[str, Any]] = [
        {"tenant_id": str(tid), "name": t.name, "default": tid == state.default_tenant,
         "branches": sorted(t.branches), "attached": t.attached, "generation": t.generation,
         "pageserver": t.pageserver,
         "attachments": [a.to_json() for a in attachments[tid]]}
        for tid, t in state.tenants.items()]
    if as_json:
        output.print_json(rows)
        return
    output.table(None, ["name", "tenant", "default", "branches", "attached", "generation",
                        "pageserver", "attachments"],
                 [[r["name"], r["tenant_id"], "yes" if r["default"] else "",
                   ", ".join(r["branches"]), "yes" if r["attached"] else "no",
                   r["generation"], r["pageserver"],
                   ", ".join(f"{a['pageserver']}: {a['generation_state']} (generation "
                             f"{a['generation']})" for a in r["attachments"])]
                  for r in rows])
    for tid, t in state.tenants.items():
        for a in attachments[tid]:
            if a.stale:
                output.info(f"warning: tenant {t.name} ({tid}) on {a.describe(t.name)}")


@tenant.command("config")
@click.argument("name", required=False, metavar="[TENANT]")
@click.option("--set", "changes", multiple=True, metavar="KEY=VALUE",
              help="Change a key (strata.pageserver.api.TenantConfig); repeatable.")
@json_option
@click.pass_context
def tenant_config(ctx: click.Context, name: str | None, changes: tuple[str, ...],
                  as_json: bool) -> None:
    """Show a tenant's effective config, or change keys of it with --set key=value."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    tid = state.tenant_id(name)
    client = tenant_pageserver(env, config, tid)
    if changes:
        updates = _parse_settings(changes)
        with output.step(f"changing {sorted(updates)} of tenant {state.tenants[tid].name}"):
            conf = client.set_tenant_config(tid, updates)
        with env.locked() as new_state:
            new_state.tenants[tid].config.update(updates)
    else:
        conf = client.tenant_config(tid)
    if as_json:
        output.print_json({"tenant_id": str(tid), "name": state.tenants[tid].name,
                           "config": conf})
        return
    output.table(f"tenant {state.tenants[tid].name} ({tid})", ["key", "value"],
                 [[k, v] for k, v in conf.items()])


@tenant.command("size")
@click.argument("name", required=False, metavar="[TENANT]")
@json_option
@click.pass_context
def tenant_size(ctx: click.Context, name: str | None, as_json: bool) -> None:
    """Bytes of TENANT's layer files on the pageserver's disk (local) and in the last
    uploaded indexes in object storage (remote), per branch and in all."""
    env = _env(ctx)
    config = env.config()
    state = env.read_state()
    tid = state.tenant_id(name)
    tenant = state.tenants[tid]
    check_attached(state, tid)
    sizes = tenant_pageserver(env, config, tid).tenant_size(tid)
    names = names_by_id(tenant)
    rows = [{"branch": names.get(TimelineId.parse(t["timeline_id"])), **t}
            for t in sizes["timelines"]]
    if as_json:
        output.print_json({"tenant_id": str(tid), "name": tenant.name,
                           "local_bytes": sizes["local_bytes"],
                           "remote_bytes": sizes["remote_bytes"], "timelines": rows})
        return
    output.table(f"tenant {tenant.name} ({tid})", ["branch", "timeline", "local", "remote"],
                 [*[[r["branch"], r["timeline_id"], r["local_bytes"], r["remote_bytes"]]
                    for r in rows],
                  ["(all)", None, sizes["local_bytes"], sizes["remote_bytes"]]])


@tenant.command("relocate")
@click.argument("name", metavar="TENANT")
@click.option("--to", "target", required=True, type=int, metavar="PAGESERVER",
              help="The id of the pageserver to move the tenant to (`strata status`).")
@click.pass_context
def tenant_relocate(ctx: click.Context, name: str, target: int) -> None:
    """Move TENANT to pageserver PAGESERVER (needs object storage): attached there with a
    new generation, caught up with the safekeepers, then detached from its current
    pageserver. Running endpoints follow; endpoint starts wait until it is done."""
    from strata.control.attachments import relocate_tenant

    env = _env(ctx)
    config = env.config()
    tid = env.read_state().tenant_id(name)
    generation = relocate_tenant(env, config, tid, target)
    output.result(f"relocated tenant {name} ({tid}) to pageserver {target} (generation "
                  f"{generation})")


@tenant.command("detach")
@click.argument("name", metavar="TENANT")
@click.option("--pageserver", "ps_id", type=int, metavar="ID",
              help="Detach only the stale attachment (`strata tenant list`) on pageserver "
                   "ID; the tenant's current attachment stays.")
@click.pass_context
def tenant_detach(ctx: click.Context, name: str, ps_id: int | None) -> None:
    """Detach TENANT from the pageserver: upload what object storage lacks, then drop its
    local files (its endpoints must be stopped). `strata tenant attach` brings it back."""
    from strata.control.attachments import (
        detach_stale_attachment,
        detach_tenant,
        require_object_storage,
    )

    env = _env(ctx)
    config = env.config()
    require_object_storage(config)
    state = env.read_state()
    tid = state.tenant_id(name)
    if ps_id is not None:
        detach_stale_attachment(env, config, state, tid, ps_id)
        output.result(f"detached the stale attachment of tenant {name} ({tid}) from "
                      f"pageserver {ps_id}")
        return
    detach_tenant(env, config, tenant_pageserver(env, config, tid), tid)
    output.result(f"detached tenant {name} ({tid}); it is in object storage only")


@tenant.command("attach")
@click.argument("name", metavar="TENANT")
@click.pass_context
def tenant_attach(ctx: click.Context, name: str) -> None:
    """Attach a detached TENANT from object storage with a new generation (layers are
    downloaded when reads need them)."""
    from strata.control.attachments import attach_tenant, require_object_storage

    env = _env(ctx)
    config = env.config()
    require_object_storage(config)
    state = env.read_state()
    tid = state.tenant_id(name)
    client = tenant_pageserver(env, config, tid)
    if state.tenants[tid].attached and tid in client.list_tenants():
        raise UserError(f"tenant {name} is attached already; detach it first "
                        f"(`strata tenant detach {name}`)")
    generation = attach_tenant(env, config, client, tid)
    output.result(f"attached tenant {name} ({tid}) with generation {generation}")


# --- timelines ---------------------------------------------------------------------------------
@click.group()
def timeline() -> None:
    """Timelines, named as branches."""


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
    info = create_branch(env, env.config(), name, parent, at, tenant)
    output.result(f"created branch {name} (timeline {info.timeline_id}) from {parent} at "
                  f"{info.ancestor_lsn}")


@timeline.command("restore")
@click.argument("name")
@click.option("--at", "at", required=True, metavar="TIMESTAMP",
              help="An ISO 8601 timestamp: the branch gets its state as of the last commit "
                   "at or before it.")
@tenant_option
@click.pass_context
def timeline_restore(ctx: click.Context, name: str, at: str, tenant: str | None) -> None:
    """Restore branch NAME to a past moment: NAME moves to a new timeline with its state as
    of --at; the previous timeline stays as branch NAME-before-restore-<time> (with its
    children and read-only endpoints). A running primary on NAME is restarted on it."""
    env = _env(ctx)
    done = restore_branch(env, env.config(), name, at, tenant)
    output.result(f"restored branch {name} to {done.lsn} (timeline {done.timeline_id}); "
                  f"the previous timeline is branch {done.backup}")


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
    client = tenant_pageserver(env, config, tid)
    rows = [timeline_json(state.tenants[tid], info)
            for info in client.list_timelines(tid)]
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
    timeline_id = delete_branch(env, env.config(), name, tenant)
    output.result(f"deleted branch {name} (timeline {timeline_id})")


# --- endpoints ---------------------------------------------------------------------------------
@click.group()
def endpoint() -> None:
    """Endpoints: a PostgreSQL 15 compute on a branch (primary, or read-only at an LSN)."""


@endpoint.command("create")
@click.argument("name")
@click.option("--branch", required=True, help="The branch the endpoint runs on.")
@click.option("--lsn", metavar="LSN", help="Read-only at this LSN (a hot standby); "
                                           "without it, a read-write primary at the head.")
@click.option("--port", type=click.IntRange(1, 65535), help="Port (default: allocated).")
@click.option("--suspend-timeout-s", type=click.FloatRange(min=0), default=300.0,
              show_default=True,
              help="The proxy stops the endpoint after this many seconds without a client "
                   "connection through it (0: never); a connection wakes it again.")
@tenant_option
@click.pass_context
def endpoint_create(ctx: click.Context, name: str, branch: str, lsn: str | None,
                    port: int | None, suspend_timeout_s: float, tenant: str | None) -> None:
    """Define endpoint NAME on a branch (start it with `strata endpoint start NAME`)."""
    env = _env(ctx)
    ep = create_endpoint(env, env.config(), name, branch, lsn, port, tenant,
                         suspend_timeout_s=suspend_timeout_s)
    read_lsn = ep.read_lsn
    kind = f"read-only at {read_lsn}" if read_lsn is not None else "primary"
    output.result(f"created endpoint {name} on branch {branch} ({kind}, port {ep.port})")


@endpoint.command("start")
@click.argument("name")
@click.option("--mode", type=click.Choice(COMPUTE_MODES),
              help="lazy: pages fetched on demand over FUSE (a quick start whatever the "
                   "size); full: a whole basebackup. Default: the endpoint's last --mode, "
                   "else lazy where FUSE is usable (else full, with a warning saying why).")
@json_option
@click.pass_context
def endpoint_start(ctx: click.Context, name: str, mode: str | None, as_json: bool) -> None:
    """Start endpoint NAME; prints its connection string as the last line (with --json:
    the connection string, mode, LSN and the seconds each phase of the start took)."""
    cli_s = _process_age_s()
    env_started = time.perf_counter()
    env = _env(ctx)
    config = env.config()
    env_s = time.perf_counter() - env_started
    started = start_named_endpoint(env, config, name,
                                   None if mode is None else ComputeMode.parse(mode, "--mode"))
    if as_json:
        phases = {"cli": cli_s, "env": env_s, **started.phases}
        output.print_json({"name": name, "connstr": started.connstr,
                           "local_connstr": started.local_connstr, "mode": started.mode,
                           "lsn": str(started.lsn),
                           "phases_s": {k: round(v, 4) for k, v in phases.items()},
                           "total_s": round(_process_age_s(), 4)})
    else:
        _password_note(env, env.read_state().endpoint(name))
        output.result(started.connstr)
    output.exit_fast = True


def _password_note(env: Environment, ep: EndpointState) -> None:
    """Say how to give the application role a password if it has none: every TCP login
    (through the proxy or directly) needs one."""
    roles = env.read_state().tenants[ep.tenant_id].roles.get(ep.branch) or {}
    if APP_ROLE not in roles:
        output.info(f"note: role {APP_ROLE!r} has no password on branch {ep.branch}; set "
                    f"one with `strata role create {APP_ROLE} --branch {ep.branch}` to "
                    "connect")


def _process_age_s() -> float:
    """Seconds since this process started: Python's start and the CLI's imports before a
    command runs; the whole command at its end (/proc, 10 ms resolution)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    start_ticks = int(fields[19])  # field 22 of proc(5), "starttime"
    uptime_s = float(Path("/proc/uptime").read_text().split()[0])
    return max(0.0, uptime_s - start_ticks / os.sysconf("SC_CLK_TCK"))


@endpoint.command("stop")
@click.argument("name")
@click.option("--immediate", is_flag=True, help="Crash-stop (settings are not saved).")
@click.pass_context
def endpoint_stop(ctx: click.Context, name: str, immediate: bool) -> None:
    """Stop endpoint NAME (a clean stop saves its ALTER SYSTEM settings and statistics)."""
    stopped = stop_named_endpoint(_env(ctx), name, immediate)
    output.result(f"stopped endpoint {name}" if stopped else f"endpoint {name} was not running")


@endpoint.command("delete")
@click.argument("name")
@click.pass_context
def endpoint_delete(ctx: click.Context, name: str) -> None:
    """Delete endpoint NAME (it must be stopped), with its saved settings."""
    delete_endpoint(_env(ctx), name)
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


def _start_pageservers(env: Environment, config: EnvConfig, ps_id: int | None) -> list[int]:
    """Start pageserver `ps_id` (None: every one) and attach from object storage every
    tenant it lost; their pids."""
    from strata.control.attachments import reattach_lost_tenants

    pids = []
    for ps in config.pageservers if ps_id is None else [config.pageserver_by_id(ps_id)]:
        pids.append(start_pageserver(env, config, ps.id))
        reattach_lost_tenants(env, config, pageserver_client(config, ps_id=ps.id), ps.id)
    return pids


ps_id_option = click.option("--id", "ps_id", type=int, metavar="N",
                            help="Pageserver N only (default: every pageserver).")


def _ps_label(ps_id: int) -> str:
    return "pageserver" if ps_id == 1 else f"pageserver {ps_id}"


@pageserver.command("start")
@ps_id_option
@click.pass_context
def pageserver_start(ctx: click.Context, ps_id: int | None) -> None:
    """Start the pageservers (and the environment's SeaweedFS, if it has one, which they
    need). A tenant a pageserver does not hold any more (its data directory was lost) is
    attached from object storage with a new generation."""
    from strata.control.object_storage import start_seaweed

    env = _env(ctx)
    start_seaweed(env, env.config())
    config = env.config()  # SeaweedFS's ports, if another process took one
    ids = [ps.id for ps in config.pageservers] if ps_id is None else [ps_id]
    for i, pid in zip(ids, _start_pageservers(env, config, ps_id), strict=True):
        output.result(f"{_ps_label(i)} running (pid {pid})")


@pageserver.command("add")
@click.pass_context
def pageserver_add(ctx: click.Context) -> None:
    """Add a pageserver to the environment (ports allocated, data in ENV/pageserver-N) and
    start it; move tenants to it with `strata tenant relocate TENANT --to N`."""
    from strata.control.object_storage import start_seaweed

    env = _env(ctx)
    with env.locked():  # one add at a time: the id and ports are picked here
        config = env.config()
        new_id = max(ps.id for ps in config.pageservers) + 1
        added = replace(config.pageserver, pg_port=0, http_port=0, id=new_id)
        config = replace(config, more_pageservers=(*config.more_pageservers, added))
        config = config.with_ports_allocated()
        env.write_config(config)
    start_seaweed(env, config)
    config = env.config()  # SeaweedFS's ports, if another process took one
    pid = start_pageserver(env, config, new_id, repick_ports=True)
    ps = env.config().pageserver_by_id(new_id)
    output.result(f"added pageserver {new_id} (pid {pid}; pg {ps.host}:{ps.pg_port}, http "
                  f"{ps.host}:{ps.http_port})")


@pageserver.command("stop")
@ps_id_option
@click.option("--immediate", is_flag=True, help="SIGKILL instead of a clean stop.")
@click.pass_context
def pageserver_stop(ctx: click.Context, ps_id: int | None, immediate: bool) -> None:
    """Stop the pageservers (or pageserver N)."""
    env = _env(ctx)
    config = env.config()
    if ps_id is None:
        stop_pageservers(env, config, immediate=immediate)
        output.result("pageservers stopped" if config.more_pageservers
                      else "pageserver stopped")
        return
    config.pageserver_by_id(ps_id)
    stop_pageserver(env, immediate=immediate, ps_id=ps_id)
    output.result(f"{_ps_label(ps_id)} stopped")


@pageserver.command("restart")
@ps_id_option
@click.pass_context
def pageserver_restart(ctx: click.Context, ps_id: int | None) -> None:
    """Stop the pageservers (or pageserver N) cleanly and start them again (re-attaching
    lost tenants)."""
    env = _env(ctx)
    config = env.config()
    ids = [ps.id for ps in config.pageservers] if ps_id is None else \
        [config.pageserver_by_id(ps_id).id]
    for i in ids:
        stop_pageserver(env, ps_id=i)
        pid = _start_pageservers(env, config, i)[0]
        output.result(f"{_ps_label(i)} running (pid {pid})")


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


# --- the console -------------------------------------------------------------------------------
@click.command()
@click.pass_context
def console(ctx: click.Context) -> None:
    """Run the web console in the foreground (`strata start` runs it in the background):
    the branch tree, endpoints, a SQL box and charts, on [console] host:port of config.toml.
    Log in with the token in the environment's console.token. docs/console.md."""
    import asyncio

    from strata.common.logctx import setup_logging
    from strata.console.server import serve

    env = _env(ctx)
    config = env.config()
    if config.console.port == 0:
        raise UserError("config [console] port is 0; run `strata start` once (it allocates "
                        "one) or set it in config.toml")
    setup_logging()
    output.info(f"console on {console_url(config)} (token in {env.console_token_path}); "
                "Ctrl-C stops it")
    asyncio.run(serve(env, config.console.host, config.console.port))


# --- auth ------------------------------------------------------------------------------------
@click.group()
def auth() -> None:
    """JWTs for the environment's services (docs/auth.md)."""


@auth.command("token")
@tenant_option
@click.option("--admin", is_flag=True, help="A token for everything (default: the tenant).")
@click.pass_context
def auth_token(ctx: click.Context, tenant: str | None, admin: bool) -> None:
    """Print a token for a tenant (or --admin); use it as $STRATA_AUTH_TOKEN, as the
    password on the pageserver's and safekeepers' pg ports, or as `Authorization: Bearer`."""
    env = _env(ctx)
    config = env.config()
    if not config.auth:
        raise UserError(f"{env.root} runs without auth (config auth = false); no token is "
                        "needed")
    scope = Scope() if admin else Scope(env.read_state().tenant_id(tenant))
    token = token_for(env, config, scope)
    assert token is not None
    output.result(token)



def _auth_env(ctx: click.Context) -> Environment:
    env = _env(ctx)
    if not env.config().auth:
        raise UserError(f"{env.root} runs without auth (config auth = false); it has no keys")
    return env


@auth.command("keys")
@json_option
@click.pass_context
def auth_keys(ctx: click.Context, as_json: bool) -> None:
    """List the key ids the services accept; `signing` marks the one new tokens carry."""
    from strata.common.auth import load_key_set, signing_key_id

    env = _auth_env(ctx)
    signing = signing_key_id(env.auth_private_key.read_bytes())
    rows = [{"key_id": kid, "signing": kid == signing}
            for kid in load_key_set(env.auth_public_key.read_bytes())]
    if as_json:
        output.print_json(rows)
    else:
        output.table(None, ["KEY ID", "SIGNING"],
                     [[r["key_id"], "yes" if r["signing"] else ""] for r in rows])


@auth.command("rotate")
@click.pass_context
def auth_rotate(ctx: click.Context) -> None:
    """Make a new signing key. The services accept it at once (they re-read the key set),
    tokens of the old keys keep working until `strata auth retire`."""
    from strata.common.auth import rotate_keys

    env = _auth_env(ctx)
    with env.locked():
        kid = rotate_keys(env.root)
    output.info("processes started before now (services, walproposers, proxy, console) "
                "hold tokens of the old key: restart them (`strata stop` then `strata "
                "start`) before retiring it")
    output.result(kid)


@auth.command("retire")
@click.argument("key_id")
@click.pass_context
def auth_retire(ctx: click.Context, key_id: str) -> None:
    """Remove KEY_ID from the key set: the services refuse its tokens from then on."""
    from strata.common.auth import retire_key

    env = _auth_env(ctx)
    with env.locked():
        retire_key(env.root, key_id)
    output.result(f"retired key {key_id}")


def register(main: click.Group) -> None:
    from strata.control.proxy_commands import proxy, role

    for command in (init, start, stop, status, tenant, timeline, endpoint, pageserver,
                    safekeeper, console, role, proxy, auth):
        main.add_command(command)
