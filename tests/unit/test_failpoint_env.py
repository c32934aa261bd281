"""Failpoints armed through STRATA_FAILPOINTS (strata.common.failpoint.enable_from_env):
raise, sleep and wait (held until a file exists, bounded), and a clear error for a bad item."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.common import failpoint
from strata.common.errors import StrataError


@pytest.fixture(autouse=True)
def _disarm() -> Iterator[None]:
    yield
    failpoint.disable_all()


def test_raise_and_sleep_items() -> None:
    assert failpoint.enable_from_env("fp-a=raise; fp-b=sleep(0.001)") == ["fp-a", "fp-b"]
    with pytest.raises(failpoint.FailpointHit, match="failpoint 'fp-a' fired"):
        failpoint.failpoint("fp-a")
    failpoint.failpoint("fp-b")  # sleeps, then goes on
    assert failpoint.hits("fp-b") == 1


def test_wait_holds_until_the_file_exists(tmp_path: Path) -> None:
    release = tmp_path / "release"
    assert failpoint.enable_from_env(f"fp-w=wait(120,{release})") == ["fp-w"]
    passed = threading.Event()

    def step() -> None:
        failpoint.failpoint("fp-w")
        passed.set()

    worker = threading.Thread(target=step, daemon=True)
    worker.start()
    assert not passed.wait(0.3)  # held: the file does not exist (the bound is 120 s)
    release.touch()
    worker.join(30)
    assert passed.is_set() and not worker.is_alive()


def test_wait_is_bounded(tmp_path: Path) -> None:
    failpoint.enable_from_env(f"fp-w=wait(0.01,{tmp_path / 'never'})")
    failpoint.failpoint("fp-w")  # returns after its bound although the file never appears
    assert failpoint.hits("fp-w") == 1


@pytest.mark.parametrize("item", ["fp=wait(5)", "fp=wait(,/x)", "fp=pause(1)", "fp=sleep()"])
def test_a_bad_item_is_refused(item: str) -> None:
    with pytest.raises(StrataError, match="expected name=raise, name=sleep"):
        failpoint.enable_from_env(item)
