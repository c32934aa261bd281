"""Safekeeper WAL offload to object storage (strata.safekeeper.wal_backup) against a real
SeaweedFS: complete committed segments are uploaded by the quorum, removed locally only
below both the upload position and the pageserver's durable LSN, served again from object
storage to a walsender that asks for them, refused when damaged, and deleted with the
timeline."""

from __future__ import annotations

import asyncio
import random
import time

import obstore
import pytest
from remote_fixtures import s3_url, seaweed  # noqa: F401
from test_safekeeper import (
    PREV,
    SEG,
    START,
    SkFactory,
    append,
    proposer,
    quorum,
    receive,
    sks,  # noqa: F401
    wait_commit,
    walsender,
)

from polling import wait_until_async
from sim.walgen import WalGenerator
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, segment_file_name
from strata.pg import wire
from strata.pg.pgclient import ServerError
from strata.remote.s3 import S3Storage
from strata.safekeeper import wal_backup


def test_wal_offload_upload_remove_serve_corrupt_delete(sks: SkFactory,  # noqa: F811
                                                        s3_url: str) -> None:  # noqa: F811
    nodes = sks(2, "--removal-interval", "0.1", "--backup-interval", "0.1",
                "--remote-storage", s3_url)
    sks.expected_errors.append("fails its CRC-32C")
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    for sk in nodes:
        sk.create(tenant, timeline)
    gen = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(5)
    store = S3Storage.from_url(s3_url)
    prefix = wal_backup.timeline_prefix(tenant, timeline)

    def local_segments(sk_index: int) -> list[str]:
        tl_dir = nodes[sk_index].timeline_dir(tenant, timeline)
        return sorted(p.name for p in tl_dir.iterdir() if len(p.name) == 24)

    async def scenario() -> None:
        async with proposer(quorum(nodes, tenant, timeline)) as driver:
            wal = await append(driver, gen, rng, 400, 9000)
            await wait_commit(driver, gen.end_lsn)
            for sk in nodes:  # the commit LSN reaches every safekeeper with the next message
                await wait_until_async(lambda sk=sk: sk.status(tenant, timeline)[
                    "durable_commit_lsn"] == str(Lsn(gen.end_lsn)), 30, "durable commit")
            end = Lsn(gen.end_lsn)
            last = end.segno(SEG)
            assert last >= START.segno(SEG) + 3, end
            uploaded = [prefix + segment_file_name(n, 1, SEG)
                        for n in range(START.segno(SEG), last)]
            # Every complete committed segment is uploaded; backup_lsn stops at the last
            # segment, which is not complete.
            for sk in nodes:
                await wait_until_async(
                    lambda sk=sk: sk.status(tenant, timeline)["backup_lsn"]
                    == str(end.segment_start(SEG)), 60, "backup_lsn at the last segment")
            assert store.list_keys(prefix) == uploaded
            for key in uploaded:  # the object is the local segment, byte for byte
                name = key.rsplit("/", 1)[1]
                assert store.get(key) == (nodes[0].timeline_dir(tenant, timeline) / name)\
                    .read_bytes()
            # Uploaded, but no pageserver feedback yet: nothing is removed.
            await asyncio.sleep(0.5)
            assert len(local_segments(0)) == last - START.segno(SEG) + 1

            # The pageserver reports everything durable: now every uploaded segment goes.
            conn, stream = await walsender(nodes[0], tenant, timeline, end)
            update = wire.StandbyStatusUpdate(end.value, end.value, end.value,
                                              wire.pg_timestamp(time.time()))
            await stream.send(update.encode())
            await wait_until_async(lambda: local_segments(0) == [segment_file_name(last, 1, SEG)],
                                   30, "local segments removed")
            await stream.finish()
            await conn.close()
            assert len(local_segments(1)) == last - START.segno(SEG) + 1  # no feedback there

            # A reader that needs the removed WAL gets it from object storage.
            conn, stream = await walsender(nodes[0], tenant, timeline, START)
            data, _ = await receive(stream, START, end, idle_s=20)
            assert data == wal
            await stream.finish()
            await conn.close()

            # A damaged object (bytes that do not match its checksum) is refused clearly.
            first = uploaded[0]
            raw = store._store  # write around the checksum, as a damaged object would look
            good = store.get(first)
            obstore.put(raw, f"{store.prefix}/{first}", b"\xff" + good[1:],
                        attributes={"crc32c": "00000000"})
            conn, stream = await walsender(nodes[0], tenant, timeline, START)
            with pytest.raises(ServerError, match="fails its CRC-32C") as info:
                await receive(stream, START, end, idle_s=20)
            assert info.value.code == "XX001"
            conn.close_nowait()

    asyncio.run(scenario())

    # Deleting the timeline deletes its offloaded WAL.
    for sk in nodes:
        sk.http("DELETE", f"/v1/tenant/{tenant}/timeline/{timeline}")
    assert store.list_keys(prefix) == []
