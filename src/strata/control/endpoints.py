"""Endpoints: start and stop the compute of a branch (architecture D6, D7, D8).

An endpoint is a stock PostgreSQL 15 on a branch: a primary at the branch's head, or a
read-only hot standby at a fixed LSN. `start_endpoint` is the whole start flow, in order:

1. refuse while the endpoint's previous PostgreSQL still runs, or its port is taken;
2. primaries: the sync step (`sync_wal`) agrees on the LSN X where the new compute
   starts. In development mode (D7) the pageserver is the WAL receiver and
   `compute_start` is that step; with safekeepers it will be the walproposer's one-shot
   sync mode;
3. wait (bounded, saying what for) until the pageserver has ingested the WAL up to X;
4. build a fresh data directory from a basebackup at X, and put back the settings made
   with ALTER SYSTEM and the statistics files saved at the last clean stop on that branch;
5. start PostgreSQL 15, then attach the WAL receiver (primaries);
6. make sure the application role exists (D8), then close TCP logins of the superuser;
7. return the connection string (the caller prints it as its last line).

The application role `strata` (LOGIN, CREATEDB, CREATEROLE, not a superuser) owns the
database `strata`; the connection string names both. The superuser `postgres` is kept for
Strata's own use over the endpoint's unix socket (and the WAL receiver's replication
connection): a superuser could turn `wal_consistency_checking` off in its session (D2).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from strata.common.errors import StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import chown_tree, service_user
from strata.compute.compute import DEFAULT_RECEIVER_NAME, Compute, ComputeConfig
from strata.control import output
from strata.control.env import (
    SAFEKEEPERS_UNAVAILABLE,
    EndpointState,
    EnvConfig,
    Environment,
    tenant_id_of,
)
from strata.control.services import require_pageserver
from strata.control.supervisor import (
    ProcessFiles,
    check_ports_free,
    stop_process,
    wait_for,
)
from strata.pageserver.basebackup import DEFAULT_SLOT_NAME
from strata.pageserver.client import PageserverClient

APP_ROLE = "strata"
APP_DATABASE = "strata"
SUPERUSER = "postgres"
STOP_TIMEOUT_S = 60.0
SAVED_FILES = ("postgresql.auto.conf",)
SAVED_DIRS = ("pg_stat",)

# pg_hba.conf once the endpoint runs: the superuser only over the unix socket, except the
# WAL receiver's replication connection (development mode, D7); everyone else on loopback.
PG_HBA_RESTRICTED = """\
# Written by `strata endpoint start` (architecture D8): the superuser logs in over the
# unix socket only; replication (the pageserver's WAL receiver) over loopback.
local   all             all                                     trust
host    replication     all             127.0.0.1/32            trust
host    replication     all             ::1/128                 trust
host    all             postgres        127.0.0.1/32            reject
host    all             postgres        ::1/128                 reject
host    all             all             127.0.0.1/32            trust
host    all             all             ::1/128                 trust
"""


@dataclass(frozen=True, slots=True)
class EndpointPaths:
    root: Path
    socket_dir: Path

    @property
    def datadir(self) -> Path:
        return self.root / "pgdata"

    def saved(self, timeline_id: TimelineId) -> Path:
        return self.root / "saved" / str(timeline_id)


# sockaddr_un.sun_path holds 108 bytes with the terminating NUL (unix(7)); PostgreSQL
# appends "/.s.PGSQL.<port>" (at most 16 bytes) to the directory.
_SOCKET_PATH_MAX = 107 - 16


def endpoint_paths(env: Environment, name: str) -> EndpointPaths:
    """The endpoint's directories. Its unix socket lives in the environment's run/ unless
    that path is too long for a socket; then in a short directory under the system's
    temporary directory, named by a hash of the environment and endpoint."""
    socket_dir = env.run_dir / f"{name}.sock"
    if len(os.fsencode(socket_dir)) > _SOCKET_PATH_MAX:
        digest = hashlib.sha256(os.fsencode(socket_dir)).hexdigest()[:16]
        socket_dir = Path(tempfile.gettempdir()) / f"strata-{os.getuid()}" / digest
    assert len(os.fsencode(socket_dir)) <= _SOCKET_PATH_MAX, socket_dir
    return EndpointPaths(env.endpoint_dir(name), socket_dir)


def endpoint_files(env: Environment, name: str) -> ProcessFiles:
    paths = endpoint_paths(env, name)
    return ProcessFiles(f"endpoint {name}", env.run_dir / f"endpoint-{name}.pid",
                        env.logs_dir / f"endpoint-{name}.log", marker=str(paths.datadir))


def running_pid(env: Environment, name: str) -> int | None:
    """The endpoint's postmaster pid if it runs (by our pid file or its postmaster.pid)."""
    files = endpoint_files(env, name)
    pid = files.read_pid()
    if pid is not None:
        return pid
    # A postmaster started by an interrupted `endpoint start` may lack our pid file.
    pm = endpoint_paths(env, name).datadir / "postmaster.pid"
    try:
        candidate = int(pm.read_text().split()[0])
    except (FileNotFoundError, ValueError, IndexError):
        return None
    probe = ProcessFiles(files.name, pm, files.log_path, files.marker)
    return candidate if probe.read_pid() is not None else None


