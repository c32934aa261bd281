"""The page service over real sockets: a PgProtocolServer with the pagestream handler over a
Repository built in the test, read with the asyncio and the blocking pagestream clients."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from polling import wait_until
from strata.common.errors import CorruptionError, NotFound, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver import pagestream as ps
from strata.pageserver.page_client import PageClient, PageClientSync
from strata.pageserver.page_service import PageService, PageServiceConfig
from strata.pg import wire
from strata.pg.pgclient import PgConnection, ServerError
from strata.pg.pgserve import PgProtocolServer
from strata.pg.relfile import RelTag
from strata.pg.slru import SlruKind
from strata.storage.compaction import compact
from strata.storage.key import slru_block_key, slru_segment_size_key
from strata.storage.repository import Repository
from strata.storage.tenant import Tenant, TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image

REL = RelTag(1663, 5, 16384, 0)
REL_FSM = RelTag(1663, 5, 16384, 1)
REL2 = RelTag(1663, 5, 16390, 0)
OTHER_DB = RelTag(1663, 6, 16384, 0)
TENANT = TenantId(bytes(range(16)))


def page(tag: int) -> bytes:
    body = bytearray((tag * 7 + i) % 251 for i in range(8192))
    body[0] = tag & 0xFF
    body[-1] = (tag >> 8) & 0xFF
    return bytes(body)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(tl: Timeline, lsn: int, *puts: tuple[RelTag, int, bytes]) -> None:
    """One WAL record ending at `lsn` writing (rel, block, page)."""
    for rel, blkno, data in puts:
        tl.put_rel_page(rel, blkno, Lsn(lsn), Image(data))
    tl.finish_record(Lsn(lsn), Lsn(lsn - 8))


class Served:
    """A repository with one tenant, and the page service on its own loop in a thread."""

    def __init__(self, workdir: Path, wait_lsn_timeout_s: float = 10.0, **conf: Any) -> None:
        self.clock = Clock()
        self.repo = Repository(workdir, clock=self.clock)
        self.tenant: Tenant = self.repo.create_tenant(TENANT, TenantConfig(**conf))
        self.tl = self.tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(0x100))
        self.service = PageService(
            lambda t, tl: self.repo.get_tenant(t).get_timeline(tl),
            PageServiceConfig(wait_lsn_timeout_s=wait_lsn_timeout_s))
        self.server = PgProtocolServer(self.service.handle_query, name="pagestream-test")
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())

    @property
    def port(self) -> int:
        return self.server.port

    def run(self, coro: Any, timeout_s: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def sync_client(self) -> PageClientSync:
        return PageClientSync("127.0.0.1", self.port, TENANT, self.tl.timeline_id)

    async def client(self) -> PageClient:
        return await PageClient.connect("127.0.0.1", self.port, TENANT, self.tl.timeline_id)

    def close(self) -> None:
        self.run(self.server.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        self.repo.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(tmp_path, gc_horizon=0, pitr_interval_s=0.0, image_creation_threshold=3)
    try:
        yield s
    finally:
        s.close()


def build_history(tl: Timeline) -> list[int]:
    """Eight records over three forks of two databases, flushed in the middle so that
    reads cross layer files, the in-memory layer and a truncate."""
    lsns = []
    for i in range(1, 9):
        lsn = 0x100 + i * 0x100
        puts = [(REL, i % 4, page(i)), (REL, 4 + i // 3, page(100 + i)), (REL2, i, page(200 + i))]
        if i % 3 == 0:
            puts.append((REL_FSM, 0, page(300 + i)))
        if i == 2:
            puts.append((OTHER_DB, 0, page(400)))
        record(tl, lsn, *puts)
        if i == 4:
            tl.flush()
        if i == 6:
            tl.truncate_rel(REL2, 3, Lsn(lsn + 0x10))
            tl.finish_record(Lsn(lsn + 0x10), Lsn(lsn))
            lsns.append(lsn + 0x10)
        lsns.append(lsn)
    return sorted(lsns)


def test_getpage_over_the_wire_equals_the_timeline(served: Served) -> None:
    """Single and batched GetPage, Nblocks, Exists and DbSize over the wire answer exactly
    what the timeline answers in-process, at every record LSN and between records."""
    tl = served.tl
    lsns = build_history(tl)
    probe_lsns = sorted(set(lsns) | {lsn + 3 for lsn in lsns[:-1]})
    with served.sync_client() as client:
        for value in probe_lsns:
            lsn = Lsn(value)
            blocks: list[tuple[RelTag, int]] = []
            for rel in (REL, REL_FSM, REL2, OTHER_DB):
                exists = tl.rel_exists(rel, lsn)
                assert client.exists(rel, lsn) is exists
                if not exists:
                    with pytest.raises(NotFound, match=f"Nblocks {rel} at LSN {lsn}"):
                        client.nblocks(rel, lsn)
                    continue
                nblocks = tl.rel_size(rel, lsn)
                assert client.nblocks(rel, lsn) == nblocks
                expected = [tl.get_rel_page(rel, b, lsn) for b in range(nblocks)]
                assert [client.get_page(rel, b, lsn) for b in range(nblocks)] == expected
                assert client.get_rel_pages(rel, range(nblocks), lsn) == expected
                blocks.extend((rel, b) for b in range(nblocks))
            mixed = blocks[::-1]  # a list of (rel, blkno) across relations, any order
            assert client.get_pages(mixed, lsn) == [tl.get_rel_page(r, b, lsn) for r, b in mixed]
            db5 = sum(tl.rel_size(r, lsn) for r in tl.list_rels(1663, 5, lsn)) * 8192
            assert client.dbsize(5, lsn) == db5
        assert client.connects == 1  # one connection reused for every call
    with served.sync_client() as client:
        # REL has blocks 0..6, its FSM fork 1 block, REL2 grew back to 9 after its truncate.
        assert client.dbsize(5, Lsn(lsns[-1])) == (7 + 1 + 9) * 8192
        assert client.dbsize(6, Lsn(lsns[-1])) == 8192
        assert client.dbsize(7, Lsn(lsns[-1])) == 0


def test_batches_larger_than_one_message_and_pipelined_requests(served: Served) -> None:
    """A 600-block read goes as three pipelined batches; 100 concurrent single reads on
    one connection each get their own page."""
    tl = served.tl
    lsn = 0x200
    record(tl, lsn, *((REL, b, page(b)) for b in range(600)))

    async def scenario() -> None:
        client = await served.client()
        try:
            pages = await client.get_rel_pages(REL, range(600), Lsn(lsn))
            assert pages == [page(b) for b in range(600)]
            singles = await asyncio.gather(*(client.get_page(REL, b, Lsn(lsn))
                                             for b in range(0, 600, 6)))
            assert list(singles) == [page(b) for b in range(0, 600, 6)]
        finally:
            await client.close()

    asyncio.run(scenario())


def test_request_at_a_future_lsn_waits_for_the_wal(served: Served) -> None:
    """A read at an LSN not yet ingested is answered once the record arrives, with the
    page as of that record."""
    tl = served.tl
    record(tl, 0x200, (REL, 0, page(1)))

    async def scenario() -> None:
        client = await served.client()
        try:
            pending = asyncio.ensure_future(client.get_page(REL, 0, Lsn(0x300)))
            await asyncio.sleep(0.3)
            assert not pending.done(), "answered before the WAL at 0/300 arrived"
            record(tl, 0x280, (REL, 0, page(2)))
            await asyncio.sleep(0.1)
            assert not pending.done(), "answered at 0/280, before 0/300"
            record(tl, 0x300, (REL, 0, page(3)))
            assert await asyncio.wait_for(pending, 10) == page(3)
        finally:
            await client.close()

    asyncio.run(scenario())


def test_wait_timeout_is_a_clear_error_and_the_stream_goes_on(tmp_path: Path) -> None:
    s = Served(tmp_path, wait_lsn_timeout_s=0.3)
    try:
        record(s.tl, 0x200, (REL, 0, page(1)))
        with s.sync_client() as client:
            with pytest.raises(Unavailable) as info:
                client.get_page(REL, 0, Lsn(0x5000))
            text = str(info.value)
            assert "GetPage block 0 of rel 1663/5/16384 fork 0 at LSN 0/5000" in text
            assert "timed out after 0.3s waiting for WAL up to 0/5000" in text
            assert "last_record_lsn is 0/200" in text
            assert client.get_page(REL, 0, Lsn(0x200)) == page(1)
            assert client.connects == 1
    finally:
        s.close()


def test_errors_name_the_key_and_lsn(served: Served) -> None:
    """Past the size, a missing relation or SLRU segment, below the GC cutoff and a broken
    timeline are error responses naming the request; the connection keeps serving."""
    tl = served.tl
    record(tl, 0x200, (REL, 0, page(1)), (REL, 1, page(2)))
    record(tl, 0x300, (REL, 0, page(3)))
    with served.sync_client() as client:
        with pytest.raises(NotFound) as info:
            client.get_page(REL, 9, Lsn(0x300))
        assert "GetPage block 9 of rel 1663/5/16384 fork 0 at LSN 0/300" in str(info.value)
        assert "the fork has 2 blocks" in str(info.value)
        with pytest.raises(NotFound, match=r"GetPages of 2 blocks \(first: block 1 of rel "
                                           r"1663/5/16384 fork 0\) at LSN 0/300"):
            client.get_pages([(REL, 1), (REL, 2)], Lsn(0x300))
        with pytest.raises(NotFound, match="rel 1663/5/99 fork 0 does not exist at LSN 0/300"):
            client.nblocks(RelTag(1663, 5, 99, 0), Lsn(0x300))
        with pytest.raises(NotFound, match="CLOG segment 0007 does not exist at LSN 0/300"):
            client.slru_segment(SlruKind.CLOG, 7, Lsn(0x300))

        tl.flush()
        tl.set_gc_cutoff(Lsn(0x300))
        with pytest.raises(UserError) as below:
            client.get_page(REL, 0, Lsn(0x200))
        assert "GetPage block 0 of rel 1663/5/16384 fork 0 at LSN 0/200" in str(below.value)
        assert "below its GC cutoff 0/300" in str(below.value)
        assert client.get_page(REL, 0, Lsn(0x300)) == page(3)

        tl.broken_reason = "record at 0/2F0 has a block reference without an image"
        with pytest.raises(CorruptionError) as broken:
            client.get_page(REL, 1, Lsn(0x300))
        assert "GetPage block 1 of rel 1663/5/16384 fork 0 at LSN 0/300" in str(broken.value)
        assert "is broken: record at 0/2F0" in str(broken.value)
        tl.broken_reason = None
        assert client.get_page(REL, 1, Lsn(0x300)) == page(2)
        assert client.connects == 1


def test_slru_segment(served: Served) -> None:
    tl = served.tl
    lsn = Lsn(0x200)
    tl.put(slru_block_key(SlruKind.CLOG, 1, 0), lsn, Image(page(1)))
    tl.put(slru_block_key(SlruKind.CLOG, 1, 2), lsn, Image(page(3)))
    tl.put(slru_segment_size_key(SlruKind.CLOG, 1), lsn, Image(struct.pack("<I", 4)))
    tl.finish_record(lsn, Lsn(0x100))
    with served.sync_client() as client:
        data = client.slru_segment(SlruKind.CLOG, 1, lsn)
        assert data == page(1) + bytes(8192) + page(3) + bytes(8192)
        with pytest.raises(NotFound, match="MULTIXACT_OFFSETS segment 0001"):
            client.slru_segment(SlruKind.MULTIXACT_OFFSETS, 1, lsn)


def test_unknown_timeline_and_bad_command_fail_before_the_copy(served: Served) -> None:
    async def scenario() -> None:
        missing = TimelineId(bytes(16))
        with pytest.raises(NotFound, match=f"timeline {missing} not in tenant {TENANT}"):
            await PageClient.connect("127.0.0.1", served.port, TENANT, missing)
        conn = await PgConnection.connect("127.0.0.1", served.port, user="strata")
        try:
            with pytest.raises(ServerError, match="pagestream takes 2 arguments"):
                await conn.start_copy_both("pagestream abc")
            with pytest.raises(ServerError, match="invalid TenantId 'xyz'"):
                await conn.start_copy_both(f"pagestream xyz {served.tl.timeline_id}")
            # The connection is still usable after refused commands.
            stream = await conn.start_copy_both(f"pagestream {TENANT} {served.tl.timeline_id}")
            await stream.finish()
        finally:
            await conn.close()

    asyncio.run(scenario())


def _raw_pagestream(port: int, timeline_id: TimelineId) -> socket.socket:
    """A blocking socket in pagestream CopyBoth mode, for sending arbitrary bytes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(wire.StartupMessage((("user", "mallory"),)).encode())
    sock.sendall(wire.Query(f"pagestream {TENANT} {timeline_id}").encode())
    reader = wire.MessageReader("backend")
    while True:
        reader.feed(sock.recv(65536))
        while (msg := reader.next_backend()) is not None:
            if isinstance(msg, wire.CopyBothResponse):
                return sock


