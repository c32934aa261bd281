"""Delta layer files: every version of the keys of a key range over an LSN range.

The bytes are the common layer format (layer_file.py, docs/layer-format.md) with
kind = delta. Values are stored in (key, lsn) order, so one key's versions are
adjacent and a lookup reads them with one pread.
"""

from __future__ import annotations

from pathlib import Path

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.storage.key import Key, KeyRange
from strata.storage.layer_file import KIND_DELTA, LayerFileReader, LayerFileWriter
from strata.storage.layer_name import LayerDesc


class DeltaLayerWriter(LayerFileWriter):
    """`put` values strictly in (key, lsn) order, then `finish` (or `abort`)."""

    def __init__(self, directory: Path, key_range: KeyRange, lsn_range: tuple[Lsn, Lsn]) -> None:
        super().__init__(directory, LayerDesc.delta(key_range, *lsn_range), KIND_DELTA)

    def put(self, key: Key, lsn: Lsn, value: bytes) -> None:
        self.put_raw(key.to_bytes(), lsn.value, value)


class DeltaLayer(LayerFileReader):
    """A delta layer reader; safe to share between threads."""

    @classmethod
    def open(cls, path: Path) -> DeltaLayer:
        layer = cls(path)
        if layer.kind != KIND_DELTA:
            layer.close()
            raise CorruptionError(f"expected a delta layer, found kind {layer.kind}",
                                  path=str(path), offset=10)
        return layer
