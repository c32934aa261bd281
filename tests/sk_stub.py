"""A minimal in-process safekeeper for walproposer tests: the real `Acceptor` behind a
PG-protocol port (`proposer <tenant> <timeline>`, one encoded message per CopyData), with
its "durable" state in memory, so that `stop()` + `start()` is a restart that keeps exactly
what the acceptor's actions made durable. The real process is `strata.safekeeper`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.pgserve import CopyBoth, CopyStream, PgProtocolServer, Reply, Session
from strata.safekeeper.acceptor import (
    Acceptor,
    AcceptorState,
    FlushWal,
    PersistControl,
    SendWal,
    TruncateWal,
    WriteWal,
)
from strata.safekeeper.messages import AppendRequest, ReadWalResponse, decode, encode


@dataclass
class StubSafekeeper:
    """A safekeeper with the acceptor core and in-memory "durable" state."""

    node_id: int
    tenant_id: TenantId
    timeline_id: TimelineId
    system_id: int
    seg_size: int
    start_lsn: Lsn
    prev_lsn: Lsn
    state: AcceptorState | None = None
    wal: bytearray = field(default_factory=bytearray)  # [start_lsn, start_lsn + len)
    server: PgProtocolServer | None = None
    port: int = 0
    acceptor: Acceptor | None = None
    appends_with_wal: int = 0  # WriteWal actions: one fsync each in a real safekeeper
    commit_only_appends: int = 0  # AppendRequests without WAL received

    @property
    def end_lsn(self) -> Lsn:
        return self.start_lsn + len(self.wal)

    async def start(self) -> None:
        if self.state is None:
            self.state = AcceptorState.new_timeline(self.tenant_id, self.timeline_id,
                                                    self.system_id, self.seg_size,
                                                    self.start_lsn, self.prev_lsn)
        self.acceptor = Acceptor(self.state)
        scan = self.state.scan_lsn - self.start_lsn
        self.acceptor.recover_wal(bytes(self.wal[scan:]))
        self.server = PgProtocolServer(self._handle, port=self.port)
        await self.server.start()
        self.port = self.server.port

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop(grace_s=0.1)
            self.server = None

    async def _handle(self, session: Session, query: str) -> Reply:
        assert query == f"proposer {self.tenant_id} {self.timeline_id}", query
        return CopyBoth(self._serve)

    async def _serve(self, stream: CopyStream) -> None:
        start = self.start_lsn
        while (payload := await stream.read()) is not None:
            acceptor = self.acceptor
            assert acceptor is not None
            msg = decode(payload)
            if isinstance(msg, AppendRequest) and not msg.data:
                self.commit_only_appends += 1
            for action in acceptor.handle(msg):  # type: ignore[arg-type]
                match action:
                    case PersistControl(state=state):
                        self.state = state
                    case WriteWal(lsn=lsn, data=data):
                        assert lsn == self.end_lsn, (lsn, self.end_lsn)
                        self.wal += data
                        self.appends_with_wal += 1
                    case FlushWal():
                        pass
                    case TruncateWal(lsn=lsn):
                        del self.wal[lsn - start:]
                    case SendWal(term=term, start_lsn=s, end_lsn=e):
                        data = bytes(self.wal[s - start:e - start])
                        await stream.write(encode(ReadWalResponse(term, s, data)))
                    case _:
                        await stream.write(encode(action))
