"""Physical replication from a PostgreSQL walsender: what Strata's receivers share.

A receiver connects with `replication="true"` (strata.pg.pgclient), asks `IDENTIFY_SYSTEM`
(`identify_system`), opens `START_REPLICATION SLOT <slot> PHYSICAL <lsn>`, then reads the
stream a batch at a time (`read_batch`): the first message it waits for plus every message
already buffered, so that one fsync and one standby status update cover them all.
Used by the pageserver's development-mode receiver (pageserver/walreceiver.py) and by a
safekeeper that pulls WAL (safekeeper/pull.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from strata.common.errors import ProtocolError, Unavailable
from strata.common.lsn import Lsn
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection

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
    size = 0
    while payload is not None:
        match wire.decode_replication(payload):
            case wire.XLogData(start_lsn=start, end_lsn=end, data=data):
                if start != batch.end_lsn.value:
                    raise ProtocolError(f"XLogData at {Lsn(start)} but the stream is at "
                                        f"{batch.end_lsn}; it has a gap")
                if data:
                    batch.pieces.append((batch.end_lsn, data))
                batch.end_lsn += len(data)
                size += len(data)
                batch.server_end_lsn = Lsn(max(end, batch.end_lsn.value))
            case wire.PrimaryKeepalive(end_lsn=end, reply_requested=requested):
                batch.server_end_lsn = Lsn(end)
                batch.reply_requested = batch.reply_requested or requested
            case msg:
                raise ProtocolError(f"unexpected {type(msg).__name__} from a walsender")
        payload = stream.next_buffered() if size < max_bytes else None
    return batch


__all__ = ["DEFAULT_BATCH_BYTES", "ReplicationBatch", "SystemIdentity", "identify_system",
           "read_batch"]
