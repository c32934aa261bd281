"""The environment's storage services as processes: start, stop and probe the pageserver
and the safekeepers.

The pageserver is `python -m strata.pageserver --workdir ENV/pageserver` with its ports
and the environment's tenant defaults given as `-c key=value` overrides (pageserver N,
added by `strata pageserver add`: `--workdir ENV/pageserver-N`, log and pid file
`pageserver-N`; each tenant is on one of them, `TenantState.pageserver`), so
config.toml stays the one file the user edits. Safekeeper N is `python -m
strata.safekeeper --id N --workdir ENV/safekeepers/skN --pg-port P --http-port H`
(wal_mode = "safekeepers"; in development mode none run, architecture D7). With
`auth = true` both get the environment's public key and the pageserver an admin token in
its environment (strata.control.auth_setup). With object storage configured, the
safekeepers get the pageserver's `remote_storage` URL as `--remote-storage` (WAL offload).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from strata.common.auth import AuthError, Forbidden
from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.control import output
from strata.control.auth_setup import child_env, public_key_path
from strata.control.env import (
    SAFEKEEPERS_OFF,
    EnvConfig,
    Environment,
    SafekeeperSettings,
    WalMode,
)
from strata.control.supervisor import (
    ProcessFiles,
    ServiceSpec,
    process_state,
    repicker,
    start_service,
    stop_service,
)
from strata.pageserver.client import PageserverClient
from strata.safekeeper.client import SafekeeperClient

PAGESERVER_PORTS_FILE = "pageserver.ports"  # written by the pageserver once it listens
PAGESERVER_START_TIMEOUT_S = 60.0
PAGESERVER_STOP_TIMEOUT_S = 60.0
PAGESERVER_PROBE_TIMEOUT_S = 5.0  # is it up at all (a hung one must not hang the CLI)


def _ps_name(ps_id: int) -> str:
    return "the pageserver" if ps_id == 1 else f"pageserver {ps_id}"


def pageserver_files(env: Environment, ps_id: int = 1) -> ProcessFiles:
    suffix = "" if ps_id == 1 else f"-{ps_id}"
    return ProcessFiles(f"pageserver{'' if ps_id == 1 else ' ' + str(ps_id)}",
                        env.run_dir / f"pageserver{suffix}.pid",
                        env.logs_dir / f"pageserver{suffix}.log",
                        marker=f"--workdir {env.pageserver_workdir(ps_id)} -c ")


def pageserver_client(config: EnvConfig, timeout_s: float = 120,
                      ps_id: int = 1) -> PageserverClient:
    ps = config.pageserver_by_id(ps_id)
    return PageserverClient(ps.host, ps.http_port, ps.pg_port, timeout_s=timeout_s)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def pageserver_argv(env: Environment, config: EnvConfig, ps_id: int = 1) -> list[str]:
    ps = config.pageserver_by_id(ps_id)
    argv = [sys.executable, "-m", "strata.pageserver", "--workdir",
            str(env.pageserver_workdir(ps_id)),
            "-c", f"listen_pg_addr={ps.host}:{ps.pg_port}",
            "-c", f"listen_http_addr={ps.host}:{ps.http_port}"]
    for key, value in ps.config.items():
        argv += ["-c", f"{key}={_toml_value(value)}"]
    for key, value in config.tenant_defaults.items():
        argv += ["-c", f"default_tenant_conf.{key}={_toml_value(value)}"]
    key_path = public_key_path(env, config)
    if key_path is not None:
        argv += ["-c", f"auth_public_key_path={_toml_value(key_path)}"]
    return argv


def pageserver_responds(client: PageserverClient) -> bool:
    try:
        client.list_tenants()
    except (AuthError, Forbidden):
        return True  # it answers; the token is the caller's problem, told by the next call
    except StrataError:
        return False
    return True


def start_pageserver(env: Environment, config: EnvConfig, ps_id: int = 1, *,
                     repick_ports: bool = False) -> int:
    """Start pageserver `ps_id` (if it is not running) and wait until its API answers.
    `repick_ports` (its first start, before anything knows its address: `strata init`,
    `pageserver add`): a port strata picked and finds taken is picked again and saved in
    config.toml, so the caller reads the config again after the start."""
    workdir = env.pageserver_workdir(ps_id)
    ports_file = workdir / PAGESERVER_PORTS_FILE

    def prepare() -> None:
        workdir.mkdir(exist_ok=True)
        ports_file.unlink(missing_ok=True)

    def build(config: EnvConfig) -> ServiceSpec:
        ps = config.pageserver_by_id(ps_id)
        client = pageserver_client(config, timeout_s=5, ps_id=ps_id)
        return ServiceSpec(
            pageserver_files(env, ps_id), _ps_name(ps_id),
            {"pg port": (ps.host, ps.pg_port), "http port": (ps.host, ps.http_port)},
            pageserver_argv(env, config, ps_id), env=child_env(env, config), prepare=prepare,
            ready=lambda: ports_file.exists() and pageserver_responds(client),
            waiting_for=f"{_ps_name(ps_id)}'s HTTP API on {ps.host}:{ps.http_port}",
            start_timeout_s=PAGESERVER_START_TIMEOUT_S,
            describe=f"http {ps.host}:{ps.http_port}")

    return start_service(build(config), repicker(
        env, {"pg port": f"pageserver.{ps_id}.pg_port",
              "http port": f"pageserver.{ps_id}.http_port"}, build) if repick_ports else None)


def stop_pageserver(env: Environment, *, immediate: bool = False, ps_id: int = 1) -> bool:
    """SIGTERM (it flushes every timeline and exits) or, immediate, SIGKILL."""
    return stop_service(pageserver_files(env, ps_id), _ps_name(ps_id),
                        timeout_s=PAGESERVER_STOP_TIMEOUT_S, immediate=immediate,
                        quiet_when_stopped=False)


def stop_pageservers(env: Environment, config: EnvConfig, *, immediate: bool = False) -> None:
    """Every pageserver (the others first, quietly when they are not running)."""
    for ps in config.more_pageservers:
        if pageserver_files(env, ps.id).read_pid() is not None:
            stop_pageserver(env, immediate=immediate, ps_id=ps.id)
    stop_pageserver(env, immediate=immediate)


def require_pageserver(env: Environment, config: EnvConfig,
                       ps_id: int = 1) -> PageserverClient:
    """Pageserver `ps_id`'s client, or Unavailable saying how to start it."""
    files = pageserver_files(env, ps_id)
    name = _ps_name(ps_id)
    start = "`strata start` (or `strata pageserver start" + \
        ("" if ps_id == 1 else f" --id {ps_id}") + "`)"
    if files.read_pid() is None:
        raise Unavailable(f"{name} of {env.root} is not running; run {start}")
    client = pageserver_client(config, timeout_s=PAGESERVER_PROBE_TIMEOUT_S, ps_id=ps_id)
    if not pageserver_responds(client):
        ps = config.pageserver_by_id(ps_id)
        raise Unavailable(f"{name} (pid {files.read_pid()}) does not answer on "
                          f"{ps.host}:{ps.http_port} within "
                          f"{PAGESERVER_PROBE_TIMEOUT_S:g}s; see its log {files.log_path}, or "
                          "restart it: `strata pageserver restart" +
                          ("" if ps_id == 1 else f" --id {ps_id}") + "`")
    return pageserver_client(config, ps_id=ps_id)


