"""The upload queue of one timeline against a real directory backend: order (layers,
then an index naming only uploaded layers, deletions only after an index without them),
retries after failures, and generations (a stale attachment never deletes)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from strata.common import failpoint
from strata.common.errors import CorruptionError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.crc import crc32c
from strata.remote.generations import (
    DeletionVerdict,
    claim_generation,
    delete_markers,
    deletion_verdict,
    marker_key,
    read_generation,
    record_generation,
)
from strata.remote.index import INDEX_NAME, IndexPart, timeline_prefix
from strata.remote.local import LocalDirStorage
from strata.remote.storage import RemoteStorage, RetryingStorage
from strata.remote.timeline_client import RemoteTimelineClient, latest_index
from strata.storage.key import KEY_MAX, KEY_MIN, KeyRange
from strata.storage.layer_name import LayerDesc
from strata.storage.metadata import TimelineMetadata

TENANT = TenantId(bytes(range(16)))
TIMELINE = TimelineId(bytes(range(16, 32)))
PREFIX = timeline_prefix(TENANT, TIMELINE)


class Recording(RemoteStorage):
    """A real backend that records each operation and can fail the next few puts."""

    def __init__(self, inner: RemoteStorage) -> None:
        self.inner = inner
        self.ops: list[tuple[str, str, bytes]] = []
        self.fail_puts = 0

    def put(self, key: str, data: bytes) -> None:
        if self.fail_puts:
            self.fail_puts -= 1
            raise Unavailable("injected: server down")
        self.inner.put(key, data)
        self.ops.append(("put", key, data))

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self.inner.get_range(key, start, length)

    def list_keys(self, prefix: str) -> list[str]:
        return self.inner.list_keys(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)
        self.ops.append(("delete", key, b""))


def meta(dcl: int, gc_cutoff: int = 0) -> TimelineMetadata:
    return TimelineMetadata(Lsn(dcl), Lsn(0), None, Lsn(0), Lsn(gc_cutoff), Lsn(0x100))


def layer(directory: Path, start: int, end: int, size: int = 1000) -> LayerDesc:
    desc = LayerDesc.delta(KeyRange(KEY_MIN, KEY_MAX), Lsn(start), Lsn(end))
    (directory / desc.file_name()).write_bytes(bytes([start % 256]) * size)
    return desc


def check_order(ops: list[tuple[str, str, bytes]]) -> None:
    """Every index names only objects put before it and not deleted since; nothing named
    by the latest index of the generation is ever deleted."""
    live: set[str] = set()
    named: set[str] = set()
    for op, key, data in ops:
        if op == "put" and INDEX_NAME not in key:
            live.add(key)
        elif op == "put":
            index = IndexPart.decode(data, key)
            named = {PREFIX + entry.object_name(name) for name, entry in index.layers.items()}
            assert named <= live, (named - live)
        else:
            assert key not in named, key
            live.discard(key)


def test_uploads_in_order_then_deletes_after_the_index(tmp_path: Path) -> None:
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    tl_dir = tmp_path / "tl"
    tl_dir.mkdir()
    a, b = layer(tl_dir, 0x100, 0x200), layer(tl_dir, 0x200, 0x300)
    client = RemoteTimelineClient(store, TENANT, TIMELINE, 5, tl_dir)
    client.start(meta(0x2FF), [a, b], None)
    assert client.wait_idle(30)
    assert client.remote_consistent_lsn == Lsn(0x2FF)
    index = latest_index(store, TENANT, TIMELINE)
    assert index is not None and index.generation == 5
    assert sorted(index.layers) == sorted([a.file_name(), b.file_name()])
    assert index.layers[a.file_name()].size == 1000
    assert store.inner.get(PREFIX + a.file_name() + "-00000005") == b"\x00" * 1000

    c = layer(tl_dir, 0x300, 0x400)
    client.layer_added(c)
    client.metadata_saved(meta(0x3FF, gc_cutoff=0x300))
    (tl_dir / a.file_name()).unlink()
    client.layer_removed(a)
    assert client.wait_idle(30)
    client.stop()
    index = latest_index(store, TENANT, TIMELINE)
    assert index is not None
    assert sorted(index.layers) == sorted([b.file_name(), c.file_name()])
    assert index.metadata.latest_gc_cutoff == Lsn(0x300)
    assert store.list_keys(PREFIX + a.file_name()) == []
    check_order(store.ops)
    doc = json.loads(store.get(PREFIX + "index_part.json-00000005"))
    assert doc["disk_consistent_lsn"] == "0/3FF"


def test_failed_uploads_are_retried_until_they_succeed(tmp_path: Path) -> None:
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    store.fail_puts = 8  # more than RetryingStorage's own attempts: the queue retries too
    retrying = RetryingStorage(store, attempts=3, base_delay_s=0.01)
    tl_dir = tmp_path / "tl"
    tl_dir.mkdir()
    a = layer(tl_dir, 0x100, 0x200)
    client = RemoteTimelineClient(retrying, TENANT, TIMELINE, 1, tl_dir, retry_pause_s=0.05)
    client.start(meta(0x1FF), [a], None)
    assert client.wait_idle(60)
    assert client.remote_consistent_lsn == Lsn(0x1FF)
    client.stop()
    assert store.fail_puts == 0
    check_order(store.ops)


def test_stale_generation_never_deletes(tmp_path: Path) -> None:
    """Two pageservers attached by mistake: generation 1 (stale) removes a layer that
    generation 2's index still names; the object stays."""
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    dir1, dir2 = tmp_path / "ps1", tmp_path / "ps2"
    dir1.mkdir()
    dir2.mkdir()
    a1, b1 = layer(dir1, 0x100, 0x200), layer(dir1, 0x200, 0x300)
    old = RemoteTimelineClient(store, TENANT, TIMELINE, 1, dir1)
    old.start(meta(0x2FF), [a1, b1], None)
    assert old.wait_idle(30)

    # The new attachment resumes from generation 1's index (it downloaded the layers).
    a2, b2 = layer(dir2, 0x100, 0x200), layer(dir2, 0x200, 0x300)
    new = RemoteTimelineClient(store, TENANT, TIMELINE, 2, dir2)
    new.start(meta(0x2FF), [a2, b2], latest_index(store, TENANT, TIMELINE, 2))
    assert new.wait_idle(30)
    inherited = latest_index(store, TENANT, TIMELINE)
    assert inherited is not None and inherited.generation == 2
    assert inherited.layers[a1.file_name()].generation == 1  # not uploaded again

    (dir1 / a1.file_name()).unlink()
    old.layer_removed(a1)
    assert old.wait_idle(30)
    assert old.stale
    assert store.inner.get(PREFIX + a1.file_name() + "-00000001") == b"\x00" * 1000
    assert all(op != "delete" for op, _, _ in store.ops)
    index = latest_index(store, TENANT, TIMELINE)
    assert index is not None and index.generation == 2
    assert a1.file_name() in index.layers
    old.stop()
    new.stop()


