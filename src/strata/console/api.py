"""The console's JSON API handlers (the routes are in server.py; openapi.json describes
them). Each handler reads the environment through `strata.control` in a thread (state
file, pageserver HTTP, PostgreSQL) so the event loop keeps answering; long operations
start a job (jobs.py) and answer 202 with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from strata.common.errors import NotFound, StrataError, UserError
from strata.console import auth
from strata.console.jobs import Jobs
from strata.console.metrics import WINDOW_S, Sampler
from strata.console.sql import ROW_LIMIT, run_read_only
from strata.control import operations
from strata.control.endpoints import endpoint_status, local_connstr, running_pid
from strata.control.env import ComputeMode, Environment
from strata.control.services import pageserver_status, tenant_pageserver

T = TypeVar("T")
OPENAPI_PATH = Path(__file__).with_name("openapi.json")


@dataclass
class Console:
    env: Environment
    token: str
    jobs: Jobs
    sampler: Sampler


CONSOLE = web.AppKey("console", Console)


def _console(request: web.Request) -> Console:
    return request.app[CONSOLE]


async def _blocking(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"request body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise UserError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _text(body: dict[str, Any], name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise UserError(f"field {name!r} is required")
        return None
    if not isinstance(value, str):
        raise UserError(f"field {name!r} must be a string, got {type(value).__name__}")
    return value.strip()


def _job_response(job_json: dict[str, Any]) -> web.Response:
    return web.json_response(job_json, status=202)


# --- session -----------------------------------------------------------------------------------
async def login(request: web.Request) -> web.Response:
    console = _console(request)
    body = await _body(request)
    given = _text(body, "token") or ""
    if not auth.token_matches(console.token, given):
        return web.json_response({"error": "wrong token; it is in "
                                           f"{auth.token_path(console.env)}",
                                  "kind": "Unauthorized"}, status=401)
    response = web.json_response({"ok": True})
    auth.set_session(response, console.token)
    return response


async def logout(request: web.Request) -> web.Response:
    response = web.json_response({"ok": True})
    response.del_cookie(auth.COOKIE, path="/")
    return response


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(json.loads(OPENAPI_PATH.read_text()))


async def status(request: web.Request) -> web.Response:
    env = _console(request).env

    def read() -> dict[str, Any]:
        config = env.config()
        return {"root": str(env.root), "wal_mode": config.wal_mode,
                "pageserver": pageserver_status(env, config).state}

    return web.json_response(await _blocking(read))


# --- tenants and branches ----------------------------------------------------------------------
async def tenants(request: web.Request) -> web.Response:
    state = await _blocking(_console(request).env.read_state)
    return web.json_response([
        {"tenant_id": str(tid), "name": t.name, "default": tid == state.default_tenant,
         "branches": sorted(t.branches)} for tid, t in state.tenants.items()])


async def create_tenant(request: web.Request) -> web.Response:
    """A tenant with a `main` branch (initdb and import on the pageserver: a job)."""
    console = _console(request)
    body = await _body(request)
    name = _text(body, "name")
    assert name is not None
    overrides = body.get("config") or {}
    if not isinstance(overrides, dict):
        raise UserError("config must be an object of tenant config keys")
    operations.check_name("tenant", name)

    def work() -> dict[str, Any]:
        tenant_id, timeline_id = operations.create_tenant(console.env, console.env.config(),
                                                          name, overrides)
        return {"tenant": name, "tenant_id": str(tenant_id), "timeline_id": str(timeline_id)}

    job = console.jobs.start("tenant", f"create tenant {name}", work)
    return _job_response(job.to_json())


def branch_tree(env: Environment, tenant: str) -> dict[str, Any]:
    """The tenant's timelines with names, branch points, sizes, times and endpoints."""
    config = env.config()
    state = env.read_state()
    tid = state.tenant_id(tenant)
    client = tenant_pageserver(env, config, tid)
    times = operations.branch_times(env)
    endpoints = [endpoint_status(env, config, ep) for ep in state.endpoints.values()
                 if ep.tenant_id == tid]
    rows = []
    for info in client.list_timelines(tid):
        row = operations.timeline_json(state.tenants[tid], info)
        try:
            row["logical_size"] = client.timeline(tid, info.timeline_id).logical_size
        except StrataError:
            row["logical_size"] = None  # deleted meanwhile, or broken
        made = times.get(row["timeline_id"], {})
        row["created_at"] = made.get("created_at")
        row["point"] = made.get("point")
        row["children"] = [str(c) for c in info.children]
        row["endpoints"] = [e for e in endpoints if e["branch"] == row["branch"]
                            and row["branch"] is not None]
        rows.append(row)
    return {"tenant_id": str(tid), "name": state.tenants[tid].name, "branches": rows}


async def branches(request: web.Request) -> web.Response:
    env = _console(request).env
    tenant = request.match_info["tenant"]
    return web.json_response(await _blocking(lambda: branch_tree(env, tenant)))


async def create_branch(request: web.Request) -> web.Response:
    console = _console(request)
    tenant = request.match_info["tenant"]
    body = await _body(request)
    name = _text(body, "name")
    parent = _text(body, "parent")
    at = _text(body, "at", required=False)
    assert name is not None and parent is not None
    operations.check_name("branch", name)
    operations.parse_branch_point(at)  # refuse a bad point now, not in the job

    def work() -> dict[str, Any]:
        info = operations.create_branch(console.env, console.env.config(), name, parent, at,
                                        tenant)
        return {"branch": name, "timeline_id": str(info.timeline_id),
                "branch_lsn": str(info.ancestor_lsn)}

    point = f"at {at}" if at and at.lower() != "now" else "at its head"
    job = console.jobs.start("branch", f"branch {name} from {parent} {point}", work)
    return _job_response(job.to_json())


