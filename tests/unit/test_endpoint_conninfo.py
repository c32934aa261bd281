"""`strata.control.endpoints.conninfo`: the local connection string `endpoint start`
prints without importing psycopg; libpq (through psycopg) must read back what it wrote."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

from strata.control.endpoints import conninfo


@pytest.mark.parametrize("value", ["/tmp/strata/ep-main", "", "a b", "it's", "back\\slash",
                                   "tab\there", "=x", "'quoted'"])
def test_conninfo_round_trips_through_libpq(value: str) -> None:
    params = {"host": value, "port": "55432", "user": "strata", "dbname": "strata"}
    assert conninfo_to_dict(conninfo(**params)) == params


def test_plain_values_are_not_quoted() -> None:
    assert conninfo(host="/run/s", port="5432") == "host=/run/s port=5432"

