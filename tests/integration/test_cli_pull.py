"""Pull mode end to end through the `strata` CLI (config.toml `commit_mode = "pull"`,
docs/walproposer.md "Pull mode"): the safekeepers replicate each primary's WAL over its
unix socket on slots sk1..sk3 and PostgreSQL releases a commit once two of them flushed
it; the sidecar elects, tells them to pull and hands them the commit LSN.

A story: commits (inserts and a short pgbench) go through; the config and
pg_stat_replication show the quorum; a row survives an endpoint stop + start, and a
branch at the head sees it through a new endpoint (the pageserver has it, from the
safekeepers); every safekeeper's commit LSN reaches the last commit; with one safekeeper
killed (kill -9) commits go on, with two down a commit waits (reads go on) and returns
once one is back; the walproposer is never fenced. Backpressure: with the pageserver's
ingest held, a commit past the lag limit waits (the sidecar's PullLimit) and returns once
ingest goes on. Issue 13's crash loop in pull mode: kill -9 of the postmaster under a
writer, then `endpoint start`, 20 rounds: every start works and keeps every acknowledged
commit. Pull is the default; push mode when config.toml asks for it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import signal
import threading
import time
from pathlib import Path

import psycopg
import pytest
import test_cli
from test_cli import Cli, rows, values

from strata.common.lsn import Lsn
from strata.common.proc import pg_bindir, run_as, service_user

cli = test_cli.cli  # the fixture: an environment directory, stopped at the end


def _init(cli: Cli, test_dir: Path, mode: str) -> None:
    """`strata init` with a config.toml that asks for `commit_mode = mode`."""
    config = test_dir / f"{mode}.toml"
    config.write_text(f'commit_mode = "{mode}"\n')
    cli.run("init", "--config", str(config))
    assert f'commit_mode = "{mode}"' in (cli.repo_dir / "config.toml").read_text()


def _standbys(cli: Cli) -> tuple[str, list[str]]:
    """Main's compute: its synchronous_standby_names and its replication slots."""
    with cli.superuser("main") as su:
        row = su.execute("show synchronous_standby_names").fetchone()
        slots = su.execute("select slot_name from pg_replication_slots order by 1").fetchall()
    assert row is not None
    return row[0], [slot for (slot,) in slots]


def _compute_id(cli: Cli) -> str:
    """Main's compute's strata.compute_id (set per start; PullFrom.compute_id)."""
    with cli.superuser("main") as su:
        row = su.execute("show strata.compute_id").fetchone()
    assert row is not None
    return str(row[0])


def _commit_lsns(cli: Cli, branch: str) -> dict[int, Lsn]:
    out = {}
    for sk in cli.json("status")["safekeepers"]:
        tl = next((t for t in sk["timelines"] if t["branch"] == branch), None)
        out[sk["id"]] = Lsn.parse(tl["commit_lsn"]) if tl else Lsn(0)
    return out


