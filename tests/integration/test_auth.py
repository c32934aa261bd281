"""JWT auth of the pageserver and the safekeepers, route by route from their OpenAPI documents.

Real processes started with a public key. For every documented route and method of each
HTTP API: no token, a malformed, forged or expired token get 401; a token for another
tenant gets 403; the route's own tenant (where the path names one) and an admin token get
past the check (the handler then answers, e.g. 404 for the unknown ids used here; no
request creates anything). `/metrics` needs no token. The pg ports: no or a bad token is
refused at start-up (28P01), another tenant's token at the command (42501). At the end,
`strata init` (auth on by default) runs a whole environment with tokens.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fixtures_env import PageserverProcess, SafekeeperProcess

from strata.common.auth import (
    ADMIN_SCOPE,
    PRIVATE_KEY_FILE,
    Scope,
    encode_token,
    generate_keypair,
    token_from_key_file,
)
from strata.common.errors import UserError
from strata.common.ids import TenantId, TimelineId
from strata.pageserver.http import OPENAPI_PATH as PAGESERVER_DOC
from strata.pg.pgclient import PgConnection, ServerError
from strata.safekeeper.http import OPENAPI_PATH as SAFEKEEPER_DOC

METHODS = ("get", "post", "put", "delete", "patch")
TENANT_A = TenantId(secrets.token_bytes(16))
TENANT_B = TenantId(secrets.token_bytes(16))
TIMELINE = TimelineId(secrets.token_bytes(16))
OPEN = {"/metrics"}


class Tokens:
    """Every kind of token the tests send, signed with the services' key or not."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        private, self.public_key = generate_keypair(directory)
        key = private.read_bytes()
        other = directory / "other"
        other.mkdir()
        generate_keypair(other)
        self.admin = encode_token(key, ADMIN_SCOPE)
        self.tenant_a = encode_token(key, Scope(TENANT_A))
        self.tenant_b = encode_token(key, Scope(TENANT_B))
        self.refused = {"no token": None, "garbage": "garbage",
                        "forged": token_from_key_file(other / PRIVATE_KEY_FILE),
                        "expired": encode_token(key, ADMIN_SCOPE,
                                                expires_at=int(time.time()) - 10)}


@pytest.fixture
def tokens(test_dir: Path) -> Tokens:
    return Tokens(test_dir / "keys")


def documented(doc_path: Path) -> list[tuple[str, str]]:
    doc = json.loads(doc_path.read_text())
    return [(path, method) for path, item in doc["paths"].items() for method in item
            if method in METHODS]


def call(port: int, method: str, path: str, token: str | None) -> tuple[int, Any, str]:
    """One request; (status, decoded body, WWW-Authenticate). Bodies are a JSON string,
    which every create/update route refuses (400): the check is all that is tested."""
    data = b'"not an object"' if method in ("post", "put", "patch") else None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 method=method.upper(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, raw, challenge = resp.status, resp.read(), ""
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
        challenge = err.headers.get("WWW-Authenticate", "")
    try:
        body = json.loads(raw)
    except ValueError:
        body = raw.decode(errors="replace")
    return status, body, challenge


def check_routes(port: int, doc_path: Path, tokens: Tokens) -> int:
    """Every documented route against every kind of token; returns the routes checked."""
    failures = []
    routes = documented(doc_path)
    for template, method in routes:
        path = template.replace("{tenant_id}", str(TENANT_A)) \
            .replace("{timeline_id}", str(TIMELINE))
        names_tenant = "{tenant_id}" in template

        def expect(what: str, token: str | None, ok: bool, *, want: int | None = None,
                   method: str = method, path: str = path) -> None:
            status, body, challenge = call(port, method, path, token)
            if want is not None:
                good = status == want
            else:
                good = status not in (401, 403) if ok else status == 403
            if status == 401:
                good = good and challenge == "Bearer" and body.get("kind") == "Unauthorized"
            if not good:
                failures.append(f"{method.upper()} {path} with {what}: {status} {body!r}")

        if template in OPEN:
            for what, token in tokens.refused.items():
                expect(what, token, True, want=200)
            continue
        for what, token in tokens.refused.items():
            expect(what, token, False, want=401)
        expect("tenant B's token", tokens.tenant_b, False)
        expect("tenant A's token", tokens.tenant_a, names_tenant)
        expect("an admin token", tokens.admin, True)
    assert not failures, "\n".join(failures)
    return len(routes)


def test_pageserver_http_routes(test_dir: Path, tokens: Tokens) -> None:
    """Each route of the pageserver's OpenAPI document refuses what it must."""
    ps = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log",
                           [f"auth_public_key_path={tokens.public_key}"])
    ps.start()
    try:
        assert check_routes(ps.http_port, PAGESERVER_DOC, tokens) >= 20
    finally:
        assert ps.stop() == 0
    log = (test_dir / "pageserver.log").read_text()
    assert "auth on" in log
    assert not re.search(r" (ERROR|WARNING) |Traceback", log), log[-3000:]


