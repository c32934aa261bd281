"""Import a cleanly shut down, freshly initdb'ed PostgreSQL 15 data directory into a timeline.

initdb's bootstrap contents are not in WAL (architecture D2), so a tenant starts from a
base image: every page of every relation file (all forks, all segments) as an `Image`,
the SLRU segments (pg_xact, pg_multixact/offsets and /members), each pg_filenode.map,
PG_VERSION per database, any pg_twophase files, the pg_control file as a template, and
the checkpoint counters, all at X0 = the end of initdb's shutdown-checkpoint record C
(the key space is in docs/storage.md). Then `finish_record(X0, C)`, so that the
first WAL record the compute writes lands right after the imported state.

The data directory is only read. It must have been cleanly shut down (state "shut
down", the latest checkpoint a shutdown checkpoint whose record is in pg_wal and the last
record there): a fresh initdb, or a stock PostgreSQL 15 server stopped with `pg_ctl stop
-m fast` (`strata tenant create --import-datadir`). A crashed or running server has WAL
after C that the import would silently miss.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from strata.common.errors import CorruptionError, UserError
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.datadir import (
    RELMAP_FILE,
    SLRU_DIRS,
    check_relmap,
    put_checkpoint,
    put_control_file,
    put_database,
    put_relmap,
    put_slru_segment_size,
    put_twophase,
    twophase_stored,
)
from strata.pg.checkpoint import CheckPoint
from strata.pg.constants import (
    BLCKSZ,
    GLOBALTABLESPACE_OID,
    RELSEG_SIZE,
    XLOG_CHECKPOINT_SHUTDOWN,
    RmgrId,
)
from strata.pg.controlfile import ControlFileData, DBState
from strata.pg.relfile import RelTag, parse_path
from strata.pg.slru import SLRU_PAGES_PER_SEGMENT, SlruKind, parse_segment_file_name
from strata.pg.walreader import read_wal_files
from strata.storage.key import slru_block_key
from strata.storage.tenant import Tenant
from strata.storage.timeline import Timeline
from strata.storage.value import Image

log = logging.getLogger(__name__)



@dataclass(frozen=True, slots=True)
class InitdbPoint:
    """Where an initdb'ed data directory's history ends: its shutdown checkpoint record."""

    checkpoint_lsn: Lsn  # C, the record's start
    end_lsn: Lsn  # X0, the record's (MAXALIGNed) end: where the next record goes
    checkpoint: CheckPoint
    control: ControlFileData
    control_bytes: bytes


@dataclass(frozen=True, slots=True)
class ImportStats:
    relation_forks: int
    relation_pages: int
    slru_pages: int
    databases: int
    twophase_files: int


STOP_HINT = "stop it with `pg_ctl stop -m fast` (after a crash: start and stop it again)"


def check_datadir(datadir: Path) -> None:
    """One-line UserErrors for what is plainly not importable: not a directory,
    unreadable, not PostgreSQL 15."""
    if not datadir.is_absolute():
        raise UserError(f"{datadir}: give the data directory as an absolute path")
    try:
        if not datadir.is_dir():
            raise UserError(f"{datadir} is not a directory")
        version_file = datadir / "PG_VERSION"
        if not version_file.exists():
            raise UserError(f"{datadir} is not a PostgreSQL data directory (no PG_VERSION)")
        version = version_file.read_text().strip()
    except PermissionError as err:
        raise UserError(f"{datadir} is not readable by the pageserver's user "
                        f"(uid {os.getuid()}): {err.strerror}") from err
    if version != "15":
        raise UserError(f"{datadir} is a PostgreSQL {version} data directory; Strata imports "
                        f"PostgreSQL 15 only")
    for sub in ("global", "base", "pg_wal", "pg_xact", "pg_multixact/offsets",
                "pg_multixact/members"):
        if not os.access(datadir / sub, os.R_OK | os.X_OK):
            raise UserError(f"{datadir / sub} is missing or not readable by the pageserver's "
                            f"user (uid {os.getuid()})")


def read_initdb_point(datadir: Path) -> InitdbPoint:
    """Validate `datadir` as a cleanly shut down data directory and find C and X0."""
    control_path = datadir / "global" / "pg_control"
    try:
        control_bytes = control_path.read_bytes()
    except FileNotFoundError as err:
        raise UserError(f"{datadir} is not a PostgreSQL data directory (no global/pg_control)"
                        ) from err
    except PermissionError as err:
        raise UserError(f"{control_path} is not readable by the pageserver's user "
                        f"(uid {os.getuid()})") from err
    control = ControlFileData.from_bytes(control_bytes, path=str(control_path))
    if control.state != DBState.SHUTDOWNED:
        state = DBState(control.state).name.lower().replace("_", " ") \
            if control.state in DBState._value2member_map_ else str(control.state)
        raise UserError(f"{datadir} was not shut down cleanly (pg_control state "
                        f"{state!r}: is it running?); {STOP_HINT}")
    if control.data_checksum_version != 0:
        # Stored images carry a stale pd_checksum and nothing recomputes it (D2).
        raise UserError(f"{datadir} has data checksums enabled; Strata computes run "
                        f"without them: initdb without --data-checksums")
    c = control.checkpoint
    records = read_wal_files(datadir / "pg_wal", start=c)
    first = next(records, None)
    if first is None or first.lsn != c.value:
        raise CorruptionError(f"the checkpoint record at {c} named by pg_control is not in "
                              f"pg_wal", path=str(datadir / "pg_wal"))
    if first.rmid != RmgrId.XLOG or first.info & 0xF0 != XLOG_CHECKPOINT_SHUTDOWN:
        raise UserError(f"the latest checkpoint of {datadir} at {c} is not a shutdown "
                        f"checkpoint ({first.rmgr_name} info {first.info:#04x}); {STOP_HINT}")
    following = next(records, None)
    if following is not None:
        raise UserError(f"{datadir} has WAL after its shutdown checkpoint (a record at "
                        f"{Lsn(following.lsn)}): it was started again (is it running?); "
                        f"{STOP_HINT}")
    checkpoint = CheckPoint.from_bytes(first.main_data)
    assert checkpoint == control.checkpoint_copy, (checkpoint, control.checkpoint_copy)
    return InitdbPoint(c, Lsn(first.end_lsn), checkpoint, control, control_bytes)


def import_new_timeline(tenant: Tenant, timeline_id: TimelineId, datadir: Path) -> Timeline:
    """Create a root timeline at `datadir`'s initdb LSN and import the directory into it."""
    point = read_initdb_point(datadir)
    timeline = tenant.create_timeline(timeline_id, point.end_lsn)
    import_datadir(timeline, datadir, point)
    return timeline


