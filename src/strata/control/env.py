"""The environment directory of the `strata` CLI: its config TOML, its state file, its paths.

An environment (`.strata/` by default, `--repo-dir` or `$STRATA_REPO_DIR` to choose
another) holds:

    config.toml          what to run: ports, tenant defaults, endpoint defaults (user-editable)
    state.json           what exists: tenants, branch names -> timeline ids, endpoints
    console.token        the web console's login token (mode 0600, made by `strata init`)
    pageserver/          the pageserver's workdir (its files, not ours); pageserver-N/
                         that of pageserver N (`strata pageserver add`)
    safekeepers/skN/     safekeeper N's workdir (wal_mode = "safekeepers")
    endpoints/NAME/      compute/ (rebuilt at every start: pgdata/, and in lazy mode the
                         page store lazy/ and the FUSE mount mnt/) and saved/ (settings
                         and statistics saved at its last clean stop)
    logs/ run/           a log file and a pid file per process

Branch names are labels kept here (architecture D5); the pageserver only knows ids.
`state.json` is rewritten atomically (temp file, fsync, rename) under `.lock` (flock), so
two `strata` commands never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import secrets
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Self, TypeVar

import tomli_w

from strata.common.auth import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE
from strata.common.durable import write_atomic
from strata.common.errors import NotFound, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable, free_port
from strata.pageserver.api import TenantConfig

REPO_DIR_ENV = "STRATA_REPO_DIR"
DEFAULT_REPO_DIR = ".strata"
CONFIG_FILE = "config.toml"
STATE_FILE = "state.json"
CONSOLE_TOKEN_FILE = "console.token"
STATE_VERSION = 1
DEFAULT_BRANCH = "main"
DEFAULT_ENDPOINT = "main"
SEAWEED_HOST = "127.0.0.1"  # the environment's own SeaweedFS listens on loopback only

DEFAULT_SAFEKEEPERS = 3
SAFEKEEPERS_OFF = (
    "this environment runs with wal_mode = \"pageserver\" (development mode, D7: the "
    "pageserver is each primary's WAL receiver) and has no safekeepers; create one with "
    "wal_mode = \"safekeepers\" to use them")


class _Choice(enum.StrEnum):
    """A setting with a few string values, parsed once where it is read."""

    @classmethod
    def parse(cls, value: object, what: str) -> Self:
        """The member whose value is `value`; a UserError naming `what` otherwise."""
        for member in cls:
            if member.value == value:
                return member
        raise UserError(f"{what} must be one of {[m.value for m in cls]}, got {value!r}")


class WalMode(_Choice):
    """Where a primary's WAL is made durable (config.toml `wal_mode`, architecture D7)."""

    SAFEKEEPERS = "safekeepers"
    """A majority of the safekeepers, through the walproposer sidecar."""
    PAGESERVER = "pageserver"
    """Development mode: the pageserver is the primary's synchronous standby."""


class CommitMode(_Choice):
    """How a primary's commits reach the safekeepers (config.toml `commit_mode`, with
    wal_mode = "safekeepers"; docs/walproposer.md)."""

    PUSH = "push"
    """The walproposer sidecar is the one synchronous standby and sends the WAL on."""
    PULL = "pull"
    """The safekeepers replicate from the compute themselves (slots sk1..skN,
    `synchronous_standby_names = 'ANY <majority> (sk1, ...)'`); the sidecar elects, tells
    them to pull, hands them the commit LSN and its backpressure limit. The default with
    wal_mode = "safekeepers" (it measured faster than push: docs/walproposer.md)."""


class ComputeMode(_Choice):
    """How an endpoint's data directory is built (`endpoint start --mode`)."""

    LAZY = "lazy"
    """A basebackup without relation files; pages fetched on demand over FUSE."""
    FULL = "full"
    """A whole basebackup."""


def repo_dir_from(option: str | None) -> Path:
    """--repo-dir, else $STRATA_REPO_DIR, else ./.strata (absolute)."""
    text = option or os.environ.get(REPO_DIR_ENV) or DEFAULT_REPO_DIR
    return Path(text).expanduser().absolute()


# --- config ------------------------------------------------------------------------------------
def _check_port(where: str, port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"config {where} must be a port number 0..65535 (0: allocate one at "
                        f"init), got {port!r}")
    return port


