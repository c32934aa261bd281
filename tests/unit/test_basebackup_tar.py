"""The basebackup tar writer on a small timeline (no PostgreSQL process).

Proves: relation forks are split into segment files of pg_control's relseg_size with the
right blocks in each; an unlogged relation gets main = a copy of its init fork and no
other fork; SLRU segments, relation maps, PG_VERSION files and two-phase files (with
their CRC-32C) come from the stored values; pg_control and the synthesized WAL point at
a shutdown checkpoint at X with the stored counters; the slot state file is byte for byte
what PostgreSQL 15 writes; read-only backups have standby.signal and no slot; the LSN is
validated; a record crossing a segment end gives two WAL segments; nothing PostgreSQL
must not inherit is in the tar. Also the compute's settings (D2, D6 minima from
pg_control) and its refusal to unpack entries outside the data directory or a tar
without pg_control.
"""

from __future__ import annotations

import dataclasses
import io
import os
import struct
import tarfile
from pathlib import Path

import pytest

from strata.common.errors import CorruptionError, UserError
from strata.common.ids import TenantId, TimelineId
from strata.common.lsn import Lsn
from strata.compute.compute import Compute, ComputeConfig, _write_sparse, compute_settings
from strata.pageserver.basebackup import (
    BasebackupLsns,
    slot_state_bytes,
    write_basebackup,
)
from strata.pageserver.datadir import put_database, twophase_file_bytes
from strata.pg.checkpoint import CheckPoint
from strata.pg.checksum import page_checksum, with_checksum
from strata.pg.controlfile import ControlFileData, DBState
from strata.pg.crc import crc32c
from strata.pg.relfile import RelTag, relation_segments
from strata.pg.slru import SlruKind
from strata.pg.walwriter import (
    CHECKPOINT_RECORD_LEN,
    DATA_MAP_PAX_HEADER,
    FULL_SIZE_PAX_HEADER,
    format_data_map,
    parse_data_map,
    written_runs,
)
from strata.storage.key import (
    checkpoint_key,
    control_file_key,
    relmap_key,
    slru_block_key,
    slru_segment_size_key,
    twophase_key,
)
from strata.storage.repository import Repository
from strata.storage.tenant import TenantConfig
from strata.storage.timeline import Timeline
from strata.storage.value import Image, Patch, PatchOp, Tombstone

# pg_replslot/strata_walproposer/state written by PostgreSQL 15.18 after
# pg_create_physical_replication_slot('strata_walproposer', true) and CHECKPOINT,
# restart_lsn 0/1500718.
PG15_SLOT_STATE = bytes.fromhex(
    "a11c05017909e1b602000000b8000000" + b"strata_walproposer".hex() + "00" * 46
    + "00" * 16 + "1807500100000000" + "00" * 96)
assert len(PG15_SLOT_STATE) == 200

X0 = 0x1_0000_0100  # the stand-in "initdb" record end
SEG = 16 << 20
RELSEG = 3  # blocks per relation segment file in this test's pg_control


def control_template() -> ControlFileData:
    cp = CheckPoint(redo=Lsn(X0 - 120), this_timeline_id=1, prev_timeline_id=1,
                    full_page_writes=True, next_xid=(3 << 32) | 750, next_oid=24576,
                    next_multi=7, next_multi_offset=11, oldest_xid=716, oldest_xid_db=1,
                    oldest_multi=1, oldest_multi_db=1, time=1_700_000_000,
                    oldest_commit_ts_xid=0, newest_commit_ts_xid=0, oldest_active_xid=0)
    return ControlFileData(
        system_identifier=7_300_000_000_000_000_123, pg_control_version=1300,
        catalog_version_no=202209061, state=DBState.SHUTDOWNED, time=1_700_000_000,
        checkpoint=Lsn(X0 - 120), checkpoint_copy=cp, unlogged_lsn=Lsn(1000),
        min_recovery_point=Lsn(0), min_recovery_point_tli=0, backup_start_point=Lsn(0),
        backup_end_point=Lsn(0), backup_end_required=False, wal_level=1, wal_log_hints=False,
        max_connections=100, max_worker_processes=8, max_wal_senders=10, max_prepared_xacts=0,
        max_locks_per_xact=64, track_commit_timestamp=False, max_align=8,
        float_format=1234567.0, blcksz=8192, relseg_size=RELSEG, xlog_blcksz=8192,
        xlog_seg_size=SEG, name_data_len=64, index_max_keys=32, toast_max_chunk_size=1996,
        loblksize=2048, float8_by_val=True, data_checksum_version=0,
        mock_authentication_nonce=bytes(range(32)))


