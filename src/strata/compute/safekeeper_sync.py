"""The walproposer's one-shot sync mode (D7) as blocking code: the sync step of `strata
endpoint start` and of `python -m strata.compute.walproposer --sync`.

The same `Proposer` (sans-IO, `strata.safekeeper.proposer`) in sync mode, driven over one
connection per safekeeper (`strata.pg.blockingclient`: user `strata`, the command
`proposer <tenant> <timeline>`, one encoded `strata.safekeeper.messages` message per
CopyData). Each link is a thread that (re)connects with backoff, sends our greeting and
what waited while it was down, and queues every message it reads; the calling thread
hands them to the Proposer in arrival order and runs its timer (`tick`, resends), so the
Proposer is only ever touched by one thread. A proposer that another one outbids is
replaced by a new one (a new id, a higher term) until the deadline.

Why not asyncio, as the sidecar (`strata.compute.walproposer.QuorumDriver`): `endpoint
start` runs it once per start, and importing the asyncio stack (asyncio, the sidecar,
`strata.pg.wire`) was ~40 ms of CPU, the largest piece of the CLI's own start after click
(issue 13). The Proposer, which holds the protocol's logic, is shared.
"""

from __future__ import annotations

import logging
import queue
import random
import secrets
import threading
import time
from collections import deque
from dataclasses import replace

from strata.common.auth import default_token
from strata.common.errors import ProtocolError, StrataError, Unavailable
from strata.compute.quorum import (
    DEFAULT_APPLICATION_NAME,
    QuorumConfig,
    SafekeeperAddr,
    SyncResult,
)
from strata.pg.blockingclient import BlockingPgConnection, copy_data
from strata.safekeeper.messages import (
    AcceptorGreeting,
    AppendResponse,
    ProposerGreeting,
    ProposerMessage,
    ReadWalResponse,
    VoteResponse,
    decode,
    encode,
)
from strata.safekeeper.proposer import (
    Fenced,
    Proposer,
    ProposerAction,
    ProposerConfig,
    Send,
    SyncDone,
)

log = logging.getLogger(__name__)

_TICK_S = 0.02  # as the asyncio driver's
_LINK_QUEUE_MAX = 4096  # messages waiting for a link that is down (the oldest are dropped)
_ACCEPTOR_MESSAGES = (AcceptorGreeting, VoteResponse, AppendResponse, ReadWalResponse)


class _Link:
    """The connection to one safekeeper, read by its own thread."""

    def __init__(self, addr: SafekeeperAddr, config: QuorumConfig, greeting: bytes,
                 inbox: queue.SimpleQueue[tuple[int, bytes]]) -> None:
        self.addr = addr
        self.config = config
        self.greeting = greeting
        self.inbox = inbox
        self.command = f"proposer {config.tenant_id} {config.timeline_id}"
        self.waiting: deque[bytes] = deque(maxlen=_LINK_QUEUE_MAX)
        self.conn: BlockingPgConnection | None = None  # while connected and greeted
        self.last_error: str | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"sync-sk{addr.node_id}")

    def send(self, msg: bytes) -> None:
        with self.lock:
            if self.conn is None:
                self.waiting.append(msg)
                return
            try:
                self.conn.send(copy_data(msg))
            except Unavailable:
                pass  # the reader sees the connection end; the Proposer resends

    def stop(self) -> None:
        self.stopped.set()
        with self.lock:
            conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()

    def _run(self) -> None:
        backoff = 0.05
        while not self.stopped.is_set():
            connected = False
            try:
                connected = self._session()
            except (StrataError, OSError) as err:
                self.last_error = str(err)
            if connected:
                backoff = 0.05
            if self.stopped.wait(backoff):
                return
            backoff = min(backoff * 2, self.config.backoff_max_s)

    def _session(self) -> bool:
        cfg = self.config
        conn = BlockingPgConnection.connect(
            self.addr.host, self.addr.port, user=cfg.user, password=default_token(),
            application_name=DEFAULT_APPLICATION_NAME, timeout_s=cfg.connect_timeout_s)
        try:
            conn.start_copy_both(self.command, time.monotonic() + cfg.connect_timeout_s)
            with self.lock:
                if self.stopped.is_set():
                    return True
                conn.send(copy_data(self.greeting))
                while self.waiting:
                    conn.send(copy_data(self.waiting.popleft()))
                self.conn = conn
            while True:
                payload = conn.read_copy_data(self.command)
                if payload is None:
                    raise Unavailable("the safekeeper ended the proposer stream")
                self.inbox.put((self.addr.node_id, payload))
        finally:
            with self.lock:
                if self.conn is conn:
                    self.conn = None
            conn.abort()