def _check_keys(where: str, data: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown keys {unknown} in config {where}; known: {sorted(known)}")


def _table(where: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"config {where} must be a table, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class PageserverSettings:
    host: str = "127.0.0.1"
    pg_port: int = 0
    http_port: int = 0
    config: Mapping[str, Any] = field(default_factory=dict)
    """Extra pageserver.toml keys (strata.pageserver.config), passed as -c overrides.
    Every pageserver of the environment has those of [pageserver.config]."""
    id: int = 1
    """1 for [pageserver]; the others ([[pageservers]], `strata pageserver add`) 2, 3..."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PageserverSettings:
        _check_keys("[pageserver]", data, {"host", "pg_port", "http_port", "config"})
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise UserError(f"config [pageserver] host must be a host name, got {host!r}")
        extra = _table("[pageserver.config]", data.get("config", {}))
        for key in ("listen_pg_addr", "listen_http_addr"):
            if key in extra:
                raise UserError(f"config [pageserver.config] must not set {key}; set "
                                "[pageserver] host, pg_port and http_port instead")
        return cls(host, _check_port("[pageserver] pg_port", data.get("pg_port", 0)),
                   _check_port("[pageserver] http_port", data.get("http_port", 0)), extra)

    @classmethod
    def more_from_dict(cls, data: Mapping[str, Any],
                       config: Mapping[str, Any]) -> PageserverSettings:
        """An entry of [[pageservers]] (id 2 and up), with [pageserver.config]."""
        _check_keys("[[pageservers]]", data, {"id", "host", "pg_port", "http_port"})
        ps_id = data.get("id")
        if not isinstance(ps_id, int) or isinstance(ps_id, bool) or ps_id < 2:
            raise UserError(f"config [[pageservers]] id must be an integer >= 2 (1 is "
                            f"[pageserver]), got {ps_id!r}")
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise UserError(f"config [[pageservers]] host must be a host name, got {host!r}")
        return cls(host, _check_port("[[pageservers]] pg_port", data.get("pg_port", 0)),
                   _check_port("[[pageservers]] http_port", data.get("http_port", 0)),
                   config, ps_id)


@dataclass(frozen=True, slots=True)
class SafekeeperSettings:
    id: int
    host: str = "127.0.0.1"
    pg_port: int = 0
    http_port: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SafekeeperSettings:
        _check_keys("[[safekeepers]]", data, {"id", "host", "pg_port", "http_port"})
        sk_id = data.get("id")
        if isinstance(sk_id, bool) or not isinstance(sk_id, int) or sk_id < 1:
            raise UserError(f"config [[safekeepers]] id must be a positive integer, got "
                            f"{sk_id!r}")
        return cls(sk_id, str(data.get("host", "127.0.0.1")),
                   _check_port(f"safekeeper {sk_id} pg_port", data.get("pg_port", 0)),
                   _check_port(f"safekeeper {sk_id} http_port", data.get("http_port", 0)))


@dataclass(frozen=True, slots=True)
class EndpointDefaults:
    """Settings of every endpoint's PostgreSQL (`settings` are extra postgresql.conf lines)."""

    host: str = "127.0.0.1"
    shared_buffers: str = "64MB"
    max_connections: int = 100
    start_timeout_s: float = 120.0
    """Bound on each wait of `endpoint start` (sync, pageserver catch-up, PostgreSQL)."""
    lazy_outage_wait_s: float = 60.0
    """Lazy mode: how long a page read waits for an unreachable pageserver to come back."""
    settings: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointDefaults:
        _check_keys("[endpoint_defaults]", data,
                    {"host", "shared_buffers", "max_connections", "start_timeout_s",
                     "lazy_outage_wait_s", "settings"})
        out = cls(host=str(data.get("host", "127.0.0.1")),
                  shared_buffers=str(data.get("shared_buffers", "64MB")),
                  max_connections=data.get("max_connections", 100),
                  start_timeout_s=data.get("start_timeout_s", 120.0),
                  lazy_outage_wait_s=data.get("lazy_outage_wait_s", 60.0),
                  settings=_table("[endpoint_defaults.settings]", data.get("settings", {})))
        if isinstance(out.max_connections, bool) or not isinstance(out.max_connections, int) \
                or out.max_connections < 1:
            raise UserError(f"config [endpoint_defaults] max_connections must be an integer "
                            f">= 1, got {out.max_connections!r}")
        if isinstance(out.start_timeout_s, bool) or \
                not isinstance(out.start_timeout_s, int | float) or out.start_timeout_s <= 0:
            raise UserError(f"config [endpoint_defaults] start_timeout_s must be a number > 0, "
                            f"got {out.start_timeout_s!r}")
        wait_s = out.lazy_outage_wait_s
        if isinstance(wait_s, bool) or not isinstance(wait_s, int | float) \
                or not 0 <= wait_s <= 3600:
            raise UserError(f"config [endpoint_defaults] lazy_outage_wait_s must be a number "
                            f"of seconds 0..3600, got {wait_s!r}")
        return out


DEFAULT_PROXY_DOMAIN = "localhost"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The proxy (`strata.proxy`): one PostgreSQL port for every endpoint, with TLS."""

    host: str = "127.0.0.1"
    port: int = 0
    domain: str = DEFAULT_PROXY_DOMAIN
    """Clients name endpoint E with the TLS host name `E.<domain>` (SNI)."""
    tls_cert: str = ""
    """PEM certificate and key files; empty: the self-signed pair `strata init` made in
    proxy/ of the environment."""
    tls_key: str = ""
    kernel_relay: bool = True
    """Plain (not TLS) connections: the compute's bytes forwarded by the kernel (a BPF
    sockmap) where the proxy may (CAP_BPF and CAP_NET_ADMIN), else the splice threads
    (one log line); false: the splice threads always; docs/proxy.md "Kernel
    forwarding"."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProxySettings:
        _check_keys("[proxy]", data, {"host", "port", "domain", "tls_cert", "tls_key",
                                      "kernel_relay"})
        kernel_relay = data.get("kernel_relay", True)
        if not isinstance(kernel_relay, bool):
            raise UserError(f"config [proxy] kernel_relay must be true or false, got "
                            f"{kernel_relay!r}")
        out = cls(host=str(data.get("host", "127.0.0.1")),
                  port=_check_port("[proxy] port", data.get("port", 0)),
                  domain=str(data.get("domain", DEFAULT_PROXY_DOMAIN)).strip("."),
                  tls_cert=str(data.get("tls_cert", "")), tls_key=str(data.get("tls_key", "")),
                  kernel_relay=kernel_relay)
        if not out.domain:
            raise UserError("config [proxy] domain must not be empty (endpoints are named "
                            "<endpoint>.<domain> in TLS)")
        if bool(out.tls_cert) != bool(out.tls_key):
            raise UserError("config [proxy] needs both tls_cert and tls_key, or neither (the "
                            "self-signed pair made at init)")
        return out


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """The web console (`strata console`, started by `strata start`); loopback by default."""

    host: str = "127.0.0.1"
    port: int = 0

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConsoleSettings:
        _check_keys("[console]", data, {"host", "port"})
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str) or not host:
            raise UserError(f"config [console] host must be a host name, got {host!r}")
        return cls(host, _check_port("[console] port", data.get("port", 0)))


