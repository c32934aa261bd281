"""WAL offload: which segments a safekeeper uploads to object storage, which it may remove.

The rules (pure; `timeline.py` does the I/O, `server.py` runs the loop):

- **What is uploaded.** A segment is uploaded once it is complete and committed: its last
  byte is below the commit LSN (`segments_to_upload`). The commit LSN is in this
  safekeeper's durable WAL, and committed WAL is never truncated, so the bytes of such a
  segment never change again. Only LSNs decide: a segment file is full size from its
  creation (preallocated, zeros after the WAL: wal_storage.py), so its size says nothing
  about how much WAL it holds, and no partial segment is ever uploaded.
- **Who uploads.** Every safekeeper of the quorum runs the same rule. The object name is
  deterministic (`segment_key`: `wal/<tenant>/<timeline>/<segment file name>`) and the
  content of a committed segment is identical on every safekeeper that holds it, so
  whichever upload lands last replaces an identical object. A safekeeper skips a segment
  whose object is already listed (another safekeeper uploaded it). No election is needed.
- **Checksum.** The object carries the CRC-32C of its bytes (the `RemoteStorage`
  contract, `strata.remote.storage`); a download checks it and a damaged object raises
  `CorruptionError` naming the key.
- **Upload position.** `backup_lsn` (in the control file, reported by the HTTP API) is the
  end of the uploaded prefix: every complete segment below it is in object storage. It
  only moves forward, one segment boundary at a time, after the upload succeeded.
- **Removal.** With object storage configured, a segment is removed locally only if it is
  below BOTH `backup_lsn` and what the pageserver made durable in object storage, and below
  the other horizons (`removal_horizon`). The pageserver reports that (its
  `remote_consistent_lsn`) only to the safekeeper it streams from; the others read it
  from the pageserver's index of the highest generation in the same object storage
  (`tenants/<t>/timelines/<tl>/index_part.json-<gen>`, its `disk_consistent_lsn`: where
  every later attachment resumes), at most every 10 s and only while that could let a
  segment go (`Timeline.read_pageserver_index`).
- **Reading removed WAL.** A walsender asked for WAL below what the safekeeper still holds
  downloads that segment (the pageserver keeps talking to the safekeeper; it never reads
  the safekeepers' objects itself).
"""

from __future__ import annotations

from collections.abc import Iterable

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn, segment_file_name

WAL_PREFIX = "wal"


def timeline_prefix(tenant_id: TenantId, timeline_id: TimelineId) -> str:
    """The key prefix under which one timeline's WAL segments are stored (ends with /)."""
    return f"{WAL_PREFIX}/{tenant_id}/{timeline_id}/"


def segment_key(tenant_id: TenantId, timeline_id: TimelineId, segno: int, seg_size: int) -> str:
    """The object name of WAL segment `segno` of a timeline (its PostgreSQL file name)."""
    return timeline_prefix(tenant_id, timeline_id) + segment_file_name(segno, 1, seg_size)


def segments_to_upload(backup_lsn: Lsn, commit_lsn: Lsn, timeline_start_lsn: Lsn,
                       seg_size: int) -> range:
    """The segment numbers to upload next, in order: from the one holding the upload
    position up to (not including) the segment the commit LSN lies in."""
    first = max(backup_lsn, timeline_start_lsn).value // seg_size
    end = commit_lsn.value // seg_size  # segment `end` is not complete below commit
    return range(first, max(first, end))


def backup_lsn_after(segno: int, seg_size: int) -> Lsn:
    """The upload position once segment `segno` (and every one before it) is uploaded."""
    return Lsn((segno + 1) * seg_size)


def removal_horizon(pageserver_lsn: Lsn | None, scan_lsn: Lsn, walsender_lsns: Iterable[Lsn],
                    wal_keep_bytes: int, backup_lsn: Lsn | None) -> Lsn:
    """WAL below the returned LSN may be removed locally.

    `pageserver_lsn`: what the pageserver reported durable (None: no feedback yet, nothing
    may go); `scan_lsn`: where a restart re-reads from; `walsender_lsns`: what each active
    walsender sends next; `wal_keep_bytes`: kept for lagging peers; `backup_lsn`: the upload
    position, or None when no object storage is configured."""
    if pageserver_lsn is None:
        return Lsn(0)
    horizon = min(pageserver_lsn, scan_lsn, *walsender_lsns)
    if backup_lsn is not None:
        horizon = min(horizon, backup_lsn)
    if horizon.value <= wal_keep_bytes:
        return Lsn(0)
    return horizon - wal_keep_bytes
