"""Keeping a node's replica of the cluster's session table up to date.

Subscribe to the events channel first, then read the whole table (SCAN the
session hashes), then apply the events in the order they come. Each event
carries the full new state of one resource (or says it is gone), so an
event that was already reflected in the table read is applied again
harmlessly: replica and table converge.

Why pub/sub is enough here, though it delivers at most once: an event is
only ever lost while this node's connection to Redis is broken, and every
reconnect (redis-py reconnects the subscription by itself; we hook that)
reads the whole table again, which holds the truth, before applying what
comes next. So the replica is stale for at most the time the connection is
down plus one table read and its replay (in slices, between which the
node serves its clients: `ClusterDirectory.load`): during that window this node may still route to
a resource that left (the stanza then reaches its old node, which no longer
has it and routes it as any stanza for an absent resource: other resources
or offline storage) or not know a resource that arrived (a message to the
bare JID goes to the account's other resources or offline storage).
Redis' own health checks (a PING every few seconds on an idle subscription)
bound how long a silently dead connection goes unnoticed.

Order with the inboxes (xmppd.cluster.schema, "Order"): `applied` is, for
each node, the number of its last change this replica reflects: from the
events, and from `xmppd:seqs`, read before the table (what the table shows
is at least that recent; later changes come as events, subscribed first).
The inbox asks `caught_up` before it hands on a stanza another node
forwarded, so a client never sees a stanza before the change its sender's
node made first. The wait is bounded (`ORDER_WAIT`): an event lost with a
broken connection is made up for by the reload, not waited for.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.schema import Entry
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.tasks import cancel_for_sure

log = logging.getLogger(__name__)

RETRY_DELAY = 0.5
SCAN_COUNT = 1000
ORDER_WAIT = 1.0
"""Seconds a forwarded stanza waits at most for the change its sender made before it."""


async def read_table(redis: Redis) -> list[Entry]:
    """Every bound resource of the cluster, as Redis has it now."""
    entries: list[Entry] = []
    keys: list[bytes] = []
    async for key in redis.scan_iter(match=schema.SESSIONS_PREFIX + "*", count=SCAN_COUNT):
        keys.append(key)
    for start in range(0, len(keys), SCAN_COUNT):
        chunk = keys[start : start + SCAN_COUNT]
        async with redis.pipeline(transaction=False) as pipe:
            for key in chunk:
                pipe.hgetall(key)
            tables: list[dict[bytes, bytes]] = await pipe.execute()
        for key, table in zip(chunk, tables, strict=True):
            bare = key.decode()[len(schema.SESSIONS_PREFIX) :]
            for resource, value in table.items():
                entries.append(Entry.decode(f"{bare}/{resource.decode()}", value))
    return entries


class ReplicaSync:
    """The task that loads the table and applies the events to a `ClusterDirectory`.

    `on_load` runs after each load (start and every reconnect): the node
    writes its own sessions again, in case Redis lost them.
    """

    def __init__(
        self, redis: Redis, directory: ClusterDirectory, on_load: Any, stats: ClusterStats
    ) -> None:
        self.redis = redis
        self.stats = stats
        self.directory = directory
        self.on_load = on_load
        self.loads = 0  # how many times the table was read (tests, logs)
        self.applied: dict[str, int] = {}  # node -> its last change applied here
        self._advanced = asyncio.Event()  # set (and replaced) when `applied` moves
        self._reload = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe and load the table once; raises if Redis cannot be reached."""
        pubsub = await self._subscribe()
        self._task = asyncio.create_task(self._run(pubsub), name="cluster-sync")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_for_sure(self._task)  # its pubsub read may swallow one cancel
            self._task = None

    async def _subscribe(self) -> PubSub:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(schema.EVENTS)
            assert pubsub.connection is not None
            pubsub.connection.register_connect_callback(self._reconnected)
            await self._load()
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    def reload_soon(self) -> None:
        """Read the table again within a second (the replica may be wrong)."""
        self._reload = True

    async def _reconnected(self, connection: object) -> None:
        """redis-py reconnected the subscription by itself: events may have been lost."""
        self._reload = True
        self.stats.reconnects += 1

    def behind(self, node: str, seq: int) -> bool:
        """True if `node`'s change number `seq` is not applied here yet."""
        return self.applied.get(node, 0) < seq

    async def caught_up(self, node: str, seq: int) -> None:
        """Return once `node`'s changes up to `seq` are applied, or after ORDER_WAIT."""
        try:
            async with asyncio.timeout(ORDER_WAIT):
                while self.behind(node, seq):
                    await self._advanced.wait()
        except TimeoutError:
            log.warning("cluster: change %d of node %s did not arrive; going on", seq, node)
            self._advance(node, seq)

    def _advance(self, node: str, seq: int) -> None:
        if seq > self.applied.get(node, 0):
            self.applied[node] = seq
            self._advanced.set()
            self._advanced = asyncio.Event()

    async def _load(self) -> None:
        self._reload = False
        seqs = await self.redis.hgetall(schema.SEQS)
        await self.directory.load(await read_table(self.redis))  # in slices: see load
        for node, seq in seqs.items():
            self._advance(node.decode() if isinstance(node, bytes) else node, int(seq))
        self.loads += 1
        self.on_load()

    async def _run(self, pubsub: PubSub) -> None:
        while True:
            try:
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if self._reload:
                        log.info("cluster: reading the session table again")
                        await self._load()
                    if message is not None:
                        self._apply(message["data"])
            except (RedisError, OSError) as exc:
                log.error("cluster: lost the Redis event channel (%s); reconnecting", exc)
                self.stats.failed("events")
                await pubsub.aclose()
                while True:
                    await asyncio.sleep(RETRY_DELAY)
                    try:
                        pubsub = await self._subscribe()
                        break
                    except (RedisError, OSError):
                        self.stats.redis_errors += 1
                        continue
                self.stats.recovered("events")
                log.info("cluster: event channel back; session table reloaded")

    def _apply(self, data: bytes) -> None:
        try:
            event = json.loads(data)
            op = event["op"]
            if op == "set":
                self.directory.apply_set(Entry.from_fields(event["jid"], event))
            elif op == "unbind":
                self.directory.apply_unbind(event["node"], event["jid"])
            elif op == "gone":
                self.directory.apply_node_gone(event["node"])
            if "seq" in event:
                self._advance(event["node"], int(event["seq"]))
        except (ValueError, KeyError, TypeError) as exc:
            log.error("cluster: ignored a malformed event (%s): %r", exc, data[:200])
