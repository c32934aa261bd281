"""Split brain (issue 15): two real pageservers attached to the same tenant at once, by
mistake, both ingesting from the safekeepers and uploading to S3 (the SeaweedFS harness),
GC on the stale one producing deletions. Generations keep the newer attachment whole
(docs/remote-storage.md, "Generations"). And an endpoint start during a relocation waits
for it (the tenant lock), so it never starts from the pageserver being left.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from remote_fixtures import s3_url, seaweed  # noqa: F401
from test_cli import STRATA, Cli, cli, rows  # noqa: F401
from test_cli_remote import _check_known, _known_rows, _wait

from strata.common.failpoint import ENV_VAR
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.control.attachments import attach_tenant
from strata.control.env import Environment
from strata.control.services import require_pageserver
from strata.pageserver.client import PageserverClient
from strata.pg.crc import crc32c
from strata.remote.index import INDEX_NAME, IndexPart, split_generation, timeline_prefix
from strata.remote.storage import RemoteStorage, open_remote_storage
from strata.remote.timeline_client import latest_index

CONFIG = ("[tenant_defaults]\ncheckpoint_distance = 1048576\ngc_horizon = 0\n"
          "pitr_interval_s = 0\nimage_creation_threshold = 1\ngc_period_s = 3600\n"
          "compaction_period_s = 3600\n\n"
          # The stale pageserver's periodic marker check: every second (default 10 s).
          "[pageserver.config]\ngeneration_check_period_s = 1\n")


def _check_index(storage: RemoteStorage, prefix: str, index: IndexPart) -> None:
    """Every object the index names exists with the size and CRC-32C it recorded."""
    for name, layer in index.layers.items():
        data = storage.get(prefix + layer.object_name(name))  # its own CRC-32C checked
        assert len(data) == layer.size, (name, len(data), layer.size)
        assert crc32c(data) == layer.crc32c, name


@pytest.mark.timeout(1500)
def test_two_pageservers_attached_to_one_tenant(cli: Cli, test_dir: Path,  # noqa: F811
                                                s3_url: str,  # noqa: F811
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Pageserver 1 holds the tenant with generation 1; the control plane hands
    generation 2 to pageserver 2 as well (the mistake), whose index uploads fail at
    first, so only the generation marker tells pageserver 1 it is stale. Pageserver 1
    finds out by its periodic marker check: its API says stale, one log line says so,
    and it uploads and deletes nothing from then on (GC on it removes layers: their
    objects stay), while it keeps serving reads (a lazy compute on it reads every row).
    Both ingest what the compute commits. Every object the newest index names exists
    with its checksum; a compute on pageserver 2 reads every acknowledged row, and so
    does one on a fresh pageserver 3 attached after pageserver 2 crashed."""
    config = test_dir / "strata.toml"
    config.write_text(CONFIG)
    cli.run("init", "--config", str(config), "--object-storage", s3_url)
    cli.run("endpoint", "start", "main", "--mode", "full")
    main = cli.local("main")
    rows(main, "create table known (id int primary key, v text)")
    last = 0
    for _ in range(3):
        _known_rows(main, last + 1, last + 10000)
        last += 10000
    # This process drives the pageservers' APIs as the control plane does.
    monkeypatch.setenv("STRATA_AUTH_TOKEN", cli.last_line("auth", "token", "--admin"))
    env = Environment(cli.repo_dir)
    conf = env.config()
    ps1 = require_pageserver(env, conf, 1)
    tid = TenantId(TenantId.parse(cli.json("tenant", "list")[0]["tenant_id"]).raw)
    (tl,) = [info.timeline_id for info in ps1.list_timelines(tid)]
    flushed = ps1.checkpoint(tid, tl).disk_consistent_lsn
    _wait(lambda: _uploaded(ps1, tid, tl, flushed), "for pageserver 1 to upload")
    storage = open_remote_storage(s3_url)
    prefix = timeline_prefix(tid, tl)
    before = latest_index(storage, tid, tl)
    assert before is not None and before.generation == 1 and before.layers

    # Pageserver 2 cannot upload an index at first: the listing check (a newer index
    # exists) would not stop pageserver 1; only the marker does.
    monkeypatch.setenv(ENV_VAR, "remote-before-upload-index=raise")
    assert "added pageserver 2" in cli.run("pageserver", "add").stdout
    monkeypatch.delenv(ENV_VAR)
    conf = env.config()
    ps2 = require_pageserver(env, conf, 2)
    assert attach_tenant(env, conf, ps2, tid) == 2  # the mistake: pageserver 1 keeps it
    assert [t["generation"] for t in cli.json("tenant", "list")] == [2]
    _wait(lambda: ps1.tenant(tid)["generation_state"] == "stale",
          "for pageserver 1 to find itself stale")
    assert ps1.tenant(tid)["newer_generation"] == 2
    assert (ps2.tenant(tid)["generation_state"], ps2.tenant(tid)["generation"]) == \
        ("current", 2)
    # The CLI shows the stale attachment, and what to do about it.
    listed = cli.json("tenant", "list")[0]["attachments"]
    assert sorted((a["pageserver"], a["generation_state"], a["generation"],
                   a["newer_generation"]) for a in listed) == \
        [(1, "stale", 1, 2), (2, "current", 2, None)], listed
    advice = ("pageserver 1: stale (generation 1 < 2): detach it (`strata tenant detach "
              "default --pageserver 1`)")
    assert advice in cli.run("tenant", "list").stderr
    assert [(a["pageserver"], a["generation"]) for a in
            cli.json("status")["stale_attachments"]] == [(1, 1)]
    assert advice in cli.run("status").stderr
    refused = cli.run("tenant", "detach", "default", "--pageserver", "2", ok=False).stderr
    assert "on pageserver 2 is not stale" in refused, refused

    for _ in range(3):
        _known_rows(main, last + 1, last + 10000)
        last += 10000
    _wait(lambda: ps2.timeline(tid, tl).last_record_lsn
          >= ps1.timeline(tid, tl).last_record_lsn, "for pageserver 2 to ingest")
    stale_objects = _objects_of(storage, tid, 1)  # uploads in flight are done by now
    ps1.checkpoint(tid, tl)
    assert ps1.compact(tid, tl) > 0
    removed = ps1.gc(tid)[tl]["layers_removed"]
    assert removed > 0, removed
    log1 = cli.repo_dir / "logs" / "pageserver.log"
    assert newest_index_generation(storage, prefix) == 1  # pageserver 2 had none yet
    _check_index(storage, prefix, before)  # what pageserver 2 attached from
    stale_lines = [line for line in log1.read_text().splitlines()
                   if "of this attachment is stale" in line]
    assert len(stale_lines) == 1, stale_lines
    assert "the generation marker names generation 2" in stale_lines[0]
    assert str(tid) in stale_lines[0], stale_lines[0]  # the tenant's context
    # It still serves reads: a lazy compute on pageserver 1 reads every row.
    cli.run("endpoint", "stop", "main")
    cli.run("endpoint", "start", "main", "--mode", "lazy")
    _check_known(cli.local("main"), last)
    cli.run("endpoint", "stop", "main")
    cli.run("endpoint", "start", "main", "--mode", "full")
    main = cli.local("main")

    # Pageserver 2 uploads again (restarted without the failpoint); both keep ingesting.
    cli.run("pageserver", "stop", "--id", "2", "--immediate")
    cli.run("pageserver", "start", "--id", "2")
    ps2 = require_pageserver(env, env.config(), 2)
    _wait(lambda: newest_index_generation(storage, prefix) == 2,
          "for pageserver 2 to upload an index")
    _known_rows(main, last + 1, last + 10)
    last += 10
    _wait(lambda: ps2.timeline(tid, tl).last_record_lsn
          >= ps1.timeline(tid, tl).last_record_lsn, "for pageserver 2 to follow again")
    for _ in range(3):
        _known_rows(main, last + 1, last + 10000)
        last += 10000
    for ps in (ps1, ps2):
        lsn = ps.checkpoint(tid, tl).disk_consistent_lsn
        ps.compact(tid, tl)
        ps.gc(tid)
    # Pageserver 2's own GC deletes what only it names (its marker is its generation).
    _wait(lambda: _uploaded(ps2, tid, tl, lsn), "for pageserver 2 to upload")
    assert "Traceback" not in log1.read_text()
    assert not _remote_lines(log1)  # pageserver 1 never got as far as a deletion
    # Nor uploaded anything (pageserver 2's GC deleted some it inherited: its right).
    assert _objects_of(storage, tid, 1) <= stale_objects

    newest = latest_index(storage, tid, tl)
    assert newest is not None and newest.generation == 2
    _check_index(storage, prefix, newest)
    gens = {split[1] for key in storage.list_keys(prefix)
            if (split := split_generation(key)) is not None}
    assert gens <= {1, 2}, gens

    # A compute on the newer attachment reads every acknowledged row.
    cli.run("endpoint", "stop", "main")
    # The mistake undone (its uploads stay under generation 1).
    cli.run("tenant", "detach", "default", "--pageserver", "1")
    assert tid not in ps1.list_tenants()
    with env.locked() as state:
        state.tenants[tid].pageserver = 2
    assert cli.json("status")["stale_attachments"] == []
    cli.run("endpoint", "start", "main", "--mode", "full")
    _check_known(cli.local("main"), last)
    _known_rows(cli.local("main"), last + 1, last + 1000)
    last += 1000
    cli.run("endpoint", "stop", "main")

    # Pageserver 2 crashes; a fresh pageserver 3 attaches (generation 3) from what is in
    # object storage and the safekeepers, and serves every row.
    assert "added pageserver 3" in cli.run("pageserver", "add").stdout
    cli.run("pageserver", "stop", "--id", "2", "--immediate")
    with env.locked() as state:
        state.tenants[tid].pageserver = 3
    started = cli.run("pageserver", "restart", "--id", "3")
    assert "with generation 3" in started.stderr, started.stderr
    cli.run("endpoint", "start", "main", "--mode", "full")
    _check_known(cli.local("main"), last)
    for log in ("pageserver.log", "pageserver-2.log", "pageserver-3.log"):
        assert "Traceback" not in (cli.repo_dir / "logs" / log).read_text(), log


