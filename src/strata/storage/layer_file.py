"""The layer file format shared by delta and image layers: its writer and its reader.

docs/layer-format.md describes the bytes for someone without this code. In short:

    [header, 128 bytes][blobs ...][index blocks, 4096 bytes each][sparse index]

- header: magic, version, kind, key range, LSN range, entry count, region offsets,
  file size; a CRC-32C over the header and the sparse index, verified on open.
- blob: crc32c u32 | compression u8 (0 raw, 1 zstd) | payload. The CRC covers the
  compression byte and the payload. Values are compressed with zstd only when that
  saves at least 1/8; WAL page images PostgreSQL already compressed are stored raw.
- index: entries sorted by (key, lsn), 40 bytes each, packed 102 to a block; a
  block is crc32c u32 | count u16 | zero u16 | entries | zero padding, its CRC
  over everything after the CRC field. Verified each time a block is read.
- sparse index: the (key, lsn) of the first entry of each block, kept in memory,
  so a lookup is a bisect in memory, one index-block pread, and one blob pread.

Everything in the file is covered by exactly one CRC and the file size is in the
header, so any corrupted byte or a truncation fails the read that touches it (or
the open) with CorruptionError naming the file and offset.
Readers use os.pread only, so one reader is safe to share between threads.
"""

from __future__ import annotations

import itertools
import os
import secrets
import struct
import threading
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import zstandard

from strata.common.durable import fsync_dir
from strata.common.errors import CorruptionError, NotFound, UserError
from strata.common.lsn import Lsn
from strata.pg.constants import BKPIMAGE_COMPRESSED_MASK
from strata.pg.crc import crc32c
from strata.storage.key import KEY_SIZE, Key, KeyRange
from strata.storage.layer_name import TEMP_SUFFIX, LayerDesc
from strata.storage.value import IMAGE_TAGS, TAG_WAL_IMAGE

MAGIC = b"STRATALF"
FORMAT_VERSION = 1
KIND_DELTA = 1
KIND_IMAGE = 2

HEADER_SIZE = 128
_HEADER = struct.Struct("<8sHBB18s18sQQQQQIIQQ")
_HEADER_CRC_OFFSET = HEADER_SIZE - 4
_U32 = struct.Struct("<I")
assert _HEADER.size <= _HEADER_CRC_OFFSET, _HEADER.size

PREFIX_SIZE = KEY_SIZE + 8  # key + big-endian lsn: byte order == (key, lsn) order
ENTRY_SIZE = 40
_ENTRY_TAIL = struct.Struct(">QIBB")  # blob offset, blob length, flags, zero
assert PREFIX_SIZE + _ENTRY_TAIL.size == ENTRY_SIZE
ENTRY_IMAGE = 0x01  # entry flag: the value is an image (ends a reconstruction chain)

INDEX_BLOCK_SIZE = 4096
_BLOCK_HDR = struct.Struct("<IHH")  # crc, count, zero
ENTRIES_PER_BLOCK = (INDEX_BLOCK_SIZE - _BLOCK_HDR.size) // ENTRY_SIZE

BLOB_HEADER = struct.Struct("<IB")  # crc32c of (compression byte + payload), compression
BLOB_RAW = 0
BLOB_ZSTD = 1
COMPRESS_MIN_BYTES = 64
ZSTD_LEVEL = 1  # ingest speed matters more than the last few percent of ratio

_tls = threading.local()
_reader_ids = itertools.count()


class _IndexBlockCache:
    """Verified index blocks (with their entry prefixes split out) shared by all readers.

    A hit saves a pread, a CRC and the parsing; bytes on disk are immutable, so a
    block verified once stays valid. Bounded LRU; readers are keyed by a unique
    number, never by id(), so a closed reader's blocks are simply aged out.
    """

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self._blocks: OrderedDict[tuple[int, int], tuple[bytes, list[bytes]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[int, int]) -> tuple[bytes, list[bytes]] | None:
        with self._lock:
            found = self._blocks.get(key)
            if found is not None:
                self._blocks.move_to_end(key)
            return found

    def put(self, key: tuple[int, int], value: tuple[bytes, list[bytes]]) -> None:
        with self._lock:
            self._blocks[key] = value
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)


