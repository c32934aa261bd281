"""Image layer files: one complete value for every stored key of a key range at one LSN.

The bytes are the common layer format (layer_file.py, docs/layer-format.md) with
kind = image; every entry has the layer's LSN and an image value. A key absent
from an image layer does not exist at that LSN (the layer covers its whole range).
"""

from __future__ import annotations

from pathlib import Path

from strata.common.errors import CorruptionError
from strata.common.lsn import Lsn
from strata.storage.key import Key, KeyRange
from strata.storage.layer_file import KIND_IMAGE, LayerFileReader, LayerFileWriter
from strata.storage.layer_name import LayerDesc
from strata.storage.value import IMAGE_TAGS


class ImageLayerWriter(LayerFileWriter):
    """`put` image values in strictly increasing key order, then `finish` (or `abort`)."""

    def __init__(self, directory: Path, key_range: KeyRange, lsn: Lsn) -> None:
        super().__init__(directory, LayerDesc.image(key_range, lsn), KIND_IMAGE)
        self.lsn = lsn

    def put(self, key: Key, value: bytes) -> None:
        assert value and value[0] in IMAGE_TAGS, ("image layers hold images only", key,
                                                  value[:1].hex())
        self.put_raw(key.to_bytes(), self.lsn.value, value)


class ImageLayer(LayerFileReader):
    """An image layer reader; safe to share between threads."""

    @classmethod
    def open(cls, path: Path) -> ImageLayer:
        layer = cls(path)
        if layer.kind != KIND_IMAGE:
            layer.close()
            raise CorruptionError(f"expected an image layer, found kind {layer.kind}",
                                  path=str(path), offset=10)
        return layer

    @property
    def lsn(self) -> Lsn:
        return self.desc.image_lsn

    def get(self, key: Key) -> bytes | None:
        """The key's value at the layer's LSN, or None if the layer does not hold it."""
        versions = self.get_versions_raw(key.to_bytes(), self.lsn.value + 1)
        return versions[0][1] if versions else None
