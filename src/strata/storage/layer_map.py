"""Which layers answer key K at LSN L (and the range queries GC and compaction need).

Layers are grouped by their exact LSN range: one frozen in-memory layer is one
group, and one round of image creation at LSN L is one group with many key
ranges. Groups are kept sorted by LSN end; inside a group, layers are sorted by
key start and usually do not overlap, so finding the layer that holds a key is a
bisect. `search(key, end_lsn)` walks groups from the newest that can start below
`end_lsn` (found by bisect: a group ending at or beyond end_lsn + the largest LSN
span in the map cannot start below end_lsn) downwards, and stops at the first
group holding the key (checking the other groups with the same end for an image).
Updates are incremental (bisect.insort), so inserting a layer does not rebuild
the map.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from dataclasses import dataclass, field

from strata.common.lsn import Lsn
from strata.storage.key import Key, KeyRange
from strata.storage.layer_name import LayerDesc


def _sort_key(d: LayerDesc) -> tuple[bytes, bytes, bool]:
    # images (is_delta False) sort before deltas with the same key range
    return d.key_range.start.to_bytes(), d.key_range.end.to_bytes(), d.is_delta


@dataclass(slots=True)
class _Group:
    """Layers that share one LSN range, sorted by key start."""

    start: int
    end: int
    starts: list[bytes] = field(default_factory=list)
    ends: list[bytes] = field(default_factory=list)
    descs: list[LayerDesc] = field(default_factory=list)
    disjoint: bool = True  # no two key ranges overlap (conservative after removals)

    def add(self, desc: LayerDesc) -> None:
        k = _sort_key(desc)
        i = bisect_left([_sort_key(d) for d in self.descs], k) if not self.disjoint \
            else bisect_left(self.starts, k[0])
        if self.disjoint:
            before_overlaps = i > 0 and self.ends[i - 1] > k[0]
            after_overlaps = i < len(self.starts) and self.starts[i] < k[1]
            if before_overlaps or after_overlaps:
                self.disjoint = False
                i = bisect_left([_sort_key(d) for d in self.descs], k)
        self.starts.insert(i, k[0])
        self.ends.insert(i, k[1])
        self.descs.insert(i, desc)

    def remove(self, desc: LayerDesc) -> None:
        i = self.descs.index(desc)
        del self.starts[i], self.ends[i], self.descs[i]

    def find(self, key: bytes) -> LayerDesc | None:
        """The layer holding `key` (an image if both kinds do), or None."""
        i = bisect_right(self.starts, key) - 1
        if self.disjoint:
            return self.descs[i] if i >= 0 and key < self.ends[i] else None
        best: LayerDesc | None = None
        for j in range(i, -1, -1):
            if key < self.ends[j]:
                if not self.descs[j].is_delta:
                    return self.descs[j]
                best = best or self.descs[j]
        return best

    def overlapping(self, start: bytes, end: bytes) -> Iterator[LayerDesc]:
        hi = bisect_left(self.starts, end)
        lo = max(0, bisect_right(self.starts, start) - 1) if self.disjoint else 0
        for j in range(lo, hi):
            if self.ends[j] > start:
                yield self.descs[j]


class LayerMap:
    """The set of a timeline's layers, indexed for `search`. Not thread-safe: lock outside."""

    def __init__(self) -> None:
        self._layers: set[LayerDesc] = set()
        self._groups: dict[tuple[int, int], _Group] = {}
        self._order: list[tuple[int, int]] = []  # (end, start) of every group, ascending
        self._spans: dict[int, int] = {}  # LSN span -> number of groups with it
        self._max_span = 0

    def __len__(self) -> int:
        return len(self._layers)

    def __contains__(self, desc: LayerDesc) -> bool:
        return desc in self._layers

    def all(self) -> list[LayerDesc]:
        return sorted(self._layers)

    def insert(self, desc: LayerDesc) -> None:
        assert desc not in self._layers, desc
        self._layers.add(desc)
        start, end = desc.lsn_range[0].value, desc.lsn_range[1].value
        group = self._groups.get((start, end))
        if group is None:
            group = self._groups[(start, end)] = _Group(start, end)
            insort(self._order, (end, start))
            span = end - start
            self._spans[span] = self._spans.get(span, 0) + 1
            self._max_span = max(self._max_span, span)
        group.add(desc)

    def remove(self, desc: LayerDesc) -> None:
        assert desc in self._layers, desc
        self._layers.remove(desc)
        start, end = desc.lsn_range[0].value, desc.lsn_range[1].value
        group = self._groups[(start, end)]
        group.remove(desc)
        if not group.descs:
            del self._groups[(start, end)]
            del self._order[bisect_left(self._order, (end, start))]
            span = end - start
            self._spans[span] -= 1
            if self._spans[span] == 0:
                del self._spans[span]
                if span == self._max_span:
                    self._max_span = max(self._spans, default=0)

    # --- reads -------------------------------------------------------------------------
    def search(self, key: Key, end_lsn: Lsn) -> LayerDesc | None:
        """The layer holding the newest version of `key` below `end_lsn`.

        Among layers whose key range contains `key` and whose LSN range starts below
        end_lsn: the greatest LSN end, an image layer on ties.
        """
        kb = key.to_bytes()
        q = end_lsn.value
        # A group with end >= q + max_span has start >= q: it cannot qualify.
        i = bisect_left(self._order, (q + self._max_span, -1)) - 1
        best: LayerDesc | None = None
        while i >= 0:
            end, start = self._order[i]
            if best is not None and end < best.lsn_range[1].value:
                break
            i -= 1
            if start >= q:
                continue
            found = self._groups[(start, end)].find(kb)
            if found is None:
                continue
            if not found.is_delta:
                return found  # nothing older can beat it, nothing newer qualified
            best = best or found
        return best

    def _groups_overlapping(self, lsn_range: tuple[Lsn, Lsn]) -> Iterator[_Group]:
        """Groups whose LSN range overlaps lsn_range, newest end first."""
        lo, hi = lsn_range[0].value, lsn_range[1].value
        first = bisect_right(self._order, (lo, 1 << 64))  # groups ending after lo
        for end, start in reversed(self._order[first:]):
            if start < hi:
                yield self._groups[(start, end)]

    def layers_overlapping(self, key_range: KeyRange,
                           lsn_range: tuple[Lsn, Lsn]) -> list[LayerDesc]:
        """Layers whose key range and LSN range both overlap the given ones."""
        start, end = key_range.start.to_bytes(), key_range.end.to_bytes()
        out: list[LayerDesc] = []
        for group in self._groups_overlapping(lsn_range):
            out.extend(group.overlapping(start, end))
        return out

    def newest_image_at_or_below(self, key_range: KeyRange, lsn: Lsn) -> LayerDesc | None:
        """The image layer with the greatest LSN <= lsn whose key range overlaps key_range."""
        start, end = key_range.start.to_bytes(), key_range.end.to_bytes()
        for group in self._groups_overlapping((Lsn(0), lsn + 1)):
            if group.end != group.start + 1:
                continue
            for desc in group.overlapping(start, end):
                if not desc.is_delta:
                    return desc
        return None

    def count_deltas(self, key_range: KeyRange, lsn_range: tuple[Lsn, Lsn]) -> int:
        """The most delta layers stacked over any one key of key_range within lsn_range,
        counting only deltas that end above the newest image layer (in lsn_range) of that key.
        """
        layers = self.layers_overlapping(key_range, lsn_range)
        if not layers:
            return 0
        lo, hi = key_range.start.to_bytes(), key_range.end.to_bytes()
        # (start, end) clipped to key_range, as bytes; images first
        spans = sorted(((max(d.key_range.start.to_bytes(), lo), min(d.key_range.end.to_bytes(), hi),
                         d.is_delta, d.lsn_range[1].value) for d in layers),
                       key=lambda t: t[2])
        bounds = sorted({b for t in spans for b in t[:2]} | {lo, hi})
        most = 0
        for seg_start, seg_end in zip(bounds, bounds[1:], strict=False):
            image_end = 0
            stacked = 0
            for start, end, is_delta, lsn_end in spans:
                if start <= seg_start and seg_end <= end:
                    if not is_delta:
                        image_end = max(image_end, lsn_end)
                    elif lsn_end > image_end:
                        stacked += 1
            most = max(most, stacked)
        return most

    def check_invariants(self) -> None:
        """Costly cross-checks of the index against the set of layers (tests)."""
        assert sorted(self._order) == self._order
        assert {(s, e) for e, s in self._order} == set(self._groups), self._order
        assert sum(len(g.descs) for g in self._groups.values()) == len(self._layers)
        for (start, end), g in self._groups.items():
            assert g.descs, (start, end)
            assert g.starts == sorted(g.starts), g.starts
            for d in g.descs:
                assert d in self._layers, d
                assert (d.lsn_range[0].value, d.lsn_range[1].value) == (start, end), d
            if g.disjoint:
                for a, b in zip(g.ends, g.starts[1:], strict=False):
                    assert a <= b, (a.hex(), b.hex())
        spans = [e - s for e, s in self._order]
        assert self._max_span == max(spans, default=0), (self._max_span, spans)