def page(tag: int, blkno: int) -> bytes:
    return struct.pack("<II", tag, blkno) * 1024


def twophase_content(xid: int, body: bytes) -> bytes:
    return struct.pack("<III", 0x57F94534, 12 + len(body) + 4, xid) + body


HEAP = RelTag(1663, 5, 16384, 0)
HEAP_FSM = RelTag(1663, 5, 16384, 1)
UNLOGGED = [RelTag(1663, 5, 16390, f) for f in (0, 1, 3)]  # main, fsm, init
GLOBAL = RelTag(1664, 0, 1262, 0)
EMPTY = RelTag(1663, 5, 16400, 0)


@pytest.fixture
def timeline(tmp_path: Path) -> Timeline:
    """X0: a database with relations, SLRUs, relmaps, a prepared xact; X1: more changes."""
    repo = Repository(tmp_path)
    tenant = repo.create_tenant(TenantId(bytes(range(16))), TenantConfig())
    tl = tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(X0))
    at = Lsn(X0)
    tl.put(control_file_key(), at, Image(control_template().to_bytes()))
    tl.put(checkpoint_key(), at, Image(control_template().checkpoint_copy.to_bytes()))
    put_database(tl, 1663, 1, at, b"15\n")
    put_database(tl, 1663, 5, at, b"15\n")
    for spc, db in ((1664, 0), (1663, 1), (1663, 5)):
        tl.put(relmap_key(spc, db), at, Image(bytes([db]) * 512))
    for blkno in range(7):
        tl.put_rel_page(HEAP, blkno, at, Image(page(1, blkno)))
    tl.put_rel_page(HEAP_FSM, 0, at, Image(page(2, 0)))
    for rel in UNLOGGED:
        for blkno in range(2 if rel.forknum == 3 else 4):
            tl.put_rel_page(rel, blkno, at, Image(page(10 + rel.forknum, blkno)))
    tl.put_rel_page(GLOBAL, 0, at, Image(page(4, 0)))
    tl.create_rel(EMPTY, at)
    tl.put(slru_segment_size_key(SlruKind.CLOG, 0), at, Image(struct.pack("<I", 2)))
    tl.put(slru_block_key(SlruKind.CLOG, 0, 0), at, Image(page(5, 0)))
    tl.put(slru_segment_size_key(SlruKind.MULTIXACT_OFFSETS, 0), at,
           Image(struct.pack("<I", 1)))
    tl.put(slru_segment_size_key(SlruKind.MULTIXACT_MEMBERS, 0), at,
           Image(struct.pack("<I", 1)))
    tl.put(twophase_key(740), at, Image(twophase_content(740, b"prepared")))
    tl.finish_record(at, Lsn(X0 - 120))
    # X1: a clog bit set, the prepared xact resolved, a block changed.
    at1 = Lsn(X0 + 64)
    tl.put(slru_block_key(SlruKind.CLOG, 0, 1), at1, Patch((PatchOp(3, 0, 0x40),)))
    tl.put(twophase_key(740), at1, Tombstone())
    tl.put_rel_page(HEAP, 2, at1, Image(page(9, 2)))
    tl.finish_record(at1, Lsn(X0 + 8))
    return tl


def backup(tl: Timeline, lsn: int, **kwargs: object) -> tuple[BasebackupLsns, dict[str, bytes],
                                                               dict[str, tarfile.TarInfo]]:
    out = io.BytesIO()
    lsns = write_basebackup(tl, Lsn(lsn), out, now=1_800_000_000, **kwargs)  # type: ignore[arg-type]
    out.seek(0)
    files: dict[str, bytes] = {}
    infos: dict[str, tarfile.TarInfo] = {}
    with tarfile.open(fileobj=out, mode="r:") as tar:
        for info in tar:
            assert info.name not in infos, f"duplicate tar entry {info.name}"
            infos[info.name] = info
            if info.isfile():
                f = tar.extractfile(info)
                assert f is not None
                files[info.name] = f.read()
    return lsns, files, infos


def test_relation_segments_math() -> None:
    assert relation_segments(0, 3) == [(0, 0, 0)]
    assert relation_segments(3, 3) == [(0, 0, 3)]
    assert relation_segments(7, 3) == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
    assert relation_segments(131073, 131072) == [(0, 0, 131072), (1, 131072, 1)]


