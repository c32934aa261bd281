"""A stand-in safekeeper *process* for the walproposer's end-to-end tests while K2's
`strata.safekeeper` is not there: same command line (`--id --workdir --pg-port
--http-port`), K1's `Acceptor` with its state and WAL in files (fsynced as the actions say),
a walsender that serves only WAL below the durable commit LSN
(`START_REPLICATION PHYSICAL <lsn> <tenant> <timeline>`), and HTTP timeline create/status.
Not a product: one flat WAL file per timeline, no segment removal, no checksums.

    python tests/sk_stub_process.py --id 1 --workdir DIR --pg-port P --http-port H
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import signal
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from strata.common.errors import NotFound, UserError  # noqa: E402
from strata.common.ids import TenantId, TimelineId  # noqa: E402
from strata.common.lsn import Lsn  # noqa: E402
from strata.common.pgserve import (  # noqa: E402
    CopyBoth,
    CopyStream,
    PgProtocolServer,
    Reply,
    Session,
)
from strata.pg import wire  # noqa: E402
from strata.safekeeper.acceptor import (  # noqa: E402
    Acceptor,
    AcceptorState,
    FlushWal,
    PersistControl,
    SendWal,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import ReadWalResponse, decode, encode  # noqa: E402


class StubTimeline:
    def __init__(self, directory: Path, state: AcceptorState) -> None:
        self.dir = directory
        self.state = state
        self.wal_path = directory / "wal"
        self.wal_path.touch()
        self.fd = os.open(self.wal_path, os.O_RDWR)
        self.acceptor = Acceptor(state)
        size = os.fstat(self.fd).st_size
        scan = state.scan_lsn - state.timeline_start_lsn
        if size > scan:
            self.acceptor.recover_wal(os.pread(self.fd, size - scan, scan))
        self.lock = asyncio.Lock()
        self.committed = asyncio.Condition()

    @classmethod
    def create(cls, directory: Path, state: AcceptorState) -> StubTimeline:
        directory.mkdir(parents=True)
        _persist(directory, state)
        return cls(directory, state)

    def offset(self, lsn: Lsn) -> int:
        return lsn - self.state.timeline_start_lsn

    async def handle(self, payload: bytes, stream: CopyStream) -> None:
        async with self.lock:
            for action in self.acceptor.handle(decode(payload)):  # type: ignore[arg-type]
                match action:
                    case PersistControl(state=state):
                        _persist(self.dir, state)
                        self.state = state
                    case WriteWal(lsn=lsn, data=data):
                        os.pwrite(self.fd, data, self.offset(lsn))
                    case FlushWal():
                        os.fsync(self.fd)
                    case TruncateWal(lsn=lsn):
                        os.ftruncate(self.fd, self.offset(lsn))
                        os.fsync(self.fd)
                    case SendWal(term=term, start_lsn=s, end_lsn=e):
                        data = os.pread(self.fd, e - s, self.offset(s))
                        await stream.write(encode(ReadWalResponse(term, s, data)))
                    case _:
                        await stream.write(encode(action))
        async with self.committed:
            self.committed.notify_all()


def _persist(directory: Path, state: AcceptorState) -> None:
    tmp = directory / "state.tmp"
    with open(tmp, "wb") as f:
        pickle.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "state")
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StubSafekeeperProcess:
    def __init__(self, node_id: int, workdir: Path) -> None:
        self.node_id = node_id
        self.workdir = workdir
        self.timelines: dict[tuple[str, str], StubTimeline] = {}
        for state_file in workdir.glob("*_*/state"):
            state: AcceptorState = pickle.loads(state_file.read_bytes())
            key = (str(state.tenant_id), str(state.timeline_id))
            self.timelines[key] = StubTimeline(state_file.parent, state)

    def timeline(self, tenant: str, timeline: str) -> StubTimeline:
        tl = self.timelines.get((tenant, timeline))
        if tl is None:
            raise NotFound(f"timeline {tenant}/{timeline} not on safekeeper {self.node_id}")
        return tl

    # --- PG protocol ------------------------------------------------------------------------
    async def handle_query(self, session: Session, query: str) -> Reply:
        words = query.split()
        if words[:1] == ["proposer"] and len(words) == 3:
            tl = self.timeline(words[1], words[2])
            return CopyBoth(lambda stream: self._proposer(tl, stream))
        if words[:2] == ["START_REPLICATION", "PHYSICAL"] and len(words) == 5:
            tl = self.timeline(words[3], words[4])
            lsn = Lsn.parse(words[2])
            return CopyBoth(lambda stream: self._walsender(tl, lsn, stream))
        raise UserError(f"unknown command {query!r}")

    async def _proposer(self, tl: StubTimeline, stream: CopyStream) -> None:
        while (payload := await stream.read()) is not None:
            await tl.handle(payload, stream)

    async def _walsender(self, tl: StubTimeline, lsn: Lsn, stream: CopyStream) -> None:
        reader = asyncio.create_task(self._drain(stream))
        try:
            while not reader.done():
                commit = tl.state.commit_lsn
                if commit > lsn:
                    end = min(commit, lsn + (128 << 10))
                    data = os.pread(tl.fd, end - lsn, tl.offset(lsn))
                    msg = wire.XLogData(lsn.value, commit.value, wire.pg_timestamp(time.time()),
                                        data)
                    await stream.write(msg.encode())
                    lsn = end
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0), tl.committed:
                        await tl.committed.wait()
        finally:
            reader.cancel()

    async def _drain(self, stream: CopyStream) -> None:
        while await stream.read() is not None:
            pass  # feedback is ignored: the stub never removes WAL

    # --- HTTP -------------------------------------------------------------------------------
    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.node_id})

    async def timeline_status(self, request: web.Request) -> web.Response:
        try:
            tl = self.timeline(request.match_info["tenant"], request.match_info["timeline"])
        except NotFound as err:
            return web.json_response({"error": str(err)}, status=404)
        return web.json_response({"commit_lsn": str(tl.state.commit_lsn),
                                  "flush_lsn": str(tl.acceptor.flush_lsn),
                                  "term": tl.state.term})

    async def create(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = await request.json()
        tenant = TenantId.parse(request.match_info["tenant"])
        timeline = TimelineId.parse(body["timeline_id"])
        state = AcceptorState.new_timeline(tenant, timeline, int(body["system_id"]),
                                           int(body["seg_size"]), Lsn.parse(body["start_lsn"]),
                                           Lsn.parse(body["prev_lsn"]))
        key = (str(tenant), str(timeline))
        if key not in self.timelines:
            self.timelines[key] = StubTimeline.create(self.workdir / f"{key[0]}_{key[1]}",
                                                      state)
        return web.json_response({"created": True}, status=201)


async def serve(args: argparse.Namespace) -> None:
    args.workdir.mkdir(parents=True, exist_ok=True)
    sk = StubSafekeeperProcess(args.id, args.workdir)
    pg = PgProtocolServer(sk.handle_query, port=args.pg_port)
    await pg.start()
    app = web.Application()
    app.add_routes([web.get("/v1/status", sk.status),
                    web.get("/v1/tenant/{tenant}/timeline/{timeline}", sk.timeline_status),
                    web.post("/v1/tenant/{tenant}/timeline", sk.create)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.http_port).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await pg.stop(grace_s=0.5)
    await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--pg-port", type=int, required=True)
    p.add_argument("--http-port", type=int, required=True)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
