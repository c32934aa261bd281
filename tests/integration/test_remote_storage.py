"""The remote storage backends against real storage: a directory, and S3 on SeaweedFS."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import obstore
import pytest
from remote_fixtures import remote_url, s3_url, seaweed  # noqa: F401

from strata.common.errors import CorruptionError, NotFound, Unavailable, UserError
from strata.common.lsn import Lsn
from strata.pg.relfile import RelTag
from strata.remote.local import LocalDirStorage
from strata.remote.s3 import S3Storage
from strata.remote.seaweed import SeaweedServer
from strata.remote.storage import RetryingStorage, open_remote_storage
from strata.storage.delta_layer import DeltaLayer, DeltaLayerWriter
from strata.storage.key import KEY_MAX, KEY_MIN, KeyRange, rel_block_key
from strata.storage.layer_file import RangedLayerReader
from strata.storage.value import Image, encode_value


def test_round_trip_list_delete(remote_url: str) -> None:  # noqa: F811
    """Objects come back byte for byte; listing is by string prefix, sorted; a deleted or
    never-written key is NotFound; deleting twice is fine."""
    store = open_remote_storage(remote_url)
    blob = bytes(range(256)) * 4096 + b"tail"
    store.put("tenants/t1/timelines/a/layer-1", blob)
    store.put("tenants/t1/timelines/a/index_part.json-00000001", b"{}")
    store.put("tenants/t1/timelines/b/index_part.json-00000002", b"")
    store.put("tenants/t2/x", b"other")
    assert store.get("tenants/t1/timelines/a/layer-1") == blob
    assert store.get("tenants/t1/timelines/b/index_part.json-00000002") == b""
    assert store.list_keys("tenants/t1/timelines/a/index_part.json-") == [
        "tenants/t1/timelines/a/index_part.json-00000001"]
    assert store.list_keys("tenants/t1/") == [
        "tenants/t1/timelines/a/index_part.json-00000001",
        "tenants/t1/timelines/a/layer-1",
        "tenants/t1/timelines/b/index_part.json-00000002"]
    store.put("tenants/t2/x", b"replaced")
    assert store.get("tenants/t2/x") == b"replaced"
    store.delete("tenants/t2/x")
    store.delete("tenants/t2/x")
    with pytest.raises(NotFound, match="tenants/t2/x"):
        store.get("tenants/t2/x")
    assert store.list_keys("tenants/t2/") == []
    with pytest.raises(UserError, match="bad remote storage key"):
        store.put("../escape", b"x")


def test_ranged_get_and_a_layer_read_by_ranges(remote_url: str, tmp_path: Path) -> None:  # noqa: F811
    """get_range returns exactly the bytes asked (fewer at the end, never the local
    backend's checksum trailer); a real layer file read through it answers as the local
    file does."""
    store = open_remote_storage(remote_url)
    blob = bytes(range(256)) * 4096 + b"tail"
    store.put("a/blob", blob)
    assert store.get_range("a/blob", 0, 10) == blob[:10]
    assert store.get_range("a/blob", 5000, 8192) == blob[5000:13192]
    assert store.get_range("a/blob", len(blob) - 4, 100) == b"tail"
    with pytest.raises(NotFound, match="a/missing"):
        store.get_range("a/missing", 0, 10)

    rel = RelTag(1663, 5, 16384, 0)
    writer = DeltaLayerWriter(tmp_path, KeyRange(KEY_MIN, KEY_MAX), (Lsn(0x100), Lsn(0x1000)))
    for blkno in range(500):
        writer.put(rel_block_key(rel, blkno), Lsn(0x200),
                   encode_value(Image(bytes([blkno % 256]) * 8192)))
    writer.finish()
    path = tmp_path / writer.desc.file_name()
    store.put("a/layer", path.read_bytes())
    ranged = RangedLayerReader(path.name, path.stat().st_size,
                               lambda offset, length: store.get_range("a/layer", offset, length),
                               label="a/layer")
    with DeltaLayer.open(path) as local:
        for blkno in (0, 101, 499):
            key = rel_block_key(rel, blkno).to_bytes()
            assert ranged.get_versions_raw(key, 0x1000) == local.get_versions_raw(key, 0x1000)
        assert list(ranged.keys()) == list(local.keys())


def test_corrupt_local_object_detected(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A flipped byte in a stored object is a CorruptionError naming the key."""
    store = LocalDirStorage(tmp_path / "remote")
    store.put("a/b", b"x" * 1000)
    path = tmp_path / "remote" / "a" / "b"
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptionError, match="a/b fails its CRC-32C"):
        store.get("a/b")


def test_corrupt_s3_object_detected(s3_url: str) -> None:  # noqa: F811
    """An S3 object whose bytes do not match its CRC-32C metadata (or has none) is refused."""
    store = S3Storage.from_url(s3_url)
    store.put("obj", b"good bytes")
    raw = store._store  # write around the checksum, as a damaged object would look
    obstore.put(raw, "strata/obj", b"good bytez", attributes={"crc32c": "00000000"})
    with pytest.raises(CorruptionError, match="obj fails its CRC-32C"):
        store.get("obj")
    obstore.put(raw, "strata/plain", b"no checksum")
    with pytest.raises(CorruptionError, match="has no CRC-32C"):
        store.get("plain")


def test_retries_across_a_server_restart(seaweed: SeaweedServer, s3_url: str) -> None:  # noqa: F811
    """With the S3 server down, an upload retries (bounded) and succeeds once the server
    is back; with it down for good, the retries end in Unavailable naming the server."""
    store = RetryingStorage(S3Storage.from_url(s3_url), attempts=60, base_delay_s=0.2,
                            max_delay_s=0.5)
    store.put("before", b"1")
    seaweed.kill9()
    done: list[BaseException | None] = []

    def upload() -> None:
        try:
            store.put("during", b"2" * 100_000)
            done.append(None)
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            done.append(err)

    worker = threading.Thread(target=upload)
    worker.start()
    time.sleep(1.0)  # let a few attempts fail against the stopped server
    assert not done, done
    seaweed.start()
    worker.join(120)
    assert done == [None]
    assert store.get("during") == b"2" * 100_000
    assert store.get("before") == b"1"

    dead = RetryingStorage(S3Storage.from_url(s3_url.replace(
        f":{seaweed.ports['s3.port']}", ":1")), attempts=2, base_delay_s=0.01)
    with pytest.raises(Unavailable, match="failed 2 times"):
        dead.put("x", b"y")


def test_bad_urls() -> None:
    with pytest.raises(UserError, match="not supported"):
        open_remote_storage("gs://bucket")
    with pytest.raises(UserError, match="unknown parameters"):
        open_remote_storage("s3://bucket/p?endpont=http://x")
    with pytest.raises(UserError, match="absolute path"):
        open_remote_storage("file://relative")
