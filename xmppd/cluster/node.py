"""A node's membership in a cluster: the Redis connection and the tasks that use it.

`Cluster` owns the parts (each in its own module, one job each) and their
order: connect (a clear error if Redis is unreachable), then the
heartbeat, the replica of the session table, the bus (xmppd.cluster.bus);
the inbox is read, and the links from other nodes accepted, once the
modules are loaded (`serve`: what they bring may need offline storage;
until then the other nodes send through the inbox). At stop: the inbox's
reader stopped, the routing in flight finished (forwarded stanzas that
waited behind an account's jobs get their turn), the writes and notices
still queued, the inbox trimmed of what was handled, the node's own
sessions removed from the table and the node marked gone (others stop
routing here, and what they forward after is refused), the inbox read a
last time, what that routed finished and written, then the rest: the
writer last, so that nothing routed meanwhile is queued for a writer that
is gone.

Whatever cannot reach the node it was forwarded to (that node was reaped,
its inbox was full, Redis did not answer in time, the stanza passed the hop
limit) or was taken over from a dead node is routed again here by
`reroute`, as if its session were gone.

`nodes` is the set of live nodes as this node last saw it (its heartbeat
reads it every INTERVAL seconds; a forward refused because its target was
reaped drops that node at once); `on_nodes_changed` listeners hear each
change (multi-user chat moves rooms between owners on it).

A session whose node died (reaped) ends without the unavailable presence its
node would have sent: `sessions_lost` has the reaper send it (the
"session/lost" hook: the presence module tells the contacts).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable

from lxml import etree
from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.bus import RedisBus
from xmppd.cluster.directory import ClusterDirectory, node_of
from xmppd.cluster.heartbeat import TTL, Heartbeat
from xmppd.cluster.inbox import Inbox
from xmppd.cluster.link import Link, Record
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync
from xmppd.cluster.waiting import Waiting
from xmppd.cluster.writer import Writer
from xmppd.config import ClusterConfig, redact_url
from xmppd.router import Router

log = logging.getLogger("xmppd.cluster")

CONNECT_TIMEOUT = 5.0
FLUSH_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 5


class ClusterUnavailable(Exception):
    """Redis cannot be reached at start; the message names the URL (without password)."""


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.node = config.node_name
        self.url = redact_url(config.redis_url)
        self.redis = Redis.from_url(
            config.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL,
        )
        self.stats = ClusterStats()
        self.writer = Writer(self.redis, self.node, self.stats, config.forward_wait, TTL)
        self.directory = ClusterDirectory(self.node, self.writer)
        self.waiting = Waiting(self.writer, self.node)
        self.nodes: frozenset[str] = frozenset({self.node})
        self._nodes_listeners: list[Callable[[frozenset[str]], None]] = []
        self._lapse_listeners: list[Callable[[], None]] = []
        self.sync = ReplicaSync(self.redis, self.directory, self.rewrite_local, self.stats)
        self.secret = None if config.secret is None else config.secret.get_secret_value()
        self.link: Link | None = None
        if config.link.enabled:
            self.link = Link(
                self.node, config.link.host, config.link.port, config.link_advertise,
                self.stats, self.sync, config.link.unix,
            )
        self.heartbeat = Heartbeat(
            self.redis, self.node, self._lapsed, self.stats, self.sessions_lost,
            self._nodes_seen, config.redis_url,
            self.link.peers_seen if self.link is not None else lambda addresses: None,
        )
        self.inbox: Inbox | None = None
        self._router: Router | None = None
        self.bus = RedisBus(self.redis, self.node)
        self._lost_before: list[schema.Entry] = []

    async def start(self, router: Router) -> None:
        """Join the cluster; ClusterUnavailable if Redis does not answer."""
        try:
            await self.redis.ping()
            self._router = router
            self.writer.reroute = self.reroute
            self.writer.on_cut_off = self.cut
            self.writer.on_gone = self.node_gone
            self.writer.on_refused = self.directory.hold
            self.writer.on_taken = self.directory.taken_elsewhere
            self.writer.local = self.directory.written
            # A process that ran under this name before and died may have left
            # sessions in the table, which nobody would reap while this one beats,
            # and stanzas in its inbox (moved to the front of it, to route again).
            self._lost_before = await self.heartbeat.reap(self.node)
            if self.link is not None:
                await self._start_link(self.link)
            self.writer.start()
            await self.heartbeat.start()
            await self.sync.start()
            await self.bus.start()
            self.inbox = Inbox(
                self.redis, self.node, self.directory, self.reroute, self.stats, self.sync,
                router.behind, self.waiting,
            )
            self.inbox.is_live = lambda node: node in self.nodes
        except (RedisError, OSError) as exc:
            await self.stop()
            raise ClusterUnavailable(
                f"cluster: Redis at {self.url} is unreachable: {exc}"
            ) from None
        log.info("cluster: node %s joined through Redis at %s", self.node, self.url)

    async def _start_link(self, link: Link) -> None:
        """Listen for the other nodes' links, with the cluster's secret (created by the
        first node that needs it when the config gives none)."""
        if self.secret is not None:
            secret = self.secret.encode()
        else:
            await self.redis.set(schema.LINK_SECRET, secrets.token_bytes(32), nx=True)
            stored = await self.redis.get(schema.LINK_SECRET)
            if not isinstance(stored, bytes):
                raise RedisError("the cluster's link secret vanished from Redis")
            secret = stored
        link.fallback = self._fallback
        link.reroute = self.reroute
        link.on_gone = self.node_gone
        heartbeat = self.heartbeat
        link.live = lambda: time.monotonic() < heartbeat.alive_until()
        self.writer.link = link
        link.redis_items = self.writer.redis_items
        heartbeat.link_address = await link.start(secret)
        if self.secret is None:
            heartbeat.link_secret = secret
            heartbeat.on_secret = link.use_secret

    def _fallback(self, node: str, record: Record) -> None:
        """What a link could not deliver goes through Redis, with the frame it was put in
        (the receiver takes each frame once: `Link.redis_copy`); what waited on the link
        for Redis (`Peer.after_acks`) with the time it came, for forward_wait."""
        item = record.item
        if record.frame:
            item = [*item, "li", record.link, "ls", record.frame]
        self.writer.queue_item(
            node, item, record.stanza, record.hops, record.change or None, record.since or None
        )

    async def serve(self) -> None:
        """Start reading the inbox, then accept links (the modules that route what they
        hold are loaded; until now the peers sent through Redis, and the inbox kept it)."""
        if self.inbox is not None:
            self.inbox.start()
            if self.link is not None:
                self.inbox.link_copy = self.link.redis_copy
                await self.link.serve(self.inbox)
        lost, self._lost_before = self._lost_before, []
        self.sessions_lost(lost)  # the previous process's: the modules can tell contacts now

    async def stop(self) -> None:
        """Leave the cluster: this node's sessions leave the table first.

        Every stanza is delivered, stored or handed to another node before the writer
        stops: the forwarded ones that wait behind an account's queued jobs
        (`Router.behind`) get their turn first (`_routed`), before this node marks
        itself gone, and so do those the last read of the inbox queues, before the
        writer's last flush; routing them may forward them again. Past the writer's
        stop, a stanza for another node is refused (`Writer.stop`) and stays here."""
        if self.link is not None:
            # Links refuse from now (the senders route what they hold on their nodes);
            # what this node sent and was not acknowledged goes through Redis.
            await self.link.drain()
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                if self.inbox is not None:
                    await self.inbox.pause()
        except (RedisError, OSError, TimeoutError) as exc:
            log.error("cluster: could not stop reading the inbox: %s", exc)
        await self._routed()
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await self.writer.flush()
                await self.bus.flush()
                if self.inbox is not None:
                    await self.inbox.pause()  # trims what became safe meanwhile
                await self.heartbeat.stop()
        except (RedisError, OSError, TimeoutError) as exc:
            log.error("cluster: could not remove this node's sessions from Redis: %s", exc)
        if self.inbox is not None:
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    await self.inbox.finish()
            except (RedisError, OSError, TimeoutError) as exc:
                # Left in the inbox: the next process of this name routes it again.
                log.error("cluster: could not read the inbox a last time: %s", exc)
            await self._routed()
            try:
                async with asyncio.timeout(FLUSH_TIMEOUT):
                    await self.writer.flush()
                    # What the last read queued had its turn: trimmed now, or the next
                    # process of this name would route it a second time.
                    await self.inbox.pause()
            except (RedisError, OSError, TimeoutError) as exc:
                log.error("cluster: could not write what the inbox's last read routed: %s",
                          exc)
        if self.link is not None:
            await self.link.stop()
        await self.sync.stop()
        await self.bus.stop()
        await self.writer.stop()
        await self.redis.aclose()

    async def _routed(self) -> None:
        """Wait, at most FLUSH_TIMEOUT, for the router's work in flight (and what it
        starts): forwarded stanzas queued behind an account's jobs are routed then,
        perhaps forwarded again, which needs the writer. Not `Router.drain`: a timeout
        must leave the work running, not cancel it. Past the bound it goes on after
        the writer stopped (logged): what it forwards then stays here."""
        router = self._router
        if router is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_TIMEOUT
        while pending := router.pending():
            left = deadline - loop.time()
            if left <= 0:
                log.warning("cluster: %d routing tasks still run after %g s at stop; "
                            "what they forward from now stays on this node",
                            len(pending), FLUSH_TIMEOUT)
                return
            await asyncio.wait(pending, timeout=left)

    async def unreachable(self, wait: float) -> str | None:
        """None if Redis answers a PING within `wait` seconds, else why not (naming the
        URL): for work that must not start without the other nodes (a removal)."""
        try:
            async with asyncio.timeout(wait):
                await self.redis.ping()
        except TimeoutError:
            return f"Redis at {self.url} did not answer within {wait:g} s"
        except (RedisError, OSError) as exc:
            return f"Redis at {self.url} cannot be reached ({exc})"
        return None

    def rewrite_local(self) -> None:
        """Write every local session into the table again (Redis may have lost them),
        after listing this node again (forwards to it are refused until it is)."""
        self.writer.rewrite(self.directory.local_entries())

    def _lapsed(self) -> None:
        """This node's heartbeat had expired: the other nodes may have taken it for dead
        meanwhile, and taken over what it held (its sessions are written again; its
        listeners look at what else they hold)."""
        self.rewrite_local()
        for listener in list(self._lapse_listeners):
            try:
                listener()
            except Exception:  # a module's bug must not stop the heartbeat
                log.exception("cluster: a listener of the heartbeat's lapse failed")

    def on_lapsed(self, listener: Callable[[], None]) -> None:
        """Call `listener()` whenever this node finds its heartbeat had expired."""
        self._lapse_listeners.append(listener)

    def on_nodes_changed(self, listener: Callable[[frozenset[str]], None]) -> None:
        """Call `listener(nodes)` whenever the set of live nodes this node sees changes."""
        self._nodes_listeners.append(listener)

    def _nodes_seen(self, nodes: frozenset[str]) -> None:
        if nodes == self.nodes:
            return
        log.info("cluster: live nodes: %s", " ".join(sorted(nodes)))
        if self.link is not None:
            for node in self.nodes - nodes:
                self.link.gone(node)  # what it did not acknowledge is routed here
        self.nodes = nodes
        for listener in list(self._nodes_listeners):
            try:
                listener(nodes)
            except Exception:  # a module's bug must not stop the heartbeat
                log.exception("cluster: a listener of the node set failed")

    def sessions_lost(self, entries: list[schema.Entry]) -> None:
        """Sessions a reap removed (their node died): each that was available gets the
        unavailable presence its node owed, unless it may still be resumed (a
        resumable stream management session: its timeout on another node does it)."""
        for entry in entries:
            if entry.available and not entry.state.get(schema.RESUMABLE):
                self.session_lost(entry.jid, entry.node)

    def session_lost(self, jid: str, node: str) -> None:
        """`jid`, bound on `node`, ended with its node, not by its client: fire
        "session/lost" (the presence module sends the unavailable presence that node
        would have), unless the resource is bound again elsewhere (a newer login or
        a resumption: its presence is the current one)."""
        router = self._router
        if router is None:
            return
        bare, _, resource = jid.partition("/")
        bound = router.directory.get(bare, resource)
        if bound is not None and node_of(bound) != node:
            return  # bound again, here or on another node
        if router.events.hooked("session/lost"):
            router.spawn(router.events.fire_async("session/lost", jid))

    def cut(self, cut_off: bool) -> None:
        """Redis has not answered for forward_wait (True), or answers again: the other
        nodes' sessions count as gone, and writes stop waiting for bus notices."""
        self.directory.cut(cut_off)
        self.bus.cut_off = cut_off

    def node_gone(self, node: str) -> None:
        """A forward to `node` was refused: it was reaped, and this replica had not
        heard yet (or it came back meanwhile: the table is read again to be sure)."""
        self.directory.apply_node_gone(node)
        self.sync.reload_soon()
        if node != self.node:
            self._nodes_seen(self.nodes - {node})

    def reroute(
        self, stanza: etree._Element, hops: int, avoid: str | None = None
    ) -> Awaitable[object] | None:
        """Route `stanza` again here, as if it had just arrived without a sender
        session (the stanza/out filters ran on the node it came from): `hops` is how
        many times it was forwarded so far (the writer forwards it no more past
        writer.MAX_HOPS), `avoid` a node not to forward it to: a session there
        counts as gone (a message goes to the other resources or
        offline storage, a request is answered with an error). Returns what the
        routing still waits for (`Router.route`)."""
        assert self._router is not None
        writer = self.writer
        saved = writer.hops, writer.avoid
        writer.hops, writer.avoid = hops, avoid
        try:
            return self._router.route(stanza)
        except Exception:
            log.exception("cluster: routing a %s again failed", etree.QName(stanza).localname)
            return None
        finally:
            writer.hops, writer.avoid = saved
