"""The per-timeline metadata file: its fields, its checksummed encoding, its atomic rewrite.

The file records what is durable on disk for one timeline (architecture.md D4):
`disk_consistent_lsn` (every WAL record ending at or below it is in layer files),
`prev_record_lsn` (the start of the record that ends there), the ancestor timeline
and branch LSN, the latest GC cutoff and the initdb LSN.

Layout (little-endian, 128 bytes):

    magic u32 'STMD' | version u16 | flags u16 (bit 0: has ancestor)
    disk_consistent_lsn u64 | prev_record_lsn u64 | ancestor_lsn u64
    latest_gc_cutoff u64 | initdb_lsn u64 | pg_version u32 | ancestor_timeline 16 bytes
    zero padding | crc32c u32 of everything before it (last 4 bytes)

Rewritten atomically (`common.durable.write_atomic`): write `metadata.___temp`, fsync,
rename over `metadata`, fsync the directory. A reader therefore sees the old or the new
file, never a mix; a torn temp file is deleted on load.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from pathlib import Path

from strata.common.durable import write_atomic
from strata.common.errors import CorruptionError, NotFound
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.pg.crc import crc32c

METADATA_FILE = "metadata"
METADATA_SIZE = 128
_MAGIC = 0x444D5453  # b"STMD" little-endian
_VERSION = 1
_FLAG_HAS_ANCESTOR = 0x1
_BODY = struct.Struct("<IHHQQQQQI16s")
assert _BODY.size <= METADATA_SIZE - 4, _BODY.size


@dataclass(frozen=True, slots=True)
class TimelineMetadata:
    """What one timeline has made durable, and where it branches from."""

    disk_consistent_lsn: Lsn
    prev_record_lsn: Lsn
    ancestor_timeline: TimelineId | None
    ancestor_lsn: Lsn
    latest_gc_cutoff: Lsn
    initdb_lsn: Lsn
    pg_version: int = 15

    def __post_init__(self) -> None:
        assert self.prev_record_lsn <= self.disk_consistent_lsn, \
            (self.prev_record_lsn, self.disk_consistent_lsn)
        if self.ancestor_timeline is None:
            assert self.ancestor_lsn.value == 0, self.ancestor_lsn

    def with_updates(self, **changes: object) -> TimelineMetadata:
        return replace(self, **changes)  # type: ignore[arg-type]


def encode_metadata(meta: TimelineMetadata) -> bytes:
    flags = _FLAG_HAS_ANCESTOR if meta.ancestor_timeline is not None else 0
    ancestor = meta.ancestor_timeline.raw if meta.ancestor_timeline is not None else bytes(16)
    body = _BODY.pack(_MAGIC, _VERSION, flags, meta.disk_consistent_lsn.value,
                      meta.prev_record_lsn.value, meta.ancestor_lsn.value,
                      meta.latest_gc_cutoff.value, meta.initdb_lsn.value, meta.pg_version,
                      ancestor)
    body = body.ljust(METADATA_SIZE - 4, b"\0")
    return body + struct.pack("<I", crc32c(body))


def decode_metadata(data: bytes, path: str = "<bytes>") -> TimelineMetadata:
    """Decode and verify; any bad byte raises CorruptionError naming `path`."""
    if len(data) != METADATA_SIZE:
        raise CorruptionError(f"timeline metadata is {len(data)} bytes, expected "
                              f"{METADATA_SIZE}; restore the timeline from a backup",
                              path=path, offset=0)
    body, (stored,) = data[:-4], struct.unpack("<I", data[-4:])
    if crc32c(body) != stored:
        raise CorruptionError(f"timeline metadata checksum mismatch (stored {stored:08x}, "
                              f"computed {crc32c(body):08x}); the file is damaged",
                              path=path, offset=METADATA_SIZE - 4)
    (magic, version, flags, dcl, prev, anc_lsn, gc_cutoff, initdb, pg_version,
     ancestor) = _BODY.unpack_from(body)
    if magic != _MAGIC or version != _VERSION:
        raise CorruptionError(f"not a timeline metadata file (magic {magic:08x}, version "
                              f"{version})", path=path, offset=0)
    return TimelineMetadata(
        disk_consistent_lsn=Lsn(dcl), prev_record_lsn=Lsn(prev),
        ancestor_timeline=TimelineId(ancestor) if flags & _FLAG_HAS_ANCESTOR else None,
        ancestor_lsn=Lsn(anc_lsn), latest_gc_cutoff=Lsn(gc_cutoff), initdb_lsn=Lsn(initdb),
        pg_version=pg_version)


def save_metadata(timeline_dir: Path, meta: TimelineMetadata) -> None:
    write_atomic(timeline_dir / METADATA_FILE, encode_metadata(meta),
                 failpoint_prefix="metadata")


def load_metadata(timeline_dir: Path) -> TimelineMetadata:
    path = timeline_dir / METADATA_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError as err:
        raise NotFound(f"timeline directory {timeline_dir} has no metadata file; it was "
                       f"never fully created and can be deleted") from err
    return decode_metadata(data, str(path))
