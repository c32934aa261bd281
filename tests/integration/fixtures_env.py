"""The integration test environment: Strata's services as real processes, and PostgreSQL
computes started on them.

- `PageserverProcess` runs `python -m strata.pageserver` on free ports (it binds port 0 and
  reports the ports in `pageserver.ports`); `SafekeeperProcess` runs `python -m
  strata.safekeeper` on fixed free ports, so that a restarted safekeeper is found at the same
  address. Both (`ServiceProcess`) run in a session of their own, as the control plane
  starts them, and stop with SIGTERM (returning the exit code) or SIGKILL.
- `Env` is a pageserver and dev-mode computes: `Env.start_compute(tenant, timeline,
  lsn=None, read_only=False)` does what the control plane does for a dev-mode compute:
  compute_start (for a primary), fetch the basebackup over the PG port, start a stock
  PostgreSQL 15 on it, and attach the pageserver's WAL receiver.
- `Cluster` is a pageserver following N safekeepers, and computes started the way the
  control plane starts them (architecture D6/D7):
  1. `sync_safekeepers` (the walproposer's one-shot sync) gives X and its previous record;
  2. the pageserver's basebackup at X (it waits until it has ingested X from the
     safekeepers);
  3. a stock PostgreSQL 15 on it, whose only synchronous standby is the walproposer
     sidecar, run here in a background event loop (`LoopThread`, so that tests can arm its
     failpoints and read its state); `Cluster.sidecar_argv` gives the same sidecar as a
     command line, and `Cluster.start_compute_process` runs it as `strata endpoint start`
     does (`SidecarProcess`: under its supervisor, a process and a session of its own).

The fixtures that use these are in conftest.py (`pageserver`, `env`) and in the test files.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from polling import wait_until
from strata.common import eventloop
from strata.common.auth import auth_headers
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, Lsn
from strata.compute.compute import Compute, ComputeConfig
from strata.compute.pgserver import PgServer
from strata.compute.quorum import DEFAULT_APPLICATION_NAME, QuorumConfig, SafekeeperAddr, SyncResult
from strata.compute.safekeeper_sync import sync_safekeepers
from strata.compute.walproposer import (
    SidecarConfig,
    WalProposer,
    immediate_stopper,
    postmaster_pid,
)
from strata.pageserver.client import PageserverClient
from strata.pg.controlfile import ControlFileData
from strata.safekeeper.client import SafekeeperClient
from strata.safekeeper.proposer import pull_slot_name

__all__ = ["APP_NAME", "COMPUTE_SETTINGS", "SLOT", "Cluster", "Env", "LoopThread",
           "PageserverProcess", "RunningCompute", "SafekeeperProcess", "ServiceProcess",
           "SidecarCompute", "SidecarProcess"]

T = TypeVar("T")
SLOT = "strata_walproposer"
APP_NAME = "strata_pageserver"
COMPUTE_SETTINGS: dict[str, object] = {
    "synchronous_commit": "on",
    "wal_sender_timeout": "20s",
    "autovacuum": False,  # keeps pg_dump comparisons and WAL volume deterministic
}


def unexpected_lines(path: Path, allowed: list[str]) -> list[str]:
    """`path`'s ERROR, WARNING and Traceback lines that match none of the regexes
    `allowed`, each prefixed with the file's name."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        if (" ERROR " in line or " WARNING " in line or "Traceback" in line) and \
                not any(re.search(p, line) for p in allowed):
            found.append(f"{path.name}: {line}")
    return found


