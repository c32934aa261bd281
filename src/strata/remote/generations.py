"""The generation authority in object storage: write-once marker objects per tenant.

    tenants/<tenant_id>/generation.json-<generation, 8 hex>   {"generation": N}

Whoever hands out or takes up a generation writes the marker of that number *before*
the attachment reads the indexes it resumes from: the control plane (the `strata` CLI,
`control/attachments.py`) when it hands one out, and the pageserver itself when it
attaches, creates or loads a tenant (so a tenant attached through the HTTP API without
the CLI has one too). The tenant's marker is the highest of these objects (and of the
single `generation.json` that earlier versions rewrote in place, still read). A
pageserver reads it before it deletes objects, and every `generation_check_period_s`:
if it names a newer generation than its own attachment, that attachment is stale.

Why one object per generation and not one object raised in place: without conditional
writes, raising one object is a read then a write, and two attaches racing (N+1 and
N+2) could leave N+1 written last, lowering it under an attachment of N+2 that already
relies on it. Objects that are only ever added make the marker a maximum over a
listing, which can only rise (until the tenant is deleted: the markers go last).

Why that closes the split-brain window (docs/remote-storage.md, "Generations"): a
pageserver of generation N deletes objects only after (1) uploading an index without
them, then (2) listing the markers and finding none newer. If (2) found none above N,
it completed before the marker of N+1 was written (listings are strongly consistent),
hence so did (1); the attachment of N+1 reads its indexes after writing that marker, so
it sees the index without those objects and never relies on them. If (2) found N+1,
nothing is deleted. The listing check (an index of a newer generation exists) stays as
a second line of defence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from strata.common.errors import CorruptionError, NotFound, UserError
from strata.common.failpoint import failpoint
from strata.common.ids import TenantId
from strata.remote.index import split_generation, with_generation
from strata.remote.storage import RemoteStorage

MARKER_NAME = "generation.json"


def marker_key(tenant_id: TenantId) -> str:
    """The single marker object earlier versions rewrote in place (read, never written)."""
    return f"tenants/{tenant_id}/{MARKER_NAME}"


def generation_marker_key(tenant_id: TenantId, generation: int) -> str:
    """The write-once marker object of one generation."""
    return with_generation(marker_key(tenant_id), generation)


def marker_keys(storage: RemoteStorage, tenant_id: TenantId) -> list[str]:
    """Every marker object of the tenant (the old single one included)."""
    legacy = marker_key(tenant_id)
    return [key for key in storage.list_keys(legacy)
            if key == legacy or (split := split_generation(key)) is not None
            and split[0] == legacy]


def read_generation(storage: RemoteStorage, tenant_id: TenantId) -> int | None:
    """The newest generation handed out for the tenant (None: no marker)."""
    legacy = marker_key(tenant_id)
    best: int | None = None
    for key in marker_keys(storage, tenant_id):
        if key == legacy:
            generation = _read_legacy(storage, key)
            if generation is None:
                continue
        else:
            split = split_generation(key)
            assert split is not None
            generation = split[1]
        if best is None or generation > best:
            best = generation
    return best


def _read_legacy(storage: RemoteStorage, key: str) -> int | None:
    try:
        data = storage.get(key)
    except NotFound:
        return None  # deleted since the listing
    try:
        generation = int(json.loads(data)["generation"])
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptionError(f"generation marker is malformed: {err!r}", path=key) from err
    if generation < 1:
        raise CorruptionError(f"generation marker names generation {generation}", path=key)
    return generation


def put_generation(storage: RemoteStorage, tenant_id: TenantId, generation: int) -> None:
    """Add the marker object of `generation` (idempotent; never lowers the marker)."""
    failpoint("generation-before-put-marker")  # after the caller read the marker
    storage.put(generation_marker_key(tenant_id, generation),
                json.dumps({"generation": generation}).encode())


def record_generation(storage: RemoteStorage, tenant_id: TenantId, generation: int) -> None:
    """Write the marker (the control plane, before the attach that uses `generation`).

    Refuses a stale one: a marker above `generation` means another control plane (or a
    restored state.json) handed out a newer one, and attaching with this one would be
    stale from the start."""
    current = read_generation(storage, tenant_id)
    if current is not None and current > generation:
        raise UserError(f"object storage records generation {current} for tenant "
                        f"{tenant_id}, newer than {generation} from this environment's "
                        "state.json: another control plane attached it, or state.json was "
                        "restored; refusing to attach with a stale generation")
    if current != generation:
        put_generation(storage, tenant_id, generation)


def claim_generation(storage: RemoteStorage, tenant_id: TenantId,
                     generation: int) -> int | None:
    """The pageserver taking up `generation` (attach, create, load at start), before it
    reads any index: the newer generation the marker names (then nothing is written:
    this attachment is stale), else None once the marker is at least `generation`."""
    current = read_generation(storage, tenant_id)
    if current is not None and current > generation:
        return current
    if current != generation:
        put_generation(storage, tenant_id, generation)
    return None


def delete_markers(storage: RemoteStorage, tenant_id: TenantId) -> int:
    """Remove every marker object of a deleted tenant (last, after all its other
    objects); returns how many there were."""
    keys = marker_keys(storage, tenant_id)
    for key in keys:
        try:
            storage.delete(key)
        except NotFound:
            pass
    return len(keys)


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
