"""Heartbeats: a node that dies without a goodbye loses its sessions within a bound.

Each node sets `xmppd:node:<name>:alive` with a TTL of `TTL` seconds every
`INTERVAL` seconds, and on the same tick looks at every other node in
`xmppd:nodes`: one whose key has expired is reaped (its sessions removed
from the table, the "gone" event published; the REAP script, so two nodes
reaping at once do no harm). A node that stops cleanly reaps itself. The
reaper hands the sessions it removed to `on_lost` (their contacts are owed the
unavailable presence their dead node never sent: `Cluster.sessions_lost`).

Each beat also tells `on_nodes` the live nodes (this one and every listed node
whose key has not expired): what modules that place work on nodes read
(`Cluster.nodes`; multi-user chat picks each room's owner among them).

The bound: a node's sessions stay in the table at most TTL + INTERVAL
seconds after its last heartbeat (13 s with the defaults). Meanwhile the
other nodes forward stanzas for those sessions into the dead node's inbox;
the reaper moves what that inbox still holds (forwarded, never handled)
into its own inbox, which routes it again (the sessions are gone: other
resources, offline storage, an error for a request), and from the reap on
forwards to the dead node are refused (its "gone" mark, schema.FORWARD) and routed again on
the sender's node. A node stalled longer than TTL (a frozen process) is
reaped as if dead; its next heartbeat writes its sessions back
(`Cluster.rewrite_local`) and tells the lapse's listeners (`Cluster.on_lapsed`:
multi-user chat checks the leases of its rooms, which another node may have taken).

A busy event loop is not a dead node: the alive key is also set every
INTERVAL by a thread of the node's own (`KeepAlive`, its own Redis
connection), so a loop held up for longer than TTL (a burst of work, an
overloaded machine) keeps its node alive, its sessions and its rooms. The
thread only does so while the loop turns: the loop stamps the time at every
TICK, and once it has not turned for WEDGED seconds the thread stops setting
the key, so a hung node is still reaped, at most WEDGED + TTL + INTERVAL
seconds after its loop last ran (43 s). A process that dies takes the
thread with it: reaped within TTL + INTERVAL as before. docs/cluster.md,
"Heartbeats and a busy event loop", says why a thread and not a longer TTL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.stats import ClusterStats

log = logging.getLogger(__name__)

TTL = 10
INTERVAL = 3.0
WEDGED = 30.0
"""Seconds without a turn of the event loop after which the node stops saying it is
alive (its loop is hung, not busy)."""
TICK = 1.0  # seconds between two stamps of the loop's watchdog


class KeepAlive:
    """The thread that sets the node's alive key while its event loop turns.

    The loop calls `tick()` every TICK seconds; the thread, every `interval`,
    sets the key with a TTL of `ttl` seconds if the last tick is less than
    `wedged` seconds old. A key found expired (the node may have been reaped
    meanwhile) is reported to `on_expired` on the loop."""

    def __init__(
        self, url: str, node: str, ttl: int, interval: float, wedged: float,
        on_expired: Callable[[], None],
    ) -> None:
        self.url = url
        self.key = schema.alive_key(node)
        self.ttl = ttl
        self.interval = interval
        self.wedged = wedged
        self.on_expired = on_expired
        self.ticked = time.monotonic()
        self.set_at = 0.0  # when the thread last set the key (monotonic)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ticker: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.tick()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.key}", daemon=True
        )
        self._thread.start()

    def tick(self) -> None:
        """The loop turns (called on it every TICK seconds)."""
        self.ticked = time.monotonic()
        assert self._loop is not None
        self._ticker = self._loop.call_later(TICK, self.tick)

    async def stop(self) -> None:
        """Stop the thread; the key is not set again after this returns."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        self._halt.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _run(self) -> None:
        client = SyncRedis.from_url(
            self.url, socket_timeout=self.interval, socket_connect_timeout=self.interval
        )
        hung = False
        try:
            while not self._halt.wait(self.interval):
                stalled = time.monotonic() - self.ticked
                if stalled > self.wedged:
                    if not hung:
                        log.error(
                            "cluster: the event loop has not run for %.0f s; no longer "
                            "saying this node is alive (the others will reap it)", stalled,
                        )
                    hung = True
                    continue
                if hung:
                    log.warning("cluster: the event loop runs again; heartbeating again")
                    hung = False
                started = time.monotonic()
                try:
                    was_alive = client.set(self.key, "1", ex=self.ttl, get=True)
                except (RedisError, OSError):
                    continue  # the loop's own beat reports Redis' failures
                self.set_at = started  # one float: read on the loop without a lock
                if was_alive is None and self._loop is not None and not self._halt.is_set():
                    self._loop.call_soon_threadsafe(self.on_expired)
        finally:
            client.close()


