"""One stock PostgreSQL 15 server process: initdb, configure, start, stop.

Used by the test harness to produce reference WAL and data directories, and by
`strata.compute` to run computes. The server always runs as the unprivileged
service user (see `strata.common.proc`) on a loopback port.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strata.common.errors import Unavailable, UserError
from strata.common.proc import (
    RunAs,
    chown_tree,
    free_port,
    make_dir_for,
    pg_bindir,
    popen_as,
    run_as,
    service_user,
)
from strata.compute.postmaster_files import (
    STATUS_READY,
    PostmasterPid,
    clear_crashed_postmaster,
)

if TYPE_CHECKING:
    import psycopg  # imported where used: `strata endpoint start` does not need it

log = logging.getLogger(__name__)

READY_POLL_S = 0.003  # a small file read per poll; a start waits for nothing else
# "2026-12-06 00:08:01.123 UTC [17719] FATAL:  message" (log_line_prefix '%m [%p] ').
_SEVERE = re.compile(r"\b(FATAL|PANIC):\s+(.*)")
_DETAIL = re.compile(r"\b(DETAIL|HINT):\s+(.*)")


_CAUSE = re.compile(r"\b(?:LOG|WARNING):\s+((?:could not|invalid) .*)")
# "LOG:  could not bind IPv4 address "127.0.0.1": Address already in use"
_PORT_TAKEN = re.compile(r"\bLOG:\s+could not bind .*: Address already in use")


def port_taken(log_text: str) -> bool:
    """Whether a postmaster's log says another process held its TCP port (it then exits
    with "could not create any TCP/IP sockets"), so a start on another port may work."""
    return _PORT_TAKEN.search(log_text) is not None


def startup_failure(log_text: str) -> str | None:
    """The first FATAL or PANIC message of a postmaster's log on one line, with the DETAIL
    and HINT lines right after it and the first "could not ..." or "invalid ..." line
    logged before it (the cause of "could not create any TCP/IP sockets" or "configuration
    file contains errors"): what to show when a start failed. None if there is none."""
    lines = log_text.splitlines()
    for i, line in enumerate(lines):
        severe = _SEVERE.search(line)
        if severe is None:
            continue
        parts = [f"{severe.group(1)}: {severe.group(2).strip()}"]
        for follow in lines[i + 1:i + 3]:
            detail = _DETAIL.search(follow)
            if detail is None:
                break
            parts.append(f"{detail.group(1)}: {detail.group(2).strip()}")
        causes = [m.group(1).strip() for m in map(_CAUSE.search, lines[:i]) if m]
        if causes:
            parts.append(f"after: {causes[0]}")
        return "; ".join(parts)
    return None

# Settings every Strata compute runs with (architecture D2).
STRATA_WAL_SETTINGS: dict[str, str] = {
    "wal_consistency_checking": "all",
    "wal_compression": "zstd",
    "wal_level": "replica",
    "full_page_writes": "on",
}


def quote_conf(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    return "'" + text.replace("'", "''") + "'"


class PgServer:
    """A PostgreSQL 15 data directory and (when started) its postmaster."""

    def __init__(self, datadir: Path, *, port: int | None = None, host: str = "127.0.0.1",
                 log_path: Path | None = None, user: RunAs | None = None,
                 superuser: str = "postgres") -> None:
        self.datadir = Path(datadir)
        self.host = host
        self.port = port if port is not None else free_port(host)
        self.log_path = log_path or self.datadir.parent / f"{self.datadir.name}.log"
        self.user = user or service_user()
        self.superuser = superuser
        self.socket_dir = self.datadir.parent / f"{self.datadir.name}.sock"
        self.bindir = pg_bindir()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # size of the log when the last start began

    # --- set-up ------------------------------------------------------------
    def initdb(self, *extra_args: str) -> None:
        """Create a new cluster in `datadir` (which must not exist or be empty)."""
        make_dir_for(self.datadir, self.user)
        run_as(self.user, [self.bindir / "initdb", "-D", self.datadir, "-U", self.superuser,
                           "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C.UTF-8",
                           *extra_args])

    def write_conf(self, settings: Mapping[str, object], *, filename: str = "strata.conf") -> None:
        """Write `settings` to an included file (replaced each call)."""
        conf = self.datadir / filename
        conf.write_text("".join(f"{k} = {quote_conf(v)}\n" for k, v in settings.items()))
        chown_tree(conf, self.user)
        main = self.datadir / "postgresql.conf"
        text = main.read_text()
        line = f"include_if_exists = '{filename}'\n"
        if line not in text:
            main.write_text(text + line)

    def base_settings(self) -> dict[str, object]:
        # Private: its socket is trusted (pg_hba `local`), so only the user PostgreSQL runs
        # as and root may reach it (issue 16: the proxy and Strata's own tools).
        make_dir_for(self.socket_dir, self.user, 0o700)
        return {
            "listen_addresses": self.host,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "logging_collector": False,
            "log_line_prefix": "%m [%p] ",
            "fsync": "off",
            "shared_buffers": "32MB",
            "max_wal_senders": 5,
            "max_replication_slots": 5,
        }

    # --- run ---------------------------------------------------------------
    def start(self, settings: Mapping[str, object] | None = None, *,
              timeout_s: float = 60) -> None:
        """Start the postmaster and wait until it accepts connections (its postmaster.pid
        says "ready"). Lock files a crashed postmaster left are cleared first."""
        self.launch(settings)
        self.wait_ready(timeout_s)

    def launch(self, settings: Mapping[str, object] | None = None) -> None:
        """Start the postmaster without waiting (`wait_ready` waits): its pid is known at
        once, so a process that needs it can start meanwhile."""
        assert self._proc is None, "already started"
        conf = self.base_settings()
        conf.update(settings or {})
        self.write_conf(conf)
        clear_crashed_postmaster(self.datadir, self.socket_dir, self.port)
        try:
            self._log_start = self.log_path.stat().st_size
        except FileNotFoundError:
            self._log_start = 0
        log.info("starting postgres on %s:%d in %s", self.host, self.port, self.datadir)
        self._proc = popen_as(self.user, [self.bindir / "postgres", "-D", self.datadir],
                              log_path=self.log_path)

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Wait until the postmaster we started writes "ready" into its postmaster.pid
        (as pg_ctl does: no connection attempts while it starts)."""
        assert self._proc is not None, "not started"
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                raise UserError(f"postgres exited with code {self._proc.returncode} during "
                                f"start-up: {self.startup_error()}")
            pm = PostmasterPid.read(self.datadir)
            if pm is not None and pm.pid == self._proc.pid and pm.status == STATUS_READY:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"postgres in {self.datadir} not ready after {timeout_s}s "
                                  f"(status {pm.status if pm else None!r}): "
                                  f"{self.startup_error()}")
            time.sleep(READY_POLL_S)

    def startup_error(self) -> str:
        """The FATAL line of this start's log (else its last lines), and where the log is."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return f"no log at {self.log_path}"
        fatal = startup_failure(text)
        if fatal is not None:
            return f"{fatal} (log {self.log_path})"
        tail = "\n".join(text.splitlines()[-10:])
        return f"no FATAL line in the log; its last lines ({self.log_path}):\n{tail}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self, mode: str = "fast", *, timeout_s: float = 60) -> None:
        """Stop: `smart`, `fast` (clean shutdown checkpoint) or `immediate` (crash)."""
        if self._proc is None:
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT,
               "immediate": signal.SIGQUIT}[mode]
        if self._proc.poll() is None:
            os.kill(self._proc.pid, sig)
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("postgres %d did not stop in %ss; killing", self._proc.pid, timeout_s)
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(10)
        self._proc = None

    def kill9(self) -> None:
        """SIGKILL the postmaster and its children (a crash, without cleanup)."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._proc.wait(10)
        self._proc = None

    # --- talk to it -----------------------------------------------------------
    def connstr(self, dbname: str = "postgres", user: str | None = None) -> str:
        return (f"host={self.host} port={self.port} dbname={dbname} "
                f"user={user or self.superuser}")

    def connect(self, dbname: str = "postgres", *, autocommit: bool = True,
                **kwargs: Any) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self.connstr(dbname), autocommit=autocommit, **kwargs)

    def sql(self, query: str, *params: Any, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        """Run one statement with autocommit and return its rows (empty if none)."""
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    def bin(self, name: str) -> Path:
        return self.bindir / name

    def run_tool(self, name: str, *args: str | os.PathLike[str],
                 check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """Run a PostgreSQL client tool (pg_waldump, pg_controldata, pgbench ...)."""
        return run_as(self.user, [self.bindir / name, *args], check=check)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
