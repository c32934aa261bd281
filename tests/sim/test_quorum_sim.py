"""The WAL quorum survives message loss, duplication, reordering and delay, acceptor crashes
(of a minority or of all, keeping only durable state) and competing proposers: after every
step one leader per term, committed WAL never changes and stays durable on a majority,
acceptors agree up to their commit LSNs, sync results are committed record ends with their
real previous record; and once the faults stop, a sync proposer finishes (see quorum_sim.py)."""

from __future__ import annotations

from quorum_sim import Simulation


def test_quorum_under_faults(seed_range: tuple[int, int]) -> None:
    lo, hi = seed_range
    for seed in range(lo, hi):
        sim = Simulation(seed)
        try:
            sim.run()
        except Exception as err:
            raise AssertionError(f"simulation failed for seed {seed}; replay with "
                                 f"`pytest tests/sim --seed {seed}`: {err!r}") from err


def test_simulation_exercises_the_protocol() -> None:
    """The faults and recovery paths the checker guards actually happen in the seed range."""
    elections = multi_term = commits = syncs = 0
    for seed in range(40):
        sim = Simulation(seed)
        sim.run()
        elections += len(sim.checker.leaders)
        commits += len(sim.checker.committed) > 0
        syncs += len(sim.checker.sync_results)
        multi_term += any(len(a.control.term_history) > 1 for a in sim.acceptors)
    assert elections > 80, elections
    assert commits > 10, commits
    assert syncs >= 40, syncs
    assert multi_term > 10, multi_term


def test_replay_is_deterministic() -> None:
    """A seed replays exactly: the same steps and the same committed WAL."""
    a, b = Simulation(12345), Simulation(12345)
    a.run()
    b.run()
    assert (a.steps, bytes(a.checker.committed)) == (b.steps, bytes(b.checker.committed))
