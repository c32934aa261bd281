"""The values of the pageserver's non-block keys: how data directory files are stored.

Import (`import_datadir`), ingest, basebackup and the page service all read or write
these through this module, so each file's stored form is decided in one place
(keyspace in `strata.storage.key`):

    SLRU segment size   u32 little-endian: the pages in the segment file (at most
                        SLRU_PAGES_PER_SEGMENT); a Tombstone when the segment is removed
    SLRU block          the 8 KB page; a page with no stored version reads as zeros
    two-phase state     pg_twophase/<XID> without its trailing CRC-32C (the PREPARE
                        record's data); the file is rebuilt with the CRC
    database dir        the PG_VERSION file's content; a Tombstone when the database
                        is dropped
    relation map        the 512-byte pg_filenode.map, as is (the global one is the
                        database (GLOBALTABLESPACE_OID, 0)); a Tombstone on drop
    checkpoint          the 88-byte `CheckPoint` struct: the counters ingest keeps (D6)
    control file        the imported pg_control, as is: the basebackup's template

Relation sizes and their cuts are the storage layer's own values (`strata.storage.rel`,
through Timeline.create_rel / truncate_rel / drop_rel / rel_size): a block read depends
on them, so the timeline decodes them itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from strata.common.errors import CorruptionError, NotFound
from strata.common.lsn import Lsn
from strata.pg.checkpoint import CheckPoint
from strata.pg.constants import BLCKSZ, GLOBALTABLESPACE_OID, PG_MAJORVERSION
from strata.pg.controlfile import ControlFileData
from strata.pg.crc import crc32c
from strata.pg.page import ZERO_PAGE
from strata.pg.records.xact import TWOPHASE_MAGIC
from strata.pg.slru import SLRU_PAGES_PER_SEGMENT, SlruKind
from strata.storage.key import (
    Key,
    checkpoint_key,
    control_file_key,
    db_dir_key,
    db_dir_range,
    relmap_key,
    relmap_range,
    slru_range,
    slru_segment_range,
    slru_segment_size_key,
    twophase_key,
    twophase_range,
)
from strata.storage.timeline import Timeline
from strata.storage.value import Image, Tombstone, encode_image

PG_VERSION_CONTENT = f"{PG_MAJORVERSION}\n".encode()
SLRU_DIRS: dict[SlruKind, str] = {
    SlruKind.CLOG: "pg_xact",
    SlruKind.MULTIXACT_OFFSETS: "pg_multixact/offsets",
    SlruKind.MULTIXACT_MEMBERS: "pg_multixact/members",
}
RELMAP_FILE = "pg_filenode.map"
RELMAP_FILE_SIZE = 512  # relmapper.c RELMAPPER_FILESIZE

_U32 = struct.Struct("<I")
# twophase.c: TwoPhaseFileHeader starts with magic u32 and total_len u32; total_len
# counts the trailing CRC-32C, which the stored content (the PREPARE record's data) lacks.
_TWOPHASE_HEAD = struct.Struct("<II")


# --- SLRU segments -------------------------------------------------------------------------
def put_slru_segment_size(timeline: Timeline, kind: SlruKind, segno: int, lsn: Lsn,
                          npages: int) -> None:
    assert 0 <= npages <= SLRU_PAGES_PER_SEGMENT, npages
    timeline.put(slru_segment_size_key(kind, segno), lsn, Image(_U32.pack(npages)))


def remove_slru_segment(timeline: Timeline, kind: SlruKind, segno: int, lsn: Lsn) -> None:
    """The segment file is gone; its pages stay stored but are no longer read."""
    timeline.put(slru_segment_size_key(kind, segno), lsn, Tombstone())


def decode_slru_segment_size(value: bytes, kind: SlruKind, segno: int, lsn: Lsn) -> int:
    if len(value) != _U32.size:
        raise CorruptionError(f"{kind.name} segment {segno:04X} size value is {len(value)} "
                              f"bytes, expected 4, at LSN {lsn}")
    npages = int(_U32.unpack(value)[0])
    if npages > SLRU_PAGES_PER_SEGMENT:
        raise CorruptionError(f"{kind.name} segment {segno:04X} has {npages} pages at LSN "
                              f"{lsn}, more than {SLRU_PAGES_PER_SEGMENT}")
    return npages


def slru_segment_pages(timeline: Timeline, kind: SlruKind, segno: int, lsn: Lsn) -> int | None:
    """Pages in the segment file at `lsn`, or None when the segment does not exist."""
    try:
        value = timeline.get(slru_segment_size_key(kind, segno), lsn)
    except NotFound:
        return None
    return decode_slru_segment_size(value, kind, segno, lsn)


def slru_segments(timeline: Timeline, kind: SlruKind, lsn: Lsn) -> list[int]:
    """The numbers of the segments that exist at `lsn`, ascending. Only the size keys
    are read: the pages are read once, by `read_slru_segment`."""
    return [key.segno() for key in timeline.candidate_keys(slru_range(kind), lsn.value)
            if key.is_slru_segment_size() and
            slru_segment_pages(timeline, kind, key.segno(), lsn) is not None]


def read_slru_segment(timeline: Timeline, kind: SlruKind, segno: int, lsn: Lsn) -> bytes:
    """The segment file at `lsn`; a page with no stored version is zeros. A stored page
    beyond the segment's size (left from before a truncation) is not part of the file."""
    npages: int | None = None
    pages: dict[int, bytes] = {}
    for key, value in timeline.scan(slru_segment_range(kind, segno), lsn):
        if key.is_slru_segment_size():
            npages = decode_slru_segment_size(value, kind, segno, lsn)
        else:
            if len(value) != BLCKSZ:
                raise CorruptionError(f"{kind.name} segment {segno:04X} page {key.blkno()} "
                                      f"is {len(value)} bytes at LSN {lsn}")
            pages[key.blkno()] = value
    if npages is None:
        raise NotFound(f"{kind.name} segment {segno:04X} does not exist at LSN {lsn} on "
                       f"timeline {timeline.timeline_id}")
    return b"".join(pages.get(blkno, ZERO_PAGE) for blkno in range(npages))


