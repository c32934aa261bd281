"""The lazy file system's FUSE server process (its watchdog is `watch.py`).

`python -m strata.compute.lazyfs mount --store DIR --mountpoint DIR --pageserver HOST:PORT
--tenant T --timeline TL --lsn X [--wait-stdin]` (first waiting for a line on stdin,
`go` or `go X` without --lsn, so that its start overlaps the starting process's sync step
and basebackup) creates the segment files
of `DIR/strata_lazy_rels` as sparse files in `DIR/tree` (which holds the basebackup's
`base/` and `global/`; each on first use, `layout.py`), renews the
compute's LSN lease on X for as long as it runs (D5),
and serves `DIR/tree` at the mount point in the foreground until unmounted or sent
SIGTERM. While the pageserver is unreachable, a read waits for it up to `--outage-wait-s`
(default 60). With `--pageserver-file F` the address is F's (re-read when F changes:
`strata tenant relocate` moves running computes to another pageserver). With
`--prewarm-file F` it fetches the blocks F lists in the background at once and saves to F
the blocks PostgreSQL reads first (`prewarm.py`). As it exits it
logs the pages it fetched, its CPU time and the FUSE operations it answered by kind, with
their count, seconds and errors (`opstats.py`; `bench/run regress` reads that line).
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    # The server's imports (~0.2 s of CPU, overlapping the starting CLI's) leave next to
    # no garbage: no cyclic collection during them (~45 for nothing); frozen at the end.
    gc.disable()

import argparse
import base64
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import mfusepy as fuse

from strata.common.auth import TOKEN_ENV
from strata.common.errors import StrataError
from strata.common.ids import TenantId, TimelineId
from strata.common.logctx import setup_logging, timeline_context
from strata.common.lsn import Lsn
from strata.compute.lazyfs import TREE
from strata.compute.lazyfs.blockstate import DEFAULT_MAX_WINDOW
from strata.compute.lazyfs.fetcher import PageFetcher
from strata.compute.lazyfs.fs import LazyFs
from strata.compute.lazyfs.layout import plan_layout
from strata.compute.lazyfs.opstats import Counted, OpStats
from strata.compute.lazyfs.prewarm import ReadLog, load, prewarm
from strata.compute.lazyfs.watch import FUSERMOUNT, detach
from strata.compute.pageserver_address import AddressFile
from strata.pageserver.page_client import PageClientSync

log = logging.getLogger("strata.compute.lazyfs")

__all__ = ["FUSERMOUNT", "TREE", "detach", "main"]


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def _renew_lease(client: PageClientSync, lsn: Lsn, lease_s: float, stop: threading.Event) -> None:
    """Take the lease on `lsn` at once (the starting process holds one already), then
    renew it every third of its length."""
    wait_s = 0.0
    while not stop.wait(wait_s):
        wait_s = lease_s / 3
        try:
            client.lease(lsn, lease_s)
        except StrataError as err:
            # The lease still runs for up to two thirds of its length; try again soon.
            log.warning("could not renew the lease on %s: %s; retrying in 5s", lsn, err)
            wait_s = 5


def _start_lsn(args: argparse.Namespace) -> Lsn | None:
    """`--lsn`, or with `--wait-stdin` the LSN on the line read (`go LSN`; a bare `go`
    keeps `--lsn`); None when the starting process gave up (end of file)."""
    lsn = Lsn.parse(args.lsn) if args.lsn else None
    if args.wait_stdin:
        words = sys.stdin.readline().split()
        if not words:
            return None
        if len(words) > 1:
            lsn = Lsn.parse(words[1])
    if lsn is None:
        raise StrataError("no start LSN: give --lsn, or `go LSN` on stdin with --wait-stdin")
    return lsn


def mount_main(args: argparse.Namespace) -> int:
    store = Path(args.store)
    tenant, timeline = TenantId.parse(args.tenant), TimelineId.parse(args.timeline)
    host, port = args.pageserver.rsplit(":", 1)
    with timeline_context(tenant, timeline):
        # Our own threads (the page client's loop, the lease renewer) must never take
        # SIGTERM: libfuse's handler only sets an exit flag, which ends the loop when the
        # signal interrupts the main thread or a FUSE worker, not one of ours. Threads
        # inherit the mask, so block the signals while they are created.
        saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            address = None
            if args.pageserver_file:
                address = AddressFile(args.pageserver_file).pg
            client = PageClientSync(host, int(port), tenant, timeline,
                                    outage_wait_s=args.outage_wait_s, address=address)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        # With --wait-stdin the starting process fills the store meanwhile (and holds a
        # lease on the LSN it sends).
        lsn = _start_lsn(args)
        if lsn is None:
            log.info("the starting process gave up before the store was ready; exiting")
            client.close()
            return 1
        stop = threading.Event()
        saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            # Its first lease (and the page connection) overlaps the mount.
            threading.Thread(target=_renew_lease, args=(client, lsn, args.lease_s, stop),
                             daemon=True, name="lease").start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        remote, control, layout = plan_layout(store, args.readahead)
        fetcher = PageFetcher(client, lsn, checksums=control.data_checksum_version != 0)
        # The segment files are created on first use (layout.py).
        ops = LazyFs(str(store / TREE), fetcher, remote, layout)
        if args.prewarm_file:
            # The blocks the last run read first, fetched while PostgreSQL starts; this
            # run's first reads are noted for the next start (prewarm.py).
            ops.reads = ReadLog(Path(args.prewarm_file))
            plan = load(ops.reads.path)
            if plan:
                saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                try:
                    threading.Thread(target=prewarm, args=(ops, plan), daemon=True,
                                     name="prewarm").start()
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        stats = OpStats()
        log.info("serving %s at %s: %d remote segment files at %s", store / TREE,
                 args.mountpoint, len(remote), lsn)
        try:
            fuse.FUSE(Counted(ops, stats), args.mountpoint, foreground=True, allow_other=True,
                      default_permissions=True, fsname="strata-lazyfs", subtype="strata")
        except RuntimeError as err:
            # fuse_main's loop ends with an error when the mount was detached under it
            # (the watchdog after PostgreSQL exited): that is a normal end.
            if os.path.ismount(args.mountpoint):
                raise
            log.info("%s was unmounted (fuse_main returned %s)", args.mountpoint, err)
        finally:
            stop.set()
            if ops.reads is not None:
                ops.reads.save()
            client.close()
            cpu = os.times()
            log.info("file system server exits: fetched %d pages in %d requests; "
                     "%.1f s of CPU (user %.1f, system %.1f); ops: %s", fetcher.pages,
                     fetcher.requests, cpu.user + cpu.system, cpu.user, cpu.system,
                     stats.summary())
    return 0


def _early_argv() -> list[str] | None:
    """`early` (strata.compute.fuse_early): this process was started before its
    arguments were known, with its output discarded. Read them from stdin (one JSON
    line), send the output to the log file named there and take the token; None at end
    of file (the CLI did not need this process)."""
    line = sys.stdin.readline()
    if not line.strip():
        return None
    spec = json.loads(line)
    fd = os.open(spec["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    if spec.get("token"):
        os.environ[TOKEN_ENV] = spec["token"]
    else:
        os.environ.pop(TOKEN_ENV, None)
    return [str(a) for a in spec["argv"]]


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:] == ["early"]:
        argv = _early_argv()
        if argv is None:
            return 0
    parser = argparse.ArgumentParser(prog="python -m strata.compute.lazyfs")
    sub = parser.add_subparsers(dest="command", required=True)
    mount = sub.add_parser("mount", help="serve a lazy compute's base/ and global/")
    mount.add_argument("--store", required=True)
    mount.add_argument("--mountpoint", required=True)
    mount.add_argument("--pageserver", required=True, help="host:pg_port")
    mount.add_argument("--tenant", required=True)
    mount.add_argument("--timeline", required=True)
    mount.add_argument("--lsn", help="the start LSN (with --wait-stdin: unless the line "
                                      "read is `go LSN`)")
    mount.add_argument("--lease-s", type=float, default=600.0)
    mount.add_argument("--readahead", type=int, default=DEFAULT_MAX_WINDOW,
                       help="largest readahead window in blocks")
    mount.add_argument("--outage-wait-s", type=float, default=60.0,
                       help="how long a read waits for an unreachable pageserver")
    mount.add_argument("--pageserver-file",
                       help="a JSON file with the pageserver's address, re-read when it "
                            "changes (strata.compute.pageserver_address): reads follow a "
                            "relocation of the tenant"),
    mount.add_argument("--prewarm-file",
                       help="fetch the blocks this file lists before PostgreSQL reads them, "
                            "and write there the blocks this run reads first (prewarm.py)")
    mount.add_argument("--wait-stdin", action="store_true",
                       help="read a line from stdin (`go` or `go LSN`) before using the "
                            "store (the starting process fills it meanwhile); exit at "
                            "end of file")
    args = parser.parse_args(argv)
    setup_logging()
    log.info("page requests carry %s", _token_scope(os.environ.get(TOKEN_ENV)))
    return mount_main(args)


def _token_scope(token: str | None) -> str:
    """What the log says of the token (its scope claim, never the token itself)."""
    if not token:
        return "no token"
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return f"a token of scope {claims['scope']}"
    except (IndexError, ValueError, KeyError, TypeError):
        return "a token that is not a JWT"


if __name__ == "__main__":
    gc.freeze()  # what the imports built: out of the collector's reach, then it is on
    gc.enable()
    sys.exit(main())
