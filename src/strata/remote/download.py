"""Downloads from remote storage: a tenant's indexes, its timelines' metadata, one layer.

A layer is checked twice: the object's own CRC-32C (storage.get), and the size and
CRC-32C the index recorded at upload, so an object replaced under the same name is
refused too. Files are written temp + fsync + rename, so a crash never leaves a partial
layer under a layer name.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from strata.common.durable import fsync_dir
from strata.common.errors import CorruptionError
from strata.common.ids import TenantId, TimelineId
from strata.pg.crc import crc32c
from strata.remote.index import IndexPart, RemoteLayer, timeline_prefix
from strata.remote.storage import RemoteStorage
from strata.remote.timeline_client import latest_index
from strata.storage.metadata import METADATA_FILE, encode_metadata

log = logging.getLogger(__name__)


def remote_timelines(storage: RemoteStorage, tenant_id: TenantId) -> list[TimelineId]:
    prefix = timeline_prefix(tenant_id)
    ids = set()
    for key in storage.list_keys(prefix):
        first = key[len(prefix):].split("/", 1)[0]
        try:
            ids.add(TimelineId(TimelineId.parse(first).raw))
        except Exception:  # noqa: BLE001 - a foreign object under the prefix is skipped
            log.info("ignoring remote object %s: not under a timeline id", key)
    return sorted(ids)


def remote_tenant_indexes(storage: RemoteStorage, tenant_id: TenantId,
                          max_generation: int) -> dict[TimelineId, IndexPart]:
    """The latest index (generation <= max_generation) of every remote timeline."""
    out = {}
    for timeline_id in remote_timelines(storage, tenant_id):
        index = latest_index(storage, tenant_id, timeline_id, max_generation)
        if index is not None:
            out[timeline_id] = index
    return out


def download_layer(storage: RemoteStorage, tenant_id: TenantId, timeline_id: TimelineId,
                   name: str, layer: RemoteLayer, timeline_dir: Path) -> int:
    """Fetch one layer into `timeline_dir`; returns its size."""
    key = timeline_prefix(tenant_id, timeline_id) + layer.object_name(name)
    data = storage.get(key)
    if len(data) != layer.size or crc32c(data) != layer.crc32c:
        raise CorruptionError(f"remote layer {key} is {len(data)} bytes with CRC-32C "
                              f"{crc32c(data):08x}, but the index recorded {layer.size} "
                              f"bytes and {layer.crc32c:08x}; the object was replaced or "
                              "damaged", path=key)
    final = timeline_dir / name
    temp = timeline_dir / f"{name}.download.tmp"
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, final)
    return len(data)


def write_timelines(indexes: dict[TimelineId, IndexPart], tenant_dir: Path) -> None:
    """Write the metadata of every timeline of `indexes` under `tenant_dir`. Layers are
    not downloaded: reads fetch them on demand (Timeline._fetch)."""
    for timeline_id, index in sorted(indexes.items()):
        tl_dir = tenant_dir / "timelines" / str(timeline_id)
        tl_dir.mkdir(parents=True)
        path = tl_dir / METADATA_FILE
        with open(path, "wb") as f:
            f.write(encode_metadata(index.metadata))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tl_dir)
        log.info("attached timeline %s from its index of generation %d: %d layers (%d "
                 "bytes) remote, disk_consistent_lsn %s", timeline_id, index.generation,
                 len(index.layers), sum(layer.size for layer in index.layers.values()),
                 index.disk_consistent_lsn)
