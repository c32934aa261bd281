"""A tenant: its configuration (validated, persisted) and its tree of timelines.

`TenantConfig` (strata.pageserver.api, where clients find it too) holds the knobs of
ingest, flush, compaction and GC; it is persisted as `tenant.toml` in the tenant
directory, and unknown keys and bad values are refused at load, so a typo does not
silently fall back to a default.

`Tenant` creates, branches, loads and deletes timelines under
`<tenant dir>/timelines/<timeline_id>/`. A timeline directory is created as a
temp directory holding the metadata, then renamed, so a crash never leaves a
timeline without metadata.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from strata.common.durable import TEMP_SUFFIX, fsync_dir, write_atomic
from strata.common.errors import CorruptionError, NotFound, UserError
from strata.common.failpoint import failpoint
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pageserver.api import TenantConfig as TenantConfig  # its home; re-exported
from strata.storage.metadata import (
    METADATA_FILE,
    TimelineMetadata,
    encode_metadata,
    load_metadata,
)
from strata.storage.timeline import Timeline

if TYPE_CHECKING:
    from strata.storage.compaction import CompactionResult
    from strata.storage.gc import GcResult

log = logging.getLogger(__name__)

GENERATION_FILE = "generation"
MAX_GENERATION = 2**32 - 1
TIMELINES_DIR = "timelines"
TEMP_DIR_SUFFIX = TEMP_SUFFIX  # a tenant or timeline directory being created
_fsync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
DELETING_DIR_SUFFIX = ".___deleting"


def check_generation(generation: int) -> int:
    if isinstance(generation, bool) or not isinstance(generation, int) or \
            not 1 <= generation <= MAX_GENERATION:
        raise UserError(f"generation must be an integer 1..{MAX_GENERATION}, got "
                        f"{generation!r}")
    return generation


def save_generation(tenant_dir: Path, generation: int) -> None:
    write_atomic(tenant_dir / GENERATION_FILE, f"{check_generation(generation)}\n".encode(),
                 failpoint_prefix="tenant-generation")


def load_generation(tenant_dir: Path) -> int:
    """The generation of this pageserver's attachment of the tenant (1 if never set)."""
    path = tenant_dir / GENERATION_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return 1
    try:
        return check_generation(int(text.strip()))
    except (ValueError, UserError) as err:
        raise CorruptionError(f"tenant generation file is damaged: {text[:40]!r}",
                              path=str(path)) from err