def _read_until_closed(sock: socket.socket) -> list[wire.BackendMessage]:
    reader = wire.MessageReader("backend")
    while chunk := sock.recv(65536):
        reader.feed(chunk)
    out = []
    while (msg := reader.next_backend()) is not None:
        out.append(msg)
    return out


@pytest.mark.parametrize("garbage", [
    wire.CopyData(b"\x00garbage that is no request").encode(),
    wire.CopyData(ps.encode_request(ps.GetPageRequest(Lsn(0x200), REL, 0))[:-1]).encode(),
    b"d" + struct.pack(">I", 2 * 1024 * 1024),  # a CopyData header announcing 2 MB: too big
    b"Z\x00\x00\x00\x04",  # not a CopyData at all
], ids=["unknown-tag", "truncated-request", "oversized", "not-copydata"])
def test_garbage_closes_only_that_connection(served: Served, garbage: bytes) -> None:
    """A malformed or oversized message ends its own connection with a FATAL protocol
    error; another client on the same timeline keeps being served throughout."""
    tl = served.tl
    record(tl, 0x200, (REL, 0, page(1)))
    with served.sync_client() as good:
        assert good.get_page(REL, 0, Lsn(0x200)) == page(1)
        bad = _raw_pagestream(served.port, tl.timeline_id)
        try:
            bad.sendall(garbage)
            messages = _read_until_closed(bad)
        finally:
            bad.close()
        errors = [m for m in messages if isinstance(m, wire.ErrorResponse)]
        assert errors and errors[-1].severity == "FATAL", messages
        assert errors[-1].code == "08P01", errors
        assert good.get_page(REL, 0, Lsn(0x200)) == page(1)
        assert good.connects == 1, "the good client's connection must not have been closed"


