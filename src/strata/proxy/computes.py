"""Wake and suspend: the computes behind the proxy, their client connections, and the
starts and stops the proxy makes (scale to zero).

- A client connection to a stopped endpoint starts it (the control plane's own start
  flow, `strata.control.endpoints.start_endpoint`, in a worker thread); connections that
  arrive meanwhile wait for the same start. A failed start is an error for each of them.
- An endpoint that the proxy served (woke, or relayed a connection to) and that has had
  no client connection through the proxy for its `suspend_timeout_s` (0 = never) is
  stopped cleanly, as `strata endpoint stop` would. An endpoint only ever used directly
  is left alone.
- `run/proxy-status.json` says, for `strata status`, each endpoint's connection count
  and whether it is starting or stopping (rewritten atomically on every change).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strata.common.errors import StrataError, Unavailable, UserError
from strata.compute.postmaster_files import PID_FILE, STATUS_READY, PostmasterPid
from strata.control.endpoints import endpoint_paths, running_pid, start_endpoint, stop_endpoint
from strata.control.env import Environment
from strata.control.services import (
    pageserver_client,
    pageserver_responds,
    tenant_pageserver_id,
)
from strata.proxy.state_cache import StateCache

log = logging.getLogger(__name__)

STATUS_FILE = "proxy-status.json"
SUSPEND_CHECK_INTERVAL_S = 0.5
ACCEPTING_POLL_S = 0.01
"""During a start, how often the proxy looks whether PostgreSQL accepts connections."""
BUSY_WAIT_S = 120.0  # another `strata` command starting/stopping the endpoint


@dataclass(frozen=True, slots=True)
class ComputeAddress:
    """Where the proxy reaches a running compute: its unix socket (only the proxy and
    Strata's own processes use it; the application role logs in there)."""

    socket_path: str


@dataclass
class _Endpoint:
    connections: int = 0
    served: bool = False
    idle_since: float = 0.0
    starting: asyncio.Future[None] | None = None
    stopping: asyncio.Future[None] | None = None
    accepting: asyncio.Future[str | None] | None = None
    """While starting: the compute's socket once PostgreSQL accepts connections (None if
    the start ended first), for the early login of the connections that wait."""
    checked: asyncio.Future[None] | None = None
    """While starting: done once the start is past its checks (the walproposer, the
    application role), in its last step (the proxy's roles), see `wake`."""
    last_start: asyncio.Future[None] | None = None
    """The latest start (kept once done: `finish_start` gives its outcome)."""


def normal_priority() -> None:
    """(A worker thread) back to nice 0 (from the proxy's, strata.proxy.main.PROXY_NICE),
    so that the processes a start or stop runs (PostgreSQL, its helpers) inherit nice 0."""
    if os.getpriority(os.PRIO_PROCESS, 0) < 0:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # this thread only (raising nice needs no right)


class Computes:
    """The endpoints of one environment as the proxy sees them (one asyncio loop)."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self.state = StateCache(env)
        self._endpoints: dict[str, _Endpoint] = {}
        self._status_path = env.run_dir / STATUS_FILE

    def _get(self, name: str) -> _Endpoint:
        return self._endpoints.setdefault(name, _Endpoint(idle_since=time.monotonic()))

    # --- connections -------------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """A client connection to `name` begins (before waking it: no suspend meanwhile)."""
        ep = self._get(name)
        ep.connections += 1
        ep.served = True
        self._write_status()

    def release(self, name: str) -> None:
        ep = self._get(name)
        assert ep.connections > 0, (name, ep.connections)
        ep.connections -= 1
        if ep.connections == 0:
            ep.idle_since = time.monotonic()
        self._write_status()

    def connections(self, name: str) -> int:
        return self._get(name).connections

    # --- wake ----------------------------------------------------------------------------
    async def wake(self, name: str, on_start: Callable[[], object] | None = None, *,
                   until_checked: bool = False) -> tuple[ComputeAddress, bool, bool]:
        """The running compute of endpoint `name`, started if it is stopped, whether this
        caller waited for a start (`on_start` is called when it begins to wait), and
        whether that start has ended; concurrent callers share one start. With
        `until_checked`, return as soon as the start is past its checks, in its last
        step (the proxy's roles; then `finish_start` waits for the rest). (No await
        between looking and starting: two callers never both start it.)"""
        ep = self._get(name)
        while ep.stopping is not None:
            await asyncio.shield(ep.stopping)
        if ep.starting is None:
            address = self._address_if_running(name)
            if address is not None:
                return address, False, True
            loop = asyncio.get_running_loop()
            checked: asyncio.Future[None] = loop.create_future()
            starting = asyncio.ensure_future(asyncio.to_thread(
                self._start, name,
                lambda: loop.call_soon_threadsafe(_set_result, checked)))
            ep.starting = ep.last_start = starting
            ep.checked = checked
            ep.accepting = asyncio.ensure_future(
                self._poll_accepting(name, starting, time.time() - 1))
            starting.add_done_callback(lambda f: self._start_done(ep, name, f))
            self._write_status()
        if on_start is not None:
            on_start()
        running, past_checks = ep.starting, ep.checked
        assert running is not None and past_checks is not None
        if until_checked:  # (asyncio.wait cancels neither, even when this is cancelled)
            await asyncio.wait([running, past_checks], return_when=asyncio.FIRST_COMPLETED)
        if not until_checked or running.done():
            await asyncio.shield(running)
        address = self._address_if_running(name)
        if address is None:
            raise Unavailable(f"endpoint {name} stopped right after it started; see its log")
        return address, True, running.done()

    def start_ended(self, name: str) -> bool:
        return self._get(name).starting is None

    async def finish_start(self, name: str) -> ComputeAddress:
        """(After `wake(until_checked=True)` returned before its start ended) the compute
        once that start has ended; the start's error if it failed."""
        ep = self._get(name)
        if ep.last_start is not None:
            await asyncio.shield(ep.last_start)
        address = self._address_if_running(name)
        if address is None:
            raise Unavailable(f"endpoint {name} stopped right after it started; see its log")
        return address

    def _start_done(self, ep: _Endpoint, name: str, starting: asyncio.Future[None]) -> None:
        ep.starting = None
        ep.accepting = None  # (ends by itself)
        ep.checked = None
        # Retrieved here too: the connections relayed before its end do not await it.
        if not starting.cancelled() and starting.exception() is not None:
            log.info("the start of endpoint %s failed: %s", name,
                     str(starting.exception()).splitlines()[0]
                     if str(starting.exception()) else repr(starting.exception()))
        self._write_status()

    def _address_if_running(self, name: str) -> ComputeAddress | None:
        if running_pid(self.env, name) is None:
            return None
        ep = self.state.get().endpoint(name)
        socket_dir = endpoint_paths(self.env, name).socket_dir
        return ComputeAddress(str(socket_dir / f".s.PGSQL.{ep.port}"))

    def running_socket(self, name: str) -> str | None:
        """The unix socket of `name`'s compute if it runs and is neither starting nor
        stopping, else None (also for a name the environment does not have: no entry is
        made for it)."""
        ep = self._endpoints.get(name)
        if ep is not None and (ep.starting is not None or ep.stopping is not None):
            return None
        try:
            if name not in self.state.get().endpoints:
                return None
            address = self._address_if_running(name)
        except (StrataError, OSError, ValueError):
            return None
        return None if address is None else address.socket_path

    def accepting(self, name: str) -> asyncio.Future[str | None] | None:
        """While `name` starts: its compute's unix socket once PostgreSQL accepts
        connections (the start may still be in its last phases: the walproposer check,
        the roles), or None if the start ended first."""
        return self._get(name).accepting

    async def _poll_accepting(self, name: str, starting: asyncio.Future[None],
                              since: float) -> str | None:
        """One poll per start, shared by the connections that wait for it."""
        while not starting.done():
            try:
                socket_path = self.ready_socket(name, since)
            except (StrataError, OSError, ValueError):
                return None
            if socket_path is not None:
                return socket_path
            await asyncio.sleep(ACCEPTING_POLL_S)
        return None

    def ready_socket(self, name: str, since: float) -> str | None:
        """The unix socket of `name`'s PostgreSQL once its postmaster.pid, written at or
        after `since` (time.time()), says it accepts connections, while a start may still
        be in its last phases (the walproposer check, the roles); else None."""
        pid_file = endpoint_paths(self.env, name).datadir / PID_FILE
        try:
            if pid_file.stat().st_mtime < since:
                return None  # the last run's
        except FileNotFoundError:
            return None
        pm = PostmasterPid.read(pid_file.parent)
        if pm is None or pm.status != STATUS_READY:
            return None
        ep = self.state.get().endpoints.get(name)
        if ep is None:
            return None
        return str(endpoint_paths(self.env, name).socket_dir / f".s.PGSQL.{ep.port}")

    def _start(self, name: str, on_checked: Callable[[], object]) -> None:
        """Worker thread: the control plane's start flow; `on_checked` is called once it
        begins its last step (the proxy's roles: `start_endpoint`'s `on_checked`)."""
        normal_priority()
        started = time.monotonic()
        state = self.env.read_state()
        ep = state.endpoint(name)
        log.info("waking endpoint %s (branch %s)", name, ep.branch)
        phases = ""

        def past_checks() -> None:
            log.info("endpoint %s is past its start's checks (%.2fs): clients logged "
                     "in early are relayed", name, time.monotonic() - started)
            on_checked()

        try:
            result = start_endpoint(self.env, self.env.config(), ep,
                                    state.timeline_id(ep.tenant_id, ep.branch),
                                    on_checked=past_checks)
            phases = ", ".join(f"{k} {v:.2f}s" for k, v in result.phases.items()
                               if "." not in k)
        except UserError as err:
            if "another strata command" not in str(err):
                raise
            # A `strata endpoint start/stop` runs now: wait for it to finish.
            self._wait_not_busy(name)
            if running_pid(self.env, name) is None:
                raise
        log.info("woke endpoint %s in %.2fs (%s)", name, time.monotonic() - started,
                 phases or "started by another strata command")

    def _wait_not_busy(self, name: str) -> None:
        deadline = time.monotonic() + BUSY_WAIT_S
        lock = self.env.run_dir / f"endpoint-{name}.lock"
        while time.monotonic() < deadline:
            with open(lock, "a") as f:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    time.sleep(0.1)
                    continue
                return
        raise Unavailable(f"endpoint {name} was busy (another strata command) for "
                          f"{BUSY_WAIT_S:.0f}s")

    # --- suspend -------------------------------------------------------------------------
    async def suspend_loop(self) -> None:
        """Forever: stop endpoints idle for their suspend_timeout_s."""
        while True:
            await asyncio.sleep(SUSPEND_CHECK_INTERVAL_S)
            try:
                timeouts = {name: ep.suspend_timeout_s
                            for name, ep in self.state.get().endpoints.items()}
            except (StrataError, OSError, ValueError) as err:
                log.warning("cannot read the environment's state: %s", err)
                continue
            now = time.monotonic()
            for name, ep in list(self._endpoints.items()):
                timeout_s = timeouts.get(name)
                if timeout_s is None or timeout_s <= 0 or not ep.served:
                    continue
                if ep.connections or ep.starting or ep.stopping:
                    continue
                if now - ep.idle_since < timeout_s:
                    continue
                await self._suspend(name, ep, timeout_s)

    async def _suspend(self, name: str, ep: _Endpoint, timeout_s: float) -> None:
        ep.stopping = asyncio.ensure_future(asyncio.to_thread(self._stop, name, timeout_s))
        self._write_status()
        try:
            await asyncio.shield(ep.stopping)
        except StrataError as err:
            log.warning("suspending endpoint %s failed: %s", name, err)
        finally:
            ep.stopping = None
            ep.served = False  # until the next client connection
            self._write_status()

    def _stop(self, name: str, timeout_s: float) -> None:
        normal_priority()
        if running_pid(self.env, name) is None:
            return
        state = self.env.read_state()
        ep = state.endpoint(name)
        log.info("suspending endpoint %s: no client connection for %ss", name, timeout_s)
        config = self.env.config()
        ps_id = tenant_pageserver_id(self.env, ep.tenant_id)
        client = pageserver_client(config, timeout_s=30, ps_id=ps_id)
        stop_endpoint(self.env, ep, state.timeline_id(ep.tenant_id, ep.branch),
                      client=client if pageserver_responds(client) else None)
        log.info("suspended endpoint %s", name)

    # --- status --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "endpoints": {
            name: {"connections": ep.connections,
                   "activity": "starting" if ep.starting else
                   "stopping" if ep.stopping else None}
            for name, ep in self._endpoints.items()}}

    def _write_status(self) -> None:
        write_status_file(self._status_path, self.status())


def write_status_file(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_status_file(env: Environment) -> dict[str, Any] | None:
    try:
        data = json.loads((env.run_dir / STATUS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
