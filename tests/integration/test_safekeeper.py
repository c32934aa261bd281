"""The safekeeper process (`python -m strata.safekeeper`): quorum, restart, walsender,
WAL removal, damaged files and the work-directory lock.

The safekeepers are real processes on loopback. They are driven by the walproposer's
`QuorumDriver` (the `Proposer` over real sockets) appending well-formed PostgreSQL 15 WAL
from `tests/sim/walgen.py` (XLOG_NOOP records with real page headers and CRCs, spanning
pages and 1 MB segments), and read by a walsender client built on `strata.pg.pgclient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_env import SafekeeperProcess
from prometheus_client.parser import text_string_to_metric_families

from polling import wait_until_async
from sim.walgen import SYSID, WalGenerator
from strata.common.errors import NotFound, Unavailable
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, segment_file_name
from strata.compute.quorum import QuorumConfig, SafekeeperAddr
from strata.compute.walproposer import QuorumDriver
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection, ServerError
from strata.safekeeper.client import SafekeeperClient

SEG = 1 << 20
START = Lsn(16 * SEG + 40)  # just after a segment's long page header, as after initdb
PREV = Lsn(16 * SEG - 64)


class Sk(SafekeeperProcess):
    """One safekeeper process on fixed ports (a restart keeps its address), its log next to
    its directory, with this file's timeline (START, PREV, SYSID, SEG)."""

    def __init__(self, node_id: int, workdir: Path, *extra: str) -> None:
        super().__init__(node_id, workdir, workdir.with_suffix(".log"), extra_args=list(extra))

    def http_error(self, method: str, path: str) -> tuple[int, dict[str, Any]]:
        with pytest.raises(urllib.error.HTTPError) as info:
            self.http(method, path)
        return info.value.code, json.loads(info.value.read())

    def create(self, tenant: TenantId, timeline: TimelineId) -> Any:
        return self.http("POST", f"/v1/tenant/{tenant}/timeline",
                         {"timeline_id": str(timeline), "start_lsn": str(START),
                          "prev_lsn": str(PREV), "system_id": SYSID, "seg_size": SEG})

    def status(self, tenant: TenantId, timeline: TimelineId) -> dict[str, Any]:
        return self.timeline_status(tenant, timeline)

    def timeline_dir(self, tenant: TenantId, timeline: TimelineId) -> Path:
        return self.workdir / "tenants" / str(tenant) / str(timeline)


class SkFactory:
    """Starts safekeepers under the test directory; at the end kills them and checks their
    logs: no traceback, and ERROR/WARNING lines only where the test said to expect them."""

    def __init__(self, test_dir: Path) -> None:
        self.test_dir = test_dir
        self.started: list[Sk] = []
        self.expected_errors: list[str] = []

    def __call__(self, n: int, *extra: str) -> list[Sk]:
        for i in range(n):
            sk = Sk(i + 1, self.test_dir / f"sk{i + 1}", *extra)
            sk.start()
            self.started.append(sk)
        return self.started[-n:]

    def check_logs(self) -> None:
        for sk in self.started:
            for line in sk.log_text().splitlines():
                assert "Traceback" not in line, sk.log_text()
                if " ERROR " in line or " WARNING " in line:
                    assert any(e in line for e in self.expected_errors), line


@pytest.fixture
def sks(test_dir: Path) -> Iterator[SkFactory]:
    factory = SkFactory(test_dir)
    yield factory
    for sk in factory.started:
        sk.kill9()
    factory.check_logs()


def quorum(sks: list[Sk], tenant: TenantId, timeline: TimelineId) -> QuorumConfig:
    return QuorumConfig(tenant, timeline,
                        tuple(SafekeeperAddr(sk.node_id, "127.0.0.1", sk.pg_port) for sk in sks),
                        wal_seg_size=SEG, retry_interval_s=0.1, connect_timeout_s=1,
                        backoff_max_s=0.2)


@contextlib.asynccontextmanager
async def proposer(config: QuorumConfig) -> AsyncIterator[QuorumDriver]:
    driver = QuorumDriver(config, SYSID)
    driver.start()
    try:
        async with asyncio.timeout(20):
            await driver.elected_event.wait()
        yield driver
    finally:
        await driver.stop()


