"""Relation file naming: (tablespace, database, relfilenode, fork, segment) <-> data dir path.

Source: relpath.c `GetRelationPath` and md.c (segment files) in PostgreSQL 15:

    global/<rel>[_fsm|_vm|_init][.N]                            tablespace 1664 (db 0)
    base/<db>/<rel>[...][.N]                                    tablespace 1663
    pg_tblspc/<spc>/PG_15_202209061/<db>/<rel>[...][.N]         any other tablespace

Segment N > 0 holds blocks [N * RELSEG_SIZE, (N + 1) * RELSEG_SIZE); segment 0 has no
suffix. Temporary relations (`t<backend>_<rel>`) are not named here: they never reach the
storage and `parse_path` returns None for them, as for every non-relation file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from strata.pg.constants import (
    BLCKSZ,
    CATALOG_VERSION_NO,
    DEFAULTTABLESPACE_OID,
    FORK_SUFFIX,
    GLOBALTABLESPACE_OID,
    PG_MAJORVERSION,
    RELSEG_SIZE,
    ForkNumber,
)

TABLESPACE_VERSION_DIRECTORY = f"PG_{PG_MAJORVERSION}_{CATALOG_VERSION_NO}"
_OID_MAX = 0xFFFFFFFF
_FORK_BY_SUFFIX = {suffix: fork for fork, suffix in FORK_SUFFIX.items()}
# An OID printed by "%u": no sign, no leading zeros (PostgreSQL never writes them).
_OID = r"[1-9][0-9]{0,9}"
_FILE = re.compile(rf"^({_OID})(_fsm|_vm|_init)?(?:\.({_OID}))?$")


class RelTag(NamedTuple):
    """One fork of one relation (relfilenode.h RelFileNode + ForkNumber).

    A tuple (a `NamedTuple`), not a dataclass: ingest looks a fork up in the timeline's
    size cache on every block put, and a tuple's hash and equality run in C where a
    dataclass's are Python calls; its order (field by field) is the dataclass's.
    """

    spcnode: int
    dbnode: int
    relnode: int
    forknum: int

    def __str__(self) -> str:
        return f"rel {self.spcnode}/{self.dbnode}/{self.relnode} fork {self.forknum}"


@dataclass(frozen=True, slots=True, order=True)
class RelFileLocation:
    """One segment file of one fork of a relation."""

    spcnode: int
    dbnode: int
    relnode: int
    fork: ForkNumber = ForkNumber.MAIN
    segno: int = 0

    def __post_init__(self) -> None:
        assert 0 < self.spcnode <= _OID_MAX, self.spcnode
        assert 0 <= self.dbnode <= _OID_MAX, self.dbnode
        assert 0 < self.relnode <= _OID_MAX, self.relnode
        assert self.segno >= 0, self.segno
        # The global tablespace holds only shared catalogs, which have no database.
        assert (self.spcnode == GLOBALTABLESPACE_OID) == (self.dbnode == 0), \
            (self.spcnode, self.dbnode)

    @property
    def path(self) -> str:
        return relation_path(self.spcnode, self.dbnode, self.relnode, self.fork, self.segno)


def relation_path(spcnode: int, dbnode: int, relnode: int, fork: ForkNumber = ForkNumber.MAIN,
                  segno: int = 0) -> str:
    """The path of a relation segment file, relative to the data directory."""
    name = f"{relnode}{FORK_SUFFIX[ForkNumber(fork)]}"
    if segno:
        name += f".{segno}"
    if spcnode == GLOBALTABLESPACE_OID:
        assert dbnode == 0, dbnode
        return f"global/{name}"
    if spcnode == DEFAULTTABLESPACE_OID:
        return f"base/{dbnode}/{name}"
    return f"pg_tblspc/{spcnode}/{TABLESPACE_VERSION_DIRECTORY}/{dbnode}/{name}"


def parse_path(path: str) -> RelFileLocation | None:
    """The relation segment a data-directory-relative path names, or None for other files."""
    parts = path.strip("/").split("/")
    spcnode: int | None
    dbnode: int | None
    match parts:
        case ["global", name]:
            spcnode, dbnode = GLOBALTABLESPACE_OID, 0
        case ["base", db, name]:
            spcnode, dbnode = DEFAULTTABLESPACE_OID, _oid(db)
        case ["pg_tblspc", spc, version, db, name] if version == TABLESPACE_VERSION_DIRECTORY:
            spcnode, dbnode = _oid(spc), _oid(db)
            if spcnode in (DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID):
                return None  # never under pg_tblspc; the path is not PostgreSQL's
        case _:
            return None
    m = _FILE.match(name)
    if m is None or spcnode is None or dbnode is None:
        return None
    if spcnode != GLOBALTABLESPACE_OID and dbnode == 0:
        return None
    relnode = int(m.group(1))
    segno = int(m.group(3)) if m.group(3) else 0
    if relnode > _OID_MAX:
        return None
    return RelFileLocation(spcnode, dbnode, relnode, _FORK_BY_SUFFIX[m.group(2) or ""], segno)


def _oid(text: str) -> int | None:
    if re.fullmatch(_OID, text) is None or int(text) > _OID_MAX:
        return None
    return int(text)


def block_segment(blkno: int) -> int:
    """The segment file number holding block `blkno`."""
    assert blkno >= 0, blkno
    return blkno // RELSEG_SIZE


def block_file_offset(blkno: int) -> int:
    """Byte offset of block `blkno` within its segment file."""
    assert blkno >= 0, blkno
    return (blkno % RELSEG_SIZE) * BLCKSZ


def segment_first_block(segno: int) -> int:
    assert segno >= 0, segno
    return segno * RELSEG_SIZE


def relation_segments(nblocks: int, relseg_size: int) -> list[tuple[int, int, int]]:
    """(segno, first block, block count) of each segment file of an `nblocks`-block fork.

    An empty fork is one empty file. A fork whose size is a multiple of `relseg_size`
    has no trailing empty segment: md.c `mdnblocks` stops at a missing next segment.
    """
    assert nblocks >= 0, nblocks
    assert relseg_size > 0, relseg_size
    if nblocks == 0:
        return [(0, 0, 0)]
    return [(segno, segno * relseg_size, min(relseg_size, nblocks - segno * relseg_size))
            for segno in range((nblocks + relseg_size - 1) // relseg_size)]
