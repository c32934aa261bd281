"""A compute: a stock PostgreSQL 15 started from a basebackup tar, configured for Strata.

Architecture D2, D6, D7. `Compute` unpacks a basebackup (`strata.pageserver.basebackup`)
into a data directory owned by the service user (mode 0700), writes the settings every
compute needs, and starts, stops or kills the server through `PgServer`:

* D2: `STRATA_WAL_SETTINGS` (page images in every record, zstd);
* loopback on a free port, a private unix socket directory;
* `restart_after_crash = off`: after a crash the compute restarts from a fresh
  basebackup (D6), never from its own local files;
* primaries: `synchronous_standby_names` = the WAL receiver's application name (the
  walproposer, or the pageserver in development mode, D7), and WAL senders and slots
  for it; in pull mode `'ANY <majority> (sk1, sk2, sk3)'`, the safekeepers themselves
  (`ComputeConfig.quorum_standbys`);
* read-only endpoints: `hot_standby = on` and `standby.signal` (no upstream), with the
  settings a hot standby must have at least as high as the primary's recorded in
  pg_control (`CheckRequiredParameterValues`, xlogrecovery.c) raised to those values.
"""

from __future__ import annotations

import logging
import os
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from strata.common.errors import CorruptionError, UserError
from strata.common.proc import RunAs, chown_tree, make_dir_for, service_user
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pg.controlfile import ControlFileData
from strata.pg.walwriter import DATA_MAP_PAX_HEADER, FULL_SIZE_PAX_HEADER, parse_data_map

if TYPE_CHECKING:
    import psycopg

log = logging.getLogger(__name__)

_MAX_FULL_SIZE = 1 << 30  # PostgreSQL's largest WAL segment

# The dev-mode WAL receiver's default application name (WalReceiverConfig).
DEFAULT_RECEIVER_NAME = "strata_pageserver"


@dataclass(frozen=True, slots=True)
class ComputeConfig:
    """How to run one compute. `settings` are extra postgresql.conf entries (they win)."""

    read_only: bool = False
    receiver_name: str | None = DEFAULT_RECEIVER_NAME
    """application_name of the synchronous standby that takes the WAL (primaries only;
    ignored for read-only). None runs without one: commits do not wait, so nothing is
    durable beyond this host (tests of the compute alone)."""
    quorum_standbys: tuple[str, ...] = ()
    """Pull mode: the application names (= slots) of the safekeepers, which replicate
    from the compute themselves; a commit waits for a majority of them (`ANY <majority>
    (...)`, PostgreSQL's quorum commit) and `receiver_name` is not used. Empty: off."""
    max_connections: int = 100
    max_prepared_transactions: int = 10
    max_locks_per_transaction: int = 64
    max_worker_processes: int = 8
    max_wal_senders: int = 10
    max_replication_slots: int = 10
    shared_buffers: str = "32MB"
    settings: Mapping[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_locks_per_transaction", "max_worker_processes",
                     "max_wal_senders", "max_replication_slots"):
            if getattr(self, name) < 1:
                raise UserError(f"compute setting {name} = {getattr(self, name)}: must be >= 1")
        if len(set(self.quorum_standbys)) != len(self.quorum_standbys):
            raise UserError(f"compute quorum_standbys repeat: {list(self.quorum_standbys)}")
        if self.max_prepared_transactions < 0:
            raise UserError(f"compute setting max_prepared_transactions = "
                            f"{self.max_prepared_transactions}: must be >= 0")


# Settings a hot standby must have >= the primary's, and where pg_control records them.
_STANDBY_MINIMA = {
    "max_connections": "max_connections",
    "max_prepared_transactions": "max_prepared_xacts",
    "max_locks_per_transaction": "max_locks_per_xact",
    "max_worker_processes": "max_worker_processes",
    "max_wal_senders": "max_wal_senders",
}


def standby_names(config: ComputeConfig) -> str:
    """A primary's `synchronous_standby_names`: its one receiver, or in pull mode a
    majority of the safekeepers (`ANY 2 (sk1, sk2, sk3)`)."""
    names = config.quorum_standbys
    if names:
        return f"ANY {len(names) // 2 + 1} ({', '.join(names)})"
    return config.receiver_name or ""


