"""The in-memory layer: newest writes of a timeline, values in an ephemeral file, a dict index.

Writes go here first (architecture.md D4). Each put appends the encoded value to an
ephemeral file (`ephemeral-<n>` in the timeline directory, deleted on restart because
the WAL is re-fed from `disk_consistent_lsn`) and records (lsn, offset, length,
is_image) under the key. The layer is *open* while it takes writes, then *frozen*
(immutable, waiting to be written as a delta layer) once it covers
`checkpoint_distance` bytes of WAL or `checkpoint_timeout`.

Writes are buffered in memory and appended to the file in chunks; reads look in the
buffer or `pread` the file. A lock keeps readers off the buffer while it is written out
and replaced (appends to it need none: one writer, see `put`).
"""

from __future__ import annotations

import bisect
import operator
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from strata.storage.key import Key, KeyRange
from strata.storage.value import Image, Patch, decode_value, encode_value, reconstruct

_FLUSH_BYTES = 1 << 20

# One version in the index: (lsn, offset in the ephemeral file, length, is_image).
Version = tuple[int, int, int, bool]

# A Key's order as a tuple: sorting by it compares in C, not with the dataclass's
# __lt__ (an open layer of a 157 MB load holds ~20,000 keys; a lazy basebackup's ~15
# range scans each sorted them all: 2 s of its 2.2 s under load).
_ORDER = operator.attrgetter("field1", "field2", "field3", "field4", "field5", "field6")


