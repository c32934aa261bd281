"""The `strata` environment's config and state (pure code) and the supervisor's process
checks, without starting services."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polling import wait_until
from strata.common.errors import NotFound, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.control.endpoints import (
    _seeded_prewarm_file,
    _streaming_sql,
    endpoint_paths,
    pull_standbys,
)
from strata.control.env import (
    CommitMode,
    ComputeMode,
    EndpointState,
    EnvConfig,
    Environment,
    State,
    TenantState,
    WalMode,
)
from strata.control.sidecar import fork_walproposer, supervise
from strata.control.supervisor import (
    ProcessFiles,
    ServiceSpec,
    pid_alive,
    port_in_use,
    process_state,
    start_service,
    stop_service,
)


def test_defaults_are_three_safekeepers() -> None:
    config = EnvConfig.from_dict({})
    assert config == EnvConfig()
    assert config.wal_mode == "safekeepers"
    assert [sk.id for sk in config.safekeepers] == [1, 2, 3]
    allocated = config.with_ports_allocated()
    assert allocated.pageserver.pg_port > 0 and allocated.pageserver.http_port > 0
    ports = [allocated.pageserver.pg_port, allocated.pageserver.http_port]
    ports += [p for sk in allocated.safekeepers for p in (sk.pg_port, sk.http_port)]
    ports += [allocated.console.port, allocated.proxy.port]
    assert 0 not in ports and len(set(ports)) == 10, ports
    assert allocated.ports() == set(ports)
    assert allocated.safekeeper(2) == allocated.safekeepers[1]
    with pytest.raises(NotFound, match=r"no safekeeper with id 4; config.toml has ids"):
        allocated.safekeeper(4)


def test_dev_mode_has_no_safekeepers_unless_listed() -> None:
    assert EnvConfig.from_dict({"wal_mode": "pageserver"}).safekeepers == ()
    one = EnvConfig.from_dict({"wal_mode": "safekeepers", "safekeepers": [{"id": 7}]})
    assert [sk.id for sk in one.safekeepers] == [7]


@pytest.mark.parametrize("data, message", [
    ({"wal_mod": "pageserver"}, "unknown keys ['wal_mod']"),
    ({"wal_mode": "quorum"}, "wal_mode must be one of"),
    ({"commit_mode": "both"}, "commit_mode must be one of ['push', 'pull']"),
    ({"wal_mode": "pageserver", "commit_mode": "pull"}, "needs wal_mode = \"safekeepers\""),
    ({"wal_mode": "safekeepers", "safekeepers": []}, "needs [[safekeepers]] entries"),
    ({"safekeepers": [{"id": 1}, {"id": 1}]}, "ids must be unique, got [1, 1]"),
    ({"safekeepers": [{"id": 0}]}, "id must be a positive integer"),
    ({"pageserver": {"pg_port": 70000}}, "[pageserver] pg_port must be a port number"),
    ({"pageserver": {"http_port": "80"}}, "[pageserver] http_port must be a port number"),
    ({"pageserver": {"config": {"listen_pg_addr": "x:1"}}}, "must not set listen_pg_addr"),
    ({"tenant_defaults": {"gc_horizon": -1}}, "gc_horizon must be >= 0"),
    ({"tenant_defaults": {"nope": 1}}, "unknown tenant config keys ['nope']"),
    ({"endpoint_defaults": {"max_connections": 0}}, "max_connections must be an integer"),
    ({"endpoint_defaults": {"lazy_outage_wait_s": -1}}, "lazy_outage_wait_s must be a number"),
])
def test_config_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as err:
        EnvConfig.from_dict(data)
    assert message in str(err.value)


ports = st.integers(min_value=0, max_value=65535)


@settings(max_examples=40)
@given(pg=ports, http=ports, distance=st.integers(min_value=1, max_value=1 << 40),
       buffers=st.sampled_from(["16MB", "128MB", "1GB"]),
       extra=st.dictionaries(st.sampled_from(["work_mem", "log_min_messages"]),
                             st.sampled_from(["4MB", "info"]), max_size=2))
def test_config_round_trips_through_the_file(tmp_path_factory: pytest.TempPathFactory,
                                             pg: int, http: int, distance: int, buffers: str,
                                             extra: dict[str, str]) -> None:
    config = EnvConfig.from_dict({
        "pageserver": {"pg_port": pg, "http_port": http, "config": {"log_level": "DEBUG"}},
        "tenant_defaults": {"checkpoint_distance": distance},
        "endpoint_defaults": {"shared_buffers": buffers, "settings": extra},
    })
    root = tmp_path_factory.mktemp("env") / "e"
    env = Environment.create(root, config)
    assert env.config() == config


def test_state_round_trip_and_lookups(tmp_path: Path) -> None:
    env = Environment.create(tmp_path / "env", EnvConfig())
    tid, tl = TenantId.parse("ab" * 16), TimelineId.parse("cd" * 16)
    with env.locked() as state:
        state.tenants[tid] = TenantState("default", {"main": tl}, {}, 7 << 60,
                                         generation=5, attached=False)
        state.default_tenant = tid
        state.endpoints["ro"] = EndpointState("ro", tid, "main", 5432, Lsn.parse("0/16B3740"),
                                                 False)
    state = env.read_state()
    assert state.tenants[tid].system_id == 7 << 60
    assert (state.tenants[tid].generation, state.tenants[tid].attached) == (5, False)
    assert state.tenant_id(None) == tid == state.tenant_id("default")
    assert state.timeline_id(tid, "main") == tl
    assert state.tenant_id("ab" * 16) == tid
    ep = state.endpoint("ro")
    assert ep.read_only and str(ep.read_lsn) == "0/16B3740" and not ep.autostart
    with pytest.raises(NotFound, match="no branch named 'dev'.*branches: main"):
        state.timeline_id(tid, "dev")
    with pytest.raises(NotFound, match="no endpoint named 'x'; endpoints: ro"):
        state.endpoint("x")
    with pytest.raises(NotFound, match="no tenant named 'other'"):
        state.tenant_id("other")
    with pytest.raises(NotFound, match="has no tenant"):
        State().tenant_id(None)


def test_missing_and_existing_environment(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="run `strata init` first"):
        Environment.open(tmp_path / "none")
    Environment.create(tmp_path / "env", EnvConfig())
    with pytest.raises(UserError, match="already holds a Strata environment"):
        Environment.create(tmp_path / "env", EnvConfig())


def test_state_write_failure_keeps_the_old_state(tmp_path: Path) -> None:
    env = Environment.create(tmp_path / "env", EnvConfig())
    with pytest.raises(RuntimeError), env.locked() as state:
        state.default_tenant = TenantId.parse("ee" * 16)
        raise RuntimeError("a command failed half way")
    assert env.read_state().default_tenant is None


def test_pid_files_trust_only_the_live_process_they_name(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                              "marker-123"])
    try:
        files = ProcessFiles("sleeper", tmp_path / "p.pid", tmp_path / "p.log", "marker-123")
        assert files.read_pid() is None and not files.died()
        files.write_pid(child.pid)
        # At once after Popen: the child may still be in exec with an empty command line
        # (often so on a loaded machine); read_pid waits for it rather than call it a
        # stranger.
        assert files.read_pid() == child.pid
        other = ProcessFiles("other", tmp_path / "p.pid", tmp_path / "p.log", "marker-999")
        assert other.read_pid() is None  # a reused pid is not ours
        child.kill()
        # killed, not reaped: a zombie counts as dead
        wait_until(lambda: not pid_alive(child.pid), 10, "a killed zombie to count as dead",
                   interval_s=0.01)
        stat = Path(f"/proc/{child.pid}/stat").read_text()
        assert stat[stat.rfind(")") + 2] == "Z", stat  # still there, as a zombie
        assert files.read_pid() is None and files.died()
    finally:
        child.kill()
        child.wait()
    assert pid_alive(os.getpid())


def test_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)


def _listener_spec(tmp_path: Path, port: int, script: str | None = None) -> ServiceSpec:
    """A service that listens on `port` (or runs `script`), with its own pid and log."""
    code = script or ("import socket, time; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET,"
                      f" socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', {port})); s.listen(); "
                      "print('listening', flush=True); time.sleep(120)")
    files = ProcessFiles("listener", tmp_path / "run" / "l.pid", tmp_path / "logs" / "l.log",
                         marker=f"marker-{tmp_path.name}")

    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                return True
        except OSError:
            return False

    return ServiceSpec(files, "the listener", {"port": ("127.0.0.1", port)},
                       [sys.executable, "-c", code, files.marker], ready=accepts,
                       waiting_for=f"the listener on port {port}", start_timeout_s=60)


def test_services_start_stop_and_state(tmp_path: Path) -> None:
    from strata.common.proc import free_port

    port = free_port("127.0.0.1")
    spec = _listener_spec(tmp_path, port)
    assert process_state(spec.files).state == "stopped"
    assert stop_service(spec.files, spec.owner, timeout_s=30) is False
    pid = start_service(spec)
    try:
        assert start_service(spec) == pid  # already running: the same process
        state = process_state(spec.files, spec.ready)
        assert (state.pid, state.state, state.log_tail) == (pid, "running", None)
        assert process_state(spec.files, lambda: False).state == "not responding"
        assert "listening" in spec.files.log_path.read_text()
        other = _listener_spec(tmp_path / "other", port)
        with pytest.raises(UserError, match=f"its port 127.0.0.1:{port} is taken"):
            start_service(other)
        assert stop_service(spec.files, spec.owner, timeout_s=30) is True
        assert not pid_alive(pid) and not spec.files.pid_path.exists()
        assert process_state(spec.files).state == "stopped"
        pid = start_service(spec)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 30, "the killed listener to be gone")
        died = process_state(spec.files, spec.ready)
        assert died.state == "died" and died.pid is None and "listening" in str(died.log_tail)
        # a stale pid file is removed by the next stop or start
        assert stop_service(spec.files, spec.owner, timeout_s=30) is False
        assert not spec.files.pid_path.exists()
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_service_dying_at_start_shows_its_log(tmp_path: Path) -> None:
    from strata.common.proc import free_port

    spec = _listener_spec(tmp_path, free_port("127.0.0.1"),
                          script="import sys; print('bad setting: x', flush=True); sys.exit(3)")
    with pytest.raises(UserError, match=r"(?s)listener \(pid \d+\) exited while waiting "
                                        r"for the listener.*bad setting: x"):
        start_service(spec)
    assert process_state(spec.files).state == "died"


def _stand_in_postmaster(datadir: Path) -> subprocess.Popen[bytes]:
    """A process whose command line names `datadir`, like `postgres -D datadir`. It
    restores SIGQUIT's default action, as PostgreSQL sets its own handler: a test run as
    a background job of a non-interactive shell inherits SIGQUIT ignored."""
    code = ("import signal, time; signal.signal(signal.SIGQUIT, signal.SIG_DFL); "
            "time.sleep(60)")
    return subprocess.Popen([sys.executable, "-c", code, str(datadir)])


def test_sidecar_exit_stops_postgres(tmp_path: Path) -> None:
    """The sidecar exits: the postmaster gets SIGQUIT (immediate shutdown) and the
    supervisor returns the sidecar's exit code."""
    pm = _stand_in_postmaster(tmp_path / "pgdata")
    try:
        rc = supervise(tmp_path / "pgdata", pm.pid,
                       [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(5)"])
        assert rc == 5
        assert pm.wait(10) == -signal.SIGQUIT
    finally:
        pm.kill()


def test_sidecar_exit_marks_the_pid_file_before_postgres_stops(tmp_path: Path) -> None:
    """The sidecar exits: before the postmaster gets SIGQUIT, the supervisor's pid file
    names the sidecar's pid (gone), so `endpoint list` never shows the endpoint died while
    its walproposer runs. The stand-in postmaster reads the file when SIGQUIT comes."""
    pid_file, seen = tmp_path / "walproposer-main.pid", tmp_path / "seen-at-sigquit"
    pid_file.write_text(f"{os.getpid()}\n")  # as the CLI writes the supervisor's pid
    code = ("import pathlib, signal, sys, time\n"
            "def quit(*_):\n"
            f"    pathlib.Path({str(seen)!r}).write_text("
            f"pathlib.Path({str(pid_file)!r}).read_text())\n"
            "    sys.exit(0)\n"
            "signal.signal(signal.SIGQUIT, quit)\n"
            "time.sleep(60)\n")
    pm = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "pgdata")])
    started: list[int] = []

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
        started.append(proc.pid)
        return proc

    try:
        assert supervise(tmp_path / "pgdata", pm.pid, start, pid_file=pid_file) == 0
        assert pm.wait(10) == 0
    finally:
        pm.kill()
    assert seen.read_text() == f"{started[0]}\n"
    assert pid_file.read_text() == f"{started[0]}\n"
    assert not list(tmp_path.glob("*.died"))


