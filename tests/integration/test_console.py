"""The web console (`strata console`, started by `strata start`) end to end: its JSON API
over real processes, and its UI in Debian's headless chromium driven by Playwright.

One environment (`strata init` + `strata start`: pageserver, three safekeepers, endpoint
`main`) serves the whole module; it is stopped at the end, and the console's log must
hold no ERROR, WARNING or traceback. Screenshots of each page go to the module's
directory (two also to docs/, for the README, with STRATA_CONSOLE_SCREENSHOTS=docs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
from strata.console.api import Console
from strata.console.jobs import Jobs
from strata.console.metrics import Sampler, connection_counts
from strata.console.server import make_app
from strata.control.env import Environment

STRATA = str(Path(sys.executable).parent / "strata")
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 180_000  # generous: the machine is shared and loaded
DOCS = Path(__file__).resolve().parents[2] / "docs"


@dataclass
class ConsoleEnv:
    repo_dir: Path
    out_dir: Path
    url: str
    token: str
    main: str  # connection string of endpoint main

    def strata(self, *args: str) -> str:
        proc = subprocess.run([STRATA, "--repo-dir", str(self.repo_dir), *args],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *,
             token: str | None = "", cookie: str | None = None) -> tuple[int, Any]:
        """One API call; token "" means the right token, None none at all."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token or self.token}"
        if cookie is not None:
            headers["Cookie"] = cookie
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def wait_job(self, job: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT_MS / 1000
        while time.monotonic() < deadline:
            status, current = self.call("GET", f"api/v1/jobs/{job['id']}")
            assert status == 200, current
            if current["state"] != "running":
                return current  # type: ignore[no-any-return]
            time.sleep(0.3)
        raise AssertionError(f"job {job} still running")


def _rows(connstr: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(connstr, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleEnv]:
    out = tmp_path_factory.mktemp("console")
    os.chmod(out, 0o755)
    ensure_traversable(out)
    repo = out / "env"
    env = ConsoleEnv(repo, out, "", "", "")
    try:
        env.strata("init")
        started = env.strata("start")
        url = re.search(r"console: (http://\S+)", started)
        assert url is not None, started
        env.url = url.group(1)
        env.token = (repo / "console.token").read_text().strip()
        assert (repo / "console.token").stat().st_mode & 0o077 == 0  # 0600
        # The printed connection string is the proxy's; the test's own is the socket.
        assert "postgresql://strata@main." in started.strip().splitlines()[-1], started
        main = next(e for e in json.loads(env.strata("endpoint", "list", "--json"))
                    if e["name"] == "main")
        env.main = main["local_connstr"]
        yield env
    finally:
        subprocess.run([STRATA, "--repo-dir", str(repo), "stop", "--immediate"],
                       capture_output=True, timeout=180, check=False)
    log = (repo / "logs" / "console.log").read_text()
    bad = [line for line in log.splitlines()
           if " ERROR " in line or " WARNING " in line or "Traceback" in line]
    assert not bad, bad


# --- the API -----------------------------------------------------------------------------------
def test_nothing_served_without_login(console: ConsoleEnv) -> None:
    """Without the token or the session cookie every page but the login page redirects to
    it and every API route answers 401 JSON; a wrong token is refused; the right one gives
    a cookie that works."""
    for path in ("api/v1/tenants", "api/v1/openapi.json", "api/v1/endpoints/main/sql"):
        status, body = console.call("GET", path, token=None)
        assert status == 401, (path, status, body)
        assert "console.token" in body["error"]
    req = urllib.request.Request(console.url + "static/app.js")

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.build_opener(NoRedirect).open(req, timeout=30)
    assert err.value.code == 303 and err.value.headers["Location"] == "/login"
    status, body = console.call("GET", "api/v1/tenants", token="wrong")
    assert status == 401
    status, body = console.call("POST", "api/v1/login", {"token": "wrong"}, token=None)
    assert status == 401 and "wrong token" in body["error"]
    req = urllib.request.Request(console.url + "api/v1/login", method="POST",
                                 data=json.dumps({"token": console.token}).encode())
    with urllib.request.urlopen(req, timeout=30) as resp:
        cookie = resp.headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in resp.headers["Set-Cookie"]
    status, body = console.call("GET", "api/v1/tenants", token=None, cookie=cookie)
    assert status == 200 and body[0]["name"] == "default"


def test_openapi_describes_every_route(console: ConsoleEnv) -> None:
    """The OpenAPI document served at /api/v1/openapi.json names exactly the API's routes
    and methods."""
    status, doc = console.call("GET", "api/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, item in doc["paths"].items()
                  for method in item if method != "parameters"}
    env = Environment(console.repo_dir)
    app = make_app(Console(env, "token", Jobs(), Sampler(env)))
    served = {(route.resource.canonical.removeprefix("/api/v1"), route.method)
              for route in app.router.routes()
              if route.resource is not None and route.resource.canonical.startswith("/api/")}
    assert documented == served


def test_sql_is_read_only_and_limited(console: ConsoleEnv) -> None:
    """The SQL box's API runs one statement read-only: writes and a second statement are
    refused with PostgreSQL's message (the data is untouched), rows are capped at `limit`
    with `truncated` set, and values JSON lacks come back as text."""
    _rows(console.main, "create table if not exists sqlbox (id int)")
    _rows(console.main, "insert into sqlbox select generate_series(1, 50)")
    sql = "api/v1/endpoints/main/sql"
    status, body = console.call("POST", sql, {"query": "delete from sqlbox"})
    assert status == 400 and "read-only transaction" in body["error"], body
    status, body = console.call("POST", sql, {"query": "select 1; delete from sqlbox"})
    assert status == 400 and "multiple commands" in body["error"], body
    status, body = console.call("POST", sql, {"query": "select id, id % 7 as m, "
                                              "now()::date as d from sqlbox order by id",
                                              "limit": 10})
    assert status == 200, body
    assert body["columns"] == ["id", "m", "d"] and body["truncated"] is True
    assert [r[0] for r in body["rows"]] == list(range(1, 11))
    assert isinstance(body["rows"][0][2], str)
    assert _rows(console.main, "select count(*) from sqlbox") == [(50,)]
    status, body = console.call("POST", "api/v1/endpoints/nosuch/sql", {"query": "select 1"})
    assert status == 404 and "no endpoint named 'nosuch'" in body["error"]


def test_errors_are_messages(console: ConsoleEnv) -> None:
    """Bad input and refused operations answer a one-line JSON message (no traceback);
    a job that fails reports its error; deleting a branch with children is refused."""
    status, body = console.call("POST", "api/v1/tenants/default/branches",
                                {"name": "x", "parent": "main", "at": "yesterday-ish"})
    assert status == 400 and "neither an LSN" in body["error"]
    status, body = console.call("POST", "api/v1/tenants/default/branches",
                                {"name": "bad name!", "parent": "main"})
    assert status == 400 and "invalid branch name" in body["error"]
    status, body = console.call("POST", "api/v1/tenants/default/branches",
                                {"name": "x", "parent": "nosuch"})
    assert status == 202
    failed = console.wait_job(body)
    assert failed["state"] == "failed" and "no branch named 'nosuch'" in failed["error"]
    status, body = console.call("POST", "api/v1/tenants/default/branches",
                                {"name": "parent1", "parent": "main"})
    assert console.wait_job(body)["state"] == "done"
    status, body = console.call("POST", "api/v1/tenants/default/branches",
                                {"name": "child1", "parent": "parent1"})
    assert console.wait_job(body)["state"] == "done"
    status, body = console.call("DELETE", "api/v1/tenants/default/branches/parent1")
    assert status == 409 and "child branches ['child1']" in body["error"]
    for name in ("child1", "parent1"):
        status, body = console.call("DELETE", f"api/v1/tenants/default/branches/{name}")
        assert console.wait_job(body)["state"] == "done", body
    names = {b["branch"] for b in console.call(
        "GET", "api/v1/tenants/default/branches")[1]["branches"]}
    assert "parent1" not in names and "child1" not in names
    status, body = console.call("DELETE", "api/v1/endpoints/main")
    assert status == 409 and "endpoint main is running; stop it first" in body["error"]
    status, body = console.call("DELETE", "api/v1/endpoints/nosuch")
    assert status == 404 and "no endpoint named 'nosuch'" in body["error"]
    status, body = console.call("POST", "api/v1/tenants", {"name": "bad name!"})
    assert status == 400 and "invalid tenant name" in body["error"]
    status, body = console.call("POST", "api/v1/tenants", {"name": "default"})
    failed = console.wait_job(body)
    assert failed["state"] == "failed" and "exists already" in failed["error"]
    for body_text in (b"[1]", b"{not json"):
        req = urllib.request.Request(console.url + "api/v1/endpoints", data=body_text,
                                     method="POST",
                                     headers={"Authorization": f"Bearer {console.token}"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=30)
        assert err.value.code == 400
        assert "Traceback" not in err.value.read().decode()


def test_metrics_sampler_fills_the_hour(console: ConsoleEnv) -> None:
    """The sampler scrapes the pageserver and safekeepers: samples carry layer counts and
    bytes, and the running endpoint's connections."""
    deadline = time.monotonic() + WAIT_MS / 1000
    samples: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        status, body = console.call("GET", "api/v1/metrics?window_s=3600")
        assert status == 200
        samples = [s for s in body["samples"] if "main" in s["connections"]]
        if samples:
            break
        time.sleep(1)
    assert samples, body
    last = samples[-1]
    assert last["layers"] >= 1 and last["layer_bytes"] > 0, last
    assert last["getpage_requests"] is not None and last["commit_lag_bytes"] is not None
    # No client is connected now: the sidecar's own session (pull mode) is not counted.
    assert connection_counts(Environment(console.repo_dir)) == {"main": 0}
    # A restarted console starts with the stored hour, not with empty charts.
    restarted = Sampler(Environment(console.repo_dir))
    assert any(s.at == last["at"] and "main" in s.connections for s in restarted.ring)
    status = json.loads(console.strata("status", "--json"))["console"]
    assert status["state"] == "running" and status["url"] == console.url, status


# --- the UI in chromium ------------------------------------------------------------------------
DOCS_SHOTS = {"restored": "console.png", "metrics": "console-metrics.png"}


def _shot(page: Any, console: ConsoleEnv, name: str) -> None:
    page.screenshot(path=str(console.out_dir / f"console-{name}.png"), full_page=True)
    if os.environ.get("STRATA_CONSOLE_SCREENSHOTS") == "docs" and name in DOCS_SHOTS:
        page.screenshot(path=str(DOCS / DOCS_SHOTS[name]), full_page=True)


def test_browser_branch_start_query_restore(console: ConsoleEnv) -> None:
    """In headless chromium: log in; create a branch at a timestamp with the dialog (it
    holds what main had then); create and start its endpoint (progress shown live); run
    a query on it in the SQL box (the result table shows the old rows only); restore
    main to that timestamp with the confirmation (main's data goes back, its previous
    timeline is kept as a backup branch); the tree shows main and the new branch under
    the backup. A screenshot of each page is saved."""
    from playwright.sync_api import expect, sync_playwright

    _rows(console.main, "create table fruit (name text)")
    _rows(console.main, "insert into fruit values ('apple')")
    moment = _rows(console.main, "select clock_timestamp()")[0][0].isoformat()
    _rows(console.main, "insert into fruit values ('banana')")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(WAIT_MS)
            expect.set_options(timeout=WAIT_MS)
            page.goto(console.url)
            expect(page.locator("#login-form")).to_be_visible()
            _shot(page, console, "login")
            page.fill("#token", "wrong")
            page.click("#login-button")
            expect(page.locator("#login-error")).to_contain_text("wrong token")
            page.fill("#token", console.token)
            page.click("#login-button")
            expect(page.locator("section[data-page=tenants]")).to_contain_text("default")
            # prompt() asks for the new tenant's name; confirm() for an endpoint delete.
            page.on("dialog", lambda d: d.accept("second") if d.type == "prompt"
                    else d.accept())
            page.click("#new-tenant")
            expect(page.locator("#activity .job").first).to_contain_text("create tenant")
            expect(page.locator("section[data-page=tenants] tbody")).to_contain_text("second")
            _shot(page, console, "tenants")

            page.click("a[data-nav=branches]")
            main_node = page.locator(".node[data-branch=main]")
            expect(main_node).to_be_visible()
            expect(main_node.locator(".endpoint[data-endpoint=main] .badge")) \
                .to_have_text("running")
            page.click("#new-branch")
            page.select_option("#branch-parent", "main")
            page.fill("#branch-name", "before-banana")
            page.check("#point-timestamp")
            page.fill("#branch-at", moment)
            page.click("#branch-create")
            node = page.locator(".node[data-branch=before-banana]")
            expect(node).to_be_visible()
            expect(node).to_contain_text("from main @")

            node.locator("[data-action=create-endpoint]").click()
            endpoint = node.locator(".endpoint[data-endpoint=before-banana]")
            expect(endpoint).to_be_visible()
            endpoint.locator("[data-action=start]").click()
            # The start runs as a job whose progress lines show up live.
            expect(page.locator("#activity .job").first).to_contain_text("start endpoint")
            expect(endpoint.locator(".badge")).to_have_text("running")
            expect(endpoint.locator(".connstr")).to_contain_text("postgresql://")
            _shot(page, console, "branches")

            page.click("a[data-nav=sql]")
            page.select_option("#sql-endpoint", "before-banana")
            page.fill("#sql-query", "select name from fruit order by name")
            page.click("#sql-run")
            table = page.locator("#sql-table")
            expect(table).to_be_visible()
            assert table.locator("tbody td").all_inner_texts() == ["apple"]
            _shot(page, console, "sql")

            page.click("a[data-nav=branches]")
            expect(main_node).to_be_visible()
            main_node.locator("[data-action=restore]").first.click()
            page.fill("#restore-at", moment)
            expect(page.locator("#restore-submit")).to_be_disabled()
            page.check("#restore-confirm")
            page.click("#restore-submit")
            backup = page.locator(".node[data-branch^='main-before-restore-']")
            expect(backup).to_be_visible()
            under_backup = page.locator("li[data-branch^='main-before-restore-'] > ul")
            expect(under_backup.locator(".node[data-branch=main]")).to_be_visible()
            expect(under_backup.locator(".node[data-branch=before-banana]")).to_be_visible()
            expect(page.locator(".node[data-branch=main] .endpoint .badge")) \
                .to_have_text("running")
            # The backup has a child (main), so its delete button is disabled.
            expect(backup.locator("[data-action=delete]").first).to_be_disabled()
            _shot(page, console, "restored")
            # An endpoint is deleted once stopped (its Delete button shows only then).
            old_ep = page.locator(".endpoint[data-endpoint=before-banana]")
            old_ep.locator("[data-action=stop]").click()
            old_ep.locator("[data-action=delete-endpoint]").click()
            expect(old_ep).to_have_count(0)

            page.click("a[data-nav=metrics]")
            expect(page.locator("figure[data-chart='Layer files'] svg polyline")).to_have_count(1)
            _shot(page, console, "metrics")
        finally:
            browser.close()

    assert _rows(console.main, "select name from fruit order by name") == [("apple",)]
    assert "second" in [t["name"] for t in console.call("GET", "api/v1/tenants")[1]]
    assert "before-banana" not in [e["name"] for e in console.call("GET", "api/v1/endpoints")[1]]
    tree = {b["branch"]: b for b in console.call(
        "GET", "api/v1/tenants/default/branches")[1]["branches"]}
    backup_name = next(n for n in tree if n and n.startswith("main-before-restore-"))
    assert tree["main"]["parent"] == backup_name
    assert tree["before-banana"]["parent"] == backup_name
    assert Lsn.parse(tree["main"]["branch_lsn"]) == Lsn.parse(
        tree["before-banana"]["branch_lsn"])
