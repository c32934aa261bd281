"""When the WAL receiver sends status updates: after every batch when its sender waits
for the flush (development mode: the compute's synchronous standby), and only when the
apply LSN moves (or once per status interval, or when asked) when it follows the
safekeepers, which use nothing but the apply LSN. The stream is an in-process stand-in
for the sender's side of a replication connection (a queue of CopyData payloads)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from strata.common.lsn import Lsn
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig
from strata.pg import wire

START = Lsn(0x100_0000)


class QueueStream:
    """What `WalReceiver._stream` uses of a CopyBothStream, fed from a queue."""

    command = "START_REPLICATION (test)"

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.sent: list[wire.StandbyStatusUpdate] = []

    async def read(self) -> bytes | None:
        return await self.incoming.get()

    def next_buffered(self) -> bytes | None:
        return None  # one message per batch

    async def send(self, payload: bytes) -> None:
        msg = wire.decode_replication(payload)
        assert isinstance(msg, wire.StandbyStatusUpdate), msg
        self.sent.append(msg)


async def _feed(stream: QueueStream, rx: WalReceiver, pos: Lsn, n: int) -> Lsn:
    """`n` XLogData messages of 100 bytes, each read as its own batch."""
    for _ in range(n):
        await stream.incoming.put(wire.XLogData(pos.value, pos.value + 100, 0,
                                                bytes(100)).encode())
        pos += 100
        while rx.wal_log.end_lsn < pos:
            await asyncio.sleep(0.001)
    return pos


@pytest.mark.parametrize("fsync_wal", [True, False])
def test_status_updates_per_batch_or_when_apply_moves(tmp_path: Path, fsync_wal: bool) -> None:
    async def main() -> None:
        wal = WalLog.create(tmp_path, START)
        apply = [Lsn(0)]
        config = WalReceiverConfig(host="127.0.0.1", port=1, slot_name="test",
                                   status_interval_s=30.0, fsync_wal=fsync_wal,
                                   fsync_inline=True)
        rx = WalReceiver(config, wal, apply_lsn=lambda: apply[0])
        stream = QueueStream()
        task = asyncio.create_task(rx._stream(stream))  # type: ignore[arg-type]
        pos = await _feed(stream, rx, START, 20)
        await asyncio.sleep(0.01)
        if fsync_wal:
            # The sender waits for each flush: one update per batch, flush = received.
            assert len(stream.sent) == 20
            assert [m.flush_lsn for m in stream.sent][-1] == pos.value
        else:
            # Only the first batch is reported: the apply LSN has not moved since.
            assert len(stream.sent) == 1
            assert stream.sent[0].write_lsn == stream.sent[0].flush_lsn == START.value + 100
        before = len(stream.sent)
        apply[0] = START + 150  # e.g. a layer flush moved disk_consistent_lsn
        pos = await _feed(stream, rx, pos, 3)
        await asyncio.sleep(0.01)
        moved = stream.sent[before:]
        assert moved and moved[0].apply_lsn == apply[0].value
        assert moved[0].write_lsn == START.value + 2100
        if not fsync_wal:
            assert len(moved) == 1
            # A keepalive asking for a reply is answered at once.
            await stream.incoming.put(wire.PrimaryKeepalive(pos.value, 0, True).encode())
            await asyncio.sleep(0.05)
            assert len(stream.sent) == before + 2
            assert stream.sent[-1].write_lsn == pos.value
        task.cancel()
        await asyncio.wait([task])
        wal.close()

    asyncio.run(main())
