"""What a client of the pageserver needs to know, without the server: the tenant
config schema, the timeline and lease answers of the HTTP API, the replication slot name
and the remote storage URL forms.

The control plane (strata.control) and the compute side (strata.compute) import only this
module and the clients (pageserver/client.py, page_client.py, pagestream.py), never the
storage engine or the server's own modules; tests/unit/test_import_rules.py checks it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from strata.common.durable import write_atomic
from strata.common.errors import CorruptionError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn

TENANT_CONFIG_FILE = "tenant.toml"
REMOTE_STORAGE_FORMS = ("file:///", "s3://", "/")


def check_remote_storage_url(url: str) -> str:
    """`url` if it is a remote storage URL the pageserver accepts, else UserError."""
    if url and not url.startswith(REMOTE_STORAGE_FORMS):
        raise UserError(f"pageserver config remote_storage must be file:///path or "
                        f"s3://bucket/prefix, got {url!r}")
    return url


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """Storage knobs of one tenant (defaults suit a small development tenant)."""

    checkpoint_distance: int = 256 * 1024 * 1024
    """Freeze the in-memory layer once it covers this many bytes of WAL."""
    checkpoint_timeout_s: float = 600.0
    """...or once it is this old (seconds since its first write)."""
    gc_horizon: int = 64 * 1024 * 1024
    """Keep at least this many bytes of WAL history below last_record_lsn."""
    pitr_interval_s: float = 7 * 24 * 3600.0
    """Keep history for this long (through the LSN-time index); 0 disables."""
    image_creation_threshold: int = 3
    """Write image layers where this many delta layers stack over a key range."""
    image_layer_keys: int = 16384
    """Keys per image layer partition (16384 pages = 128 MB)."""
    gc_period_s: float = 3600.0
    compaction_period_s: float = 20.0
    lease_length_s: float = 600.0
    """Default duration of an LSN lease."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def positive(name: str, value: float) -> None:
            if not value > 0:
                raise UserError(f"tenant config {name} must be > 0, got {value!r}")

        positive("checkpoint_distance", self.checkpoint_distance)
        positive("checkpoint_timeout_s", self.checkpoint_timeout_s)
        positive("gc_period_s", self.gc_period_s)
        positive("compaction_period_s", self.compaction_period_s)
        positive("lease_length_s", self.lease_length_s)
        positive("image_layer_keys", self.image_layer_keys)
        if self.gc_horizon < 0:
            raise UserError(f"tenant config gc_horizon must be >= 0, got {self.gc_horizon}")
        if self.pitr_interval_s < 0:
            raise UserError(f"tenant config pitr_interval_s must be >= 0, got "
                            f"{self.pitr_interval_s}")
        if self.image_creation_threshold < 1:
            raise UserError(f"tenant config image_creation_threshold must be >= 1, got "
                            f"{self.image_creation_threshold}")
        for f in fields(self):
            value = getattr(self, f.name)
            expected = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"tenant config {f.name} must be a number, got {value!r}")
            if expected is int and not isinstance(value, int):
                raise UserError(f"tenant config {f.name} must be an integer, got {value!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TenantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown tenant config keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, tenant_dir: Path) -> None:
        write_atomic(tenant_dir / TENANT_CONFIG_FILE, tomli_w.dumps(self.to_dict()).encode(),
                     failpoint_prefix="tenant-config")

    @classmethod
    def load(cls, tenant_dir: Path) -> TenantConfig:
        path = tenant_dir / TENANT_CONFIG_FILE
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise CorruptionError(f"tenant config is not valid TOML: {err}",
                                  path=str(path)) from err
        return cls.from_dict(data)


# The physical slot a primary's basebackup creates (restart_lsn = the basebackup LSN) and
# the WAL consumer streams from: the walproposer, or the pageserver's receiver in dev mode.
DEFAULT_SLOT_NAME = "strata_walproposer"


@dataclass(frozen=True, slots=True)
class TimelineInfo:
    tenant_id: TenantId
    timeline_id: TimelineId
    last_record_lsn: Lsn
    prev_record_lsn: Lsn
    disk_consistent_lsn: Lsn
    ancestor_timeline_id: TimelineId | None
    ancestor_lsn: Lsn | None
    gc_cutoff: Lsn
    initdb_lsn: Lsn
    state: str
    broken_reason: str | None
    children: tuple[TimelineId, ...] = ()
    logical_size: int | None = None
    """Only in a single timeline's detail (GET .../timeline/{id})."""
    remote_consistent_lsn: Lsn | None = None
    """Up to where the timeline is in remote storage; None without remote storage."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TimelineInfo:
        anc = data.get("ancestor_timeline_id")
        anc_lsn = data.get("ancestor_lsn")
        return cls(tenant_id=TenantId(TenantId.parse(data["tenant_id"]).raw),
                   timeline_id=TimelineId(TimelineId.parse(data["timeline_id"]).raw),
                   last_record_lsn=Lsn.parse(data["last_record_lsn"]),
                   prev_record_lsn=Lsn.parse(data["prev_record_lsn"]),
                   disk_consistent_lsn=Lsn.parse(data["disk_consistent_lsn"]),
                   ancestor_timeline_id=TimelineId(TimelineId.parse(anc).raw) if anc else None,
                   ancestor_lsn=Lsn.parse(anc_lsn) if anc_lsn else None,
                   gc_cutoff=Lsn.parse(data["gc_cutoff"]),
                   initdb_lsn=Lsn.parse(data["initdb_lsn"]),
                   state=data["state"], broken_reason=data.get("broken_reason"),
                   children=tuple(TimelineId(TimelineId.parse(c).raw)
                                  for c in data.get("children", ())),
                   logical_size=data.get("logical_size"),
                   remote_consistent_lsn=Lsn.parse(data["remote_consistent_lsn"])
                   if data.get("remote_consistent_lsn") else None)


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    lsn: Lsn
    expires_at: float
    """Seconds since the Unix epoch, on the pageserver's clock."""
    renewed: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LeaseInfo:
        return cls(Lsn.parse(data["lsn"]), float(data["expires_at"]),
                   bool(data.get("renewed", False)))
