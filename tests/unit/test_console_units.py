"""The console's pieces without servers: job progress capture and error messages, the
branch point parser shared with the CLI, and the metrics arithmetic."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from strata.common.errors import UserError
from strata.common.lsn import Lsn
from strata.console.jobs import Job, Jobs
from strata.console.metrics import Sample, Sampler, parse_sample
from strata.control import output
from strata.control.env import Environment
from strata.control.operations import parse_branch_point


def _run_job(work: object) -> Job:
    async def main() -> Job:
        jobs = Jobs()
        job = jobs.start("test", "a test job", work)  # type: ignore[arg-type]
        await jobs.wait_all()
        return job

    return asyncio.run(main())


def test_job_captures_progress_and_result() -> None:
    """A job's thread sees the progress sink: info lines and both ends of each step are
    captured in order, and the result is kept."""
    def work() -> int:
        output.info("first")
        with output.step("building"):
            output.info("inside")
        return 42

    job = _run_job(work)
    assert job.state == "done" and job.result == 42 and job.error is None
    assert job.progress[:3] == ["first", "building ...", "inside"]
    assert job.progress[3].startswith("building: done in ")
    assert job.ended_at is not None


def test_job_errors_are_one_line_messages() -> None:
    """A StrataError becomes the job's error as it is; an unexpected exception its type
    and message (no traceback in the job)."""
    def refused() -> None:
        raise UserError("branch 'x' exists already; see `strata timeline list`")

    def broken() -> None:
        raise KeyError("boom")

    job = _run_job(refused)
    assert job.state == "failed" and job.error == \
        "branch 'x' exists already; see `strata timeline list`"
    job = _run_job(broken)
    assert job.state == "failed" and job.error == "internal error: KeyError: 'boom'"
    assert "Traceback" not in str(job.to_json())


def test_progress_sink_is_scoped() -> None:
    """Outside progress_to nothing is captured; inside, lines reach the sink."""
    lines: list[str] = []
    output.info("not captured")
    with output.progress_to(lines.append):
        output.info("captured")
    output.info("not captured either")
    assert lines == ["captured"]


@pytest.mark.parametrize("text, expected", [
    (None, (None, None)), ("now", (None, None)), (" NOW ", (None, None)),
    ("0/16B3740", (Lsn.parse("0/16B3740"), None)),
    ("2026-12-06T01:02:03+00:00", (None, "2026-12-06T01:02:03+00:00")),
    ("2026-12-06 01:02:03.5+00", (None, "2026-12-06 01:02:03.5+00")),
])
def test_parse_branch_point(text: str | None, expected: tuple[Lsn | None, str | None]) -> None:
    assert parse_branch_point(text) == expected


@pytest.mark.parametrize("text, message", [
    ("yesterday", "neither an LSN"), ("0/16B3741", "not 8-byte aligned"),
    ("2999-01-01T00:00:00Z", "in the future")])
def test_parse_branch_point_refuses(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_branch_point(text)


def test_parse_sample_sums_timelines() -> None:
    """parse_sample sums the pageserver's per-timeline figures and takes, per timeline, the
    safekeepers' highest commit LSN minus the pageserver's last record LSN."""
    ps = "\n".join([
        '# TYPE strata_pageserver_wal_ingested_bytes counter',
        'strata_pageserver_wal_ingested_bytes_total{tenant_id="a",timeline_id="1"} 100.0',
        'strata_pageserver_wal_ingested_bytes_total{tenant_id="a",timeline_id="2"} 50.0',
        '# TYPE strata_pageserver_timeline_lsn gauge',
        'strata_pageserver_timeline_lsn{tenant_id="a",timeline_id="1",kind="last_record"} 1000',
        'strata_pageserver_timeline_lsn{tenant_id="a",timeline_id="2",kind="last_record"} 500',
        '# TYPE strata_pageserver_layer_count gauge',
        'strata_pageserver_layer_count{tenant_id="a",timeline_id="1",kind="delta"} 3',
        'strata_pageserver_layer_count{tenant_id="a",timeline_id="1",kind="image"} 1', ""])
    sk1 = 'safekeeper_timeline_commit_lsn{tenant_id="a",timeline_id="1"} 1200\n'
    sk2 = 'safekeeper_timeline_commit_lsn{tenant_id="a",timeline_id="1"} 1100\n' \
          'safekeeper_timeline_commit_lsn{tenant_id="a",timeline_id="2"} 400\n'
    sample = parse_sample(1.0, ps, [sk1, sk2], {"main": 2})
    assert sample.wal_ingested_bytes == 150
    assert sample.layers == 4
    assert sample.commit_lag_bytes == 200  # timeline 2's safekeepers are behind: 0
    assert sample.connections == {"main": 2}
    empty = parse_sample(2.0, None, [], {})
    assert empty.layers is None and empty.wal_ingested_bytes is None


def test_samples_survive_a_console_restart(tmp_path: Path) -> None:
    """A new sampler (a restarted console) starts with the last hour a previous one
    stored: older samples and a torn last line are skipped; the file is rewritten with
    only the ring once it holds twice the window."""
    env = Environment(tmp_path)
    first = Sampler(env, interval_s=1800.0)  # a ring of 3 samples
    now = time.time()
    stored = [Sample(now - 7200, layers=1.0), Sample(now - 60, 10.0, 20.0, 0.0, 5.0, 2.0,
                                                     4096.0, {"main": 3}),
              Sample(now - 5, layers=3.0)]
    for sample in stored:
        first.ring.append(sample)
        first._store(sample)
    with open(first.path, "a") as f:
        f.write('{"at": 12')  # torn by a crash
    second = Sampler(env, interval_s=1800.0)
    assert list(second.ring) == stored[1:]
    for _ in range(3):  # 4 + 3 lines >= 2 * maxlen: rewritten with the ring alone
        second.ring.append(Sample(time.time(), layers=9.0))
        second._store(second.ring[-1])
    assert len(second.path.read_text().splitlines()) <= 2 * 3
    assert list(Sampler(env, interval_s=1800.0).ring) == list(second.ring)
