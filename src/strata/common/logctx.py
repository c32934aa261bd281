"""Log context: tenant and timeline ids attached to every log record of a task."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator
from contextlib import contextmanager

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_id", default="-")
_timeline: contextvars.ContextVar[str] = contextvars.ContextVar("timeline_id", default="-")


@contextmanager
def timeline_context(tenant_id: object, timeline_id: object | None = None) -> Iterator[None]:
    """Within the block, log records carry `tenant_id` and `timeline_id`."""
    t1 = _tenant.set(str(tenant_id))
    t2 = _timeline.set(str(timeline_id) if timeline_id is not None else "-")
    try:
        yield
    finally:
        _timeline.reset(t2)
        _tenant.reset(t1)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.tenant_id = _tenant.get()
        record.timeline_id = _timeline.get()
        return True


LOG_FORMAT = ("%(asctime)s %(levelname)s %(name)s "
              "tenant=%(tenant_id)s timeline=%(timeline_id)s: %(message)s")


def setup_logging(level: int = logging.INFO, stream_path: str | None = None) -> None:
    """Configure the root logger once for a Strata process."""
    handler: logging.Handler
    handler = logging.FileHandler(stream_path) if stream_path else logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
