"""The cluster bus: small notices from one node to every other, by topic.

What it is for: "this key changed, drop your copy" (the in-process storage
cache, a module's per-user state). What it is not for: anything that must
arrive (stanzas and stream ends go through the nodes' inbox streams,
xmppd.cluster.inbox; the session table through its own events and reloads).

Why pub/sub and not a stream: a notice only ever tells a node to forget
something, and forgetting everything is always correct (the data is read
again from the store). So the bus may lose notices, provided that the node
that may have lost some knows it and flushes: pub/sub loses messages only
while a subscriber's connection is broken, and after every reconnect of the
subscription each topic's `lost` callback runs (the storage cache is
cleared, modules drop their per-user state), as xmppd.cluster.sync reloads
the session table. A stream would need per-node read positions and
trimming, to deliver invalidations nobody needs after a flush anyway.

The publishing side never waits: `publish` queues and one task sends what
queued meanwhile as one pipeline of PUBLISH, in order, again after a pause if
Redis fails (so a node whose own connection broke still tells the others once
it is back). Past `MAX_PENDING` queued notices the queue is dropped and,
once Redis answers again, one "lost" notice goes out instead: every other
node then runs every `lost` callback. A notice is never delivered back to
the node that sent it. A writer that must not answer its client before the
other nodes can hear it (a cache invalidation, a privacy change) awaits
`sent()`: Redis then has the notice, so a client told "done" that turns to
another node finds it there already in practice (that node reads the notice
from its socket as it reads the client's request; no stronger promise). It
waits at most `SENT_WAIT`, and not at all while publishing fails or the node
is cut off from Redis (`cut_off`, set from the cluster writer: a hung Redis
raises nothing, so publishing alone would not know): an outage delays
notices, it does not stall writes.

On one node (no `cluster` section) the module API holds a `LocalBus`, which
does nothing: there is nobody to tell.

Encoding (one channel, `xmppd:bus`): JSON `{"node": sender, "topic": topic,
"data": payload}`, or `{"node": sender, "lost": true}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.tasks import cancel_for_sure

log = logging.getLogger(__name__)

CHANNEL = schema.PREFIX + "bus"
MAX_PENDING = 10_000
"""Notices queued while Redis does not answer, before they are replaced by one "lost"."""
RETRY_DELAY = 0.5
SENT_WAIT = 1.0
"""Seconds `sent()` waits at most for Redis to take the notices queued before it."""

Payload = dict[str, Any]
Handler = Callable[[Payload], None]
Lost = Callable[[], None]


class Bus(Protocol):
    """What the module API and the cluster's parts use to tell the other nodes."""

    def publish(self, topic: str, payload: Payload) -> None:
        """Send `payload` (JSON-encodable) to the `topic` subscribers of every other node.
        Never waits; may be lost (see `subscribe`)."""

    def subscribe(self, topic: str, handler: Handler, lost: Lost) -> None:
        """Call `handler(payload)` for each notice of `topic` from another node, and
        `lost()` whenever notices may have been missed (after a reconnect to Redis):
        it must then forget everything a lost notice could have invalidated."""

    async def sent(self) -> None:
        """Return once every notice published so far is in Redis (see the module's
        docstring for the bounds)."""


class LocalBus:
    """The bus of a single node: there are no other nodes to tell or to hear."""

    def publish(self, topic: str, payload: Payload) -> None:
        return None

    def subscribe(self, topic: str, handler: Handler, lost: Lost) -> None:
        return None

    async def sent(self) -> None:
        return None


def encode(node: str, topic: str, payload: Payload) -> str:
    return json.dumps({"node": node, "topic": topic, "data": payload}, separators=(",", ":"))


def encode_lost(node: str) -> str:
    return json.dumps({"node": node, "lost": True}, separators=(",", ":"))


