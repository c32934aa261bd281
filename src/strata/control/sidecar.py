"""Supervision of an endpoint's walproposer sidecar beside its PostgreSQL: if either dies,
both stop (architecture D7).

    python -m strata.control.sidecar --pgdata DIR --postmaster-pid PID -- WALPROPOSER ARGV...

The endpoint's PostgreSQL waits for its synchronous standby, the walproposer, at every
commit. A compute whose sidecar died would hang every commit forever, so when the
sidecar exits this process stops PostgreSQL at once (SIGQUIT, PostgreSQL's immediate
shutdown: no commit waiting for the sidecar returns success). When PostgreSQL exits (a
clean stop, a crash, or the sidecar's own fencing), the sidecar is stopped too, rather
than retrying a connection to a compute that is gone. `strata endpoint stop` stops
PostgreSQL first and then this process (SIGTERM), which stops the sidecar.

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
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from strata.control.supervisor import cmdline, pid_alive

POLL_INTERVAL_S = 0.1
SIDECAR_STOP_TIMEOUT_S = 10.0


def _say(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"{stamp} sidecar-monitor[{os.getpid()}]: {message}", flush=True)


def _postmaster_alive(pid: int, pgdata: Path) -> bool:
    # The pid could be reused once the postmaster is gone: require its data directory.
    return pid_alive(pid) and str(pgdata) in cmdline(pid)


def _stop_child(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(SIDECAR_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _say(f"walproposer (pid {proc.pid}) ignored SIGTERM for "
                 f"{SIDECAR_STOP_TIMEOUT_S:.0f}s; killing it")
            proc.kill()
    return proc.wait()


def supervise(pgdata: Path, postmaster_pid: int, child_argv: Sequence[str]) -> int:
    """Run the sidecar until it or the postmaster exits (or SIGTERM); returns the exit
    code: the sidecar's if it ended first, else 0."""
    stop_requested: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _supervise(pgdata, postmaster_pid, child_argv, stop_requested)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(pgdata: Path, postmaster_pid: int, child_argv: Sequence[str],
               stop_requested: list[int]) -> int:
    proc = subprocess.Popen(list(child_argv), stdin=subprocess.DEVNULL)
    _say(f"walproposer started (pid {proc.pid}) for postmaster {postmaster_pid} ({pgdata})")
    while True:
        rc = proc.poll()
        if rc is not None:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        print("usage: python -m strata.control.sidecar --pgdata DIR --postmaster-pid PID "
              "-- WALPROPOSER ARGV...", file=sys.stderr)
        return 2
    split = args.index("--")
    parser = argparse.ArgumentParser(prog="python -m strata.control.sidecar")
    parser.add_argument("--pgdata", type=Path, required=True)
    parser.add_argument("--postmaster-pid", type=int, required=True)
    opts = parser.parse_args(args[:split])
    child = args[split + 1:]
    if not child:
        parser.error("no walproposer command after --")
    return supervise(opts.pgdata, opts.postmaster_pid, child)


if __name__ == "__main__":
    sys.exit(main())
