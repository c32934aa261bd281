"""Fuzzed input against the real pageserver process: HTTP and pagestream.

Hypothesis generates methods, paths (every documented route with ids that are valid,
unknown, or arbitrary text), query strings and bodies (arbitrary JSON, arbitrary bytes,
and the documented fields with arbitrary values). Every answer must be below 500 and,
for an error, a JSON `{"error": ...}` without a traceback; after every case a separate,
long-lived connection must still be served. Raw malformed HTTP and random pagestream
messages must not disturb other connections either.

Requests that would reach outside this machine are not generated: the routes that make
the pageserver connect somewhere (wal_receiver, safekeepers) only get ids that do not
exist, so they are refused before their body is used. Deleting is likewise only tried
on ids that do not exist, so the valid tenant stays for later cases.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fixtures_env import PageserverProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.common.proc import ensure_traversable
from strata.pageserver import pagestream as ps
from strata.pageserver.http import OPENAPI_PATH
from strata.pageserver.page_client import PageClientSync
from strata.pg import wire
from strata.pg.relfile import RelTag

DOC: dict[str, Any] = json.loads(OPENAPI_PATH.read_text())
ROUTES = sorted((path, method) for path, item in DOC["paths"].items() for method in item)
OUTBOUND = ("/wal_receiver", "/safekeepers")
PG_CLASS = RelTag(1663, 5, 1259, 0)  # pg_class of the `postgres` database


@dataclass
class Target:
    process: PageserverProcess
    tenant: TenantId
    timeline: TimelineId
    watcher: http.client.HTTPConnection
    """A keep-alive connection opened before the fuzzing: it must keep being served."""

    def call(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.process.http_port, timeout=60)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheader("Content-Type") or ""
        finally:
            conn.close()

    def still_serving(self) -> None:
        self.watcher.request("GET", "/v1/status")
        resp = self.watcher.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    test_dir = tmp_path_factory.mktemp("http_fuzz")
    os.chmod(test_dir, 0o755)
    ensure_traversable(test_dir)
    # At most 3 tenants: generated bodies that happen to be valid cannot initdb forever.
    process = PageserverProcess(test_dir / "pageserver", test_dir / "pageserver.log",
                                overrides=["max_tenants=3", "max_timelines_per_tenant=20",
                                           "max_request_body_bytes=65536",
                                           "wait_lsn_timeout_s=1"])
    process.start()
    try:
        tenant, timeline = process.client.create_tenant()
        watcher = http.client.HTTPConnection("127.0.0.1", process.http_port, timeout=60)
        yield Target(process, tenant, timeline, watcher)
        watcher.close()
        assert process.stop() == 0, process.log_tail()
        text = process.log_text()
        assert "Traceback" not in text and " ERROR " not in text, process.log_tail(80)
    finally:
        process.kill9()


# --- strategies ----------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                               max_size=4),
    max_leaves=12)
arbitrary_text = st.text(max_size=40)
hex_ids = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
lsns = st.integers(0, 2**64 - 1).map(lambda v: str(Lsn(v))) | arbitrary_text


def _field_names(path: str, method: str) -> list[str]:
    op = DOC["paths"][path].get(method)
    body = op.get("requestBody") if op is not None else None
    if body is None:
        return ["tenant_id", "config", "lsn"]
    schema = body["content"]["application/json"]["schema"]
    if "$ref" in schema:
        schema = DOC["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return sorted(schema.get("properties", {})) or ["x"]


@st.composite
def requests(draw: st.DrawFn, target_ids: tuple[str, str]) -> tuple[str, str, bytes | None]:
    path, method = draw(st.sampled_from(ROUTES))
    if draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["get", "post", "put", "delete", "patch"]))
    risky = method == "delete" or path.endswith(OUTBOUND)
    ids: dict[str, str] = {}
    for i, name in enumerate(("tenant_id", "timeline_id")):
        choices = [hex_ids, arbitrary_text, st.just("")]
        if not risky:
            choices.insert(0, st.just(target_ids[i]))
        ids[name] = draw(st.one_of(*choices))
    url = path
    for name, value in ids.items():
        url = url.replace("{" + name + "}", urllib.parse.quote(value, safe=""))
    if draw(st.booleans()):
        query = draw(st.dictionaries(st.sampled_from(["timestamp", "lsn", "x"]),
                                     arbitrary_text | lsns, max_size=2))
        url += "?" + urllib.parse.urlencode(query)
    kind = draw(st.integers(0, 3))
    body: bytes | None
    if kind == 0:
        body = None
    elif kind == 1:
        body = draw(st.binary(max_size=200))
    elif kind == 2:
        body = json.dumps(draw(json_values)).encode()
    else:
        names = _field_names(path, method)
        fields = draw(st.dictionaries(st.sampled_from(names),
                                      json_values | lsns | hex_ids, max_size=len(names)))
        if path == "/v1/tenant" and method == "post":
            # A valid body creates a tenant (an initdb, seconds): keep those rare.
            fields.setdefault("config", {"gc_horizon": draw(arbitrary_text)})
        body = json.dumps(fields).encode()
    return method.upper(), url, body


@pytest.mark.timeout(300)
def test_fuzzed_http_never_5xx_and_others_keep_being_served(target: Target) -> None:
    ids = (str(target.tenant), str(target.timeline))
    seen: set[int] = set()

    @settings(max_examples=300, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests(ids))
    def case(request: tuple[str, str, bytes | None]) -> None:
        method, url, body = request
        status, data, ctype = target.call(method, url, body)
        assert status < 500, (method, url, body, status, data[:500])
        seen.add(status)
        if status >= 400:
            assert ctype.startswith("application/json"), (method, url, status, ctype)
            error = json.loads(data)["error"]
            assert error and "Traceback" not in error, (method, url, data[:500])
        target.still_serving()

    case()
    # The generator reaches handlers (2xx), refuses bad input (400) and bad ids (404).
    assert {200, 400, 404} <= seen, sorted(seen)
    # The valid tenant and timeline are still there and readable.
    info = target.process.client.timeline(target.tenant, target.timeline)
    assert info.state == "Active"


MALFORMED_HTTP = [
    b"GARBAGE\r\n\r\n",
    b"GET /v1/status HTTP/9.9\r\n\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/tenant HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"tenant",
    b"POST /v1/tenant HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/tenant HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{}",
    b"POST /v1/tenant HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /v1/status HTTP/1.1\r\n" + b"X-A: b\r\n" * 20_000 + b"\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64),  # a TLS ClientHello
    b"",  # connect and close
]


@pytest.mark.parametrize("raw", MALFORMED_HTTP, ids=range(len(MALFORMED_HTTP)))
def test_malformed_http_is_refused_and_others_keep_being_served(target: Target,
                                                                raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", target.process.http_port), timeout=30) as s:
        try:
            s.sendall(raw)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        except (ConnectionResetError, BrokenPipeError):
            reply = b""
    if reply:
        status = int(reply.split(b" ", 2)[1])
        assert 400 <= status < 500, reply[:300]
    target.still_serving()


def _raw_pagestream(port: int, tenant: TenantId, timeline: TimelineId) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(wire.StartupMessage((("user", "fuzz"),)).encode())
    sock.sendall(wire.Query(f"pagestream {tenant} {timeline}").encode())
    reader = wire.MessageReader("backend")
    while True:
        chunk = sock.recv(65536)
        assert chunk, "closed before CopyBothResponse"
        reader.feed(chunk)
        while (msg := reader.next_backend()) is not None:
            if isinstance(msg, wire.CopyBothResponse):
                return sock


@st.composite
def pagestream_payloads(draw: st.DrawFn) -> bytes:
    """A request tag the server knows (or not) followed by arbitrary or truncated fields."""
    valid = ps.encode_request(ps.NblocksRequest(Lsn(draw(st.integers(0, 2**64 - 1))),
                                                PG_CLASS))
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.binary(max_size=64))
    if kind == 1:
        return valid[:draw(st.integers(0, len(valid)))]
    tag = draw(st.sampled_from(list(b"ENPBDSLxz\x00\xff")))
    return bytes([tag]) + draw(st.binary(max_size=64))


@pytest.mark.timeout(300)
def test_fuzzed_pagestream_keeps_other_connections_served(target: Target) -> None:
    port = target.process.pg_port
    with PageClientSync("127.0.0.1", port, target.tenant, target.timeline) as good:
        lsn = target.process.client.timeline(target.tenant, target.timeline).last_record_lsn
        expected = good.nblocks(PG_CLASS, lsn)

        @settings(max_examples=60, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(st.lists(pagestream_payloads(), min_size=1, max_size=3))
        def case(payloads: list[bytes]) -> None:
            sock = _raw_pagestream(port, target.tenant, target.timeline)
            try:
                for payload in payloads:
                    sock.sendall(wire.CopyData(payload).encode())
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(70)  # a request at a future LSN waits up to 60 s
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # the server closed a connection that sent garbage: as it should
            finally:
                sock.close()
            assert good.nblocks(PG_CLASS, lsn) == expected
            target.still_serving()

        case()
        assert good.connects == 1, "the good connection must never have been closed"
