"""What a postmaster leaves on disk, read for readiness and cleared after a crash.

`postmaster.pid` in the data directory (PostgreSQL 15, src/include/utils/pidfile.h):

| line | content |
| --- | --- |
| 1 | postmaster pid |
| 2 | data directory |
| 3 | start time (epoch seconds) |
| 4 | port |
| 5 | first unix socket directory |
| 6 | first listen address |
| 7 | shared memory key and id |
| 8 | status: `starting`, `stopping`, `ready` (accepts connections, hot standby too), `standby` |

Each unix socket also has a lock file `.s.PGSQL.<port>.lock` beside it whose first line
is the postmaster's pid. PostgreSQL refuses to start ("lock file ... already exists")
while the pid in either file is a live process other than itself or its parent; a
postmaster killed with SIGKILL leaves both files, and until it is reaped (a zombie) or
when its pid was reused, the next start fails. `clear_crashed_postmaster` removes that
obstacle safely: it kills the old postmaster's leftover children (they could still
write into the data directory) and removes a lock file only once its pid is dead.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from strata.common.errors import Unavailable, UserError
from strata.common.proc import pid_running

PID_FILE = "postmaster.pid"
STATUS_READY = "ready"
# A SIGKILLed postmaster's children notice it within a wait; init reaps it at once.
DYING_WAIT_S = 10.0


@dataclass(frozen=True, slots=True)
class PostmasterPid:
    """The lines of postmaster.pid that Strata reads."""

    pid: int
    datadir: str
    status: str | None
    """None while the postmaster has not written line 8 yet."""

    @classmethod
    def read(cls, datadir: Path) -> PostmasterPid | None:
        """The data directory's postmaster.pid, or None if absent or still being written."""
        try:
            lines = (datadir / PID_FILE).read_text().splitlines()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        if len(lines) < 2 or not lines[0].strip().lstrip("-").isdigit():
            return None
        status = lines[7].strip() if len(lines) >= 8 and lines[7].strip() else None
        return cls(int(lines[0]), lines[1].strip(), status)


def socket_lock_path(socket_dir: Path, port: int) -> Path:
    return socket_dir / f".s.PGSQL.{port}.lock"


def is_postmaster_of(pid: int, datadir: Path) -> bool:
    """`pid` is a live postmaster of `datadir` (its command line names the directory)."""
    if not pid_running(pid):
        return False
    try:
        # PostgreSQL rewrites its title in place; the postmaster's keeps "-D DATADIR".
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return os.fsencode(datadir) in title


def leftover_processes(datadir: Path) -> list[int]:
    """Live PostgreSQL processes working in `datadir`: a postmaster changes into its data
    directory and its children inherit that (they run in sessions of their own, and
    after the postmaster died their parent is init, so neither tells them apart)."""
    target = os.path.realpath(datadir)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if os.readlink(f"/proc/{pid}/cwd") != target:
                continue
        except OSError:
            continue
        if _comm(pid) == "postgres" and pid_running(pid):
            found.append(pid)
    return found


def clear_crashed_postmaster(datadir: Path, socket_dir: Path, port: int, *,
                             timeout_s: float = DYING_WAIT_S) -> None:
    """Make a start possible after the postmaster of `datadir` crashed (kill -9).

    Raises UserError if that postmaster still runs. Otherwise SIGKILLs its children that
    did not notice its death yet (they could still write into the data directory) and
    waits (bounded) until they are gone, then removes its postmaster.pid and the
    socket's lock file if the pid it names is dead (a zombie too) or not PostgreSQL."""
    old = PostmasterPid.read(datadir)
    if old is not None and old.pid > 0:
        if is_postmaster_of(old.pid, datadir):
            raise UserError(f"PostgreSQL (pid {old.pid}) still runs in {datadir}; stop it "
                            "first")
        _kill_leftovers(datadir, timeout_s)
        (datadir / PID_FILE).unlink(missing_ok=True)
    lock = socket_lock_path(socket_dir, port)
    try:
        first = lock.read_text().split("\n", 1)[0].strip()
    except FileNotFoundError:
        return
    holder = int(first) if first.lstrip("-").isdigit() else 0
    if holder > 0 and pid_running(holder):
        if _comm(holder) == "postgres":
            raise UserError(f"PostgreSQL (pid {holder}) holds {lock}: port {port} is in use "
                            "by another server; stop it or use another port")
        # Otherwise the pid was reused by another program: the lock is stale.
    lock.unlink(missing_ok=True)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _kill_leftovers(datadir: Path, timeout_s: float) -> None:
    """SIGKILL what is left of a dead postmaster of `datadir`; wait until all are gone."""
    deadline = time.monotonic() + timeout_s
    while pids := leftover_processes(datadir):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise Unavailable(f"PostgreSQL processes {pids} of the crashed postmaster in "
                              f"{datadir} are still alive {timeout_s:.0f}s after SIGKILL")
        time.sleep(0.02)
