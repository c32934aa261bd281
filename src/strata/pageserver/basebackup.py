"""Basebackup: a tar stream of a data directory at LSN X on which stock PostgreSQL 15 starts clean.

Architecture D6. The tar holds everything PostgreSQL needs to start as after a clean
shutdown at X, built from what import and ingest stored (docs/storage.md, key space):

* `global/pg_control`: the imported template with a shutdown checkpoint at X
  (`ControlFileData.with_clean_start`), the counters from the checkpoint key;
* `pg_wal/`: the synthesized segment(s) holding that single checkpoint record, whose
  xl_prev is the previous record on the timeline (`strata.pg.walwriter`), and an empty
  `archive_status/`;
* relation files (mode 'full'): every fork of every relation materialized at X, split
  into segment files `.N` of `relseg_size` blocks (md.c). When pg_control says data
  checksums are on, every page gets its checksum recomputed: WAL images carry a stale
  one (D2). An unlogged relation (one with
  an init fork) gets its init fork and a main fork that is a copy of it, nothing else:
  a clean start skips `ResetUnloggedRelations`, which would otherwise do that copy
  (postgres15.md sec. 3);
* `PG_VERSION` (top level and per database), `pg_filenode.map` (global and per
  database), `pg_xact/` and `pg_multixact/{offsets,members}/` segment files,
  `pg_twophase/<xid>` for transactions still prepared at X (stored content + CRC-32C);
* `pg_replslot/<slot>/state`: the walproposer's physical slot with restart_lsn = X
  (primaries only: a read-only endpoint has no walproposer; it gets `standby.signal`);
  in pull mode one slot per safekeeper instead, `sk1..skN`, all at X (`slot_names`, the
  command's `slots=sk1,sk2,sk3`);
* the empty directories PostgreSQL expects, and minimal configuration files (the
  compute's settings are written by `strata.compute`).

Never in the tar: postmaster.pid, pg_internal.init, statistics files, other slots.
Mode 'lazy' is the same tar without relation segment files (a FUSE file system serves
them, D6), plus `strata_lazy_rels`: one line `spcnode dbnode relnode forknum nblocks` per
relation fork at X, so the file system can list directories and size files without asking.
Its WAL segments hold only their pages that are not all zeros; the pax headers
`FULL_SIZE_PAX_HEADER` and `DATA_MAP_PAX_HEADER` of each give the segment's size and
where those pages go, and the unpacking side (`Compute.unpack`) leaves the rest as holes
(zeros): up to 16 MB less per start.

`global/pg_control` is written last, as pg_basebackup does: an archive cut short
has no control file and cannot be started by mistake.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import struct
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO, NamedTuple, TypeVar

from strata.common.errors import CorruptionError, NotFound, UserError
from strata.common.lsn import Lsn
from strata.pageserver.api import DEFAULT_SLOT_NAME
from strata.pageserver.datadir import (
    PG_VERSION_CONTENT,
    RELMAP_FILE,
    SLRU_DIRS,
    databases,
    get_checkpoint,
    get_control_file,
    list_databases,
    read_slru_segments,
    relmaps,
    twophase_files,
)
from strata.pg.checksum import with_checksum
from strata.pg.constants import BLCKSZ, GLOBALTABLESPACE_OID, PGDATA_DIRS, ForkNumber
from strata.pg.crc import crc32c
from strata.pg.relfile import RelTag, relation_path, relation_segments
from strata.pg.slru import segment_file_name
from strata.pg.walwriter import (
    DATA_MAP_PAX_HEADER,
    FULL_SIZE_PAX_HEADER,
    format_data_map,
    synthesize_wal,
)
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)
T = TypeVar("T")

MODES = ("full", "lazy")
LAZY_MANIFEST = "strata_lazy_rels"

EMPTY_DIRS = PGDATA_DIRS  # every basebackup has them (strata.pg.constants)

POSTGRESQL_CONF = (b"# Written by the Strata basebackup. The compute's settings are in an\n"
                   b"# included file written by strata.compute.\n")
PG_HBA_CONF = (b"# Written by the Strata basebackup: trust on the local socket and loopback.\n"
               b"local   all             all                     trust\n"
               b"host    all             all     127.0.0.1/32    trust\n"
               b"host    all             all     ::1/128         trust\n"
               b"local   replication     all                     trust\n"
               b"host    replication     all     127.0.0.1/32    trust\n"
               b"host    replication     all     ::1/128         trust\n")
PG_IDENT_CONF = b"# Written by the Strata basebackup: no user name maps.\n"

# --- replication slot state file (slot.c ReplicationSlotOnDisk, PG15) ------------------
# magic u32 @0, checksum u32 @4 (CRC-32C of bytes [8, 200)), version u32 @8, length u32
# @12 (= 184, the size of the part after it), then ReplicationSlotPersistentData
# (slot.h): name NameData[64] @16, database Oid @80, persistency enum @84, xmin @88,
# catalog_xmin @92, restart_lsn u64 @96, invalidated_at @104, confirmed_flush @112,
# two_phase_at @120, two_phase bool @128, plugin NameData[64] @129, 7 pad -> 200.
# Checked byte for byte against a state file PostgreSQL 15 wrote (tests/unit).
SLOT_MAGIC = 0x1051CA1
SLOT_VERSION = 2
SLOT_STATE_SIZE = 200
_SLOT_HEAD = struct.Struct("<IIII")
_SLOT_DATA = struct.Struct("<64sIiIIQQQQ?64s7x")
assert _SLOT_HEAD.size + _SLOT_DATA.size == SLOT_STATE_SIZE, _SLOT_DATA.size
_SLOT_CRC_START = 8  # magic and checksum are not covered
RS_PERSISTENT = 0  # slot.h ReplicationSlotPersistency
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")  # ReplicationSlotValidateName

_U32 = struct.Struct("<I")

_DIR_MODE = 0o700
_FILE_MODE = 0o600


class BasebackupLsns(NamedTuple):
    """Where the synthesized shutdown checkpoint is: PostgreSQL's first record goes at end_lsn."""

    record_lsn: Lsn
    end_lsn: Lsn


