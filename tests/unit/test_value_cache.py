"""The value cache of keys with long delta chains: which value a read gets, and its bounds.

The values it gives against stored data are checked by the storage model test
(tests/unit/test_storage_model.py, SLRU pages); this is the cache alone.
"""

from __future__ import annotations

from strata.pg.slru import SlruKind
from strata.storage.key import slru_block_key
from strata.storage.value_cache import CachedValue, ValueCache

A = slru_block_key(SlruKind.CLOG, 0, 0)
B = slru_block_key(SlruKind.CLOG, 0, 1)
C = slru_block_key(SlruKind.CLOG, 0, 2)


def test_newest_value_at_or_below_the_read_lsn_and_not_below_the_floor() -> None:
    cache = ValueCache()
    cache.put(A, 0x200, b"two")
    cache.put(A, 0x100, b"one")  # an older LSN read later goes in its place
    cache.put(A, 0x300, None)
    assert cache.get(A, 0x0FF) is None
    assert cache.get(A, 0x100) == CachedValue(0x100, b"one")
    assert cache.get(A, 0x2FF) == CachedValue(0x200, b"two")
    assert cache.get(A, 0x10000) == CachedValue(0x300, None)
    assert cache.get(A, 0x2FF, floor=0x201) is None  # e.g. below the GC cutoff
    assert cache.get(B, 0x300) is None
    assert (cache.hits, cache.misses) == (3, 3)


def test_a_value_at_an_lsn_is_kept_once() -> None:
    cache = ValueCache()
    cache.put(A, 0x100, b"one")
    cache.put(A, 0x100, b"one")
    assert len(cache) == 1


def test_per_key_bound_drops_the_oldest_lsn() -> None:
    cache = ValueCache(per_key=2)
    for lsn in (0x100, 0x200, 0x300):
        cache.put(A, lsn, lsn.to_bytes(2, "big"))
    assert len(cache) == 2
    assert cache.get(A, 0x1FF) is None
    assert cache.get(A, 0x200) == CachedValue(0x200, b"\x02\x00")


def test_total_bound_drops_the_least_recently_used_key() -> None:
    cache = ValueCache(max_values=3, per_key=2)
    cache.put(A, 0x100, b"a1")
    cache.put(A, 0x200, b"a2")
    cache.put(B, 0x100, b"b1")
    assert cache.get(A, 0x100) is not None  # A is now the most recently used
    cache.put(C, 0x100, b"c1")  # 4 values: B goes
    assert len(cache) == 3
    assert cache.get(B, 0x100) is None
    assert cache.get(A, 0x200) == CachedValue(0x200, b"a2")
    assert cache.get(C, 0x100) == CachedValue(0x100, b"c1")
    cache.clear()
    assert len(cache) == 0 and cache.get(A, 0x200) is None
