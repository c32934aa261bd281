"""`Lsn`: a PostgreSQL WAL position, with parsing, formatting and segment/page math.

An LSN is not an int: `Lsn + int` is an `Lsn`, `Lsn - Lsn` is a byte count, and
`Lsn + Lsn` is a type error. In measured hot loops (WAL decoding) code uses plain
ints and wraps them at the edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

from strata.common.errors import UserError
from strata.pg.constants import SIZE_OF_XLOG_LONG_PHD, SIZE_OF_XLOG_SHORT_PHD, XLOG_BLCKSZ

DEFAULT_WAL_SEGMENT_SIZE = 16 * 1024 * 1024
_U64_MAX = (1 << 64) - 1


def check_segment_size(seg_size: int) -> None:
    """PostgreSQL allows powers of two from 1 MB to 1 GB (xlog_internal.h)."""
    if seg_size < (1 << 20) or seg_size > (1 << 30) or seg_size & (seg_size - 1):
        raise UserError(f"invalid WAL segment size {seg_size}: must be a power of two, 1MB..1GB")


@dataclass(frozen=True, slots=True, order=True)
class Lsn:
    """A 64-bit WAL position; prints as `0/16B3740`."""

    value: int

    def __post_init__(self) -> None:
        assert isinstance(self.value, int), self.value
        assert 0 <= self.value <= _U64_MAX, self.value

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse `X/Y` (hex halves), as PostgreSQL prints LSNs."""
        hi, sep, lo = text.strip().partition("/")
        try:
            if not sep or not hi or not lo or len(hi) > 8 or len(lo) > 8:
                raise ValueError(text)
            return cls((int(hi, 16) << 32) | int(lo, 16))
        except ValueError as err:
            raise UserError(f"invalid LSN {text!r}: expected hex X/Y such as 0/16B3740") from err

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn({self})"

    def __add__(self, other: int) -> Lsn:
        if not isinstance(other, int) or isinstance(other, bool):
            return NotImplemented
        return Lsn(self.value + other)

    @overload
    def __sub__(self, other: Lsn) -> int: ...
    @overload
    def __sub__(self, other: int) -> Lsn: ...
    def __sub__(self, other: Lsn | int) -> int | Lsn:
        if isinstance(other, Lsn):
            return self.value - other.value
        if isinstance(other, int) and not isinstance(other, bool):
            return Lsn(self.value - other)
        return NotImplemented

    def __bool__(self) -> bool:
        return self.value != 0

    # --- segment and page math -------------------------------------------
    def segno(self, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
        return self.value // seg_size

    def segment_offset(self, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> int:
        return self.value % seg_size

    def page_offset(self) -> int:
        """Offset within the 8 KB WAL page."""
        return self.value % XLOG_BLCKSZ

    def page_start(self) -> Lsn:
        return Lsn(self.value - self.value % XLOG_BLCKSZ)

    def segment_start(self, seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> Lsn:
        return Lsn(self.value - self.value % seg_size)

    def align(self, alignment: int = 8) -> Lsn:
        """Round up to a multiple of `alignment` (MAXALIGN is 8)."""
        return Lsn((self.value + alignment - 1) // alignment * alignment)

    def is_aligned(self, alignment: int = 8) -> bool:
        return self.value % alignment == 0

    def segment_file_name(self, timeline: int = 1,
                          seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> str:
        return segment_file_name(self.segno(seg_size), timeline, seg_size)


def page_header_size(lsn: int, seg_size: int) -> int:
    """Size of the header of the WAL page holding `lsn`: long on a segment's first page,
    short on every other (xlog_internal.h)."""
    return SIZE_OF_XLOG_LONG_PHD if lsn % seg_size < XLOG_BLCKSZ else SIZE_OF_XLOG_SHORT_PHD


def segment_file_name(segno: int, timeline: int = 1,
                      seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> str:
    """`%08X%08X%08X` of (tli, segno / segs-per-xlogid, segno % segs-per-xlogid)."""
    per_id = 0x1_0000_0000 // seg_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"


def parse_segment_file_name(name: str,
                            seg_size: int = DEFAULT_WAL_SEGMENT_SIZE) -> tuple[int, int]:
    """Return (timeline, segno) of a WAL segment file name."""
    if len(name) != 24:
        raise UserError(f"{name!r} is not a WAL segment file name (24 hex digits)")
    try:
        tli, log_id, seg = int(name[:8], 16), int(name[8:16], 16), int(name[16:], 16)
    except ValueError as err:
        raise UserError(f"{name!r} is not a WAL segment file name (24 hex digits)") from err
    per_id = 0x1_0000_0000 // seg_size
    return tli, log_id * per_id + seg


INVALID_LSN = Lsn(0)