class RedisBus:
    """The bus of a cluster node: one pub/sub channel on the cluster's Redis."""

    def __init__(self, redis: Redis, node: str) -> None:
        self.redis = redis
        self.node = node
        self.resets = 0  # how many times every `lost` callback ran (tests, logs)
        self.received: Counter[str] = Counter()  # notices from other nodes, by topic
        self._handlers: dict[str, list[Handler]] = {}
        self._lost: list[Lost] = []
        self._queue: deque[str] = deque()
        self._overflowed = False
        self._drops = 0  # times the queue was dropped: a batch being sent then is gone
        self._queued = 0  # notices published since start
        self._done = 0  # of those, the ones sent (or dropped)
        self._progress = asyncio.Condition()
        self._failing = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._reset = False
        self._tasks: list[asyncio.Task[None]] = []
        self.cut_off = False  # Redis has not answered the writer for forward_wait

    # --- Bus -------------------------------------------------------------------------

    def publish(self, topic: str, payload: Payload) -> None:
        if len(self._queue) >= MAX_PENDING:
            if not self._overflowed:
                log.error("cluster bus: %d notices wait for Redis; dropping them", MAX_PENDING)
            self._queue.clear()
            self._overflowed = True
            self._drops += 1
        self._queue.append(encode(self.node, topic, payload))
        self._queued += 1
        self._idle.clear()
        self._wake.set()

    def subscribe(self, topic: str, handler: Handler, lost: Lost) -> None:
        self._handlers.setdefault(topic, []).append(handler)
        self._lost.append(lost)

    async def sent(self) -> None:
        target = self._queued
        if self._failing or self.cut_off or self._done >= target:
            return
        try:
            async with asyncio.timeout(SENT_WAIT), self._progress:
                await self._progress.wait_for(lambda: self._done >= target or self._failing)
        except TimeoutError:
            return

    # --- life ------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe; raises if Redis cannot be reached."""
        pubsub = await self._subscribe()
        self._tasks = [
            asyncio.create_task(self._listen(pubsub), name="cluster-bus-in"),
            asyncio.create_task(self._send(), name="cluster-bus-out"),
        ]

    async def flush(self) -> None:
        """Wait until every notice queued so far is published (shutdown, tests)."""
        while not self._idle.is_set():
            await self._idle.wait()

    async def stop(self) -> None:
        for task in self._tasks:
            await cancel_for_sure(task)  # its pubsub read may swallow one cancel
        self._tasks = []

    # --- sending ---------------------------------------------------------------------

    async def _send(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue or self._overflowed:
                batch = list(self._queue)
                drops = self._drops
                if self._overflowed:
                    batch.insert(0, encode_lost(self.node))
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for message in batch:
                            pipe.publish(CHANNEL, message)
                        await pipe.execute()
                except (RedisError, OSError) as exc:
                    if not self._failing:
                        log.error("cluster bus: publishing failed (%s); retrying", exc)
                        self._failing = True
                        await self._advanced()
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                if self._failing:
                    log.info("cluster bus: publishing again")
                    self._failing = False
                if drops != self._drops:
                    self._done = self._queued - len(self._queue)
                    await self._advanced()
                    continue  # dropped while sending: what queues now is all new
                if self._overflowed:
                    self._overflowed = False
                    batch.pop(0)
                for _ in batch:
                    self._queue.popleft()
                self._done = self._queued - len(self._queue)
                await self._advanced()
            self._idle.set()

    async def _advanced(self) -> None:
        async with self._progress:
            self._progress.notify_all()

    # --- receiving -------------------------------------------------------------------

    async def _subscribe(self) -> PubSub:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANNEL)
            assert pubsub.connection is not None
            pubsub.connection.register_connect_callback(self._reconnected)
        except BaseException:
            await pubsub.aclose()
            raise
        return pubsub

    async def _reconnected(self, connection: object) -> None:
        """redis-py reconnected the subscription by itself: notices may have been lost."""
        self._reset = True

    async def _listen(self, pubsub: PubSub) -> None:
        while True:
            try:
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if self._reset:
                        log.info("cluster bus: reconnected to Redis; flushing what it guards")
                        self._everything_lost()
                    if message is not None:
                        self.receive(message["data"])
            except (RedisError, OSError) as exc:
                log.error("cluster bus: lost the channel (%s); reconnecting", exc)
                await pubsub.aclose()
                while True:
                    await asyncio.sleep(RETRY_DELAY)
                    try:
                        pubsub = await self._subscribe()
                        break
                    except (RedisError, OSError):
                        continue
                self._everything_lost()
                log.info("cluster bus: channel back; caches flushed")

    def receive(self, data: bytes | str) -> None:
        """One message from the channel: run its topic's handlers (not for our own)."""
        try:
            message = json.loads(data)
            if message["node"] == self.node:
                return
            if message.get("lost"):
                log.warning("cluster bus: node %s dropped notices; flushing", message["node"])
                self._everything_lost()
                return
            topic, payload = message["topic"], message["data"]
            if not isinstance(payload, dict):
                raise TypeError("the payload is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            log.error("cluster bus: ignored a malformed notice (%s): %r", exc, data[:200])
            return
        self.received[topic] += 1
        for handler in self._handlers.get(topic, ()):
            try:
                handler(payload)
            except Exception:
                log.exception("cluster bus: a handler of %r failed", topic)

    def _everything_lost(self) -> None:
        self._reset = False
        self.resets += 1
        for lost in self._lost:
            try:
                lost()
            except Exception:
                log.exception("cluster bus: a flush failed")
