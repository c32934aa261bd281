"""Endpoints: start and stop the compute of a branch (architecture D6, D7, D8).

An endpoint is a stock PostgreSQL 15 on a branch: a primary at the branch's head, or a
read-only hot standby at a fixed LSN. `start_endpoint` is the whole start flow, in order:

1. refuse while the endpoint's previous PostgreSQL still runs, or its port is taken;
   after a crash, kill the old postmaster's leftover children and remove its stale lock
   files (`strata.compute.postmaster_files`);
2. primaries: the sync step (`sync_wal`) agrees on the LSN X where the new compute
   starts. With safekeepers (wal_mode = "safekeepers") it first creates the timeline on
   the safekeepers if they lack it (start LSN and previous record from the pageserver,
   the cluster's system id), points the pageserver at them, and runs the walproposer's
   one-shot sync mode. In development mode (D7) the pageserver is the WAL receiver and
   its `compute_start` is that step;
3. wait (bounded, saying what for) until the pageserver has ingested the WAL up to X;
4. build a fresh data directory from a basebackup at X, and put back the settings made
   with ALTER SYSTEM and the statistics files saved at the last clean stop on that branch;
   its pg_hba.conf (`PG_HBA_RESTRICTED`) asks TCP clients for a password;
5. start PostgreSQL 15 and its synchronous standby: the walproposer sidecar, under
   `strata.control.sidecar` (if either dies, both stop), or in development mode the
   pageserver's WAL receiver. The sidecar is started before step 4 (its Python start
   and imports overlap the basebackup) and gets the postmaster's pid on its stdin right
   after PostgreSQL starts. Wait until PostgreSQL is ready (its postmaster.pid) and
   check that the sidecar still runs; its streaming is not waited for: reads work at
   once, and PostgreSQL's synchronous_standby_names makes the first commit wait for it
   (if the sidecar dies, its supervisor stops PostgreSQL, and `endpoint list` shows
   both as died with their logs);
6. make sure the application role exists (D8): on a primary once per branch (remembered
   in the state; this commit first waits, bounded, for the walproposer to stream);
7. return the connection string and the seconds of each phase (`StartResult`).

Who gets in (issue 16: computes accept connections from the proxy only): a compute
started while the proxy runs (`strata start` starts the proxy before the endpoints; the
proxy's wakes) does not listen on TCP at all (`listen_addresses = ''`). Without the proxy
it listens on TCP, where every role needs its password (SCRAM-SHA-256; the secret
`strata role` keeps, which the control plane sets on the compute), the superuser not at
all, replication not at all. The unix
socket is trusted, and its directory is private (0700, owned by the user PostgreSQL runs
as), so only that user and root reach it: the proxy, the CLI, the console, the
walproposer and the pageserver's WAL receiver. The connection string handed to users is
the proxy's while the proxy runs (`connstr`); Strata's own clients use `local_connstr`.

The application role `strata` (LOGIN, CREATEDB, CREATEROLE, not a superuser) owns the
database `strata`; the connection string names both. The superuser `postgres` is kept for
Strata's own use over the endpoint's unix socket: a superuser could turn
`wal_consistency_checking` off in its session (D2).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from strata.common.auth import Scope
from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.failpoint import failpoint
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, Lsn
from strata.common.proc import chown_tree, service_user
from strata.compute.compute import DEFAULT_RECEIVER_NAME, Compute, ComputeConfig
from strata.compute.pageserver_address import FILE_NAME as PAGESERVER_FILE
from strata.compute.pageserver_address import write_address
from strata.compute.pgserver import port_taken
from strata.compute.postmaster_files import clear_crashed_postmaster
from strata.compute.quorum import DEFAULT_APPLICATION_NAME, QuorumConfig, SafekeeperAddr
from strata.compute.safekeeper_sync import sync_safekeepers
from strata.control import output
from strata.control.auth_setup import child_env, token_for
from strata.control.env import (
    CommitMode,
    ComputeMode,
    EndpointState,
    EnvConfig,
    Environment,
    WalMode,
    allocate_port,
)
from strata.control.proxy import proxy_files
from strata.control.services import require_pageserver, safekeeper_client, tenant_pageserver_id
from strata.control.supervisor import (
    ProcessFiles,
    check_ports_free,
    pid_alive,
    port_in_use,
    stop_process,
    wait_for,
)
from strata.pageserver.api import DEFAULT_SLOT_NAME
from strata.pageserver.client import PageserverClient
from strata.pg.controlfile import ControlFileData
from strata.safekeeper.proposer import pull_slot_name

if TYPE_CHECKING:
    # psycopg is imported where it is used: `endpoint start` (and the proxy's wake) run
    # without it unless the branch has proxy roles to check.
    import psycopg

    # Not at run time: it loads libfuse, which a host without FUSE lacks (full mode).
    from strata.compute.lazy import LazyCompute, LazyOptions

    # asyncio and Strata's asyncio client are imported where used (the application
    # role's checks): the start path runs without them (issue 13).
    from strata.pg.pgclient import PgConnection

T = TypeVar("T")

APP_ROLE = "strata"
APP_DATABASE = "strata"
SUPERUSER = "postgres"
STOP_TIMEOUT_S = 60.0
SIDECAR_STOP_TIMEOUT_S = 30.0
SIDECAR_QUORUM_WARN_S = 10.0  # the walproposer warns this often while it lacks a majority
SAVED_FILES = ("postgresql.auto.conf",)
SAVED_DIRS = ("pg_stat",)

# pg_hba.conf of an endpoint: the unix socket (a private directory) is trusted: the proxy
# and Strata's own clients, the synchronous standby's replication connection (the
# walproposer sidecar, or the pageserver's WAL receiver in development mode, D7) included.
# Over TCP: no superuser, no replication, every other role with its password (issue 16).
PG_HBA_RESTRICTED = """\
# Written by `strata endpoint start` (architecture D8, issue 16): the unix socket, whose
# directory only the proxy and Strata's own tools reach, is trusted; over TCP the
# superuser and replication are refused and every other role needs its password.
local   all             all                                     trust
local   replication     all                                     trust
host    all             postgres        127.0.0.1/32            reject
host    all             postgres        ::1/128                 reject
host    replication     all             127.0.0.1/32            reject
host    replication     all             ::1/128                 reject
host    all             all             127.0.0.1/32            scram-sha-256
host    all             all             ::1/128                 scram-sha-256
"""


@dataclass(frozen=True, slots=True)
class EndpointPaths:
    root: Path
    socket_dir: Path

    @property
    def compute_root(self) -> Path:
        """Everything of the running compute (rebuilt at every start)."""
        return self.root / "compute"

    @property
    def datadir(self) -> Path:
        return self.compute_root / "pgdata"

    @property
    def mountpoint(self) -> Path:
        """Lazy mode: the FUSE file system that base/ and global/ point into."""
        return self.compute_root / "mnt"

    def saved(self, timeline_id: TimelineId) -> Path:
        return self.root / "saved" / str(timeline_id)

    @property
    def prewarm_file(self) -> Path:
        """The blocks the last lazy compute read first: its FUSE server fetches them at the
        next start before PostgreSQL asks (strata.compute.lazyfs.prewarm)."""
        return self.root / "prewarm"

    @property
    def pageserver_file(self) -> Path:
        """The address of the tenant's pageserver, which the running compute's FUSE server
        and walproposer re-read when `strata tenant relocate` rewrites it."""
        return self.root / PAGESERVER_FILE


def point_at_pageserver(env: Environment, config: EnvConfig, name: str, ps_id: int) -> Path:
    """Write endpoint `name`'s pageserver file: pageserver `ps_id`'s address."""
    path = endpoint_paths(env, name).pageserver_file
    path.parent.mkdir(parents=True, exist_ok=True)
    ps = config.pageserver_by_id(ps_id)
    write_address(path, ps.host, ps.pg_port, ps.http_port)
    return path


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
    import psycopg

    return psycopg.connect(host=str(endpoint_paths(env, ep.name).socket_dir), port=ep.port,
                           user=SUPERUSER, dbname=dbname, autocommit=True, connect_timeout=5)


def connstr(env: Environment, config: EnvConfig, ep: EndpointState, *,
            user: str = APP_ROLE, dbname: str = APP_DATABASE) -> str:
    """The connection string for users: through the proxy while it runs (TLS, the
    endpoint named by SNI), else the compute's own TCP address. Either way the role needs
    a password (`strata role password`)."""
    if not proxy_runs(env):
        return f"postgresql://{user}@{config.endpoint_defaults.host}:{ep.port}/{dbname}"
    proxy = config.proxy
    address = proxy.host if proxy.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    return (f"postgresql://{user}@{ep.name}.{proxy.domain}:{proxy.port}/{dbname}"
            f"?hostaddr={address}&sslmode=require")


def proxy_runs(env: Environment) -> bool:
    return proxy_files(env).read_pid() is not None


def local_connstr(env: Environment, ep: EndpointState, *, user: str = APP_ROLE,
                  dbname: str = APP_DATABASE) -> str:
    """Strata's own way in (CLI, console, tests): the endpoint's unix socket, which only
    root and the user PostgreSQL runs as can reach; no password."""
    return conninfo(host=str(endpoint_paths(env, ep.name).socket_dir), port=str(ep.port),
                    user=user, dbname=dbname)


def conninfo(**params: str) -> str:
    """A libpq key=value connection string. A value that is empty or holds a space or a
    quote is quoted; backslashes and single quotes in it are escaped."""
    return " ".join(f"{key}={_conninfo_value(value)}" for key, value in params.items())


def _conninfo_value(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    if value and escaped == value and not any(c.isspace() for c in value):
        return value
    return f"'{escaped}'"


def sidecar_files(env: Environment, name: str) -> ProcessFiles:
    """The endpoint's walproposer sidecar (its supervisor, `strata.control.sidecar`)."""
    datadir = endpoint_paths(env, name).datadir
    return ProcessFiles(f"walproposer of endpoint {name}",
                        env.run_dir / f"walproposer-{name}.pid",
                        env.logs_dir / f"walproposer-{name}.log",
                        marker=f"strata.control.sidecar --pgdata {datadir} ")


