"""pageserver/datadir: the stored form of the non-block values, read back as written."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from strata.common.errors import CorruptionError, NotFound
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.datadir import (
    RELMAP_FILE_SIZE,
    check_relmap,
    database_size,
    databases,
    drop_database,
    get_checkpoint,
    get_relmap,
    logical_size,
    put_checkpoint,
    put_database,
    put_relmap,
    put_twophase,
    relmap_db,
    relmaps,
    remove_twophase,
    twophase_file_bytes,
    twophase_files,
)
from strata.pg.checkpoint import CheckPoint
from strata.pg.constants import GLOBALTABLESPACE_OID
from strata.pg.records.xact import TWOPHASE_MAGIC
from strata.pg.relfile import RelTag
from strata.storage.repository import Repository
from strata.storage.tenant import TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image

CHECKPOINT = CheckPoint(redo=Lsn(0x100), this_timeline_id=1, prev_timeline_id=1,
                        full_page_writes=True, next_xid=(1 << 32) | 740, next_oid=16384,
                        next_multi=1, next_multi_offset=0, oldest_xid=716, oldest_xid_db=1,
                        oldest_multi=1, oldest_multi_db=1, time=1_700_000_000,
                        oldest_commit_ts_xid=0, newest_commit_ts_xid=0, oldest_active_xid=0)


def new_timeline(tmp_path: Path) -> Timeline:
    tenant = Repository(tmp_path).create_tenant(TenantId(os.urandom(16)), TenantConfig())
    return tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(0x100))


def test_databases_relmaps_and_drop(tmp_path: Path) -> None:
    tl = new_timeline(tmp_path)
    at, later = Lsn(0x200), Lsn(0x300)
    put_database(tl, 1663, 5, at)
    put_database(tl, 1663, 6, at, b"15\n")
    put_relmap(tl, 1663, 5, at, b"\x05" * RELMAP_FILE_SIZE)
    put_relmap(tl, 1663, 0, at, b"\x00" * RELMAP_FILE_SIZE)  # the shared map
    tl.create_rel(RelTag(1663, 5, 1, 0), at)
    tl.finish_record(at, Lsn(0x100))
    assert databases(tl, at) == {(1663, 5): b"15\n", (1663, 6): b"15\n"}
    assert relmaps(tl, at) == {(GLOBALTABLESPACE_OID, 0): b"\x00" * RELMAP_FILE_SIZE,
                               (1663, 5): b"\x05" * RELMAP_FILE_SIZE}
    assert get_relmap(tl, 1663, 0, at) == get_relmap(tl, GLOBALTABLESPACE_OID, 0, at)

    drop_database(tl, 1663, 5, later)
    drop_database(tl, 1663, 7, later)  # never existed: nothing to drop
    tl.finish_record(later, at)
    assert set(databases(tl, later)) == {(1663, 6)}
    assert set(relmaps(tl, later)) == {(GLOBALTABLESPACE_OID, 0)}
    assert tl.list_rels(1663, 5, later) == set()
    with pytest.raises(NotFound):
        get_relmap(tl, 1663, 5, later)
    assert get_relmap(tl, 1663, 5, at) == b"\x05" * RELMAP_FILE_SIZE


def test_shared_relmap_is_stored_under_the_global_tablespace() -> None:
    assert relmap_db(1663, 0) == (GLOBALTABLESPACE_OID, 0)
    assert relmap_db(0, 0) == (GLOBALTABLESPACE_OID, 0)
    assert relmap_db(1663, 5) == (1663, 5)


def test_relmap_of_the_wrong_size_is_refused() -> None:
    assert check_relmap(bytes(RELMAP_FILE_SIZE), "m") == bytes(RELMAP_FILE_SIZE)
    with pytest.raises(CorruptionError, match="511 bytes, expected 512"):
        check_relmap(bytes(511), "base/5/pg_filenode.map")


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    tl = new_timeline(tmp_path)
    with pytest.raises(NotFound):
        get_checkpoint(tl, Lsn(0x100))
    put_checkpoint(tl, Lsn(0x200), CHECKPOINT)
    tl.finish_record(Lsn(0x200), Lsn(0x100))
    newer = dataclasses.replace(CHECKPOINT, next_oid=20000)
    put_checkpoint(tl, Lsn(0x300), newer)
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    assert get_checkpoint(tl, Lsn(0x200)) == CHECKPOINT
    assert get_checkpoint(tl, Lsn(0x300)) == newer


def test_twophase_files_until_the_transaction_ends(tmp_path: Path) -> None:
    tl = new_timeline(tmp_path)
    body = TWOPHASE_MAGIC.to_bytes(4, "little") + (32 + 4).to_bytes(4, "little") + bytes(24)
    put_twophase(tl, 742, Lsn(0x200), body)
    tl.finish_record(Lsn(0x200), Lsn(0x100))
    remove_twophase(tl, 742, Lsn(0x300))
    tl.finish_record(Lsn(0x300), Lsn(0x200))
    assert list(twophase_files(tl, Lsn(0x200))) == [(742, twophase_file_bytes(742, body))]
    assert list(twophase_files(tl, Lsn(0x300))) == []


def test_database_and_logical_sizes_count_relation_forks(tmp_path: Path) -> None:
    tl = new_timeline(tmp_path)
    at = Lsn(0x200)
    put_database(tl, 1663, 5, at)
    put_database(tl, 1663, 6, at)
    for blkno in range(3):
        tl.put_rel_page(RelTag(1663, 5, 1, 0), blkno, at, Image(bytes(8192)))
    tl.put_rel_page(RelTag(1663, 5, 1, 1), 0, at, Image(bytes(8192)))
    tl.put_rel_page(RelTag(1663, 6, 2, 0), 1, at, Image(bytes(8192)))
    tl.put_rel_page(RelTag(GLOBALTABLESPACE_OID, 0, 3, 0), 0, at, Image(bytes(8192)))
    tl.finish_record(at, Lsn(0x100))
    assert database_size(tl, 1663, 5, at) == 4 * 8192
    assert database_size(tl, 1663, 6, at) == 2 * 8192
    assert logical_size(tl, at) == 6 * 8192  # shared catalogs are not in any database
