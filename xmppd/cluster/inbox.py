"""A node's inbox: the stanzas other nodes route to its sessions, read from a Redis Stream.

Why a stream and not pub/sub for stanzas: pub/sub drops what is published
while the subscriber is disconnected, so a message sent while this node
reconnects to Redis would vanish without anyone knowing. A stream keeps
the entries; the reader goes on from the last id it handled, whatever
happened to its connection in between. One stream per target node, written
by each sender in its own order (xmppd.cluster.writer), keeps the order of
the stanzas one node sends to one recipient.

The stream holds only what this node has not handled yet, plus what it
handled recently: the reader trims what it handled (XTRIM MINID, sent in
the same round trip as the next read) once TRIM_EVERY entries or
TRIM_INTERVAL seconds have passed since the last trim, not after every read
(that would be a second command for most reads). So when a node dies, what
is left in its inbox is what it never handled, plus at most what it handled
since its last trim (up to TRIM_EVERY entries, or a second's worth, plus
one batch); the node that reaps it moves all that into its own inbox,
marked "orphan" (schema.REAP), and routes it again. Those entries are the
only ones routed twice: at least once, never lost. The same happens to what
an earlier process of this node's name left: it reaps itself at start. A
clean stop trims everything handled (`pause`).

An entry holds one or more items, each starting with its "to" (a full JID
bound here), in the order the sending node queued them (xmppd.cluster.writer
puts what it queued in a row for this node in one entry), then the sender's
"from" and "seq" (see the end of this docstring) and, when a reaper moved
it, "orphan". An item is either a stanza ("stanza", with "hops": how many
times it was forwarded) or a request to end that session's
stream ("end", a <conflict/> from a newer login on another node, naming the
session by its id: a newer session on the same resource is not ended). A
stanza whose session is gone (or that it did not take) is routed again as
if it had just arrived (`Router.route` without an origin: the stanza/out
filters ran on the sender's node), an orphan too. Also a message to the
bare JID while the account has other available resources: the sender gave
it only to the top-priority ones, so a resource of lower priority (or one
that bound since) never got it, and dropping it here would lose it
silently. A resource of the same top priority that got its own copy from
the sender may get it twice (docs/cluster.md, "What can be lost or
repeated"). An entry without items, "wake", is what this node writes to its
own inbox to end its blocking read when it stops: skipped (and trimmed as
handled), also when it comes back as an orphan.

A stanza for an account with routing jobs queued on this node (its stored messages
being handed over at login) waits behind them, and the next ones for it with it; a
request to end a session does not (`ItemHandler`). Such a stanza is copied to this
node's waiting stream (xmppd.cluster.waiting), and its entry is not trimmed before
that copy is written (or its turn came): trimmed, only this node's memory would hold
it, and a kill would lose it. The reaper moves the waiting stream too.

A stanza waits until the changes its sender's node made to the table before
forwarding it are applied here (`ReplicaSync.caught_up`; schema, "Order").

An item a direct link gave up on (xmppd.cluster.link) also names the link and the
frame it was put in ("li", "ls"): skipped if the link handled that frame here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from lxml import etree
from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.channel import Channel
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ORDER_WAIT, ReplicaSync
from xmppd.cluster.tasks import cancel_for_sure
from xmppd.cluster.waiting import Copy, Item, Waiting
from xmppd.stream.errors import StreamError
from xmppd.xml.fragments import parse as parse_fragment

log = logging.getLogger(__name__)

BLOCK_MS = 1000
READ_TIMEOUT = 2.0
"""Seconds past BLOCK_MS a read may take before Redis counts as unreachable: a
connection nobody answers on any more (a Redis hung, or gone behind a path that
drops packets without a reset) raises nothing, and the reader would wait on it
for good while the other nodes fill this inbox on a Redis that answers new
connections. Then the connection is dropped and the next read connects again."""
STOP_WAIT = 2.0
"""Seconds `pause` waits for the reader to notice it should stop, before cancelling it."""
BATCH = 500
YIELD_EVERY = 500
"""Stanzas handled in a row before the event loop gets a turn (a read may hold up to
BATCH entries of up to 64 stanzas each: 32000 in one synchronous run otherwise)."""
RETRY_DELAY = 0.5
TRIM_EVERY = 200
"""Entries handled before they are trimmed from the stream (with the next read)..."""
TRIM_INTERVAL = 1.0
"""... or seconds since the last trim, whichever comes first: a trim per read would be
a second command per read (most reads return one or two entries), and what is handled
but not trimmed yet is only routed twice if this node dies (at least once)."""


Reroute = Callable[[etree._Element, int], Awaitable[object] | None]
"""Route a stanza again on this node: (stanza, how many times it was forwarded); what
that routing still waits for (offline storage, say), as `Router.route` returns it."""
Behind = Callable[[str, Callable[[Item], None], Item], bool]
"""Queue `job(item)` behind the routing jobs a local account (bare JID) has queued on
this node, True; False, queueing nothing, when it has none (`Router.behind`)."""


class Inbox:
    def __init__(
        self,
        redis: Redis,
        node: str,
        directory: ClusterDirectory,
        reroute: Reroute,
        stats: ClusterStats,
        sync: ReplicaSync,
        behind: Behind,
        waiting: Waiting,
    ) -> None:
        self.redis = redis
        self.stats = stats
        self.key = schema.inbox_key(node)
        self.directory = directory
        self.sync = sync
        self.items = ItemHandler(directory, stats, reroute, behind, waiting)
        self._last = "0-0"  # the last entry handled
        self._trimmed = _after("0-0")  # the MINID of the last trim: what it kept
        # Entries handled whose stanzas wait behind an account's jobs and are not in
        # the waiting stream yet -> how many: trimmed only after (oldest first).
        self._unsafe: dict[str, int] = {}
        self._untrimmed = 0  # entries handled since that trim
        self._trim_by = 0.0  # when what is handled is trimmed at the latest (monotonic)
        self._stopping = False
        self._progress = asyncio.Event()  # set (and replaced) when `_last` moves
        self._received: dict[str, int] = {}  # node -> the number of its last item handled
        self._task: asyncio.Task[None] | None = None
        self._channel = Channel(redis)
        # Set with the links: True if an item a link gave up on was handled over it.
        self.link_copy: Callable[[str, str, int], bool] | None = None
        # Whether a node is live as this node last saw it (Cluster.nodes).
        self.is_live: Callable[[str], bool] = lambda node: False

    def start(self) -> None:
        """Read from the first entry: what is there now is an earlier process's, moved
        here by reaping it (orphans), or came after this node was listed."""
        self._task = asyncio.create_task(self._run(), name="cluster-inbox")

    async def pause(self) -> None:
        """Stop reading and trim what was handled (a clean stop, before this node reaps
        itself: that moves only what was not handled). Called again, trims what became
        safe since (a stanza that waited had its turn: `Cluster.stop`)."""
        if self._task is not None:
            await self._stop_reader(self._task)
            self._task = None
        await self._trim()

    async def finish(self) -> None:
        """Route what is left (after this node reaped itself: no more comes)."""
        await self.pause()
        # On the channel: redis-py's xread makes each entry a dict, one field per name.
        read = ("XREAD", "COUNT", BATCH, "STREAMS", self.key)
        try:
            while answer := _entries((await self._channel.call([(*read, self._last)]))[0]):
                await self._handle_all(answer)
        finally:
            await self._channel.release()
        await self._trim()

    async def _trim(self) -> None:
        minid = self._trim_point()
        if minid != self._trimmed:
            await self.redis.xtrim(self.key, minid=minid, approximate=False)
            self._trimmed_to(minid)

    def _trim_point(self) -> str:
        """The MINID of a trim now: past every entry handled, but not past one whose
        waiting stanza's copy is not written yet (dicts keep their order: the oldest
        entry comes first)."""
        for entry_id in self._unsafe:
            return entry_id
        return _after(self._last)

    def _trimmed_to(self, minid: str) -> None:
        """Called with the reader between two reads: entries before `minid` are gone."""
        self._untrimmed = 0
        self._trimmed = minid
        self._trim_by = time.monotonic() + TRIM_INTERVAL

    def _trim_due(self) -> bool:
        return self._trim_point() != self._trimmed and (
            self._untrimmed >= TRIM_EVERY or time.monotonic() >= self._trim_by
        )

    def _safe(self, entry_id: str) -> None:
        """One waiting stanza of `entry_id` is in the waiting stream (or had its turn)."""
        left = self._unsafe[entry_id] - 1
        if left:
            self._unsafe[entry_id] = left
        else:
            del self._unsafe[entry_id]

    async def _stop_reader(self, task: asyncio.Task[None]) -> None:
        """End the reader between two reads: an entry of our own ends its blocking XREAD
        at once. Not by cancelling the XREAD: redis-py (8.2) may swallow a cancellation
        that arrives while it reads a reply and go on reading, and the node's stop
        then never returns (seen in tests, and alone with redis-py). Cancelled only as
        a last resort."""
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
            last = self._last
            trim = self._trim_due()
            minid = self._trim_point()
            read = ("XREAD", "COUNT", BATCH, "BLOCK", BLOCK_MS, "STREAMS", self.key, last)
            try:
                async with asyncio.timeout(BLOCK_MS / 1000 + READ_TIMEOUT):
                    if trim:
                        answers = await self._channel.call(
                            [("XTRIM", self.key, "MINID", minid), read]
                        )
                    else:
                        answers = await self._channel.call([read])
                for answer in answers:
                    if isinstance(answer, Exception):
                        raise answer
            except (RedisError, OSError, TimeoutError) as exc:
                if not failing:
                    log.error(
                        "cluster: reading the inbox failed (%s); retrying",
                        exc or type(exc).__name__,
                    )
                failing = True
                self.stats.failed("inbox")
                await asyncio.sleep(RETRY_DELAY)
                continue
            if trim:
                self._trimmed_to(minid)
            if failing:
                log.info("cluster: reading the inbox again from %s", last)
                failing = False
                self.stats.recovered("inbox")
            await self._handle_all(_entries(answers[-1]))
        await self._channel.release()

    async def _handle_all(self, answer: Entries) -> None:
        """XREAD's answer, as `_entries` gives it."""
        for _, entries in answer:
            split = [(entry_id, *split_fields(fields)) for entry_id, fields in entries]
            # The sessions of a reaped node leave this replica by an event that may
            # come after its orphans: drop them first, or the orphans would go back.
            # Not those of a node live again (reaped while its loop was held up, it
            # wrote its sessions back): a walk of the replica per read, for nothing.
            orphans = {
                head[b"orphan"].decode() for _, head, items in split
                if items and b"orphan" in head
            }
            for dead in orphans:
                if not self.is_live(dead):
                    self.directory.apply_node_gone(dead)
            handled = 0  # stanzas since the loop last turned
            for entry_id, head, items in split:
                # Without items: "wake", what `pause` writes to end a blocking XREAD.
                if items:
                    origin, seq = head.get(b"from"), head.get(b"seq")
                    if origin is not None and seq is not None:
                        if self.sync.behind(origin.decode(), int(seq)):
                            await self.sync.caught_up(origin.decode(), int(seq))
                    orphan = b"orphan" in head
                    todo = items
                    if self.link_copy is not None and origin is not None and not orphan:
                        todo = self._not_on_link(origin.decode(), items)
                    held = self.items.handle(todo)
                    if held:
                        self._hold(entry_id.decode(), held)
                    number = items[-1].get(b"rn")
                    if origin is not None and number is not None and not orphan:
                        self._received[origin.decode()] = int(number)
                # Handled (or skipped) only now: a reader cancelled while it waits above
                # must not have the entry trimmed.
                self._last = entry_id.decode()
                self._untrimmed += 1
                handled += len(items)
                if handled >= YIELD_EVERY:
                    # A read holds up to BATCH x PER_ENTRY stanzas: the clients of this
                    # node are served between slices of it, in order (one reader).
                    handled = 0
                    await asyncio.sleep(0)
        self._progress.set()
        self._progress = asyncio.Event()

    def _hold(self, entry_id: str, held: list[Copy]) -> None:
        """`entry_id` is not trimmed before each of `held` is safe."""
        self._unsafe[entry_id] = len(held)
        safe = functools.partial(self._safe, entry_id)
        for one in held:
            one.on_safe = safe

    def _not_on_link(
        self, node: str, items: list[dict[bytes, bytes]]
    ) -> list[dict[bytes, bytes]]:
        """`items` but those a link from `node` handled before giving them to Redis."""
        assert self.link_copy is not None
        return [
            item for item in items
            if b"ls" not in item
            or not self.link_copy(node, item[b"li"].decode(), int(item[b"ls"]))
        ]

    def behind(self, node: str, number: int) -> bool:
        """True if `node`'s item `number` (xmppd.cluster.writer numbers what it sends
        each node through Redis) has not been handled here yet."""
        return self._received.get(node, 0) < number

    async def caught_up(self, node: str, number: int) -> None:
        """Return once `node`'s items through Redis up to `number` are handled, or after
        ORDER_WAIT (one refused or lost on the way never comes): a link frame sent after
        them waits for them (xmppd.cluster.link, "Order")."""
        try:
            async with asyncio.timeout(ORDER_WAIT):
                while self.behind(node, number):
                    await self._progress.wait()
        except TimeoutError:
            log.warning("cluster: item %d of node %s through Redis did not arrive before a "
                        "later one over the link; going on", number, node)
            self._received[node] = max(number, self._received.get(node, 0))