# --- the start flow ---------------------------------------------------------------------------
def system_id(env: Environment, client: PageserverClient, tenant_id: TenantId,
              timeline_id: TimelineId) -> int:
    """The tenant's cluster system identifier (pg_control), which the safekeepers check.
    Kept in the state; the first time read from a lazy basebackup of the timeline's head
    (pg_control and the other small files, no relation data: a full one of an imported
    5 GB tenant took 19 s of its first start)."""
    known = env.read_state().tenants[tenant_id].system_id
    if known is not None:
        return known
    info = client.timeline(tenant_id, timeline_id)
    with tempfile.TemporaryFile(dir=env.root) as tar:
        client.basebackup(tenant_id, timeline_id, tar, info.last_record_lsn, mode="lazy")
        tar.seek(0)
        with tarfile.open(fileobj=tar) as archive:
            member = archive.extractfile("global/pg_control")
            if member is None:
                raise UserError(f"the basebackup of timeline {timeline_id} has no "
                                "global/pg_control")
            control = ControlFileData.from_bytes(member.read())
    with env.locked() as state:
        state.tenants[tenant_id].system_id = control.system_identifier
    return control.system_identifier


def safekeeper_endpoints(config: EnvConfig) -> list[dict[str, Any]]:
    """The safekeepers as the pageserver's follow API takes them."""
    return [{"id": sk.id, "host": sk.host, "pg_port": sk.pg_port, "http_port": sk.http_port}
            for sk in config.safekeepers]


def ensure_safekeeper_timeline(env: Environment, config: EnvConfig, client: PageserverClient,
                               tenant_id: TenantId, timeline_id: TimelineId, *,
                               follow: bool = True) -> list[int]:
    """Create the timeline on every safekeeper that lacks it, at the pageserver's head of
    it (a new branch: its branch LSN and the record before it), then (`follow`) point the
    pageserver at the safekeepers. Returns the ids of the safekeepers it was created on.

    A safekeeper that does not answer is skipped: a majority is enough to sync and
    commit; it is created there at the next start that finds it up."""
    missing = []
    looked = _on_each(config.safekeepers,
                      lambda sk: safekeeper_client(sk).timeline(tenant_id, timeline_id))
    for sk, (_, err) in zip(config.safekeepers, looked, strict=True):
        if isinstance(err, NotFound):
            missing.append(sk)
        elif isinstance(err, Unavailable):
            output.info(f"warning: {err}")
        elif err is not None:
            raise err
    if missing:
        info = client.timeline(tenant_id, timeline_id)
        sysid = system_id(env, client, tenant_id, timeline_id)
        with output.step(f"creating timeline {timeline_id} on safekeepers "
                         f"{[sk.id for sk in missing]} at {info.last_record_lsn}"):
            for _, err in _on_each(missing, lambda sk: safekeeper_client(sk).create_timeline(
                    tenant_id, timeline_id, start_lsn=info.last_record_lsn,
                    prev_lsn=info.prev_record_lsn, system_id=sysid,
                    seg_size=DEFAULT_WAL_SEGMENT_SIZE)):
                if err is not None:
                    raise err
    if follow:
        # Idempotent: the pageserver persists the list and restarts its receiver from what
        # it has ingested.
        client.follow_safekeepers(tenant_id, timeline_id, safekeeper_endpoints(config))
    return [sk.id for sk in missing]


def _on_each(items: Sequence[T], call: Callable[[T], object]
             ) -> list[tuple[object, Exception | None]]:
    """`call(item)` for every item at once, one thread each (the safekeepers' HTTP
    round trips of a start overlap instead of adding up): (result, None) or (None, the
    exception it raised), in the order of `items`."""
    out: list[tuple[object, Exception | None]] = [(None, None)] * len(items)

    def run(i: int, item: T) -> None:
        try:
            out[i] = (call(item), None)
        except Exception as err:  # noqa: BLE001  # handed to the caller
            out[i] = (None, err)

    threads = [threading.Thread(target=run, args=(i, item), name=f"start-call-{i}")
               for i, item in enumerate(items[1:], 1)]
    for thread in threads:
        thread.start()
    if items:
        run(0, items[0])  # the first one in this thread
    for thread in threads:
        thread.join()
    return out


