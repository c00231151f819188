"""Everything a node writes to Redis, in the order it happened, without making anyone wait.

The directory and the remote transports are called on the message path,
which must not wait on the network: they queue an operation here and
return. One task sends what queued meanwhile as one pipeline (one round
trip for a burst of stanzas), so writes keep their order: a bind before the
unbind of the same session, and the stanzas for one node in the order the
router handed them over (one stream per target node keeps that order to
the reader).

Stanzas (and stream ends) queued one after the other for the same node go
as one inbox entry, one FORWARD, of up to PER_ENTRY of them (`_commands`):
Redis' work and the reader's are per entry and per command more than per
stanza. Only consecutive ones: a table write queued between two stanzas is
still written between them.

A stanza is added to a node's inbox only while that node is not marked
gone by a reap (schema.FORWARD): one refused (the node was reaped, its inbox is full,
or Redis answered the command with an error: OOM, READONLY)
is routed again here as if the session were gone, never added to an inbox
nobody reads.

If Redis fails, the batch is sent again after a pause, in order; a batch
cut off mid-way may then be applied twice (a stanza forwarded twice). A
stanza for another node waits at most `forward_wait` seconds
(cluster.forward_wait, FORWARD_WAIT by default) for Redis: then it is
routed again here without forwarding (a message to the other resources on
this node or offline storage, an IQ answered with an error), and a log line
says how many. What queues meanwhile is bounded too: past `MAX_PENDING`
operations, forwarding refuses stanzas (the router falls back: a message
goes to offline storage), and table writes and stream ends are dropped;
once the queue is under the bound again, the node's sessions are written
again as they are then and those it no longer has unbound (`Writer._resync`),
once per overflow: that rewrite, one write per local session, does not count
toward the bound, so the writes that come while it drains are not dropped and
do not start another one.

Hops: a stanza the inbox routes again (its session left) may be forwarded
again, to where this node's replica says the session is now. Two replicas
that disagree for a moment would pass it back and forth; each entry carries
how many times it was forwarded, and past `MAX_HOPS` it is not forwarded
again but handled here as for a session that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from lxml import etree
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT, FieldT

from xmppd.cluster import schema
from xmppd.cluster.channel import Channel, Command
from xmppd.cluster.schema import Entry
from xmppd.cluster.stats import LATENCY_SAMPLE, ClusterStats
from xmppd.session import ClientSession
from xmppd.stream.errors import StreamError

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
"""Operations queued while Redis does not answer, before stanzas are refused and table
writes and stream ends dropped (`Writer._table`): the queue's bound, whatever the outage."""

INBOX_MAXLEN = 100_000
"""Entries a node's inbox holds at most (its reader fell that far behind): a forward
past that is refused and its stanzas routed again on the sender's node. An entry
holds one stanza at ordinary rates, up to PER_ENTRY in bursts."""

FORWARD_WAIT = 5.0
"""Seconds a stanza for another node waits for Redis before it is routed again here
(cluster.forward_wait overrides it)."""

MAX_HOPS = 3
"""Times one stanza may be forwarded between nodes (replicas that disagree)."""

BATCH = 1000
"""Operations sent in one pipeline: a bound on how long one round trip may take."""

PER_ENTRY = 64
"""Stanzas (and stream ends) at most in one inbox entry: one FORWARD call, whose
arguments Lua unpacks at once (it has a limit, near 8000 values)."""

SEND_TIMEOUT = 2.0
"""Seconds one pipeline may take before Redis counts as unreachable (a hung server
answers nothing and raises nothing)."""

RETRY_DELAY = 0.5

RESYNC_MAX_DELAY = 30.0
"""Seconds at most between two tries of a resync Redis did not answer (the pause starts
at RETRY_DELAY and doubles)."""

RESYNC_SLICE = 500
"""Local sessions a resync encodes and queues per turn of the event loop (JSON of each
entry: a node's whole set at once would hold the loop)."""


Fields = dict[FieldT, EncodableT]
"""An inbox entry (xmppd.cluster.inbox reads it)."""

