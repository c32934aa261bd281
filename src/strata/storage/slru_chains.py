"""What a timeline's `put` remembers of each SLRU page it wrote since the load.

SLRU pages (pg_xact: one delta per commit) get a full image every `SLRU_IMAGE_DELTAS`
deltas (`Timeline.put`). For that it needs, per page, how many deltas followed the
page's last image, and to build the next image without a read, that image and those
deltas. `SlruChains` keeps both in one place: for the `kept` pages imaged last, the
image and the deltas since (their count is the length of that list); for the other
pages put since the load, only the count. A page put by no one since the load (or
since a branch) has no entry: its chain below is of unknown length.
"""

from __future__ import annotations

from strata.storage.key import Key
from strata.storage.value import Image, Patch, Value


class SlruChains:
    """Per SLRU page: the deltas since its last image (and, for the pages imaged last,
    that image and the deltas themselves). One writer (ingest)."""

    def __init__(self, kept: int) -> None:
        assert kept > 0, kept
        self._kept = kept
        # The pages imaged last, oldest first: their image and the deltas put since.
        self._chains: dict[Key, tuple[bytes, list[Patch]]] = {}
        # The other pages put since the load: how many deltas followed their last image.
        self._counts: dict[Key, int] = {}

    def deltas(self, key: Key) -> int | None:
        """How many deltas of `key` were put since its last image; None if unknown."""
        chain = self._chains.get(key)
        if chain is not None:
            return len(chain[1])
        return self._counts.get(key)

    def page(self, key: Key) -> bytearray | None:
        """The page's value after the last put (its image with the deltas since
        applied), if kept: the same bytes a read would reconstruct from them."""
        chain = self._chains.get(key)
        if chain is None:
            return None
        page = bytearray(chain[0])
        for delta in chain[1]:
            delta.apply(page)
        return page

    def is_kept(self, key: Key) -> bool:
        return key in self._chains

    def stored(self, key: Key, value: Value) -> None:
        """`value` was stored for `key`; a delta only where `deltas(key)` is known."""
        chains = self._chains
        if isinstance(value, Patch):
            chain = chains.get(key)
            if chain is not None:
                chain[1].append(value)
            else:
                count = self._counts.get(key)
                assert count is not None, f"a delta of {key} stored with no count known"
                self._counts[key] = count + 1
            return
        chains.pop(key, None)
        if not isinstance(value, Image):
            self._counts[key] = 0  # a tombstone: an image too, nothing to build from
            return
        self._counts.pop(key, None)
        if len(chains) >= self._kept:
            # Forget the image and deltas of the page imaged longest ago; keep its count.
            oldest = next(iter(chains))
            self._counts[oldest] = len(chains.pop(oldest)[1])
        chains[key] = (value.data, [])