def _seaweed_ports(value: object) -> dict[str, int] | None:
    """[seaweedfs] ports = {"s3.port" = N, ...}: every port SeaweedFS listens on."""
    if value is None:
        return None
    data = _table("[seaweedfs]", value)
    _check_keys("[seaweedfs]", data, {"ports"})
    ports = _table("[seaweedfs] ports", data.get("ports", {}))
    if "s3.port" not in ports:
        raise UserError('config [seaweedfs] ports must name "s3.port" (and the other ports '
                        "SeaweedFS listens on); `strata init --object-storage seaweedfs` "
                        "writes them")
    return {name: _check_port(f"[seaweedfs] ports.{name}", port)
            for name, port in ports.items()}


@dataclass(frozen=True, slots=True)
class EnvConfig:
    """config.toml, validated. Ports 0 are allocated (and written back) by `strata init`."""

    wal_mode: WalMode = WalMode.SAFEKEEPERS
    commit_mode: CommitMode = CommitMode.PULL
    """With wal_mode = "safekeepers": who moves the WAL from the compute to them (read
    at each endpoint start). Default pull; push with wal_mode = "pageserver", where it
    does not apply."""
    pageserver: PageserverSettings = field(default_factory=PageserverSettings)
    safekeepers: tuple[SafekeeperSettings, ...] = tuple(
        SafekeeperSettings(i + 1) for i in range(DEFAULT_SAFEKEEPERS))
    tenant_defaults: Mapping[str, Any] = field(default_factory=dict)
    endpoint_defaults: EndpointDefaults = field(default_factory=EndpointDefaults)
    console: ConsoleSettings = field(default_factory=ConsoleSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    auth: bool = False
    """The services require JWTs (strata.common.auth); `strata init` turns it on and makes
    the key pair (`--no-auth`: off). An environment without the key is off."""
    seaweedfs: Mapping[str, int] | None = None
    """The ports of the environment's own SeaweedFS S3 server (`strata init
    --object-storage seaweedfs`; strata.control.object_storage), or None."""
    more_pageservers: tuple[PageserverSettings, ...] = ()
    """[[pageservers]]: pageservers 2, 3... (`strata pageserver add`); tenants move
    between them with `strata tenant relocate`."""
    picked_ports: Mapping[str, int] = field(default_factory=dict)
    """[picked_ports]: the ports strata picked itself (a port 0 at `strata init`, `strata
    pageserver add`, and SeaweedFS's at `strata init --object-storage seaweedfs`), by slot
    ("pageserver.1.pg_port", "safekeeper.2.http_port", "console.port", "proxy.port",
    "seaweedfs.s3.port"). A port still at its picked value is strata's to change:
    a start that finds it taken picks another and records it (`repick`); a port the user
    set (or edited) is never changed."""

    def __post_init__(self) -> None:
        assert isinstance(self.wal_mode, WalMode), self.wal_mode
        assert isinstance(self.commit_mode, CommitMode), self.commit_mode
        if self.commit_mode is CommitMode.PULL and self.wal_mode is not WalMode.SAFEKEEPERS:
            raise UserError("config commit_mode = \"pull\" needs wal_mode = \"safekeepers\" "
                            "(the safekeepers pull the WAL)")
        if self.wal_mode is WalMode.SAFEKEEPERS and not self.safekeepers:
            raise UserError("config wal_mode = \"safekeepers\" needs [[safekeepers]] entries "
                            "(3 is usual: a majority of 2 keeps committing while one is down)")
        ids = [sk.id for sk in self.safekeepers]
        if len(set(ids)) != len(ids):
            raise UserError(f"config [[safekeepers]] ids must be unique, got {ids}")
        ps_ids = [ps.id for ps in self.pageservers]
        if len(set(ps_ids)) != len(ps_ids):
            raise UserError(f"config [[pageservers]] ids must be unique, got {ps_ids[1:]}")
        # Validated here so a typo is refused at init, not when the pageserver starts.
        if self.tenant_defaults:
            TenantConfig.from_dict(dict(self.tenant_defaults))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EnvConfig:
        _check_keys("(top level)", data, {"wal_mode", "commit_mode", "pageserver",
                                          "safekeepers",
                                          "tenant_defaults", "endpoint_defaults",
                                          "console", "proxy", "auth", "seaweedfs",
                                          "pageservers", "picked_ports"})
        auth = data.get("auth", False)
        if not isinstance(auth, bool):
            raise UserError(f"config auth must be true or false, got {auth!r}")
        wal_mode = WalMode.parse(data.get("wal_mode", WalMode.SAFEKEEPERS.value),
                                 "config wal_mode")
        # Without a list: three safekeepers in safekeeper mode, none in development mode.
        sks = data.get("safekeepers", [{"id": i + 1} for i in range(DEFAULT_SAFEKEEPERS)]
                       if wal_mode is WalMode.SAFEKEEPERS else [])
        if not isinstance(sks, list):
            raise UserError(f"config safekeepers must be an array of tables, got {sks!r}")
        more = data.get("pageservers", [])
        if not isinstance(more, list):
            raise UserError(f"config pageservers must be an array of tables, got {more!r}")
        first = PageserverSettings.from_dict(_table("[pageserver]", data.get("pageserver", {})))
        return cls(
            wal_mode=wal_mode,
            commit_mode=CommitMode.parse(
                data.get("commit_mode", (CommitMode.PULL if wal_mode is WalMode.SAFEKEEPERS
                                         else CommitMode.PUSH).value),
                "config commit_mode"),
            pageserver=first,
            more_pageservers=tuple(
                PageserverSettings.more_from_dict(_table("[[pageservers]]", ps), first.config)
                for ps in more),
            safekeepers=tuple(SafekeeperSettings.from_dict(_table("[[safekeepers]]", s))
                              for s in sks),
            tenant_defaults=_table("[tenant_defaults]", data.get("tenant_defaults", {})),
            endpoint_defaults=EndpointDefaults.from_dict(
                _table("[endpoint_defaults]", data.get("endpoint_defaults", {}))),
            console=ConsoleSettings.from_dict(_table("[console]", data.get("console", {}))),
            proxy=ProxySettings.from_dict(_table("[proxy]", data.get("proxy", {}))),
            auth=auth, seaweedfs=_seaweed_ports(data.get("seaweedfs")),
            picked_ports={name: _check_port(f"[picked_ports] {name}", port) for name, port
                          in _table("[picked_ports]", data.get("picked_ports", {})).items()})

    @classmethod
    def load(cls, path: Path) -> EnvConfig:
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as err:
            raise NotFound(f"config file {path} does not exist") from err
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"{path} is not valid TOML: {err}") from err
        try:
            return cls.from_dict(data)
        except UserError as err:
            raise UserError(f"{path}: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        return {
            "wal_mode": self.wal_mode.value,
            "commit_mode": self.commit_mode.value,
            "auth": self.auth,
            "safekeepers": [asdict(sk) for sk in self.safekeepers],
            "pageserver": {"host": self.pageserver.host, "pg_port": self.pageserver.pg_port,
                           "http_port": self.pageserver.http_port,
                           "config": dict(self.pageserver.config)},
            "tenant_defaults": dict(self.tenant_defaults),
            "endpoint_defaults": {**asdict(self.endpoint_defaults),
                                  "settings": dict(self.endpoint_defaults.settings)},
            "console": asdict(self.console),
            "proxy": asdict(self.proxy),
            **({"seaweedfs": {"ports": dict(self.seaweedfs)}} if self.seaweedfs else {}),
            **({"pageservers": [{"id": ps.id, "host": ps.host, "pg_port": ps.pg_port,
                                 "http_port": ps.http_port} for ps in self.more_pageservers]}
               if self.more_pageservers else {}),
            **({"picked_ports": dict(self.picked_ports)} if self.picked_ports else {}),
        }

    def with_ports_allocated(self) -> EnvConfig:
        """Replace every port 0 by a port that is free now (the OS picks it), each one
        different from the others (the OS may hand out a just-closed port again)."""
        taken = self.ports() - {0}

        def pick(port: int, host: str) -> int:
            if port:
                return port
            while not port or port in taken:
                port = free_port(host)
            taken.add(port)
            return port

        ps = self.pageserver
        ps = replace(ps, pg_port=pick(ps.pg_port, ps.host),
                     http_port=pick(ps.http_port, ps.host))
        more = tuple(replace(p, pg_port=pick(p.pg_port, p.host),
                             http_port=pick(p.http_port, p.host))
                     for p in self.more_pageservers)
        sks = tuple(replace(sk, pg_port=pick(sk.pg_port, sk.host),
                            http_port=pick(sk.http_port, sk.host))
                    for sk in self.safekeepers)
        console = replace(self.console, port=pick(self.console.port, self.console.host))
        proxy = replace(self.proxy, port=pick(self.proxy.port, self.proxy.host))
        out = replace(self, pageserver=ps, safekeepers=sks, console=console, proxy=proxy,
                      more_pageservers=more)
        before = self.port_slots()
        picked = {name: port for name, port in out.port_slots().items()
                  if before[name] == 0}
        return replace(out, picked_ports={**self.picked_ports, **picked})

    def port_slots(self) -> dict[str, int]:
        """The ports of strata's own services by slot name (see `picked_ports`)."""
        out = {}
        for ps in self.pageservers:
            out[f"pageserver.{ps.id}.pg_port"] = ps.pg_port
            out[f"pageserver.{ps.id}.http_port"] = ps.http_port
        for sk in self.safekeepers:
            out[f"safekeeper.{sk.id}.pg_port"] = sk.pg_port
            out[f"safekeeper.{sk.id}.http_port"] = sk.http_port
        out["console.port"] = self.console.port
        out["proxy.port"] = self.proxy.port
        for name, port in (self.seaweedfs or {}).items():
            out[f"seaweedfs.{name}"] = port
        return out

    def repick(self, slots: list[str]) -> EnvConfig | None:
        """A new free port for each slot (taken by another process), or None when one of
        them is not strata's to change (the user set it: not at its picked value)."""
        current = self.port_slots()
        if not slots or any(self.picked_ports.get(slot) != current[slot] or not current[slot]
                            for slot in slots):
            return None
        out, taken = self, self.ports() - {0}
        for slot in slots:
            host = self._slot_host(slot)
            port = 0
            while not port or port in taken:
                port = free_port(host)
            taken.add(port)
            out = out._with_slot(slot, port)
        return replace(out, picked_ports={**out.picked_ports,
                                          **{slot: out.port_slots()[slot] for slot in slots}})

    def _slot_host(self, slot: str) -> str:
        kind, *rest = slot.split(".")
        if kind == "pageserver":
            return self.pageserver_by_id(int(rest[0])).host
        if kind == "safekeeper":
            return self.safekeeper(int(rest[0])).host
        if kind == "seaweedfs":
            return SEAWEED_HOST
        return self.console.host if kind == "console" else self.proxy.host

    def _with_slot(self, slot: str, port: int) -> EnvConfig:
        kind, *rest = slot.split(".")
        if kind == "pageserver":
            ps_id, attr = int(rest[0]), rest[1]
            if ps_id == self.pageserver.id:
                return replace(self, pageserver=_with_port(self.pageserver, attr, port))
            return replace(self, more_pageservers=tuple(
                _with_port(ps, attr, port) if ps.id == ps_id else ps
                for ps in self.more_pageservers))
        if kind == "safekeeper":
            sk_id, attr = int(rest[0]), rest[1]
            return replace(self, safekeepers=tuple(
                _with_port(sk, attr, port) if sk.id == sk_id else sk
                for sk in self.safekeepers))
        if kind == "console":
            return replace(self, console=replace(self.console, port=port))
        if kind == "seaweedfs":
            return self._with_seaweed_port(".".join(rest), port)
        assert kind == "proxy", slot
        return replace(self, proxy=replace(self.proxy, port=port))

    def _with_seaweed_port(self, name: str, port: int) -> EnvConfig:
        """SeaweedFS's port `name` changed; for its S3 port, also the remote_storage URL
        that names it (the pageservers', which the safekeepers get too)."""
        assert self.seaweedfs is not None and name in self.seaweedfs, name
        out = replace(self, seaweedfs={**self.seaweedfs, name: port})
        if name != "s3.port":
            return out
        old = f"?endpoint=http://{SEAWEED_HOST}:{self.seaweedfs[name]}"

        def moved(ps: PageserverSettings) -> PageserverSettings:
            url = ps.config.get("remote_storage")
            if not isinstance(url, str) or not url.endswith(old):
                return ps
            new_url = url[:-len(old)] + f"?endpoint=http://{SEAWEED_HOST}:{port}"
            return replace(ps, config={**ps.config, "remote_storage": new_url})

        return replace(out, pageserver=moved(out.pageserver),
                       more_pageservers=tuple(map(moved, out.more_pageservers)))

    def ports(self) -> set[int]:
        """Every port of the storage services, the console and the proxy."""
        out = {self.proxy.port, *(self.seaweedfs or {}).values()}
        for ps in self.pageservers:
            out |= {ps.pg_port, ps.http_port}
        for sk in self.safekeepers:
            out |= {sk.pg_port, sk.http_port}
        return out | {self.console.port}

    @property
    def pageservers(self) -> tuple[PageserverSettings, ...]:
        """Every pageserver: [pageserver] (id 1), then [[pageservers]]."""
        return (self.pageserver, *self.more_pageservers)

    def pageserver_by_id(self, ps_id: int) -> PageserverSettings:
        for ps in self.pageservers:
            if ps.id == ps_id:
                return ps
        raise NotFound(f"no pageserver with id {ps_id}; config.toml has ids "
                       f"{[ps.id for ps in self.pageservers]} (`strata pageserver add` adds "
                       "one)")

    def safekeeper(self, sk_id: int) -> SafekeeperSettings:
        for sk in self.safekeepers:
            if sk.id == sk_id:
                return sk
        raise NotFound(f"no safekeeper with id {sk_id}; config.toml has ids "
                       f"{[sk.id for sk in self.safekeepers]}")


