"""Timeline metadata: round trip, every corrupt byte detected, atomic rewrite; tenant config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common import failpoint as fp
from strata.common.errors import CorruptionError, NotFound
from strata.common.failpoint import FailpointHit
from strata.common.ids import TimelineId
from strata.common.lsn import Lsn
from strata.storage.metadata import (
    METADATA_SIZE,
    TimelineMetadata,
    decode_metadata,
    encode_metadata,
    load_metadata,
    save_metadata,
)
from strata.storage.rel import SizeRecord
from strata.storage.tenant import TenantConfig

lsns = st.integers(0, (1 << 64) - 1).map(Lsn)


def meta(dcl: int = 0x3000, ancestor: TimelineId | None = None) -> TimelineMetadata:
    return TimelineMetadata(disk_consistent_lsn=Lsn(dcl), prev_record_lsn=Lsn(dcl - 0x28),
                            ancestor_timeline=ancestor,
                            ancestor_lsn=Lsn(0x1000) if ancestor else Lsn(0),
                            latest_gc_cutoff=Lsn(0x800), initdb_lsn=Lsn(0x100))


@settings(max_examples=50)
@given(dcl=st.integers(1, (1 << 64) - 1), prev_delta=st.integers(0, 1000),
       anc=st.one_of(st.none(), st.binary(min_size=16, max_size=16)), gc=lsns, initdb=lsns)
def test_round_trip(dcl: int, prev_delta: int, anc: bytes | None, gc: Lsn, initdb: Lsn) -> None:
    prev = Lsn(max(0, dcl - prev_delta))
    m = TimelineMetadata(disk_consistent_lsn=Lsn(dcl), prev_record_lsn=prev,
                         ancestor_timeline=TimelineId(anc) if anc else None,
                         ancestor_lsn=Lsn(dcl // 2) if anc else Lsn(0), latest_gc_cutoff=gc,
                         initdb_lsn=initdb)
    data = encode_metadata(m)
    assert len(data) == METADATA_SIZE
    assert decode_metadata(data) == m


def test_every_corrupt_byte_is_detected() -> None:
    data = encode_metadata(meta(ancestor=TimelineId(bytes(range(16)))))
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x01
        with pytest.raises(CorruptionError, match="metadata"):
            decode_metadata(bytes(bad), "/x/metadata")
    with pytest.raises(CorruptionError, match="/x/metadata"):
        decode_metadata(data[:-1], "/x/metadata")


def test_atomic_rewrite_keeps_old_file_on_crash(tmp_path: Path) -> None:
    save_metadata(tmp_path, meta(0x3000))
    for point in ("metadata-before-write", "metadata-before-rename"):
        with fp.armed(point), pytest.raises(FailpointHit):
            save_metadata(tmp_path, meta(0x5000))
        assert load_metadata(tmp_path).disk_consistent_lsn == Lsn(0x3000), point
    with fp.armed("metadata-before-dir-fsync"), pytest.raises(FailpointHit):
        save_metadata(tmp_path, meta(0x5000))
    assert load_metadata(tmp_path).disk_consistent_lsn == Lsn(0x5000)
    with pytest.raises(NotFound, match="no metadata file"):
        load_metadata(tmp_path / "nope")


def test_size_record_cuts() -> None:
    """The effective cut of a block is the newest event with new_size <= blkno."""
    rec = SizeRecord.created(0x100).extended(10)
    assert rec.cut_lsn(9) == 0x100
    rec = rec.truncated(0x200, 4)
    assert (rec.nblocks, rec.cut_lsn(3), rec.cut_lsn(4), rec.cut_lsn(9)) == (4, 0x100, 0x200,
                                                                               0x200)
    rec = rec.extended(8).truncated(0x300, 2)
    assert rec.cuts == ((0x100, 0), (0x300, 2))  # the cut at 4 is dominated
    assert rec.cut_lsn(1) == 0x100
    assert rec.cut_lsn(5) == 0x300
    assert SizeRecord.decode(rec.encode()) == rec
    assert rec.truncated(0x400, 5) is rec  # not shorter: no cut
    with pytest.raises(CorruptionError):
        SizeRecord.decode(rec.encode()[:-1])


def test_tenant_config_persisted(tmp_path: Path) -> None:
    conf = TenantConfig(checkpoint_distance=1 << 20, pitr_interval_s=60.0)
    conf.save(tmp_path)
    assert TenantConfig.load(tmp_path) == conf
    (tmp_path / "tenant.toml").write_text("gc_horizon = -1\n")
    with pytest.raises(Exception, match="gc_horizon"):
        TenantConfig.load(tmp_path)
    (tmp_path / "tenant.toml").write_text("gc_horizon = [\n")
    with pytest.raises(CorruptionError, match="TOML"):
        TenantConfig.load(tmp_path)
