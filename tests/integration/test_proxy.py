"""The proxy end to end (`strata start` runs it): real psql, psycopg and pgbench clients,
TLS with SNI, SCRAM-SHA-256, wake on connect, suspend, cancel, and malformed input.

The environment is a real one (`strata init`/`start`: pageserver, three safekeepers,
stock PostgreSQL 15 computes), driven through the CLI as in test_cli.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import struct
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import psycopg
import pytest
import scramp
from test_cli import Cli
from test_cli import cli as cli  # noqa: F401, PLC0414 - the fixture `cli`

from polling import wait_until
from strata.common.proc import free_port
from strata.proxy.main import PROXY_NICE

PASSWORD = "correct horse"


def proxy_port(cli: Cli) -> int:
    return int(tomllib.loads((cli.repo_dir / "config.toml").read_text())["proxy"]["port"])


def dsn(cli: Cli, endpoint: str, *, password: str = PASSWORD, how: str = "sni",
        sslmode: str = "require") -> str:
    """A libpq connection string to `endpoint` through the proxy, naming it by TLS SNI,
    by options, or in the password."""
    port = proxy_port(cli)
    base = f"port={port} user=strata dbname=strata sslmode={sslmode} connect_timeout=300"
    if how == "sni":
        return f"host={endpoint}.localhost hostaddr=127.0.0.1 {base} password='{password}'"
    if how == "options":
        return f"host=127.0.0.1 {base} password='{password}' options=endpoint={endpoint}"
    assert how == "password", how
    return f"host=127.0.0.1 {base} password='endpoint={endpoint};{password}'"


def query(conninfo: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        cur = conn.execute(sql)
        return cur.fetchall() if cur.description else []


def endpoint_state(cli: Cli, name: str) -> dict[str, Any]:
    return next(e for e in cli.json("status")["endpoints"] if e["name"] == name)


def wait_state(cli: Cli, name: str, state: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while (current := endpoint_state(cli, name)["state"]) != state:
        assert time.monotonic() < deadline, (name, current, state)
        time.sleep(0.5)


def assert_cancels(conn: psycopg.Connection[Any], conninfo: str) -> None:
    """A long query on `conn` (through the proxy) ends in QueryCanceled once the client
    sends a CancelRequest; `conninfo` (a second connection) sees the query start."""
    result: list[BaseException] = []

    def run() -> None:
        try:
            conn.execute("select pg_sleep(120)")
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            result.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(lambda: bool(query(conninfo, "select 1 from pg_stat_activity "
                                            "where query = 'select pg_sleep(120)'")),
               60, "the pg_sleep query to start")
    conn.cancel_safe(timeout=60)
    thread.join(timeout=60)
    assert len(result) == 1 and isinstance(result[0], psycopg.errors.QueryCanceled), result


def nice_of(pid: int) -> int:
    """Process `pid`'s nice value (proc(5) stat field 19)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def proxy_log(cli: Cli) -> str:
    return (cli.repo_dir / "logs" / "proxy.log").read_text()


@pytest.fixture
def proxied(cli: Cli) -> Cli:  # noqa: F811 - the fixture imported above
    """An environment with role `strata` (password PASSWORD) on branch main, and
    endpoint main running."""
    cli.run("init")
    cli.run("start")
    cli.run("role", "create", "strata", "--password-stdin", input_text=PASSWORD + "\n")
    return cli