def test_sidecar_waits_for_the_postmaster_pid_on_stdin(tmp_path: Path) -> None:
    """`--wait-stdin`: the supervisor (started before PostgreSQL) takes the postmaster's
    pid from stdin and then supervises as usual; at end of input without one (a failed
    start) it exits with 0 and starts nothing."""
    marker = tmp_path / "child-started"
    child = [sys.executable, "-c",
             f"import pathlib, sys; pathlib.Path({str(marker)!r}).touch(); sys.exit(5)"]
    argv = [sys.executable, "-m", "strata.control.sidecar", "--pgdata",
            str(tmp_path / "pgdata"), "--wait-stdin", "--", *child]
    abandoned = subprocess.run(argv, input=b"", capture_output=True, timeout=60, check=False)
    assert abandoned.returncode == 0, abandoned
    assert not marker.exists()

    pm = _stand_in_postmaster(tmp_path / "pgdata")
    try:
        run = subprocess.run(argv, input=f"{pm.pid}\n".encode(), capture_output=True,
                             timeout=60, check=False)
        assert run.returncode == 5, run
        assert marker.exists()
        assert pm.wait(10) == -signal.SIGQUIT  # its sidecar exited: PostgreSQL goes
    finally:
        pm.kill()
    bad = subprocess.run(argv, input=b"nope\n", capture_output=True, timeout=60, check=False)
    assert bad.returncode != 0 and b"expected the postmaster's pid" in bad.stderr, bad