def test_safekeeper_http_routes(test_dir: Path, tokens: Tokens) -> None:
    """Each route of the safekeeper's OpenAPI document (served at /v1/openapi.json) refuses
    what it must."""
    sk = SafekeeperProcess(1, test_dir / "sk1", test_dir / "sk1.log",
                           extra_args=["--auth-public-key", str(tokens.public_key)],
                           token=tokens.admin)
    sk.start()
    try:
        assert sk.http("GET", "/v1/openapi.json") == json.loads(SAFEKEEPER_DOC.read_text())
        assert check_routes(sk.http_port, SAFEKEEPER_DOC, tokens) >= 5
    finally:
        assert sk.stop() == 0
    assert not re.search(r" (ERROR|WARNING) |Traceback", (test_dir / "sk1.log").read_text())


def test_safekeeper_document_lists_every_route(test_dir: Path) -> None:
    """The safekeeper's OpenAPI document and its aiohttp routes are the same set."""
    from strata.safekeeper.http import make_app
    from strata.safekeeper.server import Safekeeper, SafekeeperConfig

    app = make_app(Safekeeper(SafekeeperConfig(node_id=1, workdir=test_dir / "sk")))
    routes = {(r.resource.canonical, r.method.lower()) for r in app.router.routes()
              if r.resource is not None and r.method.lower() in METHODS}
    assert routes == set(documented(SAFEKEEPER_DOC))


async def pg_outcome(port: int, token: str | None, command: str) -> str:
    """'refused:<sqlstate>' at start-up, 'error:<sqlstate>' at the command, or 'ok'."""
    try:
        conn = await PgConnection.connect("127.0.0.1", port, user="strata", password=token,
                                          timeout_s=30)
    except ServerError as err:
        return f"refused:{err.code}"
    except UserError as err:
        assert "asks for a password" in str(err), err
        return "refused:no password"
    try:
        await conn.simple_query(command)
        return "ok"
    except ServerError as err:
        return f"error:{err.code}"
    finally:
        await conn.close()


def check_pg_port(port: int, commands: list[str], tokens: Tokens) -> None:
    expected = {"no token": "refused:no password", "garbage": "refused:28P01",
                "forged": "refused:28P01", "expired": "refused:28P01"}
    got = {}
    for command in commands:
        for what, token in tokens.refused.items():
            got[(command, what)] = asyncio.run(pg_outcome(port, token, command))
        for what, token in (("tenant B", tokens.tenant_b), ("tenant A", tokens.tenant_a),
                            ("admin", tokens.admin)):
            got[(command, what)] = asyncio.run(pg_outcome(port, token, command))
    want = {}
    for command in commands:
        want.update({(command, what): outcome for what, outcome in expected.items()})
        # Past the check, the unknown timeline is NotFound (42704).
        want.update({(command, "tenant B"): "error:42501", (command, "tenant A"): "error:42704",
                     (command, "admin"): "error:42704"})
    assert got == want


def test_pg_ports(test_dir: Path, tokens: Tokens) -> None:
    """The pageserver's and the safekeeper's pg ports take the token as the password and
    check it against the tenant of each command."""
    ps = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log",
                           [f"auth_public_key_path={tokens.public_key}"])
    sk = SafekeeperProcess(1, test_dir / "sk1", test_dir / "sk1.log",
                           extra_args=["--auth-public-key", str(tokens.public_key)],
                           token=tokens.admin)
    ps.start()
    sk.start()
    try:
        check_pg_port(ps.pg_port, [f"pagestream {TENANT_A} {TIMELINE}",
                                   f"basebackup {TENANT_A} {TIMELINE}"], tokens)
        check_pg_port(sk.pg_port, [f"proposer {TENANT_A} {TIMELINE}",
                                   f"START_REPLICATION PHYSICAL 0/0 {TENANT_A} {TIMELINE}"],
                      tokens)
    finally:
        assert sk.stop() == 0
        assert ps.stop() == 0
    for name in ("pageserver.log", "sk1.log"):
        log = (test_dir / name).read_text()
        assert not re.search(r" (ERROR|WARNING) |Traceback", log), (name, log[-3000:])


STRATA = str(Path(sys.executable).parent / "strata")