def test_lease_over_the_page_service_holds_gc_until_it_expires(served: Served) -> None:
    """A lease taken over the wire keeps GC's cutoff at its LSN, so a reader there still
    gets its pages after GC; once it expires (not renewed), GC moves on and deletes
    layers, and the same read is refused as below the cutoff."""
    tl, clock = served.tl, served.clock
    for i in range(1, 7):
        record(tl, 0x100 + i * 0x100, (REL, 0, page(i)), (REL, i, page(100 + i)))
        tl.flush()
        compact(tl)
    with served.sync_client() as client:
        expires = client.lease(Lsn(0x400), 100.0)
        assert expires == clock.now + 100.0
        clock.now += 60
        renewed = client.lease(Lsn(0x400), 100.0)  # renewal extends it
        assert renewed == clock.now + 100.0 > expires
        before = set(tl.layers())
        result = served.tenant.gc()[tl.timeline_id]
        assert result.cutoff == Lsn(0x400)
        assert client.get_page(REL, 0, Lsn(0x400)) == page(3)
        assert client.get_rel_pages(REL, range(4), Lsn(0x400)) == \
            [page(3), page(101), page(102), page(103)]
        clock.now += 60  # past the first expiry, inside the renewed one
        assert served.tenant.gc()[tl.timeline_id].cutoff == Lsn(0x400)
        assert client.get_page(REL, 3, Lsn(0x400)) == page(103)
        clock.now += 50  # the renewed lease has expired
        result = served.tenant.gc()[tl.timeline_id]
        assert result.expired_leases == 1
        assert result.cutoff == Lsn(0x700)
        assert result.removed and set(tl.layers()) < before
        with pytest.raises(UserError, match="at LSN 0/400: .*below its GC cutoff 0/700"):
            client.get_page(REL, 0, Lsn(0x400))
        with pytest.raises(UserError, match="cannot lease LSN 0/400: it is below the GC cutoff"):
            client.lease(Lsn(0x400), 100.0)
        assert client.get_page(REL, 0, Lsn(0x700)) == page(6)


