"""An aiohttp middleware that checks the JWT of every request (strata.common.auth).

Every route but `GET /metrics` needs `Authorization: Bearer <token>`. A route whose path
names a tenant (the match variable `tenant_param`) takes that tenant's token or an admin
token; any other route takes only an admin token. Answers, in the API's JSON error
shape `{"error", "kind"}`: 401 (with `WWW-Authenticate: Bearer`) for a missing, malformed,
forged or expired token; 403 for a token whose scope does not cover the route. Requests
that match no route pass through, so they still get their 404/405.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from strata.common.auth import AuthError, Forbidden, TokenVerifier

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/metrics"})


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def auth_middleware(verifier: TokenVerifier, *, tenant_param: str = "tenant_id") -> Middleware:
    """The middleware; put it first so that it runs before any other."""

    @web.middleware
    async def check_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or request.match_info.http_exception is not None:
            return await handler(request)
        try:
            scope = verifier.verify(bearer_token(request))
            tenant = request.match_info.get(tenant_param)
            if tenant is not None:
                scope.check_tenant(tenant)
            else:
                scope.check_admin(f"{request.method} {request.path}")
        except AuthError as err:
            log.info("%s %s -> 401: %s", request.method, request.path, err)
            return web.json_response({"error": str(err), "kind": "Unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        except Forbidden as err:
            log.info("%s %s -> 403: %s", request.method, request.path, err)
            return web.json_response({"error": str(err), "kind": "Forbidden"}, status=403)
        return await handler(request)

    return check_auth