def superuser_connect(env: Environment, ep: EndpointState,
                      dbname: str = "postgres") -> psycopg.Connection[Any]:
    """Strata's own connection to a running endpoint: the superuser over the unix socket."""
    return psycopg.connect(host=str(endpoint_paths(env, ep.name).socket_dir), port=ep.port,
                           user=SUPERUSER, dbname=dbname, autocommit=True, connect_timeout=5)


def connstr(config: EnvConfig, ep: EndpointState, *, user: str = APP_ROLE,
            dbname: str = APP_DATABASE) -> str:
    return f"postgresql://{user}@{config.endpoint_defaults.host}:{ep.port}/{dbname}"


# --- the start flow ---------------------------------------------------------------------------
def sync_wal(config: EnvConfig, client: PageserverClient, tenant_id: TenantId,
             timeline_id: TimelineId) -> tuple[Lsn, Lsn]:
    """The sync step before a primary starts: (X, previous record's LSN) where it starts.

    With safekeepers this will run the walproposer in its one-shot sync mode against
    them (D7). In development mode the pageserver holds the WAL: it stops its receiver,
    ingests its whole log and cuts off a partial record at the tail."""
    if config.wal_mode != "pageserver":
        raise UserError(SAFEKEEPERS_UNAVAILABLE)
    return client.compute_start(tenant_id, timeline_id)


@contextlib.contextmanager
def endpoint_lock(env: Environment, name: str) -> Iterator[None]:
    """Held while one `strata` command starts or stops the endpoint (flock)."""
    env.run_dir.mkdir(exist_ok=True)
    with open(env.run_dir / f"endpoint-{name}.lock", "a") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise UserError(f"another strata command is starting or stopping endpoint "
                            f"{name}; wait for it to finish") from err
        yield


def start_endpoint(env: Environment, config: EnvConfig, ep: EndpointState,
                   timeline_id: TimelineId) -> str:
    """Start endpoint `ep` on timeline `timeline_id`; returns its connection string."""
    with endpoint_lock(env, ep.name):
        return _start_endpoint(env, config, ep, timeline_id)