class InMemoryLayer:
    """Versions with start_lsn <= lsn < end_lsn (end_lsn set when frozen)."""

    def __init__(self, path: Path, start_lsn: int, created_at: float) -> None:
        self.path = path
        self.start_lsn = start_lsn
        self.end_lsn: int | None = None  # exclusive; set by freeze()
        self.prev_record_lsn_at_end = 0  # prev_record_lsn of the record ending at end_lsn - 1
        self.created_at = created_at
        self.max_lsn = 0  # newest lsn put
        self._index: dict[Key, list[Version]] = {}
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file_bytes = 0  # bytes already written to the file
        self._buf = bytearray()
        self._lock = threading.Lock()
        # The keys sorted, with the `_key_gen` they were sorted at (a new key bumps it).
        self._sorted_keys: tuple[int, list[Key]] | None = None
        self._key_gen = 0
        self.value_bytes = 0

    # --- writes -----------------------------------------------------------
    def put(self, key: Key, lsn: int, data: bytes, is_image: bool, rest: bytes = b"") -> None:
        """Store the value `data + rest` (two parts, so that a caller with a header and
        a page image does not join them into a new object first)."""
        assert self.end_lsn is None, f"put into frozen layer {self.path}"
        assert lsn >= self.start_lsn, (lsn, self.start_lsn)
        versions = self._index.get(key)
        if versions is not None and versions[-1][0] >= lsn:
            self._put_at_or_before_last(key, versions, lsn, data + rest, is_image)
            return
        # Without the lock: puts come from one thread at a time (ingest), the append is
        # one step under the interpreter lock and leaves the bytes a reader may slice as
        # they were; only replacing the buffer (`_write_buffer`) must exclude readers.
        # (Each part is appended in one step, and the index entry that lets a reader
        # see the value is added after both.)
        buf = self._buf
        offset = self._file_bytes + len(buf)
        buf += data
        if rest:
            buf += rest
        length = len(data) + len(rest)
        if len(buf) >= _FLUSH_BYTES:
            with self._lock:
                self._write_buffer()
        entry = (lsn, offset, length, is_image)
        if versions is None:
            self._index[key] = [entry]
            self._key_gen += 1  # after the insert: a sort that missed the key is stale
        else:
            versions.append(entry)
        if lsn > self.max_lsn:
            self.max_lsn = lsn
        self.value_bytes += length

    def _put_at_or_before_last(self, key: Key, versions: list[Version], lsn: int, data: bytes,
                               is_image: bool) -> None:
        """`put` of a key whose newest version is at `lsn` or later (not ingest's order)."""
        same_lsn = versions[-1][0] == lsn
        if same_lsn and not is_image:
            # Two puts of one key in one record: a layer file holds one value per
            # (key, lsn), so fold the delta into the value already there.
            _, offset, length, prev_is_image = versions[-1]
            data, is_image = _fold(self._read(offset, length), data), prev_is_image
        buf = self._buf
        offset = self._file_bytes + len(buf)
        buf += data  # without the lock: see `put`
        if len(buf) >= _FLUSH_BYTES:
            with self._lock:
                self._write_buffer()
        entry = (lsn, offset, len(data), is_image)
        if same_lsn:
            versions[-1] = entry  # a later image in the same record replaces the value
        else:
            # Out-of-order put (not done by ingest, which writes in LSN order).
            bisect.insort(versions, entry, key=lambda v: v[0])
        if lsn > self.max_lsn:
            self.max_lsn = lsn
        self.value_bytes += len(data)

    def _write_buffer(self) -> None:
        view = memoryview(self._buf)
        while view:
            written = os.pwrite(self._fd, view, self._file_bytes)
            self._file_bytes += written
            view = view[written:]
        self._buf = bytearray()

    def freeze(self, end_lsn: int, prev_record_lsn: int) -> None:
        """Stop taking writes; the layer covers [start_lsn, end_lsn)."""
        assert self.end_lsn is None, self.path
        assert end_lsn > self.max_lsn, (end_lsn, self.max_lsn)
        assert end_lsn >= self.start_lsn, (end_lsn, self.start_lsn)
        self.end_lsn = end_lsn
        self.prev_record_lsn_at_end = prev_record_lsn
        with self._lock:
            self._write_buffer()

    # --- reads ------------------------------------------------------------
    def _read(self, offset: int, length: int) -> bytes:
        with self._lock:
            if offset >= self._file_bytes:
                start = offset - self._file_bytes
                return bytes(self._buf[start:start + length])
        data = os.pread(self._fd, length, offset)
        assert len(data) == length, (self.path, offset, length, len(data))
        return data

    def get_versions(self, key: Key, end_lsn: int,
                     floor: int = 0) -> list[tuple[int, bytes, bool]]:
        """Versions of `key` with floor <= lsn < end_lsn, newest first, stopping after an
        image."""
        versions = self._index.get(key)
        if not versions:
            return []
        out: list[tuple[int, bytes, bool]] = []
        for i in range(len(versions) - 1, -1, -1):
            lsn, offset, length, is_image = versions[i]
            if lsn >= end_lsn:
                continue
            if lsn < floor:
                break
            out.append((lsn, self._read(offset, length), is_image))
            if is_image:
                break
        return out

    def is_empty(self) -> bool:
        return not self._index

    def keys_in(self, key_range: KeyRange) -> list[Key]:
        """The keys in `key_range`, sorted. The sorted list is kept until a put adds a key
        (also in the open layer: the scans of one basebackup sort once); puts may run
        in another thread meanwhile (the generation read first makes a racing sort
        stale, `list()` copies the dict in one step)."""
        cached = self._sorted_keys
        if cached is None or cached[0] != self._key_gen:
            gen = self._key_gen
            cached = (gen, sorted(list(self._index), key=_ORDER))
            self._sorted_keys = cached
        keys = cached[1]
        lo = bisect.bisect_left(keys, key_range.start)
        hi = bisect.bisect_left(keys, key_range.end)
        return keys[lo:hi]

    def iter_all(self) -> Iterator[tuple[Key, int, bytes]]:
        """Every version in (key, lsn) order (for writing the delta layer)."""
        for key in sorted(self._index, key=_ORDER):
            for lsn, offset, length, _ in self._index[key]:
                yield key, lsn, self._read(offset, length)

    def key_range(self) -> KeyRange:
        assert self._index, self.path
        return KeyRange(min(self._index), max(self._index).next())

    def key_count(self) -> int:
        return len(self._index)

    def close(self, delete: bool = True) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            self.path.unlink(missing_ok=True)


def _fold(prev: bytes, delta: bytes) -> bytes:
    """The one value equal to applying encoded `delta` after encoded `prev`."""
    old, new = decode_value(prev), decode_value(delta)
    assert isinstance(new, Patch), new
    if isinstance(old, Patch):
        return encode_value(Patch(old.ops + new.ops))
    value = reconstruct([old, new])
    assert value is not None, (old, new)
    return encode_value(Image(value))