@pytest.mark.timeout(900)
def test_pull_mode_end_to_end(cli: Cli, test_dir: Path) -> None:
    _init(cli, test_dir, "pull")
    cli.run("start")
    main = cli.local("main")
    assert _standbys(cli) == ("ANY 2 (sk1, sk2, sk3)", ["sk1", "sk2", "sk3"])
    rows(main, "create table t (id int primary key, v text)")
    for i in range(20):
        rows(main, f"insert into t values ({i}, 'row {i}')")
    status = cli.json("status")
    assert status["commit_mode"] == "pull"
    ep = next(e for e in status["endpoints"] if e["name"] == "main")
    assert ep["walproposer"]["state"] == "running" and ep["walproposer"]["streaming"], ep
    with cli.superuser("main") as su:
        repl = su.execute("select application_name, sync_state from pg_stat_replication "
                          "where application_name like 'sk%' order by 1").fetchall()
        assert repl == [("sk1", "quorum"), ("sk2", "quorum"), ("sk3", "quorum")], repl
        run = su.execute("select 1").fetchone()
        assert run == (1,)
    # A short pgbench through the same path (as the superuser over the socket).
    sock, port = ep["socket_dir"], ep["address"].rsplit(":", 1)[1]
    pgbench = [pg_bindir() / "pgbench", "-h", sock, "-p", port, "-U", "postgres"]
    for args in (["-i", "-s", "1", "-q"], ["-c", "2", "-T", "3", "-N", "-n"]):
        done = run_as(service_user(), [*pgbench, *args, "postgres"])
    assert b"tps = " in done.stdout, done.stdout

    # Every safekeeper learns the commit LSN (commit-only messages from the sidecar).
    committed = Lsn.parse(rows(main, "select pg_current_wal_flush_lsn()::text")[0][0])
    deadline = time.monotonic() + 30
    while min(_commit_lsns(cli, "main").values()) < committed - 200:
        assert time.monotonic() < deadline, (_commit_lsns(cli, "main"), committed)
        time.sleep(0.2)

    # Survives a stop + start; a branch at the head has it (from the pageserver). The new
    # compute has its own id, which the safekeepers are told to pull from.
    first_id = _compute_id(cli)
    cli.run("endpoint", "stop", "main")
    cli.run("endpoint", "start", "main")
    main = cli.local("main")
    assert values(main) == [f"row {i}" for i in range(20)]
    second_id = _compute_id(cli)
    assert len(first_id) == len(second_id) == 16 and first_id != second_id
    rows(main, "insert into t values (100, 'after restart')")
    cli.run("timeline", "branch", "head")
    cli.run("endpoint", "create", "head", "--branch", "head")
    cli.run("endpoint", "start", "head")
    head = cli.local("head")
    assert values(head)[-1] == "after restart" and len(values(head)) == 21
    rows(head, "insert into t values (101, 'head only')")
    assert values(main)[-1] == "after restart"
    cli.run("endpoint", "stop", "head")

    # One safekeeper killed (kill -9): commits go on. Two down: a commit waits, reads go
    # on; one back: it returns.
    sk2 = next(sk for sk in cli.json("status")["safekeepers"] if sk["id"] == 2)
    os.kill(sk2["pid"], signal.SIGKILL)
    rows(main, "insert into t values (200, 'one down')")
    cli.run("safekeeper", "stop", "3")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(rows, main, "insert into t values (201, 'waited')")
        with pytest.raises(concurrent.futures.TimeoutError):
            pending.result(5)
        assert len(values(main)) == 22  # reads go on
        cli.run("safekeeper", "start", "3")
        pending.result(120)
    cli.run("safekeeper", "start", "2")
    rows(main, "insert into t values (202, 'all back')")
    assert values(main)[-3:] == ["one down", "waited", "all back"]
    ep = next(e for e in cli.json("endpoint", "list") if e["name"] == "main")
    assert ep["state"] == "running" and ep["walproposer"]["state"] == "running", ep


def _pull_flush_lsns(cli: Cli, branch: str) -> list[Lsn]:
    """What the safekeepers told the compute (pg_stat_replication), sk1..sk3."""
    with cli.superuser(branch) as su:
        got = su.execute("select flush_lsn::text from pg_stat_replication where "
                         "application_name like 'sk%' order by application_name").fetchall()
    return [Lsn.parse(r[0]) for r in got if r[0] is not None]


