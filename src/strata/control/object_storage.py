"""The environment's own object storage: a SeaweedFS S3 server on loopback that `strata
init --object-storage seaweedfs` sets up and `strata start` / `strata stop` run.

Its ports are fixed in config.toml (`[seaweedfs] ports`, allocated at init) because the
pageserver's `remote_storage` URL names its S3 port; its data is in ENV/seaweedfs/, its
log in logs/seaweedfs.log, its pid in run/seaweedfs.pid. Authentication is off and it
listens on 127.0.0.1 only (strata.remote.seaweed). The pageserver keeps its objects in the
bucket `strata`.
"""

from __future__ import annotations

from typing import Any

from strata.common.errors import Unavailable
from strata.control.env import SEAWEED_HOST, EnvConfig, Environment
from strata.control.services import pageserver_files, safekeeper_files
from strata.control.supervisor import (
    ProcessFiles,
    ServiceSpec,
    process_state,
    repicker,
    start_service,
    stop_service,
)
from strata.remote.seaweed import PORT_NAMES, SeaweedServer

SEAWEED_BUCKET = "strata"
SEAWEED_START_TIMEOUT_S = 120.0
SEAWEED_STOP_TIMEOUT_S = 60.0  # a clean stop takes ~15 s; SIGKILL after this


def seaweed_server(env: Environment, ports: dict[str, int]) -> SeaweedServer:
    return SeaweedServer(env.root / "seaweedfs", env.logs_dir / "seaweedfs.log", ports)


def seaweed_files(env: Environment, server: SeaweedServer) -> ProcessFiles:
    return ProcessFiles("SeaweedFS", env.run_dir / "seaweedfs.pid", server.log_path,
                        marker=server.marker)


def seaweed_url(ports: dict[str, int]) -> str:
    """The pageserver's remote_storage URL for the environment's SeaweedFS."""
    return f"s3://{SEAWEED_BUCKET}?endpoint=http://{SEAWEED_HOST}:{ports['s3.port']}"


def allocate_seaweed_ports() -> dict[str, int]:
    from strata.common.proc import free_port

    return {name: free_port(SEAWEED_HOST) for name in PORT_NAMES}


def _ready(server: SeaweedServer) -> bool:
    try:
        server.create_bucket(SEAWEED_BUCKET)
    except Unavailable:
        return False
    return True


def start_seaweed(env: Environment, config: EnvConfig) -> int | None:
    """Start the environment's SeaweedFS (if it has one and it is not running), wait until
    its bucket exists; its pid, or None without one. While no pageserver or safekeeper
    runs (none holds the S3 URL yet), a port strata picked and finds taken is picked again
    and saved in config.toml, with the remote_storage URL that names it: the caller reads
    the config again after the start."""
    if config.seaweedfs is None:
        return None
    repick_ports = not any(pageserver_files(env, ps.id).read_pid() is not None
                           for ps in config.pageservers) and \
        not any(safekeeper_files(env, sk.id).read_pid() is not None
                for sk in config.safekeepers)

    def build(config: EnvConfig) -> ServiceSpec:
        assert config.seaweedfs is not None
        server = seaweed_server(env, dict(config.seaweedfs))
        return ServiceSpec(
            seaweed_files(env, server), "SeaweedFS",
            {name: (SEAWEED_HOST, port) for name, port in config.seaweedfs.items()},
            server.argv(), ready=lambda: _ready(server),
            waiting_for=f"SeaweedFS's S3 API on {server.endpoint}",
            start_timeout_s=SEAWEED_START_TIMEOUT_S, describe=f"S3 {server.endpoint}",
            prepare=lambda: server.directory.mkdir(parents=True, exist_ok=True),
            ready_interval_s=0.3)

    return start_service(build(config), repicker(
        env, {name: f"seaweedfs.{name}" for name in config.seaweedfs}, build)
        if repick_ports else None)


def stop_seaweed(env: Environment, config: EnvConfig, *, immediate: bool = False) -> bool:
    """SIGTERM (SIGKILL after SEAWEED_STOP_TIMEOUT_S) or, immediate, SIGKILL."""
    if config.seaweedfs is None:
        return False
    return stop_service(seaweed_files(env, seaweed_server(env, dict(config.seaweedfs))),
                        "SeaweedFS", timeout_s=SEAWEED_STOP_TIMEOUT_S, immediate=immediate)


def object_storage_status(env: Environment, config: EnvConfig) -> dict[str, Any] | None:
    """`status --json`'s object_storage: the URL, and the SeaweedFS process if the
    environment runs one (pid, state, address, log); None without object storage."""
    url = config.pageserver.config.get("remote_storage")
    if not url:
        return None
    out: dict[str, Any] = {"url": str(url), "seaweedfs": None}
    if config.seaweedfs is None:
        return out
    server = seaweed_server(env, dict(config.seaweedfs))
    files = seaweed_files(env, server)
    proc = process_state(files, lambda: _ready(server))
    out["seaweedfs"] = {"pid": proc.pid, "state": proc.state, "address": server.endpoint,
                        "log": str(files.log_path), "log_tail": proc.log_tail}
    return out
