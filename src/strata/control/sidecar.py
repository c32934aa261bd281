"""Supervision of an endpoint's walproposer sidecar beside its PostgreSQL: if either dies,
both stop (architecture D7).

    python -m strata.control.sidecar --pgdata DIR [--pid-file F] --postmaster-pid PID -- ARGV...
    python -m strata.control.sidecar --pgdata DIR [--pid-file F] --wait-stdin --walproposer -- ARGS

The endpoint's PostgreSQL waits for its synchronous standby, the walproposer, at every
commit. A compute whose sidecar died would hang every commit forever, so when the
sidecar exits this process stops PostgreSQL at once (SIGQUIT, PostgreSQL's immediate
shutdown: no commit waiting for the sidecar returns success). When PostgreSQL exits (a
clean stop, a crash, or the sidecar's own fencing), the sidecar is stopped too, rather
than retrying a connection to a compute that is gone. `strata endpoint stop` stops
PostgreSQL first and then this process (SIGTERM), which stops the sidecar.

`--pid-file` names the file in which `strata endpoint start` keeps this process's pid.
When the sidecar dies, this process writes the sidecar's (dead) pid there before it
stops PostgreSQL, so that from then on the file names a process that is gone:
`strata endpoint list` shows the walproposer as died no later than the endpoint, even
while this process is still exiting.

With `--walproposer` the arguments after `--` are the walproposer's (`python -m
strata.compute.walproposer ARGS`): this process imports it once and forks the child
from there, so a compute start pays for one Python interpreter instead of two. With
`--wait-stdin` the postmaster's pid comes as the first line on stdin (and is passed to
the walproposer as `--postmaster-pid`): `strata endpoint start` starts this process
before PostgreSQL, so that its Python start overlaps the basebackup; at end of input
without a pid (the start failed) it exits with code 0 at once.

The process runs in its own session (started by the CLI, which exits); its output and
the sidecar's go to the endpoint's walproposer log.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

from strata.control.supervisor import cmdline, pid_alive

POLL_INTERVAL_S = 0.1
SIDECAR_STOP_TIMEOUT_S = 10.0


def _say(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} sidecar-monitor[{os.getpid()}]: {message}", flush=True)


def _postmaster_alive(pid: int, pgdata: Path) -> bool:
    # The pid could be reused once the postmaster is gone: require its data directory.
    return pid_alive(pid) and str(pgdata) in cmdline(pid)


class Child(Protocol):
    """The part of `subprocess.Popen` the supervision uses."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class ForkedChild:
    """A child forked from this process (`fork_walproposer`), waited for by pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                # -N for a child killed by signal N, as Popen.returncode
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def fork_walproposer(args: Sequence[str]) -> ForkedChild:
    """Run `strata.compute.walproposer.main(args)` in a forked child of this process (its
    modules are imported here once, before the fork; a fresh interpreter would import
    them all again). SIGTERM and SIGINT are blocked around the fork, so the child gets
    the default handlers, not this process's."""
    from strata.compute import walproposer

    sys.stdout.flush()
    sys.stderr.flush()
    stops = {signal.SIGTERM, signal.SIGINT}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    pid = os.fork()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return ForkedChild(pid)
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        code = walproposer.main(list(args))
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's code
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _mark_died(pid_file: Path | None, child_pid: int) -> None:
    """Point `pid_file` at the sidecar that exited (a pid that no longer runs: what a
    pid file of a process that died names), atomically."""
    if pid_file is None:
        return
    tmp = pid_file.with_name(pid_file.name + ".died")
    tmp.write_text(f"{child_pid}\n")
    os.replace(tmp, pid_file)