def newest_index_generation(storage: RemoteStorage, prefix: str) -> int:
    gens = [split[1] for key in storage.list_keys(prefix + INDEX_NAME + "-")
            if (split := split_generation(key)) is not None]
    return max(gens, default=0)


def _objects_of(storage: RemoteStorage, tid: TenantId, generation: int) -> set[str]:
    """The tenant's objects written under `generation` (layers and indexes)."""
    return {key for key in storage.list_keys(f"tenants/{tid}/timelines/")
            if (split := split_generation(key)) is not None and split[1] == generation}


def _remote_lines(log: Path) -> list[str]:
    """What the pageserver did with removed layers: 'kept N' or 'deleted N', in order."""
    return re.findall(r"(?:kept|deleted) \d+ (?=remote layers)", log.read_text())


def _uploaded(ps: PageserverClient, tid: TenantId, tl: TimelineId, lsn: Lsn) -> bool:
    remote = ps.timeline(tid, tl).remote_consistent_lsn
    return remote is not None and remote >= lsn


def test_endpoint_start_waits_for_a_relocation(cli: Cli, test_dir: Path,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`endpoint start` while `tenant relocate --to 2` runs (held after the attach on
    pageserver 2, before the switch, by a failpoint): the start waits for the
    relocation's tenant lock, then starts from pageserver 2, not from pageserver 1 that
    the relocation detaches; the endpoint reads and writes every row."""
    config = test_dir / "strata.toml"
    config.write_text("[tenant_defaults]\ncheckpoint_distance = 4194304\n")
    cli.run("init", "--config", str(config), "--object-storage", "local")
    cli.run("endpoint", "start", "main", "--mode", "full")
    main = cli.local("main")
    rows(main, "create table known (id int primary key, v text)")
    _known_rows(main, 1, 5000)
    cli.run("endpoint", "stop", "main")
    assert "added pageserver 2" in cli.run("pageserver", "add").stdout
    # The relocation is held until the test releases it: once the start says it waits.
    release = test_dir / "release-relocation"
    monkeypatch.setenv(ENV_VAR, f"relocate-before-switch=wait(300,{release})")
    waiting = "waiting: a relocation or detach of the tenant of endpoint main"
    with subprocess.Popen([STRATA, "--repo-dir", str(cli.repo_dir), "tenant", "relocate",
                           "default", "--to", "2"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as relocate:
        monkeypatch.delenv(ENV_VAR)
        _wait(lambda: list((cli.repo_dir / "pageserver-2").glob("tenants/*/timelines/*")),
              "for pageserver 2 to attach the tenant")
        with subprocess.Popen([STRATA, "--repo-dir", str(cli.repo_dir), "endpoint", "start",
                               "main", "--mode", "full"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as start:
            assert start.stderr is not None
            seen = []
            for line in start.stderr:
                seen.append(line)
                if waiting in line:
                    break
            release.touch()
            _, rest = start.communicate(timeout=600)
        out, err = relocate.communicate(timeout=600)
    started_err = "".join(seen) + rest
    assert start.returncode == 0, started_err
    assert "Traceback" not in started_err, started_err
    assert relocate.returncode == 0, (out, err)
    assert "relocated tenant default" in out, out
    assert waiting in started_err, started_err
    ps2 = Environment(cli.repo_dir).config().pageserver_by_id(2)
    address = json.loads((cli.repo_dir / "endpoints" / "main" / "pageserver.json").read_text())
    assert address["pg"].endswith(f":{ps2.pg_port}"), address
    assert not list((cli.repo_dir / "pageserver").glob("tenants/*/timelines"))
    main = cli.local("main")
    _check_known(main, 5000)
    _known_rows(main, 5001, 6000)
    _check_known(main, 6000)
    # A detach waits for nothing here and refuses: the endpoint runs.
    assert "are running" in cli.run("tenant", "detach", "default", ok=False).stderr
