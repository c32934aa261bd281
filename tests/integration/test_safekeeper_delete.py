"""Deleting a timeline on a safekeeper process (`DELETE /v1/tenant/{t}/timeline/{tl}`).

One real safekeeper holds two timelines of a tenant, each driven by its own `QuorumDriver`
(a quorum of one) with well-formed WAL from `tests/sim/walgen.py`, and read by walsender
clients. Deleting one ends its proposer and walsender streams, frees its files, and leaves
the other timeline's connections streaming; a restart does not bring it back, and a
directory a crashed deletion left is removed at start.
"""

from __future__ import annotations

import asyncio
import os
import random
import urllib.request
from pathlib import Path

import pytest
import test_safekeeper
from prometheus_client.parser import text_string_to_metric_families
from test_safekeeper import (
    PREV,
    SEG,
    START,
    Sk,
    SkFactory,
    append,
    proposer,
    quorum,
    receive,
    wait_commit,
    walsender,
)

from polling import wait_until_async
from sim.walgen import WalGenerator
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg import wire
from strata.pg.pgclient import CopyBothStream, PgConnection, ServerError
from strata.safekeeper.timeline import DELETED_SUFFIX

# test_safekeeper's fixture: safekeepers killed at the end, their logs checked.
sks = test_safekeeper.sks


def disk_bytes(directory: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, files in os.walk(directory) for name in files)


