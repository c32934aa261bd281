"""Long console operations (branch at a timestamp, endpoint start, restore, ...) as jobs:
each runs in a thread with the control plane's progress lines captured
(`output.progress_to`), and the UI polls `GET /api/v1/jobs/{id}` until it is done.

A job ends `done` with a result or `failed` with a one-line message: a StrataError's text
(it says what to do), or for an unexpected exception its type and message (the traceback
goes to the console's log, never to the browser).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from strata.common.errors import StrataError
from strata.control import output

log = logging.getLogger(__name__)
JOBS_KEPT = 100
PROGRESS_LINES_MAX = 500


@dataclass
class Job:
    id: str
    kind: str
    title: str
    state: str = "running"  # "running", "done", "failed"
    progress: list[str] = field(default_factory=list)
    result: Any = None
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None

    def add_progress(self, line: str) -> None:
        if len(self.progress) < PROGRESS_LINES_MAX:
            self.progress.append(line)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "title": self.title, "state": self.state,
                "progress": list(self.progress), "result": self.result, "error": self.error,
                "started_at": self.started_at, "ended_at": self.ended_at}


class Jobs:
    """The console's jobs, newest last; the oldest finished ones are forgotten."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self) -> list[Job]:
        return list(self._jobs.values())

    def start(self, kind: str, title: str, work: Callable[[], Any]) -> Job:
        """Run `work` (blocking, it may take minutes) in a thread as a new job."""
        job = Job(str(next(self._ids)), kind, title)
        self._jobs[job.id] = job
        self._forget_old()
        task = asyncio.get_running_loop().create_task(self._run(job, work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job, work: Callable[[], Any]) -> None:
        def in_thread() -> Any:
            with output.progress_to(job.add_progress):
                return work()

        log.info("job %s (%s) started: %s", job.id, job.kind, job.title)
        try:
            job.result = await asyncio.to_thread(in_thread)
            job.state = "done"
        except StrataError as err:
            job.error, job.state = str(err), "failed"
        except Exception as err:  # noqa: BLE001 - reported to the UI, traceback to the log
            log.exception("job %s (%s) failed unexpectedly", job.id, job.kind)
            job.error, job.state = f"internal error: {type(err).__name__}: {err}", "failed"
        job.ended_at = time.time()
        log.info("job %s (%s) %s%s", job.id, job.kind, job.state,
                 f": {job.error}" if job.error else "")

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state != "running"]
        for job_id in finished[:max(0, len(self._jobs) - JOBS_KEPT)]:
            del self._jobs[job_id]

    async def wait_all(self) -> None:
        """Wait for the running jobs (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
