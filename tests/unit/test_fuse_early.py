"""The early FUSE server of `strata endpoint start` (strata.compute.fuse_early): which
command lines start it, that an unused one exits at the end of its stdin, and that the
lazy compute's cleanup recognises one by its log file (its command line does not name
the compute's directory)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from strata.common.auth import TOKEN_ENV
from strata.compute import fuse_early, lazy


@pytest.mark.parametrize("argv, wanted", [
    (["endpoint", "start", "main"], True),
    (["endpoint", "start", "main", "--json"], True),
    (["--repo-dir", "/x", "endpoint", "start", "main"], True),
    (["--repo-dir=/x", "endpoint", "start", "main", "--mode", "lazy"], True),
    (["endpoint", "start", "main", "--mode", "full"], False),
    (["endpoint", "start", "main", "--mode=full"], False),
    (["endpoint", "start", "--help"], False),
    (["endpoint", "stop", "main"], False),
    (["--help"], False),
    (["start"], False),
    ([], False),
])
def test_which_commands_start_it(argv: list[str], wanted: bool) -> None:
    assert fuse_early.wanted(argv) is wanted


def test_unused_early_server_exits_at_end_of_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    """It runs without the CLI's token (which may be an admin one) and exits at the end
    of its stdin."""
    assert fuse_early.TOKEN_ENV == TOKEN_ENV
    monkeypatch.setenv(TOKEN_ENV, "admin-token")
    fuse_early.spawn()
    proc = fuse_early.take()
    assert proc is not None and proc.stdin is not None
    assert fuse_early.take() is None  # taken once
    try:
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert not [e for e in environ if e.startswith(TOKEN_ENV.encode() + b"=")]
    finally:
        proc.stdin.close()
        assert proc.wait(60) == 0


def test_cleanup_recognises_an_early_server_by_its_log(tmp_path: Path) -> None:
    root = tmp_path / "compute"
    root.mkdir()
    other = tmp_path / "compute2"
    # A process whose command line ends as an early server's does, its output in a log
    # file under `root` (as `_early_argv` arranges).
    code = ("import os, sys, time; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); "
            "os.dup2(fd, 1); print('ready', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root / "lazyfs.log"), "-m",
                             "strata.compute.lazyfs", "early"])
    try:
        deadline = time.monotonic() + 30
        log = root / "lazyfs.log"
        while not (log.exists() and log.read_text().startswith("ready")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert lazy._pid_alive(proc.pid, str(root))
        assert not lazy._pid_alive(proc.pid, str(other))
        (root / lazy.FUSE_PID_FILE).write_text(f"{proc.pid}\n")
        lazy.cleanup_lazy_root(root, timeout_s=10)
        assert proc.wait(10) != 0  # stopped by SIGTERM
    finally:
        proc.kill()
        proc.wait(10)