def test_forked_walproposer_exit_codes(tmp_path: Path) -> None:
    """The walproposer forked from the supervisor: its exit code as Popen would give it
    (a usage error 2; killed by signal N: -N), SIGTERM with its default action."""
    assert fork_walproposer(["--no-such-flag"]).wait(60) == 2
    # A walproposer that waits for a PostgreSQL that never comes (a closed port).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    pm = _stand_in_postmaster(tmp_path / "pgdata")
    args = ["--tenant", "0" * 32, "--timeline", "0" * 32, "--safekeepers",
            f"1@127.0.0.1:{closed_port}", "--pg-port", str(closed_port), "--pgdata",
            str(tmp_path / "pgdata"), "--postmaster-pid", str(pm.pid),
            "--pg-reconnect-timeout-s", "600", "--log-file", str(tmp_path / "wp.log")]
    try:
        for sig in (signal.SIGKILL, signal.SIGTERM):
            child = fork_walproposer(args)
            assert child.poll() is None
            time.sleep(0.2)
            child.send_signal(sig)
            assert child.wait(60) == -sig
            assert child.poll() == -sig
            child.send_signal(signal.SIGKILL)  # a no-op once it is reaped
        assert pm.poll() is None  # nothing was sent to its postmaster
    finally:
        pm.kill()