async def restore_branch(request: web.Request) -> web.Response:
    console = _console(request)
    tenant = request.match_info["tenant"]
    branch = request.match_info["branch"]
    body = await _body(request)
    timestamp = _text(body, "timestamp")
    assert timestamp is not None

    def work() -> dict[str, Any]:
        done = operations.restore_branch(console.env, console.env.config(), branch,
                                         timestamp, tenant)
        return {"branch": done.branch, "timeline_id": str(done.timeline_id),
                "lsn": str(done.lsn), "backup": done.backup,
                "restarted": list(done.restarted)}

    job = console.jobs.start("restore", f"restore branch {branch} to {timestamp}", work)
    return _job_response(job.to_json())


async def delete_branch(request: web.Request) -> web.Response:
    console = _console(request)
    tenant = request.match_info["tenant"]
    branch = request.match_info["branch"]

    # Refused at once (409), not as a failed job; delete_branch checks again.
    await _blocking(lambda: operations.check_branch_deletable(console.env, console.env.config(),
                                                              branch, tenant))

    def work() -> dict[str, Any]:
        timeline_id = operations.delete_branch(console.env, console.env.config(), branch,
                                               tenant)
        return {"branch": branch, "timeline_id": str(timeline_id)}

    job = console.jobs.start("delete", f"delete branch {branch}", work)
    return _job_response(job.to_json())


# --- endpoints ---------------------------------------------------------------------------------
async def endpoints(request: web.Request) -> web.Response:
    env = _console(request).env

    def read() -> list[dict[str, Any]]:
        config = env.config()
        return [endpoint_status(env, config, ep) for ep in env.read_state().endpoints.values()]

    return web.json_response(await _blocking(read))


async def create_endpoint(request: web.Request) -> web.Response:
    env = _console(request).env
    body = await _body(request)
    name = _text(body, "name")
    branch = _text(body, "branch")
    lsn = _text(body, "lsn", required=False)
    tenant = _text(body, "tenant", required=False)
    assert name is not None and branch is not None
    ep = await _blocking(lambda: operations.create_endpoint(env, env.config(), name, branch,
                                                            lsn, None, tenant))
    return web.json_response({"name": ep.name, "branch": ep.branch,
                              "tenant_id": str(ep.tenant_id),
                              "port": ep.port,
                              "lsn": None if ep.lsn is None else str(ep.lsn)}, status=201)


async def delete_endpoint(request: web.Request) -> web.Response:
    env = _console(request).env
    name = request.match_info["name"]
    await _blocking(lambda: operations.delete_endpoint(env, name))
    return web.json_response({"deleted": name})


async def start_endpoint(request: web.Request) -> web.Response:
    console = _console(request)
    name = request.match_info["name"]
    body = await _body(request)
    text = _text(body, "mode", required=False)
    mode = None if text is None else ComputeMode.parse(text, "mode")
    await _blocking(lambda: console.env.read_state().endpoint(name))  # NotFound now

    def work() -> dict[str, Any]:
        conn = operations.start_named_endpoint(console.env, console.env.config(), name,
                                               mode).connstr
        return {"endpoint": name, "connstr": conn}

    job = console.jobs.start("start", f"start endpoint {name}", work)
    return _job_response(job.to_json())


async def stop_endpoint(request: web.Request) -> web.Response:
    console = _console(request)
    name = request.match_info["name"]
    await _blocking(lambda: console.env.read_state().endpoint(name))

    def work() -> dict[str, Any]:
        return {"endpoint": name,
                "stopped": operations.stop_named_endpoint(console.env, name)}

    job = console.jobs.start("stop", f"stop endpoint {name}", work)
    return _job_response(job.to_json())


async def run_sql(request: web.Request) -> web.Response:
    env = _console(request).env
    name = request.match_info["name"]
    body = await _body(request)
    query = body.get("query")
    if not isinstance(query, str):
        raise UserError("field 'query' (a string) is required")
    limit = body.get("limit", ROW_LIMIT)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= ROW_LIMIT:
        raise UserError(f"field 'limit' must be an integer 1..{ROW_LIMIT}")

    def run() -> dict[str, Any]:
        ep = env.read_state().endpoint(name)
        if running_pid(env, name) is None:
            raise UserError(f"endpoint {name} is not running; start it first")
        # As the application role, over the unix socket (TCP asks for its password).
        return run_read_only(local_connstr(env, ep), query, limit).to_json()

    return web.json_response(await _blocking(run))


# --- jobs and metrics --------------------------------------------------------------------------
async def jobs(request: web.Request) -> web.Response:
    return web.json_response([j.to_json() for j in _console(request).jobs.list()])


async def job(request: web.Request) -> web.Response:
    found = _console(request).jobs.get(request.match_info["job_id"])
    if found is None:
        raise NotFound(f"no job {request.match_info['job_id']} (the console keeps the last "
                       "100, and none across a restart)")
    return web.json_response(found.to_json())


async def metrics(request: web.Request) -> web.Response:
    text = request.query.get("window_s", str(int(WINDOW_S)))
    try:
        window_s = float(text)
    except ValueError:
        raise UserError(f"window_s must be a number of seconds, got {text!r}") from None
    sampler = _console(request).sampler
    return web.json_response({"interval_s": sampler.interval_s,
                              "samples": sampler.series(min(window_s, WINDOW_S))})
