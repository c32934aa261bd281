"""The page service: the `pagestream <tenant> <timeline>` command of the pageserver's pg port.

The pageserver's query handler calls `PageService.command(args)` for `pagestream`; it
resolves the timeline (NotFound becomes an ErrorResponse before any copy starts) and
returns a CopyBoth whose `run` serves pagestream requests (pagestream.py) one at a
time, in order, until the client ends the copy:

- a request first waits until the timeline has ingested WAL up to its LSN, at most
  `wait_lsn_timeout_s` (Unavailable otherwise; a lease does not wait: it may name a
  future LSN);
- a request that cannot be answered (below the GC cutoff, past a relation's size, a
  broken timeline, a timed-out wait) becomes an ErrorResponse naming the request's
  key and LSN, and the stream goes on;
- a message that does not decode raises ProtocolError, which ends this connection
  only (pgserve sends a FATAL and closes it).

Where reads run: a single page takes tens of microseconds to reconstruct, less than a
hop to a worker thread and back (which also costs up to a GIL switch interval, 5 ms,
in the tail; bench/pageserver.py measures both), so small requests are served on the
event loop. Batches and key-range scans run in a worker thread, so that one large
request does not stall every other connection of the loop (`inline_max_pages`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from strata.common.errors import ProtocolError, StrataError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import timeline_context
from strata.pageserver import pagestream as ps
from strata.pageserver.datadir import database_size, read_slru_segment
from strata.pg.pgserve import CopyBoth, CopyStream, Reply, Session
from strata.storage.timeline import Timeline

log = logging.getLogger(__name__)

USAGE = "usage: pagestream <tenant_id> <timeline_id>"


@dataclass(frozen=True, slots=True)
class PageServiceConfig:
    wait_lsn_timeout_s: float = 60.0
    """How long a request waits for its LSN to be ingested before it fails."""
    inline_max_pages: int = 4
    """Requests reading at most this many pages are served on the event loop; larger
    ones (big batches, DbSize, SLRU segments) in a worker thread. -1: all in threads."""

    def __post_init__(self) -> None:
        if not self.wait_lsn_timeout_s > 0:
            raise UserError(f"page service wait_lsn_timeout_s must be > 0, got "
                            f"{self.wait_lsn_timeout_s!r}")
        if self.inline_max_pages < -1:
            raise UserError(f"page service inline_max_pages must be >= -1, got "
                            f"{self.inline_max_pages!r}")


TimelineLookup = Callable[[TenantId, TimelineId], Timeline]


class PageService:
    """Serves pagestream connections over the timelines that `lookup` resolves."""

    def __init__(self, lookup: TimelineLookup, config: PageServiceConfig | None = None) -> None:
        self.lookup = lookup
        self.config = config if config is not None else PageServiceConfig()
        self.requests_served = 0
        self.requests_failed = 0

    async def handle_query(self, session: Session, query: str) -> Reply:
        """A complete QueryHandler answering only `pagestream` (tests, a standalone port)."""
        words = query.strip().rstrip(";").split()
        if not words or words[0].lower() != "pagestream":
            raise UserError(f"unknown command {query!r}; this port answers `pagestream "
                            f"<tenant_id> <timeline_id>`")
        if len(words) > 1:
            session.check_tenant(words[1])
        return self.command(words[1:])

    def command(self, args: Sequence[str]) -> Reply:
        """`pagestream <tenant_id> <timeline_id>` (the words after `pagestream`)."""
        if len(args) != 2:
            raise UserError(f"pagestream takes 2 arguments, got {len(args)}; {USAGE}")
        tenant_id = TenantId(TenantId.parse(args[0]).raw)
        timeline_id = TimelineId(TimelineId.parse(args[1]).raw)
        timeline = self.lookup(tenant_id, timeline_id)  # NotFound: an error before the copy

        async def run(stream: CopyStream) -> None:
            with timeline_context(tenant_id, timeline_id):
                await self._serve_stream(timeline, stream)

        return CopyBoth(run, tag="PAGESTREAM")

    async def _serve_stream(self, timeline: Timeline, stream: CopyStream) -> None:
        served = 0
        while True:
            payload = await stream.read()
            if payload is None:
                log.debug("pagestream ended by the client after %d requests", served)
                return
            try:
                request = ps.decode_request(payload)
            except ProtocolError:
                log.info("pagestream closing after %d requests: malformed request", served)
                raise
            response = await self.serve(timeline, request)
            try:
                await stream.write(ps.encode_response(response))
            except (ConnectionError, OSError) as err:
                # The client went away (a compute or FUSE process stopped): not an error
                # of ours; pgserve then finds the connection lost and closes it.
                log.info("pagestream client gone after %d requests: %s", served, err)
                return
            served += 1

    async def serve(self, timeline: Timeline, request: ps.Request) -> ps.Response:
        """Answer one request; every failure becomes an ErrorResponse with its context."""
        try:
            timeline.check_not_broken()
            if not isinstance(request, ps.LeaseRequest):
                await timeline.wait_for_lsn(request.lsn, self.config.wait_lsn_timeout_s)
            if pages_read(request) <= self.config.inline_max_pages:
                response = serve_request(timeline, request)
            else:
                response = await asyncio.to_thread(serve_request, timeline, request)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if not isinstance(err, StrataError):
                log.exception("pagestream request failed: %s", ps.describe(request))
            self.requests_failed += 1
            return ps.ErrorResponse.from_exception(err, request.request_id,
                                                   ps.describe(request))
        self.requests_served += 1
        return response


def pages_read(request: ps.Request) -> int:
    """About how many pages answering `request` reads (to pick loop or thread)."""
    match request:
        case ps.GetPageRequest():
            return 1
        case ps.GetPagesRequest(blocks=blocks):
            return len(blocks)
        case ps.DbSizeRequest() | ps.GetSlruSegmentRequest():
            return ps.MAX_BATCH_PAGES  # a scan of a key range: never on the loop
        case _:
            return 0  # a size, an existence check, a lease: cheap metadata


def serve_request(timeline: Timeline, request: ps.Request) -> ps.Response:
    """Read what `request` asks for (blocking; the LSN has been ingested already)."""
    rid = request.request_id
    match request:
        case ps.GetPageRequest(lsn=lsn, rel=rel, blkno=blkno):
            return ps.GetPageResponse(timeline.get_rel_page(rel, blkno, lsn), rid)
        case ps.GetPagesRequest(lsn=lsn, blocks=blocks):
            return ps.GetPagesResponse(tuple(timeline.get_rel_page(rel, blkno, lsn)
                                             for rel, blkno in blocks), rid)
        case ps.NblocksRequest(lsn=lsn, rel=rel):
            return ps.NblocksResponse(timeline.rel_size(rel, lsn), rid)
        case ps.ExistsRequest(lsn=lsn, rel=rel):
            return ps.ExistsResponse(timeline.rel_exists(rel, lsn), rid)
        case ps.DbSizeRequest(lsn=lsn, spcnode=spc, dbnode=db):
            return ps.DbSizeResponse(database_size(timeline, spc, db, lsn), rid)
        case ps.GetSlruSegmentRequest(lsn=lsn, kind=kind, segno=segno):
            return ps.GetSlruSegmentResponse(read_slru_segment(timeline, kind, segno, lsn), rid)
        case ps.LeaseRequest(lsn=lsn, duration_s=duration_s):
            expires_at = timeline.leases.lease(lsn, duration_s, timeline.clock(),
                                               timeline.gc_cutoff)
            log.info("lease on %s until %.0f (%.0fs)", lsn, expires_at, duration_s)
            return ps.LeaseResponse(expires_at, rid)

