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
(`Cluster.rewrite_local`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.stats import ClusterStats

log = logging.getLogger(__name__)

TTL = 10
INTERVAL = 3.0


class Heartbeat:
    def __init__(
        self,
        redis: Redis,
        node: str,
        on_reaped_self: Callable[[], None],
        stats: ClusterStats,
        on_lost: Callable[[list[schema.Entry]], None] = lambda entries: None,
        on_nodes: Callable[[frozenset[str]], None] = lambda nodes: None,
        ttl: int = TTL,
        interval: float = INTERVAL,
    ) -> None:
        self.redis = redis
        self.node = node
        self.ttl = ttl
        self.interval = interval
        self.on_reaped_self = on_reaped_self
        self.on_lost = on_lost
        self.on_nodes = on_nodes
        self.stats = stats
        self._reap = redis.register_script(schema.REAP)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._run(), name="cluster-heartbeat")

    async def stop(self) -> None:
        """Stop beating and remove this node's sessions from the table (a clean stop)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.reap(self.node)
        await self.redis.delete(schema.alive_key(self.node))

    async def beat(self) -> None:
        """Say this node is alive; reap the nodes that stopped saying so."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(schema.alive_key(self.node), "1", ex=self.ttl, get=True)
            pipe.sadd(schema.NODES, self.node)
            pipe.delete(schema.gone_key(self.node))  # forwards to this node are taken again
            pipe.smembers(schema.NODES)
            was_alive, _, _, members = await pipe.execute()
        if was_alive is None and self._task is not None:
            # Our key had expired: another node may have reaped us meanwhile.
            log.warning("cluster: this node's heartbeat had expired; writing its sessions again")
            self.on_reaped_self()
        others = sorted(m.decode() for m in members if m.decode() != self.node)
        alive: list[int] = []
        if others:
            async with self.redis.pipeline(transaction=False) as pipe:
                for other in others:
                    pipe.exists(schema.alive_key(other))
                alive = await pipe.execute()
        live = {other for other, exists in zip(others, alive, strict=True) if exists}
        self.on_nodes(frozenset({self.node, *live}))  # before the reaps: orphans go there
        for other, exists in zip(others, alive, strict=True):
            if not exists:
                log.warning("cluster: node %s missed its heartbeats; removing its sessions", other)
                self.on_lost(await self.reap(other))

    async def reap(self, node: str) -> list[schema.Entry]:
        """Remove `node`'s sessions; what its inbox still holds moves into this node's.
        Returns the sessions removed (none if another node reaped it first)."""
        moved, removed = await self._reap(
            keys=[
                schema.node_sessions_key(node),
                schema.NODES,
                schema.inbox_key(node),
                schema.inbox_key(self.node),
                schema.gone_key(node),
            ],
            args=[
                node, schema.SESSIONS_PREFIX, schema.EVENTS, schema.gone_event(node),
                schema.GONE_TTL,
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
