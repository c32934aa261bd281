"""The proxy's relay: after authentication, bytes go both ways between a client and its
compute until either side closes.

The ways:

- `relay_threads` (the proxy's for plain connections): both sockets leave the event
  loop. A thread per direction blocks in the kernel and wakes only for its own socket,
  the GIL released while it waits: `os.splice` through a pipe (the bytes never enter
  Python). Where the proxy may use BPF (`strata.proxy.sockmap`) and the compute is
  quiet at the switch (it waits for a query: the proxy holds ReadyForQuery back until
  the sockets are in the sockmap), the kernel forwards the compute's bytes instead of
  the compute-to-client thread, and one thread of the process (`_Watcher`, epoll for
  EPOLLRDHUP) wakes when a compute closes.
  Plain only: TLS connections relayed by threads (STRATA_PROXY_TLS_RELAY=threads) run
  on the proxy's own session (`strata.proxy.tlsrelay`), never on a session of uvloop's
  TLS transport (a mode that took that over to the threads corrupted a record about 1
  run in 10 and was removed, docs/proxy.md "Relay");
- `relay_protocols` (the proxy's for TLS, the default since session 28): asyncio
  protocols write what one side receives to the other (no coroutine per message),
  with back-pressure (a full send buffer pauses reading from the other side).

docs/proxy.md ("Relay", "Throughput") has the figures that chose them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import cast

from strata.proxy.sockmap import Link, Sockmap

log = logging.getLogger(__name__)

PIPE_BYTES = 64 * 1024
"""What one splice moves at most (a pipe's default capacity on Linux)."""
THREAD_STACK_BYTES = 256 * 1024
"""A relay thread's stack: it runs one small loop, not 8 MB of it (the default)."""


# --- thread pair ----------------------------------------------------------------------------
class _Pair:
    """Two sockets relayed by two threads; the first direction to end shuts both sockets
    down (which wakes the other thread), the last one closes them and tells the loop.
    Except for a compute gone for the client's bytes (a send to it fails): that ends the
    client-to-compute thread alone, so that the other one still delivers what the
    compute sent before it closed (a terminated backend's FATAL), then ends both."""

    def __init__(self, client: socket.socket, compute: socket.socket,
                 loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        self.client = client
        self.compute = compute
        self.loop = loop
        self.done = done
        self._lock = threading.Lock()
        self._running = 2

    def pump(self, src: socket.socket, dst: socket.socket, pending: bytes) -> None:
        shut = True
        try:
            if pending:
                try:
                    dst.sendall(pending)
                except OSError as err:
                    raise _SendFailed from err
            _splice_loop(src.fileno(), dst.fileno())
        except _SendFailed:
            shut = dst is not self.compute
        except OSError:
            pass  # a reset or the other direction's shutdown: the connection is over
        finally:
            self._end(shut=shut)

    def _end(self, *, shut: bool = True) -> None:
        if shut:
            _shutdown(self.client, self.compute)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.client.close()
            self.compute.close()
            with contextlib.suppress(RuntimeError):  # the loop is closed: proxy stopping
                self.loop.call_soon_threadsafe(_set_done, self.done)


def _shutdown(*socks: socket.socket) -> None:
    """Shut both directions of each socket down (waking a thread blocked on it), ignoring
    one already reset or closed by its peer; the descriptors stay open."""
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class _SendFailed(OSError):
    """The destination socket refused bytes (its peer is gone or it was shut down)."""


def _splice_loop(src: int, dst: int) -> None:
    """Move bytes from socket `src` to socket `dst` through a pipe until `src` ends
    (_SendFailed when `dst` refuses them)."""
    read_end, write_end = os.pipe()
    try:
        while True:
            n = os.splice(src, write_end, PIPE_BYTES, flags=os.SPLICE_F_MOVE)
            if n == 0:
                return
            while n:
                try:
                    n -= os.splice(read_end, dst, n, flags=os.SPLICE_F_MOVE)
                except OSError as err:
                    raise _SendFailed(err.errno, err.strerror) from err
    finally:
        os.close(read_end)
        os.close(write_end)


def _detach(transport: asyncio.Transport) -> socket.socket:
    """A blocking socket of our own on `transport`'s connection; the transport is closed
    (its own descriptor only: the connection stays open through ours)."""
    sock = transport.get_extra_info("socket")
    assert sock is not None, transport
    own = socket.socket(fileno=os.dup(sock.fileno()))
    own.setblocking(True)
    transport.abort()
    return own


def _queued(sock: socket.socket) -> bool:
    """Whether bytes wait in `sock`'s receive queue (FIONREAD: for TCP, also the bytes
    that came before the socket joined the sockmap and that no verdict has seen)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD,
                                                  b"\0\0\0\0"))[0]) > 0
    except OSError:
        return True


async def relay_threads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter, *,
                        ready: bytes = b"", kernel: Sockmap | None = None) -> None:
    """Relay a plain (not TLS) client until either side closes: in the kernel through
    `kernel`'s sockmap when given (and the connection is quiet at the switch), else with
    a thread per direction. The writers' buffers must be empty (see
    `wait_writes_flushed`); `ready` (the compute's ReadyForQuery, held back so that the
    client sends nothing before the switch) and bytes the readers read ahead go first."""
    assert writer.get_extra_info("ssl_object") is None, "relay_threads is for plain clients"
    # uvloop's transports have asyncio.Transport's methods without subclassing it.
    client_t = cast(asyncio.Transport, writer.transport)
    compute_t = cast(asyncio.Transport, c_writer.transport)
    for transport in (client_t, compute_t):
        transport.pause_reading()
    # No await from here on: nothing can arrive in the readers' buffers meanwhile.
    for transport in (client_t, compute_t):
        size = transport.get_write_buffer_size()
        assert size == 0, (transport, size)
    pending_up, pending_down = take_buffered(reader), ready + take_buffered(c_reader)
    at_eof = reader.at_eof() or c_reader.at_eof()
    client = _detach(client_t)
    compute = _detach(compute_t)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    if kernel is not None and not at_eof and pending_down == ready and not _queued(compute):
        # The compute is quiet: it waits for a query, which the client sends only once it
        # has ReadyForQuery.
        try:
            link = kernel.add(client, compute)
        except OSError as err:
            log.info("sockmap refused a connection (%s): relayed by threads", err.strerror)
        else:
            if not _queued(compute):
                _Kernel(kernel, link, client, compute, loop, done).start(ready, pending_up)
                await asyncio.shield(done)
                return
            # The compute sent something between the check and the switch (a notice):
            # out of the maps, the threads take it.
            kernel.remove(link)
            log.info("the compute sent bytes while its connection was switched to the "
                     "sockmap: relayed by threads")
    pair = _Pair(client, compute, loop, done)
    if at_eof:
        pair._running = 1  # noqa: SLF001
        pair._end()  # noqa: SLF001
    else:
        old_stack = threading.stack_size(THREAD_STACK_BYTES)
        try:
            for src, dst, pending in ((client, compute, pending_up),
                                      (compute, client, pending_down)):
                threading.Thread(target=pair.pump, args=(src, dst, pending), daemon=True,
                                 name="relay").start()
        finally:
            threading.stack_size(old_stack)
    await asyncio.shield(done)


def take_over(reader: asyncio.StreamReader,
              writer: asyncio.StreamWriter) -> tuple[socket.socket, bytes]:
    """A blocking socket of our own on the connection of `writer` (whose buffer must be
    empty, see `wait_writes_flushed`), and the bytes `reader` read ahead."""
    transport = cast(asyncio.Transport, writer.transport)
    transport.pause_reading()
    assert transport.get_write_buffer_size() == 0, transport
    pending = take_buffered(reader)
    return _detach(transport), pending


# --- kernel (BPF sockmap) -------------------------------------------------------------------
_TCP_INFO_BYTES_ACKED = 120
"""Offset of `tcpi_bytes_acked` (u64) in `struct tcp_info` (linux/tcp.h)."""
DRAIN_TIMEOUT_S = 5.0
"""Bound on waiting, after one side closed, for the bytes on their way to the other."""


def _tcp_handed(sock: socket.socket) -> int:
    """Bytes the TCP socket was given to send so far, less a constant: acknowledged +
    still in its send queue."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    acked = int.from_bytes(info[_TCP_INFO_BYTES_ACKED:_TCP_INFO_BYTES_ACKED + 8], "little")
    queued = int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                                b"\0\0\0\0"))[0])
    return acked + queued


