"""The remote storage interface: put, get, list and delete whole objects by key, checksummed.

Keys are `/`-separated relative paths (`tenants/<t>/timelines/<tl>/index_part.json-...`).
Objects are small enough to hold in memory (a layer file, an index, a WAL segment), so
the interface moves whole `bytes`; it is synchronous, because its callers (flush,
compaction, GC, downloads) already run in worker threads.

Every object carries the CRC-32C of its bytes, computed by `put` and verified by `get`
(a backend stores it its own way: S3 object metadata, a trailer on local files). A
mismatch raises CorruptionError naming the key: a damaged object is never served.

`RetryingStorage` wraps a backend: an `Unavailable` (connection refused, a 5xx, a timeout)
is retried with exponential backoff a bounded number of times; NotFound, UserError and
CorruptionError are final.

Backends: `local.LocalDirStorage` (a directory; the default for a laptop) and
`s3.S3Storage` (any S3-compatible server, through obstore). `open_remote_storage(url)`
picks one from a URL (`file:///path`, `s3://bucket/prefix?endpoint=http://host:port`).
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from strata.common.errors import CorruptionError, Unavailable, UserError
from strata.pg.crc import crc32c

log = logging.getLogger(__name__)

T = TypeVar("T")


def check_key(key: str) -> str:
    """Refuse keys that could escape a prefix or a directory."""
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"bad remote storage key {key!r}: must be a relative path without "
                        "empty, '.' or '..' parts")
    return key


def verify_checksum(key: str, data: bytes, stored: int | None) -> bytes:
    if stored is None:
        raise CorruptionError(f"remote object {key} has no CRC-32C; it was not written by "
                              "Strata or its metadata was lost", path=key)
    computed = crc32c(data)
    if computed != stored:
        raise CorruptionError(f"remote object {key} fails its CRC-32C (stored {stored:08x}, "
                              f"computed {computed:08x}, {len(data)} bytes); the object is "
                              "damaged: restore it or re-upload it from a pageserver that "
                              "has the file", path=key)
    return data


class RemoteStorage(abc.ABC):
    """Whole objects by key. `get` of a missing key raises NotFound."""

    description: str = "remote storage"

    @abc.abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key` (replacing it), with its CRC-32C; atomic per object."""

    @abc.abstractmethod
    def get(self, key: str) -> bytes:
        """The object's bytes, checksum verified (CorruptionError otherwise)."""

    @abc.abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of the object from `start` (fewer only at its end), NOT checksum
        verified: the object's CRC-32C covers it whole. The caller verifies the bytes with
        checksums of its own (a layer's per-block CRCs)."""

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """get_range of each (start, length), in parallel where the backend can."""
        return [self.get_range(key, start, length) for start, length in ranges]

    @abc.abstractmethod
    def list_keys(self, prefix: str) -> list[str]:
        """Every key under `prefix` (a plain string prefix), sorted."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove `key`; deleting a missing key is not an error."""

    def delete_many(self, keys: list[str]) -> None:
        for key in keys:
            self.delete(key)

    def close(self) -> None:  # noqa: B027 - most backends hold nothing
        """Release connections."""


class RetryingStorage(RemoteStorage):
    """`inner` with bounded retries of Unavailable errors (exponential backoff)."""

    def __init__(self, inner: RemoteStorage, *, attempts: int = 6, base_delay_s: float = 0.2,
                 max_delay_s: float = 5.0, sleep: Callable[[float], None] = time.sleep) -> None:
        assert attempts >= 1, attempts
        self.inner = inner
        self.description = inner.description
        self.attempts = attempts
        self.base_delay_s = base_delay_s
        self.max_delay_s = max_delay_s
        self._sleep = sleep

    def _retry(self, what: str, op: Callable[[], T]) -> T:
        delay = self.base_delay_s
        for attempt in range(1, self.attempts + 1):
            try:
                return op()
            except Unavailable as err:
                if attempt == self.attempts:
                    raise Unavailable(f"{what} failed {attempt} times, giving up: {err}; "
                                      f"check that {self.description} is up") from err
                log.info("%s failed (attempt %d of %d), retrying in %.1fs: %s", what, attempt,
                         self.attempts, delay, err)
                self._sleep(delay)
                delay = min(delay * 2, self.max_delay_s)
        raise AssertionError("unreachable")

    def put(self, key: str, data: bytes) -> None:
        self._retry(f"upload of {key}", lambda: self.inner.put(key, data))

    def get(self, key: str) -> bytes:
        return self._retry(f"download of {key}", lambda: self.inner.get(key))

    def get_range(self, key: str, start: int, length: int) -> bytes:
        return self._retry(f"download of {key} bytes {start}..{start + length}",
                           lambda: self.inner.get_range(key, start, length))

    def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self._retry(f"download of {len(ranges)} ranges of {key}",
                           lambda: self.inner.get_ranges(key, ranges))

    def list_keys(self, prefix: str) -> list[str]:
        return self._retry(f"listing of {prefix}", lambda: self.inner.list_keys(prefix))

    def delete(self, key: str) -> None:
        self._retry(f"deletion of {key}", lambda: self.inner.delete(key))

    def close(self) -> None:
        self.inner.close()


def open_remote_storage(url: str, *, retries: int = 6) -> RemoteStorage:
    """A backend for `url`, wrapped in retries.

    - `file:///abs/path` or `/abs/path`: a local directory (created if missing);
    - `s3://bucket[/prefix][?endpoint=http://127.0.0.1:8333&region=us-east-1]`: S3.
      Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (a local test
      server accepts any); the endpoint also from AWS_ENDPOINT_URL.
    """
    from pathlib import Path

    if url.startswith("s3://"):
        from strata.remote.s3 import S3Storage

        inner: RemoteStorage = S3Storage.from_url(url)
    elif url.startswith("file://") or url.startswith("/"):
        from strata.remote.local import LocalDirStorage

        path = url.removeprefix("file://")
        if not path.startswith("/"):
            raise UserError(f"remote storage URL {url!r}: a local directory must be an "
                            "absolute path (file:///path)")
        inner = LocalDirStorage(Path(path))
    else:
        raise UserError(f"remote storage URL {url!r} is not supported; use "
                        "file:///absolute/path or s3://bucket/prefix?endpoint=http://host:port")
    return RetryingStorage(inner, attempts=retries)
