"""Layer files: names, delta/image write and read, and detection of every corrupt byte."""

import os
import random
import threading
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common.errors import CorruptionError, UserError
from strata.common.lsn import Lsn
from strata.pg.constants import BKPIMAGE_COMPRESS_ZSTD, BLCKSZ
from strata.pg.relfile import RelTag
from strata.storage.delta_layer import DeltaLayer, DeltaLayerWriter
from strata.storage.image_layer import ImageLayer, ImageLayerWriter
from strata.storage.key import FULL_KEY_RANGE, KEY_MAX, KEY_MIN, Key, KeyRange, rel_block_key
from strata.storage.layer_file import (
    ENTRIES_PER_BLOCK,
    HEADER_SIZE,
    INDEX_BLOCK_SIZE,
    LayerFileReader,
    open_layer,
)
from strata.storage.layer_name import LayerDesc, is_layer_file_name, is_temp_file_name
from strata.storage.value import (
    Image,
    Patch,
    PatchOp,
    Tombstone,
    WalImage,
    decode_value,
    encode_value,
    is_image_bytes,
)

REL = RelTag(1663, 5, 16384, 0)
u32 = st.integers(0, 0xFFFFFFFF)
keys = st.builds(Key, st.integers(0, 0xFF), u32, u32, u32, st.integers(0, 0xFF), u32)
lsns = st.integers(0, (1 << 64) - 2).map(Lsn)


# --- names ---------------------------------------------------------------------------
@given(keys, keys, lsns, st.integers(1, 1 << 40), st.booleans())
def test_file_name_round_trip(a: Key, b: Key, start: Lsn, length: int, delta: bool) -> None:
    kr = KeyRange(min(a, b), max(a, b))
    end = Lsn(min(start.value + length, (1 << 64) - 1)) if delta else start + 1
    if end <= start:
        return
    desc = LayerDesc(kr, (start, end), delta)
    name = desc.file_name()
    assert is_layer_file_name(name)
    assert LayerDesc.parse_file_name(name) == desc


def test_temp_and_foreign_names_rejected() -> None:
    desc = LayerDesc.delta(FULL_KEY_RANGE, Lsn(0x100), Lsn(0x200))
    name = desc.file_name()
    for bad in (name + ".1a2b3c4d.tmp", name + ".tmp", name.lower(), "metadata",
                name.replace(".delta", ".image"), name[1:]):
        assert not is_layer_file_name(bad)
        with pytest.raises(UserError, match="not a layer file name"):
            LayerDesc.parse_file_name(bad)
    assert is_temp_file_name(name + ".1a2b3c4d.tmp")
    image = LayerDesc.image(FULL_KEY_RANGE, Lsn(0x100))
    assert image.lsn_range == (Lsn(0x100), Lsn(0x101))
    assert LayerDesc.parse_file_name(image.file_name()) == image


# --- helpers ---------------------------------------------------------------------------
def _value(rnd: random.Random, image: bool) -> bytes:
    if not image:
        return encode_value(Patch(tuple(PatchOp(rnd.randrange(BLCKSZ), 0xFF, rnd.randrange(256))
                                        for _ in range(rnd.randrange(1, 4)))))
    kind = rnd.randrange(4)
    if kind == 0:  # compressible page
        return encode_value(Image(bytes([rnd.randrange(4)]) * 100 + rnd.randbytes(50)
                                  + bytes(BLCKSZ - 150)))
    if kind == 1:  # incompressible
        return encode_value(Image(rnd.randbytes(rnd.randrange(1, 3000))))
    if kind == 2:
        body = bytes(rnd.randrange(3)) * 4000 + rnd.randbytes(100)
        return encode_value(WalImage(BKPIMAGE_COMPRESS_ZSTD, 0, 0,
                                     zstandard.ZstdCompressor().compress(body),
                                     rnd.randrange(1 << 40), rnd.random() < 0.5))
    return encode_value(Tombstone())


Model = dict[Key, list[tuple[Lsn, bytes]]]


def _write_delta(directory: Path, nkeys: int, seed: int,
                 lsn_range: tuple[Lsn, Lsn] = (Lsn(0x1000), Lsn(0x9000))) -> tuple[Path, Model]:
    rnd = random.Random(seed)
    model: Model = {}
    blknos = sorted(rnd.sample(range(100_000), nkeys))
    w = DeltaLayerWriter(directory, FULL_KEY_RANGE, lsn_range)
    for blk in blknos:
        key = rel_block_key(REL, blk)
        n = rnd.randrange(1, 6)
        versions = sorted(rnd.sample(range(lsn_range[0].value, lsn_range[1].value), n))
        model[key] = []
        for lsn in versions:
            v = _value(rnd, image=rnd.random() < 0.4)
            w.put(key, Lsn(lsn), v)
            model[key].append((Lsn(lsn), v))
    desc = w.finish()
    return directory / desc.file_name(), model