def test_slot_state_is_what_postgres_writes() -> None:
    assert slot_state_bytes("strata_walproposer", Lsn(0x1500718)) == PG15_SLOT_STATE
    assert struct.unpack_from("<I", PG15_SLOT_STATE, 4)[0] == crc32c(PG15_SLOT_STATE[8:])
    with pytest.raises(UserError, match="invalid replication slot name"):
        slot_state_bytes("Bad-Name", Lsn(0x1500718))


def test_twophase_file_gets_crc_and_is_checked() -> None:
    content = twophase_content(740, b"state")
    data = twophase_file_bytes(740, content)
    assert data[:-4] == content
    assert struct.unpack("<I", data[-4:])[0] == crc32c(content)
    assert struct.unpack_from("<I", data, 4)[0] == len(data)
    with pytest.raises(CorruptionError, match="total_len"):
        twophase_file_bytes(740, content + b"x")
    with pytest.raises(CorruptionError, match="magic"):
        twophase_file_bytes(740, b"\0" * 4 + content[4:])


def test_full_backup_at_x0(timeline: Timeline) -> None:
    lsns, files, infos = backup(timeline, X0, prev_lsn=Lsn(X0 - 120))
    assert lsns == BasebackupLsns(Lsn(X0), Lsn(X0 + CHECKPOINT_RECORD_LEN).align(8))
    # Segments of RELSEG blocks: 7 blocks -> 3 + 3 + 1, each block where md.c looks.
    heap = [files["base/5/16384"], files["base/5/16384.1"], files["base/5/16384.2"]]
    assert [len(f) for f in heap] == [3 * 8192, 3 * 8192, 8192]
    assert b"".join(heap) == b"".join(page(1, b) for b in range(7))
    assert "base/5/16384.3" not in files
    assert files["base/5/16384_fsm"] == page(2, 0)
    assert files["base/5/16400"] == b""
    assert files["global/1262"] == page(4, 0)
    # Unlogged: main = copy of init, no fsm.
    init = page(13, 0) + page(13, 1)
    assert files["base/5/16390_init"] == init
    assert files["base/5/16390"] == init
    assert "base/5/16390_fsm" not in files
    # Metadata files.
    assert files["PG_VERSION"] == files["base/5/PG_VERSION"] == b"15\n"
    assert "global/PG_VERSION" not in files
    assert files["global/pg_filenode.map"] == bytes([0]) * 512
    assert files["base/5/pg_filenode.map"] == bytes([5]) * 512
    assert files["pg_xact/0000"] == page(5, 0) + bytes(8192)
    assert files["pg_multixact/offsets/0000"] == bytes(8192)
    assert files["pg_multixact/members/0000"] == bytes(8192)
    assert files["pg_twophase/000002E4"] == twophase_file_bytes(
        740, twophase_content(740, b"prepared"))
    assert files["pg_replslot/strata_walproposer/state"] == slot_state_bytes(
        "strata_walproposer", Lsn(X0))
    assert "standby.signal" not in files
    for d in ("pg_wal/archive_status", "pg_stat", "pg_logical/snapshots", "pg_tblspc",
              "pg_subtrans", "pg_notify", "pg_serial", "pg_snapshots", "pg_commit_ts"):
        assert infos[d].isdir() and infos[d].mode == 0o700, d
    assert all(i.mode == 0o600 for i in infos.values() if i.isfile())
    assert not any(n.endswith(("postmaster.pid", "pg_internal.init", "postmaster.opts"))
                   for n in files)
    assert list(infos)[-1] == "global/pg_control"
    # pg_control: clean start at X with the stored counters, checkpoint time = now.
    control = ControlFileData.from_bytes(files["global/pg_control"])
    stored = control_template().checkpoint_copy
    assert control.state == DBState.SHUTDOWNED
    assert control.checkpoint == Lsn(X0)
    assert control.checkpoint_copy == dataclasses.replace(stored, redo=Lsn(X0),
                                                          time=1_800_000_000)
    assert control.time == 1_800_000_000
    assert control.system_identifier == control_template().system_identifier
    # The WAL segment holds the record at X with xl_prev = prev_lsn.
    wal = files["pg_wal/" + Lsn(X0).segment_file_name(1, SEG)]
    assert len(wal) == SEG
    off = X0 % SEG
    tot_len, _, xl_prev = struct.unpack_from("<IIQ", wal, off)
    assert (tot_len, xl_prev) == (CHECKPOINT_RECORD_LEN, X0 - 120)


