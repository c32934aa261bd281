"""Format decoded WAL records the way PostgreSQL 15's `pg_waldump -b` prints them.

The record line has pg_waldump's fields and spacing (`XLogDumpDisplayRecord` in pg_waldump.c):
`rmgr: NAME len (rec/tot): R/T, tx: X, lsn: A/B, prev C/D, desc: TYPE`, where rec = xl_tot_len
minus the stored image bytes (`XLogRecGetLen`). Each block ref follows on its own line in the
detailed (`-b`) format, with the image's hole and compression. We print the record type name
(`rm_identify`, or `info 0xNN` for types we do not name) but not pg_waldump's description text.
"""

from __future__ import annotations

from strata.pg.constants import (
    BKPIMAGE_COMPRESS_LZ4,
    BKPIMAGE_COMPRESS_PGLZ,
    BKPIMAGE_COMPRESS_ZSTD,
    BKPIMAGE_COMPRESSED_MASK,
    BLCKSZ,
    RMGR_NAMES,
    RmgrId,
)
from strata.pg.walreader import BlockRef, DecodedRecord

FORK_NAMES = ("main", "fsm", "vm", "init")  # relpath.c forkNames

_HEAP_INIT_PAGE = 0x80  # heapam_xlog.h XLOG_HEAP_INIT_PAGE (also BRIN's XLOG_BRIN_INIT_PAGE)

# Record type names by rmgr and the rmgr bits of xl_info, from each rmgr's `*_identify`
# (src/backend/access/rmgrdesc/*.c) and the info codes in its xlog header.
_TYPE_NAMES: dict[int, dict[int, str]] = {
    RmgrId.XLOG: {0x00: "CHECKPOINT_SHUTDOWN", 0x10: "CHECKPOINT_ONLINE", 0x20: "NOOP",
                  0x30: "NEXTOID", 0x40: "SWITCH", 0x50: "BACKUP_END",
                  0x60: "PARAMETER_CHANGE", 0x70: "RESTORE_POINT", 0x80: "FPW_CHANGE",
                  0x90: "END_OF_RECOVERY", 0xA0: "FPI_FOR_HINT", 0xB0: "FPI",
                  0xD0: "OVERWRITE_CONTRECORD"},
    # xact.h: the type is info & XLOG_XACT_OPMASK (0x70); 0x80 is XLOG_XACT_HAS_INFO.
    RmgrId.TRANSACTION: {0x00: "COMMIT", 0x10: "PREPARE", 0x20: "ABORT",
                         0x30: "COMMIT_PREPARED", 0x40: "ABORT_PREPARED", 0x50: "ASSIGNMENT",
                         0x60: "INVALIDATIONS"},
    RmgrId.STORAGE: {0x10: "CREATE", 0x20: "TRUNCATE"},
    RmgrId.CLOG: {0x00: "ZEROPAGE", 0x10: "TRUNCATE"},
    RmgrId.DATABASE: {0x00: "CREATE_FILE_COPY", 0x10: "CREATE_WAL_LOG", 0x20: "DROP"},
    RmgrId.TABLESPACE: {0x00: "CREATE", 0x10: "DROP"},
    RmgrId.MULTIXACT: {0x00: "ZERO_OFF_PAGE", 0x10: "ZERO_MEM_PAGE", 0x20: "CREATE_ID",
                       0x30: "TRUNCATE_ID"},
    RmgrId.RELMAP: {0x00: "UPDATE"},
    RmgrId.STANDBY: {0x00: "LOCK", 0x10: "RUNNING_XACTS", 0x20: "INVALIDATIONS"},
    RmgrId.HEAP2: {0x00: "REWRITE", 0x10: "PRUNE", 0x20: "VACUUM", 0x30: "FREEZE_PAGE",
                   0x40: "VISIBLE", 0x50: "MULTI_INSERT", 0xD0: "MULTI_INSERT+INIT",
                   0x60: "LOCK_UPDATED", 0x70: "NEW_CID"},
    RmgrId.HEAP: {0x00: "INSERT", 0x80: "INSERT+INIT", 0x10: "DELETE", 0x20: "UPDATE",
                  0xA0: "UPDATE+INIT", 0x30: "TRUNCATE", 0x40: "HOT_UPDATE",
                  0xC0: "HOT_UPDATE+INIT", 0x50: "CONFIRM", 0x60: "LOCK", 0x70: "INPLACE"},
    RmgrId.BTREE: {0x00: "INSERT_LEAF", 0x10: "INSERT_UPPER", 0x20: "INSERT_META",
                   0x30: "SPLIT_L", 0x40: "SPLIT_R", 0x50: "INSERT_POST", 0x60: "DEDUP",
                   0x70: "DELETE", 0x80: "UNLINK_PAGE", 0x90: "UNLINK_PAGE_META",
                   0xA0: "NEWROOT", 0xB0: "MARK_PAGE_HALFDEAD", 0xC0: "VACUUM",
                   0xD0: "REUSE_PAGE", 0xE0: "META_CLEANUP"},
    RmgrId.HASH: {0x00: "INIT_META_PAGE", 0x10: "INIT_BITMAP_PAGE", 0x20: "INSERT",
                  0x30: "ADD_OVFL_PAGE", 0x40: "SPLIT_ALLOCATE_PAGE", 0x50: "SPLIT_PAGE",
                  0x60: "SPLIT_COMPLETE", 0x70: "MOVE_PAGE_CONTENTS", 0x80: "SQUEEZE_PAGE",
                  0x90: "DELETE", 0xA0: "SPLIT_CLEANUP", 0xB0: "UPDATE_META_PAGE",
                  0xC0: "VACUUM_ONE_PAGE"},
    RmgrId.GIN: {0x10: "CREATE_PTREE", 0x20: "INSERT", 0x30: "SPLIT", 0x40: "VACUUM_PAGE",
                 0x90: "VACUUM_DATA_LEAF_PAGE", 0x50: "DELETE_PAGE", 0x60: "UPDATE_META_PAGE",
                 0x70: "INSERT_LISTPAGE", 0x80: "DELETE_LISTPAGE"},
    RmgrId.GIST: {0x00: "PAGE_UPDATE", 0x10: "DELETE", 0x20: "PAGE_REUSE", 0x30: "PAGE_SPLIT",
                  0x60: "PAGE_DELETE", 0x70: "ASSIGN_LSN"},
    RmgrId.SEQUENCE: {0x00: "LOG"},
    RmgrId.SPGIST: {0x10: "ADD_LEAF", 0x20: "MOVE_LEAFS", 0x30: "ADD_NODE",
                    0x40: "SPLIT_TUPLE", 0x50: "PICKSPLIT", 0x60: "VACUUM_LEAF",
                    0x70: "VACUUM_ROOT", 0x80: "VACUUM_REDIRECT"},
    RmgrId.BRIN: {0x00: "CREATE_INDEX", 0x10: "INSERT", 0x90: "INSERT+INIT", 0x20: "UPDATE",
                  0xA0: "UPDATE+INIT", 0x30: "SAMEPAGE_UPDATE", 0x40: "REVMAP_EXTEND",
                  0x50: "DESUMMARIZE"},
    RmgrId.COMMIT_TS: {0x00: "ZEROPAGE", 0x10: "TRUNCATE"},
    RmgrId.REPLORIGIN: {0x00: "SET", 0x10: "DROP"},
    RmgrId.LOGICALMSG: {0x00: "MESSAGE"},
}