def test_postgres_exit_stops_the_sidecar(tmp_path: Path) -> None:
    """The postmaster exits: the sidecar is stopped (SIGTERM) and the supervisor ends."""
    pm = _stand_in_postmaster(tmp_path / "pgdata")
    marker, stopped = tmp_path / "sidecar-started", tmp_path / "sidecar-got-sigterm"
    # Stopped by SIGTERM it exits 0 and says so; left alone it would exit 3 after 60 s.
    sidecar = [sys.executable, "-c",
               "import pathlib, signal, sys, time\n"
               "def stop(*_):\n"
               f"    pathlib.Path({str(stopped)!r}).touch()\n"
               "    sys.exit(0)\n"
               "signal.signal(signal.SIGTERM, stop)\n"
               f"pathlib.Path({str(marker)!r}).touch()\n"
               "time.sleep(60)\n"
               "sys.exit(3)\n"]

    def kill_postmaster_soon() -> None:
        while not marker.exists():
            time.sleep(0.02)
        pm.terminate()
        pm.wait(10)

    import threading
    killer = threading.Thread(target=kill_postmaster_soon)
    killer.start()
    pid_file = tmp_path / "walproposer-main.pid"
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        assert supervise(tmp_path / "pgdata", pm.pid, sidecar, pid_file=pid_file) == 0
    finally:
        killer.join(10)
        pm.kill()
    assert stopped.exists()
    assert pid_file.read_text() == f"{os.getpid()}\n"  # stopped, not died: left to the CLI


