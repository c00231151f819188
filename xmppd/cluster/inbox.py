"""A node's inbox: the stanzas other nodes route to its sessions, read from a Redis Stream.

Why a stream and not pub/sub for stanzas: pub/sub drops what is published
while the subscriber is disconnected, so a message sent while this node
reconnects to Redis would vanish without anyone knowing. A stream keeps
the entries; the reader goes on from the last id it handled, whatever
happened to its connection in between. One stream per target node, written
by each sender in its own order (xmppd.cluster.writer), keeps the order of
the stanzas one node sends to one recipient.

The stream is emptied when the node starts: what it holds was for the
sessions of an earlier process of the same name, which are gone.

An entry is either a stanza for a full JID bound here ("stanza") or a
request to end that session's stream ("end", a <conflict/> from a newer
login on another node). A stanza whose session is gone is routed again as
if it had just arrived (`Router.route` without an origin: the stanza/out
filters ran on the sender's node), unless it was a message to the bare JID
and the account still has an available resource: each of those got its
copy from the sender's node.

A stanza waits until the changes its sender's node made to the table before
forwarding it are applied here (`ReplicaSync.caught_up`; schema, "Order").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from lxml import etree
from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync
from xmppd.router import Router
from xmppd.stream.errors import StreamError
from xmppd.xml import ns

log = logging.getLogger(__name__)

BLOCK_MS = 1000
STOP_WAIT = 2.0
"""Seconds `stop` waits for the reader to notice it should stop, before cancelling it."""
BATCH = 500
RETRY_DELAY = 0.5

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


async def cancel_for_sure(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it is done, cancelling again as long as it runs.

    A cancellation can be swallowed on Python 3.11 when it lands as redis-py's read
    completes (seen under load: a node's stop then hung for good in Inbox.stop), and
    the task goes on looping; asking again ends it at its next await."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.cancelled():
        task.exception()  # retrieved: a failure was logged where it happened


class Inbox:
    def __init__(
        self,
        redis: Redis,
        node: str,
        directory: ClusterDirectory,
        router: Router,
        stats: ClusterStats,
        sync: ReplicaSync,
    ) -> None:
        self.redis = redis
        self.stats = stats
        self.key = schema.inbox_key(node)
        self.directory = directory
        self.sync = sync
        self.router = router
        self._last = "0-0"
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.redis.delete(self.key)
        self._task = asyncio.create_task(self._run(), name="cluster-inbox")

    async def stop(self) -> None:
        """Stop reading, after routing what came until now (the other nodes learn this
        one's sessions are gone only from the events its stop publishes first)."""
        if self._task is not None:
            await self._stop_reader(self._task)
            self._task = None
            try:
                await self._handle_all(
                    await self.redis.xread({self.key: self._last}, count=BATCH)
                )
            except (RedisError, OSError) as exc:
                log.error("cluster: could not read the inbox a last time: %s", exc)

    async def _stop_reader(self, task: asyncio.Task[None]) -> None:
        """End the reader between two reads: an entry of our own ends its blocking XREAD
        at once. Not by cancelling the XREAD: redis-py (8.2) may swallow a cancellation
        that arrives while it reads a reply and go on reading, and `stop` then never
        returns (seen in tests, and alone with redis-py). Cancelled only as a last resort."""
        self._stopping = True
        try:
            await self.redis.xadd(self.key, {"wake": b""})
        except (RedisError, OSError):
            pass  # then it notices at the end of its current XREAD, or is cancelled
        done, _ = await asyncio.wait({task}, timeout=STOP_WAIT)
        if not done:
            await cancel_for_sure(task)

    async def _run(self) -> None:
        failing = False  # logged once per outage, not every retry
        while not self._stopping:
            try:
                answer = await self.redis.xread({self.key: self._last}, count=BATCH, block=BLOCK_MS)
            except (RedisError, OSError) as exc:
                if not failing:
                    log.error("cluster: reading the inbox failed (%s); retrying", exc)
                failing = True
                self.stats.failed("inbox")
                await asyncio.sleep(RETRY_DELAY)
                continue
            if failing:
                log.info("cluster: reading the inbox again from %s", self._last)
                failing = False
                self.stats.recovered("inbox")
            await self._handle_all(answer)

    async def _handle_all(self, answer: Any) -> None:
        """XREAD's answer (RESP2): [(stream, [(id, {field: value}), ...])]."""
        for _, entries in answer:
            for entry_id, fields in entries:
                self._last = entry_id.decode()
                if b"to" not in fields:
                    continue  # the entry `stop` writes to end a blocking XREAD
                origin, seq = fields.get(b"from"), fields.get(b"seq")
                if origin is not None and seq is not None:
                    if self.sync.behind(origin.decode(), int(seq)):
                        await self.sync.caught_up(origin.decode(), int(seq))
                try:
                    self._handle(fields)
                except Exception:
                    log.exception("cluster: an inbox entry failed: %r", fields)

    def _handle(self, fields: dict[bytes, bytes]) -> None:
        jid = fields[b"to"].decode()
        bare, _, resource = jid.partition("/")
        session = self.directory.local.get(bare, resource)
        end = fields.get(b"end")
        if end is not None:
            self.stats.ends_in += 1
            if session is not None:
                session.terminate(StreamError(end.decode(), fields[b"text"].decode() or None))
            return
        stats = self.stats
        stats.forwards_in += 1
        sent = fields.get(b"t")
        if sent is not None:
            with contextlib.suppress(ValueError):  # a figure, never a reason to lose a stanza
                stats.forward_latency.add(max(0.0, time.time() - float(sent)))
        stanza = etree.fromstring(fields[b"stanza"], _PARSER)
        if session is not None and session.deliver(stanza):
            return
        if (
            stanza.tag == ns.C_MESSAGE
            and stanza.get("to") != jid
            and self.directory.available(bare)
        ):
            return
        self.router.route(stanza)
