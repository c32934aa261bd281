"""Ranged reads of remote layers: RangedLayerReader against real layer files in a real
directory backend (same answers as the local reader, one ranged read per lookup after
the index, every corrupted range refused), and a timeline attached onto an empty disk
that serves reads without downloading whole layers, then downloads them in the
background."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import pytest

from strata.common import failpoint
from strata.common.errors import CorruptionError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.pg.relfile import RelTag
from strata.remote.download import write_timelines
from strata.remote.index import IndexPart, RemoteLayer
from strata.remote.local import LocalDirStorage
from strata.remote.storage import RetryingStorage
from strata.remote.timeline_client import RemoteTimelineClient, latest_index
from strata.storage.delta_layer import DeltaLayer, DeltaLayerWriter
from strata.storage.key import KEY_MAX, KEY_MIN, KeyRange, rel_block_key
from strata.storage.layer_file import HEADER_SIZE, RangedLayerReader, index_offset
from strata.storage.layer_name import LayerDesc
from strata.storage.metadata import TimelineMetadata
from strata.storage.repository import Repository
from strata.storage.tenant import TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image, Patch, PatchWrite, encode_value

REL = RelTag(1663, 5, 16384, 0)
OBJECT = "layers/the-layer"


def _write_layer(directory: Path, nblocks: int = 300) -> tuple[Path, dict[int, bytes]]:
    """A delta layer: per block an image (random bytes: stored raw, or zeros: zstd) and
    two patches, so lookups return several versions and blobs of both kinds."""
    rng = random.Random(7)
    writer = DeltaLayerWriter(directory, KeyRange(KEY_MIN, KEY_MAX), (Lsn(0x100), Lsn(0x10000)))
    expect = {}
    for blkno in range(nblocks):
        page = rng.randbytes(8192) if blkno % 2 else bytes(8192)
        key = rel_block_key(REL, blkno)
        writer.put(key, Lsn(0x200), encode_value(Image(page)))
        for i, lsn in enumerate((0x300, 0x400)):
            op = PatchWrite(100 * i, bytes([blkno % 256, i]))
            writer.put(key, Lsn(lsn), encode_value(Patch((op,))))
        expect[blkno] = page
    writer.finish()
    return directory / writer.desc.file_name(), expect


class Counting:
    """Ranged reads of one object of a real backend, counted."""

    def __init__(self, storage: LocalDirStorage, size: int) -> None:
        self.storage = storage
        self.size = size
        self.reads: list[tuple[int, int]] = []

    def fetch(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.storage.get_range(OBJECT, offset, length)

    def open(self, name: str) -> RangedLayerReader:
        return RangedLayerReader(name, self.size, self.fetch, label=OBJECT)


@pytest.fixture
def uploaded(tmp_path: Path) -> tuple[Path, LocalDirStorage, Counting, dict[int, bytes]]:
    local = tmp_path / "local"
    local.mkdir()
    path, expect = _write_layer(local)
    storage = LocalDirStorage(tmp_path / "remote")
    storage.put(OBJECT, path.read_bytes())
    return path, storage, Counting(storage, path.stat().st_size), expect


def test_ranged_reader_answers_like_the_local_file_with_one_read_per_lookup(
        uploaded: tuple[Path, LocalDirStorage, Counting, dict[int, bytes]]) -> None:
    path, _, remote, _ = uploaded
    local = DeltaLayer.open(path)
    ranged = remote.open(path.name)
    assert len(remote.reads) == 2, remote.reads  # the header, then index + sparse index
    assert remote.reads[0] == (0, HEADER_SIZE)
    assert ranged.desc == local.desc and ranged.entry_count == local.entry_count == 900
    assert ranged.summary_bytes < path.stat().st_size // 20  # the index is small
    for blkno in (137, 0, 299, 1, 200):  # never forward: no read-ahead
        key = rel_block_key(REL, blkno).to_bytes()
        before = len(remote.reads)
        for end in (0x250, 0x350, 0x10000):
            assert ranged.get_versions_raw(key, end) == local.get_versions_raw(key, end)
        assert len(remote.reads) == before + 3  # one span of blobs per lookup, no index
        assert all(length < 3 * 8300 for _, length in remote.reads[before:])
    assert list(ranged.keys()) == list(local.keys())
    assert list(ranged.distinct_keys_raw(None, 0x10000)) == \
        list(local.distinct_keys_raw(None, 0x10000))
    some = KeyRange(rel_block_key(REL, 10), rel_block_key(REL, 20))
    assert list(ranged.iter_range_raw(some, 0x10000)) == list(local.iter_range_raw(some, 0x10000))
    assert sum(length for _, length in remote.reads) < path.stat().st_size // 4
    local.close()


def test_a_scan_reads_ahead_instead_of_one_get_per_key(
        uploaded: tuple[Path, LocalDirStorage, Counting, dict[int, bytes]]) -> None:
    path, _, remote, _ = uploaded
    local = DeltaLayer.open(path)
    ranged = remote.open(path.name)
    opened = len(remote.reads)
    for blkno in range(300):
        key = rel_block_key(REL, blkno).to_bytes()
        assert ranged.get_versions_raw(key, 0x10000) == local.get_versions_raw(key, 0x10000)
    gets = remote.reads[opened:]
    assert len(gets) < 20, gets  # 300 keys, ~4 KB each: a few windows of up to 1 MiB
    assert max(length for _, length in gets) >= 256 << 10  # the window grew
    local.close()


def test_a_known_index_offset_opens_with_one_parallel_fetch_and_a_wrong_one_is_harmless(
        uploaded: tuple[Path, LocalDirStorage, Counting, dict[int, bytes]]) -> None:
    path, storage, remote, _ = uploaded
    data = path.read_bytes()
    offset = index_offset(data)
    assert HEADER_SIZE < offset < len(data)
    batches: list[list[tuple[int, int]]] = []

    def fetch_many(ranges: list[tuple[int, int]]) -> list[bytes]:
        batches.append(ranges)
        return storage.get_ranges(OBJECT, ranges)

    key = rel_block_key(REL, 42).to_bytes()
    with DeltaLayer.open(path) as local:
        expect = local.get_versions_raw(key, 0x10000)
    for hint, opens in ((offset, [[(0, HEADER_SIZE), (offset, len(data) - offset)]]),
                        (offset + 4096, [[(0, HEADER_SIZE), (offset + 4096,
                                                             len(data) - offset - 4096)]])):
        batches.clear()
        remote.reads.clear()
        ranged = RangedLayerReader(path.name, len(data), remote.fetch, label=OBJECT,
                                   index_offset=hint, fetch_many=fetch_many)
        assert batches == opens
        # The right hint: nothing more to open; a wrong one: the index again, per header.
        assert remote.reads == ([] if hint == offset else [(offset, len(data) - offset)])
        assert ranged.get_versions_raw(key, 0x10000) == expect


def test_the_remote_index_keeps_index_offsets_and_reads_old_entries_without() -> None:
    meta = TimelineMetadata(Lsn(0x200), Lsn(0), None, Lsn(0), Lsn(0), Lsn(0x100))
    name = LayerDesc.delta(KeyRange(KEY_MIN, KEY_MAX), Lsn(0x100), Lsn(0x200)).file_name()
    index = IndexPart(3, meta, {name: RemoteLayer(5000, 0xABCD, 3, 4321)})
    assert IndexPart.decode(index.encode(), "x") == index
    old = json.loads(index.encode())
    del old["layers"][name]["index_offset"]
    assert IndexPart.decode(json.dumps(old).encode(), "x").layers[name].index_offset == 0


def _corrupt(storage: LocalDirStorage, offset: int) -> None:
    """Flip one byte of the stored object (the backend's whole-object CRC-32C is stale
    now, as for an object damaged at rest; ranged reads do not check it)."""
    file = storage.root / OBJECT
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x40
    file.write_bytes(bytes(data))


def test_a_corrupted_blob_range_is_refused_and_other_keys_still_read(
        uploaded: tuple[Path, LocalDirStorage, Counting, dict[int, bytes]]) -> None:
    path, storage, remote, _ = uploaded
    local = DeltaLayer.open(path)
    victim = rel_block_key(REL, 137).to_bytes()
    (_, offset, _), *_ = [(lsn, o, n) for k, lsn, o, n in _entries(local) if k == victim]
    _corrupt(storage, offset + 10)  # inside the image blob of block 137
    ranged = remote.open(path.name)
    with pytest.raises(CorruptionError, match="blob checksum mismatch") as err:
        ranged.get_versions_raw(victim, 0x10000)
    assert OBJECT in str(err.value)
    other = rel_block_key(REL, 138).to_bytes()
    assert ranged.get_versions_raw(other, 0x10000) == local.get_versions_raw(other, 0x10000)
    local.close()


def test_a_corrupted_index_or_header_or_size_is_refused(
        uploaded: tuple[Path, LocalDirStorage, Counting, dict[int, bytes]]) -> None:
    path, storage, remote, _ = uploaded
    local = DeltaLayer.open(path)
    index_offset = local._index_offset
    local.close()
    with pytest.raises(CorruptionError, match="header says"):
        RangedLayerReader(path.name, remote.size + 1, remote.fetch, label=OBJECT)
    _corrupt(storage, index_offset + 4096 + 100)  # an entry of the second index block
    ranged = remote.open(path.name)
    with pytest.raises(CorruptionError, match="index block 1 checksum mismatch"):
        list(ranged.keys())
    _corrupt(storage, 20)  # the key range in the header
    with pytest.raises(CorruptionError, match="checksum mismatch"):
        remote.open(path.name)


def _entries(layer: DeltaLayer) -> list[tuple[bytes, int, int, int]]:
    out = []
    for b in range(layer._nblocks):
        data, prefixes = layer._block(b)
        for slot in range(len(prefixes)):
            key, lsn, offset, length, _ = layer._entry(data, slot)
            out.append((key, lsn, offset, length))
    return out


TENANT = TenantId(bytes(16))
TIMELINE = TimelineId(bytes(15) + b"\x01")


def _attached(tmp_path: Path, ranged_reads_before_download: int,
              download_wait_s: float = 0.5, concurrent_downloads: int = 4) -> tuple[
        Timeline, RemoteTimelineClient, dict[tuple[RelTag, int], bytes], Lsn, Repository]:
    """A timeline of 3 relations (3 layers) uploaded, then attached by a fresh repository
    onto an empty disk; returns (timeline, its client, expected pages, lsn, repository)."""
    conf = TenantConfig(checkpoint_distance=1 << 40, gc_horizon=0, pitr_interval_s=0.0)
    repo = Repository(tmp_path / "ps1")
    tl = repo.create_tenant(TENANT, conf).create_timeline(TIMELINE, Lsn(0x100))
    storage = RetryingStorage(LocalDirStorage(tmp_path / "remote"), attempts=1)
    rng = random.Random(3)
    expect = {}
    lsn = 0x100
    for r in range(3):
        rel = RelTag(1663, 5, 16384 + r, 0)
        for blkno in range(60):
            lsn += 64
            page = rng.randbytes(8192)
            tl.put_rel_page(rel, blkno, Lsn(lsn), Image(page))
            tl.finish_record(Lsn(lsn), Lsn(lsn - 64))
            expect[(rel, blkno)] = page
        tl.flush()
    client = RemoteTimelineClient(storage, TENANT, TIMELINE, 1, tl.dir)
    client.start(tl.metadata, tl.layers(), None)
    assert client.wait_idle(60)
    client.stop()
    repo.close()
    index = latest_index(storage, TENANT, TIMELINE)
    assert index is not None and len(index.layers) == 3
    fresh = Repository(tmp_path / "ps2")
    tenant = fresh.create_tenant(TENANT, conf, 2,
                                 lambda temp: write_timelines({TIMELINE: index}, temp))
    atl = tenant.get_timeline(TIMELINE)
    aclient = RemoteTimelineClient(storage, TENANT, TIMELINE, 2, atl.dir,
                                   ranged_reads_before_download=ranged_reads_before_download,
                                   download_wait_s=download_wait_s,
                                   concurrent_downloads=concurrent_downloads)
    atl.add_remote_layers(index.layer_descs())
    aclient.start(atl.metadata, atl.layers(), index)
    atl.remote = aclient
    return atl, aclient, expect, Lsn(lsn), fresh


def test_attached_timeline_reads_by_ranged_gets_without_downloading(tmp_path: Path) -> None:
    tl, client, expect, lsn, repo = _attached(tmp_path, 1000)
    try:
        some = sorted(expect.items())[::7]
        random.Random(5).shuffle(some)
        for (rel, blkno), page in some:
            assert tl.get_rel_page(rel, blkno, lsn) == page
        assert tl.list_rels(1663, 5, lsn) == {RelTag(1663, 5, 16384 + r, 0) for r in range(3)}
        stats = client.read_stats
        assert stats.layer_downloads == 0
        assert stats.ranged_opens == 3 and stats.ranged_gets > 0
        assert all(layer.index_offset > 0 for layer in client.remote_layers().values())
        assert [d for d, _, _ in tl.local_layer_files()] == []  # nothing whole on disk
        sizes = sum(layer.size for layer in client.remote_layers().values())
        assert stats.ranged_bytes < sizes
    finally:
        client.stop()
        repo.close()


def test_after_n_ranged_reads_the_layer_is_downloaded_in_the_background(
        tmp_path: Path) -> None:
    # The pages of the first relation are in the oldest layer: the first read there looks
    # up the size record too (in all three layers, then it is cached) and each read one
    # page, so 4 reads leave it below 10 ranged reads and 14 reach 10.
    tl, client, expect, lsn, repo = _attached(tmp_path, 10)
    try:
        rel = RelTag(1663, 5, 16384, 0)
        for blkno in range(4):
            assert tl.get_rel_page(rel, blkno, lsn) == expect[(rel, blkno)]
        assert tl.wait_background_downloads(30)
        assert client.read_stats.layer_downloads == 0
        for blkno in range(4, 14):
            assert tl.get_rel_page(rel, blkno, lsn) == expect[(rel, blkno)]
        assert tl.wait_background_downloads(60)
        assert client.read_stats.layer_downloads == 1
        local = [d for d, _, _ in tl.local_layer_files()]
        assert local == [min(tl.layers(), key=lambda d: d.lsn_range[0])]
        gets = client.read_stats.ranged_gets
        for blkno in range(60):  # now from the local file
            assert tl.get_rel_page(rel, blkno, lsn) == expect[(rel, blkno)]
        assert client.read_stats.ranged_gets == gets
        assert tl.evict_layer(local[0])  # evicted: ranged reads again, its index again
        assert tl.get_rel_page(rel, 5, lsn) == expect[(rel, 5)]
        assert client.read_stats.ranged_opens == 4
    finally:
        client.stop()
        repo.close()


@pytest.mark.parametrize("download_wait_s", [5.0, 0.0])
def test_a_read_waits_for_its_layers_running_download(tmp_path: Path,
                                                      download_wait_s: float) -> None:
    """The first read starts the whole download of the layers it touched (slowed by a
    failpoint); the next read of the same layer, expected to finish within
    download_wait_s (the estimate is set to 4 s), waits for it and reads the local file
    instead of a ranged GET. With download_wait_s = 0 it does a ranged GET at once."""
    tl, client, expect, lsn, repo = _attached(tmp_path, 1, download_wait_s)
    client.download_bytes_per_s = max(layer.size for layer in
                                      client.remote_layers().values()) / 4.0
    rel = RelTag(1663, 5, 16384, 0)
    try:
        with failpoint.armed("remote-before-download-layer", lambda: time.sleep(1.0)):
            assert tl.get_rel_page(rel, 0, lsn) == expect[(rel, 0)]
            gets = client.read_stats.ranged_gets
            assert tl.get_rel_page(rel, 1, lsn) == expect[(rel, 1)]
            if download_wait_s:
                assert tl.download_waits == 1
                assert client.read_stats.ranged_gets == gets  # served by the local file
            else:
                assert tl.download_waits == 0
                assert client.read_stats.ranged_gets > gets
            assert tl.wait_background_downloads(60)
        assert client.read_stats.layer_downloads == 3
    finally:
        client.stop()
        repo.close()


@pytest.mark.parametrize("bound", [1, 2])
def test_whole_layer_downloads_run_concurrently_up_to_the_bound(tmp_path: Path,
                                                                bound: int) -> None:
    """Six reads at once, two per layer, on an empty disk without ranged reads: `bound`
    downloads run at the same time (the first `bound` meet at a barrier inside the GET,
    which would time out if they ran one after the other), never more, and each layer
    is downloaded once (the second read of a layer waits for the first's download)."""
    tl, client, expect, lsn, repo = _attached(tmp_path, 0, concurrent_downloads=bound)
    barrier = threading.Barrier(bound, timeout=60)
    arrived = []
    lock = threading.Lock()

    def in_the_get() -> None:
        with lock:
            arrived.append(1)
            first = len(arrived) <= bound
        if first:
            barrier.wait()  # BrokenBarrierError (the read fails) if they cannot overlap
        time.sleep(0.3)  # room for one more to start, were the bound not kept

    # Each relation's pages are in their own layer; the first read of each looks up the
    # relation's size in older layers too, so read the sizes first (all three layers),
    # then evict: reads of pages then touch one layer each.
    rels = [RelTag(1663, 5, 16384 + r, 0) for r in range(3)]
    try:
        for rel in rels:
            assert tl.get_rel_page(rel, 0, lsn) == expect[(rel, 0)]
        assert client.read_stats.layer_downloads == 3
        for desc, _, _ in tl.local_layer_files():
            assert tl.evict_layer(desc)
        assert tl.local_layer_files() == []
        tl.downloads_running_max = 0
        errors: list[BaseException] = []

        def read(rel: RelTag, blkno: int) -> None:
            try:
                assert tl.get_rel_page(rel, blkno, lsn) == expect[(rel, blkno)]
            except BaseException as err:  # noqa: BLE001 - reported below
                errors.append(err)

        with failpoint.armed("remote-before-download-layer", in_the_get):
            threads = [threading.Thread(target=read, args=(rel, blkno))
                       for rel in rels for blkno in (1, 2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        assert errors == []
        assert tl.downloads_running_max == bound
        assert client.read_stats.layer_downloads == 6  # 3 before the eviction, 3 now
        assert len(tl.local_layer_files()) == 3
    finally:
        client.stop()
        repo.close()