def record_type_name(rmid: int, info: int) -> str | None:
    """pg_waldump's name for the record type, or None if we do not know it."""
    if rmid == RmgrId.GENERIC:
        return "Generic"
    code = info & 0xF0
    if rmid == RmgrId.TRANSACTION:
        code &= 0x70
    return _TYPE_NAMES.get(rmid, {}).get(code)


def rmgr_name(rmid: int) -> str:
    return RMGR_NAMES.get(rmid, f"rmgr{rmid}")  # type: ignore[call-overload, no-any-return]


def _compression_method(bimg_info: int) -> str:
    method = bimg_info & BKPIMAGE_COMPRESSED_MASK
    if method == BKPIMAGE_COMPRESS_PGLZ:
        return "pglz"
    if method == BKPIMAGE_COMPRESS_LZ4:
        return "lz4"
    if method == BKPIMAGE_COMPRESS_ZSTD:
        return "zstd"
    return "unknown"


def format_block(block: BlockRef) -> str:
    """One block ref as pg_waldump -b prints it (without the leading tab)."""
    fork = FORK_NAMES[block.forknum] if block.forknum < len(FORK_NAMES) else "???"
    text = (f"blkref #{block.block_id}: rel {block.spcnode}/{block.dbnode}/{block.relnode} "
            f"fork {fork} blk {block.blkno}")
    if block.has_image:
        kind = "FPW" if block.apply_image else "FPW for WAL verification"
        text += f" ({kind}); hole: offset: {block.hole_offset}, length: {block.hole_length}"
        if block.bimg_info & BKPIMAGE_COMPRESSED_MASK:
            saved = BLCKSZ - block.hole_length - len(block.image)
            text += (f", compression saved: {saved}, "
                     f"method: {_compression_method(block.bimg_info)}")
    return text


def format_record(record: DecodedRecord) -> str:
    """The record line, then one tab-indented line per block ref (no trailing newline)."""
    name = record_type_name(record.rmid, record.info)
    if name is None:
        name = f"info 0x{record.info & 0xF0:02X}"
    prev = record.prev
    line = (f"rmgr: {rmgr_name(record.rmid):<11s} "
            f"len (rec/tot): {record.tot_len - record.fpi_len:6d}/{record.tot_len:6d}, "
            f"tx: {record.xid:10d}, lsn: {record.lsn >> 32:X}/{record.lsn & 0xFFFFFFFF:08X}, "
            f"prev {prev >> 32:X}/{prev & 0xFFFFFFFF:08X}, desc: {name}")
    if not record.blocks:
        return line
    return "\n\t".join([line, *(format_block(b) for b in record.blocks)])
