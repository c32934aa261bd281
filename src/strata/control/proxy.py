"""The proxy as a process of the environment: start, stop, status (the process itself
is `python -m strata.proxy --repo-dir ENV`, `strata.proxy`)."""

from __future__ import annotations

import socket
import sys
from typing import Any

from strata.control.env import EnvConfig, Environment
from strata.control.supervisor import (
    ProcessFiles,
    ServiceSpec,
    process_state,
    repicker,
    start_service,
    stop_service,
)

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
        from strata.proxy.tls import make_self_signed

        make_self_signed(env.proxy_dir, config.proxy.domain)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def start_proxy(env: Environment, config: EnvConfig) -> int:
    """Start the proxy (if it is not running) and wait until it accepts connections. Its
    port, if strata picked it and finds it taken, is picked again (config.toml)."""
    def build(config: EnvConfig) -> ServiceSpec:
        settings = config.proxy
        return ServiceSpec(
            proxy_files(env), "the proxy", {"port": (settings.host, settings.port)},
            [sys.executable, "-m", "strata.proxy", "--repo-dir", str(env.root)],
            ready=lambda: _accepts(settings.host, settings.port),
            waiting_for=f"the proxy on {settings.host}:{settings.port}",
            start_timeout_s=PROXY_START_TIMEOUT_S, describe=f"{settings.host}:{settings.port}",
            prepare=lambda: ensure_certificate(env, config))

    return start_service(build(config), repicker(env, {"port": "proxy.port"}, build))


def stop_proxy(env: Environment, *, immediate: bool = False) -> bool:
    return stop_service(proxy_files(env), "the proxy", timeout_s=PROXY_STOP_TIMEOUT_S,
                        immediate=immediate)


def proxy_status(env: Environment, config: EnvConfig) -> dict[str, Any]:
    """The proxy for `strata status`: pid, address, state, and per endpoint the client
    connections it relays and whether it is waking or suspending it."""
    files = proxy_files(env)
    proc = process_state(files)
    pid = proc.pid
    settings = config.proxy
    endpoints: dict[str, Any] = {}
    if pid is not None:
        # Imported here: the proxy's modules import asyncio, which `endpoint start` (that
        # asks `proxy_files` whether the proxy runs) does without (issue 13).
        from strata.proxy.computes import read_status_file

        data = read_status_file(env)
        if data is not None and data.get("pid") == pid:
            endpoints = data.get("endpoints", {})
    return {"pid": pid, "state": proc.state, "address": f"{settings.host}:{settings.port}",
            "domain": settings.domain, "log": str(files.log_path), "log_tail": proc.log_tail,
            "endpoints": endpoints}
