"""Stream Management (XEP-0198): acks both ways, and resumption of a dropped stream.

A client that enables stream management gets its session wrapped in an
`SMTransport`: every stanza to the client is counted and kept until the
client acknowledges it (<a h=''/>). When its TCP connection drops, the
session stays bound (still routable, still available to its contacts) and
what is sent to it queues, until the client comes back with <resume/> on a
new stream, authenticated as the same account, and gets the unacknowledged
stanzas again; or until the resume timeout, when the session ends and what
it never acknowledged is handled as for any session that ends: messages are
routed again (another resource, else offline storage), IQ requests are
answered with an error, the rest is dropped. Not routed again, as that would
deliver them twice: copies made for that session only (`_copy_for_one`), and
a message other sessions got in the same delivery while one of them has it
(`Copies`).

The session is the node's `ClientSession` all along: the router and the other
modules never learn that its stream changed. The core gives this module a few
seams: `ClientSession.keep` (asked when a stream ends), `ElementRequest.attach`
and `bind_resumed` (a new stream takes over a session), `Transport.drop`,
`ModuleHost.end_session`, `ModuleHost.cluster` and the "server/stopping"
event. It fires "session/detached" (session) when a session starts waiting, and
"session/resumed" (session) when it took a session over from another node, so that
modules take over what that node kept of it elsewhere (presence: directed presences).

Clustered, the state of every resumable session is also kept in Redis
(xmppd.cluster.smstore, batched writes), so that any node can resume it: a
<resume/> this node does not know is taken over from there (the old node is
told, binds move, the queue is replayed); a drain hands sessions over; a
sweep ends the sessions of dead nodes nobody resumed. docs/cluster.md says
what that can lose or repeat.

The client's h counts every stanza it sent after <enable/>, as the client
does: those that reach the "stanza/out" filters, and those its stream
answered itself ("stanza/answered": a <bad-request/> refusal, the legacy
session IQ, a second bind). One stanza left out would leave the two counts
one apart for good, and the client would send its newest stanza again at
every resume, a duplicate XEP-0198 forbids.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any
from weakref import WeakKeyDictionary

from lxml import etree
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from xmppd.cluster import heartbeat, schema
from xmppd.cluster.smstore import RETRY_DELAY, Change, SMStore
from xmppd.modulehost import ElementRequest, Module, SharedDelivery
from xmppd.session import ClientSession, Transport
from xmppd.stream.errors import StreamError
from xmppd.xml import ns

SM = "urn:xmpp:sm:3"
KEY = "sm"
"""The session.state key of a session's `SMState`."""
COUNTER = 2**32
"""h counts modulo 2^32 (XEP-0198 section 4)."""
TAKEOVER = "the session was resumed on another node"
"""The text of the <conflict/> a node that resumed a session sends to its old node: that
node ends it without routing its queue again (the new node delivers it)."""
HANDOVER_WAIT = 5.0
"""Seconds a draining node waits for its sessions' state to reach Redis."""
TTL_REFRESH = 30.0
"""Seconds between writes of every session's record again, so none expires in Redis
(each lives its resume timeout + xmppd.cluster.smstore.TTL_SLACK past its last write)."""
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
EXPIRED_REMEMBERED = 10_000
"""How many ended resumable sessions are remembered to answer a late <resume/> with
<failed h=''/> (so the client learns which of its stanzas the server handled)."""
CARBONS = frozenset({"{urn:xmpp:carbons:2}sent", "{urn:xmpp:carbons:2}received"})
PUBSUB_EVENT = "{http://jabber.org/protocol/pubsub#event}event"


class SMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resume_timeout: float = Field(300.0, gt=0)
    """Seconds a session waits to be resumed when the client asks for no 'max'."""
    max_resume_timeout: float = Field(600.0, gt=0)
    """The most a client may ask for with 'max'."""
    max_unacked: int = Field(1000, ge=1)
    """Stanzas the client may leave unacknowledged; one more ends the stream
    (<resource-constraint/>), or the waiting session."""
    ack_every: int = Field(5, ge=1)
    """Ask for an ack (<r/>) once this many stanzas are unacknowledged..."""
    ack_delay: float = Field(1.0, gt=0)
    """...or this many seconds after the first unacknowledged one."""
    orphan_sweep: float = Field(10.0, gt=0)
    """Clustered: seconds between looks for sessions of dead nodes that nobody resumed."""
    location: str | None = None
    """'host:port' a client should resume at (the <enabled location=''/>); None: any."""


class Stats:
    """Counts for /metrics (xmppd.metrics)."""

    def __init__(self) -> None:
        self.enabled = 0
        self.resumed = 0
        self.resumed_elsewhere = 0  # taken over from another node (clustered)
        self.handed_over = 0  # given to other nodes by a drain
        self.resume_failed = 0
        self.timed_out = 0  # sessions that waited in vain
        self.rerouted = 0  # unacked messages routed again (offline storage, other resources)
        self.timeout_messages = 0  # of those, of sessions not resumed in time
        self.errored = 0  # unacked IQ requests answered with an error


