"""Layer descriptors and the layer file names that carry them.

A layer file's name says what it holds, so a directory listing is enough to
rebuild the layer map after a restart:

    delta:  <key start, 36 hex>-<key end, 36 hex>__<lsn start, 16 hex>-<lsn end, 16 hex>.delta
    image:  <key start, 36 hex>-<key end, 36 hex>__<lsn, 16 hex>.image

Hex digits are upper case. Key ranges are half-open [start, end); LSN ranges are
[start, end), and an image layer at LSN L has the range (L, L+1). A file being
written has the final name plus `.<random>.tmp`; `parse_file_name` rejects such
names (and anything else that is not exactly one of the forms above), so a
half-written file is never mistaken for a layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from strata.common.errors import UserError
from strata.common.lsn import Lsn
from strata.storage.key import Key, KeyRange

TEMP_SUFFIX = ".tmp"
DELTA_SUFFIX = ".delta"
IMAGE_SUFFIX = ".image"

_KEY_HEX = "[0-9A-F]{36}"
_LSN_HEX = "[0-9A-F]{16}"
_DELTA_RE = re.compile(rf"({_KEY_HEX})-({_KEY_HEX})__({_LSN_HEX})-({_LSN_HEX})\.delta")
_IMAGE_RE = re.compile(rf"({_KEY_HEX})-({_KEY_HEX})__({_LSN_HEX})\.image")


@dataclass(frozen=True, slots=True, order=True)
class LayerDesc:
    """What a layer file holds: a key range and an LSN range [start, end)."""

    key_range: KeyRange
    lsn_range: tuple[Lsn, Lsn]
    is_delta: bool
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        start, end = self.lsn_range
        assert start < end, (start, end)
        assert self.is_delta or end.value == start.value + 1, ("image layer", start, end)
        # Descriptors key the readers dict on every get: hash once, not per lookup.
        object.__setattr__(self, "_hash", hash((self.key_range, self.lsn_range, self.is_delta)))

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def image(cls, key_range: KeyRange, lsn: Lsn) -> LayerDesc:
        return cls(key_range, (lsn, lsn + 1), is_delta=False)

    @classmethod
    def delta(cls, key_range: KeyRange, start_lsn: Lsn, end_lsn: Lsn) -> LayerDesc:
        return cls(key_range, (start_lsn, end_lsn), is_delta=True)

    @property
    def start_lsn(self) -> Lsn:
        return self.lsn_range[0]

    @property
    def end_lsn(self) -> Lsn:
        return self.lsn_range[1]

    @property
    def image_lsn(self) -> Lsn:
        """The LSN an image layer's values are as of."""
        assert not self.is_delta, self
        return self.lsn_range[0]

    def file_name(self) -> str:
        keys = f"{self.key_range.start.hex()}-{self.key_range.end.hex()}"
        start, end = self.lsn_range
        if self.is_delta:
            return f"{keys}__{start.value:016X}-{end.value:016X}{DELTA_SUFFIX}"
        return f"{keys}__{start.value:016X}{IMAGE_SUFFIX}"

    @classmethod
    def parse_file_name(cls, name: str) -> LayerDesc:
        """The descriptor of a layer file name; UserError for anything else (temp files)."""
        m = _DELTA_RE.fullmatch(name)
        if m is not None:
            start, end = Lsn(int(m.group(3), 16)), Lsn(int(m.group(4), 16))
            if end <= start:
                raise UserError(f"layer file name {name!r} has an empty LSN range")
            return cls(_key_range(m.group(1), m.group(2)), (start, end), is_delta=True)
        m = _IMAGE_RE.fullmatch(name)
        if m is not None:
            lsn = Lsn(int(m.group(3), 16))
            if lsn.value == (1 << 64) - 1:
                raise UserError(f"layer file name {name!r} has an image LSN with no successor")
            return cls(_key_range(m.group(1), m.group(2)), (lsn, lsn + 1), is_delta=False)
        raise UserError(f"{name!r} is not a layer file name (temp files end in "
                        f"{TEMP_SUFFIX!r} and are removed at load)")

    def __str__(self) -> str:
        return self.file_name()


def is_layer_file_name(name: str) -> bool:
    return _DELTA_RE.fullmatch(name) is not None or _IMAGE_RE.fullmatch(name) is not None


def is_temp_file_name(name: str) -> bool:
    """A half-written layer file (safe to delete at load)."""
    return name.endswith(TEMP_SUFFIX)


def _key_range(start_hex: str, end_hex: str) -> KeyRange:
    start = Key.from_bytes(bytes.fromhex(start_hex))
    end = Key.from_bytes(bytes.fromhex(end_hex))
    if end < start:
        raise UserError(f"layer file name has key range end {end_hex} before start {start_hex}")
    return KeyRange(start, end)
