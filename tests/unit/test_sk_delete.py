"""Deleting a safekeeper timeline: the durable directory removal (rename, fsync, remove),
what a crash at each step leaves and how a restart cleans it, and `Safekeeper.delete_timeline`
on timelines in a work directory (no sockets: the PG port is never started)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from strata.common import failpoint
from strata.common.errors import CorruptionError, NotFound
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper.acceptor import AcceptorState
from strata.safekeeper.control_file import CONTROL_FILE_NAME
from strata.safekeeper.server import TENANTS_DIR, Safekeeper, SafekeeperConfig
from strata.safekeeper.timeline import (
    DELETED_SUFFIX,
    Timeline,
    remove_leftover,
    remove_timeline_dir,
)

SEG = 1 << 20
START = Lsn(16 * SEG + 40)
PREV = Lsn(16 * SEG - 64)


def make_timeline(workdir: Path, tenant: TenantId, timeline: TimelineId) -> Path:
    directory = workdir / TENANTS_DIR / str(tenant) / str(timeline)
    state = AcceptorState.new_timeline(tenant, timeline, 7, SEG, START, PREV)
    Timeline.create(directory, state, wal_keep_bytes=0).close()
    # Some WAL-sized bytes, as if segments had been written (deletion does not read them).
    (directory / "000000010000000000000010").write_bytes(b"\0" * 4096)
    return directory


def test_remove_timeline_dir_removes_and_says_whether_it_existed(tmp_path: Path) -> None:
    directory = make_timeline(tmp_path, TenantId.generate(), TimelineId.generate())
    assert remove_timeline_dir(directory) is True
    assert not directory.exists()
    assert list(directory.parent.iterdir()) == []  # no temporary name left either
    assert remove_timeline_dir(directory) is False


def test_remove_timeline_dir_replaces_a_stale_deleted_dir(tmp_path: Path) -> None:
    directory = make_timeline(tmp_path, TenantId.generate(), TimelineId.generate())
    stale = directory.with_name(directory.name + DELETED_SUFFIX)
    stale.mkdir()
    (stale / "junk").write_bytes(b"x")
    assert remove_timeline_dir(directory) is True
    assert list(directory.parent.iterdir()) == []


def test_crash_after_the_rename_never_loads_the_timeline(tmp_path: Path) -> None:
    """A crash between the durable rename and the removal leaves `<tl>.___deleted`; the
    next start removes it and serves neither it nor the timeline (not even as refused)."""
    tenant, kept, doomed = TenantId.generate(), TimelineId.generate(), TimelineId.generate()
    make_timeline(tmp_path, tenant, kept)
    directory = make_timeline(tmp_path, tenant, doomed)
    with failpoint.armed("sk-delete-before-rmtree"), pytest.raises(failpoint.FailpointHit):
        remove_timeline_dir(directory)
    leftover = directory.with_name(directory.name + DELETED_SUFFIX)
    assert (leftover / CONTROL_FILE_NAME).exists() and not directory.exists()

    sk = Safekeeper(SafekeeperConfig(node_id=1, workdir=tmp_path))
    sk.load()
    try:
        assert list(sk.timelines) == [(tenant, kept)]
        assert sk.broken == {}
        assert not leftover.exists()
    finally:
        for tl in sk.timelines.values():
            tl.close()


def test_remove_leftover_only_takes_temporary_names(tmp_path: Path) -> None:
    for name in ("a" + DELETED_SUFFIX, "b.___temp", "c"):
        (tmp_path / name).mkdir()
    assert [remove_leftover(tmp_path / n) for n in ("a" + DELETED_SUFFIX, "b.___temp", "c")] \
        == [True, True, False]
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_delete_timeline_then_again_then_recreate(tmp_path: Path) -> None:
    """Delete frees the files and reports them; the timeline is then unknown (NotFound, a
    second delete too), the other one stays, and the same id can be created afresh."""
    tenant, kept, doomed = TenantId.generate(), TimelineId.generate(), TimelineId.generate()
    make_timeline(tmp_path, tenant, kept)
    directory = make_timeline(tmp_path, tenant, doomed)

    async def scenario() -> None:
        sk = Safekeeper(SafekeeperConfig(node_id=3, workdir=tmp_path))
        await asyncio.to_thread(sk.load)  # (cuts the zeros: no valid WAL there)
        size = sum(p.stat().st_size for p in directory.iterdir())
        assert size > 0
        tl = sk.get(tenant, doomed)
        out = await sk.delete_timeline(tenant, doomed)
        assert out == {"tenant_id": str(tenant), "timeline_id": str(doomed), "deleted": True,
                       "connections_closed": 0, "freed_bytes": size}
        assert not directory.exists()
        with pytest.raises(NotFound, match="not on safekeeper 3"):
            sk.get(tenant, doomed)
        with pytest.raises(NotFound, match="was deleted from safekeeper 3"):
            tl.check_usable()  # what a connection still holding it gets
        with pytest.raises(NotFound, match="was deleted"):
            await tl.read_committed(START, 100)  # a walsender's next read
        with pytest.raises(NotFound, match="deleted already"):
            await sk.delete_timeline(tenant, doomed)
        assert list(sk.timelines) == [(tenant, kept)]
        _, created = await sk.create_timeline(tenant, doomed, start_lsn=START, prev_lsn=PREV,
                                              system_id=7, seg_size=SEG)
        assert created
        assert sk.get(tenant, doomed).state.term == 0
        await sk.stop()

    asyncio.run(scenario())


def test_a_refused_timeline_can_be_deleted(tmp_path: Path) -> None:
    """A timeline refused for a damaged control file is deleted like any other."""
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    directory = make_timeline(tmp_path, tenant, timeline)
    (directory / CONTROL_FILE_NAME).write_bytes(b"garbage")

    async def scenario() -> None:
        sk = Safekeeper(SafekeeperConfig(node_id=1, workdir=tmp_path))
        await asyncio.to_thread(sk.load)
        with pytest.raises(CorruptionError):
            sk.get(tenant, timeline)
        out = await sk.delete_timeline(tenant, timeline)
        assert out["deleted"] is True and out["freed_bytes"] == 4096 + len(b"garbage")
        assert sk.broken == {} and not directory.exists()
        with pytest.raises(NotFound):
            sk.get(tenant, timeline)

    asyncio.run(scenario())
