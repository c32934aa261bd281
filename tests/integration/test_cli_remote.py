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
import time
from pathlib import Path

import test_cli
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
    row is read back after the attach, so the index named no missing object). Relocation
    is refused as not built."""
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
    started = cli.run("start")
    assert "starting SeaweedFS" in started.stderr and "with generation 2" in started.stderr
    cli.run("endpoint", "start", "main")
    _check_known(cli.local("main"), last)

    for args in (("pageserver", "add"), ("tenant", "relocate", "default", "--to", "2")):
        refused = cli.run(*args, ok=False)
        assert "not supported yet" in refused.stderr, refused.stderr