def test_sync_client_reconnects_once_after_the_pageserver_restarts(served: Served) -> None:
    """The blocking client keeps its connection across calls and, when the pageserver
    goes away and comes back on the same port, re-opens it for the next call."""
    record(served.tl, 0x200, (REL, 0, page(1)))
    with served.sync_client() as client:
        assert client.get_page(REL, 0, Lsn(0x200)) == page(1)
        assert client.nblocks(REL, Lsn(0x200)) == 1
        assert client.connects == 1
        port = served.port
        served.run(served.server.stop(grace_s=0))
        served.server = PgProtocolServer(served.service.handle_query, port=port,
                                         name="pagestream-test")
        served.run(served.server.start())
        assert client.get_page(REL, 0, Lsn(0x200)) == page(1)
        assert client.connects == 2
        assert client.exists(REL, Lsn(0x200)) is True
        assert client.connects == 2


def test_pages_of_an_imported_initdb_datadir_equal_its_files(tmp_path: Path,
                                                            pg_factory: Any) -> None:
    """A real PostgreSQL 15 data directory imported into a timeline reads back over the
    wire byte for byte: every fork of every relation of database `postgres` and the
    shared catalogs (batched), their sizes, DbSize, and the pg_xact segment."""
    from strata.pageserver.import_datadir import import_new_timeline
    from strata.pg.relfile import parse_path

    server = pg_factory("initdb")
    server.initdb()
    datadir: Path = server.datadir
    s = Served(tmp_path / "repo")
    try:
        tl = import_new_timeline(s.tenant, TimelineId(os.urandom(16)), datadir)
        s.tl = tl
        lsn = tl.last_record_lsn
        files: dict[RelTag, bytes] = {}
        for sub in ("base/5", "global"):
            for path in sorted((datadir / sub).iterdir()):
                loc = parse_path(f"{sub}/{path.name}")
                if loc is None:
                    continue
                assert loc.segno == 0, loc  # initdb's files are all far below 1 GB
                files[RelTag(loc.spcnode, loc.dbnode, loc.relnode, int(loc.fork))] = \
                    path.read_bytes()
        assert len(files) > 100, sorted(files)[:5]
        with s.sync_client() as client:
            for rel, data in files.items():
                nblocks = len(data) // 8192
                assert client.exists(rel, lsn)
                assert client.nblocks(rel, lsn) == nblocks, rel
                if nblocks:
                    pages = client.get_rel_pages(rel, range(nblocks), lsn)
                    assert b"".join(pages) == data, rel
            db5 = sum(len(d) for r, d in files.items() if r.dbnode == 5)
            assert client.dbsize(5, lsn) == db5
            xact = client.slru_segment(SlruKind.CLOG, 0, lsn)
            assert xact == (datadir / "pg_xact" / "0000").read_bytes()
            assert client.connects == 1
    finally:
        s.close()


