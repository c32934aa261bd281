"""Where a running compute finds its pageserver: a small JSON file the control plane
rewrites when it relocates the compute's tenant (`strata tenant relocate`).

    {"pg": "HOST:PORT", "http": "HOST:PORT"}

`strata endpoint start` writes it as ENV/endpoints/NAME/pageserver.json (atomically:
temp file and rename) and hands its path to the lazy file system's server (its page
reads, `--pageserver-file`) and to the walproposer sidecar (its backpressure poll,
`--pageserver-file`); both re-read it when it changes (a stat per read or poll: the
rename gives it a new inode), so running computes follow a relocation without a restart.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from strata.common.durable import write_atomic
from strata.common.errors import UserError

log = logging.getLogger("strata.compute.pageserver_address")

FILE_NAME = "pageserver.json"


def write_address(path: Path, host: str, pg_port: int, http_port: int) -> None:
    """Point the compute(s) reading `path` at this pageserver."""
    data = {"pg": f"{host}:{pg_port}", "http": f"{host}:{http_port}"}
    # 0644: the FUSE server and the sidecar may run as another user.
    write_atomic(path, (json.dumps(data) + "\n").encode(), mode=0o644)


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class AddressFile:
    """The file's current pageserver addresses, re-read only when the file changed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._pg: tuple[str, int] | None = None
        self._http: tuple[str, int] | None = None
        self._refresh()
        if self._pg is None:
            raise UserError(f"no pageserver address in {self.path}")

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError as err:
            log.warning("cannot read %s (%s); keeping the last address", self.path, err)
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text())
            pg, http = _split(data["pg"]), _split(data["http"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("%s is unreadable (%s); keeping the last address", self.path, err)
            return
        if self._pg is not None and pg != self._pg:
            log.info("the pageserver moved: %s:%d -> %s:%d (%s)", *self._pg, *pg, self.path)
        self._stamp, self._pg, self._http = stamp, pg, http

    def pg(self) -> tuple[str, int]:
        """(host, pg port) as the file says now."""
        self._refresh()
        assert self._pg is not None
        return self._pg

    def http(self) -> tuple[str, int]:
        """(host, http port) as the file says now."""
        self._refresh()
        assert self._http is not None
        return self._http
