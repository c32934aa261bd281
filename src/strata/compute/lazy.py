"""Start and stop a lazy compute: PostgreSQL 15 on a FUSE file system that fetches pages.

Architecture D6 (lazy mode). `start_lazy_compute` does, for one compute directory ROOT:

1. takes an LSN lease on the start LSN X (D5) before anything else, so GC cannot
   remove a page this compute may still fetch; the FUSE process renews it for its life;
2. fetches a lazy basebackup at X (no relation files, a list of them with sizes) and
   unpacks it into ROOT/pgdata;
3. moves `base/` and `global/` into ROOT/lazy/tree (the local store) and replaces them
   with symlinks into the mount point ROOT/mnt;
4. starts the FUSE server (`python -m strata.compute.lazyfs mount`) and its watchdog
   (`... watch`, started before step 1 so that its Python start overlaps the basebackup,
   not PostgreSQL's), which stops PostgreSQL at once if the FUSE server dies and stops
   the FUSE server when PostgreSQL exits; waits for the mount;
5. starts PostgreSQL (`restart_after_crash = off` comes with every compute).

After a crash of either process the endpoint is restarted from a fresh basebackup in a
new directory; nothing local is reused. `LazyCompute.stop()` stops PostgreSQL, then the
FUSE server, and detaches the mount even when a process had died.

`prepare_lazy_compute` does steps 1-4 and returns a `LazyCompute` whose `start()` does
step 5, for a control plane that edits the data directory in between.
`cleanup_lazy_root(root, remove=...)` stops what is left of a lazy compute from any
process (by the pid files in ROOT) and detaches its mount, e.g. before deleting ROOT.

`fuse_unusable_reason()` says why lazy mode cannot run on this host (None when it can);
the control plane falls back to full mode with that reason as its warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from strata.common.auth import TOKEN_ENV
from strata.common.errors import Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import RunAs, chown_tree
from strata.compute import fuse_early
from strata.compute.compute import Compute, ComputeConfig
from strata.compute.fuse_early import FUSE_LIBRARY_ENV
from strata.compute.lazyfs import MANIFEST_NAME, TREE
from strata.compute.lazyfs.watch import FUSERMOUNT, detach
from strata.compute.pgserver import PgServer
from strata.pageserver.client import read_basebackup
from strata.pg.constants import PGDATA_DIRS

log = logging.getLogger(__name__)

LAZY_DIRS = ("base", "global")
FUSE_PID_FILE = "lazyfs.pid"
WATCH_PID_FILE = "lazyfs-watch.pid"
WATCHDOG_GRACE_S = 10.0
"""How long a stop lets the watchdog stop the FUSE server (it does once PostgreSQL is gone)
before signalling it too: a second SIGTERM that lands while libfuse tears down (its
handlers already removed) kills the server before it unmounts and logs its counters."""


@dataclass(frozen=True, slots=True)
class LazyOptions:
    """How the FUSE side of a lazy compute runs."""

    lease_s: float = 600.0
    """Length of the LSN lease; the FUSE process renews it every third of that."""
    readahead_blocks: int = 128
    """Largest readahead window for sequential reads (blocks of 8 KB)."""
    mount_timeout_s: float = 30.0
    outage_wait_s: float = 60.0
    """How long a page read waits for an unreachable pageserver to come back (reconnecting
    with backoff) before it fails with EIO."""
    token: str | None = field(default=None, repr=False)
    """The FUSE process's token for the pageserver (one scoped to the compute's tenant);
    None: it inherits this process's `$STRATA_AUTH_TOKEN`, if any."""
    pageserver_file: Path | None = None
    """A file with the pageserver's address (strata.compute.pageserver_address) that the
    FUSE process re-reads when it changes (a relocation); None: the address given."""
    prewarm_file: Path | None = None
    """Where the FUSE process keeps the blocks PostgreSQL read first, and prefetches them
    from at the next start (strata.compute.lazyfs.prewarm); None: no prewarm."""

    def __post_init__(self) -> None:
        if not 0 <= self.outage_wait_s <= 3600:
            raise UserError(f"lazy compute outage_wait_s = {self.outage_wait_s}: must be "
                            "0..3600 seconds")
        if self.lease_s < 3:
            raise UserError(f"lazy compute lease_s = {self.lease_s}: must be >= 3 seconds")
        if not 1 <= self.readahead_blocks <= 256:
            raise UserError(f"lazy compute readahead_blocks = {self.readahead_blocks}: "
                            "must be 1..256 (one GetPages batch)")