def test_clients_tls_sni_scram_and_cancel(proxied: Cli) -> None:
    """psql (TLS, SNI) and psycopg reach endpoint main through the proxy by each way of
    naming it; a wrong password, an unknown role or endpoint, and no endpoint at all are
    clear errors; the password never reaches the log; a cancel request through the proxy
    cancels the right query; pgbench runs through the proxy; `strata status` counts the
    proxied connections."""
    cli = proxied
    env = {**os.environ, "PGCONNECT_TIMEOUT": "300"}
    out = subprocess.run(["psql", dsn(cli, "main"), "-Atc",
                          "select current_user, ssl from pg_stat_ssl "
                          "where pid = pg_backend_pid()"],
                         capture_output=True, text=True, timeout=300, env=env, check=True)
    assert out.stdout.strip() == "strata|f", out  # TLS ends at the proxy
    assert query(dsn(cli, "main", how="options", sslmode="disable"), "select 1") == [(1,)]
    assert query(dsn(cli, "main", how="password"), "select 2") == [(2,)]
    # The compute itself does not listen on TCP: its valid password does not get a client
    # past the proxy (and its wake/suspend accounting).
    compute_port = cli.json("endpoint", "list")[0]["address"].rsplit(":", 1)[1]
    with pytest.raises(psycopg.OperationalError, match="Connection refused"):
        query(f"host=127.0.0.1 port={compute_port} user=strata dbname=strata "
              f"password='{PASSWORD}' sslmode=disable", "select 1")

    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        query(dsn(cli, "main", password="wrong password"), "select 1")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        query(dsn(cli, "main", how="password", password="wrong password"), "select 1")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        query(dsn(cli, "main").replace("user=strata", "user=postgres"), "select 1")
    with pytest.raises(psycopg.OperationalError, match="endpoint 'nope' does not exist"):
        query(dsn(cli, "nope"), "select 1")
    with pytest.raises(psycopg.OperationalError, match="no endpoint named"):
        query(f"host=127.0.0.1 port={proxy_port(cli)} user=strata dbname=strata "
              f"password=x sslmode=require", "select 1")
    log = proxy_log(cli)
    assert "wrong password" not in log and PASSWORD not in log

    with psycopg.connect(dsn(cli, "main")) as conn:
        assert endpoint_state(cli, "main")["connections"] == 1
        assert_cancels(conn, dsn(cli, "main"))
    assert endpoint_state(cli, "main")["connections"] == 0

    pgbench = dsn(cli, "main")
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", pgbench], capture_output=True,
                   text=True, timeout=300, env=env, check=True)
    out = subprocess.run(["pgbench", "-c", "4", "-t", "50", "-n", pgbench],
                         capture_output=True, text=True, timeout=300, env=env, check=True)
    assert "number of transactions actually processed: 200/200" in out.stdout, out.stdout

    # Plain connections are relayed by a thread per direction (strata.proxy.relay):
    # pgbench, results and COPY data larger than a pipe or a socket buffer both ways,
    # and the connection count back at 0 once the clients are gone.
    plain = dsn(cli, "main", how="options", sslmode="disable")
    out = subprocess.run(["pgbench", "-c", "4", "-t", "50", "-n", "-S", plain],
                         capture_output=True, text=True, timeout=300, env=env, check=True)
    assert "number of transactions actually processed: 200/200" in out.stdout, out.stdout
    with psycopg.connect(plain, autocommit=True) as conn:
        assert conn.execute("select length(repeat('x', 5000000) || 'y')").fetchone() == (
            5000001,)
        assert conn.execute("select md5(repeat('ab', 3000000))").fetchone() == (
            hashlib.md5(b"ab" * 3000000).hexdigest(),)
        conn.execute("create temp table big (t text)")
        with conn.cursor().copy("copy big from stdin") as copy:
            for i in range(2000):
                copy.write(f"{i}-{'z' * 1000}\n")
        assert conn.execute("select count(*), sum(length(t)) from big").fetchone() == (
            2000, sum(len(f"{i}-") + 1000 for i in range(2000)))
        assert endpoint_state(cli, "main")["connections"] == 1
    deadline = time.monotonic() + 60
    while endpoint_state(cli, "main")["connections"] != 0:
        assert time.monotonic() < deadline, endpoint_state(cli, "main")
        time.sleep(0.1)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "threads"])
def test_plain_relay(proxied: Cli, monkeypatch: pytest.MonkeyPatch, kernel: bool) -> None:
    """Plain connections with the compute's bytes forwarded by the kernel (a BPF sockmap,
    config [proxy] kernel_relay = true, the default; the proxy logs whether it may use
    one) or, with kernel_relay = false, by splice threads: 50 concurrent pgbench
    connections, a result and COPY data both ways larger than the socket buffers, a
    cancel, the compute closing first (the client reads its FATAL), the client closing
    first (its backend ends), and the connection count back at 0."""
    cli = proxied
    cli.run("proxy", "stop")
    monkeypatch.delenv("STRATA_PROXY_SOCKMAP", raising=False)
    config = cli.repo_dir / "config.toml"
    text = config.read_text()
    assert "kernel_relay = true\n" in text, text  # written by init: on by default
    if not kernel:
        config.write_text(text.replace("kernel_relay = true\n", "kernel_relay = false\n"))
    cli.run("proxy", "start")
    plain = dsn(cli, "main", how="options", sslmode="disable")
    assert query(plain, "select 1") == [(1,)]
    if not kernel:
        assert "plain connections are relayed by splice threads (kernel_relay = false)" \
            in proxy_log(cli)
    elif "forwarded by the kernel (BPF sockmap)" not in proxy_log(cli):
        pytest.skip("the proxy may not use a BPF sockmap here: "
                    + next(line for line in proxy_log(cli).splitlines()
                           if "sockmap" in line))
    _relay_checks(cli, plain)


