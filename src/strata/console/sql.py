"""A query from the console's SQL box, run read-only on an endpoint as its application role.

The query runs inside `BEGIN READ ONLY` with a statement timeout, as a prepared statement
(the extended protocol: one statement only, so `commit; drop table t` is refused by
PostgreSQL), and the transaction is rolled back. At most `limit` rows come back;
`truncated` says if there were more. Values that JSON lacks (dates, decimals, bytes)
become text.
"""

from __future__ import annotations

import datetime
import decimal
import time
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg

from strata.common.errors import UserError

ROW_LIMIT = 1000
STATEMENT_TIMEOUT_MS = 30_000
QUERY_MAX_CHARS = 100_000


@dataclass(frozen=True, slots=True)
class QueryResult:
    columns: list[str]
    rows: list[list[Any]]
    truncated: bool
    status: str
    elapsed_s: float

    def to_json(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows, "truncated": self.truncated,
                "status": self.status, "elapsed_s": round(self.elapsed_s, 4)}


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) \
            else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, datetime.date | datetime.time | decimal.Decimal | uuid.UUID):
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


def run_read_only(connstr: str, query: str, limit: int = ROW_LIMIT) -> QueryResult:
    """Run `query` in a read-only transaction on `connstr`; UserError with PostgreSQL's
    message if it fails (a write, a syntax error, a timeout)."""
    if not query.strip():
        raise UserError("the query is empty")
    if len(query) > QUERY_MAX_CHARS:
        raise UserError(f"the query is {len(query)} characters; at most {QUERY_MAX_CHARS}")
    started = time.monotonic()
    try:
        with psycopg.connect(connstr, connect_timeout=10,
                             cursor_factory=psycopg.RawCursor) as conn:
            conn.execute("begin read only")
            conn.execute(f"set local statement_timeout = {STATEMENT_TIMEOUT_MS}")
            # Prepared: the extended protocol takes one statement only (RawCursor: a '%' in
            # the query is not a placeholder).
            cur = conn.execute(query.encode(), prepare=True)
            columns = [col.name for col in cur.description] if cur.description else []
            fetched = cur.fetchmany(limit + 1) if cur.description else []
            status = cur.statusmessage or ""
            conn.rollback()
    except psycopg.Error as err:
        text = str(err).strip() or type(err).__name__
        raise UserError(f"the query failed: {text}") from err
    rows = [[_json_value(v) for v in row] for row in fetched[:limit]]
    return QueryResult(columns, rows, len(fetched) > limit, status,
                       time.monotonic() - started)