@pytest.mark.timeout(900)
def test_pull_mode_backpressure_holds_commits_while_ingest_is_held(
        cli: Cli, test_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ingest held (the pageserver's `ingest-apply-record` failpoint waits for a file): a
    commit of more WAL than max_write_lag_bytes (16 MiB) waits although every safekeeper
    has it (their commit LSN passes what they tell the compute: the sidecar's PullLimit);
    released, it returns."""
    release = test_dir / "ingest-release"
    release.touch()
    monkeypatch.setenv("STRATA_FAILPOINTS", f"ingest-apply-record=wait(600,{release})")
    _init(cli, test_dir, "pull")
    cli.run("start")
    main = cli.local("main")
    rows(main, "create table big (v text)")
    rows(main, "insert into big values ('before')")
    release.unlink()  # the next record the pageserver applies waits for the file
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # About 30 MiB of WAL in one transaction: its commit is past the limit.
        pending = pool.submit(rows, main, "insert into big select repeat(md5(i::text), 30) "
                                          "from generate_series(1, 30000) i")
        deadline = time.monotonic() + 300
        held = 0
        while held < 3:  # three looks, 1 s apart, all held
            assert time.monotonic() < deadline, (_commit_lsns(cli, "main"),
                                                 _pull_flush_lsns(cli, "main"))
            assert not pending.done(), pending.result()
            reported = _pull_flush_lsns(cli, "main")
            on_safekeepers = sorted(_commit_lsns(cli, "main").values())[1]
            # Two safekeepers have (and committed) WAL past what any of them told the
            # compute: held by the PullLimit, not by slow safekeepers.
            if len(reported) == 3 and on_safekeepers - max(reported) > 1 << 20:
                held += 1
            else:
                held = 0
            time.sleep(1)
        assert not pending.done()
        release.touch()
        pending.result(300)
    assert rows(main, "select count(*) from big")[0][0] == 30001
    rows(main, "insert into big values ('after')")
    assert rows(main, "select count(*) from big")[0][0] == 30002


def _write_until_killed(connstr: str, first: int, acked: list[int]) -> None:
    """Commit rows first, first + 1, ... one by one, noting each acknowledged id, until
    the connection dies (the postmaster was killed)."""
    with contextlib.suppress(psycopg.Error), \
            psycopg.connect(connstr, autocommit=True) as conn:
        for i in itertools.count(first):
            conn.execute("insert into acked values (%s)", (i,))
            acked.append(i)


@pytest.mark.timeout(1800)
def test_pull_mode_kill9_of_the_postmaster_then_start_20_rounds(cli: Cli,
                                                                test_dir: Path) -> None:
    """The postmaster killed (kill -9) while a client commits, then `endpoint start` at
    once, 20 times: every start works, every acknowledged commit is there afterwards
    (released by ANY 2 of the pulling safekeepers, so on a majority), and the new compute
    commits again."""
    _init(cli, test_dir, "pull")
    cli.run("start")
    main = cli.local("main")
    rows(main, "create table acked (id int primary key)")
    acked: list[int] = []
    for round_no in range(20):
        before = len(acked)
        writer = threading.Thread(target=_write_until_killed,
                                  args=(main, round_no * 1_000_000, acked))
        writer.start()
        deadline = time.monotonic() + 120
        while len(acked) < before + 5:  # some commits of this round acknowledged
            assert time.monotonic() < deadline and writer.is_alive(), (round_no, len(acked))
            time.sleep(0.05)
        os.kill(int((cli.repo_dir / "run" / "endpoint-main.pid").read_text()), signal.SIGKILL)
        writer.join(60)
        assert not writer.is_alive()
        main = cli.json("endpoint", "start", "main")["local_connstr"]
        present = {r[0] for r in rows(main, "select id from acked")}
        missing = set(acked) - present
        assert not missing, (round_no, sorted(missing)[:10], len(missing))
    assert len(acked) >= 100, len(acked)
    rows(main, "insert into acked values (-1)")
    ep = next(e for e in cli.json("endpoint", "list") if e["name"] == "main")
    assert ep["state"] == "running" and ep["walproposer"]["state"] == "running", ep


@pytest.mark.timeout(600)
def test_push_mode_when_config_asks_for_it(cli: Cli, test_dir: Path) -> None:
    """Pull is the default; config.toml `commit_mode = "push"` still gives the sidecar as
    the one synchronous standby (its slot, no sk<id> slots), and commits go through it."""
    _init(cli, test_dir, "push")
    cli.run("start")
    main = cli.local("main")
    rows(main, "create table t (id int primary key, v text)")
    rows(main, "insert into t values (1, 'pushed')")
    assert values(main) == ["pushed"]
    assert cli.json("status")["commit_mode"] == "push"
    assert _standbys(cli) == ("strata_walproposer", ["strata_walproposer"])
    with cli.superuser("main") as su:
        repl = su.execute("select application_name, sync_state from pg_stat_replication "
                          "order by 1").fetchall()
        assert ("strata_walproposer", "sync") in repl, repl
        assert not [r for r in repl if r[0].startswith("sk")], repl