async def read_until_error(stream: CopyBothStream, timeout_s: float = 10) -> ServerError:
    """Read (and drop) what the server still sends until the stream ends with an error."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                payload = await stream.read()
            except ServerError as err:
                return err
            assert payload is not None, "the stream ended without an error"


def metric_timelines(sk: Sk) -> set[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{sk.http_port}/metrics") as resp:
        text = resp.read().decode()
    return {s.labels["timeline_id"] for family in text_string_to_metric_families(text)
            for s in family.samples if "timeline_id" in s.labels}


def test_delete_ends_its_streams_frees_its_disk_and_spares_the_other(sks: SkFactory) -> None:
    [sk] = sks(1)
    tenant, doomed, kept = TenantId.generate(), TimelineId.generate(), TimelineId.generate()
    for timeline in (doomed, kept):
        sk.create(tenant, timeline)
    gen_d = WalGenerator(START.value, PREV.value, SEG)
    gen_k = WalGenerator(START.value, PREV.value, SEG)
    rng = random.Random(5)
    directory = sk.timeline_dir(tenant, doomed)

    async def scenario() -> None:
        async with proposer(quorum([sk], tenant, doomed)) as driver_d, \
                proposer(quorum([sk], tenant, kept)) as driver_k:
            await append(driver_d, gen_d, rng, 150, 9000)  # 1.35 MB: two 1 MB segments
            kept_wal = await append(driver_k, gen_k, rng, 30)
            await wait_commit(driver_d, gen_d.end_lsn)
            await wait_commit(driver_k, gen_k.end_lsn)
            await wait_until_async(lambda: sk.status(tenant, doomed)["commit_lsn"]
                                   == str(Lsn(gen_d.end_lsn)), 20, "commit on the safekeeper")
            conn_d, stream_d = await walsender(sk, tenant, doomed, START)
            await receive(stream_d, START, Lsn(gen_d.end_lsn), idle_s=10)
            conn_k, stream_k = await walsender(sk, tenant, kept, START)
            assert (await receive(stream_k, START, Lsn(gen_k.end_lsn), idle_s=10))[0] \
                == kept_wal
            # A second, idle proposer connection, as a walproposer between messages.
            raw = await PgConnection.connect("127.0.0.1", sk.pg_port, user="strata")
            raw_stream = await raw.start_copy_both(f"proposer {tenant} {doomed}")
            await wait_until_async(lambda: len(sk.status(tenant, doomed)["peers"]) == 3, 20,
                                   "3 peers")
            held = disk_bytes(directory)
            assert held > SEG

            out = await asyncio.to_thread(
                sk.http, "DELETE", f"/v1/tenant/{tenant}/timeline/{doomed}")
            assert out == {"tenant_id": str(tenant), "timeline_id": str(doomed),
                           "deleted": True, "connections_closed": 3, "freed_bytes": held}
            assert not directory.exists()
            assert sorted(p.name for p in directory.parent.iterdir()) == [str(kept)]

            # Its streams ended with an error naming the deletion ...
            for stream in (stream_d, raw_stream):
                err = await read_until_error(stream)
                assert err.code == "42704", err
                assert f"timeline {doomed} of tenant {tenant} was deleted from safekeeper 1" \
                    in str(err)
            link = driver_d.links[1]
            await wait_until_async(lambda: not link.connected, 20, "the proposer's link to drop")
            await conn_d.close()
            # An ERROR ends the command, not the session: the same connection is back at
            # the query prompt and runs the next command.
            with pytest.raises(ServerError, match="not on safekeeper 1"):
                await raw.start_copy_both(f"proposer {tenant} {doomed}")
            await raw.close()
            # ... and it is unknown now, as a timeline never created.
            for command in (f"START_REPLICATION PHYSICAL {START} {tenant} {doomed}",
                            f"proposer {tenant} {doomed}"):
                async with await PgConnection.connect("127.0.0.1", sk.pg_port,
                                                      user="strata") as conn:
                    with pytest.raises(ServerError, match=f"{doomed} of tenant {tenant} is "
                                                          "not on safekeeper 1") as info:
                        await conn.start_copy_both(command)
                assert info.value.code == "42704"

            # The other timeline's walsender goes on on the same stream, its proposer too.
            more = await append(driver_k, gen_k, rng, 30)
            await wait_commit(driver_k, gen_k.end_lsn)
            got, _ = await receive(stream_k, Lsn(START.value + len(kept_wal)),
                                   Lsn(gen_k.end_lsn), idle_s=10)
            assert got == more
            assert driver_k.links[1].connections == 1  # never reconnected
            update = wire.StandbyStatusUpdate(gen_k.end_lsn, gen_k.end_lsn, START.value,
                                              wire.pg_timestamp(0))
            await stream_k.send(update.encode())
            await stream_k.finish()
            await conn_k.close()

    asyncio.run(scenario())

    for method in ("GET", "DELETE"):
        code, body = sk.http_error(method, f"/v1/tenant/{tenant}/timeline/{doomed}")
        assert (code, body["kind"]) == (404, "NotFound"), body
    status = sk.http("GET", "/v1/status")
    assert status["timelines"] == [{"tenant_id": str(tenant), "timeline_id": str(kept)}]
    assert metric_timelines(sk) == {str(kept)}
    assert f"deleted timeline {tenant}/{doomed}: 3 connections closed" in sk.log_text()

    # A restart does not bring it back; the same id can then be created afresh.
    assert sk.stop() == 0
    sk.start()
    assert sk.http("GET", "/v1/status")["timelines"] == status["timelines"]
    assert sk.http_error("GET", f"/v1/tenant/{tenant}/timeline/{doomed}")[0] == 404
    assert sk.status(tenant, kept)["last_record_end"] == str(Lsn(gen_k.end_lsn))
    again = sk.create(tenant, doomed)
    assert again["created"] is True and again["flush_lsn"] == str(START)


def test_a_crashed_deletion_is_finished_at_start(sks: SkFactory) -> None:
    """A `<timeline>.___deleted` directory (what a crash after the durable rename leaves)
    is removed when the safekeeper starts, and that timeline is not served."""
    [sk] = sks(1)
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    sk.create(tenant, timeline)
    directory = sk.timeline_dir(tenant, timeline)
    sk.kill9()
    leftover = directory.with_name(directory.name + DELETED_SUFFIX)
    directory.rename(leftover)
    sk.start()
    assert not leftover.exists() and not directory.exists()
    assert sk.http("GET", "/v1/status")["timelines"] == []
    assert sk.http("GET", "/v1/status")["refused"] == []
    assert sk.http_error("GET", f"/v1/tenant/{tenant}/timeline/{timeline}")[0] == 404
    assert f"removing {leftover}, left by a deletion that did not finish" in sk.log_text()
