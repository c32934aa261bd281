"""The golden page check against a page source built from the WAL alone (architecture D2).

A real PostgreSQL 15 runs with wal_consistency_checking=all and wal_compression=zstd, a
workload touches heap, TOAST, btree, hash, GIN, GiST (with page splits), SP-GiST, BRIN,
VACUUM and TRUNCATE, then the compute is checkpointed and left quiescent. The page source
knows nothing but a copy of the data directory taken right after initdb (bootstrap
contents are not in WAL) and the WAL written since: for each block, the newest image with
pd_lsn set to the record's end, the GiST left-child NSN/F_FOLLOW_RIGHT fix, the VM bits
heap records clear, and smgr truncation. Every included page must match; then one
corrupted tuple byte must be reported with its relation, block and field.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pgworkload import WORKLOAD_SETTINGS, run_workload
from strata.common.lsn import Lsn
from strata.compute import golden
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pg import masking
from strata.pg.constants import BLCKSZ, RELSEG_SIZE, XLOG_FPI, ForkNumber, RmgrId
from strata.pg.page import set_page_lsn
from strata.pg.records import heap as heap_records
from strata.pg.records import smgr as smgr_records
from strata.pg.records._cursor import Cursor
from strata.pg.relfile import relation_path
from strata.pg.visibilitymap import MAP_OFFSET, clear_bits, vm_block, vm_page_offset
from strata.pg.walreader import BlockRef, DecodedRecord, read_wal_files

Key = tuple[int, int, int, int, int]  # spcnode, dbnode, relnode, forknum, blkno
Patch = Callable[[bytearray], None]

# gistxlog.h (PostgreSQL 15)
XLOG_GIST_PAGE_UPDATE = 0x00
XLOG_GIST_PAGE_SPLIT = 0x30
# gist.h GISTPageOpaqueData: nsn u64 @0, rightlink u32 @8, flags u16 @12
GIST_NSN_AT, GIST_FLAGS_AT = 0, 12

EXTRA_WORKLOAD = [
    # GiST built empty, then filled: inserts split pages (PAGE_SPLIT, left-child fix).
    "create table spans (id int, r int4range, p point)",
    "create index spans_r_gist on spans using gist (r)",
    "create index spans_p_spgist on spans using spgist (p)",
    "insert into spans select g, int4range(g, g + g % 17), point(g % 211, g / 211) "
    "  from generate_series(1, 12000) g",
    # Hash and btree growing by inserts (bucket splits, btree page splits), GIN with
    # fastupdate off (entry/posting tree inserts), BRIN summarizing new ranges.
    "create table kv (id int, k int, tags text[])",
    "create index kv_k_hash on kv using hash (k)",
    "create index kv_id_btree on kv (id)",
    "create index kv_tags_gin on kv using gin (tags) with (fastupdate = off)",
    "create index kv_id_brin on kv using brin (id) with (pages_per_range = 4)",
    "insert into kv select g, g % 1000, array[(g % 50)::text, (g % 7)::text] "
    "  from generate_series(1, 12000) g",
    "delete from kv where id % 3 = 0",
    "delete from spans where id % 4 = 0",
    "vacuum kv",
    "vacuum spans",
    "select brin_summarize_new_values('kv_id_brin')",
    "insert into spans select g, int4range(g, g + 5), point(g % 97, g % 89) "
    "  from generate_series(12001, 14000) g",
    # VACUUM that truncates the heap tail (smgr TRUNCATE of main and VM forks).
    "create table tail (id int, pad text)",
    "insert into tail select g, repeat('t', 200) from generate_series(1, 3000) g",
    "vacuum tail",
    "delete from tail where id > 500",
    "vacuum tail",
    "update tail set pad = 'changed' where id % 10 = 0",
]


@dataclass(slots=True)
class _Version:
    """The newest image of one block, with the fixes D2 says the pageserver applies."""

    block: BlockRef
    rmid: int
    info: int
    end_lsn: int
    gist_left_child: bool


class WalImagePageSource:
    """A model of the pageserver's page at the end of the WAL: images plus VM clears."""

    def __init__(self, bootstrap: Path) -> None:
        self.bootstrap = bootstrap
        self.versions: dict[Key, _Version] = {}
        self.patches: dict[Key, list[Patch]] = {}  # applied after the version, in order
        self.cuts: dict[tuple[int, int, int, int], int] = {}  # (rel, fork) -> size cut to
        self.records = 0
        self.images = 0
        self.gist_fixes = 0
        self.vm_clears = 0
        self.truncates = 0
        self.refs_without_image: list[str] = []
        # The D2 fixes; each is switched off only to prove that the check needs it.
        self.apply_gist_fix = True
        self.apply_patches = True

    # --- ingest ---------------------------------------------------------------------
    def ingest(self, rec: DecodedRecord) -> None:
        self.records += 1
        op = rec.info & 0xF0
        for block in rec.blocks:
            key = (block.spcnode, block.dbnode, block.relnode, block.forknum, block.blkno)
            if not block.has_image:
                self.refs_without_image.append(f"{rec.rmgr_name} at {Lsn(rec.lsn)} {key}")
                continue
            self.images += 1
            left_child = rec.rmid == RmgrId.GIST and (
                (op == XLOG_GIST_PAGE_UPDATE and block.block_id == 1)
                or (op == XLOG_GIST_PAGE_SPLIT and block.block_id == 0))
            self.gist_fixes += left_child
            self.versions[key] = _Version(block, rec.rmid, rec.info, rec.end_lsn, left_child)
            self.patches.pop(key, None)
        if rec.rmid in (RmgrId.HEAP, RmgrId.HEAP2):
            self._heap(rec)
        elif rec.rmid == RmgrId.STORAGE and op == smgr_records.XLOG_SMGR_TRUNCATE:
            self._truncate(rec)

    def _heap(self, rec: DecodedRecord) -> None:
        cur = Cursor(rec.main_data, rec.rmid, rec.info, rec.lsn)
        decoded: object = (heap_records.decode_heap(cur, rec.info, rec.blocks)
                           if rec.rmid == RmgrId.HEAP
                           else heap_records.decode_heap2(cur, rec.info, rec.blocks))
        vm_clear: heap_records.VmClear | None = getattr(decoded, "vm_clear", None)
        if vm_clear is None:
            return
        for (spc, db, rel), heap_block in vm_clear.heap_blocks:
            patch = clear_bits(heap_block, vm_clear.flags)
            key = (spc, db, rel, int(ForkNumber.VISIBILITYMAP), patch.vm_block)
            self.patches.setdefault(key, []).append(patch.apply)
            self.vm_clears += 1

    def _truncate(self, rec: DecodedRecord) -> None:
        cur = Cursor(rec.main_data, rec.rmid, rec.info, rec.lsn)
        trunc = smgr_records.decode(cur, rec.info)
        assert isinstance(trunc, smgr_records.SmgrTruncate), trunc
        self.truncates += 1
        if trunc.truncates_heap:
            self._cut(trunc.rel, ForkNumber.MAIN, trunc.blkno)
        if trunc.truncates_vm:
            # visibilitymap_prepare_truncate: the VM keeps the page holding the new end,
            # whose bits past the end are cleared without WAL (hint bits are not logged).
            last = vm_block(trunc.blkno)
            offset = vm_page_offset(trunc.blkno)
            shift = (trunc.blkno % 4) * 2
            if offset == MAP_OFFSET and shift == 0:
                self._cut(trunc.rel, ForkNumber.VISIBILITYMAP, last)
            else:
                self._cut(trunc.rel, ForkNumber.VISIBILITYMAP, last + 1)
                key = (*trunc.rel, int(ForkNumber.VISIBILITYMAP), last)

                def clear_tail(page: bytearray, at: int = offset, keep: int = shift) -> None:
                    page[at] &= (1 << keep) - 1
                    page[at + 1:] = bytes(BLCKSZ - at - 1)

                self.patches.setdefault(key, []).append(clear_tail)

    def _cut(self, rel: tuple[int, int, int], fork: ForkNumber, nblocks: int) -> None:
        for key in [k for k in self.versions if k[:3] == rel and k[3] == fork
                    and k[4] >= nblocks]:
            del self.versions[key]
        for key in [k for k in self.patches if k[:3] == rel and k[3] == fork
                    and k[4] >= nblocks]:
            del self.patches[key]
        at = (*rel, int(fork))
        self.cuts[at] = min(self.cuts.get(at, nblocks), nblocks)

    # --- serve ----------------------------------------------------------------------
    def __call__(self, spcnode: int, dbnode: int, relnode: int, forknum: int,
                 blkno: int) -> bytes:
        key = (spcnode, dbnode, relnode, forknum, blkno)
        version = self.versions.get(key)
        if version is not None:
            page = bytearray(version.block.page())
            set_page_lsn(page, version.end_lsn)
            if version.gist_left_child and self.apply_gist_fix:
                special = masking.pd_special(page)
                page[special + GIST_NSN_AT:special + GIST_NSN_AT + 8] = \
                    (version.end_lsn >> 32).to_bytes(4, "little") + \
                    (version.end_lsn & 0xFFFFFFFF).to_bytes(4, "little")
                flags = int.from_bytes(page[special + GIST_FLAGS_AT:special + GIST_FLAGS_AT + 2],
                                       "little") & ~masking.F_FOLLOW_RIGHT
                page[special + GIST_FLAGS_AT:special + GIST_FLAGS_AT + 2] = \
                    flags.to_bytes(2, "little")
        elif blkno < self.cuts.get((spcnode, dbnode, relnode, forknum), 1 << 32):
            page = bytearray(self._bootstrap_page(key))
        else:
            page = bytearray(BLCKSZ)
        for patch in self.patches.get(key, ()) if self.apply_patches else ():
            patch(page)
        return bytes(page)

    def _bootstrap_page(self, key: Key) -> bytes:
        spcnode, dbnode, relnode, forknum, blkno = key
        segno, index = divmod(blkno, RELSEG_SIZE)
        path = self.bootstrap / relation_path(spcnode, dbnode, relnode, ForkNumber(forknum),
                                              segno)
        if not path.exists():
            return bytes(BLCKSZ)
        with open(path, "rb") as f:
            f.seek(index * BLCKSZ)
            data = f.read(BLCKSZ)
        return data if len(data) == BLCKSZ else bytes(BLCKSZ)


