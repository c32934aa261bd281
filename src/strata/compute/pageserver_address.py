"""Where a running compute finds its pageserver: a small JSON file the control plane
rewrites when it relocates the compute's tenant (`strata tenant relocate`).

    {"pg": "HOST:PORT", "http": "HOST:PORT"}

`strata endpoint start` writes it as ENV/endpoints/NAME/pageserver.json (atomically:
temp file and rename) and hands its path to the lazy file system's server (its page
reads, `--pageserver-file`) and to the walproposer sidecar (its backpressure poll,
`--pageserver-file`); both re-read it when it changes (the rename gives it a new inode),
so running computes follow a relocation without a restart. They stat it at most every
`CHECK_INTERVAL_S` (not before every page read or poll), and at once when asked for a
fresh answer (`fresh=True`: after an error from the pageserver or a lost connection,
which is what a relocation looks like to a reader that has not seen the new file yet).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from strata.common.durable import write_atomic
from strata.common.errors import UserError

log = logging.getLogger("strata.compute.pageserver_address")

FILE_NAME = "pageserver.json"
CHECK_INTERVAL_S = 0.2  # the longest a reader goes on with an address without a stat


def write_address(path: Path, host: str, pg_port: int, http_port: int) -> None:
    """Point the compute(s) reading `path` at this pageserver."""
    data = {"pg": f"{host}:{pg_port}", "http": f"{host}:{http_port}"}
    # 0644: the FUSE server and the sidecar may run as another user.
    write_atomic(path, (json.dumps(data) + "\n").encode(), mode=0o644)


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class AddressFile:
    """The file's current pageserver addresses, re-read only when the file changed; the
    file is stat'ed at most every `check_interval_s` unless a caller asks `fresh`."""

    def __init__(self, path: str | Path, *, check_interval_s: float = CHECK_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.check_interval_s = check_interval_s
        self._clock = clock
        self._checked_at: float | None = None
        self.stats = 0  # how many times the file was stat'ed (tests)
        self._stamp: tuple[int, int, int] | None = None
        self._pg: tuple[str, int] | None = None
        self._http: tuple[str, int] | None = None
        self._refresh(fresh=True)
        if self._pg is None:
            raise UserError(f"no pageserver address in {self.path}")

    def _refresh(self, fresh: bool) -> None:
        now = self._clock()
        if not fresh and self._checked_at is not None and \
                now - self._checked_at < self.check_interval_s:
            return
        self._checked_at = now
        self.stats += 1
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

    def pg(self, fresh: bool = False) -> tuple[str, int]:
        """(host, pg port) as the file says (stat'ed now if `fresh`, else at most
        `check_interval_s` ago)."""
        self._refresh(fresh)
        assert self._pg is not None
        return self._pg

    def http(self, fresh: bool = False) -> tuple[str, int]:
        """(host, http port) as the file says (see `pg`)."""
        self._refresh(fresh)
        assert self._http is not None
        return self._http