def compute_settings(config: ComputeConfig, control: ControlFileData) -> dict[str, object]:
    """postgresql.conf entries for a compute (without listen address, port and socket)."""
    settings: dict[str, object] = dict(STRATA_WAL_SETTINGS)
    settings.update({
        "restart_after_crash": False,
        # The data directory is disposable: after a crash of the host the compute starts
        # from a fresh basebackup, and durability comes from the WAL receiver (D6, D7).
        "fsync": False,
        "shared_buffers": config.shared_buffers,
        "max_connections": config.max_connections,
        "max_prepared_transactions": config.max_prepared_transactions,
        "max_locks_per_transaction": config.max_locks_per_transaction,
        "max_worker_processes": config.max_worker_processes,
        "max_wal_senders": config.max_wal_senders,
        "max_replication_slots": config.max_replication_slots,
        "hot_standby": config.read_only,
        "synchronous_standby_names": "" if config.read_only else standby_names(config),
    })
    # pg_control holds the primary's values; a primary may use these too (two-phase
    # state files need max_prepared_transactions > 0 to be restored at all).
    for setting, control_field in _STANDBY_MINIMA.items():
        recorded = int(getattr(control, control_field))
        current = settings[setting]
        assert isinstance(current, int), (setting, current)
        settings[setting] = max(current, recorded)
    settings.update(config.settings)
    return settings


class Compute:
    """One compute's data directory and (when started) its PostgreSQL."""

    def __init__(self, datadir: Path, config: ComputeConfig | None = None, *,
                 host: str = "127.0.0.1", port: int | None = None,
                 log_path: Path | None = None, user: RunAs | None = None) -> None:
        self.config = config if config is not None else ComputeConfig()
        self.server = PgServer(datadir, port=port, host=host, log_path=log_path,
                               user=user or service_user())
        self._control: ControlFileData | None = None  # `remember_control`

    @classmethod
    def from_basebackup(cls, tar: BinaryIO, datadir: Path, config: ComputeConfig | None = None,
                        **kwargs: Any) -> Compute:
        compute = cls(datadir, config, **kwargs)
        compute.unpack(tar)
        return compute

    @property
    def datadir(self) -> Path:
        return self.server.datadir

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def pid(self) -> int | None:
        return self.server.pid

    # --- set-up ----------------------------------------------------------------
    def unpack(self, tar: BinaryIO) -> None:
        """Unpack a basebackup tar stream into the (absent or empty) data directory."""
        datadir = self.datadir
        if datadir.exists() and _holds_files(datadir):
            raise UserError(f"compute data directory {datadir} is not empty; remove it or "
                            "pick another")
        make_dir_for(datadir, self.server.user)
        count = 0
        with tarfile.open(fileobj=tar, mode="r|") as archive:
            for member in archive:
                target = datadir / _safe_member_path(member.name)
                if member.isdir():
                    target.mkdir(mode=0o700, parents=True, exist_ok=True)
                elif member.isfile():
                    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    source = archive.extractfile(member)
                    assert source is not None, member.name
                    sparse = _sparse_layout(member)
                    if sparse is None:
                        _write_stream(target, source)
                    else:
                        _write_sparse(target, source, *sparse)
                    count += 1
                else:
                    raise CorruptionError(f"basebackup entry {member.name!r} is neither a file "
                                          "nor a directory; refusing to unpack it")
        if not (datadir / "global" / "pg_control").is_file():
            raise CorruptionError(f"basebackup unpacked into {datadir} has no "
                                  "global/pg_control: the stream was cut short")
        os.chmod(datadir, 0o700)
        chown_tree(datadir, self.server.user)
        log.info("unpacked basebackup into %s (%d files)", datadir, count)

    def control(self) -> ControlFileData:
        """The data directory's pg_control; the copy `remember_control` read, once."""
        remembered, self._control = self._control, None
        if remembered is not None:
            return remembered
        path = self.datadir / "global" / "pg_control"
        return ControlFileData.from_bytes(path.read_bytes(), path=str(path))

    def remember_control(self) -> None:
        """Read pg_control now for the next `control()` (the launch's settings): a lazy
        compute's `global/` then moves onto its FUSE mount, where that read would wait
        for the FUSE server while it is busy with the prewarm (up to 0.1 s loaded)."""
        self._control = None
        self._control = self.control()

    def settings(self) -> dict[str, object]:
        return compute_settings(self.config, self.control())

    # --- run -------------------------------------------------------------------
    def start(self, *, timeout_s: float = 60) -> None:
        """Write the settings (and standby.signal for read-only) and start PostgreSQL."""
        self.launch()
        self.server.wait_ready(timeout_s)
        log.info("compute started on %s:%d (%s)", self.server.host, self.server.port,
                 "read-only" if self.config.read_only else "primary")

    def launch(self) -> None:
        """`start` without waiting for PostgreSQL to accept connections
        (`server.wait_ready` does)."""
        signal_file = self.datadir / "standby.signal"
        if self.config.read_only and not signal_file.exists():
            signal_file.write_bytes(b"")
            chown_tree(signal_file, self.server.user)
        elif not self.config.read_only and signal_file.exists():
            raise UserError(f"{self.datadir} holds standby.signal (a read-only basebackup) "
                            "but the compute is configured as a primary")
        self.server.launch(self.settings())

    def stop(self, mode: str = "fast", *, timeout_s: float = 60) -> None:
        self.server.stop(mode, timeout_s=timeout_s)

    def kill9(self) -> None:
        self.server.kill9()

    def is_running(self) -> bool:
        return self.server.is_running()

    # --- talk to it ------------------------------------------------------------
    def connstr(self, dbname: str = "postgres", user: str | None = None) -> str:
        return self.server.connstr(dbname, user)

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        return self.server.connect(dbname, **kwargs)

    def sql(self, query: str, *params: Any, dbname: str = "postgres") -> list[tuple[Any, ...]]:
        return self.server.sql(query, *params, dbname=dbname)


