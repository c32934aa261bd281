"""Old WAL from object storage, end to end (docs/remote-storage.md, "When a pageserver needs
WAL the safekeepers removed"): real processes (pageserver, three safekeepers offloading WAL
to the environment's object storage, PostgreSQL 15 endpoints).

1. The invariant: the safekeepers remove WAL only below the pageserver's
   remote_consistent_lsn, so a pageserver that lost its disk resumes at or above what they
   removed and downloads nothing of it.
2. The case that still needs old WAL: the pageserver's objects rolled back to an older
   copy (a bucket restored from a backup, uploads lost): the attachment resumes below the
   safekeepers' removal point, they stream that WAL back from object storage, and a
   compute reads every row.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from pathlib import Path

import test_cli
from test_cli import Cli, rows

from strata.common.durable import TEMP_SUFFIX
from strata.common.lsn import Lsn

cli = test_cli.cli  # the fixture: an environment directory, stopped at the end

CONFIG = "[tenant_defaults]\ncheckpoint_distance = 4194304\n"
FILLER_ROW = "repeat(md5(g::text), 30)"  # 960 bytes: not compressed, ~1 KB of WAL a row


def _metrics(cli: Cli) -> list[dict[str, float]]:
    """Per safekeeper, its one timeline's gauges and counters from /metrics ({} if it is
    not running)."""
    out: list[dict[str, float]] = []
    for sk in cli.json("status")["safekeepers"]:
        if sk["state"] != "running":
            out.append({})
            continue
        with urllib.request.urlopen(f"http://{sk['addresses']['http']}/metrics",
                                    timeout=10) as resp:
            text = resp.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("safekeeper_timeline_") and "{" in line:
                name = line.split("{", 1)[0].removeprefix("safekeeper_timeline_")
                values[name.removesuffix("_total")] = float(line.rsplit(" ", 1)[1])
        out.append(values)
    return out


def _wait(condition: object, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out {what}"
        time.sleep(0.5)


def _index_lsn(index_file: Path) -> Lsn:
    """disk_consistent_lsn of an index object of the local backend (JSON + CRC trailer)."""
    return Lsn.parse(json.loads(index_file.read_bytes()[:-8])["disk_consistent_lsn"])


def _check(connstr: str, filler: int) -> None:
    assert rows(connstr, "select count(*), sum(id) from known where v = md5(id::text)")[0] \
        == (5000, 5000 * 5001 // 2)
    assert rows(connstr, f"select count(*), sum(g) from filler where v = {FILLER_ROW}")[0] \
        == (filler, filler * (filler + 1) // 2)


def _lose_pageserver_disk(cli: Cli) -> None:
    cli.run("pageserver", "stop", "--immediate")
    shutil.rmtree(cli.repo_dir / "pageserver")


def test_pageserver_needs_removed_wal_only_after_a_rollback(cli: Cli, test_dir: Path) -> None:
    config = test_dir / "strata.toml"
    config.write_text(CONFIG)
    cli.run("init", "--config", str(config), "--object-storage", "local")
    cli.run("endpoint", "start", "main")
    main = cli.local("main")
    rows(main, "create table known (id int primary key, v text)")
    rows(main, "insert into known select g, md5(g::text) from generate_series(1, 5000) g")
    rows(main, "create table filler (g int, v text)")
    remote = cli.repo_dir / "remote_storage"
    _wait(lambda: list(remote.glob("tenants/*/timelines/*/index_part.json-*")),
          "for a first index")
    [tl_remote] = list(remote.glob("tenants/*/timelines/*"))

    # A copy of the pageserver's objects as of now: the index first, then the layers (an
    # index names only layers uploaded before it, so the copy is consistent).
    snapshot = test_dir / "snapshot"
    snapshot.mkdir()
    for index in tl_remote.glob("index_part.json-*"):
        if not index.name.endswith(TEMP_SUFFIX):  # an index being written (temp, rename)
            shutil.copy2(index, snapshot / index.name)
    for obj in tl_remote.iterdir():
        if obj.name.startswith("index_part.json-") or (snapshot / obj.name).exists() \
                or obj.name.endswith(TEMP_SUFFIX):
            continue
        try:  # a file being written (temp, then renamed) may be gone already
            shutil.copy2(obj, snapshot / obj.name)
        except FileNotFoundError:
            continue
    [old_index] = list(snapshot.glob("index_part.json-*"))
    old_lsn = _index_lsn(old_index)

    # Enough WAL that the safekeepers upload and remove segments above the copy's LSN.
    filler = 0
    while True:
        rows(main, f"insert into filler select g, {FILLER_ROW} "
                   f"from generate_series({filler + 1}, {filler + 10000}) g")
        filler += 10000
        # Every safekeeper removes: the one the pageserver streams from by its feedback,
        # the others by its index in object storage.
        if min(m.get("wal_start_lsn", 0) for m in _metrics(cli)) > old_lsn.value:
            break
        assert filler < 200000, _metrics(cli)
    metrics = _metrics(cli)
    assert sum(m["segments_uploaded"] for m in metrics) > 0, metrics
    # Never removed above what the pageserver made durable in object storage.
    [index] = list(tl_remote.glob("index_part.json-*"))
    assert max(m["wal_start_lsn"] for m in metrics) <= _index_lsn(index).value, metrics
    assert list((remote / "wal").glob("*/*/0000*")), "no WAL segment in object storage"
    cli.run("endpoint", "stop", "main")  # a clean stop: every commit is on the safekeepers

    # 1. The pageserver loses its disk: attached again (generation 2) from its newest index,
    # which is at or above what the safekeepers removed: no WAL comes from object storage.
    _lose_pageserver_disk(cli)
    assert "with generation 2" in cli.run("pageserver", "start").stderr
    cli.run("endpoint", "start", "main")
    _check(cli.local("main"), filler)
    assert [m["segments_downloaded"] for m in _metrics(cli)] == [0, 0, 0]
    cli.run("endpoint", "stop", "main")

    # 2. The pageserver's objects rolled back to the copy (as a bucket restored from a
    # backup): generation 3 resumes at the copy's LSN, below the safekeepers' removal point;
    # they stream the removed WAL from object storage and a compute reads every row.
    _lose_pageserver_disk(cli)
    shutil.rmtree(tl_remote)
    shutil.copytree(snapshot, tl_remote)
    # Every safekeeper removed that WAL, so it must come from object storage.
    metrics = _metrics(cli)
    assert min(m["wal_start_lsn"] for m in metrics) > old_lsn.value, metrics
    assert "with generation 3" in cli.run("pageserver", "start").stderr
    commit = max(int(m["commit_lsn"]) for m in metrics)

    def ingested() -> Lsn:
        [tl] = [t for t in cli.json("status")["pageserver"]["timelines"]
                if t["branch"] == "main"]
        return Lsn.parse(tl["last_record_lsn"])

    _wait(lambda: ingested().value >= commit, "for the pageserver to ingest the old WAL")
    assert sum(m["segments_downloaded"] for m in _metrics(cli)) > 0
    cli.run("endpoint", "start", "main")
    _check(cli.local("main"), filler)
    rows(cli.local("main"), "insert into filler values (0, 'after the rollback')")
    log = (cli.repo_dir / "logs" / "pageserver.log").read_text()
    assert "Traceback" not in log
