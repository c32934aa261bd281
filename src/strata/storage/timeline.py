"""A timeline: one line of WAL as a versioned key-value map, readable at any retained LSN.

Writes (all puts of one WAL record carry the record's end LSN, then `finish_record`)
go to the open in-memory layer; it is frozen at `checkpoint_distance` bytes of WAL or
`checkpoint_timeout_s`, and `flush_frozen()` writes frozen layers as delta layer files
and advances `disk_consistent_lsn` in the metadata file. Reads walk, newest first, the
open layer, the frozen layers, the layer files (through the layer map), then the
ancestor timeline at the branch LSN, until an image is reached.

Relation semantics (sizes, cuts, zero pages) follow `rel.py`: a block read ignores
versions older than the block's cut. Reads below the GC cutoff raise UserError; a
broken timeline refuses reads with its reason.

Requests waiting for WAL up to an LSN wait in `lsn_waiters.LsnWaiters`; commit times
for point-in-time reads are in `lsn_time.LsnTimeIndex` (the timeline walks ancestors).

SLRU pages get a delta per change (pg_xact: one per commit); `put` writes a full image
instead once `SLRU_IMAGE_DELTAS` deltas followed the page's last image on this timeline
(and at the first delta of a page since the timeline was loaded or branched, when that
count is unknown), so a read never applies more than `SLRU_IMAGE_DELTAS` deltas. That
image is built from what `put` kept of the page (its last image and the deltas since,
`_slru_chains`, `storage/slru_chains.py`) when it kept it, else by a read.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from strata.common.durable import TEMP_SUFFIX, fsync_dir
from strata.common.errors import CorruptionError, NotFound, Unavailable, UserError
from strata.common.failpoint import FailpointHit, failpoint
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.constants import BLCKSZ
from strata.pg.page import ZERO_PAGE
from strata.pg.relfile import RelTag
from strata.storage.delta_layer import DeltaLayerWriter
from strata.storage.inmemory_layer import InMemoryLayer
from strata.storage.key import (
    FULL_KEY_RANGE,
    Key,
    KeyRange,
    rel_block_key,
    rel_size_key,
    rel_size_range,
)
from strata.storage.layer_file import open_layer
from strata.storage.layer_map import LayerMap
from strata.storage.layer_name import LayerDesc, is_layer_file_name, is_temp_file_name
from strata.storage.leases import LeaseTable
from strata.storage.lsn_time import LsnTimeIndex
from strata.storage.lsn_waiters import LsnWaiters
from strata.storage.metadata import TimelineMetadata, save_metadata
from strata.storage.rel import SizeRecord
from strata.storage.slru_chains import SlruChains
from strata.storage.value import (
    Image,
    Patch,
    Tombstone,
    Value,
    decode_value,
    encode_value,
    is_image_bytes,
    reconstruct,
)
from strata.storage.value_cache import ValueCache

if TYPE_CHECKING:
    from strata.storage.tenant import TenantConfig

log = logging.getLogger(__name__)

EPHEMERAL_PREFIX = "ephemeral-"
_MAX_FROZEN = 2  # frozen layers waiting for flush before finish_record flushes inline
_INF = (1 << 64) - 1
_ACCESS_TICKS = itertools.count(1)  # orders layer reads for eviction (coldest first)
# A value reconstructed from at least this many deltas is remembered (`_chained_value`).
CACHE_CHAIN_DELTAS = 16
# An SLRU page delta that would follow this many deltas since the page's last image is
# written as an image instead (`Timeline.put`): the longest chain a read applies.
SLRU_IMAGE_DELTAS = 128
# SLRU pages whose last image and deltas since `put` keeps (`_slru_chains`): the pages in
# use (pg_xact: the page of the current xids), not every page a long run touched.
_SLRU_CHAINS_KEPT = 64
BACKGROUND_DOWNLOAD_DELAY_S = 0.5  # at most, after the ranged read that started it


class TimelineBroken(CorruptionError):
    """The timeline cannot serve reads: ingest found something it could not store exactly."""


class LayerReader(Protocol):
    """What the timeline needs from the delta and image layer readers."""

    def get_versions_raw(self, key: bytes, end_lsn: int,
                         floor: int = 0) -> list[tuple[int, bytes]]: ...
    def iter_range_raw(self, key_range: KeyRange,
                       end_lsn: int) -> Iterator[tuple[bytes, int, bytes]]: ...
    def keys(self) -> Iterator[tuple[Key, Lsn, int]]: ...
    def distinct_keys_raw(self, key_range: KeyRange | None,
                          end_lsn: int) -> Iterator[bytes]: ...
    def close(self) -> None: ...


class RemoteSink(Protocol):
    """Told of every durable change to the timeline's files (strata.remote uploads them)."""

    def layer_added(self, desc: LayerDesc) -> None: ...
    def metadata_saved(self, meta: TimelineMetadata) -> None: ...
    def layer_removed(self, desc: LayerDesc) -> None: ...
    def download(self, desc: LayerDesc) -> None:
        """Fetch the layer file into the timeline directory (NotFound if not remote)."""
    def open_ranged(self, desc: LayerDesc) -> LayerReader:
        """A reader of the remote layer by ranged reads (NotFound if not remote)."""
    @property
    def ranged_reads_before_download(self) -> int:
        """Ranged reads of a layer before it is downloaded whole in the background (0:
        no ranged reads, a read downloads the whole layer first)."""
    def download_estimate_s(self, desc: LayerDesc) -> float | None:
        """How long a whole download of the layer is expected to take (None: unknown)."""
    @property
    def download_wait_s(self) -> float:
        """A read of a layer whose whole download runs waits for it, instead of fetching
        by ranged reads, if it is expected to finish within this many seconds (0: never)."""
    @property
    def concurrent_downloads(self) -> int:
        """At most this many whole-layer downloads of the timeline run at once (>= 1)."""
    def is_evictable(self, desc: LayerDesc) -> bool:
        """True if the last uploaded index names the layer (its local file may go)."""
    @property
    def remote_consistent_lsn(self) -> Lsn | None:
        """The disk_consistent_lsn of the last uploaded index (None: none uploaded yet)."""


def open_layer_file(path: Path) -> LayerReader:
    return open_layer(path)


