"""The harness starts a real PostgreSQL 15 as the service user and stops it."""

import os

from strata.compute.pgserver import PgServer


def test_server_starts_with_strata_settings(pg: PgServer) -> None:
    rows = pg.sql("show wal_consistency_checking")
    assert rows == [("all",)]
    assert pg.sql("show server_version_num")[0][0].startswith("15")
    owner = os.stat(pg.datadir).st_uid
    assert owner == pg.user.uid
    if os.getuid() == 0:
        assert owner != 0
