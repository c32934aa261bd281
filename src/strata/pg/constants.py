"""PostgreSQL 15 constants shared by the format modules (values from the 15 headers)."""

from __future__ import annotations

from enum import IntEnum

BLCKSZ = 8192
XLOG_BLCKSZ = 8192
RELSEG_SIZE = 131072  # blocks per relation segment file (1 GB)
PG_MAJORVERSION = "15"
XLOG_PAGE_MAGIC = 0xD110  # xlog_internal.h, PG15
PG_CONTROL_VERSION = 1300
CATALOG_VERSION_NO = 202209061
MAXIMUM_ALIGNOF = 8

# Directories initdb creates that a started server expects (initdb.c `subdirs`), in an
# order where parents come first. Relation, SLRU, WAL and slot files go inside them.
PGDATA_DIRS = (
    "global", "base", "pg_commit_ts", "pg_dynshmem", "pg_logical", "pg_logical/mappings",
    "pg_logical/snapshots", "pg_multixact", "pg_multixact/members", "pg_multixact/offsets",
    "pg_notify", "pg_replslot", "pg_serial", "pg_snapshots", "pg_stat", "pg_stat_tmp",
    "pg_subtrans", "pg_tblspc", "pg_twophase", "pg_wal", "pg_wal/archive_status", "pg_xact",
)

# pg_tablespace OIDs (pg_tablespace.dat)
DEFAULTTABLESPACE_OID = 1663
GLOBALTABLESPACE_OID = 1664


class ForkNumber(IntEnum):
    """relpath.h"""

    MAIN = 0
    FSM = 1
    VISIBILITYMAP = 2
    INIT = 3


FORK_SUFFIX = {ForkNumber.MAIN: "", ForkNumber.FSM: "_fsm",
               ForkNumber.VISIBILITYMAP: "_vm", ForkNumber.INIT: "_init"}


class RmgrId(IntEnum):
    """rmgrlist.h order."""

    XLOG = 0
    TRANSACTION = 1
    STORAGE = 2
    CLOG = 3
    DATABASE = 4
    TABLESPACE = 5
    MULTIXACT = 6
    RELMAP = 7
    STANDBY = 8
    HEAP2 = 9
    HEAP = 10
    BTREE = 11
    HASH = 12
    GIN = 13
    GIST = 14
    SEQUENCE = 15
    SPGIST = 16
    BRIN = 17
    COMMIT_TS = 18
    REPLORIGIN = 19
    GENERIC = 20
    LOGICALMSG = 21


# pg_waldump's names for the resource managers (rmgrlist.h, first column).
RMGR_NAMES = {
    RmgrId.XLOG: "XLOG", RmgrId.TRANSACTION: "Transaction", RmgrId.STORAGE: "Storage",
    RmgrId.CLOG: "CLOG", RmgrId.DATABASE: "Database", RmgrId.TABLESPACE: "Tablespace",
    RmgrId.MULTIXACT: "MultiXact", RmgrId.RELMAP: "RelMap", RmgrId.STANDBY: "Standby",
    RmgrId.HEAP2: "Heap2", RmgrId.HEAP: "Heap", RmgrId.BTREE: "Btree", RmgrId.HASH: "Hash",
    RmgrId.GIN: "Gin", RmgrId.GIST: "Gist", RmgrId.SEQUENCE: "Sequence",
    RmgrId.SPGIST: "SPGist", RmgrId.BRIN: "BRIN", RmgrId.COMMIT_TS: "CommitTs",
    RmgrId.REPLORIGIN: "ReplicationOrigin", RmgrId.GENERIC: "Generic",
    RmgrId.LOGICALMSG: "LogicalMessage",
}

# xlogrecord.h: bits of xl_info
XLR_INFO_MASK = 0x0F
XLR_RMGR_INFO_MASK = 0xF0
XLR_SPECIAL_REL_UPDATE = 0x01
XLR_CHECK_CONSISTENCY = 0x02

# xlogrecord.h: bimg_info
BKPIMAGE_HAS_HOLE = 0x01
BKPIMAGE_APPLY = 0x02
BKPIMAGE_COMPRESS_PGLZ = 0x04
BKPIMAGE_COMPRESS_LZ4 = 0x08
BKPIMAGE_COMPRESS_ZSTD = 0x10
BKPIMAGE_COMPRESSED_MASK = 0x1C

# xlogrecord.h: fork_flags
BKPBLOCK_FORK_MASK = 0x0F
BKPBLOCK_HAS_IMAGE = 0x10
BKPBLOCK_HAS_DATA = 0x20
BKPBLOCK_WILL_INIT = 0x40
BKPBLOCK_SAME_REL = 0x80

XLR_MAX_BLOCK_ID = 32
XLR_BLOCK_ID_DATA_SHORT = 255
XLR_BLOCK_ID_DATA_LONG = 254
XLR_BLOCK_ID_ORIGIN = 253
XLR_BLOCK_ID_TOPLEVEL_XID = 252

# xlog_internal.h: xlp_info
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_BKP_REMOVABLE = 0x0004
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x0008
XLP_ALL_FLAGS = 0x000F

SIZE_OF_XLOG_RECORD = 24
SIZE_OF_XLOG_SHORT_PHD = 24
SIZE_OF_XLOG_LONG_PHD = 40

# pg_control.h: XLOG rmgr info codes
XLOG_CHECKPOINT_SHUTDOWN = 0x00
XLOG_CHECKPOINT_ONLINE = 0x10
XLOG_NOOP = 0x20
XLOG_NEXTOID = 0x30
XLOG_SWITCH = 0x40
XLOG_BACKUP_END = 0x50
XLOG_PARAMETER_CHANGE = 0x60
XLOG_RESTORE_POINT = 0x70
XLOG_FPW_CHANGE = 0x80
XLOG_END_OF_RECOVERY = 0x90
XLOG_FPI_FOR_HINT = 0xA0
XLOG_FPI = 0xB0
XLOG_OVERWRITE_CONTRECORD = 0xD0

# gistxlog.h: the GiST record kinds whose left child gistplacetopage changes after XLogInsert
XLOG_GIST_PAGE_UPDATE = 0x00
XLOG_GIST_PAGE_SPLIT = 0x30
