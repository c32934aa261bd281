"""The proxy process: reads the environment's config, listens, serves until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
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
