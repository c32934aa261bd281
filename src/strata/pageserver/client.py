"""A small client of the pageserver for tests and the CLI: its HTTP API and its basebackup.

`PageserverClient` is synchronous (`strata.common.httpjson`, for tests and the CLI);
`AsyncPageserverClient` is the same API over aiohttp (a new session per request, or the
caller's kept-alive one). `read_basebackup` (blocking, `strata.pg.blockingclient`: the
CLI's start path imports neither asyncio nor `strata.pg.wire`, nor urllib and
http.client) and `fetch_basebackup` (asyncio, `strata.pg.pgclient`) read the CopyOut tar
stream of
`basebackup <tenant> <timeline> [lsn]` over the PostgreSQL-protocol port. With `token`
(default: `$STRATA_AUTH_TOKEN`) every request carries it (a Bearer header on HTTP, the
password on the pg port; strata.common.auth). An error
answer becomes the Strata error of its HTTP status (404 NotFound, 409 CorruptionError,
503 Unavailable, else UserError) with the server's message.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from strata.common import httpjson
from strata.common.auth import AuthError, Forbidden, auth_headers, default_token
from strata.common.errors import (
    CorruptionError,
    NotFound,
    ProtocolError,
    StrataError,
    Unavailable,
    UserError,
)
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.api import LeaseInfo, TimelineInfo
from strata.pg.blockingclient import BlockingPgConnection

if TYPE_CHECKING:
    import aiohttp

    from strata.pg.pgclient import PgConnection


def error_for(status: int, message: str, kind: str | None = None) -> StrataError:
    """The Strata error of an HTTP error answer (`kind` is the body's error class name)."""
    if status == 401:
        return AuthError(f"{message}; set $STRATA_AUTH_TOKEN (`strata auth token`)")
    if status == 403:
        return Forbidden(message)
    if status == 404:
        return NotFound(message)
    if status == 409:
        # 409 is a conflict with the current state (a UserError) or a broken timeline.
        return UserError(message) if kind == "Conflict" else CorruptionError(message)
    if status == 503:
        return Unavailable(message)
    return UserError(message)


def _error_text(text: str) -> tuple[str, str | None]:
    try:
        data = json.loads(text)
        return str(data["error"]), data.get("kind")
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, None


def _branch_body(ancestor: TimelineId, lsn: Lsn | None, timestamp: str | None,
                 new_timeline_id: TimelineId | None) -> dict[str, Any]:
    body: dict[str, Any] = {"ancestor_timeline_id": str(ancestor)}
    if lsn is not None:
        body["ancestor_lsn"] = str(lsn)
    if timestamp is not None:
        body["timestamp"] = timestamp
    if new_timeline_id is not None:
        body["new_timeline_id"] = str(new_timeline_id)
    return body


class _Client:
    """Where one pageserver answers, and with which token."""

    def __init__(self, host: str, http_port: int, pg_port: int, timeout_s: float = 120, *,
                 token: str | None = None) -> None:
        self.host = host
        self.http_port = http_port
        self.pg_port = pg_port
        self.timeout_s = timeout_s
        self.token = token if token is not None else default_token()


class PageserverClient(_Client):
    """Synchronous HTTP client of one pageserver."""

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        answer = self._call(method, path, data, {"Content-Type": "application/json"})
        return json.loads(answer or b"null")

    def _call(self, method: str, path: str, data: bytes | None = None,
              headers: dict[str, str] | None = None) -> bytes:
        """One HTTP request: the body of a success, else the Strata error of its status."""
        try:
            resp = httpjson.request(self.host, self.http_port, method, path, body=data,
                                    headers={**(headers or {}), **auth_headers(self.token)},
                                    timeout_s=self.timeout_s)
        except (OSError, httpjson.HttpProtocolError) as err:
            raise self._unavailable(method, path, err) from err
        if resp.status >= 400:
            message, kind = _error_text(resp.body.decode(errors="replace"))
            raise error_for(resp.status, f"{method} {path}: {message}", kind)
        return resp.body

    def _unavailable(self, method: str, path: str, err: BaseException) -> Unavailable:
        """No answer: refused, hung (TimeoutError), died mid-answer (RemoteDisconnected,
        a reset) or a garbled answer (BadStatusLine, BadResponse)."""
        what = f"no answer within {self.timeout_s:g}s" \
            if isinstance(err, TimeoutError) else f"{type(err).__name__}: {err}"
        return Unavailable(f"the pageserver at {self.host}:{self.http_port} did not answer "
                           f"{method} {path} ({what}); check that it runs (`strata status`) "
                           "and its log")

    def create_tenant(self, tenant_id: TenantId | None = None,
                      config: dict[str, Any] | None = None,
                      generation: int | None = None,
                      import_datadir: str | None = None) -> tuple[TenantId, TimelineId]:
        body: dict[str, Any] = {}
        if import_datadir is not None:
            body["import_datadir"] = import_datadir
        if tenant_id is not None:
            body["tenant_id"] = str(tenant_id)
        if generation is not None:
            body["generation"] = generation
        if config:
            body["config"] = config
        out = self.request("POST", "/v1/tenant", body)
        return (TenantId(TenantId.parse(out["tenant_id"]).raw),
                TimelineId(TimelineId.parse(out["timeline_id"]).raw))

    def list_tenants(self) -> list[TenantId]:
        return [TenantId(TenantId.parse(t["tenant_id"]).raw)
                for t in self.request("GET", "/v1/tenant")]

    def list_timelines(self, tenant_id: TenantId) -> list[TimelineInfo]:
        return [TimelineInfo.from_json(t)
                for t in self.request("GET", f"/v1/tenant/{tenant_id}/timeline")]

    def timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> TimelineInfo:
        return TimelineInfo.from_json(
            self.request("GET", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}"))

    def branch(self, tenant_id: TenantId, ancestor: TimelineId, *, lsn: Lsn | None = None,
               timestamp: str | None = None,
               new_timeline_id: TimelineId | None = None) -> TimelineInfo:
        return TimelineInfo.from_json(self.request(
            "POST", f"/v1/tenant/{tenant_id}/timeline",
            _branch_body(ancestor, lsn, timestamp, new_timeline_id)))

    def lsn_by_timestamp(self, tenant_id: TenantId, timeline_id: TimelineId,
                         timestamp: str) -> Lsn:
        query = urllib.parse.urlencode({"timestamp": timestamp})
        out = self.request("GET", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/"
                                  f"get_lsn_by_timestamp?{query}")
        return Lsn.parse(out["lsn"])

    def compute_start(self, tenant_id: TenantId, timeline_id: TimelineId) -> tuple[Lsn, Lsn]:
        out = self.request("POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/"
                                   "compute_start", {})
        return Lsn.parse(out["lsn"]), Lsn.parse(out["prev_lsn"])

    def attach_receiver(self, tenant_id: TenantId, timeline_id: TimelineId, *, host: str,
                        port: int, slot: str, application_name: str) -> None:
        self.request("POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/wal_receiver",
                     {"host": host, "port": port, "slot": slot,
                      "application_name": application_name})

    def follow_safekeepers(self, tenant_id: TenantId, timeline_id: TimelineId,
                           safekeepers: list[dict[str, Any]]) -> None:
        """Take the timeline's WAL from these safekeepers ({id, host, pg_port, http_port})."""
        self.request("POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/safekeepers",
                     {"safekeepers": safekeepers})

    def checkpoint(self, tenant_id: TenantId, timeline_id: TimelineId) -> TimelineInfo:
        return TimelineInfo.from_json(self.request(
            "POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/checkpoint", {}))

    # --- tenants, maintenance, leases, service ------------------------------------------------
    def tenant(self, tenant_id: TenantId) -> dict[str, Any]:
        """{tenant_id, timelines (count), config}."""
        out: dict[str, Any] = self.request("GET", f"/v1/tenant/{tenant_id}")
        return out

    def delete_tenant(self, tenant_id: TenantId) -> None:
        self.request("DELETE", f"/v1/tenant/{tenant_id}")

    def attach_tenant(self, tenant_id: TenantId, generation: int,
                      config: dict[str, Any] | None = None) -> list[TimelineInfo]:
        """Make the tenant local from remote storage under `generation` (greater than any
        it was attached with before); returns its timelines."""
        body: dict[str, Any] = {"generation": generation}
        if config:
            body["config"] = config
        out = self.request("POST", f"/v1/tenant/{tenant_id}/attach", body)
        return [TimelineInfo.from_json(t) for t in out["timelines"]]

    def tenant_size(self, tenant_id: TenantId) -> dict[str, Any]:
        """{tenant_id, local_bytes, remote_bytes (None without remote storage), timelines:
        [{timeline_id, local_bytes, remote_bytes}]}."""
        out: dict[str, Any] = self.request("GET", f"/v1/tenant/{tenant_id}/size")
        return out

    def detach_tenant(self, tenant_id: TenantId) -> None:
        """Upload what is not remote yet, then drop the tenant's local files."""
        self.request("POST", f"/v1/tenant/{tenant_id}/detach", {})

    def tenant_config(self, tenant_id: TenantId) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", f"/v1/tenant/{tenant_id}/config")
        return out

    def set_tenant_config(self, tenant_id: TenantId, changes: dict[str, Any]) -> dict[str, Any]:
        """Change the given keys (the others keep their values); returns the new config."""
        out: dict[str, Any] = self.request("PUT", f"/v1/tenant/{tenant_id}/config", changes)
        return out

    def delete_timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> None:
        """UserError (HTTP 409) while the timeline has branches."""
        self.request("DELETE", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}")

    def compact(self, tenant_id: TenantId, timeline_id: TimelineId) -> int:
        """Run compaction now; returns the number of image layers written."""
        out = self.request("POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/compact",
                           {})
        return int(out["image_layers_created"])

    def gc(self, tenant_id: TenantId) -> dict[TimelineId, dict[str, Any]]:
        """Run GC of the tenant now: per timeline {cutoff, layers_removed, expired_leases}."""
        out = self.request("POST", f"/v1/tenant/{tenant_id}/gc", {})
        return {TimelineId(TimelineId.parse(k).raw): v for k, v in out.items()}

    def lease(self, tenant_id: TenantId, timeline_id: TimelineId, lsn: Lsn,
              duration_s: float | None = None) -> LeaseInfo:
        """Acquire or renew an LSN lease (default length: the tenant's lease_length_s)."""
        body: dict[str, Any] = {"lsn": str(lsn)}
        if duration_s is not None:
            body["duration_s"] = duration_s
        return LeaseInfo.from_json(self.request(
            "POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/lsn_lease", body))

    def get_lease(self, tenant_id: TenantId, timeline_id: TimelineId, lsn: Lsn) -> LeaseInfo:
        """The live lease on `lsn`; NotFound once it has expired."""
        query = urllib.parse.urlencode({"lsn": str(lsn)})
        return LeaseInfo.from_json(self.request(
            "GET", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/lsn_lease?{query}"))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = self.request("GET", "/v1/status")
        return out

    def metrics_text(self) -> str:
        """The Prometheus text of GET /metrics."""
        return self._call("GET", "/metrics").decode()

    def basebackup(self, tenant_id: TenantId, timeline_id: TimelineId, out: BinaryIO,
                   lsn: Lsn | None = None, *, read_only: bool = False,
                   mode: str = "full", slots: Sequence[str] = ()) -> int:
        """Write the tar stream to `out`; returns its size in bytes."""
        return read_basebackup(self.host, self.pg_port, tenant_id, timeline_id, out, lsn,
                               read_only=read_only, mode=mode, timeout_s=self.timeout_s,
                               token=self.token, slots=slots)


class AsyncPageserverClient(_Client):
    """The same HTTP API over aiohttp (for code already on an event loop).

    With `session`, every request goes over that `aiohttp.ClientSession` (the caller's, which
    it closes; its kept-alive connection saves a TCP connect and close per request, e.g. the
    walproposer's pageserver polls); without, each request opens and closes its own."""

    def __init__(self, host: str, http_port: int, pg_port: int, timeout_s: float = 120, *,
                 token: str | None = None, session: aiohttp.ClientSession | None = None) -> None:
        super().__init__(host, http_port, pg_port, timeout_s, token=token)
        self.session = session

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        # Imported here: aiohttp takes ~0.2 s to import, and the CLI uses the sync client.
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with contextlib.AsyncExitStack() as stack:
                session = self.session
                if session is None:
                    session = await stack.enter_async_context(
                        aiohttp.ClientSession(timeout=timeout))
                resp = await stack.enter_async_context(session.request(
                    method, f"http://{self.host}:{self.http_port}{path}", json=body,
                    headers=auth_headers(self.token), timeout=timeout))
                text = await resp.text()
                if resp.status >= 400:
                    message, kind = _error_text(text)
                    raise error_for(resp.status, f"{method} {path}: {message}", kind)
                return json.loads(text or "null")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise Unavailable(f"pageserver at {self.host}:{self.http_port}: {err}") from err

    async def timeline(self, tenant_id: TenantId, timeline_id: TimelineId, *,
                       logical_size: bool = True) -> TimelineInfo:
        """The timeline's detail; `logical_size=False` skips its size (a sum over every
        relation) for callers that want the LSNs only."""
        query = "" if logical_size else "?logical_size=false"
        return TimelineInfo.from_json(
            await self.request("GET", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}{query}"))

    async def compute_start(self, tenant_id: TenantId,
                            timeline_id: TimelineId) -> tuple[Lsn, Lsn]:
        out = await self.request("POST", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}/"
                                         "compute_start", {})
        return Lsn.parse(out["lsn"]), Lsn.parse(out["prev_lsn"])

    async def branch(self, tenant_id: TenantId, ancestor: TimelineId, *,
                     lsn: Lsn | None = None, timestamp: str | None = None,
                     new_timeline_id: TimelineId | None = None) -> TimelineInfo:
        return TimelineInfo.from_json(await self.request(
            "POST", f"/v1/tenant/{tenant_id}/timeline",
            _branch_body(ancestor, lsn, timestamp, new_timeline_id)))

    async def basebackup(self, tenant_id: TenantId, timeline_id: TimelineId, out: BinaryIO,
                         lsn: Lsn | None = None, *, read_only: bool = False) -> int:
        return await fetch_basebackup(self.host, self.pg_port, tenant_id, timeline_id, out,
                                      lsn, read_only=read_only, timeout_s=self.timeout_s,
                                      token=self.token)


def _basebackup_command(tenant_id: TenantId, timeline_id: TimelineId, lsn: Lsn | None,
                        read_only: bool, mode: str, slots: Sequence[str]) -> str:
    command = f"basebackup {tenant_id} {timeline_id}"
    if lsn is not None:
        command += f" {lsn}"
    if read_only:
        command += " read_only"
    if mode == "lazy":
        command += " lazy"
    if slots:
        command += " slots=" + ",".join(slots)
    return command


def read_basebackup(host: str, port: int, tenant_id: TenantId, timeline_id: TimelineId,
                    out: BinaryIO, lsn: Lsn | None = None, *, read_only: bool = False,
                    mode: str = "full", timeout_s: float = 120, token: str | None = None,
                    slots: Sequence[str] = ()) -> int:
    """Run `basebackup` on the pageserver's PG port and write the tar to `out`, within
    `timeout_s` (`mode` 'lazy': without relation files, with their list, see
    basebackup.py; `token` None: `$STRATA_AUTH_TOKEN`; `slots`: the primary's physical
    slots, default the walproposer's; pull mode's are `sk1..skN`). Blocking; returns the
    tar's size in bytes."""
    command = _basebackup_command(tenant_id, timeline_id, lsn, read_only, mode, slots)
    deadline = time.monotonic() + timeout_s
    conn = BlockingPgConnection.connect(host, port, user="strata", timeout_s=timeout_s,
                                        password=token or default_token())
    try:
        return conn.copy_out(command, out, deadline)
    finally:
        conn.close()


async def fetch_basebackup(host: str, port: int, tenant_id: TenantId, timeline_id: TimelineId,
                           out: BinaryIO, lsn: Lsn | None = None, *, read_only: bool = False,
                           mode: str = "full", timeout_s: float = 120,
                           token: str | None = None, slots: Sequence[str] = ()) -> int:
    """`read_basebackup` on an event loop (`strata.pg.pgclient`)."""
    import asyncio

    from strata.pg.pgclient import PgConnection

    command = _basebackup_command(tenant_id, timeline_id, lsn, read_only, mode, slots)
    async with asyncio.timeout(timeout_s):
        conn = await PgConnection.connect(host, port, user="strata", timeout_s=timeout_s,
                                          password=token or default_token())
        try:
            return await _read_copy_out(conn, command, out)
        finally:
            await conn.close()


async def _read_copy_out(conn: PgConnection, command: str, out: BinaryIO) -> int:
    # pgclient has no CopyOut reader; the message loop is short enough to have here.
    from strata.pg import wire
    from strata.pg.pgclient import ServerError

    await conn._send(wire.Query(command).encode())
    size = 0
    error: wire.ErrorResponse | None = None
    while True:
        msg = await conn._receive()
        match msg:
            case wire.CopyOutResponse() | wire.CopyDone() | wire.CommandComplete():
                pass
            case wire.CopyData(data=data):
                out.write(data)
                size += len(data)
            case wire.ErrorResponse():
                error = msg
            case wire.NoticeResponse() | wire.ParameterStatus():
                pass
            case wire.ReadyForQuery():
                if error is not None:
                    err = ServerError(error, f"{command!r} on {conn.describe}")
                    raise (CorruptionError(str(err)) if error.code == "XX001" else err)
                return size
            case _:
                raise ProtocolError(f"{conn.describe}: unexpected {type(msg).__name__} in the "
                                    f"reply to {command!r}")
