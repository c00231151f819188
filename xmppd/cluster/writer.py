"""Everything a node writes to Redis, in the order it happened, without making anyone wait.

The directory and the remote transports are called on the message path,
which must not wait on the network: they queue an operation here and
return. One task sends what queued meanwhile as one pipeline (one round
trip for a burst of stanzas), so writes keep their order: a bind before the
unbind of the same session, and the stanzas for one node in the order the
router handed them over (one stream per target node keeps that order to
the reader).

If Redis fails, the batch is sent again after a pause, in order; a batch
cut off mid-way may then be applied twice (a stanza forwarded twice). What
queues meanwhile is bounded: past `MAX_PENDING` operations, forwarding
refuses stanzas (the router falls back: a message goes to offline storage).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from lxml import etree
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from xmppd.cluster import schema
from xmppd.cluster.schema import Entry
from xmppd.cluster.stats import LATENCY_SAMPLE, ClusterStats
from xmppd.session import ClientSession
from xmppd.stream.errors import StreamError

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
"""Operations queued while Redis does not answer, before stanzas are refused."""

INBOX_MAXLEN = 100_000
"""Entries a node's inbox keeps (approximately) if its reader falls that far behind."""

RETRY_DELAY = 0.5

Fields = dict[FieldT, EncodableT]
"""An inbox entry (xmppd.cluster.inbox reads it)."""

Op = tuple[Callable[[Pipeline], Any], Callable[[Any], None] | None]
"""Queue commands on the pipeline (may be a coroutine, for scripts); what to do with the
result (None: nothing)."""


class Writer:
    """The node's `Outbox`: table writes, events, forwarded stanzas, in order."""

    def __init__(self, redis: Redis, node: str, stats: ClusterStats) -> None:
        self.redis = redis
        self.node = node
        self.stats = stats
        self._ops: deque[Op] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._bind = redis.register_script(schema.BIND)
        self._update = redis.register_script(schema.UPDATE)
        self._unbind = redis.register_script(schema.UNBIND)
        self._refusing = False
        # The number of the last table change queued (schema: "Order"); 0: none yet.
        self._seq = time.time_ns() // 1000
        self._last_change = 0

    @property
    def queued(self) -> int:
        """Operations waiting to be written (a gauge in /metrics)."""
        return len(self._ops)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster-writer")

    async def flush(self) -> None:
        """Wait until everything queued so far is written (shutdown, tests)."""
        while not self._idle.is_set():
            await self._idle.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # --- Outbox ------------------------------------------------------------------------

    def bound(self, session: ClientSession, entry: Entry, known_owner: str | None) -> None:
        jid = session.jid

        def conflict(previous: Any) -> None:
            owner = previous.decode() if isinstance(previous, bytes) else previous
            if owner and owner not in (self.node, known_owner):
                # Bound there too, and our replica did not know yet: newest login wins.
                self.terminate(owner, jid, _conflict())

        value = entry.encode()
        seq = self._next()
        event = schema.set_event(entry, seq)
        self._put(
            lambda pipe: self._bind(
                keys=[
                    schema.sessions_key(session.bare),
                    schema.node_sessions_key(self.node),
                    schema.SEQS,
                ],
                args=[session.resource, value, jid, schema.EVENTS, event, self.node, seq],
                client=pipe,
            ),
            conflict,
        )

    def updated(self, session: ClientSession, entry: Entry) -> None:
        """Also what writes every local session again after a reconnect: Redis may have
        lost them (restarted empty), or another node reaped this one.

        Encoded here, not in the task: shared state that JSON cannot encode raises
        in the module that set it (`ModuleHost.set_state`)."""
        value = entry.encode()
        seq = self._next()
        event = schema.set_event(entry, seq)
        self._put(
            lambda pipe: self._update(
                keys=[
                    schema.sessions_key(session.bare),
                    schema.node_sessions_key(self.node),
                    schema.SEQS,
                ],
                args=[
                    session.resource, value, session.jid, self.node, schema.EVENTS, event, seq,
                    schema.seq_event(self.node, seq),
                ],
                client=pipe,
            )
        )

    def unbound(self, session: ClientSession) -> None:
        jid = session.jid
        seq = self._next()
        self._put(
            lambda pipe: self._unbind(
                keys=[
                    schema.sessions_key(session.bare),
                    schema.node_sessions_key(self.node),
                    schema.SEQS,
                ],
                args=[
                    session.resource, self.node, jid, schema.EVENTS,
                    schema.unbind_event(self.node, jid, seq), seq,
                ],
                client=pipe,
            )
        )

    def forward(self, node: str, jid: str, stanza: etree._Element) -> bool:
        if len(self._ops) >= MAX_PENDING:
            if not self._refusing:
                self._refusing = True
                log.error("cluster: %d writes wait for Redis; refusing stanzas", MAX_PENDING)
            self.stats.forwards_refused += 1
            return False
        # The receiver applies this node's changes up to `seq` before it hands this on.
        fields: Fields = {
            "to": jid, "stanza": etree.tostring(stanza), "from": self.node, "seq": self._last_change
        }
        stats = self.stats
        stats.forwards_out += 1
        if not stats.forwards_out % LATENCY_SAMPLE:
            fields["t"] = repr(time.time())  # xmppd.cluster.stats: the forward latency
        self._put(lambda pipe: _xadd(pipe, node, fields))
        return True

    def terminate(self, node: str, jid: str, error: StreamError) -> None:
        fields: Fields = {"to": jid, "end": error.condition, "text": error.text or ""}
        self.stats.ends_out += 1
        self._put(lambda pipe: _xadd(pipe, node, fields))

    def _next(self) -> int:
        self._seq += 1
        self._last_change = self._seq
        return self._seq

    # --- the task ----------------------------------------------------------------------

    def _put(
        self, add: Callable[[Pipeline], Any], result: Callable[[Any], None] | None = None
    ) -> None:
        self._ops.append((add, result))
        self._idle.clear()
        self._wake.set()

    async def _run(self) -> None:
        failing = False  # logged once per outage, not every retry
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch = list(self._ops)
                try:
                    results = await self._send(batch)
                except RedisError as exc:
                    if not failing:
                        log.error("cluster: writing to Redis failed (%s); retrying", exc)
                    failing = True
                    self.stats.failed("writer")
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                if failing:
                    log.info("cluster: writing to Redis again")
                    failing = False
                    self.stats.recovered("writer")
                for _ in batch:
                    self._ops.popleft()
                if self._refusing and len(self._ops) < MAX_PENDING:
                    self._refusing = False
                for (_, on_result), value in zip(batch, results, strict=True):
                    if on_result is not None and not isinstance(value, Exception):
                        on_result(value)
            self._idle.set()

    async def _send(self, batch: list[Op]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for add, _ in batch:
                queued = add(pipe)
                if asyncio.iscoroutine(queued):
                    await queued
            results: list[Any] = await pipe.execute(raise_on_error=False)
        for value in results:
            if isinstance(value, Exception):
                log.error("cluster: a write to Redis was refused: %s", value)
        return results


def _xadd(pipe: Pipeline, node: str, fields: Fields) -> None:
    pipe.xadd(schema.inbox_key(node), fields, maxlen=INBOX_MAXLEN, approximate=True)


def _conflict() -> StreamError:
    return StreamError("conflict", "replaced by a new connection on this resource")