def _checkpoint_lsn(server: PgServer, datadir: Path) -> Lsn:
    out = server.run_tool("pg_controldata", datadir).stdout.decode()
    match = re.search(r"^Latest checkpoint location:\s+(\S+)$", out, re.MULTILINE)
    assert match, out
    return Lsn.parse(match.group(1))


def _run_extra_workload(server: PgServer) -> None:
    with server.connect() as conn:
        for statement in EXTRA_WORKLOAD:
            conn.execute(statement)


def _ingest_wal(source: WalImagePageSource, server: PgServer, start: Lsn) -> None:
    for rec in read_wal_files(server.datadir / "pg_wal", start=start):
        if rec.lsn == start.value:
            continue  # initdb's shutdown checkpoint: the bootstrap copy is at its end
        source.ingest(rec)


def test_golden_check_passes_on_wal_images_and_names_a_corrupt_tuple(
        pg_factory: Callable[..., PgServer], test_dir: Path) -> None:
    """D2 end to end: WAL images (plus the listed fixes) reproduce every page PostgreSQL's
    own masks compare, for every logged relation kind; and the checker can fail."""
    t0 = time.monotonic()
    server = pg_factory("pg")
    server.initdb()
    bootstrap = test_dir / "bootstrap"
    shutil.copytree(server.datadir, bootstrap)
    start = _checkpoint_lsn(server, server.datadir)  # not started yet: same as the copy
    server.start({**STRATA_WAL_SETTINGS, **WORKLOAD_SETTINGS, "autovacuum": False})
    run_workload(server)
    _run_extra_workload(server)

    # golden_check reads the catalogue, CHECKPOINTs, then asks for pages: the source
    # reads the WAL on the first request, so it ends after that CHECKPOINT.
    source = WalImagePageSource(bootstrap)
    wal_read_s: list[float] = []

    def page_source(spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        if not wal_read_s:
            t = time.monotonic()
            _ingest_wal(source, server, start)
            wal_read_s.append(time.monotonic() - t)
        return source(spc, db, rel, fork, blkno)

    t_check = time.monotonic()
    report = golden.golden_check(server.datadir, server.connect, page_source)
    t_end = time.monotonic()
    print(f"\nrecords {source.records}, images {source.images}, gist fixes "
          f"{source.gist_fixes}, vm clears {source.vm_clears}, truncates {source.truncates}; "
          f"{report.pages_checked} pages of {report.relations_checked} relations; "
          f"workload {t_check - t0:.1f}s, WAL read {wal_read_s[0]:.1f}s, "
          f"check {t_end - t_check - wal_read_s[0]:.1f}s")
    reasons = Counter(e.reason.split(":")[0] for e in report.excluded)
    print("excluded:", dict(reasons))
    for reason, count in Counter(t.reason for t in report.tolerated).items():
        print(f"tolerated {count}: {reason}")
    for tolerated in report.tolerated[:3]:
        print(f"  e.g. {tolerated.difference}")

    assert not source.refs_without_image, source.refs_without_image[:5]
    kinds = {rel.kind for rel in report.relations}
    assert {"heap", "toast", "btree", "hash", "gin", "gist", "spgist", "brin"} <= kinds, kinds
    assert source.gist_fixes > 0 and source.vm_clears > 0 and source.truncates > 0, \
        (source.gist_fixes, source.vm_clears, source.truncates)
    assert reasons["sequence"] >= 1 and reasons["unlogged relation"] >= 1, reasons
    assert report.pages_checked > 500, report.pages_checked
    assert report.ok, (report.kinds_with_differences(), report.summary(40))
    # What PostgreSQL itself changes without WAL, found by this test (see golden.py):
    # VM pages of the database created with STRATEGY WAL_LOG (logged with a standard-page
    # hole over the bitmap), and the SP-GiST metapage's unlogged lastUsedPages hint.
    for tolerated in report.tolerated:
        diff = tolerated.difference
        if diff.fork == ForkNumber.VISIBILITYMAP:
            assert diff.relation.database == "db_wal", tolerated
            version = source.versions[(diff.relation.spcnode, diff.relation.dbnode,
                                       diff.relation.relnode, int(diff.fork), diff.blkno)]
            assert (version.rmid, version.info & 0xF0) == (RmgrId.XLOG, XLOG_FPI), tolerated
            assert version.block.hole_offset == masking.SIZE_OF_PAGE_HEADER, tolerated
        else:
            assert (diff.relation.kind, diff.blkno) == ("spgist", 0), tolerated

    # Without the GiST left-child fix, NSN/F_FOLLOW_RIGHT differ: they are compared.
    gist_relations = [r for r in report.relations if r.kind == "gist"]
    source.apply_gist_fix = False
    unfixed = golden.check_pages(server.datadir, gist_relations, page_source)
    source.apply_gist_fix = True
    assert unfixed.differences, "no GiST page needed the left-child fix"
    for diff in unfixed.differences:
        assert set(diff.fields) <= {"special.nsn", "special.flags"}, diff
        assert "special.nsn" in diff.fields, diff

    # Without the VM bits heap records clear (and truncation clears), VM pages differ.
    heaps = [r for r in report.relations if r.kind in ("heap", "toast")]
    source.apply_patches = False
    unpatched = golden.check_pages(server.datadir, heaps, page_source)
    source.apply_patches = True
    assert unpatched.differences, "no VM page needed a clear"
    assert {d.fork for d in unpatched.differences} == {ForkNumber.VISIBILITYMAP}, \
        unpatched.summary()

    # Corrupt one byte of one tuple's data in one heap block of the source.
    items = next(r for r in report.relations if r.name == "items")
    target_block = 3
    page = source(items.spcnode, items.dbnode, items.relnode, 0, target_block)
    lp_off, _flags, lp_len = masking.item_id(page, 2)
    assert lp_len > masking.SIZE_OF_HEAP_TUPLE_HEADER + 4, lp_len
    corrupt_at = lp_off + lp_len - 1

    def corrupt_source(spc: int, db: int, rel: int, fork: int, blkno: int) -> bytes:
        data = source(spc, db, rel, fork, blkno)
        if (rel, fork, blkno) == (items.relnode, 0, target_block):
            data = data[:corrupt_at] + bytes([data[corrupt_at] ^ 0x5A]) + data[corrupt_at + 1:]
        return data

    bad = golden.check_pages(server.datadir, [items], corrupt_source)
    assert len(bad.differences) == 1, bad.summary()
    diff = bad.differences[0]
    assert (diff.relation.oid, diff.relation.name) == (items.oid, "items"), diff
    assert diff.blkno == target_block and diff.fork == ForkNumber.MAIN, diff
    assert diff.fields == ("tuple[2].data",), diff.fields
    text = str(diff)
    assert "items" in text and f"oid {items.oid}" in text and items.path() in text, text
    assert f"block {target_block}" in text and "tuple[2].data" in text, text


# --- tolerated_reason on constructed pages (pure) ----------------------------------------

def _vm_page(bitmap: bytes) -> bytes:
    page = bytearray(BLCKSZ)
    page[12:18] = (24).to_bytes(2, "little") + BLCKSZ.to_bytes(2, "little") * 2
    page[MAP_OFFSET:MAP_OFFSET + len(bitmap)] = bitmap
    return bytes(page)


def test_vm_difference_is_tolerated_only_when_the_store_lacks_bits() -> None:
    actual = _vm_page(b"\xff\x0f")
    fewer = _vm_page(b"\x3f\x00")
    more = _vm_page(b"\xff\x3f")
    fields = tuple(golden.compare_pages(actual, fewer, "vm", 0))
    assert fields == ("bitmap[0:2]",), fields
    assert golden.tolerated_reason("vm", actual, fewer, fields) is not None
    fields = tuple(golden.compare_pages(actual, more, "vm", 0))
    assert golden.tolerated_reason("vm", actual, more, fields) is None


def test_spgist_meta_difference_is_tolerated_only_in_last_used_pages() -> None:
    def meta(content: bytes) -> bytes:
        page = bytearray(BLCKSZ)
        special = BLCKSZ - 8
        page[12:18] = (24 + 68).to_bytes(2, "little") + special.to_bytes(2, "little") * 2
        page[24:24 + len(content)] = content
        page[special:special + 2] = masking.SPGIST_META.to_bytes(2, "little")
        return bytes(page)

    base = b"\x01\x02\x03\x04" + bytes(64)
    cache = meta(base[:10] + b"\x07" + base[11:])
    magic = meta(b"\x09" + base[1:])
    fields = tuple(golden.compare_pages(meta(base), cache, "spgist", 0))
    assert fields == ("meta[10:11]",), fields
    assert golden.tolerated_reason("spgist", meta(base), cache, fields) is not None
    fields = tuple(golden.compare_pages(meta(base), magic, "spgist", 0))
    assert fields == ("meta[0:1]",), fields
    assert golden.tolerated_reason("spgist", meta(base), magic, fields) is None