def _attempt(config: QuorumConfig, system_id: int,
             deadline: float) -> tuple[SyncResult | None, str | None, str]:
    """One proposer until it is done, fenced or the deadline: (result, fenced, the links'
    last errors)."""
    proposer = Proposer(ProposerConfig(
        tenant_id=config.tenant_id, timeline_id=config.timeline_id, system_id=system_id,
        wal_seg_size=config.wal_seg_size, proposer_id=config.proposer_id,
        acceptors=tuple(a.node_id for a in config.safekeepers), sync=True,
        retry_interval_s=config.retry_interval_s), random.Random(config.proposer_id))
    greeting = encode(ProposerGreeting(config.tenant_id, config.timeline_id, system_id,
                                       config.wal_seg_size, config.proposer_id))
    inbox: queue.SimpleQueue[tuple[int, bytes]] = queue.SimpleQueue()
    links = {a.node_id: _Link(a, config, greeting, inbox) for a in config.safekeepers}
    encoded: tuple[ProposerMessage | None, bytes] = (None, b"")
    result: SyncResult | None = None
    fenced: str | None = None

    def apply(actions: list[ProposerAction]) -> None:
        nonlocal encoded, result, fenced
        for action in actions:
            match action:
                case Send(node=node, msg=msg):
                    # The same message often goes to every node: encode it once.
                    if encoded[0] is None or encoded[0] != msg:
                        encoded = (msg, encode(msg))
                    links[node].send(encoded[1])
                case Fenced(term=term):
                    fenced = fenced or (f"a safekeeper knows term {term}, above our term "
                                        f"{proposer.term}: another proposer took over")
                case SyncDone(end_lsn=end, prev_record_lsn=prev):
                    result = SyncResult(end, prev)

    for link in links.values():
        link.thread.start()
    try:
        now = time.monotonic()
        apply(proposer.start(now))
        next_tick = now + _TICK_S
        while result is None and fenced is None:
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                node, payload = inbox.get(timeout=max(0.0, min(next_tick, deadline) - now))
            except queue.Empty:
                pass
            else:
                try:
                    msg = decode(payload)
                    if not isinstance(msg, _ACCEPTOR_MESSAGES):
                        raise ProtocolError(f"a safekeeper sent a proposer message "
                                            f"{type(msg).__name__}")
                    apply(proposer.handle(time.monotonic(), node, msg))
                except ProtocolError as err:
                    # A safekeeper broke the protocol: we cannot trust our view of the quorum.
                    fenced = f"protocol error from a safekeeper: {err}"
            now = time.monotonic()
            if now >= next_tick:
                apply(proposer.tick(now))
                next_tick = now + _TICK_S
    finally:
        for link in links.values():
            link.stop()
    errors = "; ".join(f"sk{n}: {link.last_error}" for n, link in links.items()
                       if link.last_error)
    return result, fenced, errors


def sync_safekeepers(config: QuorumConfig, system_id: int,
                     timeout_s: float = 30.0) -> SyncResult:
    """Elect, recover and durably commit the agreed end of the log on a majority (D7).

    Returns where the next compute starts. A proposer that another one outbids is replaced
    by a new one (a new id, a higher term) until `timeout_s`; Unavailable when no majority
    answers by then."""
    deadline = time.monotonic() + timeout_s
    attempt = config
    while True:
        result, fenced, errors = _attempt(attempt, system_id, deadline)
        if result is not None:
            log.info("sync of timeline %s done: the log ends at %s (previous record %s)",
                     config.timeline_id, result.lsn, result.prev_lsn)
            return result
        if time.monotonic() >= deadline or fenced is None:
            raise Unavailable(f"sync of timeline {config.timeline_id} did not finish in "
                              f"{timeout_s}s ({fenced or errors}); are a majority of the "
                              "safekeepers up?")
        log.info("sync proposer outbid (%s); retrying with a new one", fenced)
        attempt = replace(attempt, proposer_id=secrets.randbits(62) + 1)
