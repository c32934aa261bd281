"""The pageserver's HTTP management API (aiohttp), a thin layer over `server.Pageserver`.

The routes, their bodies and every status they answer are described by the OpenAPI
document `openapi.json` next to this module, served at `GET /v1/openapi.json`
(tests/integration/test_mgmt_api.py checks the two against each other). In short:

    GET    /v1/status, /metrics (Prometheus text), /v1/openapi.json
    POST   /v1/tenant                          create (initdb, or import_datadir, as `main`)
    GET    /v1/tenant                          list
    GET    /v1/tenant/{t}                      detail;  DELETE: delete
    GET    /v1/tenant/{t}/size                 layer bytes: local and remote
    GET    /v1/tenant/{t}/config               PUT: set (partial, merged; validated)
    POST   /v1/tenant/{t}/gc                   GC now
    GET    /v1/tenant/{t}/timeline             list;  POST: branch at an LSN or timestamp
    GET    /v1/tenant/{t}/timeline/{tl}        detail (LSNs, ancestor, logical size)
    DELETE /v1/tenant/{t}/timeline/{tl}        refused (409) while branches exist
    GET    .../{tl}/get_lsn_by_timestamp?timestamp=ISO8601
    POST   .../{tl}/checkpoint, compact, compute_start, wal_receiver, safekeepers
    POST   .../{tl}/lsn_lease {lsn, duration_s?}; GET .../{tl}/lsn_lease?lsn=X

With `auth_public_key_path` set, every route but /metrics needs a JWT
(`Authorization: Bearer`, strata.common.http_auth): 401 without a valid one, 403 when
its scope does not cover the route (a route naming a tenant takes that tenant's token).

Errors are JSON `{"error": message, "kind": ...}`: 400 for bad input, 404 for unknown
ids (and unknown routes), 409 for a conflict with the current state (`kind` Conflict)
or a broken timeline (`kind` TimelineBroken), 413 for a body over
max_request_body_bytes, 503 for a timeout. An unexpected exception is logged with its
traceback and answered 500 with only its type and message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

from strata.common.auth import TokenVerifier
from strata.common.errors import CorruptionError, NotFound, StrataError, Unavailable, UserError
from strata.common.http_auth import auth_middleware
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import timeline_context
from strata.common.lsn import Lsn
from strata.common.timestamp import parse_past_timestamp_us
from strata.pageserver.config import tenant_config_from_json
from strata.pageserver.metrics import CONTENT_TYPE
from strata.pageserver.server import Conflict, Pageserver, StaleAttachment
from strata.pageserver.sk_receiver import SafekeeperEndpoint
from strata.pageserver.timeline_wal import ReceiverTarget
from strata.storage.leases import Lease
from strata.storage.tenant import Tenant, check_generation
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEY = web.AppKey("pageserver", Pageserver)
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
MAX_PORT = 65535


def timeline_info(timeline: Timeline) -> dict[str, Any]:
    return {
        "tenant_id": str(timeline.tenant_id),
        "timeline_id": str(timeline.timeline_id),
        "last_record_lsn": str(timeline.last_record_lsn),
        "prev_record_lsn": str(timeline.prev_record_lsn),
        "disk_consistent_lsn": str(timeline.disk_consistent_lsn),
        "remote_consistent_lsn": _remote_consistent_lsn(timeline),
        "ancestor_timeline_id": str(timeline.ancestor.timeline_id)
        if timeline.ancestor is not None else None,
        "ancestor_lsn": str(timeline.ancestor_lsn) if timeline.ancestor is not None else None,
        "gc_cutoff": str(timeline.gc_cutoff),
        "initdb_lsn": str(timeline.initdb_lsn),
        "state": "Broken" if timeline.broken_reason is not None else "Active",
        "broken_reason": timeline.broken_reason,
        "children": sorted(str(c.timeline_id) for c in timeline.children),
    }


def _remote_consistent_lsn(timeline: Timeline) -> str | None:
    """Up to where the timeline is in remote storage (None: no remote storage)."""
    lsn = timeline.remote.remote_consistent_lsn if timeline.remote is not None else None
    return str(lsn) if lsn is not None else None


def tenant_info(tenant: Tenant, stale: StaleAttachment | None = None) -> dict[str, Any]:
    return {"tenant_id": str(tenant.tenant_id), "timelines": len(tenant.timelines),
            "config": tenant.conf.to_dict(), "generation": tenant.generation,
            "generation_state": "stale" if stale is not None else "current",
            "newer_generation": stale.newer if stale is not None else None}


def lease_info(lease: Lease, now: float) -> dict[str, Any]:
    return {"lsn": str(lease.lsn), "expires_at": lease.expires_at,
            "expires_in_s": round(lease.expires_at - now, 3)}


# --- request parsing (errors become 400s) -------------------------------------------------------
def _tenant_id(text: str) -> TenantId:
    return TenantId(TenantId.parse(text).raw)


def _timeline_id(text: str) -> TimelineId:
    return TimelineId(TimelineId.parse(text).raw)


def _no_constants(name: str) -> Any:
    raise UserError(f"request body holds {name}, which JSON does not allow")


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    raw = await request.read()  # over client_max_size: aiohttp answers 413
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
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
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**53:
            raise UserError(f"{name!r} is out of range: {_short(value)}")
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise UserError(f"{name!r} must be a {kind.__name__}, got {_short(value)}")
    return value


def _port(body: dict[str, Any], name: str) -> int:
    port: int = _field(body, name, int)
    if not 1 <= port <= MAX_PORT:
        raise UserError(f"{name!r} must be a port number 1..{MAX_PORT}, got {port}")
    return port


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _ids(request: web.Request) -> tuple[TenantId, TimelineId]:
    return (_tenant_id(request.match_info["tenant_id"]),
            _timeline_id(request.match_info["timeline_id"]))


# --- service ----------------------------------------------------------------------------------
async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[_KEY].status())


async def metrics(request: web.Request) -> web.Response:
    data = request.app[_KEY].metrics.render()
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")


# --- tenants --------------------------------------------------------------------------------------
async def create_tenant(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    body = await _body(request)
    tenant_text = _field(body, "tenant_id", str, required=False)
    conf_data = _field(body, "config", dict, required=False)
    generation = _field(body, "generation", int, required=False)
    import_text = _field(body, "import_datadir", str, required=False)
    conf = tenant_config_from_json(ps.config.default_tenant_conf, conf_data) \
        if conf_data else None
    tenant, timeline = await ps.create_tenant(
        _tenant_id(tenant_text) if tenant_text else None, conf,
        check_generation(generation) if generation is not None else 1,
        import_datadir=Path(import_text) if import_text else None)
    return web.json_response({"tenant_id": str(tenant.tenant_id),
                              "timeline_id": str(timeline.timeline_id),
                              "timeline": timeline_info(timeline)}, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    return web.json_response([{"tenant_id": str(t)} for t in ps.repo.list_tenants()])


async def get_tenant(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant = ps.tenant(_tenant_id(request.match_info["tenant_id"]))
    return web.json_response(tenant_info(tenant, ps.stale.get(tenant.tenant_id)))


async def delete_tenant(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id = _tenant_id(request.match_info["tenant_id"])
    await ps.delete_tenant(tenant_id)
    return web.json_response({"deleted": str(tenant_id)})


async def attach_tenant(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id = _tenant_id(request.match_info["tenant_id"])
    body = await _body(request)
    generation = check_generation(_field(body, "generation", int))
    conf_data = _field(body, "config", dict, required=False)
    conf = tenant_config_from_json(ps.config.default_tenant_conf, conf_data) \
        if conf_data else None
    tenant = await ps.attach_tenant(tenant_id, generation, conf)
    return web.json_response({"tenant_id": str(tenant_id), "generation": generation,
                              "timelines": [timeline_info(tenant.get_timeline(tid))
                                            for tid in tenant.list_timelines()]}, status=201)


async def detach_tenant(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id = _tenant_id(request.match_info["tenant_id"])
    await ps.detach_tenant(tenant_id)
    return web.json_response({"detached": str(tenant_id)})


async def tenant_size(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id = _tenant_id(request.match_info["tenant_id"])
    return web.json_response(await asyncio.to_thread(ps.tenant_size, tenant_id))


async def get_tenant_config(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant = ps.tenant(_tenant_id(request.match_info["tenant_id"]))
    return web.json_response(tenant.conf.to_dict())


async def set_tenant_config(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant = ps.tenant(_tenant_id(request.match_info["tenant_id"]))
    conf = tenant_config_from_json(tenant.conf, await _body(request))
    ps.set_tenant_config(tenant.tenant_id, conf)
    return web.json_response(conf.to_dict())


async def tenant_gc(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    results = await ps.gc(_tenant_id(request.match_info["tenant_id"]))
    return web.json_response({str(tid): {"cutoff": str(r.cutoff),
                                         "layers_removed": len(r.removed),
                                         "expired_leases": r.expired_leases}
                              for tid, r in results.items()})


# --- timelines ------------------------------------------------------------------------------------
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
        timestamp_us=parse_past_timestamp_us(ts_text, time.time()) if ts_text else None,
        timeline_id=_timeline_id(new_text) if new_text else None)
    return web.json_response(timeline_info(timeline), status=201)


async def get_timeline(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    timeline = ps.timeline(*_ids(request))
    info = timeline_info(timeline)
    # ?logical_size=false: skip the sum over every relation (the walproposer sidecar polls
    # this for the LSNs only, up to every 50 ms while ingest lags).
    wanted = request.query.get("logical_size", "true")
    if wanted not in ("true", "false"):
        raise UserError(f"query parameter 'logical_size' is {wanted!r}: use true or false")
    info["logical_size"] = await ps.logical_size(timeline) \
        if wanted == "true" and timeline.broken_reason is None else None
    now = timeline.clock()
    info["leases"] = [lease_info(lease, now) for lease in timeline.leases.live(now)]
    return web.json_response(info)


async def delete_timeline(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    await ps.delete_timeline(tenant_id, timeline_id)
    return web.json_response({"deleted": str(timeline_id)})


async def get_lsn_by_timestamp(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    timeline = ps.timeline(*_ids(request))
    text = request.query.get("timestamp")
    if text is None:
        raise UserError("query parameter 'timestamp' (ISO 8601) is required")
    lsn = timeline.find_lsn_for_timestamp(parse_past_timestamp_us(text, time.time()))
    return web.json_response({"lsn": str(lsn)})


async def compute_start(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    lsn, prev = await ps.compute_start(*_ids(request))
    return web.json_response({"lsn": str(lsn), "prev_lsn": str(prev)})


async def wal_receiver(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    ps.timeline(tenant_id, timeline_id)  # 404 before a body error
    body = await _body(request)
    target = ReceiverTarget(host=_field(body, "host", str), port=_port(body, "port"),
                            slot=_field(body, "slot", str),
                            application_name=_field(body, "application_name", str),
                            user=_field(body, "user", str, required=False) or "postgres")
    target.receiver_config()  # validates the slot name
    await ps.attach_receiver(tenant_id, timeline_id, target)
    return web.json_response({"attached": True})


def _safekeeper(item: Any) -> SafekeeperEndpoint:
    if not isinstance(item, dict):
        raise UserError(f"safekeeper entry {_short(item)}: expected an object "
                        "{id, host, pg_port, http_port}")
    node_id = _field(item, "id", int)
    host = _field(item, "host", str, required=False) or "127.0.0.1"
    return SafekeeperEndpoint.from_json({"id": node_id, "host": host,
                                         "pg_port": _port(item, "pg_port"),
                                         "http_port": _port(item, "http_port")})


async def safekeepers(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    ps.timeline(tenant_id, timeline_id)
    body = await _body(request)
    items = body.get("safekeepers")
    if not isinstance(items, list) or not items:
        raise UserError("body field 'safekeepers' must be a non-empty list of "
                        "{id, host, pg_port, http_port}")
    endpoints = tuple(_safekeeper(item) for item in items)
    await ps.follow_safekeepers(tenant_id, timeline_id, endpoints)
    return web.json_response({"following": [e.node_id for e in endpoints]})


async def checkpoint(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    timeline = await ps.checkpoint(*_ids(request))
    return web.json_response(timeline_info(timeline))


async def compact(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    results = await ps.compact(tenant_id, timeline_id)
    result = results.get(timeline_id)
    return web.json_response({
        "image_layers_created": len(result.image_layers) if result else 0,
        "partitions": result.partitions if result else 0})


async def acquire_lease(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    ps.timeline(tenant_id, timeline_id)
    body = await _body(request)
    lsn = Lsn.parse(_field(body, "lsn", str))
    duration = _field(body, "duration_s", float, required=False)
    if duration is not None and not 0 < duration <= 7 * 24 * 3600:
        raise UserError(f"'duration_s' must be in (0, 604800] seconds, got {duration!r}")
    lease, renewed = ps.lease(tenant_id, timeline_id, lsn, duration)
    return web.json_response({**lease_info(lease, time.time()), "renewed": renewed})


async def get_lease(request: web.Request) -> web.Response:
    ps = request.app[_KEY]
    tenant_id, timeline_id = _ids(request)
    timeline = ps.timeline(tenant_id, timeline_id)
    text = request.query.get("lsn")
    if text is None:
        raise UserError("query parameter 'lsn' (X/Y) is required")
    lease = ps.live_lease(tenant_id, timeline_id, Lsn.parse(text))
    return web.json_response(lease_info(lease, timeline.clock()))


# --- errors ------------------------------------------------------------------------------------
def _status_for(err: StrataError) -> int:
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Unavailable):
        return 503
    if isinstance(err, (CorruptionError, Conflict)):
        return 409  # a broken timeline (TimelineBroken), bad files, or the state forbids it
    return 400


def _log_id(text: str | None) -> str | None:
    """A path id for the log context: as given if it is an id, else marked invalid (so a
    crafted path cannot put arbitrary text into log lines)."""
    if text is None:
        return None
    return text if len(text) == 32 and all(c in "0123456789abcdef" for c in text) \
        else "(invalid)"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ps = request.app[_KEY]
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = 500
    with timeline_context(_log_id(request.match_info.get("tenant_id")) or "-",
                          _log_id(request.match_info.get("timeline_id"))):
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as err:
            status = err.status
            if err.status >= 400:
                # aiohttp's own answers (no such route, wrong method, body too large) in
                # the API's JSON shape.
                return web.json_response({"error": f"{request.method} {request.raw_path}: "
                                                   f"{err.reason}",
                                          "kind": type(err).__name__},
                                         status=err.status, headers=_allow(err))
            raise
        except ConnectionResetError:
            # The body ended before its Content-Length (the client closed or half-closed
            # the connection): its fault; answer in case it still reads.
            status = 400
            log.info("%s %s: the connection ended inside the request body", request.method,
                     request.raw_path)
            return web.json_response({"error": "the request body ended before its "
                                               "Content-Length", "kind": "BadRequest"},
                                     status=status)
        except StrataError as err:
            status = _status_for(err)
            log.info("%s %s -> %d: %s", request.method, request.raw_path, status, err)
            return web.json_response({"error": str(err), "kind": type(err).__name__},
                                     status=status)
        except Exception as err:  # noqa: BLE001 - the API answers, the log has the traceback
            log.exception("%s %s failed", request.method, request.raw_path)
            return web.json_response({"error": f"internal error: {type(err).__name__}: "
                                               f"{err}", "kind": "InternalError"},
                                     status=500)
        finally:
            ps.metrics.http_requests.labels(request.method, route, str(status)).inc()


def _allow(err: web.HTTPException) -> dict[str, str]:
    allow = err.headers.get("Allow")
    return {"Allow": allow} if allow else {}


def make_app(pageserver: Pageserver, verifier: TokenVerifier | None = None) -> web.Application:
    """The API; with a `verifier`, every route but /metrics needs a token (http_auth)."""
    middlewares: list[Middleware] = [error_middleware]
    if verifier is not None:
        middlewares.append(auth_middleware(verifier))  # inside: its answers are counted
    app = web.Application(middlewares=middlewares,
                          client_max_size=pageserver.config.max_request_body_bytes)
    app[_KEY] = pageserver
    tn = "/v1/tenant/{tenant_id}"
    tl = tn + "/timeline/{timeline_id}"
    app.add_routes([
        web.get("/v1/status", status, allow_head=False),
        web.get("/metrics", metrics, allow_head=False),
        web.get("/v1/openapi.json", openapi, allow_head=False),
        web.post("/v1/tenant", create_tenant),
        web.get("/v1/tenant", list_tenants, allow_head=False),
        web.get(tn, get_tenant, allow_head=False),
        web.delete(tn, delete_tenant),
        web.post(tn + "/attach", attach_tenant),
        web.post(tn + "/detach", detach_tenant),
        web.get(tn + "/size", tenant_size, allow_head=False),
        web.get(tn + "/config", get_tenant_config, allow_head=False),
        web.put(tn + "/config", set_tenant_config),
        web.post(tn + "/gc", tenant_gc),
        web.get(tn + "/timeline", list_timelines, allow_head=False),
        web.post(tn + "/timeline", create_timeline),
        web.get(tl, get_timeline, allow_head=False),
        web.delete(tl, delete_timeline),
        web.get(tl + "/get_lsn_by_timestamp", get_lsn_by_timestamp, allow_head=False),
        web.post(tl + "/compute_start", compute_start),
        web.post(tl + "/wal_receiver", wal_receiver),
        web.post(tl + "/safekeepers", safekeepers),
        web.post(tl + "/checkpoint", checkpoint),
        web.post(tl + "/compact", compact),
        web.post(tl + "/lsn_lease", acquire_lease),
        web.get(tl + "/lsn_lease", get_lease, allow_head=False),
    ])
    return app


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (bad request line, header or chunk) at ERROR
    with a traceback, after answering it 400. Such input is the client's fault: keep one
    INFO line saying what was wrong, so fuzzers and port scanners do not fill the log
    with tracebacks that look like our bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = f"{record.getMessage()}: refused malformed HTTP ({exc.code}): " \
                f"{str(exc.message).splitlines()[0] if exc.message else type(exc).__name__}"
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


_bad_request_filter = _BadRequestFilter()


async def start_http(pageserver: Pageserver, host: str, port: int, *,
                     verifier: TokenVerifier | None = None) -> tuple[web.AppRunner, int]:
    """Serve the API on host:port (0: a free port); returns the runner and the bound port."""
    server_log = logging.getLogger("aiohttp.server")
    if _bad_request_filter not in server_log.filters:
        server_log.addFilter(_bad_request_filter)
    runner = web.AppRunner(make_app(pageserver, verifier), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses  # the bound (host, port) of each listening socket
    assert addresses, "HTTP site did not bind"
    return runner, int(addresses[0][1])