class _Watcher:
    """One thread of the process waiting (epoll, EPOLLRDHUP only) for the compute sockets
    in the sockmap to close: it wakes for a closing connection, never for a message."""

    _instance: _Watcher | None = None
    _instance_lock = threading.Lock()

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[], None]] = {}
        self.lock = threading.Lock()
        old_stack = threading.stack_size(THREAD_STACK_BYTES)
        try:
            threading.Thread(target=self._run, daemon=True, name="sockmap-watch").start()
        finally:
            threading.stack_size(old_stack)

    @classmethod
    def get(cls) -> _Watcher:
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = _Watcher()
            return cls._instance

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        with self.lock:
            self.handlers[fd] = handler
        self.epoll.register(fd, select.EPOLLRDHUP | select.EPOLLONESHOT)

    def unwatch(self, fd: int) -> None:
        with self.lock:
            self.handlers.pop(fd, None)
        with contextlib.suppress(OSError):
            self.epoll.unregister(fd)

    def _run(self) -> None:
        while True:
            for fd, _ in self.epoll.poll():
                with self.lock:
                    handler = self.handlers.pop(fd, None)
                if handler is not None:
                    handler()


class _Kernel:
    """A connection whose compute-to-client bytes the sockmap forwards; the client's go
    through one splice thread. The proxy waits for either side to close (the thread's
    end, or the watcher for the compute), lets the bytes on their way arrive, and closes
    both."""

    def __init__(self, kernel: Sockmap, link: Link, client: socket.socket,
                 compute: socket.socket, loop: asyncio.AbstractEventLoop,
                 done: asyncio.Future[None]) -> None:
        self.kernel = kernel
        self.link = link
        self.client = client
        self.compute = compute
        self.loop = loop
        self.done = done
        self._ended = False
        self._base = 0
        self._ready = 0
        self._pump_done: asyncio.Future[None] = loop.create_future()

    def start(self, ready: bytes, pending_up: bytes) -> None:
        self._base = _tcp_handed(self.client) if self.client.family != socket.AF_UNIX else 0
        self._ready = len(ready)
        _Watcher.get().watch(self.compute.fileno(), lambda: self._closed(from_client=False))
        old_stack = threading.stack_size(THREAD_STACK_BYTES)
        try:
            threading.Thread(target=self._pump, args=(pending_up,), daemon=True,
                             name="relay").start()
        finally:
            threading.stack_size(old_stack)
        try:
            self.client.sendall(ready)
        except OSError:
            self._closed(from_client=True)

    def _pump(self, pending: bytes) -> None:
        try:
            if pending:
                self.compute.sendall(pending)
            _splice_loop(self.client.fileno(), self.compute.fileno())
        except OSError:
            pass  # a reset, or the shutdown after the compute closed
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: proxy stopping
                self.loop.call_soon_threadsafe(_set_done, self._pump_done)
            self._closed(from_client=True)

    def _closed(self, *, from_client: bool) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._end, from_client)

    def _end(self, from_client: bool) -> None:
        if self._ended:
            return
        self._ended = True
        _Watcher.get().unwatch(self.compute.fileno())
        self.loop.create_task(self._finish(from_client))

    async def _finish(self, from_client: bool) -> None:
        try:
            # The client's bytes went by the splice thread, which sent them all before it
            # saw the client's end; the compute's may still be on their way.
            if not from_client and self.client.family != socket.AF_UNIX:
                await self._drain_to_client()
        finally:
            _shutdown(self.client, self.compute)
            await self._pump_done  # the splice thread is off the sockets
            self.client.close()
            self.compute.close()
            self.kernel.remove(self.link)
            _set_done(self.done)

    async def _drain_to_client(self) -> None:
        """Until the client's socket has been handed what the compute sent before it
        closed (the kernel's worker moves the bytes a little after they arrive)."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                handed = _tcp_handed(self.client) - self._base
            except OSError:
                return  # the client is gone too
            if handed >= self._ready + self.kernel.forwarded(self.link):
                return
            await asyncio.sleep(0.001)
        log.info("sockmap: the compute's last bytes did not reach the client in %.0f s",
                 DRAIN_TIMEOUT_S)


async def wait_writes_flushed(*writers: asyncio.StreamWriter,
                              raw: asyncio.BaseTransport | None = None) -> None:
    """Until the writers' transports (and `raw`, a TLS transport's TCP one) have handed
    everything to the kernel (bounded by the caller's timeout): `drain()` only waits for
    the low-water mark."""
    for writer in writers:
        await writer.drain()
    transports = [w.transport for w in writers] + ([raw] if raw is not None else [])
    for transport in transports:
        while cast(asyncio.WriteTransport, transport).get_write_buffer_size():
            await asyncio.sleep(0.001)


# --- asyncio protocols ----------------------------------------------------------------------
class _Forward(asyncio.Protocol):
    """Receives on one transport and writes to its peer; back-pressure both ways."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.done = done
        self.own: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None

    def data_received(self, data: bytes) -> None:
        assert self.peer is not None
        self.peer.write(data)

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        # Our own transport's send buffer is full: stop reading from the peer.
        assert self.peer is not None
        self.peer.pause_reading()

    def resume_writing(self) -> None:
        assert self.peer is not None
        self.peer.resume_reading()

    def _finish(self) -> None:
        for transport in (self.own, self.peer):
            if transport is not None and not transport.is_closing():
                transport.close()
        if not self.done.done():
            self.done.set_result(None)


def take_buffered(reader: asyncio.StreamReader) -> bytes:
    """What the StreamReader read ahead and no one consumed (its private buffer: the
    streams API has no way to hand a transport over)."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    data = bytes(buffer)
    buffer.clear()
    return data


async def relay_protocols(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          c_reader: asyncio.StreamReader,
                          c_writer: asyncio.StreamWriter) -> None:
    """Hand both transports over to `_Forward` protocols until either side closes.

    Bytes a StreamReader already buffered (it reads ahead) are forwarded first."""
    # uvloop's transports have asyncio.Transport's methods without subclassing it.
    client = cast(asyncio.Transport, writer.transport)
    compute = cast(asyncio.Transport, c_writer.transport)
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    up, down = _Forward(done), _Forward(done)
    up.own, up.peer = client, compute
    down.own, down.peer = compute, client
    pending_up = take_buffered(reader)
    pending_down = take_buffered(c_reader)
    client.set_protocol(up)
    compute.set_protocol(down)
    if pending_up:
        compute.write(pending_up)
    if pending_down:
        client.write(pending_down)
    if reader.at_eof() or c_reader.at_eof():
        up._finish()  # noqa: SLF001
    client.resume_reading()
    compute.resume_reading()
    await done
