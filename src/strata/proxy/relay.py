"""The proxy's relay: after authentication, bytes go both ways between a client and its
compute until either side closes.

Two ways:

- `relay_threads` (the proxy's for plain connections): both sockets leave the event
  loop; a thread per direction blocks in the kernel and wakes only for its own socket,
  the GIL released while it waits: `os.splice` through a pipe (the bytes never enter
  Python). Plain only: a TLS session stays with the event loop's transport (a mode
  that took the session over to the threads corrupted a record about 1 run in 10 and
  was removed, docs/proxy.md "Relay");
- `relay_protocols` (the proxy's for TLS): asyncio protocols write what one side
  receives to the other (no coroutine per message), with back-pressure (a full send
  buffer pauses reading from the other side).

docs/proxy.md ("Relay", "Throughput") has the figures that chose them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from typing import cast

PIPE_BYTES = 64 * 1024
"""What one splice moves at most (a pipe's default capacity on Linux)."""
THREAD_STACK_BYTES = 256 * 1024
"""A relay thread's stack: it runs one small loop, not 8 MB of it (the default)."""


# --- thread pair ----------------------------------------------------------------------------
class _Pair:
    """Two sockets relayed by two threads; the first direction to end shuts both sockets
    down (which wakes the other thread), the last one closes them and tells the loop."""

    def __init__(self, client: socket.socket, compute: socket.socket,
                 loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        self.client = client
        self.compute = compute
        self.loop = loop
        self.done = done
        self._lock = threading.Lock()
        self._running = 2

    def pump(self, src: socket.socket, dst: socket.socket, pending: bytes) -> None:
        try:
            if pending:
                dst.sendall(pending)
            _splice_loop(src.fileno(), dst.fileno())
        except OSError:
            pass  # a reset or the other direction's shutdown: the connection is over
        finally:
            self._end()

    def _end(self) -> None:
        for sock in (self.client, self.compute):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.client.close()
            self.compute.close()
            with contextlib.suppress(RuntimeError):  # the loop is closed: proxy stopping
                self.loop.call_soon_threadsafe(_set_done, self.done)


def _set_done(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _splice_loop(src: int, dst: int) -> None:
    """Move bytes from socket `src` to socket `dst` through a pipe until `src` ends."""
    read_end, write_end = os.pipe()
    try:
        while True:
            n = os.splice(src, write_end, PIPE_BYTES, flags=os.SPLICE_F_MOVE)
            if n == 0:
                return
            while n:
                n -= os.splice(read_end, dst, n, flags=os.SPLICE_F_MOVE)
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


async def relay_threads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        c_reader: asyncio.StreamReader,
                        c_writer: asyncio.StreamWriter) -> None:
    """Relay a plain (not TLS) client with a thread per direction until either side
    closes. The writers' buffers must be empty (see `wait_writes_flushed`); bytes the
    readers read ahead go first."""
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
    pending_up, pending_down = take_buffered(reader), take_buffered(c_reader)
    at_eof = reader.at_eof() or c_reader.at_eof()
    client = _detach(client_t)
    compute = _detach(compute_t)
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
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
