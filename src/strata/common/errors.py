"""The one error tree of Strata.

    StrataError
    ├── UserError        bad input or a request that cannot be honoured; say what to do
    │   └── Conflict     refused in the current state (it runs, it has children): change it first
    ├── NotFound         a tenant, timeline, key, file ... that does not exist
    ├── ProtocolError    the peer broke a protocol (close that connection, not the server)
    ├── CorruptionError  bytes on disk or on the wire fail a check (carries path/offset)
    └── Unavailable      retryable: not yet, or not now (a wait timed out, a peer is down)

Library errors are translated once, at the boundary (`raise ... from err`).
"""

from __future__ import annotations


class StrataError(Exception):
    """Base of every error Strata raises on purpose."""


class UserError(StrataError):
    """The request is wrong or cannot be honoured; the message says what to do."""


class Conflict(UserError):
    """The request is valid but the current state refuses it (an endpoint runs, a branch
    has children); the message says what to change first. HTTP APIs answer 409."""


class NotFound(StrataError):
    """Something named by the caller does not exist."""


class ProtocolError(StrataError):
    """The peer sent something the protocol does not allow."""


class CorruptionError(StrataError):
    """Stored or received bytes failed a validity check."""

    def __init__(self, message: str, *, path: str | None = None, offset: int | None = None):
        where = []
        if path is not None:
            where.append(f"file {path}")
        if offset is not None:
            where.append(f"offset {offset}")
        full = f"{message} ({', '.join(where)})" if where else message
        super().__init__(full)
        self.path = path
        self.offset = offset


class Unavailable(StrataError):
    """Retryable: a wait timed out, a peer is down, a resource is busy."""