def read_slru_segments(timeline: Timeline, kind: SlruKind,
                       lsn: Lsn) -> Iterator[tuple[int, bytes]]:
    """(segno, segment file) for every segment of `kind` at `lsn`, one in memory at a time."""
    for segno in slru_segments(timeline, kind, lsn):
        yield segno, read_slru_segment(timeline, kind, segno, lsn)


# --- two-phase state -----------------------------------------------------------------------
def twophase_stored(data: bytes, path: str) -> bytes:
    """What is stored for the `pg_twophase` file `data`: the file without its CRC-32C."""
    body, stored = data[:-4], data[-4:]
    if len(data) < 4 or crc32c(body).to_bytes(4, "little") != stored:
        raise CorruptionError("two-phase state file CRC mismatch", path=path,
                              offset=max(len(data) - 4, 0))
    return body


def put_twophase(timeline: Timeline, xid: int, lsn: Lsn, content: bytes) -> None:
    """Transaction `xid` is prepared from `lsn` on; `content` is its PREPARE record's data."""
    timeline.put(twophase_key(xid), lsn, Image(content))


def remove_twophase(timeline: Timeline, xid: int, lsn: Lsn) -> None:
    """The prepared transaction `xid` is committed or rolled back at `lsn`."""
    timeline.put(twophase_key(xid), lsn, Tombstone())


def twophase_files(timeline: Timeline, lsn: Lsn) -> Iterator[tuple[int, bytes]]:
    """(xid, pg_twophase file) of every transaction still prepared at `lsn`."""
    for key, content in timeline.scan(twophase_range(), lsn):
        yield key.xid(), twophase_file_bytes(key.xid(), content)


def twophase_file_bytes(xid: int, content: bytes) -> bytes:
    """`pg_twophase/<xid>`: the stored state (PREPARE record data) plus its CRC-32C."""
    if len(content) < _TWOPHASE_HEAD.size:
        raise CorruptionError(f"two-phase state of xid {xid} is {len(content)} bytes, too "
                              "short for its header; the stored PREPARE data is damaged")
    magic, total_len = _TWOPHASE_HEAD.unpack_from(content)
    if magic != TWOPHASE_MAGIC or total_len != len(content) + 4:
        raise CorruptionError(f"two-phase state of xid {xid}: magic {magic:#x} (want "
                              f"{TWOPHASE_MAGIC:#x}), total_len {total_len} (want "
                              f"{len(content) + 4}); the stored PREPARE data is damaged")
    return content + _U32.pack(crc32c(content))


# --- databases and relation maps -------------------------------------------------------------
def put_database(timeline: Timeline, spcnode: int, dbnode: int, lsn: Lsn,
                 pg_version: bytes = PG_VERSION_CONTENT) -> None:
    """The database directory exists from `lsn` on, with this PG_VERSION content."""
    timeline.put(db_dir_key(spcnode, dbnode), lsn, Image(pg_version))