def test_cli_environment_with_auth(test_dir: Path) -> None:
    """`strata init` makes keys and turns auth on: the CLI works with its own admin token,
    `strata auth token` prints a tenant token that reaches that tenant only, and the
    services refuse requests without one."""
    repo = test_dir / "env"

    def strata(*args: str, token: str | None = None,
               ok: bool = True) -> subprocess.CompletedProcess[str]:
        environ = {k: v for k, v in os.environ.items() if k != "STRATA_AUTH_TOKEN"}
        if token is not None:
            environ["STRATA_AUTH_TOKEN"] = token
        proc = subprocess.run([STRATA, "--repo-dir", str(repo), *args], capture_output=True,
                              text=True, timeout=300, check=False, env=environ)
        assert (proc.returncode == 0) == ok, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    try:
        strata("init")
        config = (repo / "config.toml").read_text()
        assert "auth = true" in config
        assert (repo / PRIVATE_KEY_FILE).stat().st_mode & 0o777 == 0o600
        http_port = int(re.search(r"\[pageserver\][^\[]*http_port = (\d+)", config,
                                  re.S).group(1))  # type: ignore[union-attr]
        tenant = json.loads((repo / "state.json").read_text())["default_tenant"]
        token = strata("auth", "token").stdout.strip()
        status, body, _ = call(http_port, "get", f"/v1/tenant/{tenant}/timeline", None)
        assert status == 401, body
        status, body, _ = call(http_port, "get", f"/v1/tenant/{tenant}/timeline", token)
        assert status == 200 and len(body) == 1, body
        status, body, _ = call(http_port, "get", "/v1/tenant", token)
        assert status == 403, body
        # The CLI with a tenant token: its tenant's timelines yes, a new tenant no.
        listing = strata("timeline", "list", "--json", token=token).stdout
        assert json.loads(listing)[0]["branch"] == "main"
        refused = strata("tenant", "create", "--name", "other", token=token, ok=False).stderr
        last = refused.splitlines()[-1]
        assert last.startswith("strata: error:") and "needs an admin token" in last, refused
        strata("status")  # its own admin token
        # A lazy compute's FUSE process reads pages with a token for its tenant only.
        strata("endpoint", "start", "main")
        ep = json.loads(strata("endpoint", "list", "--json").stdout)[0]
        assert ep["compute_mode"] == "lazy", ep
        # `strata endpoint start` started the FUSE server before its arguments were known
        # (strata.compute.fuse_early): it got its token on its stdin, not in its
        # environment, which must not hold another (e.g. the CLI's admin) token; its log
        # names the scope of the token it uses.
        compute = repo / "endpoints" / "main" / "compute"
        fuse_pid = (compute / "lazyfs.pid").read_text()
        environ = Path(f"/proc/{int(fuse_pid)}/environ").read_bytes().split(b"\0")
        env_tokens = [v for k, _, v in (e.partition(b"=") for e in environ)
                      if k == b"STRATA_AUTH_TOKEN"]
        for fuse_token in env_tokens:  # a server spawned the usual way has it there
            payload = fuse_token.decode().split(".")[1]
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            assert claims["scope"] == f"tenant:{tenant}", claims
        assert f"page requests carry a token of scope tenant:{tenant}" in \
            (compute / "lazyfs.log").read_text()
        with psycopg.connect(ep["local_connstr"], autocommit=True) as conn:  # pages read
            assert conn.execute("select count(*) > 0 from pg_class").fetchone() == (True,)
        # Key rotation: the running pageserver takes the new key set without a restart.
        # The services hold tokens of the first key, so that one stays; the second goes.
        first_kid = json.loads(strata("auth", "keys", "--json").stdout)[0]["key_id"]
        second_kid = strata("auth", "rotate").stdout.strip()
        second = strata("auth", "token", "--admin").stdout.strip()
        assert call(http_port, "get", "/v1/tenant", second)[0] == 200
        assert call(http_port, "get", f"/v1/tenant/{tenant}/timeline", token)[0] == 200
        third_kid = strata("auth", "rotate").stdout.strip()
        third = strata("auth", "token", "--admin").stdout.strip()
        assert "signs the environment's tokens" in strata("auth", "retire", third_kid,
                                                          ok=False).stderr
        strata("auth", "retire", second_kid)
        status, body, _ = call(http_port, "get", "/v1/tenant", second)
        assert status == 401 and "retired" in str(body), body
        assert call(http_port, "get", "/v1/tenant", third)[0] == 200
        assert call(http_port, "get", f"/v1/tenant/{tenant}/timeline", token)[0] == 200
        keys = json.loads(strata("auth", "keys", "--json").stdout)
        assert keys == [{"key_id": first_kid, "signing": False},
                        {"key_id": third_kid, "signing": True}], keys
        strata("status")
    finally:
        if (repo / "state.json").exists():
            subprocess.run([STRATA, "--repo-dir", str(repo), "stop", "--immediate"],
                           capture_output=True, timeout=120, check=False)
    log = (repo / "logs" / "pageserver.log").read_text()
    assert not re.search(r" (ERROR|WARNING) |Traceback", log), log[-3000:]