def test_backup_at_later_lsn_sees_later_state(timeline: Timeline) -> None:
    _, files, _ = backup(timeline, X0 + 64)
    assert files["base/5/16384"] == page(1, 0) + page(1, 1) + page(9, 2)
    clog = bytearray(16384)
    clog[:8192] = page(5, 0)
    clog[8192 + 3] = 0x40
    assert files["pg_xact/0000"] == bytes(clog)
    assert not any(n.startswith("pg_twophase/") for n in files)
    # At last_record_lsn the default xl_prev is the timeline's prev_record_lsn.
    wal = files["pg_wal/" + Lsn(X0 + 64).segment_file_name(1, SEG)]
    assert struct.unpack_from("<Q", wal, (X0 + 64) % SEG + 8)[0] == X0 + 8


def test_pull_mode_slots_one_per_safekeeper(timeline: Timeline) -> None:
    """Pull mode: slots sk1..sk3 at X instead of the walproposer's, in both modes; the
    basebackup's pg_hba admits replication over loopback (the safekeepers)."""
    for mode in ("full", "lazy"):
        _, files, infos = backup(timeline, X0 + 64, mode=mode,
                                 slot_names=("sk1", "sk2", "sk3"))
        slots = sorted(n for n in files if n.startswith("pg_replslot/"))
        assert slots == [f"pg_replslot/sk{i}/state" for i in (1, 2, 3)], mode
        for i in (1, 2, 3):
            assert files[f"pg_replslot/sk{i}/state"] == slot_state_bytes(f"sk{i}",
                                                                        Lsn(X0 + 64))
            assert infos[f"pg_replslot/sk{i}"].isdir()
        hba = files["pg_hba.conf"].decode()
        assert "host    replication     all     127.0.0.1/32    trust" in hba
    _, files, _ = backup(timeline, X0, read_only=True, slot_names=("sk1", "sk2", "sk3"))
    assert not any(n.startswith("pg_replslot/") for n in files)
    with pytest.raises(UserError, match="repeat"):
        backup(timeline, X0, slot_names=("sk1", "sk1"))
    with pytest.raises(UserError, match="slot name"):
        backup(timeline, X0, slot_names=("sk1", "SK-2"))


def test_read_only_and_lazy(timeline: Timeline) -> None:
    _, files, _ = backup(timeline, X0, read_only=True)
    assert files["standby.signal"] == b""
    assert not any(n.startswith("pg_replslot/") for n in files)
    _, files, infos = backup(timeline, X0, mode="lazy", slot_names=("other_slot",))
    assert "base/5/16384" not in files and "global/1262" not in files
    assert files["base/5/pg_filenode.map"] == bytes([5]) * 512
    assert "pg_replslot/other_slot/state" in files
    assert infos["base/5"].isdir()


def test_lazy_wal_segment_sends_only_its_written_pages(timeline: Timeline,
                                                       tmp_path: Path) -> None:
    """A lazy basebackup sends only the WAL segment's pages that are not all zeros (the
    long header, the checkpoint record); unpacked, the segment is byte for byte the full
    mode's, its zeros holes in the file."""
    name = "pg_wal/" + Lsn(X0).segment_file_name(1, SEG)
    _, full, _ = backup(timeline, X0)
    _, lazy, infos = backup(timeline, X0, mode="lazy")
    runs_int = [(int(o), int(n)) for o, n in (
        item.split(":") for item in infos[name].pax_headers[DATA_MAP_PAX_HEADER].split(","))]
    assert infos[name].pax_headers[FULL_SIZE_PAX_HEADER] == str(SEG)
    assert len(lazy[name]) == sum(n for _, n in runs_int) < SEG
    assert b"".join(full[name][o:o + n] for o, n in runs_int) == lazy[name]
    assert all(n % 8192 == 0 for _, n in runs_int) and runs_int[0][0] == 0
    assert FULL_SIZE_PAX_HEADER not in infos["global/pg_control"].pax_headers

    out = io.BytesIO()
    write_basebackup(timeline, Lsn(X0), out, mode="lazy", now=1_800_000_000)
    out.seek(0)
    compute = Compute(tmp_path / "lazy")
    compute.unpack(out)
    unpacked = compute.datadir / name
    assert unpacked.read_bytes() == full[name]
    assert unpacked.stat().st_blocks * 512 < SEG  # sparse

    # Runs with zeros between them (a record further into the segment) and after them.
    segment = bytearray(65536)
    segment[:8192] = b"\1" * 8192
    segment[40960:57344] = b"\2" * 16384
    runs = written_runs(bytes(segment))
    assert runs == [(0, 8192), (40960, 16384)]
    content = b"".join(bytes(segment[o:o + n]) for o, n in runs)
    assert parse_data_map(format_data_map(runs), len(content), 65536) == runs
    _write_sparse(tmp_path / "gaps", io.BytesIO(content), 65536, runs)
    assert (tmp_path / "gaps").read_bytes() == bytes(segment)

    # A map that does not fit the content or the size, or is not a map, is refused.
    for i, (size, data_map) in enumerate((("16384", "0:8192"), ("8192", "4096:8192"),
                                          ("lots", "0:8192"), ("16384", "0:8192,0:0"),
                                          ("16384", "nope"))):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("pg_wal/000000010000000000000001")
            info.size = 16384 if i == 0 else 8192
            info.pax_headers = {FULL_SIZE_PAX_HEADER: size, DATA_MAP_PAX_HEADER: data_map}
            tar.addfile(info, io.BytesIO(bytes(info.size)))
        out.seek(0)
        with pytest.raises(CorruptionError, match="refusing to unpack"):
            Compute(tmp_path / f"bad{i}").unpack(out)