def test_allocated_ports_differ_even_when_the_os_repeats_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The OS may hand out a just-closed port again: allocation retries until each port
    differs from the others and from those configured."""
    handed = iter([5001, 5001, 5002, 6000, 5002, 5003, 5004, 5005, 5006, 5007, 5008, 5009])
    monkeypatch.setattr("strata.control.env.free_port", lambda host="": next(handed))
    config = EnvConfig.from_dict({"console": {"port": 6000}})
    allocated = config.with_ports_allocated()
    assert allocated.console.port == 6000
    assert allocated.ports() == {6000} | set(range(5001, 5010))


def test_commit_mode_pull_by_default_push_when_asked(tmp_path: Path) -> None:
    """commit_mode (pull mode, docs/walproposer.md): pull unless config.toml says push
    (or wal_mode is "pageserver"); both round-trip and are always written; pull names one
    standby per safekeeper (sk<id>) and the streaming check asks for a majority of them."""
    assert EnvConfig().commit_mode is CommitMode.PULL
    assert EnvConfig.from_dict({}).commit_mode is CommitMode.PULL
    dev = EnvConfig.from_dict({"wal_mode": "pageserver"})
    assert dev.commit_mode is CommitMode.PUSH and dev.to_dict()["commit_mode"] == "push"
    push = EnvConfig.from_dict({"commit_mode": "push"})
    assert push.commit_mode is CommitMode.PUSH and push.to_dict()["commit_mode"] == "push"
    assert EnvConfig.from_dict(push.to_dict()).commit_mode is CommitMode.PUSH
    assert pull_standbys(push) == ()
    assert "'strata_walproposer') and state = 'streaming'" in _streaming_sql(push)
    assert "count(*) >= 1 " in _streaming_sql(push)
    pull = EnvConfig.from_dict({"safekeepers": [{"id": 1}, {"id": 2}, {"id": 5}]})
    assert pull.commit_mode is CommitMode.PULL
    assert pull_standbys(pull) == ("sk1", "sk2", "sk5")
    assert "count(*) >= 2 " in _streaming_sql(pull)
    assert "in ('sk1', 'sk2', 'sk5')" in _streaming_sql(pull)
    env = Environment.create(tmp_path / "env", pull)
    assert 'commit_mode = "pull"' in env.config_path.read_text()
    assert env.config().commit_mode is CommitMode.PULL
    assert pull_standbys(EnvConfig.from_dict({"wal_mode": "pageserver"})) == ()


def test_modes_are_parsed_once_and_state_files_stay_compatible(tmp_path: Path) -> None:
    """wal_mode and an endpoint's compute mode are enums in memory; config.toml and
    state.json keep the plain strings, so files written before still load, unchanged."""
    config = EnvConfig.from_dict({"wal_mode": "pageserver"})
    assert config.wal_mode is WalMode.PAGESERVER
    assert config.to_dict()["wal_mode"] == "pageserver"
    env = Environment.create(tmp_path / "env", config)
    assert env.config().wal_mode is WalMode.PAGESERVER
    assert 'wal_mode = "pageserver"' in env.config_path.read_text()
    tid = "ab" * 16
    old: dict[str, Any] = {"version": 1, "default_tenant": tid,
           "tenants": {tid: {"name": "default", "branches": {"main": "cd" * 16},
                             "config": {}}},
           "endpoints": {
               "a": {"name": "a", "tenant_id": tid, "branch": "main", "port": 5432,
                     "lsn": None, "autostart": True, "mode": "lazy"},
               "b": {"name": "b", "tenant_id": tid, "branch": "main", "port": 5433,
                     "lsn": "0/16B3740", "autostart": False}}}
    env.state_path.write_text(json.dumps(old))
    state = env.read_state()
    assert state.endpoint("a").mode is ComputeMode.LAZY
    assert state.endpoint("b").mode is None
    written = state.to_json()
    assert written["endpoints"]["a"]["mode"] == "lazy"
    assert written["endpoints"]["b"]["mode"] is None
    assert json.loads(json.dumps(written))["endpoints"]["a"] == \
        {**old["endpoints"]["a"], "suspend_timeout_s": 300.0, "port_picked": False}
    # an endpoint's LSN is an Lsn in memory and the same "X/Y" text in the file
    assert state.endpoint("b").lsn == Lsn.parse("0/16B3740") and state.endpoint("a").lsn is None
    assert json.loads(json.dumps(written))["endpoints"]["b"] == \
        {**old["endpoints"]["b"], "mode": None, "suspend_timeout_s": 300.0,
         "port_picked": False}
    old["endpoints"]["a"]["mode"] = "turbo"
    env.state_path.write_text(json.dumps(old))
    with pytest.raises(UserError, match=r"mode must be one of \['lazy', 'full'\], got 'turbo'"):
        env.read_state()


def test_ids_are_parsed_once_and_state_files_write_back_identical(tmp_path: Path) -> None:
    """Tenant and timeline ids are TenantId/TimelineId in memory and the same 32 hex digits
    in state.json: a file of the current format loads and writes back byte for byte; an
    older one (without the later keys) loads with typed ids too."""
    env = Environment.create(tmp_path / "env", EnvConfig())
    tid, main, dev = "ab" * 16, "cd" * 16, "ef" * 16
    current = {"version": 1, "default_tenant": tid,
               "tenants": {tid: {"name": "default", "branches": {"main": main, "dev": dev},
                                 "config": {"checkpoint_distance": 1 << 20},
                                 "system_id": 7 << 60,
                                 "roles": {"main": {"app": "SCRAM-SHA-256$4096:x"}},
                                 "app_role_timelines": [main], "generation": 3,
                                 "attached": True, "pageserver": 2}},
               "endpoints": {"ro": {"name": "ro", "tenant_id": tid, "branch": "dev",
                                    "port": 5433, "lsn": "0/16B3740", "autostart": False,
                                    "mode": "full", "suspend_timeout_s": 60.0,
                                    "port_picked": True}}}
    text = json.dumps(current, indent=2) + "\n"
    env.state_path.write_text(text)
    with env.locked() as state:
        assert state.default_tenant == TenantId.parse(tid)
        tenant = state.tenants[TenantId.parse(tid)]
        assert tenant.branches == {"main": TimelineId.parse(main), "dev": TimelineId.parse(dev)}
        assert tenant.app_role_timelines == [TimelineId.parse(main)]
        assert state.endpoint("ro").tenant_id == TenantId.parse(tid)
        assert state.timeline_id(state.tenant_id(tid), "dev") == TimelineId.parse(dev)
    assert env.state_path.read_text() == text
    old: dict[str, Any] = {
        "version": 1, "default_tenant": tid,
        "tenants": {tid: {"name": "default", "branches": {"main": main}, "config": {}}},
        "endpoints": {}}
    env.state_path.write_text(json.dumps(old))
    state = env.read_state()
    assert list(state.tenants) == [TenantId.parse(tid)]
    assert state.tenants[TenantId.parse(tid)].app_role_timelines == []
    assert state.to_json()["tenants"][tid]["branches"] == {"main": main}
    old["tenants"][tid]["branches"]["main"] = "not-an-id"
    env.state_path.write_text(json.dumps(old))
    with pytest.raises(UserError, match="invalid TimelineId 'not-an-id'"):
        env.read_state()


def test_seaweedfs_ports_round_trip_and_checks(tmp_path: Path) -> None:
    ports = {"s3.port": 8333, "master.port": 9333}
    config = EnvConfig.from_dict({"seaweedfs": {"ports": ports}})
    env = Environment.create(tmp_path / "env", config)
    assert env.config().seaweedfs == ports and {8333, 9333} <= config.ports()
    assert Environment.create(tmp_path / "none", EnvConfig()).config().seaweedfs is None
    with pytest.raises(UserError, match='must name "s3.port"'):
        EnvConfig.from_dict({"seaweedfs": {"ports": {"master.port": 9333}}})
    with pytest.raises(UserError, match="unknown keys"):
        EnvConfig.from_dict({"seaweedfs": {"bucket": "x"}})
    with pytest.raises(UserError, match="port number"):
        EnvConfig.from_dict({"seaweedfs": {"ports": {"s3.port": 70000}}})


def test_several_pageservers_round_trip_and_old_files_load(tmp_path: Path) -> None:
    """[[pageservers]] (ids 2 and up, with [pageserver.config]) round-trip through
    config.toml; a config and a state written before there were several load as
    pageserver 1 only, every tenant on it."""
    config = EnvConfig.from_dict({
        "pageserver": {"pg_port": 6400, "http_port": 9898,
                       "config": {"remote_storage": "file:///r"}},
        "pageservers": [{"id": 2}]}).with_ports_allocated()
    second = config.pageserver_by_id(2)
    assert second.config == {"remote_storage": "file:///r"} and second.pg_port > 0
    assert {second.pg_port, second.http_port, 6400, 9898} <= config.ports()
    assert [ps.id for ps in config.pageservers] == [1, 2]
    env = Environment.create(tmp_path / "env", config)
    assert env.config() == config
    assert "[[pageservers]]" in env.config_path.read_text()
    assert env.pageserver_workdir(1) == env.root / "pageserver"
    assert env.pageserver_workdir(2) == env.root / "pageserver-2"
    with pytest.raises(NotFound, match=r"no pageserver with id 3; config.toml has ids \[1, 2\]"):
        config.pageserver_by_id(3)
    for bad, message in [([{"id": 1}], "id must be an integer >= 2"),
                         ([{"id": 2}, {"id": 2}], "ids must be unique"),
                         ([{"id": 2, "config": {}}], "unknown keys")]:
        with pytest.raises(UserError, match=message):
            EnvConfig.from_dict({"pageservers": bad})
    assert EnvConfig.from_dict({}).more_pageservers == ()
    assert "pageservers" not in EnvConfig().to_dict()
    tid = "ab" * 16
    env.state_path.write_text(json.dumps({
        "version": 1, "default_tenant": tid, "endpoints": {},
        "tenants": {tid: {"name": "default", "branches": {}, "config": {}}}}))
    assert env.read_state().tenants[TenantId.parse(tid)].pageserver == 1
    with env.locked() as state:
        state.tenants[TenantId.parse(tid)].pageserver = 2
    assert env.read_state().tenants[TenantId.parse(tid)].pageserver == 2


def test_pageserver_address_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    """A running compute's pageserver file: read at open, re-read after a rewrite (a
    relocation), the last address kept while it is missing or unreadable."""
    from strata.compute.pageserver_address import AddressFile, write_address

    path = tmp_path / "pageserver.json"
    with pytest.raises(UserError, match="no pageserver address"):
        AddressFile(path)
    write_address(path, "127.0.0.1", 6400, 9898)
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    address = AddressFile(path, check_interval_s=0)  # stat'ed at every call
    assert (address.pg(), address.http()) == (("127.0.0.1", 6400), ("127.0.0.1", 9898))
    write_address(path, "127.0.0.2", 6401, 9899)
    assert (address.pg(), address.http()) == (("127.0.0.2", 6401), ("127.0.0.2", 9899))
    path.write_text("{not json")
    assert address.pg() == ("127.0.0.2", 6401)
    path.unlink()
    assert address.http() == ("127.0.0.2", 9899)


def test_pageserver_address_file_is_stated_at_most_every_interval(tmp_path: Path) -> None:
    """Page reads and polls ask the address often: the file is stat'ed at most once per
    check interval (a change shows after it), at once when asked fresh (after an error)."""
    from strata.compute.pageserver_address import AddressFile, write_address

    now = [100.0]
    path = tmp_path / "pageserver.json"
    write_address(path, "127.0.0.1", 6400, 9898)
    address = AddressFile(path, check_interval_s=0.2, clock=lambda: now[0])
    stats = address.stats
    for _ in range(1000):
        assert address.pg() == ("127.0.0.1", 6400)
    assert address.stats == stats  # no stat within the interval
    write_address(path, "127.0.0.2", 6401, 9899)
    assert address.pg() == ("127.0.0.1", 6400)  # not looked at yet
    assert address.pg(fresh=True) == ("127.0.0.2", 6401)  # after an error: looked at now
    assert address.stats == stats + 1
    write_address(path, "127.0.0.3", 6402, 9900)
    now[0] += 0.2
    assert address.http() == ("127.0.0.3", 9900)  # the interval passed: stat'ed again
    assert address.stats == stats + 2


def test_only_ports_strata_picked_are_picked_again() -> None:
    """[picked_ports] names what `with_ports_allocated` chose; `repick` changes only those,
    and not one the user edited since; the table survives config.toml."""
    config = EnvConfig.from_dict({"pageserver": {"pg_port": 7000}}).with_ports_allocated()
    assert "pageserver.1.pg_port" not in config.picked_ports  # the user's
    http = config.pageserver.http_port
    assert config.picked_ports["pageserver.1.http_port"] == http
    assert EnvConfig.from_dict(config.to_dict()) == config
    assert config.repick(["pageserver.1.pg_port"]) is None
    again = config.repick(["pageserver.1.http_port", "proxy.port"])
    assert again is not None
    assert again.pageserver.pg_port == 7000 and again.pageserver.http_port != http
    assert again.proxy.port != config.proxy.port
    assert again.ports() - {again.pageserver.http_port, again.proxy.port} == \
        config.ports() - {http, config.proxy.port}
    assert again.picked_ports["pageserver.1.http_port"] == again.pageserver.http_port
    assert len(again.ports()) == len(config.ports())  # still all different
    edited = EnvConfig.from_dict({**again.to_dict(), "proxy": {"port": 7001}})
    assert edited.repick(["proxy.port"]) is None  # edited by the user: theirs now


def test_proxy_kernel_relay_key() -> None:
    """[proxy] kernel_relay: on by default, false survives config.toml, anything but a
    boolean is refused with the key's name."""
    assert EnvConfig.from_dict({}).proxy.kernel_relay is True
    config = EnvConfig.from_dict({"proxy": {"kernel_relay": False}})
    assert config.proxy.kernel_relay is False
    assert EnvConfig.from_dict(config.to_dict()).proxy.kernel_relay is False
    with pytest.raises(UserError, match=r"\[proxy\] kernel_relay must be true or false"):
        EnvConfig.from_dict({"proxy": {"kernel_relay": "yes"}})


