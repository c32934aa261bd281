"""WAL offload rules (strata.safekeeper.wal_backup): what may be uploaded, what removed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper import wal_backup

SEG = 1 << 20
START = Lsn(16 * SEG + 40)


def test_only_complete_committed_segments_are_uploaded() -> None:
    # Commit inside the timeline's first segment: nothing is complete yet.
    assert list(wal_backup.segments_to_upload(Lsn(0), START + 100, START, SEG)) == []
    # Commit exactly at a segment end: that segment is complete and committed.
    assert list(wal_backup.segments_to_upload(Lsn(0), Lsn(17 * SEG), START, SEG)) == [16]
    # Commit in segment 19: 16, 17, 18 may go; 19 is still being written.
    assert list(wal_backup.segments_to_upload(Lsn(0), Lsn(19 * SEG + 5), START, SEG)) == \
        [16, 17, 18]
    # After 16 and 17 were uploaded only 18 is left.
    backup = wal_backup.backup_lsn_after(17, SEG)
    assert backup == Lsn(18 * SEG)
    assert list(wal_backup.segments_to_upload(backup, Lsn(19 * SEG + 5), START, SEG)) == [18]
    assert list(wal_backup.segments_to_upload(Lsn(19 * SEG), Lsn(19 * SEG + 5), START,
                                              SEG)) == []


@given(st.integers(0, 64), st.integers(0, 64 * SEG))
def test_upload_never_reaches_past_commit(backup_segs: int, commit: int) -> None:
    backup = Lsn(backup_segs * SEG)
    for segno in wal_backup.segments_to_upload(backup, Lsn(commit), Lsn(0), SEG):
        assert wal_backup.backup_lsn_after(segno, SEG).value <= commit
        assert segno * SEG >= backup.value


def test_removal_needs_both_the_upload_and_the_pageserver() -> None:
    def horizon(ps: Lsn | None, backup: Lsn | None, senders: tuple[Lsn, ...] = (),
                keep: int = 0) -> Lsn:
        return wal_backup.removal_horizon(ps, Lsn(40 * SEG), senders, keep, backup)

    assert horizon(None, Lsn(30 * SEG)) == Lsn(0)  # no pageserver feedback: keep all
    assert horizon(Lsn(25 * SEG), Lsn(20 * SEG)) == Lsn(20 * SEG)  # not uploaded yet
    assert horizon(Lsn(20 * SEG), Lsn(25 * SEG)) == Lsn(20 * SEG)  # pageserver behind
    assert horizon(Lsn(25 * SEG), Lsn(0)) == Lsn(0)  # nothing uploaded: nothing goes
    assert horizon(Lsn(25 * SEG), None) == Lsn(25 * SEG)  # no object storage configured
    assert horizon(Lsn(50 * SEG), Lsn(50 * SEG)) == Lsn(40 * SEG)  # the scan point
    assert horizon(Lsn(30 * SEG), Lsn(30 * SEG), (Lsn(22 * SEG),)) == Lsn(22 * SEG)
    assert horizon(Lsn(30 * SEG), Lsn(30 * SEG), keep=SEG) == Lsn(29 * SEG)
    assert horizon(Lsn(30 * SEG), Lsn(30 * SEG), keep=31 * SEG) == Lsn(0)


def test_object_names_are_deterministic_and_per_timeline() -> None:
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    key = wal_backup.segment_key(tenant, timeline, 17, SEG)
    assert key == f"wal/{tenant}/{timeline}/000000010000000000000011"
    assert key.startswith(wal_backup.timeline_prefix(tenant, timeline))
    assert wal_backup.segment_key(tenant, timeline, 17, SEG) == key
    assert not wal_backup.segment_key(tenant, TimelineId.generate(), 17, SEG) \
        .startswith(wal_backup.timeline_prefix(tenant, timeline))