def tenant_pageserver_id(env: Environment, tenant_id: TenantId) -> int:
    """The id of the pageserver the tenant is attached to (state.json)."""
    tenant = env.read_state().tenants.get(tenant_id)
    return 1 if tenant is None else tenant.pageserver


def tenant_pageserver(env: Environment, config: EnvConfig,
                      tenant_id: TenantId) -> PageserverClient:
    """The client of the tenant's pageserver, or Unavailable saying how to start it."""
    return require_pageserver(env, config, tenant_pageserver_id(env, tenant_id))


@dataclass(frozen=True, slots=True)
class ServiceStatus:
    name: str
    pid: int | None
    addresses: dict[str, str]
    state: str  # "running", "stopped", "died", "not responding"
    log: str
    log_tail: str | None  # when it died or does not respond

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "addresses": self.addresses,
                "state": self.state, "log": self.log, "log_tail": self.log_tail}


def pageserver_status(env: Environment, config: EnvConfig, ps_id: int = 1) -> ServiceStatus:
    ps = config.pageserver_by_id(ps_id)
    files = pageserver_files(env, ps_id)
    proc = process_state(files, lambda: pageserver_responds(
        pageserver_client(config, timeout_s=5, ps_id=ps_id)))
    return ServiceStatus("pageserver" if ps_id == 1 else f"pageserver {ps_id}", proc.pid,
                         {"pg": f"{ps.host}:{ps.pg_port}", "http": f"{ps.host}:{ps.http_port}"},
                         proc.state, str(files.log_path), proc.log_tail)