class Timeline:
    """One timeline of one tenant. Thread-safe for one writer and many readers."""

    def __init__(self, tenant_id: TenantId, timeline_id: TimelineId, directory: Path,
                 meta: TimelineMetadata, conf: TenantConfig, ancestor: Timeline | None,
                 clock: Callable[[], float] = time.time) -> None:
        assert (ancestor is None) == (meta.ancestor_timeline is None), (ancestor, meta)
        self.tenant_id = tenant_id
        self.timeline_id = timeline_id
        self.dir = directory
        self.conf = conf
        self.ancestor = ancestor
        self.children: list[Timeline] = []
        self.clock = clock
        self.leases = LeaseTable()
        self._meta = meta
        self._ancestor_lsn = meta.ancestor_lsn.value
        self._initdb_lsn = meta.initdb_lsn.value
        self._last_record = meta.disk_consistent_lsn.value
        self._prev_record = meta.prev_record_lsn.value
        self._disk_consistent = meta.disk_consistent_lsn.value
        self._gc_cutoff = meta.latest_gc_cutoff.value
        self._open: InMemoryLayer | None = None
        self._frozen: list[InMemoryLayer] = []
        self._layer_map = LayerMap()
        self._readers: dict[LayerDesc, LayerReader] = {}
        self._access: dict[LayerDesc, int] = {}  # layer -> tick of its last read
        # Whole-layer downloads: at most the remote's `concurrent_downloads` at once (made
        # at the first one), and one per layer (the others wait for its event).
        self._download_slots: threading.BoundedSemaphore | None = None
        self._fetching: dict[LayerDesc, threading.Event] = {}
        self.downloads_running = 0  # whole-layer GETs running now
        self.downloads_running_max = 0  # the most that ran at once
        self._pinned: set[LayerDesc] = set()  # downloaded, not yet opened: not evictable
        # Layers not on local disk read by ranged reads of their remote object: their
        # readers, how many reads used each, and those being downloaded in the background.
        self._ranged: dict[LayerDesc, LayerReader] = {}
        self._ranged_reads: dict[LayerDesc, int] = {}
        self._downloading: set[LayerDesc] = set()
        self._download_began: dict[LayerDesc, float] = {}  # monotonic, once its GET starts
        self.download_waits = 0  # reads served by waiting for a running whole download
        self._ranged_lock = threading.Lock()  # opens ranged readers, starts downloads
        self._downloads_idle = threading.Condition(threading.Lock())
        self._closed = False
        self._lock = threading.RLock()  # layer lists, layer map, readers
        self._flush_lock = threading.Lock()  # one flush / compaction / gc at a time
        self._ephemeral_seq = 0
        self._rel_cache: dict[RelTag, tuple[int, SizeRecord | None]] = {}
        self._size_lock = threading.Lock()
        self._size_gen = 0  # bumped by every size write (see _size_record)
        self._lsn_times = LsnTimeIndex(directory)
        self._lsn_waiters = LsnWaiters(self._last_record)
        # SLRU pages reconstructed from long delta chains, by LSN (`_chained_value`).
        self.value_cache = ValueCache()
        # Per SLRU page put since the load: the deltas put since its last image, and for
        # the pages imaged last that image and those deltas (`_slru_value` builds the
        # next image from them instead of a read through the layers).
        self._slru_chains = SlruChains(_SLRU_CHAINS_KEPT)
        self.slru_images_written = 0  # deltas `put` turned into images
        self.broken_reason: str | None = None
        self.remote: RemoteSink | None = None  # set by the pageserver with remote storage

    def __repr__(self) -> str:
        return f"Timeline({self.tenant_id}/{self.timeline_id})"

    # --- loading -----------------------------------------------------------
    def load_layers(self) -> None:
        """Build the layer map from the directory, cleaning up what a crash left behind.

        Ephemeral files and half-written (temp-named) layers are deleted; a layer
        reaching above disk_consistent_lsn was written before the crash but never
        acknowledged in the metadata, so it is not trusted: deleted too (ingest re-feeds
        that WAL from disk_consistent_lsn).
        """
        dcl = self._disk_consistent
        for entry in sorted(os.listdir(self.dir)):
            path = self.dir / entry
            if entry.startswith(EPHEMERAL_PREFIX) or is_temp_file_name(entry) or \
                    entry.endswith(TEMP_SUFFIX):
                log.info("removing leftover file %s", path)
                path.unlink()
                continue
            if not is_layer_file_name(entry):
                continue
            desc = LayerDesc.parse_file_name(entry)
            if desc.lsn_range[1].value > dcl + 1:
                log.info("removing layer %s: it ends above disk_consistent_lsn %s "
                         "(written before a crash, never acknowledged)", entry, Lsn(dcl))
                path.unlink()
                continue
            self._layer_map.insert(desc)
        fsync_dir(self.dir)
        self._lsn_times.load(self._disk_consistent)

    # --- LSNs --------------------------------------------------------------
    @property
    def last_record_lsn(self) -> Lsn:
        return Lsn(self._last_record)

    @property
    def last_record_end(self) -> int:
        """`last_record_lsn` as a plain int (ingest's per-record checks make no Lsn)."""
        return self._last_record

    @property
    def prev_record_lsn(self) -> Lsn:
        return Lsn(self._prev_record)

    @property
    def disk_consistent_lsn(self) -> Lsn:
        return Lsn(self._disk_consistent)

    @property
    def wal_durable_lsn(self) -> Lsn:
        """WAL below this is never needed again, even if this pageserver loses its disk:
        disk_consistent_lsn, or with remote storage the remote_consistent_lsn (0 before
        the first index is uploaded). The WAL source may drop what lies below it."""
        if self.remote is None:
            return self.disk_consistent_lsn
        remote = self.remote.remote_consistent_lsn
        return Lsn(0) if remote is None else min(remote, self.disk_consistent_lsn)

    @property
    def ancestor_lsn(self) -> Lsn:
        return Lsn(self._ancestor_lsn)

    @property
    def initdb_lsn(self) -> Lsn:
        return Lsn(self._initdb_lsn)

    @property
    def gc_cutoff(self) -> Lsn:
        return Lsn(self._gc_cutoff)

    @property
    def metadata(self) -> TimelineMetadata:
        return self._meta

    # --- writes ------------------------------------------------------------
    def put(self, key: Key, lsn: Lsn, value: Value) -> None:
        """Store `value` for `key` at `lsn` (the end LSN of the record being ingested).

        A delta of an SLRU page may be stored as the page's image (`_slru_value`)."""
        if key.is_slru_block():
            value = self._slru_value(key, lsn.value, value)
            self._put_bytes(key, lsn.value, encode_value(value), value.is_image)
            self._slru_chains.stored(key, value)  # once stored
            return
        data = encode_value(value)
        if key.is_rel_size():
            with self._size_lock:
                self._put_bytes(key, lsn.value, data, value.is_image)
                self._rel_cache.pop(key.rel_tag(), None)
                self._size_gen += 1
            return
        self._put_bytes(key, lsn.value, data, value.is_image)

    def _slru_value(self, key: Key, lsn: int, value: Value) -> Value:
        """The value to store for `key` at `lsn`: `value`, or the page's image at `lsn`
        when `value` is a delta that would be the `SLRU_IMAGE_DELTAS` + 1st since the
        page's last image, or the first since the load (the count is not kept on disk:
        after a restart or on a new branch the chain below is of unknown length, up to
        its own bound). The image is built from what `_slru_chains` kept of the page,
        else by a read at `lsn` (so with the deltas of this record already put): at
        most `SLRU_IMAGE_DELTAS` deltas applied, once per that many puts."""
        if not isinstance(value, Patch):
            return value
        count = self._slru_chains.deltas(key)
        if count is not None and count < SLRU_IMAGE_DELTAS:
            return value
        page = self._slru_chains.page(key) if count is not None else None
        if page is None:
            page = bytearray(self._get_value(key, lsn) or bytes(BLCKSZ))
        value.apply(page)
        self.slru_images_written += 1
        return Image(bytes(page))

    def put_encoded(self, key: Key, lsn: int, data: bytes, is_image: bool) -> None:
        """`put` of a value already encoded (`encode_value`), for a key that is neither
        an SLRU block nor a relation size (whose puts `put` keeps track of): ingest's
        checkpoint, once per transaction. `lsn` is an int: ingest's hot path makes no
        `Lsn` per record (a frozen dataclass with checks: ~0.5-1 us each)."""
        assert not key.is_slru_block() and not key.is_rel_size(), key
        self._put_bytes(key, lsn, data, is_image)

    def _put_bytes(self, key: Key, lsn: int, data: bytes, is_image: bool,
                   rest: bytes = b"") -> None:
        if lsn <= self._last_record:
            raise UserError(f"put at LSN {Lsn(lsn)} on timeline {self.timeline_id} is not "
                            f"after last_record_lsn {Lsn(self._last_record)}; WAL must be "
                            f"ingested in order")
        layer = self._open
        if layer is None:
            layer = self._new_open_layer()
        layer.put(key, lsn, data, is_image, rest)

    def _new_open_layer(self) -> InMemoryLayer:
        with self._lock:
            if self._open is None:
                self._ephemeral_seq += 1
                path = self.dir / f"{EPHEMERAL_PREFIX}{self._ephemeral_seq}"
                self._open = InMemoryLayer(path, self._last_record + 1, self.clock())
            return self._open

    def finish_record(self, end_lsn: Lsn, prev_lsn: Lsn) -> None:
        """All puts of the record ending at `end_lsn` are done: advance and wake waiters."""
        self.finish_record_at(end_lsn.value, prev_lsn.value)

    def finish_record_at(self, end_lsn: int, prev_lsn: int) -> None:
        """`finish_record` with the LSNs as ints: ingest's hot path (once per record)."""
        if end_lsn < self._last_record:
            raise UserError(f"finish_record at {Lsn(end_lsn)} is behind last_record_lsn "
                            f"{self.last_record_lsn} on timeline {self.timeline_id}")
        layer = self._open
        assert layer is None or layer.max_lsn <= end_lsn, (layer.max_lsn, end_lsn)
        self._last_record = end_lsn
        self._prev_record = prev_lsn
        self._lsn_waiters.advance(end_lsn)
        if layer is not None and (
                end_lsn - layer.start_lsn >= self.conf.checkpoint_distance
                or self.clock() - layer.created_at >= self.conf.checkpoint_timeout_s):
            self.freeze()
            if len(self._frozen) > _MAX_FROZEN:
                self.flush_frozen()

    def put_rel_page(self, rel: RelTag, blkno: int, lsn: Lsn, value: Value) -> None:
        """Store a block version; extends the fork to blkno + 1 if it is shorter."""
        self.put_rel_page_encoded(rel, blkno, rel_block_key(rel, blkno), lsn.value,
                                  encode_value(value), value.is_image)

    def put_rel_page_encoded(self, rel: RelTag, blkno: int, key: Key, lsn: int, data: bytes,
                             is_image: bool, rest: bytes = b"") -> None:
        """`put_rel_page` of a value already encoded (`encode_value`) as `data + rest`
        (a WAL image's header and image: not joined into a new object), with its key
        `rel_block_key(rel, blkno)`: ingest's path, which keeps the keys it made, and
        passes `lsn` as an int (no `Lsn` per block: `put_encoded`)."""
        cached = self._rel_cache.get(rel)  # `_current_size` without its two calls
        rec = cached[1] if cached is not None else self._current_size(rel)
        if rec is None:
            # PostgreSQL may write a block of a fork whose creation came before our WAL
            # (or is implied by the record); the fork exists from here on.
            self._write_size(rel, lsn, SizeRecord.created(lsn).extended(blkno + 1))
        elif blkno >= rec.nblocks:
            self._write_size(rel, lsn, rec.extended(blkno + 1))
        self._put_bytes(key, lsn, data, is_image, rest)

    def create_rel(self, rel: RelTag, lsn: Lsn) -> None:
        """Create an empty fork (no-op if it exists): a cut at 0, so old blocks are dead."""
        if self._current_size(rel) is None:
            self._write_size(rel, lsn.value, SizeRecord.created(lsn.value))

    def truncate_rel(self, rel: RelTag, nblocks: int, lsn: Lsn) -> None:
        """Shrink a fork to `nblocks` (no-op if it does not exist or is not longer)."""
        rec = self._current_size(rel)
        if rec is None or nblocks >= rec.nblocks:
            return
        self._write_size(rel, lsn.value, rec.truncated(lsn.value, nblocks))

    def drop_rel(self, rel: RelTag, lsn: Lsn) -> None:
        if self._current_size(rel) is not None:
            self._write_size(rel, lsn.value, None)

    def _write_size(self, rel: RelTag, lsn: int, rec: SizeRecord | None) -> None:
        value: Value = Tombstone() if rec is None else Image(rec.encode())
        with self._size_lock:
            self._put_bytes(rel_size_key(rel), lsn, encode_value(value), True)
            self._rel_cache[rel] = (lsn, rec)
            self._size_gen += 1

    def key_sizes_by(self, rel: RelTag) -> None:
        """Make `rel` the object the size cache holds for its fork (if it holds one):
        ingest passes one RelTag object per fork, which a lookup then matches by identity
        instead of the dataclass's __eq__ (a Python call per block put)."""
        with self._size_lock:
            entry = self._rel_cache.pop(rel, None)
            if entry is not None:
                self._rel_cache[rel] = entry

    def current_nblocks(self, rel: RelTag) -> int:
        """The size of `rel` including the puts of the record being ingested, 0 if it
        does not exist (ingest's view: `rel_size` at that record's LSN)."""
        cached = self._rel_cache.get(rel)
        rec = cached[1] if cached is not None else self._current_size(rel)
        return 0 if rec is None else rec.nblocks

    def _current_size(self, rel: RelTag) -> SizeRecord | None:
        """The newest size record of `rel` (including puts of the record in progress)."""
        return self._size_record(rel, _INF - 1)

    def _size_record(self, rel: RelTag, lsn: int) -> SizeRecord | None:
        cached = self._rel_cache.get(rel)
        if cached is not None and lsn >= cached[0]:
            return cached[1]
        key = rel_size_key(rel)
        if cached is None:
            gen = self._size_gen
            last = self._last_record
            newest = self._versions(key, _INF - 1, 0)
            # With no version found, the fork is absent as of some image layer (or was
            # never written): that holds for reads at or above last_record_lsn, not
            # for every LSN.
            version_lsn = newest[0][0] if newest else last
            rec = self._decode_size(newest)
            with self._size_lock:
                # A size written meanwhile by the ingest thread must not be overwritten
                # with the older one read here.
                if gen == self._size_gen and rel not in self._rel_cache:
                    self._rel_cache[rel] = (version_lsn, rec)
            if lsn >= version_lsn:
                return rec
        return self._decode_size(self._versions(key, lsn, 0))

    @staticmethod
    def _decode_size(versions: list[tuple[int, bytes]]) -> SizeRecord | None:
        if not versions:
            return None
        value = decode_value(versions[0][1])
        if isinstance(value, Tombstone):
            return None
        assert isinstance(value, Image), value
        return SizeRecord.decode(value.data)

    # --- LSN <-> time ----------------------------------------------------------
    def put_lsn_time(self, lsn: Lsn, ts_us: int) -> None:
        """Record that the commit ending at `lsn` has timestamp `ts_us` (for PITR)."""
        self._lsn_times.put(lsn.value, ts_us)

    def find_lsn_for_timestamp(self, ts_us: int) -> Lsn:
        """End LSN of the last commit at or before `ts_us` (commit times taken as ordered)."""
        found = self._find_lsn_for_timestamp(ts_us, _INF)
        if found is None:
            raise NotFound(f"no commit at or before timestamp {ts_us} us on timeline "
                           f"{self.timeline_id} or its ancestors; pick a later time")
        return Lsn(found)

    def _find_lsn_for_timestamp(self, ts_us: int, max_lsn: int) -> int | None:
        found = self._lsn_times.find(ts_us, max_lsn)
        if found is None and self.ancestor is not None:
            return self.ancestor._find_lsn_for_timestamp(ts_us, self._ancestor_lsn)
        return found

    # --- reads ---------------------------------------------------------------
    def check_not_broken(self, pending: str | None = None) -> None:
        """Raise TimelineBroken if the timeline is marked broken, or if `pending` names a
        failure its owner found but has not marked yet (an ingest error)."""
        reason = self.broken_reason or pending
        if reason is not None:
            raise TimelineBroken(f"timeline {self.timeline_id} of tenant {self.tenant_id} is "
                                 f"broken: {reason}; branch from an earlier LSN")

    def _check_readable(self, lsn: int) -> None:
        self.check_not_broken()
        if lsn < self._gc_cutoff:
            raise UserError(f"read at LSN {Lsn(lsn)} on timeline {self.timeline_id} is below "
                            f"its GC cutoff {Lsn(self._gc_cutoff)}: that history was garbage "
                            f"collected; read at a later LSN or hold a lease to keep it")
        if self.ancestor is not None and lsn <= self._ancestor_lsn:
            self.ancestor._check_readable(lsn)

    def mark_broken(self, reason: str) -> None:
        log.error("timeline %s marked broken: %s", self.timeline_id, reason)
        self.broken_reason = reason

    def _versions(self, key: Key, lsn: int, floor: int) -> list[tuple[int, bytes]]:
        """Versions of `key` with floor <= version lsn <= lsn, newest first, down to an image.

        An image layer whose key range holds `key` ends the walk even without a value:
        it is a complete picture of its range, so a missing key was absent at its LSN.
        """
        return self._walk(key, lsn, floor)[0]

    def _walk(self, key: Key, lsn: int, floor: int) -> tuple[list[tuple[int, bytes]], bool]:
        """`_versions`, and whether they alone give the value: False when the walk
        stopped at `floor` (what is below it may matter), True when it ended at an image,
        an image layer or the start of the timeline's history."""
        out: list[tuple[int, bytes]] = []
        key_bytes: bytes | None = None
        end = lsn + 1  # exclusive
        tl: Timeline | None = self
        while tl is not None and end > floor:
            with tl._lock:
                mems = [tl._open] if tl._open is not None else []
                mems.extend(reversed(tl._frozen))
            for mem in mems:
                if mem.start_lsn >= end:
                    continue
                for v_lsn, data, is_image in mem.get_versions(key, end, floor):
                    out.append((v_lsn, data))
                    if is_image:
                        return out, True
                end = mem.start_lsn
                if end <= floor:
                    return out, False
            while end > floor:
                with tl._lock:  # the layer map is not safe against a concurrent insert
                    desc = tl._layer_map.search(key, Lsn(end))
                    if desc is None:
                        break
                    reader = tl._local_reader(desc)
                if reader is None:  # not on local disk: download without the lock
                    reader = tl._fetch(desc)
                tl._access[desc] = next(_ACCESS_TICKS)
                read_end = min(end, desc.lsn_range[1].value)
                if key_bytes is None:
                    key_bytes = key.to_bytes()
                for v_lsn, data in reader.get_versions_raw(key_bytes, read_end, floor):
                    out.append((v_lsn, data))
                    if is_image_bytes(data):
                        return out, True
                if not desc.is_delta:  # a complete picture, unless below the floor
                    return out, desc.lsn_range[0].value >= floor
                end = desc.lsn_range[0].value
            if tl.ancestor is None:
                break
            end = min(end, tl._ancestor_lsn + 1)
            tl = tl.ancestor
        return out, end > floor

    def _reader(self, desc: LayerDesc) -> LayerReader:
        """The layer's reader, downloading the file first if it is not local. Call
        without the timeline lock (a download must not hold it)."""
        reader = self._local_reader(desc)
        return reader if reader is not None else self._fetch(desc)

    def _local_reader(self, desc: LayerDesc) -> LayerReader | None:
        """The layer's reader (opened now if need be), or None if its file is not on
        local disk (evicted, or never downloaded after an attach)."""
        reader = self._readers.get(desc)
        if reader is None:
            with self._lock:
                reader = self._readers.get(desc)
                if reader is None:
                    try:
                        reader = open_layer_file(self.dir / desc.file_name())
                    except NotFound:
                        return None
                    self._readers[desc] = reader
        return reader

    def _fetch(self, desc: LayerDesc) -> LayerReader:
        """A reader of a layer whose file is not on local disk. Called without the
        timeline lock: remote reads take a while, and other reads go on meanwhile.

        With ranged reads on (the remote's `ranged_reads_before_download` > 0) it is a
        reader that fetches only the index and the blobs a read needs, and after that
        many reads of the layer the whole file is downloaded in the background (the
        local file then replaces the ranged reader). Otherwise the whole layer is
        downloaded before the read."""
        remote = self.remote
        if remote is None:
            raise CorruptionError(f"layer file {desc.file_name()} of timeline "
                                  f"{self.timeline_id} is missing and there is no remote "
                                  "storage to download it from; restore the file",
                                  path=str(self.dir / desc.file_name()))
        after = remote.ranged_reads_before_download
        if after <= 0:
            return self._download(remote, desc)
        with self._ranged_lock:
            reader = self._local_reader(desc)  # a background download may have finished
            if reader is not None:
                return reader
            wait_s = self._download_wait(remote, desc)
        if wait_s is not None:
            reader = self._wait_download(desc, wait_s)
            if reader is not None:
                return reader
        with self._ranged_lock:
            reader = self._local_reader(desc)
            if reader is not None:
                return reader
            reader = self._ranged.get(desc)
            if reader is None:
                started = time.monotonic()
                reader = remote.open_ranged(desc)
                with self._lock:
                    self._ranged[desc] = reader
                log.info("opened layer %s on demand for ranged reads in %.3fs",
                         desc.file_name(), time.monotonic() - started)
            reads = self._ranged_reads.get(desc, 0) + 1
            self._ranged_reads[desc] = reads
            if reads >= after and desc not in self._downloading and not self._closed:
                with self._downloads_idle:
                    self._downloading.add(desc)
                threading.Thread(target=self._background_download, daemon=True,
                                 args=(remote, desc, reader, getattr(reader, "blob_reads", 0)),
                                 name=f"download-{self.timeline_id}").start()
        return reader

    def _download_wait(self, remote: RemoteSink, desc: LayerDesc) -> float | None:
        """How long a read of `desc` should wait for its running whole download rather
        than fetch by ranged reads: its expected remaining time, if within the remote's
        `download_wait_s`; None if no download runs or it is not expected that soon.
        Under `_ranged_lock`."""
        limit = remote.download_wait_s
        if limit <= 0 or desc not in self._downloading:
            return None
        estimate = remote.download_estimate_s(desc)
        if estimate is None:
            return None
        began = self._download_began.get(desc)
        # Not begun yet: it waits (at most BACKGROUND_DOWNLOAD_DELAY_S) for the read that
        # started it to fetch its blobs, then the whole estimate is still ahead.
        remaining = estimate - (time.monotonic() - began if began is not None else 0.0)
        return max(remaining, 0.0) if remaining <= limit else None

    def _wait_download(self, desc: LayerDesc, remaining_s: float) -> LayerReader | None:
        """Wait for the running download of `desc` (twice its expected remaining time,
        at least 0.1 s); its local reader, or None if it is not done by then."""
        with self._downloads_idle:
            self._downloads_idle.wait_for(lambda: desc not in self._downloading,
                                          max(2 * remaining_s, 0.1))
        reader = self._local_reader(desc)
        if reader is not None:
            self.download_waits += 1
        return reader

    def _download(self, remote: RemoteSink, desc: LayerDesc) -> LayerReader:
        """Download the whole layer file and open it: one download per layer (a second
        read of it waits for the first's), at most the remote's `concurrent_downloads`
        of the timeline at once."""
        while True:
            reader = self._local_reader(desc)  # another read may have fetched it
            if reader is not None:
                return reader
            with self._lock:
                running = self._fetching.get(desc)
                if running is None:
                    self._fetching[desc] = threading.Event()
                    if self._download_slots is None:
                        self._download_slots = threading.BoundedSemaphore(
                            max(1, remote.concurrent_downloads))
                    slots = self._download_slots
                    break
            running.wait()  # then its file is local, or it failed and this read tries
        try:
            with slots:
                reader = self._download_now(remote, desc)
        finally:
            with self._lock:
                self._fetching.pop(desc).set()
        with self._lock:  # the local file serves the next reads
            self._ranged.pop(desc, None)
            self._ranged_reads.pop(desc, None)
        return reader

    def _download_now(self, remote: RemoteSink, desc: LayerDesc) -> LayerReader:
        """The GET of `_download`, holding a download slot."""
        reader = self._local_reader(desc)
        if reader is not None:
            return reader
        started = time.monotonic()
        # Pinned from the download until the reader holds the file open: eviction
        # skips it, so the file the read just fetched is there when it opens it.
        with self._lock:
            self._pinned.add(desc)
            self._download_began[desc] = time.monotonic()
            self.downloads_running += 1
            self.downloads_running_max = max(self.downloads_running_max,
                                             self.downloads_running)
        try:
            remote.download(desc)
            failpoint("timeline-after-download-layer")
            reader = self._local_reader(desc)
        finally:
            with self._lock:
                self._pinned.discard(desc)
                self._download_began.pop(desc, None)
                self.downloads_running -= 1
        if reader is None:
            raise CorruptionError(f"layer file {desc.file_name()} vanished right after "
                                  "its download", path=str(self.dir / desc.file_name()))
        log.info("downloaded layer %s on demand in %.3fs", desc.file_name(),
                 time.monotonic() - started)
        return reader

    def _background_download(self, remote: RemoteSink, desc: LayerDesc, reader: LayerReader,
                             blob_reads: int) -> None:
        try:
            # Let the read that started this fetch its blobs first (an index-only read,
            # a key listing, fetches none: then start after a short while anyway).
            wait = getattr(reader, "wait_blob_read", None)
            if wait is not None:
                wait(blob_reads, BACKGROUND_DOWNLOAD_DELAY_S)
            with self._lock:
                wanted = not self._closed and desc in self._layer_map.all()
            if wanted:
                self._download(remote, desc)
        except Exception as err:  # noqa: BLE001 - reads go on with ranged reads
            log.log(logging.INFO if self._closed else logging.WARNING,
                    "background download of layer %s failed, reads of it go on with "
                    "ranged reads: %s", desc.file_name(), err)
            with self._ranged_lock:
                self._ranged_reads[desc] = 0  # tried again after as many reads
        finally:
            with self._downloads_idle:
                self._downloading.discard(desc)
                self._downloads_idle.notify_all()

    def wait_background_downloads(self, timeout_s: float) -> bool:
        """True once no background layer download runs (False on timeout)."""
        with self._downloads_idle:
            return self._downloads_idle.wait_for(lambda: not self._downloading, timeout_s)

    def local_layer_files(self) -> list[tuple[LayerDesc, int, int]]:
        """(layer, size in bytes, last read tick) of every layer file on local disk."""
        out = []
        for desc in self.layers():
            try:
                size = (self.dir / desc.file_name()).stat().st_size
            except FileNotFoundError:
                continue
            out.append((desc, size, self._access.get(desc, 0)))
        return out

    def evict_layer(self, desc: LayerDesc) -> bool:
        """Delete the local file of a layer the last uploaded index names (it stays in the
        layer map and is downloaded again when a read needs it). A read that holds the
        layer's reader keeps reading through its open descriptor. False if not evictable,
        or if a read has just downloaded it and not yet opened it (pinned)."""
        remote = self.remote
        if remote is None or not remote.is_evictable(desc):
            return False
        with self._lock:
            if desc not in self._layer_map.all() or desc in self._pinned:
                return False
            self._readers.pop(desc, None)
            self._ranged.pop(desc, None)
            self._ranged_reads.pop(desc, None)
            (self.dir / desc.file_name()).unlink(missing_ok=True)
        return True

    def add_remote_layers(self, descs: list[LayerDesc]) -> int:
        """Put layers that are only in remote storage into the layer map (attach, or a
        start after eviction); layers above disk_consistent_lsn are not trusted."""
        added = 0
        with self._lock:
            present = set(self._layer_map.all())
            for desc in descs:
                if desc in present or desc.lsn_range[1].value > self._disk_consistent + 1:
                    continue
                self._layer_map.insert(desc)
                added += 1
        return added

    def _get_value(self, key: Key, lsn: int, floor: int = 0) -> bytes | None:
        if floor == 0 and key.is_slru_block():
            return self._chained_value(key, lsn)
        versions = self._versions(key, lsn, floor)
        if not versions:
            return None
        return reconstruct([decode_value(data) for _, data in reversed(versions)])

    def _chained_value(self, key: Key, lsn: int) -> bytes | None:
        """`_get_value` for keys whose deltas pile up (SLRU pages: one per commit), through
        `value_cache`: the versions above the newest value remembered at or below `lsn`
        (on this timeline, else the ancestor's value at the branch point) applied to it.
        A value read at or below `last_record_lsn` is final, so it is remembered when it
        took `CACHE_CHAIN_DELTAS` deltas or more, or was built on a remembered one."""
        tl = self
        while tl.ancestor is not None and lsn <= tl._ancestor_lsn:
            tl = tl.ancestor  # the branch has no versions at or below its branch point
        own_floor = tl._ancestor_lsn + 1 if tl.ancestor is not None else 0
        base = tl.value_cache.get(key, lsn, max(own_floor, tl._gc_cutoff))
        floor = base.lsn + 1 if base is not None else own_floor
        versions, complete = tl._walk(key, lsn, floor)
        start: bytes | None = None
        if not complete and floor > 0:
            if base is not None:
                start = base.value
            else:
                assert tl.ancestor is not None, (tl, floor)
                start = tl.ancestor._chained_value(key, tl._ancestor_lsn)
        if versions:
            values = [decode_value(data) for _, data in reversed(versions)]
            value = reconstruct(values if start is None else [Image(start), *values])
        else:
            value = start
        if lsn <= tl._last_record and (len(versions) >= CACHE_CHAIN_DELTAS or
                                       (base is not None and versions)):
            tl.value_cache.put(key, lsn, value)
        return value

    def delta_chain(self, key: Key, lsn: Lsn) -> int:
        """How many deltas a read of `key` at `lsn` applies with no remembered value: the
        versions from `lsn` down to an image (through the ancestors), less the image."""
        self._check_readable(lsn.value)
        return sum(not is_image_bytes(data) for _, data in self._versions(key, lsn.value, 0))

    def get(self, key: Key, lsn: Lsn) -> bytes:
        """The value of `key` as of `lsn` (inclusive); NotFound if it does not exist."""
        self._check_readable(lsn.value)
        value = self._get_value(key, lsn.value)
        if value is None:
            raise NotFound(f"key {key} does not exist at LSN {lsn} on timeline "
                           f"{self.timeline_id}")
        return value

    def get_rel_page(self, rel: RelTag, blkno: int, lsn: Lsn) -> bytes:
        """Block `blkno` of `rel` as of `lsn`: 8192 bytes, zeros if unwritten since its cut."""
        self._check_readable(lsn.value)
        page = self._rel_page(rel, blkno, lsn.value)
        if page is None:
            nblocks = self._size_record(rel, lsn.value)
            what = "does not exist" if nblocks is None else f"has {nblocks.nblocks} blocks"
            raise NotFound(f"block {blkno} of {rel} does not exist at LSN {lsn} on timeline "
                           f"{self.timeline_id}: the fork {what}")
        return page

    def _rel_page(self, rel: RelTag, blkno: int, lsn: int) -> bytes | None:
        rec = self._size_record(rel, lsn)
        if rec is None or blkno >= rec.nblocks:
            return None
        versions = self._versions(rel_block_key(rel, blkno), lsn, rec.cut_lsn(blkno))
        if not versions:
            return ZERO_PAGE
        page = reconstruct([decode_value(data) for _, data in reversed(versions)])
        return ZERO_PAGE if page is None else page

    def rel_size(self, rel: RelTag, lsn: Lsn) -> int:
        self._check_readable(lsn.value)
        rec = self._size_record(rel, lsn.value)
        if rec is None:
            raise NotFound(f"{rel} does not exist at LSN {lsn} on timeline {self.timeline_id}")
        return rec.nblocks

    def rel_exists(self, rel: RelTag, lsn: Lsn) -> bool:
        self._check_readable(lsn.value)
        return self._size_record(rel, lsn.value) is not None

    def list_rels(self, spcnode: int, dbnode: int, lsn: Lsn) -> set[RelTag]:
        return {key.rel_tag() for key, _ in self.scan(rel_size_range(spcnode, dbnode), lsn)}

    def rel_sizes(self, spcnode: int, dbnode: int, lsn: Lsn) -> dict[RelTag, int]:
        """Every relation fork of the database at `lsn` with its size in blocks, in key
        order: `list_rels` and `rel_size` in one pass, each size from the size cache (the
        lazy basebackup's manifest lists ~1,000 forks at every compute start)."""
        self._check_readable(lsn.value)
        out: dict[RelTag, int] = {}
        for key in self.candidate_keys(rel_size_range(spcnode, dbnode), lsn.value):
            rel = key.rel_tag()
            rec = self._size_record(rel, lsn.value)
            if rec is not None:
                out[rel] = rec.nblocks
        return out

    def scan(self, key_range: KeyRange, lsn: Lsn) -> Iterator[tuple[Key, bytes]]:
        """Live keys in `key_range` as of `lsn`, in key order, with their values."""
        self._check_readable(lsn.value)
        for key in self.candidate_keys(key_range, lsn.value):
            value = self._get_value(key, lsn.value)
            if value is not None:
                yield key, value

    def candidate_keys(self, key_range: KeyRange, lsn: int) -> list[Key]:
        """Every key with some version at or below `lsn` in range (live or not)."""
        keys: set[bytes] = set()
        tl: Timeline | None = self
        while tl is not None:
            with tl._lock:
                mems = ([tl._open] if tl._open is not None else []) + list(tl._frozen)
                found = [(desc, tl._local_reader(desc)) for desc in
                         tl._layer_map.layers_overlapping(key_range, (Lsn(0), Lsn(lsn + 1)))]
            readers = [(desc, reader if reader is not None else tl._fetch(desc))
                       for desc, reader in found]
            for mem in mems:
                if mem.start_lsn <= lsn:
                    keys.update(k.to_bytes() for k in mem.keys_in(key_range))
            for desc, reader in readers:
                # From the index alone (no blob reads), one entry per key.
                whole = key_range.covers(desc.key_range)
                keys.update(reader.distinct_keys_raw(None if whole else key_range, lsn + 1))
            if tl.ancestor is None:
                break
            lsn = min(lsn, tl._ancestor_lsn)
            tl = tl.ancestor
        return [Key.from_bytes(k) for k in sorted(keys)]

    def materialize(self, key: Key, lsn: int) -> bytes | None:
        """The value of `key` at `lsn` as an image layer stores it (None: absent).

        Blocks go through the fork's size and cut, so that an image layer never carries
        a dead version forward as if it were new.
        """
        if key.is_rel_block():
            rec = self._size_record(key.rel_tag(), lsn)
            if rec is None or key.blkno() >= rec.nblocks:
                return None
            versions = self._versions(key, lsn, rec.cut_lsn(key.blkno()))
            if not versions:
                return None  # absent in an image layer reads as a zero page
            return reconstruct([decode_value(data) for _, data in reversed(versions)])
        return self._get_value(key, lsn)

    async def wait_for_lsn(self, lsn: Lsn, timeout_s: float) -> None:
        """Return once last_record_lsn >= lsn; Unavailable after `timeout_s`."""
        try:
            await self._lsn_waiters.wait(lsn.value, timeout_s)
        except TimeoutError as err:
            raise Unavailable(f"timed out after {timeout_s}s waiting for WAL up to {lsn} on "
                              f"timeline {self.timeline_id}; last_record_lsn is "
                              f"{self.last_record_lsn}") from err

    # --- freeze and flush --------------------------------------------------------
    def freeze(self) -> None:
        """Freeze the open layer at last_record_lsn (it then waits for flush_frozen)."""
        with self._lock:
            layer = self._open
            if layer is None:
                return
            if layer.max_lsn > self._last_record:
                raise UserError(f"cannot freeze timeline {self.timeline_id} in the middle of "
                                f"a record (puts at {Lsn(layer.max_lsn)} not finished)")
            layer.freeze(self._last_record + 1, self._prev_record)
            self._frozen.append(layer)
            self._open = None
            log.info("froze in-memory layer [%s, %s) (%d bytes)", Lsn(layer.start_lsn),
                     Lsn(self._last_record + 1), layer.value_bytes)

    def tick(self) -> None:
        """Periodic duty (the pageserver calls it): freeze an open layer older than
        checkpoint_timeout_s even when no WAL arrives, and flush frozen layers."""
        layer = self._open
        if layer is not None and self.clock() - layer.created_at >= self.conf.checkpoint_timeout_s:
            self.freeze()
        self.flush_frozen()

    def check_invariants(self) -> None:
        """Costly consistency checks, run by tests after each step."""
        with self._lock:
            mems = list(self._frozen) + ([self._open] if self._open is not None else [])
            descs = self._layer_map.all()
        dcl = self._disk_consistent
        assert dcl <= self._last_record, (dcl, self._last_record)
        expected_start = dcl + 1
        for mem in mems:
            assert mem.start_lsn >= expected_start, (mem.start_lsn, expected_start)
            if mem.end_lsn is not None:
                assert mem.end_lsn > mem.start_lsn, (mem.start_lsn, mem.end_lsn)
                expected_start = mem.end_lsn
        for desc in descs:
            assert desc.lsn_range[1].value <= dcl + 1, (desc, Lsn(dcl))
        deltas = sorted((d.lsn_range[0].value, d.lsn_range[1].value) for d in descs if d.is_delta)
        for (_, end1), (start2, _) in zip(deltas, deltas[1:], strict=False):
            assert end1 <= start2, ("delta layers overlap in LSN", deltas)

    def flush(self) -> None:
        """Freeze and write everything ingested so far; disk_consistent_lsn = last_record_lsn."""
        self.freeze()
        self.flush_frozen()
        with self._flush_lock, self._lock:
            idle = self._open is None and not self._frozen
            last, prev = self._last_record, self._prev_record
        if idle and last > self._disk_consistent:
            # WAL with no puts since the last layer: nothing to write but the LSN.
            with self._flush_lock:
                self._lsn_times.persist(last)
                self._save_meta(disk_consistent_lsn=Lsn(last), prev_record_lsn=Lsn(prev))
                self._disk_consistent = last

    def frozen_layer_count(self) -> int:
        """In-memory layers frozen and waiting for flush_frozen()."""
        with self._lock:
            return len(self._frozen)

    def flush_frozen(self) -> None:
        """Write each frozen layer as a delta layer file, oldest first, then the metadata."""
        # Nothing frozen: return without the maintenance lock, which a compaction may hold
        # for a long time; ingest calls this after every batch and must not wait for it.
        if not self.frozen_layer_count():
            return
        with self._flush_lock:
            while True:
                with self._lock:
                    if not self._frozen:
                        return
                    layer = self._frozen[0]
                assert layer.end_lsn is not None, layer.path
                desc = None
                if not layer.is_empty():
                    failpoint("flush-before-write-layer")
                    writer = DeltaLayerWriter(self.dir, layer.key_range(),
                                              (Lsn(layer.start_lsn), Lsn(layer.end_lsn)))
                    try:
                        for i, (key, lsn, data) in enumerate(layer.iter_all()):
                            writer.put(key, Lsn(lsn), data)
                            if i == 0:
                                failpoint("flush-mid-layer")
                        desc = writer.finish()
                    except FailpointHit:
                        raise  # a simulated crash leaves the temp file, as a real one would
                    except BaseException:
                        writer.abort()
                        raise
                    failpoint("flush-after-write-layer")
                    with self._lock:
                        self._layer_map.insert(desc)
                        self._frozen.pop(0)
                    if self.remote is not None:
                        self.remote.layer_added(desc)
                else:
                    with self._lock:
                        self._frozen.pop(0)
                dcl = layer.end_lsn - 1
                self._lsn_times.persist(dcl)
                failpoint("flush-before-metadata")
                self._save_meta(disk_consistent_lsn=Lsn(dcl),
                                prev_record_lsn=Lsn(layer.prev_record_lsn_at_end))
                self._disk_consistent = dcl
                failpoint("flush-after-metadata")
                layer.close(delete=True)
                log.info("flushed layer %s; disk_consistent_lsn %s", desc, Lsn(dcl))

    def _save_meta(self, **changes: Any) -> None:
        meta = self._meta.with_updates(**changes)
        save_metadata(self.dir, meta)
        self._meta = meta
        if self.remote is not None:
            self.remote.metadata_saved(meta)

    # --- layer management for compaction and GC -------------------------------------
    @property
    def layer_map(self) -> LayerMap:
        return self._layer_map

    def layers(self) -> list[LayerDesc]:
        with self._lock:
            return list(self._layer_map.all())

    def add_layer(self, desc: LayerDesc) -> None:
        """A new layer file (compaction's image layer) joins the layer map."""
        with self._lock:
            self._layer_map.insert(desc)
        if self.remote is not None:
            self.remote.layer_added(desc)
            self.remote.metadata_saved(self._meta)

    def remove_layer(self, desc: LayerDesc) -> None:
        """Forget a layer and delete its file (GC).

        Its reader is not closed: a read on another thread may hold it, and keeps reading
        the unlinked file through the open descriptor, which closes with the reader's
        last reference. Reads take a layer and its reader together under the lock.
        """
        with self._lock:
            self._layer_map.remove(desc)
            self._readers.pop(desc, None)
            self._ranged.pop(desc, None)
            self._ranged_reads.pop(desc, None)
            self._access.pop(desc, None)
        (self.dir / desc.file_name()).unlink(missing_ok=True)
        if self.remote is not None:
            self.remote.layer_removed(desc)

    def set_gc_cutoff(self, cutoff: Lsn) -> None:
        """Persist a new (higher) GC cutoff, then refuse reads below it."""
        assert cutoff.value >= self._gc_cutoff, (cutoff, self.gc_cutoff)
        failpoint("gc-before-cutoff-metadata")
        self._save_meta(latest_gc_cutoff=cutoff)
        self._gc_cutoff = cutoff.value

    @property
    def maintenance_lock(self) -> threading.Lock:
        """Held by flush, compaction and GC: they change the layer files one at a time."""
        return self._flush_lock

    def full_key_range(self) -> KeyRange:
        return FULL_KEY_RANGE

    def close(self) -> None:
        """Drop in-memory state without flushing (the WAL is re-fed after a restart)."""
        self._closed = True  # no background download starts now; let running ones end,
        if not self.wait_background_downloads(60):  # so none writes into a removed dir
            log.warning("closing timeline %s with a layer download still running",
                        self.timeline_id)
        with self._lock:
            for mem in ([self._open] if self._open else []) + self._frozen:
                mem.close(delete=True)
            self._open = None
            self._frozen = []
            self._closed = True
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()
            self._ranged.clear()
            self._ranged_reads.clear()

