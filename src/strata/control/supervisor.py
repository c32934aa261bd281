"""Supervision of the environment's long-running processes: pid files, logs, ports, health.

The `strata` CLI starts a process and exits; the process lives on in its own session.
What ties a later `strata` command to it is its pid file (`run/NAME.pid`). A pid file is
trusted only while the process with that pid is alive (not a zombie) and its command
line still names what we started (`marker`), so a stale file left by a crash or a reused
pid never makes us signal a stranger.

When a process dies during start-up, or a port it needs is taken, the error says so and
carries the tail of the process's log.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from strata.common.errors import Unavailable, UserError
from strata.common.proc import pid_running
from strata.control import output

if TYPE_CHECKING:
    from strata.control.env import EnvConfig, Environment

LOG_TAIL_LINES = 20


@dataclass(frozen=True, slots=True)
class ProcessFiles:
    """Where one supervised process keeps its pid and log, and how to recognise it."""

    name: str
    pid_path: Path
    log_path: Path
    marker: str
    """A string its /proc/PID/cmdline contains (e.g. its data directory)."""

    def read_pid(self) -> int | None:
        """The pid of the live process this file names, or None (no file, or stale)."""
        try:
            pid = int(self.pid_path.read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None
        if not pid_alive(pid) or self.marker not in cmdline(pid):
            return None
        return pid

    def died(self) -> bool:
        """The pid file is there but its process is gone: it died (a clean stop removes
        the file)."""
        return self.pid_path.exists() and self.read_pid() is None

    def write_pid(self, pid: int) -> None:
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.pid_path.with_suffix(".tmp")
        tmp.write_text(f"{pid}\n")
        os.replace(tmp, self.pid_path)

    def clear_pid(self) -> None:
        self.pid_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (dead, not yet reaped) counts as dead."""
    return pid_running(pid)


CMDLINE_SETTLE_S = 2.0  # how long a live process may show an empty command line


def cmdline(pid: int) -> str:
    """The command line of `pid` ("" once it is gone). A process being exec'd shows an
    empty one for a moment, even after the Popen that started it returned (the kernel
    lets the parent go before it sets up the new program's arguments; on a loaded machine
    the moment is long): a live process is read again until it shows one (bounded)."""
    deadline = time.monotonic() + CMDLINE_SETTLE_S
    while True:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            return ""
        if text or not pid_alive(pid) or time.monotonic() > deadline:
            return text.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.002)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log file {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"    | {line}" for line in tail) if tail else f"(log {path} is empty)"


def port_in_use(host: str, port: int) -> bool:
    """True if binding host:port fails because something holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise UserError(f"cannot bind {host}:{port}: {err}") from err
    return False


def taken_ports(ports: dict[str, tuple[str, int]]) -> list[str]:
    """The names of the ports another process holds, e.g. ['pg port']."""
    return [what for what, (host, port) in ports.items() if port_in_use(host, port)]


def check_ports_free(owner: str, ports: dict[str, tuple[str, int]], *,
                     fix: str = "change the port in config.toml") -> None:
    """UserError naming the first taken port, e.g. {'pg port': ('127.0.0.1', 64000)}."""
    for what in taken_ports(ports)[:1]:
        host, port = ports[what]
        raise UserError(f"cannot start {owner}: its {what} {host}:{port} is taken by "
                        f"another process (see `ss -ltnp 'sport = :{port}'`); stop that "
                        f"process, or {fix}")


def wait_for(ready: Callable[[], bool], *, timeout_s: float, what: str,
             files: ProcessFiles | None = None, pid: int | None = None,
             interval_s: float = 0.1) -> None:
    """Poll `ready` until it is true (bounded). If `pid` dies first, say so with its log."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return
        if pid is not None and files is not None and not pid_alive(pid):
            raise UserError(f"{files.name} (pid {pid}) exited while {what}; last lines of "
                            f"{files.log_path}:\n{files.log_tail()}")
        if time.monotonic() > deadline:
            tail = f"; last lines of {files.log_path}:\n{files.log_tail()}" if files else ""
            raise Unavailable(f"timed out after {timeout_s:.0f}s {what}{tail}")
        time.sleep(interval_s)


def stop_process(files: ProcessFiles, sig: signal.Signals, *, timeout_s: float) -> bool:
    """Send `sig` to the recorded process and wait until it is gone; SIGKILL its process
    group after `timeout_s`. Returns False if it was not running."""
    pid = files.read_pid()
    if pid is None:
        files.clear_pid()
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        files.clear_pid()
        return False
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            output.info(f"{files.name} (pid {pid}) did not exit within {timeout_s:g}s of "
                        f"{sig.name}; killing it (SIGKILL); its log: {files.log_path}")
            # Children of a PostgreSQL postmaster share its process group (own session).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _wait_gone(pid, KILL_WAIT_S)
            break
        time.sleep(0.05)
    files.clear_pid()
    return True


KILL_WAIT_S = 30.0  # for a SIGKILLed process to go (a large one takes a while, loaded)