Reroute = Callable[[etree._Element, int, str | None], Awaitable[object] | None]
"""Route a stanza again on this node: (stanza, hops so far, a node not to forward it to);
what that still waits for (`Router.route`), which the writer does not need."""


class LinkSender(Protocol):
    """The direct links to the other nodes (xmppd.cluster.link), tried before Redis."""

    def send(
        self, node: str, stanza: etree._Element | None, hops: int, item: list[EncodableT],
        seq: int,
    ) -> bool:
        """Take `item` for `node` (False: send it through Redis instead)."""

    def oldest_waiting(self) -> float | None:
        """When the oldest item the links keep for Redis came (monotonic); None: none."""

    def release_waiting(self) -> None:
        """Hand the items the links keep for Redis to `queue_item` now, in order."""


@dataclass(slots=True)
class Op:
    """One queued write: its one `command`; `on_result` gets what Redis answered
    (raw: bytes, ints, lists; an error reply only if it has a `stanza`). A
    forwarded stanza also has its `stanza`, `hops` and the time after which it is
    routed again here (`expires`).

    A stanza or stream end for another node has no command of its own but the
    `node` whose inbox it goes to and its `item`, its part of the inbox entry
    (and `seq`, the last table change before it): consecutive ones for a node
    share one entry (`_commands`), and each gets that entry's answer."""

    command: Command | None
    on_result: Callable[[Any], None] | None = None
    stanza: etree._Element | None = None
    hops: int = 0
    expires: float = 0.0
    node: str | None = None
    item: list[EncodableT] | None = None
    seq: int | None = None
    writes: str | None = None
    """The session (full JID) a BIND or UPDATE writes into the table: a resync unbinds
    it if it is no longer bound here when the resync runs."""
    rewrite: bool = False
    """Queued by a resync: not counted toward MAX_PENDING (`Writer._full`)."""