# --- safekeepers ---------------------------------------------------------------------------------
SAFEKEEPER_START_TIMEOUT_S = 30.0
SAFEKEEPER_STOP_TIMEOUT_S = 30.0
SAFEKEEPER_HTTP_TIMEOUT_S = 5.0


def require_safekeeper_mode(config: EnvConfig) -> None:
    if config.wal_mode is not WalMode.SAFEKEEPERS:
        raise UserError(SAFEKEEPERS_OFF)


def safekeeper_files(env: Environment, sk_id: int) -> ProcessFiles:
    return ProcessFiles(f"safekeeper {sk_id}", env.run_dir / f"safekeeper-{sk_id}.pid",
                        env.logs_dir / f"safekeeper-{sk_id}.log",
                        marker=f"--workdir {env.safekeeper_dir(sk_id)} ")


def safekeeper_argv(env: Environment, sk: SafekeeperSettings) -> list[str]:
    argv = [sys.executable, "-m", "strata.safekeeper", "--id", str(sk.id),
            "--workdir", str(env.safekeeper_dir(sk.id)), "--listen-host", sk.host,
            "--pg-port", str(sk.pg_port), "--http-port", str(sk.http_port)]
    config = env.config()
    key_path = public_key_path(env, config)
    if key_path is not None:
        argv += ["--auth-public-key", key_path]
    remote = config.pageserver.config.get("remote_storage")
    if remote:  # the pageserver's object storage also keeps the WAL (safekeeper/wal_backup.py)
        argv += ["--remote-storage", str(remote)]
    return argv


def safekeeper_client(sk: SafekeeperSettings) -> SafekeeperClient:
    """A client of safekeeper `sk`'s HTTP API, with the environment's token."""
    return SafekeeperClient(sk.host, sk.http_port, node_id=sk.id,
                            timeout_s=SAFEKEEPER_HTTP_TIMEOUT_S)


def start_safekeeper(env: Environment, sk: SafekeeperSettings, *,
                     repick_ports: bool = False) -> int:
    """Start safekeeper `sk` (if it is not running) and wait until its HTTP API answers.
    `repick_ports` as for `start_pageserver` (`strata init`): later starts keep the ports
    the computes and the pageserver were given."""
    def build(sk: SafekeeperSettings) -> ServiceSpec:
        return ServiceSpec(
            safekeeper_files(env, sk.id), f"safekeeper {sk.id}",
            {"pg port": (sk.host, sk.pg_port), "http port": (sk.host, sk.http_port)},
            safekeeper_argv(env, sk), ready=safekeeper_client(sk).responds,
            prepare=lambda: env.safekeeper_dir(sk.id).mkdir(parents=True, exist_ok=True),
            waiting_for=f"safekeeper {sk.id}'s HTTP API on {sk.host}:{sk.http_port}",
            start_timeout_s=SAFEKEEPER_START_TIMEOUT_S,
            describe=f"pg {sk.host}:{sk.pg_port}, http {sk.host}:{sk.http_port}")

    return start_service(build(sk), repicker(
        env, {"pg port": f"safekeeper.{sk.id}.pg_port",
              "http port": f"safekeeper.{sk.id}.http_port"},
        lambda config: build(config.safekeeper(sk.id))) if repick_ports else None)


def stop_safekeeper(env: Environment, sk_id: int, *, immediate: bool = False) -> bool:
    """SIGTERM (it closes its timelines and exits) or, immediate, SIGKILL."""
    return stop_service(safekeeper_files(env, sk_id), f"safekeeper {sk_id}",
                        timeout_s=SAFEKEEPER_STOP_TIMEOUT_S, immediate=immediate,
                        quiet_when_stopped=False)


def start_safekeepers(env: Environment, config: EnvConfig, *,
                      repick_ports: bool = False) -> None:
    if config.wal_mode is WalMode.SAFEKEEPERS:
        for sk in config.safekeepers:
            start_safekeeper(env, sk, repick_ports=repick_ports)


