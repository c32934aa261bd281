"""One stock PostgreSQL 15 server process: initdb, configure, start, stop.

Used by the test harness to produce reference WAL and data directories, and by
`strata.compute` to run computes. The server always runs as the unprivileged
service user (see `strata.common.proc`) on a loopback port.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

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

log = logging.getLogger(__name__)

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
        make_dir_for(self.socket_dir, self.user, 0o755)
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
        """Start the postmaster and wait until it accepts connections."""
        assert self._proc is None, "already started"
        conf = self.base_settings()
        conf.update(settings or {})
        self.write_conf(conf)
        log.info("starting postgres on %s:%d in %s", self.host, self.port, self.datadir)
        self._proc = popen_as(self.user, [self.bindir / "postgres", "-D", self.datadir],
                              log_path=self.log_path)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise UserError(f"postgres exited with code {self._proc.returncode} during "
                                f"start-up; log {self.log_path}:\n{self.log_tail()}")
            try:
                with self.connect(connect_timeout=2) as conn:
                    conn.execute("select 1")
                return
            except psycopg.OperationalError as err:
                last = err
                time.sleep(0.05)
        raise Unavailable(f"postgres in {self.datadir} not ready after {timeout_s}s "
                          f"({last}); log tail:\n{self.log_tail()}")

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