class ServiceProcess(abc.ABC):
    """A Strata service (`python -m strata.NAME`) as a child process; its output is
    appended to `log_path`. A subclass gives its command line and its readiness check."""

    what = "service"

    def __init__(self, workdir: Path, log_path: Path) -> None:
        self.workdir = workdir
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @abc.abstractmethod
    def argv(self) -> list[str]:
        """The service's command line."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True once the started process serves (called until it is, while it runs)."""

    def start(self, timeout_s: float = 60) -> None:
        assert self.proc is None, "already running"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with open(self.log_path, "ab") as log:
            # In a session of its own, as the control plane starts it (control/supervisor.py)
            # and as PgServer starts PostgreSQL: with the kernel's autogroups, each session
            # is one group that the scheduler weighs as one process, so services in the
            # test's (or bench's) session would share one CPU share with it and with one
            # another while every stock PostgreSQL they are compared with has its own
            # (docs/walproposer.md, "The commit latency tail").
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        proc = self.proc
        assert os.getsid(proc.pid) == proc.pid, (os.getsid(proc.pid), proc.pid)

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{self.what} exited with {proc.returncode}:\n"
                                     f"{self.log_tail()}")
            return self.ready()

        wait_until(ready, timeout_s, f"{self.what} to listen")

    def prepare(self) -> None:  # noqa: B027 - a hook: most services need nothing
        """Runs before each start."""

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
            raise AssertionError(f"{self.what} did not stop in {timeout_s}s:\n"
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
        """The whole log ("" before the first start)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


class PageserverProcess(ServiceProcess):
    """`python -m strata.pageserver --workdir DIR` as a child process."""

    what = "pageserver"

    def __init__(self, workdir: Path, log_path: Path, overrides: list[str] | None = None) -> None:
        super().__init__(workdir, log_path)
        self.overrides = overrides or []
        self.pg_port = 0
        self.http_port = 0

    @property
    def ports_file(self) -> Path:
        return self.workdir / "pageserver.ports"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "strata.pageserver", "--workdir", str(self.workdir),
                "-c", "listen_pg_addr=127.0.0.1:0", "-c", "listen_http_addr=127.0.0.1:0"]
        for item in self.overrides:
            argv += ["-c", item]
        return argv

    def prepare(self) -> None:
        self.ports_file.unlink(missing_ok=True)

    def ready(self) -> bool:
        if not self.ports_file.exists():
            return False
        pg_port, http_port = self.ports_file.read_text().split()
        self.pg_port, self.http_port = int(pg_port), int(http_port)
        return True

    @property
    def client(self) -> PageserverClient:
        return PageserverClient("127.0.0.1", self.http_port, self.pg_port)


class SafekeeperProcess(ServiceProcess):
    """`python -m strata.safekeeper` under `workdir`: on ports the OS picks at its first
    start (read from its safekeeper.ports: no other process can take them between a pick
    and the bind), the same ones at each restart (the computes know them)."""

    def __init__(self, node_id: int, workdir: Path, log_path: Path, *,
                 extra_args: list[str] | None = None, token: str | None = None) -> None:
        super().__init__(workdir, log_path)
        self.node_id = node_id
        self.what = f"safekeeper {node_id}"
        self.extra_args = extra_args or []
        self.token = token  # sent by http() (a safekeeper started with --auth-public-key)
        self.pg_port = 0  # until the first start
        self.http_port = 0

    @property
    def ports_file(self) -> Path:
        return self.workdir / "safekeeper.ports"

    def prepare(self) -> None:
        self.ports_file.unlink(missing_ok=True)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "strata.safekeeper", "--id", str(self.node_id),
                "--workdir", str(self.workdir), "--pg-port", str(self.pg_port),
                "--http-port", str(self.http_port), *self.extra_args]

    def ready(self) -> bool:
        if not self.ports_file.exists():
            return False
        pg_port, http_port = self.ports_file.read_text().split()
        self.pg_port, self.http_port = int(pg_port), int(http_port)
        return self.client.responds()

    @property
    def client(self) -> SafekeeperClient:
        """The typed client (what the control plane uses), with this process's token."""
        return SafekeeperClient("127.0.0.1", self.http_port, node_id=self.node_id,
                                timeout_s=10, token=self.token or "")

    def http(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A raw call, for tests of the API itself (HTTP errors raise HTTPError)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data,
                                     method=method,
                                     headers={"Content-Type": "application/json",
                                              **auth_headers(self.token)})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"null")

    def timeline_status(self, tenant: TenantId, timeline: TimelineId) -> dict[str, Any]:
        return self.client.timeline_json(tenant, timeline)

    def create_timeline(self, tenant: TenantId, timeline: TimelineId, start_lsn: Lsn,
                        prev_lsn: Lsn, system_id: int, seg_size: int) -> None:
        self.client.create_timeline(tenant, timeline, start_lsn=start_lsn, prev_lsn=prev_lsn,
                                    system_id=system_id, seg_size=seg_size)

    def endpoint_json(self) -> dict[str, Any]:
        return {"id": self.node_id, "host": "127.0.0.1", "pg_port": self.pg_port,
                "http_port": self.http_port}