class SMState:
    """The stream management state of one session: counters, unacked queue, token."""

    __slots__ = (
        "session", "id", "resumable", "max", "inner", "handled", "sent", "queue",
        "requested", "timer", "closed", "handed", "timed_out", "stored_sent",
        "stored_acked", "confirmed_sent", "change", "copies", "resuming",
    )

    def __init__(self, session: ClientSession, inner: Transport | None, resumable: bool,
                 max_: float) -> None:
        self.session = session
        self.id = secrets.token_urlsafe(18) if resumable else ""
        self.resumable = resumable
        self.max = max_
        self.inner = inner  # the stream now, None while waiting to be resumed
        self.handled = 0  # stanzas from the client handled (our h, mod 2^32)
        self.sent = 0  # stanzas sent to the client, ever (h is this mod 2^32)
        self.queue: deque[etree._Element] = deque()  # the last len(queue) of `sent`, unacked
        self.requested = False  # an <r/> is out
        self.timer: asyncio.TimerHandle | None = None  # ack request or resume timeout
        self.closed = False
        # Another node has it now (resumed there, or handed over by a drain): its queue
        # is that node's to deliver, never this one's to route again.
        self.handed = False
        self.timed_out = False  # ended because nobody resumed it in time
        # What the last write built (clustered): `sent` and the acked count then; -1:
        # unknown, the next write is whole.
        self.stored_sent = -1
        self.stored_acked = -1
        # `sent` as of the last write Redis confirmed: what a node that takes the session
        # over finds (a write built may still be refused, or fail).
        self.confirmed_sent = -1
        self.change: Callable[[bool], Change] | None = None  # this session's Redis write
        # Queued stanzas that other sessions were given too (one shared delivery), with
        # what those know of it: only the last to give it back routes it again.
        self.copies: dict[etree._Element, Copies] = {}
        # The <resume/> that takes the session over once its old stream's stanzas are
        # routed (`StreamManagement._resume_when_routed`); a later one supersedes it.
        self.resuming: ElementRequest | None = None


class Copies:
    """One message the delivery rules gave this node's SM sessions and others at once
    (a message to a bare JID, equal top priorities: RFC 6121 8.5.2.1.1).

    A session that ends with it unacknowledged routes it again only if no other
    recipient has it: none acknowledged it, none is still holding it (unacked, or
    waiting to be resumed: it decides when it ends), and none is without stream
    management here (that one had it written to its stream, as far as the server can
    know; a session of another node, its node decides). Otherwise every resource
    that timed out would send it on again: to the others, which have it, or to
    offline storage once per session."""

    __slots__ = ("holders", "had")

    def __init__(self, had: bool) -> None:
        self.holders: set[SMState] = set()  # SM sessions of this node holding it unacked
        self.had = had  # a recipient surely got it


def _copy_for_one(stanza: etree._Element) -> bool:
    """A message the server made for the session it went to, next to an original
    delivered elsewhere: a carbon (XEP-0280, from the account's own bare JID; the
    original went to its addressee) or a pubsub event notification to a full JID
    (PEP's +notify: each interested resource gets its own). Routed again, it would
    reach resources that have it already, the sender of the original among them, or
    offline storage, which would replay it as a new message."""
    to = stanza.get("to") or ""
    for child in stanza:
        if child.tag in CARBONS:
            return stanza.get("from") == to.partition("/")[0]
        if child.tag == PUBSUB_EVENT:
            return "/" in to
    return False


class SMTransport:
    """The session's transport once stream management is on: counts and keeps what
    goes to the client, and queues it while there is no stream."""

    __slots__ = ("sm", "module")

    def __init__(self, sm: SMState, module: StreamManagement) -> None:
        self.sm = sm
        self.module = module

    def send(self, stanza: etree._Element) -> bool:
        sm = self.sm
        if sm.closed or sm.handed:
            return False
        if sm.inner is not None and not sm.inner.send(stanza):
            return False
        sm.queue.append(stanza)
        sm.sent += 1
        shared = self.module.host.shared_delivery(stanza)
        if shared is not None:
            self.module.shares(sm, stanza, shared)
        self.module.save(sm)
        if len(sm.queue) > self.module.options.max_unacked:
            self.module.overflow(sm)
        elif sm.inner is not None:
            self.module.ask_ack(sm)
        return True

    def send_serialized(self, data: bytes) -> None:
        """The queue keeps elements (resent on resumption, routed again, written to
        Redis): the caller parses `data` and calls `send`."""

    def close(self, error: StreamError) -> None:
        sm = self.sm
        if error.text == TAKEOVER:
            self.module.taken(sm)
        elif sm.inner is not None:
            sm.inner.close(error)
        elif not sm.closed:
            # Ended while waiting (replaced on its resource, kicked, removed account).
            self.module.end(sm)

    def pause_input(self) -> None:
        if self.sm.inner is not None:
            self.sm.inner.pause_input()

    def resume_input(self) -> None:
        if self.sm.inner is not None:
            self.sm.inner.resume_input()

    def drop(self) -> None:
        if self.sm.inner is not None:
            self.sm.inner.drop()


def _element(name: str, **attrs: Any) -> etree._Element:
    el = etree.Element(f"{{{SM}}}{name}", nsmap={None: SM})
    for key, value in attrs.items():
        if value is not None:
            el.set(key, str(value))
    return el