def quorum_config(config: EnvConfig, tenant_id: TenantId,
                  timeline_id: TimelineId) -> QuorumConfig:
    return QuorumConfig(tenant_id, timeline_id,
                        tuple(SafekeeperAddr(sk.id, sk.host, sk.pg_port)
                              for sk in config.safekeepers))


def sync_wal(env: Environment, config: EnvConfig, client: PageserverClient,
             tenant_id: TenantId, timeline_id: TimelineId) -> tuple[Lsn, Lsn]:
    """The sync step before a primary starts: (X, previous record's LSN) where it starts.

    With safekeepers: the walproposer's one-shot sync mode elects a proposer, recovers
    the log on a majority and commits its end (D7). In development mode the pageserver
    holds the WAL: it stops its receiver, ingests its whole log and cuts off a partial
    record at the tail."""
    if config.wal_mode is WalMode.PAGESERVER:
        return client.compute_start(tenant_id, timeline_id)
    ensure_safekeeper_timeline(env, config, client, tenant_id, timeline_id, follow=False)
    sysid = system_id(env, client, tenant_id, timeline_id)
    timeout_s = config.endpoint_defaults.start_timeout_s
    try:
        result = sync_safekeepers(quorum_config(config, tenant_id, timeline_id),
                                           sysid, timeout_s=timeout_s)
    except Unavailable as err:
        raise Unavailable(f"{err}; see `strata status` and start them with `strata "
                          "safekeeper start`") from err
    # After the sync, not before: the pageserver's (re)started WAL receiver streams from
    # the safekeeper with the highest commit LSN. Before the sync every safekeeper could
    # still report the same one while the last record (the previous compute's shutdown
    # checkpoint, acknowledged by a majority only) is missing on the one picked; the
    # receiver then left it only after its 1 s switch timeout, and the start's
    # `wait_ingest` waited for that (~1.3 s, in a few starts in ten after a stop).
    client.follow_safekeepers(tenant_id, timeline_id, safekeeper_endpoints(config))
    return result.lsn, result.prev_lsn


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