class SidecarProcess(ServiceProcess):
    """A compute's walproposer sidecar as `strata endpoint start` runs it (control/
    endpoints.py `_spawn_sidecar`): `python -m strata.control.sidecar ... --walproposer --
    ARGS`, the supervisor that forks the walproposer and stops PostgreSQL if it dies, in a
    session of its own. Ready once PostgreSQL can release commits (the walproposer streams;
    in pull mode a majority of the safekeepers do). SIGTERM stops both the sidecar and
    PostgreSQL (immediate)."""

    what = "walproposer sidecar"

    def __init__(self, compute: Compute, log_path: Path, walproposer_args: list[str],
                 standbys: tuple[str, ...]) -> None:
        super().__init__(compute.datadir.parent, log_path)
        self.compute = compute
        self.walproposer_args = walproposer_args
        names = standbys or (DEFAULT_APPLICATION_NAME,)
        listed = ", ".join(f"'{name}'" for name in names)
        self.ready_sql = (f"select count(*) >= {len(names) // 2 + 1} from pg_stat_replication "
                          f"where application_name in ({listed}) and state = 'streaming'")

    def argv(self) -> list[str]:
        datadir = self.compute.datadir
        return [sys.executable, "-m", "strata.control.sidecar", "--pgdata", str(datadir),
                "--postmaster-pid", str(postmaster_pid(datadir)), "--walproposer", "--",
                *self.walproposer_args]

    def ready(self) -> bool:
        return bool(self.compute.server.sql(self.ready_sql)[0][0])

    def kill9(self) -> None:
        """SIGKILL to its process group (the supervisor and the forked walproposer: a
        killed supervisor alone would leave the walproposer behind)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


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
            found += unexpected_lines(path, self.allowed_log_errors)
        return found

    def stop_all(self) -> None:
        for server in reversed(self.computes):
            try:
                server.stop("immediate", timeout_s=20)
            except Exception:  # noqa: BLE001 - best effort at the end of a test
                server.kill9()
        self.computes.clear()
        self.pageserver.kill9()


class LoopThread:
    """An event loop in a thread, for sidecars, while the test thread uses psycopg."""

    def __init__(self) -> None:
        self.loop = eventloop.new_event_loop()  # what the sidecar CLI runs on
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.closers: list[Callable[[], Awaitable[None]]] = []  # run first at close()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            for closer in self.closers:
                await closer()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=5)
        self.call(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class RunningCompute:
    """A compute with its sidecar; `fenced` collects the sidecar's fencing reasons."""

    compute: Compute
    sidecar: WalProposer
    run: concurrent.futures.Future[str]
    start: SyncResult
    fenced: list[str] = field(default_factory=list)


@dataclass
class SidecarCompute:
    """A compute whose sidecar runs as a process of its own (`Cluster.start_compute_process`)."""

    compute: Compute
    sidecar: SidecarProcess
    start: SyncResult

    def sidecar_exited(self) -> str | None:
        """None while the sidecar runs, else its exit code and log tail (it was fenced or
        failed: its supervisor stopped PostgreSQL too)."""
        proc = self.sidecar.proc
        if proc is not None and proc.poll() is None:
            return None
        code = None if proc is None else proc.returncode
        return f"the sidecar exited with {code}:\n{self.sidecar.log_tail()}"


