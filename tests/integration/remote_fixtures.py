"""Fixtures for object storage tests: one loopback SeaweedFS S3 server per test module,
a fresh bucket per test (so tests share the slow server start, never their objects)."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from strata.remote.seaweed import SeaweedServer

_buckets = itertools.count(1)


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """A SeaweedFS server (`weed server -s3`) on free loopback ports, stopped after the
    module's tests."""
    directory = tmp_path_factory.mktemp("seaweed")
    os.chmod(directory, 0o755)
    server = SeaweedServer(directory / "data", directory / "seaweed.log")
    server.start()
    try:
        yield server
    finally:
        server.kill9()  # a graceful stop takes ~25 s and the data is thrown away


@pytest.fixture
def s3_url(seaweed: SeaweedServer, request: pytest.FixtureRequest) -> str:
    """`s3://bucket/prefix?endpoint=...` in a bucket of this test's own."""
    bucket = f"test-{os.getpid()}-{next(_buckets)}"
    seaweed.create_bucket(bucket)
    return seaweed.url(bucket, "strata")


@pytest.fixture(params=["local", "s3"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend in turn: a local directory, then S3 on SeaweedFS."""
    if request.param == "local":
        return f"file://{tmp_path / 'remote'}"
    return str(request.getfixturevalue("s3_url"))