def test_eviction_skips_a_layer_a_read_just_downloaded(tmp_path: Path) -> None:
    """local_cache_bytes=1 race: the evictor runs between a read's download of a layer and
    its open. The read holds (pins) the layer, so the eviction is refused and the read
    gets its page; once the read has the file open the layer is evictable again."""
    from strata.common.failpoint import armed
    from strata.pg.relfile import RelTag
    from strata.storage.repository import Repository
    from strata.storage.tenant import TenantConfig
    from strata.storage.value import Image

    rel, image = RelTag(1663, 5, 16384, 0), bytes(range(256)) * 32
    repo = Repository(tmp_path / "repo")
    tl = repo.create_tenant(TENANT, TenantConfig()).create_timeline(TIMELINE, Lsn(0x100))
    tl.put_rel_page(rel, 0, Lsn(0x200), Image(image))
    tl.finish_record(Lsn(0x200), Lsn(0x1F8))
    tl.freeze()
    tl.flush_frozen()
    [desc] = tl.layers()
    # Whole-layer downloads by the read itself (no ranged reads), where the pin matters.
    client = RemoteTimelineClient(LocalDirStorage(tmp_path / "remote"), TENANT, TIMELINE, 1,
                                  tl.dir, ranged_reads_before_download=0)
    client.start(tl.metadata, tl.layers(), None)
    assert client.wait_idle(30)
    tl.remote = client
    assert tl.evict_layer(desc)  # only in remote storage now
    assert not (tl.dir / desc.file_name()).exists()

    evicted: list[bool] = []
    with armed("timeline-after-download-layer", lambda: evicted.append(tl.evict_layer(desc))):
        assert tl.get_rel_page(rel, 0, Lsn(0x200)) == image
    assert evicted == [False]  # the evictor ran right after the download and was refused
    assert tl.evict_layer(desc)  # the read no longer pins it
    assert tl.get_rel_page(rel, 0, Lsn(0x200)) == image  # its open reader, or a new download
    client.stop()