def _expected(model: Model, key: Key, end: Lsn) -> list[tuple[Lsn, bytes]]:
    out = []
    for lsn, v in reversed(model.get(key, [])):
        if lsn < end:
            out.append((lsn, v))
            if is_image_bytes(v):
                break
    return out


# --- delta layers ---------------------------------------------------------------------
def test_delta_get_versions_at_every_end_lsn(tmp_path: Path) -> None:
    """Multi-block delta layer: get_versions matches the model at every interesting LSN."""
    path, model = _write_delta(tmp_path, 700, seed=1)
    layer = DeltaLayer.open(path)
    assert layer.desc == LayerDesc.parse_file_name(path.name)
    assert layer.entry_count == sum(len(v) for v in model.values())
    assert layer.entry_count > 3 * ENTRIES_PER_BLOCK
    for key, versions in model.items():
        ends = {Lsn(0x1000), Lsn(0x9000), Lsn((1 << 64) - 1)}
        for lsn, _ in versions:
            ends |= {lsn, lsn + 1}
        for end in sorted(ends):
            assert layer.get_versions(key, end) == _expected(model, key, end), (key, end)
    # absent keys: between, before and after every stored key
    stored = sorted(model)
    absent = [KEY_MIN, rel_block_key(REL, 100_001), KEY_MAX] + [k.next() for k in stored]
    for k in absent:
        if k not in model:
            assert layer.get_versions(k, Lsn(0x9000)) == []
    layer.close()


def test_delta_iter_range_and_keys(tmp_path: Path) -> None:
    path, model = _write_delta(tmp_path, 400, seed=2)
    layer = open_layer(path)
    assert isinstance(layer, DeltaLayer)
    stored = sorted(model)
    everything = [(k, lsn, v) for k in stored for lsn, v in model[k]]
    assert list(layer.iter_range(FULL_KEY_RANGE, Lsn(0x9000))) == everything
    assert [(k, lsn) for k, lsn, _ in layer.keys()] == [(k, lsn) for k, lsn, _ in everything]
    rnd = random.Random(3)
    for _ in range(30):
        a, b = sorted(rnd.sample(stored, 2))
        end = Lsn(rnd.randrange(0x1000, 0x9001))
        want = [(k, lsn, v) for k, lsn, v in everything if a <= k < b and lsn < end]
        assert list(layer.iter_range(KeyRange(a, b), end)) == want
    assert list(layer.iter_range(KeyRange(KEY_MIN, stored[0]), Lsn(0x9000))) == []


def test_distinct_keys_skip_versions(tmp_path: Path) -> None:
    """distinct_keys_raw lists each key once whether its versions fill part of an index
    block or run over several blocks, and drops keys whose versions all come later."""
    rnd = random.Random(4)
    w = DeltaLayerWriter(tmp_path, FULL_KEY_RANGE, (Lsn(0x1000), Lsn(0x100000)))
    first_lsn: dict[Key, int] = {}
    for blk in range(60):
        key = rel_block_key(REL, blk * 3)
        n = rnd.choice([1, 2, 5, ENTRIES_PER_BLOCK - 1, ENTRIES_PER_BLOCK, 3 * ENTRIES_PER_BLOCK])
        lsns = sorted(rnd.sample(range(0x1000, 0x100000), n))
        first_lsn[key] = lsns[0]
        for lsn in lsns:
            w.put(key, Lsn(lsn), encode_value(Tombstone()))
    layer = DeltaLayer.open(tmp_path / w.finish().file_name())
    assert layer.entry_count > 20 * ENTRIES_PER_BLOCK
    stored = sorted(first_lsn)
    for end in (0x1000, 0x2000, 0x80000, 0x100000):
        want = [k.to_bytes() for k in stored if first_lsn[k] < end]
        assert list(layer.distinct_keys_raw(None, end)) == want
        for _ in range(20):
            a, b = sorted(rnd.sample([*stored, KEY_MIN, KEY_MAX] + [k.next() for k in stored], 2))
            got = list(layer.distinct_keys_raw(KeyRange(a, b), end))
            assert got == [k for k in want if a.to_bytes() <= k < b.to_bytes()], (a, b, end)
    layer.close()


def test_reader_shared_by_threads(tmp_path: Path) -> None:
    """One reader serves concurrent get_versions from several threads correctly."""
    path, model = _write_delta(tmp_path, 600, seed=4)
    layer = DeltaLayer.open(path)
    stored = sorted(model)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        try:
            for _ in range(400):
                key = rnd.choice(stored)
                end = Lsn(rnd.randrange(0x1000, 0x9001))
                assert layer.get_versions(key, end) == _expected(model, key, end)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[0]
    layer.close()


