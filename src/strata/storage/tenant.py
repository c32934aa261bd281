"""Per-tenant configuration: the knobs of ingest, flush, compaction and GC, validated and persisted.

Persisted as `tenant.toml` in the tenant directory; unknown keys and bad values
are refused at load, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from strata.common.errors import CorruptionError, UserError
from strata.storage.metadata import write_atomic

TENANT_CONFIG_FILE = "tenant.toml"


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
                     "tenant-config")

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
