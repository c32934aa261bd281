"""LsnTimeIndex: LSN for a timestamp, out-of-order commit times, the file across restarts."""

from __future__ import annotations

from pathlib import Path

from strata.storage.lsn_time import LSN_TIME_FILE, LsnTimeIndex


def test_find_the_last_commit_at_or_before_a_time(tmp_path: Path) -> None:
    index = LsnTimeIndex(tmp_path)
    for lsn, ts in ((0x200, 100), (0x300, 200), (0x400, 300)):
        index.put(lsn, ts)
    assert index.find(99) is None
    assert index.find(100) == 0x200
    assert index.find(250) == 0x300
    assert index.find(10_000) == 0x400
    assert index.find(10_000, max_lsn=0x3FF) == 0x300
    assert index.find(10_000, max_lsn=0x1FF) is None


def test_a_commit_time_out_of_order_hides_later_entries_until_passed(tmp_path: Path) -> None:
    """The answer is the last entry whose time and every earlier one are <= ts."""
    index = LsnTimeIndex(tmp_path)
    for lsn, ts in ((0x200, 100), (0x300, 300), (0x400, 200), (0x500, 400)):
        index.put(lsn, ts)
    assert index.find(250) == 0x200  # 0x400 has 200, but 0x300 before it has 300
    assert index.find(300) == 0x400
    assert index.find(400) == 0x500


def test_refed_or_duplicate_lsns_are_ignored(tmp_path: Path) -> None:
    index = LsnTimeIndex(tmp_path)
    index.put(0x300, 100)
    index.put(0x300, 999)
    index.put(0x200, 999)
    assert len(index) == 1
    assert index.find(100) == 0x300


def test_persist_and_load_keep_entries_up_to_disk_consistent(tmp_path: Path) -> None:
    index = LsnTimeIndex(tmp_path)
    for lsn, ts in ((0x200, 100), (0x300, 200), (0x400, 300)):
        index.put(lsn, ts)
    index.persist(0x300)
    assert (tmp_path / LSN_TIME_FILE).stat().st_size == 32
    index.persist(0x300)  # nothing new
    assert (tmp_path / LSN_TIME_FILE).stat().st_size == 32
    index.persist(0x400)
    assert (tmp_path / LSN_TIME_FILE).stat().st_size == 48

    reloaded = LsnTimeIndex(tmp_path)
    reloaded.load(upto=0x300)  # 0x400 is above disk_consistent_lsn: ingest re-feeds it
    assert len(reloaded) == 2
    assert (tmp_path / LSN_TIME_FILE).stat().st_size == 32
    assert reloaded.find(10_000) == 0x300
    reloaded.put(0x400, 300)
    reloaded.persist(0x400)
    assert (tmp_path / LSN_TIME_FILE).stat().st_size == 48


def test_load_drops_a_torn_entry(tmp_path: Path) -> None:
    index = LsnTimeIndex(tmp_path)
    index.put(0x200, 100)
    index.persist(0x200)
    with open(tmp_path / LSN_TIME_FILE, "ab") as f:
        f.write(b"\x01\x02\x03")  # a crash in the middle of an append
    reloaded = LsnTimeIndex(tmp_path)
    reloaded.load(upto=0x1000)
    assert len(reloaded) == 1
    assert (tmp_path / LSN_TIME_FILE).stat().st_size == 16


def test_load_without_a_file_is_empty(tmp_path: Path) -> None:
    index = LsnTimeIndex(tmp_path)
    index.load(upto=0x1000)
    assert len(index) == 0
    assert index.find(10_000) is None
