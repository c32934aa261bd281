"""The pageserver's HTTP API against its OpenAPI document, both ways.

- Every route the aiohttp app serves is in the document, and every documented path and
  method is a route of the app.
- For every documented (path, method, status) a case below makes a real request to a
  running pageserver (with a real PostgreSQL 15 compute attached) that produces exactly
  that status, and the JSON body is checked against the documented schema. A case with
  no documented status, or a documented status with no case, fails the test.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fixtures_env import Env, PageserverProcess

from polling import wait_until
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer
from strata.pageserver.config import PageserverConfig
from strata.pageserver.http import OPENAPI_PATH, make_app
from strata.pageserver.server import Pageserver

DOC: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())
METHODS = ("get", "post", "put", "delete", "patch")
BAD_ID = "not-an-id"


def documented() -> list[tuple[str, str, int]]:
    return sorted((path, method, int(status))
                  for path, item in DOC["paths"].items()
                  for method, op in item.items() if method in METHODS
                  for status in op["responses"])


# --- a small OpenAPI 3.0 schema checker (the subset the document uses) -------------------------
def check_schema(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        check_schema(value, DOC["components"]["schemas"][name], where)
        return
    if "allOf" in schema:
        for part in schema["allOf"]:
            check_schema(value, part, where)
        return
    if value is None:
        assert schema.get("nullable"), f"{where}: null where {schema} is not nullable"
        return
    kind = schema.get("type")
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
    }
    if kind is not None:
        assert checks[kind](value), f"{where}: {value!r} is not {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "pattern" in schema:
        assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    if kind == "object":
        for name in schema.get("required", ()):
            assert name in value, f"{where}: lacks required {name!r}: {value!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            if name in props:
                check_schema(item, props[name], f"{where}.{name}")
            elif extra is False:
                raise AssertionError(f"{where}: undocumented property {name!r}")
            elif isinstance(extra, dict):
                check_schema(item, extra, f"{where}.{name}")
    if kind == "array":
        for i, item in enumerate(value):
            check_schema(item, schema.get("items", {}), f"{where}[{i}]")


# --- the running pageserver --------------------------------------------------------------------
@dataclass
class World:
    env: Env
    tenant: TenantId
    main: TimelineId
    branch: TimelineId  # a child of main (so main cannot be deleted)
    compute: PgServer
    port: int

    def call(self, method: str, path: str, body: Any = None,
             raw: bytes | None = None) -> tuple[int, str, Any]:
        data = raw if raw is not None else (json.dumps(body).encode()
                                            if body is not None else None)
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data,
                                     method=method.upper(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                status, ctype, text = resp.status, resp.headers["Content-Type"], resp.read()
        except urllib.error.HTTPError as err:
            status, ctype, text = err.code, err.headers["Content-Type"], err.read()
        decoded = json.loads(text) if ctype.startswith("application/json") else text.decode()
        return status, ctype, decoded

    def tl(self, timeline: TimelineId | str | None = None, tenant: TenantId | str | None = None,
           suffix: str = "") -> str:
        return (f"/v1/tenant/{tenant or self.tenant}/timeline/{timeline or self.main}"
                + suffix)

    def scratch_timeline(self) -> TimelineId:
        """A fresh branch of main nobody uses (to delete or to point elsewhere)."""
        return self.env.client.branch(self.tenant, self.main).timeline_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    test_dir = tmp_path_factory.mktemp("mgmt_api")
    os.chmod(test_dir, 0o755)
    ensure_traversable(test_dir)
    process = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log",
                                overrides=["max_tenants=4",
                                           f"remote_storage=file://{test_dir / 'remote'}"])
    process.start()
    env = Env(test_dir, process)
    # The safekeepers case points a scratch timeline at 127.0.0.1:1 on purpose; on a slow
    # machine the module outlives ten of its receiver's retries, which log a WARNING.
    env.allowed_log_errors.append(r"walreceiver: connection to 127\.0\.0\.1:1 ended")
    try:
        tenant, main = env.client.create_tenant()
        compute = env.start_compute(tenant, main)
        compute.sql("create table t (id int primary key, v text)")
        compute.sql("insert into t select g, 'x' from generate_series(1, 100) g")
        branch = env.client.branch(tenant, main).timeline_id
        yield World(env, tenant, main, branch, compute, process.http_port)
    finally:
        env.stop_all()
    unexpected = env.unexpected_log_errors()
    assert not unexpected, "\n".join(unexpected[:20])


def rand_tenant() -> str:
    return secrets.token_hex(16)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


# --- one case per documented status: (path, method, status) -> request ------------------------
T = "/v1/tenant/{tenant_id}"
TL = T + "/timeline/{timeline_id}"


def _sk(port: int) -> dict[str, Any]:
    return {"id": 1, "host": "127.0.0.1", "pg_port": port, "http_port": port}


CASES: dict[tuple[str, str, int], Callable[[World], tuple[str, Any]]] = {
    ("/v1/status", "get", 200): lambda w: ("/v1/status", None),
    ("/metrics", "get", 200): lambda w: ("/metrics", None),
    ("/v1/openapi.json", "get", 200): lambda w: ("/v1/openapi.json", None),
    ("/v1/tenant", "post", 201): lambda w: ("/v1/tenant", {"config": {"gc_period_s": 7200}}),
    ("/v1/tenant", "post", 400): lambda w: ("/v1/tenant", {"config": {"gc_horizon": "big"}}),
    ("/v1/tenant", "post", 409): lambda w: ("/v1/tenant", {"tenant_id": str(w.tenant)}),
    ("/v1/tenant", "get", 200): lambda w: ("/v1/tenant", None),
    (T, "get", 200): lambda w: (f"/v1/tenant/{w.tenant}", None),
    (T, "get", 400): lambda w: (f"/v1/tenant/{BAD_ID}", None),
    (T, "get", 404): lambda w: (f"/v1/tenant/{rand_tenant()}", None),
    (T + "/size", "get", 200): lambda w: (f"/v1/tenant/{w.tenant}/size", None),
    (T + "/size", "get", 400): lambda w: (f"/v1/tenant/{BAD_ID}/size", None),
    (T + "/size", "get", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/size", None),
    (T, "delete", 200): lambda w: (
        f"/v1/tenant/{w.env.client.create_tenant(config={'gc_period_s': 60})[0]}", None),
    (T, "delete", 400): lambda w: (f"/v1/tenant/{BAD_ID}", None),
    (T, "delete", 404): lambda w: (f"/v1/tenant/{rand_tenant()}", None),
    (T + "/attach", "post", 201): lambda w: (
        f"/v1/tenant/{_detached(w)}/attach", {"generation": 2}),
    (T + "/attach", "post", 400): lambda w: (f"/v1/tenant/{w.tenant}/attach", {}),
    (T + "/attach", "post", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/attach",
                                             {"generation": 1}),
    (T + "/attach", "post", 409): lambda w: (f"/v1/tenant/{w.tenant}/attach",
                                             {"generation": 5}),
    (T + "/detach", "post", 200): lambda w: (f"/v1/tenant/{_created(w)}/detach", None),
    (T + "/detach", "post", 400): lambda w: (f"/v1/tenant/{BAD_ID}/detach", None),
    (T + "/detach", "post", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/detach", None),
    (T + "/config", "get", 200): lambda w: (f"/v1/tenant/{w.tenant}/config", None),
    (T + "/config", "get", 400): lambda w: (f"/v1/tenant/{BAD_ID}/config", None),
    (T + "/config", "get", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/config", None),
    (T + "/config", "put", 200): lambda w: (f"/v1/tenant/{w.tenant}/config",
                                            {"lease_length_s": 300}),
    (T + "/config", "put", 400): lambda w: (f"/v1/tenant/{w.tenant}/config",
                                            {"checkpoint_distance": -5}),
    (T + "/config", "put", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/config", {}),
    (T + "/gc", "post", 200): lambda w: (f"/v1/tenant/{w.tenant}/gc", {}),
    (T + "/gc", "post", 400): lambda w: (f"/v1/tenant/{BAD_ID}/gc", {}),
    (T + "/gc", "post", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/gc", {}),
    (T + "/timeline", "get", 200): lambda w: (f"/v1/tenant/{w.tenant}/timeline", None),
    (T + "/timeline", "get", 400): lambda w: (f"/v1/tenant/{BAD_ID}/timeline", None),
    (T + "/timeline", "get", 404): lambda w: (f"/v1/tenant/{rand_tenant()}/timeline", None),
    (T + "/timeline", "post", 201): lambda w: (
        f"/v1/tenant/{w.tenant}/timeline",
        {"ancestor_timeline_id": str(w.main), "timestamp": now_iso()}),
    (T + "/timeline", "post", 400): lambda w: (
        f"/v1/tenant/{w.tenant}/timeline",
        {"ancestor_timeline_id": str(w.main), "ancestor_lsn": "FFFF/0"}),
    (T + "/timeline", "post", 404): lambda w: (
        f"/v1/tenant/{w.tenant}/timeline", {"ancestor_timeline_id": rand_tenant()}),
    (T + "/timeline", "post", 409): lambda w: (
        f"/v1/tenant/{w.tenant}/timeline",
        {"ancestor_timeline_id": str(w.main), "new_timeline_id": str(w.branch)}),
    (TL, "get", 200): lambda w: (w.tl(), None),
    (TL, "get", 400): lambda w: (w.tl(BAD_ID), None),
    (TL, "get", 404): lambda w: (w.tl(rand_tenant()), None),
    (TL, "delete", 200): lambda w: (w.tl(w.scratch_timeline()), None),
    (TL, "delete", 400): lambda w: (w.tl(BAD_ID), None),
    (TL, "delete", 404): lambda w: (w.tl(rand_tenant()), None),
    (TL, "delete", 409): lambda w: (w.tl(w.main), None),
    (TL + "/get_lsn_by_timestamp", "get", 200): lambda w: (
        w.tl(suffix=f"/get_lsn_by_timestamp?timestamp={now_iso().replace('+', '%2B')}"),
        None),
    (TL + "/get_lsn_by_timestamp", "get", 400): lambda w: (
        w.tl(suffix="/get_lsn_by_timestamp?timestamp=yesterday"), None),
    (TL + "/get_lsn_by_timestamp", "get", 404): lambda w: (
        w.tl(rand_tenant(), suffix="/get_lsn_by_timestamp?timestamp=2020-01-01"), None),
    (TL + "/checkpoint", "post", 200): lambda w: (w.tl(suffix="/checkpoint"), {}),
    (TL + "/checkpoint", "post", 400): lambda w: (w.tl(BAD_ID, suffix="/checkpoint"), {}),
    (TL + "/checkpoint", "post", 404): lambda w: (w.tl(rand_tenant(), suffix="/checkpoint"),
                                                  {}),
    (TL + "/compact", "post", 200): lambda w: (w.tl(suffix="/compact"), {}),
    (TL + "/compact", "post", 400): lambda w: (w.tl(BAD_ID, suffix="/compact"), {}),
    (TL + "/compact", "post", 404): lambda w: (w.tl(rand_tenant(), suffix="/compact"), {}),
    (TL + "/compute_start", "post", 200): lambda w: (w.tl(w.branch, suffix="/compute_start"),
                                                     {}),
    (TL + "/compute_start", "post", 400): lambda w: (w.tl(BAD_ID, suffix="/compute_start"),
                                                     {}),
    (TL + "/compute_start", "post", 404): lambda w: (
        w.tl(rand_tenant(), suffix="/compute_start"), {}),
    # Re-attaching the running compute to main replaces the receiver with an equal one.
    (TL + "/wal_receiver", "post", 200): lambda w: (
        w.tl(suffix="/wal_receiver"),
        {"host": w.compute.host, "port": w.compute.port, "slot": "strata_walproposer",
         "application_name": "strata_pageserver"}),
    (TL + "/wal_receiver", "post", 400): lambda w: (
        w.tl(suffix="/wal_receiver"),
        {"host": "127.0.0.1", "port": 70000, "slot": "s", "application_name": "a"}),
    (TL + "/wal_receiver", "post", 404): lambda w: (w.tl(rand_tenant(),
                                                         suffix="/wal_receiver"), {}),
    # A scratch timeline follows a safekeeper that is not there (it just retries).
    (TL + "/safekeepers", "post", 200): lambda w: (
        w.tl(w.scratch_timeline(), suffix="/safekeepers"), {"safekeepers": [_sk(1)]}),
    (TL + "/safekeepers", "post", 400): lambda w: (
        w.tl(suffix="/safekeepers"), {"safekeepers": [{"id": True}]}),
    (TL + "/safekeepers", "post", 404): lambda w: (
        w.tl(rand_tenant(), suffix="/safekeepers"), {"safekeepers": [_sk(1)]}),
    (TL + "/lsn_lease", "post", 200): lambda w: (
        w.tl(suffix="/lsn_lease"),
        {"lsn": str(w.env.client.timeline(w.tenant, w.main).last_record_lsn),
         "duration_s": 30}),
    (TL + "/lsn_lease", "post", 400): lambda w: (w.tl(suffix="/lsn_lease"), {"lsn": "zz"}),
    (TL + "/lsn_lease", "post", 404): lambda w: (w.tl(rand_tenant(), suffix="/lsn_lease"),
                                                 {"lsn": "0/1"}),
    (TL + "/lsn_lease", "get", 200): lambda w: (
        w.tl(suffix=f"/lsn_lease?lsn={_leased(w)}"), None),
    (TL + "/lsn_lease", "get", 400): lambda w: (w.tl(suffix="/lsn_lease?lsn=nope"), None),
    (TL + "/lsn_lease", "get", 404): lambda w: (w.tl(suffix="/lsn_lease?lsn=0/1"), None),
}


def _created(w: World) -> TenantId:
    return w.env.client.create_tenant(config={"gc_period_s": 60})[0]


def _detached(w: World) -> TenantId:
    tenant = _created(w)
    w.env.client.request("POST", f"/v1/tenant/{tenant}/detach")
    return tenant


def _leased(w: World) -> Lsn:
    lsn = w.env.client.timeline(w.tenant, w.main).last_record_lsn
    w.env.client.lease(w.tenant, w.main, lsn, 30)
    return lsn


def test_routes_match_document(tmp_path: Path) -> None:
    """The app's routes and the document's paths/methods are the same set."""
    ps = Pageserver(PageserverConfig(workdir=tmp_path))
    try:
        app = make_app(ps)
        routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
                  if r.resource is not None and r.method != "HEAD"}
    finally:
        ps.repo.close()
    in_doc = {(path, method) for path, item in DOC["paths"].items() for method in item
              if method in METHODS}
    assert routes == in_doc, (sorted(routes - in_doc), sorted(in_doc - routes))


def test_every_documented_status_has_a_case() -> None:
    assert set(documented()) == set(CASES), (sorted(set(documented()) - set(CASES)),
                                             sorted(set(CASES) - set(documented())))


@pytest.mark.parametrize("path, method, status", documented(),
                         ids=[f"{m.upper()} {p} {s}" for p, m, s in documented()])
def test_documented_status(world: World, path: str, method: str, status: int) -> None:
    url, body = CASES[(path, method, status)](world)
    got, ctype, decoded = world.call(method, url, body)
    assert got == status, (method, url, body, got, decoded)
    response = DOC["paths"][path][method]["responses"][str(status)]
    content = response["content"]
    if "application/json" in content:
        assert ctype.startswith("application/json"), ctype
        check_schema(decoded, content["application/json"]["schema"])
    else:
        assert ctype.startswith("text/plain"), ctype
        assert isinstance(decoded, str)
    if status >= 400:
        assert decoded["error"] and "Traceback" not in decoded["error"], decoded


def test_served_document_is_the_file(world: World) -> None:
    status, _, served = world.call("get", "/v1/openapi.json")
    assert status == 200 and served == DOC


def test_metrics_cover_ingest_pages_and_maintenance(world: World) -> None:
    c = world.env.client
    c.status()
    c.checkpoint(world.tenant, world.main)
    c.compact(world.tenant, world.main)
    c.gc(world.tenant)
    text = c.metrics_text()
    ids = f'tenant_id="{world.tenant}",timeline_id="{world.main}"'
    ingested = re.search(r"^strata_pageserver_wal_ingested_bytes_total\{" + ids + r"\} (\S+)$",
                         text, re.M)
    assert ingested and float(ingested.group(1)) > 0, text[:2000]
    for needle in (f"strata_pageserver_ingest_lag_bytes{{{ids}}}",
                   f'strata_pageserver_layer_count{{kind="delta",{ids}}}',
                   f'strata_pageserver_layer_bytes{{kind="image",{ids}}}',
                   'strata_pageserver_compaction_runs_total{outcome="ok",trigger="manual"}',
                   'strata_pageserver_gc_runs_total{outcome="ok",trigger="manual"}',
                   'strata_pageserver_http_requests_total{method="GET",route="/v1/status"'):
        assert needle in text, needle
    # Page requests: a compute reading through the page service is someone else's test;
    # here one GetPage-class request of each kind we can make cheaply.
    from strata.pageserver.page_client import PageClientSync
    from strata.pg.relfile import RelTag

    lsn = c.timeline(world.tenant, world.main).last_record_lsn
    with PageClientSync("127.0.0.1", world.env.pageserver.pg_port, world.tenant,
                        world.main) as pc:
        assert pc.nblocks(RelTag(1663, 5, 1259, 0), lsn) > 0  # pg_class of `postgres`
        pc.lease(lsn, 10)
    text = c.metrics_text()
    assert re.search(r'^strata_pageserver_getpage_seconds_count\{request="Nblocks"\} [1-9]',
                     text, re.M), text[-3000:]
    assert 'strata_pageserver_page_requests_total{outcome="ok",request="Lease"}' in text


def test_generation_markers_through_the_api_alone(world: World) -> None:
    """No control plane: a tenant created with generation 2 has its marker; an attach
    with an older generation than the marker is refused (409) and writes nothing, a newer
    one raises it; GET says current; a delete removes the markers after everything
    else."""
    from strata.remote.generations import marker_keys, read_generation
    from strata.remote.local import LocalDirStorage

    c = world.env.client
    store = LocalDirStorage(world.env.test_dir / "remote")
    tenant = TenantId(bytes.fromhex(rand_tenant()))
    c.create_tenant(tenant, generation=2)
    assert read_generation(store, tenant) == 2
    assert c.tenant(tenant)["generation"] == 2
    c.request("POST", f"/v1/tenant/{tenant}/detach")
    status, _, body = world.call("post", f"/v1/tenant/{tenant}/attach", {"generation": 1})
    assert status == 409 and "generation 1 of tenant" in body["error"], body
    assert "records generation 2" in body["error"], body
    assert read_generation(store, tenant) == 2
    c.request("POST", f"/v1/tenant/{tenant}/attach", {"generation": 5})
    assert read_generation(store, tenant) == 5
    info = c.tenant(tenant)
    assert (info["generation"], info["generation_state"], info["newer_generation"]) == \
        (5, "current", None)
    assert len(marker_keys(store, tenant)) == 2
    c.delete_tenant(tenant)
    assert store.list_keys(f"tenants/{tenant}/") == []


def test_delete_timeline_refused_while_children_exist(world: World) -> None:
    c = world.env.client
    parent = world.scratch_timeline()
    child = c.branch(world.tenant, parent).timeline_id
    status, _, body = world.call("delete", world.tl(parent))
    assert status == 409 and str(child) in body["error"], body
    assert c.timeline(world.tenant, parent).children == (child,)
    c.delete_timeline(world.tenant, child)
    c.delete_timeline(world.tenant, parent)
    ids = {t.timeline_id for t in c.list_timelines(world.tenant)}
    assert parent not in ids and child not in ids


def test_background_compaction_and_gc_follow_the_tenant_schedule(world: World) -> None:
    """With 1 s periods in the tenant config, compaction, GC and ticks run by themselves
    (counted with trigger="schedule"); the default hour-long periods are restored after."""
    c = world.env.client
    before = c.tenant_config(world.tenant)

    def runs(text: str, name: str) -> float:
        found = re.search(rf'^strata_pageserver_{name}_runs_total\{{outcome="ok",'
                          rf'trigger="schedule"\}} (\S+)$', text, re.M)
        return float(found.group(1)) if found else 0.0

    start = c.metrics_text()
    c.set_tenant_config(world.tenant, {"compaction_period_s": 1.0, "gc_period_s": 1.0})
    try:
        def ran() -> bool:
            text = c.metrics_text()
            return (runs(text, "compaction") >= runs(start, "compaction") + 2
                    and runs(text, "gc") >= runs(start, "gc") + 2)

        wait_until(ran, 30, "two scheduled compaction and GC runs")
        assert re.search(r'^strata_pageserver_timeline_ticks_total\{outcome="ok"\} [1-9]',
                         c.metrics_text(), re.M)
    finally:
        c.set_tenant_config(world.tenant, {k: before[k] for k in ("compaction_period_s",
                                                                  "gc_period_s")})
    assert c.tenant_config(world.tenant) == before
    # The config is persisted: it is what a restarted pageserver loads.
    text = (world.env.pageserver.workdir / "tenants" / str(world.tenant) /
            "tenant.toml").read_text()
    assert f"gc_period_s = {before['gc_period_s']}" in text


def test_timeline_detail_without_logical_size(world: World) -> None:
    """The sidecar's backpressure poll asks for the LSNs only: `?logical_size=false` leaves
    the size (a sum over every relation) out; anything but true/false is a 400."""
    status, _, full = world.call("get", world.tl())
    assert status == 200 and full["logical_size"] > 0
    status, _, lean = world.call("get", world.tl(suffix="?logical_size=false"))
    assert status == 200 and lean["logical_size"] is None
    assert lean["timeline_id"] == full["timeline_id"] and lean["last_record_lsn"]
    status, _, err = world.call("get", world.tl(suffix="?logical_size=no"))
    assert status == 400 and "logical_size" in err["error"]
