"""A synchronous client of one safekeeper's HTTP API (docs/safekeeper.md), for the CLI
and tests (`strata.common.httpjson`; the pageserver's counterpart is `strata.pageserver.client`).

With `token` (default: `$STRATA_AUTH_TOKEN`) every request carries it as a Bearer header
(strata.common.auth). An error answer becomes a Strata error naming the safekeeper and
the request, with the server's message: 404 NotFound, 401 AuthError, 403 Forbidden,
anything else UserError; no answer at all is Unavailable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from strata.common import httpjson
from strata.common.auth import AuthError, Forbidden, auth_headers, default_token
from strata.common.errors import NotFound, StrataError, Unavailable, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn

DEFAULT_TIMEOUT_S = 5.0
DELETE_TIMEOUT_S = 60.0  # a delete ends the timeline's connections and removes its WAL


@dataclass(frozen=True, slots=True)
class SafekeeperTimelineInfo:
    """The positions of one timeline on one safekeeper (GET .../timeline/{id})."""

    tenant_id: TenantId
    timeline_id: TimelineId
    term: int
    flush_lsn: Lsn
    commit_lsn: Lsn
    durable_commit_lsn: Lsn
    timeline_start_lsn: Lsn
    removal_horizon: Lsn

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SafekeeperTimelineInfo:
        return cls(tenant_id=TenantId.parse(data["tenant_id"]),
                   timeline_id=TimelineId.parse(data["timeline_id"]),
                   term=int(data["term"]), flush_lsn=Lsn.parse(data["flush_lsn"]),
                   commit_lsn=Lsn.parse(data["commit_lsn"]),
                   durable_commit_lsn=Lsn.parse(data["durable_commit_lsn"]),
                   timeline_start_lsn=Lsn.parse(data["timeline_start_lsn"]),
                   removal_horizon=Lsn.parse(data["removal_horizon"]))


_ERRORS: dict[int, type[StrataError]] = {404: NotFound, 401: AuthError, 403: Forbidden}


class SafekeeperClient:
    """Synchronous HTTP client of one safekeeper (`node_id` names it in errors)."""

    def __init__(self, host: str, http_port: int, *, node_id: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, token: str | None = None) -> None:
        self.host = host
        self.http_port = http_port
        self.node_id = node_id
        self.timeout_s = timeout_s
        self.token = token if token is not None else default_token()

    @property
    def label(self) -> str:
        return f"safekeeper {self.node_id}" if self.node_id is not None else "the safekeeper"

    def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                timeout_s: float | None = None) -> Any:
        """One call: the decoded JSON answer (None for an empty one)."""
        data = json.dumps(body).encode() if body is not None else None
        try:
            resp = httpjson.request(self.host, self.http_port, method, path, body=data,
                                    headers={"Content-Type": "application/json",
                                             **auth_headers(self.token)},
                                    timeout_s=timeout_s or self.timeout_s)
        except (OSError, httpjson.HttpProtocolError) as err:
            raise Unavailable(f"{self.label} does not answer on {self.host}:{self.http_port}: "
                              f"{type(err).__name__}: {err}") from err
        if resp.status >= 400:
            try:
                message = json.loads(resp.body).get("error", resp.reason)
            except (ValueError, AttributeError):
                message = resp.reason
            cls = _ERRORS.get(resp.status, UserError)
            raise cls(f"{self.label} ({self.host}:{self.http_port}) refused {method} {path}: "
                      f"{message}")
        return json.loads(resp.body or b"null")

    def status(self) -> dict[str, Any]:
        """GET /v1/status: its id, pg port, start time, timelines and refused timelines."""
        out: dict[str, Any] = self.request("GET", "/v1/status")
        return out

    def responds(self, timeout_s: float = 2) -> bool:
        """Whether it answers at all (a refused token counts: it answers)."""
        try:
            self.request("GET", "/v1/status", timeout_s=timeout_s)
        except (AuthError, Forbidden):
            return True
        except StrataError:
            return False
        return True

    def timeline_json(self, tenant_id: TenantId, timeline_id: TimelineId) -> dict[str, Any]:
        """The timeline's whole status document (docs/safekeeper.md); NotFound if absent."""
        out: dict[str, Any] = self.request("GET",
                                           f"/v1/tenant/{tenant_id}/timeline/{timeline_id}")
        return out

    def timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> SafekeeperTimelineInfo:
        return SafekeeperTimelineInfo.from_json(self.timeline_json(tenant_id, timeline_id))

    def create_timeline(self, tenant_id: TenantId, timeline_id: TimelineId, *, start_lsn: Lsn,
                        prev_lsn: Lsn, system_id: int, seg_size: int) -> bool:
        """Create the timeline starting at `start_lsn` (the record before it at
        `prev_lsn`); True if created, False if it was there already with these values."""
        out = self.request("POST", f"/v1/tenant/{tenant_id}/timeline",
                           {"timeline_id": str(timeline_id), "start_lsn": str(start_lsn),
                            "prev_lsn": str(prev_lsn), "system_id": system_id,
                            "seg_size": seg_size})
        return bool(out.get("created", False))

    def delete_timeline(self, tenant_id: TenantId, timeline_id: TimelineId) -> bool:
        """Delete the timeline (its streams end, its WAL and control file are removed):
        True if deleted, False if the safekeeper did not have it."""
        try:
            self.request("DELETE", f"/v1/tenant/{tenant_id}/timeline/{timeline_id}",
                         timeout_s=DELETE_TIMEOUT_S)
        except NotFound:
            return False
        return True