def test_values_decode_and_compression_pays(tmp_path: Path) -> None:
    """Compressible values shrink on disk; values read back decode to what was put."""
    w = DeltaLayerWriter(tmp_path, FULL_KEY_RANGE, (Lsn(1), Lsn(100)))
    page = Image(b"heap tuple " * 700 + bytes(BLCKSZ - 7700))
    for blk in range(50):
        w.put(rel_block_key(REL, blk), Lsn(10), encode_value(page))
    desc = w.finish()
    path = tmp_path / desc.file_name()
    assert path.stat().st_size < 50 * BLCKSZ / 10
    with DeltaLayer.open(path) as layer:
        [(lsn, raw)] = layer.get_versions(rel_block_key(REL, 7), Lsn(11))
        assert lsn == Lsn(10) and decode_value(raw) == page


def test_writer_rejects_out_of_order_and_out_of_range(tmp_path: Path) -> None:
    w = DeltaLayerWriter(tmp_path, KeyRange(rel_block_key(REL, 0), rel_block_key(REL, 10)),
                         (Lsn(100), Lsn(200)))
    w.put(rel_block_key(REL, 1), Lsn(150), b"\x04")
    for key, lsn in ((rel_block_key(REL, 1), Lsn(150)), (rel_block_key(REL, 0), Lsn(160)),
                     (rel_block_key(REL, 10), Lsn(160)), (rel_block_key(REL, 2), Lsn(200))):
        with pytest.raises(AssertionError):
            w.put(key, lsn, b"\x04")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_half_written_file_is_temp_named(tmp_path: Path) -> None:
    """Until finish, the only file has a temp name, which is never parsed as a layer."""
    w = DeltaLayerWriter(tmp_path, FULL_KEY_RANGE, (Lsn(1), Lsn(100)))
    w.put(rel_block_key(REL, 1), Lsn(5), b"\x04")
    [f] = list(tmp_path.iterdir())
    assert is_temp_file_name(f.name) and not is_layer_file_name(f.name)
    with pytest.raises(UserError):
        LayerDesc.parse_file_name(f.name)
    desc = w.finish()
    assert [p.name for p in tmp_path.iterdir()] == [desc.file_name()]


def test_empty_layer(tmp_path: Path) -> None:
    desc = DeltaLayerWriter(tmp_path, FULL_KEY_RANGE, (Lsn(1), Lsn(2))).finish()
    with DeltaLayer.open(tmp_path / desc.file_name()) as layer:
        assert layer.entry_count == 0
        assert layer.get_versions(KEY_MIN, Lsn(2)) == []
        assert list(layer.iter_range(FULL_KEY_RANGE, Lsn(2))) == []


# --- image layers -----------------------------------------------------------------------
def test_image_layer(tmp_path: Path) -> None:
    rnd = random.Random(5)
    lsn = Lsn(0x5000)
    kr = KeyRange(rel_block_key(REL, 0), rel_block_key(REL, 1000))
    w = ImageLayerWriter(tmp_path, kr, lsn)
    model = {}
    for blk in range(0, 1000, 3):
        v = _value(rnd, image=True)
        w.put(rel_block_key(REL, blk), v)
        model[rel_block_key(REL, blk)] = v
    desc = w.finish()
    assert desc.lsn_range == (lsn, lsn + 1) and not desc.is_delta
    layer = open_layer(tmp_path / desc.file_name())
    assert isinstance(layer, ImageLayer)
    with pytest.raises(CorruptionError, match="expected a delta layer"):
        DeltaLayer.open(tmp_path / desc.file_name())
    for blk in range(1000):
        key = rel_block_key(REL, blk)
        want = model.get(key)
        assert layer.get(key) == want
        assert layer.get_versions(key, lsn + 1) == ([(lsn, want)] if want else [])
        assert layer.get_versions(key, lsn) == []
    assert [(k, v) for k, _, v in layer.iter_range(kr, lsn + 1)] == sorted(model.items())


def test_image_writer_refuses_deltas(tmp_path: Path) -> None:
    w = ImageLayerWriter(tmp_path, FULL_KEY_RANGE, Lsn(9))
    with pytest.raises(AssertionError, match="images only"):
        w.put(KEY_MIN, encode_value(Patch(())))
    w.abort()


# --- corruption -----------------------------------------------------------------------------
def _read_everything(path: Path, model: Model) -> None:
    with LayerFileReader(path) as layer:
        for key in model:
            layer.get_versions(key, Lsn((1 << 64) - 1))
        list(layer.iter_range(FULL_KEY_RANGE, Lsn((1 << 64) - 1)))


