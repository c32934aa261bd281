"""The in-memory layer's sorted keys (`keys_in`): kept between scans of an open layer,
renewed when a put adds a key, in Key order (the layer sorts by a tuple of the fields)."""

from __future__ import annotations

import random
import threading
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


def test_reads_during_puts_see_every_value_whole(tmp_path: Path) -> None:
    """Puts append to the write buffer without the layer's lock (one writing thread);
    a reader in another thread, also while the buffer is written out and replaced
    (every 1 MB), reads each value exactly as put."""
    layer = InMemoryLayer(tmp_path / "ephemeral-1", start_lsn=0x100, created_at=0.0)
    nkeys, rounds = 64, 60  # 64 x 60 values of ~1-3 KB: several buffer write-outs
    done = threading.Event()
    errors: list[str] = []

    def value(blkno: int, lsn: int) -> bytes:
        return (blkno.to_bytes(4, "big") + lsn.to_bytes(8, "big")) * (100 + blkno * 2)

    def reader() -> None:
        rng = random.Random(3)
        while not done.is_set() and not errors:
            blkno = rng.randrange(nkeys)
            for lsn, data, _ in layer.get_versions(Key(0, 1663, 5, 16384, 0, blkno), 1 << 40):
                if data != value(blkno, lsn):
                    errors.append(f"block {blkno} at {lsn:#x}: {data[:12].hex()}...")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        lsn = 0x100
        for _ in range(rounds):
            for blkno in range(nkeys):
                layer.put(Key(0, 1663, 5, 16384, 0, blkno), lsn, value(blkno, lsn), False)
                lsn += 8
    finally:
        done.set()
        thread.join()
    assert not errors, errors[:3]
    assert layer._file_bytes > 1 << 20  # the buffer was written out at least once
    versions = layer.get_versions(Key(0, 1663, 5, 16384, 0, 7), 1 << 40)
    assert len(versions) == rounds and all(d == value(7, v) for v, d, _ in versions)
    layer.close()
