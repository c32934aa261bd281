"""The pageserver's `nice` setting on a real pageserver process: every thread, the
worker threads started later for ingest and the API included, runs at that nice value
(docs/pageserver.md; docs/walproposer.md, "Cheap changes")."""

from __future__ import annotations

import os
from pathlib import Path

from fixtures_env import PageserverProcess


def _thread_nice_values(pid: int) -> dict[int, int]:
    """Each thread's nice value, from /proc/PID/task/TID/stat (field 19)."""
    values: dict[int, int] = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        values[int(task)] = int(stat.rsplit(")", 1)[1].split()[16])
    return values


def test_nice_applies_to_every_pageserver_thread(test_dir: Path) -> None:
    expected = max(6, os.getpriority(os.PRIO_PROCESS, 0))  # a niced test run keeps its own
    ps = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log", ["nice=6"])
    ps.start()
    try:
        assert ps.proc is not None
        tenant, timeline = ps.client.create_tenant()  # work on the worker threads
        ps.client.checkpoint(tenant, timeline)  # the ingest side's worker threads too
        assert ps.client.timeline(tenant, timeline).timeline_id == timeline
        values = _thread_nice_values(ps.proc.pid)
        assert len(values) > 1, values
        assert set(values.values()) == {expected}, values
    finally:
        assert ps.stop() == 0
