"""The safekeeper's HTTP API (aiohttp), a thin layer over `server.Safekeeper`.

    GET  /v1/status                           node id, timelines served and refused
    GET  /v1/tenant/{t}/timeline/{tl}         timeline state: term, history, flush, commit,
                                              WAL kept, pageserver feedback, peers
    POST /v1/tenant/{t}/timeline              create: {timeline_id, start_lsn, prev_lsn,
                                              system_id, seg_size}; 201, or 200 if it
                                              exists with the same parameters
    DELETE /v1/tenant/{t}/timeline/{tl}       delete: end its proposer and walsender
                                              streams, remove its WAL and control file;
                                              200 {tenant_id, timeline_id, deleted,
                                              connections_closed, freed_bytes}, 404 if
                                              it is not here (so a second delete is 404)
    GET  /metrics                             Prometheus text
    GET  /v1/openapi.json                     the OpenAPI document `openapi.json`

With a public key (`--auth-public-key`), every route but /metrics needs a JWT
(`Authorization: Bearer`, strata.common.http_auth): 401 without a valid one, 403 when its
scope does not cover the route (a route naming a tenant takes that tenant's token).

Errors are JSON `{"error": message, "kind": class}`: 400 bad input or a conflicting
create, 404 unknown timeline, 500 a timeline refused because its files are damaged,
503 a timeline out of service after an I/O failure (or whose deletion failed: retry it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from strata.common.auth import TokenVerifier
from strata.common.errors import CorruptionError, NotFound, StrataError, Unavailable, UserError
from strata.common.http_auth import auth_middleware
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper.server import Safekeeper

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_KEY = web.AppKey("safekeeper", Safekeeper)
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
_STATUS = ((NotFound, 404), (UserError, 400), (CorruptionError, 500), (Unavailable, 503))


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except StrataError as err:
        status = next((code for cls, code in _STATUS if isinstance(err, cls)), 500)
        return web.json_response({"error": str(err), "kind": type(err).__name__},
                                 status=status)


def _ids(request: web.Request) -> tuple[TenantId, TimelineId]:
    return (TenantId.parse(request.match_info["tenant_id"]),
            TimelineId.parse(request.match_info["timeline_id"]))


async def status(request: web.Request) -> web.Response:
    sk = request.app[_KEY]
    return web.json_response({
        "id": sk.node_id, "pg_port": sk.pg.port, "started_at": sk.started_at,
        "timelines": [{"tenant_id": str(t), "timeline_id": str(tl)} for t, tl in sk.timelines],
        "refused": [{"tenant_id": str(t), "timeline_id": str(tl), "error": reason}
                    for (t, tl), reason in sk.broken.items()],
    })


async def timeline_status(request: web.Request) -> web.Response:
    sk = request.app[_KEY]
    tl = sk.get(*_ids(request))
    tl.check_usable()
    return web.json_response(tl.status())


def _field(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise UserError(f"timeline create: missing {name!r}; expected {{timeline_id, "
                        "start_lsn, prev_lsn, system_id, seg_size}")
    return body[name]


async def create_timeline(request: web.Request) -> web.Response:
    sk = request.app[_KEY]
    tenant_id = TenantId.parse(request.match_info["tenant_id"])
    try:
        body = await request.json()
    except json.JSONDecodeError as err:
        raise UserError(f"timeline create: the body is not JSON: {err}") from err
    if not isinstance(body, dict):
        raise UserError("timeline create: the body must be a JSON object")
    try:
        system_id = int(_field(body, "system_id"))
        seg_size = int(_field(body, "seg_size"))
    except (TypeError, ValueError) as err:
        raise UserError(f"timeline create: system_id and seg_size must be integers: {err}") \
            from err
    if not 0 <= system_id < (1 << 64):
        raise UserError(f"timeline create: system_id {system_id} is not a u64")
    tl, created = await sk.create_timeline(
        tenant_id, TimelineId.parse(str(_field(body, "timeline_id"))),
        start_lsn=Lsn.parse(str(_field(body, "start_lsn"))),
        prev_lsn=Lsn.parse(str(_field(body, "prev_lsn"))), system_id=system_id,
        seg_size=seg_size)
    return web.json_response({**tl.status(), "created": created}, status=201 if created else 200)


async def delete_timeline(request: web.Request) -> web.Response:
    sk = request.app[_KEY]
    return web.json_response(await sk.delete_timeline(*_ids(request)))


class _TimelineCollector(Collector):
    """Per-timeline gauges and counters, read from the timelines at scrape time."""

    def __init__(self, sk: Safekeeper) -> None:
        self.sk = sk

    def collect(self) -> Iterator[Metric]:
        labels = ["tenant_id", "timeline_id"]
        gauges = {name: GaugeMetricFamily(f"safekeeper_timeline_{name}", doc, labels=labels)
                  for name, doc in (
                      ("term", "promised term"),
                      ("flush_lsn", "end of the WAL held"),
                      ("commit_lsn", "commit LSN (what walsenders may serve)"),
                      ("wal_start_lsn", "first WAL byte still held"),
                      ("backup_lsn", "end of the WAL uploaded to object storage"),
                      ("pageserver_apply_lsn", "what the pageserver made durable"),
                      ("peers", "open proposer and walsender connections"))}
        counters = {name: CounterMetricFamily(f"safekeeper_timeline_{name}", doc, labels=labels)
                    for name, doc in (
                        ("wal_written_bytes", "WAL bytes written"),
                        ("wal_fsyncs", "WAL fsyncs"),
                        ("wal_fsync_seconds", "time spent in WAL fsyncs"),
                        ("control_writes", "control file writes"),
                        ("control_write_seconds", "time spent writing control files"),
                        ("batches", "batches of proposer messages handled together"),
                        ("truncations", "WAL truncations for a new term"),
                        ("segments_removed", "WAL segments removed"),
                        ("segments_uploaded", "WAL segments uploaded to object storage"),
                        ("segments_downloaded", "WAL segments downloaded to serve removed WAL"),
                        ("wal_sent_bytes", "WAL bytes sent by walsenders"),
                        ("messages", "proposer messages handled"),
                        ("pull_batches", "pull mode: batches of pulled WAL applied"),
                        ("pull_bytes", "pull mode: WAL bytes received from the compute"))}
        for (tenant, timeline), tl in list(self.sk.timelines.items()):
            values = [str(tenant), str(timeline)]
            feedback = tl.pageserver_feedback
            for name, value in (("term", tl.state.term), ("flush_lsn", tl.acceptor.flush_lsn.value),
                                ("commit_lsn", tl.commit_lsn.value),
                                ("wal_start_lsn", tl.wal.wal_start_lsn.value),
                                ("backup_lsn", tl.state.backup_lsn.value),
                                ("pageserver_apply_lsn",
                                 feedback.apply_lsn.value if feedback else 0),
                                ("peers", len(tl.peers))):
                gauges[name].add_metric(values, value)
            for name, counter in counters.items():
                counter.add_metric(values, getattr(tl.counters, name))
        refused = GaugeMetricFamily("safekeeper_timelines_refused",
                                    "timelines not served because their files are damaged")
        refused.add_metric([], len(self.sk.broken))
        yield from gauges.values()
        yield from counters.values()
        yield refused


async def metrics(request: web.Request) -> web.Response:
    registry: CollectorRegistry = request.app[_REGISTRY]
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


_REGISTRY = web.AppKey("registry", CollectorRegistry)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")


def make_app(sk: Safekeeper, verifier: TokenVerifier | None = None) -> web.Application:
    """The API; with a `verifier`, every route but /metrics needs a token (http_auth)."""
    middlewares = [_errors] if verifier is None else [_errors, auth_middleware(verifier)]
    app = web.Application(middlewares=middlewares)
    app[_KEY] = sk
    registry = CollectorRegistry()
    registry.register(_TimelineCollector(sk))
    app[_REGISTRY] = registry
    app.add_routes([
        web.get("/v1/status", status),
        web.get("/v1/tenant/{tenant_id}/timeline/{timeline_id}", timeline_status),
        web.post("/v1/tenant/{tenant_id}/timeline", create_timeline),
        web.delete("/v1/tenant/{tenant_id}/timeline/{timeline_id}", delete_timeline),
        web.get("/metrics", metrics),
        web.get("/v1/openapi.json", openapi),
    ])
    return app
