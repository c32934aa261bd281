"""A TLS connection the proxy owns from its handshake on: an `ssl.SSLObject` over memory
BIOs on a socket of the proxy's own (not uvloop's TLS transport).

The event loop drives it for the handshake, the startup and authentication (`handshake`,
then `readexactly` / `write` / `drain`, the subset of asyncio's streams the server
uses); `relay` then hands it to two threads, as the plain relay's, one per direction:

- client to compute: decrypt what is buffered, send it to the compute, block in the
  client socket's `recv` for more;
- compute to client: block in the compute socket's `recv`, encrypt, send.

No other code touches the session once the threads have it. OpenSSL's session is not
safe for two threads at once, so every call on the `SSLObject` and its BIOs holds
`_lock`, and only those calls: no thread waits in a socket call with it. The records
leave in the order the session made them: whoever takes bytes out of the outgoing BIO
holds `_send_lock` until it has sent them (`_flush`). The client-to-compute thread
makes records only for TLS's own messages (a key update's answer); it never blocks
for the send lock (the holder looks for more before it lets go), so it keeps reading
while the other thread waits for a slow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from typing import cast

from strata.proxy import relay

READ_BYTES = 64 * 1024
THREAD_STACK_BYTES = 512 * 1024
"""A TLS relay thread's stack (OpenSSL's calls run on it: more than a splice thread's)."""


