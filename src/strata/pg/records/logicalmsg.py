"""Decode LogicalMessage resource manager records (rmid 21): pg_logical_emit_message.

Layout from PostgreSQL 15 `replication/message.h`: `xl_logical_message` {Oid dbId;
bool transactional; Size prefix_size; Size message_size; char message[]}, where
`message` holds the NUL-terminated prefix (prefix_size counts the NUL) and then
message_size bytes of payload. Size is 8 bytes, so prefix_size sits at offset 8.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.pg.records._cursor import Cursor

XLOG_LOGICAL_MESSAGE = 0x00
LOGICALMSG_NAMES = {XLOG_LOGICAL_MESSAGE: "MESSAGE"}

_HEADER = struct.Struct("<I?3xQQ")
assert _HEADER.size == 24, _HEADER.size


@dataclass(slots=True)
class LogicalMessage:
    db_id: int
    transactional: bool
    prefix: str
    message: bytes


def decode(cur: Cursor, info: int) -> LogicalMessage:
    if info & 0xF0 != XLOG_LOGICAL_MESSAGE:
        raise cur.error(f"unknown LogicalMessage info code {info:#04x}")
    db_id, transactional, prefix_size, message_size = cur.unpack(_HEADER, "xl_logical_message")
    raw_prefix = cur.raw(prefix_size, "prefix")
    if not raw_prefix.endswith(b"\0"):
        raise cur.error(f"prefix of {prefix_size} bytes is not NUL-terminated")
    try:
        prefix = raw_prefix[:-1].decode("utf-8")
    except UnicodeDecodeError as err:
        raise cur.error(f"prefix {raw_prefix!r} is not UTF-8") from err
    return LogicalMessage(db_id=db_id, transactional=bool(transactional), prefix=prefix,
                          message=cur.raw(message_size, "message"))
