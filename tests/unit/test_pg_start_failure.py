"""What a failed PostgreSQL start reports: the FATAL line of real PostgreSQL 15 logs
(tests/unit/data/pg_start_failures/, captured from real starts), and the lines of
postmaster.pid that readiness and crash clean-up read."""

from __future__ import annotations

from pathlib import Path

import pytest

from strata.compute.pgserver import port_taken, startup_failure
from strata.compute.postmaster_files import PostmasterPid

DATA = Path(__file__).parent / "data" / "pg_start_failures"


@pytest.mark.parametrize(("name", "expected"), [
    ("lock_exists", 'FATAL: lock file "/tmp/start-logs/d1.sock/.s.PGSQL.34669.lock" already '
                    'exists; HINT: Is another postmaster (PID 22436) using socket file '
                    '"/tmp/start-logs/d1.sock/.s.PGSQL.34669"?'),
    ("port_taken", 'FATAL: could not create any TCP/IP sockets; after: could not bind IPv4 '
                   'address "127.0.0.1": Address already in use'),
    ("bad_setting", 'FATAL: configuration file "/tmp/start-logs/d1/strata.conf" contains '
                    'errors; after: invalid value for parameter "shared_buffers": "lots"'),
])
def test_startup_failure_is_the_fatal_line(name: str, expected: str) -> None:
    assert startup_failure((DATA / f"{name}.log").read_text()) == expected


@pytest.mark.parametrize(("name", "taken"), [("port_taken", True), ("lock_exists", False),
                                             ("bad_setting", False)])
def test_port_taken_only_for_a_bind_failure(name: str, taken: bool) -> None:
    """A start that failed because its TCP port was held (an endpoint start then picks
    another port) and only that: a stale socket lock or a bad setting is not retried."""
    assert port_taken((DATA / f"{name}.log").read_text()) is taken


def test_startup_failure_without_fatal() -> None:
    text = ("2026-12-06 00:09:55.861 UTC [22437] LOG:  listening on IPv4 address "
            '"127.0.0.1", port 34669\n')
    assert startup_failure(text) is None
    assert startup_failure("") is None


def test_postmaster_pid_lines(tmp_path: Path) -> None:
    assert PostmasterPid.read(tmp_path) is None
    pid_file = tmp_path / "postmaster.pid"
    pid_file.write_text("4242\n/data\n")  # still being written
    assert PostmasterPid.read(tmp_path) == PostmasterPid(4242, "/data", None)
    pid_file.write_text("4242\n/data\n1764979795\n5432\n/tmp\n127.0.0.1\n"
                        "  5432001    32768\nready   \n")
    assert PostmasterPid.read(tmp_path) == PostmasterPid(4242, "/data", "ready")
    pid_file.write_text("")
    assert PostmasterPid.read(tmp_path) is None