# --- the generation marker: deletions validated against the control plane's record ------

def test_deletion_verdict_rule() -> None:
    """Pure rule: delete only when neither the marker nor an index names a newer
    generation; a missing marker leaves the listing check alone."""
    assert deletion_verdict(3, None, 0).allowed
    assert deletion_verdict(3, 3, 3).allowed
    assert deletion_verdict(3, 2, 1).allowed  # older records: this one is the newest
    assert deletion_verdict(3, 4, 3) == DeletionVerdict(False, 4, "generation marker")
    assert deletion_verdict(3, None, 4) == DeletionVerdict(False, 4, "index")
    assert deletion_verdict(3, 3, 5) == DeletionVerdict(False, 5, "index")


def test_generation_marker_only_rises(tmp_path: Path) -> None:
    store = LocalDirStorage(tmp_path / "remote")
    assert read_generation(store, TENANT) is None
    record_generation(store, TENANT, 2)
    record_generation(store, TENANT, 2)  # a retried attach of the same number
    record_generation(store, TENANT, 5)
    assert read_generation(store, TENANT) == 5
    with pytest.raises(UserError, match="records generation 5 for tenant"):
        record_generation(store, TENANT, 4)
    assert read_generation(store, TENANT) == 5
    store.put(marker_key(TENANT), b'{"gen": 1}')
    with pytest.raises(CorruptionError, match="generation marker is malformed"):
        read_generation(store, TENANT)


def assert_objects_there(store: RemoteStorage, index: IndexPart) -> None:
    """Every layer object `index` names is in `store` (NotFound if deleted), whole."""
    for name, entry in index.layers.items():
        data = store.get(PREFIX + entry.object_name(name))
        assert (len(data), crc32c(data)) == (entry.size, entry.crc32c), name


def _remove_a_while_generation_2_attaches(
        tmp_path: Path, step: str, take: Callable[[Recording, int], None],
) -> tuple[Recording, RemoteTimelineClient, IndexPart, LayerDesc]:
    """Generation 1 (taken with `take`) uploads layers a and b, then removes `a`; at
    failpoint `step` of that removal (or after it: "after") `take` hands out generation
    2 and the new attachment reads the newest index. Checks that every object that index
    names is there, whole, and that generation 1 deleted `a` only if it validated its
    generation first (then it is not stale); returns the store, the stopped generation 1
    client, the index the new attachment read, and `a`."""
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    dir1 = tmp_path / "ps1"
    dir1.mkdir()
    a, b = layer(dir1, 0x100, 0x200), layer(dir1, 0x200, 0x300)
    take(store, 1)
    old = RemoteTimelineClient(store, TENANT, TIMELINE, 1, dir1)
    old.start(meta(0x2FF), [a, b], None)
    assert old.wait_idle(30)
    seen: list[IndexPart | None] = []

    def attach_new() -> None:  # the control plane, then the new pageserver's attach
        if not seen:
            take(store, 2)
            seen.append(latest_index(store, TENANT, TIMELINE, 2))

    (dir1 / a.file_name()).unlink()
    if step == "after":
        old.layer_removed(a)
        assert old.wait_idle(30)
        attach_new()
    else:
        with failpoint.armed(step, attach_new):
            old.layer_removed(a)
            assert old.wait_idle(30)
    old.stop()
    index = seen[0]
    assert index is not None
    assert_objects_there(store, index)
    deleted = [key for op, key, _ in store.ops if op == "delete"]
    validated_first = step in ("remote-before-delete-layers", "after")
    assert deleted == ([PREFIX + a.file_name() + "-00000001"] if validated_first else [])
    assert old.stale is not validated_first
    return store, old, index, a