_Ports = TypeVar("_Ports", "PageserverSettings", "SafekeeperSettings")


def _with_port(settings: _Ports, attr: str, port: int) -> _Ports:
    assert attr in ("pg_port", "http_port"), attr
    return replace(settings, pg_port=port) if attr == "pg_port" else \
        replace(settings, http_port=port)


CONFIG_HEADER = """\
# Strata environment configuration (written by `strata init`; edit, then `strata start`).
# wal_mode = "safekeepers": each primary's WAL is made durable on a majority of the
# [[safekeepers]] by its walproposer sidecar; the pageserver follows the safekeepers (D7).
# wal_mode = "pageserver": development mode (D7): the pageserver is each primary's
# synchronous standby; [[safekeepers]] are not used.
# commit_mode = "pull" (the default): the safekeepers replicate each primary's WAL
# themselves (slots sk1..skN, synchronous_standby_names = 'ANY <majority> (sk1, ...)');
# the sidecar only elects and hands them the commit LSN. "push": the sidecar is the one
# synchronous standby and sends the WAL on. Taken at each endpoint start.
# [tenant_defaults]: keys of strata.pageserver.api.TenantConfig (checkpoint_distance, ...).
# [pageserver.config]: extra pageserver.toml keys (wait_lsn_timeout_s, log_level, ...).
# [endpoint_defaults.settings]: extra postgresql.conf entries for every endpoint.
# [proxy]: the one PostgreSQL port of every endpoint (TLS; endpoint E is E.<domain>).
# auth = true: the pageserver and safekeepers require JWTs signed by auth_private_key.pem
# (docs/auth.md); `strata auth token` prints one.
# [seaweedfs]: the ports of the environment's own S3 server (init --object-storage seaweedfs).
# [[pageservers]]: pageservers 2, 3... (`strata pageserver add`), with [pageserver.config].
# [picked_ports]: ports strata picked; one found taken at a start is picked again (and
# changed here and above); a port you set yourself (or edit) is never changed.
"""


