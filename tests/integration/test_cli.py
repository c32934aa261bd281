"""The `strata` CLI end to end, run as a real command in a temporary environment directory.

It drives real processes: the pageserver, three safekeepers and stock PostgreSQL 15
endpoints with their walproposer sidecars (the default, wal_mode = "safekeepers"), and
in one test the development mode (D7: the pageserver is each primary's synchronous
standby). Every test stops its environment at the end (`strata stop --immediate`), on
failure too.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from strata.common.lsn import Lsn
from strata.compute.lazy import fuse_unusable_reason

STRATA = str(Path(sys.executable).parent / "strata")


class Cli:
    """Runs `strata --repo-dir DIR ...` and keeps the environment to stop at the end."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir

    def run(self, *args: str, ok: bool = True, timeout_s: float = 180,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([STRATA, "--repo-dir", str(self.repo_dir), *args],
                              capture_output=True, text=True, timeout=timeout_s, check=False,
                              input=input_text)
        if ok and proc.returncode != 0:
            raise AssertionError(f"strata {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        if not ok:
            assert proc.returncode == 1, (args, proc.returncode, proc.stdout, proc.stderr)
            assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    def last_line(self, *args: str) -> str:
        return self.run(*args).stdout.strip().splitlines()[-1]

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def local(self, endpoint: str) -> str:
        """Strata's own connection string of an endpoint: the application role over the
        unix socket (TCP asks for a password)."""
        ep = next(e for e in self.json("endpoint", "list") if e["name"] == endpoint)
        return str(ep["local_connstr"])

    def superuser(self, endpoint: str) -> psycopg.Connection[Any]:
        """Strata's own way in: the superuser over the endpoint's unix socket."""
        ep = next(e for e in self.json("endpoint", "list") if e["name"] == endpoint)
        return psycopg.connect(host=ep["socket_dir"], port=ep["address"].rsplit(":", 1)[1],
                               user="postgres", dbname="postgres", autocommit=True)


@pytest.fixture
def cli(test_dir: Path) -> Iterator[Cli]:
    env = Cli(test_dir / "env")
    try:
        yield env
    finally:
        if (env.repo_dir / "state.json").exists():
            subprocess.run([STRATA, "--repo-dir", str(env.repo_dir), "stop", "--immediate"],
                           capture_output=True, timeout=120, check=False)


def rows(connstr: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(connstr, autocommit=True) as conn:
        cur = conn.execute(query)
        return cur.fetchall() if cur.description else []


def values(connstr: str) -> list[str]:
    return [r[0] for r in rows(connstr, "select v from t order by id")]


@pytest.mark.timeout(1200)  # the longest story in the suite: ~3 min quiet, 10 under load
def test_environment_branches_endpoints_and_restart(cli: Cli) -> None:
    """init + start give three safekeepers and a `main` endpoint for a non-superuser role;
    branches at the head and at a past LSN each see their parent's data of that moment
    and keep their own writes apart; a read-only endpoint at an LSN sees that moment and
    refuses writes; running endpoints block a second start and a timeline delete; commits
    go on while a safekeeper restarts, and all three hold the committed WAL; after
    stopping and starting the whole environment every endpoint comes back with its data,
    its ALTER SYSTEM settings and its statistics, in the compute mode (lazy or full) it
    ran in; a deleted branch is gone from the pageserver and the safekeepers, and with a
    safekeeper down the delete fails clearly and a re-run after starting it finishes."""
    assert "strata start" in cli.last_line("init")
    config = tomllib.loads((cli.repo_dir / "config.toml").read_text())
    assert config["wal_mode"] == "safekeepers"
    assert [sk["id"] for sk in config["safekeepers"]] == [1, 2, 3]
    assert all(sk["pg_port"] > 0 and sk["http_port"] > 0 for sk in config["safekeepers"])
    # While the proxy runs, the connection string handed out is the proxy's.
    assert f"main.localhost:{config['proxy']['port']}/strata" in cli.last_line("start")
    main = cli.local("main")
    assert rows(main, "select current_user, rolsuper from pg_roles "
                      "where rolname = current_user") == [("strata", False)]
    # Computes accept connections from the proxy only (issue 16): started while the proxy
    # runs, a compute does not listen on TCP; the trusted unix socket is in a directory
    # only its owner (PostgreSQL's user) and root reach.
    ep = cli.json("endpoint", "list")[0]
    port = ep["address"].rsplit(":", 1)[1]
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        rows(f"postgresql://strata:guess@127.0.0.1:{port}/strata", "select 1")
    socket_dir = os.stat(ep["socket_dir"])
    assert socket_dir.st_mode & 0o777 == 0o700, oct(socket_dir.st_mode)
    assert socket_dir.st_uid == pwd.getpwnam("postgres").pw_uid

    rows(main, "create table t (id int primary key, v text)")
    rows(main, "insert into t values (1, 'one')")
    lsn1 = rows(main, "select pg_current_wal_lsn()::text")[0][0]
    between = rows(main, "select clock_timestamp()")[0][0]
    time.sleep(0.05)
    rows(main, "insert into t values (2, 'two')")
    lsn2 = rows(main, "select pg_current_wal_lsn()::text")[0][0]

    cli.run("timeline", "branch", "head")  # at main's head: includes 'two'
    cli.run("timeline", "branch", "past", "--at", lsn1)
    tree = {t["branch"]: t for t in cli.json("timeline", "list")}
    assert tree["main"]["parent"] is None
    assert tree["head"]["parent"] == "main" and tree["past"]["parent"] == "main"
    assert tree["past"]["branch_lsn"] == lsn1
    # At a timestamp: the end of the last commit before it, so 'one' but not 'two'.
    cli.run("timeline", "branch", "when", "--at", between.isoformat())
    when = next(t for t in cli.json("timeline", "list") if t["branch"] == "when")
    when_lsn = Lsn.parse(when["branch_lsn"])
    assert Lsn.parse(lsn1) <= when_lsn < Lsn.parse(lsn2), (lsn1, when_lsn, lsn2)
    listing = cli.run("timeline", "list").stdout
    assert f"├─ past @ {lsn1}" in listing and "└─ head @ " in listing  # by branch LSN

    cli.run("endpoint", "create", "head", "--branch", "head")
    cli.run("endpoint", "start", "head", "--mode", "full")
    head = cli.local("head")
    cli.run("endpoint", "create", "past", "--branch", "past")
    cli.run("endpoint", "start", "past")
    past = cli.local("past")
    cli.run("endpoint", "create", "ro", "--branch", "main", "--lsn", lsn1)
    cli.run("endpoint", "start", "ro")
    ro = cli.local("ro")

    rows(main, "insert into t values (3, 'main only')")
    rows(head, "insert into t values (4, 'head only')")
    rows(past, "insert into t values (5, 'past only')")
    assert values(main) == ["one", "two", "main only"]
    assert values(head) == ["one", "two", "head only"]
    assert values(past) == ["one", "past only"]
    assert values(ro) == ["one"]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        rows(ro, "insert into t values (6, 'refused')")

    again = cli.run("endpoint", "start", "head", ok=False)
    assert "endpoint head is still running" in again.stderr
    refused = cli.run("timeline", "delete", "past", ok=False)
    assert "endpoints ['past'] run on it" in refused.stderr
    refused = cli.run("timeline", "delete", "main", ok=False)
    assert "child branches ['head', 'past', 'when']" in refused.stderr

    # A safekeeper restarts while the endpoints run: commits go on (a majority is up),
    # and afterwards every safekeeper has main's WAL up to the last commit.
    before = {sk["id"]: sk for sk in cli.json("status")["safekeepers"]}
    assert set(before) == {1, 2, 3} and all(sk["state"] == "running"
                                            for sk in before.values()), before
    cli.run("safekeeper", "stop", "2")
    rows(main, "insert into t values (8, 'one safekeeper down')")
    cli.run("safekeeper", "start", "2")
    rows(main, "insert into t values (9, 'all three up')")
    committed = Lsn.parse(rows(main, "select pg_current_wal_flush_lsn()::text")[0][0])

    def main_commit_lsns() -> dict[int, Lsn]:
        out = {}
        for sk in cli.json("status")["safekeepers"]:
            tl = next((t for t in sk["timelines"] if t["branch"] == "main"), None)
            out[sk["id"]] = Lsn.parse(tl["commit_lsn"]) if tl else Lsn(0)
        return out

    deadline = time.monotonic() + 30
    while min(main_commit_lsns().values()) < committed:
        assert time.monotonic() < deadline, (main_commit_lsns(), committed)
        time.sleep(0.2)
    status = cli.json("status")
    main_ep = next(e for e in status["endpoints"] if e["name"] == "main")
    assert main_ep["walproposer"]["state"] == "running"
    rows(main, "delete from t where id in (8, 9)")

    with cli.superuser("main") as conn:
        conn.execute("alter system set work_mem = '7MB'")
    inserts = rows(main, "select n_tup_ins from pg_stat_user_tables where relname = 't'")
    assert inserts == [(5,)]
    # Sequences continue where they were after a clean stop (lazy and full computes).
    for connstr in (main, head):
        rows(connstr, "create sequence s")
        assert rows(connstr, "select nextval('s') from generate_series(1, 3)")[-1] == (3,)

    cli.run("stop")
    status = cli.json("status")
    assert set(status) >= {"pageserver", "safekeepers", "endpoints"}
    assert status["pageserver"]["state"] == "stopped"
    assert [sk["state"] for sk in status["safekeepers"]] == ["stopped"] * 3
    assert {e["name"]: e["state"] for e in status["endpoints"]} == {
        "main": "stopped", "head": "stopped", "past": "stopped", "ro": "stopped"}

    started = cli.run("start").stdout
    assert started.count("postgresql://") == 4, started
    assert values(main) == ["one", "two", "main only"]
    assert values(head) == ["one", "two", "head only"]
    assert values(past) == ["one", "past only"]
    assert values(ro) == ["one"]
    assert rows(main, "show work_mem") == [("7MB",)]
    assert rows(main, "select n_tup_ins from pg_stat_user_tables where relname = 't'") \
        == inserts
    rows(main, "insert into t values (7, 'after restart')")  # still writable and durable
    assert rows(main, "select nextval('s')") == rows(head, "select nextval('s')") == [(4,)]

    status = cli.json("status")
    assert status["pageserver"]["state"] == "running"
    assert [sk["state"] for sk in status["safekeepers"]] == ["running"] * 3
    by_name = {e["name"]: e for e in status["endpoints"]}
    assert all(e["state"] == "running" for e in by_name.values()), by_name
    # `head` keeps the full mode it was started with; the others take the default.
    default_mode = "lazy" if fuse_unusable_reason() is None else "full"
    assert {name: e["compute_mode"] for name, e in by_name.items()} == {
        "main": default_mode, "head": "full", "past": default_mode, "ro": default_mode}
    assert by_name["ro"]["mode"] == "read-only" and by_name["ro"]["lsn"] == lsn1
    main_tl = next(t for t in status["pageserver"]["timelines"] if t["branch"] == "main")
    assert Lsn.parse(main_tl["last_record_lsn"]) > Lsn.parse(lsn1)

    # A deleted branch frees its name; its endpoint had to go first.
    cli.run("endpoint", "stop", "past")
    cli.run("endpoint", "delete", "past")
    past_id = next(t["timeline_id"] for t in cli.json("timeline", "list")
                   if t["branch"] == "past")
    sk_root = cli.repo_dir / "safekeepers"

    def sk_copies(timeline_id: str) -> list[str]:
        """The safekeepers holding a directory of `timeline_id` (also a temporary one)."""
        return sorted(p.parts[-4] for p in sk_root.glob(f"sk*/tenants/*/{timeline_id}*"))

    assert sk_copies(past_id) == ["sk1", "sk2", "sk3"]  # a primary ran on it
    cli.run("timeline", "delete", "past")
    listed = cli.json("timeline", "list")
    assert "past" not in {t["branch"] for t in listed}
    assert past_id not in {t["timeline_id"] for t in listed}  # gone from the pageserver
    assert sk_copies(past_id) == []  # and from every safekeeper

    # With a safekeeper down the delete fails, says which one and how to finish, and keeps
    # the branch's name; a re-run once it is back finishes (the others are done already).
    cli.run("endpoint", "stop", "head")
    cli.run("endpoint", "delete", "head")
    head_id = next(t["timeline_id"] for t in cli.json("timeline", "list")
                   if t["branch"] == "head")
    assert sk_copies(head_id) == ["sk1", "sk2", "sk3"]
    cli.run("safekeeper", "stop", "2")
    failed = cli.run("timeline", "delete", "head", ok=False).stderr
    assert "is not deleted on safekeeper(s) 2: safekeeper 2 does not answer" in failed, failed
    assert "`strata safekeeper start 2`" in failed and "`strata timeline delete head`" in failed
    assert sk_copies(head_id) == ["sk2"]

    def branches() -> set[str]:
        state = json.loads((cli.repo_dir / "state.json").read_text())
        return {b for t in state["tenants"].values() for b in t["branches"]}

    assert "head" in branches()
    cli.run("safekeeper", "start", "2")
    finished = cli.run("timeline", "delete", "head")
    assert f"note: the pageserver had no timeline {head_id}" in finished.stderr
    assert f"note: safekeeper 1 had no timeline {head_id}" in finished.stderr
    assert "note: safekeeper 2 had" not in finished.stderr
    assert sk_copies(head_id) == [] and "head" not in branches()


def test_walproposer_death_stops_its_endpoint(cli: Cli) -> None:
    """The sidecar dies (kill -9): its PostgreSQL is stopped at once (no commit hangs),
    status says the endpoint died and shows the logs; the next start brings it back with
    every acknowledged commit. Then the postmaster is killed (kill -9) and the endpoint
    started right after, 20 times (issue 13's loop): every start works, keeps every commit."""
    cli.run("init")
    cli.run("start")
    main = cli.local("main")
    rows(main, "create table t (id int primary key, v text)")
    rows(main, "insert into t values (1, 'acked')")
    monitor = int((cli.repo_dir / "run" / "walproposer-main.pid").read_text())
    children = Path(f"/proc/{monitor}/task/{monitor}/children").read_text().split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    # The monitor points its pid file at the dead walproposer before it stops PostgreSQL
    # (and then exits): a list that shows the endpoint died shows its walproposer died.
    deadline = time.monotonic() + 15
    while (ep := cli.json("endpoint", "list")[0])["state"] != "died":
        assert time.monotonic() < deadline, ep
        time.sleep(0.1)
    assert ep["walproposer"]["state"] == "died", ep
    log = (cli.repo_dir / "logs" / "walproposer-main.log").read_text()
    assert "walproposer exited with code -9; stopping PostgreSQL" in log
    cli.run("endpoint", "start", "main")
    restarted = cli.local("main")
    assert values(restarted) == ["acked"]

    # kill -9 of the postmaster, then at once `endpoint start`, 20 rounds (bench/start
    # times the same loop): every start works and keeps every commit; the application role
    # is made once per branch; `--json` reports the start's phases.
    for i in range(20):
        rows(restarted, f"insert into t values ({i + 2}, 'r{i}')")
        os.kill(int((cli.repo_dir / "run" / "endpoint-main.pid").read_text()), signal.SIGKILL)
        started = cli.json("endpoint", "start", "main")
        restarted = started["local_connstr"]
        assert values(restarted) == ["acked", *[f"r{j}" for j in range(i + 1)]]
    assert {"cli", "checks", "sync_wal", "wait_ingest", "basebackup", "postgres",
            "walproposer", "app_role"} <= set(started["phases_s"]), started
    assert started["total_s"] >= sum(v for k, v in started["phases_s"].items() if "." not in k)
    state = json.loads((cli.repo_dir / "state.json").read_text())
    tenant = next(iter(state["tenants"].values()))
    assert tenant["app_role_timelines"] == [tenant["branches"]["main"]]


def test_clear_errors(cli: Cli, test_dir: Path) -> None:
    """A missing environment, an unknown branch or safekeeper, a bad or future `--at`, a
    hung pageserver, a taken port and a dead process each give one clear error line (exit
    code 1, no traceback); a taken port strata picked itself (the proxy's, an endpoint's)
    is picked again."""
    missing = cli.run("status", ok=False)
    assert "no Strata environment in" in missing.stderr and "strata init" in missing.stderr

    cli.run("init")
    unknown = cli.run("endpoint", "create", "x", "--branch", "nope", ok=False)
    assert "no branch named 'nope'" in unknown.stderr and "branches: main" in unknown.stderr
    unknown = cli.run("timeline", "branch", "b", "--parent", "nope", ok=False)
    assert "no branch named 'nope'" in unknown.stderr
    assert "no safekeeper with id 9" in cli.run("safekeeper", "start", "9", ok=False).stderr
    nowhere = cli.run("tenant", "relocate", "default", "--to", "2", ok=False).stderr
    assert "has no object storage" in nowhere and "--object-storage" in nowhere, nowhere

    # --at is checked before any request: a bad string, and a time in the future (which
    # would otherwise branch at the head as if it were now).
    bad = cli.run("timeline", "branch", "b", "--at", "yesterday", ok=False).stderr
    assert bad.strip().splitlines() == [bad.strip()] and "POST" not in bad, bad
    assert "branch point 'yesterday' is neither an LSN (X/Y) nor an ISO 8601" in bad, bad
    future = cli.run("timeline", "branch", "b", "--at", "2999-01-01T00:00:00Z", ok=False)
    assert "is in the future" in future.stderr, future.stderr
    assert [t["branch"] for t in cli.json("timeline", "list")] == ["main"]

    # A hung pageserver (stopped, not dead): one line saying so, no traceback.
    pid = int((cli.repo_dir / "run" / "pageserver.pid").read_text())
    os.kill(pid, signal.SIGSTOP)
    try:
        hung = cli.run("timeline", "list", ok=False).stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    assert hung.strip().splitlines() == [hung.strip()], hung
    assert f"the pageserver (pid {pid}) does not answer" in hung, hung

    # The pageserver dies: status says so and shows the tail of its log.
    pid = int((cli.repo_dir / "run" / "pageserver.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cli.json("status")["pageserver"]["state"] != "died":
        assert time.monotonic() < deadline, "status never reported the dead pageserver"
        time.sleep(0.1)
    status = cli.run("status").stderr
    assert "pageserver died; last lines of" in status and "\n    | " in status
    assert "not running" in cli.run("endpoint", "start", "main", ok=False).stderr

    # A taken port: the start is refused and names the port.
    config = cli.repo_dir / "config.toml"
    http_port = int(next(line for line in config.read_text().splitlines()
                         if line.startswith("http_port")).split("=")[1])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", http_port))
        squatter.listen()
        taken = cli.run("start", ok=False)
    assert f"127.0.0.1:{http_port} is taken by another process" in taken.stderr
    cli.run("start")

    # A port strata picked itself (the proxy's, at init) and another process took: the
    # start picks another and saves it; the other process keeps its port.
    cli.run("proxy", "stop")
    proxy_port = tomllib.loads(config.read_text())["proxy"]["port"]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", proxy_port))
        moved = cli.run("proxy", "start")
        saved = tomllib.loads(config.read_text())
        assert saved["proxy"]["port"] != proxy_port, moved.stderr
        assert saved["picked_ports"]["proxy.port"] == saved["proxy"]["port"]
        assert f"port {proxy_port} -> {saved['proxy']['port']}" in moved.stderr, moved.stderr
        assert squatter.getsockname()[1] == proxy_port
    assert cli.json("status")["proxy"]["address"] == f"127.0.0.1:{saved['proxy']['port']}"

    # The endpoint's port (strata picked it at init) taken by another process: before the
    # start (the check sees it), and between the check and PostgreSQL's bind (PostgreSQL
    # exits with "could not bind"): each start picks another, saves it and goes on.
    cli.run("proxy", "stop")  # without the proxy, PostgreSQL listens on TCP
    cli.run("endpoint", "stop", "main")

    def endpoint_port() -> int:
        ep = next(e for e in cli.json("endpoint", "list") if e["name"] == "main")
        return int(ep["address"].rsplit(":", 1)[1])

    port = endpoint_port()
    with _occupy(port):
        moved = cli.run("endpoint", "start", "main")
        assert f"port {port} -> {endpoint_port()}" in moved.stderr, moved.stderr
    assert rows(cli.local("main"), "select 1") == [(1,)]
    cli.run("endpoint", "stop", "main")
    # The start is held before PostgreSQL's launch (failpoint) until the test, having
    # bound the port, releases it.
    port = endpoint_port()
    release = test_dir / "release-launch"
    proc = subprocess.Popen(
        [STRATA, "--repo-dir", str(cli.repo_dir), "endpoint", "start", "main"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        env={**os.environ,
             "STRATA_FAILPOINTS": f"endpoint-before-postgres-launch=wait(300,{release})"})
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(f"starting PostgreSQL 15 on 127.0.0.1:{port} "):
            break
    else:
        raise AssertionError(f"the start never reached PostgreSQL's launch: {seen}")
    with _occupy(port):
        release.touch()
        rest = proc.stderr.read()
        assert proc.wait(180) == 0, (seen, rest)
    assert f"port {port} -> {endpoint_port()}" in rest, rest
    assert rows(cli.local("main"), "select 1") == [(1,)]


def _occupy(port: int) -> socket.socket:
    """Hold 127.0.0.1:port as another server would (listening; SO_REUSEADDR as servers
    do, so connections of a stopped one in TIME_WAIT do not keep it from binding)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    return s


def test_init_from_config_file_and_tenants(cli: Cli, test_dir: Path) -> None:
    """`init --config` takes the user's TOML (development mode: no safekeepers; tenant
    defaults reach the pageserver, ports 0 are allocated and written back); an endpoint
    runs with the pageserver as its WAL receiver; `tenant create` adds a tenant with its
    own settings over those defaults and a `main` branch; `tenant config --set` changes
    a key; a typo in the file is refused. With `--object-storage local` the tenant's
    layers and index are uploaded to a directory of the environment; a bad URL is refused."""
    bad_url = cli.run("init", "--object-storage", "gs://bucket", ok=False)
    assert "remote_storage must be file:///path or s3://" in bad_url.stderr
    bad = test_dir / "bad.toml"
    bad.write_text("[tenant_defaults]\ncheckpoint_distanse = 1\n")
    refused = cli.run("init", "--config", str(bad), ok=False)
    assert "unknown tenant config keys ['checkpoint_distanse']" in refused.stderr
    assert not (cli.repo_dir / "state.json").exists()

    good = test_dir / "strata.toml"
    good.write_text('wal_mode = "pageserver"\n\n[pageserver]\npg_port = 0\n\n'
                    "[tenant_defaults]\ncheckpoint_distance = 4194304\n\n"
                    '[endpoint_defaults]\nshared_buffers = "16MB"\n')
    cli.run("init", "--config", str(good), "--object-storage", "local")
    written = (cli.repo_dir / "config.toml").read_text()
    assert "pg_port = 0" not in written and "http_port = 0" not in written
    assert 'shared_buffers = "16MB"' in written

    assert "wal_mode = \"pageserver\"" in cli.run("safekeeper", "start", ok=False).stderr
    # Without the proxy the connection string is the compute's own (TCP, a password).
    assert cli.last_line("endpoint", "start", "main").startswith("postgresql://strata@")
    main = cli.local("main")
    # There, over TCP the superuser and replication are refused, and every other role
    # needs its password.
    port = cli.json("endpoint", "list")[0]["address"].rsplit(":", 1)[1]
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects"):
        rows(f"postgresql://postgres@127.0.0.1:{port}/postgres", "select 1")
    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects replication"):
        rows(f"postgresql://postgres@127.0.0.1:{port}/postgres?replication=true", "select 1")
    with pytest.raises(psycopg.OperationalError, match="no password supplied"):
        rows(f"postgresql://strata@127.0.0.1:{port}/strata", "select 1")
    with pytest.raises(psycopg.OperationalError,
                       match='password authentication failed for user "strata"'):
        rows(f"postgresql://strata:guess@127.0.0.1:{port}/strata", "select 1")
    rows(main, "create table t (id int primary key, v text)")
    rows(main, "insert into t values (1, 'dev mode')")
    rows(main, "create table s (id serial, b bigint generated always as identity)")
    rows(main, "insert into s default values")
    cli.run("endpoint", "stop", "main")
    cli.run("endpoint", "start", "main")
    assert values(main) == ["dev mode"]
    # A clean stop keeps sequence values (serial and identity), as stock PostgreSQL does.
    assert rows(main, "insert into s default values returning id, b") == [(2, 2)]
    assert cli.json("status")["safekeepers"] == []

    default = cli.json("tenant", "config")
    assert default["name"] == "default"
    assert default["config"]["checkpoint_distance"] == 4194304

    cli.run("tenant", "create", "--name", "other", "-c", "gc_horizon=1000")
    tenants = {t["name"]: t for t in cli.json("tenant", "list")}
    assert set(tenants) == {"default", "other"}
    assert tenants["other"]["branches"] == ["main"] and not tenants["other"]["default"]
    assert tenants["other"]["attachments"] == [{"pageserver": 1, "generation": 1,
                                                "generation_state": "current",
                                                "newer_generation": None}]
    other = cli.json("tenant", "config", "other")["config"]
    assert other["gc_horizon"] == 1000 and other["checkpoint_distance"] == 4194304
    assert [t["branch"] for t in cli.json("timeline", "list", "--tenant", "other")] == ["main"]
    changed = cli.json("tenant", "config", "other", "--set", "gc_horizon=2000")["config"]
    assert changed["gc_horizon"] == 2000
    assert cli.json("tenant", "config", "other")["config"]["gc_horizon"] == 2000
    again = cli.run("tenant", "create", "--name", "other", ok=False)
    assert "a tenant named 'other' exists already" in again.stderr
    def uploaded() -> list[Path]:  # uploads run in the background: poll
        return sorted((cli.repo_dir / "remote_storage" / "tenants").glob(
            "*/timelines/*/index_part.json-00000001"))

    deadline = time.monotonic() + 60
    while len(uploaded()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(uploaded()) == 2, uploaded()  # the main branch of each tenant


def test_start_does_not_wait_for_the_walproposer(cli: Cli, test_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`endpoint start` returns once PostgreSQL accepts connections and its walproposer
    sidecar runs, not once it streams: with the sidecar held before it connects (failpoint,
    until the test releases it), the started endpoint answers reads, its status says the
    walproposer does not stream yet, and a commit waits for it (still waiting while the
    sidecar is held) and succeeds once it is released. A sidecar that fails
    right after the start stops its PostgreSQL: the start says so, or (when it failed
    after the command returned) `endpoint list` shows the endpoint and its walproposer
    as died, with the sidecar's log; the next start works and keeps every commit."""
    cli.run("init")
    cli.run("start")
    main = cli.local("main")
    rows(main, "create table t (id int primary key, v text)")
    rows(main, "insert into t values (1, 'acked')")
    assert cli.json("endpoint", "list")[0]["walproposer"]["streaming"] is True
    lazy = cli.json("endpoint", "list")[0]["compute_mode"] == "lazy"
    cli.run("endpoint", "stop", "main")
    prewarm_file = cli.repo_dir / "endpoints" / "main" / "prewarm"
    if lazy:
        # The blocks the lazy compute read first (its FUSE server saves them as it exits),
        # for the next start's prewarm.
        deadline = time.monotonic() + 30
        while not prewarm_file.exists():
            assert time.monotonic() < deadline, "no prewarm file"
            time.sleep(0.1)
        assert any(line.startswith("/base/") for line in
                   prewarm_file.read_text().splitlines()), prewarm_file.read_text()

    # Held until the test creates `release` (bounded: 300 s, then it goes on by itself).
    release = test_dir / "release-walproposer"
    monkeypatch.setenv("STRATA_FAILPOINTS", f"walproposer-connect-pg=wait(300,{release})")
    started = cli.json("endpoint", "start", "main")
    monkeypatch.delenv("STRATA_FAILPOINTS")
    assert values(started["local_connstr"]) == ["acked"]  # reads at once
    if lazy:
        # The FUSE server fetched the listed blocks (in the background, from its start).
        fuse_log = cli.repo_dir / "endpoints" / "main" / "compute" / "lazyfs.log"
        deadline = time.monotonic() + 60
        while not re.search(r"prewarm: fetched \d+ of [1-9]", fuse_log.read_text()):
            assert time.monotonic() < deadline, fuse_log.read_text()[-3000:]
            time.sleep(0.1)
    ep = cli.json("endpoint", "list")[0]
    assert ep["state"] == "running" and ep["walproposer"]["state"] == "running", ep
    assert ep["walproposer"]["streaming"] is False, ep
    committed = threading.Event()
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            rows(started["local_connstr"], "insert into t values (2, 'waited')")
            committed.set()
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    committer = threading.Thread(target=commit, daemon=True)
    committer.start()
    assert not committed.wait(2), "a commit went through while the walproposer was held"
    release.touch()
    committer.join(180)
    assert committed.is_set() and not errors, errors  # waited, then ok
    assert cli.json("endpoint", "list")[0]["walproposer"]["streaming"] is True
    cli.run("endpoint", "stop", "main")

    monkeypatch.setenv("STRATA_FAILPOINTS", "walproposer-connect-pg=raise")
    failed = subprocess.run([STRATA, "--repo-dir", str(cli.repo_dir), "endpoint", "start",
                             "main"], capture_output=True, text=True, timeout=180,
                            check=False)
    monkeypatch.delenv("STRATA_FAILPOINTS")
    assert "Traceback" not in failed.stderr, failed.stderr
    if failed.returncode != 0:
        assert "its walproposer sidecar exited" in failed.stderr, failed.stderr
        assert "failpoint 'walproposer-connect-pg' fired" in failed.stderr, failed.stderr
    # The monitor points its pid file at the dead walproposer before it stops PostgreSQL
    # (its own exit can outlast PostgreSQL's): the walproposer is died as soon as the
    # endpoint is.
    deadline = time.monotonic() + 30
    while (ep := cli.json("endpoint", "list")[0])["state"] != "died":
        assert time.monotonic() < deadline, ep
        time.sleep(0.1)
    assert ep["walproposer"]["state"] == "died", ep
    assert "failpoint 'walproposer-connect-pg' fired" in ep["walproposer"]["log_tail"], ep
    listed = cli.run("endpoint", "list").stdout + cli.run("endpoint", "list").stderr
    assert "died" in listed, listed
    restarted = cli.json("endpoint", "start", "main")["local_connstr"]
    rows(restarted, "insert into t values (3, 'after')")
    assert values(restarted) == ["acked", "waited", "after"]
