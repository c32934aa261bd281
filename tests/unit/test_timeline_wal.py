"""timeline_wal helpers: cutting a partial record off the log's tail (compute_start), and
worker-thread steps that outlive a cancellation."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.lsn import Lsn
from strata.pageserver.timeline_wal import _truncate_log, in_thread
from strata.pageserver.wal_log import WalLog

SEG = 1 << 20
START = Lsn(3 * SEG - 1000)  # the log starts near the end of a segment, mid-page


def make_log(directory: Path, size: int) -> tuple[WalLog, bytes]:
    wal = WalLog.create(directory, START, seg_size=SEG)
    data = os.urandom(size)
    wal.append(START, data)
    wal.fsync()
    return wal, data


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 3 * SEG), cut_frac=st.floats(0, 1))
def test_truncate_keeps_exactly_the_prefix(tmp_path_factory: pytest.TempPathFactory,
                                           size: int, cut_frac: float) -> None:
    directory = tmp_path_factory.mktemp("wal")
    wal, data = make_log(directory, size)
    cut = START + int(size * cut_frac)
    wal = _truncate_log(wal, cut)
    try:
        assert wal.end_lsn == cut
        assert wal.read(START, cut) == data[:cut - START]
        reopened = WalLog.open(directory)  # what a restart finds
        assert reopened.end_lsn == cut
        reopened.close()
        wal.append(cut, b"next record")  # the new compute's WAL goes right there
        assert wal.read(cut, cut + 11) == b"next record"
    finally:
        wal.close()


def test_truncate_at_a_segment_boundary(tmp_path: Path) -> None:
    wal, data = make_log(tmp_path, 2 * SEG)
    boundary = Lsn(4 * SEG)
    wal = _truncate_log(wal, boundary)
    assert wal.end_lsn == boundary
    assert not wal.segment_path(5).exists()
    assert wal.read(START, boundary) == data[:boundary - START]
    wal.close()


def test_cancelled_in_thread_waits_for_its_thread() -> None:
    """A cancelled ingest step must not return while its thread still writes."""

    async def main() -> None:
        started, done = threading.Event(), threading.Event()

        def work() -> None:
            started.set()
            time.sleep(0.3)
            done.set()

        task = asyncio.create_task(in_thread(work))
        await asyncio.to_thread(started.wait, 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.is_set()

    asyncio.run(main())