# Where, among the stale attachment's deletion steps, the control plane hands out
# generation 2 and the new attachment reads its index (before it uploaded one of its own:
# the window the listing check alone left open).
STEPS = ("remote-before-upload-index", "remote-before-validate-generation",
         "remote-before-delete-layers")


@pytest.mark.parametrize("step", [*STEPS, "after"])
def test_new_attachment_never_loses_an_object_it_read(tmp_path: Path, step: str) -> None:
    """Generation 1 removes layer `a` while the control plane records generation 2 and
    the new attachment reads the newest index, at each point of generation 1's deletion
    (before its index without `a`, before its validation, before the delete, after).
    Whatever the interleaving, every object the index read by the new attachment names
    exists at the end, with its checksum; generation 1 deletes only when its validation
    came before the record."""
    store, _old, index, a = _remove_a_while_generation_2_attaches(
        tmp_path, step, lambda store, gen: record_generation(store, TENANT, gen))
    assert index.generation == 1
    # The new attachment read the index without `a` unless it attached before that
    # index was uploaded; then `a` stays.
    assert (a.file_name() in index.layers) is (step == "remote-before-upload-index")
    check_order(store.ops)


def test_listing_check_still_guards_without_a_marker(tmp_path: Path) -> None:
    """A tenant without a marker (attached through the HTTP API, no control plane): an
    index of a newer generation still stops the stale attachment's deletions."""
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    dir1 = tmp_path / "ps1"
    dir1.mkdir()
    a, b = layer(dir1, 0x100, 0x200), layer(dir1, 0x200, 0x300)
    old = RemoteTimelineClient(store, TENANT, TIMELINE, 1, dir1)
    old.start(meta(0x2FF), [a, b], None)
    assert old.wait_idle(30)
    inherited = latest_index(store, TENANT, TIMELINE)
    assert inherited is not None
    store.put(PREFIX + "index_part.json-00000002",
              IndexPart(2, inherited.metadata, inherited.layers).encode())
    (dir1 / a.file_name()).unlink()
    old.layer_removed(a)
    assert old.wait_idle(30)
    old.stop()
    assert old.stale
    assert all(op != "delete" for op, _, _ in store.ops)


# --- markers the pageserver writes itself (an attach through the HTTP API) ----------------

def test_pageserver_claim_raises_the_marker_and_reports_a_newer_one(tmp_path: Path) -> None:
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    assert claim_generation(store, TENANT, 2) is None  # no marker: writes 2
    assert read_generation(store, TENANT) == 2
    puts = len(store.ops)
    assert claim_generation(store, TENANT, 2) is None  # already 2: no write
    assert len(store.ops) == puts
    record_generation(store, TENANT, 5)  # the control plane hands out 5
    assert claim_generation(store, TENANT, 4) == 5  # stale: nothing written
    assert read_generation(store, TENANT) == 5
    assert claim_generation(store, TENANT, 6) is None
    assert read_generation(store, TENANT) == 6
    # The single object earlier versions rewrote in place is still read.
    store.put(marker_key(TENANT), json.dumps({"generation": 9}).encode())
    assert read_generation(store, TENANT) == 9
    assert claim_generation(store, TENANT, 7) == 9
    assert delete_markers(store, TENANT) == 4  # 2, 5, 6 and the old single object
    assert read_generation(store, TENANT) is None
    assert store.list_keys(f"tenants/{TENANT}/") == []