class Heartbeat:
    def __init__(
        self,
        redis: Redis,
        node: str,
        on_reaped_self: Callable[[], None],
        stats: ClusterStats,
        on_lost: Callable[[list[schema.Entry]], None] = lambda entries: None,
        on_nodes: Callable[[frozenset[str]], None] = lambda nodes: None,
        url: str | None = None,
        on_links: Callable[[dict[str, str]], None] = lambda addresses: None,
    ) -> None:
        self.redis = redis
        self.node = node
        self.on_links = on_links
        self.link_address: str | None = None  # published for the other nodes' links
        self.link_secret: bytes | None = None  # the links' key, when it is kept in Redis
        self.on_secret: Callable[[bytes], None] = lambda secret: None
        self._set_at = 0.0  # when this loop last set the alive key (monotonic)
        # Read when made, not at import: a test's node process shortens them.
        self.ttl = TTL
        self.interval = INTERVAL
        self.on_reaped_self = on_reaped_self
        self.on_lost = on_lost
        self.on_nodes = on_nodes
        self.stats = stats
        self._reap = redis.register_script(schema.REAP)
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[str, float] = {}  # another node -> when a beat last found it alive
        # `url`: Redis for the thread that keeps the node alive while its loop is busy.
        self.keep_alive = (
            None if url is None
            else KeepAlive(url, node, self.ttl, self.interval, WEDGED, self._expired)
        )

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="cluster-heartbeat")
        if self.keep_alive is not None:
            self.keep_alive.start()

    def _expired(self) -> None:
        if self._task is not None:
            log.warning("cluster: this node's heartbeat had expired; writing its sessions again")
            self.on_reaped_self()

    async def stop(self) -> None:
        """Stop beating and remove this node's sessions from the table (a clean stop)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.keep_alive is not None:
            await self.keep_alive.stop()
        await self.reap(self.node)
        await self.redis.delete(schema.alive_key(self.node), schema.link_key(self.node))

    def alive_until(self) -> float:
        """Until when (monotonic) no other node can have found this node's alive key
        expired, less a tenth of the TTL for the clocks' drift: past it, this node may
        have been reaped, and its links refuse stanzas (xmppd.cluster.link)."""
        set_at = max(self._set_at, self.keep_alive.set_at if self.keep_alive else 0.0)
        return set_at + self.ttl * 0.9 if set_at else 0.0

    async def beat(self) -> None:
        """Say this node is alive; reap the nodes that stopped saying so."""
        started = time.monotonic()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(schema.alive_key(self.node), "1", ex=self.ttl, get=True)
            pipe.sadd(schema.NODES, self.node)
            pipe.delete(schema.gone_key(self.node))  # forwards to this node are taken again
            pipe.smembers(schema.NODES)
            if self.link_address is not None:
                pipe.set(schema.link_key(self.node), self.link_address)
            secret = self.link_secret
            if secret is not None:
                # Redis restarted empty forgot it: put it back, or take the one another
                # node put first (links opened from then on use it).
                pipe.set(schema.LINK_SECRET, secret, nx=True)
                pipe.get(schema.LINK_SECRET)
            answers = await pipe.execute()
        was_alive, members = answers[0], answers[3]
        self._set_at = started
        if secret is not None and isinstance(answers[-1], bytes) and answers[-1] != secret:
            self.link_secret = answers[-1]
            self.on_secret(answers[-1])
        if was_alive is None:
            # Our key had expired: another node may have reaped us meanwhile.
            self._expired()
        others = sorted(m.decode() for m in members if m.decode() != self.node)
        alive: list[int] = []
        links: list[bytes | None] = []
        if others:
            async with self.redis.pipeline(transaction=False) as pipe:
                for other in others:
                    pipe.exists(schema.alive_key(other))
                for other in others:
                    pipe.get(schema.link_key(other))
                answers = await pipe.execute()
            alive, links = answers[: len(others)], answers[len(others) :]
        live = {other for other, exists in zip(others, alive, strict=True) if exists}
        live |= await self._lost_by_redis(started, live, others)
        self.on_nodes(frozenset({self.node, *live}))  # before the reaps: orphans go there
        self.on_links({
            other: address.decode()
            for other, address in zip(others, links, strict=True)
            if other in live and address is not None
        })
        for other, exists in zip(others, alive, strict=True):
            if not exists:
                log.warning("cluster: node %s missed its heartbeats; removing its sessions", other)
                self.on_lost(await self.reap(other))

    async def _lost_by_redis(self, now: float, live: set[str], listed: list[str]) -> set[str]:
        """Nodes alive at a beat less than a TTL ago that are no longer listed, yet were
        never reaped nor stopped (either leaves their gone mark): Redis lost its data
        (restarted empty, flushed, failed over to a replica that lagged). They are
        taken as live until they have had a TTL to beat again: taken for gone at once,
        every room this node runs would drop their occupants, and every stanza sent
        to them unacknowledged would be routed again, for nodes that never stopped."""
        for node in live:
            self._seen[node] = now
        for node, seen in list(self._seen.items()):
            if node not in live and now - seen >= self.ttl:
                del self._seen[node]
        missing = [node for node in self._seen if node not in live and node not in listed]
        if not missing:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for node in missing:
                pipe.exists(schema.gone_key(node))
            marked = await pipe.execute()
        kept = {node for node, gone in zip(missing, marked, strict=True) if not gone}
        for node in set(missing) - kept:
            del self._seen[node]
        if kept:
            log.warning(
                "cluster: Redis no longer lists %s, which neither stopped nor was reaped"
                " (did Redis lose its data?); taken as live while they write themselves"
                " back", " ".join(sorted(kept)),
            )
        return kept

    async def reap(self, node: str) -> list[schema.Entry]:
        """Remove `node`'s sessions; what its inbox and waiting stream still hold moves
        into this node's inbox.
        Returns the sessions removed (none if another node reaped it first, or if its
        alive key exists again: schema.REAP)."""
        moved, removed = await self._reap(
            keys=[
                schema.node_sessions_key(node),
                schema.NODES,
                schema.inbox_key(node),
                schema.inbox_key(self.node),
                schema.gone_key(node),
                schema.alive_key(node),
                schema.waiting_key(node),
            ],
            args=[
                node, schema.SESSIONS_PREFIX, schema.EVENTS, schema.gone_event(node),
                schema.GONE_TTL, "0" if node == self.node else "1",
            ],
        )
        if moved:
            log.warning(
                "cluster: took over %d stanzas node %s had not handled; routing them again",
                moved, node,
            )
        return [
            schema.Entry.decode(removed[i].decode(), removed[i + 1])
            for i in range(0, len(removed), 2)
        ]

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                log.error("cluster: heartbeat failed (%s)", exc)
                self.stats.failed("heartbeat")
                continue
            self.stats.recovered("heartbeat")