class ItemHandler:
    """What a node does with the items other nodes send it, whichever way they came:
    an inbox entry (Redis) or a link frame (xmppd.cluster.link). One place, so the
    two paths cannot treat a stanza differently.

    A stanza for an account with routing jobs queued on this node (the stored
    messages handed over first at login, XEP-0160 and RFC 6121 8.5.2; a delivery
    waiting for a privacy record) waits behind them, as one routed here would
    (`Router.behind`): handed straight to the session it would overtake them. The
    next ones for that account queue too while the queue lasts, so they keep their
    order. Each is copied to this node's waiting stream meanwhile (`Waiting.hold`;
    `handle` returns the copies, which the inbox and the link wait for before they
    let go of the entry or frame): a kill while it waits does not lose it. A request
    to end a session does not wait: a newer login on the same resource ends the old
    session at once, as `Router.bind` does on one node, rather than leave two
    sessions on one full JID for as long as the store is slow; what was queued for
    the old session finds it gone when its turn comes and is routed again (to the
    newer session, or offline storage), not lost."""

    def __init__(
        self, directory: ClusterDirectory, stats: ClusterStats, reroute: Reroute,
        behind: Behind, waiting: Waiting,
    ) -> None:
        self.directory = directory
        self.stats = stats
        self.reroute = reroute
        self.behind = behind
        self.waiting = waiting
        # id(item) -> the copy of an item queued behind its account's jobs: `behind`
        # takes one argument, and building a pair for each stanza would cost the many
        # that do not wait.
        self._held: dict[int, Copy] = {}

    def handle(self, items: list[Item]) -> list[Copy] | None:
        """`items` in order; one that fails is logged, the next ones still handled.
        Returns the copies of those that wait behind their account's jobs (None: none
        waits, the usual case)."""
        held: list[Copy] | None = None
        for item in items:
            try:
                copy = self._handle(item)
            except Exception:
                log.exception("cluster: a forwarded item failed (to %r)", item.get(b"to"))
                continue
            if copy is not None:
                if held is None:
                    held = []
                held.append(copy)
        return held

    def _handle(self, fields: Item) -> Copy | None:
        bare, _, resource = fields[b"to"].decode().partition("/")
        end = fields.get(b"end")
        if end is not None:
            self.stats.ends_in += 1
            session = self.directory.local.get(bare, resource)
            sid = fields.get(b"sid", b"").decode()
            if session is not None and self.directory.sid_of(session) == sid:
                session.terminate(StreamError(end.decode(), fields[b"text"].decode() or None))
            return None
        stats = self.stats
        stats.forwards_in += 1
        sent = fields.get(b"t")
        if sent is not None:
            with contextlib.suppress(ValueError):  # a figure, never a reason to lose a stanza
                stats.forward_latency.add(max(0.0, time.time() - float(sent)))
        if not self.behind(bare, self._deliver_queued, fields):
            self._deliver(bare, resource, fields)
            return None
        copy = self._held[id(fields)] = self.waiting.hold(fields)
        return copy

    def _deliver_queued(self, fields: Item) -> None:
        """`_deliver` when its turn in the account's queue comes: the session is looked
        up only now, as it may have ended while the stanza waited. Its copy goes once
        it is delivered or routed again."""
        copy = self._held.pop(id(fields))
        routed: Awaitable[object] | None = None
        try:
            bare, _, resource = fields[b"to"].decode().partition("/")
            routed = self._deliver(bare, resource, fields)
        finally:
            if routed is None:
                self.waiting.release(copy)
            else:
                # Routed again to work still under way (offline storage): the copy
                # stays until that work is done, or a kill meanwhile would lose it.
                asyncio.ensure_future(routed).add_done_callback(
                    lambda _: self.waiting.release(copy)
                )

    def _deliver(self, bare: str, resource: str, fields: Item) -> Awaitable[object] | None:
        """Hand the stanza to the session bound on bare/resource, or route it again;
        what routing it again still waits for (None: nothing)."""
        session = self.directory.local.get(bare, resource)
        data = fields[b"stanza"]
        # As the sender serialised it, unparsed, where the transport takes bytes.
        taken = None if session is None else session.deliver_serialized(data)
        if taken:
            return None
        stanza = parse_fragment(data)
        if taken is None and session is not None and session.deliver(stanza):
            return None
        # Not delivered: routed again by the rules of its "to" (a bare JID's: RFC 6121
        # 8.5.2), whatever else is available. The sender chose this session among the
        # top-priority ones; a lower one available elsewhere never got its copy.
        return self.reroute(stanza, int(fields.get(b"hops", b"1")))



