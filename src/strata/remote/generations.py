"""The generation authority in object storage: one marker object per tenant.

    tenants/<tenant_id>/generation.json   {"generation": N}

The control plane (the `strata` CLI, `control/attachments.py`) writes it with the new
number every time it hands a generation out, *before* it asks the pageserver to attach,
and only ever raises it (its writes are serialized by the environment's state lock). A
pageserver reads it before it deletes objects: if the marker names a newer generation
than its own attachment, it is stale and deletes nothing.

Why that closes the split-brain window (docs/remote-storage.md, "Generations"): a
pageserver of generation N deletes objects only after (1) uploading an index without
them, then (2) reading the marker and finding no newer generation. If (2) found N, the
marker write of N+1 comes after (2), hence after (1); the attachment of N+1 reads its
indexes after that write, so it sees the index without those objects and never relies on
them. If (2) found N+1, nothing is deleted. The listing check (an index of a newer
generation exists) stays as a second line of defence.

A tenant without a marker (created with generation 1 and never attached since, or
attached through the pageserver's HTTP API without the CLI) has only the listing check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from strata.common.errors import CorruptionError, NotFound, UserError
from strata.common.ids import TenantId
from strata.remote.storage import RemoteStorage

MARKER_NAME = "generation.json"


def marker_key(tenant_id: TenantId) -> str:
    return f"tenants/{tenant_id}/{MARKER_NAME}"


def read_generation(storage: RemoteStorage, tenant_id: TenantId) -> int | None:
    """The newest generation the control plane handed out for the tenant (None: no marker)."""
    key = marker_key(tenant_id)
    try:
        data = storage.get(key)
    except NotFound:
        return None
    try:
        generation = int(json.loads(data)["generation"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptionError(f"generation marker is malformed: {err!r}", path=key) from err
    if generation < 1:
        raise CorruptionError(f"generation marker names generation {generation}", path=key)
    return generation


def record_generation(storage: RemoteStorage, tenant_id: TenantId, generation: int) -> None:
    """Write the marker (the control plane, before the attach that uses `generation`).

    Refuses to lower it: a marker above `generation` means another control plane (or a
    restored state.json) handed out a newer one, and attaching with this one would be
    stale from the start."""
    current = read_generation(storage, tenant_id)
    if current is not None and current > generation:
        raise UserError(f"object storage records generation {current} for tenant "
                        f"{tenant_id}, newer than {generation} from this environment's "
                        "state.json: another control plane attached it, or state.json was "
                        "restored; refusing to attach with a stale generation")
    storage.put(marker_key(tenant_id), json.dumps({"generation": generation}).encode())


@dataclass(frozen=True, slots=True)
class DeletionVerdict:
    """Whether an attachment may delete objects it no longer names, and why not."""

    allowed: bool
    newer: int = 0  # the newer generation found (0 when allowed)
    where: str = ""  # "generation marker" or "index"


def deletion_verdict(own: int, marker: int | None, newest_index: int) -> DeletionVerdict:
    """Pure rule, checked after the index without the doomed objects is durable: delete
    only if neither the marker nor any index names a generation newer than `own`."""
    if marker is not None and marker > own:
        return DeletionVerdict(False, marker, "generation marker")
    if newest_index > own:
        return DeletionVerdict(False, newest_index, "index")
    return DeletionVerdict(True)
