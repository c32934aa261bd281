"""The environment's storage services as processes: start, stop and probe the pageserver.

The pageserver is `python -m strata.pageserver --workdir ENV/pageserver` with its ports
and the environment's tenant defaults given as `-c key=value` overrides, so
config.toml stays the one file the user edits. Safekeepers are not available yet: every
safekeeper entry point raises the same honest error (architecture D7, development mode).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from strata.common.errors import StrataError, Unavailable, UserError
from strata.control import output
from strata.control.env import SAFEKEEPERS_UNAVAILABLE, EnvConfig, Environment
from strata.control.supervisor import ProcessFiles, check_ports_free, stop_process, wait_for
from strata.pageserver.client import PageserverClient

PAGESERVER_PORTS_FILE = "pageserver.ports"  # written by the pageserver once it listens
PAGESERVER_START_TIMEOUT_S = 60.0
PAGESERVER_STOP_TIMEOUT_S = 60.0


def pageserver_files(env: Environment) -> ProcessFiles:
    return ProcessFiles("pageserver", env.run_dir / "pageserver.pid",
                        env.logs_dir / "pageserver.log",
                        marker=f"--workdir {env.pageserver_dir}")


def pageserver_client(config: EnvConfig, timeout_s: float = 120) -> PageserverClient:
    ps = config.pageserver
    return PageserverClient(ps.host, ps.http_port, ps.pg_port, timeout_s=timeout_s)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def pageserver_argv(env: Environment, config: EnvConfig) -> list[str]:
    ps = config.pageserver
    argv = [sys.executable, "-m", "strata.pageserver", "--workdir", str(env.pageserver_dir),
            "-c", f"listen_pg_addr={ps.host}:{ps.pg_port}",
            "-c", f"listen_http_addr={ps.host}:{ps.http_port}"]
    for key, value in ps.config.items():
        argv += ["-c", f"{key}={_toml_value(value)}"]
    for key, value in config.tenant_defaults.items():
        argv += ["-c", f"default_tenant_conf.{key}={_toml_value(value)}"]
    return argv


def pageserver_responds(client: PageserverClient) -> bool:
    try:
        client.list_tenants()
    except StrataError:
        return False
    return True


def start_pageserver(env: Environment, config: EnvConfig) -> int:
    """Start the pageserver (if it is not running) and wait until its API answers."""
    files = pageserver_files(env)
    pid = files.read_pid()
    if pid is not None:
        output.info(f"pageserver already running (pid {pid})")
        return pid
    ps = config.pageserver
    check_ports_free("the pageserver", {"pg port": (ps.host, ps.pg_port),
                                        "http port": (ps.host, ps.http_port)})
    env.pageserver_dir.mkdir(exist_ok=True)
    ports_file = env.pageserver_dir / PAGESERVER_PORTS_FILE
    ports_file.unlink(missing_ok=True)
    client = pageserver_client(config, timeout_s=5)
    with output.step(f"starting the pageserver (http {ps.host}:{ps.http_port}, log "
                     f"{files.log_path})"):
        with open(files.log_path, "ab") as log:
            proc = subprocess.Popen(pageserver_argv(env, config), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        files.write_pid(proc.pid)
        wait_for(lambda: ports_file.exists() and pageserver_responds(client),
                 timeout_s=PAGESERVER_START_TIMEOUT_S, what="waiting for the pageserver's "
                 f"HTTP API on {ps.host}:{ps.http_port}", files=files, pid=proc.pid)
    return proc.pid


def stop_pageserver(env: Environment, *, immediate: bool = False) -> bool:
    """SIGTERM (it flushes every timeline and exits) or, immediate, SIGKILL."""
    files = pageserver_files(env)
    if files.read_pid() is None:
        files.clear_pid()
        output.info("pageserver is not running")
        return False
    how = "killing the pageserver (SIGKILL)" if immediate else "stopping the pageserver"
    with output.step(how):
        stop_process(files, signal.SIGKILL if immediate else signal.SIGTERM,
                     timeout_s=PAGESERVER_STOP_TIMEOUT_S)
    return True


def require_pageserver(env: Environment, config: EnvConfig) -> PageserverClient:
    """The pageserver's client, or Unavailable saying how to start it."""
    files = pageserver_files(env)
    if files.read_pid() is None:
        raise Unavailable(f"the pageserver of {env.root} is not running; run `strata start` "
                          "(or `strata pageserver start`)")
    if not pageserver_responds(pageserver_client(config, timeout_s=5)):
        raise Unavailable(f"the pageserver (pid {files.read_pid()}) does not answer on "
                          f"{config.pageserver.host}:{config.pageserver.http_port}; last lines "
                          f"of {files.log_path}:\n{files.log_tail()}")
    return pageserver_client(config)


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


def pageserver_status(env: Environment, config: EnvConfig) -> ServiceStatus:
    ps = config.pageserver
    files = pageserver_files(env)
    pid = files.read_pid()
    if pid is None:
        state = "died" if files.died() else "stopped"
    elif pageserver_responds(pageserver_client(config, timeout_s=5)):
        state = "running"
    else:
        state = "not responding"
    tail = files.log_tail() if state in ("died", "not responding") else None
    return ServiceStatus("pageserver", pid, {"pg": f"{ps.host}:{ps.pg_port}",
                                             "http": f"{ps.host}:{ps.http_port}"}, state,
                         str(files.log_path), tail)


def safekeepers_unavailable() -> UserError:
    return UserError(SAFEKEEPERS_UNAVAILABLE)