# The libfuse the FUSE server loads (mfusepy's `$FUSE_LIBRARY_PATH`, which
# overrides it); in `strata.compute.fuse_early`, which the CLI imports before the rest.
_libfuse = fuse_early.libfuse


def fuse_unusable_reason() -> str | None:
    """Why lazy mode cannot run here, or None when FUSE is usable."""
    try:
        if not stat.S_ISCHR(os.stat("/dev/fuse").st_mode):
            return "/dev/fuse is not a character device"
    except OSError as err:
        return f"/dev/fuse is not available ({err.strerror}); install fuse3 or use full mode"
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not readable and writable by this user"
    if shutil.which(FUSERMOUNT) is None:
        return f"{FUSERMOUNT} is not installed (Debian package fuse3)"
    # Not `import mfusepy` here: it looks libfuse up with ctypes.util.find_library
    # (`ldconfig -p` in a subprocess: 0.1-0.5 s of every start); the FUSE server gets the
    # library checked here instead (`_fuse_env`).
    if importlib.util.find_spec("mfusepy") is None:
        return "the FUSE binding mfusepy is not installed (scripts/setup installs it)"
    try:
        version = ctypes.CDLL(_libfuse()).fuse_version()
    except (OSError, AttributeError) as err:
        return f"cannot load libfuse3 ({err}); install libfuse3-3"
    # FUSE_MAKE_VERSION: 3.9 is 39, 3.14 is 314.
    major = version // 10 if version < 100 else version // 100
    if major != 3:
        return f"{_libfuse()} is libfuse {major} (fuse_version() {version}), not 3"
    if os.getuid() != 0:
        try:
            conf = Path("/etc/fuse.conf").read_text()
        except OSError:
            conf = ""
        if not any(line.strip() == "user_allow_other" for line in conf.splitlines()):
            return ("not root and /etc/fuse.conf has no user_allow_other, so PostgreSQL's "
                    "user could not reach the mount")
    return None


