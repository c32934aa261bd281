"""The proxy as a process of the environment: start, stop, status (the process itself
is `python -m strata.proxy --repo-dir ENV`, `strata.proxy`)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from typing import Any

from strata.control import output
from strata.control.env import EnvConfig, Environment
from strata.control.supervisor import ProcessFiles, check_ports_free, stop_process, wait_for
from strata.proxy.computes import read_status_file
from strata.proxy.tls import make_self_signed

PROXY_START_TIMEOUT_S = 30.0
PROXY_STOP_TIMEOUT_S = 60.0  # a wake or suspend in progress finishes first


def proxy_files(env: Environment) -> ProcessFiles:
    return ProcessFiles("proxy", env.run_dir / "proxy.pid", env.logs_dir / "proxy.log",
                        marker=f"strata.proxy --repo-dir {env.root}")


def ensure_certificate(env: Environment, config: EnvConfig) -> None:
    """The self-signed pair in proxy/ (made once), unless config names the user's own."""
    if config.proxy.tls_cert:
        return
    if not (env.proxy_dir / "server.crt").exists():
        make_self_signed(env.proxy_dir, config.proxy.domain)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def start_proxy(env: Environment, config: EnvConfig) -> int:
    """Start the proxy (if it is not running) and wait until it accepts connections."""
    files = proxy_files(env)
    pid = files.read_pid()
    if pid is not None:
        output.info(f"proxy already running (pid {pid})")
        return pid
    settings = config.proxy
    check_ports_free("the proxy", {"port": (settings.host, settings.port)})
    ensure_certificate(env, config)
    with output.step(f"starting the proxy ({settings.host}:{settings.port}, log "
                     f"{files.log_path})"):
        with open(files.log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "strata.proxy", "--repo-dir",
                                     str(env.root)], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        files.write_pid(proc.pid)
        wait_for(lambda: _accepts(settings.host, settings.port),
                 timeout_s=PROXY_START_TIMEOUT_S,
                 what=f"waiting for the proxy on {settings.host}:{settings.port}",
                 files=files, pid=proc.pid)
    return proc.pid


def stop_proxy(env: Environment, *, immediate: bool = False) -> bool:
    files = proxy_files(env)
    if files.read_pid() is None:
        files.clear_pid()
        return False
    with output.step("stopping the proxy"):
        stop_process(files, signal.SIGKILL if immediate else signal.SIGTERM,
                     timeout_s=PROXY_STOP_TIMEOUT_S)
    return True


def proxy_status(env: Environment, config: EnvConfig) -> dict[str, Any]:
    """The proxy for `strata status`: pid, address, state, and per endpoint the client
    connections it relays and whether it is waking or suspending it."""
    files = proxy_files(env)
    pid = files.read_pid()
    settings = config.proxy
    state = "running" if pid is not None else "died" if files.died() else "stopped"
    endpoints: dict[str, Any] = {}
    if pid is not None:
        data = read_status_file(env)
        if data is not None and data.get("pid") == pid:
            endpoints = data.get("endpoints", {})
    return {"pid": pid, "state": state, "address": f"{settings.host}:{settings.port}",
            "domain": settings.domain, "log": str(files.log_path),
            "log_tail": files.log_tail() if state == "died" else None,
            "endpoints": endpoints}
