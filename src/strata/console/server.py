"""The console's aiohttp application and `serve()`: what `strata console` runs (and what
`strata start` starts in the background as `python -m strata.console`).

    GET  /login, /static/*, /                    the UI (login page; the rest needs a session)
    POST /api/v1/login, /api/v1/logout
    GET  /api/v1/openapi.json, /api/v1/status
    GET  /api/v1/tenants;  GET/POST /api/v1/tenants/{tenant}/branches
    POST /api/v1/tenants/{tenant}/branches/{branch}/restore;  DELETE .../{branch}
    GET/POST /api/v1/endpoints;  POST /api/v1/endpoints/{name}/start|stop|sql
    GET  /api/v1/jobs, /api/v1/jobs/{job_id}, /api/v1/metrics

Errors are JSON `{"error": message, "kind": ...}`: 400 bad input, 401 not logged in, 404
unknown, 409 conflict, 503 a service is down; an unexpected exception is logged with
its traceback and answered 500 with its type and message only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

from aiohttp import web

from strata.common.errors import Conflict, NotFound, StrataError, Unavailable
from strata.console import api, auth
from strata.console.api import CONSOLE, Console
from strata.console.jobs import Jobs
from strata.console.metrics import Sampler
from strata.control.env import Environment

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).with_name("static")
URL_FILE = "console.url"  # written once the console listens: its address


def _status_for(err: StrataError) -> int:
    if isinstance(err, NotFound):
        return 404
    if isinstance(err, Conflict):
        return 409
    if isinstance(err, Unavailable):
        return 503
    return 400


@web.middleware
async def error_middleware(request: web.Request, handler: auth.Handler) \
        -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as err:
        if err.status >= 400 and request.path.startswith("/api/"):
            return web.json_response({"error": f"{request.method} {request.path}: "
                                               f"{err.reason}", "kind": type(err).__name__},
                                     status=err.status)
        raise
    except StrataError as err:
        status = _status_for(err)
        log.info("%s %s -> %d: %s", request.method, request.path, status, err)
        return web.json_response({"error": str(err), "kind": type(err).__name__},
                                 status=status)
    except Exception as err:  # noqa: BLE001 - the UI gets a message, the log the traceback
        log.exception("%s %s failed", request.method, request.path)
        return web.json_response({"error": f"internal error: {type(err).__name__}: {err}",
                                  "kind": "InternalError"}, status=500)


def _page(name: str) -> web.FileResponse:
    response = web.FileResponse(STATIC_DIR / name)
    response.headers["Cache-Control"] = "no-store"
    return response


async def index(request: web.Request) -> web.FileResponse:
    return _page("index.html")


async def login_page(request: web.Request) -> web.FileResponse:
    return _page("login.html")


def make_app(console: Console) -> web.Application:
    # The auth middleware runs first: nothing else sees an unauthenticated request.
    app = web.Application(middlewares=[error_middleware, auth.auth_middleware(console.token)],
                          client_max_size=1 << 20)
    app[CONSOLE] = console
    v1 = "/api/v1"
    tenant = v1 + "/tenants/{tenant}"
    ep = v1 + "/endpoints/{name}"
    app.add_routes([
        web.get("/", index, allow_head=False),
        web.get("/login", login_page, allow_head=False),
        web.static("/static", STATIC_DIR, append_version=False),
        web.post(v1 + "/login", api.login),
        web.post(v1 + "/logout", api.logout),
        web.get(v1 + "/openapi.json", api.openapi, allow_head=False),
        web.get(v1 + "/status", api.status, allow_head=False),
        web.get(v1 + "/tenants", api.tenants, allow_head=False),
        web.post(v1 + "/tenants", api.create_tenant),
        web.get(tenant + "/branches", api.branches, allow_head=False),
        web.post(tenant + "/branches", api.create_branch),
        web.post(tenant + "/branches/{branch}/restore", api.restore_branch),
        web.delete(tenant + "/branches/{branch}", api.delete_branch),
        web.get(v1 + "/endpoints", api.endpoints, allow_head=False),
        web.post(v1 + "/endpoints", api.create_endpoint),
        web.delete(ep, api.delete_endpoint),
        web.post(ep + "/start", api.start_endpoint),
        web.post(ep + "/stop", api.stop_endpoint),
        web.post(ep + "/sql", api.run_sql),
        web.get(v1 + "/jobs", api.jobs, allow_head=False),
        web.get(v1 + "/jobs/{job_id}", api.job, allow_head=False),
        web.get(v1 + "/metrics", api.metrics, allow_head=False),
    ])
    return app


async def serve(env: Environment, host: str, port: int, *,
                sample_interval_s: float | None = None) -> None:
    """Serve the console on host:port until SIGTERM or SIGINT (running jobs finish first)."""
    token = env.console_token()
    sampler = Sampler(env) if sample_interval_s is None else Sampler(env, sample_interval_s)
    console = Console(env, token, Jobs(), sampler)
    runner = web.AppRunner(make_app(console), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    url = f"http://{host}:{port}/"
    (env.run_dir / URL_FILE).write_text(url + "\n")
    log.info("console serving %s for %s", url, env.root)
    sampling = asyncio.get_running_loop().create_task(sampler.run())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("console stopping")
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        await console.jobs.wait_all()
        await runner.cleanup()
        (env.run_dir / URL_FILE).unlink(missing_ok=True)
        log.info("console stopped")
