"""Uploads of one timeline to remote storage: layers, then an index naming them, then deletions.

The timeline reports what changed on disk (`layer_added`, `metadata_saved`,
`layer_removed`, all cheap and non-blocking); a worker thread of this client turns them
into storage operations, strictly in the order they were reported:

- `UploadLayer`: the layer file, under its name plus this attachment's generation;
- `UploadIndex(meta)`: an index with `meta` and every layer uploaded so far that has
  not been removed. Queued after the layer uploads it depends on, so an index never
  names a missing object. On success `remote_consistent_lsn` = `meta.disk_consistent_lsn`;
- `DeleteRemoved`: an index without the layers removed so far, then (only once that
  index is durable) the generation check, then deletion of their objects. Skipped when
  the tenant's generation marker or an index names a newer generation: a pageserver
  attached by mistake with a stale generation never deletes what the newer attachment
  may rely on (remote/generations.py).

Once the attachment is known to be stale (that check, or `mark_stale` from the
pageserver's periodic marker check) the client stops: queued and later operations are
dropped (a newer generation owns the tenant's objects now), layers are no longer
evictable (a read could not trust their objects to stay), downloads and ranged reads
go on.

A failed operation (after RetryingStorage's own retries) is logged once as a warning
and retried until it succeeds or the client stops: an upload is never dropped.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strata.common.errors import NotFound, StrataError
from strata.common.failpoint import failpoint
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import timeline_context
from strata.common.lsn import Lsn
from strata.pg.crc import crc32c
from strata.remote.generations import deletion_verdict, read_generation
from strata.remote.index import (
    INDEX_NAME,
    IndexPart,
    RemoteLayer,
    split_generation,
    timeline_prefix,
    with_generation,
)
from strata.remote.storage import RemoteStorage
from strata.storage.layer_file import RangedLayerReader, index_offset
from strata.storage.layer_name import LayerDesc
from strata.storage.metadata import TimelineMetadata

log = logging.getLogger(__name__)

RETRY_PAUSE_S = 2.0
RANGED_READS_BEFORE_DOWNLOAD = 1
DOWNLOAD_WAIT_S = 0.5
CONCURRENT_DOWNLOADS = 4  # whole-layer downloads of one timeline at once
# Whole-layer download speed assumed until one was measured (loopback SeaweedFS on a
# loaded 2-core machine: 20-250 MB/s).
INITIAL_DOWNLOAD_BYTES_PER_S = 50e6


@dataclass(slots=True)
class RemoteReadStats:
    """What reads of layers not on local disk fetched, since the client started."""

    ranged_gets: int = 0
    ranged_bytes: int = 0
    ranged_opens: int = 0  # layers opened for ranged reads (their index fetched)
    layer_downloads: int = 0  # whole layers downloaded
    layer_download_bytes: int = 0


@dataclass(frozen=True, slots=True)
class UploadLayer:
    desc: LayerDesc


@dataclass(frozen=True, slots=True)
class UploadIndex:
    meta: TimelineMetadata


@dataclass(frozen=True, slots=True)
class DeleteRemoved:
    pass


Op = UploadLayer | UploadIndex | DeleteRemoved


def latest_index(storage: RemoteStorage, tenant_id: TenantId, timeline_id: TimelineId,
                 max_generation: int | None = None) -> IndexPart | None:
    """The index of the highest generation (at most `max_generation`), or None."""
    prefix = timeline_prefix(tenant_id, timeline_id) + INDEX_NAME + "-"
    best: tuple[int, str] | None = None
    for key in storage.list_keys(prefix):
        split = split_generation(key)
        if split is None or split[0] != prefix[:-1]:
            continue
        gen = split[1]
        if max_generation is not None and gen > max_generation:
            continue
        if best is None or gen > best[0]:
            best = (gen, key)
    if best is None:
        return None
    return IndexPart.decode(storage.get(best[1]), best[1])


def newest_generation(storage: RemoteStorage, tenant_id: TenantId,
                      timeline_id: TimelineId) -> int:
    """The highest generation any index of the timeline was written with (0: none)."""
    prefix = timeline_prefix(tenant_id, timeline_id) + INDEX_NAME + "-"
    gens = [s[1] for s in map(split_generation, storage.list_keys(prefix)) if s is not None]
    return max(gens, default=0)


def stale_message(own: int, newer: int, where: str) -> str:
    return (f"generation {own} of this attachment is stale (the {where} names generation "
            f"{newer}): uploads and remote deletions stopped, reads are served from what "
            "this pageserver has; detach the tenant here")


class RemoteTimelineClient:
    """The upload queue of one timeline (see module doc). Thread-safe."""

    def __init__(self, storage: RemoteStorage, tenant_id: TenantId, timeline_id: TimelineId,
                 generation: int, timeline_dir: Path, *,
                 retry_pause_s: float = RETRY_PAUSE_S,
                 ranged_reads_before_download: int = RANGED_READS_BEFORE_DOWNLOAD,
                 download_wait_s: float = DOWNLOAD_WAIT_S,
                 concurrent_downloads: int = CONCURRENT_DOWNLOADS,
                 on_stale: Callable[[int, str], None] | None = None) -> None:
        assert generation >= 1, generation
        assert ranged_reads_before_download >= 0, ranged_reads_before_download
        self.retry_pause_s = retry_pause_s
        # A read of a layer not on local disk fetches only what it needs by ranged
        # reads; after this many such reads of one layer the whole layer is downloaded in
        # the background. 0: every such read downloads the whole layer first.
        self.ranged_reads_before_download = ranged_reads_before_download
        # A read of a layer whose whole download runs waits for it if it should be done
        # within this many seconds (by the measured download speed), not a ranged GET.
        self.download_wait_s = download_wait_s
        # At most this many whole-layer downloads of the timeline run at once (the
        # timeline bounds them, storage/timeline.py).
        assert concurrent_downloads >= 1, concurrent_downloads
        self.concurrent_downloads = concurrent_downloads
        self.download_bytes_per_s = INITIAL_DOWNLOAD_BYTES_PER_S  # moving average
        self.read_stats = RemoteReadStats()
        self._stats_lock = threading.Lock()
        self.storage = storage
        self.tenant_id = tenant_id
        self.timeline_id = timeline_id
        self.generation = generation
        self.dir = timeline_dir
        self.prefix = timeline_prefix(tenant_id, timeline_id)
        self._uploaded: dict[str, RemoteLayer] = {}  # named by the next index
        self._removed: set[str] = set()  # removed locally, still named remotely
        self._indexed: set[str] = set()  # named by the last index uploaded
        self._queue: collections.deque[Op] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._remote_consistent: Lsn | None = None
        self._thread: threading.Thread | None = None
        self._last_meta: TimelineMetadata | None = None  # of the last index uploaded
        self.stale = False  # a newer generation exists: uploads and deletions are off
        # Told (newer generation, where it was found) when this client finds itself
        # stale; without it the client logs the warning itself.
        self.on_stale = on_stale

    # --- state ---------------------------------------------------------------------
    @property
    def remote_consistent_lsn(self) -> Lsn | None:
        return self._remote_consistent

    def remote_layers(self) -> dict[str, RemoteLayer]:
        with self._cond:
            return dict(self._uploaded)

    def remote_size_bytes(self) -> int:
        with self._cond:
            return sum(layer.size for layer in self._uploaded.values())

    # --- start and stop ------------------------------------------------------------------
    def start(self, meta: TimelineMetadata, local_layers: list[LayerDesc],
              remote: IndexPart | None) -> None:
        """Resume from `remote` (the latest index, if any): upload the local layers it
        lacks and an index of the local state, then delete what it named and the local
        state no longer has."""
        local = {desc.file_name(): desc for desc in local_layers}
        with self._cond:
            if remote is not None:
                self._uploaded = dict(remote.layers)
                self._indexed = set(remote.layers)
                self._remote_consistent = remote.disk_consistent_lsn \
                    if remote.disk_consistent_lsn <= meta.disk_consistent_lsn else None
            for name in sorted(set(self._uploaded) - set(local)):
                self._removed.add(name)
            for name, desc in sorted(local.items()):
                known = self._uploaded.get(name)
                try:
                    size = (self.dir / name).stat().st_size
                except FileNotFoundError:
                    # Only in remote storage (downloaded on demand), or lost: then
                    # reads of it fail loudly, uploads cannot bring it back.
                    if known is None:
                        log.warning("layer %s is neither on local disk nor in the remote "
                                    "index", name)
                    continue
                if known is None or known.size != size:
                    self._queue.append(UploadLayer(desc))
            self._queue.append(UploadIndex(meta))
            if self._removed:
                self._queue.append(DeleteRemoved())
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"upload-{self.timeline_id}")
        self._thread.start()

    def wait_idle(self, timeout_s: float) -> bool:
        """True once every reported change is in remote storage (False on timeout)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy,
                                       timeout_s)

    def stop(self, drain_timeout_s: float = 30.0, *, discard: bool = False) -> None:
        """Finish the queued operations (up to `drain_timeout_s`; none if `discard`, when
        the timeline is being deleted), then stop the worker once its current operation
        is done."""
        if not discard and not self.wait_idle(drain_timeout_s):
            log.warning("stopping with %d remote storage operations not done; they are "
                        "redone from the local state at the next start", len(self._queue))
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(60.0)
            if self._thread.is_alive():
                log.warning("upload worker still in an operation after 60 s; leaving it")

    # --- what the timeline reports -----------------------------------------------------
    def layer_added(self, desc: LayerDesc) -> None:
        self._enqueue(UploadLayer(desc))

    def metadata_saved(self, meta: TimelineMetadata) -> None:
        self._enqueue(UploadIndex(meta))

    def layer_removed(self, desc: LayerDesc) -> None:
        with self._cond:
            if self.stale:
                return
            self._removed.add(desc.file_name())
            if not any(isinstance(op, DeleteRemoved) for op in self._queue):
                self._queue.append(DeleteRemoved())
            self._cond.notify_all()

    def is_evictable(self, desc: LayerDesc) -> bool:
        name = desc.file_name()
        with self._cond:
            return not self.stale and name in self._indexed and name not in self._removed

    def mark_stale(self) -> bool:
        """A newer generation holds the tenant: drop every queued and later operation
        (uploads, indexes, deletions). True if the client was not stale before."""
        with self._cond:
            if self.stale:
                return False
            self.stale = True
            self._queue.clear()
            self._removed.clear()
            self._cond.notify_all()
            return True

    def _uploaded_layer(self, desc: LayerDesc) -> tuple[str, RemoteLayer]:
        """The file name of `desc` and its uploaded object; NotFound if the remote index
        does not name it."""
        name = desc.file_name()
        with self._cond:
            layer = self._uploaded.get(name)
        if layer is None:
            raise NotFound(f"layer {name} of timeline {self.timeline_id} is not on local "
                           "disk and not in remote storage")
        return name, layer

    def download(self, desc: LayerDesc) -> None:
        """Fetch a layer the remote index names into the timeline directory."""
        from strata.remote.download import download_layer

        name, layer = self._uploaded_layer(desc)
        failpoint("remote-before-download-layer")
        started = time.monotonic()
        size = download_layer(self.storage, self.tenant_id, self.timeline_id, name, layer,
                              self.dir)
        elapsed = time.monotonic() - started
        with self._stats_lock:
            if size >= 1 << 20 and elapsed > 0:  # small ones say little about speed
                self.download_bytes_per_s = (self.download_bytes_per_s + size / elapsed) / 2
            self.read_stats.layer_downloads += 1
            self.read_stats.layer_download_bytes += size

    def download_estimate_s(self, desc: LayerDesc) -> float | None:
        """Expected seconds for a whole download of the layer (None: not remote)."""
        with self._cond:
            layer = self._uploaded.get(desc.file_name())
        return None if layer is None else layer.size / self.download_bytes_per_s

    def open_ranged(self, desc: LayerDesc) -> RangedLayerReader:
        """A reader of a layer the remote index names that fetches by ranged reads (its
        index now, then the blobs each lookup needs), every byte checked by the layer
        format's checksums (RangedLayerReader)."""
        name, layer = self._uploaded_layer(desc)
        key = self.prefix + layer.object_name(name)

        def fetch_many(ranges: list[tuple[int, int]]) -> list[bytes]:
            parts = self.storage.get_ranges(key, ranges)
            with self._stats_lock:
                self.read_stats.ranged_gets += len(parts)
                self.read_stats.ranged_bytes += sum(len(part) for part in parts)
            return parts

        reader = RangedLayerReader(name, layer.size, lambda start, length: fetch_many(
            [(start, length)])[0], label=key, index_offset=layer.index_offset,
            fetch_many=fetch_many)
        with self._stats_lock:
            self.read_stats.ranged_opens += 1
        return reader

    def _enqueue(self, op: Op) -> None:
        with self._cond:
            if self.stale:
                return
            if isinstance(op, UploadIndex) and self._queue and \
                    isinstance(self._queue[-1], UploadIndex):
                self._queue[-1] = op  # a newer index replaces one not yet uploaded
            else:
                self._queue.append(op)
            self._cond.notify_all()

    # --- the worker ----------------------------------------------------------------------
    def _run(self) -> None:
        with timeline_context(self.tenant_id, self.timeline_id):
            warned = False
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._queue or self._stopping)
                    if self._stopping:
                        return
                    op = self._queue[0]
                    self._busy = True
                try:
                    self._execute(op)
                except StrataError as err:
                    if not warned:
                        log.warning("remote storage operation %s failed, retrying every "
                                    "%.1fs until it succeeds: %s", type(op).__name__,
                                    self.retry_pause_s, err)
                        warned = True
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                        self._cond.wait_for(lambda: self._stopping, self.retry_pause_s)
                    continue
                if warned:
                    log.info("remote storage operations resumed")
                    warned = False
                with self._cond:
                    if self._queue and self._queue[0] is op:  # not dropped by mark_stale
                        self._queue.popleft()
                    self._busy = False
                    self._cond.notify_all()

    def _execute(self, op: Op) -> None:
        match op:
            case UploadLayer(desc):
                self._upload_layer(desc)
            case UploadIndex(meta):
                self._upload_index(meta)
            case DeleteRemoved():
                self._delete_removed()

    def _upload_layer(self, desc: LayerDesc) -> None:
        name = desc.file_name()
        try:
            data = (self.dir / name).read_bytes()
        except FileNotFoundError:
            # Removed locally (GC) before its upload came up: nothing to upload.
            log.info("layer %s was removed before its upload", name)
            return
        failpoint("remote-before-upload-layer")
        layer = RemoteLayer(len(data), crc32c(data), self.generation, index_offset(data))
        self.storage.put(self.prefix + layer.object_name(name), data)
        with self._cond:
            self._uploaded[name] = layer
        log.debug("uploaded layer %s (%d bytes)", name, len(data))

    def _index(self, meta: TimelineMetadata) -> IndexPart:
        with self._cond:
            layers = {name: layer for name, layer in self._uploaded.items()
                      if name not in self._removed}
        return IndexPart(self.generation, meta, layers)

    def _upload_index(self, meta: TimelineMetadata) -> None:
        index = self._index(meta)
        failpoint("remote-before-upload-index")
        self.storage.put(self.prefix + with_generation(INDEX_NAME, self.generation),
                         index.encode())
        with self._cond:
            self._indexed = set(index.layers)
        self._last_meta = meta
        self._remote_consistent = meta.disk_consistent_lsn
        log.debug("uploaded index at %s (%d layers)", meta.disk_consistent_lsn,
                  len(index.layers))

    def _delete_removed(self) -> None:
        """An index without the removed layers, then (once it is durable) validation of
        this attachment's generation against the marker and the indexes, then deletion
        (remote/generations.py says why this order is safe)."""
        with self._cond:
            doomed = sorted(self._removed)
        if not doomed:
            return
        meta = self._last_meta
        if meta is not None:
            self._upload_index(meta)  # the index without them is durable first
        failpoint("remote-before-validate-generation")
        verdict = deletion_verdict(
            self.generation, read_generation(self.storage, self.tenant_id),
            newest_generation(self.storage, self.tenant_id, self.timeline_id))
        if not verdict.allowed:
            with self._cond:
                self._removed.difference_update(doomed)
                for name in doomed:
                    self._uploaded.pop(name, None)
            log.info("kept %d remote layers a newer generation may rely on", len(doomed))
            if self.mark_stale():
                if self.on_stale is not None:
                    self.on_stale(verdict.newer, verdict.where)
                else:
                    log.warning(stale_message(self.generation, verdict.newer,
                                              verdict.where))
            return
        failpoint("remote-before-delete-layers")
        for name in doomed:
            layer = self._uploaded.get(name)
            if layer is not None:
                self.storage.delete(self.prefix + layer.object_name(name))
        with self._cond:
            self._removed.difference_update(doomed)
            for name in doomed:
                self._uploaded.pop(name, None)
        log.info("deleted %d remote layers", len(doomed))

    def delete_all(self) -> None:
        """Remove every object of this timeline (the timeline is being deleted)."""
        keys = self.storage.list_keys(self.prefix)
        for key in sorted(keys, key=lambda k: INDEX_NAME not in k):
            try:
                self.storage.delete(key)
            except NotFound:
                pass