@contextlib.contextmanager
def tenant_lock(env: Environment, tenant_id: TenantId, *, exclusive: bool,
                waiting: str) -> Iterator[None]:
    """The tenant's placement lock (flock on run/tenant-<id>.lock): `strata tenant
    relocate` and `detach` hold it exclusively for their whole run, every endpoint start
    shared, from reading the tenant's pageserver until PostgreSQL is up (its pid file and
    pageserver file written). So an endpoint never starts from a pageserver that a
    relocation is about to detach: it starts before the relocation (which then sees it
    running and points it at the destination) or after it. Blocks; `waiting` is printed
    once when it has to wait."""
    env.run_dir.mkdir(exist_ok=True)
    mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    with open(env.run_dir / f"tenant-{tenant_id}.lock", "a") as lock:
        try:
            fcntl.flock(lock.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            output.info(f"waiting: {waiting}")
            fcntl.flock(lock.fileno(), mode)
        yield


COMPUTE_MODES = tuple(m.value for m in ComputeMode)


def choose_mode(requested: ComputeMode | None) -> ComputeMode:
    """`requested`, or without one lazy where FUSE is usable, else full with a warning
    that says why."""
    if requested is not None:
        return requested
    from strata.compute.lazy import fuse_unusable_reason

    reason = fuse_unusable_reason()
    if reason is None:
        return ComputeMode.LAZY
    output.info(f"warning: starting in full mode (a whole basebackup): lazy mode is not "
                f"usable on this host: {reason}")
    return ComputeMode.FULL


@dataclass(frozen=True, slots=True)
class StartResult:
    """What `start_endpoint` did: the connection string and each phase's duration."""

    connstr: str
    local_connstr: str
    """Strata's own (the unix socket), for tools and tests."""
    mode: ComputeMode
    lsn: Lsn
    phases: dict[str, float]
    """Seconds per phase, in the order they ran (`strata endpoint start --json`)."""


class _Phases:
    """Times each phase of a start (printed as a step, kept for `--json`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, key: str, message: str | None = None) -> Iterator[None]:
        started = time.perf_counter()
        try:
            if message is None:
                yield
            else:
                with output.step(message):
                    yield
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started


def start_endpoint(env: Environment, config: EnvConfig, ep: EndpointState,
                   timeline_id: TimelineId, mode: ComputeMode | None = None,
                   on_checked: Callable[[], object] | None = None) -> StartResult:
    """Start endpoint `ep` on timeline `timeline_id` in compute `mode` (None: `ep.mode`,
    else lazy where usable). `on_checked` is called when the start is past its checks (the
    walproposer, the application role) and begins its last step, the proxy's roles (only
    when the branch has some; the proxy relays clients it logged in early from then on)."""
    with endpoint_lock(env, ep.name), \
            tenant_lock(env, ep.tenant_id, exclusive=False,
                        waiting=f"a relocation or detach of the tenant of endpoint {ep.name} "
                                "is running (another strata command); starting once it is "
                                "done"):
        tenant = env.read_state().tenants.get(ep.tenant_id)
        if tenant is not None and not tenant.attached:  # detached while we waited
            raise UserError(f"tenant {tenant.name} is detached (it is only in object "
                            f"storage); attach it first: `strata tenant attach {tenant.name}`")
        try:
            return _start_endpoint(env, config, ep, timeline_id, mode or ep.mode, on_checked)
        finally:
            remove_set_aside(endpoint_paths(env, ep.name))


def _start_endpoint(env: Environment, config: EnvConfig, ep: EndpointState,
                    timeline_id: TimelineId, requested_mode: ComputeMode | None,
                    on_checked: Callable[[], object] | None) -> StartResult:
    phase = _Phases()
    paths = endpoint_paths(env, ep.name)
    defaults = config.endpoint_defaults
    with phase("checks"):
        pid = running_pid(env, ep.name)
        if pid is not None:
            raise UserError(f"endpoint {ep.name} is still running (postgres pid {pid}); stop "
                            f"it first with `strata endpoint stop {ep.name}`")
        # After a crash (kill -9): the old postmaster may not be reaped yet and its children
        # may still run; they go before its data directory is replaced.
        clear_crashed_postmaster(paths.datadir, paths.socket_dir, ep.port)
        if port_in_use(defaults.host, ep.port):
            # Taken by another process: a port strata picked is picked again.
            ep = _repick_port(env, config, ep) or ep
            check_ports_free(f"endpoint {ep.name}", {"port": (defaults.host, ep.port)},
                             fix="delete the endpoint and create it again (with --port)")
        ps_id = tenant_pageserver_id(env, ep.tenant_id)
        point_at_pageserver(env, config, ep.name, ps_id)
        mode = choose_mode(requested_mode)
        fuse_proc = None
        if mode is ComputeMode.LAZY:
            # Its Python start overlaps the rest of the checks, the sync step and the
            # basebackup (the mount waits for it: ~0.2 s of CPU, the longest chain after
            # the CLI's own start); it gets the LSN once the sync step found it.
            from strata.compute.lazy import cleanup_lazy_root, spawn_lazyfs

            cleanup_lazy_root(paths.compute_root)
            set_aside_compute_root(paths)
            ps = config.pageserver_by_id(ps_id)
            fuse_proc = spawn_lazyfs(ps.host, ps.pg_port, ep.tenant_id, timeline_id,
                                     paths.compute_root, _lazy_options(env, config, ep))
        try:
            client = require_pageserver(env, config, ps_id)
            if not ep.read_only:
                _stop_stale_sidecar(env, ep.name)
        except BaseException:
            if fuse_proc is not None:
                from strata.compute.lazy import abandon_lazyfs

                abandon_lazyfs(fuse_proc)
            raise
    return _start_checked(env, config, ep, timeline_id, mode, phase, client, fuse_proc,
                          on_checked)


def _sync_and_wait(env: Environment, config: EnvConfig, ep: EndpointState,
                   client: PageserverClient, timeline_id: TimelineId, phase: _Phases) -> Lsn:
    """Steps 2 and 3: the LSN where the compute starts, ingested by the pageserver."""
    defaults = config.endpoint_defaults
    tenant_id = ep.tenant_id
    where = f"branch {ep.branch} (timeline {timeline_id})"
    if ep.read_only:
        lsn = ep.read_lsn
        assert lsn is not None, ep
    else:
        source = ("on the safekeepers" if config.wal_mode is WalMode.SAFEKEEPERS
                  else "(dev mode: the pageserver holds it)")
        with phase("sync_wal", f"syncing the WAL of {where} {source}"):
            lsn, _prev = sync_wal(env, config, client, tenant_id, timeline_id)
    with phase("wait_ingest", f"waiting for the pageserver to have {where} up to {lsn}"):
        wait_for(lambda: client.timeline(tenant_id, timeline_id).last_record_lsn >= lsn,
                 timeout_s=defaults.start_timeout_s, interval_s=0.02,
                 what=f"waiting for the pageserver to ingest {where} up to {lsn} (is the "
                      "LSN beyond the branch's end?)")
    return lsn


def _start_checked(env: Environment, config: EnvConfig, ep: EndpointState,
                   timeline_id: TimelineId, mode: ComputeMode, phase: _Phases,
                   client: PageserverClient,
                   fuse_proc: subprocess.Popen[bytes] | None,
                   on_checked: Callable[[], object] | None) -> StartResult:
    """Steps 2-7 of the start (after the checks); `fuse_proc`: lazy mode's FUSE server,
    started already (`spawn_lazyfs`), waiting for its LSN; `on_checked`: see
    `start_endpoint`."""
    paths = endpoint_paths(env, ep.name)
    tenant_id = ep.tenant_id
    try:
        lsn = _sync_and_wait(env, config, ep, client, timeline_id, phase)
    except BaseException:
        if fuse_proc is not None:
            from strata.compute.lazy import abandon_lazyfs

            abandon_lazyfs(fuse_proc)
        raise

    sysid = None
    attempt = 0
    while True:
        attempt += 1
        early, fuse_proc = fuse_proc, None  # for the first attempt only
        sidecar_proc: subprocess.Popen[bytes] | None = None
        log_start = _log_size(endpoint_files(env, ep.name).log_path)
        try:
            if not ep.read_only and config.wal_mode is WalMode.SAFEKEEPERS:
                # Its Python start (and the walproposer's imports) overlap the basebackup.
                if sysid is None:
                    sysid = system_id(env, client, tenant_id, timeline_id)
                sidecar_proc = _spawn_sidecar(env, config, ep, tenant_id, timeline_id,
                                              paths.datadir, sysid)
            compute = _build_and_launch(env, config, ep, client, tenant_id, timeline_id,
                                        lsn, mode, phase, sidecar_proc, early)
            break
        except BaseException as err:
            if sidecar_proc is not None:
                _abandon_sidecar(env, ep.name, sidecar_proc)
            if early is not None:
                from strata.compute.lazy import abandon_lazyfs

                abandon_lazyfs(early)  # nothing if its failed compute stopped it
            # Another process bound the port between the check and PostgreSQL's bind.
            moved = _repick_port(env, config, ep) if isinstance(err, UserError) and \
                attempt < PORT_ATTEMPTS and _port_taken_since(env, ep, log_start) else None
            if moved is None:
                raise
            ep = moved
    streaming = _StreamingWait(env, config, ep, compute, sidecar_proc, phase)
    if sidecar_proc is not None:
        # Not waited for: reads work at once, and PostgreSQL's synchronous_standby_names
        # makes every commit wait until the walproposer streams (and a majority has it).
        with phase("walproposer", f"checking the walproposer sidecar (the primary's "
                                  f"synchronous standby; log "
                                  f"{sidecar_files(env, ep.name).log_path})"):
            _check_sidecar_alive(env, ep, compute, sidecar_proc)
    elif not ep.read_only:
        with phase("walproposer", "attaching the pageserver's WAL receiver (the primary's "
                                  "synchronous standby in dev mode)"):
            client.attach_receiver(tenant_id, timeline_id, host=str(paths.socket_dir),
                                   port=ep.port,
                                   slot=DEFAULT_SLOT_NAME,
                                   application_name=DEFAULT_RECEIVER_NAME)
    with phase("app_role"):
        has_role = _app_role(env, ep, tenant_id, timeline_id, streaming)
        branch_roles = env.read_state().tenants[ep.tenant_id].roles.get(ep.branch)
        if branch_roles and not ep.read_only:
            with output.step(f"checking the proxy's roles {sorted(branch_roles)}"):
                if on_checked is not None:
                    on_checked()
                apply_roles(env, ep, branch_roles, before_write=streaming)
    if has_role:
        return StartResult(connstr(env, config, ep), local_connstr(env, ep), mode, lsn,
                           phase.seconds)
    output.info(f"note: role {APP_ROLE!r} does not exist at {lsn} (no primary ran on this "
                "data yet); this read-only endpoint is reachable as the superuser over its "
                "unix socket only (Strata's own tools)")
    return StartResult(connstr(env, config, ep), local_connstr(env, ep, user=SUPERUSER,
                                                               dbname="postgres"),
                       mode, lsn, phase.seconds)


PORT_ATTEMPTS = 4  # starts of one endpoint, each after another process took its port


def _repick_port(env: Environment, config: EnvConfig,
                 ep: EndpointState) -> EndpointState | None:
    """`ep` with a new port, saved in state.json, when strata picked its port (another
    process holds it now); None for a port the user gave (`endpoint create --port`)."""
    if not ep.port_picked:
        return None
    with env.locked() as state:
        current = state.endpoints.get(ep.name)
        if current is None or not current.port_picked:
            return None
        moved = replace(current, port=allocate_port(config, state))
        state.endpoints[ep.name] = moved
    output.info(f"endpoint {ep.name}: another process took its port; picked a new one "
                f"(port {ep.port} -> {moved.port}, saved in state.json)")
    return replace(ep, port=moved.port)


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _port_taken_since(env: Environment, ep: EndpointState, offset: int) -> bool:
    """Whether PostgreSQL logged, after `offset` of the endpoint's log, that its TCP port
    was taken ("could not bind ...: Address already in use")."""
    try:
        with open(endpoint_files(env, ep.name).log_path, "rb") as f:
            f.seek(offset)
            return port_taken(f.read().decode(errors="replace"))
    except FileNotFoundError:
        return False


def _build_and_launch(env: Environment, config: EnvConfig, ep: EndpointState,
                      client: PageserverClient, tenant_id: TenantId, timeline_id: TimelineId,
                      lsn: Lsn, mode: ComputeMode, phase: _Phases,
                      sidecar_proc: subprocess.Popen[bytes] | None,
                      fuse_proc: subprocess.Popen[bytes] | None = None) -> Compute:
    """Steps 4 and 5 of the start up to PostgreSQL being ready: the data directory, then
    PostgreSQL, whose pid goes to the waiting walproposer sidecar at once."""
    files = endpoint_files(env, ep.name)
    paths = endpoint_paths(env, ep.name)
    defaults = config.endpoint_defaults
    how = ("lazy: a basebackup without relation files, pages fetched on demand over FUSE"
           if mode is ComputeMode.LAZY else "full basebackup")
    with phase("basebackup", f"building a fresh data directory at {lsn} in {paths.datadir} "
                             f"({how})"):
        compute, lazy = _fresh_datadir(env, config, ep, client, tenant_id, timeline_id, lsn,
                                       mode, fuse_proc)
        if lazy is not None:
            phase.seconds.update({f"basebackup.{k}": v for k, v in lazy.phases.items()})
        if not ep.read_only:
            _restore_saved(paths, timeline_id, compute)
        # Strata's own connections use the unix socket: TCP asks for passwords from the
        # start (D8, issue 16).
        _write_restricted_hba(paths)
    with phase("postgres", f"starting PostgreSQL 15 on {defaults.host}:{ep.port} "
                           f"({'read-only at ' + str(lsn) if ep.read_only else 'primary'}, "
                           f"{mode} mode, log {files.log_path})"):
        try:
            failpoint("endpoint-before-postgres-launch")  # tests: another process binds
            if lazy is not None:
                lazy.launch()
            else:
                compute.launch()
            assert compute.pid is not None, ep.name
            files.write_pid(compute.pid)
            if sidecar_proc is not None:
                # It connects once PostgreSQL accepts connections.
                _hand_postmaster(sidecar_proc, compute.pid)
            if lazy is not None:
                lazy.wait_ready(timeout_s=defaults.start_timeout_s)  # stops all on failure
            else:
                compute.server.wait_ready(timeout_s=defaults.start_timeout_s)
        except StrataError as err:
            raise UserError(f"endpoint {ep.name}: PostgreSQL did not start: {err}") from err
    return compute


def _app_role(env: Environment, ep: EndpointState, tenant_id: TenantId,
              timeline_id: TimelineId, before_write: Callable[[], None]) -> bool:
    """Make sure the application role can log in (D8): on a primary once per timeline
    (remembered in the state), on a standby checked at each start. True if it can.
    `before_write` runs before the primary's commits (the wait for the walproposer)."""
    if ep.read_only:
        with output.step(f"checking the application role {APP_ROLE!r}"):
            return _ensure_app_role(env, ep)
    if _app_role_known(env, ep, tenant_id, timeline_id):
        return True
    with output.step(f"creating the application role {APP_ROLE!r} (once per branch)"):
        _ensure_app_role(env, ep, before_write)
    with env.locked() as state:
        timelines = state.tenants[tenant_id].app_role_timelines
        if timeline_id not in timelines:
            timelines.append(timeline_id)
    return True


