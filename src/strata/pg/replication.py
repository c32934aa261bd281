"""Physical replication from a PostgreSQL walsender: what Strata's receivers share.

A receiver connects with `replication="true"` (strata.pg.pgclient), asks `IDENTIFY_SYSTEM`
(`identify_system`), opens `START_REPLICATION SLOT <slot> PHYSICAL <lsn>`, then reads the
stream a batch at a time (`read_batch`): the first message it waits for plus every message
already buffered, so that one fsync and one standby status update cover them all; or, for a
receiver fed from the transport's data callback (`CopyBothStream.divert`), `decode_batch`
of a chunk's payloads.
Used by the pageserver's development-mode receiver (pageserver/walreceiver.py) and by a
safekeeper that pulls WAL (safekeeper/pull.py).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from strata.common.errors import ProtocolError, Unavailable
from strata.common.lsn import Lsn
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection
from strata.pg.wire import XLogData

DEFAULT_BATCH_BYTES = 1 << 22  # WAL taken into one batch at most (then: fsync, feedback)


@dataclass(frozen=True, slots=True)
class SystemIdentity:
    """The answer to IDENTIFY_SYSTEM."""

    system_id: int
    timeline: int
    xlogpos: Lsn


async def identify_system(conn: PgConnection) -> SystemIdentity:
    result = await conn.simple_query("IDENTIFY_SYSTEM")
    if len(result.rows) != 1 or len(result.columns) < 4:
        raise ProtocolError(f"IDENTIFY_SYSTEM returned {result.columns} {result.rows}")
    row = dict(zip(result.columns, result.rows[0], strict=True))
    pos = row.get("xlogpos")
    return SystemIdentity(int(row["systemid"] or 0), int(row["timeline"] or 0),
                          Lsn.parse(pos) if pos else Lsn(0))


@dataclass(slots=True)
class ReplicationBatch:
    """What one `read_batch` took: the XLogData payloads in stream order (contiguous)."""

    pieces: list[tuple[Lsn, bytes]] = field(default_factory=list)
    end_lsn: Lsn = Lsn(0)  # where the received WAL ends (the batch's start if none came)
    server_end_lsn: Lsn = Lsn(0)  # the sender's end of WAL, as it last told us (0: not told)
    reply_requested: bool = False  # a keepalive asked for a status update at once

    @property
    def wal_bytes(self) -> int:
        return sum(len(data) for _, data in self.pieces)


async def read_batch(stream: CopyBothStream, expected: Lsn, *,
                     max_bytes: int = DEFAULT_BATCH_BYTES) -> ReplicationBatch:
    """Wait for the next message of a physical replication stream, then take every message
    already buffered too (up to `max_bytes` of WAL). `expected` is where the next XLogData
    must start; a gap is a ProtocolError, the sender ending the stream is Unavailable."""
    payload = await stream.read()
    if payload is None:
        raise Unavailable(f"{stream.command!r}: the sender ended the replication stream "
                          "(CopyDone)")
    batch = ReplicationBatch(end_lsn=expected)
    end = expected.value
    size = 0
    while payload is not None:
        end = _add_message(batch, end, payload)
        size = end - expected.value
        payload = stream.next_buffered() if size < max_bytes else None
    batch.end_lsn = Lsn(end)
    return batch


def decode_batch(payloads: Sequence[bytes], expected: Lsn) -> ReplicationBatch:
    """The batch that these CopyData payloads of a physical replication stream make, in
    order (what `read_batch` does once the payloads have arrived); `expected` is where the
    next XLogData must start (a gap is a ProtocolError)."""
    batch = ReplicationBatch(end_lsn=expected)
    end = expected.value
    for payload in payloads:
        end = _add_message(batch, end, payload)
    batch.end_lsn = Lsn(end)
    return batch


_XLOGDATA_HEADER = struct.Struct(">QQq")  # 'w': start, the sender's end, send time
_KEEPALIVE = struct.Struct(">QqB")  # 'k': the sender's end, send time, reply requested


def _add_message(batch: ReplicationBatch, end: int, payload: bytes) -> int:
    """Add one replication message to `batch`, whose WAL ends at `end` so far; the new
    end. The two messages a walsender sends are decoded here without
    `wire.decode_replication`'s objects (once per message on the commit path of pull
    mode); anything else goes through it, for its checks and errors."""
    kind = payload[0] if payload else -1
    if kind == _W and len(payload) >= XLogData.HEADER_BYTES:
        start, server_end, _ = _XLOGDATA_HEADER.unpack_from(payload, 1)
        if start != end:
            raise ProtocolError(f"XLogData at {Lsn(start)} but the stream is at "
                                f"{Lsn(end)}; it has a gap")
        size = len(payload) - XLogData.HEADER_BYTES
        if size:
            batch.pieces.append((Lsn(end), payload[XLogData.HEADER_BYTES:]))
            end += size
        batch.server_end_lsn = Lsn(max(server_end, end))
        return end
    if kind == _K and len(payload) == _KEEPALIVE.size + 1 and payload[-1] <= 1:
        server_end, _, requested = _KEEPALIVE.unpack_from(payload, 1)
        batch.server_end_lsn = Lsn(server_end)
        batch.reply_requested = batch.reply_requested or requested == 1
        return end
    msg = wire.decode_replication(payload)  # raises ProtocolError if it is malformed
    raise ProtocolError(f"unexpected {type(msg).__name__} from a walsender")


_W = ord("w")
_K = ord("k")


__all__ = ["DEFAULT_BATCH_BYTES", "ReplicationBatch", "SystemIdentity", "decode_batch",
           "identify_system", "read_batch"]