def test_unpacks_into_a_premade_skeleton_but_not_over_files(timeline: Timeline,
                                                            tmp_path: Path) -> None:
    """The start makes the data directory's empty directories ahead of the basebackup
    (`strata.compute.lazy._premake_datadir`); the unpacking takes them, and still refuses
    a directory that holds a file."""
    from strata.compute.lazy import _premake_datadir
    from strata.pg.constants import PGDATA_DIRS

    out = io.BytesIO()
    write_basebackup(timeline, Lsn(X0), out, mode="lazy", now=1_800_000_000)
    premade = tmp_path / "premade" / "pgdata"
    premade.parent.mkdir()
    _premake_datadir(premade)
    assert all((premade / name).is_dir() for name in PGDATA_DIRS)
    out.seek(0)
    Compute(premade).unpack(out)
    assert (premade / "global" / "pg_control").is_file()

    taken = tmp_path / "taken"
    _premake_datadir(taken)
    (taken / "pg_wal" / "leftover").write_bytes(b"x")
    out.seek(0)
    with pytest.raises(UserError, match="is not empty"):
        Compute(taken).unpack(out)


@pytest.mark.parametrize(("lsn", "message"), [
    (X0 + 4, "not 8-byte aligned"),
    (X0 + 72, "beyond the last record"),
    (X0 - 8, "before the initdb LSN"),
])
def test_lsn_validation(timeline: Timeline, lsn: int, message: str) -> None:
    with pytest.raises(UserError, match=message):
        write_basebackup(timeline, Lsn(lsn), io.BytesIO())


def test_gc_cutoff_and_bad_mode(timeline: Timeline) -> None:
    with pytest.raises(UserError, match="unknown basebackup mode"):
        write_basebackup(timeline, Lsn(X0), io.BytesIO(), mode="fast")
    timeline.set_gc_cutoff(Lsn(X0 + 64))
    with pytest.raises(UserError, match="below the GC cutoff"):
        write_basebackup(timeline, Lsn(X0), io.BytesIO())


def test_checkpoint_crossing_a_segment_end_gives_two_segments(tmp_path: Path) -> None:
    repo = Repository(tmp_path)
    tenant = repo.create_tenant(TenantId(bytes(range(16))), TenantConfig())
    x = 2 * SEG - 48  # the 114-byte record crosses into the next segment
    tl = tenant.create_timeline(TimelineId(os.urandom(16)), Lsn(x))
    tl.put(control_file_key(), Lsn(x), Image(control_template().to_bytes()))
    tl.put(checkpoint_key(), Lsn(x), Image(control_template().checkpoint_copy.to_bytes()))
    tl.finish_record(Lsn(x), Lsn(x - 200))
    lsns, files, _ = backup(tl, x)
    wal = sorted(n for n in files if n.startswith("pg_wal/0"))
    assert wal == ["pg_wal/" + Lsn(x).segment_file_name(1, SEG),
                   "pg_wal/" + Lsn(2 * SEG).segment_file_name(1, SEG)]
    assert lsns.record_lsn == Lsn(x)
    assert lsns.end_lsn == Lsn(2 * SEG + 40 + CHECKPOINT_RECORD_LEN - 48).align(8)
    assert ControlFileData.from_bytes(files["global/pg_control"]).checkpoint == Lsn(x)


