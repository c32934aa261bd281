"""`SafekeeperReceiver._watch`, the pageserver's check that the safekeeper it streams from
can still give it the committed WAL: it polls every safekeeper's commit LSN, often only
while one has committed WAL beyond what was received (each poll is an HTTP request per
safekeeper, on the pageserver's and the safekeepers' CPU), and gives up on the current
one after `switch_after_s` of that. The commit LSNs come from a list here instead of HTTP
(the polling itself is tested end to end in tests/integration/test_safekeepers_e2e.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from strata.common.errors import Unavailable
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.sk_receiver import SafekeeperEndpoint, SafekeeperReceiver
from strata.pageserver.wal_log import WalLog

START = Lsn(0x1000000)
SKS = [SafekeeperEndpoint(n, "127.0.0.1", 1, 1) for n in (1, 2, 3)]


class _Receiver(SafekeeperReceiver):
    def __init__(self, wal_log: WalLog, answers: dict[int, Lsn], **kw: Any) -> None:
        super().__init__(TenantId.generate(), TimelineId.generate(), SKS, wal_log, **kw)
        self.answers = answers
        self.polls = 0

    async def _commit_lsns(self) -> dict[int, Lsn]:
        self.polls += 1
        return dict(self.answers)


def _watch_for(receiver: _Receiver, seconds: float) -> BaseException | None:
    async def main() -> BaseException | None:
        try:
            await asyncio.wait_for(receiver._watch(SKS[0]), seconds)
        except TimeoutError:
            return None
        except Unavailable as err:
            return err
        raise AssertionError("the watch returned")
    return asyncio.run(main())


def test_no_peer_ahead_polls_at_the_relaxed_interval(tmp_path: Path) -> None:
    wal = WalLog.create(tmp_path / "wal", START)
    receiver = _Receiver(wal, {1: START, 2: START, 3: START}, poll_interval_s=0.01,
                         relaxed_poll_s=30.0, switch_after_s=0.05)
    assert _watch_for(receiver, 0.5) is None
    assert receiver.polls == 0  # its first poll is 30 s away, not 0.01 s


def test_relaxed_interval_is_never_below_the_fast_one(tmp_path: Path) -> None:
    wal = WalLog.create(tmp_path / "wal", START)
    receiver = _Receiver(wal, {}, poll_interval_s=0.5, relaxed_poll_s=0.1)
    assert receiver.relaxed_poll_s == 0.5


@pytest.mark.parametrize("ours", [START, START + 0x100])
def test_a_peer_ahead_is_polled_fast_then_the_watch_gives_up(tmp_path: Path,
                                                             ours: Lsn) -> None:
    """Ours has nothing beyond what was received, or lags by more than switch_lag_bytes:
    once seen, the fast polls take over and the watch ends within switch_after_s."""
    wal = WalLog.create(tmp_path / "wal", START)
    receiver = _Receiver(wal, {1: ours, 2: START + 0x10000, 3: START},
                         poll_interval_s=0.01, relaxed_poll_s=0.01, switch_after_s=0.05)
    receiver.switch_lag_bytes = 0x1000
    err = _watch_for(receiver, 30)
    assert isinstance(err, Unavailable), err
    assert "cannot give WAL" in str(err)
    assert receiver.polls >= 2
