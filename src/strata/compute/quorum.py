"""What a proposer needs to know about its safekeepers, shared by the walproposer sidecar's
asyncio driver (`strata.compute.walproposer`) and the blocking sync of `strata endpoint
start` (`strata.compute.safekeeper_sync`): their addresses, the quorum's settings, and
what the sync step returns. Kept apart so that the CLI's start imports neither the
sidecar nor asyncio (issue 13).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field

from strata.common.errors import UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import DEFAULT_WAL_SEGMENT_SIZE, Lsn, check_segment_size

DEFAULT_APPLICATION_NAME = "strata_walproposer"


@dataclass(frozen=True, slots=True)
class SafekeeperAddr:
    """A safekeeper's node id and PG-protocol address."""

    node_id: int
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_id: int) -> SafekeeperAddr:
        """`ID@HOST:PORT` or `HOST:PORT` (the id is then `default_id`)."""
        node, _, rest = text.rpartition("@")
        host, _, port = rest.rpartition(":")
        try:
            return cls(int(node) if node else default_id, host or "127.0.0.1", int(port))
        except ValueError as err:
            raise UserError(f"safekeeper address {text!r}: expected ID@HOST:PORT") from err


def parse_safekeepers(text: str) -> tuple[SafekeeperAddr, ...]:
    """A comma-separated list of safekeeper addresses; ids default to 1, 2, ... by position."""
    addrs = tuple(SafekeeperAddr.parse(item.strip(), i + 1)
                  for i, item in enumerate(text.split(",")) if item.strip())
    if not addrs:
        raise UserError("no safekeepers given; pass --safekeepers ID@HOST:PORT,...")
    if len({a.node_id for a in addrs}) != len(addrs):
        raise UserError(f"safekeeper ids repeat in {text!r}")
    return addrs


@dataclass(frozen=True, slots=True)
class QuorumConfig:
    """Which timeline, which safekeepers, and how patient to be with them."""

    tenant_id: TenantId
    timeline_id: TimelineId
    safekeepers: tuple[SafekeeperAddr, ...]
    wal_seg_size: int = DEFAULT_WAL_SEGMENT_SIZE
    user: str = "strata"
    retry_interval_s: float = 0.25
    connect_timeout_s: float = 5.0
    backoff_max_s: float = 1.0
    defer_slowest: bool = False
    """With more safekeepers than a majority, the one heard from least recently gets WAL
    only at the driver's tick (`QuorumDriver._pick_deferred`). Off: in the fifth round's
    A/B (docs/walproposer.md) it saved fsyncs but the worst-load figures were worse."""
    proposer_id: int = field(default_factory=lambda: secrets.randbits(62) + 1)

    def __post_init__(self) -> None:
        check_segment_size(self.wal_seg_size)
        assert self.safekeepers, "no safekeepers"
        assert self.proposer_id > 0, self.proposer_id

    @property
    def quorum(self) -> int:
        return len(self.safekeepers) // 2 + 1


@dataclass(frozen=True, slots=True)
class SyncResult:
    """The agreed end of the log after sync, and the start of the record ending there."""

    lsn: Lsn
    prev_lsn: Lsn

    def to_json(self) -> str:
        return json.dumps({"lsn": str(self.lsn), "prev_lsn": str(self.prev_lsn)})
