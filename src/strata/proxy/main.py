"""The proxy process: reads the environment's config, listens, serves until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from strata.common import eventloop
from strata.common.errors import StrataError
from strata.common.logctx import setup_logging
from strata.control.auth_setup import export_cli_token
from strata.control.env import Environment, ProxySettings
from strata.proxy.computes import STATUS_FILE
from strata.proxy.server import ProxyServer
from strata.proxy.tls import CERT_FILE, KEY_FILE, server_context

log = logging.getLogger(__name__)


def tls_files(env: Environment, settings: ProxySettings) -> tuple[Path, Path]:
    if settings.tls_cert:
        return Path(settings.tls_cert), Path(settings.tls_key)
    return env.proxy_dir / CERT_FILE, env.proxy_dir / KEY_FILE


PROXY_NICE = -10
"""The proxy's scheduling priority (nice; STRATA_PROXY_NICE=N overrides it, 0 = none):
each relayed message waits for the proxy to be scheduled, once or twice per round
trip, and on a loaded machine that wait is most of what the proxy adds to a query
(docs/proxy.md, "Session 28"). The proxy's own CPU is small (tens of microseconds per
round trip)."""


def _set_priority() -> None:
    """Run the proxy's threads (the event loop, the relay threads it starts) at nice
    PROXY_NICE, and with sched_autogroup (the default on Linux desktops and here, which
    shares the CPU between sessions first, so that a thread's nice counts only within
    its session) its session's autogroup too, when the proxy leads its session (`strata
    start` starts it in one of its own). Lowering nice needs CAP_SYS_NICE: without it,
    one log line and nice 0."""
    value = os.environ.get("STRATA_PROXY_NICE", "")
    try:
        nice = int(value) if value else PROXY_NICE
    except ValueError:
        log.info("STRATA_PROXY_NICE=%r is not an integer: nice %d", value, PROXY_NICE)
        nice = PROXY_NICE
    if nice == 0 and os.getpriority(os.PRIO_PROCESS, 0) == 0:
        log.info("the proxy runs at nice 0")
        return
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # this thread, and the threads it starts
    except OSError as err:
        log.info("the proxy runs at nice %d: it may not set nice %d (%s)",
                 os.getpriority(os.PRIO_PROCESS, 0), nice, err.strerror)
        return
    autogroup = Path("/proc/self/autogroup")
    if os.getsid(0) == os.getpid() and autogroup.exists():
        try:
            autogroup.write_text(f"{nice}\n")
        except OSError as err:
            log.info("cannot set the proxy's autogroup nice to %d: %s", nice, err.strerror)
    log.info("the proxy runs at nice %d (%s)", nice,
             autogroup.read_text().strip() if autogroup.exists() else "no autogroup")


async def _serve(server: ProxyServer) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strata.proxy")
    parser.add_argument("--repo-dir", required=True, type=Path,
                        help="The Strata environment directory.")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        env = Environment.open(args.repo_dir.absolute())
        export_cli_token(env, env.config())  # waking an endpoint calls the services (auth)
        settings = env.config().proxy
        cert, key = tls_files(env, settings)
        server = ProxyServer(env, host=settings.host, port=settings.port,
                             domain=settings.domain, ssl_context=server_context(cert, key),
                             kernel_relay=settings.kernel_relay)
    except StrataError as err:
        log.error("proxy cannot start: %s", err)
        return 1
    _set_priority()
    try:
        # uvloop: its TLS and transports cost about half of asyncio's CPU per relayed
        # message (docs/proxy.md, "Throughput").
        eventloop.run(_serve(server))
    except OSError as err:
        log.error("proxy cannot listen on %s:%d: %s", settings.host, settings.port, err)
        return 1
    finally:
        (env.run_dir / STATUS_FILE).unlink(missing_ok=True)
    log.info("proxy stopped")
    return 0