class Tenant:
    """One tenant: its config and its timelines (a tree of branches).

    `generation` numbers this pageserver's attachment of the tenant (given by the
    control plane at creation or attach); remote object names carry it.
    """

    def __init__(self, tenant_id: TenantId, directory: Path, conf: TenantConfig,
                 clock: Callable[[], float], generation: int = 1) -> None:
        self.tenant_id = tenant_id
        self.dir = directory
        self.conf = conf
        self.clock = clock
        self.generation = generation
        self.timelines: dict[TimelineId, Timeline] = {}
        self._lock = threading.RLock()  # timeline tree changes vs GC

    @property
    def timelines_dir(self) -> Path:
        return self.dir / TIMELINES_DIR

    def get_timeline(self, timeline_id: TimelineId) -> Timeline:
        timeline = self.timelines.get(timeline_id)
        if timeline is None:
            raise NotFound(f"timeline {timeline_id} not in tenant {self.tenant_id}; see "
                           f"`strata timeline list --tenant {self.tenant_id}`")
        return timeline

    def list_timelines(self) -> list[TimelineId]:
        return sorted(self.timelines)

    def _make_timeline(self, timeline_id: TimelineId, meta: TimelineMetadata) -> Timeline:
        """Create the timeline directory with its metadata, atomically (temp dir + rename)."""
        if timeline_id in self.timelines:
            raise UserError(f"timeline {timeline_id} already exists in tenant {self.tenant_id}")
        final = self.timelines_dir / str(timeline_id)
        temp = self.timelines_dir / f"{timeline_id}{TEMP_DIR_SUFFIX}"
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
        fd = os.open(temp / METADATA_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, encode_metadata(meta))
            # The file and its directory entry must both be durable before the rename;
            # the two fsyncs are independent, so overlap them (branch creation is ~2
            # fsyncs of latency instead of 3).
            dir_synced = _fsync_pool.submit(fsync_dir, temp)
            os.fsync(fd)
            dir_synced.result()
        finally:
            os.close(fd)
        failpoint("timeline-create-before-rename")
        os.rename(temp, final)
        fsync_dir(self.timelines_dir)
        ancestor = self.timelines[meta.ancestor_timeline] \
            if meta.ancestor_timeline is not None else None
        timeline = Timeline(self.tenant_id, timeline_id, final, meta, self.conf, ancestor,
                            self.clock)
        if ancestor is not None:
            ancestor.children.append(timeline)
        self.timelines[timeline_id] = timeline
        return timeline

    def create_timeline(self, timeline_id: TimelineId, initdb_lsn: Lsn,
                        pg_version: int = 15) -> Timeline:
        """A new root timeline; ingest imports the base image at `initdb_lsn`."""
        meta = TimelineMetadata(disk_consistent_lsn=Lsn(0), prev_record_lsn=Lsn(0),
                                ancestor_timeline=None, ancestor_lsn=Lsn(0),
                                latest_gc_cutoff=Lsn(0), initdb_lsn=initdb_lsn,
                                pg_version=pg_version)
        with self._lock:
            return self._make_timeline(timeline_id, meta)

    def branch_timeline(self, timeline_id: TimelineId, ancestor_id: TimelineId,
                        lsn: Lsn | None = None, prev_record_lsn: Lsn | None = None) -> Timeline:
        """Branch `ancestor_id` at `lsn` (default: its last_record_lsn). O(1): no data copied.

        `prev_record_lsn` is the start of the record ending at `lsn`; it defaults to the
        parent's prev_record_lsn when branching at its last record, else 0 (unknown).
        """
        with self._lock:
            parent = self.get_timeline(ancestor_id)
            last = parent.last_record_lsn
            at = last if lsn is None else lsn
            where = f"timeline {ancestor_id} of tenant {self.tenant_id}"
            if at < parent.initdb_lsn or at.value == 0:
                raise UserError(f"cannot branch {where} at {at}: before its initdb LSN "
                                f"{parent.initdb_lsn}, where the data starts")
            if at > last:
                raise UserError(f"cannot branch {where} at {at}: beyond its last_record_lsn "
                                f"{last}; wait for the WAL to arrive or pick an earlier LSN")
            if at < parent.gc_cutoff:
                raise UserError(f"cannot branch {where} at {at}: below its GC cutoff "
                                f"{parent.gc_cutoff}; that history was garbage collected")
            if prev_record_lsn is None:
                prev_record_lsn = parent.prev_record_lsn if at == last else Lsn(0)
            meta = TimelineMetadata(disk_consistent_lsn=at, prev_record_lsn=prev_record_lsn,
                                    ancestor_timeline=ancestor_id, ancestor_lsn=at,
                                    latest_gc_cutoff=Lsn(0), initdb_lsn=parent.initdb_lsn,
                                    pg_version=parent.metadata.pg_version)
            return self._make_timeline(timeline_id, meta)

    def delete_timeline(self, timeline_id: TimelineId) -> None:
        with self._lock:
            timeline = self.get_timeline(timeline_id)
            if timeline.children:
                raise UserError(f"timeline {timeline_id} has branches "
                                f"{[str(c.timeline_id) for c in timeline.children]}; delete "
                                f"them first")
            timeline.close()
            doomed = self.timelines_dir / f"{timeline_id}{DELETING_DIR_SUFFIX}"
            os.rename(timeline.dir, doomed)
            fsync_dir(self.timelines_dir)
            shutil.rmtree(doomed)
            if timeline.ancestor is not None:
                timeline.ancestor.children.remove(timeline)
            del self.timelines[timeline_id]

    def load_timelines(self) -> None:
        """Load every timeline directory, ancestors first; clean up half-made ones."""
        self.timelines_dir.mkdir(parents=True, exist_ok=True)
        metas: dict[TimelineId, TimelineMetadata] = {}
        for entry in sorted(os.listdir(self.timelines_dir)):
            path = self.timelines_dir / entry
            if entry.endswith(TEMP_DIR_SUFFIX) or entry.endswith(DELETING_DIR_SUFFIX):
                log.info("removing unfinished timeline directory %s", path)
                shutil.rmtree(path)
                continue
            metas[TimelineId(TimelineId.parse(entry).raw)] = load_metadata(path)
        pending = dict(metas)
        while pending:
            ready = [tid for tid, m in pending.items()
                     if m.ancestor_timeline is None or m.ancestor_timeline in self.timelines]
            if not ready:
                names = sorted(map(str, pending))
                raise CorruptionError(f"tenant {self.tenant_id}: timelines {names} name "
                                      f"ancestors that do not exist",
                                      path=str(self.timelines_dir))
            for tid in sorted(ready):
                meta = pending.pop(tid)
                ancestor = self.timelines.get(meta.ancestor_timeline) \
                    if meta.ancestor_timeline is not None else None
                timeline = Timeline(self.tenant_id, tid, self.timelines_dir / str(tid), meta,
                                    self.conf, ancestor, self.clock)
                timeline.load_layers()
                if ancestor is not None:
                    ancestor.children.append(timeline)
                self.timelines[tid] = timeline

    def gc(self) -> dict[TimelineId, GcResult]:
        """Run GC on every timeline (branch creation waits meanwhile)."""
        from strata.storage.gc import gc_timeline

        with self._lock:
            now = self.clock()
            return {tid: gc_timeline(tl, now) for tid, tl in sorted(self.timelines.items())}

    def compact(self) -> dict[TimelineId, CompactionResult]:
        from strata.storage.compaction import compact

        return {tid: compact(tl) for tid, tl in sorted(self.timelines.items())}

    def close(self) -> None:
        for timeline in self.timelines.values():
            timeline.close()
