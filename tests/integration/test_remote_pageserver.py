"""The pageserver with S3 remote storage (SeaweedFS on loopback): layers and an index
uploaded per generation, and a pageserver with an empty disk serving the tenant after an
attach, with a compute on it, reading layers on demand (ranged reads, then whole layers
in the background) and evicting them to stay within its local cache limit; and one
serving a compute by ranged reads alone, without downloading any whole layer."""

from __future__ import annotations

from pathlib import Path

from fixtures_env import Env, PageserverProcess
from remote_fixtures import s3_url, seaweed  # noqa: F401
from test_e2e_compute import wait_ingested

from polling import wait_until
from strata.common.errors import UserError
from strata.remote.generations import read_generation
from strata.remote.index import IndexPart, timeline_prefix
from strata.remote.storage import open_remote_storage


def test_upload_then_attach_on_an_empty_disk(test_dir: Path, s3_url: str) -> None:  # noqa: F811
    """Every local layer is in S3 under generation 3 with its size, named by an index
    whose disk_consistent_lsn is remote_consistent_lsn; a second pageserver with an empty
    disk attaches with generation 4 (downloading no layer) and a compute on it sees
    every committed row, its reads downloading the layers; with a 1-byte cache limit
    every indexed layer is evicted again, and a new compute downloads them again."""
    ps1 = PageserverProcess(test_dir / "ps1", test_dir / "pageserver1.log",
                            overrides=[f"remote_storage={s3_url}"])
    ps1.start()
    env1 = Env(test_dir, ps1)
    ps2 = PageserverProcess(test_dir / "ps2", test_dir / "pageserver2.log",
                            overrides=[f"remote_storage={s3_url}", "local_cache_bytes=1"])
    env2 = Env(test_dir, ps2, _seq=10)
    # c1 stops before ps1, whose WAL receiver then retries it until ps1 stops (ten retries
    # in a row log a WARNING when uploads take long under load).
    env1.allowed_log_errors.append(r"walreceiver: connection to \S+ ended")
    try:
        tenant, main = env1.client.create_tenant(generation=3)
        c1 = env1.start_compute(tenant, main)
        c1.sql("create table t (id int primary key, v text)")
        c1.sql("insert into t select g, repeat('x', 100) from generate_series(1, 20000) g")
        wait_ingested(env1, tenant, main, c1)
        c1.stop("fast")
        info = env1.client.checkpoint(tenant, main)
        wait_until(lambda: env1.client.timeline(tenant, main).remote_consistent_lsn
                   == info.disk_consistent_lsn, 120, "uploads up to disk_consistent_lsn")

        storage = open_remote_storage(s3_url)
        prefix = timeline_prefix(tenant, main)
        index = IndexPart.decode(storage.get(prefix + "index_part.json-00000003"), "index")
        assert index.disk_consistent_lsn == info.disk_consistent_lsn
        local = {p.name: p.stat().st_size for p in
                 (ps1.workdir / "tenants" / str(tenant) / "timelines" / str(main)).iterdir()
                 if p.name.endswith((".delta", ".image"))}
        assert {name: layer.size for name, layer in index.layers.items()} == local
        assert all(layer.generation == 3 for layer in index.layers.values())
        remote = set(storage.list_keys(prefix))
        assert {prefix + f"{name}-00000003" for name in local} <= remote
        assert ps1.stop() == 0, ps1.log_tail()

        assert read_generation(storage, tenant) == 3  # the create wrote its marker
        ps2.start()
        out = env2.client.request("POST", f"/v1/tenant/{tenant}/attach", {"generation": 4})
        assert [t["timeline_id"] for t in out["timelines"]] == [str(main)]
        # Attached through the API, no CLI: the pageserver raised the marker itself.
        assert read_generation(storage, tenant) == 4
        assert env2.client.tenant(tenant)["generation_state"] == "current"
        attached = env2.client.timeline(tenant, main)
        assert attached.disk_consistent_lsn == info.disk_consistent_lsn
        tl2 = ps2.workdir / "tenants" / str(tenant) / "timelines" / str(main)

        def local_layers() -> list[str]:
            return [p.name for p in tl2.iterdir() if p.name.endswith((".delta", ".image"))]

        # Attach wrote metadata only; what is local now a read fetched (the WAL path's
        # start reads a few keys).
        assert len(local_layers()) <= len(index.layers)
        c2 = env2.start_compute(tenant, main)
        assert c2.sql("select count(*), sum(length(v)) from t") == [(20000, 2_000_000)]
        assert "on demand" in ps2.log_text()
        c2.sql("insert into t values (0, 'after attach')")
        wait_ingested(env2, tenant, main, c2)
        c2.stop("fast")
        info2 = env2.client.checkpoint(tenant, main)
        wait_until(lambda: env2.client.timeline(tenant, main).remote_consistent_lsn
                   == info2.disk_consistent_lsn, 120, "uploads of generation 4")
        index4 = IndexPart.decode(storage.get(prefix + "index_part.json-00000004"), "index")
        assert index4.disk_consistent_lsn == info2.disk_consistent_lsn
        # Layers inherited from generation 3 keep their names; new ones carry 4.
        assert {layer.generation for layer in index4.layers.values()} == {3, 4}
        wait_until(lambda: not local_layers(), 60, "eviction of every indexed layer")
        c3 = env2.start_compute(tenant, main)
        assert c3.sql("select count(*) from t") == [(20001,)]
        c3.stop("fast")
        try:
            env2.client.request("POST", f"/v1/tenant/{tenant}/attach", {"generation": 5})
            raise AssertionError("a second attach of an attached tenant was accepted")
        except UserError as err:
            assert "already attached" in str(err)
    finally:
        env1.stop_all()
        env2.stop_all()
    unexpected = env1.unexpected_log_errors()
    assert not unexpected, "\n".join(unexpected[:20])