def test_compute_settings_primary_and_read_only() -> None:
    control = dataclasses.replace(control_template(), max_connections=150,
                                  max_prepared_xacts=20, max_locks_per_xact=64,
                                  max_worker_processes=16, max_wal_senders=3)
    primary = compute_settings(ComputeConfig(receiver_name="strata_pageserver"), control)
    assert primary["synchronous_standby_names"] == "strata_pageserver"
    assert primary["hot_standby"] is False
    assert primary["restart_after_crash"] is False
    assert primary["wal_consistency_checking"] == "all"
    assert primary["wal_compression"] == "zstd"
    # Raised to pg_control's values where lower, kept where higher.
    assert primary["max_connections"] == 150
    assert primary["max_prepared_transactions"] == 20
    assert primary["max_worker_processes"] == 16
    assert primary["max_wal_senders"] == 10
    pulled = compute_settings(ComputeConfig(quorum_standbys=("sk1", "sk2", "sk3")), control)
    assert pulled["synchronous_standby_names"] == "ANY 2 (sk1, sk2, sk3)"
    five = ComputeConfig(quorum_standbys=tuple(f"sk{i}" for i in (1, 2, 3, 4, 7)))
    assert compute_settings(five, control)["synchronous_standby_names"] == \
        "ANY 3 (sk1, sk2, sk3, sk4, sk7)"
    with pytest.raises(UserError, match="repeat"):
        ComputeConfig(quorum_standbys=("sk1", "sk1"))
    standby = compute_settings(ComputeConfig(read_only=True, settings={"work_mem": "8MB"},
                                             quorum_standbys=("sk1", "sk2", "sk3")),
                               control)
    assert standby["hot_standby"] is True
    assert standby["synchronous_standby_names"] == ""
    assert standby["work_mem"] == "8MB"
    with pytest.raises(UserError, match="max_connections"):
        ComputeConfig(max_connections=0)


def test_unpack_refuses_entries_outside_the_data_directory(tmp_path: Path) -> None:
    for name, kind in (("../escape", tarfile.REGTYPE), ("/abs", tarfile.REGTYPE),
                       ("link", tarfile.SYMTYPE)):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            info = tarfile.TarInfo(name)
            info.type = kind
            tar.addfile(info, io.BytesIO(b""))
        out.seek(0)
        compute = Compute(tmp_path / f"d{len(name)}")
        with pytest.raises(CorruptionError, match="refusing to unpack"):
            compute.unpack(out)
    assert not (tmp_path / "escape").exists()


def test_unpack_refuses_a_cut_short_stream(tmp_path: Path, timeline: Timeline) -> None:
    out = io.BytesIO()
    write_basebackup(timeline, Lsn(X0), out)
    cut = out.getvalue()
    cut = cut[:cut.find(b"global/pg_control")]  # every entry before pg_control
    with pytest.raises(CorruptionError, match="no global/pg_control"):
        Compute(tmp_path / "cut").unpack(io.BytesIO(cut + bytes(1024)))


def test_checksums_are_set_when_pg_control_has_them(timeline: Timeline) -> None:
    """Stored pages (WAL images carry stale pd_checksum) get theirs set for their block."""
    on = dataclasses.replace(control_template(), data_checksum_version=1)
    at = Lsn(X0 + 128)
    timeline.put(control_file_key(), at, Image(on.to_bytes()))
    heap_page = bytearray(page(1, 4))
    heap_page[12:16] = struct.pack("<HH", 64, 8000)  # pd_lower, pd_upper: not a new page
    timeline.put_rel_page(HEAP, 4, at, Image(bytes(heap_page)))
    timeline.finish_record(at, Lsn(X0 + 64))
    _, files, _ = backup(timeline, X0 + 128)
    got = files["base/5/16384.1"][8192:16384]  # block 4 = segment 1, block 1
    assert got == with_checksum(bytes(heap_page), 4)
    assert struct.unpack_from("<H", got, 8)[0] == page_checksum(bytes(heap_page), 4)
    assert got != heap_page and page_checksum(bytes(heap_page), 5) != page_checksum(
        bytes(heap_page), 4)
    assert with_checksum(bytes(8192), 4) == bytes(8192)  # new pages have no checksum
