"""CRC-32C (Castagnoli), as PostgreSQL uses for WAL records and pg_control."""

from __future__ import annotations

import google_crc32c


def crc32c(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """CRC-32C of `data`, continuing from a previous result `crc` (0 to start).

    Matches PostgreSQL's INIT_CRC32C / COMP_CRC32C / FIN_CRC32C sequence: the
    finalized value of one call can be passed as `crc` to continue over more bytes.
    """
    return int(google_crc32c.extend(crc, bytes(data)))
