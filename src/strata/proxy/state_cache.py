"""The environment's state.json as the proxy last read it, re-read only when it changed.

The proxy consults the state on every client connection (the role's secret, the
endpoint's port) and twice a second (suspend timeouts). Parsing the file each time costs
more than a `stat`, so `StateCache.get` stats the file and parses it again only when its
identity (inode, mtime, size) differs from the last read. The control plane replaces the
file by a rename (`write_atomic`), so a new inode or mtime shows every write; the next
connection after a `strata role password`, `endpoint create` or `endpoint stop` sees it.

The stat is taken before the read: if the file is replaced in between, the cache holds
the newer state under the older identity and reads once more next time, never the
reverse (an old state kept under a new identity).
"""

from __future__ import annotations

import os
import threading

from strata.control.env import Environment, State

_Identity = tuple[int, int, int, int]


class StateCache:
    """Thread-safe (the proxy's worker threads read it too); one read per change."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self._lock = threading.Lock()
        self._cached: tuple[_Identity, State] | None = None
        self.reads = 0
        """How many times the file was parsed (tests and the debug log use it)."""

    def get(self) -> State:
        st = os.stat(self.env.state_path)
        identity = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cached = self._cached
        if cached is not None and cached[0] == identity:
            return cached[1]
        with self._lock:
            cached = self._cached
            if cached is not None and cached[0] == identity:
                return cached[1]
            state = self.env.read_state()
            self.reads += 1
            self._cached = (identity, state)
            return state
