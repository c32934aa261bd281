"""strata.proxy.sockmap: the hand-assembled verdict program's encoding, and (where this
process may use BPF: root, kernel with sockmap) the kernel forwarding through
`relay.relay_threads(kernel=...)` over real sockets, TCP client side and unix socket
compute side as in the proxy: every byte both ways in order, one relay thread (the
client's bytes), the compute's last bytes before its close reach the client, and a
compute that sent more than its 'ready' line falls back to two threads."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from strata.common import eventloop
from strata.proxy import relay, sockmap


def _insns(code: bytes) -> list[tuple[int, int, int, int, int]]:
    """(code, dst, src, off, imm) per 8-byte instruction."""
    out = []
    for i in range(0, len(code), 8):
        op, regs, off, imm = struct.unpack_from("<BBhi", code, i)
        out.append((op, regs & 0xF, regs >> 4, off, imm))
    return out


def test_instruction_encoding() -> None:
    """struct bpf_insn bytes as the kernel reads them (linux/bpf.h), little-endian."""
    assert sockmap.exit_() == bytes.fromhex("9500000000000000")
    assert sockmap.call(72) == bytes.fromhex("8500000048000000")
    assert sockmap.mov64_reg(6, 1) == bytes.fromhex("bf16000000000000")  # dst 6, src 1
    assert sockmap.stx_dw(10, -8, 0) == bytes.fromhex("7b0af8ff00000000")
    assert sockmap.add64_imm(2, -8) == bytes.fromhex("07020000f8ffffff")
    assert sockmap.atomic_add_dw(7, 8, 1) == bytes.fromhex("db17080000000000")
    # ld_imm64 with BPF_PSEUDO_MAP_FD (src 1): two instructions, the second all zero.
    assert sockmap.ld_map_fd(2, 5) == bytes.fromhex("1812000005000000" "0000000000000000")


def test_verdict_program_shape() -> None:
    """The program looks the receiving socket's cookie up, counts skb->len into the
    route's second u64, redirects to the route's peer, and its only branch (no route)
    lands on `return SK_DROP`."""
    insns = _insns(sockmap.verdict_program(targets_fd=11, routes_fd=12))
    assert len(insns) == 21
    calls = [imm for op, _, _, _, imm in insns if op == 0x85]
    assert calls == [sockmap.BPF_FUNC_GET_SOCKET_COOKIE, sockmap.BPF_FUNC_MAP_LOOKUP_ELEM,
                     sockmap.BPF_FUNC_SK_REDIRECT_HASH]
    maps = [(dst, imm) for op, dst, src, _, imm in insns if op == 0x18 and src == 1]
    assert maps == [(1, 12), (2, 11)]  # lookup in routes, redirect through targets
    (branch,) = [i for i, ins in enumerate(insns) if ins[0] == 0x15]
    target = branch + 1 + insns[branch][3]
    assert insns[target] == (0xB7, 0, 0, 0, 0) and insns[target + 1][0] == 0x95
    assert insns[target - 1][0] == 0x95  # the redirect's exit comes before it
    assert ((0xDB, 7, 1, 8, 0)) in insns  # lock *(u64 *)(route + 8) += skb->len


@pytest.fixture(scope="module")
def kernel() -> Iterator[sockmap.Sockmap]:
    try:
        sm = sockmap.Sockmap.open()
    except sockmap.SockmapUnavailable as err:
        pytest.skip(f"no BPF sockmap here: {err}")
    yield sm
    sm.close()


async def _proxy_once(listener: socket.socket, compute_path: str,
                      kernel: sockmap.Sockmap, relay_threads: list[int],
                      sampled: threading.Event) -> None:
    """Accept one client, forward its first line to the compute, hold the compute's
    first line back as the proxy holds ReadyForQuery, and relay through the sockmap."""
    served: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            c_reader, c_writer = await asyncio.open_unix_connection(compute_path)
            c_writer.write(await reader.readline())
            ready = await c_reader.readline()
            await relay.wait_writes_flushed(writer, c_writer)
            task = asyncio.ensure_future(relay.relay_threads(
                reader, writer, c_reader, c_writer, ready=ready, kernel=kernel))
            await asyncio.sleep(0.2)
            relay_threads.append(sum(t.name == "relay" for t in threading.enumerate()))
            sampled.set()  # the client may close now
            await task
            served.set_result(None)
        except BaseException as err:
            served.set_exception(err)

    server = await asyncio.start_server(serve, sock=listener)
    async with server:
        await served


_Compute = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _run(compute_serve: _Compute, client: Callable[[int], bytes], kernel: sockmap.Sockmap,
         tmp_path: Path, sampled: threading.Event) -> tuple[bytes, list[int]]:
    """Serve one client; `sampled` is set once the proxy has counted its relay threads
    (the clients keep their connection open, and the compute quiet, until then)."""
    compute_path = str(tmp_path / "compute.sock")
    relay_threads: list[int] = []

    async def main() -> bytes:
        compute = await asyncio.start_unix_server(compute_serve, compute_path)
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        async with compute:
            proxy = asyncio.ensure_future(_proxy_once(listener, compute_path, kernel,
                                                      relay_threads, sampled))
            result = await asyncio.to_thread(client, listener.getsockname()[1])
            await asyncio.wait_for(proxy, 60)
        listener.close()
        return result

    return eventloop.run(asyncio.wait_for(main(), 120)), relay_threads


def test_sockmap_relays_both_ways(kernel: sockmap.Sockmap, tmp_path: Path) -> None:
    """20 MB each way arrive whole and in order with one relay thread running; the
    client's close closes the compute's side."""
    payload = os.urandom(20 * 1024 * 1024)
    digests: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ready\n")
        digest = hashlib.sha256()
        while chunk := await reader.read(65536):
            digest.update(chunk)
            writer.write(chunk)
            await writer.drain()
        digests.append(digest.digest())
        writer.close()

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"hello\n")
            assert s.recv(6) == b"ready\n"  # as a client waits for ReadyForQuery
            sender = threading.Thread(target=s.sendall, args=(payload,))
            sender.start()
            received = bytearray()
            while len(received) < len(payload):
                chunk = s.recv(1 << 20)
                assert chunk, len(received)
                received += chunk
            sender.join(60)
            assert sampled.wait(60)
            return bytes(received)

    sampled = threading.Event()
    got, relay_threads = _run(echo, client, kernel, tmp_path, sampled)
    assert got == payload
    assert digests == [hashlib.sha256(payload).digest()]
    assert relay_threads == [1]  # the client's bytes; the compute's go in the kernel


def test_sockmap_compute_close_delivers_last_bytes(kernel: sockmap.Sockmap,
                                                   tmp_path: Path) -> None:
    """The compute writing 8 MB and closing at once (a FATAL, then exit): the client
    reads all of it, then the end."""
    tail = os.urandom(8 * 1024 * 1024)

    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ready\n")
        await reader.readexactly(3)
        writer.write(tail)
        await writer.drain()
        writer.close()

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(b"hello\n")
            assert s.recv(6) == b"ready\n"
            assert sampled.wait(60)  # the compute closes only after "go!"
            s.sendall(b"go!")
            got = bytearray()
            while chunk := s.recv(1 << 20):
                got += chunk
            return bytes(got)

    sampled = threading.Event()
    got, relay_threads = _run(closing, client, kernel, tmp_path, sampled)
    assert got == tail
    assert relay_threads == [1]


def _echoing_compute(first: bytes) -> _Compute:
    """A compute that reads the client's first line, answers `first`, then echoes
    everything until the client ends."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(first)
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.close()
    return serve