def _remote_reads(env: Env) -> dict[str, float]:
    """strata_pageserver_remote_reads_total by kind, summed over timelines."""
    out: dict[str, float] = {}
    for line in env.client.metrics_text().splitlines():
        if line.startswith("strata_pageserver_remote_reads_total{"):
            labels, value = line.rsplit(" ", 1)
            kind = labels.split('kind="', 1)[1].split('"', 1)[0]
            out[kind] = out.get(kind, 0.0) + float(value)
    return out


def test_empty_disk_serves_a_compute_by_ranged_reads(test_dir: Path, s3_url: str) -> None:  # noqa: F811
    """A pageserver with an empty disk, attached to a tenant in S3 and told to download
    no whole layer (ranged_reads_before_download huge), serves a compute's basebackup and
    every page of a table by ranged GETs: every row is read back, no layer was
    downloaded, no layer of the index is on its disk, and the GETs moved far fewer bytes
    than the layers hold."""
    ps1 = PageserverProcess(test_dir / "ps1", test_dir / "pageserver1.log",
                            overrides=[f"remote_storage={s3_url}"])
    ps1.start()
    env1 = Env(test_dir, ps1)
    ps2 = PageserverProcess(test_dir / "ps2", test_dir / "pageserver2.log",
                            overrides=[f"remote_storage={s3_url}",
                                       "ranged_reads_before_download=1000000000"])
    env2 = Env(test_dir, ps2, _seq=10)
    # c1 stops before ps1, whose WAL receiver then retries it until ps1 stops.
    env1.allowed_log_errors.append(r"walreceiver: connection to \S+ ended")
    try:
        tenant, main = env1.client.create_tenant(generation=3)
        c1 = env1.start_compute(tenant, main)
        c1.sql("create table t (id int primary key, v text)")
        c1.sql("insert into t select g, md5(g::text) from generate_series(1, 20000) g")
        expect = c1.sql("select count(*), sum(hashtext(v)) from t")
        wait_ingested(env1, tenant, main, c1)
        c1.stop("fast")
        info = env1.client.checkpoint(tenant, main)
        wait_until(lambda: env1.client.timeline(tenant, main).remote_consistent_lsn
                   == info.disk_consistent_lsn, 120, "uploads up to disk_consistent_lsn")
        assert ps1.stop() == 0, ps1.log_tail()
        index = IndexPart.decode(open_remote_storage(s3_url).get(
            timeline_prefix(tenant, main) + "index_part.json-00000003"), "index")

        ps2.start()
        env2.client.request("POST", f"/v1/tenant/{tenant}/attach", {"generation": 4})
        c2 = env2.start_compute(tenant, main)
        assert c2.sql("select count(*), sum(hashtext(v)) from t") == expect
        assert c2.sql("select v from t where id = 12345") == [(_md5("12345"),)]
        reads = _remote_reads(env2)
        assert reads["layer_downloads"] == 0, reads
        assert reads["ranged_opens"] >= 1 and reads["ranged_gets"] > reads["ranged_opens"]
        assert reads["ranged_bytes"] < sum(layer.size for layer in index.layers.values())
        tl2 = ps2.workdir / "tenants" / str(tenant) / "timelines" / str(main)
        assert not {p.name for p in tl2.iterdir()} & set(index.layers)
        assert "for ranged reads" in ps2.log_text()
        c2.stop("fast")
    finally:
        env1.stop_all()
        env2.stop_all()
    unexpected = env1.unexpected_log_errors()
    assert not unexpected, "\n".join(unexpected[:20])


def _md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode()).hexdigest()
