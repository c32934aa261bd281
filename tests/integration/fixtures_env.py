"""Integration harness for the pageserver: the real process, and computes started from it.

`PageserverProcess` runs `python -m strata.pageserver` on free ports (it binds port 0
and reports the ports in `pageserver.ports`) and can stop it with SIGTERM (checking the
exit code) or kill it with SIGKILL. `Env.start_compute(tenant, timeline, lsn=None,
read_only=False)` does what the control plane does for a dev-mode compute: compute_start
(for a primary), fetch the basebackup over the PG port, start a stock PostgreSQL 15 on
it, and attach the pageserver's WAL receiver.
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import Compute, ComputeConfig
from strata.compute.pgserver import PgServer
from strata.pageserver.client import PageserverClient

SLOT = "strata_walproposer"
APP_NAME = "strata_pageserver"
COMPUTE_SETTINGS: dict[str, object] = {
    "synchronous_commit": "on",
    "wal_sender_timeout": "20s",
    "autovacuum": False,  # keeps pg_dump comparisons and WAL volume deterministic
}


def wait_until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


class PageserverProcess:
    """`python -m strata.pageserver --workdir DIR` as a child process."""

    def __init__(self, workdir: Path, log_path: Path, overrides: list[str] | None = None) -> None:
        self.workdir = workdir
        self.log_path = log_path
        self.overrides = overrides or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.pg_port = 0
        self.http_port = 0

    def start(self, timeout_s: float = 60) -> None:
        assert self.proc is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = self.workdir / "pageserver.ports"
        ports.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "strata.pageserver", "--workdir", str(self.workdir),
                "-c", "listen_pg_addr=127.0.0.1:0", "-c", "listen_http_addr=127.0.0.1:0"]
        for item in self.overrides:
            argv += ["-c", item]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        proc = self.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"pageserver exited with {proc.returncode}:\n"
                                     f"{self.log_tail()}")
            return ports.exists()

        wait_until(ready, timeout_s, "the pageserver to listen")
        pg_port, http_port = ports.read_text().split()
        self.pg_port, self.http_port = int(pg_port), int(http_port)

    @property
    def client(self) -> PageserverClient:
        return PageserverClient("127.0.0.1", self.http_port, self.pg_port)

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM and wait; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"pageserver did not stop in {timeout_s}s:\n"
                                 f"{self.log_tail()}") from None

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Env:
    """A pageserver and the computes a test started on it."""

    test_dir: Path
    pageserver: PageserverProcess
    computes: list[Compute] = field(default_factory=list)
    allowed_log_errors: list[str] = field(default_factory=list)
    """Regexes of ERROR/WARNING pageserver log lines the test expects."""
    _seq: int = 0

    @property
    def client(self) -> PageserverClient:
        return self.pageserver.client

    def start_compute(self, tenant: TenantId, timeline: TimelineId, lsn: Lsn | None = None,
                      read_only: bool = False,
                      settings: dict[str, object] | None = None) -> PgServer:
        """Start a stock PostgreSQL 15 on a basebackup of `timeline` (a primary at its end
        after compute_start, or a hot standby at `lsn`); returns its PgServer."""
        if not read_only:
            assert lsn is None, "a primary always starts at the timeline's end"
            lsn, _prev = self.client.compute_start(tenant, timeline)
        self._seq += 1
        name = f"compute{self._seq}"
        tar = io.BytesIO()
        self.client.basebackup(tenant, timeline, tar, lsn, read_only=read_only)
        tar.seek(0)
        config = ComputeConfig(read_only=read_only, receiver_name=APP_NAME,
                               settings={**COMPUTE_SETTINGS, **(settings or {})})
        compute = Compute.from_basebackup(tar, self.test_dir / name, config,
                                          log_path=self.test_dir / f"{name}.log")
        self.computes.append(compute)
        compute.start()
        if not read_only:
            self.client.attach_receiver(tenant, timeline, host=compute.server.host,
                                        port=compute.port, slot=SLOT,
                                        application_name=APP_NAME)
        return compute.server

    def unexpected_log_errors(self) -> list[str]:
        """ERROR and WARNING lines of every pageserver log of the test not expected."""
        found = []
        for path in sorted(self.test_dir.glob("pageserver*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if (" ERROR " in line or " WARNING " in line or "Traceback" in line) and \
                        not any(re.search(p, line) for p in self.allowed_log_errors):
                    found.append(f"{path.name}: {line}")
        return found

    def stop_all(self) -> None:
        for server in reversed(self.computes):
            try:
                server.stop("immediate", timeout_s=20)
            except Exception:  # noqa: BLE001 - best effort at the end of a test
                server.kill9()
        self.computes.clear()
        self.pageserver.kill9()
