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
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from lxml import etree
from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.directory import ClusterDirectory
from xmppd.router import Router
from xmppd.stream.errors import StreamError
from xmppd.xml import ns

log = logging.getLogger(__name__)

BLOCK_MS = 1000
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
        self, redis: Redis, node: str, directory: ClusterDirectory, router: Router
    ) -> None:
        self.redis = redis
        self.key = schema.inbox_key(node)
        self.directory = directory
        self.router = router
        self._last = "0-0"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.redis.delete(self.key)
        self._task = asyncio.create_task(self._run(), name="cluster-inbox")

    async def stop(self) -> None:
        """Stop reading, after routing what came until now (the other nodes learn this
        one's sessions are gone only from the events its stop publishes first)."""
        if self._task is not None:
            await cancel_for_sure(self._task)
            self._task = None
            try:
                self._handle_all(await self.redis.xread({self.key: self._last}, count=BATCH))
            except (RedisError, OSError) as exc:
                log.error("cluster: could not read the inbox a last time: %s", exc)

    async def _run(self) -> None:
        failing = False  # logged once per outage, not every retry
        while True:
            try:
                answer = await self.redis.xread({self.key: self._last}, count=BATCH, block=BLOCK_MS)
            except (RedisError, OSError) as exc:
                if not failing:
                    log.error("cluster: reading the inbox failed (%s); retrying", exc)
                failing = True
                await asyncio.sleep(RETRY_DELAY)
                continue
            if failing:
                log.info("cluster: reading the inbox again from %s", self._last)
                failing = False
            self._handle_all(answer)

    def _handle_all(self, answer: Any) -> None:
        """XREAD's answer (RESP2): [(stream, [(id, {field: value}), ...])]."""
        for _, entries in answer:
            for entry_id, fields in entries:
                self._last = entry_id.decode()
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
            if session is not None:
                session.terminate(StreamError(end.decode(), fields[b"text"].decode() or None))
            return
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
