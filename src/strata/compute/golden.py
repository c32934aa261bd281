"""The golden page check: every relation page of a quiescent compute equals the page store's.

After a CHECKPOINT on a compute with no activity (or after a clean stop), each page
in its data directory must equal the page the page store serves at that LSN, once
both went through PostgreSQL 15's consistency-check masks (`strata.pg.masking`),
except that the GiST NSN and F_FOLLOW_RIGHT are compared unmasked (Strata sets
them itself, architecture D2). Relations PostgreSQL does not WAL-log exactly are
excluded by kind: sequences (their image is logged ahead), unlogged and temporary
relations, and free-space-map forks. Main and visibility-map forks are compared,
every segment file.

The relation list comes from each database's catalogue (pg_class, pg_am,
pg_relation_filenode() for mapped catalogs), read over a connection; the pages
come from the data directory and from `page_source(spcnode, dbnode, relnode,
forknum, blkno) -> 8192 bytes`. A difference names the relation (oid, name,
path), the block and the fields (`masking.diff_fields`). Two narrow kinds of
difference that PostgreSQL 15 itself makes without WAL are reported separately as
tolerated, never silently (see `tolerated_reason`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from strata.common.errors import CorruptionError, UserError
from strata.pg import masking
from strata.pg.constants import BLCKSZ, GLOBALTABLESPACE_OID, RELSEG_SIZE, ForkNumber
from strata.pg.relfile import relation_path

log = logging.getLogger(__name__)

PageSource = Callable[[int, int, int, int, int], bytes]
Connect = Callable[[str], "psycopg.Connection[Any]"]

# pg_am.amname -> the masking kind (tables, matviews and TOAST tables have amname 'heap').
_AM_KIND = {"heap": "heap", "btree": "btree", "hash": "hash", "gin": "gin", "gist": "gist",
            "spgist": "spgist", "brin": "brin", "bloom": "bloom"}
_CHECKED_FORKS = (ForkNumber.MAIN, ForkNumber.VISIBILITYMAP)

_RELATIONS_SQL = """
select c.oid, c.relname, c.relkind, c.relpersistence, coalesce(am.amname, ''),
       pg_relation_filenode(c.oid), c.reltablespace, c.relisshared