def _stepping_client(sampled: threading.Event,
                     *steps: tuple[bytes, int]) -> Callable[[int], bytes]:
    """A client that, for each step, sends its bytes and reads until it has received
    that many bytes in all; it stays connected until the proxy has counted its relay
    threads (`sampled`) and returns what it received."""
    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            got = bytearray()
            for send, total in steps:
                s.sendall(send)
                while len(got) < total:
                    chunk = s.recv(100)
                    assert chunk, bytes(got)
                    got += chunk
            assert sampled.wait(60)  # open while the proxy counts its relay threads
            return bytes(got)
    return client


def test_sockmap_early_client(kernel: sockmap.Sockmap, tmp_path: Path) -> None:
    """A client that sends before its 'ready' line: its bytes take the splice thread as
    always, the answer the kernel."""
    sampled = threading.Event()
    got, relay_threads = _run(_echoing_compute(b"ready\n"),
                              _stepping_client(sampled, (b"hello\nearly", 11)),
                              kernel, tmp_path, sampled)
    assert got == b"ready\nearly"
    assert relay_threads == [1]


def test_sockmap_busy_compute_falls_back_to_threads(kernel: sockmap.Sockmap,
                                                    tmp_path: Path) -> None:
    """A compute that sent more than its 'ready' line before the switch (bytes the
    verdict would never see) is relayed by two threads, in order."""
    sampled = threading.Event()
    got, relay_threads = _run(_echoing_compute(b"ready\nnotice\n"),
                              _stepping_client(sampled, (b"hello\n", 13), (b"echo", 17)),
                              kernel, tmp_path, sampled)
    assert got == b"ready\nnotice\necho"
    assert relay_threads == [2]