@dataclass
class Cluster:
    """A pageserver, N safekeepers and the computes a test started."""

    test_dir: Path
    env: Env
    safekeepers: list[SafekeeperProcess]
    loop: LoopThread
    quorum_warn_s: float = 3.0
    sidecar_settings: dict[str, Any] = field(default_factory=dict)
    pull: bool = False
    """Pull mode (docs/walproposer.md): computes get slots sk1..skN and `ANY <majority>`,
    their sidecars `pull=True`; the safekeepers replicate from them."""
    computes: list[RunningCompute] = field(default_factory=list)
    sidecar_computes: list[SidecarCompute] = field(default_factory=list)
    system_ids: dict[TimelineId, int] = field(default_factory=dict)
    _seq: int = 0

    @classmethod
    def start(cls, test_dir: Path, loop: LoopThread, n: int = 3,
              pageserver_overrides: list[str] | None = None) -> Cluster:
        ps = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log",
                               pageserver_overrides)
        ps.start()
        sks = [SafekeeperProcess(i + 1, test_dir / f"sk{i + 1}", test_dir / f"sk{i + 1}.log")
               for i in range(n)]
        for sk in sks:
            sk.start()
        return cls(test_dir, Env(test_dir, ps), sks, loop)

    def stop_all(self) -> None:
        for sc in self.sidecar_computes:
            sc.sidecar.kill9()
        for rc in self.computes:
            rc.run.cancel()
            if rc.compute.is_running():
                rc.compute.kill9()
        self.env.stop_all()
        for sk in self.safekeepers:
            sk.kill9()

    def unexpected_log_errors(self) -> list[str]:
        """ERROR/WARNING lines in the pageserver's and the safekeepers' logs."""
        found = self.env.unexpected_log_errors()
        for sk in self.safekeepers:
            found += unexpected_lines(sk.log_path, [])
        return found

    # --- tenants -------------------------------------------------------------------------
    def create_tenant(self) -> tuple[TenantId, TimelineId]:
        """A tenant whose main timeline lives on the safekeepers and that the pageserver
        follows from there."""
        client = self.env.client
        tenant, timeline = client.create_tenant()
        info = client.timeline(tenant, timeline)
        tar = io.BytesIO()
        client.basebackup(tenant, timeline, tar, info.last_record_lsn)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as archive:
            member = archive.extractfile("global/pg_control")
            assert member is not None
            control = ControlFileData.from_bytes(member.read())
        self.system_ids[timeline] = control.system_identifier
        for sk in self.safekeepers:
            sk.create_timeline(tenant, timeline, info.last_record_lsn, info.prev_record_lsn,
                               control.system_identifier, DEFAULT_WAL_SEGMENT_SIZE)
        client.follow_safekeepers(tenant, timeline,
                                  [sk.endpoint_json() for sk in self.safekeepers])
        return tenant, timeline

    def quorum(self, tenant: TenantId, timeline: TimelineId) -> QuorumConfig:
        return QuorumConfig(tenant, timeline,
                            tuple(SafekeeperAddr(sk.node_id, "127.0.0.1", sk.pg_port)
                                  for sk in self.safekeepers),
                            retry_interval_s=0.1, connect_timeout_s=1, backoff_max_s=0.2)

    def sync(self, tenant: TenantId, timeline: TimelineId) -> SyncResult:
        return sync_safekeepers(self.quorum(tenant, timeline), self.system_ids[timeline],
                                timeout_s=30)

    # --- computes ------------------------------------------------------------------------
    def start_compute(self, tenant: TenantId, timeline: TimelineId,
                      settings: dict[str, object] | None = None) -> RunningCompute:
        start = self.sync(tenant, timeline)
        compute = self.start_postgres(tenant, timeline, start, settings)
        fenced: list[str] = []
        stop = immediate_stopper(postmaster_pid(compute.datadir))

        def on_fence(reason: str) -> None:
            fenced.append(reason)
            stop(reason)

        sidecar_config = SidecarConfig(pg_host="127.0.0.1", pg_port=compute.port,
                                       quorum_warn_s=self.quorum_warn_s,
                                       pg_reconnect_timeout_s=3, pull=self.pull,
                                       **self.sidecar_settings)
        sidecar = WalProposer(self.quorum(tenant, timeline), sidecar_config, on_fence=on_fence)
        run = self.loop.spawn(sidecar.run())
        rc = RunningCompute(compute, sidecar, run, start, fenced)
        self.computes.append(rc)
        return rc

    def start_compute_process(self, tenant: TenantId, timeline: TimelineId,
                              settings: dict[str, object] | None = None,
                              pageserver_http: bool = False) -> SidecarCompute:
        """A compute whose sidecar runs as `strata endpoint start` runs it: a process (its
        supervisor and the forked walproposer) in a session of its own, not in this
        process's loop thread (`start_compute`). `pageserver_http`: backpressure from the
        pageserver (the sidecar's `--pageserver-http`). Returns once commits can be
        released."""
        start = self.sync(tenant, timeline)
        compute = self.start_postgres(tenant, timeline, start, settings)
        args = self.sidecar_argv(tenant, timeline, compute)[3:]  # after python -m MODULE
        args += ["--system-id", str(self.system_ids[timeline]), "--quorum-warn-s",
                 str(self.quorum_warn_s), "--pg-reconnect-timeout-s", "3"]
        if pageserver_http:
            args += ["--pageserver-http", f"127.0.0.1:{self.env.pageserver.http_port}"]
        if self.pull:
            args.append("--pull")
        standbys = tuple(pull_slot_name(sk.node_id) for sk in self.safekeepers) \
            if self.pull else ()
        sidecar = SidecarProcess(compute, self.test_dir / f"{compute.datadir.name}-sidecar.log",
                                 args, standbys)
        sidecar.start()
        sc = SidecarCompute(compute, sidecar, start)
        self.sidecar_computes.append(sc)
        return sc

    def start_postgres(self, tenant: TenantId, timeline: TimelineId, start: SyncResult,
                       settings: dict[str, object] | None = None) -> Compute:
        """A compute from the pageserver's basebackup at `start` (no sidecar yet)."""
        self._seq += 1
        name = f"compute{self._seq}"
        tar = io.BytesIO()
        slots = tuple(pull_slot_name(sk.node_id) for sk in self.safekeepers) \
            if self.pull else ()
        self.env.client.basebackup(tenant, timeline, tar, start.lsn, slots=slots)
        tar.seek(0)
        config = ComputeConfig(receiver_name=DEFAULT_APPLICATION_NAME, quorum_standbys=slots,
                               settings={**COMPUTE_SETTINGS, **(settings or {})})
        compute = Compute.from_basebackup(tar, self.test_dir / name, config,
                                          log_path=self.test_dir / f"{name}.log")
        self.env.computes.append(compute)
        compute.start()
        return compute

    def sidecar_argv(self, tenant: TenantId, timeline: TimelineId, compute: Compute) -> list[str]:
        sks = ",".join(f"{sk.node_id}@127.0.0.1:{sk.pg_port}" for sk in self.safekeepers)
        return [sys.executable, "-m", "strata.compute.walproposer", "--tenant", str(tenant),
                "--timeline", str(timeline), "--safekeepers", sks, "--pg-port",
                str(compute.port), "--pgdata", str(compute.datadir)]