def _failed(condition: str, h: int | None = None) -> etree._Element:
    failed = _element("failed", h=h)
    etree.SubElement(failed, f"{{{ns.STANZA_ERRORS}}}{condition}",
                     nsmap={None: ns.STANZA_ERRORS})
    return failed


async def _routed(session: ClientSession) -> None:
    """Return once every stanza the session's client sent has been routed."""
    if session.busy:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        session.when_idle(lambda: None if done.done() else done.set_result(None))
        await done


class StreamManagement(Module):
    name = "stream_management"
    Options = SMOptions
    options: SMOptions
    fixed_options = ("orphan_sweep",)  # the period of a timer started once

    def setup(self) -> None:
        self.stats = Stats()
        self.active: set[SMState] = set()  # every SM session of this node
        self.resumable: dict[str, SMState] = {}  # id -> state of a resumable session
        self.expired: OrderedDict[str, tuple[str, int]] = OrderedDict()  # id -> (bare, h)
        self.stopping = False  # the node stops: sessions resumed from now on go on elsewhere
        self.late_handovers: set[asyncio.Future[bool]] = set()  # of those, being handed over
        self.host.add_stream_feature("bound", lambda: _element("sm"))
        self.host.share_state(schema.RESUMABLE)
        self.host.element(f"{{{SM}}}enable", self.on_enable, before_bind=True)
        self.host.element(f"{{{SM}}}resume", self.on_resume, before_bind=True)
        self.host.element(f"{{{SM}}}r", self.on_request, before_bind=True)
        self.host.element(f"{{{SM}}}a", self.on_ack, before_bind=True)
        # Counting what the client sends comes before any filter may drop it or make it
        # wait (vcard's runs at 10000): at once, synchronously, as the client sent it.
        self.host.filter("stanza/out", self.count_in, priority=1_000_000)
        self.host.on("stanza/answered", self.count_in)
        self.host.hook("session/closed", self.on_closed)
        self.host.hook("server/stopping", self.on_stopping)
        self.store: SMStore | None = None
        self.claiming: set[str] = set()  # ids whose claim (a resume from Redis) is under way
        self._settling = False
        # What this node's SM sessions know of each message they were given together.
        self.shared: WeakKeyDictionary[SharedDelivery, Copies] = WeakKeyDictionary()

    async def start(self) -> None:
        cluster = self.host.cluster
        if cluster is not None:
            # A record outlives its last write long enough for a dead owner to be reaped
            # (a hung loop: the longest) and swept, so its queue is routed, not expired.
            slack = (TTL_REFRESH + heartbeat.WEDGED + heartbeat.TTL + heartbeat.INTERVAL
                     + 2 * self.options.orphan_sweep)
            self.store = SMStore(cluster.redis, cluster.node, slack)
            self.store.start(self.lost, self.written)
            # Records expire unless written: write every waiting or idle one again in time.
            self.host.every(TTL_REFRESH, self.refresh)
            self.host.every(self.options.orphan_sweep, self.sweep)
            self._sweeping = False

    async def stop(self) -> None:
        if self.store is not None:
            await self.store.stop()

    # --- the state in Redis (clustered) -------------------------------------------------

    def save(self, sm: SMState) -> None:
        """Have the session's state written to Redis with the next batch (clustered)."""
        if self.store is not None and sm.resumable and not sm.handed and not sm.closed:
            if sm.change is None:
                sm.change = functools.partial(self._change, sm)
            self.store.dirty(sm.id, sm.change)

    def _change(self, sm: SMState, full: bool) -> Change:
        """What Redis needs to hold the session's state now: the stanzas sent since the
        last write appended, the ones acknowledged since trimmed (or all, `full`)."""
        acked = sm.sent - len(sm.queue)
        reset = full or sm.stored_sent < 0 or acked >= sm.stored_sent
        expect = -1 if reset else sm.stored_sent
        if reset:
            trim, new = 0, list(sm.queue)
        else:
            fresh = sm.sent - sm.stored_sent
            trim = acked - sm.stored_acked
            new = [sm.queue[i] for i in range(len(sm.queue) - fresh, len(sm.queue))]
        sm.stored_sent, sm.stored_acked = sm.sent, acked
        session = sm.session
        cluster = self.host.cluster
        sid = cluster.directory.sid_of(session) if cluster is not None else None
        return Change(
            bare=session.bare,
            jid=session.jid,
            sid=sid or "",
            handled=sm.handled,
            sent=sm.sent,
            max=sm.max,
            presence=etree.tostring(session.presence) if session.presence is not None else b"",
            state=json.dumps(self.host.shared_state(session), separators=(",", ":")).encode(),
            reset=reset,
            trim=trim,
            append=[etree.tostring(stanza) for stanza in new],
            expect=expect,
        )

    def written(self, sm_id: str, sent: int) -> None:
        sm = self.resumable.get(sm_id)
        if sm is not None:
            sm.confirmed_sent = sent

    def refresh(self) -> None:
        for sm in self.resumable.values():
            self.save(sm)

    def sweep(self) -> None:
        if not self._sweeping:
            self._sweeping = True
            self.host.spawn(self._sweep())

    async def _sweep(self) -> None:
        """Sessions whose node died and whose client did not come back in time end
        here, as they would have there: unacked messages routed again (offline storage),
        unacked IQ requests answered."""
        assert self.store is not None
        try:
            orphans = await self.store.orphans()
        except (RedisError, OSError) as exc:  # TimeoutError too: Redis hangs
            self.log.error("sm: looking for sessions of dead nodes failed: %r", exc)
            self._settle_later()  # what it took, if Redis still runs it, is ended then
            return
        finally:
            self._sweeping = False
        cluster = self.host.cluster
        for orphan in orphans:
            self.stats.timed_out += 1
            self.log.info("%s: its node is gone and it was not resumed in time", orphan.jid)
            self.store.drop(orphan.id)  # the sweep made it this node's
            for data in orphan.queue:
                self._unacked(etree.fromstring(data, _PARSER), timed_out=True)
            if orphan.presence and cluster is not None:
                # The unavailable its node did not send while it awaited resumption.
                cluster.session_lost(orphan.jid, orphan.node)

    def _settle_later(self) -> None:
        if not self._settling:
            self._settling = True
            self.host.spawn(self._settle())

    async def _settle(self) -> None:
        """Settle the claims and sweep pages that timed out, once Redis answers again
        (retrying until it does): a session one of them took over, which this node does
        not hold, ends here as one not resumed (unacked messages routed again: offline
        storage), its record dropped, as when the resuming stream ends after the claim
        (`_resume_remote`). Otherwise the record would stay this live node's, which no
        sweep takes, and its messages expire with it."""
        assert self.store is not None
        try:
            while self.store.uncertain:
                try:
                    settled = await self.store.settle(
                        self.resumable.__contains__, self.claiming.__contains__
                    )
                except (RedisError, OSError) as exc:
                    self.log.debug("sm: settling timed-out claims: Redis: %r", exc)
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                cluster = self.host.cluster
                for sm_id, claimed, orphan in settled:
                    self.log.info("sm: %s: a timed-out %s took it over; ended here",
                                  claimed.jid, "sweep" if orphan else "resume")
                    if cluster is not None and claimed.previous not in ("", cluster.node):
                        if not orphan:
                            # Its old node lets it go at once (routing again what it
                            # queued after its last write), saying nothing to contacts.
                            cluster.writer.terminate(
                                claimed.previous, claimed.jid, claimed.sid,
                                StreamError("conflict", TAKEOVER),
                            )
                        if claimed.presence:  # their unavailable, said here
                            cluster.session_lost(claimed.jid, claimed.previous)
                    self.expired[sm_id] = (claimed.jid.partition("/")[0], claimed.handled)
                    self.store.drop(sm_id, claimed.handled)
                    for data in claimed.queue:
                        self._unacked(etree.fromstring(data, _PARSER))
                if self.store.uncertain:  # ids claimed again meanwhile: after that claim
                    await asyncio.sleep(RETRY_DELAY)
        finally:
            self._settling = False

    def lost(self, sm_id: str) -> None:
        """A write found that another node owns the session now: it was resumed there."""
        sm = self.resumable.get(sm_id)
        if sm is not None:
            self.taken(sm)

    def taken(self, sm: SMState) -> None:
        """Another node resumed the session: end it here without routing its queue again
        and without telling contacts it went offline (it did not)."""
        if sm.handed or sm.closed:
            return
        sm.handed = True
        sm.session.available = False
        # What this node queued after the last write Redis confirmed, the new node does
        # not have (a write under way when the claim ran is refused): routed again once
        # the session here is gone (to the new node, else offline storage), so a live
        # takeover loses nothing.
        unstored = len(sm.queue) if sm.confirmed_sent < 0 else min(
            len(sm.queue), sm.sent - sm.confirmed_sent
        )
        later = [sm.queue[i] for i in range(len(sm.queue) - unstored, len(sm.queue))]
        if sm.inner is not None:
            sm.inner.close(StreamError("conflict", "the session was resumed on another stream"))
        else:
            self.end(sm)
        for stanza in later:
            self._unacked(stanza, sm=sm)

    # --- counting and acks ----------------------------------------------------------

    def shares(self, sm: SMState, stanza: etree._Element, shared: SharedDelivery) -> None:
        """`stanza`, just queued for `sm`, went to other sessions too (one delivery)."""
        copies = self.shared.get(shared)
        if copies is None:
            had = any(s.state.get(KEY) is None for s in shared.sessions)
            copies = self.shared[shared] = Copies(had)
        copies.holders.add(sm)
        sm.copies[stanza] = copies

    def count_in(self, stanza: etree._Element, origin: ClientSession) -> bool:
        sm: SMState | None = origin.state.get(KEY)
        if sm is not None and not self.host.resending:
            sm.handled = (sm.handled + 1) % COUNTER
            self.save(sm)
        return True

    def ask_ack(self, sm: SMState) -> None:
        """The policy: <r/> at once when `ack_every` stanzas wait, else `ack_delay` after
        the first; one request out at a time."""
        if sm.requested:
            return
        if len(sm.queue) >= self.options.ack_every:
            self._request(sm)
        elif sm.timer is None:
            sm.timer = asyncio.get_running_loop().call_later(
                self.options.ack_delay, self._request, sm
            )

    def _request(self, sm: SMState) -> None:
        if sm.timer is not None:
            sm.timer.cancel()
            sm.timer = None
        if sm.inner is not None and sm.queue and not sm.closed:
            sm.requested = True
            sm.inner.send(_element("r"))

    def on_request(self, request: ElementRequest) -> None:
        sm = self._state(request)
        if sm is None:
            request.reply(_failed("unexpected-request"))
            return
        request.reply(_element("a", h=sm.handled))

    def on_ack(self, request: ElementRequest) -> None:
        sm = self._state(request)
        if sm is None:
            request.reply(_failed("unexpected-request"))
            return
        sm.requested = False
        self._acked(sm, request.element.get("h"))
        if sm.closed:
            return
        if sm.queue:
            self.ask_ack(sm)
        elif sm.timer is not None:
            sm.timer.cancel()
            sm.timer = None

    def _acked(self, sm: SMState, h_attr: str | None, taken_over: bool = False) -> None:
        """Drop what the client says it handled. An h over what was sent ends the stream
        (<undefined-condition/>, as Prosody does), except for a
        session `taken_over` from Redis: its old node may have sent stanzas its last
        write did not record (docs/cluster.md), which the client has; `sent` catches up.
        No client is known to ack one too many: the one-over h this once let pass came
        from the stream's own answers (legacy session IQ, <bad-request/>), which the
        client counted and `sent` did not; they are counted now (c2s.StanzaAnswered)."""
        try:
            h = int(h_attr or "")
            if not 0 <= h < COUNTER:
                raise ValueError
        except ValueError:
            self._fail_stream(sm, StreamError("bad-format", "h must be a 32-bit number"))
            return
        acked_before = (sm.sent - len(sm.queue)) % COUNTER
        new = (h - acked_before) % COUNTER
        if new > COUNTER // 2:
            return  # an old ack, overtaken by a later one: nothing new
        if new > len(sm.queue):
            if taken_over:
                self.log.info("%s: %d stanzas its old node sent were not in Redis yet",
                              sm.session.jid, new - len(sm.queue))
                sm.sent += new - len(sm.queue)
                new = len(sm.queue)
            else:
                self._fail_stream(
                    sm,
                    StreamError(
                        "undefined-condition",
                        f"you acknowledged {h} stanzas, only {sm.sent} were sent",
                    ),
                )
                return
        if sm.copies:
            for _ in range(new):
                copies = sm.copies.pop(sm.queue.popleft(), None)
                if copies is not None:
                    copies.had = True
                    copies.holders.discard(sm)
        else:
            for _ in range(new):
                sm.queue.popleft()
        if new:
            self.save(sm)

    def _fail_stream(self, sm: SMState, error: StreamError) -> None:
        if sm.inner is not None:
            sm.inner.close(error)

    def overflow(self, sm: SMState) -> None:
        """Over `max_unacked`: the stream ends (it cannot be resumed), or a waiting
        session ends; either way what it holds is handled as for any ended session."""
        self.log.info("%s: over %d unacknowledged stanzas", sm.session.jid,
                      self.options.max_unacked)
        if sm.inner is not None:
            sm.resumable = False
            sm.inner.close(StreamError("resource-constraint", "too many unacknowledged stanzas"))
        else:
            asyncio.get_running_loop().call_soon(self.end, sm)

    # --- enable ------------------------------------------------------------------------

    def _state(self, request: ElementRequest) -> SMState | None:
        session = request.session
        return session.state.get(KEY) if session is not None else None

    def on_enable(self, request: ElementRequest) -> None:
        session = request.session
        if session is None or KEY in session.state:  # before bind, or a second time
            request.reply(_failed("unexpected-request"))
            return
        resumable = request.element.get("resume") in ("true", "1")
        max_ = self.options.resume_timeout
        try:
            asked = int(request.element.get("max") or 0)
        except ValueError:
            asked = 0
        if asked > 0:
            max_ = min(float(asked), self.options.max_resume_timeout)
        sm = SMState(session, session.transport, resumable, max_)
        session.state[KEY] = sm
        session.transport = SMTransport(sm, self)
        session.keep = lambda transport, clean: self.keep(sm, transport, clean)
        self.active.add(sm)
        self.stats.enabled += 1
        if resumable:
            self.resumable[sm.id] = sm
            # Its node's death is then no end for contacts to hear of (schema.RESUMABLE).
            self.host.set_state(session, schema.RESUMABLE, True)
            self.save(sm)
            request.reply(_element(
                "enabled", id=sm.id, resume="true", max=int(max_), location=self.options.location,
            ))
        else:
            request.reply(_element("enabled"))

    # --- losing the stream, waiting, resuming ---------------------------------------------

    def keep(self, sm: SMState, transport: Transport, clean: bool) -> bool:
        """A stream of an SM session ended: keep the session if the TCP connection
        dropped (not a closed stream) and it can be resumed; also when it is the old
        stream of a session already resumed on a new one."""
        if sm.inner is not transport:
            return True  # a stream this session no longer uses: it goes on elsewhere
        if clean or not sm.resumable or sm.closed or sm.handed:
            return False
        sm.inner = None
        sm.requested = False
        if sm.timer is not None:
            sm.timer.cancel()
        sm.timer = asyncio.get_running_loop().call_later(sm.max, self._timeout, sm)
        self.log.debug("%s: stream lost, waiting %g s to be resumed", sm.session.jid, sm.max)
        if self.host.has_hook("session/detached"):
            self.host.spawn(self.host.fire("session/detached", sm.session))
        return True

    def _timeout(self, sm: SMState) -> None:
        sm.timer = None
        if sm.inner is None and not sm.closed:
            self.stats.timed_out += 1
            sm.timed_out = True
            self.log.info("%s: not resumed in %g s", sm.session.jid, sm.max)
            self.end(sm)

    def end(self, sm: SMState) -> None:
        """End a session that has no stream: the router unbinds it, then "session/closed"
        handles its queue."""
        if not sm.closed:
            self.host.end_session(sm.session)

    def on_resume(self, request: ElementRequest) -> None:
        element = request.element
        previd = element.get("previd") or ""
        if request.session is not None or request.attach is None:
            request.reply(_failed("unexpected-request"))
            return
        sm = self.resumable.get(previd)
        ended_here = previd in self.expired or previd in self.claiming
        if (sm is None and not ended_here and self.store is not None
                and request.account is not None):
            self.host.spawn(self._resume_remote(request, previd, request.account))
            return
        if sm is None or sm.closed or sm.handed or sm.session.bare != request.account:
            # Someone else's id is as unknown as an expired one.
            self.stats.resume_failed += 1
            known = self.expired.get(previd)
            h = known[1] if known is not None and known[0] == request.account else None
            request.reply(_failed("item-not-found", h))
            return
        old = sm.inner
        sm.inner = None  # from now on the old stream (if any) ends without ending the session
        if old is not None:
            # Nothing more is read from it: what it sent until now is all h counts.
            old.close(StreamError("conflict", "the session was resumed on another stream"))
        if sm.timer is not None:
            sm.timer.cancel()
            sm.timer = None
        sm.resuming = request
        if sm.session.busy:
            # Stanzas the old stream sent still wait to be routed (behind one a filter
            # made wait): counted only then. Answered now, h would leave them out, and
            # the client would send them again, duplicates, its h behind ours for good.
            self.host.spawn(self._resume_when_routed(sm, request))
            return
        self._attach(sm, request)

    async def _resume_when_routed(self, sm: SMState, request: ElementRequest) -> None:
        """Resume once the session's client stanzas are routed (HANDOVER_WAIT at most),
        unless the session ended or a later <resume/> took over meanwhile."""
        try:
            async with asyncio.timeout(HANDOVER_WAIT):
                await _routed(sm.session)
        except TimeoutError:
            self.log.warning("%s: its old stream's stanzas still wait to be routed after "
                             "%g s; resumed, its client may send them again",
                             sm.session.jid, HANDOVER_WAIT)
        if sm.resuming is not request or sm.closed or sm.handed:
            # A later <resume/> has it, or it ended meanwhile.
            self.stats.resume_failed += 1
            known = self.expired.get(sm.id)
            request.reply(_failed("item-not-found", known[1] if known is not None else None))
            return
        self._attach(sm, request)

    def _attach(self, sm: SMState, request: ElementRequest) -> None:
        """Carry the session on the stream of `request`, a <resume/> accepted."""
        assert request.attach is not None
        sm.resuming = None
        inner = request.attach(sm.session)
        if inner is None:  # the new stream ended meanwhile: the session waits on
            sm.timer = asyncio.get_running_loop().call_later(sm.max, self._timeout, sm)
            return
        if self._resumed(sm, inner, request):
            self.stats.resumed += 1

    async def _h_when_ended(self, previd: str, account: str) -> int | None:
        """The h of `account`'s session `previd` if it ended for good on any node lately
        (GONE_TTL): XEP-0198 asks for it in <failed/>, so that the client knows which of
        its stanzas the server had, and sends again only the others."""
        assert self.store is not None
        try:
            return await self.store.gone(previd, account)
        except (RedisError, OSError) as exc:  # TimeoutError too
            self.log.warning("sm: the h of ended session %s not read: Redis: %r", previd, exc)
            return None

    def _resumed(
        self, sm: SMState, inner: Transport, request: ElementRequest, taken_over: bool = False
    ) -> bool:
        """`inner` carries the session now: <resumed/>, and what the client has not
        acknowledged, again. False if the client's h was refused (the stream ends)."""
        session = sm.session
        sm.inner = inner
        sm.requested = False
        if session.input_held:
            inner.pause_input()
        self._acked(sm, request.element.get("h"), taken_over)
        if sm.inner is not inner:
            return False
        request.reply(_element("resumed", previd=sm.id, h=sm.handled))
        for stanza in sm.queue:
            if not inner.send(stanza):
                break
        if sm.queue:
            self._request(sm)
        self.log.debug("%s: resumed, %d stanzas sent again", session.jid, len(sm.queue))
        return True

    async def _resume_remote(self, request: ElementRequest, previd: str, account: str) -> None:
        """Resume a session this node does not have: take it over from Redis (its node
        may be alive, draining, or dead), bind its full JID here, replay its queue."""
        assert self.store is not None and request.bind_resumed is not None
        self.claiming.add(previd)
        try:
            claimed = await self.store.claim(previd, account)
        except (RedisError, OSError) as exc:  # TimeoutError too: Redis hangs
            # The client can start a new session at once. The claim may still run: once
            # Redis answers, `_settle` ends the session here if it did.
            self.log.error("sm: resuming %s failed: Redis: %r", account, exc)
            self.stats.resume_failed += 1
            request.reply(_failed("internal-server-error"))
            self._settle_later()
            return
        finally:
            self.claiming.discard(previd)
        if claimed is None:
            self.stats.resume_failed += 1
            request.reply(_failed("item-not-found", await self._h_when_ended(previd, account)))
            return
        cluster = self.host.cluster
        if cluster is not None and claimed.previous not in ("", cluster.node):
            # Before the bind's own <conflict/>: the old node must not route the queue.
            # It names the session resumed (its id, written with its state), so that it
            # ends that one only: not a newer login on that resource on the old node, nor
            # (moved as an orphan when the old node died) this node's resumed session.
            cluster.writer.terminate(claimed.previous, claimed.jid, claimed.sid,
                                     StreamError("conflict", TAKEOVER))
        session = request.bind_resumed(claimed.jid)
        if session is None:
            # The stream ended meanwhile. The record is this live node's now (no sweep
            # takes it) and its old node let the session go: it ends here, as one not
            # resumed (unacked messages routed again), or it would expire in Redis.
            self.stats.resume_failed += 1
            self.expired[previd] = (account, claimed.handled)
            self.store.drop(previd, claimed.handled)
            for data in claimed.queue:
                self._unacked(etree.fromstring(data, _PARSER))
            if claimed.presence and cluster is not None and claimed.previous:
                # Its old node let it go without a word to its contacts: said here.
                cluster.session_lost(claimed.jid, claimed.previous)
            return
        sm = SMState(session, session.transport, True, claimed.max)
        sm.id = previd
        sm.handled = claimed.handled
        sm.sent = claimed.sent
        sm.queue.extend(etree.fromstring(data, _PARSER) for data in claimed.queue)
        session.state[KEY] = sm
        if claimed.state:
            # Carbons on, the active privacy list, roster pushes: the session goes on as
            # the client set it up on the old node, which it will not do again.
            self.host.restore_state(session, json.loads(claimed.state))
        session.transport = SMTransport(sm, self)
        session.keep = lambda transport, clean: self.keep(sm, transport, clean)
        self.active.add(sm)
        self.resumable[sm.id] = sm
        self.host.set_state(session, schema.RESUMABLE, True)
        assert sm.inner is not None
        if not self._resumed(sm, sm.inner, request, taken_over=True):
            return
        self.stats.resumed_elsewhere += 1
        if self.host.has_hook("session/resumed"):
            self.host.spawn(self.host.fire("session/resumed", session))
        if claimed.presence:
            # Available again, as it was: contacts saw it go when its old node let it go.
            # The client did not send this presence now: it does not count as handled.
            self.host.resend(etree.fromstring(claimed.presence, _PARSER), session)
        self.save(sm)
        self.log.info("%s: resumed from node %s", session.jid, claimed.previous or "?")
        if self.stopping:
            # The node began to drain while this resume was under way, after it handed its
            # sessions over: hand this one over too, or it would end here with the node,
            # and its client, cut off, would find nothing to resume elsewhere.
            # The node's streams end once "server/stopping" returns: it waits for this.
            handover = asyncio.ensure_future(self._hand_over([sm]))
            self.late_handovers.add(handover)
            handover.add_done_callback(self.late_handovers.discard)
            await handover

    # --- the end ------------------------------------------------------------------------

    async def on_closed(self, session: ClientSession) -> None:
        """The session ended for good: what the client never acknowledged is handled
        as for a session that ends (messages routed again, IQ requests answered)."""
        sm: SMState | None = session.state.get(KEY)
        if sm is None or sm.closed:
            return
        sm.closed = True
        self.active.discard(sm)
        if sm.timer is not None:
            sm.timer.cancel()
            sm.timer = None
        # By its id, not `resumable`: an overflow clears that flag on a session that was
        # resumable, and its record must go too (its queue is routed below).
        if sm.id and self.resumable.get(sm.id) is sm:
            del self.resumable[sm.id]
        if sm.handed:
            return  # another node has it, queue and all
        if sm.id:
            self.expired[sm.id] = (session.bare, sm.handled)
            while len(self.expired) > EXPIRED_REMEMBERED:
                self.expired.popitem(last=False)
            if self.store is not None:
                self.store.drop(sm.id, sm.handled)
        queue, sm.queue = sm.queue, deque()
        for stanza in queue:
            self._unacked(stanza, sm.timed_out, sm)
        sm.copies.clear()

    def _unacked(
        self, stanza: etree._Element, timed_out: bool = False, sm: SMState | None = None
    ) -> None:
        """A stanza a session that ends (`sm`, None: one read back from Redis) never
        acknowledged: a message is routed again, unless it is a copy of one delivered
        elsewhere or another recipient of the same delivery has it (`Copies`), so that
        it reaches nobody twice; an IQ request is answered with an error."""
        type_ = stanza.get("type")
        copies = None
        if sm is not None and sm.copies:
            copies = sm.copies.pop(stanza, None)
            if copies is not None:
                copies.holders.discard(sm)
        if stanza.tag == ns.C_MESSAGE and type_ not in ("error", "groupchat"):
            if (copies is not None and (copies.had or copies.holders)) or _copy_for_one(stanza):
                return  # delivered: the ledger keeps that fate
            self.stats.rerouted += 1
            self.host.ledger.rerouted += 1  # its delivery is taken back; a new fate follows
            if timed_out:
                self.stats.timeout_messages += 1
            self.host.route(copy.deepcopy(stanza))
        elif stanza.tag == ns.C_IQ and type_ in ("get", "set"):
            self.stats.errored += 1
            self.host.bounce(stanza, "service-unavailable", "the recipient's stream was lost")

    async def on_stopping(self) -> bool:
        """The node stops (SIGTERM, drain). Clustered, its resumable sessions are handed
        over: their state written to Redis, their connections cut, so that their clients
        resume on another node. Alone (or if Redis fails), sessions waiting for their
        client end, their messages to offline storage; the server then ends the other
        streams with <system-shutdown/>, and their unacked messages go the same way."""
        self.stopping = True
        sessions = [sm for sm in self.resumable.values() if not sm.closed and not sm.handed]
        if self.store is not None and await self._hand_over(sessions):
            while self.late_handovers:  # resumes that completed during the hand-over
                await asyncio.wait(set(self.late_handovers))
            return False
        for sm in list(self.resumable.values()):
            if sm.inner is None and not sm.closed:
                self.end(sm)
        return False

    async def _hand_over(self, sessions: list[SMState]) -> bool:
        assert self.store is not None
        # Nothing more is read from their clients, and what was read is routed, before
        # the state is taken: a stanza handled after it would not be in the `h` the next
        # node answers, and the client would send it again.
        for sm in sessions:
            if sm.inner is not None:
                sm.inner.pause_input()
        try:
            async with asyncio.timeout(HANDOVER_WAIT):
                for sm in sessions:
                    await _routed(sm.session)
        except TimeoutError:
            self.log.warning("sm: stanzas of sessions being handed over still wait to be "
                             "routed after %g s; their clients may send them again",
                             HANDOVER_WAIT)
        for sm in sessions:
            self.save(sm)
        for sm in sessions:
            sm.handed = True  # what comes for them now is refused: offline storage
        try:
            async with asyncio.timeout(HANDOVER_WAIT):
                await self.store.flush()
        except TimeoutError:
            self.log.error("sm: the state of %d sessions did not reach Redis; "
                           "ending them here instead", len(sessions))
            for sm in sessions:
                sm.handed = False
            return False
        for sm in sessions:
            sm.session.available = False  # it goes on elsewhere: no unavailable to contacts
            if sm.inner is not None:
                sm.inner.drop()
            else:
                self.end(sm)
        self.stats.handed_over += len(sessions)
        self.log.info("sm: %d sessions handed over to the other nodes", len(sessions))
        return True

    def metrics(self) -> Iterator[Metric]:
        stats = self.stats
        for name, text, value in (
            ("enabled", "Sessions that enabled stream management.", stats.enabled),
            ("resumed", "Sessions resumed on the node they were on.", stats.resumed),
            ("resumed_elsewhere", "Sessions resumed here, taken over from another node.",
             stats.resumed_elsewhere),
            ("handed_over", "Sessions handed to other nodes by a drain.", stats.handed_over),
            ("resume_failed", "Resumptions refused (<failed/>).", stats.resume_failed),
            ("timed_out", "Sessions not resumed in time.", stats.timed_out),
            ("rerouted", "Unacknowledged messages of ended sessions routed again "
             "(to offline storage or another resource).", stats.rerouted),
            ("timeout_messages", "Of those, the ones of sessions not resumed in time (offline "
             "storage unless the account has another resource).", stats.timeout_messages),
            ("errored", "Unacknowledged IQ requests of ended sessions answered with an error.",
             stats.errored),
        ):
            yield CounterMetricFamily(f"xmppd_sm_{name}", text, value=value)
        waiting = sum(1 for sm in self.active if sm.inner is None)
        yield GaugeMetricFamily(
            "xmppd_sm_waiting", "SM sessions waiting to be resumed.", value=waiting
        )
        depths = [len(sm.queue) for sm in self.active]
        yield GaugeMetricFamily(
            "xmppd_sm_unacked", "Unacknowledged stanzas held, all SM sessions.", value=sum(depths)
        )
        if self.store is not None:
            yield GaugeMetricFamily(
                "xmppd_sm_redis_lag_max_seconds",
                "The longest a change waited for Redis (first change of a batch to its answer).",
                value=self.store.max_lag,
            )
        yield GaugeMetricFamily(
            "xmppd_sm_unacked_max", "The longest unacked queue of one session.",
            value=max(depths, default=0),
        )


MODULE = StreamManagement
