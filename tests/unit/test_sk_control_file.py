"""The safekeeper control file: exact round trips, and every kind of damage is refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strata.common import failpoint
from strata.common.errors import CorruptionError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.safekeeper import control_file
from strata.safekeeper.acceptor import AcceptorState
from strata.safekeeper.messages import TermEntry

U64 = st.integers(0, (1 << 64) - 1)


@st.composite
def states(draw: st.DrawFn) -> AcceptorState:
    start, scan, commit = sorted(draw(st.lists(U64, min_size=3, max_size=3)))
    starts = sorted(draw(st.lists(st.integers(start, (1 << 64) - 1), max_size=6)))
    terms = sorted(draw(st.sets(st.integers(1, (1 << 64) - 1), min_size=len(starts),
                                max_size=len(starts))))
    history = tuple(TermEntry(t, Lsn(s), Lsn(draw(U64))) for t, s in zip(terms, starts,
                                                                        strict=True))
    return AcceptorState(
        TenantId(draw(st.binary(min_size=16, max_size=16))),
        TimelineId(draw(st.binary(min_size=16, max_size=16))),
        draw(U64), 1 << draw(st.integers(20, 30)), Lsn(start), Lsn(draw(U64)), draw(U64),
        draw(U64), history, Lsn(commit), Lsn(scan), Lsn(draw(U64)),
        Lsn(draw(st.integers(0, commit))))


def sample() -> AcceptorState:
    state = AcceptorState.new_timeline(TenantId.generate(), TimelineId.generate(), 42,
                                       16 << 20, Lsn(0x1000028), Lsn(0x1000000))
    history = (TermEntry(3, Lsn(0x1000028), Lsn(0x1000000)),
               TermEntry(5, Lsn(0x1200000), Lsn(0x11FFF80)))
    return AcceptorState(state.tenant_id, state.timeline_id, 42, 16 << 20, Lsn(0x1000028),
                         Lsn(0x1000000), 6, 99, history, Lsn(0x1300000), Lsn(0x12FFFF8),
                         Lsn(0x12FFF00), Lsn(0x1000000))


@settings(max_examples=200)
@given(states())
def test_round_trip(state: AcceptorState) -> None:
    """Every field, including the term history, survives encode + decode exactly."""
    assert control_file.decode_state(control_file.encode_state(state)) == state


def test_every_flipped_bit_is_refused() -> None:
    """The checksum covers every byte: a flip anywhere is a CorruptionError, never a
    different state."""
    data = control_file.encode_state(sample())
    for pos in range(len(data)):
        for bit in (0x01, 0x80):
            damaged = bytearray(data)
            damaged[pos] ^= bit
            with pytest.raises(CorruptionError, match="control file is damaged"):
                control_file.decode_state(bytes(damaged), "ctl")


def test_every_truncation_and_extension_is_refused() -> None:
    data = control_file.encode_state(sample())
    for n in range(len(data)):
        with pytest.raises(CorruptionError):
            control_file.decode_state(data[:n])
    with pytest.raises(CorruptionError, match="header says"):
        control_file.decode_state(data + b"\0")


def test_wrong_version_says_so() -> None:
    data = bytearray(control_file.encode_state(sample()))
    data[4] = 9
    with pytest.raises(CorruptionError, match="version 9"):
        control_file.decode_state(bytes(data))


def test_store_and_load(tmp_path: Path) -> None:
    """store() leaves exactly the control file (no temp file) and load() reads it back;
    a missing file is reported with its path."""
    with pytest.raises(CorruptionError, match="missing") as info:
        control_file.load(tmp_path)
    assert str(tmp_path / control_file.CONTROL_FILE_NAME) in str(info.value)
    state = sample()
    control_file.store(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [control_file.CONTROL_FILE_NAME]
    assert control_file.load(tmp_path) == state


def test_crash_before_rename_keeps_the_old_state(tmp_path: Path) -> None:
    """A store interrupted before its rename leaves the previous state in place."""
    old = sample()
    control_file.store(tmp_path, old)
    new = replace(old, term=7)
    with failpoint.armed("sk-control-before-rename"), pytest.raises(failpoint.FailpointHit):
        control_file.store(tmp_path, new)
    assert control_file.load(tmp_path) == old
    control_file.store(tmp_path, new)
    assert control_file.load(tmp_path).term == 7


def test_version_1_reads_with_nothing_uploaded() -> None:
    """A control file written before WAL offload (version 1, no backup_lsn) still loads."""
    import struct

    from strata.pg.crc import crc32c

    state = sample()
    v2 = control_file.encode_state(state)
    body = bytearray(v2[12:-4])
    del body[100:108]  # backup_lsn: after scan_prev_lsn in the fixed part
    head = struct.pack("<III", control_file.MAGIC, 1, len(body)) + bytes(body)
    v1 = head + struct.pack("<I", crc32c(head))
    assert control_file.decode_state(v1) == replace(state, backup_lsn=Lsn(0))


def test_upload_position_above_commit_is_refused() -> None:
    state = replace(sample(), backup_lsn=Lsn(0x1400000))
    with pytest.raises(CorruptionError, match="upload position"):
        control_file.decode_state(control_file.encode_state(state))