async def append(driver: QuorumDriver, gen: WalGenerator, rng: random.Random,
                 records: int, size: int = 0) -> bytes:
    """Append `records` records (random sizes, or `size` bytes each); their WAL bytes."""
    out = bytearray()
    for _ in range(records):
        _, data = gen.record(rng.randbytes(size)) if size else gen.random_record(rng)
        out += data
        driver.append_wal(data)
    return bytes(out)


async def wait_commit(driver: QuorumDriver, lsn: int, timeout_s: float = 20) -> None:
    async with asyncio.timeout(timeout_s):
        while driver.commit_lsn.value < lsn:
            assert driver.fenced is None, driver.fenced
            await asyncio.sleep(0.02)


async def walsender(sk: Sk, tenant: TenantId, timeline: TimelineId,
                    start: Lsn) -> tuple[PgConnection, CopyBothStream]:
    conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="strata",
                                      replication="true", application_name="test_receiver")
    stream = await conn.start_copy_both(f"START_REPLICATION PHYSICAL {start} {tenant} "
                                        f"{timeline}")
    return conn, stream


async def receive(stream: CopyBothStream, start: Lsn, until: Lsn | None,
                  idle_s: float) -> tuple[bytes, int]:
    """WAL from `start` until `until` (or until nothing arrives for `idle_s`); also the
    highest end-of-WAL the server announced."""
    out = bytearray()
    announced = 0
    while until is None or start.value + len(out) < until.value:
        try:
            async with asyncio.timeout(idle_s):
                payload = await stream.read()
        except TimeoutError:
            if until is None:
                break
            raise
        assert payload is not None
        msg = wire.decode_replication(payload)
        if isinstance(msg, wire.XLogData):
            assert msg.start_lsn == start.value + len(out), (msg.start_lsn, len(out))
            out += msg.data
            announced = max(announced, msg.end_lsn)
    return bytes(out), announced


def test_quorum_commit_and_restart_recovery(sks: SkFactory) -> None:
    """Three safekeepers commit the WAL a proposer appends; one stopped with SIGTERM and one
    killed with SIGKILL (and garbage written after its WAL, as a torn write would) come back
    with the same term, history and WAL end, and the quorum keeps committing with them."""
    nodes = sks(3)
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    for sk in nodes:
        assert sk.create(tenant, timeline)["created"] is True
    assert nodes[0].create(tenant, timeline)["created"] is False  # idempotent
    gen = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(1)

    async def scenario() -> None:
        async with proposer(quorum(nodes, tenant, timeline)) as driver:
            await append(driver, gen, rng, 300, 9000)  # 2.7 MB: spans 1 MB segments
            await wait_commit(driver, gen.end_lsn)
            term = driver.proposer.term
            await wait_until_async(lambda: all(sk.status(tenant, timeline)["commit_lsn"]
                                               == str(Lsn(gen.end_lsn)) for sk in nodes),
                                   20, "commit")
            before = nodes[1].status(tenant, timeline)
            assert before["term"] == term
            assert before["last_record_end"] == str(Lsn(gen.end_lsn))
            assert [p["kind"] for p in before["peers"]] == ["proposer"]
            with urllib.request.urlopen(f"http://127.0.0.1:{nodes[1].http_port}/metrics") as r:
                metrics = r.read().decode()
            samples = {(s.name, s.labels.get("timeline_id")): s.value
                       for family in text_string_to_metric_families(metrics)
                       for s in family.samples}
            assert samples[("safekeeper_timeline_commit_lsn", str(timeline))] == gen.end_lsn
            assert samples[("safekeeper_timeline_term", str(timeline))] == term
            assert samples[("safekeeper_timeline_wal_fsyncs_total", str(timeline))] > 0
            assert await asyncio.to_thread(nodes[1].stop) == 0
            await asyncio.to_thread(nodes[2].kill9)
            # As if the machine had lost power mid-write: garbage after the last record (the
            # segment is preallocated: the garbage lands in its zeros, the size stays).
            last_seg = nodes[2].timeline_dir(tenant, timeline) / segment_file_name(
                Lsn(gen.end_lsn).segno(SEG), 1, SEG)
            assert last_seg.stat().st_size == SEG
            with open(last_seg, "r+b") as f:
                f.seek(Lsn(gen.end_lsn).segment_offset(SEG))
                f.write(random.Random(9).randbytes(3000))  # its last byte is not 0
            for sk in nodes[1:]:
                await asyncio.to_thread(sk.start)
                after = sk.status(tenant, timeline)
                assert after["term"] == term
                assert after["flush_lsn"] == str(Lsn(gen.end_lsn))
                assert after["last_record_end"] == str(Lsn(gen.end_lsn))
                assert Lsn.parse(after["durable_commit_lsn"]) <= Lsn(gen.end_lsn)
                assert after["term_history"] == before["term_history"]
            # The same proposer goes on: it reconnects and commits through the restarted ones.
            nodes[0].stop()
            await append(driver, gen, rng, 50)
            await wait_commit(driver, gen.end_lsn)
            assert driver.fenced is None

    asyncio.run(scenario())
    # A stopped safekeeper answered SIGTERM with exit status 0 (checked above); the restarted
    # ones found their WAL end by decoding the segments, and sk3 cut the garbage.
    assert "cutting" not in nodes[1].log_text()
    assert "cutting 3000 bytes of torn WAL" in nodes[2].log_text()


