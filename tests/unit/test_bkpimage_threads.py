"""strata.pg.bkpimage from several threads at once (basebackup, page service batches and
compaction all restore zstd images in worker threads)."""

from __future__ import annotations

import random
import threading

import zstandard

from strata.pg.bkpimage import restore_block_image
from strata.pg.constants import BKPIMAGE_COMPRESS_ZSTD


def test_zstd_images_restore_correctly_from_concurrent_threads() -> None:
    rng = random.Random(5)
    pages = [rng.randbytes(2000) + bytes(6192) for _ in range(32)]
    blobs = [zstandard.ZstdCompressor().compress(p) for p in pages]
    wrong: list[int] = []

    def work() -> None:
        for _ in range(1500):
            for i, (page, blob) in enumerate(zip(pages, blobs, strict=True)):
                if restore_block_image(BKPIMAGE_COMPRESS_ZSTD, 0, 0, blob) != page:
                    wrong.append(i)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of {8 * 1500 * len(pages)} restores gave wrong bytes"
