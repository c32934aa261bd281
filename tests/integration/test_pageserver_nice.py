"""The pageserver's `nice` setting on a real pageserver process: every thread, the
worker threads started later for ingest and the API included, runs at that nice value
(docs/pageserver.md; docs/walproposer.md, "Cheap changes"), and so does its session's
autogroup (docs/walproposer.md, "The commit latency tail")."""

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


def _autogroup_fields(pid: int) -> list[str] | None:
    """/proc/PID/autogroup's fields ("/autogroup-N nice M"); None where the kernel has no
    autogroups or they are off."""
    enabled = Path("/proc/sys/kernel/sched_autogroup_enabled")
    if not enabled.exists() or enabled.read_text().strip() != "1":
        return None
    return Path(f"/proc/{pid}/autogroup").read_text().split()


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
        # With autogroups the thread's nice counts only inside the pageserver's session:
        # its session's autogroup gets the nice too, or it yields to nothing outside it.
        fields = _autogroup_fields(ps.proc.pid)
        if fields is not None:
            assert fields[-1] == "6", fields  # a new session's autogroup starts at 0
    finally:
        assert ps.stop() == 0
