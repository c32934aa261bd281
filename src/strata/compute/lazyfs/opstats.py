"""Per-operation counters of the lazy file system: how many FUSE operations of each kind
it answered, the seconds spent answering them (in this process, from the call to the
return; the kernel's and libfuse's share of each request is not included) and how many
of them failed, by error (a lookup of a name that does not exist is a `getattr` that
fails with ENOENT).

The FUSE server logs them when it exits ("file system server exits: ... ops: ..."), and
`bench/run regress` reads that line for the lazy targets (issue 13: where the time of
the lazy target goes). Each operation costs two clock reads and an uncontended lock.
"""

from __future__ import annotations

import errno
import functools
import threading
import time
from collections.abc import Callable
from typing import Any

# The FUSE operations `LazyFs` implements (fs.py); every other one keeps the binding's
# default (refused, or not registered with libfuse at all).
OPS = ("getattr", "chmod", "chown", "utimens", "truncate", "statfs", "readdir", "mkdir",
       "rmdir", "fsyncdir", "unlink", "rename", "readlink", "open", "create", "read",
       "write", "fsync", "release")


class OpStats:
    """Thread-safe counts, seconds and errors per operation name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.ns: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}  # (operation, error name) -> count

    def add(self, name: str, ns: int, error: str | None = None) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + 1
            self.ns[name] = self.ns.get(name, 0) + ns
            if error is not None:
                self.errors[name, error] = self.errors.get((name, error), 0) + 1

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                result = fn(*args, **kwargs)
            except OSError as err:  # FuseOSError too: what the caller gets as -errno
                code = err.errno if isinstance(err.errno, int) else 0
                self.add(name, time.perf_counter_ns() - t0,
                         errno.errorcode.get(code, str(code)))
                raise
            except BaseException:
                self.add(name, time.perf_counter_ns() - t0, "exception")
                raise
            self.add(name, time.perf_counter_ns() - t0)
            return result
        return wrapper

    def summary(self) -> str:
        """"N operations: read 120 0.031s, getattr 80 0.020s (ENOENT 12), ..." by time
        spent, largest first."""
        with self._lock:
            items = sorted(self.counts, key=lambda n: (-self.ns[n], n))
            total = sum(self.counts.values())
            parts = []
            for n in items:
                failed = ", ".join(f"{e} {c}" for (op, e), c in sorted(self.errors.items())
                                   if op == n)
                parts.append(f"{n} {self.counts[n]} {self.ns[n] / 1e9:.3f}s"
                             + (f" ({failed})" if failed else ""))
        return f"{total} operations" + (": " + ", ".join(parts) if parts else "")


class Counted:
    """`ops` as the FUSE binding sees it, each operation of OPS counted in `stats`.

    The binding looks every operation up by name once, at mount; what it does not find
    here (or finds marked `libfuse_ignore`) it leaves to libfuse's default, as for `ops`.
    Calls `ops` makes to its own methods are not counted twice."""

    def __init__(self, ops: Any, stats: OpStats) -> None:
        self._ops = ops
        self._stats = stats

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._ops, name)
        if name in OPS and callable(value) and not getattr(value, "libfuse_ignore", False):
            return self._stats.timed(name, value)
        return value