def _flip(path: Path, offset: int) -> bytes:
    data = path.read_bytes()
    bad = bytearray(data)
    bad[offset] ^= 0x5A
    path.write_bytes(bytes(bad))
    return data


def test_every_byte_of_a_small_layer_is_checked(tmp_path: Path) -> None:
    """Flipping any single byte of a layer makes opening or reading it fail loudly."""
    path, model = _write_delta(tmp_path, 6, seed=7)
    size = path.stat().st_size
    assert size < HEADER_SIZE + 20_000
    _read_everything(path, model)
    for offset in range(size):
        good = _flip(path, offset)
        with pytest.raises(CorruptionError) as info:
            _read_everything(path, model)
        assert path.name in str(info.value), offset
        path.write_bytes(good)


@pytest.mark.parametrize("region", ["header", "blob", "index", "last-index-block", "sparse"])
def test_corrupt_region_of_large_layer(tmp_path: Path, region: str) -> None:
    """Corruption in each region of a multi-block layer is detected; other layers still work."""
    (tmp_path / "bad").mkdir()
    path, model = _write_delta(tmp_path / "bad", 500, seed=8)
    other, other_model = _write_delta(tmp_path, 50, seed=9)
    with LayerFileReader(path) as layer:
        index_offset = layer._index_offset
        nblocks = layer._nblocks
    offset = {"header": 40, "blob": HEADER_SIZE + 3000, "index": index_offset + 100,
              "last-index-block": index_offset + (nblocks - 1) * INDEX_BLOCK_SIZE + 9,
              "sparse": path.stat().st_size - 5}[region]
    _flip(path, offset)
    with pytest.raises(CorruptionError, match=path.name):
        _read_everything(path, model)
    _read_everything(other, other_model)


def test_corrupt_blob_fails_only_reads_that_touch_it(tmp_path: Path) -> None:
    path, model = _write_delta(tmp_path, 200, seed=10)
    layer = DeltaLayer.open(path)
    victim = sorted(model)[100]
    [(_, offset, _)] = [(lsn, off, ln) for lsn, off, ln in _index_entries(layer, victim)][-1:]
    _flip(path, offset + 7)
    with pytest.raises(CorruptionError, match=f"offset {offset}"):
        layer.get_versions(victim, Lsn(0x9000))
    for key in sorted(model)[:100]:
        assert layer.get_versions(key, Lsn(0x9000)) == _expected(model, key, Lsn(0x9000))
    layer.close()


def _index_entries(layer: DeltaLayer, key: Key) -> list[tuple[int, int, int]]:
    out = []
    for b in range(layer._nblocks):
        data = layer._block(b)[0]
        for s in range(min(ENTRIES_PER_BLOCK, layer.entry_count - b * ENTRIES_PER_BLOCK)):
            k, lsn, off, ln, _ = layer._entry(data, s)
            if k == key.to_bytes():
                out.append((lsn, off, ln))
    return out


@pytest.mark.parametrize("cut", [1, 100, 5000, -1])
def test_truncated_or_extended_file(tmp_path: Path, cut: int) -> None:
    path, model = _write_delta(tmp_path, 300, seed=11)
    size = path.stat().st_size
    if cut < 0:
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        os.truncate(path, size - cut)
    with pytest.raises(CorruptionError, match=path.name):
        _read_everything(path, model)


def test_header_not_matching_name(tmp_path: Path) -> None:
    path, _ = _write_delta(tmp_path, 5, seed=12)
    other = LayerDesc.delta(FULL_KEY_RANGE, Lsn(0x1000), Lsn(0x9001))
    path.rename(tmp_path / other.file_name())
    with pytest.raises(CorruptionError, match="not its name"):
        DeltaLayer.open(tmp_path / other.file_name())


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(1, 30), st.booleans()),
                max_size=60, unique_by=lambda t: (t[0], t[1])))
def test_delta_round_trip_property(tmp_path_factory: pytest.TempPathFactory,
                                   puts: list[tuple[int, int, bool]]) -> None:
    directory = tmp_path_factory.mktemp("prop")
    w = DeltaLayerWriter(directory, FULL_KEY_RANGE, (Lsn(1), Lsn(31)))
    model: Model = {}
    for blk, lsn, img in sorted(puts):
        v = encode_value(Image(bytes([blk, lsn]) * 40) if img else Patch((PatchOp(1, 0, 1),)))
        w.put(rel_block_key(REL, blk), Lsn(lsn), v)
        model.setdefault(rel_block_key(REL, blk), []).append((Lsn(lsn), v))
    layer = DeltaLayer.open(directory / w.finish().file_name())
    for blk in range(52):
        key = rel_block_key(REL, blk)
        for end in range(1, 33):
            assert layer.get_versions(key, Lsn(end)) == _expected(model, key, Lsn(end))
    layer.close()
