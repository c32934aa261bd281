"""Reconstructed values of keys with long delta chains, remembered at the LSN they were read at.

An SLRU page (a `pg_xact` page above all) gets one delta per commit and no image until
compaction writes one: after a minute of pgbench, ~10,000 deltas, and every basebackup
read them all, twice (docs/lazy-compute.md, "Basebackup after a load"). The timeline
remembers the value it reconstructed at LSN X; a later read at Y >= X walks only the
versions in (X, Y] and applies them to it.

That is exact because the versions at or below `last_record_lsn` never change: ingest
puts only above it (`Timeline._put_bytes`), and compaction and GC rewrite layer files
without changing any value at a retained LSN. Only values read at or below
`last_record_lsn` are remembered, and none below the GC cutoff is used.

Bounded: at most `per_key` LSNs per key and `max_values` values in all, the least
recently used key dropped first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import NamedTuple

from strata.storage.key import Key


class CachedValue(NamedTuple):
    """The value of a key at `lsn` (None: the key did not exist)."""

    lsn: int
    value: bytes | None


class ValueCache:
    """Thread-safe: the page service, basebackups and compaction read concurrently."""

    def __init__(self, max_values: int = 512, per_key: int = 4) -> None:
        assert max_values >= 1 and per_key >= 1, (max_values, per_key)
        self.max_values = max_values
        self.per_key = per_key
        self._values: OrderedDict[Key, list[CachedValue]] = OrderedDict()  # LSN ascending
        self._count = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return self._count

    def get(self, key: Key, lsn: int, floor: int = 0) -> CachedValue | None:
        """The newest remembered value of `key` with floor <= its LSN <= lsn."""
        with self._lock:
            entries = self._values.get(key)
            if entries is not None:
                for entry in reversed(entries):
                    if entry.lsn <= lsn:
                        if entry.lsn < floor:
                            break
                        self._values.move_to_end(key)
                        self.hits += 1
                        return entry
            self.misses += 1
            return None

    def put(self, key: Key, lsn: int, value: bytes | None) -> None:
        """Remember `value` of `key` at `lsn`; the oldest LSN of the key goes beyond
        `per_key`, the least recently used keys beyond `max_values`."""
        with self._lock:
            entries = self._values.get(key)
            if entries is None:
                entries = self._values[key] = []
            else:
                self._values.move_to_end(key)
            at = len(entries)
            while at > 0 and entries[at - 1].lsn >= lsn:
                at -= 1
            if at < len(entries) and entries[at].lsn == lsn:
                return  # the same value: a value at an LSN is final
            entries.insert(at, CachedValue(lsn, value))
            self._count += 1
            if len(entries) > self.per_key:
                del entries[0]
                self._count -= 1
            while self._count > self.max_values:
                _, dropped = self._values.popitem(last=False)
                self._count -= len(dropped)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._count = 0
