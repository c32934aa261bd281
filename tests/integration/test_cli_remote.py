"""The `strata` CLI with object storage (docs/remote-storage.md): a pageserver that lost its
whole data directory gets its tenants back from object storage with a new generation, and
`strata tenant detach/attach` move a tenant out of and back onto the pageserver.

Real processes throughout (pageserver, three safekeepers, PostgreSQL 15 endpoints and
their walproposers); object storage is a directory of the environment (`local`), the S3
backend is covered by test_remote_pageserver.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import test_cli
from remote_fixtures import s3_url, seaweed  # noqa: F401
from test_cli import Cli, rows

cli = test_cli.cli  # the fixture: an environment directory, stopped at the end

CONFIG = ("[tenant_defaults]\ncheckpoint_distance = 4194304\n\n"
          # A lazy compute's reads wait this long for the pageserver to come back.
          "[endpoint_defaults]\nlazy_outage_wait_s = 600\n")


def _init(cli: Cli, test_dir: Path) -> str:
    config = test_dir / "strata.toml"
    config.write_text(CONFIG)
    cli.run("init", "--config", str(config), "--object-storage", "local")
    cli.run("endpoint", "start", "main")
    return cli.local("main")  # Strata's own way in: the unix socket


def _known_rows(connstr: str, first: int, last: int) -> None:
    rows(connstr, f"insert into known select g, md5(g::text) from generate_series({first}, "
                  f"{last}) g")


def _check_known(connstr: str, last: int) -> None:
    count, total = rows(connstr, "select count(*), sum(id) from known "
                                 "where v = md5(id::text)")[0]
    assert (count, total) == (last, last * (last + 1) // 2)


def _pgbench(connstr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["pgbench", *args, connstr], capture_output=True, text=True,
                          timeout=900, check=True)


def _wait(condition: object, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out {what}"
        time.sleep(0.2)


def _tenants(cli: Cli) -> list[tuple[str, bool, int]]:
    return [(t["name"], t["attached"], t["generation"]) for t in cli.json("tenant", "list")]


def test_pageserver_restart_with_an_empty_disk_loses_nothing(cli: Cli, test_dir: Path) -> None:
    """pgbench runs on a lazy compute while the pageserver is killed, its data directory
    deleted and `strata pageserver start`ed again: the CLI attaches the tenant from object
    storage with generation 2, the compute carries on, and every transaction pgbench
    reported (and every row of a table written before and after) is there. Then `tenant
    detach` (refused while an endpoint runs) and `tenant attach` (generation 3): a new
    compute sees it all again."""
    main = _init(cli, test_dir)
    rows(main, "create table known (id int primary key, v text)")
    _known_rows(main, 1, 5000)
    _pgbench(main, "-i", "-s", "1", "-q")
    with subprocess.Popen(["pgbench", "-n", "-c", "2", "-t", "200", main],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as bench:
        _wait(lambda: rows(main, "select count(*) from pgbench_history")[0][0] >= 50,
              "for pgbench to commit 50 transactions")
        cli.run("pageserver", "stop", "--immediate")
        shutil.rmtree(cli.repo_dir / "pageserver")
        started = cli.run("pageserver", "start")
        out, err = bench.communicate(timeout=900)
    assert bench.returncode == 0, (out, err)
    assert "with generation 2" in started.stderr, started.stderr
    processed = int(re.search(r"number of transactions actually processed: (\d+)",
                              out).group(1))  # type: ignore[union-attr]
    assert processed == 400, out
    _known_rows(main, 5001, 6000)

    def check(connstr: str) -> None:
        _check_known(connstr, 6000)
        history, deltas, accounts = rows(
            connstr, "select count(*), coalesce(sum(delta), 0), "
                     "(select sum(abalance) from pgbench_accounts) from pgbench_history")[0]
        assert history == processed and deltas == accounts, (history, deltas, accounts)

    check(main)
    assert _tenants(cli) == [("default", True, 2)]

    # Detach (refused while the endpoint runs), then attach: a fresh compute reads
    # everything from the re-attached tenant.
    busy = cli.run("tenant", "detach", "default", ok=False)
    assert "endpoints ['main'] of tenant default are running" in busy.stderr
    cli.run("endpoint", "stop", "main")
    cli.run("tenant", "detach", "default")
    assert _tenants(cli) == [("default", False, 2)]
    assert not list((cli.repo_dir / "pageserver").glob("tenants/*/timelines"))
    refused = cli.run("endpoint", "start", "main", ok=False)
    assert "tenant default is detached" in refused.stderr
    assert "attached tenant default" in cli.run("tenant", "attach", "default").stdout
    assert _tenants(cli) == [("default", True, 3)]
    again = cli.run("tenant", "attach", "default", ok=False)
    assert "tenant default is attached already" in again.stderr
    cli.run("endpoint", "start", "main")
    check(cli.local("main"))
    log = (cli.repo_dir / "logs" / "pageserver.log").read_text()
    assert "Traceback" not in log


def test_init_runs_seaweedfs_and_tenant_size(cli: Cli, test_dir: Path) -> None:
    """`init --object-storage seaweedfs` runs a SeaweedFS S3 server with the environment
    (`status` shows it; `stop` and `start` stop and start it); the pageserver uploads
    there: `tenant size` reports local and remote bytes, and a pageserver that lost its
    data directory gets the tenant back from it. SeaweedFS killed (SIGKILL) while the
    pageserver uploads: the uploads retry once it runs again and nothing is lost (every
    row is read back after the attach, so the index named no missing object). Its S3
    port taken while the environment is stopped: `start` moves it. Then `pageserver add`
    and `tenant relocate --to 2` with the endpoint stopped."""
    config = test_dir / "strata.toml"
    config.write_text(CONFIG)
    cli.run("init", "--config", str(config), "--object-storage", "seaweedfs")
    status = cli.json("status")["object_storage"]
    assert status["url"].startswith("s3://strata?endpoint=http://127.0.0.1:"), status
    assert status["seaweedfs"]["state"] == "running", status
    assert "SeaweedFS" in cli.run("status").stdout
    cli.run("endpoint", "start", "main")
    # The safekeepers offload WAL to the same object storage (docs/safekeeper.md).
    sk_pid = int((cli.repo_dir / "run" / "safekeeper-1.pid").read_text())
    argv = Path(f"/proc/{sk_pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--remote-storage") + 1] == status["url"], argv
    main = cli.local("main")
    rows(main, "create table known (id int primary key, v text)")
    _known_rows(main, 1, 10000)
    # SeaweedFS killed while the pageserver uploads: uploads fail and retry until
    # `strata start` has it running again; nothing is lost.
    os.kill(int((cli.repo_dir / "run" / "seaweedfs.pid").read_text()), signal.SIGKILL)
    _wait(lambda: cli.json("status")["object_storage"]["seaweedfs"]["state"] == "died",
          "for SeaweedFS to be reported dead")
    log = cli.repo_dir / "logs" / "pageserver.log"
    for first in range(10001, 200001, 10000):
        _known_rows(main, first, first + 9999)
        if "remote storage operation" in log.read_text():
            break
    else:
        raise AssertionError("no upload failed while SeaweedFS was down")
    last = first + 9999
    assert "starting SeaweedFS" in cli.run("start").stderr
    cli.run("endpoint", "stop", "main")  # a clean stop: the pageserver has every commit

    def sizes() -> dict[str, object]:
        return cli.json("tenant", "size")  # type: ignore[no-any-return]

    # Uploads run in the background: wait until the remote copy is as large as the local.
    _wait(lambda: sizes()["remote_bytes"] >= sizes()["local_bytes"] > 0,  # type: ignore[operator]
          "for the layers to be uploaded")
    size = sizes()
    assert [t["branch"] for t in size["timelines"]] == ["main"]  # type: ignore[attr-defined]
    assert "(all)" in cli.run("tenant", "size").stdout

    cli.run("stop", "--immediate")
    assert cli.json("status")["object_storage"]["seaweedfs"]["state"] == "stopped"
    shutil.rmtree(cli.repo_dir / "pageserver")
    # SeaweedFS's S3 port (strata picked it at init) taken by another process while
    # nothing runs: `start` picks another and the URL the pageserver and the safekeepers
    # get names it.
    s3_port = int(status["url"].rsplit(":", 1)[1])
    with test_cli._occupy(s3_port):
        started = cli.run("start")
    assert "starting SeaweedFS" in started.stderr and "with generation 2" in started.stderr
    url = cli.json("status")["object_storage"]["url"]
    assert f"s3.port {s3_port} -> {url.rsplit(':', 1)[1]}" in started.stderr, started.stderr
    sk_pid = int((cli.repo_dir / "run" / "safekeeper-1.pid").read_text())
    argv = Path(f"/proc/{sk_pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--remote-storage") + 1] == url, argv
    cli.run("endpoint", "start", "main")
    _check_known(cli.local("main"), last)


    # A second pageserver, and the tenant moved to it (endpoint stopped): attached there
    # with generation 3, detached from pageserver 1; a compute on it reads every row.
    assert "added pageserver 2" in cli.run("pageserver", "add").stdout
    assert [p["state"] for p in cli.json("status")["pageservers"]] == ["running", "running"]
    cli.run("endpoint", "stop", "main")
    assert "no pageserver with id 3" in \
        cli.run("tenant", "relocate", "default", "--to", "3", ok=False).stderr
    moved = cli.run("tenant", "relocate", "default", "--to", "2")
    assert "relocated tenant default" in moved.stdout and "generation 3" in moved.stdout
    assert [(t["pageserver"], t["generation"]) for t in cli.json("tenant", "list")] == \
        [(2, 3)]
    assert not list((cli.repo_dir / "pageserver").glob("tenants/*/timelines"))
    assert list((cli.repo_dir / "pageserver-2").glob("tenants/*/timelines"))
    assert "on pageserver 2 already" in \
        cli.run("tenant", "relocate", "default", "--to", "2", ok=False).stderr
    # Restarting pageserver 1 does not bring the tenant back there.
    assert "generation" not in cli.run("pageserver", "restart", "--id", "1").stderr
    cli.run("endpoint", "start", "main")
    _check_known(cli.local("main"), last)
    _known_rows(cli.local("main"), last + 1, last + 1000)
    _check_known(cli.local("main"), last + 1000)
    assert "Traceback" not in (cli.repo_dir / "logs" / "pageserver-2.log").read_text()
    # `stop` stops both pageservers, `start` starts both.
    cli.run("stop")
    assert [p["state"] for p in cli.json("status")["pageservers"]] == ["stopped", "stopped"]


def test_relocate_with_a_running_lazy_compute(cli: Cli, test_dir: Path,
                                              s3_url: str) -> None:  # noqa: F811
    """`strata tenant relocate --to 2` while a lazy compute (started afresh, so its pages
    are still on the pageserver) commits rows one by one and reads table blocks it has not
    read yet: the compute never stops, every read completes, every acknowledged row is
    there afterwards, for it and for a new compute; pageserver 1 no longer holds the
    tenant, and the FUSE server and the walproposer went to pageserver 2 without a
    restart. Object storage: S3 on the SeaweedFS harness."""
    config = test_dir / "strata.toml"
    config.write_text(CONFIG)
    cli.run("init", "--config", str(config), "--object-storage", s3_url)
    cli.run("endpoint", "start", "main", "--mode", "lazy")
    main = cli.local("main")
    rows(main, "create table counter (id int primary key)")
    for table in ("cold", "colder"):  # colder: first read once the relocation is done
        rows(main, f"create table {table} (id int, pad text)")
        rows(main, f"insert into {table} select g, repeat('x', 400) "
                   "from generate_series(1, 40000) g")
        rows(main, f"create index on {table} (id)")
    # A fresh compute: every page of `cold` is read from the pageserver on first use.
    cli.run("endpoint", "stop", "main")
    cli.run("endpoint", "start", "main", "--mode", "lazy")
    main = cli.local("main")
    pid = next(e for e in cli.json("endpoint", "list") if e["name"] == "main")["pid"]
    assert "added pageserver 2" in cli.run("pageserver", "add").stdout

    stop = threading.Event()
    acked: list[int] = []
    reads: list[int] = []
    errors: list[BaseException] = []

    def commit() -> None:
        try:
            with psycopg.connect(main, autocommit=True) as conn:
                n = 0
                while not stop.is_set():
                    n += 1
                    conn.execute("insert into counter values (%s)", (n,))
                    acked.append(n)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    def read() -> None:
        try:
            with psycopg.connect(main, autocommit=True) as conn:
                chunk = 0
                while not stop.is_set():  # 500 rows (~30 blocks) of 80 chunks, shuffled
                    first = (chunk * 37) % 80 * 500 + 1
                    got = conn.execute("select count(*) from cold where id between %s and %s",
                                       (first, first + 499)).fetchone()
                    reads.append(got[0] if got else -1)
                    chunk += 1
                    stop.wait(0.2)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)

    workers = [threading.Thread(target=commit), threading.Thread(target=read)]
    for w in workers:
        w.start()
    try:
        _wait(lambda: len(acked) >= 50 and len(reads) >= 5, "for the workload to start",
              timeout_s=120)
        moved = cli.run("tenant", "relocate", "default", "--to", "2")
        at_move = len(acked), len(reads)
        _wait(lambda: len(acked) >= at_move[0] + 50 and len(reads) >= at_move[1] + 5,
              "for the workload to go on after the relocation", timeout_s=120)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert not errors, errors
    assert "relocated tenant default" in moved.stdout, moved
    assert "endpoint main now reads from pageserver 2" in moved.stderr, moved.stderr
    assert set(reads) == {500}, sorted(set(reads))
    # Pages never read before, read after the move: from pageserver 2.
    assert rows(main, "select count(*), sum(id) from colder")[0] == (40000, 40000 * 40001 // 2)
    assert [(t["pageserver"], t["generation"]) for t in cli.json("tenant", "list")] == \
        [(2, 2)]
    assert not list((cli.repo_dir / "pageserver").glob("tenants/*/timelines"))
    # The same compute throughout, now on pageserver 2 for its reads and its backpressure.
    assert next(e for e in cli.json("endpoint", "list") if e["name"] == "main")["pid"] == pid
    lazyfs = (cli.repo_dir / "endpoints" / "main" / "compute" / "lazyfs.log").read_text()
    assert "the pageserver moved" in lazyfs, lazyfs[-2000:]
    walproposer = (cli.repo_dir / "logs" / "walproposer-main.log").read_text()
    assert "the pageserver moved to" in walproposer, walproposer[-2000:]

    def check(connstr: str) -> None:
        count, top = rows(connstr, "select count(*), max(id) from counter")[0]
        assert count == top and top >= acked[-1], (count, top, acked[-1])
        assert rows(connstr, "select count(*) from cold")[0][0] == 40000
        assert rows(connstr, "select count(*) from colder")[0][0] == 40000

    check(main)
    # A new compute on the branch (read-only at the head), started from pageserver 2.
    lsn = rows(main, "select pg_current_wal_lsn()")[0][0]
    cli.run("endpoint", "create", "again", "--branch", "main", "--lsn", str(lsn))
    cli.run("endpoint", "start", "again")
    check(cli.local("again"))
    for log in ("pageserver.log", "pageserver-2.log"):
        assert "Traceback" not in (cli.repo_dir / "logs" / log).read_text(), log
