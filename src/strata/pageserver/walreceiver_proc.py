"""The development-mode WAL receiver in a child process of the pageserver.

In development mode (architecture D7, no safekeepers) the pageserver is the compute's
synchronous standby: every commit waits for our reply. In the pageserver's own process
the receiver shared the interpreter lock with the page service and ingest, so its
replies came late whenever those ran Python (pgbench reached 0.21x of stock TPS).
`ChildWalReceiver` runs the same `WalReceiver` in a child process (`python -m
strata.pageserver.walreceiver_proc`) that owns the log's writing end; the pageserver keeps
a read-only view of the same `WalLog` directory and follows the child's fsyncs.

Pipe protocol, one ASCII line per message:

| direction | line | meaning |
|---|---|---|
| parent -> child (stdin) | `apply <lsn>` | the apply LSN to report (disk_consistent_lsn) |
| parent -> child | `stop` or end of file | stop streaming, fsync, exit 0 (the parent died: EOF) |
| child -> parent (stdout) | `flush <lsn>` | the log is appended and fsynced up to lsn |
| child -> parent | `status <connections> <server_end_lsn> [<last error>]` | on change |
| child -> parent | `fatal <message>` | the compute belongs to another cluster; exit 3 |

Only the child appends. Before it opens the log it takes an exclusive `flock` on
`receiver.lock` in the log's directory, so a child left from a killed pageserver and
the next one never write at once (the old one exits on end of file of its stdin). After
a child exits the parent re-reads the log's end from the segment files.
Logs of the child go to the pageserver's stderr with the tenant/timeline context.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from strata.common.errors import ProtocolError, Unavailable
from strata.common.logctx import setup_logging, timeline_context
from strata.common.lsn import Lsn
from strata.pageserver.wal_log import WalLog
from strata.pageserver.walreceiver import WalReceiver, WalReceiverConfig, WrongSystem

log = logging.getLogger(__name__)

LOCK_FILE = "receiver.lock"
_EXIT_WRONG_SYSTEM = 3
_STATUS_POLL_S = 0.1  # the child reports connection changes this often at most
_APPLY_EVERY_S = 0.5  # the parent sends a changed apply LSN this often at most
_STOP_TIMEOUT_S = 30.0


class ChildWalReceiver:
    """`WalReceiver`'s interface, streaming in a child process into `wal_log`'s directory.

    `wal_log` is the parent's view: it is never appended to here, only advanced."""

    def __init__(self, config: WalReceiverConfig, wal_log: WalLog, *,
                 log_context: tuple[str, str] = ("-", "-"),
                 apply_lsn: Callable[[], Lsn] | None = None,
                 on_flush: Callable[[Lsn], None] | None = None) -> None:
        self.config = config
        self.wal_log = wal_log
        self._log_context = log_context
        self._apply_lsn = apply_lsn or (lambda: Lsn(0))
        self._on_flush = on_flush
        self._flushed = asyncio.Condition()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self.connected = asyncio.Event()
        self.connections = 0
        self.server_end_lsn = Lsn(0)
        self.last_error: str | None = None
        self.children = 0  # child processes started, for tests

    @property
    def flush_lsn(self) -> Lsn:
        return self.wal_log.flush_lsn

    def start(self) -> asyncio.Task[None]:
        assert self._task is None, "already started"
        self._task = asyncio.create_task(self.run(), name="walreceiver-child")
        return self._task

    async def stop(self) -> None:
        """Stop the child (it fsyncs what it has) and take the log's end from disk."""
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.stdin is not None and not proc.stdin.is_closing():
            with contextlib.suppress(OSError):
                proc.stdin.write(b"stop\n")
                proc.stdin.close()
        task, self._task = self._task, None
        if task is not None:
            await asyncio.wait([task])  # run() waits for the child's exit (or kills it)
            if not task.cancelled() and task.exception() is not None:
                log.info("walreceiver child had stopped with %r", task.exception())

    async def wait_for_flush(self, lsn: Lsn, timeout_s: float) -> Lsn:
        """Wait until `flush_lsn >= lsn`; Unavailable after `timeout_s`."""
        try:
            async with asyncio.timeout(timeout_s), self._flushed:
                await self._flushed.wait_for(lambda: self.flush_lsn >= lsn)
        except TimeoutError as err:
            raise Unavailable(f"WAL flushed only to {self.flush_lsn}, not {lsn}, after "
                              f"{timeout_s}s (last error: {self.last_error})") from err
        return self.flush_lsn

    async def run(self) -> None:
        """Start the child, and a new one (after a pause) if it dies, until stopped."""
        backoff = self.config.backoff_initial_s
        while not self._stopping.is_set():
            code = await self._one_child()
            if code == _EXIT_WRONG_SYSTEM or self._stopping.is_set():
                return
            log.warning("walreceiver child exited with status %s; starting a new one in "
                        "%.2fs", code, backoff)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._stopping.wait()
            backoff = min(backoff * 2, self.config.backoff_max_s)

    async def _one_child(self) -> int:
        tenant, timeline = self._log_context
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "strata.pageserver.walreceiver_proc",
            "--wal-dir", str(self.wal_log.directory), "--config", json.dumps(asdict(self.config)),
            "--tenant", tenant, "--timeline", timeline,
            "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self._proc = proc
        self.children += 1
        sender = asyncio.create_task(self._send_apply(proc), name="walreceiver-apply")
        try:
            assert proc.stdout is not None
            while line := await proc.stdout.readline():
                await self._handle(line.decode("ascii", "replace").rstrip("\n"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    return await proc.wait()
            log.warning("walreceiver child %d did not exit in %.0fs; killing it", proc.pid,
                        _STOP_TIMEOUT_S)
            proc.kill()
            return await proc.wait()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            raise
        finally:
            sender.cancel()
            self._proc = None
            self.connected.clear()
            # Whatever the child appended, fsynced or not, is on disk now (WalLog's rule).
            await asyncio.to_thread(self.wal_log.reload_end)
            await self._notify()

    async def _handle(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "flush":
            self.wal_log.advance_to(Lsn.parse(rest))
            await self._notify()
        elif kind == "status":
            count, end, *error = rest.split(" ", 2)
            self.connections = int(count)
            self.server_end_lsn = Lsn.parse(end)
            self.last_error = error[0] if error else self.last_error
            if self.connections and not error:
                self.connected.set()
            else:
                self.connected.clear()
        elif kind == "fatal":
            self.last_error = rest
            log.error("walreceiver: %s", rest)
        else:
            raise ProtocolError(f"walreceiver child sent {line!r}")

    async def _notify(self) -> None:
        async with self._flushed:
            self._flushed.notify_all()
        if self._on_flush is not None:
            self._on_flush(self.flush_lsn)

    async def _send_apply(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None
        sent = None
        with contextlib.suppress(OSError):  # the child is gone: run() notices
            while True:
                lsn = self._apply_lsn()
                if lsn != sent and not proc.stdin.is_closing():
                    proc.stdin.write(f"apply {lsn}\n".encode())
                    await proc.stdin.drain()
                    sent = lsn
                await asyncio.sleep(_APPLY_EVERY_S)


# --- the child -------------------------------------------------------------------------
class _Child:
    def __init__(self, config: WalReceiverConfig, wal_log: WalLog) -> None:
        self.apply = Lsn(0)
        self.receiver = WalReceiver(config, wal_log, apply_lsn=lambda: self.apply,
                                    on_flush=lambda lsn: _emit(f"flush {lsn}"))

    async def run(self) -> int:
        task = self.receiver.start()
        status = asyncio.create_task(self._status())
        commands = asyncio.create_task(self._commands())
        await asyncio.wait([task, commands], return_when=asyncio.FIRST_COMPLETED)
        status.cancel()
        if task.done() and isinstance(task.exception(), WrongSystem):
            _emit(f"fatal {task.exception()}")
            return _EXIT_WRONG_SYSTEM
        await self.receiver.stop()
        commands.cancel()
        return 0

    async def _commands(self) -> None:
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode("ascii", "replace").strip():
            kind, _, rest = line.partition(" ")
            if kind == "apply":
                self.apply = Lsn.parse(rest)
            elif kind == "stop":
                return
            else:
                log.error("walreceiver child: unknown command %r from the pageserver; ignored",
                          line)

    async def _status(self) -> None:
        last = None
        rx = self.receiver
        while True:
            error = (rx.last_error or "").replace("\n", " ") if not rx.connected.is_set() else ""
            now = (rx.connections, rx.server_end_lsn, error)
            if now != last:
                _emit(f"status {rx.connections} {rx.server_end_lsn} {error}".rstrip())
                last = now
            await asyncio.sleep(_STATUS_POLL_S)


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _lock(directory: Path) -> int:
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a previous child to exit; freed at our exit
    return fd


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m strata.pageserver.walreceiver_proc",
        description="The pageserver's development-mode WAL receiver (started by the "
                    "pageserver; not meant to be run by hand).")
    parser.add_argument("--wal-dir", required=True, type=Path)
    parser.add_argument("--config", required=True, help="WalReceiverConfig as JSON")
    parser.add_argument("--tenant", default="-")
    parser.add_argument("--timeline", default="-")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(getattr(logging, args.log_level, logging.INFO))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pageserver decides; EOF stops us
    config = replace(WalReceiverConfig(**json.loads(args.config)), fsync_inline=True)
    with timeline_context(args.tenant, args.timeline):
        lock_fd = _lock(args.wal_dir)
        wal_log = WalLog.open(args.wal_dir)
        try:
            return asyncio.run(_Child(config, wal_log).run())
        finally:
            wal_log.fsync()
            wal_log.close()
            os.close(lock_fd)


if __name__ == "__main__":
    sys.exit(main())