def _app_role_known(env: Environment, ep: EndpointState, tenant_id: TenantId,
                    timeline_id: TimelineId) -> bool:
    """A primary on a branch whose application role and database were made already."""
    known = env.read_state().tenants[tenant_id].app_role_timelines
    return not ep.read_only and timeline_id in known


def _fresh_datadir(env: Environment, config: EnvConfig, ep: EndpointState,
                   client: PageserverClient, tenant_id: TenantId, timeline_id: TimelineId,
                   lsn: Lsn, mode: ComputeMode, fuse_proc: subprocess.Popen[bytes] | None = None
                   ) -> tuple[Compute, LazyCompute | None]:
    """A new compute directory at `lsn`: unpacked from a full basebackup, or (lazy) a
    lazy basebackup with base/ and global/ on a mounted FUSE file system (served by
    `fuse_proc` if given: started in the fresh directory already)."""
    from strata.compute.lazy import cleanup_lazy_root, prepare_lazy_compute

    paths = endpoint_paths(env, ep.name)
    paths.root.mkdir(parents=True, exist_ok=True)
    os.chmod(paths.root, 0o755)
    if fuse_proc is None:
        # Whatever the last run left (a lazy one's FUSE server, watchdog and mount too)
        # is stopped and detached, then set aside: it is deleted once the start is over.
        cleanup_lazy_root(paths.compute_root)
        set_aside_compute_root(paths)
    defaults = config.endpoint_defaults
    receiver = (DEFAULT_APPLICATION_NAME if config.wal_mode is WalMode.SAFEKEEPERS
                else DEFAULT_RECEIVER_NAME)
    # Pull mode: the safekeepers are the standbys (slots sk<id> at the start LSN too).
    pulled = pull_standbys(config)
    settings: dict[str, object] = {"synchronous_commit": "on", **defaults.settings}
    if pulled:
        # Each start is another compute: its sidecar names it to the safekeepers, and a
        # safekeeper still pulling for an older term (from the compute before a restart on
        # the same socket) refuses to stream from this one (PullFrom.compute_id).
        settings["strata.compute_id"] = os.urandom(8).hex()
    if proxy_runs(env):
        # Clients come through the proxy, which uses the unix socket: no TCP port that a
        # client knowing a password could use to bypass it (and wake/suspend).
        settings["listen_addresses"] = ""
    compute_config = ComputeConfig(
        read_only=ep.read_only, receiver_name=receiver, quorum_standbys=pulled,
        max_connections=defaults.max_connections,
        shared_buffers=defaults.shared_buffers, settings=settings)
    log_path = endpoint_files(env, ep.name).log_path
    if mode is ComputeMode.LAZY:
        ps = config.pageserver_by_id(tenant_pageserver_id(env, ep.tenant_id))
        lazy = prepare_lazy_compute(ps.host, ps.pg_port, tenant_id, timeline_id, lsn,
                                    paths.compute_root, compute_config,
                                    compute_host=defaults.host, port=ep.port,
                                    log_path=log_path, user=service_user(),
                                    options=_lazy_options(env, config, ep),
                                    take_lease=lambda at, seconds: client.lease(
                                        tenant_id, timeline_id, at, seconds),
                                    fuse_proc=fuse_proc)
        lazy.compute.server.socket_dir = paths.socket_dir
        return lazy.compute, lazy
    paths.compute_root.mkdir()
    os.chmod(paths.compute_root, 0o755)
    # Spool the tar to disk: a large database must not have to fit in memory.
    with tempfile.TemporaryFile(dir=paths.root) as tar:
        client.basebackup(tenant_id, timeline_id, tar, lsn, read_only=ep.read_only,
                          slots=pulled)
        tar.seek(0)
        compute = Compute(paths.datadir, compute_config, host=defaults.host, port=ep.port,
                          log_path=log_path, user=service_user())
        compute.server.socket_dir = paths.socket_dir
        compute.unpack(tar)
        return compute, None