def test_walsender_serves_only_committed_wal(sks: SkFactory) -> None:
    """A walsender sends exactly the committed WAL, byte for byte, and nothing a minority
    holds beyond it; WAL committed later follows on the same stream; its feedback shows up
    in the timeline status."""
    nodes = sks(3)
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    for sk in nodes:
        sk.create(tenant, timeline)
    gen = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(2)

    async def scenario() -> None:
        async with proposer(quorum(nodes, tenant, timeline)) as driver:
            committed = await append(driver, gen, rng, 40)
            await wait_commit(driver, gen.end_lsn)
            commit_a = Lsn(gen.end_lsn)
            await wait_until_async(lambda: nodes[0].status(tenant, timeline)["commit_lsn"]
                                   == str(commit_a), 20, "commit on sk1")
            for sk in nodes[1:]:
                await asyncio.to_thread(sk.stop)
            tail = await append(driver, gen, rng, 40)  # only sk1 gets it: not committed
            await wait_until_async(lambda: nodes[0].status(tenant, timeline)["flush_lsn"]
                                   == str(Lsn(gen.end_lsn)), 20, "flush of the uncommitted tail")
            assert driver.commit_lsn == commit_a

            conn, stream = await walsender(nodes[0], tenant, timeline, START)
            data, announced = await receive(stream, START, None, idle_s=1.0)
            assert data == committed
            assert announced == commit_a.value

            update = wire.StandbyStatusUpdate(commit_a.value, commit_a.value,
                                              START.value + 8192, wire.pg_timestamp(time.time()))
            await stream.send(update.encode())
            await wait_until_async(
                lambda: (nodes[0].status(tenant, timeline)["pageserver_feedback"]
                         or {}).get("apply_lsn") == str(START + 8192), 20, "feedback")
            peers = nodes[0].status(tenant, timeline)["peers"]
            assert {p["kind"] for p in peers} == {"proposer", "walsender"}

            await asyncio.to_thread(nodes[1].start)  # a majority again: the tail commits
            await wait_commit(driver, gen.end_lsn)
            more, _ = await receive(stream, commit_a, Lsn(gen.end_lsn), idle_s=10)
            assert more == tail
            await stream.finish()
            await conn.close()

    asyncio.run(scenario())


