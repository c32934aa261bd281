"""pageserver.toml and `-c key=value` overrides: defaults, types, and errors that name the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strata.common.errors import UserError
from strata.pageserver.config import CONFIG_FILE, PageserverConfig, parse_addr


def test_defaults_without_a_file(tmp_path: Path) -> None:
    conf = PageserverConfig.load(tmp_path)
    assert conf.workdir == tmp_path
    assert conf.pg_addr == ("127.0.0.1", 64000)
    assert conf.http_addr == ("127.0.0.1", 9898)
    assert conf.default_tenant_conf.checkpoint_distance == 256 * 1024 * 1024


def test_file_then_overrides(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text(
        'listen_pg_addr = "127.0.0.1:7000"\nwait_lsn_timeout_s = 5\n'
        "[default_tenant_conf]\ncheckpoint_distance = 1048576\n")
    conf = PageserverConfig.load(tmp_path, ["listen_http_addr=0.0.0.0:0",
                                            "default_tenant_conf.gc_horizon=0",
                                            "wait_lsn_timeout_s=2.5"])
    assert conf.pg_addr == ("127.0.0.1", 7000)
    assert conf.http_addr == ("0.0.0.0", 0)
    assert conf.wait_lsn_timeout_s == 2.5
    assert conf.default_tenant_conf.checkpoint_distance == 1048576
    assert conf.default_tenant_conf.gc_horizon == 0


@pytest.mark.parametrize("override, fragment", [
    ("no_such_key=1", "no_such_key"),
    ("listen_pg_addr=nocolon", "listen_pg_addr"),
    ("listen_http_addr=host:99999", "listen_http_addr"),
    ("wait_lsn_timeout_s=0", "wait_lsn_timeout_s"),
    ("wait_lsn_timeout_s=true", "wait_lsn_timeout_s"),
    ("ingest_batch_bytes=1.5", "ingest_batch_bytes"),
    ("log_level=LOUD", "log_level"),
    ("nice=20", "nice"),
    ("nice=-1", "nice"),
    ("default_tenant_conf.checkpoint_distance=-1", "checkpoint_distance"),
    ("default_tenant_conf.bogus=1", "bogus"),
    ("novalue", "key=value"),
])
def test_errors_name_the_key(tmp_path: Path, override: str, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        PageserverConfig.load(tmp_path, [override])


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    (tmp_path / CONFIG_FILE).write_text("listen_pg_addr = \n")
    with pytest.raises(UserError, match=CONFIG_FILE):
        PageserverConfig.load(tmp_path)


def test_parse_addr() -> None:
    assert parse_addr("k", "[::1]:5") == ("[::1]", 5)
    with pytest.raises(UserError, match="not a number"):
        parse_addr("k", "h:x")


def test_nice_is_applied_to_the_process_and_inherited(tmp_path: Path) -> None:
    """`nice` raises the pageserver's nice value before any thread starts (so threads and
    children get it), and never lowers one that is already higher. In a child process:
    a nice value cannot be lowered again without privileges."""
    conf = PageserverConfig.load(tmp_path, ["nice=7"])
    assert conf.nice == 7
    script = (
        "import os, threading\n"
        "from strata.pageserver.server import lower_priority\n"
        "lower_priority(7)\n"
        "seen = []\n"
        "t = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))\n"
        "t.start(); t.join()\n"
        "lower_priority(3)\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), seen[0])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=60)
    expected = str(max(7, os.getpriority(os.PRIO_PROCESS, 0)))  # a niced test run
    assert out.stdout.split() == [expected, expected], out.stderr
