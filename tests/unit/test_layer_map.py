"""LayerMap: search and the GC/compaction queries agree with brute force over random maps."""

import random
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from strata.common.lsn import Lsn
from strata.storage.key import FULL_KEY_RANGE, Key, KeyRange
from strata.storage.layer_map import LayerMap
from strata.storage.layer_name import LayerDesc

NKEYS = 24
NLSNS = 40


def k(n: int) -> Key:
    return Key(0, 0, 0, 0, 0, n)


def _rank(d: LayerDesc) -> tuple[int, bool]:
    return d.lsn_range[1].value, not d.is_delta


def brute_search(layers: set[LayerDesc], key: Key, end: Lsn) -> set[LayerDesc]:
    """Every layer that is an equally good answer (empty: none)."""
    cands = [d for d in layers if d.key_range.contains(key) and d.lsn_range[0] < end]
    if not cands:
        return set()
    best = max(_rank(d) for d in cands)
    return {d for d in cands if _rank(d) == best}


def brute_count_deltas(layers: set[LayerDesc], kr: KeyRange, lr: tuple[Lsn, Lsn]) -> int:
    most = 0
    for n in range(kr.start.field6, min(kr.end.field6, NKEYS + 1)):
        over = [d for d in layers if d.key_range.contains(k(n))
                and d.lsn_range[0] < lr[1] and lr[0] < d.lsn_range[1]]
        image_end = max((d.lsn_range[1].value for d in over if not d.is_delta), default=0)
        most = max(most, sum(1 for d in over if d.is_delta and d.lsn_range[1].value > image_end))
    return most


keys_n = st.integers(0, NKEYS)
lsn_n = st.integers(0, NLSNS)


@st.composite
def descs(draw: st.DrawFn) -> LayerDesc:
    a, b = sorted((draw(keys_n), draw(keys_n)))
    kr = KeyRange(k(a), k(b + 1))
    if draw(st.booleans()):
        # short spans often, so deltas share LSN ranges (and ends) with images
        s = draw(lsn_n)
        span = draw(st.sampled_from([1, 1, 2, 3, 7, 15, NLSNS]))
        return LayerDesc.delta(kr, Lsn(s), Lsn(s + span))
    return LayerDesc.image(kr, Lsn(draw(lsn_n)))


class LayerMapMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.map = LayerMap()
        self.model: set[LayerDesc] = set()

    @rule(desc=descs())
    def insert(self, desc: LayerDesc) -> None:
        if desc not in self.model:
            self.map.insert(desc)
            self.model.add(desc)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        desc = data.draw(st.sampled_from(sorted(self.model)))
        self.map.remove(desc)
        self.model.remove(desc)

    @rule(n=keys_n, end=st.integers(0, NLSNS + 2))
    def search(self, n: int, end: int) -> None:
        got = self.map.search(k(n), Lsn(end))
        want = brute_search(self.model, k(n), Lsn(end))
        if want:
            assert got in want, (got, want)
        else:
            assert got is None, got

    @rule(a=keys_n, b=keys_n, s=lsn_n, e=lsn_n)
    def range_queries(self, a: int, b: int, s: int, e: int) -> None:
        kr = KeyRange(k(min(a, b)), k(max(a, b) + 1))
        lr = (Lsn(min(s, e)), Lsn(max(s, e) + 1))
        want = {d for d in self.model
                if d.key_range.overlaps(kr) and d.lsn_range[0] < lr[1] and lr[0] < d.lsn_range[1]}
        assert set(self.map.layers_overlapping(kr, lr)) == want
        assert self.map.count_deltas(kr, lr) == brute_count_deltas(self.model, kr, lr)
        images = [d for d in self.model if not d.is_delta and d.key_range.overlaps(kr)
                  and d.image_lsn <= lr[0]]
        got = self.map.newest_image_at_or_below(kr, lr[0])
        if images:
            assert got is not None and got in images
            assert got.image_lsn == max(d.image_lsn for d in images)
        else:
            assert got is None

    @invariant()
    def consistent(self) -> None:
        self.map.check_invariants()
        assert self.map.all() == sorted(self.model)
        assert len(self.map) == len(self.model)


LayerMapMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                             deadline=None)
TestLayerMapModel = LayerMapMachine.TestCase


def test_search_walks_down_a_chain() -> None:
    """The reader's loop: search, then search again below the returned layer's start."""
    m = LayerMap()
    img = LayerDesc.image(FULL_KEY_RANGE, Lsn(100))
    m.insert(img)
    deltas = [LayerDesc.delta(FULL_KEY_RANGE, Lsn(101 + 10 * i), Lsn(111 + 10 * i))
              for i in range(5)]
    for delta in deltas:
        m.insert(delta)
    chain = []
    end = Lsn(1000)
    while (found := m.search(k(3), end)) is not None:
        chain.append(found)
        if not found.is_delta:
            break
        end = found.lsn_range[0]
    assert chain == list(reversed(deltas)) + [img]
    # an image at the same end as a delta wins the tie
    tie = LayerDesc.delta(FULL_KEY_RANGE, Lsn(50), Lsn(101))
    m.insert(tie)
    assert m.search(k(3), Lsn(101)) == img


class _CountingOrder(list[tuple[int, int]]):
    """LayerMap's sorted (end, start) of its LSN groups, counting the entries read: the
    bisect's probes and the groups `search` walks (white-box: `_order`)."""

    reads = 0

    def __getitem__(self, i: Any) -> Any:
        self.reads += 1
        return super().__getitem__(i)


def many_layers(rounds: int) -> tuple[LayerMap, int]:
    """`rounds` rounds of 50 L0 deltas over every key, then image layers of most of 100 key
    partitions at the last LSN (image creation at disk_consistent_lsn); and the end LSN.
    bench/layer_map.py times `search` on the same map."""
    rnd = random.Random(1)
    m = LayerMap()
    lsn = 1000
    parts = [KeyRange(k(i * 1000), k((i + 1) * 1000)) for i in range(100)]
    for round_ in range(rounds):
        for _ in range(50):
            m.insert(LayerDesc.delta(FULL_KEY_RANGE, Lsn(lsn), Lsn(lsn + 100)))
            lsn += 100
        for p in rnd.sample(parts, 49 if round_ else 100):
            m.insert(LayerDesc.image(p, Lsn(lsn - 1)))
    return m, lsn


def test_search_looks_at_few_groups_with_thousands_of_layers() -> None:
    """5,000 layers in 2,550 LSN groups: a search reads a logarithmic number of them (it
    finds where to start by bisect, it does not scan), counted rather than timed."""
    m, lsn = many_layers(50)
    assert len(m) > 5000
    counting = _CountingOrder(m._order)
    m._order = counting
    rnd = random.Random(2)
    queries = [(k(rnd.randrange(100_000)), Lsn(rnd.randrange(1000, lsn + 1)))
               for _ in range(2000)]
    most = 0
    for key, end in queries:
        counting.reads = 0
        m.search(key, end)
        most = max(most, counting.reads)
    # log2(2,550 groups) < 12 bisect probes, then a few groups (a scan would read ~1,000s)
    assert 1 <= most <= 12 + 4, most
    # a read at the newest LSN reaches an image within a few rounds of deltas
    for key, _ in queries[:200]:
        steps, end = 0, Lsn(lsn)
        while (d := m.search(key, end)) is not None and d.is_delta:
            steps, end = steps + 1, d.lsn_range[0]
        assert d is not None and steps <= 50 * 10, (key, steps)