def _lazy_options(env: Environment, config: EnvConfig, ep: EndpointState) -> LazyOptions:
    from strata.compute.lazy import LazyOptions

    return LazyOptions(outage_wait_s=config.endpoint_defaults.lazy_outage_wait_s,
                       # Its page reads are this tenant's only.
                       token=token_for(env, config, Scope(ep.tenant_id)),
                       pageserver_file=endpoint_paths(env, ep.name).pageserver_file,
                       prewarm_file=_seeded_prewarm_file(env, ep))


def _seeded_prewarm_file(env: Environment, ep: EndpointState) -> Path:
    """The endpoint's prewarm file. An endpoint that has none yet (its first lazy start)
    gets a copy of another endpoint's of the same tenant (one on the same branch first,
    then the newest): its first connections read the same catalog blocks (a branch shares
    its parent's relation files until it rewrites them), so its first start is prewarmed
    as a restart is. A listed block that no longer exists is skipped (prewarm.py), and
    the endpoint's own reads replace the copy once it has run."""
    path = endpoint_paths(env, ep.name).prewarm_file
    if path.exists():
        return path
    best: tuple[tuple[bool, float], Path] | None = None
    for other in env.read_state().endpoints.values():
        if other.tenant_id != ep.tenant_id or other.name == ep.name:
            continue
        candidate = endpoint_paths(env, other.name).prewarm_file
        try:
            key = (other.branch == ep.branch, candidate.stat().st_mtime)
        except OSError:
            continue
        if best is None or key > best[0]:
            best = (key, candidate)
    if best is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(best[1].read_bytes())
        except OSError as err:  # a hint only: the start goes on without it
            output.info(f"warning: could not copy {best[1]} to {path}: {err}")
    return path


OLD_COMPUTE_PREFIX = "compute.old-"


def set_aside_compute_root(paths: EndpointPaths) -> None:
    """Move the last run's compute directory out of the way (a rename) for
    `remove_set_aside`. Deleting it took up to a second of the start (at load 10: every
    file the last compute wrote, one unlink each; a full-mode data directory is the
    whole database); the start only needs its name free."""
    root = paths.compute_root
    if not os.path.lexists(root):
        return
    if mountpoint_present(paths.mountpoint) and os.path.ismount(paths.mountpoint):
        raise Unavailable(f"{paths.mountpoint} is still mounted; refusing to replace {root}")
    os.rename(root, paths.root / f"{OLD_COMPUTE_PREFIX}{time.time_ns()}")


def _discard_compute_data(paths: EndpointPaths) -> None:
    """After a stop (settings saved): the stopped compute's data directory and lazy store
    are deleted in the background, so the next start has little to set aside (a start
    right after the deletion began shares the disk with it). Its logs stay."""
    root = paths.compute_root
    if mountpoint_present(paths.mountpoint) and os.path.ismount(paths.mountpoint):
        return  # the lazy side did not stop: the next start deals with it
    bulky = [root / name for name in ("pgdata", "lazy") if os.path.lexists(root / name)]
    if not bulky:
        return
    aside = paths.root / f"{OLD_COMPUTE_PREFIX}{time.time_ns()}"
    aside.mkdir()
    for path in bulky:
        os.rename(path, aside / path.name)
    remove_set_aside(paths)


def remove_set_aside(paths: EndpointPaths) -> None:
    """Delete the compute directories `set_aside_compute_root` moved aside, in a
    detached, low-priority process: the start (or its failure) does not wait for it. A
    directory left by a start that died is deleted by the next one."""
    try:
        old = [p for p in paths.root.iterdir() if p.name.startswith(OLD_COMPUTE_PREFIX)]
    except FileNotFoundError:
        return
    if old:
        subprocess.Popen(["nice", "-n", "19", "rm", "-rf", "--one-file-system", "--",
                          *map(str, old)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)


def _spawn_sidecar(env: Environment, config: EnvConfig, ep: EndpointState,
                   tenant_id: TenantId, timeline_id: TimelineId,
                   datadir: Path, sysid: int) -> subprocess.Popen[bytes]:
    """Start the walproposer under its supervisor (`strata.control.sidecar`) before
    PostgreSQL: it imports the walproposer while the basebackup is built, then waits for
    the postmaster's pid on its stdin (`_hand_postmaster`; end of input: it exits). With
    the cluster's system id it elects itself while PostgreSQL starts."""
    files = sidecar_files(env, ep.name)
    sks = ",".join(f"{sk.id}@{sk.host}:{sk.pg_port}" for sk in config.safekeepers)
    ps = config.pageserver_by_id(tenant_pageserver_id(env, ep.tenant_id))
    walproposer = ["--tenant", str(tenant_id), "--timeline", str(timeline_id),
                   # The unix socket: replication is refused over TCP (PG_HBA_RESTRICTED).
                   "--safekeepers", sks, "--pg-host", str(endpoint_paths(env, ep.name).socket_dir),
                   "--pg-port", str(ep.port), "--pgdata", str(datadir),
                   "--system-id", str(sysid),
                   "--quorum-warn-s", str(SIDECAR_QUORUM_WARN_S),
                   "--pageserver-http", f"{ps.host}:{ps.http_port}",
                   "--pageserver-file", str(endpoint_paths(env, ep.name).pageserver_file),
                   # It starts with PostgreSQL: it may have to wait for it to accept
                   # connections, for as long as the CLI would.
                   "--pg-reconnect-timeout-s", str(config.endpoint_defaults.start_timeout_s),
                   # Pull mode: the safekeepers replicate over that same unix socket.
                   *(["--pull"] if pull_standbys(config) else [])]
    # --pgdata first: the pid file's marker (sidecar_files) is the start of the command.
    argv = [sys.executable, "-m", "strata.control.sidecar", "--pgdata", str(datadir),
            "--pid-file", str(files.pid_path), "--wait-stdin", "--walproposer", "--",
            *walproposer]
    with open(files.log_path, "ab") as log:
        # Its token is good for this tenant only (strata.control.auth_setup).
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.PIPE, start_new_session=True,
                                env=child_env(env, config, tenant_id))
    files.write_pid(proc.pid)
    return proc