def databases(timeline: Timeline, lsn: Lsn) -> dict[tuple[int, int], bytes]:
    """(spcnode, dbnode) -> PG_VERSION content of every database directory at `lsn`."""
    return {key.db(): value for key, value in timeline.scan(db_dir_range(), lsn)}


def list_databases(timeline: Timeline, lsn: Lsn) -> set[tuple[int, int]]:
    return set(databases(timeline, lsn))


def database_size(timeline: Timeline, spcnode: int, dbnode: int, lsn: Lsn) -> int:
    """Bytes of every relation fork of a database at `lsn` (what pg_database_size counts
    of the relation files)."""
    return BLCKSZ * sum(timeline.rel_size(rel, lsn)
                        for rel in timeline.list_rels(spcnode, dbnode, lsn))


def logical_size(timeline: Timeline, lsn: Lsn) -> int:
    """Bytes of the relation forks of every database at `lsn` (shared catalogs not counted)."""
    return sum(database_size(timeline, spcnode, dbnode, lsn)
               for spcnode, dbnode in sorted(list_databases(timeline, lsn)))


def drop_database(timeline: Timeline, spcnode: int, dbnode: int, lsn: Lsn) -> None:
    """Drop every fork of a database, its directory marker and its relation map."""
    for rel in sorted(timeline.list_rels(spcnode, dbnode, lsn)):
        timeline.drop_rel(rel, lsn)
    for key in (db_dir_key(spcnode, dbnode), relmap_key(spcnode, dbnode)):
        if _exists(timeline, key, lsn):
            timeline.put(key, lsn, Tombstone())


def _exists(timeline: Timeline, key: Key, lsn: Lsn) -> bool:
    try:
        timeline.get(key, lsn)
    except NotFound:
        return False
    return True


def relmap_db(spcnode: int, dbnode: int) -> tuple[int, int]:
    """The (spcnode, dbnode) a relation map is stored under: a shared map (dbnode 0)
    is the global tablespace's whatever tablespace its record names."""
    return (GLOBALTABLESPACE_OID, 0) if dbnode == 0 else (spcnode, dbnode)


def check_relmap(data: bytes, where: str) -> bytes:
    if len(data) != RELMAP_FILE_SIZE:
        raise CorruptionError(f"relation map is {len(data)} bytes, expected "
                              f"{RELMAP_FILE_SIZE}", path=where, offset=0)
    return data


def put_relmap(timeline: Timeline, spcnode: int, dbnode: int, lsn: Lsn, data: bytes) -> None:
    """The pg_filenode.map of database (spcnode, dbnode) is `data` from `lsn` on."""
    timeline.put(relmap_key(*relmap_db(spcnode, dbnode)), lsn, Image(data))


def get_relmap(timeline: Timeline, spcnode: int, dbnode: int, lsn: Lsn) -> bytes:
    """The pg_filenode.map of a database at `lsn` (NotFound if it has none)."""
    return timeline.get(relmap_key(*relmap_db(spcnode, dbnode)), lsn)


def relmaps(timeline: Timeline, lsn: Lsn) -> dict[tuple[int, int], bytes]:
    """(spcnode, dbnode) -> pg_filenode.map of every relation map at `lsn`."""
    return {key.db(): value for key, value in timeline.scan(relmap_range(), lsn)}


# --- checkpoint counters and the control file ---------------------------------------------
_CHECKPOINT_KEY = checkpoint_key()  # put once per transaction by ingest: made once


def put_checkpoint(timeline: Timeline, lsn: Lsn, checkpoint: CheckPoint) -> None:
    put_checkpoint_bytes(timeline, lsn.value, checkpoint.to_bytes())


def put_checkpoint_bytes(timeline: Timeline, lsn: int, encoded: bytes) -> None:
    """`put_checkpoint` of a checkpoint already encoded (`CheckPoint.to_bytes`), at an
    LSN given as an int (ingest's hot path: `Timeline.put_encoded`)."""
    timeline.put_encoded(_CHECKPOINT_KEY, lsn, encode_image(encoded), True)


def get_checkpoint(timeline: Timeline, lsn: Lsn) -> CheckPoint:
    """The checkpoint counters at `lsn` (NotFound before the import)."""
    return CheckPoint.from_bytes(timeline.get(checkpoint_key(), lsn))


def put_control_file(timeline: Timeline, lsn: Lsn, control_bytes: bytes) -> None:
    timeline.put(control_file_key(), lsn, Image(control_bytes))


def get_control_file(timeline: Timeline, lsn: Lsn) -> ControlFileData:
    """The imported pg_control template (NotFound before the import)."""
    return ControlFileData.from_bytes(timeline.get(control_file_key(), lsn))