def test_racing_claims_never_lower_the_marker(tmp_path: Path) -> None:
    """Attaches of generations 3 and 4 race: 3 reads the marker (1), then 4 is claimed
    and its attachment reads the index, then 3 writes its marker. Rewriting one object in
    place would now say 3 under an attachment of 4; the marker is the highest object, so
    it stays 4, and a client of generation 3 deletes nothing."""
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    dir3 = tmp_path / "ps3"
    dir3.mkdir()
    a, b = layer(dir3, 0x100, 0x200), layer(dir3, 0x200, 0x300)
    record_generation(store, TENANT, 1)
    seed = RemoteTimelineClient(store, TENANT, TIMELINE, 1, dir3)
    seed.start(meta(0x2FF), [a, b], None)
    assert seed.wait_idle(30)
    seed.stop()
    seen: list[IndexPart | None] = []
    claimed: list[int] = []

    def claim_4() -> None:  # the failpoint stays armed: only the first hit acts
        if not claimed:
            claimed.append(4)
            assert claim_generation(store, TENANT, 4) is None
            seen.append(latest_index(store, TENANT, TIMELINE, 4))

    with failpoint.armed("generation-before-put-marker", claim_4):
        assert claim_generation(store, TENANT, 3) is None  # read 1, wrote 3 after 4
    assert read_generation(store, TENANT) == 4
    stale_calls: list[tuple[int, str]] = []
    old = RemoteTimelineClient(store, TENANT, TIMELINE, 3, dir3,
                               on_stale=lambda newer, where: stale_calls.append((newer, where)))
    old.start(meta(0x2FF), [a, b], latest_index(store, TENANT, TIMELINE, 3))
    assert old.wait_idle(30)
    (dir3 / a.file_name()).unlink()
    old.layer_removed(a)
    assert old.wait_idle(30)
    old.stop()
    assert stale_calls == [(4, "generation marker")]
    assert all(op != "delete" for op, _, _ in store.ops)
    index = seen[0]
    assert index is not None and a.file_name() in index.layers
    assert_objects_there(store, index)


@pytest.mark.parametrize("step", [*STEPS, "after"])
def test_attach_through_the_api_never_loses_an_object_it_read(tmp_path: Path,
                                                              step: str) -> None:
    """As test_new_attachment_never_loses_an_object_it_read, with no control plane: each
    pageserver claims its generation itself (the stale one when it loaded the tenant, the
    new one in its attach, before reading the index)."""
    def claim(store: Recording, gen: int) -> None:
        assert claim_generation(store, TENANT, gen) is None

    store, _old, _index, _a = _remove_a_while_generation_2_attaches(tmp_path, step, claim)
    check_order(store.ops)


def test_a_stale_client_stops_uploading_and_keeps_its_layers(tmp_path: Path) -> None:
    """Told it is stale (the pageserver's periodic marker check), a client drops what is
    queued and every later change: no put, no delete; nothing is evictable any more;
    waiting for it returns at once (a detach does not hang); downloads still work."""
    store = Recording(LocalDirStorage(tmp_path / "remote"))
    tl_dir = tmp_path / "tl"
    tl_dir.mkdir()
    a, b = layer(tl_dir, 0x100, 0x200), layer(tl_dir, 0x200, 0x300)
    client = RemoteTimelineClient(store, TENANT, TIMELINE, 1, tl_dir)
    client.start(meta(0x2FF), [a, b], None)
    assert client.wait_idle(30)
    assert client.is_evictable(a)
    ops = len(store.ops)
    store.fail_puts = 1000  # what was queued when it learned it is stale never lands
    client.layer_added(layer(tl_dir, 0x300, 0x400))
    client.metadata_saved(meta(0x3FF))
    assert client.mark_stale()
    assert not client.mark_stale()  # once
    store.fail_puts = 0
    client.layer_added(layer(tl_dir, 0x400, 0x500))
    client.metadata_saved(meta(0x4FF))
    (tl_dir / b.file_name()).unlink()
    client.layer_removed(b)
    assert client.wait_idle(5)
    assert not client.is_evictable(a)
    client.download(b)  # reads still fetch what the index names
    assert (tl_dir / b.file_name()).stat().st_size == 1000
    client.stop()
    assert len(store.ops) == ops, store.ops[ops:]
    assert client.remote_consistent_lsn == Lsn(0x2FF)