def _start_endpoint(env: Environment, config: EnvConfig, ep: EndpointState,
                    timeline_id: TimelineId) -> str:
    files = endpoint_files(env, ep.name)
    paths = endpoint_paths(env, ep.name)
    defaults = config.endpoint_defaults
    pid = running_pid(env, ep.name)
    if pid is not None:
        raise UserError(f"endpoint {ep.name} is still running (postgres pid {pid}); stop it "
                        f"first with `strata endpoint stop {ep.name}`")
    check_ports_free(f"endpoint {ep.name}", {"port": (defaults.host, ep.port)},
                     fix="delete the endpoint and create it again (with --port)")
    client = require_pageserver(env, config)
    tenant_id = tenant_id_of(ep.tenant_id)
    where = f"branch {ep.branch} (timeline {timeline_id})"

    if ep.read_only:
        lsn = ep.read_lsn
        assert lsn is not None, ep
    else:
        with output.step(f"syncing the WAL of {where} (dev mode: the pageserver holds it)"):
            lsn, _prev = sync_wal(config, client, tenant_id, timeline_id)
    with output.step(f"waiting for the pageserver to have {where} up to {lsn}"):
        wait_for(lambda: client.timeline(tenant_id, timeline_id).last_record_lsn >= lsn,
                 timeout_s=defaults.start_timeout_s,
                 what=f"waiting for the pageserver to ingest {where} up to {lsn} (is the "
                      "LSN beyond the branch's end?)")

    with output.step(f"building a fresh data directory at {lsn} in {paths.datadir}"):
        compute = _fresh_datadir(env, config, ep, client, tenant_id, timeline_id, lsn)
        if not ep.read_only:
            _restore_saved(paths, timeline_id, compute)
    with output.step(f"starting PostgreSQL 15 on {defaults.host}:{ep.port} "
                     f"({'read-only at ' + str(lsn) if ep.read_only else 'primary'}, log "
                     f"{files.log_path})"):
        try:
            compute.start(timeout_s=defaults.start_timeout_s)
        except StrataError as err:
            raise UserError(f"endpoint {ep.name}: PostgreSQL did not start: {err}") from err
        assert compute.pid is not None, ep.name
        files.write_pid(compute.pid)
    if not ep.read_only:
        with output.step("attaching the pageserver's WAL receiver (the primary's synchronous "
                         "standby in dev mode)"):
            client.attach_receiver(tenant_id, timeline_id, host=defaults.host, port=ep.port,
                                   slot=DEFAULT_SLOT_NAME,
                                   application_name=DEFAULT_RECEIVER_NAME)
    with output.step(f"preparing the application role {APP_ROLE!r}"):
        has_role = _ensure_app_role(env, ep)
        if has_role:
            _restrict_superuser(env, ep, paths)
    if has_role:
        return connstr(config, ep)
    output.info(f"note: role {APP_ROLE!r} does not exist at {lsn} (no primary ran on this "
                "data yet); this read-only endpoint hands out the superuser, which cannot "
                "write on a hot standby")
    return connstr(config, ep, user=SUPERUSER, dbname="postgres")


def _fresh_datadir(env: Environment, config: EnvConfig, ep: EndpointState,
                   client: PageserverClient, tenant_id: TenantId, timeline_id: TimelineId,
                   lsn: Lsn) -> Compute:
    paths = endpoint_paths(env, ep.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o755)
    if paths.datadir.exists():
        shutil.rmtree(paths.datadir)
    defaults = config.endpoint_defaults
    compute_config = ComputeConfig(
        read_only=ep.read_only, max_connections=defaults.max_connections,
        shared_buffers=defaults.shared_buffers,
        settings={"synchronous_commit": "on", **defaults.settings})
    # Spool the tar to disk: a large database must not have to fit in memory.
    with tempfile.TemporaryFile(dir=paths.root) as tar:
        client.basebackup(tenant_id, timeline_id, tar, lsn, read_only=ep.read_only)
        tar.seek(0)
        compute = Compute(paths.datadir, compute_config, host=defaults.host, port=ep.port,
                          log_path=endpoint_files(env, ep.name).log_path, user=service_user())
        compute.server.socket_dir = paths.socket_dir
        compute.unpack(tar)
        return compute


def _restore_saved(paths: EndpointPaths, timeline_id: TimelineId, compute: Compute) -> None:
    saved = paths.saved(timeline_id)
    if not saved.is_dir():
        return
    for name in SAVED_FILES:
        if (saved / name).is_file():
            shutil.copy2(saved / name, paths.datadir / name)
    for name in SAVED_DIRS:
        if (saved / name).is_dir():
            shutil.rmtree(paths.datadir / name, ignore_errors=True)
            shutil.copytree(saved / name, paths.datadir / name)
    chown_tree(paths.datadir, compute.server.user)
    output.info(f"restored ALTER SYSTEM settings and statistics saved in {saved}")


def _ensure_app_role(env: Environment, ep: EndpointState) -> bool:
    """Create role and database `strata` on a primary; on a standby report whether they
    exist. Returns True if the application role can log in."""
    with superuser_connect(env, ep) as conn:
        role = conn.execute("select 1 from pg_roles where rolname = %s", (APP_ROLE,)).fetchone()
        db = conn.execute("select 1 from pg_database where datname = %s",
                          (APP_DATABASE,)).fetchone()
        if ep.read_only:
            return role is not None and db is not None
        if role is None:
            conn.execute(f"create role {APP_ROLE} login createdb createrole")
        if db is None:
            conn.execute(f"create database {APP_DATABASE} owner {APP_ROLE}")
    return True