def _stop_child(proc: Child) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(SIDECAR_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _say(f"walproposer (pid {proc.pid}) ignored SIGTERM for "
                 f"{SIDECAR_STOP_TIMEOUT_S:.0f}s; killing it")
            proc.kill()
    return proc.wait()


def supervise(pgdata: Path, postmaster_pid: int,
              child: Sequence[str] | Callable[[], Child], *,
              pid_file: Path | None = None) -> int:
    """Run the sidecar (`child`: its command line, or a function that starts it) until it
    or the postmaster exits (or SIGTERM); returns the exit code: the sidecar's if it ended
    first, else 0. If the sidecar ends first, `pid_file` (this process's pid file) is
    pointed at it before PostgreSQL is stopped."""
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(pgdata, postmaster_pid, child, stop_requested, pid_file)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(pgdata: Path, postmaster_pid: int, child: Sequence[str] | Callable[[], Child],
               stop_requested: list[int], pid_file: Path | None) -> int:
    proc: Child = (child() if callable(child)
                   else subprocess.Popen(list(child), stdin=subprocess.DEVNULL))
    _say(f"walproposer started (pid {proc.pid}) for postmaster {postmaster_pid} ({pgdata})")
    while True:
        rc = proc.poll()
        if rc is not None:
            _mark_died(pid_file, proc.pid)
            if _postmaster_alive(postmaster_pid, pgdata):
                _say(f"walproposer exited with code {rc}; stopping PostgreSQL (pid "
                     f"{postmaster_pid}, immediate) so that no commit waits forever")
                os.kill(postmaster_pid, signal.SIGQUIT)
            else:
                _say(f"walproposer exited with code {rc}; PostgreSQL is gone too")
            return rc
        if not _postmaster_alive(postmaster_pid, pgdata):
            _say(f"PostgreSQL (pid {postmaster_pid}) exited; stopping the walproposer")
            _say(f"walproposer exited with code {_stop_child(proc)}")
            return 0
        if stop_requested:
            _say(f"signal {stop_requested[0]}: stopping the walproposer")
            _stop_child(proc)
            if _postmaster_alive(postmaster_pid, pgdata):
                _say(f"stopping PostgreSQL (pid {postmaster_pid}, immediate): it has no "
                     "walproposer any more")
                os.kill(postmaster_pid, signal.SIGQUIT)
            return 0
        time.sleep(POLL_INTERVAL_S)


def _read_postmaster_pid() -> int | None:
    """The pid on the first line of stdin; None at end of input (the start failed)."""
    line = sys.stdin.readline().strip()
    if not line:
        return None
    try:
        return int(line)
    except ValueError:
        raise SystemExit(f"sidecar: expected the postmaster's pid on stdin, got {line!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m strata.control.sidecar --pgdata DIR [--pid-file FILE] "
             "(--postmaster-pid PID | --wait-stdin) [--walproposer] -- ARGV...")
    if "--" not in args:
        print(usage, file=sys.stderr)
        return 2
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="python -m strata.control.sidecar", usage=usage)
    parser.add_argument("--pgdata", type=Path, required=True)
    parser.add_argument("--pid-file", type=Path,
                        help="this process's pid file: pointed at the sidecar if it dies")
    parser.add_argument("--postmaster-pid", type=int)
    parser.add_argument("--wait-stdin", action="store_true",
                        help="read the postmaster's pid from the first line of stdin")
    parser.add_argument("--walproposer", action="store_true",
                        help="the arguments after -- are the walproposer's; run it in a "
                             "child forked from this process")
    opts = parser.parse_args(args[:split])
    child_args = args[split + 1:]
    if (opts.postmaster_pid is None) == (not opts.wait_stdin):
        parser.error("give exactly one of --postmaster-pid and --wait-stdin")
    if not child_args and not opts.walproposer:
        parser.error("no sidecar command after --")
    if opts.walproposer:
        # Imported before the wait, while the basebackup is built: the walproposer and
        # what its pageserver polling imports on first use (the client, aiohttp), and its
        # event loop (uvloop). On its
        # event loop those imports would stall the replication start as long as they take.
        import aiohttp  # noqa: F401
        import uvloop  # noqa: F401

        import strata.pageserver.client  # noqa: F401
        from strata.compute import walproposer  # noqa: F401
    pid = opts.postmaster_pid
    if opts.wait_stdin:
        pid = _read_postmaster_pid()
        if pid is None:
            return 0
    assert pid is not None
    if not opts.walproposer:
        return supervise(opts.pgdata, pid, child_args, pid_file=opts.pid_file)
    wp_args = [*child_args, "--postmaster-pid", str(pid)] if opts.wait_stdin else child_args
    return supervise(opts.pgdata, pid, lambda: fork_walproposer(wp_args),
                     pid_file=opts.pid_file)


if __name__ == "__main__":
    sys.exit(main())