def _hand_postmaster(proc: subprocess.Popen[bytes], postmaster_pid: int) -> None:
    """Tell the waiting sidecar which postmaster it belongs to. If it died meanwhile,
    the wait for streaming says so with its log."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(f"{postmaster_pid}\n".encode())
        proc.stdin.close()


def _abandon_sidecar(env: Environment, name: str, proc: subprocess.Popen[bytes]) -> None:
    """A start that failed: the sidecar goes (a waiting one at the end of its input)."""
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()
    stop_process(sidecar_files(env, name), signal.SIGTERM, timeout_s=SIDECAR_STOP_TIMEOUT_S)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(SIDECAR_STOP_TIMEOUT_S)


def pull_standbys(config: EnvConfig) -> tuple[str, ...]:
    """Pull mode's standbys, one per safekeeper (`sk<id>`: slot and application name);
    () in push mode and in development mode."""
    if config.wal_mode is not WalMode.SAFEKEEPERS or config.commit_mode is not CommitMode.PULL:
        return ()
    return tuple(pull_slot_name(sk.id) for sk in config.safekeepers)


def _streaming_sql(config: EnvConfig) -> str:
    """A query answering whether commits can be released: the walproposer streams, or in
    pull mode a majority of the safekeepers do."""
    names = pull_standbys(config) or (DEFAULT_APPLICATION_NAME,)
    listed = ", ".join(f"'{name}'" for name in names)
    return (f"select count(*) >= {len(names) // 2 + 1} from pg_stat_replication where "
            f"application_name in ({listed}) and state = 'streaming'")


def _check_sidecar_alive(env: Environment, ep: EndpointState, compute: Compute,
                         proc: subprocess.Popen[bytes]) -> None:
    """What the start waits for of the walproposer: that its sidecar still runs once
    PostgreSQL accepts connections (it streams later; the first commit waits for it).
    If it already exited, PostgreSQL goes too and the error shows the sidecar's log;
    if it dies later, its supervisor stops PostgreSQL and `strata endpoint list` shows
    the endpoint and its walproposer as died, with their logs."""
    if proc.poll() is None:
        return
    files = sidecar_files(env, ep.name)
    if compute.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(compute.pid, signal.SIGQUIT)
    raise UserError(f"endpoint {ep.name}: its walproposer sidecar exited (code "
                    f"{proc.returncode}) while PostgreSQL started; PostgreSQL was stopped; "
                    f"last lines of {files.log_path}:\n{files.log_tail()}")


class _StreamingWait:
    """The wait for the walproposer to stream, done at most once and only when the start
    itself commits (the application role on a branch's first start, a proxy role's new
    password): such a commit waits for the synchronous standby anyway, but a bounded wait
    says why when it does not come. Its seconds go to phase `app_role.walproposer`."""

    def __init__(self, env: Environment, config: EnvConfig, ep: EndpointState,
                 compute: Compute, proc: subprocess.Popen[bytes] | None,
                 phase: _Phases) -> None:
        self.env, self.config, self.ep, self.compute, self.proc = env, config, ep, compute, proc
        self.phase = phase
        self.done = proc is None

    def __call__(self) -> None:
        if self.done:
            return
        assert self.proc is not None
        with self.phase("app_role.walproposer", "waiting for the walproposer to stream (the "
                                                "start commits)"):
            _wait_streaming(self.env, self.config, self.ep, self.compute, self.proc)
        self.done = True


def _wait_streaming(env: Environment, config: EnvConfig, ep: EndpointState,
                    compute: Compute, proc: subprocess.Popen[bytes]) -> None:
    """Wait until PostgreSQL streams to its walproposer (bounded); if it does not, stop
    both and say why with the sidecar's log. Strata's own client over the unix socket."""
    import asyncio

    files = sidecar_files(env, ep.name)
    pg_pid = compute.pid
    assert pg_pid is not None, ep.name
    socket_dir = str(endpoint_paths(env, ep.name).socket_dir)
    conns: list[PgConnection] = []
    with asyncio.Runner() as runner:
        def streaming() -> bool:
            if not pid_alive(pg_pid):
                raise UserError(f"endpoint {ep.name}: PostgreSQL (pid {pg_pid}) exited while "
                                f"its walproposer started; last lines of {files.log_path}:\n"
                                f"{files.log_tail()}")
            return runner.run(_streaming_now(conns, socket_dir, ep.port,
                                            _streaming_sql(config)))

        try:
            wait_for(streaming, timeout_s=config.endpoint_defaults.start_timeout_s,
                     what=f"waiting for PostgreSQL of endpoint {ep.name} to stream to its "
                          "walproposer", files=files, pid=proc.pid, interval_s=0.02)
        except StrataError:
            stop_process(files, signal.SIGTERM, timeout_s=SIDECAR_STOP_TIMEOUT_S)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pg_pid, signal.SIGQUIT)
            raise
        finally:
            for conn in conns:
                runner.run(conn.close())


async def _streaming_now(conns: list[PgConnection], socket_dir: str, port: int,
                         sql: str) -> bool:
    """One check of pg_stat_replication (`_streaming_sql`) over the connection kept in
    `conns`."""
    from strata.pg.pgclient import PgConnection

    try:
        if not conns:
            conns.append(await PgConnection.connect(socket_dir, port, user=SUPERUSER,
                                                    database="postgres", timeout_s=5))
        result = await conns[0].simple_query(sql)
    except StrataError:  # not accepting connections yet, or the connection broke
        for conn in conns:
            conn.abort()
        conns.clear()
        return False
    return bool(result.rows) and result.rows[0][0] in ("t", True)


def _stop_stale_sidecar(env: Environment, name: str) -> None:
    """A sidecar supervisor left from the endpoint's last run (its PostgreSQL is gone)."""
    files = sidecar_files(env, name)
    if files.read_pid() is not None:
        stop_process(files, signal.SIGTERM, timeout_s=SIDECAR_STOP_TIMEOUT_S)
    files.clear_pid()


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


def _ensure_app_role(env: Environment, ep: EndpointState,
                     before_write: Callable[[], None] | None = None) -> bool:
    """Create role and database `strata` on a primary; on a standby report whether they
    exist. Returns True if the application role can log in. `before_write` runs only
    when something is created: the first start of a branch made from one that has them
    (`strata timeline branch`) reads, so it does not wait for the walproposer."""
    # Read with Strata's own blocking client: psycopg is imported only to create them.
    rows = _superuser_query(
        env, ep, f"select (select count(*) from pg_roles where rolname = "
                 f"{_sql_literal(APP_ROLE)}), (select count(*) from pg_database where "
                 f"datname = {_sql_literal(APP_DATABASE)})")
    role, db = (value != "0" for value in rows[0])
    if ep.read_only or (role and db):
        return role and db
    if before_write is not None:
        before_write()
    with superuser_connect(env, ep) as conn:
        if not role:
            conn.execute(f"create role {APP_ROLE} login createdb createrole")
        if not db:
            conn.execute(f"create database {APP_DATABASE} owner {APP_ROLE}")
    return True


def apply_roles(env: Environment, ep: EndpointState, roles: dict[str, str], *,
                before_write: Callable[[], None] | None = None) -> None:
    """Create each role (LOGIN) on the running primary `ep`, or set its password: the
    SCRAM secret the proxy checks (`strata role`), so that PostgreSQL holds the same.
    Roles that already hold their secret are left alone: at a start (a wake) that is
    all of them, and the read (Strata's own client: no psycopg import on a wake) costs
    no commit. `before_write` runs once before the first change (at a start: the wait
    for the walproposer, which the commit needs)."""
    held = _held_roles(env, ep, list(roles))
    changes = {name: secret for name, secret in roles.items()
               if held.get(name) != (secret, True)}
    if not changes:
        return
    if before_write is not None:
        before_write()
    from psycopg import sql

    with superuser_connect(env, ep) as conn:
        for name, secret in changes.items():
            verb = sql.SQL("alter role" if name in held else "create role")
            conn.execute(sql.SQL("{} {} login password {}").format(
                verb, sql.Identifier(name), sql.Literal(secret)))