from pg_class c left join pg_am am on am.oid = c.relam
where c.relkind in ('r', 'i', 't', 'm', 'S')
order by c.oid
"""


@dataclass(frozen=True, slots=True)
class Relation:
    """One relation whose pages are checked."""

    database: str
    oid: int
    name: str
    relkind: str
    kind: str  # masking kind: 'heap', 'toast', 'btree', ... (masking.ACCESS_METHODS)
    spcnode: int
    dbnode: int
    relnode: int

    def path(self, fork: ForkNumber = ForkNumber.MAIN, segno: int = 0) -> str:
        return relation_path(self.spcnode, self.dbnode, self.relnode, fork, segno)

    def __str__(self) -> str:
        return f"{self.database}.{self.name} (oid {self.oid}, {self.path()})"


@dataclass(frozen=True, slots=True)
class Excluded:
    """A relation (or database) left out of the check, and why."""

    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class Catalogue:
    relations: tuple[Relation, ...]
    excluded: tuple[Excluded, ...]


@dataclass(frozen=True, slots=True)
class PageDifference:
    relation: Relation
    fork: ForkNumber
    blkno: int
    fields: tuple[str, ...]

    def __str__(self) -> str:
        segno, offset = divmod(self.blkno, RELSEG_SIZE)
        return (f"relation {self.relation.database}.{self.relation.name} "
                f"(oid {self.relation.oid}, {self.relation.kind}) "
                f"file {self.relation.path(self.fork, segno)} block {self.blkno} "
                f"(offset {offset * BLCKSZ}, fork {self.fork.name.lower()}): "
                f"{', '.join(self.fields)}")


@dataclass(frozen=True, slots=True)
class Tolerated:
    """A difference PostgreSQL itself creates without WAL, kept visible but not a failure."""

    difference: PageDifference
    reason: str


@dataclass(slots=True)
class GoldenReport:
    relations_checked: int = 0
    pages_checked: int = 0
    relations: list[Relation] = field(default_factory=list)  # the ones checked
    differences: list[PageDifference] = field(default_factory=list)
    tolerated: list[Tolerated] = field(default_factory=list)
    excluded: list[Excluded] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def kinds_with_differences(self) -> dict[str, int]:
        """Differing pages per masking kind (the design-relevant summary)."""
        counts: dict[str, int] = {}
        for diff in self.differences:
            kind = "vm" if diff.fork == ForkNumber.VISIBILITYMAP else diff.relation.kind
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    def summary(self, limit: int = 20) -> str:
        head = (f"golden check: {self.pages_checked} pages of {self.relations_checked} "
                f"relations, {len(self.differences)} differ, {len(self.tolerated)} tolerated")
        lines = [head] + [f"  {d}" for d in self.differences[:limit]]
        if len(self.differences) > limit:
            lines.append(f"  ... and {len(self.differences) - limit} more")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if self.differences:
            first = self.differences[0]
            raise CorruptionError(
                f"{self.summary()}\nthe page store does not reproduce the compute's pages; "
                "compare the WAL images of the first block named",
                path=first.relation.path(first.fork, first.blkno // RELSEG_SIZE),
                offset=(first.blkno % RELSEG_SIZE) * BLCKSZ)


# --- the catalogue -----------------------------------------------------------------

def read_catalogue(connect: Connect) -> Catalogue:
    """Every relation with storage in every database that accepts connections.

    Shared catalogs are listed once (from the first database read). Databases that
    refuse connections (template0) cannot be read and are listed as excluded.
    """
    relations: list[Relation] = []
    excluded: list[Excluded] = []
    with connect("postgres") as conn:
        databases = conn.execute(
            "select oid, datname, datallowconn, dattablespace from pg_database order by oid"
        ).fetchall()
    seen_shared: set[int] = set()
    for dboid, datname, allowconn, dattablespace in databases:
        if not allowconn:
            excluded.append(Excluded(f"database {datname} (oid {dboid})",
                                     "does not allow connections; its catalogue is unreadable"))
            continue
        with connect(datname) as conn:
            rows = conn.execute(_RELATIONS_SQL).fetchall()
        for row in rows:
            rel = _relation(datname, int(dboid), int(dattablespace), row, seen_shared, excluded)
            if rel is not None:
                relations.append(rel)
    return Catalogue(tuple(relations), tuple(excluded))


def _relation(datname: str, dboid: int, dattablespace: int, row: tuple[Any, ...],
              seen_shared: set[int], excluded: list[Excluded]) -> Relation | None:
    oid, name, relkind, persistence, amname, filenode, reltablespace, shared = row
    what = f"{datname}.{name} (oid {oid}, relkind {relkind})"
    if shared:
        if oid in seen_shared:
            return None
        seen_shared.add(oid)
        datname, dboid = "(shared)", 0
    if relkind == "S":
        excluded.append(Excluded(what, "sequence: its WAL image is logged ahead"))
        return None
    if persistence != "p":
        reason = "unlogged" if persistence == "u" else "temporary"
        excluded.append(Excluded(what, f"{reason} relation: not WAL-logged"))
        return None
    if filenode is None:
        excluded.append(Excluded(what, "no storage"))
        return None
    kind = _AM_KIND.get(amname, "")
    if relkind == "t" and kind == "heap":
        kind = "toast"
    if not kind:
        excluded.append(Excluded(what, f"access method {amname!r} has no mask here"))
        return None
    if shared:
        spcnode = GLOBALTABLESPACE_OID
    else:
        spcnode = int(reltablespace) or dattablespace
    return Relation(database=datname, oid=int(oid), name=str(name), relkind=str(relkind),
                    kind=kind, spcnode=spcnode, dbnode=dboid, relnode=int(filenode))


# --- the pages ---------------------------------------------------------------------

def _segments(datadir: Path, rel: Relation, fork: ForkNumber) -> list[Path]:
    paths = []
    segno = 0
    while (path := datadir / rel.path(fork, segno)).exists():
        paths.append(path)
        segno += 1
    return paths


def check_relation(datadir: Path, rel: Relation, page_source: PageSource,
                   report: GoldenReport) -> None:
    """Compare every page of `rel`'s main and VM forks with `page_source`."""
    main = _segments(datadir, rel, ForkNumber.MAIN)
    if not main:
        # A relation with storage always has a main fork file, even if empty.
        report.differences.append(PageDifference(rel, ForkNumber.MAIN, 0,
                                                 ("file missing from the data directory",)))
        return
    report.relations_checked += 1
    report.relations.append(rel)
    for fork in _CHECKED_FORKS:
        kind = "vm" if fork == ForkNumber.VISIBILITYMAP else rel.kind
        for segno, path in enumerate(_segments(datadir, rel, fork)):
            data = path.read_bytes()
            if len(data) % BLCKSZ:
                raise CorruptionError(f"relation file of {rel} is not a whole number of "
                                      f"{BLCKSZ}-byte blocks ({len(data)} bytes)",
                                      path=str(path), offset=len(data) - len(data) % BLCKSZ)
            for index in range(len(data) // BLCKSZ):
                blkno = segno * RELSEG_SIZE + index
                page = data[index * BLCKSZ:(index + 1) * BLCKSZ]
                expected = page_source(rel.spcnode, rel.dbnode, rel.relnode, int(fork), blkno)
                report.pages_checked += 1
                fields = compare_pages(page, expected, kind, blkno)
                if not fields:
                    continue
                diff = PageDifference(rel, fork, blkno, tuple(fields))
                reason = tolerated_reason(kind, page, expected, diff.fields)
                if reason is None:
                    report.differences.append(diff)
                else:
                    report.tolerated.append(Tolerated(diff, reason))


def compare_pages(actual: bytes, expected: bytes, kind: str, blkno: int) -> list[str]:
    """The fields in which two pages differ after masking (empty when they match)."""
    if len(expected) != BLCKSZ:
        return [f"page source returned {len(expected)} bytes, not {BLCKSZ}"]
    if actual == expected:
        return []
    masked: list[bytes] = []
    for which, page in (("data directory", actual), ("page source", expected)):
        try:
            masked.append(masking.mask_page(page, kind, keep_gist_nsn=True, blkno=blkno))
        except CorruptionError as err:
            return [f"{which} page cannot be masked: {err}"]
    if masked[0] == masked[1]:
        return []
    return masking.diff_fields(masked[0], masked[1], kind)


# SpGistMetaPageData (spgist_private.h): magic u32, then lastUsedPages, 8 cached pages of
# {blkno u32, freeSpace i32}; offsets relative to the page contents (byte 24).
_SPGIST_LAST_USED_PAGES = (4, 4 + 8 * 8)
_RANGE = re.compile(r"^(\w+)\[(\d+):(\d+)\]$")


def tolerated_reason(kind: str, actual: bytes, expected: bytes,
                     fields: tuple[str, ...]) -> str | None:
    """Why a difference is one PostgreSQL 15 makes itself without WAL, or None.

    Only two narrow cases, each verified against a real PostgreSQL 15:
    - a visibility-map page where the page store has a subset of the compute's bits.
      CREATE DATABASE ... STRATEGY WAL_LOG logs VM pages with log_newpage_buffer(...,
      page_std = true), so the bitmap falls in the image's "hole" and is lost in WAL
      (on a PostgreSQL replica too). Missing VM bits are safe: they only cost a heap
      visit or a vacuum; an extra bit would be reported.
    - an SP-GiST metapage differing only in its lastUsedPages cache, which
      SpGistUpdateMetaPage (spgutils.c) updates as an unlogged hint.
    """
    ranges = [_RANGE.match(f) for f in fields]
    if not all(ranges):
        return None
    spans = [(m.group(1), int(m.group(2)), int(m.group(3))) for m in ranges if m]
    if kind == "vm" and all(label == "bitmap" for label, _, _ in spans):
        start = masking.SIZE_OF_PAGE_HEADER
        if all(e & ~a == 0 for a, e in zip(actual[start:], expected[start:], strict=True)):
            return ("visibility-map bits missing from the page store (safe); PostgreSQL "
                    "WAL-logs some VM pages as standard pages, e.g. CREATE DATABASE "
                    "STRATEGY WAL_LOG, so the bitmap is the image's hole")
        return None
    low, high = _SPGIST_LAST_USED_PAGES
    if kind == "spgist" and all(label == "meta" and low <= s and e <= high
                                for label, s, e in spans):
        return "SP-GiST metapage lastUsedPages cache: an unlogged hint (SpGistUpdateMetaPage)"
    return None


def check_pages(datadir: Path, relations: Iterable[Relation],
                page_source: PageSource) -> GoldenReport:
    report = GoldenReport()
    for rel in relations:
        check_relation(datadir, rel, page_source, report)
    log.info("golden check of %s: %d pages of %d relations, %d differ, %d tolerated", datadir,
             report.pages_checked, report.relations_checked, len(report.differences),
             len(report.tolerated))
    return report


def golden_check(datadir: Path, connect: Connect, page_source: PageSource, *,
                 checkpoint: bool = True) -> GoldenReport:
    """Read the catalogue over `connect(dbname)`, CHECKPOINT, then compare every page.

    The compute must be quiescent (no sessions, autovacuum off or idle). Reading the
    catalogue can itself prune catalog pages (WAL-logged, but dirty only in shared
    buffers), so the CHECKPOINT comes after it; `page_source` is first called after
    the CHECKPOINT and must serve pages as of the end of the WAL at that point. With
    `checkpoint=False` the caller guarantees the files are already current (for
    example, the compute was stopped cleanly after the catalogue was read).
    """
    if not (datadir / "global" / "pg_control").exists():
        raise UserError(f"{datadir} is not a PostgreSQL data directory (no global/pg_control)")
    catalogue = read_catalogue(connect)
    if checkpoint:
        with connect("postgres") as conn:
            conn.execute("checkpoint")
    report = check_pages(datadir, catalogue.relations, page_source)
    report.excluded.extend(catalogue.excluded)
    return report