def test_wal_removal_follows_pageserver_feedback(sks: SkFactory) -> None:
    """Segments below what the pageserver reports durable (apply) are removed, never the
    ones above it; a walsender asking for removed WAL gets a clear error."""
    nodes = sks(1, "--removal-interval", "0.1")
    sk = nodes[0]
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    sk.create(tenant, timeline)
    gen = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(3)
    tl_dir = sk.timeline_dir(tenant, timeline)

    def segments() -> list[str]:
        return sorted(p.name for p in tl_dir.iterdir() if len(p.name) == 24)

    async def scenario() -> None:
        async with proposer(quorum(nodes, tenant, timeline)) as driver:
            await append(driver, gen, rng, 400, 9000)
            await wait_commit(driver, gen.end_lsn)
            end = Lsn(gen.end_lsn)
            assert end.segno(SEG) >= START.segno(SEG) + 3, end
            await wait_until_async(lambda: sk.status(tenant, timeline)["durable_commit_lsn"]
                                   == str(end), 20, "durable commit")
            all_segments = segments()
            await asyncio.sleep(0.5)
            assert segments() == all_segments  # no feedback yet: nothing removed

            conn, stream = await walsender(sk, tenant, timeline, START)
            data, _ = await receive(stream, START, end, idle_s=10)
            horizon = Lsn(START.value + len(data) // 2)
            update = wire.StandbyStatusUpdate(end.value, end.value, horizon.value,
                                              wire.pg_timestamp(time.time()))
            await stream.send(update.encode())
            expected = [segment_file_name(n, 1, SEG)
                        for n in range(horizon.segno(SEG), end.segno(SEG) + 1)]
            await wait_until_async(lambda: segments() == expected, 20, f"segments {expected}")
            await asyncio.sleep(0.3)
            assert segments() == expected
            status = sk.status(tenant, timeline)
            assert status["wal_start_lsn"] == str(horizon.segment_start(SEG))
            await stream.finish()
            await conn.close()

            conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="strata",
                                              replication="true")
            with pytest.raises(ServerError, match="was removed") as info:
                await conn.start_copy_both(f"START_REPLICATION PHYSICAL {START} {tenant} "
                                           f"{timeline}")
            assert info.value.code == "42704"
            conn.close_nowait()

    asyncio.run(scenario())


def test_damaged_files_refuse_the_timeline_and_the_quorum_goes_on(
        sks: SkFactory) -> None:
    """sk1's WAL segment of timeline A and sk2's control file of timeline B are damaged:
    each refuses that timeline with a clear error (HTTP, proposer and walsender commands),
    serves the other one, and both timelines keep committing with the other two."""
    sks.expected_errors.append("will not be served")
    nodes = sks(3)
    tenant = TenantId.generate()
    tl_a, tl_b = TimelineId.generate(), TimelineId.generate()
    for sk in nodes:
        sk.create(tenant, tl_a)
        sk.create(tenant, tl_b)
    gens = {tl: WalGenerator(START.value, PREV.value, SEG) for tl in (tl_a, tl_b)}
    rng = random.Random(4)

    async def scenario() -> None:
        async with proposer(quorum(nodes, tenant, tl_a)) as drv_a, \
                proposer(quorum(nodes, tenant, tl_b)) as drv_b:
            for drv, tl in ((drv_a, tl_a), (drv_b, tl_b)):
                await append(drv, gens[tl], rng, 60)
                await wait_commit(drv, gens[tl].end_lsn)
            await wait_until_async(lambda: nodes[0].status(tenant, tl_a)["durable_commit_lsn"]
                                   == str(Lsn(gens[tl_a].end_lsn)), 20, "durable commit on sk1")
            for sk in nodes[:2]:
                await asyncio.to_thread(sk.stop)
            # A flipped byte in a record in the middle of sk1's committed WAL of A ...
            seg = nodes[0].timeline_dir(tenant, tl_a) / segment_file_name(START.segno(SEG),
                                                                          1, SEG)
            raw = bytearray(seg.read_bytes())
            raw[START.segment_offset(SEG) + 5000] ^= 0x40
            seg.write_bytes(raw)
            # ... and in sk2's control file of B.
            control = nodes[1].timeline_dir(tenant, tl_b) / "safekeeper.control"
            raw = bytearray(control.read_bytes())
            raw[30] ^= 0x01
            control.write_bytes(raw)
            for sk in nodes[:2]:
                await asyncio.to_thread(sk.start)

            for sk, bad, good, what in ((nodes[0], tl_a, tl_b, "WAL is damaged"),
                                        (nodes[1], tl_b, tl_a, "control file is damaged")):
                refused = sk.http("GET", "/v1/status")["refused"]
                assert [r["timeline_id"] for r in refused] == [str(bad)]
                code, body = sk.http_error("GET", f"/v1/tenant/{tenant}/timeline/{bad}")
                assert code == 500 and what in body["error"], body
                assert sk.status(tenant, good)["timeline_id"] == str(good)
                conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="strata")
                for command in (f"proposer {tenant} {bad}",
                                f"START_REPLICATION PHYSICAL {START} {tenant} {bad}"):
                    with pytest.raises(ServerError, match=what) as info:
                        await conn.start_copy_both(command)
                    assert info.value.code == "XX001"
                conn.close_nowait()
            for drv, tl in ((drv_a, tl_a), (drv_b, tl_b)):
                await append(drv, gens[tl], rng, 30)
                await wait_commit(drv, gens[tl].end_lsn)
                assert drv.fenced is None

    asyncio.run(scenario())
    assert "WAL is damaged below the durable commit LSN" in nodes[0].log_text()
    assert "checksum" in nodes[1].log_text()