def import_datadir(timeline: Timeline, datadir: Path,
                   point: InitdbPoint | None = None) -> ImportStats:
    """Store the whole of `datadir` at its initdb LSN X0 in a new, empty `timeline`."""
    if point is None:
        point = read_initdb_point(datadir)
    x0 = point.end_lsn
    if timeline.initdb_lsn != x0:
        raise UserError(f"timeline {timeline.timeline_id} was created with initdb LSN "
                        f"{timeline.initdb_lsn}, but {datadir} ends at {x0}")
    if timeline.last_record_lsn.value != 0:
        raise UserError(f"timeline {timeline.timeline_id} is not empty (last_record_lsn "
                        f"{timeline.last_record_lsn}); import into a new timeline")
    forks = pages = databases = 0
    for rel, paths in sorted(_relation_files(datadir).items()):
        timeline.create_rel(rel, x0)
        forks += 1
        pages += _import_fork(timeline, rel, paths, x0)
    for db_dir in _database_dirs(datadir):
        spcnode, dbnode = db_dir
        path = datadir / "base" / str(dbnode)
        put_database(timeline, spcnode, dbnode, x0, (path / "PG_VERSION").read_bytes())
        put_relmap(timeline, spcnode, dbnode, x0, _relmap(path / RELMAP_FILE))
        databases += 1
    put_relmap(timeline, GLOBALTABLESPACE_OID, 0, x0, _relmap(datadir / "global" / RELMAP_FILE))
    slru_pages = sum(_import_slru(timeline, kind, datadir / sub, x0)
                     for kind, sub in SLRU_DIRS.items())
    twophase = _import_twophase(timeline, datadir / "pg_twophase", x0)
    put_control_file(timeline, x0, point.control_bytes)
    put_checkpoint(timeline, x0, point.checkpoint)
    timeline.finish_record(x0, point.checkpoint_lsn)
    stats = ImportStats(forks, pages, slru_pages, databases, twophase)
    log.info("imported %s at %s into timeline %s: %s", datadir, x0, timeline.timeline_id, stats)
    return stats