def test_pagestream_on_the_pageserver_process(env: Any) -> None:
    """The pageserver process answers `pagestream`: a page a running compute has just
    written is served once its WAL is ingested (the request waits if ingest lags), and at a
    record end the pages over the wire equal the relation file of a full basebackup."""
    import io
    import tarfile

    tenant, timeline = env.client.create_tenant()
    compute = env.start_compute(tenant, timeline)
    compute.sql("create table t (id int, note text)")
    compute.sql("insert into t select g, 'pagestream-marker-' || g from generate_series(1, 50) g")
    filenode = int(compute.sql("select pg_relation_filenode('t')")[0][0])
    dbnode = int(compute.sql("select oid from pg_database where datname = 'postgres'")[0][0])
    rel = RelTag(1663, dbnode, filenode, 0)
    flushed = Lsn.parse(compute.sql("select pg_current_wal_flush_lsn()::text")[0][0])
    # A flush position just past a page header means the last record ended at the page
    # start, and a record end is what last_record_lsn reaches.
    target = Lsn(flushed.value - flushed.value % 8192) if flushed.value % 8192 <= 40 \
        else flushed
    with PageClientSync("127.0.0.1", env.pageserver.pg_port, tenant, timeline) as client:
        page0 = client.get_page(rel, 0, target)  # waits, if need be, for ingest to get there
        assert b"pagestream-marker-50" in page0
        assert client.exists(rel, target) and client.nblocks(rel, target) == 1
        at = env.client.timeline(tenant, timeline).last_record_lsn
        tar = io.BytesIO()
        env.client.basebackup(tenant, timeline, tar, at)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as archive:
            member = archive.extractfile(f"base/{dbnode}/{filenode}")
            assert member is not None
            data = member.read()
        nblocks = client.nblocks(rel, at)
        assert len(data) == nblocks * 8192
        assert b"".join(client.get_rel_pages(rel, range(nblocks), at)) == data
        assert client.dbsize(dbnode, at) >= len(data)
        assert client.lease(at, 60.0) > time.time()
        with pytest.raises(NotFound, match=f"block {nblocks} of rel 1663/{dbnode}/{filenode}"):
            client.get_page(rel, nblocks, at)
    assert env.unexpected_log_errors() == []