def slot_state_bytes(name: str, restart_lsn: Lsn) -> bytes:
    """The 200-byte `pg_replslot/<name>/state` of a persistent physical slot (slot.c)."""
    if _SLOT_NAME.fullmatch(name) is None:
        raise UserError(f"invalid replication slot name {name!r}: use 1-63 lower case "
                        "letters, digits and underscores")
    data = _SLOT_DATA.pack(name.encode(), 0, RS_PERSISTENT, 0, 0, restart_lsn.value, 0, 0, 0,
                           False, b"")
    covered = _U32.pack(SLOT_VERSION) + _U32.pack(_SLOT_DATA.size) + data
    head = _SLOT_HEAD.pack(SLOT_MAGIC, crc32c(covered), SLOT_VERSION, _SLOT_DATA.size)
    state = head + data
    assert len(state) == SLOT_STATE_SIZE, len(state)
    return state


class _PageReader:
    """A file-like `read(n)` over a stream of pages, for tarfile to copy without buffering all."""

    def __init__(self, pages: Iterator[bytes]) -> None:
        self._pages = pages
        self._buf = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            page = next(self._pages, None)
            if page is None:
                break
            self._buf += page
        if size < 0:
            size = len(self._buf)
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out


class _TarWriter:
    """Entries of one tar stream, with the modes and times PostgreSQL expects."""

    def __init__(self, out: BinaryIO, mtime: int) -> None:
        self.tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)
        self.mtime = mtime
        self.files = 0
        self.bytes = 0

    def _info(self, path: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(path)
        info.type = kind
        info.mode = mode
        info.size = size
        info.mtime = self.mtime
        return info

    def add_dir(self, path: str) -> None:
        self.tar.addfile(self._info(path, tarfile.DIRTYPE, _DIR_MODE, 0))

    def add_file(self, path: str, data: bytes) -> None:
        self.add_stream(path, len(data), iter((data,)))

    def add_sparse_file(self, path: str, data: bytes, runs: list[tuple[int, int]]) -> None:
        """`data` as only its pages that are not all zeros (`runs`, as `written_runs`
        gives them), with the pax headers that say where they go (`DATA_MAP_PAX_HEADER`)
        and how long the file is."""
        info = self._info(path, tarfile.REGTYPE, _FILE_MODE, sum(n for _, n in runs))
        info.pax_headers = {FULL_SIZE_PAX_HEADER: str(len(data)),
                            DATA_MAP_PAX_HEADER: format_data_map(runs)}
        chunks = iter([data[offset:offset + length] for offset, length in runs])
        self.tar.addfile(info, _PageReader(chunks) if runs else None)
        self.files += 1
        self.bytes += info.size

    def add_stream(self, path: str, size: int, chunks: Iterator[bytes]) -> None:
        """A file of exactly `size` bytes whose content is produced while it is written."""
        info = self._info(path, tarfile.REGTYPE, _FILE_MODE, size)
        self.tar.addfile(info, _PageReader(chunks) if size else None)
        self.files += 1
        self.bytes += size

    def close(self) -> None:
        self.tar.close()


def write_basebackup(timeline: Timeline, lsn: Lsn, out: BinaryIO, *, mode: str = "full",
                     slot_names: Sequence[str] = (DEFAULT_SLOT_NAME,),
                     read_only: bool = False,
                     prev_lsn: Lsn | None = None, now: int | None = None) -> BasebackupLsns:
    """Write a basebackup of `timeline` at `lsn` (a record end) to `out` as a tar stream.

    `prev_lsn` is the start of the record ending at `lsn` (the checkpoint's xl_prev);
    by default the timeline's prev_record_lsn when `lsn` is its last_record_lsn, else
    0/0, which PostgreSQL accepts. `now` (seconds since the epoch) is the checkpoint and
    pg_control time. `slot_names`: the physical slots at `lsn` of a primary (the
    walproposer's, or the safekeepers' `sk<id>` in pull mode). Returns where the checkpoint
    record landed and its end.
    """
    started = time.monotonic()
    if mode not in MODES:
        raise UserError(f"unknown basebackup mode {mode!r}; use one of {', '.join(MODES)}")
    check_basebackup_lsn(timeline, lsn)
    if len(set(slot_names)) != len(slot_names):
        raise UserError(f"basebackup slot names repeat: {list(slot_names)}")
    slot_states = {} if read_only else {name: slot_state_bytes(name, lsn) for name in slot_names}
    prev = prev_lsn if prev_lsn is not None else (
        timeline.prev_record_lsn if lsn == timeline.last_record_lsn else Lsn(0))
    now = int(time.time()) if now is None else now

    control = _get_meta(get_control_file, timeline, lsn, "pg_control template")
    if control.blcksz != BLCKSZ:
        raise CorruptionError(f"pg_control template says BLCKSZ {control.blcksz}, Strata "
                              f"supports {BLCKSZ}", path="global/pg_control", offset=216)
    stored = _get_meta(get_checkpoint, timeline, lsn, "checkpoint")
    # A shutdown checkpoint has no running transactions (CreateCheckPoint).
    checkpoint = dataclasses.replace(stored, time=now, full_page_writes=True,
                                     oldest_active_xid=0)
    wal = synthesize_wal(lsn, prev, checkpoint, system_identifier=control.system_identifier,
                         seg_size=control.xlog_seg_size)
    new_control = control.with_clean_start(wal.checkpoint, wal.record_lsn, time=now)

    tar = _TarWriter(out, now)
    tar.add_file("PG_VERSION", PG_VERSION_CONTENT)
    for path in EMPTY_DIRS:
        tar.add_dir(path)
    for name, data in (("postgresql.conf", POSTGRESQL_CONF), ("pg_hba.conf", PG_HBA_CONF),
                       ("pg_ident.conf", PG_IDENT_CONF)):
        tar.add_file(name, data)
    _write_databases(tar, timeline, lsn, with_relations=mode == "full",
                     relseg_size=control.relseg_size,
                     checksums=control.data_checksum_version != 0)
    if mode == "lazy":
        tar.add_file(LAZY_MANIFEST, lazy_manifest(timeline, lsn))
    for kind, directory in SLRU_DIRS.items():
        for segno, data in read_slru_segments(timeline, kind, lsn):
            tar.add_file(f"{directory}/{segment_file_name(segno)}", data)
    for xid, data in twophase_files(timeline, lsn):
        tar.add_file(f"pg_twophase/{xid:08X}", data)
    if read_only:
        tar.add_file("standby.signal", b"")
    for name, state in slot_states.items():
        tar.add_dir(f"pg_replslot/{name}")
        tar.add_file(f"pg_replslot/{name}/state", state)
    for name, data in wal.segments.items():
        if mode == "lazy":  # a format for Strata's lazy computes only: zeros are implied
            tar.add_sparse_file(f"pg_wal/{name}", data, wal.data_runs[name])
        else:
            tar.add_file(f"pg_wal/{name}", data)
    tar.add_file("global/pg_control", new_control.to_bytes())
    tar.close()
    log.info("basebackup of timeline %s at %s (%s%s): checkpoint at %s, %d files, %d bytes "
             "in %.2fs", timeline.timeline_id, lsn, mode, ", read-only" if read_only else "",
             wal.record_lsn, tar.files, tar.bytes, time.monotonic() - started)
    return BasebackupLsns(wal.record_lsn, wal.end_lsn)


def check_basebackup_lsn(timeline: Timeline, lsn: Lsn) -> None:
    """Refuse an LSN that cannot be a retained record end of `timeline`."""
    where = f"timeline {timeline.timeline_id} of tenant {timeline.tenant_id}"
    if lsn.value % 8:
        raise UserError(f"basebackup LSN {lsn} is not 8-byte aligned, so it is not a record "
                        f"end; pass the MAXALIGNed end of a record of {where}")
    if lsn > timeline.last_record_lsn:
        raise UserError(f"basebackup LSN {lsn} is beyond the last record {where} has "
                        f"ingested ({timeline.last_record_lsn}); wait for the WAL to arrive "
                        "or pick an earlier LSN")
    if lsn < timeline.initdb_lsn:
        raise UserError(f"basebackup LSN {lsn} is before the initdb LSN "
                        f"{timeline.initdb_lsn} of {where}, where its data starts")
    if lsn < timeline.gc_cutoff:
        raise UserError(f"basebackup LSN {lsn} is below the GC cutoff {timeline.gc_cutoff} "
                        f"of {where}: that history was garbage collected; pick a later LSN")


def _get_meta(read: Callable[[Timeline, Lsn], T], timeline: Timeline, lsn: Lsn,
              what: str) -> T:
    try:
        return read(timeline, lsn)
    except NotFound as err:
        raise CorruptionError(f"timeline {timeline.timeline_id} has no {what} at {lsn}; "
                              "was it imported from an initdb'ed data directory?") from err


def _db_dir(spcnode: int, dbnode: int) -> str:
    """The database directory: the path of a relation file, without the file."""
    return relation_path(spcnode, dbnode, 1).rsplit("/", 1)[0]


def _write_databases(tar: _TarWriter, timeline: Timeline, lsn: Lsn, *, with_relations: bool,
                     relseg_size: int, checksums: bool) -> None:
    """Database directories with PG_VERSION, relation maps and (full mode) relation files."""
    dbs = databases(timeline, lsn)
    maps = relmaps(timeline, lsn)
    made: set[str] = set(EMPTY_DIRS)
    for spcnode, dbnode in sorted(set(dbs) | {(GLOBALTABLESPACE_OID, 0)}):
        directory = _db_dir(spcnode, dbnode)
        _add_dirs(tar, directory, made)
        if (spcnode, dbnode) in dbs and spcnode != GLOBALTABLESPACE_OID:
            tar.add_file(f"{directory}/PG_VERSION", dbs[(spcnode, dbnode)])
        if (spcnode, dbnode) in maps:
            tar.add_file(f"{directory}/{RELMAP_FILE}", maps[(spcnode, dbnode)])
        if with_relations:
            rels = timeline.list_rels(spcnode, dbnode, lsn)
            for path, nblocks, pages in relation_files(rels, timeline, lsn, relseg_size,
                                                       checksums=checksums):
                tar.add_stream(path, nblocks * BLCKSZ, pages)


def lazy_manifest(timeline: Timeline, lsn: Lsn) -> bytes:
    """`spcnode dbnode relnode forknum nblocks` lines of every relation fork at `lsn`."""
    lines = []
    for spcnode, dbnode in sorted(list_databases(timeline, lsn) | {(GLOBALTABLESPACE_OID, 0)}):
        sizes = timeline.rel_sizes(spcnode, dbnode, lsn)
        for rel in sorted(sizes):
            lines.append(f"{rel.spcnode} {rel.dbnode} {rel.relnode} {int(rel.forknum)} "
                         f"{sizes[rel]}\n")
    return "".join(lines).encode()


def _add_dirs(tar: _TarWriter, directory: str, made: set[str]) -> None:
    """Add `directory` and its missing parents (tablespace directories are nested)."""
    parts = directory.split("/")
    for i in range(1, len(parts) + 1):
        path = "/".join(parts[:i])
        if path not in made:
            tar.add_dir(path)
            made.add(path)


def relation_files(rels: Iterable[RelTag], timeline: Timeline, lsn: Lsn, relseg_size: int, *,
                   checksums: bool = False) -> Iterator[tuple[str, int, Iterator[bytes]]]:
    """(path, block count, pages) of every relation segment file of `rels` at `lsn`.

    A relation with an init fork is unlogged: its main fork is written as a copy of the
    init fork and its other forks are left out, as `ResetUnloggedRelations` (reinit.c)
    leaves them after a crash. The pages iterator must be consumed before the next item.
    """
    by_rel: dict[tuple[int, int, int], set[int]] = {}
    for rel in rels:
        by_rel.setdefault((rel.spcnode, rel.dbnode, rel.relnode), set()).add(rel.forknum)
    for (spcnode, dbnode, relnode), forks in sorted(by_rel.items()):
        if ForkNumber.INIT in forks:
            source = RelTag(spcnode, dbnode, relnode, ForkNumber.INIT)
            wanted = [(ForkNumber.MAIN, source), (ForkNumber.INIT, source)]
        else:
            wanted = [(ForkNumber(f), RelTag(spcnode, dbnode, relnode, f)) for f in sorted(forks)]
        for fork, source in wanted:
            nblocks = timeline.rel_size(source, lsn)
            for segno, first, count in relation_segments(nblocks, relseg_size):
                path = relation_path(spcnode, dbnode, relnode, fork, segno)
                yield path, count, _pages(timeline, source, lsn, first, count, checksums)


def _pages(timeline: Timeline, rel: RelTag, lsn: Lsn, first: int, count: int,
           checksums: bool) -> Iterator[bytes]:
    for blkno in range(first, first + count):
        page = timeline.get_rel_page(rel, blkno, lsn)
        assert len(page) == BLCKSZ, (rel, blkno, len(page))
        yield with_checksum(page, blkno) if checksums else page