@pytest.mark.parametrize("relay", ["loop", "threads"])
def test_tls_relay(proxied: Cli, monkeypatch: pytest.MonkeyPatch, relay: str) -> None:
    """TLS connections relayed by the event loop's protocols on uvloop's TLS transport
    (the default) or, with STRATA_PROXY_TLS_RELAY=threads, by the proxy's threads on its
    own TLS session (strata.proxy.tlsrelay), under the same checks as the kernel's
    relay: 50 concurrent pgbench connections, a result and COPY data both ways larger
    than the socket buffers, a cancel, the compute closing first, the client closing
    first, and the connection count back at 0."""
    cli = proxied  # its proxy was started by `strata start`: the default relay
    if relay == "threads":
        cli.run("proxy", "stop")
        monkeypatch.setenv("STRATA_PROXY_TLS_RELAY", "threads")
        cli.run("proxy", "start")
    tls = dsn(cli, "main")
    assert query(tls, "select 1") == [(1,)]
    expected = {"loop": "TLS connections are relayed by the event loop's protocols",
                "threads": "TLS connections are relayed by a thread per direction"}[relay]
    started = [line for line in proxy_log(cli).splitlines()
               if "TLS connections are relayed by" in line]
    assert started and expected in started[-1], started
    _relay_checks(cli, tls)