def stop_safekeepers(env: Environment, config: EnvConfig, *, immediate: bool = False) -> None:
    # Also in development mode: the config may have been switched while they ran.
    for sk in config.safekeepers:
        if safekeeper_files(env, sk.id).read_pid() is not None:
            stop_safekeeper(env, sk.id, immediate=immediate)


def safekeeper_status(env: Environment, sk: SafekeeperSettings,
                      timelines: list[tuple[TenantId, TimelineId, str]]) -> dict[str, Any]:
    """Safekeeper `sk` for `status --json`: id, addresses, pid, state, and per timeline it
    holds (of `timelines`: (tenant id, timeline id, branch name)) its term and LSNs."""
    files = safekeeper_files(env, sk.id)
    client = safekeeper_client(sk)
    proc = process_state(files, client.responds)
    out: dict[str, Any] = {
        "id": sk.id, "pid": proc.pid, "state": proc.state,
        "addresses": {"pg": f"{sk.host}:{sk.pg_port}", "http": f"{sk.host}:{sk.http_port}"},
        "log": str(files.log_path), "log_tail": proc.log_tail, "timelines": []}
    if proc.state != "running":
        return out
    for tenant_id, timeline_id, branch in timelines:
        ids = {"tenant_id": str(tenant_id), "timeline_id": str(timeline_id), "branch": branch}
        try:
            tl = client.timeline_json(tenant_id, timeline_id)
        except NotFound:
            continue  # not on the safekeepers yet: no primary ran on it
        except StrataError as err:
            out["timelines"].append({**ids, "error": str(err)})
            continue
        out["timelines"].append({
            **ids,
            **{key: tl.get(key) for key in ("term", "flush_lsn", "commit_lsn",
                                            "durable_commit_lsn", "timeline_start_lsn",
                                            "removal_horizon")}})
    return out


# --- the console ---------------------------------------------------------------------------------
CONSOLE_START_TIMEOUT_S = 60.0
CONSOLE_STOP_TIMEOUT_S = 60.0  # a running job (an endpoint start) finishes first


def console_files(env: Environment) -> ProcessFiles:
    return ProcessFiles("console", env.run_dir / "console.pid", env.logs_dir / "console.log",
                        marker=f"--repo-dir {env.root}")


def console_url(config: EnvConfig) -> str:
    return f"http://{config.console.host}:{config.console.port}/"


def console_argv(env: Environment) -> list[str]:
    return [sys.executable, "-m", "strata.console", "--repo-dir", str(env.root)]


def _console_responds(url: str) -> bool:
    import urllib.error  # here: the CLI's other commands (endpoint start) do without it
    import urllib.request

    try:
        with urllib.request.urlopen(url + "login", timeout=5) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def start_console(env: Environment, config: EnvConfig) -> EnvConfig:
    """Start the web console (if it is not running) and wait until it answers; returns the
    config, with the console's port allocated and saved if it was 0 (an environment made
    before the console existed)."""
    files = console_files(env)
    pid = files.read_pid()
    if pid is not None:
        output.info(f"console already running (pid {pid})")
        return config
    if config.console.port == 0:
        config = config.with_ports_allocated()
        env.write_config(config)
    env.console_token()  # made now if the environment predates the console

    def build(config: EnvConfig) -> ServiceSpec:
        con = config.console
        url = console_url(config)
        return ServiceSpec(
            files, "the console", {"port": (con.host, con.port)}, console_argv(env),
            ready=lambda: _console_responds(url), waiting_for=f"the console on {url}",
            start_timeout_s=CONSOLE_START_TIMEOUT_S, describe=url)

    start_service(build(config), repicker(env, {"port": "console.port"}, build))
    return env.config()


def console_status(env: Environment, config: EnvConfig) -> dict[str, Any]:
    """The console for `strata status`: pid, URL, state (and its log tail if it died)."""
    files = console_files(env)
    proc = process_state(files)
    return {"pid": proc.pid, "state": proc.state, "url": console_url(config),
            "token_file": str(env.console_token_path), "log": str(files.log_path),
            "log_tail": proc.log_tail}


def stop_console(env: Environment, *, immediate: bool = False) -> bool:
    return stop_service(console_files(env), "the console", timeout_s=CONSOLE_STOP_TIMEOUT_S,
                        immediate=immediate)