def test_a_client_vanishing_mid_stream_is_no_error(served: Served,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A client that pipelines batches and resets its connection (a compute killed) is
    logged as gone, without an ERROR, and the service keeps serving others."""
    caplog.set_level(logging.INFO)
    record(served.tl, 0x200, *((REL, b, page(b)) for b in range(256)))
    request = ps.encode_request(ps.GetPagesRequest.for_rel(Lsn(0x200), REL, list(range(256))))
    sock = _raw_pagestream(served.port, served.tl.timeline_id)
    sock.sendall(wire.CopyData(request).encode() * 50)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST with responses still being written
    with served.sync_client() as client:
        assert client.get_page(REL, 255, Lsn(0x200)) == page(255)

    def gone() -> bool:
        return any("pagestream client gone" in r.getMessage() for r in caplog.records)

    wait_until(gone, 10, "the 'pagestream client gone' line")
    assert gone(), [r.getMessage() for r in caplog.records]
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def test_sync_client_shared_by_threads(served: Served) -> None:
    """Threads (as a FUSE process's) share one blocking client and one connection; each
    gets its own pages."""
    record(served.tl, 0x200, *((REL, b, page(b)) for b in range(64)))
    results: dict[int, list[bytes]] = {}
    with served.sync_client() as client:
        def reader(n: int) -> None:
            results[n] = [client.get_page(REL, (n * 7 + i) % 64, Lsn(0x200)) for i in range(40)]

        threads = [threading.Thread(target=reader, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert client.connects == 1
    for n in range(4):
        assert results[n] == [page((n * 7 + i) % 64) for i in range(40)]