def _sql_literal(text: str) -> str:
    """A standard SQL string literal (standard_conforming_strings is on in PostgreSQL 15)."""
    return "'" + text.replace("'", "''") + "'"


def _held_roles(env: Environment, ep: EndpointState,
                names: list[str]) -> dict[str, tuple[str | None, bool]]:
    """rolname -> (rolpassword, rolcanlogin) of those of `names` that exist."""
    listed = ", ".join(_sql_literal(name) for name in names)
    rows = _superuser_query(env, ep, "select rolname, rolpassword, rolcanlogin from pg_authid "
                                     f"where rolname in ({listed})")
    return {str(name): (password, login == "t") for name, password, login in rows}


def _superuser_query(env: Environment, ep: EndpointState,
                     query: str) -> list[tuple[str | None, ...]]:
    """The text rows of `query` as the superuser over the unix socket, with Strata's own
    blocking client (no psycopg or asyncio import on a start's path)."""
    from strata.pg.blockingclient import BlockingPgConnection

    conn = BlockingPgConnection.connect(str(endpoint_paths(env, ep.name).socket_dir), ep.port,
                                        user=SUPERUSER, database="postgres", timeout_s=5)
    try:
        return conn.simple_query(query, time.monotonic() + 30)
    finally:
        conn.close()


def _write_restricted_hba(paths: EndpointPaths) -> None:
    hba = paths.datadir / "pg_hba.conf"
    hba.write_text(PG_HBA_RESTRICTED)
    chown_tree(hba, service_user())


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
    sidecar = sidecar_files(env, ep.name)
    pid = running_pid(env, ep.name)
    if pid is None:
        files.clear_pid()
        _stop_stale_sidecar(env, ep.name)
        _stop_lazy_side(env, ep.name)
        return False
    files.write_pid(pid)
    mode = "immediate" if immediate else "fast"
    with output.step(f"stopping endpoint {ep.name} ({mode})"):
        if not immediate and not ep.read_only:
            # A clean stop keeps sequence values, as it does on stock PostgreSQL.
            from strata.control.sequences import log_current_values

            log_current_values(lambda dbname: superuser_connect(env, ep, dbname))
        # PostgreSQL first: a fast shutdown sends its last WAL (the shutdown checkpoint)
        # to the walproposer, which must still run to make it durable.
        stop_process(files, signal.SIGQUIT if immediate else signal.SIGINT,
                     timeout_s=STOP_TIMEOUT_S)
        if sidecar.read_pid() is not None:
            stop_process(sidecar, signal.SIGTERM, timeout_s=SIDECAR_STOP_TIMEOUT_S)
        sidecar.clear_pid()
    _stop_lazy_side(env, ep.name)
    if not immediate and not ep.read_only:
        _save_settings(endpoint_paths(env, ep.name), timeline_id)
        if client is not None and env.config().wal_mode is WalMode.PAGESERVER:
            # The dev-mode sync step stops the receiver and forgets the compute's address
            # (else the pageserver keeps dialling a stopped compute), after ingesting all
            # the WAL it received, the shutdown checkpoint included.
            with output.step(f"releasing the pageserver's WAL receiver of {ep.name}"):
                client.compute_start(ep.tenant_id, timeline_id)
    _discard_compute_data(endpoint_paths(env, ep.name))
    return True


def _stop_lazy_side(env: Environment, name: str) -> None:
    """Lazy mode: the FUSE server and its watchdog go once PostgreSQL is down; the mount
    is detached (the pgdata stays for the settings saved from it)."""
    paths = endpoint_paths(env, name)
    if not mountpoint_present(paths.mountpoint):
        return
    from strata.compute.lazy import cleanup_lazy_root

    cleanup_lazy_root(paths.compute_root)


def mountpoint_present(path: Path) -> bool:
    """Whether a lazy compute's mount point is there, a dead one included: while its FUSE
    server stops (or after it died), stat fails with ENOTCONN, which `Path.exists` raises
    (an `endpoint list` right after a sidecar's death failed on it)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True  # ENOTCONN and the like: a mount whose server is gone
    return True


def compute_mode(env: Environment, name: str) -> ComputeMode | None:
    """The mode of the endpoint's current (or last) compute directory."""
    paths = endpoint_paths(env, name)
    if mountpoint_present(paths.mountpoint):
        return ComputeMode.LAZY
    # A stopped compute's data directory is gone (`_discard_compute_data`), its directory
    # stays.
    return ComputeMode.FULL if paths.compute_root.exists() else None


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
    # A suspended endpoint is reachable through the proxy (a connection wakes it).
    reachable = pid is not None or proxy_runs(env)
    out: dict[str, Any] = {
        "name": ep.name, "tenant_id": str(ep.tenant_id), "branch": ep.branch,
        "mode": "read-only" if ep.read_only else "primary",
        "lsn": None if ep.lsn is None else str(ep.lsn),
        "address": f"{config.endpoint_defaults.host}:{ep.port}", "pid": pid,
        "state": "died" if died else "stopped" if pid is None else "running",
        "current_lsn": None,
        "connstr": connstr(env, config, ep) if reachable else None,
        "local_connstr": local_connstr(env, ep),
        "socket_dir": str(endpoint_paths(env, ep.name).socket_dir),
        "log": str(files.log_path), "log_tail": files.log_tail() if died else None,
        "walproposer": None, "compute_mode": compute_mode(env, ep.name),
    }
    if config.wal_mode is WalMode.SAFEKEEPERS and not ep.read_only:
        sidecar = sidecar_files(env, ep.name)
        sc_pid = sidecar.read_pid()
        sc_died = sc_pid is None and sidecar.died()
        out["walproposer"] = {
            "pid": sc_pid, "state": "died" if sc_died else "stopped" if sc_pid is None
            else "running", "log": str(sidecar.log_path),
            "log_tail": sidecar.log_tail() if sc_died or died else None,
            "streaming": None}
        if pid is not None and sc_pid is None:
            out["state"] = "running without its walproposer (commits wait)"
    if pid is None:
        return out
    import psycopg

    try:
        with superuser_connect(env, ep) as conn:
            query = ("select pg_last_wal_replay_lsn()::text" if ep.read_only
                     else "select pg_current_wal_flush_lsn()::text")
            row = conn.execute(query).fetchone()
            out["current_lsn"] = row[0] if row else None
            if out["walproposer"] is not None:
                # `endpoint start` does not wait for it: until it streams, commits wait.
                row = conn.execute(_streaming_sql(config)).fetchone()
                out["walproposer"]["streaming"] = bool(row and row[0])
    except psycopg.Error as err:
        out["state"] = f"not responding ({str(err).strip().splitlines()[0]})"
    return out


def head_flush_lsn(env: Environment, ep: EndpointState) -> Lsn:
    """What a running primary has flushed (and so its synchronous standby has too)."""
    import psycopg

    try:
        with superuser_connect(env, ep) as conn:
            row = conn.execute("select pg_current_wal_flush_lsn()::text").fetchone()
    except psycopg.Error as err:
        raise Unavailable(f"endpoint {ep.name} does not answer: {err}") from err
    assert row is not None, ep.name
    return Lsn.parse(row[0])
