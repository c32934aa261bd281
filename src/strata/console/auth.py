"""The console's login: a token made by `strata init` (ENV/console.token, mode 0600), given
once on the login page; the browser then holds a session cookie derived from it. API
clients may send `Authorization: Bearer TOKEN` instead. Nothing but the login page is
served without one of the two.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from strata.control.env import Environment

COOKIE = "strata_console"
PUBLIC_PATHS = frozenset({"/login", "/api/v1/login", "/static/style.css"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def token_path(env: Environment) -> str:
    return str(env.console_token_path)


def session_value(token: str) -> str:
    """The cookie's value: bound to the token (a new token ends every session)."""
    return hmac.new(token.encode(), b"strata-console-session", hashlib.sha256).hexdigest()


def token_matches(token: str, given: str) -> bool:
    return hmac.compare_digest(token.encode(), given.strip().encode())


def authenticated(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer ") and token_matches(token, header[len("Bearer "):]):
        return True
    cookie = request.cookies.get(COOKIE)
    return cookie is not None and hmac.compare_digest(cookie, session_value(token))


def auth_middleware(token: str) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS or authenticated(request, token):
            return await handler(request)
        if request.path.startswith("/api/"):
            return web.json_response({"error": "log in first: POST /api/v1/login with the "
                                               "token in the environment's console.token, or "
                                               "send Authorization: Bearer TOKEN",
                                      "kind": "Unauthorized"}, status=401)
        raise web.HTTPSeeOther("/login")

    return middleware


def set_session(response: web.StreamResponse, token: str) -> None:
    response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="Strict",
                        path="/")
