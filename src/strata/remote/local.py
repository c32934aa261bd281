"""Remote storage in a local directory: the embedded default for a laptop.

An object `a/b/c` is the file `<root>/a/b/c`, holding the object's bytes followed by an
8-byte trailer: the CRC-32C (u32 little-endian) and the magic `SCRC`. Files are written
as `<name>.___temp` + fsync + rename + fsync of the directory, so a reader sees a whole
object or none; listings skip temp files.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from strata.common.durable import TEMP_SUFFIX, fsync_dir
from strata.common.errors import CorruptionError, NotFound, Unavailable
from strata.pg.crc import crc32c
from strata.remote.storage import RemoteStorage, check_key, verify_checksum

_TRAILER = struct.Struct("<I4s")
_MAGIC = b"SCRC"


class LocalDirStorage(RemoteStorage):
    """Objects as files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"the remote storage directory {root}"
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temp = path.with_name(path.name + TEMP_SUFFIX)
            with open(temp, "wb") as f:
                f.write(data)
                f.write(_TRAILER.pack(crc32c(data), _MAGIC))
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
            fsync_dir(path.parent)
        except OSError as err:
            raise Unavailable(f"could not write {path}: {err}") from err

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise NotFound(f"remote object {key} does not exist in {self.root}") from err
        except OSError as err:
            raise Unavailable(f"could not read {path}: {err}") from err
        if len(raw) < _TRAILER.size:
            raise CorruptionError(f"remote object {key} is {len(raw)} bytes, shorter than "
                                  "its checksum trailer", path=str(path))
        stored, magic = _TRAILER.unpack_from(raw, len(raw) - _TRAILER.size)
        data = raw[:-_TRAILER.size]
        return verify_checksum(key, data, stored if magic == _MAGIC else None)

    def get_range(self, key: str, start: int, length: int) -> bytes:
        assert start >= 0 and length > 0, (start, length)
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size - _TRAILER.size
                data = os.pread(f.fileno(), max(0, min(length, size - start)), start)
        except FileNotFoundError as err:
            raise NotFound(f"remote object {key} does not exist in {self.root}") from err
        except OSError as err:
            raise Unavailable(f"could not read {path}: {err}") from err
        return data

    def list_keys(self, prefix: str) -> list[str]:
        # Walk the deepest directory the prefix names, then filter by the full prefix.
        base = prefix.rpartition("/")[0]
        top = self.root / base if base else self.root
        out = []
        for dirpath, _, files in os.walk(top):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.endswith(TEMP_SUFFIX):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise Unavailable(f"could not delete {path}: {err}") from err