class LazyCompute:
    """A started lazy compute: PostgreSQL, its FUSE server and the watchdog."""

    def __init__(self, root: Path, compute: Compute, fuse_proc: subprocess.Popen[bytes],
                 watch_proc: subprocess.Popen[bytes] | None, lsn: Lsn) -> None:
        self.root = root
        self.compute = compute
        self.fuse_proc = fuse_proc
        self.watch_proc = watch_proc
        self.lsn = lsn
        self.phases: dict[str, float] = {}
        """Seconds of each step of `prepare_lazy_compute` (lease, fetch, unpack, mount)."""
        self.was_ready = False
        """PostgreSQL became ready (so the watchdog stops the FUSE server once it is gone)."""

    @property
    def server(self) -> PgServer:
        return self.compute.server

    @property
    def port(self) -> int:
        return self.compute.port

    @property
    def mountpoint(self) -> Path:
        return self.root / "mnt"

    @property
    def store(self) -> Path:
        return self.root / "lazy"

    @property
    def fuse_pid(self) -> int:
        return self.fuse_proc.pid

    @property
    def fuse_log(self) -> Path:
        return self.root / "lazyfs.log"

    def fuse_running(self) -> bool:
        return self.fuse_proc.poll() is None

    def is_running(self) -> bool:
        return self.compute.is_running() and self.fuse_running()

    def sql(self, query: str, *params: Any, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        return self.compute.sql(query, *params, dbname=dbname)

    def start(self, *, timeout_s: float = 60) -> None:
        """Start PostgreSQL on the mounted file system (after `prepare_lazy_compute`)."""
        self.launch()
        self.wait_ready(timeout_s=timeout_s)

    def launch(self) -> None:
        """`start` without waiting until PostgreSQL accepts connections (`wait_ready`)."""
        try:
            self.compute.launch()
        except BaseException:
            self.stop("immediate", timeout_s=20)
            raise

    def wait_ready(self, *, timeout_s: float = 60) -> None:
        """Wait until PostgreSQL accepts connections; on failure stop all."""
        try:
            self.compute.server.wait_ready(timeout_s)
            self.was_ready = True
        except BaseException:
            self.stop("immediate", timeout_s=20)
            raise

    def kill_fuse(self) -> None:
        """SIGKILL the FUSE server (a crash); the watchdog then stops PostgreSQL."""
        if self.fuse_proc.poll() is None:
            self.fuse_proc.kill()
        self.fuse_proc.wait(10)

    def wait_down(self, timeout_s: float = 30) -> None:
        """Wait until PostgreSQL, the FUSE server and the watchdog are all gone."""
        deadline = time.monotonic() + timeout_s
        procs = [p for p in (self.fuse_proc, self.watch_proc) if p is not None]
        while True:
            alive = [p.pid for p in procs if p.poll() is None]
            if self.compute.is_running():
                alive.append(self.compute.pid or 0)
            if not alive:
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"lazy compute in {self.root}: processes {alive} still "
                                  f"running after {timeout_s}s")
            time.sleep(0.05)

    def stop(self, mode: str = "fast", *, timeout_s: float = 60) -> None:
        """Stop PostgreSQL, then the FUSE server; unmount. Safe after either crashed."""
        try:
            self.compute.stop(mode, timeout_s=timeout_s)
        finally:
            if (self.was_ready and self.watch_proc is not None
                    and self.watch_proc.poll() is None and not self.compute.is_running()):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.fuse_proc.wait(WATCHDOG_GRACE_S)
            _terminate(self.fuse_proc, 30)
            detach(str(self.mountpoint))
            if self.watch_proc is not None:
                _terminate(self.watch_proc, 10)
        log.info("lazy compute in %s stopped", self.root)


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop in %ss after SIGTERM; killing it", proc.pid,
                        timeout_s)
            proc.kill()
            proc.wait(10)


def _spawn(argv: list[str], log_path: Path, stdin: int = subprocess.DEVNULL,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                stdin=stdin, start_new_session=True, env=env)


def _fuse_env(token: str | None) -> dict[str, str]:
    """The FUSE server's environment: this process's, with `$STRATA_AUTH_TOKEN` = `token`
    (None: as it is) and the libfuse that `fuse_unusable_reason` loaded, so that mfusepy
    does not search for one (the watchdog, which calls no service, gets no token)."""
    env = {**os.environ, FUSE_LIBRARY_ENV: _libfuse()}
    if token is not None:
        env[TOKEN_ENV] = token
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def spawn_lazyfs(host: str, pg_port: int, tenant_id: TenantId, timeline_id: TimelineId,
                 root: Path, options: LazyOptions | None = None) -> subprocess.Popen[bytes]:
    """Start the FUSE server of the lazy compute in `root` (created if absent), waiting
    for its start LSN on stdin: its Python start and imports (~0.2 s of CPU) overlap
    what its starter does before it knows the LSN (the sync step, the basebackup).
    Hand it to `prepare_lazy_compute`; closing its stdin makes it exit."""
    options = options or LazyOptions()
    root.mkdir(parents=True, exist_ok=True)
    # The data directory's skeleton is made meanwhile too (`_premake_datadir`).
    thread = threading.Thread(target=_premake_datadir, args=(root / "pgdata",),
                              name="premake-datadir", daemon=True)
    thread.start()
    _PREMADE[root] = thread
    args = ["mount", "--store", str(root / "lazy"), "--mountpoint", str(root / "mnt"),
            "--pageserver", f"{host}:{pg_port}", "--tenant", str(tenant_id),
            "--timeline", str(timeline_id),
            "--lease-s", str(options.lease_s),
            "--readahead", str(options.readahead_blocks),
            "--outage-wait-s", str(options.outage_wait_s), "--wait-stdin",
            *(["--pageserver-file", str(options.pageserver_file)]
              if options.pageserver_file is not None else []),
            *(["--prewarm-file", str(options.prewarm_file)]
              if options.prewarm_file is not None else [])]
    fuse_proc = _hand_early(args, root / "lazyfs.log", options.token)
    if fuse_proc is None:
        fuse_proc = _spawn([sys.executable, "-m", "strata.compute.lazyfs", *args],
                           root / "lazyfs.log", stdin=subprocess.PIPE,
                           env=_fuse_env(options.token))
    (root / FUSE_PID_FILE).write_text(f"{fuse_proc.pid}\n")
    return fuse_proc


