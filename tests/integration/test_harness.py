"""The harness starts a real PostgreSQL 15 as the service user and stops it."""

import os
from pathlib import Path

from fixtures_env import PageserverProcess, SafekeeperProcess

from strata.compute.pgserver import PgServer


def test_server_starts_with_strata_settings(pg: PgServer) -> None:
    rows = pg.sql("show wal_consistency_checking")
    assert rows == [("all",)]
    assert pg.sql("show server_version_num")[0][0].startswith("15")
    owner = os.stat(pg.datadir).st_uid
    assert owner == pg.user.uid
    if os.getuid() == 0:
        assert owner != 0


ROOT_AUTOGROUP = "(root)"


def _autogroup(pid: int | str) -> str | None:
    """The process's scheduling autogroup ("/autogroup-N nice 0"), None where the kernel
    has none. A process in the root task group (one that descends from init without a
    setsid, as a CI runner may) reads the file as empty: that is ROOT_AUTOGROUP."""
    try:
        fields = Path(f"/proc/{pid}/autogroup").read_text().split()
    except (FileNotFoundError, PermissionError):
        return None
    return fields[0] if fields else ROOT_AUTOGROUP


def test_services_run_in_sessions_of_their_own(test_dir: Path,
                                               pageserver: PageserverProcess) -> None:
    """The fixtures start each Strata service in a session of its own, as the control plane
    (control/supervisor.py) does and as PgServer starts PostgreSQL, so that with autogroup
    scheduling each is weighed as one group, not all of them together with the test (or
    bench) process: a bench comparing them with stock PostgreSQL would otherwise give the
    safekeepers, the pageserver and pgbench one CPU share between them (docs/walproposer.md,
    "The commit latency tail")."""
    sk = SafekeeperProcess(1, test_dir / "sk1", test_dir / "sk1.log")
    sk.start()
    try:
        pids = [pageserver.proc.pid if pageserver.proc else 0, sk.proc.pid if sk.proc else 0]
        assert all(pids), pids
        for pid in pids:
            assert os.getsid(pid) == pid, (pid, os.getsid(pid))
            assert os.getsid(pid) != os.getsid(0), pid
        enabled = Path("/proc/sys/kernel/sched_autogroup_enabled")
        if enabled.exists() and enabled.read_text().strip() == "1":
            groups = [_autogroup(pid) for pid in pids]
            assert None not in groups, groups
            assert len(set(groups)) == 2, groups
            assert ROOT_AUTOGROUP not in groups, groups
            assert _autogroup("self") not in groups, (_autogroup("self"), groups)
    finally:
        sk.kill9()
