"""The in-memory layer's sorted keys (`keys_in`): kept between scans of an open layer,
renewed when a put adds a key, in Key order (the layer sorts by a tuple of the fields)."""

from __future__ import annotations

import random
from pathlib import Path

from strata.storage.inmemory_layer import InMemoryLayer
from strata.storage.key import Key, KeyRange


def test_keys_in_sees_keys_added_after_a_scan(tmp_path: Path) -> None:
    layer = InMemoryLayer(tmp_path / "ephemeral-1", start_lsn=0x100, created_at=0.0)
    rng = random.Random(7)
    keys = {Key(rng.choice((0, 1, 6)), rng.randrange(3), 1663, rng.randrange(1 << 32),
                rng.randrange(4), rng.randrange(1 << 32)) for _ in range(500)}
    lsn = 0x100
    for key in keys:
        layer.put(key, lsn, b"x", True)
        lsn += 8
    everything = KeyRange(Key(0, 0, 0, 0, 0, 0), Key(0xFF, 0, 0, 0, 0, 0))
    assert layer.keys_in(everything) == sorted(keys)
    part = KeyRange(Key(1, 0, 0, 0, 0, 0), Key(6, 0, 0, 0, 0, 0))
    assert layer.keys_in(part) == sorted(k for k in keys if k.field1 == 1)
    # A new key after the scans is in the next one; a new version of a known key keeps
    # the sorted list (nothing to add).
    new = Key(1, 0, 0, 0, 0, 0)
    layer.put(new, lsn, b"y", True)
    assert new in layer.keys_in(part) and layer.keys_in(part) == sorted(
        [new, *(k for k in keys if k.field1 == 1)])
    kept = layer.keys_in(everything)
    layer.put(new, lsn + 8, b"z", True)
    assert layer.keys_in(everything) == kept
    layer.close()