def _hand_early(args: list[str], log_path: Path,
                token: str | None) -> subprocess.Popen[bytes] | None:
    """The FUSE server the CLI started first thing (`strata.compute.fuse_early`), handed
    its arguments, log file and token; None if there is none or it is gone."""
    proc = fuse_early.take()
    if proc is None:
        return None
    assert proc.stdin is not None
    line = json.dumps({"argv": args, "log": str(log_path),
                       "token": token if token is not None else os.environ.get(TOKEN_ENV)})
    try:
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
    except OSError:  # it died (BrokenPipeError): start one the usual way
        abandon_lazyfs(proc)
        return None
    return proc


def _spawn_watchdog(root: Path, fuse_pid: int) -> subprocess.Popen[bytes]:
    """The watchdog of the lazy compute in `root` (`strata.compute.lazyfs.watch`); it
    calls no service, so it gets no token."""
    watch_proc = _spawn([sys.executable, "-m", "strata.compute.lazyfs.watch",
                         "--fuse-pid", str(fuse_pid), "--datadir", str(root / "pgdata"),
                         "--mountpoint", str(root / "mnt")], root / "lazyfs-watch.log",
                        env={k: v for k, v in os.environ.items() if k != TOKEN_ENV})
    (root / WATCH_PID_FILE).write_text(f"{watch_proc.pid}\n")
    return watch_proc


_PREMADE: dict[Path, threading.Thread] = {}
"""Compute root -> the thread making its data directory's skeleton (joined before the
basebackup is unpacked there)."""


def _premake_datadir(datadir: Path) -> None:
    """Make the empty directories every basebackup has (`PGDATA_DIRS`) while the start
    waits for the sync step: on a disk busy with other work each directory made costs
    milliseconds (~25 of them), and the unpacking then finds them made. Errors are left
    to the unpacking, which makes what is missing."""
    try:
        datadir.mkdir(mode=0o700, exist_ok=True)
        for name in PGDATA_DIRS:
            (datadir / name).mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        log.warning("could not make %s ahead of the basebackup: %s", datadir, err)


def _join_premade(root: Path) -> None:
    thread = _PREMADE.pop(root, None)
    if thread is not None:
        thread.join()


def abandon_lazyfs(fuse_proc: subprocess.Popen[bytes]) -> None:
    """Stop a FUSE server of `spawn_lazyfs` that was not handed its LSN."""
    assert fuse_proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        fuse_proc.stdin.close()  # it exits at end of file
    _terminate(fuse_proc, 10)


