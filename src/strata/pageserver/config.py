"""The pageserver's configuration: `<workdir>/pageserver.toml` plus `-c key=value` overrides.

A frozen dataclass, validated once at start; every error names the key at fault, so a
typo is refused instead of silently falling back to a default. Tenant defaults are the
`[default_tenant_conf]` table (the keys of `strata.pageserver.api.TenantConfig`); on
the command line they are dotted: `-c default_tenant_conf.checkpoint_distance=1048576`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from strata.common.errors import UserError
from strata.pageserver.api import TenantConfig, check_remote_storage_url

CONFIG_FILE = "pageserver.toml"
MAX_CONFIG_VALUE = 2**48  # bytes or seconds: far beyond any sensible setting


def parse_addr(key: str, text: str) -> tuple[str, int]:
    """`host:port` -> (host, port); port 0 means "pick a free one"."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise UserError(f"pageserver config {key} must be host:port, got {text!r}")
    try:
        port = int(port_text)
    except ValueError as err:
        raise UserError(f"pageserver config {key}: port {port_text!r} is not a number") from err
    if not 0 <= port <= 65535:
        raise UserError(f"pageserver config {key}: port {port} is out of range 0..65535")
    return host, port


@dataclass(frozen=True, slots=True)
class PageserverConfig:
    """Everything the pageserver process needs to know at start."""

    workdir: Path
    listen_pg_addr: str = "127.0.0.1:64000"
    """PostgreSQL-protocol port (basebackup)."""
    listen_http_addr: str = "127.0.0.1:9898"
    """Management API."""
    wait_lsn_timeout_s: float = 60.0
    """How long a basebackup waits for WAL up to its LSN to be ingested."""
    ingest_batch_bytes: int = 4 * 1024 * 1024
    """WAL read from the log and decoded per ingest step."""
    log_level: str = "INFO"
    background_jobs: int = 1
    """Compaction/GC/flush jobs that may run at once across all tenants (worker threads)."""
    tick_period_s: float = 1.0
    """How often each timeline's tick (freeze an old open layer, flush frozen ones) runs."""
    max_tenants: int = 1000
    """Tenant creation is refused beyond this many tenants."""
    max_timelines_per_tenant: int = 1000
    """Branch creation is refused beyond this many timelines in one tenant."""
    max_request_body_bytes: int = 1024 * 1024
    """HTTP request bodies above this size are refused with 413."""
    remote_storage: str = ""
    """Object storage URL (file:///path or s3://bucket/prefix?endpoint=...); empty: none.
    With it every layer file and an index per timeline are uploaded (strata.remote)."""
    local_cache_bytes: int = 0
    """With remote storage: keep at most this many bytes of layer files on local disk,
    evicting the least recently read layers that remote storage holds; 0: no limit."""
    ranged_reads_before_download: int = 1
    """With remote storage: a read of a layer not on local disk fetches only the layer's
    index and the blocks it needs (ranged GETs); after this many such reads of one layer
    the whole layer is downloaded in the background. 0: a read downloads the whole layer
    first (no ranged reads)."""
    download_wait_s: float = 0.5
    """With remote storage and ranged reads: a read of a layer whose whole download runs
    in the background waits for it, instead of a ranged GET, when it should be done within
    this many seconds (by the measured download speed). 0: never wait."""
    concurrent_downloads: int = 4
    """With remote storage: at most this many whole-layer downloads of one timeline run at
    once (a compute's start after an empty-disk restart needs many layers; 1: one at a
    time)."""
    generation_check_period_s: float = 10.0
    """With remote storage: how often each tenant's generation marker is read; a tenant
    whose marker names a newer generation than its attachment stops uploading and
    deleting (a newer attachment elsewhere holds it) and serves reads from what it has.
    0: only the check before each deletion."""
    auth_public_key_path: str = ""
    """Ed25519 public key (PEM) of the JWTs the HTTP API and the pg port require
    (strata.common.auth); relative to the workdir. Empty: no authentication."""
    nice: int = 0
    """The pageserver process's nice value (0-19) when it shares cores with the commit
    path (safekeepers, the walproposer sidecar, computes): its WAL ingest is off that path
    and then yields the core to it (docs/walproposer.md, "Cheap changes"). Its threads
    and children get it too: in development mode (no safekeepers) that includes the WAL
    receiver the compute's commits wait for, so leave it 0 there."""
    default_tenant_conf: TenantConfig = field(default_factory=TenantConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.nice <= 19:
            raise UserError(f"pageserver config nice must be 0..19, got {self.nice!r}")
        check_remote_storage_url(self.remote_storage)
        if self.local_cache_bytes < 0:
            raise UserError(f"pageserver config local_cache_bytes must be >= 0, got "
                            f"{self.local_cache_bytes!r}")
        if self.ranged_reads_before_download < 0:
            raise UserError(f"pageserver config ranged_reads_before_download must be >= 0, "
                            f"got {self.ranged_reads_before_download!r}")
        if self.download_wait_s < 0:
            raise UserError(f"pageserver config download_wait_s must be >= 0, got "
                            f"{self.download_wait_s!r}")
        if self.concurrent_downloads < 1:
            raise UserError(f"pageserver config concurrent_downloads must be >= 1, got "
                            f"{self.concurrent_downloads!r}")
        if self.generation_check_period_s < 0:
            raise UserError(f"pageserver config generation_check_period_s must be >= 0, "
                            f"got {self.generation_check_period_s!r}")
        if self.local_cache_bytes and not self.remote_storage:
            raise UserError("pageserver config local_cache_bytes needs remote_storage: "
                            "without it no layer file can leave the local disk")
        parse_addr("listen_pg_addr", self.listen_pg_addr)
        parse_addr("listen_http_addr", self.listen_http_addr)
        if not self.wait_lsn_timeout_s > 0:
            raise UserError(f"pageserver config wait_lsn_timeout_s must be > 0, got "
                            f"{self.wait_lsn_timeout_s!r}")
        if self.ingest_batch_bytes < 8192:
            raise UserError(f"pageserver config ingest_batch_bytes must be >= 8192, got "
                            f"{self.ingest_batch_bytes!r}")
        for name in ("background_jobs", "max_tenants", "max_timelines_per_tenant"):
            if getattr(self, name) < 1:
                raise UserError(f"pageserver config {name} must be >= 1, got "
                                f"{getattr(self, name)!r}")
        if not self.tick_period_s > 0:
            raise UserError(f"pageserver config tick_period_s must be > 0, got "
                            f"{self.tick_period_s!r}")
        if self.max_request_body_bytes < 1024:
            raise UserError(f"pageserver config max_request_body_bytes must be >= 1024, got "
                            f"{self.max_request_body_bytes!r}")
        if self.log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise UserError(f"pageserver config log_level must be DEBUG, INFO, WARNING or "
                            f"ERROR, got {self.log_level!r}")

    @property
    def auth_public_key(self) -> Path | None:
        if not self.auth_public_key_path:
            return None
        return self.workdir / self.auth_public_key_path  # an absolute path stays as it is

    @property
    def pg_addr(self) -> tuple[str, int]:
        return parse_addr("listen_pg_addr", self.listen_pg_addr)

    @property
    def http_addr(self) -> tuple[str, int]:
        return parse_addr("listen_http_addr", self.listen_http_addr)

    @classmethod
    def from_dict(cls, workdir: Path, data: Mapping[str, Any]) -> PageserverConfig:
        """Build from parsed TOML; unknown keys and wrongly typed values are refused."""
        known = {f.name: f for f in fields(cls) if f.name != "workdir"}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise UserError(f"unknown pageserver config keys {unknown}; known: "
                            f"{sorted(known)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name == "default_tenant_conf":
                if not isinstance(value, Mapping):
                    raise UserError("pageserver config default_tenant_conf must be a table, "
                                    f"got {value!r}")
                try:
                    kwargs[name] = tenant_config_from_json(TenantConfig(), dict(value))
                except UserError as err:
                    raise UserError(f"pageserver config default_tenant_conf: {err}") from err
                continue
            expected = {"str": str, "float": float, "int": int}[str(known[name].type)]
            if isinstance(value, bool) or not isinstance(value, expected) and not (
                    expected is float and isinstance(value, int)):
                raise UserError(f"pageserver config {name} must be a {expected.__name__}, "
                                f"got {value!r}")
            kwargs[name] = float(value) if isinstance(value, int) and expected is float \
                else value
        return cls(workdir=workdir, **kwargs)

    @classmethod
    def load(cls, workdir: Path, overrides: Iterable[str] = ()) -> PageserverConfig:
        """`<workdir>/pageserver.toml` (optional) with `key=value` overrides on top."""
        path = workdir / CONFIG_FILE
        data: dict[str, Any] = {}
        if path.exists():
            try:
                data = tomllib.loads(path.read_text())
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path} is not valid TOML: {err}") from err
        for item in overrides:
            _apply_override(data, item)
        return cls.from_dict(workdir, data)


def tenant_config_from_json(base: TenantConfig, data: dict[str, Any]) -> TenantConfig:
    """`base` with the keys of `data` replaced; unknown keys and non-numbers are refused
    here (TenantConfig's own checks compare before they check types)."""
    types = {f.name: f.type for f in dataclasses.fields(TenantConfig)}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise UserError(f"unknown tenant config keys {[_short(k) for k in unknown]}; known: "
                        f"{sorted(types)}")
    merged = base.to_dict()
    for key, value in data.items():
        integral = types[key] in ("int", int)
        what = "an integer" if integral else "a number"
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise UserError(f"tenant config {key} must be {what}, got {_short(value)}")
        # Bounded so that time and LSN arithmetic on it stays finite (no 1e308 seconds).
        if not (math.isfinite(value) and abs(value) <= MAX_CONFIG_VALUE):
            raise UserError(f"tenant config {key} must be at most {MAX_CONFIG_VALUE}, got "
                            f"{_short(value)}")
        merged[key] = value
    return TenantConfig.from_dict(merged)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _apply_override(data: dict[str, Any], item: str) -> None:
    """`key=value` or `table.key=value`; the value is TOML, or else a bare string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"config override {item!r} must look like key=value")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # `listen_http_addr=127.0.0.1:9898` without quotes
    *tables, leaf = key.split(".")
    target = data
    for table in tables:
        sub = target.setdefault(table, {})
        if not isinstance(sub, dict):
            raise UserError(f"config override {item!r}: {table} is not a table")
        target = sub
    target[leaf] = value