# About 10 KB per cached block: 4096 blocks index ~400,000 values (3 GB of pages).
INDEX_BLOCK_CACHE = _IndexBlockCache(4096)


def _decompressor() -> zstandard.ZstdDecompressor:
    # ZstdDecompressor instances must not be used by two threads at once.
    d: zstandard.ZstdDecompressor | None = getattr(_tls, "zstd", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _tls.zstd = d
    return d


_LSN_MAX_BYTES = b"\xff" * 8  # above every LSN a layer stores


def _lsn_bytes(lsn: int) -> bytes:
    return lsn.to_bytes(8, "big")


class LayerFileWriter:
    """Writes one layer file: blobs appended in (key, lsn) order, index at finish.

    Per value it keeps only 40 bytes of index in a bytearray (no Python objects).
    """

    def __init__(self, directory: Path, desc: LayerDesc, kind: int) -> None:
        assert kind in (KIND_DELTA, KIND_IMAGE), kind
        assert (kind == KIND_DELTA) == desc.is_delta, (kind, desc)
        self.desc = desc
        self.kind = kind
        self._dir = Path(directory)
        self._final = self._dir / desc.file_name()
        self._temp = self._dir / f"{desc.file_name()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        self._file = open(self._temp, "xb", buffering=1 << 20)  # noqa: SIM115 closed in finish
        self._file.write(bytes(HEADER_SIZE))
        self._pos = HEADER_SIZE
        self._index = bytearray()
        self._count = 0
        self._last_prefix = b""
        self._key_start = desc.key_range.start.to_bytes()
        self._key_end = desc.key_range.end.to_bytes()
        self._lsn_start = desc.lsn_range[0].value
        self._lsn_end = desc.lsn_range[1].value
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        self._done = False
        self.raw_bytes = 0  # value bytes before compression, for reporting

    @property
    def count(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        """Bytes written so far (blobs and header), for sizing layers."""
        return self._pos

    def put_raw(self, key: bytes, lsn: int, value: bytes) -> None:
        """Append one value; (key, lsn) must be strictly greater than the previous one."""
        assert not self._done, self._temp
        assert len(value) > 0, (key.hex(), lsn)
        assert self._key_start <= key < self._key_end, (key.hex(), str(self.desc.key_range))
        assert self._lsn_start <= lsn < self._lsn_end, (lsn, self.desc.lsn_range)
        prefix = key + _lsn_bytes(lsn)
        assert prefix > self._last_prefix, ("out of order", prefix.hex(),
                                            self._last_prefix.hex())
        self._last_prefix = prefix
        flag, payload = self._encode(value)
        crc = crc32c(payload, crc32c(bytes((flag,))))
        blob_len = BLOB_HEADER.size + len(payload)
        self._file.write(BLOB_HEADER.pack(crc, flag))
        self._file.write(payload)
        flags = ENTRY_IMAGE if value[0] in IMAGE_TAGS else 0
        self._index += prefix
        self._index += _ENTRY_TAIL.pack(self._pos, blob_len, flags, 0)
        self._pos += blob_len
        self._count += 1
        self.raw_bytes += len(value)

    def _encode(self, value: bytes) -> tuple[int, bytes]:
        n = len(value)
        if n < COMPRESS_MIN_BYTES:
            return BLOB_RAW, value
        if value[0] == TAG_WAL_IMAGE and value[1] & BKPIMAGE_COMPRESSED_MASK:
            return BLOB_RAW, value  # PostgreSQL compressed it already; zstd would not pay
        packed = self._zstd.compress(value)
        if len(packed) <= n - n // 8:
            return BLOB_ZSTD, packed
        return BLOB_RAW, value

    def finish(self) -> LayerDesc:
        """Write index and header, fsync, rename to the final name, fsync the directory."""
        assert not self._done, self._temp
        index_offset = self._pos
        firsts = bytearray()
        nblocks = 0
        for start in range(0, self._count, ENTRIES_PER_BLOCK):
            n = min(ENTRIES_PER_BLOCK, self._count - start)
            entries = self._index[start * ENTRY_SIZE:(start + n) * ENTRY_SIZE]
            firsts += entries[:PREFIX_SIZE]
            body = bytearray(INDEX_BLOCK_SIZE)
            body[_BLOCK_HDR.size:_BLOCK_HDR.size + len(entries)] = entries
            _BLOCK_HDR.pack_into(body, 0, 0, n, 0)
            _U32.pack_into(body, 0, crc32c(memoryview(body)[4:]))
            self._file.write(body)
            nblocks += 1
        sparse_offset = index_offset + nblocks * INDEX_BLOCK_SIZE
        self._file.write(firsts)
        file_size = sparse_offset + len(firsts)
        header = bytearray(HEADER_SIZE)
        _HEADER.pack_into(header, 0, MAGIC, FORMAT_VERSION, self.kind, 0, self._key_start,
                          self._key_end, self._lsn_start, self._lsn_end, self._count,
                          HEADER_SIZE, index_offset, INDEX_BLOCK_SIZE, nblocks, sparse_offset,
                          file_size)
        _U32.pack_into(header, _HEADER_CRC_OFFSET,
                       crc32c(firsts, crc32c(memoryview(header)[:_HEADER_CRC_OFFSET])))
        self._file.seek(0)
        self._file.write(header)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.rename(self._temp, self._final)
        fsync_dir(self._dir)
        self._done = True
        assert self._final.stat().st_size == file_size, (self._final, file_size)
        return self.desc

    def abort(self) -> None:
        """Drop the half-written file (idempotent; a no-op after finish)."""
        if self._done:
            return
        self._done = True
        self._file.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> LayerFileWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()


class LayerFileReader:
    """Reads one layer file with pread; the header and sparse index stay in memory."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._name = str(self.path)
        self._cache_id = next(_reader_ids)
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError as err:
            raise NotFound(f"layer file {self.path} does not exist") from err
        try:
            self._load_header()
        except BaseException:
            self.close()
            raise

    def _corrupt(self, what: str, offset: int | None = None) -> CorruptionError:
        return CorruptionError(f"layer file is corrupt: {what}; remove or re-download the "
                               f"layer", path=self._name, offset=offset)

    def _pread(self, length: int, offset: int) -> bytes:
        """`length` bytes at `offset` (fewer at the end of the file)."""
        return os.pread(self._fd, length, offset)

    def _actual_size(self) -> int:
        return os.fstat(self._fd).st_size

    def _prefetch_tail(self, index_offset: int) -> None:
        """Called once the header is read, before its checksum is verified: the index
        blocks and the sparse index are from `index_offset` to the end."""

    def _load_header(self) -> None:
        actual_size = self._actual_size()
        header = self._pread(HEADER_SIZE, 0)
        if len(header) < HEADER_SIZE:
            raise self._corrupt(f"{actual_size} bytes, shorter than the header", 0)
        (magic, version, kind, _flags, key_start, key_end, lsn_start, lsn_end, count,
         blob_offset, index_offset, block_size, nblocks, sparse_offset,
         file_size) = _HEADER.unpack_from(header)
        if magic != MAGIC:
            raise self._corrupt(f"bad magic {magic!r}", 0)
        if file_size != actual_size:
            raise self._corrupt(f"file has {actual_size} bytes, header says {file_size} "
                                f"(truncated or extended)", min(file_size, actual_size))
        sparse_size = file_size - sparse_offset
        if not (0 <= sparse_size == nblocks * PREFIX_SIZE):
            raise self._corrupt(f"sparse index at {sparse_offset} does not match "
                                f"{nblocks} blocks", 0)
        self._prefetch_tail(index_offset)
        sparse = self._pread(sparse_size, sparse_offset)
        stored_crc = _U32.unpack_from(header, _HEADER_CRC_OFFSET)[0]
        crc = crc32c(sparse, crc32c(header[:_HEADER_CRC_OFFSET]))
        if crc != stored_crc or len(sparse) != sparse_size:
            raise self._corrupt("header/sparse index checksum mismatch", 0)
        # The checksum matched, so these are what our writer wrote.
        if version != FORMAT_VERSION:
            raise self._corrupt(f"format version {version}, this code reads "
                                f"{FORMAT_VERSION}; upgrade Strata", 8)
        if kind not in (KIND_DELTA, KIND_IMAGE) or block_size != INDEX_BLOCK_SIZE:
            raise self._corrupt(f"kind {kind} / index block size {block_size} unknown", 10)
        expect_blocks = -(-count // ENTRIES_PER_BLOCK)
        if (nblocks != expect_blocks or blob_offset != HEADER_SIZE
                or sparse_offset != index_offset + nblocks * INDEX_BLOCK_SIZE):
            raise self._corrupt("inconsistent region offsets in header", 0)
        self.kind = kind
        self.entry_count = count
        self.file_size = file_size
        self._index_offset = index_offset
        self._nblocks = nblocks
        self._firsts = [sparse[i:i + PREFIX_SIZE] for i in range(0, sparse_size, PREFIX_SIZE)]
        key_range = KeyRange(Key.from_bytes(key_start), Key.from_bytes(key_end))
        lsn_range = (Lsn(lsn_start), Lsn(lsn_end))
        self.desc = LayerDesc(key_range, lsn_range, is_delta=kind == KIND_DELTA)
        try:
            named = LayerDesc.parse_file_name(self.path.name)
        except UserError:
            named = None  # opened under another name (a download in progress, a test)
        if named is not None and named != self.desc:
            raise self._corrupt(f"header describes {self.desc.file_name()}, not its name", 0)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        # A reader GC dropped while another thread still read from it closes here, with
        # its last reference (the file was unlinked; its descriptor kept it readable).
        self.close()

    def __enter__(self) -> LayerFileReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- index ---------------------------------------------------------------------
    def _block(self, b: int) -> tuple[bytes, list[bytes]]:
        """Index block `b` (checksum verified) and the (key, lsn) prefixes of its entries."""
        cached = INDEX_BLOCK_CACHE.get((self._cache_id, b))
        if cached is not None:
            return cached
        assert 0 <= b < self._nblocks, (b, self._nblocks)
        offset = self._index_offset + b * INDEX_BLOCK_SIZE
        data = self._pread(INDEX_BLOCK_SIZE, offset)
        if len(data) != INDEX_BLOCK_SIZE:
            raise self._corrupt(f"index block {b} is short", offset)
        crc, n, _ = _BLOCK_HDR.unpack_from(data)
        if crc32c(memoryview(data)[4:]) != crc:
            raise self._corrupt(f"index block {b} checksum mismatch", offset)
        expect = min(ENTRIES_PER_BLOCK, self.entry_count - b * ENTRIES_PER_BLOCK)
        if n != expect:
            raise self._corrupt(f"index block {b} has {n} entries, expected {expect}", offset)
        base = _BLOCK_HDR.size
        prefixes = [data[p:p + PREFIX_SIZE] for p in range(base, base + n * ENTRY_SIZE,
                                                           ENTRY_SIZE)]
        INDEX_BLOCK_CACHE.put((self._cache_id, b), (data, prefixes))
        return data, prefixes

    def _lower_bound(self, prefix: bytes) -> tuple[int, int, bytes]:
        """(global index of the first entry with (key, lsn) >= prefix, the block that
        index falls in or the one before it, that block's bytes)."""
        b = bisect_left(self._firsts, prefix) - 1
        if b < 0:
            return 0, -1, b""
        data, prefixes = self._block(b)
        return b * ENTRIES_PER_BLOCK + bisect_left(prefixes, prefix), b, data

    @staticmethod
    def _entry(data: bytes, slot: int) -> tuple[bytes, int, int, int, int]:
        """(key, lsn, blob offset, blob length, flags) of one entry in a block."""
        pos = _BLOCK_HDR.size + slot * ENTRY_SIZE
        key = data[pos:pos + KEY_SIZE]
        lsn = int.from_bytes(data[pos + KEY_SIZE:pos + PREFIX_SIZE], "big")
        offset, length, flags, _ = _ENTRY_TAIL.unpack_from(data, pos + PREFIX_SIZE)
        return key, lsn, offset, length, flags

    # --- blobs -----------------------------------------------------------------------
    def _read_span(self, start: int, end: int) -> bytes:
        if not (HEADER_SIZE <= start <= end <= self._index_offset):
            raise self._corrupt(f"blob span {start}..{end} outside the blob region", start)
        data = self._pread(end - start, start)
        if len(data) != end - start:
            raise self._corrupt("blob region is short", start)
        return data

    def _blob(self, span: bytes, rel: int, length: int, offset: int) -> bytes:
        """The value stored in span[rel:rel+length] (file offset `offset`), verified."""
        if length < BLOB_HEADER.size:
            raise self._corrupt(f"blob of {length} bytes", offset)
        crc, flag = BLOB_HEADER.unpack_from(span, rel)
        body = span[rel + 4:rel + length]
        if crc32c(body) != crc:
            raise self._corrupt("blob checksum mismatch", offset)
        if flag == BLOB_RAW:
            return body[1:]
        if flag == BLOB_ZSTD:
            try:
                return _decompressor().decompress(body[1:])
            except zstandard.ZstdError as err:
                raise self._corrupt(f"blob does not decompress: {err}", offset) from err
        raise self._corrupt(f"unknown blob compression {flag}", offset)

    # --- queries ----------------------------------------------------------------------
    def get_versions_raw(self, key: bytes, end_lsn: int,
                         floor: int = 0) -> list[tuple[int, bytes]]:
        """Versions of `key` with floor <= lsn < end_lsn, newest first, up to the first
        image."""
        g, data_block, data = self._lower_bound(key + _lsn_bytes(end_lsn))
        g -= 1
        found: list[tuple[int, int, int]] = []  # lsn, blob offset, blob length
        while g >= 0:
            b = g // ENTRIES_PER_BLOCK
            if b != data_block:
                data, data_block = self._block(b)[0], b
            k, lsn, offset, length, flags = self._entry(data, g - b * ENTRIES_PER_BLOCK)
            if k != key or lsn < floor:
                break
            found.append((lsn, offset, length))
            if flags & ENTRY_IMAGE:
                break
            g -= 1
        if not found:
            return []
        # Blobs of one key are adjacent and in LSN order: read them with one pread.
        start = found[-1][1]
        span = self._read_span(start, found[0][1] + found[0][2])
        return [(lsn, self._blob(span, offset - start, length, offset))
                for lsn, offset, length in found]

    def get_versions(self, key: Key, end_lsn: Lsn) -> list[tuple[Lsn, bytes]]:
        """Versions of `key` with lsn < end_lsn, NEWEST first, stopping after an image."""
        return [(Lsn(lsn), v) for lsn, v in self.get_versions_raw(key.to_bytes(), end_lsn.value)]

    def _entries_from(self, start_prefix: bytes) -> Iterator[tuple[bytes, list[tuple[
            bytes, int, int, int, int]]]]:
        """(verified index block, its entries from the first >= start_prefix), block by block."""
        g = self._lower_bound(start_prefix)[0]
        while g < self.entry_count:
            b = g // ENTRIES_PER_BLOCK
            data = self._block(b)[0]
            n = min(ENTRIES_PER_BLOCK, self.entry_count - b * ENTRIES_PER_BLOCK)
            entries = [self._entry(data, s) for s in range(g - b * ENTRIES_PER_BLOCK, n)]
            yield data, entries
            g = (b + 1) * ENTRIES_PER_BLOCK

    def iter_range_raw(self, key_range: KeyRange, end_lsn: int) -> Iterator[
            tuple[bytes, int, bytes]]:
        """(key bytes, lsn, value) for keys in range and lsn < end_lsn, in (key, lsn) order."""
        end_key = key_range.end.to_bytes()
        for _, entries in self._entries_from(key_range.start.to_bytes() + bytes(8)):
            live = [e for e in entries if e[0] < end_key]
            if live:
                first, last = live[0], live[-1]
                span = self._read_span(first[2], last[2] + last[3])
                for k, lsn, offset, length, _ in live:
                    if lsn < end_lsn:
                        yield k, lsn, self._blob(span, offset - first[2], length, offset)
            if len(live) < len(entries):
                return

    def iter_range(self, key_range: KeyRange, end_lsn: Lsn) -> Iterator[tuple[Key, Lsn, bytes]]:
        for k, lsn, value in self.iter_range_raw(key_range, end_lsn.value):
            yield Key.from_bytes(k), Lsn(lsn), value

    def distinct_keys_raw(self, key_range: KeyRange | None, end_lsn: int) -> Iterator[bytes]:
        """Each key (in `key_range`, or all) that has a version with lsn < end_lsn, once, in
        key order, from the index alone. The other versions of a key are skipped with a
        bisect, so a key with a million versions costs a few index blocks, not a million
        entries (relation size keys get a version per extension)."""
        start = key_range.start.to_bytes() + bytes(8) if key_range else bytes(PREFIX_SIZE)
        end_key = key_range.end.to_bytes() if key_range else None
        g = self._lower_bound(start)[0]
        while g < self.entry_count:
            b = g // ENTRIES_PER_BLOCK
            prefixes = self._block(b)[1]
            s = g - b * ENTRIES_PER_BLOCK
            g = (b + 1) * ENTRIES_PER_BLOCK
            while s < len(prefixes):
                prefix = prefixes[s]
                key = prefix[:KEY_SIZE]
                if end_key is not None and key >= end_key:
                    return
                # Entries are in (key, lsn) order: a key's first entry is its oldest version.
                if int.from_bytes(prefix[KEY_SIZE:], "big") < end_lsn:
                    yield key
                after = key + _LSN_MAX_BYTES
                if prefixes[-1] < after:  # the key goes on in later blocks: seek past it
                    g = self._lower_bound(after)[0]
                    break
                s = bisect_left(prefixes, after, s)

    def keys(self) -> Iterator[tuple[Key, Lsn, int]]:
        """(key, lsn, stored blob size) of every entry, from the index only (no blob reads)."""
        for _, entries in self._entries_from(b""):
            for k, lsn, _, length, _ in entries:
                yield Key.from_bytes(k), Lsn(lsn), length


READ_AHEAD_MIN = 64 << 10  # ranged reader: first read-ahead of a forward run of reads
READ_AHEAD_MAX = 1 << 20  # its largest
READ_AHEAD_GAP = 64 << 10  # a read at most this far past the last one goes forward
READ_AHEAD_SPANS = 4  # spans read ahead kept per reader
RangeFetch = Callable[[int, int], bytes]
"""(offset, length) -> the bytes of the remote object in that range (fewer at its end)."""
RangesFetch = Callable[[list[tuple[int, int]]], list[bytes]]
"""Several (offset, length) ranges at once (in parallel) -> their bytes."""


def index_offset(data: bytes) -> int:
    """Where the index blocks of the layer file `data` start, from its header (0 if it
    is not a layer file); not verified: a reader checks it against the header."""
    if len(data) < HEADER_SIZE or data[:8] != MAGIC:
        return 0
    return int(_HEADER.unpack_from(data)[10])


class RangedLayerReader(LayerFileReader):
    """Reads a layer that is not on local disk by ranged reads of its remote object.

    Opening it costs two reads: the header, then everything from the first index block
    to the end (index blocks and sparse index, 40 bytes per stored value), which it
    keeps in memory; both at once (`fetch_many`) when `index_offset` is known. Each
    lookup then reads only the blobs it needs, one ranged read per key (a key's versions
    are contiguous); reads that go forward through the file read ahead (64 KiB, doubling
    to 1 MiB), so a scan costs a GET per window, not per key. The layer format's own
    checksums verify every byte before use, exactly as for a local file: the header CRC
    covers the header and the sparse index, each index block and each blob has its CRC;
    and the header's file size must equal the size the remote index recorded. The
    whole-object CRC-32C is not checked (it cannot be, without the whole object). Safe
    to share between threads.
    """

    def __init__(self, name: str, size: int, fetch: RangeFetch, *, label: str,
                 index_offset: int = 0, fetch_many: RangesFetch | None = None) -> None:
        self.path = Path(name)  # the layer file name, checked against the header
        self._name = label  # the remote key, for errors
        self._cache_id = next(_reader_ids)
        self._fd = -1
        self._size = size
        self._fetch = fetch
        self._tail_offset = size
        self._tail = b""
        self._head: bytes | None = None
        self._blob_reads = 0  # blob spans fetched so far (see wait_blob_read)
        self._blob_cond = threading.Condition(threading.Lock())  # and the read-ahead:
        self._spans: list[tuple[int, bytes]] = []  # the last spans read ahead
        self._last_end = -1 - READ_AHEAD_GAP  # where the last blob read ended
        self._window = 0
        if fetch_many is not None and HEADER_SIZE <= index_offset < size:
            # Where the index starts is known (the remote index recorded it): fetch the
            # header and the index at once. The header, verified, must agree.
            self._head, self._tail = fetch_many([(0, HEADER_SIZE),
                                                 (index_offset, size - index_offset)])
            self._tail_offset = index_offset
        self._load_header()

    def _corrupt(self, what: str, offset: int | None = None) -> CorruptionError:
        return CorruptionError(f"remote layer object is corrupt: {what}; the object was "
                               "damaged or replaced: restore it or re-upload it from a "
                               "pageserver that has the file", path=self._name, offset=offset)

    def _actual_size(self) -> int:
        return self._size

    def _prefetch_tail(self, index_offset: int) -> None:
        if index_offset == self._tail_offset and self._head is not None:
            return  # fetched with the header
        if not HEADER_SIZE <= index_offset <= self._size:
            raise self._corrupt(f"index offset {index_offset} outside the object", 0)
        self._tail = self._fetch(index_offset, self._size - index_offset)
        self._tail_offset = index_offset

    def _pread(self, length: int, offset: int) -> bytes:
        if offset == 0 and self._head is not None and length <= len(self._head):
            return self._head[:length]
        if offset >= self._tail_offset:
            rel = offset - self._tail_offset
            return self._tail[rel:rel + length]
        if length == 0:
            return b""
        with self._blob_cond:
            forward = 0 <= offset - self._last_end <= READ_AHEAD_GAP
            self._last_end = offset + length
            for start, data in self._spans:
                if start <= offset and offset + length <= start + len(data):
                    return data[offset - start:offset - start + length]
            # Read ahead when reads go forward through the file (a scan, a basebackup):
            # the window doubles while they do, and a read elsewhere drops it.
            self._window = min(max(2 * self._window, READ_AHEAD_MIN), READ_AHEAD_MAX) \
                if forward else 0
            ahead = self._window
        want = max(length, min(ahead, self._tail_offset - offset))
        try:
            data = self._fetch(offset, want)
        finally:
            with self._blob_cond:
                self._blob_reads += 1
                self._blob_cond.notify_all()
        if want > length:
            with self._blob_cond:
                self._spans.append((offset, data))
                del self._spans[:-READ_AHEAD_SPANS]
        return data[:length]

    @property
    def blob_reads(self) -> int:
        return self._blob_reads

    def wait_blob_read(self, seen: int, timeout_s: float) -> None:
        """Wait until more than `seen` blob spans were fetched, at most `timeout_s`: the
        background download of the whole layer waits for the read that started it, so
        the two do not compete for the network."""
        with self._blob_cond:
            self._blob_cond.wait_for(lambda: self._blob_reads > seen, timeout_s)

    @property
    def summary_bytes(self) -> int:
        """Bytes of the layer's index kept in memory."""
        return len(self._tail) + HEADER_SIZE


def open_layer(path: Path) -> LayerFileReader:
    """Open a delta or an image layer file, whichever it is (DeltaLayer or ImageLayer)."""
    from strata.storage.delta_layer import DeltaLayer
    from strata.storage.image_layer import ImageLayer

    reader = LayerFileReader(path)
    kind = reader.kind
    reader.close()
    return DeltaLayer.open(path) if kind == KIND_DELTA else ImageLayer.open(path)