def prepare_lazy_compute(host: str, pg_port: int, tenant_id: TenantId,
                         timeline_id: TimelineId, lsn: Lsn, root: Path,
                         config: ComputeConfig | None = None, *, compute_host: str = "127.0.0.1",
                         port: int | None = None, log_path: Path | None = None,
                         user: RunAs | None = None,
                         options: LazyOptions | None = None,
                         take_lease: Callable[[Lsn, float], object] | None = None,
                         fuse_proc: subprocess.Popen[bytes] | None = None) -> LazyCompute:
    """Everything of `start_lazy_compute` but starting PostgreSQL: lease, lazy basebackup,
    store, mount and watchdog. The caller may change the data directory (restore saved
    settings, set `compute.server.socket_dir`) and then calls `LazyCompute.start()`.
    `take_lease(lsn, seconds)` takes the first lease (the control plane's HTTP client
    does: no page client to import and run); None: a pagestream connection does.
    `fuse_proc`: the FUSE server, started earlier by `spawn_lazyfs` with the same
    arguments (None: started here)."""
    options = options or LazyOptions()
    reason = fuse_unusable_reason()
    if reason is not None:
        if fuse_proc is not None:
            abandon_lazyfs(fuse_proc)
        raise UserError(f"lazy mode is not usable on this host: {reason}; start the "
                        "endpoint in full mode")
    started = time.monotonic()
    phases: dict[str, float] = {}
    # The FUSE server (a Python process) starts first and waits for the LSN on its stdin:
    # its start overlaps the lease, the basebackup and the unpacking below.
    if fuse_proc is None:
        fuse_proc = spawn_lazyfs(host, pg_port, tenant_id, timeline_id, root, options)
    fuse_log = root / "lazyfs.log"
    assert fuse_proc.stdin is not None
    # The watchdog (a Python start, ~30 ms of CPU quiet) starts now, not once the file
    # system is mounted: its start overlaps the basebackup instead of PostgreSQL's. Until
    # the postmaster writes its pid file it only watches the FUSE server (if that exits,
    # so does the watchdog, detaching a mount if there is one).
    watch_proc = _spawn_watchdog(root, fuse_proc.pid)
    try:
        compute = _fill_store(host, pg_port, tenant_id, timeline_id, lsn, root, config,
                              options, phases, compute_host=compute_host, port=port,
                              log_path=log_path, user=user, take_lease=take_lease)
    except BaseException:
        abandon_lazyfs(fuse_proc)
        _terminate(watch_proc, 10)
        raise
    # If it died meanwhile, the wait for the mount below says so with its log.
    with contextlib.suppress(BrokenPipeError):
        fuse_proc.stdin.write(f"go {lsn}\n".encode())
        fuse_proc.stdin.close()
    filled = time.monotonic()
    mnt = root / "mnt"
    lazy = LazyCompute(root, compute, fuse_proc, watch_proc, lsn)
    try:
        deadline = time.monotonic() + options.mount_timeout_s
        while not os.path.ismount(mnt):
            if fuse_proc.poll() is not None:
                raise Unavailable(f"the lazy file system for {root} exited with "
                                  f"{fuse_proc.returncode} before mounting:\n{_tail(fuse_log)}")
            if time.monotonic() > deadline:
                raise Unavailable(f"the lazy file system for {root} did not mount within "
                                  f"{options.mount_timeout_s}s:\n{_tail(fuse_log)}")
            time.sleep(0.002)  # a stat per poll; the start waits for nothing else
        phases["mount"] = time.monotonic() - filled
    except BaseException:
        lazy.stop("immediate", timeout_s=20)
        raise
    lazy.phases = phases
    log.info("lazy file system for %s at %s ready in %.2fs (%s)", root, lsn,
             time.monotonic() - started,
             ", ".join(f"{name} {seconds:.2f}s" for name, seconds in phases.items()))
    return lazy


def _fill_store(host: str, pg_port: int, tenant_id: TenantId, timeline_id: TimelineId,
                lsn: Lsn, root: Path, config: ComputeConfig | None, options: LazyOptions,
                phases: dict[str, float], *, compute_host: str, port: int | None,
                log_path: Path | None, user: RunAs | None,
                take_lease: Callable[[Lsn, float], object] | None = None) -> Compute:
    """Lease, lazy basebackup, data directory in `root/pgdata` with base/ and global/
    moved into the store `root/lazy/tree` and symlinked into the mount point."""
    started = time.monotonic()
    # The lease comes first: GC must not pass `lsn` while the basebackup is fetched.
    if take_lease is not None:
        take_lease(lsn, options.lease_s)
    else:
        from strata.pageserver.page_client import PageClientSync

        with PageClientSync(host, pg_port, tenant_id, timeline_id) as client:
            client.lease(lsn, options.lease_s)
    phases["lease"] = time.monotonic() - started
    tar = io.BytesIO()  # small: a lazy basebackup has no relation files
    read_basebackup(host, pg_port, tenant_id, timeline_id, tar, lsn,
                    read_only=config.read_only if config else False, mode="lazy",
                    # pull mode: one slot per safekeeper (their names)
                    slots=config.quorum_standbys if config else ())
    tar.seek(0)
    fetched = time.monotonic()
    phases["fetch"] = fetched - started - phases["lease"]
    _join_premade(root)
    compute = Compute.from_basebackup(tar, root / "pgdata", config, host=compute_host,
                                      port=port, log_path=log_path or root / "postgres.log",
                                      user=user)
    datadir = compute.datadir
    owner = compute.server.user
    store, mnt = root / "lazy", root / "mnt"
    tree = store / TREE
    tree.mkdir(parents=True)
    os.chmod(tree, 0o700)
    os.chown(tree, owner.uid, owner.gid)
    mnt.mkdir(mode=0o755)
    manifest = datadir / MANIFEST_NAME
    if not manifest.is_file():
        raise UserError(f"the pageserver at {host}:{pg_port} sent a basebackup without "
                        f"{MANIFEST_NAME}: it does not support lazy mode; use full mode")
    compute.remember_control()  # before global/ is only reachable through the mount
    # The store may be another file system (a dedicated disk): move, do not rename.
    shutil.move(manifest, store / MANIFEST_NAME)
    for name in LAZY_DIRS:
        shutil.move(datadir / name, tree / name)
        os.symlink(mnt / name, datadir / name)
        os.lchown(datadir / name, owner.uid, owner.gid)
    chown_tree(tree, owner)
    phases["unpack"] = time.monotonic() - fetched
    return compute