def _restrict_superuser(env: Environment, ep: EndpointState, paths: EndpointPaths) -> None:
    hba = paths.datadir / "pg_hba.conf"
    hba.write_text(PG_HBA_RESTRICTED)
    chown_tree(hba, service_user())
    with superuser_connect(env, ep) as conn:
        conn.execute("select pg_reload_conf()")


# --- stop -------------------------------------------------------------------------------------
def stop_endpoint(env: Environment, ep: EndpointState, timeline_id: TimelineId, *,
                  immediate: bool = False, client: PageserverClient | None = None) -> bool:
    """Stop the endpoint's PostgreSQL; after a clean (fast) stop of a primary, save its
    ALTER SYSTEM settings and statistics for the next start, and (given the pageserver's
    `client`) release the WAL receiver. False if it was not running."""
    with endpoint_lock(env, ep.name):
        return _stop_endpoint(env, ep, timeline_id, immediate, client)


def _stop_endpoint(env: Environment, ep: EndpointState, timeline_id: TimelineId,
                   immediate: bool, client: PageserverClient | None) -> bool:
    files = endpoint_files(env, ep.name)
    pid = running_pid(env, ep.name)
    if pid is None:
        files.clear_pid()
        return False
    files.write_pid(pid)
    mode = "immediate" if immediate else "fast"
    with output.step(f"stopping endpoint {ep.name} ({mode})"):
        stop_process(files, signal.SIGQUIT if immediate else signal.SIGINT,
                     timeout_s=STOP_TIMEOUT_S)
    if not immediate and not ep.read_only:
        _save_settings(endpoint_paths(env, ep.name), timeline_id)
        if client is not None:
            # The dev-mode sync step stops the receiver and forgets the compute's address
            # (else the pageserver keeps dialling a stopped compute), after ingesting all
            # the WAL it received, the shutdown checkpoint included.
            with output.step(f"releasing the pageserver's WAL receiver of {ep.name}"):
                client.compute_start(tenant_id_of(ep.tenant_id), timeline_id)
    return True


def _save_settings(paths: EndpointPaths, timeline_id: TimelineId) -> None:
    saved = paths.saved(timeline_id)
    tmp = saved.with_name(saved.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in SAVED_FILES:
        if (paths.datadir / name).is_file():
            shutil.copy2(paths.datadir / name, tmp / name)
    for name in SAVED_DIRS:
        if (paths.datadir / name).is_dir():
            shutil.copytree(paths.datadir / name, tmp / name)
    shutil.rmtree(saved, ignore_errors=True)
    os.replace(tmp, saved)


# --- status -----------------------------------------------------------------------------------
def endpoint_status(env: Environment, config: EnvConfig, ep: EndpointState) -> dict[str, Any]:
    pid = running_pid(env, ep.name)
    files = endpoint_files(env, ep.name)
    died = pid is None and files.died()
    out: dict[str, Any] = {
        "name": ep.name, "tenant_id": ep.tenant_id, "branch": ep.branch,
        "mode": "read-only" if ep.read_only else "primary", "lsn": ep.lsn,
        "address": f"{config.endpoint_defaults.host}:{ep.port}", "pid": pid,
        "state": "died" if died else "stopped" if pid is None else "running",
        "current_lsn": None, "connstr": connstr(config, ep) if pid is not None else None,
        "socket_dir": str(endpoint_paths(env, ep.name).socket_dir),
        "log": str(files.log_path), "log_tail": files.log_tail() if died else None,
    }
    if pid is None:
        return out
    try:
        with superuser_connect(env, ep) as conn:
            query = ("select pg_last_wal_replay_lsn()::text" if ep.read_only
                     else "select pg_current_wal_flush_lsn()::text")
            row = conn.execute(query).fetchone()
            out["current_lsn"] = row[0] if row else None
    except psycopg.Error as err:
        out["state"] = f"not responding ({str(err).strip().splitlines()[0]})"
    return out


def head_flush_lsn(env: Environment, ep: EndpointState) -> Lsn:
    """What a running primary has flushed (and so its synchronous standby has too)."""
    try:
        with superuser_connect(env, ep) as conn:
            row = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()
    except psycopg.Error as err:
        raise Unavailable(f"endpoint {ep.name} does not answer: {err}") from err
    assert row is not None, ep.name
    return Lsn.parse(row[0])
