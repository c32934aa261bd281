"""The proxy's asyncio driver: one PostgreSQL port in front of every endpoint.

Per client connection:

1. the startup phase: SSLRequest -> TLS (the SNI host name is kept), GSSENCRequest ->
   refused ('N'), CancelRequest -> routed to the compute that owns the key, then the
   StartupMessage (`strata.proxy.protocol` says which endpoint it names);
2. authentication at the proxy: SCRAM-SHA-256 against the role's secret kept by the
   control plane, or a cleartext password `endpoint=<name>;<password>` when the client
   named no endpoint otherwise;
3. wake: the endpoint's compute is started if it is stopped (`strata.proxy.computes`);
4. the proxy logs in to the compute over its unix socket with the client's startup
   parameters, forwards the compute's answer (its BackendKeyData replaced by a key of
   the proxy's, so that a cancel request comes back here) up to ReadyForQuery,
5. then relays bytes both ways: plain out of the event loop (`strata.proxy.relay`: a
   BPF sockmap and a splice thread, or a splice thread per direction); TLS by the event
   loop's protocols on uvloop's TLS transport (`relay.relay_protocols`, the default), or
   with STRATA_PROXY_TLS_RELAY=threads a thread per direction on the proxy's own TLS
   session from the handshake on (`strata.proxy.tlsrelay`).

A malformed or unexpected message closes that one connection with an ErrorResponse;
the server goes on. Passwords and secrets are never logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
import struct
import time
from dataclasses import dataclass
from typing import Any, Protocol, cast

from strata.common.errors import NotFound, ProtocolError, StrataError
from strata.control.env import Environment
from strata.pg.wire import (
    MAX_STARTUP_PACKET_BYTES,
    CancelRequest,
    ErrorResponse,
    GSSENCRequest,
    MessageReader,
    SSLRequest,
    StartupMessage,
)
from strata.proxy import protocol, relay
from strata.proxy.computes import Computes
from strata.proxy.scram import AuthFailed, ScramExchange, ScramSecret
from strata.proxy.sockmap import Sockmap, SockmapUnavailable
from strata.proxy.tlsrelay import TlsStream

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 60.0
"""Bound on the client's part of the startup phase (not on a wake)."""
WAKE_TIMEOUT_S = 600.0
AUTH_MESSAGE_MAX_BYTES = 16 * 1024
COMPUTE_STARTUP_MESSAGE_MAX_BYTES = 1024 * 1024
_I32 = struct.Struct("!i")


class _In(Protocol):
    async def readexactly(self, n: int) -> bytes: ...


