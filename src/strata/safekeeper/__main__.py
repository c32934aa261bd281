"""Run a safekeeper: `python -m strata.safekeeper --id N --workdir DIR --pg-port P --http-port H`.

Takes the work directory's lock (a second safekeeper on it exits with status 1 and says who
holds it), opens its timelines, serves the PG-protocol and HTTP ports (a port 0: one the OS
picks; both are written to DIR/safekeeper.ports once they listen) until SIGTERM or
SIGINT, then stops: no new connections, a message being applied finishes its fsyncs, and the
process exits 0. Failpoints are armed from $STRATA_FAILPOINTS (strata.common.failpoint).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from strata.common import eventloop
from strata.common.durable import write_atomic
from strata.common.errors import UserError
from strata.common.logctx import setup_logging
from strata.safekeeper.http import make_app
from strata.safekeeper.server import Safekeeper, SafekeeperConfig, WorkdirLock, check_node_id

log = logging.getLogger("strata.safekeeper")

PORTS_FILE = "safekeeper.ports"  # "pg_port http_port", written once both listen


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m strata.safekeeper",
                                description="Strata safekeeper: WAL quorum member (D7, D8)")
    p.add_argument("--id", type=int, required=True, help="node id (positive, unique)")
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--listen-host", default="127.0.0.1")
    p.add_argument("--pg-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--wal-keep-bytes", type=int, default=0,
                   help="WAL kept below what the pageserver made durable (for lagging peers)")
    p.add_argument("--auth-public-key", type=Path, default=None,
                   help="Ed25519 public key (PEM): both ports then require a JWT "
                        "(strata.common.auth)")
    p.add_argument("--remote-storage", default=None, metavar="URL",
                   help="object storage for WAL offload (file:///path or "
                        "s3://bucket/prefix?endpoint=...): complete committed segments are "
                        "uploaded and removed locally only once uploaded")
    p.add_argument("--backup-interval", type=float, default=1.0,
                   help="seconds between WAL upload passes (with --remote-storage)")
    p.add_argument("--removal-interval", type=float, default=1.0,
                   help="seconds between WAL removal passes")
    p.add_argument("--pull-user", default="postgres",
                   help="pull mode: the role this safekeeper replicates from a compute as "
                        "(no password: the compute's pg_hba.conf admits it)")
    p.add_argument("--pull-answer-interval-ms", type=float, default=20.0,
                   help="pull mode: the AppendResponse to the proposer after pulled WAL goes "
                        "at most this often (the latest position; 0: one per fsync batch)")
    return p


async def serve(config: SafekeeperConfig, http_port: int) -> None:
    sk = Safekeeper(config)
    await asyncio.to_thread(sk.load)
    await sk.start()
    runner = web.AppRunner(make_app(sk, sk.verifier), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, config.host, http_port).start()
    http_port = runner.addresses[0][1]  # the port the OS picked, given 0
    write_atomic(config.workdir / PORTS_FILE, f"{sk.pg.port} {http_port}\n".encode())
    log.info("safekeeper %d: http on %s:%d, auth %s", config.node_id, config.host, http_port,
             "on" if sk.verifier is not None else "off")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("safekeeper %d stopping", config.node_id)
    await runner.cleanup()
    await sk.stop()
    log.info("safekeeper %d stopped", config.node_id)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    setup_logging()
    lock: WorkdirLock | None = None
    try:
        config = SafekeeperConfig(node_id=args.id, workdir=args.workdir.resolve(),
                                  host=args.listen_host, pg_port=args.pg_port,
                                  wal_keep_bytes=args.wal_keep_bytes,
                                  removal_interval_s=args.removal_interval,
                                  remote_storage=args.remote_storage,
                                  backup_interval_s=args.backup_interval,
                                  pull_user=args.pull_user,
                                  pull_answer_interval_s=args.pull_answer_interval_ms / 1000,
                                  auth_public_key=args.auth_public_key.resolve()
                                  if args.auth_public_key is not None else None)
        config.workdir.mkdir(parents=True, exist_ok=True)
        lock = WorkdirLock(config.workdir)
        lock.acquire()
        check_node_id(config.workdir, config.node_id)
        eventloop.run(serve(config, args.http_port))
    except UserError as err:
        log.error("%s", err)
        print(f"safekeeper: {err}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
