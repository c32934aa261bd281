"""LayerMap.search CPU time with thousands of layers (the timing tests/unit/test_layer_map.py
no longer asserts: there it counts the groups a search reads).

The map: `rounds` rounds (quick: 50, i.e. 5,000 layers; full: 200, ~20,000) of 50 L0
deltas over every key, each round ending with image layers of 49 of 100 key partitions
(all 100 in the first) at its last LSN, as image creation at disk_consistent_lsn makes
them. 20,000 searches at random keys and LSNs, on one thread:

- `search_us`: CPU microseconds per `LayerMap.search`.
- `scan_us`: the same answers by a scan over every layer (a sample of 200), with
  `search_us` as its baseline: the ratio is what the map's index saves.
"""

from __future__ import annotations

import random
import time

from bench.report import Report
from strata.common.lsn import Lsn
from strata.storage.key import FULL_KEY_RANGE, Key, KeyRange
from strata.storage.layer_map import LayerMap
from strata.storage.layer_name import LayerDesc

DELTAS_PER_ROUND = 50
PARTITIONS = 100
IMAGES_PER_ROUND = 49
KEYS_PER_PARTITION = 1000


def _key(n: int) -> Key:
    return Key(0, 0, 0, 0, 0, n)


def build(rounds: int, rnd: random.Random) -> tuple[LayerMap, int]:
    """The map of the module docstring and its end LSN."""
    layers = LayerMap()
    lsn = 1000
    parts = [KeyRange(_key(i * KEYS_PER_PARTITION), _key((i + 1) * KEYS_PER_PARTITION))
             for i in range(PARTITIONS)]
    for round_ in range(rounds):
        for _ in range(DELTAS_PER_ROUND):
            layers.insert(LayerDesc.delta(FULL_KEY_RANGE, Lsn(lsn), Lsn(lsn + 100)))
            lsn += 100
        for part in rnd.sample(parts, IMAGES_PER_ROUND if round_ else PARTITIONS):
            layers.insert(LayerDesc.image(part, Lsn(lsn - 1)))
    return layers, lsn


def scan(layers: list[LayerDesc], key: Key, end: Lsn) -> LayerDesc | None:
    """LayerMap.search by brute force: the greatest LSN end, an image on ties."""
    best: LayerDesc | None = None
    for d in layers:
        if d.key_range.contains(key) and d.lsn_range[0] < end and (
                best is None or (d.lsn_range[1], not d.is_delta)
                > (best.lsn_range[1], not best.is_delta)):
            best = d
    return best


def run(report: Report, quick: bool) -> None:
    rnd = random.Random(1)
    layers, end_lsn = build(50 if quick else 200, rnd)
    queries = [(_key(rnd.randrange(PARTITIONS * KEYS_PER_PARTITION)),
                Lsn(rnd.randrange(1000, end_lsn + 1))) for _ in range(20_000)]
    report.note(f"{len(layers)} layers, {len(queries)} searches")
    t0 = time.process_time()
    found = [layers.search(key, end) for key, end in queries]
    search_us = (time.process_time() - t0) / len(queries) * 1e6
    every = layers.all()
    sample = queries[:200]  # the scan is slow: a sample of the same queries
    t0 = time.process_time()
    scanned = [scan(every, key, end) for key, end in sample]
    scan_us = (time.process_time() - t0) / len(sample) * 1e6
    assert [d.lsn_range[1] if d else None for d in scanned] == \
        [d.lsn_range[1] if d else None for d in found[:len(sample)]]
    report.add("search_us", search_us, "CPU us per search")
    report.add("scan_us", scan_us, "CPU us per search", baseline=search_us)
