"""Direct links between cluster nodes: stanzas to another node's sessions over TCP.

Why: through Redis a crossing stanza costs two round trips (the sender's
FORWARD, the receiver's XREAD): about twice the CPU of a local delivery
(docs/bench.md). Over a link it is one write on the sender and one read on
the receiver, and the acknowledgements go in batches. Redis keeps the
session table, the heartbeats and the reaping; the inbox stream stays the
fallback path, and every guarantee of docs/cluster.md ("What can be lost or
repeated") holds for both:

- Each node listens (cluster.link) and publishes the address its peers dial
  (cluster.link_advertise, else the bound one) next to its heartbeat; the
  peers learn it on their heartbeat and keep it (no Redis read per stanza).
  On Linux it also listens on an abstract Unix socket and publishes its name
  with the identity of its kernel and network namespace (`host_identity`):
  a peer in the same one (the workers of `xmppd --workers N`) dials that
  instead: a stanza's write and read cost the kernel less there than over
  TCP on loopback (no TCP/IP processing, no acks of its own; docs/bench.md,
  "Unix sockets and unparsed stanzas between workers").
  It accepts links only once it serves (its modules loaded: `Link.start`
  says why); until then a dial is refused, and its peers send through its
  inbox, which holds what they send until it serves.
- A link is authenticated both ways by HMAC with the cluster secret
  (cluster.secret, else 32 random bytes one node SET NX in Redis), and over
  TCP every frame after the handshake is encrypted and authenticated
  (AES-256-GCM, keys fresh per connection from an X25519 exchange): a frame
  that does not open closes the link, as a lost link (the wire format, the
  handshake and why: xmppd.cluster.wire). Over the Unix socket frames go in
  clear: no network path, the kernel is the only one between the nodes.
- The dialing node sends; the accepting node handles the items exactly as
  its inbox does (`ItemHandler`), after the sender's table changes before
  them (`ReplicaSync.caught_up`), and acknowledges what it handled at most
  every ACK_DELAY (not per stanza). The sender keeps every frame until it
  is acknowledged.
- Link lost, the peer still live: the sender dials again; the handshake says
  which frame the peer handled last on that sender's incarnation, and only
  the rest is sent again (no duplicates while the peer process lives).
- Peer dead (not live in the heartbeat's list, or a forward to it refused:
  `gone`): what it did not acknowledge is routed again here (other resources,
  offline storage), at least once, as the reaper does with a dead node's
  inbox; a stream end goes through Redis (the peer may still run). A peer
  that knows it is not live (its heartbeat lapsed past its TTL, or it stops)
  refuses frames (NACK): routed again here.
- No link within CONNECT_WAIT (no address, refused, handshake failed) or
  Redis unhealthy on this node (the writer's forward_wait then decides: the
  replica may be stale): the stanza goes through Redis, which has its own
  bounds and refusals; in the second case only once the frames the link
  holds for that node are acknowledged (`Peer.after_acks`, "Order" below).
- A slow receiver: past MAX_UNACKED bytes written and not acknowledged, the
  next frames wait on the sender for acks; past MAX_HELD bytes held, the
  link is given up: what it held goes through Redis, in order, then what
  comes, and it is dialed again after RETRY_DELAY.
- A clean stop sends what is queued, waits DRAIN_WAIT for the acks, and
  sends what is not acknowledged through Redis.

Order: the stanzas one node sends another keep their order whichever path
each takes. From Redis to the link: the writer numbers what it sends each
node through Redis; a frame carries the number of the last one before its
items (a frame ends where one went through Redis in between), and the
receiver handles the frame once its inbox handled that one
(`Inbox.caught_up`, bounded by ORDER_WAIT: one refused or lost on the way
never comes; so one merely slow, the receiver's inbox more than ORDER_WAIT
behind, is overtaken: out of order, not lost).
From the link to Redis: a stanza takes Redis only when the link holds
nothing (it is down, and what it held went through Redis first, in order),
never past a frame still unacknowledged: a slow receiver makes the sender
hold (MAX_HELD says why). Redis unhealthy on this node, a stanza for a
node whose link holds frames waits on this side until they are
acknowledged, and what comes for that node meanwhile waits behind it; then
they go to the writer, in order. Should the link be given up, redialed in
vain or stopped first, the frames' records go through Redis ahead of them.
They are bounded as the frames are: their bytes count toward MAX_HELD
(past it the link is given up: the frames, then they, through Redis), and
forward_wait counts from when each came: once the writer cuts Redis off
(a stanza in it, or one of them, waited that long), it takes them in with
what it holds and routes them all again here, in order, ahead of what
comes next (`Link.release_waiting`). Short of both, a receiver that
acknowledges nothing keeps them at most ACK_DEADLINE (then the link is
dialed again, or given up if that fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import secrets
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from lxml import etree
from redis.typing import EncodableT

from xmppd import batchloop
from xmppd.cluster import wire
from xmppd.cluster.inbox import Inbox, ItemHandler, split_fields
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync
from xmppd.cluster.waiting import Copy
from xmppd.config import split_advertised

log = logging.getLogger(__name__)

CONNECT_WAIT = 2.0
"""Seconds a link may take to connect and authenticate; what waited for it then goes
through Redis."""
HANDSHAKE_WAIT = 5.0
"""Seconds an accepted connection has to authenticate before it is closed."""
RETRY_DELAY = 1.0
"""Seconds after a failed dial during which stanzas for that peer go through Redis."""
MAX_UNACKED = 8 * 1024 * 1024
"""Bytes written on a link and not acknowledged, past which the next frames wait on the
sender for acks (a window: the receiver reads no more than this ahead of what it
handled, and the sender's transport buffers no second copy of what it holds)."""
MAX_HELD = 32 * 1024 * 1024
"""Bytes of frames one peer may hold (written or waiting for the window), with the
items waiting behind them for Redis (`Peer.after_acks`), past which
the link is given up: everything it held, then the stanza, goes through Redis in
order, and the link is dialed again after RETRY_DELAY. Why not switch to Redis at
MAX_UNACKED, as the link once did: a stanza through Redis overtakes the frames still
waiting on the link, and a receiver that lags for a moment (a busy loop, a GC pause)
would see its stanzas out of order. Holding keeps the order at the price of the
sender's memory, bounded here per peer; a receiver 4 windows behind is not slow for a
moment, and its inbox (bounded by INBOX_MAXLEN) takes such a backlog. What it held
carries its frame through Redis, and the receiver takes each frame once, whichever
path brings it first (`Link.redis_copy`)."""
ACK_DEADLINE = 10.0
"""Seconds the oldest frame written on a link may wait for its ack before the link is
dialed anew (the handshake says what the peer handled; the rest is sent again). A
connection a NAT or firewall dropped without a word, or a path between two nodes that
both still reach Redis, raises nothing: the frames would wait for the kernel to give
up retransmitting (~15 min), and every later stanza for that node behind them. A
receiver may hold a frame for ORDER_WAIT (xmppd.cluster.sync) per wait, twice, plus
ACK_DELAY: 10 s leaves a loaded node room, and a redial costs nothing repeated."""
DRAIN_WAIT = 2.0
"""Seconds a clean stop waits for the peers to acknowledge what was sent."""
YIELD_EVERY = 500
"""Stanzas a receiver handles in one run before the event loop gets a turn (a backlog
that waited for the sender's Redis items may hold thousands)."""
ACK_DELAY = 0.05
"""Seconds a receiver gathers what it handled before it acknowledges it: at steady
rates most frames hold one stanza, and an ack per frame would cost each side a
syscall and a wake-up per stanza (at 5 ms, a crossing at 1000 msg/s still cost 2.12
read syscalls and 1.65 wake-ups; at 50 ms 1.87 and 1.36-1.40: docs/bench.md, "Direct
links between nodes"). What is handled is recorded at once (a reconnect's handshake
reports it), so the delay costs memory on the sender, and, when the receiver dies,
what it handled in its last ACK_DELAY is routed again by the sender: the same at
least once as the inbox's (up to a second's worth handled and not trimmed)."""


@dataclass(slots=True)
class Record:
    """One item on a link: a stanza (forwarded `hops` times before) or a stream end
    (`stanza` None), its fields as the inbox takes them, the sender's last table change
    before it, and what went through Redis before it."""

    stanza: etree._Element | None
    hops: int
    item: list[EncodableT]
    change: int
    redis: int = 0
    """The number of the last item sent to the same node through Redis before it."""
    link: str = ""
    frame: int = 0
    """The link (the peer's incarnation) and frame it was put in; 0: none yet. Should it
    go through Redis after all, they go with it: the receiver takes each frame once,
    from whichever path brings it first (`Link.redis_copy`)."""
    since: float = 0.0
    """For Redis from the start, held until the link's frames are acknowledged
    (`Peer.after_acks`): when it came (monotonic), from which forward_wait counts."""


@dataclass(slots=True)
class Held:
    """A data frame sent (or to send) and not acknowledged yet."""

    seq: int
    frame: bytes
    records: list[Record] = field(default_factory=list)


def host_identity() -> str | None:
    """The kernel (its boot id) and network namespace this process runs in: the nodes
    that share both reach each other's abstract Unix sockets (Linux; None elsewhere,
    or if /proc does not say). Read once per node at start, from memory (procfs)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        netns = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return None
    return f"{boot_id}.{netns}"


LOCAL = " local="
"""What separates the TCP address from the local one in an advertised address:
"HOST:PORT local=<host identity>/<abstract socket name>"."""


class Link:
    """This node's links: the listener for its peers' and one `Peer` per node it sends to.

    Set by the cluster before `start`: `fallback(node, record)` sends a record
    through Redis (Writer.queue_item), `reroute(stanza, hops, avoid)` routes a
    stanza again here, `on_gone(node)` is called when a peer refused frames
    (Cluster.node_gone), `live()` says whether this node may still take stanzas
    (its heartbeat has not lapsed), `redis_items(node)` is the number of the last item
    sent to `node` through Redis (Writer.redis_items). `serve(inbox)` once the modules
    are loaded: only then does it accept links (`start` binds the port to advertise, but
    does not listen)."""

    def __init__(
        self, node: str, host: str, port: int, advertise: str | None, stats: ClusterStats,
        sync: ReplicaSync, unix: bool = True,
    ) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.advertise = advertise
        self.stats = stats
        self.sync = sync
        self.secret = b""
        self.address: str | None = None
        self.fallback: Callable[[str, Record], None] = lambda node, record: None
        self.reroute: Callable[[etree._Element, int, str | None], Awaitable[object] | None] = (
            lambda stanza, hops, avoid: None
        )
        self.on_gone: Callable[[str], None] = lambda node: None
        self.live: Callable[[], bool] = lambda: False
        self.redis_items: Callable[[str], int] = lambda node: 0
        self.inbox: Inbox | None = None
        self.items: ItemHandler | None = None
        self.stopping = False
        self.addresses: dict[str, str] = {}  # peer -> the address it advertises
        self._peers: dict[str, Peer] = {}
        self._inbound: dict[str, Inbound] = {}  # peer -> its current link to this node
        self._accepted: set[Inbound] = set()  # every open connection to this node
        self._handled: dict[str, tuple[str, int]] = {}  # peer -> (incarnation, last seq)
        # peer -> (incarnation, {frame: its stanzas that wait behind an account's jobs
        # and are not in the waiting stream yet}): not acknowledged before (`hold`).
        self._unsafe: dict[str, tuple[str, dict[int, int]]] = {}
        self._server: asyncio.Server | None = None
        self._local_server: asyncio.Server | None = None
        # None: neither offer nor dial a Unix socket (cluster.link.unix false, not Linux).
        self.host_id = host_identity() if unix else None
        self._acked = asyncio.Event()

    async def start(self, secret: bytes) -> str:
        """Bind the port (not listening yet: `serve`); returns the address to advertise.

        Why not accept links before `serve`: the node is live (its heartbeat lists it,
        the peers dial it) while its modules load, and a frame handled then could not be
        routed (offline storage), while a NACK would make the sender route the stanzas
        on its side and drop the session ends as for a dead node. A connection to a
        bound port that does not listen is refused at once: the sender sends through
        Redis, and the inbox, read from `serve` on, holds the items meanwhile."""
        self.secret = secret
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Inbound(self), self.host, self.port, start_serving=False
        )
        bound = self._server.sockets[0].getsockname()
        host, port = split_advertised(self.advertise) if self.advertise else (bound[0], None)
        host = f"[{host}]" if ":" in host else host
        self.address = f"{host}:{port or bound[1]}"
        log.info("cluster: links from other nodes on %s:%d (advertised %s)",
                 bound[0], bound[1], self.address)
        local = await self._listen_locally()
        return self.address if local is None else f"{self.address}{LOCAL}{local}"

    async def _listen_locally(self) -> str | None:
        """Bind an abstract Unix socket for the peers on this host (listening from
        `serve`, as the TCP port); returns what they need to dial it, or None (not
        Linux, or refused: they dial TCP)."""
        if self.host_id is None:
            return None
        name = f"xmppd-link-{secrets.token_hex(8)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.setblocking(False)
            self._local_server = await asyncio.get_running_loop().create_unix_server(
                lambda: Inbound(self), sock=sock, start_serving=False
            )
        except OSError as exc:
            sock.close()
            log.warning("cluster: no Unix socket for links from this host (%s); they "
                        "come over TCP", exc)
            return None
        log.info("cluster: links from nodes on this host on the Unix socket @%s", name)
        return f"{self.host_id}/{name}"

    def use_secret(self, secret: bytes) -> None:
        """The secret in Redis changed (Redis restarted empty, and another node stored
        its own first): links opened from now on use it, open ones stay."""
        log.warning("cluster: the link secret in Redis changed; using it for new links")
        self.secret = secret

    async def serve(self, inbox: Inbox) -> None:
        """Accept links (after the inbox started: a frame waits for the items sent
        through Redis before it, `Inbound._wait`)."""
        self.inbox = inbox
        self.items = inbox.items
        if self._server is not None and not self.stopping:
            await self._server.start_serving()
            if self._local_server is not None:
                await self._local_server.start_serving()
            log.info("cluster: accepting links from other nodes")

    def accepting(self) -> bool:
        """Whether frames are handled now (else refused: the sender routes them again).
        Not serving yet, the node accepts no link at all (`start`)."""
        return not self.stopping and self.live()

    # --- sending -----------------------------------------------------------------------

    def peers_seen(self, addresses: dict[str, str]) -> None:
        """The addresses the live peers advertise (each heartbeat): links are dialed
        ahead of the first stanza."""
        self.addresses.update(addresses)
        for node, address in addresses.items():
            peer = self._peers.get(node)
            if peer is not None and peer.address != address:
                # It restarted on another port (port 0) within its TTL: dial the new one.
                peer.address = address
                peer.retry_at = 0.0
            self._peer(node)

    def _peer(self, node: str) -> Peer | None:
        """The peer `node`, dialed if it is not linked and may be dialed now."""
        peer = self._peers.get(node)
        if peer is None:
            address = self.addresses.get(node)
            if address is None or self.stopping or not self.secret:
                return None
            peer = self._peers[node] = Peer(self, node, address)
        if peer.state == DOWN and time.monotonic() >= peer.retry_at:
            peer.dial()
        return peer

    def send(
        self, node: str, stanza: etree._Element | None, hops: int, item: list[EncodableT],
        change: int,
    ) -> bool:
        """Take `item` for `node`; False: it goes through Redis (counted as a fallback).

        Past MAX_HELD the link is given up first (what it held goes through Redis ahead
        of `item`, in order); short of it, `item` waits on the link behind the frames
        there, whatever their acks take (MAX_HELD says why). Redis unhealthy here: it
        goes through Redis (the writer's forward_wait decides), but not ahead of what
        the link holds (`Peer.after_acks`); what waits so counts toward MAX_HELD too."""
        peer = self._peer(node)
        if peer is not None and peer.unacked_bytes + peer.later_bytes > MAX_HELD:
            log.warning(
                "cluster: node %s has not acknowledged %d bytes on its link (%d more wait "
                "behind them); sending through Redis", node, peer.unacked_bytes,
                peer.later_bytes,
            )
            peer.give_up()
        if peer is None or peer.state == DOWN:
            self.stats.link_fallbacks += 1
            return False
        if not self.stats.redis_up or peer.later:
            return peer.after_acks(Record(stanza, hops, item, change, since=time.monotonic()))
        peer.queue(Record(stanza, hops, item, change, self.redis_items(node)))
        return True

    def oldest_waiting(self) -> float | None:
        """When the oldest record waiting for its link's acks came (`Peer.after_acks`,
        monotonic); None: nothing waits."""
        return min((peer.later[0].since for peer in self._peers.values() if peer.later),
                   default=None)

    def release_waiting(self) -> None:
        """What waits for its link's acks goes to the writer now, each peer's in order
        (the writer is about to cut Redis off: they expire with what it holds, and are
        routed again here in order, ahead of what comes next)."""
        for peer in self._peers.values():
            peer.release_later()

    def gone(self, node: str) -> None:
        """`node` is dead or refused frames: what it did not acknowledge is routed
        again here, at least once (it may have handled some before it died).

        A stream end goes through Redis instead: a node that refused frames or left
        the live set may still run (its heartbeat lapsed), and the session it names
        would live on beside the newer one. Dead and reaped, FORWARD refuses it (its
        sessions are gone anyway)."""
        self.addresses.pop(node, None)
        peer = self._peers.pop(node, None)
        if peer is None:
            return
        for record in peer.close():
            if record.stanza is None:
                self.fallback(node, record)
            else:
                self.stats.link_reroutes += 1
                self.reroute(record.stanza, record.hops, node)

    def refused(self, node: str) -> None:
        """`node` refused frames (a NACK): as for a reaped node with FORWARD."""
        self.stats.link_nacks += 1
        log.warning("cluster: node %s refused stanzas on its link; routing them here", node)
        self.gone(node)
        self.on_gone(node)

    def acked(self) -> None:
        self._acked.set()

    async def drain(self) -> None:
        """A clean stop: refuse what peers send from now; send what is queued, wait up
        to DRAIN_WAIT for the acks; what is not acknowledged goes through Redis."""
        self.stopping = True
        for peer in self._peers.values():
            peer.flush()
        try:
            async with asyncio.timeout(DRAIN_WAIT):
                while any(peer.held for peer in self._peers.values()):
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            pass
        peers, self._peers = self._peers, {}
        for node, peer in peers.items():
            records = peer.close()
            if records:
                log.warning("cluster: %d stanzas for node %s not acknowledged at stop; sent "
                            "through Redis", len(records), node)
            for record in records:
                self.fallback(node, record)

    async def stop(self) -> None:
        self.stopping = True
        for peer in list(self._peers.values()):
            for record in peer.close():
                self.fallback(peer.node, record)
        self._peers.clear()
        servers = [server for server in (self._server, self._local_server) if server]
        for server in servers:
            server.close()
        # Every connection, authenticated or not: the server's wait_closed waits for them.
        for inbound in list(self._accepted):
            inbound.close(graceful=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_WAIT):
                for server in servers:
                    await server.wait_closed()
        self._server = self._local_server = None

    # --- receiving ---------------------------------------------------------------------

    def accepted(self, inbound: Inbound, peer: str, incarnation: str) -> tuple[int, int]:
        """`peer` authenticated: the last frame handled from its `incarnation`, and the
        last it may be told was (`acknowledgeable`): a newer link from it replaces an
        older one, which stops handling at once."""
        old = self._inbound.get(peer)
        if old is not None and old is not inbound:
            old.close()
        self._inbound[peer] = inbound
        known, last = self._handled.get(peer, ("", 0))
        if known != incarnation:
            return 0, 0
        return last, self.acknowledgeable(peer, incarnation, last)

    def hold(self, peer: str, incarnation: str, seq: int, held: list[Copy]) -> None:
        """Frame `seq` brought stanzas that wait behind their accounts' jobs (`held`):
        it is not acknowledged before each is in the waiting stream (or had its turn).
        Acknowledged, only this node's memory would hold them, and a kill would lose
        them (xmppd.cluster.waiting)."""
        known = self._unsafe.get(peer)
        if known is None or known[0] != incarnation:
            known = self._unsafe[peer] = (incarnation, {})
        known[1][seq] = len(held)
        safe = functools.partial(self._safe, peer, incarnation, seq)
        for one in held:
            one.on_safe = safe

    def _safe(self, peer: str, incarnation: str, seq: int) -> None:
        known = self._unsafe.get(peer)
        if known is None or known[0] != incarnation:
            return  # the peer restarted since: its new frames count anew
        frames = known[1]
        frames[seq] -= 1
        if frames[seq]:
            return
        del frames[seq]
        if not frames:
            del self._unsafe[peer]
        inbound = self._inbound.get(peer)
        if inbound is not None and inbound.incarnation == incarnation:
            inbound.ack_soon()

    def acknowledgeable(self, peer: str, incarnation: str, last: int) -> int:
        """The last of the frames handled up to `last` that may be acknowledged: those
        before the oldest whose waiting stanzas are not all safe (`hold`)."""
        known = self._unsafe.get(peer)
        if known is None or known[0] != incarnation:
            return last
        for seq in known[1]:  # in the order they were handled: the oldest first
            return min(last, seq - 1)
        return last

    def redis_copy(self, peer: str, incarnation: str, seq: int) -> bool:
        """An item `peer` put in frame `seq` of its link `incarnation`, then sent through
        Redis when the link gave up (or it stopped): True if the link handled that frame
        (the item is skipped). Why: the connection it gave up on may still hold the frame
        unread here (a busy loop), and would deliver it again and out of order; it is
        closed first, so from now on the inbox alone has these frames."""
        inbound = self._inbound.get(peer)
        if inbound is not None and inbound.incarnation == incarnation:
            inbound.close()
        known, last = self._handled.get(peer, ("", 0))
        return known == incarnation and seq <= last

    def handled(self, inbound: Inbound, peer: str, incarnation: str, seq: int) -> None:
        self._handled[peer] = (incarnation, seq)

    def closed(self, inbound: Inbound, peer: str | None) -> None:
        self._accepted.discard(inbound)
        if peer is not None and self._inbound.get(peer) is inbound:
            del self._inbound[peer]


CONNECTING, UP, DOWN = "connecting", "up", "down"


class Peer:
    """The link this node sends on to one other node, and what it holds for it."""

    def __init__(self, link: Link, node: str, address: str) -> None:
        self.link = link
        self.node = node
        self.address = address
        self.incarnation = wire.nonce()  # the peer's sequence numbers start anew with it
        self.state = DOWN
        self.retry_at = 0.0
        self.held: deque[Held] = deque()
        self.unacked_bytes = 0
        # For Redis, once what is held is acknowledged (`after_acks`); in order, and
        # the bytes of their items (with `unacked_bytes`, bounded by MAX_HELD).
        self.later: list[Record] = []
        self.later_bytes = 0
        self._seq = 0
        self._queued: list[Record] = []
        self._conn: Outbound | None = None
        self._task: asyncio.Task[None] | None = None
        self._sent = 0  # the last frame written on the current connection
        self._in_flight = 0  # bytes written on it and not acknowledged (MAX_UNACKED)
        self._watch: asyncio.TimerHandle | None = None  # ACK_DEADLINE on the oldest frame
        # Kept: get_running_loop() costs a getpid() per call, and `queue` runs per stanza.
        self._loop = asyncio.get_running_loop()

    def after_acks(self, record: Record) -> bool:
        """`record` goes through Redis (Redis is unhealthy here: the writer's forward_wait
        decides), but only once the peer acknowledged every frame held for it, and what
        comes for the peer meanwhile follows it: through Redis at once, it could reach
        the peer's inbox (Redis answers again) before the peer handled those frames, and
        overtake them. False if nothing is held (nothing to overtake: Redis at once).

        Why on this side, not the receiver's (the item naming the frame to wait for):
        what the link holds may come through Redis too (given up), behind the item in
        the inbox, which could then only wait out a bound and go on out of order; here
        the frames' acks, or the records themselves if the link gives up, come first."""
        self.flush()  # what was queued in this turn: in a frame, ahead of `record`
        if not self.held:
            self.link.stats.link_fallbacks += 1
            return False
        self.later.append(record)
        self.later_bytes += sum(
            len(value) if isinstance(value, bytes) else len(str(value)) for value in record.item
        )
        return True

    def release_later(self) -> None:
        """What waited for the acks goes to the writer, in order (`after_acks`)."""
        later, self.later, self.later_bytes = self.later, [], 0
        for record in later:
            self.link.stats.link_fallbacks += 1
            self.link.fallback(self.node, record)

    def queue(self, record: Record) -> None:
        """Sent with what else is queued for this peer in this turn of the loop."""
        if not self._queued:
            self._loop.call_soon(self.flush)
        self._queued.append(record)

    def flush(self) -> None:
        """What was queued, as few frames as SPLIT_AT allows, in one write. A frame also
        ends where items went through Redis in between: the next one waits for them."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        frames = 0
        start = 0
        while start < len(queued):
            fields: list[bytes] = []
            size = 0
            end = start
            redis = queued[start].redis
            while end < len(queued) and (
                end == start or (size < wire.SPLIT_AT and queued[end].redis == redis)
            ):
                for value in queued[end].item:
                    encoded = value if isinstance(value, bytes) else str(value).encode()
                    fields.append(encoded)
                    size += len(encoded)
                end += 1
            records = queued[start:end]
            self._seq += 1
            for record in records:
                record.link, record.frame = self.incarnation, self._seq
            frame = wire.data(self._seq, max(r.change for r in records), fields, redis)
            self.held.append(Held(self._seq, frame, records))
            self.unacked_bytes += len(frame)
            frames += 1
            start = end
        stats = self.link.stats
        stats.link_frames_out += frames
        stats.link_stanzas_out += len(queued)
        self._write_pending()

    def _write_pending(self) -> None:
        """Write what is held and not written on this connection, in one write, as long
        as less than MAX_UNACKED is written and not acknowledged: the rest waits for
        the acks (each calls this again)."""
        if self.state != UP or self._conn is None or not self.held:
            return
        frames: list[bytes] = []
        # Sequence numbers in `held` follow each other, and those up to `_sent` are
        # written. A peer that restarted welcomes with a `_sent` below the first held.
        for held in itertools.islice(self.held, max(0, self._sent + 1 - self.held[0].seq), None):
            if self._in_flight >= MAX_UNACKED:
                break
            frames.append(held.frame)
            self._in_flight += len(held.frame)
            self._sent = held.seq
        if frames:
            self._conn.write_frames(frames)
            if self._watch is None:
                self._watch = self._loop.call_later(
                    ACK_DEADLINE, self._check_acks, self.held[0].seq
                )

    def _check_acks(self, oldest: int) -> None:
        """ACK_DEADLINE after `oldest` was the oldest frame written: if it is still not
        acknowledged, the connection is given up and dialed anew."""
        self._watch = None
        if not self.held or self.state != UP or self._conn is None:
            return
        if self.held[0].seq > oldest:  # acknowledged meanwhile: watch the oldest now
            self._watch = self._loop.call_later(
                ACK_DEADLINE, self._check_acks, self.held[0].seq
            )
            return
        log.warning(
            "cluster: node %s acknowledged nothing on its link for %.0f s; dialing again",
            self.node, ACK_DEADLINE,
        )
        conn, self._conn = self._conn, None
        conn.close()
        self.link.stats.link_reconnects += 1
        self.dial()

    def _unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None


    def dial(self) -> None:
        self.state = CONNECTING
        self._task = asyncio.create_task(self._connect(), name=f"cluster-link-{self.node}")

    async def _connect(self) -> None:
        handshake = wire.Dialer(self.link.secret, self.link.node, self.node, self.incarnation)
        conn = Outbound(self, handshake)
        try:
            async with asyncio.timeout(CONNECT_WAIT):
                await self._open(conn)
                last = await conn.welcomed
        except asyncio.CancelledError:
            conn.close()  # closed (gone, drain, stop) while it dialed
            raise
        except (OSError, TimeoutError, wire.WireError, ValueError) as exc:
            conn.close()
            if self.link._peers.get(self.node) is not self:
                return  # closed meanwhile
            log.warning("cluster: no link to node %s at %s (%s); sending through Redis",
                        self.node, conn.via or self.address, exc or type(exc).__name__)
            self._failed()
            return
        if self.link._peers.get(self.node) is not self:
            conn.close()
            return
        self._conn = conn
        self.state = UP
        log.info("cluster: linked to node %s at %s", self.node, conn.via)
        self._acked(last)
        self._sent = last
        self._in_flight = 0
        self._write_pending()

    async def _open(self, conn: Outbound) -> None:
        """Connect `conn`: to the peer's Unix socket when it runs in this kernel and
        network namespace, else (or if that is refused: it restarted, say) over TCP."""
        loop = asyncio.get_running_loop()
        tcp, _, local = self.address.partition(LOCAL)
        host_id, _, name = local.partition("/")
        if name and host_id == self.link.host_id:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, "\0" + name)
            except asyncio.CancelledError:
                sock.close()  # the dial was given up (CONNECT_WAIT, gone, stop)
                raise
            except OSError as exc:
                sock.close()
                # Not serving yet, or restarted: TCP says the same, and is logged.
                log.debug("cluster: the Unix socket of node %s refused (%s); dialing TCP",
                          self.node, exc)
            else:
                conn.via = f"@{name} (Unix socket)"
                conn.sealed = False  # same kernel: no network path to read or alter
                try:
                    await loop.create_unix_connection(lambda: conn, sock=sock)
                except BaseException:  # cancelled as above, or failed: not left open
                    sock.close()
                    raise
                return
        host, _, port = tcp.rpartition(":")
        conn.via = tcp
        await loop.create_connection(lambda: conn, host.strip("[]"), int(port))

    def give_up(self) -> None:
        """The peer is too far behind (MAX_HELD): what is held goes through Redis, in
        order, and the link is dialed again after RETRY_DELAY."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._failed()

    def _failed(self) -> None:
        """No link in time, or given up: what it held goes through Redis, in order."""
        self._unwatch()
        self.state = DOWN
        self.retry_at = time.monotonic() + RETRY_DELAY
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for record in self._take():
            self.link.stats.link_fallbacks += 1
            self.link.fallback(self.node, record)

    def _take(self) -> list[Record]:
        """Everything held and queued, then what waited for their acks, in order; the
        peer holds nothing after."""
        self.flush()
        records = [record for held in self.held for record in held.records]
        records += self.later
        self.held.clear()
        self.later, self.later_bytes = [], 0
        self.unacked_bytes = self._in_flight = 0
        return records

    def _acked(self, seq: int) -> None:
        """The peer handled every frame up to `seq`: they are freed."""
        held = self.held
        while held and held[0].seq <= seq:
            done = held.popleft()
            self.unacked_bytes -= len(done.frame)
            if done.seq <= self._sent:
                self._in_flight -= len(done.frame)
        if not held and self.later:
            self.release_later()  # nothing left to overtake: through Redis, in order
        self.link.acked()

    def lost(self, conn: Outbound) -> None:
        """The link broke: dial again, the peer says what it handled."""
        if conn is not self._conn:
            return
        self._conn = None
        self._unwatch()
        if self.link._peers.get(self.node) is not self or self.link.stopping:
            return
        log.warning("cluster: lost the link to node %s; dialing again", self.node)
        self.link.stats.link_reconnects += 1
        self.dial()

    def close(self) -> list[Record]:
        """Stop sending; returns what was not acknowledged, in order."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
        conn, self._conn = self._conn, None
        self._unwatch()
        self.state = DOWN
        records = self._take()
        if conn is not None:
            conn.close()
        return records


class Outbound(asyncio.Protocol):
    """The dialing end of one link connection (sends data, reads acks)."""

    def __init__(self, peer: Peer, handshake: wire.Dialer) -> None:
        self.peer = peer
        self.handshake = handshake
        self.reader = wire.FrameReader(wire.MAX_HELLO)
        self.transport: asyncio.Transport | None = None
        self.welcomed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.via = ""  # what it connected to, for the log
        self.sealed = True  # False: dialed an abstract Unix socket (`Peer._open`)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not a subclass of asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.handshake.hello(self.sealed))

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def write_frames(self, frames: list[bytes]) -> None:
        """Data frames, each sealed (one AEAD call per frame, whatever it holds), in one
        write. Only once welcomed: the keys come with the handshake."""
        seal = self.handshake.send.seal
        self.write(b"".join([seal(frame) for frame in frames]))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # what is unacknowledged is sent again or elsewhere

    def data_received(self, data: bytes) -> None:
        try:
            for kind, body in self.reader.feed(data):
                if self.handshake.last is None:
                    answer = self.handshake.answer(kind, body)
                    if answer is not None:
                        self.write(answer)
                    if self.handshake.last is not None and not self.welcomed.done():
                        self.reader.limit = wire.MAX_FRAME
                        self.welcomed.set_result(self.handshake.last)
                    continue
                body = self.handshake.receive.open(kind, body)
                if kind == wire.ACK:
                    self.peer.link.stats.link_acks += 1
                    self.peer._acked(wire.parse_seq(body))
                    self.peer._write_pending()  # what waited for the window
                elif kind == wire.NACK:
                    self.peer._acked(wire.parse_seq(body))
                    self.peer.link.refused(self.peer.node)
                    return
                else:
                    raise wire.WireError(f"a {kind!r} frame from the accepting node")
        except wire.WireError as exc:
            log.error("cluster: the link to node %s failed: %s", self.peer.node, exc)
            if not self.welcomed.done():
                self.welcomed.set_exception(exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.welcomed.done():
            self.welcomed.set_exception(ConnectionError("closed during the handshake"))
            self.welcomed.exception()  # retrieved: the dialer logs it
        self.transport = None
        self.peer.lost(self)


class Inbound(asyncio.Protocol):
    """The accepting end of one link connection: authenticates the peer, handles its
    frames in order, acknowledges at most every ACK_DELAY."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.handshake = wire.Acceptor(link.secret, link.node)
        self.reader = wire.FrameReader(wire.MAX_HELLO)
        self.transport: asyncio.Transport | None = None
        self.peer: str | None = None
        self.incarnation = ""
        self.address = "?"
        self.last = 0  # the last frame handled
        self.acked = 0
        self.closed = False
        self._backlog: deque[tuple[int, int, int, list[bytes]]] = deque()
        self._waiting: asyncio.Task[None] | None = None
        self._resume: asyncio.Handle | None = None  # the rest of a long backlog, next turn
        self._timer: asyncio.TimerHandle | None = None
        self._ack_timer: asyncio.TimerHandle | None = None
        self.note_input = batchloop.shared_input_hook(asyncio.get_running_loop())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's too: see Outbound
        if self.link.stopping:
            self.close()
            return
        # A frame in clear only on a Unix socket, from its family, not what the dialer
        # says: on TCP the handshake is refused (no downgrade).
        sock = transport.get_extra_info("socket")
        self.handshake.clear = getattr(sock, "family", None) == socket.AF_UNIX
        self.link._accepted.add(self)
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple):
            self.address = f"{peername[0]}:{peername[1]}"
        else:  # a Unix socket's peer has no name
            self.address = "this host's Unix socket"
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_WAIT, self._too_slow)

    def _too_slow(self) -> None:
        self._refuse(f"no handshake within {HANDSHAKE_WAIT:g} s")

    def _refuse(self, reason: str) -> None:
        self.link.stats.link_auth_failures += 1
        log.warning("cluster: refused a link from %s: %s", self.address, reason)
        self.close()

    def close(self, graceful: bool = False) -> None:
        """Stop handling frames. `graceful` (this node stops): acknowledge what was
        handled first and let the write go out, or the sender would send it again."""
        if graceful and self.peer is not None:
            self._ack()
        self.closed = True
        for timer in (self._timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.note_input()
        resuming = self._resume is not None
        try:
            frames = self.reader.feed(data)
            for kind, body in frames:
                if self.peer is None:
                    self._handshake(kind, body)
                elif kind == wire.DATA:
                    body = self.handshake.receive.open(kind, body)
                    self._backlog.append(wire.parse_data(body))
                else:
                    raise wire.WireError(f"a {kind!r} frame from the dialing node")
        except wire.WireError as exc:
            if self.peer is None:
                self._refuse(str(exc))
            else:
                log.error("cluster: the link from node %s failed: %s", self.peer, exc)
                self.close()
            return
        if not resuming:  # else the scheduled run goes on with it, behind the backlog
            self._process()

    def _handshake(self, kind: bytes, body: bytes) -> None:
        answer = self.handshake.answer(kind, body)
        if answer is not None:
            self._write(answer)
        if self.handshake.peer is None:
            return
        assert self.handshake.incarnation is not None
        if self._timer is not None:
            self._timer.cancel()
        self.peer, self.incarnation = self.handshake.peer, self.handshake.incarnation
        self.reader.limit = wire.MAX_FRAME
        # Told the last safe one: the peer sends again what follows, and what was handled
        # already is skipped (`last`), but acknowledged only once safe.
        self.last, self.acked = self.link.accepted(self, self.peer, self.incarnation)
        self._write(self.handshake.welcome(self.acked))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _process(self) -> None:
        """Handle the frames that came, in order, each once its sender's table changes
        before it are applied here; then one ACK (or a NACK: not live)."""
        link, stats, backlog = self.link, self.link.stats, self._backlog
        assert self.peer is not None or not backlog
        self._resume = None
        handled = 0  # stanzas in this run
        while backlog and not self.closed and self._waiting is None:
            if handled >= YIELD_EVERY:
                # A backlog after a wait may hold thousands of frames: the rest in the
                # next turn of the loop, in order (nothing else takes from the backlog).
                self._resume = asyncio.get_running_loop().call_soon(self._process)
                break
            if not link.accepting():
                backlog.clear()
                assert self.peer is not None
                # A clean stop (still live) routes what it handled, waiting stanzas
                # included: the NACK names all of it, or the sender would route those
                # again too. Not live (it may be reaped), only what is safe.
                self.acked = (
                    self.last
                    if link.live()
                    else link.acknowledgeable(self.peer, self.incarnation, self.last)
                )
                self._write(self.handshake.send.seal(wire.ack(wire.NACK, self.acked)))
                return
            seq, change, redis, fields = backlog[0]
            assert self.peer is not None and link.inbox is not None
            if (redis and link.inbox.behind(self.peer, redis)) or (
                change and link.sync.behind(self.peer, change)
            ):
                self._waiting = asyncio.create_task(self._wait(redis, change))
                break
            backlog.popleft()
            if seq <= self.last:
                continue  # sent again after a reconnect the handshake did not cover
            _, items = split_fields(fields)
            assert link.items is not None
            held = link.items.handle(items)
            if held:
                link.hold(self.peer, self.incarnation, seq, held)
            handled += len(items)
            self.last = seq
            stats.link_frames_in += 1
            stats.link_stanzas_in += len(items)
        if self.last > self.acked and self.peer is not None:
            link.handled(self, self.peer, self.incarnation, self.last)
            if self._ack_timer is None:
                self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack)

    def _ack(self) -> None:
        """Acknowledge what was handled since the last ack: one ack for every read in
        ACK_DELAY, not one per read (a syscall and a wake-up on each side). Not past a
        frame whose waiting stanzas are not safe yet (`Link.hold`)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        self._ack_timer = None
        if self.last > self.acked and self.peer is not None:
            safe = self.link.acknowledgeable(self.peer, self.incarnation, self.last)
            if safe > self.acked:
                self._write(self.handshake.send.seal(wire.ack(wire.ACK, safe)))
                self.acked = safe

    def ack_soon(self) -> None:
        """A frame's waiting stanzas are safe now: acknowledge within ACK_DELAY."""
        if self._ack_timer is None and not self.closed and self.last > self.acked:
            self._ack_timer = asyncio.get_running_loop().call_later(ACK_DELAY, self._ack)

    async def _wait(self, redis: int, change: int) -> None:
        """A frame waits: for what its sender sent through Redis before it (up to item
        `redis`), then for its sender's table changes up to `change`."""
        assert self.peer is not None and self.link.inbox is not None
        if redis:
            await self.link.inbox.caught_up(self.peer, redis)
        if change:
            await self.link.sync.caught_up(self.peer, change)
        self._waiting = None
        self._process()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        for timer in (self._timer, self._ack_timer):
            if timer is not None:
                timer.cancel()
        if self._waiting is not None:
            self._waiting.cancel()
        if self._resume is not None:
            self._resume.cancel()
        self.link.closed(self, self.peer)