def test_two_processes_never_share_a_directory(sks: SkFactory) -> None:
    """A second safekeeper on a directory in use exits at once, naming the holder; the
    directory also refuses to run as another node id."""
    first = sks(1)[0]
    second = Sk(1, first.workdir)
    out = subprocess.run(second.argv(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"in use by another safekeeper (pid {first.proc.pid if first.proc else 0})" \
        in out.stderr
    assert first.http("GET", "/v1/status")["id"] == 1  # the first one is unaffected
    first.stop()
    other = Sk(7, first.workdir)
    out = subprocess.run(other.argv(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "belongs to safekeeper 1" in out.stderr


def test_kill9_during_appends_then_catch_up(sks: SkFactory) -> None:
    """Safekeepers killed with SIGKILL while WAL streams in (one at a time) come back,
    catch up, and in the end all three hold exactly the WAL the proposer sent: the
    committed WAL each one serves is identical, byte for byte. (A process kill keeps the
    page cache; torn tails are covered in tests/unit/test_sk_wal_storage.py.)"""
    nodes = sks(3)
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    for sk in nodes:
        sk.create(tenant, timeline)
    gen = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(7)

    async def scenario() -> bytes:
        sent = bytearray()
        async with proposer(quorum(nodes, tenant, timeline)) as driver:
            async def stream() -> None:
                for _ in range(600):
                    sent.extend(await append(driver, gen, rng, 1))
                    await asyncio.sleep(0.002)

            streaming = asyncio.create_task(stream())
            for victim in (nodes[2], nodes[0]):
                await asyncio.sleep(0.4)
                await asyncio.to_thread(victim.kill9)
                await asyncio.sleep(0.2)
                await asyncio.to_thread(victim.start)
            await streaming
            await wait_commit(driver, gen.end_lsn, timeout_s=60)
            end = Lsn(gen.end_lsn)
            await wait_until_async(lambda: all(sk.status(tenant, timeline)["commit_lsn"] == str(end)
                                               for sk in nodes), 60, "all safekeepers to catch up")
            assert driver.fenced is None
            for sk in nodes:
                conn, wal_stream = await walsender(sk, tenant, timeline, START)
                data, _ = await receive(wal_stream, START, end, idle_s=10)
                assert data == bytes(sent), f"safekeeper {sk.node_id} differs"
                conn.close_nowait()
        return bytes(sent)

    sent = asyncio.run(scenario())
    assert len(sent) > 1 << 20


def test_typed_client(sks: SkFactory) -> None:
    """`SafekeeperClient` (what the control plane uses): create (idempotent), read,
    delete, and errors that name the safekeeper: 404 NotFound, no answer Unavailable."""
    sk = sks(1)[0]
    client = SafekeeperClient("127.0.0.1", sk.http_port, node_id=1)
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    assert client.responds() and client.status()["id"] == 1
    for created in (True, False):
        assert client.create_timeline(tenant, timeline, start_lsn=START, prev_lsn=PREV,
                                      system_id=SYSID, seg_size=SEG) is created
    info = client.timeline(tenant, timeline)
    assert (info.tenant_id, info.timeline_id, info.term) == (tenant, timeline, 0)
    assert info.timeline_start_lsn == START and info.flush_lsn == START
    assert client.timeline_json(tenant, timeline)["commit_lsn"] == str(info.commit_lsn)
    assert client.delete_timeline(tenant, timeline) is True
    assert client.delete_timeline(tenant, timeline) is False
    with pytest.raises(NotFound, match=r"safekeeper 1 \(127.0.0.1:\d+\) refused GET"):
        client.timeline(tenant, timeline)
    assert sk.stop() == 0
    with pytest.raises(Unavailable, match="safekeeper 1 does not answer on 127.0.0.1:"):
        client.status()
    assert not client.responds()
