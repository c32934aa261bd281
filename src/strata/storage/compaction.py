"""Compaction: write image layers where delta layers pile up, so reads never walk long chains.

At LSN L = disk_consistent_lsn the key space of a timeline is cut into partitions of
about `image_layer_keys` keys (by the keys that have versions at or below L, its
ancestors' included). Where `image_creation_threshold` or more delta layers stack
over any key of a partition above its newest image layer, an image layer at L is
written for the whole partition: the value of every live key at L, materialized.

An image layer is a complete picture of its key range: a key it does not hold is
absent at L (a dropped fork, a tombstoned file), and a block it does not hold reads
as a zero page if it is below the fork's size (timeline.materialize omits blocks
with no version since their cut). Image layers of a partition cover the partition's
whole range, and partitions tile the key space, so GC can reason about coverage by
ranges alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from strata.common.failpoint import FailpointHit, failpoint
from strata.common.lsn import Lsn
from strata.storage.image_layer import ImageLayerWriter
from strata.storage.key import KEY_MAX, KEY_MIN, Key, KeyRange
from strata.storage.layer_name import LayerDesc
from strata.storage.timeline import Timeline
from strata.storage.value import Image, encode_value

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompactionResult:
    image_layers: tuple[LayerDesc, ...]
    partitions: int


def partition(keys: list[Key], keys_per_partition: int) -> list[tuple[KeyRange, list[Key]]]:
    """Cut the key space into ranges that tile [KEY_MIN, KEY_MAX), each with its keys."""
    assert keys_per_partition > 0, keys_per_partition
    if not keys:
        return []
    parts: list[tuple[KeyRange, list[Key]]] = []
    start = KEY_MIN
    for i in range(0, len(keys), keys_per_partition):
        chunk = keys[i:i + keys_per_partition]
        end = keys[i + keys_per_partition] if i + keys_per_partition < len(keys) else KEY_MAX
        parts.append((KeyRange(start, end), chunk))
        start = end
    return parts


def compact(timeline: Timeline, force: bool = False) -> CompactionResult:
    """Create image layers at disk_consistent_lsn where delta layers reach the threshold.

    `force` writes image layers for every partition regardless of the threshold.
    """
    with timeline.maintenance_lock:
        lsn = timeline.disk_consistent_lsn.value
        if lsn == 0:
            return CompactionResult((), 0)
        threshold = timeline.conf.image_creation_threshold
        full = KeyRange(KEY_MIN, KEY_MAX)
        if not force and timeline.layer_map.count_deltas(full, (Lsn(0), Lsn(lsn + 1))) < threshold:
            # No key anywhere has enough deltas stacked: skip listing every key of every
            # layer, which costs seconds per run on a busy timeline and finds nothing.
            return CompactionResult((), 0)
        keys = timeline.candidate_keys(full, lsn)
        parts = partition(keys, timeline.conf.image_layer_keys)
        created: list[LayerDesc] = []
        existing = set(timeline.layers())
        for key_range, part_keys in parts:
            if LayerDesc.image(key_range, Lsn(lsn)) in existing:
                continue
            stacked = timeline.layer_map.count_deltas(key_range, (Lsn(0), Lsn(lsn + 1)))
            if not force and stacked < threshold:
                continue
            created.append(_write_image_layer(timeline, key_range, part_keys, lsn))
        if created:
            log.info("compaction wrote %d image layers at %s (%d partitions)", len(created),
                     Lsn(lsn), len(parts))
        return CompactionResult(tuple(created), len(parts))


def _write_image_layer(timeline: Timeline, key_range: KeyRange, keys: list[Key],
                       lsn: int) -> LayerDesc:
    failpoint("compaction-before-write-image")
    writer = ImageLayerWriter(timeline.dir, key_range, Lsn(lsn))
    try:
        for i, key in enumerate(keys):
            value = timeline.materialize(key, lsn)
            if value is not None:
                writer.put(key, encode_value(Image(value)))
            if i == 0:
                failpoint("compaction-mid-image")
        desc = writer.finish()
    except FailpointHit:
        raise  # a simulated crash leaves the temp file behind, as a real one would
    except BaseException:
        writer.abort()
        raise
    failpoint("compaction-after-write-image")
    timeline.add_layer(desc)
    return desc