def _holds_files(directory: Path) -> bool:
    """Whether `directory` holds anything but (nested) empty directories: those may be
    made ahead of the unpacking (`strata.compute.lazy.spawn_lazyfs`)."""
    for _, _, files in os.walk(directory):
        if files:
            return True
    return False


def _safe_member_path(name: str) -> PurePosixPath:
    """A tar member name as a relative path that stays inside the data directory."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise CorruptionError(f"basebackup entry {name!r} points outside the data directory; "
                              "refusing to unpack it")
    return path


def _sparse_layout(member: tarfile.TarInfo) -> tuple[int, list[tuple[int, int]]] | None:
    """(full size, runs) of a member that holds only some pages of its file (a lazy
    basebackup's WAL segment, `FULL_SIZE_PAX_HEADER` and `DATA_MAP_PAX_HEADER`): the rest
    of the file is zeros. None for a whole file."""
    size_text = member.pax_headers.get(FULL_SIZE_PAX_HEADER)
    if size_text is None:
        return None
    try:
        if not size_text.isdigit() or int(size_text) > _MAX_FULL_SIZE:
            raise UserError(f"{FULL_SIZE_PAX_HEADER} {size_text!r} is not a size up to "
                            f"{_MAX_FULL_SIZE} bytes")
        runs = parse_data_map(member.pax_headers.get(DATA_MAP_PAX_HEADER, ""), member.size,
                              int(size_text))
    except UserError as err:
        raise CorruptionError(f"basebackup entry {member.name!r}: {err}; refusing to unpack "
                              "it") from err
    return int(size_text), runs


def _write_sparse(target: Path, source: IO[bytes], full_size: int,
                  runs: list[tuple[int, int]]) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for offset, length in runs:
            data = source.read(length)
            if len(data) != length:
                raise CorruptionError(f"basebackup entry {target.name!r} ends inside its "
                                      "data; the stream was cut short")
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, full_size)  # the zeros in between and after: holes
    finally:
        os.close(fd)


def _write_stream(target: Path, source: IO[bytes]) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        while chunk := source.read(1 << 20):
            f.write(chunk)
