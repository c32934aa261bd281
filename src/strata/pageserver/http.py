"""The pageserver's HTTP management API (aiohttp), a thin layer over `server.Pageserver`.

    POST /v1/tenant                                  create (initdb + import as `main`)
    GET  /v1/tenant                                  list
    GET  /v1/tenant/{t}/timeline                     list timelines
    POST /v1/tenant/{t}/timeline                     branch: {ancestor_timeline_id,
                                                     ancestor_lsn | timestamp, new_timeline_id?}
    GET  /v1/tenant/{t}/timeline/{tl}                status
    GET  /v1/tenant/{t}/timeline/{tl}/get_lsn_by_timestamp?timestamp=ISO8601
    POST /v1/tenant/{t}/timeline/{tl}/compute_start  dev-mode sync: {lsn, prev_lsn}
    POST /v1/tenant/{t}/timeline/{tl}/wal_receiver   {host, port, slot, application_name}
    POST /v1/tenant/{t}/timeline/{tl}/safekeepers    {safekeepers: [{id, host, pg_port,
                                                     http_port}]}: follow them (D7)
    POST /v1/tenant/{t}/timeline/{tl}/checkpoint     freeze + flush

Errors are JSON `{"error": message}`: 400 for bad input, 404 for unknown ids, 409 for a
broken timeline, 503 for a timeout; an unexpected exception is logged and answered
with 500 and its message, never a traceback.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from strata.common.errors import CorruptionError, NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.server import Pageserver
from strata.pageserver.sk_receiver import SafekeeperEndpoint
from strata.pageserver.timeline_wal import ReceiverTarget
from strata.storage.tenant import TenantConfig
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEY = web.AppKey("pageserver", Pageserver)


def timeline_info(timeline: Timeline) -> dict[str, Any]:
    return {
        "tenant_id": str(timeline.tenant_id),
        "timeline_id": str(timeline.timeline_id),
        "last_record_lsn": str(timeline.last_record_lsn),
        "prev_record_lsn": str(timeline.prev_record_lsn),
        "disk_consistent_lsn": str(timeline.disk_consistent_lsn),
        "ancestor_timeline_id": str(timeline.ancestor.timeline_id)
        if timeline.ancestor is not None else None,
        "ancestor_lsn": str(timeline.ancestor_lsn) if timeline.ancestor is not None else None,
        "gc_cutoff": str(timeline.gc_cutoff),
        "initdb_lsn": str(timeline.initdb_lsn),
        "state": "Broken" if timeline.broken_reason is not None else "Active",
        "broken_reason": timeline.broken_reason,
    }


# --- request parsing (errors become 400s) -------------------------------------------------------
def _tenant_id(text: str) -> TenantId:
    return TenantId(TenantId.parse(text).raw)


def _timeline_id(text: str) -> TimelineId:
    return TimelineId(TimelineId.parse(text).raw)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise UserError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise UserError(f"request body lacks {name!r}")
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{name!r} must be a {kind.__name__}, got {value!r}")
    return value


def parse_timestamp_us(text: str) -> int:
    """ISO 8601 (naive means UTC) -> microseconds since the Unix epoch."""
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T", 1))
    except ValueError as err:
        raise UserError(f"invalid timestamp {text!r}: expected ISO 8601 such as "
                        "2026-01-02T03:04:05.123456+00:00") from err
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


# --- handlers ------------------------------------------------------------------------------------
async def create_tenant(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    body = await _body(request)
    tenant_text = _field(body, "tenant_id", str, required=False)
    conf_data = _field(body, "config", dict, required=False)
    conf = TenantConfig.from_dict({**ps.config.default_tenant_conf.to_dict(), **conf_data}) \
        if conf_data else None
    tenant, timeline = await ps.create_tenant(
        _tenant_id(tenant_text) if tenant_text else None, conf)
    return web.json_response({"tenant_id": str(tenant.tenant_id),
                              "timeline_id": str(timeline.timeline_id),
                              "timeline": timeline_info(timeline)}, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    return web.json_response([{"tenant_id": str(t)} for t in ps.repo.list_tenants()])


async def list_timelines(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant = ps.tenant(_tenant_id(request.match_info["tenant_id"]))
    return web.json_response([timeline_info(tenant.get_timeline(tid))
                              for tid in tenant.list_timelines()])


async def create_timeline(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id = _tenant_id(request.match_info["tenant_id"])
    body = await _body(request)
    ancestor = _timeline_id(_field(body, "ancestor_timeline_id", str))
    lsn_text = _field(body, "ancestor_lsn", str, required=False)
    ts_text = _field(body, "timestamp", str, required=False)
    new_text = _field(body, "new_timeline_id", str, required=False)
    timeline = await ps.branch(
        tenant_id, ancestor, lsn=Lsn.parse(lsn_text) if lsn_text else None,
        timestamp_us=parse_timestamp_us(ts_text) if ts_text else None,
        timeline_id=_timeline_id(new_text) if new_text else None)
    return web.json_response(timeline_info(timeline), status=201)


def _ids(request: web.Request) -> tuple[TenantId, TimelineId]:
    return (_tenant_id(request.match_info["tenant_id"]),
            _timeline_id(request.match_info["timeline_id"]))


async def get_timeline(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    return web.json_response(timeline_info(ps.timeline(*_ids(request))))


async def get_lsn_by_timestamp(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    timeline = ps.timeline(*_ids(request))
    text = request.query.get("timestamp")
    if text is None:
        raise UserError("query parameter 'timestamp' (ISO 8601) is required")
    lsn = timeline.find_lsn_for_timestamp(parse_timestamp_us(text))
    return web.json_response({"lsn": str(lsn)})


async def compute_start(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    lsn, prev = await ps.compute_start(*_ids(request))
    return web.json_response({"lsn": str(lsn), "prev_lsn": str(prev)})


async def wal_receiver(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    body = await _body(request)
    target = ReceiverTarget(host=_field(body, "host", str), port=_field(body, "port", int),
                            slot=_field(body, "slot", str),
                            application_name=_field(body, "application_name", str),
                            user=_field(body, "user", str, required=False) or "postgres")
    target.receiver_config()  # validates the slot name
    await ps.attach_receiver(tenant_id, timeline_id, target)
    return web.json_response({"attached": True})


async def safekeepers(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    body = await _body(request)
    items = body.get("safekeepers")
    if not isinstance(items, list) or not items:
        raise UserError("body field 'safekeepers' must be a non-empty list of "
                        "{id, host, pg_port, http_port}")
    endpoints = tuple(SafekeeperEndpoint.from_json(item) if isinstance(item, dict)
                      else SafekeeperEndpoint.from_json({}) for item in items)
    await ps.follow_safekeepers(tenant_id, timeline_id, endpoints)
    return web.json_response({"following": [e.node_id for e in endpoints]})


async def checkpoint(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    timeline = await ps.checkpoint(*_ids(request))
    return web.json_response(timeline_info(timeline))


# --- errors ------------------------------------------------------------------------------------
def _status_for(err: StrataError) -> int:
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Unavailable):
        return 503
    if isinstance(err, CorruptionError):
        return 409  # the timeline is broken (TimelineBroken) or its files fail checks
    return 400


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except StrataError as err:
        status = _status_for(err)
        log.info("%s %s -> %d: %s", request.method, request.path, status, err)
        return web.json_response({"error": str(err)}, status=status)
    except Exception as err:  # noqa: BLE001 - the API answers, the log has the traceback
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(err).__name__}: {err}"},
                                 status=500)


def make_app(pageserver: Pageserver) -> web.Application:
    app = web.Application(middlewares=[error_middleware])
    app[_KEY] = pageserver
    tl = "/v1/tenant/{tenant_id}/timeline/{timeline_id}"
    app.add_routes([
        web.post("/v1/tenant", create_tenant),
        web.get("/v1/tenant", list_tenants),
        web.get("/v1/tenant/{tenant_id}/timeline", list_timelines),
        web.post("/v1/tenant/{tenant_id}/timeline", create_timeline),
        web.get(tl, get_timeline),
        web.get(tl + "/get_lsn_by_timestamp", get_lsn_by_timestamp),
        web.post(tl + "/compute_start", compute_start),
        web.post(tl + "/wal_receiver", wal_receiver),
        web.post(tl + "/safekeepers", safekeepers),
        web.post(tl + "/checkpoint", checkpoint),
    ])
    return app


async def start_http(pageserver: Pageserver, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the API on host:port (0: a free port); returns the runner and the bound port."""
    runner = web.AppRunner(make_app(pageserver), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses  # the bound (host, port) of each listening socket
    assert addresses, "HTTP site did not bind"
    return runner, int(addresses[0][1])