# --- state -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class EndpointState:
    """One endpoint: a compute on a branch; primary at its head, or read-only at `lsn`."""

    name: str
    tenant_id: TenantId
    branch: str
    port: int
    lsn: Lsn | None = None
    """Where a read-only endpoint reads; None for a primary."""
    autostart: bool = True
    """Started by `strata start`: set by `endpoint start`, cleared by `endpoint stop`."""
    mode: ComputeMode | None = None
    """As last asked with `endpoint start --mode`; None: lazy where FUSE is usable, else
    full."""
    suspend_timeout_s: float = 300.0
    """The proxy stops the endpoint after this long without a client connection through
    it (0: never)."""
    port_picked: bool = False
    """strata picked `port` (no --port): a start that finds it taken by another process
    picks another and saves it here. A port the user gave is never changed."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EndpointState:
        mode, lsn = data.get("mode"), data.get("lsn")
        return cls(**{**data, "tenant_id": TenantId.parse(data["tenant_id"]),
                      "lsn": None if lsn is None else Lsn.parse(lsn),
                      "mode": None if mode is None else ComputeMode.parse(mode, "mode")})

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "tenant_id": str(self.tenant_id),
                "lsn": None if self.lsn is None else str(self.lsn),
                "mode": None if self.mode is None else self.mode.value}

    @property
    def read_only(self) -> bool:
        return self.lsn is not None

    @property
    def read_lsn(self) -> Lsn | None:
        return self.lsn


@dataclass
class TenantState:
    name: str
    branches: dict[str, TimelineId] = field(default_factory=dict)  # branch name -> timeline
    config: dict[str, Any] = field(default_factory=dict)  # overrides given at create
    system_id: int | None = None
    """pg_control's system identifier of the tenant's cluster (all its branches share it);
    the safekeepers check it. Read from a basebackup the first time it is needed."""
    roles: dict[str, dict[str, str]] = field(default_factory=dict)
    """branch name -> role name -> SCRAM secret (`strata role`; the proxy checks them)."""
    app_role_timelines: list[TimelineId] = field(default_factory=list)
    """Timelines on which a primary made the application role and database (architecture
    D8); a later start of a primary there skips that step (the role is in its data)."""
    generation: int = 1
    """The generation of the tenant's current attachment to the pageserver (D9): every
    attach from object storage takes the next one, recorded here before the attach."""
    attached: bool = True
    """On the pageserver; false after `strata tenant detach` (only in object storage)."""
    pageserver: int = 1
    """The id of the pageserver it is attached to (`strata tenant relocate` moves it)."""

    @classmethod
    def from_json(cls, t: dict[str, Any]) -> TenantState:
        """A tenant of state.json, its timeline ids parsed (older files lack the later keys)."""
        return cls(t["name"], {b: TimelineId.parse(tl) for b, tl in t["branches"].items()},
                   dict(t["config"]), t.get("system_id"),
                   {b: dict(r) for b, r in t.get("roles", {}).items()},
                   [TimelineId.parse(tl) for tl in t.get("app_role_timelines", [])],
                   int(t.get("generation", 1)), bool(t.get("attached", True)),
                   int(t.get("pageserver", 1)))

    def to_json(self) -> dict[str, Any]:
        """The ids as the file has them: 32 hex digits."""
        return {**asdict(self), "branches": {b: str(tl) for b, tl in self.branches.items()},
                "app_role_timelines": [str(tl) for tl in self.app_role_timelines]}


@dataclass
class State:
    """state.json: the control plane's names for what the pageserver holds."""

    default_tenant: TenantId | None = None
    tenants: dict[TenantId, TenantState] = field(default_factory=dict)
    endpoints: dict[str, EndpointState] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> State:
        if data.get("version") != STATE_VERSION:
            raise UserError(f"{path} has state version {data.get('version')!r}; this strata "
                            f"reads version {STATE_VERSION}")
        default = data.get("default_tenant")
        return cls(
            default_tenant=None if default is None else TenantId.parse(default),
            tenants={TenantId.parse(tid): TenantState.from_json(t)
                     for tid, t in data["tenants"].items()},
            endpoints={name: EndpointState.from_json(e) for name, e in data["endpoints"].items()})

    def to_json(self) -> dict[str, Any]:
        default = None if self.default_tenant is None else str(self.default_tenant)
        return {"version": STATE_VERSION, "default_tenant": default,
                "tenants": {str(tid): t.to_json() for tid, t in self.tenants.items()},
                "endpoints": {name: e.to_json() for name, e in self.endpoints.items()}}

    # --- lookups with errors that say what to do ----------------------------------------------
    def tenant_id(self, name_or_id: str | None) -> TenantId:
        """A tenant by name or id (32 hex digits); None is the default tenant."""
        if name_or_id is None:
            if self.default_tenant is None:
                raise NotFound("the environment has no tenant; run `strata tenant create`")
            return self.default_tenant
        with contextlib.suppress(UserError):
            if (parsed := TenantId.parse(name_or_id)) in self.tenants:
                return parsed
        for tid, tenant in self.tenants.items():
            if tenant.name == name_or_id:
                return tid
        raise NotFound(f"no tenant named {name_or_id!r}; see `strata tenant list`")

    def timeline_id(self, tenant_id: TenantId, branch: str) -> TimelineId:
        branches = self.tenants[tenant_id].branches
        if branch not in branches:
            known = ", ".join(sorted(branches)) or "none"
            raise NotFound(f"no branch named {branch!r} in tenant "
                           f"{self.tenants[tenant_id].name} ({tenant_id}); branches: {known}; "
                           "see `strata timeline list`")
        return branches[branch]

    def endpoint(self, name: str) -> EndpointState:
        if name not in self.endpoints:
            known = ", ".join(sorted(self.endpoints)) or "none"
            raise NotFound(f"no endpoint named {name!r}; endpoints: {known}; see "
                           "`strata endpoint list`")
        return self.endpoints[name]


