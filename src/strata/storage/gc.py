"""Garbage collection: advance a timeline's GC cutoff and delete layer files no retained read needs.

cutoff = min(last_record_lsn - gc_horizon, disk_consistent_lsn, the LSN at now -
pitr_interval (from the LSN-time index), the branch point of every descendant that
reads this timeline, every live LSN lease of this timeline or of such a descendant
below its branch point). The cutoff never moves back. It is persisted in the metadata
before any file is deleted, so after a crash reads below it stay refused.

A layer is removable when every read at or above the cutoff stops before reaching it:
image layers at or below the cutoff, each ending at or after the layer's end, cover
its whole key range. Reads stop at the first image layer holding the key's range
(timeline._versions), and no delta layer straddles an image layer's LSN (image layers
are written at disk_consistent_lsn, where every delta layer ends).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from strata.common.errors import NotFound
from strata.common.failpoint import failpoint
from strata.common.lsn import Lsn
from strata.storage.key import KeyRange
from strata.storage.layer_name import LayerDesc
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GcResult:
    cutoff: Lsn
    removed: tuple[LayerDesc, ...]
    expired_leases: int


def retention_points(timeline: Timeline, now: float) -> list[int]:
    """LSNs of this timeline that descendants or leases still read (see module doc)."""
    points = [lease.lsn.value for lease in timeline.leases.live(now)]
    for child in timeline.children:
        branch = child.ancestor_lsn.value
        points.append(branch)
        points.extend(p for p in retention_points(child, now) if p <= branch)
    return points


def compute_cutoff(timeline: Timeline, now: float) -> int:
    conf = timeline.conf
    last = timeline.last_record_lsn.value
    # Never above disk_consistent_lsn: after a restart the timeline resumes there and
    # must be able to serve (and branch at) its own last_record_lsn.
    candidates = [max(0, last - conf.gc_horizon), timeline.disk_consistent_lsn.value]
    if conf.pitr_interval_s > 0:
        ts_us = int((now - conf.pitr_interval_s) * 1_000_000)
        try:
            candidates.append(timeline.find_lsn_for_timestamp(ts_us).value)
        except NotFound:
            candidates.append(0)  # all known history is inside the window: keep it
    candidates.extend(retention_points(timeline, now))
    return max(timeline.gc_cutoff.value, min(candidates))


def _covered(target: KeyRange, ranges: list[KeyRange]) -> bool:
    pos = target.start
    for r in sorted(ranges, key=lambda r: r.start):
        if r.start > pos:
            return False
        if r.end > pos:
            pos = r.end
        if pos >= target.end:
            return True
    return pos >= target.end


def removable_layers(layers: list[LayerDesc], cutoff: int) -> list[LayerDesc]:
    images = [d for d in layers if not d.is_delta and d.lsn_range[0].value <= cutoff]
    out = []
    for desc in layers:
        end = desc.lsn_range[1].value
        if end > cutoff + 1:
            continue
        covering = [img.key_range for img in images
                    if img is not desc and img != desc and img.lsn_range[1].value >= end
                    and img.key_range.overlaps(desc.key_range)
                    and (desc.is_delta or img.lsn_range[1].value > end)]
        if _covered(desc.key_range, covering):
            out.append(desc)
    return out


def gc_timeline(timeline: Timeline, now: float) -> GcResult:
    """Advance the cutoff of one timeline and delete the layers nothing needs."""
    with timeline.maintenance_lock:
        expired = timeline.leases.drop_expired(now)
        for lease in expired:
            log.info("lease on %s expired at %.0f", lease.lsn, lease.expires_at)
        cutoff = compute_cutoff(timeline, now)
        if cutoff > timeline.gc_cutoff.value:
            timeline.set_gc_cutoff(Lsn(cutoff))
        removed = removable_layers(timeline.layers(), timeline.gc_cutoff.value)
        for desc in removed:
            failpoint("gc-before-remove-layer")
            timeline.remove_layer(desc)
        if removed:
            log.info("gc removed %d layers below cutoff %s", len(removed), Lsn(cutoff))
        return GcResult(Lsn(cutoff), tuple(removed), len(expired))
