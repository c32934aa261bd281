"""Relation-size semantics: the versioned size of a fork and the history of its cuts (D5).

The value of a fork's size key is a `SizeRecord`: the fork's size in blocks and its
*cuts*. A cut is an event (lsn, new_size) made by create (new_size 0), truncate
(new_size = the new length) or a re-create after a drop. Its meaning: versions of a
block b >= new_size written before lsn are dead. For block b the effective cut is the
newest event with new_size <= b; a read of b ignores every version older than it, so
a version from before a truncate is never served again, even after the fork grows
back sparsely (truncate to 0 at L1 then write block 5 at L2: blocks 0-4 read as zeros).

The list stays short: a new cut (L, n) dominates every older cut with new_size >= n
(for any block b >= that size, b >= n too, and L is newer), so those are dropped.
What remains is increasing in both lsn and new_size, and the effective cut of block
b is the last entry with new_size <= b.

Encoding (little-endian): nblocks u32, count u32, then count x (lsn u64, new_size u32).
A dropped fork is a Tombstone on its size key, not a SizeRecord.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strata.common.errors import CorruptionError

_HEAD = struct.Struct("<II")
_CUT = struct.Struct("<QI")


@dataclass(frozen=True, slots=True)
class SizeRecord:
    """Size of one fork in blocks, and its cut history ((lsn, new_size), both increasing)."""

    nblocks: int
    cuts: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        assert self.nblocks >= 0, self.nblocks
        for (l1, n1), (l2, n2) in zip(self.cuts, self.cuts[1:], strict=False):
            assert l1 < l2, self.cuts
            assert n1 < n2, self.cuts

    @classmethod
    def created(cls, lsn: int) -> SizeRecord:
        """A new, empty fork: every older version of every block is dead."""
        return cls(0, ((lsn, 0),))

    def extended(self, nblocks: int) -> SizeRecord:
        assert nblocks > self.nblocks, (nblocks, self.nblocks)
        return SizeRecord(nblocks, self.cuts)

    def truncated(self, lsn: int, nblocks: int) -> SizeRecord:
        """Truncate to `nblocks` at `lsn` (a no-op cut if it does not shrink the fork)."""
        if nblocks >= self.nblocks:
            return self
        assert not self.cuts or self.cuts[-1][0] <= lsn, (self.cuts, lsn)
        kept = tuple(c for c in self.cuts if c[1] < nblocks)
        if kept and kept[-1][0] == lsn:
            # A cut at this same LSN with a smaller size already covers these blocks.
            return SizeRecord(nblocks, kept)
        return SizeRecord(nblocks, kept + ((lsn, nblocks),))

    def cut_lsn(self, blkno: int) -> int:
        """The LSN below which versions of `blkno` are dead (0 if never cut)."""
        cut = 0
        for lsn, new_size in self.cuts:
            if new_size > blkno:
                break
            cut = lsn
        return cut

    def encode(self) -> bytes:
        parts = [_HEAD.pack(self.nblocks, len(self.cuts))]
        parts.extend(_CUT.pack(lsn, n) for lsn, n in self.cuts)
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> SizeRecord:
        if len(data) < _HEAD.size:
            raise CorruptionError(f"relation size value is {len(data)} bytes, too short")
        nblocks, count = _HEAD.unpack_from(data)
        if len(data) != _HEAD.size + count * _CUT.size:
            raise CorruptionError(f"relation size value is {len(data)} bytes, expected "
                                  f"{_HEAD.size + count * _CUT.size} for {count} cuts")
        cuts = tuple(_CUT.unpack_from(data, _HEAD.size + i * _CUT.size) for i in range(count))
        return cls(nblocks, cuts)
