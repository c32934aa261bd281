"""LSN leases: a compute's promise to read at an LSN, which GC must not pass while it lives.

A lease is (lsn, expiry). `lease(lsn, duration_s)` grants or extends one and returns
its expiry; `renew` is the same call made again before expiry. The table holds no
clock of its own: every call takes `now` (seconds, from the caller's clock function),
so tests control time exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from strata.common.errors import UserError
from strata.common.lsn import Lsn


@dataclass(frozen=True, slots=True)
class Lease:
    lsn: Lsn
    expires_at: float


class LeaseTable:
    """Live leases of one timeline, keyed by LSN (one expiry per LSN, the latest wins)."""

    def __init__(self) -> None:
        self._leases: dict[Lsn, float] = {}
        self._lock = threading.Lock()

    def lease(self, lsn: Lsn, duration_s: float, now: float, gc_cutoff: Lsn) -> float:
        """Grant or renew a lease on `lsn` until `now + duration_s`; return the expiry.

        Refused below the GC cutoff: that history may already be gone.
        """
        if duration_s <= 0:
            raise UserError(f"lease duration must be positive, got {duration_s}s")
        with self._lock:
            if lsn < gc_cutoff and lsn not in self._leases:
                raise UserError(f"cannot lease LSN {lsn}: it is below the GC cutoff "
                                f"{gc_cutoff}; lease an LSN at or above the cutoff")
            expiry = max(self._leases.get(lsn, 0.0), now + duration_s)
            self._leases[lsn] = expiry
            return expiry

    def renew(self, lsn: Lsn, duration_s: float, now: float) -> float:
        """Extend a live lease; an expired or unknown one cannot be renewed."""
        with self._lock:
            expiry = self._leases.get(lsn)
            if expiry is None or expiry <= now:
                raise UserError(f"no live lease on LSN {lsn} to renew (expired or never "
                                f"granted); request a new lease")
            self._leases[lsn] = max(expiry, now + duration_s)
            return self._leases[lsn]

    def drop_expired(self, now: float) -> list[Lease]:
        """Remove and return the leases that expired at or before `now`."""
        with self._lock:
            gone = [Lease(lsn, exp) for lsn, exp in self._leases.items() if exp <= now]
            for lease in gone:
                del self._leases[lease.lsn]
            return gone

    def live(self, now: float) -> list[Lease]:
        with self._lock:
            return sorted((Lease(lsn, exp) for lsn, exp in self._leases.items() if exp > now),
                          key=lambda lease: lease.lsn)

    def min_live_lsn(self, now: float) -> Lsn | None:
        live = self.live(now)
        return live[0].lsn if live else None