class Writer:
    """The node's `Outbox`: table writes, events, forwarded stanzas, in order.

    `reroute` (set by the cluster once the router exists) routes a stanza again
    on this node; while it runs (synchronously), `hops` and `avoid` say how far
    that stanza came and which node not to forward it to. Only while: what the
    router defers (behind storage work for the same account) is forwarded as
    any stanza.

    `on_gone(node)` when a forward was refused because `node` was reaped: this
    node's replica may not have heard yet.

    `on_refused(node, jid)` when a forward to the session `jid` on `node` was
    refused while that node lives (an error reply from Redis, its inbox full),
    before the stanza is routed again: the directory then counts that session
    as gone for a moment (`ClusterDirectory.hold`). `avoid` alone would not
    do: it holds only while the stanza is routed again synchronously, and what
    happens later (the offline module handing a message it just stored to the
    session it still sees, a delivery queued behind the account) would forward
    it there again, be refused again, store it again: a loop for as long as
    Redis refuses.

    `on_taken(session)` when writing a local session again found its resource bound on
    another node (a newer login, while this node was reaped or its heartbeat lapsed:
    the request to end it may have been refused): the session ends with <conflict/>
    if it is still bound here, or it would live on as a ghost the table does not have.

    `on_cut_off(True)` when a stanza has waited `forward_wait` for Redis: the
    directory then hides the other nodes' sessions, so that everything routes
    as if they were gone (offline storage, errors) instead of waiting in turn;
    `on_cut_off(False)` once a write succeeds again.
    """

    def __init__(
        self,
        redis: Redis,
        node: str,
        stats: ClusterStats,
        forward_wait: float = FORWARD_WAIT,
        ttl: int = 10,
    ) -> None:
        self.redis = redis
        self.node = node
        self.stats = stats
        self.forward_wait = forward_wait
        self.ttl = ttl
        self.reroute: Reroute | None = None
        self.on_cut_off: Callable[[bool], None] = lambda cut_off: None
        self.on_gone: Callable[[str], None] = lambda node: None
        self.on_refused: Callable[[str, str], None] = lambda node, jid: None
        self.on_taken: Callable[[ClientSession], None] = lambda session: None
        self.link: LinkSender | None = None
        self.hops = 0
        self.avoid: str | None = None
        self.cut_off = False
        self.stopped = False
        self._ops: deque[Op] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._bind = redis.register_script(schema.BIND)
        self._update = redis.register_script(schema.UPDATE)
        self._unbind = redis.register_script(schema.UNBIND)
        self._forward = redis.register_script(schema.FORWARD)
        self._channel = Channel(redis)
        self._refusing = False
        self._gone_in_batch: set[str] = set()  # nodes found reaped in the batch answered
        self._overflowed = False  # table writes were dropped: `_resync` when due
        self._rewrites = 0  # ops of the last resync still queued (Op.rewrite)
        self._resync_at = 0.0  # monotonic: when a resync Redis did not answer is tried again
        self._resync_delay = RETRY_DELAY
        # This node's sessions and their entries, live (ClusterDirectory.written).
        self.local: Mapping[ClientSession, Entry] = {}
        # The number of the last table change queued (schema: "Order"); 0: none yet.
        self._seq = time.time_ns() // 1000
        self._last_change = 0
        self._redis_items: dict[str, int] = {}  # node -> the number of its last Redis item

    def redis_items(self, node: str) -> int:
        """The number of the last item queued for `node` through Redis (0: none yet)."""
        return self._redis_items.get(node, 0)

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
        """End the task. Stanzas for other nodes it never got into Redis (it stops
        while Redis is unreachable) are routed again here, as when `forward_wait`
        expires: a message to offline storage, not away with the task. One in the
        pipeline the cancel cut may have been added too: at least once. From now on a
        stanza for another node is refused (`forward`), as when Redis is cut off: the
        router keeps it here (offline storage, an error), instead of queueing it for a
        task that is gone."""
        self.stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
            await self._channel.release()
        stranded = [op for op in self._ops if op.stanza is not None]
        self._ops.clear()
        self._rewrites = 0
        if not stranded:
            return
        log.error("cluster: stopping with %d stanzas for other nodes not sent to Redis; "
                  "routed again here", len(stranded))
        if not self.cut_off:
            self.cut_off = True  # nothing forwards now: what routes again stays here
            self.on_cut_off(True)
        self.stats.forwards_refused += len(stranded)
        if self.reroute is not None:
            for op in stranded:
                assert op.stanza is not None
                self.reroute(op.stanza, op.hops, None)

    # --- Outbox ------------------------------------------------------------------------

    def _table_keys(self, session: ClientSession) -> list[str]:
        """The keys BIND, UPDATE and UNBIND change: the account's hash, this node's set,
        the change numbers."""
        return [schema.sessions_key(session.bare), schema.node_sessions_key(self.node), schema.SEQS]

    def bound(self, session: ClientSession, entry: Entry, known_owner: str | None) -> None:
        jid = session.jid

        def conflict(previous: Any) -> None:
            if not previous:
                return
            owner, old_sid = (v.decode() if isinstance(v, bytes) else str(v) for v in previous)
            if owner not in (self.node, known_owner):
                # Bound there too, and our replica did not know yet: newest login wins.
                self.terminate(owner, jid, old_sid, _conflict())

        value = entry.encode()
        seq = self._next()
        event = schema.set_event(entry, seq)
        self._table(
            Op(
                _evalsha(
                    self._bind,
                    self._table_keys(session),
                    [session.resource, value, jid, schema.EVENTS, event, self.node, seq],
                ),
                conflict,
                writes=jid,
            )
        )

    def updated(self, session: ClientSession, entry: Entry) -> None:
        """Also what writes every local session again after a reconnect: Redis may have
        lost them (restarted empty), or another node reaped this one.

        Encoded here, not in the task: shared state that JSON cannot encode raises
        in the module that set it (`ModuleHost.set_state`)."""
        self._table(self._update_op(session, entry))

    def _update_op(self, session: ClientSession, entry: Entry) -> Op:
        value = entry.encode()
        seq = self._next()
        event = schema.set_event(entry, seq)

        def taken(owner: Any) -> None:
            if owner:  # another node bound the resource since: the newer login wins
                self.on_taken(session)

        return Op(
            _evalsha(
                self._update,
                self._table_keys(session),
                [
                    session.resource, value, session.jid, self.node, schema.EVENTS, event,
                    seq, schema.seq_event(self.node, seq),
                ],
            ),
            taken,
            writes=session.jid,
        )

    def unbound(self, session: ClientSession) -> None:
        self._table(self._unbind_op(session.jid))

    def _unbind_op(self, jid: str) -> Op:
        bare, _, resource = jid.partition("/")
        seq = self._next()
        return Op(
            _evalsha(
                self._unbind,
                [schema.sessions_key(bare), schema.node_sessions_key(self.node), schema.SEQS],
                [
                    resource, self.node, jid, schema.EVENTS,
                    schema.unbind_event(self.node, jid, seq), seq,
                ],
            )
        )

    def listed(self) -> None:
        """Say this node is alive, listed and not gone, ahead of what is queued after (its
        sessions written again: Redis restarted empty, or another node reaped this one):
        forwards to a node marked gone are refused, and a listed node without its
        heartbeat key would be reaped."""
        for op in self._listed_ops():
            self._table(op)

    def _listed_ops(self) -> list[Op]:
        return [
            Op(("SET", schema.alive_key(self.node), "1", "EX", self.ttl)),
            Op(("SADD", schema.NODES, self.node)),
            Op(("DEL", schema.gone_key(self.node))),
        ]

    def rewrite(self, entries: list[tuple[ClientSession, Entry]]) -> None:
        """Write every local session (`entries`) into the table again, after listing
        this node again (forwards to it are refused until it is)."""
        self.listed()
        for session, entry in entries:
            self.updated(session, entry)

    def forward(self, node: str, jid: str, stanza: etree._Element) -> bool:
        hops = self.hops
        stats = self.stats
        if self.avoid == node:
            return False  # refused there already (counted then)
        if self.cut_off or self.stopped:
            stats.forwards_refused += 1
            return False
        if hops >= MAX_HOPS:
            log.warning(
                "cluster: a %s for %s was forwarded %d times between nodes whose tables "
                "disagree; handled here", etree.QName(stanza).localname, jid, hops,
            )
            stats.forwards_refused += 1
            return False
        if self._full():
            if not self._refusing:
                self._refusing = True
                log.error("cluster: %d writes wait for Redis; refusing stanzas", MAX_PENDING)
            stats.forwards_refused += 1
            return False
        item: list[EncodableT] = ["to", jid, "stanza", etree.tostring(stanza), "hops", hops + 1]
        stats.forwards_out += 1
        if not stats.forwards_out % LATENCY_SAMPLE:
            item += ["t", repr(time.time())]  # xmppd.cluster.stats: the forward latency
        if self.link is None or not self.link.send(node, stanza, hops, item, self._last_change):
            self.queue_item(node, item, stanza, hops, self._last_change)
        return True

    def queue_item(
        self, node: str, item: list[EncodableT], stanza: etree._Element | None = None,
        hops: int = 0, seq: int | None = None, since: float | None = None,
    ) -> None:
        """Send `item` (a stanza forwarded `hops` times before, or a stream end) to
        `node`'s inbox through Redis; `seq`: this node's last table change before it.
        Also where the link (xmppd.cluster.link) hands what it could not deliver, and
        what waited on it for its frames' acks, `since` then (monotonic): forward_wait
        counts from then."""
        # Numbered per target node: a link frame that comes after it waits for it on the
        # receiver (xmppd.cluster.link, "Order"). From the clock: above a previous
        # process's numbers.
        number = self._redis_items[node] = self._redis_items.get(node, self._seq) + 1
        item = [*item, "rn", number]
        if stanza is None:
            self._table(Op(None, node=node, item=item))
            return
        stats = self.stats
        jid = str(item[1])  # every item starts with its "to"

        def refused(answer: Any) -> None:
            if answer == schema.FORWARDED:
                return
            stats.forwards_refused += 1
            if isinstance(answer, Exception):
                # An error reply (OOM, READONLY), logged by _send: not added.
                self.on_refused(node, jid)
            elif answer == schema.INBOX_FULL:
                log.error("cluster: the inbox of node %s is full; routing here", node)
                self.on_refused(node, jid)
            elif node not in self._gone_in_batch:
                # Once per batch: each call walks the replica (every op of a batch
                # to a reaped node gets this answer).
                self._gone_in_batch.add(node)
                self.on_gone(node)
            if self.reroute is not None:
                self.reroute(stanza, hops, node)

        self._put(
            Op(
                None,
                refused,
                stanza,
                hops,
                (since or time.monotonic()) + self.forward_wait,
                node,
                item,
                # The receiver applies this node's changes up to it before it hands this on.
                seq,
            )
        )

    def terminate(self, node: str, jid: str, sid: str, error: StreamError) -> None:
        item: list[EncodableT] = [
            "to", jid, "sid", sid, "end", error.condition, "text", error.text or ""
        ]
        self.stats.ends_out += 1
        # Over a link it may overtake this node's table writes (the bind that caused it):
        # the receiver applies them first, as for a stanza (schema: "Order").
        if self.link is None or not self.link.send(node, None, 0, item, self._last_change):
            self.queue_item(node, item)

    def command(self, command: Command, on_result: Callable[[Any], None] | None = None) -> None:
        """Queue one more write, in order with the rest; `on_result` gets Redis' answer
        unless it is an error. Never dropped past MAX_PENDING, as a stanza is not: what
        xmppd.cluster.waiting writes keeps a stanza that must not be lost."""
        self._put(Op(command, on_result))

    def _next(self) -> int:
        self._seq += 1
        self._last_change = self._seq
        return self._seq

    # --- the task ----------------------------------------------------------------------

    def _table(self, op: Op) -> None:
        """Queue a table write or a stream end, unless MAX_PENDING operations wait
        already (Redis has not answered for long): then it is dropped, and once the
        queue is under the bound again the table gets this node's sessions as they are
        then (`_resync`), so memory stays bounded however long the outage and however
        many logins, logouts and presence changes happen meanwhile. A stream end
        dropped so is lost: the session it named ends when its node next writes it
        (UPDATE finds the resource taken: `on_taken`)."""
        if not self._full():
            self._put(op)
            return
        if not self._overflowed:
            self._overflowed = True
            log.error("cluster: %d writes wait for Redis; dropping table writes until it "
                      "answers, then writing this node's sessions again", MAX_PENDING)

    def _full(self) -> bool:
        """Whether MAX_PENDING operations wait, not counting a resync's rewrite: that one
        is bounded by the node's sessions, and counted it would make the writes that
        come while it drains be dropped, and each drop call for another resync."""
        return len(self._ops) - self._rewrites >= MAX_PENDING

    def _resync_due(self) -> bool:
        """Writes were dropped, the queue is under the bound again (a resync sooner
        would see them dropped again), the previous resync's rewrite is written (one
        rewrite queued at a time), and the pause after a failed try is over."""
        return (
            self._overflowed
            and not self._rewrites
            and not self._full()
            and time.monotonic() >= self._resync_at
        )

    async def _resync(self) -> None:
        """After table writes were dropped (`_table`): make the table hold this node's
        sessions as they are now, whatever was dropped, and whatever still waits.

        Unbinds every session that the table lists for this node, or that a queued BIND
        or UPDATE is about to write (queued before its unbind was dropped: the table does
        not list it yet), and that is not bound here any more; then writes every local
        session again. All of it is queued behind what waits, which is older, so it is
        applied last. Local sessions are taken in slices of RESYNC_SLICE, each with its
        entry as it is at its turn: one that left meanwhile is skipped (its unbind was
        queued, or dropped, which calls for another resync); the unbinds go before the
        first pause, ahead of any login on those resources meanwhile.

        If Redis does not answer the read, a warning says why, and `_run` tries again
        after a pause that doubles up to RESYNC_MAX_DELAY, even with nothing else to
        write."""
        members = ("SMEMBERS", schema.node_sessions_key(self.node))
        try:
            async with asyncio.timeout(SEND_TIMEOUT):
                answer = (await self._channel.call([members]))[0]
            if isinstance(answer, Exception):
                raise answer
        except (RedisError, OSError, TimeoutError) as exc:
            self._resync_at = time.monotonic() + self._resync_delay
            log.warning(
                "cluster: could not read this node's sessions from Redis to write them "
                "again after dropped table writes (%s); retrying in %g s",
                exc or type(exc).__name__, self._resync_delay,
            )
            self._resync_delay = min(self._resync_delay * 2, RESYNC_MAX_DELAY)
            return
        self._overflowed = False
        self._resync_delay = RETRY_DELAY
        local = self.local
        sessions = list(local)
        bound = {session.jid for session in sessions}
        named = {m.decode() if isinstance(m, bytes) else str(m) for m in answer}
        named.update(op.writes for op in self._ops if op.writes is not None)
        stale = named - bound
        for op in self._listed_ops():
            self._put(op, rewrite=True)
        for jid in stale:
            self._put(self._unbind_op(jid), rewrite=True)
        written = 0
        for n, session in enumerate(sessions):
            if n and not n % RESYNC_SLICE:
                await asyncio.sleep(0)
            entry = local.get(session)
            if entry is not None:
                self._put(self._update_op(session, entry), rewrite=True)
                written += 1
        log.info("cluster: wrote %d sessions of this node to Redis again after dropped "
                 "table writes, and unbound %d it no longer has", written, len(stale))

    def _put(self, op: Op, rewrite: bool = False) -> None:
        if rewrite:
            op.rewrite = True
            self._rewrites += 1
        self._ops.append(op)
        self._idle.clear()
        self._wake.set()

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or until something is queued."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
        self._wake.clear()

    async def _run(self) -> None:
        failing = False  # logged once per outage, not every retry
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops or self._overflowed:
                if self._resync_due():
                    await self._resync()
                if not self._ops:
                    # Only a failed resync waits (nothing else empties the queue while
                    # writes are dropped): tried again after its pause.
                    await self._pause(self._resync_at - time.monotonic())
                    continue
                batch = [self._ops[n] for n in range(min(BATCH, len(self._ops)))]
                try:
                    async with asyncio.timeout(SEND_TIMEOUT):
                        results = await self._send(batch)
                except (RedisError, OSError, TimeoutError) as exc:
                    if not failing:
                        log.error(
                            "cluster: writing to Redis failed (%s); retrying",
                            exc or type(exc).__name__,
                        )
                    failing = True
                    self.stats.failed("writer")
                    self._expire()
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                if failing:
                    log.info("cluster: writing to Redis again")
                    failing = False
                    self.stats.recovered("writer")
                if self.cut_off:
                    self.cut_off = False
                    log.info("cluster: Redis answers again; forwarding to other nodes again")
                    self.on_cut_off(False)
                for _ in batch:
                    if self._ops.popleft().rewrite:
                        self._rewrites -= 1
                if self._refusing and not self._full():
                    self._refusing = False
                self._gone_in_batch.clear()
                for op, value in zip(batch, results, strict=True):
                    # An error reply to a forward is a refusal: its stanza is routed again.
                    if op.on_result is not None and (
                        op.stanza is not None or not isinstance(value, Exception)
                    ):
                        op.on_result(value)
            self._idle.set()

    def _expire(self) -> None:
        """Once a stanza for another node has waited `forward_wait` for Redis: cut off
        (the other nodes' sessions count as gone until Redis answers), and route again
        here every stanza still waiting (the other operations keep waiting, in order).

        Also those the links keep for Redis until their frames are acknowledged
        (xmppd.cluster.link, "Order"): they count toward the wait, and are taken into
        the queue first, behind what it holds for their nodes. Left there, one would
        wait past forward_wait, and reach its node after what is routed here meanwhile
        (the cut makes a later stanza for its recipient stay here)."""
        now = time.monotonic()
        oldest = self.link.oldest_waiting() if self.link is not None else None
        if not any(op.stanza is not None and op.expires <= now for op in self._ops) and (
            oldest is None or oldest + self.forward_wait > now
        ):
            return
        if self.link is not None:
            self.link.release_waiting()  # through queue_item: at the end of the queue
        expired = [op for op in self._ops if op.stanza is not None]
        self._ops = deque(op for op in self._ops if op.stanza is None)
        if not self._ops:
            # Something to retry, so that the first answer from Redis ends the cut.
            self._ops.append(Op(("PING",)))
        log.error(
            "cluster: Redis unreachable: %d stanzas for other nodes waited up to %g s; "
            "routed again here (messages to offline storage, requests answered with an "
            "error), and so is what comes for other nodes until Redis answers",
            len(expired), self.forward_wait,
        )
        if not self.cut_off:
            self.cut_off = True
            self.on_cut_off(True)
        self.stats.forwards_refused += len(expired)
        if self.reroute is None:
            return
        for op in expired:
            assert op.stanza is not None
            self.reroute(op.stanza, op.hops, None)

    async def _send(self, batch: list[Op]) -> list[Any]:
        """One round trip for the batch. Scripts go as plain EVALSHA: redis-py's own
        script calls ask Redis whether they exist (SCRIPT EXISTS) before every
        pipeline, a second round trip per batch. When Redis does not know them (it
        restarted empty, or was flushed), the batch is sent again from the first
        script it refused, once they are loaded: what came after that one in the
        batch and was applied (another node may have loaded some scripts) is
        applied twice, as when a batch is cut off mid-way."""
        results = await self._execute(batch)
        first = next((n for n, v in enumerate(results) if isinstance(v, NoScriptError)), None)
        if first is not None:
            for script in (self._bind, self._update, self._unbind, self._forward):
                await self.redis.script_load(script.script)
            results[first:] = await self._execute(batch[first:])
        for value in results:
            if isinstance(value, Exception):
                log.error("cluster: a write to Redis was refused: %s", value)
        return results

    async def _execute(self, batch: list[Op]) -> list[Any]:
        """The batch's answers, one per op: an op in a shared inbox entry gets the
        entry's."""
        commands, owners = self._commands(batch)
        answers = await self._channel.call(commands)
        results: list[Any] = [None] * len(batch)
        for answer, ops in zip(answers, owners, strict=True):
            for n in ops:
                results[n] = answer
        return results

    def _commands(self, batch: list[Op]) -> tuple[list[Command], list[list[int]]]:
        """The commands for `batch`, and which of its ops each one carries.

        A run of consecutive ops for other nodes becomes one FORWARD per target node
        (per PER_ENTRY ops), in the order of its first op: each inbox receives them in
        the order they were queued; inboxes of different nodes have no order between
        them. The entry is the ops' items one after the other, then this node's name
        and the highest `seq` among them (xmppd.cluster.inbox reads it)."""
        commands: list[Command] = []
        owners: list[list[int]] = []
        groups: dict[str, list[int]] = {}

        def close(node: str) -> None:
            ops = groups.pop(node)
            fields: list[EncodableT] = []
            seqs = [seq for n in ops if (seq := batch[n].seq) is not None]
            for n in ops:
                fields += batch[n].item or ()
            fields += ["from", self.node]
            if seqs:
                fields += ["seq", max(seqs)]
            commands[index[node]] = _evalsha(
                self._forward,
                [schema.inbox_key(node), schema.gone_key(node)],
                [INBOX_MAXLEN, *fields],
            )
            owners[index[node]] = ops

        index: dict[str, int] = {}
        for n, op in enumerate(batch):
            if op.node is None:
                for node in list(groups):
                    close(node)
                assert op.command is not None
                commands.append(op.command)
                owners.append([n])
                continue
            if op.node not in groups:
                index[op.node] = len(commands)
                commands.append(())  # filled by close()
                owners.append([])
                groups[op.node] = []
            groups[op.node].append(n)
            if len(groups[op.node]) >= PER_ENTRY:
                close(op.node)
        for node in list(groups):
            close(node)
        return commands, owners


def _evalsha(script: AsyncScript, keys: list[str], args: list[EncodableT]) -> Command:
    """`script` by its hash alone (Writer._send loads it when Redis does not know it)."""
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _conflict() -> StreamError:
    return StreamError("conflict", "replaced by a new connection on this resource")