def test_seaweedfs_ports_picked_again_move_the_s3_url() -> None:
    """SeaweedFS's ports picked at `init --object-storage seaweedfs` are strata's: picked
    again, a new S3 port moves the remote_storage URL that names it (and only that one);
    another of its ports leaves the URL alone."""
    ports = {"s3.port": 40001, "filer.port": 40002}
    url = "s3://strata?endpoint=http://127.0.0.1:40001"
    config = EnvConfig.from_dict({
        "pageserver": {"config": {"remote_storage": url}},
        "seaweedfs": {"ports": ports},
        "picked_ports": {f"seaweedfs.{name}": port for name, port in ports.items()},
    }).with_ports_allocated()
    assert EnvConfig.from_dict(config.to_dict()) == config
    moved = config.repick(["seaweedfs.s3.port"])
    assert moved is not None and moved.seaweedfs is not None
    s3 = moved.seaweedfs["s3.port"]
    assert s3 != 40001 and moved.seaweedfs["filer.port"] == 40002
    assert moved.pageserver.config["remote_storage"] == \
        f"s3://strata?endpoint=http://127.0.0.1:{s3}"
    assert moved.picked_ports["seaweedfs.s3.port"] == s3
    filer = config.repick(["seaweedfs.filer.port"])
    assert filer is not None and filer.pageserver.config["remote_storage"] == url
    user_set = EnvConfig.from_dict({**config.to_dict(), "picked_ports": {}})
    assert user_set.repick(["seaweedfs.s3.port"]) is None