class _Out(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Client:
    """A client's connection: asyncio's streams, or from its TLS handshake on (in the
    `threads` TLS relay, STRATA_PROXY_TLS_RELAY=threads), the proxy's own TLS session
    for both."""

    reader: _In
    writer: _Out
    tls: TlsStream | None = None
    raw: asyncio.BaseTransport | None = None  # TCP under uvloop's TLS (the `loop` relay)


EARLY_LOGIN_WAIT_S = 30.0
"""After a wake, bound on the early login still in progress (then logged in again)."""


@dataclass(slots=True)
class _Login:
    """A connection to a compute logged in during its start: the compute's answer up to
    ReadyForQuery, read and kept until the start succeeded."""

    socket_path: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answer: bytes


class _Replay:
    """`answer` first, then what `reader` reads."""

    def __init__(self, answer: bytes, reader: asyncio.StreamReader) -> None:
        self.answer = answer
        self.reader = reader

    async def readexactly(self, n: int) -> bytes:
        if not self.answer:
            return await self.reader.readexactly(n)
        head, self.answer = self.answer[:n], self.answer[n:]
        if len(head) < n:
            head += await self.reader.readexactly(n - len(head))
        return head


def _close_login(login: _Login | None) -> None:
    if login is not None:
        login.writer.close()


def _drop_early_login(task: asyncio.Task[_Login | None], *, used: _Login | None) -> None:
    """An early login not (or no longer) needed: stopped, or its connection closed unless
    it is `used` (and closed by its user)."""
    if not task.done():
        task.cancel()  # it closes its connection
    elif not task.cancelled() and task.exception() is None and task.result() is not used:
        _close_login(task.result())


class ClientError(Exception):
    """Ends a client's connection with an ErrorResponse carrying this SQLSTATE."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class _CancelTarget:
    socket_path: str
    process_id: int
    secret_key: int


class ProxyServer:
    def __init__(self, env: Environment, *, host: str, port: int, domain: str,
                 ssl_context: ssl.SSLContext | None, kernel_relay: bool = False) -> None:
        self.env = env
        self.host = host
        self.port = port
        self.domain = domain
        self.ssl_context = ssl_context
        self.computes = Computes(env)
        self._cancel_keys: dict[tuple[int, int], _CancelTarget] = {}
        self._sni: dict[int, str] = {}
        # The clients' tasks: asyncio's stream protocol drops its reference to its task
        # when its transport closes, which the TLS and plain relays do on taking the
        # socket over; the loop itself holds tasks weakly only.
        self._clients: set[asyncio.Task[None]] = set()
        self.sockmap = _open_sockmap(kernel_relay)
        self.tls_threads = _tls_relay() == "threads"
        # STRATA_PROXY_PRELOGIN=0: no login to a running compute during the client's SCRAM
        # (then after it, as before), for the A/B in docs/proxy.md.
        self.pre_login = os.environ.get("STRATA_PROXY_PRELOGIN", "1") != "0"
        if ssl_context is not None:
            ssl_context.sni_callback = self._on_sni

    def _on_sni(self, ssl_object: Any, server_name: str | None,
                _context: ssl.SSLContext) -> None:
        if server_name:
            self._sni[id(ssl_object)] = server_name

    async def serve_forever(self) -> None:
        server = await asyncio.start_server(self._handle, self.host, self.port,
                                            limit=AUTH_MESSAGE_MAX_BYTES * 4)
        log.info("proxy listening on %s:%d (endpoints as <name>.%s over TLS, or "
                 "options=endpoint=<name>)", self.host, self.port, self.domain)
        async with server:
            await asyncio.gather(server.serve_forever(), self.computes.suspend_loop())

    # --- one client ----------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = _Client(reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve_client(client)
        except ClientError as err:
            log.info("refused client %s: %s", peer, err)
            await _send_error(client.writer, err.code, str(err))
        except ProtocolError as err:
            log.info("closed client %s: %s", peer, err)
            await _send_error(client.writer, protocol.PROTOCOL_VIOLATION, str(err))
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError,
                EOFError) as err:
            log.info("client %s went away during startup: %s", peer,
                     type(err).__name__)
        except Exception:
            log.exception("unexpected error serving client %s", peer)
        finally:
            self._clients.discard(task)
            if not client.writer.is_closing():
                client.writer.close()
            if not writer.is_closing():
                writer.close()

    async def _start_tls(self, client: _Client, context: ssl.SSLContext) -> str | None:
        """TLS after the client's SSLRequest; returns the SNI host name it sent."""
        writer = cast(asyncio.StreamWriter, client.writer)
        writer.write(b"S")
        if not self.tls_threads:
            await writer.drain()
            client.raw = writer.transport
            await writer.start_tls(context)
            return self._sni.pop(id(writer.get_extra_info("ssl_object")), None)
        # The proxy's own session from the handshake on (strata.proxy.tlsrelay): uvloop's
        # TLS transport never touches it, so that the relay threads can take it over.
        await relay.wait_writes_flushed(writer)
        tls, received = TlsStream.take_over(cast(asyncio.StreamReader, client.reader),
                                            writer, context)
        client.reader = client.writer = client.tls = tls
        try:
            await tls.handshake(received)
        finally:
            server_name = self._sni.pop(id(tls.ssl_object), None)
        return server_name

    async def _serve_client(self, client: _Client) -> None:
        accepted = time.monotonic()
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            packet = await _read_startup(client.reader)
            server_name: str | None = None
            if isinstance(packet, GSSENCRequest):
                client.writer.write(b"N")
                packet = await _read_startup(client.reader)
            if isinstance(packet, SSLRequest):
                if self.ssl_context is None:
                    client.writer.write(b"N")
                else:
                    server_name = await self._start_tls(client, self.ssl_context)
                packet = await _read_startup(client.reader)
            if isinstance(packet, CancelRequest):
                await self._cancel(packet)
                return
            if not isinstance(packet, StartupMessage):
                raise ProtocolError(f"unexpected {type(packet).__name__} after the "
                                    "SSL/GSS negotiation")
            user = packet.get("user")
            if not user:
                raise ProtocolError("the startup message names no user")
            choice = protocol.choose_endpoint(server_name, self.domain, packet)
            name = choice.name
            pre_login: asyncio.Task[_Login | None] | None = None
            if name is None:
                name = await self._cleartext_auth(client.reader, client.writer, user)
            else:
                secret = self._secret(name, user)
                # A running compute: log in to it while the client does SCRAM (as
                # PostgreSQL forks a backend before it authenticates a client).
                pre_login = self._pre_login(name, packet)
                try:
                    await self._scram_auth(client.reader, client.writer, user, secret)
                except BaseException:
                    if pre_login is not None:
                        _drop_early_login(pre_login, used=None)
                    raise
        await self._connect(client, name, packet, auth_s=time.monotonic() - accepted,
                            pre_login=pre_login)

    def _secret(self, endpoint: str, user: str) -> ScramSecret:
        state = self.computes.state.get()
        try:
            ep = state.endpoint(endpoint)
        except NotFound:
            raise ClientError(protocol.CONNECTION_REJECTED,
                              f"endpoint {endpoint!r} does not exist; see `strata endpoint "
                              "list`") from None
        roles = state.tenants[ep.tenant_id].roles.get(ep.branch, {})
        secret = roles.get(user)
        if secret is None:
            # Same words as a wrong password: do not tell which roles exist.
            raise ClientError(protocol.INVALID_PASSWORD,
                              f"password authentication failed for user {user!r}")
        return ScramSecret.parse(secret)

    async def _scram_auth(self, reader: _In, writer: _Out, user: str,
                          secret: ScramSecret) -> None:
        writer.write(protocol.auth_sasl())
        mechanism, client_first = protocol.decode_sasl_initial_response(
            await _read_password_message(reader))
        if mechanism != protocol.SCRAM_SHA_256:
            raise ProtocolError(f"SASL mechanism {mechanism!r} was not offered")
        exchange = ScramExchange(secret)
        writer.write(protocol.auth_sasl_continue(exchange.first(client_first)))
        try:
            server_final = exchange.final(await _read_password_message(reader))
        except AuthFailed:
            raise ClientError(protocol.INVALID_PASSWORD,
                              f"password authentication failed for user {user!r}") from None
        writer.write(protocol.auth_sasl_final(server_final))

    async def _cleartext_auth(self, reader: _In, writer: _Out, user: str) -> str:
        """The password form `endpoint=<name>;<password>`; returns the endpoint."""
        writer.write(b"R" + _I32.pack(8) + _I32.pack(3))  # AuthenticationCleartextPassword
        text = protocol.decode_password(await _read_password_message(reader))
        try:
            name, password = protocol.split_endpoint_password(text)
        except ProtocolError as err:
            raise ClientError(protocol.CONNECTION_REJECTED, str(err)) from None
        secret = self._secret(name, user)
        if not await asyncio.to_thread(secret.matches, password):
            raise ClientError(protocol.INVALID_PASSWORD,
                              f"password authentication failed for user {user!r}")
        return name

    # --- compute -------------------------------------------------------------------------
    async def _connect(self, client: _Client, name: str, startup: StartupMessage, *,
                       auth_s: float,
                       pre_login: asyncio.Task[_Login | None] | None = None) -> None:
        """Relay the authenticated client to `name`'s compute, woken if it sleeps;
        `pre_login`: a login to its running compute begun during the client's SCRAM
        (used if that compute still runs, else dropped)."""
        self.computes.acquire(name)
        key: tuple[int, int] | None = None
        early: asyncio.Task[_Login | None] | None = pre_login
        login: _Login | None = None

        def log_in_early() -> None:
            # The start waited for here: log in as soon as PostgreSQL accepts
            # connections, overlapping the start's last phases (the compute's answer is
            # kept until the start has succeeded).
            nonlocal early
            if early is not None:  # a login to the compute before (suspended since)
                _drop_early_login(early, used=None)
            early = asyncio.create_task(self._early_login(name, startup))

        try:
            wake_started = time.monotonic()
            try:
                # Back once the start is past its checks, in its last step (the proxy's
                # roles): a client logged in early is relayed then; else after the start.
                async with asyncio.timeout(WAKE_TIMEOUT_S):
                    address, woke, ended = await self.computes.wake(
                        name, on_start=log_in_early, until_checked=True)
            except (StrataError, TimeoutError) as err:
                raise _not_started(name, err) from None
            wake_s = time.monotonic() - wake_started
            login_started = time.monotonic()
            if early is not None:
                try:
                    async with asyncio.timeout(EARLY_LOGIN_WAIT_S):
                        login = await early
                except Exception as err:  # noqa: BLE001 - then the usual login below
                    if not isinstance(err, TimeoutError):  # (cancelled by the timeout)
                        log.info("early login to endpoint %s failed: %r", name, err)
                if not ended and self.computes.start_ended(name):
                    # The start ended meanwhile: its error (or a compute it stopped).
                    try:
                        address = await self.computes.finish_start(name)
                    except StrataError as err:
                        raise _not_started(name, err) from None
                    ended = True
            if not ended and (login is None or login.socket_path != address.socket_path):
                try:  # no early login to use: the start's end first (the role may be new)
                    async with asyncio.timeout(WAKE_TIMEOUT_S):
                        address = await self.computes.finish_start(name)
                except (StrataError, TimeoutError) as err:
                    raise _not_started(name, err) from None
                ended = True
            if login is not None and login.socket_path == address.socket_path:
                c_reader, c_writer = login.reader, login.writer
                answer: _In = _Replay(login.answer, c_reader)
            else:
                _close_login(login)
                login = None
                try:
                    c_reader, c_writer = await asyncio.open_unix_connection(
                        address.socket_path, limit=COMPUTE_STARTUP_MESSAGE_MAX_BYTES)
                except OSError as err:
                    raise ClientError(protocol.CANNOT_CONNECT_NOW,
                                      f"endpoint {name} does not accept connections: "
                                      f"{err.strerror}") from None
                c_writer.write(protocol.startup_for_compute(startup).encode())
                answer = c_reader
            try:
                # Plain: ReadyForQuery is held back and sent by the relay once the sockets
                # are in the sockmap, so that the client's first query finds them there.
                plain = client.tls is None and client.raw is None
                hold = plain and self.sockmap is not None
                started = await self._forward_compute_startup(answer, client.writer,
                                                              address.socket_path,
                                                              hold_ready=hold)
                if started is None:
                    return
                key, ready = started
                if woke:  # the proxy's own share of a wake, next to the start's
                    log.info("connection to endpoint %s after its wake: client startup and "
                             "authentication %.3fs, wait for the start %.2fs, login to the "
                             "compute %.3fs after the start (%s)", name, auth_s, wake_s,
                             time.monotonic() - login_started,
                             "logged in after the start" if login is None
                             else "logged in during the start" if ended
                             else "logged in during the start, relayed during its roles "
                                  "step")
                # Plain: the kernel (BPF sockmap) or a thread per direction, out of the
                # event loop; TLS: the event loop's protocols, or
                # (STRATA_PROXY_TLS_RELAY=threads) a thread per direction on the proxy's
                # own session (docs/proxy.md, "Relay").
                if client.tls is not None:
                    await client.tls.drain()
                    await relay.wait_writes_flushed(c_writer)
                    await client.tls.relay(*relay.take_over(c_reader, c_writer))
                    return
                reader = cast(asyncio.StreamReader, client.reader)
                writer = cast(asyncio.StreamWriter, client.writer)
                await relay.wait_writes_flushed(writer, c_writer, raw=client.raw)
                if plain:
                    await relay.relay_threads(reader, writer, c_reader, c_writer,
                                              ready=ready, kernel=self.sockmap)
                else:
                    await relay.relay_protocols(reader, writer, c_reader, c_writer)
            finally:
                c_writer.close()
        finally:
            if early is not None:
                _drop_early_login(early, used=login)
            if key is not None:
                self._cancel_keys.pop(key, None)
            self.computes.release(name)

    async def _early_login(self, name: str, startup: StartupMessage) -> _Login | None:
        """(During a wake) once the compute accepts connections, log in and read its answer
        up to ReadyForQuery; None if it refused (e.g. the role is made later in the start:
        the login is then done again after the start)."""
        accepting = self.computes.accepting(name)
        socket_path = await asyncio.shield(accepting) if accepting is not None else None
        if socket_path is None:
            return None
        return await self._login(socket_path, startup)

    def _pre_login(self, name: str, startup: StartupMessage) -> asyncio.Task[_Login | None] | None:
        """(During the client's SCRAM) a login to `name`'s compute if it runs (and is
        neither starting nor stopping), else None; `_connect` uses it once the client
        has authenticated, and nothing reaches the client before."""
        socket_path = self.computes.running_socket(name) if self.pre_login else None
        if socket_path is None:
            return None
        return asyncio.create_task(self._login(socket_path, startup))

    async def _login(self, socket_path: str, startup: StartupMessage) -> _Login | None:
        """Log in to the compute at `socket_path` with the client's startup parameters and
        read its answer up to ReadyForQuery (kept); None if it refused or went away."""
        try:
            c_reader, c_writer = await asyncio.open_unix_connection(
                socket_path, limit=COMPUTE_STARTUP_MESSAGE_MAX_BYTES)
        except OSError:
            return None
        login = _Login(socket_path, c_reader, c_writer, b"")
        try:
            c_writer.write(protocol.startup_for_compute(startup).encode())
            answer = bytearray()
            while True:
                header = await c_reader.readexactly(5)
                length = int(_I32.unpack_from(header, 1)[0])
                if length < 4 or length > COMPUTE_STARTUP_MESSAGE_MAX_BYTES:
                    break
                body = await c_reader.readexactly(length - 4)
                tag = header[:1]
                if tag == b"E" or (tag == b"R" and body[:4] != _I32.pack(0)):
                    break
                answer += header + body
                if tag == b"Z":
                    login.answer = bytes(answer)
                    return login
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            _close_login(login)
            raise
        _close_login(login)
        return None

    async def _forward_compute_startup(
            self, c_reader: _In, writer: _Out,
            socket_path: str, *, hold_ready: bool) -> tuple[tuple[int, int], bytes] | None:
        """Forward the compute's messages up to ReadyForQuery (kept back and returned with
        `hold_ready`, else b""); returns the proxy's cancel key for this connection and
        that, or None if the compute refused (its error forwarded)."""
        key: tuple[int, int] | None = None
        while True:
            header = await c_reader.readexactly(5)
            tag = header[:1]
            length = int(_I32.unpack_from(header, 1)[0])
            if length < 4 or length > COMPUTE_STARTUP_MESSAGE_MAX_BYTES:
                raise ProtocolError(f"compute sent message {tag!r} of length {length}")
            body = await c_reader.readexactly(length - 4)
            if tag == b"R" and body[:4] != _I32.pack(0):
                raise ClientError(protocol.INVALID_AUTHORIZATION,
                                  "the compute asked the proxy for a password; its pg_hba.conf "
                                  "must trust its unix socket (restart the endpoint)")
            if tag == b"K" and len(body) == 8:
                pid, compute_key = struct.unpack("!ii", body)
                key = self._new_cancel_key(_CancelTarget(socket_path, pid, compute_key))
                writer.write(b"K" + _I32.pack(12) + struct.pack("!ii", *key))
                continue
            if tag == b"Z" and hold_ready:
                await writer.drain()
                return (key if key is not None else (0, 0)), header + body
            writer.write(header + body)
            if tag == b"E":
                await writer.drain()
                return None
            if tag == b"Z":
                await writer.drain()
                return (key if key is not None else (0, 0)), b""

    def _new_cancel_key(self, target: _CancelTarget) -> tuple[int, int]:
        while True:
            key = (secrets.randbits(31), secrets.randbits(31))
            if key not in self._cancel_keys:
                self._cancel_keys[key] = target
                return key

    async def _cancel(self, request: CancelRequest) -> None:
        target = self._cancel_keys.get((request.process_id, request.secret_key))
        if target is None:
            log.info("cancel request with an unknown key ignored")
            return
        try:
            _, c_writer = await asyncio.open_unix_connection(target.socket_path)
        except OSError as err:
            log.info("cancel request: compute unreachable: %s", err.strerror)
            return
        c_writer.write(CancelRequest(target.process_id, target.secret_key).encode())
        await c_writer.drain()
        c_writer.close()
        log.info("routed a cancel request to backend %d", target.process_id)


def _not_started(name: str, err: Exception) -> ClientError:
    return ClientError(protocol.CANNOT_CONNECT_NOW,
                       f"endpoint {name} could not be started: "
                       f"{str(err).splitlines()[0] if str(err) else 'timeout'}; "
                       "see `strata status` and the proxy's log")


def _open_sockmap(kernel_relay: bool) -> Sockmap | None:
    """The kernel forwarding of plain connections' compute-to-client bytes (config
    `[proxy] kernel_relay = true`, the default; STRATA_PROXY_SOCKMAP=1 or 0 in the
    proxy's environment overrides it, for the bench's A/B: docs/proxy.md "Kernel
    forwarding"), or None (one log line, also where BPF is not permitted): then threads
    relay them."""
    override = os.environ.get("STRATA_PROXY_SOCKMAP", "")
    if override in ("0", "1"):
        kernel_relay = override == "1"
    if not kernel_relay:
        log.info("plain connections are relayed by splice threads (kernel_relay = false%s)",
                 ", STRATA_PROXY_SOCKMAP=0" if override == "0" else "")
        return None
    try:
        sockmap = Sockmap.open()
    except SockmapUnavailable as err:
        log.info("sockmap forwarding unavailable (%s): plain connections are relayed by "
                 "splice threads only", err)
        return None
    log.info("plain connections: the compute's bytes are forwarded by the kernel (BPF "
             "sockmap), the client's by a splice thread")
    return sockmap


def _tls_relay() -> str:
    """How TLS connections are relayed: `loop` (the default since session 28: uvloop's
    TLS transport and the event loop's protocols), or `threads`
    (STRATA_PROXY_TLS_RELAY=threads: the proxy's own session, a thread per direction;
    the default before, kept for the A/B in `bench/run proxy`, docs/proxy.md "Relay")."""
    mode = os.environ.get("STRATA_PROXY_TLS_RELAY", "loop")
    if mode not in ("threads", "loop"):
        log.info("STRATA_PROXY_TLS_RELAY=%r is neither 'loop' nor 'threads': loop", mode)
        mode = "loop"
    log.info("TLS connections are relayed by %s", "a thread per direction"
             if mode == "threads" else "the event loop's protocols")
    return mode


# --- startup-phase reads --------------------------------------------------------------------
async def _read_startup(reader: _In) -> object:
    head = await reader.readexactly(4)
    length = int(_I32.unpack(head)[0])
    if length < 8 or length > MAX_STARTUP_PACKET_BYTES:
        raise ProtocolError(f"invalid startup packet length {length}")
    body = await reader.readexactly(length - 4)
    parser = MessageReader("frontend")
    parser.feed(head + body)
    packet = parser.next_frontend()
    assert packet is not None, length
    return packet


async def _read_password_message(reader: _In) -> bytes:
    """The body of the client's next message, which must be 'p' (password/SASL)."""
    header = await reader.readexactly(5)
    tag = header[:1]
    length = int(_I32.unpack_from(header, 1)[0])
    if tag != b"p":
        raise ProtocolError(f"expected a password message ('p'), got {tag!r}")
    if length < 4 or length > AUTH_MESSAGE_MAX_BYTES:
        raise ProtocolError(f"password message has invalid length {length}")
    return await reader.readexactly(length - 4)


async def _send_error(writer: _Out, code: str, message: str) -> None:
    if writer.is_closing():
        return
    try:
        writer.write(ErrorResponse(severity="FATAL", code=code, message=message).encode())
        async with asyncio.timeout(5):
            await writer.drain()
    except (ConnectionError, TimeoutError, ssl.SSLError, RuntimeError):
        pass