class TlsStream:
    """One client's TLS session (server side) over `sock`, a socket of the proxy's."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self._plain = bytearray()  # decrypted, not yet read by the startup phase
        self._unsent = bytearray()  # records made on the loop, not yet sent
        self._closed = False
        self._relayed = False
        self._look_first = True  # (relay) bytes may wait in the session: read it first
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        # (relay, client to compute) buffers reused for every message: no 64 kB object
        # allocated (and shrunk) per socket read and per session read.
        self._received = memoryview(bytearray(READ_BYTES))
        self._decrypted = memoryview(bytearray(READ_BYTES))

    @classmethod
    def take_over(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  context: ssl.SSLContext) -> tuple[TlsStream, bytes]:
        """A session on the connection of `writer` (its buffer flushed, see
        `relay.wait_writes_flushed`), whose transport is closed; and the bytes `reader`
        read ahead (the start of the client's hello, for `handshake`)."""
        transport = cast(asyncio.Transport, writer.transport)
        transport.pause_reading()
        received = relay.take_buffered(reader)
        return cls(relay._detach(transport), context), received  # noqa: SLF001

    # --- on the event loop: handshake, startup, authentication ----------------------------
    async def handshake(self, received: bytes = b"") -> None:
        """The server side of the TLS handshake (`received`: bytes of the client's
        already read from the socket)."""
        self.sock.setblocking(False)
        self.incoming.write(received)
        while True:
            try:
                self.ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._take_records()
                await self.drain()
                await self._receive()
        self._take_records()
        await self.drain()

    async def _receive(self) -> None:
        """Feed the session what the client sends next (its end as an EOF)."""
        data = await asyncio.get_running_loop().sock_recv(self.sock, READ_BYTES)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def _take_records(self) -> None:
        self._unsent += self.outgoing.read()

    async def readexactly(self, n: int) -> bytes:
        """The next `n` bytes the client sent (asyncio.IncompleteReadError at its end)."""
        while len(self._plain) < n:
            try:
                data = self.ssl_object.read(READ_BYTES)
            except ssl.SSLWantReadError:
                self._take_records()
                await self.drain()
                await self._receive()
                continue
            except ssl.SSLEOFError:
                data = b""
            if not data:  # close_notify, or the end of the TCP stream
                raise asyncio.IncompleteReadError(bytes(self._plain), n)
            self._plain += data
        out = bytes(self._plain[:n])
        del self._plain[:n]
        return out

    def write(self, data: bytes) -> None:
        """Encrypt `data` and send what the socket takes now; `drain` sends the rest."""
        if self._closed:
            return
        self.ssl_object.write(data)
        self._take_records()
        if self._unsent:
            try:
                sent = self.sock.send(self._unsent)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._closed = True
                raise ConnectionResetError("the client went away") from None
            del self._unsent[:sent]

    async def drain(self) -> None:
        if self._unsent and not self._closed:
            data = bytes(self._unsent)
            self._unsent.clear()
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def is_closing(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection (not once `relay` has it: the relay closes it)."""
        if not self._closed and not self._relayed:
            self._closed = True
            # A close_notify first (libpq takes a bare end for an error, e.g. after a
            # cancel request); what the socket takes now, as asyncio's transports do.
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
            self._take_records()
            with contextlib.suppress(OSError):
                self.sock.send(self._unsent)
            self.sock.close()

    # --- in two threads: the relay ------------------------------------------------------------
    async def relay(self, compute: socket.socket, pending_down: bytes = b"") -> None:
        """Relay until either side closes: the client's bytes decrypted to `compute` (a
        blocking socket of the proxy's), the compute's encrypted to the client
        (`pending_down` first); then both sockets are closed."""
        await self.drain()
        self._relayed = True
        self.sock.setblocking(True)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        pair = _TlsPair(self, compute, loop, done)
        pending_up = bytes(self._plain)
        self._plain.clear()
        old_stack = threading.stack_size(THREAD_STACK_BYTES)
        try:
            threading.Thread(target=pair.up, args=(pending_up,), daemon=True,
                             name="tls-relay").start()
            threading.Thread(target=pair.down, args=(pending_down,), daemon=True,
                             name="tls-relay").start()
        finally:
            threading.stack_size(old_stack)
        await asyncio.shield(done)

    def _flush(self, *, wait: bool) -> None:
        """Send the records the session made, in order. Without `wait`, when another
        thread is sending, leave them to it: it looks again after it lets go."""
        while self._send_lock.acquire(blocking=wait):
            try:
                while True:
                    with self._lock:
                        data = self.outgoing.read()
                    if not data:
                        break
                    self.sock.sendall(data)
            finally:
                self._send_lock.release()
            with self._lock:
                if not self.outgoing.pending:
                    return

    def send_plain(self, data: bytes | memoryview) -> None:
        """(A relay thread) encrypt `data` and send it to the client."""
        with self._send_lock:
            with self._lock:
                self.ssl_object.write(data)
                records = self.outgoing.read()
            self.sock.sendall(records)
        with self._lock:
            left = self.outgoing.pending  # made by the other thread meanwhile (rare)
        if left:
            self._flush(wait=True)

    def receive_plain(self) -> memoryview:
        """(A relay thread) the client's next decrypted bytes (empty at its end), valid
        until the next call (a view of a buffer reused for every message).

        One pass over the session per message: what arrived goes in and everything it
        holds (up to READ_BYTES) comes out under one hold of the lock; the session is
        read again only while bytes wait in it (no SSLWantReadError raised per
        message)."""
        received = -1  # nothing read from the socket yet in this call
        out = self._decrypted
        while True:
            got = 0
            ended = False
            with self._lock:
                if received > 0:
                    self.incoming.write(self._received[:received])
                elif received == 0:
                    self.incoming.write_eof()
                if received >= 0 or self._look_first:
                    try:
                        while got < READ_BYTES:
                            # With a buffer, read() returns a count (typeshed: bytes).
                            n = cast(int, self.ssl_object.read(READ_BYTES - got, out[got:]))
                            if not n:
                                ended = True  # close_notify
                                break
                            got += n
                            if not self.incoming.pending and not self.ssl_object.pending():
                                break
                    except ssl.SSLWantReadError:
                        pass
                    except ssl.SSLEOFError:
                        ended = True
                made = self.outgoing.pending
            # Read the session first next time when it was left holding bytes (a full
            # buffer) or ended.
            self._look_first = ended or got == READ_BYTES
            if made:
                self._flush(wait=False)
            if got or ended:
                return out[:got]
            received = self.sock.recv_into(self._received)

    def close_notify(self) -> None:
        """(A relay thread, the compute has ended) tell the client, as PostgreSQL would."""
        with self._lock:
            with contextlib.suppress(ssl.SSLError):
                self.ssl_object.unwrap()
        self._flush(wait=True)


class _TlsPair:
    """The two threads of one TLS connection. The client's end (or a bad record) shuts
    both sockets down (which wakes the other thread); so does the compute's end, once
    its last bytes (a FATAL) and a close_notify went to the client. A compute that
    stops reading (gone: the send fails) ends the client-to-compute thread alone: the
    other one still delivers what the compute sent before it closed. The last thread
    closes both sockets."""

    def __init__(self, stream: TlsStream, compute: socket.socket,
                 loop: asyncio.AbstractEventLoop, done: asyncio.Future[None]) -> None:
        self.stream = stream
        self.compute = compute
        self.loop = loop
        self.done = done
        self._lock = threading.Lock()
        self._running = 2

    def up(self, pending: bytes) -> None:
        shut = True
        try:
            data: bytes | memoryview = pending
            while True:
                if data:
                    try:
                        self.compute.sendall(data)
                    except OSError:
                        shut = False  # the compute is gone: `down` sees its end
                        return
                data = self.stream.receive_plain()
                if not data:
                    return
        except (OSError, ssl.SSLError):
            pass  # a reset, a bad record, or the other direction's shutdown
        finally:
            self._end(shut=shut)

    def down(self, pending: bytes) -> None:
        buffer = memoryview(bytearray(READ_BYTES))  # reused: no 64 kB object per read
        try:
            if pending:
                self.stream.send_plain(pending)
            while n := self.compute.recv_into(buffer):
                self.stream.send_plain(buffer[:n])
            self.stream.close_notify()
        except (OSError, ssl.SSLError):
            pass
        finally:
            self._end(shut=True)

    def _end(self, *, shut: bool) -> None:
        if shut:
            relay._shutdown(self.stream.sock, self.compute)  # noqa: SLF001
        with self._lock:
            self._running -= 1
            last = self._running == 0
        if last:
            self.stream.sock.close()
            self.compute.close()
            self.stream._closed = True  # noqa: SLF001
            with contextlib.suppress(RuntimeError):  # the loop is closed: proxy stopping
                self.loop.call_soon_threadsafe(relay._set_done, self.done)  # noqa: SLF001