def _relay_checks(cli: Cli, conninfo: str) -> None:
    plain = conninfo  # the connection string under test (plain or TLS)
    env = {**os.environ, "PGCONNECT_TIMEOUT": "300"}
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", plain], capture_output=True,
                   text=True, timeout=300, env=env, check=True)
    out = subprocess.run(["pgbench", "-c", "50", "-j", "2", "-t", "20", "-n", "-S", plain],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert "number of transactions actually processed: 1000/1000" in out.stdout, \
        out.stdout + out.stderr
    out = subprocess.run(["pgbench", "-c", "4", "-t", "30", "-n", plain],
                         capture_output=True, text=True, timeout=600, env=env, check=False)
    assert "number of transactions actually processed: 120/120" in out.stdout, \
        out.stdout + out.stderr

    with psycopg.connect(plain, autocommit=True) as conn:
        assert conn.execute("select md5(repeat('ab', 3000000))").fetchone() == (
            hashlib.md5(b"ab" * 3000000).hexdigest(),)
        conn.execute("create temp table big (t text)")
        with conn.cursor().copy("copy big from stdin") as copy:
            for i in range(5000):
                copy.write(f"{i}-{'z' * 1000}\n")
        out_bytes = bytearray()
        with conn.cursor().copy("copy big to stdout") as copy:
            for block in copy:
                out_bytes += block
        assert hashlib.md5(out_bytes).hexdigest() == hashlib.md5(
            "".join(f"{i}-{'z' * 1000}\n" for i in range(5000)).encode()).hexdigest()

        assert_cancels(conn, plain)

    # The compute closes first: the client reads the FATAL before the end.
    with psycopg.connect(plain, autocommit=True) as victim:
        row = victim.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        assert query(plain, f"select pg_terminate_backend({row[0]})") == [(True,)]
        with pytest.raises(psycopg.errors.AdminShutdown, match="administrator command"):
            victim.execute("select 1")
    # The client closes first: its backend ends.
    with psycopg.connect(plain, autocommit=True) as leaver:
        row = leaver.execute("select pg_backend_pid()").fetchone()
        assert row is not None
    deadline = time.monotonic() + 60
    while query(plain, f"select 1 from pg_stat_activity where pid = {row[0]}"):
        assert time.monotonic() < deadline, "the backend outlived its client"
        time.sleep(0.1)
    deadline = time.monotonic() + 60
    while endpoint_state(cli, "main")["connections"] != 0:
        assert time.monotonic() < deadline, endpoint_state(cli, "main")
        time.sleep(0.1)


def test_wake_suspend_and_concurrent_wake(proxied: Cli) -> None:
    """An endpoint idle for its suspend_timeout_s is stopped (status: suspended); a
    connection wakes it and its data is there; 50 concurrent connections to a suspended
    endpoint all get answers from one start; a start that fails is a clear error."""
    cli = proxied
    cli.run("timeline", "branch", "dev")
    # A port of the user's (--port): strata never moves it, so a squatter on it below
    # makes the wake fail (a port strata picked would be picked again).
    cli.run("endpoint", "create", "dev", "--branch", "dev", "--suspend-timeout-s", "1",
            "--port", str(free_port("127.0.0.1")))
    assert [r["role"] for r in cli.json("role", "list", "--branch", "dev")] == ["strata"]
    assert endpoint_state(cli, "dev")["state"] == "suspended"  # never started: wakes on use
    query(dsn(cli, "dev"), "create table t as select 42 as v")
    wait_state(cli, "dev", "suspended")

    answers: list[Any] = []
    errors: list[BaseException] = []

    def connect() -> None:
        try:
            answers.append(query(dsn(cli, "dev"), "select v from t")[0][0])
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            errors.append(err)

    threads = [threading.Thread(target=connect) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert answers == [42] * 50
    # The proxy runs at its own priority where it may lower its nice (CAP_SYS_NICE: root
    # here), and logs which; the compute it woke, started from one of its threads, does
    # not inherit it.
    proxy_pid = int((cli.repo_dir / "run" / "proxy.pid").read_text())
    logged = re.findall(r"the proxy runs at nice (-?[0-9]+)", proxy_log(cli))
    assert logged and nice_of(proxy_pid) == int(logged[-1]), logged
    if "it may not set nice" not in proxy_log(cli):
        assert int(logged[-1]) == PROXY_NICE, logged
    with psycopg.connect(dsn(cli, "dev"), autocommit=True) as conn:
        row = conn.execute("select pg_backend_pid()").fetchone()
        assert row is not None
        assert nice_of(row[0]) == 0
    assert proxy_log(cli).count("waking endpoint dev ") == 2  # one start per wake
    # The proxy's own share of each wake is logged, for the connections that waited;
    # they logged in to the compute while the start was in its last phases, and were
    # relayed once it was past its checks (its last step, the proxy's roles, still on).
    assert proxy_log(cli).count("connection to endpoint dev after its wake") >= 2
    assert "(logged in during the start" in proxy_log(cli)
    assert proxy_log(cli).count("endpoint dev is past its start's checks") == 2

    # A role made while the endpoint sleeps exists only once the start has applied the
    # roles: its early login is refused, and the login after the start works.
    wait_state(cli, "dev", "suspended")
    cli.run("role", "create", "late", "--branch", "dev", "--password-stdin",
            input_text="late password\n")
    late = dsn(cli, "dev", password="late password").replace("user=strata", "user=late")
    assert query(late, "select current_user") == [("late",)]
    assert "(logged in after the start)" in proxy_log(cli)

    # A compute that cannot start: its port is taken by someone else.
    wait_state(cli, "dev", "suspended")
    dev_port = next(e for e in cli.json("endpoint", "list") if e["name"] == "dev")["address"]
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", int(dev_port.rsplit(":", 1)[1])))
        squatter.listen()
        with pytest.raises(psycopg.OperationalError, match="endpoint dev could not be started"):
            query(dsn(cli, "dev"), "select 1")


def _startup_packet(params: dict[str, str], code: int = 196608) -> bytes:
    body = struct.pack("!i", code) + b"".join(
        k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _recv_message(s: socket.socket) -> tuple[bytes, bytes]:
    """The next backend message on `s`: (type byte, body)."""
    head = b""
    while len(head) < 5:
        chunk = s.recv(5 - len(head))
        assert chunk, "the proxy closed the connection"
        head += chunk
    body = b""
    while len(body) < struct.unpack("!i", head[1:5])[0] - 4:
        chunk = s.recv(struct.unpack("!i", head[1:5])[0] - 4 - len(body))
        assert chunk, "the proxy closed the connection"
        body += chunk
    return head[:1], body


def _password_message(body: bytes) -> bytes:
    return b"p" + struct.pack("!i", len(body) + 4) + body


def test_compute_login_during_scram(proxied: Cli) -> None:
    """To a running compute, the proxy logs in while the client does SCRAM: a backend
    with the client's startup parameters exists before the client has authenticated;
    a client that then goes away leaves no backend behind, and one that authenticates
    is relayed to that very backend."""
    cli = proxied
    conninfo = dsn(cli, "main")

    def backends(name: str) -> list[int]:
        return [row[0] for row in query(conninfo, "select pid from pg_stat_activity "
                                                  f"where application_name = '{name}'")]

    params = {"user": "strata", "database": "strata", "options": "endpoint=main"}
    with socket.create_connection(("127.0.0.1", proxy_port(cli)), timeout=60) as s:
        s.sendall(_startup_packet({**params, "application_name": "probe-leaves"}))
        assert _recv_message(s)[0] == b"R"  # AuthenticationSASL: the client's turn
        wait_until(lambda: len(backends("probe-leaves")) == 1, 60,
                   "the proxy's login to the compute during SCRAM")
    wait_until(lambda: not backends("probe-leaves"), 60,
               "the login of a client that went away to end")

    client = scramp.ScramClient(["SCRAM-SHA-256"], "strata", PASSWORD)
    with socket.create_connection(("127.0.0.1", proxy_port(cli)), timeout=60) as s:
        s.sendall(_startup_packet({**params, "application_name": "probe-stays"}))
        assert _recv_message(s)[0] == b"R"
        wait_until(lambda: len(backends("probe-stays")) == 1, 60,
                   "the proxy's login to the compute during SCRAM")
        [early_pid] = backends("probe-stays")
        first = client.get_client_first().encode()
        s.sendall(_password_message(b"SCRAM-SHA-256\0" + struct.pack("!i", len(first))
                                    + first))
        tag, body = _recv_message(s)
        assert tag == b"R" and body[:4] == struct.pack("!i", 11), (tag, body)
        client.set_server_first(body[4:].decode())
        s.sendall(_password_message(client.get_client_final().encode()))
        tag, body = _recv_message(s)
        assert tag == b"R" and body[:4] == struct.pack("!i", 12), (tag, body)
        client.set_server_final(body[4:].decode())
        while (tag := _recv_message(s)[0]) != b"Z":
            assert tag in (b"R", b"S", b"K"), tag
        sql = b"select pg_backend_pid()\0"
        s.sendall(b"Q" + struct.pack("!i", len(sql) + 4) + sql)
        while (message := _recv_message(s))[0] != b"D":
            assert message[0] == b"T", message
        body = message[1]
        assert int(body[6:6 + struct.unpack("!i", body[2:6])[0]]) == early_pid


def test_malformed_startup_packets(proxied: Cli) -> None:
    """Random and truncated startup packets and garbage after them close only their own
    connection: the proxy keeps serving and logs no unexpected error."""
    cli = proxied
    port = proxy_port(cli)
    rng = random.Random(1234)
    valid = _startup_packet({"user": "strata", "database": "strata",
                             "options": "endpoint=main"})
    cases: list[bytes] = [
        b"", b"\0", b"\0\0\0\x08", struct.pack("!ii", 8, 80877103) + b"garbage",
        struct.pack("!i", 2**31 - 1), struct.pack("!i", -5) + b"xxxx",
        _startup_packet({"user": "strata"}, code=2 << 16), _startup_packet({}),
        valid[:-3], valid + b"p\0\0\0\x03", valid + b"Q\0\0\0\x09select",
        valid + b"p" + struct.pack("!i", 10**9),
        valid + b"p\0\0\0\x0cSCRAM\0\xff\xff",
        valid + b"p\0\0\0\x16SCRAM-SHA-256\0\0\0\0\x02n,",
        struct.pack("!ii", 16, 80877102) + b"\0\0\0\x01\0\0\0\x02",
    ]
    for _ in range(150):
        n = rng.randrange(0, 64)
        blob = bytes(rng.randrange(256) for _ in range(n))
        cases.append(blob if rng.random() < 0.5 else valid[:rng.randrange(len(valid))] + blob)
    for case in cases:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(case)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    assert query(dsn(cli, "main"), "select 1") == [(1,)]
    log = proxy_log(cli)
    assert "unexpected error" not in log and "Traceback" not in log, log[-3000:]


def test_role_commands_refuse_bad_input(proxied: Cli, test_dir: Path) -> None:
    """`strata role` refuses the superuser, a duplicate and an unknown role or branch with
    one line; `role password` changes what the proxy accepts."""
    cli = proxied
    assert "reserved" in cli.run("role", "create", "postgres", ok=False).stderr
    assert "exists on branch main" in cli.run("role", "create", "strata", ok=False).stderr
    assert "no role 'x'" in cli.run("role", "password", "x", ok=False).stderr
    assert "no branch named" in cli.run("role", "create", "y", "--branch", "nope",
                                        ok=False).stderr
    created = cli.run("role", "create", "app").stdout
    password = created.split("password: ")[1].strip()
    assert query(dsn(cli, "main", password=password).replace("user=strata", "user=app"),
                 "select current_user") == [("app",)]
    cli.run("role", "password", "strata", "--password", "new one")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        query(dsn(cli, "main"), "select 1")
    assert query(dsn(cli, "main", password="new one"), "select 1") == [(1,)]
