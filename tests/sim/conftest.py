"""Simulator options: `pytest tests/sim --seed N` replays one seed (with its full traceback)."""

from __future__ import annotations

import pytest

SEEDS = 3000
CHUNK = 100


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--seed", type=int, default=None,
                     help="run the quorum simulator for this one seed (replay a failure)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed_range" not in metafunc.fixturenames:
        return
    seed = metafunc.config.getoption("--seed")
    if seed is not None:
        ranges = [(seed, seed + 1)]
    else:
        ranges = [(lo, lo + CHUNK) for lo in range(0, SEEDS, CHUNK)]
    metafunc.parametrize("seed_range", ranges, ids=[f"seeds{lo}-{hi - 1}" for lo, hi in ranges])
