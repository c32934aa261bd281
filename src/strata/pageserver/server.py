"""The pageserver process: the repository, every timeline's WAL path, and its two ports.

`python -m strata.pageserver --workdir DIR [-c key=value ...]`:

- takes `DIR/pageserver.lock` (flock): a second pageserver on the same directory
  would write the same files, so it is refused;
- loads the Repository and starts each timeline's `TimelineWal` (ingest resumes at
  disk_consistent_lsn; a compute recorded as attached is reconnected);
- serves the PostgreSQL-protocol port (`basebackup <tenant> <timeline> [lsn]
  [read_only]`, a CopyOut tar stream) and the HTTP management port (http.py);
- on SIGTERM/SIGINT stops the receivers, flushes every timeline and exits 0.

`Pageserver` is the in-process object the HTTP handlers call.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from strata.common.errors import NotFound, StrataError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import setup_logging, timeline_context
from strata.common.lsn import Lsn
from strata.common.pgserve import CopyOut, CopyStream, PgProtocolServer, Reply, Session
from strata.common.proc import make_dir_for, service_user
from strata.pageserver.config import PageserverConfig
from strata.pageserver.page_service import PageService, PageServiceConfig
from strata.pageserver.sk_receiver import SafekeeperEndpoint
from strata.pageserver.timeline_wal import ReceiverTarget, RecordApplier, TimelineWal
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline, TimelineBroken

log = logging.getLogger(__name__)

LOCK_FILE = "pageserver.lock"
PORTS_FILE = "pageserver.ports"  # "pg_port http_port", written once both listen
_CHUNK_BYTES = 256 * 1024
MAIN_TIMELINE = "main"


def make_applier(timeline: Timeline) -> RecordApplier:
    from strata.pageserver.ingest import WalIngest

    return WalIngest(timeline)


class Pageserver:
    """All tenants of this pageserver and their WAL paths (one event loop)."""

    def __init__(self, config: PageserverConfig) -> None:
        self.config = config
        self.repo = Repository(config.workdir)
        self.wals: dict[tuple[TenantId, TimelineId], TimelineWal] = {}
        self._create_lock = asyncio.Lock()
        self.page_service = PageService(self.timeline, PageServiceConfig(
            wait_lsn_timeout_s=config.wait_lsn_timeout_s))

    async def start(self) -> None:
        for tenant in self.repo.tenants.values():
            for timeline in tenant.timelines.values():
                await self._start_wal(timeline)

    async def _start_wal(self, timeline: Timeline) -> TimelineWal:
        wal = TimelineWal(timeline, make_applier, batch_bytes=self.config.ingest_batch_bytes)
        self.wals[(timeline.tenant_id, timeline.timeline_id)] = wal
        await wal.start()
        return wal

    async def stop(self) -> None:
        """Stop receivers and ingest, then flush every timeline (clean shutdown)."""
        for (tenant_id, timeline_id), wal in self.wals.items():
            with timeline_context(tenant_id, timeline_id):
                try:
                    await wal.stop(flush=True)
                except StrataError as err:
                    log.error("could not flush at shutdown: %s", err)
        self.wals.clear()
        self.repo.close()

    # --- lookups ----------------------------------------------------------------------
    def tenant(self, tenant_id: TenantId) -> Tenant:
        return self.repo.get_tenant(tenant_id)

    def timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        return self.tenant(tenant_id).get_timeline(timeline_id)

    def wal(self, tenant_id: TenantId, timeline_id: TimelineId) -> TimelineWal:
        self.timeline(tenant_id, timeline_id)  # NotFound with the usual message
        return self.wals[(tenant_id, timeline_id)]

    # --- tenants and timelines ---------------------------------------------------------------
    async def create_tenant(self, tenant_id: TenantId | None = None,
                            conf: TenantConfig | None = None) -> tuple[Tenant, Timeline]:
        """initdb (as the service user) in a temp dir, import it as the `main` timeline."""
        async with self._create_lock:
            tenant = self.repo.create_tenant(tenant_id, conf or self.config.default_tenant_conf)
            with timeline_context(tenant.tenant_id):
                timeline_id = TimelineId(TimelineId.generate().raw)
                timeline = await asyncio.to_thread(self._initdb_and_import, tenant, timeline_id)
                await self._start_wal(timeline)
                log.info("created tenant with timeline %s at %s", timeline_id,
                         timeline.last_record_lsn)
                return tenant, timeline

    def _initdb_and_import(self, tenant: Tenant, timeline_id: TimelineId) -> Timeline:
        from strata.compute.pgserver import PgServer
        from strata.pageserver.import_datadir import import_new_timeline

        scratch = self.config.workdir / "tmp"
        make_dir_for(scratch, service_user(), 0o755)
        temp = Path(tempfile.mkdtemp(prefix="initdb-", dir=scratch))
        try:
            os.chmod(temp, 0o755)
            server = PgServer(temp / "pgdata", log_path=temp / "initdb.log")
            server.initdb()
            timeline = import_new_timeline(tenant, timeline_id, server.datadir)
            # The import is not in any WAL: make it durable before anyone builds on it.
            timeline.flush()
            return timeline
        finally:
            shutil.rmtree(temp, ignore_errors=True)

    async def branch(self, tenant_id: TenantId, ancestor_id: TimelineId, *,
                     lsn: Lsn | None = None, timestamp_us: int | None = None,
                     timeline_id: TimelineId | None = None) -> Timeline:
        """A new timeline branching `ancestor_id` at `lsn`, at the last commit at or before
        `timestamp_us`, or (neither) at its last record."""
        tenant = self.tenant(tenant_id)
        parent = tenant.get_timeline(ancestor_id)
        if lsn is not None and timestamp_us is not None:
            raise UserError("give ancestor_lsn or timestamp, not both")
        if timestamp_us is not None:
            lsn = parent.find_lsn_for_timestamp(timestamp_us)
        # An LSN beyond what has been ingested is refused (Tenant.branch_timeline), not
        # waited for: the caller asks for a point it has seen the pageserver reach.
        new_id = timeline_id or TimelineId(TimelineId.generate().raw)
        async with self._create_lock:
            timeline = await asyncio.to_thread(tenant.branch_timeline, new_id, ancestor_id, lsn)
            await self._start_wal(timeline)
        with timeline_context(tenant_id, new_id):
            log.info("branched from %s at %s", ancestor_id, timeline.ancestor_lsn)
        return timeline

    async def compute_start(self, tenant_id: TenantId,
                            timeline_id: TimelineId) -> tuple[Lsn, Lsn]:
        return await self.wal(tenant_id, timeline_id).prepare_compute_start(
            self.config.wait_lsn_timeout_s)

    async def attach_receiver(self, tenant_id: TenantId, timeline_id: TimelineId,
                              target: ReceiverTarget) -> None:
        wal = self.wal(tenant_id, timeline_id)
        with timeline_context(tenant_id, timeline_id):
            await wal.attach(target)

    async def follow_safekeepers(self, tenant_id: TenantId, timeline_id: TimelineId,
                                 safekeepers: tuple[SafekeeperEndpoint, ...]) -> None:
        wal = self.wal(tenant_id, timeline_id)
        with timeline_context(tenant_id, timeline_id):
            await wal.follow_safekeepers(safekeepers)

    async def checkpoint(self, tenant_id: TenantId, timeline_id: TimelineId) -> Timeline:
        """Ingest what the log holds, then freeze and flush the timeline."""
        wal = self.wal(tenant_id, timeline_id)
        await wal.wait_caught_up(self.config.wait_lsn_timeout_s)
        if wal.timeline.broken_reason is None:
            await wal.flush()
        return wal.timeline

    # --- PostgreSQL-protocol commands ------------------------------------------------------
    async def handle_query(self, session: Session, query: str) -> Reply:
        words = query.strip().rstrip(";").split()
        if not words:
            raise UserError("empty command; this port answers `basebackup <tenant> "
                            "<timeline> [lsn] [read_only]`")
        if words[0].lower() == "basebackup":
            return await self._basebackup_command(words[1:])
        if words[0].lower() == "pagestream":
            return self.page_service.command(words[1:])
        raise UserError(f"unknown command {words[0]!r}; this port answers `basebackup "
                        "<tenant> <timeline> [lsn] [read_only]`")

    async def _basebackup_command(self, args: list[str]) -> Reply:
        read_only = "read_only" in args
        args = [a for a in args if a != "read_only"]
        if len(args) not in (2, 3):
            raise UserError("usage: basebackup <tenant> <timeline> [lsn] [read_only]")
        tenant_id = TenantId(TenantId.parse(args[0]).raw)
        timeline_id = TimelineId(TimelineId.parse(args[1]).raw)
        timeline = self.timeline(tenant_id, timeline_id)
        lsn = Lsn.parse(args[2]) if len(args) == 3 else timeline.last_record_lsn
        await timeline.wait_for_lsn(lsn, self.config.wait_lsn_timeout_s)
        if timeline.broken_reason is not None:
            # Checked here too, so the client gets an ErrorResponse before any tar bytes.
            raise TimelineBroken(f"timeline {timeline_id} of tenant {tenant_id} is broken: "
                                 f"{timeline.broken_reason}; branch from an earlier LSN")
        loop = asyncio.get_running_loop()

        async def run(stream: CopyStream) -> None:
            with timeline_context(tenant_id, timeline_id):
                sink = _StreamSink(stream, loop)
                await asyncio.to_thread(_write_basebackup, timeline, lsn, sink, read_only)
                await sink.aflush()
                log.info("sent basebackup at %s (%d bytes, read_only=%s)", lsn, sink.sent,
                         read_only)

        return CopyOut(run)


def _write_basebackup(timeline: Timeline, lsn: Lsn, sink: _StreamSink, read_only: bool) -> None:
    from strata.pageserver.basebackup import write_basebackup

    write_basebackup(timeline, lsn, sink, read_only=read_only)  # type: ignore[arg-type]  # a write()-only sink
    sink.flush()


class _StreamSink:
    """A file-like `write()` for a worker thread that sends CopyData on the event loop.

    Each full chunk waits until the socket has taken it, so a slow client slows the
    tar writer down instead of letting it fill memory."""

    def __init__(self, stream: CopyStream, loop: asyncio.AbstractEventLoop) -> None:
        self._stream = stream
        self._loop = loop
        self._buf = bytearray()
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        if len(self._buf) >= _CHUNK_BYTES:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            asyncio.run_coroutine_threadsafe(self._stream.write(chunk), self._loop).result()
            self.sent += len(chunk)

    async def aflush(self) -> None:
        if self._buf:
            chunk, self._buf = bytes(self._buf), bytearray()
            await self._stream.write(chunk)
            self.sent += len(chunk)


# --- the process -------------------------------------------------------------------------------
def take_lock(workdir: Path) -> IO[Any]:
    """Hold `pageserver.lock` for the life of the process; UserError if another has it."""
    workdir.mkdir(parents=True, exist_ok=True)
    f = open(workdir / LOCK_FILE, "a+")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        f.close()
        raise UserError(f"another pageserver is running on {workdir} (it holds "
                        f"{workdir / LOCK_FILE}); stop it first") from err
    f.truncate(0)
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


async def serve(config: PageserverConfig) -> None:
    """Run until SIGTERM or SIGINT; then stop cleanly."""
    from strata.pageserver.http import start_http

    pageserver = Pageserver(config)
    await pageserver.start()
    pg_host, pg_port = config.pg_addr
    pg_server = PgProtocolServer(pageserver.handle_query, host=pg_host, port=pg_port,
                                 name="pageserver-pg")
    await pg_server.start()
    http_runner, http_port = await start_http(pageserver, *config.http_addr)
    ports = config.workdir / PORTS_FILE
    ports.with_suffix(".tmp").write_text(f"{pg_server.port} {http_port}\n")
    os.replace(ports.with_suffix(".tmp"), ports)
    log.info("pageserver ready: pg port %d, http port %d, workdir %s", pg_server.port,
             http_port, config.workdir)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("pageserver stopping")
    await http_runner.cleanup()
    await pg_server.stop(grace_s=5)
    await pageserver.stop()
    log.info("pageserver stopped")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m strata.pageserver")
    parser.add_argument("--workdir", required=True, type=Path)
    parser.add_argument("-c", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a pageserver.toml setting")
    args = parser.parse_args(argv)
    try:
        config = PageserverConfig.load(args.workdir.resolve(), args.overrides)
        setup_logging(getattr(logging, config.log_level))
        lock = take_lock(config.workdir)
    except StrataError as err:
        print(f"pageserver: {err}", flush=True)
        return 2
    try:
        asyncio.run(serve(config))
    except (NotFound, UserError) as err:
        log.error("pageserver failed to start: %s", err)
        return 2
    finally:
        lock.close()
    return 0
