"""The environment's own object storage: a SeaweedFS S3 server on loopback that `strata
init --object-storage seaweedfs` sets up and `strata start` / `strata stop` run.

Its ports are fixed in config.toml (`[seaweedfs] ports`, allocated at init) because the
pageserver's `remote_storage` URL names its S3 port; its data is in ENV/seaweedfs/, its
log in logs/seaweedfs.log, its pid in run/seaweedfs.pid. Authentication is off and it
listens on 127.0.0.1 only (strata.remote.seaweed). The pageserver keeps its objects in the
bucket `strata`.
"""

from __future__ import annotations

import signal
from typing import Any

from strata.common.errors import Unavailable
from strata.control import output
from strata.control.env import EnvConfig, Environment
from strata.control.supervisor import ProcessFiles, check_ports_free, stop_process, wait_for
from strata.remote.seaweed import PORT_NAMES, SeaweedServer

SEAWEED_BUCKET = "strata"
SEAWEED_HOST = "127.0.0.1"
SEAWEED_START_TIMEOUT_S = 120.0
SEAWEED_STOP_TIMEOUT_S = 60.0  # a clean stop takes ~25 s; SIGKILL after this


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
    its bucket exists; its pid, or None without one."""
    if config.seaweedfs is None:
        return None
    server = seaweed_server(env, dict(config.seaweedfs))
    files = seaweed_files(env, server)
    pid = files.read_pid()
    if pid is not None:
        output.info(f"SeaweedFS already running (pid {pid})")
        return pid
    check_ports_free("SeaweedFS", {name: (SEAWEED_HOST, port)
                                   for name, port in config.seaweedfs.items()})
    env.logs_dir.mkdir(exist_ok=True)
    with output.step(f"starting SeaweedFS (S3 {server.endpoint}, log {files.log_path})"):
        proc = server.spawn()
        files.write_pid(proc.pid)
        wait_for(lambda: _ready(server), timeout_s=SEAWEED_START_TIMEOUT_S,
                 what=f"waiting for SeaweedFS's S3 API on {server.endpoint}", files=files,
                 pid=proc.pid, interval_s=0.3)
    return proc.pid


def stop_seaweed(env: Environment, config: EnvConfig, *, immediate: bool = False) -> bool:
    """SIGTERM (SIGKILL after SEAWEED_STOP_TIMEOUT_S) or, immediate, SIGKILL."""
    if config.seaweedfs is None:
        return False
    files = seaweed_files(env, seaweed_server(env, dict(config.seaweedfs)))
    if files.read_pid() is None:
        files.clear_pid()
        return False
    with output.step("killing SeaweedFS (SIGKILL)" if immediate else "stopping SeaweedFS"):
        stop_process(files, signal.SIGKILL if immediate else signal.SIGTERM,
                     timeout_s=SEAWEED_STOP_TIMEOUT_S)
    return True


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
    pid = files.read_pid()
    if pid is None:
        state = "died" if files.died() else "stopped"
    else:
        state = "running" if _ready(server) else "not responding"
    out["seaweedfs"] = {"pid": pid, "state": state, "address": server.endpoint,
                        "log": str(files.log_path),
                        "log_tail": files.log_tail() if state in ("died", "not responding")
                        else None}
    return out