def _occupy(port: int) -> socket.socket:
    """Hold 127.0.0.1:port as another process would (bound, not accepting: a readiness
    probe cannot mistake it for the service)."""
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    return s


def test_service_start_picks_another_port_when_one_is_taken(tmp_path: Path) -> None:
    """A port another process took, before the start or between the start's check and
    the service's bind (the service then exits with EADDRINUSE): with `repick`, the
    start goes on with a new port; without it, the error names the taken port."""
    from strata.common.proc import free_port

    picks: list[list[str]] = []

    def repick(taken: list[str]) -> ServiceSpec | None:
        picks.append(taken)
        return _listener_spec(tmp_path, free_port("127.0.0.1"))

    port = free_port("127.0.0.1")
    with _occupy(port):
        with pytest.raises(UserError, match=f"its port 127.0.0.1:{port} is taken"):
            start_service(_listener_spec(tmp_path, port))
        pid = start_service(_listener_spec(tmp_path, port), repick)
    try:
        assert picks == [["port"]]
        assert "listening" in (tmp_path / "logs" / "l.log").read_text()
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not pid_alive(pid), 30, "the listener to be gone")

    # Taken after the check, before the service binds: it dies, the start tries again.
    held: list[socket.socket] = []
    port = free_port("127.0.0.1")
    late = dataclasses.replace(_listener_spec(tmp_path, port),
                               prepare=lambda: held.append(_occupy(port)))
    picks.clear()
    try:
        pid = start_service(late, repick)
        assert picks == [["port"]] and held
        assert pid_alive(pid) and process_state(late.files).state == "running"
        log = (tmp_path / "logs" / "l.log").read_text()
        assert "Address already in use" in log, log
        os.kill(pid, signal.SIGKILL)
    finally:
        for s in held:
            s.close()