def _wait_gone(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        raise Unavailable(f"process {pid} is still alive after SIGKILL")


# --- one shape for every service: start, stop, state ---------------------------------------------
@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """How to run one of the environment's long-running processes (the proxy, the console,
    SeaweedFS, the pageserver, a safekeeper) under `start_service` / `stop_service`."""

    files: ProcessFiles
    owner: str
    """How messages name it: "the pageserver", "safekeeper 1"."""
    ports: dict[str, tuple[str, int]]
    """The addresses it listens on, checked free before it starts ({'pg port': (h, p)})."""
    argv: list[str]
    ready: Callable[[], bool]
    """True once it serves; polled after the spawn."""
    waiting_for: str
    """What the start waits for, for the timeout message ("the proxy on HOST:PORT")."""
    start_timeout_s: float
    describe: str = ""
    """Shown in the start step, e.g. "http 127.0.0.1:9898"; the log path is added."""
    env: dict[str, str] | None = None
    """The child's environment (None: ours)."""
    prepare: Callable[[], None] | None = None
    """Runs after the port check, before the spawn (directories, certificates)."""
    ready_interval_s: float = 0.1


PORT_ATTEMPTS = 4  # starts of one service, each after another process took a port of it

Repick = Callable[[list[str]], ServiceSpec | None]
"""Given the names of a service's ports another process holds, the spec with new ports
(recorded where they are configured), or None when they are not strata's to change."""


def start_service(spec: ServiceSpec, repick: Repick | None = None) -> int:
    """Start the service unless its pid file names a live process, and wait until it is
    ready; its pid. A taken port, or the process dying or timing out while starting,
    raises an error carrying the tail of its log.

    With `repick`, a port another process holds (found before the start, or after the
    process died while starting: taken between the check and its bind) is replaced by a
    new one and the start is tried again, up to PORT_ATTEMPTS starts."""
    files = spec.files
    pid = files.read_pid()
    if pid is not None:
        output.info(f"{files.name} already running (pid {pid})")
        return pid
    attempt = 0
    while True:
        attempt += 1
        taken = taken_ports(spec.ports)
        if taken:
            spec = _repicked(spec, taken, repick, attempt)
            continue
        if spec.prepare is not None:
            spec.prepare()
        files.log_path.parent.mkdir(parents=True, exist_ok=True)
        detail = f"{spec.describe}, " if spec.describe else ""
        proc: subprocess.Popen[bytes] | None = None
        try:
            with output.step(f"starting {spec.owner} ({detail}log {files.log_path})"):
                with open(files.log_path, "ab") as log:
                    proc = subprocess.Popen(spec.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=spec.env)
                files.write_pid(proc.pid)
                wait_for(spec.ready, timeout_s=spec.start_timeout_s,
                         what=f"waiting for {spec.waiting_for}", files=files, pid=proc.pid,
                         interval_s=spec.ready_interval_s)
            return proc.pid
        except UserError:  # it exited: if another process holds a port of it, try again
            if proc is None or pid_alive(proc.pid) or repick is None or \
                    attempt >= PORT_ATTEMPTS:
                raise
            taken = taken_ports(spec.ports)
            if not taken:
                raise
            proc.wait()
            files.clear_pid()
        spec = _repicked(spec, taken, repick, attempt)


def repicker(env: Environment, slots: dict[str, str],
             build: Callable[[EnvConfig], ServiceSpec]) -> Repick:
    """For `start_service`: new ports for the taken ones (port name -> config slot, e.g.
    {"pg port": "pageserver.1.pg_port"}) when strata picked them (EnvConfig.repick),
    saved in config.toml; the service's spec built anew from that config."""
    def repick(taken: list[str]) -> ServiceSpec | None:
        config = env.config().repick([slots[what] for what in taken])
        if config is None:
            return None
        env.write_config(config)
        return build(config)
    return repick


def _repicked(spec: ServiceSpec, taken: list[str], repick: Repick | None,
              attempt: int) -> ServiceSpec:
    """The spec with new ports for the `taken` ones, or the UserError naming the first."""
    new = repick(taken) if repick is not None and attempt < PORT_ATTEMPTS else None
    if new is None:
        check_ports_free(spec.owner, {what: spec.ports[what] for what in taken})
        # Free again by now: the error names it as it was.
        host, port = spec.ports[taken[0]]
        raise UserError(f"cannot start {spec.owner}: its {taken[0]} {host}:{port} was taken "
                        "by another process")
    moved = ", ".join(f"{what} {spec.ports[what][1]} -> {new.ports[what][1]}"
                      for what in taken)
    output.info(f"{spec.owner}: another process took its port(s); picked new ones "
                f"({moved}, saved in config.toml)")
    return new


def stop_service(files: ProcessFiles, owner: str, *, timeout_s: float, immediate: bool = False,
                 quiet_when_stopped: bool = True) -> bool:
    """SIGTERM (SIGKILL after `timeout_s`) or, immediate, SIGKILL the recorded process.
    False if it was not running (a stale pid file is removed)."""
    if files.read_pid() is None:
        files.clear_pid()
        if not quiet_when_stopped:
            output.info(f"{files.name} is not running")
        return False
    with output.step(f"killing {owner} (SIGKILL)" if immediate else f"stopping {owner}"):
        stop_process(files, signal.SIGKILL if immediate else signal.SIGTERM,
                     timeout_s=timeout_s)
    return True


@dataclass(frozen=True, slots=True)
class ProcessState:
    """A service for `strata status`: its pid, its state ("running", "stopped", "died",
    "not responding") and, when it died or does not respond, the tail of its log."""

    pid: int | None
    state: str
    log_tail: str | None


def process_state(files: ProcessFiles, responds: Callable[[], bool] | None = None
                  ) -> ProcessState:
    """Running (and, given `responds`, answering), stopped cleanly, or died."""
    pid = files.read_pid()
    if pid is None:
        state = "died" if files.died() else "stopped"
    elif responds is None or responds():
        state = "running"
    else:
        state = "not responding"
    tail = files.log_tail() if state in ("died", "not responding") else None
    return ProcessState(pid, state, tail)
