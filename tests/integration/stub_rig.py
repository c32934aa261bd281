"""The set-up of the walproposer sidecar's tests against a real PostgreSQL 15 compute and
in-process stub safekeepers (test_walproposer_pg.py in push mode, test_walproposer_pull.py
in pull mode): a compute started from the pageserver's basebackup at X, three stubs at X,
and the sidecar run in the test's `loop` (conftest.py) that stops PostgreSQL when fenced.
"""

from __future__ import annotations

import abc
import concurrent.futures
import io
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import pytest
from fixtures_env import COMPUTE_SETTINGS, Env, LoopThread

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import Compute, ComputeConfig
from strata.compute.quorum import DEFAULT_APPLICATION_NAME, QuorumConfig, SafekeeperAddr
from strata.compute.walproposer import (
    SidecarConfig,
    WalProposer,
    immediate_stopper,
    postmaster_pid,
)
from strata.pg.walreader import DecodedRecord, WalStreamDecoder

SLOTS = ("sk1", "sk2", "sk3")  # pull mode: one slot a safekeeper


class Stub(Protocol):
    """What the rig needs of a stub safekeeper (tests/sk_stub.py, or the pull stub)."""

    node_id: int
    port: int
    wal: bytearray  # what it holds from X on

    @property
    def end_lsn(self) -> Lsn: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Stub)


def basebackup_compute(env: Env, tenant: TenantId, timeline: TimelineId, lsn: Lsn,
                       name: str, config: ComputeConfig,
                       slots: tuple[str, ...] = ()) -> Compute:
    """A compute (not started; stopped with `env`) on the pageserver's basebackup of
    `timeline` at `lsn`, with physical slots `slots` at `lsn`."""
    tar = io.BytesIO()
    env.client.basebackup(tenant, timeline, tar, lsn, slots=slots)
    tar.seek(0)
    compute = Compute.from_basebackup(tar, env.test_dir / name, config,
                                      log_path=env.test_dir / f"{name}.log")
    env.computes.append(compute)
    return compute


class StubRig(abc.ABC, Generic[S]):
    """A new tenant's compute at X from the pageserver (push mode: the walproposer's slot
    and synchronous standby; pull mode: slots sk1..sk3 and `ANY 2 (sk1, sk2, sk3)`), three
    stub safekeepers at X (`make_stub`), and `start_sidecar`."""

    pull = False

    def __init__(self, env: Env, loop: LoopThread, name: str, *, start: bool = True) -> None:
        self.env, self.loop = env, loop
        self.tenant, self.timeline = env.client.create_tenant()
        self.x, self.prev = env.client.compute_start(self.tenant, self.timeline)
        if self.pull:
            config = ComputeConfig(quorum_standbys=SLOTS, settings=COMPUTE_SETTINGS)
        else:
            config = ComputeConfig(receiver_name=DEFAULT_APPLICATION_NAME,
                                   settings=COMPUTE_SETTINGS)
        self.compute = basebackup_compute(env, self.tenant, self.timeline, self.x, name,
                                          config, SLOTS if self.pull else ())
        if start:
            self.compute.start()
        self.system_id = self.compute.control().system_identifier
        self.sks = [self.make_stub(i + 1) for i in range(3)]
        for sk in self.sks:
            loop.call(sk.start())
            loop.closers.append(sk.stop)
        self.fenced: list[str] = []

    @abc.abstractmethod
    def make_stub(self, node_id: int) -> S:
        """Stub safekeeper `node_id` of this timeline at X (not started)."""

    def quorum(self) -> QuorumConfig:
        return QuorumConfig(self.tenant, self.timeline,
                            tuple(SafekeeperAddr(s.node_id, "127.0.0.1", s.port)
                                  for s in self.sks),
                            retry_interval_s=0.1, connect_timeout_s=1, backoff_max_s=0.2)

    def start_sidecar(self, **kwargs: Any) -> WalProposer:
        """The sidecar, running in the loop until the test ends; fenced, it records the
        reason in `fenced` and stops PostgreSQL at once."""
        stop = immediate_stopper(postmaster_pid(self.compute.datadir))

        def on_fence(reason: str) -> None:
            self.fenced.append(reason)
            stop(reason)

        sidecar = WalProposer(self.quorum(), SidecarConfig(
            pg_host="127.0.0.1", pg_port=self.compute.port, pull=self.pull, **kwargs),
            on_fence=on_fence)
        run = self.loop.spawn(sidecar.run())

        async def cancel() -> None:
            run.cancel()
        self.loop.closers.insert(0, cancel)
        return sidecar


    def write_rows(self) -> Lsn:
        """Table t with 50 rows of 500 bytes, one commit each, through the sidecar; every
        acknowledged commit is in the WAL a majority of the stubs holds (they answer only
        after their FlushWal). Returns the compute's WAL end."""
        compute = self.compute
        compute.sql("CREATE TABLE t (id int primary key, v text)")
        for i in range(50):
            compute.sql("INSERT INTO t VALUES (%s, repeat('x', 500))", i)
        end = current_lsn(compute)
        on_majority = sorted((s.end_lsn for s in self.sks), reverse=True)[1]
        assert on_majority >= end - 200, (on_majority, end)  # a trailing non-commit record
        return end

    def stub_records(self) -> list[DecodedRecord]:
        """The first stub's WAL, which must decode as one chain of records from X."""
        decoder = WalStreamDecoder(self.x, 16 << 20, at_record_start=True)
        decoder.feed(bytes(self.sks[0].wal))
        records = list(decoder)
        assert records and records[0].lsn == self.x.value
        assert records[0].prev == self.prev.value
        return records

    def commit_waits_without_majority(self, back: Sequence[int]) -> None:
        """With stubs 1 and 2 stopped, a commit waits, reads go on and the compute is not
        stopped; once the stubs at indexes `back` are started again the commit returns."""
        compute, loop = self.compute, self.loop
        loop.call(self.sks[0].stop())
        loop.call(self.sks[1].stop())
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(compute.sql, "INSERT INTO t VALUES (1000, 'waits')")
            with pytest.raises(concurrent.futures.TimeoutError):
                pending.result(3)
            assert compute.sql("SELECT count(*) FROM t WHERE id < 1000") == [(50,)]
            assert compute.is_running() and self.fenced == []
            for i in back:
                loop.call(self.sks[i].start())
            pending.result(60)
        assert compute.sql("SELECT v FROM t WHERE id = 1000") == [("waits",)]
        assert self.fenced == [] and compute.is_running()


def current_lsn(compute: Compute) -> Lsn:
    return Lsn.parse(str(compute.sql("SELECT pg_current_wal_flush_lsn()")[0][0]))
