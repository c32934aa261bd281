"""Regenerate walreader_1mb.zst: real PostgreSQL 15 WAL for the walreader unit tests.

Run from the repository root: `.venv/bin/python tests/unit/data/make_walreader_fixture.py`.
A cluster with 1 MB WAL segments (initdb --wal-segsize=1) and the Strata WAL settings runs a
small workload ending with pg_switch_wal(); the fixture is the zstd-compressed concatenation
of the segments from the one holding the first record after start-up, with a one-line
header `<first segment file name> <segment size> <number of segments>`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import zstandard

from strata.common.proc import ensure_traversable
from strata.compute.pgserver import STRATA_WAL_SETTINGS, PgServer

OUT = Path(__file__).parent / "walreader_1mb.zst"
SEG = 1 << 20


def main() -> None:
    base = Path(tempfile.mkdtemp(prefix="strata-walfix-"))
    os.chmod(base, 0o755)
    ensure_traversable(base)
    server = PgServer(base / "pg")
    server.initdb("--wal-segsize=1")
    server.start({**STRATA_WAL_SETTINGS, "wal_keep_size": "1GB"})
    try:
        first = server.sql("select pg_walfile_name(pg_current_wal_lsn())")[0][0]
        server.sql("create table t (id int primary key, v text)")
        server.sql("insert into t select g, repeat(md5(g::text), 1 + g % 20) "
                   "from generate_series(1, 300) g")
        server.sql("update t set v = v || 'x' where id % 5 = 0")
        server.sql("create index t_v on t (v)")
        server.sql("delete from t where id % 7 = 0")
        server.sql("vacuum t")
        server.sql("select pg_switch_wal()")
        server.sql("insert into t values (0, 'after the switch')")
        last = server.sql("select pg_walfile_name(pg_current_wal_lsn())")[0][0]
    finally:
        server.stop()
    wal = base / "pg" / "pg_wal"
    names = sorted(p.name for p in wal.iterdir() if first <= p.name <= last)
    data = b"".join((wal / n).read_bytes() for n in names)
    header = f"{names[0]} {SEG} {len(names)}\n".encode()
    OUT.write_bytes(zstandard.ZstdCompressor(level=19).compress(header + data))
    print(f"wrote {OUT}: {len(names)} segments from {names[0]}, {OUT.stat().st_size} bytes")
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
