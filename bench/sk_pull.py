"""Pull mode, the safekeeper side (issue 13): the commit path through three real safekeeper
processes that pull WAL from a PostgreSQL primary. pgbench (TPC-B and -N at 1, 4 and 8
clients) in alternating rounds against

- `sync_rep`: stock PostgreSQL with synchronous replication to one stock standby (issue
  13's baseline; primary and standby fsync on);
- `pull3`: a primary with the compute's durability (fsync off) and three bare Python
  receivers (the dev-mode walreceiver child, bench/commit_pull.py), `ANY 2 (sk1, sk2, sk3)`:
  the ceiling of the pull topology;
- `sk_pull3`: the same primary setup, but the receivers are three safekeeper processes
  (`python -m strata.safekeeper`), each elected in term 1 by a hand-built proposer and told
  `PullFrom` (its slot `sk<n>`): the acceptor's per-batch work, the record tracker, the
  timeline lock and its one fsync per batch. No sidecar, no commit-only messages and no
  pageserver: it measures what the safekeeper's replication client costs per commit.

Figures per setup and load: median tps (ratio to `sync_rep` in the same run) and p50/p99
latency; `sk_pull3_vs_pull3_*` is the safekeeper's cost over the bare receiver.
`sk_pull3_fsync`: the same as `sk_pull3` with the safekeepers' WAL flush calling fsync
instead of fdatasync (as before 2026-12-07); `sk_pull3_vs_fsync_*` is that change's A/B.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import tempfile
import time
from pathlib import Path

from bench.commit_pull import _pull, compare_in_rounds
from bench.report import Report
from bench.safekeepers import CLIENTS, STOCK_SETTINGS, _stock_sync_rep, _Target
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, segment_file_name
from strata.common.proc import ensure_traversable
from strata.compute.pgserver import PgServer
from strata.pg.controlfile import ControlFileData
from strata.pg.pgclient import PgConnection
from strata.pg.walreader import WalStreamDecoder
from strata.safekeeper.messages import (
    AppendResponse,
    ProposerElected,
    ProposerGreeting,
    PullFrom,
    TermEntry,
    VoteRequest,
    VoteResponse,
    decode,
    encode,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from fixtures_env import SafekeeperProcess  # noqa: E402

NAMES = ("sk1", "sk2", "sk3")


def _end_of_shutdown(primary: PgServer) -> tuple[int, Lsn, Lsn, int]:
    """(system id, X, prev, segment size) of a cleanly stopped primary: its shutdown
    checkpoint record starts at prev and ends at X, where it writes next after a start."""
    control = ControlFileData.from_bytes((primary.datadir / "global" / "pg_control")
                                         .read_bytes())
    ckpt, seg = control.checkpoint, control.xlog_seg_size
    path = primary.datadir / "pg_wal" / segment_file_name(ckpt.value // seg, 1, seg)
    data = path.read_bytes()[ckpt.value % seg:]
    decoder = WalStreamDecoder(ckpt, seg, at_record_start=True)
    decoder.feed(data)
    record = next(iter(decoder))
    assert record.lsn == ckpt.value, (record.lsn, ckpt)
    return control.system_identifier, Lsn(record.end_lsn), ckpt, seg


async def _elect_and_pull(sk: SafekeeperProcess, tenant: TenantId, timeline: TimelineId,
                          system_id: int, seg: int, x: Lsn, prev: Lsn, primary: PgServer,
                          slot: str) -> None:
    conn = await PgConnection.connect("127.0.0.1", sk.pg_port, user="proposer")
    try:
        stream = await conn.start_copy_both(f"proposer {tenant} {timeline}")

        async def ask(msg: object) -> object:
            await stream.send(encode(msg))  # type: ignore[arg-type]
            payload = await stream.read()
            assert payload is not None
            return decode(payload)
        await ask(ProposerGreeting(tenant, timeline, system_id, seg, 1))
        vote = await ask(VoteRequest(1, 1))
        assert isinstance(vote, VoteResponse) and vote.granted, vote
        elected = await ask(ProposerElected(1, x, (TermEntry(1, x, prev),)))
        assert isinstance(elected, AppendResponse) and elected.log_term == 1, elected
        reply = await ask(PullFrom(1, primary.host, primary.port, slot, x))
        assert isinstance(reply, AppendResponse) and reply.term == 1, reply
    finally:
        conn.abort()  # the pull goes on without the proposer connection


def _sk_pull(stack: contextlib.ExitStack, base: Path) -> PgServer:
    return sk_pull_setup(stack, base)[0]


class _FsyncSafekeeper(SafekeeperProcess):  # type: ignore[misc]
    """A safekeeper process whose WAL flush calls fsync where it calls fdatasync (what it
    did before; the WAL flush is its only fdatasync): the A/B of that change."""

    def argv(self) -> list[str]:
        python, _, module, *args = super().argv()
        return [python, "-c", "import os, runpy; os.fdatasync = os.fsync; runpy.run_module("
                f"{module!r}, run_name='__main__', alter_sys=True)", *args]


def sk_pull_setup(stack: contextlib.ExitStack, base: Path, *, fsync: bool = False
                  ) -> tuple[PgServer, list[SafekeeperProcess]]:
    """The `sk_pull3` setup under base: its primary and its three safekeeper processes
    (`fsync`: _FsyncSafekeeper's)."""
    base.mkdir()
    ensure_traversable(base)
    primary = PgServer(base / "primary", log_path=base / "primary.log")
    primary.initdb()
    primary.start({**STOCK_SETTINGS, "fsync": False})
    for name in NAMES:
        primary.sql("select pg_create_physical_replication_slot(%s, true)", name)
    primary.stop("fast")
    system_id, x, prev, seg = _end_of_shutdown(primary)
    primary.start({**STOCK_SETTINGS, "fsync": False,
                   "synchronous_standby_names": f"ANY 2 ({', '.join(NAMES)})"})
    stack.callback(primary.stop, "immediate")
    tenant, timeline = TenantId.generate(), TimelineId.generate()
    sks: list[SafekeeperProcess] = []
    for i, name in enumerate(NAMES):
        sk = (_FsyncSafekeeper if fsync else SafekeeperProcess)(
            i + 1, base / name, base / f"{name}.log",
            extra_args=["--pull-user", primary.superuser])
        sk.start()
        stack.callback(sk.stop)
        sks.append(sk)
        sk.create_timeline(tenant, timeline, x, prev, system_id, seg)
        asyncio.run(_elect_and_pull(sk, tenant, timeline, system_id, seg, x, prev, primary,
                                    name))
    deadline = time.monotonic() + 30
    while primary.sql("select count(*) from pg_stat_replication where sync_state = "
                      "'quorum'")[0][0] != len(NAMES):
        assert time.monotonic() < deadline, \
            f"the safekeepers in {base} never became synchronous:\n{primary.log_tail()}"
        time.sleep(0.1)
    return primary, sks


def run(report: Report, quick: bool) -> None:
    seconds, rounds = (5, 1) if quick else (8, 3)
    with tempfile.TemporaryDirectory(prefix="strata-bench-skpull-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        ensure_traversable(base)
        targets = [_Target("sync_rep", _stock_sync_rep(stack, base), base / "sync-tx"),
                   _Target("pull3", _pull(stack, base / "pull3", 3), base / "pull3-tx"),
                   _Target("sk_pull3", _sk_pull(stack, base / "skpull3"),
                           base / "skpull3-tx"),
                   _Target("sk_pull3_fsync",
                           sk_pull_setup(stack, base / "skpull3-fsync", fsync=True)[0],
                           base / "skpull3-fsync-tx")]

        def vs_pull3(tag: str, key: tuple[str, int]) -> None:
            pull_tps, _, pull_p99 = targets[1].result(key)
            sk_tps, _, sk_p99 = targets[2].result(key)
            report.add(f"tps_sk_pull3_vs_pull3_{tag}", sk_tps / pull_tps, "x")
            report.add(f"p99_sk_pull3_vs_pull3_{tag}", sk_p99 / pull_p99, "x")
            old_tps, _, old_p99 = targets[3].result(key)
            report.add(f"tps_sk_pull3_vs_fsync_{tag}", sk_tps / old_tps, "x")
            report.add(f"p99_sk_pull3_vs_fsync_{tag}", sk_p99 / old_p99, "x")

        loads = compare_in_rounds(report, targets, seconds, rounds, vs_pull3)
        report.note(f"pgbench -s 1, TPC-B and -N, -c {'/'.join(map(str, CLIENTS))}, -T "
                    f"{seconds}, {rounds} alternating round(s) per setup and load (median tps, "
                    "pooled latencies); sync_rep: stock, one standby, fsync on; pull3: "
                    "fsync-off primary, 3 bare Python receivers, ANY 2; sk_pull3: the same "
                    "with 3 safekeeper processes pulling (hand-elected, PullFrom); "
                    "sk_pull3_fsync: the same, the safekeepers' WAL flush with fsync instead "
                    "of fdatasync; load "
                    f"average after each load {', '.join(f'{x:.1f}' for x in loads)}")