def start_lazy_compute(host: str, pg_port: int, tenant_id: TenantId, timeline_id: TimelineId,
                       lsn: Lsn, root: Path, config: ComputeConfig | None = None, *,
                       compute_host: str = "127.0.0.1", port: int | None = None,
                       log_path: Path | None = None, user: RunAs | None = None,
                       options: LazyOptions | None = None,
                       timeout_s: float = 60) -> LazyCompute:
    """Start a lazy compute at `lsn` of a timeline in the (absent or empty) directory `root`.

    `host`/`pg_port` is the pageserver's PostgreSQL-protocol port. For a primary the caller
    has run compute_start (which gives `lsn`) and attaches the WAL receiver afterwards,
    exactly as for a full-mode compute; `config.read_only` starts a hot standby.
    """
    started = time.monotonic()
    lazy = prepare_lazy_compute(host, pg_port, tenant_id, timeline_id, lsn, root, config,
                                compute_host=compute_host, port=port, log_path=log_path,
                                user=user, options=options)
    lazy.start(timeout_s=timeout_s)
    log.info("lazy compute started in %s at %s in %.2fs", root, lsn,
             time.monotonic() - started)
    return lazy


def _pid_from(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _pid_alive(pid: int, cmdline_has: str) -> bool:
    """Whether `pid` runs and is ours: its command line names `cmdline_has`, or it is an
    early FUSE server (`strata.compute.fuse_early`, started before its root was known)
    whose output goes to a log file under `cmdline_has`."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if cmdline_has.encode() in cmdline:
        return True
    if not cmdline.endswith(b"\0-m\0strata.compute.lazyfs\0early\0"):
        return False
    try:
        return os.readlink(f"/proc/{pid}/fd/1").startswith(cmdline_has.rstrip("/") + "/")
    except OSError:
        return False


def cleanup_lazy_root(root: Path, *, remove: bool = False, timeout_s: float = 30) -> None:
    """After PostgreSQL of the lazy compute in `root` stopped (or crashed), from any
    process: stop its FUSE server and watchdog if they still run, detach the mount and,
    with `remove`, delete `root` (never descending into a live mount)."""
    mnt = root / "mnt"
    for name in (FUSE_PID_FILE, WATCH_PID_FILE):
        pid = _pid_from(root / name)
        if pid is None or not _pid_alive(pid, str(root)):
            continue
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _pid_alive(pid, str(root)):
            if time.monotonic() > deadline:
                log.warning("pid %d of the lazy compute in %s did not stop in %ss after "
                            "SIGTERM; killing it", pid, root, timeout_s)
                os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    detach(str(mnt))
    if remove and root.exists():
        if os.path.ismount(mnt):
            raise Unavailable(f"{mnt} is still mounted; refusing to delete {root}")
        shutil.rmtree(root)
