"""Fixtures of the pageserver integration tests (see fixtures_env.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fixtures_env import Env, LoopThread, PageserverProcess  # noqa: E402


@pytest.fixture
def pageserver(test_dir: Path) -> Iterator[PageserverProcess]:
    """The pageserver process on free ports under the test's directory; SIGKILLed at the
    end if the test did not stop it (a test that checks a clean stop does it itself)."""
    process = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log")
    process.start()
    try:
        yield process
    finally:
        process.kill9()


@pytest.fixture
def env(test_dir: Path, pageserver: PageserverProcess) -> Iterator[Env]:
    """The pageserver plus `start_compute`; every compute is stopped at the end. ERROR and
    WARNING lines in the pageserver's log fail the test unless it lists them in
    `env.allowed_log_errors`."""
    environment = Env(test_dir, pageserver)
    try:
        yield environment
    finally:
        environment.stop_all()
    unexpected = environment.unexpected_log_errors()
    assert not unexpected, "\n".join(unexpected[:20])


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    """An event loop in a thread (for sidecars and in-process safekeepers); its `closers`
    run, then its tasks are cancelled, at the end."""
    lt = LoopThread()
    yield lt
    lt.close()
