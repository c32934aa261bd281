"""The tenant manager: the pageserver's on-disk layout, and loading all of it at start.

Layout:

    <workdir>/tenants/<tenant_id>/tenant.toml
    <workdir>/tenants/<tenant_id>/timelines/<timeline_id>/{metadata, lsn_time,
                                                          layer files, ephemeral-*}

Tenants are created as a temp directory (config written) renamed into place, and
deleted by renaming to `*.___deleting` before removal, so a crash never leaves a
half tenant that loads. `Repository(workdir)` loads every tenant and timeline and
cleans up what a crash left (see Timeline.load_layers).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

from strata.common.durable import fsync_dir
from strata.common.errors import NotFound, UserError
from strata.common.ids import TenantId
from strata.storage.tenant import (
    DELETING_DIR_SUFFIX,
    TEMP_DIR_SUFFIX,
    Tenant,
    TenantConfig,
    load_generation,
    save_generation,
)

log = logging.getLogger(__name__)

TENANTS_DIR = "tenants"


class Repository:
    """All tenants of one pageserver, loaded from `workdir` at construction."""

    def __init__(self, workdir: Path, clock: Callable[[], float] = time.time) -> None:
        self.workdir = workdir
        self.clock = clock
        self.tenants: dict[TenantId, Tenant] = {}
        self._lock = threading.Lock()
        self.tenants_dir.mkdir(parents=True, exist_ok=True)
        self._load()

    @property
    def tenants_dir(self) -> Path:
        return self.workdir / TENANTS_DIR

    def _load(self) -> None:
        for entry in sorted(os.listdir(self.tenants_dir)):
            path = self.tenants_dir / entry
            if entry.endswith(TEMP_DIR_SUFFIX) or entry.endswith(DELETING_DIR_SUFFIX):
                log.info("removing unfinished tenant directory %s", path)
                shutil.rmtree(path)
                continue
            tenant_id = TenantId(TenantId.parse(entry).raw)  # parse() is typed as the base
            tenant = Tenant(tenant_id, path, TenantConfig.load(path), self.clock,
                            load_generation(path))
            tenant.load_timelines()
            self.tenants[tenant_id] = tenant
        log.info("loaded %d tenants from %s", len(self.tenants), self.tenants_dir)

    def create_tenant(self, tenant_id: TenantId | None = None,
                      conf: TenantConfig | None = None, generation: int = 1,
                      populate: Callable[[Path], None] | None = None) -> Tenant:
        """A new tenant directory (config, generation, and whatever `populate` writes into
        the temp directory, e.g. timelines downloaded for an attach), renamed into place;
        its timelines are loaded."""
        if tenant_id is None:
            tenant_id = TenantId(TenantId.generate().raw)
        conf = conf if conf is not None else TenantConfig()
        with self._lock:
            if tenant_id in self.tenants:
                raise UserError(f"tenant {tenant_id} already exists")
            final = self.tenants_dir / str(tenant_id)
            temp = self.tenants_dir / f"{tenant_id}{TEMP_DIR_SUFFIX}"
            if temp.exists():
                shutil.rmtree(temp)
            temp.mkdir()
            conf.save(temp)
            save_generation(temp, generation)
            (temp / "timelines").mkdir()
            if populate is not None:
                populate(temp)
            os.rename(temp, final)
            fsync_dir(self.tenants_dir)
            tenant = Tenant(tenant_id, final, conf, self.clock, generation)
            tenant.load_timelines()
            self.tenants[tenant_id] = tenant
            return tenant

    def get_tenant(self, tenant_id: TenantId) -> Tenant:
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            raise NotFound(f"tenant {tenant_id} does not exist on this pageserver; see "
                           f"`strata tenant list`")
        return tenant

    def list_tenants(self) -> list[TenantId]:
        return sorted(self.tenants)

    def delete_tenant(self, tenant_id: TenantId) -> None:
        with self._lock:
            tenant = self.get_tenant(tenant_id)
            tenant.close()
            doomed = self.tenants_dir / f"{tenant_id}{DELETING_DIR_SUFFIX}"
            os.rename(tenant.dir, doomed)
            fsync_dir(self.tenants_dir)
            shutil.rmtree(doomed)
            del self.tenants[tenant_id]

    def set_tenant_config(self, tenant_id: TenantId, conf: TenantConfig) -> None:
        """Persist a new config; timelines pick it up at their next freeze/compaction/GC."""
        tenant = self.get_tenant(tenant_id)
        conf.save(tenant.dir)
        tenant.conf = conf
        for timeline in tenant.timelines.values():
            timeline.conf = conf

    def close(self) -> None:
        """Drop in-memory state (no flush: the WAL is re-fed from disk_consistent_lsn)."""
        for tenant in self.tenants.values():
            tenant.close()
        self.tenants.clear()