def allocate_port(config: EnvConfig, state: State) -> int:
    """A free port for an endpoint, none of the services' nor another endpoint's."""
    used = {ep.port for ep in state.endpoints.values()}
    used |= config.ports()
    for _ in range(100):
        port = free_port(config.endpoint_defaults.host)
        if port not in used:
            return port
    raise UserError("could not allocate a free port for the endpoint")


# --- the directory -----------------------------------------------------------------------------
class Environment:
    """One environment directory. `open()` requires it to exist; `create()` makes it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    @property
    def pageserver_dir(self) -> Path:
        return self.root / "pageserver"

    def pageserver_workdir(self, ps_id: int) -> Path:
        """Pageserver 1's is pageserver/ (as before there were several), N's pageserver-N/."""
        return self.pageserver_dir if ps_id == 1 else self.root / f"pageserver-{ps_id}"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def console_token_path(self) -> Path:
        return self.root / CONSOLE_TOKEN_FILE

    def console_token(self) -> str:
        """The web console's login token, made (random, mode 0600) if there is none yet."""
        try:
            token = self.console_token_path.read_text().strip()
        except FileNotFoundError:
            token = ""
        if not token:
            token = secrets.token_urlsafe(24)
            fd = os.open(self.console_token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token + "\n")
        return token

    @property
    def proxy_dir(self) -> Path:
        """The proxy's self-signed TLS certificate and key (made at init)."""
        return self.root / "proxy"

    def safekeeper_dir(self, sk_id: int) -> Path:
        return self.root / "safekeepers" / f"sk{sk_id}"

    def endpoint_dir(self, name: str) -> Path:
        return self.root / "endpoints" / name

    @property
    def auth_private_key(self) -> Path:
        return self.root / PRIVATE_KEY_FILE

    @property
    def auth_public_key(self) -> Path:
        return self.root / PUBLIC_KEY_FILE

    def exists(self) -> bool:
        return self.config_path.is_file() and self.state_path.is_file()

    @classmethod
    def open(cls, root: Path) -> Environment:
        env = cls(root)
        if not env.exists():
            raise NotFound(f"no Strata environment in {root} (no {CONFIG_FILE} and "
                           f"{STATE_FILE}); run `strata init` first, or point --repo-dir / "
                           f"${REPO_DIR_ENV} at an existing one")
        return env

    @classmethod
    def create(cls, root: Path, config: EnvConfig) -> Environment:
        env = cls(root)
        if env.config_path.exists() or env.state_path.exists():
            raise UserError(f"{root} already holds a Strata environment; use it (`strata "
                            "start`) or pick another with --repo-dir")
        root.mkdir(parents=True, exist_ok=True)
        for sub in (env.logs_dir, env.run_dir, root / "endpoints"):
            sub.mkdir(exist_ok=True)
        # Endpoint data directories below belong to the service user, who must reach them.
        os.chmod(root, 0o755)
        os.chmod(root / "endpoints", 0o755)
        ensure_traversable(root)
        env.write_config(config)
        env._write_state(State())
        return env

    def config(self) -> EnvConfig:
        return EnvConfig.load(self.config_path)

    def write_config(self, config: EnvConfig) -> None:
        text = CONFIG_HEADER + "\n" + tomli_w.dumps(config.to_dict())
        write_atomic(self.config_path, text.encode())

    def read_state(self) -> State:
        try:
            data = json.loads(self.state_path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise UserError(f"{self.state_path} is not valid JSON ({err}); restore it from a "
                            "backup or re-create the environment") from err
        return State.from_json(data, self.state_path)

    def _write_state(self, state: State) -> None:
        write_atomic(self.state_path, (json.dumps(state.to_json(), indent=2) + "\n").encode())

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """The state, held exclusively; written back when the block ends without error."""
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            state = self.read_state()
            yield state
            self._write_state(state)


