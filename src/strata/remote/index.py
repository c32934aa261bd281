"""The remote index of one timeline (`index_part.json-<generation>`) and the object names.

Object names under a storage root:

    tenants/<tenant_id>/timelines/<timeline_id>/<layer file name>-<generation, 8 hex>
    tenants/<tenant_id>/timelines/<timeline_id>/index_part.json-<generation, 8 hex>

Every object a pageserver writes carries the generation of its attachment, so a
pageserver attached with an older generation never overwrites what a newer one wrote.
An index names each layer with the generation it was uploaded in (layers inherited from
an earlier attachment keep their old names).

The index (JSON, version 1) holds the timeline's metadata fields and its layers with
size and CRC-32C; it is uploaded only after every layer it names, so it never names a
missing object. Its `disk_consistent_lsn` is the timeline's `remote_consistent_lsn`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from strata.common.errors import CorruptionError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.storage.layer_name import LayerDesc
from strata.storage.metadata import TimelineMetadata

INDEX_NAME = "index_part.json"
INDEX_VERSION = 1
_GEN_RE = re.compile(r"-([0-9a-f]{8})$")


def timeline_prefix(tenant_id: TenantId, timeline_id: TimelineId | None = None) -> str:
    base = f"tenants/{tenant_id}/timelines/"
    return base if timeline_id is None else f"{base}{timeline_id}/"


def with_generation(name: str, generation: int) -> str:
    assert 0 < generation < 2**32, generation
    return f"{name}-{generation:08x}"


def split_generation(object_name: str) -> tuple[str, int] | None:
    """`name-0000000a` -> ("name", 10); None if there is no generation suffix."""
    match = _GEN_RE.search(object_name)
    if match is None:
        return None
    return object_name[:match.start()], int(match.group(1), 16)


@dataclass(frozen=True, slots=True)
class RemoteLayer:
    """One layer as the index names it."""

    size: int
    crc32c: int
    generation: int
    index_offset: int = 0
    """Where the layer file's index blocks start (its header says so too): a ranged
    reader fetches the header and the index in parallel. 0: not recorded (an index
    written before it was), the reader reads the header first."""

    def object_name(self, file_name: str) -> str:
        return with_generation(file_name, self.generation)


@dataclass(frozen=True, slots=True)
class IndexPart:
    """What one uploaded index says about a timeline."""

    generation: int
    metadata: TimelineMetadata
    layers: dict[str, RemoteLayer]

    @property
    def disk_consistent_lsn(self) -> Lsn:
        return self.metadata.disk_consistent_lsn

    def layer_descs(self) -> list[LayerDesc]:
        return [LayerDesc.parse_file_name(name) for name in sorted(self.layers)]

    def encode(self) -> bytes:
        meta = self.metadata
        doc: dict[str, Any] = {
            "version": INDEX_VERSION,
            "generation": self.generation,
            "disk_consistent_lsn": str(meta.disk_consistent_lsn),
            "prev_record_lsn": str(meta.prev_record_lsn),
            "ancestor_timeline": str(meta.ancestor_timeline)
            if meta.ancestor_timeline is not None else None,
            "ancestor_lsn": str(meta.ancestor_lsn),
            "latest_gc_cutoff": str(meta.latest_gc_cutoff),
            "initdb_lsn": str(meta.initdb_lsn),
            "pg_version": meta.pg_version,
            "layers": {name: {"size": layer.size, "crc32c": f"{layer.crc32c:08x}",
                              "generation": layer.generation}
                       | ({"index_offset": layer.index_offset} if layer.index_offset else {})
                       for name, layer in sorted(self.layers.items())},
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def decode(cls, data: bytes, where: str) -> IndexPart:
        try:
            doc = json.loads(data)
            if doc["version"] != INDEX_VERSION:
                raise CorruptionError(f"remote index version {doc['version']} is not "
                                      f"{INDEX_VERSION}; upgrade Strata", path=where)
            ancestor = doc["ancestor_timeline"]
            meta = TimelineMetadata(
                disk_consistent_lsn=Lsn.parse(doc["disk_consistent_lsn"]),
                prev_record_lsn=Lsn.parse(doc["prev_record_lsn"]),
                ancestor_timeline=TimelineId(TimelineId.parse(ancestor).raw)
                if ancestor is not None else None,
                ancestor_lsn=Lsn.parse(doc["ancestor_lsn"]),
                latest_gc_cutoff=Lsn.parse(doc["latest_gc_cutoff"]),
                initdb_lsn=Lsn.parse(doc["initdb_lsn"]),
                pg_version=int(doc["pg_version"]))
            layers = {}
            for name, entry in doc["layers"].items():
                LayerDesc.parse_file_name(name)  # refuses anything that is not a layer
                layers[name] = RemoteLayer(int(entry["size"]), int(entry["crc32c"], 16),
                                           int(entry["generation"]),
                                           int(entry.get("index_offset", 0)))
            return cls(int(doc["generation"]), meta, layers)
        except CorruptionError:
            raise
        except (ValueError, KeyError, TypeError, AssertionError, UserError) as err:
            raise CorruptionError(f"remote index is malformed: {err!r}", path=where) from err
