"""The proxy's in-memory copy of state.json: parsed once per change, every change (a new
endpoint, a new password, an endpoint removed) seen by the next read."""

from __future__ import annotations

import threading
from pathlib import Path

from strata.common.ids import TenantId, TimelineId
from strata.control.env import EndpointState, EnvConfig, Environment, TenantState
from strata.proxy.state_cache import StateCache

TENANT = TenantId.parse("11" * 16)


def test_reads_once_per_change_and_sees_every_change(tmp_path: Path) -> None:
    env = Environment.create(tmp_path / "env", EnvConfig())
    cache = StateCache(env)
    assert cache.get().endpoints == {}
    assert cache.get() is cache.get()
    assert cache.reads == 1

    with env.locked() as state:
        state.tenants[TENANT] = TenantState("default", {"main": TimelineId.parse("22" * 16)},
                                            roles={"main": {"app": "secret-1"}})
        state.endpoints["main"] = EndpointState("main", TENANT, "main", 5432)
    assert cache.get().endpoint("main").port == 5432
    assert cache.reads == 2

    # Same size, same second: the rename gives the file a new identity all the same.
    with env.locked() as state:
        state.tenants[TENANT].roles["main"]["app"] = "secret-2"
    assert cache.get().tenants[TENANT].roles["main"]["app"] == "secret-2"
    with env.locked() as state:
        del state.endpoints["main"]
    assert "main" not in cache.get().endpoints
    assert cache.get() is cache.get()
    assert cache.reads == 4


def test_threads_share_one_read(tmp_path: Path) -> None:
    env = Environment.create(tmp_path / "env", EnvConfig())
    cache = StateCache(env)
    seen: list[object] = []
    threads = [threading.Thread(target=lambda: seen.append(cache.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(s) for s in seen}) == 1
    assert cache.reads == 1
