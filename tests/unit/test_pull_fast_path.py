"""Pull mode's synchronous fast path: `StepLock` (a FIFO asyncio lock with `try_acquire`
and direct hand-off) and `decode_batch` (a chunk's CopyData payloads as one batch, decoded
without `wire.decode_replication`'s objects for XLogData and keepalives, with the same
checks and results as `read_batch`). The path itself (a safekeeper applying batches in the
replication connection's data callback) runs against a real PostgreSQL in
tests/integration/test_safekeeper_pull.py and test_cli_pull.py."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strata.common.errors import ProtocolError
from strata.common.lsn import Lsn
from strata.common.steplock import StepLock
from strata.pg import wire
from strata.pg.replication import decode_batch


def test_try_acquire_only_when_free_and_nobody_waits() -> None:
    async def main() -> None:
        lock = StepLock()
        assert lock.try_acquire()
        assert not lock.try_acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            async with lock:
                order.append(name)

        a = asyncio.create_task(waiter("a"))
        b = asyncio.create_task(waiter("b"))
        await asyncio.sleep(0)  # both wait now
        lock.release()  # handed to a, which has not run yet
        assert lock.locked()
        assert not lock.try_acquire(), "try_acquire jumped ahead of a woken waiter"
        await asyncio.gather(a, b)
        assert order == ["a", "b"]
        assert not lock.locked()
        assert lock.try_acquire()
        lock.release()

    asyncio.run(main())


def test_a_cancelled_waiter_passes_the_lock_on() -> None:
    async def main() -> None:
        lock = StepLock()
        assert lock.try_acquire()
        got: list[str] = []

        async def waiter(name: str) -> None:
            async with lock:
                got.append(name)

        a = asyncio.create_task(waiter("a"))
        b = asyncio.create_task(waiter("b"))
        await asyncio.sleep(0)
        lock.release()  # a owns it now...
        a.cancel()  # ...but is cancelled before it runs: b must get it
        await asyncio.gather(a, b, return_exceptions=True)
        assert got == ["b"]
        assert not lock.locked()

        # Cancelled while waiting (never handed the lock): it leaves the queue.
        assert lock.try_acquire()
        c = asyncio.create_task(waiter("c"))
        await asyncio.sleep(0)
        c.cancel()
        await asyncio.gather(c, return_exceptions=True)
        lock.release()
        assert not lock.locked() and lock.try_acquire()

    asyncio.run(main())


def _xlogdata(start: int, data: bytes, server_end: int | None = None) -> bytes:
    return wire.XLogData(start, start + len(data) if server_end is None else server_end,
                         123, data).encode()


def _keepalive(end: int, reply: bool) -> bytes:
    return wire.PrimaryKeepalive(end, 456, reply).encode()


@given(st.lists(st.one_of(st.binary(max_size=40), st.booleans()), max_size=12),
       st.integers(0, 1 << 40))
def test_decode_batch_takes_contiguous_wal_and_keepalives(
        items: list[bytes | bool], start: int) -> None:
    payloads = []
    pos = start
    wal = b""
    requested = False
    server_end = 0
    for item in items:
        if isinstance(item, bool):
            server_end = pos + 1000
            payloads.append(_keepalive(server_end, item))
            requested = requested or item
        else:
            server_end = pos + len(item) + 7
            payloads.append(_xlogdata(pos, item, server_end))
            pos += len(item)
            wal += item
    batch = decode_batch(payloads, Lsn(start))
    assert batch.end_lsn == Lsn(pos)
    assert b"".join(data for _, data in batch.pieces) == wal
    assert all(data for _, data in batch.pieces), "an empty XLogData makes no piece"
    at = start
    for begin, data in batch.pieces:
        assert begin == Lsn(at)
        at += len(data)
    assert batch.reply_requested == requested
    assert batch.server_end_lsn == Lsn(server_end)


def test_decode_batch_refuses_a_gap_and_other_messages() -> None:
    with pytest.raises(ProtocolError, match="it has a gap"):
        decode_batch([_xlogdata(100, b"abc"), _xlogdata(104, b"d")], Lsn(100))
    status = wire.StandbyStatusUpdate(1, 1, 1, 0).encode()
    with pytest.raises(ProtocolError, match="unexpected StandbyStatusUpdate"):
        decode_batch([status], Lsn(0))
    bad_flag = b"k" + struct.pack(">Qq", 5, 0) + b"\x02"
    with pytest.raises(ProtocolError, match="reply-requested flag is 2"):
        decode_batch([bad_flag], Lsn(0))
    with pytest.raises(ProtocolError):
        decode_batch([b"w" + b"\x00" * 10], Lsn(0))  # too short for its header
    with pytest.raises(ProtocolError):
        decode_batch([b""], Lsn(0))


@given(st.lists(st.tuples(st.sampled_from(["copy", "done", "parameter"]), st.binary(max_size=30)),
                max_size=10),
       st.integers(1, 64))
def test_take_copy_data_matches_next(messages: list[tuple[str, bytes]], cut: int) -> None:
    """Fed in pieces of `cut` bytes, `take_copy_data` then `next_backend` yields the same
    payloads in the same order as `next_backend` alone."""
    stream = b""
    for kind, data in messages:
        if kind == "copy":
            stream += wire.CopyData(data).encode()
        elif kind == "done":
            stream += wire.CopyDone().encode()
        else:
            stream += wire.ParameterStatus("application_name", "sk1").encode()
    plain = wire.MessageReader("backend")
    fast = wire.MessageReader("backend")
    expected: list[object] = []
    got: list[object] = []
    for i in range(0, len(stream), cut):
        plain.feed(stream[i:i + cut])
        fast.feed(stream[i:i + cut])
        while (msg := plain.next_backend()) is not None:
            expected.append(msg.data if isinstance(msg, wire.CopyData) else type(msg))
        while True:
            payloads: list[bytes] = []
            fast.take_copy_data(payloads)
            got += payloads
            msg = fast.next_backend()
            if msg is None:
                break
            got.append(msg.data if isinstance(msg, wire.CopyData) else type(msg))
    assert got == expected
    assert fast.buffered_bytes == plain.buffered_bytes == 0


@given(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 64) - 1),
       st.integers(0, (1 << 64) - 1), st.integers(-(1 << 63), (1 << 63) - 1), st.booleans())
def test_encode_status_copy_data_is_the_copydata_of_a_status_update(
        write: int, flush: int, apply: int, send_time_us: int, reply: bool) -> None:
    update = wire.StandbyStatusUpdate(write, flush, apply, send_time_us, reply)
    encoded = wire.encode_status_copy_data(write, flush, apply, send_time_us, reply)
    assert encoded == wire.CopyData(update.encode()).encode()
    assert encoded[:1] == b"d"
    assert struct.unpack_from("!i", encoded, 1)[0] == len(encoded) - 1
    assert wire.decode_replication(encoded[5:]) == update
