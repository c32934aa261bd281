"""Shared pytest harness: real PostgreSQL 15 servers on free loopback ports.

Servers run as the unprivileged service user when the tests run as root. Each
test's servers keep their data directories and logs under the test's own
`tmp_path` (inside a run directory that other users can traverse), and every
server a test started is stopped when it ends, on failure and on Ctrl-C too.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer

_live: list[PgServer] = []

# No per-example deadline and no too_slow health check: the machine is shared and
# loaded, and a deadline turns a slow example into a failure (test_control_env's round
# trip took 261 ms once), as does drawing an example slowly (test_pageserver_mgmt's
# config fuzz under load); hypothesis still bounds the examples' count.
settings.register_profile("strata", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("strata")


def pytest_configure(config: pytest.Config) -> None:
    # pytest's default base (/tmp/pytest-of-root) is 0700, which the service user
    # cannot traverse; use a run directory of our own instead.
    # Each run gets its own directory (pytest empties basetemp when a run starts, so
    # concurrent runs must not share one); the newest few runs are kept for their logs.
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        base = Path(tempfile.gettempdir()) / f"strata-tests-{os.getuid()}"
        base.mkdir(mode=0o755, exist_ok=True)
        os.chmod(base, 0o755)
        # Only runs untouched for a day: a run still going (another engineer's, or a
        # long one) must never lose its directory, live FUSE mounts included.
        day_ago = time.time() - 86400
        for old in base.glob("run-*"):
            with contextlib.suppress(OSError):
                if old.stat().st_mtime < day_ago:
                    shutil.rmtree(old, ignore_errors=True)
        config.option.basetemp = str(base / f"run-{os.getpid()}")


def _stop_all() -> None:
    while _live:
        server = _live.pop()
        try:
            server.stop("immediate", timeout_s=10)
        except Exception:  # noqa: BLE001 - best effort at exit
            server.kill9()


atexit.register(_stop_all)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Remember each phase's report on the item (test_dir keeps a failed test's data)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"strata_report_{report.when}", report)


def _keep_only_logs(directory: Path) -> None:
    """Delete all but the *.log files under `directory` (data directories, WAL, layers)."""
    for root, dirs, files in os.walk(directory, topdown=False):
        for name in files:
            if not name.endswith(".log"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, name))
        for name in dirs:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if os.path.islink(path):
                    os.unlink(path)
                else:
                    os.rmdir(path)  # only if empty: it keeps logs otherwise


@pytest.fixture
def test_dir(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The test's output directory; other users can reach it.

    A passed test's directory keeps only its logs (a full suite would otherwise leave
    ~7 GB of data directories per run); a failed one keeps everything. Set
    STRATA_KEEP_TEST_DIRS=1 to keep everything always. This fixture is set up before
    the servers and mounts of the test, so it is torn down after them.
    """
    os.chmod(tmp_path, 0o755)
    ensure_traversable(tmp_path)
    yield tmp_path
    call = getattr(request.node, "strata_report_call", None)
    if call is not None and call.passed and not os.environ.get("STRATA_KEEP_TEST_DIRS"):
        _keep_only_logs(tmp_path)


@pytest.fixture
def pg_factory(test_dir: Path) -> Iterator[Callable[..., PgServer]]:
    """Make `PgServer`s under this test's directory; all are stopped at the end."""
    mine: list[PgServer] = []

    def make(name: str = "pg", **kwargs: object) -> PgServer:
        server = PgServer(test_dir / name, log_path=test_dir / f"{name}.log", **kwargs)  # type: ignore[arg-type]
        mine.append(server)
        _live.append(server)
        return server

    try:
        yield make
    finally:
        for server in reversed(mine):
            try:
                server.stop("fast", timeout_s=30)
            except Exception:  # noqa: BLE001
                server.kill9()
            if server in _live:
                _live.remove(server)


@pytest.fixture
def pg(pg_factory: Callable[..., PgServer]) -> PgServer:
    """A fresh, started PostgreSQL 15 with the Strata WAL settings (D2)."""
    from strata.compute.pgserver import STRATA_WAL_SETTINGS

    server = pg_factory("pg")
    server.initdb()
    server.start(STRATA_WAL_SETTINGS)
    return server
