"""Point-in-time timestamps: ISO 8601 text to microseconds since the Unix epoch, past only.

A branch "at a timestamp" resolves to the last commit at or before it (D5). A time in
the future would resolve to the head and look like it worked, so it is refused: the
pageserver refuses it against its own clock, and the CLI before it sends a request.
"""

from __future__ import annotations

from datetime import UTC, datetime

from strata.common.errors import UserError

EXAMPLE = "2026-01-02T03:04:05.123456+00:00"


def _short(text: str) -> str:
    shown = repr(text)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def parse_timestamp_us(text: str) -> int:
    """ISO 8601 (naive means UTC; `Z` and a space before the time are accepted) ->
    microseconds since the Unix epoch; UserError for anything else."""
    try:
        ts = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T", 1))
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        delta = ts - datetime(1970, 1, 1, tzinfo=UTC)
    except (ValueError, OverflowError) as err:
        raise UserError(f"invalid timestamp {_short(text)}: expected ISO 8601 such as "
                        f"{EXAMPLE}") from err
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def format_timestamp_us(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1_000_000, UTC).isoformat()


def parse_past_timestamp_us(text: str, now_s: float) -> int:
    """`parse_timestamp_us`, refusing a time after `now_s` (seconds since the epoch)."""
    ts_us = parse_timestamp_us(text)
    now_us = int(now_s * 1_000_000)
    if ts_us > now_us:
        raise UserError(f"timestamp {_short(text)} is in the future (now is "
                        f"{format_timestamp_us(now_us)}): no commit can be known after now; "
                        "use a past time, or no timestamp for the head")
    return ts_us