Entries = list[tuple[bytes, list[tuple[bytes, list[bytes]]]]]
"""XREAD's answer: [(stream, [(entry id, [field, value, ...]), ...])]."""

ENTRY_FIELDS = frozenset((b"from", b"seq", b"orphan", b"wake"))
"""The fields of an entry as a whole; any other belongs to the item before it."""


def split_fields(fields: list[bytes]) -> tuple[dict[bytes, bytes], list[dict[bytes, bytes]]]:
    """An entry's fields: (those of the entry as a whole, its items in order). An item
    starts at each "to"; a field name repeats once per item, so the fields cannot be
    one dict."""
    head: dict[bytes, bytes] = {}
    items: list[dict[bytes, bytes]] = []
    for name, value in zip(fields[::2], fields[1::2], strict=True):
        if name == b"to":
            items.append({name: value})
        elif name in ENTRY_FIELDS or not items:
            head[name] = value
        else:
            items[-1][name] = value
    return head, items


def _entries(raw: Any) -> Entries:
    """A raw XREAD answer (xmppd.cluster.channel): None when nothing came, else
    {stream: [[id, [field, value, ...]], ...]} (RESP3, redis-py's default) or
    [[stream, [...]]] (RESP2)."""
    if raw is None:
        return []
    streams = raw.items() if isinstance(raw, dict) else raw
    return [
        (stream, [(entry_id, list(fields)) for entry_id, fields in entries])
        for stream, entries in streams
    ]


def _after(entry_id: str) -> str:
    """The smallest stream id after `entry_id` (XTRIM MINID keeps ids >= it)."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq) + 1}"
