"""WAL decoding speed: our reader vs pg_waldump over the same pgbench WAL, and image restores.

The WAL is what a Strata compute writes (wal_consistency_checking=all, wal_compression=zstd):
after `pgbench -i` and a checkpoint, pgbench (4 clients, 5 s runs) runs until >= 200 MB of WAL
(--quick: ~20 MB) are written; only that transactional WAL is decoded. Then, on one core:

- `decode_mb_per_s`, `decode_records_per_s`: `read_wal_files` over the segment files (page
  headers, record assembly, CRC, block refs, main data; images stay compressed). The files are
  read once before timing, so the page cache holds them for both tools. Baseline:
  `pg_waldump -q` (decodes without printing) over the same range.
- `pg_waldump_mb_per_s` (quiet) and `pg_waldump_text_mb_per_s` (printing to /dev/null).
- `image_decompress_mb_per_s` (restored page bytes per second), `image_decompress_per_s`:
  `BlockRef.page()` (zstd + hole fill) over every image.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.report import Report
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable, service_user
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer
from strata.pg.walreader import BlockRef, read_wal_files

_MB = 1024 * 1024


def _current_lsn(pg: PgServer) -> Lsn:
    return Lsn.parse(pg.sql("select pg_current_wal_lsn()::text")[0][0])


def _generate(pg: PgServer, target_bytes: int, scale: int) -> tuple[Lsn, Lsn]:
    """pgbench until `target_bytes` of WAL follow the returned start LSN; stop the server."""
    pg.start({**STRATA_WAL_SETTINGS, "wal_keep_size": "4GB", "max_wal_size": "4GB"})
    conn = ("-h", pg.host, "-p", str(pg.port), "-U", pg.superuser)
    pg.run_tool("pgbench", "-i", "-q", "-s", str(scale), *conn, "postgres")
    pg.sql("checkpoint")
    # Count the transactions' WAL only: the steady state a pageserver ingests.
    start = _current_lsn(pg)
    while True:
        pg.run_tool("pgbench", "-c", "4", "-j", "2", "-T", "5", *conn, "postgres")
        if _current_lsn(pg) - start >= target_bytes:
            break
    pg.stop()
    return start, _current_lsn_after_stop(pg)


def _current_lsn_after_stop(pg: PgServer) -> Lsn:
    out = pg.run_tool("pg_controldata", pg.datadir).stdout.decode()
    line = next(x for x in out.splitlines() if x.startswith("Latest checkpoint location:"))
    return Lsn.parse(line.split(":", 1)[1])


def _time_ours(wal_dir: Path, start: Lsn, end: Lsn) -> tuple[float, int, int, list[BlockRef]]:
    t0 = time.perf_counter()
    records = 0
    last_end = start.value
    images: list[BlockRef] = []
    for record in read_wal_files(wal_dir, start, end):
        records += 1
        last_end = record.end_lsn
        for block in record.blocks:
            if block.has_image:
                images.append(block)
    return time.perf_counter() - t0, records, last_end, images


def _time_pg_waldump(pg: PgServer, wal_dir: Path, first: int, end: int, quiet: bool) -> float:
    args = ["-p", str(wal_dir), "-s", str(Lsn(first)), "-e", str(Lsn(end))]
    if quiet:
        args.insert(0, "-q")
    t0 = time.perf_counter()
    pg.run_tool("pg_waldump", *args)  # stdout is captured (and thrown away)
    return time.perf_counter() - t0


def run(report: Report, quick: bool) -> None:
    target = 20 * _MB if quick else 200 * _MB
    scale = 2 if quick else 10
    with tempfile.TemporaryDirectory(prefix="strata-bench-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        ensure_traversable(root)
        pg = PgServer(root / "compute", user=service_user())
        pg.initdb()
        try:
            start, end = _generate(pg, target, scale)
        finally:
            pg.stop("immediate")
        wal_dir = pg.datadir / "pg_wal"
        for path in wal_dir.iterdir():  # warm the page cache for both tools
            if path.is_file():
                path.read_bytes()
        report.note(f"WAL from {start} to {end}: {(end - start) / _MB:.1f} MB, pgbench scale "
                    f"{scale}, wal_consistency_checking=all, wal_compression=zstd")

        seconds, records, last_end, images = _time_ours(wal_dir, start, end)
        first = next(iter(read_wal_files(wal_dir, start, end))).lsn
        size_mb = (last_end - first) / _MB
        waldump_q = min(_time_pg_waldump(pg, wal_dir, first, last_end, True) for _ in range(2))
        waldump_text = _time_pg_waldump(pg, wal_dir, first, last_end, False)
        report.note(f"{records} records, {len(images)} block images, {size_mb:.1f} MB decoded")
        report.add("decode_mb_per_s", size_mb / seconds, "MB/s", baseline=size_mb / waldump_q)
        report.add("decode_records_per_s", records / seconds, "records/s",
                   baseline=records / waldump_q)
        report.add("pg_waldump_mb_per_s", size_mb / waldump_q, "MB/s")
        report.add("pg_waldump_records_per_s", records / waldump_q, "records/s")
        report.add("pg_waldump_text_mb_per_s", size_mb / waldump_text, "MB/s")

        t0 = time.perf_counter()
        for block in images:
            block.page()
        dt = time.perf_counter() - t0
        report.add("image_decompress_mb_per_s", len(images) * 8192 / _MB / dt, "MB/s")
        report.add("image_decompress_per_s", len(images) / dt, "images/s")
