"""The lazy basebackup's relation list, as the segment files the file system serves.

The pageserver writes `strata_lazy_rels` into a lazy basebackup (basebackup.py): one
line `spcnode dbnode relnode forknum nblocks` per relation fork at X. Each fork becomes
segment files of `relseg_size` blocks exactly as a full basebackup lays them out
(`strata.pg.relfile.relation_segments`: `N`, `N.1`, ...; an empty fork is one empty file).
An unlogged relation (one with an init fork) gets its main fork as a copy of its init
fork and no other fork, as `ResetUnloggedRelations`
(reinit.c) leaves it after a crash. Relations outside the default and global
tablespaces are refused: lazy mode does not serve `pg_tblspc/`.
"""

from __future__ import annotations

from dataclasses import dataclass

from strata.common.errors import CorruptionError, UserError
from strata.compute.lazyfs import MANIFEST_NAME
from strata.pg.constants import DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID, ForkNumber
from strata.pg.relfile import RelTag, relation_path, relation_segments


@dataclass(frozen=True, slots=True)
class SegmentFile:
    """One relation segment file: its data-directory path and where its blocks come from."""

    path: str  # e.g. "base/5/16384.1"
    source: RelTag
    first_block: int
    nblocks: int


def parse_manifest(text: str, where: str = MANIFEST_NAME) -> dict[RelTag, int]:
    """Relation forks and their sizes in blocks."""
    out: dict[RelTag, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            spc, db, rel, fork, nblocks = (int(f) for f in fields)
            tag = RelTag(spc, db, rel, ForkNumber(fork))
        except ValueError as err:
            raise CorruptionError(f"{where} line {lineno} is not `spcnode dbnode relnode "
                                  f"forknum nblocks`: {line!r}", path=where) from err
        if nblocks < 0:
            raise CorruptionError(f"{where} line {lineno}: negative size {nblocks}", path=where)
        out[tag] = nblocks
    return out


def segment_files(rels: dict[RelTag, int], relseg_size: int) -> list[SegmentFile]:
    """Every segment file the compute sees at X, in path order."""
    assert relseg_size > 0, relseg_size
    by_rel: dict[tuple[int, int, int], set[int]] = {}
    for rel in rels:
        if rel.spcnode not in (DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID):
            raise UserError(f"relation {rel} is in tablespace {rel.spcnode}; lazy computes "
                            "serve only the default and global tablespaces: start this "
                            "endpoint in full mode, or move the relation with ALTER TABLE "
                            "... SET TABLESPACE pg_default")
        by_rel.setdefault((rel.spcnode, rel.dbnode, rel.relnode), set()).add(int(rel.forknum))
    out: list[SegmentFile] = []
    for (spc, db, relnode), forks in sorted(by_rel.items()):
        if ForkNumber.INIT in forks:
            init = RelTag(spc, db, relnode, ForkNumber.INIT)
            wanted = [(ForkNumber.MAIN, init), (ForkNumber.INIT, init)]
        else:
            wanted = [(ForkNumber(f), RelTag(spc, db, relnode, ForkNumber(f)))
                      for f in sorted(forks)]
        for fork, source in wanted:
            for segno, first, count in relation_segments(rels[source], relseg_size):
                out.append(SegmentFile(relation_path(spc, db, relnode, fork, segno), source,
                                       first, count))
    return out