def _relation_files(datadir: Path) -> dict[RelTag, list[tuple[int, Path]]]:
    """Relation segment files of global/ and base/*/, by fork: [(segno, path)]."""
    found: dict[RelTag, list[tuple[int, Path]]] = {}
    for sub in _walk_relation_dirs(datadir):
        for entry in sorted(os.listdir(datadir / sub)):
            loc = parse_path(f"{sub}/{entry}")
            if loc is None:
                continue  # PG_VERSION, pg_filenode.map, pg_internal.init, temp files
            rel = RelTag(loc.spcnode, loc.dbnode, loc.relnode, int(loc.fork))
            found.setdefault(rel, []).append((loc.segno, datadir / sub / entry))
    return found


def _walk_relation_dirs(datadir: Path) -> list[str]:
    subs = ["global"] + [f"base/{dbnode}" for _, dbnode in _database_dirs(datadir)]
    if any((datadir / "pg_tblspc").iterdir()):
        raise UserError(f"{datadir} has tablespaces in pg_tblspc; Strata imports only "
                        f"the default ones (move the tables with ALTER TABLE SET TABLESPACE "
                        f"pg_default)")
    return subs


def _database_dirs(datadir: Path) -> list[tuple[int, int]]:
    dbs = []
    for entry in sorted(os.listdir(datadir / "base"), key=lambda e: (len(e), e)):
        if entry.isdigit() and (datadir / "base" / entry / "PG_VERSION").exists():
            dbs.append((1663, int(entry)))
    return dbs


def _import_fork(timeline: Timeline, rel: RelTag, paths: list[tuple[int, Path]],
                 lsn: Lsn) -> int:
    pages = 0
    segnos = sorted(segno for segno, _ in paths)
    if segnos != list(range(len(segnos))):
        raise CorruptionError(f"{rel}: segment files {segnos} are not consecutive from 0",
                              path=str(paths[0][1]))
    for segno, path in sorted(paths):
        data = path.read_bytes()
        if len(data) % BLCKSZ:
            raise CorruptionError(f"{rel}: relation file is not a whole number of "
                                  f"{BLCKSZ}-byte blocks ({len(data)} bytes)", path=str(path),
                                  offset=len(data) - len(data) % BLCKSZ)
        if segno < len(segnos) - 1 and len(data) != RELSEG_SIZE * BLCKSZ:
            raise CorruptionError(f"{rel}: segment {segno} is not full but a later one exists",
                                  path=str(path), offset=len(data))
        for index in range(len(data) // BLCKSZ):
            blkno = segno * RELSEG_SIZE + index
            timeline.put_rel_page(rel, blkno, lsn,
                                  Image(data[index * BLCKSZ:(index + 1) * BLCKSZ]))
            pages += 1
    return pages


def _relmap(path: Path) -> bytes:
    return check_relmap(path.read_bytes(), str(path))


def _import_slru(timeline: Timeline, kind: SlruKind, directory: Path, lsn: Lsn) -> int:
    pages = 0
    for entry in sorted(os.listdir(directory)):
        segno = parse_segment_file_name(entry)
        if segno is None:
            continue
        data = (directory / entry).read_bytes()
        npages = len(data) // BLCKSZ
        if len(data) % BLCKSZ or npages > SLRU_PAGES_PER_SEGMENT:
            raise CorruptionError(f"{kind.name} segment is {len(data)} bytes, not a whole "
                                  f"number of pages up to {SLRU_PAGES_PER_SEGMENT}",
                                  path=str(directory / entry), offset=0)
        for blkno in range(npages):
            timeline.put(slru_block_key(kind, segno, blkno), lsn,
                         Image(data[blkno * BLCKSZ:(blkno + 1) * BLCKSZ]))
        put_slru_segment_size(timeline, kind, segno, lsn, npages)
        pages += npages
    return pages


def _import_twophase(timeline: Timeline, directory: Path, lsn: Lsn) -> int:
    """pg_twophase/<XID> files: stored without their trailing CRC-32C (docs/storage.md)."""
    count = 0
    if not directory.exists():
        return 0
    for entry in sorted(os.listdir(directory)):
        if len(entry) != 8 or any(c not in "0123456789ABCDEF" for c in entry):
            continue
        body = twophase_stored((directory / entry).read_bytes(), str(directory / entry))
        put_twophase(timeline, int(entry, 16), lsn, body)
        count += 1
    return count