def test_tenant_lock_shared_by_starts_exclusive_for_a_relocation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Endpoint starts share the tenant lock; a relocation waits for them (saying so once)
    and they wait for it: each lock is a flock of its own open file, as in two processes."""
    import threading

    from strata.control.endpoints import tenant_lock

    env = Environment(tmp_path)
    tid = TenantId(bytes(range(16)))
    order: list[str] = []
    with tenant_lock(env, tid, exclusive=False, waiting="-"), \
            tenant_lock(env, tid, exclusive=False, waiting="second start"):
        assert "waiting" not in capsys.readouterr().err  # shared: no wait

        def relocate() -> None:
            with tenant_lock(env, tid, exclusive=True, waiting="starts running"):
                order.append("relocated")

        mover = threading.Thread(target=relocate)
        mover.start()
        wait_until(lambda: "waiting: starts running" in capsys.readouterr().err, 30,
                   "the relocation to wait")
        order.append("starts done")
    mover.join(30)
    assert order == ["starts done", "relocated"]


def test_a_first_start_is_prewarmed_from_an_endpoint_of_its_tenant(tmp_path: Path) -> None:
    env = Environment.create(tmp_path / "env", EnvConfig())
    tid, other_tid = TenantId.parse("ab" * 16), TenantId.parse("ef" * 16)
    with env.locked() as state:
        for name, tenant, branch in (("a", tid, "main"), ("b", tid, "dev"), ("c", tid, "x"),
                                     ("new", tid, "dev"), ("alien", other_tid, "dev")):
            state.endpoints[name] = EndpointState(name, tenant, branch, 5432)
    ep = env.read_state().endpoint("new")
    prewarm = endpoint_paths(env, "new").prewarm_file
    # No other endpoint of the tenant has run: nothing to copy.
    assert _seeded_prewarm_file(env, ep) == prewarm and not prewarm.exists()

    def write(name: str, text: str, mtime: float) -> None:
        path = endpoint_paths(env, name).prewarm_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.utime(path, (mtime, mtime))

    write("alien", "/base/1/1259 9\n", 400)  # another tenant's: never copied
    write("a", "/base/5/1259 0,1\n", 300)  # the newest of the tenant's
    write("c", "/base/5/1259 7\n", 100)
    assert _seeded_prewarm_file(env, ep).read_text() == "/base/5/1259 0,1\n"
    prewarm.unlink()
    write("b", "/base/5/1249 3\n", 200)  # on the same branch: preferred to the newest
    assert _seeded_prewarm_file(env, ep).read_text() == "/base/5/1249 3\n"
    # Its own file, once it has one, is kept.
    prewarm.write_text("/global/1260 0\n")
    assert _seeded_prewarm_file(env, ep).read_text() == "/global/1260 0\n"
