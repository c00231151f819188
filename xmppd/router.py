"""The one place that decides where a stanza goes (RFC 6120 section 10, RFC 6121 section 8).

The router does not deliver by itself: for each stanza it fires one event
named by the stanza's kind and address (`message/bare`, `message/full`,
`message/host`, and the same for `presence` and `iq`; Prosody's
core_post_stanza is the model), and the rules of RFC 6121 section 8 are
only the default handlers of those events, at the lowest priority
(`events.DEFAULT`). A module that handles a kind of stanza differently
hooks the event above them. Before that, stanzas from local clients pass
the "stanza/out" filters (privacy, blocking, sent carbons, directed
presence): the pre-phase. After a message is delivered, "message/delivered"
tells who got it, once per message (received carbons).

Delivery to a session already bound on this node is synchronous, so a
client's stanzas keep their order and the message path has no storage round
trip. Anything that needs storage (is there such an account, store it
offline) runs as a task, in order per recipient, and the sender's session
waits for it: a client is slowed to what storage takes, not queued in memory.
Domains served by a component inside the server (`serve_domain`) go to its
handler; other addresses this node does not serve go to `remote`, the seam
where cluster forwarding and s2s plug in.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Coroutine
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

from lxml import etree

from xmppd.directory import LocalDirectory, SessionDirectory
from xmppd.events import DEFAULT, STANZA_KINDS, Events, kind_chain
from xmppd.jid import JID, parse_jid
from xmppd.ledger import MessageLedger
from xmppd.pauses import PauseStats
from xmppd.session import ClientSession
from xmppd.storage.base import StorageError
from xmppd.stream.errors import StanzaError, StreamError, error_from, error_reply
from xmppd.xml import ns

log = logging.getLogger(__name__)

_T = TypeVar("_T")

ROUTE_SAMPLE = 64
"""One routed stanza in this many is timed (`Router.route_time`, /metrics): two clock
reads per 64 stanzas cost nothing measurable."""

ROUTE_BOUNDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1)
"""Seconds: the buckets of the routing time histogram."""

FILTER_WAIT = 10.0
"""Seconds a filter may make a stanza wait (a record loading) before it is refused."""
WAITS_PER_FILTER = 2
"""How often one filter may ask one stanza to wait: twice, as a privacy check may
need the recipient's record and then the sender's. Past that it cannot judge
(its store fails) and the stanza is refused rather than wait for ever."""

WORK_PER_SENDER = 32
"""How much of one account's work (tasks its stanzas started, jobs queued for them)
may be in flight before a stanza a filter took waits for some of it
(`Router._hold_if_busy`): room for a client's requests to overlap, a bound on what
one client can make the server hold."""

_SERIAL: contextvars.ContextVar[str | None] = contextvars.ContextVar("serial", default=None)
"""The account whose queued routing jobs the current task runs (Router._run_serially)."""
_OUTCOME: contextvars.ContextVar[_Outcome | None] = contextvars.ContextVar("outcome", default=None)
"""The message whose delivery to one chosen session the current task finishes after a
filter's wait (Router._deliver_after): a refusal there counts against it (`Router.refuse`)."""

_KINDS = {ns.C_MESSAGE: "message", ns.C_PRESENCE: "presence", ns.C_IQ: "iq"}
_EVENTS = {
    (tag, address): f"{kind}/{address}"
    for tag, kind in _KINDS.items()
    for address in ("bare", "full", "host")
}


def _first_done(futures: list[asyncio.Future[Any]]) -> asyncio.Future[None]:
    """A future done as soon as one of `futures` is (any order: they are unrelated)."""
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def finished(_: object) -> None:
        if not first.done():
            first.set_result(None)
        for future in futures:
            future.remove_done_callback(finished)

    for future in futures:
        future.add_done_callback(finished)
    return first


@dataclass(slots=True, eq=False)
class _Outcome:
    """What became of one message given to the sessions the delivery rules chose, when
    that is not known at once: a "stanza/in" filter refused it for one of them
    (`Router.refuse`), or a delivery waits for a filter (a record loading).

    One session's refusal is answered only if no other chosen session took the message
    (RFC 6121 8.5.2: delivered to one resource is delivered; the error would be false,
    and a client that trusts it sends the message again), and "message/delivered"
    comes only once one took it. `pending`: the deliveries still waiting, plus one for
    the routing call itself until its loop over the sessions ends (`Router._give`)."""

    routed: Routed
    pending: int = 1
    taken: bool = False
    refusal: tuple[str, str | None] | None = None  # the first error owed, if none takes it


class _Job(NamedTuple):
    """A routing job queued for one account (Router._serially)."""

    run: Callable[[], object]
    done: asyncio.Future[None]
    acting: str | None  # the account whose stanza queued it


@dataclass(slots=True)
class Routed:
    """One stanza on its way, as the routing event handlers see it.

    `recipients` are the sessions the delivery rules chose (filled by the
    default handler before "message/delivered"); `private` is set by a
    handler when the sender asked that no other resource gets a copy
    (XEP-0280 <private/>).
    """

    stanza: etree._Element
    to: JID
    origin: ClientSession | None = None
    bounce: bool = True
    recipients: list[ClientSession] = field(default_factory=list)
    private: bool = False


class SharedDelivery:
    """One message the delivery rules gave to several sessions at once (RFC 6121
    8.5.2.1.1: equal top priority; a headline: every non-negative resource).

    Each of those sessions is handed the same `stanza`. A module that may later take
    one session's delivery back (stream management, for a message the client never
    acknowledged) learns from this that the others have it too, so that it routes
    the message again only if none of them does: `ModuleHost.shared_delivery`.
    Weakly referable, so such a module can key what it learns by it.
    """

    __slots__ = ("stanza", "sessions", "__weakref__")

    def __init__(self, stanza: etree._Element, sessions: list[ClientSession]) -> None:
        self.stanza = stanza
        self.sessions = sessions


ComponentHandler = Callable[[Routed], None]

class RemoteRoute(Protocol):
    """Where stanzas for domains this node does not serve go (s2s, later).

    `bounce` False: a failure to deliver is not reported to the sender (the
    copies of a presence broadcast, see `Router.route`).
    """

    def route(self, stanza: etree._Element, bounce: bool = True) -> None: ...


class NoRemote:
    """Until s2s exists: remote domains are unreachable, and the sender is told so.

    RFC 6120 10.4.3: every stanza to a remote domain that cannot be delivered
    is answered with <remote-server-not-found/>: messages, IQ get/set,
    subscription requests and answers, probes, directed presence. Errors and
    IQ results are never answered (`Router.bounce`), and presence broadcast
    copies are routed with bounce=False.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def route(self, stanza: etree._Element, bounce: bool = True) -> None:
        if bounce:
            self.router.bounce(
                stanza, "remote-server-not-found", "no server-to-server connectivity"
            )


class Router:
    def __init__(
        self,
        hosts: Collection[str],
        user_exists: Callable[[str, str], Awaitable[bool]],
        directory: SessionDirectory | None = None,
        events: Events | None = None,
    ) -> None:
        self.hosts = frozenset(hosts)
        self.user_exists = user_exists  # (host, username) -> bool
        self.directory: SessionDirectory = directory if directory is not None else LocalDirectory()
        self.events = events if events is not None else Events()
        self.remote: RemoteRoute = NoRemote(self)
        self.components: dict[str, ComponentHandler] = {}
        self.ledger = MessageLedger()
        # How long route() takes for a sample of stanzas (its synchronous part: filters,
        # the delivery rules, the writes to local transports and the forwards queued).
        self.route_time = PauseStats(ROUTE_BOUNDS)
        self._routed = 0
        # What the stanza route() is handling now waits for (see deliver), None outside.
        self._waits: list[asyncio.Future[Any]] | None = None
        # The message being delivered now, when the delivery rules chose several
        # sessions (stream management learns from it that the others have it too),
        # that message, and what became of it when not known at once (`_give`).
        self.shared: SharedDelivery | None = None
        self._delivering: Routed | None = None
        self._outcome: _Outcome | None = None
        # Deliveries not taken on the spot: a "stanza/in" filter refused them, failed on
        # them or made them wait. A message that no chosen session took is not
        # "message/delivered" (no carbon copies it).
        self._untaken = 0
        self._tasks: set[asyncio.Future[object]] = set()
        self._serial: dict[str, deque[_Job]] = {}
        # A queue's runner -> the jobs the job it runs now queued (its completion waits
        # for theirs: the offline copy a "does the account exist" check leads to).
        self._followups: dict[asyncio.Future[Any], list[asyncio.Future[None]]] = {}
        # The local account whose stanza route() handles now (None outside, or for the
        # server's own), and the work each account's stanzas started that is not done.
        self._acting: str | None = None
        self._work: dict[str, set[asyncio.Future[Any]]] = {}
        # The account each routing task works for now (a queue's runner: its job's
        # sender). Looked up by the task, not inherited through contexts: a
        # connection or a long-lived task made inside one account's work must not
        # make everything it later does that account's.
        self._working_for: dict[asyncio.Future[Any], str] = {}
        # The filter chains on the stanza path, held so that no stanza looks them up:
        # one per stanza kind (a chat message walks only the filters for messages),
        # and all of them for a stanza of no known kind.
        self._out = self.events.chain("stanza/out")
        self._in = self.events.chain("stanza/in")
        self._out_by_tag = self._kind_chains("stanza/out")
        self._in_by_tag = self._kind_chains("stanza/in")
        self._delivered = self.events.chain("message/delivered")
        events = self.events
        events.on("message/full", self._message_full, DEFAULT)
        events.on("message/bare", self._message_bare, DEFAULT)
        events.on("message/host", self._message_host, DEFAULT)
        events.on("presence/full", self._presence_full, DEFAULT)
        events.on("presence/bare", self._presence_bare, DEFAULT)
        events.on("presence/host", self._presence_host, DEFAULT)
        events.on("iq/full", self._iq_full, DEFAULT)
        events.on("iq/bare", self._iq_unhandled, DEFAULT)
        events.on("iq/host", self._iq_unhandled, DEFAULT)

    # --- sessions ----------------------------------------------------------------------

    def bind(self, session: ClientSession) -> None:
        """Make `session` the one bound on its full JID.

        An existing session on the same resource is ended with <conflict/>
        (RFC 6120 section 7.7.2.2, "override"): the newest login wins.
        """
        old = self.directory.add(session)
        if old is not None:
            old.terminate(StreamError("conflict", "replaced by a new connection on this resource"))

    def unbind(self, session: ClientSession) -> None:
        self.directory.remove(session)

    def session_ended(self, session: ClientSession) -> None:
        """The client is gone (clean close or dropped TCP): others see it go unavailable.

        Not before every stanza the client sent is through the router (its
        pipeline may wait on storage): an unavailable presence sent just before
        </stream:stream> is the session's last word, with its status. Only a
        session still available after that gets a server-made unavailable.
        """
        if session.busy:
            session.when_idle(lambda: self.session_ended(session))
            return
        self.unbind(session)
        if session.available:
            presence = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
            presence.set("type", "unavailable")
            presence.set("from", session.jid)
            self.broadcast_presence(presence, session)
        if self.events.hooked("session/closed"):
            self.spawn(self.events.fire_async("session/closed", session))

    def serve_domain(self, domain: str, handler: ComponentHandler) -> None:
        """Route every stanza addressed to `domain` (a subdomain such as
        conference.<host>) to `handler`: a component inside the server."""
        if domain in self.hosts or domain in self.components:
            raise ValueError(f"{domain} is already served")
        self.components[domain] = handler

    def _kind_chains(self, event: str) -> dict[str, list[tuple[int, Callable[..., Any]]]]:
        return {
            f"{{{ns.CLIENT}}}{kind}": self.events.chain(kind_chain(event, kind))
            for kind in STANZA_KINDS
        }

    @property
    def routed(self) -> int:
        """Stanzas routed since start, of every kind, the server's own included (xmppctl
        stats shows their rate)."""
        return self._routed

    # --- routing -----------------------------------------------------------------------

    def route(
        self, stanza: etree._Element, origin: ClientSession | None = None, *, bounce: bool = True
    ) -> Awaitable[object] | None:
        """Send `stanza` where its 'to' says; errors go back to its sender.

        `origin` is the local session that sent it, None for stanzas the
        server makes; only the former pass the "stanza/out" filters
        (privacy lists, carbons of sent messages, directed presence).
        `bounce` False is for the server's copies of a presence broadcast to
        each contact: an unreachable remote domain is then not reported, one
        error per contact at every presence change being noise to the
        client (the probe at initial presence reports it once).

        Returns None when the stanza went its way at once (the message path),
        else what it still waits for: a filter that needs storage first (a
        privacy record loading), or storage work it queued (is there such an
        account, store it offline). The sender's session waits for that before
        routing its next stanza (`ClientSession.receive`), so its stanzas keep
        their order and its connection is not read meanwhile: a client writing
        to offline users as fast as it can is slowed to what storage takes.
        """
        self._routed += 1
        timed = not self._routed % ROUTE_SAMPLE
        started = time.perf_counter() if timed else 0.0
        previous, self._waits = self._waits, []
        acting = self._acting
        if origin is not None:
            self._acting = origin.bare
        pending: Coroutine[object, None, None] | None = None
        try:
            # The "stanza/out" filters of the stanza's kind (a local client's stanzas
            # only), then the routing event; in this frame, being run for every stanza.
            if origin is not None and self._out:
                chain = self._out_by_tag.get(stanza.tag, self._out)
                for entry in chain:
                    verdict = entry[1](stanza, origin)
                    if verdict is True:
                        continue
                    if verdict is not False:
                        pending = self._route_after(
                            verdict, chain, chain.index(entry), stanza, origin, bounce
                        )
                    else:
                        self._hold_if_busy(origin.bare)
                    break
                else:
                    self._dispatch(stanza, origin, bounce)
            else:
                self._dispatch(stanza, origin, bounce)
            waits = self._waits
        finally:
            self._waits = previous
            self._acting = acting
        if timed:
            self.route_time.add(time.perf_counter() - started)
        if pending is not None:
            assert origin is not None  # only a client's stanza meets "stanza/out" filters
            waits.append(self.spawn(pending, origin.bare))
        if not waits:
            return None
        # A future, not a coroutine: a caller that does not wait loses nothing.
        return waits[0] if len(waits) == 1 else asyncio.gather(*waits)

    def _hold_if_busy(self, account: str) -> None:
        """A "stanza/out" filter took the stanza: it may have started work for it that
        the router does not queue itself (the presence module writes a subscription
        request to the roster in a task). Past WORK_PER_SENDER pieces of the account's
        work in flight, the stanza waits for one of them, so that a client sending
        such requests faster than storage takes them is slowed (its connection not
        read) instead of piling up tasks. A chat message passes its filters and never
        comes here.

        It waits for the first of them to finish, never for the task routing it: that
        is the sender's own queue of waiting stanzas (`ClientSession._run`), also the
        account's work, which would wait for itself until SENDER_WAIT."""
        work = self._work.get(account)
        if work is None or len(work) < WORK_PER_SENDER or self._waits is None:
            return
        current = asyncio.current_task()
        others = [piece for piece in work if piece is not current]
        if others:
            self._waits.append(_first_done(others))

    async def _route_after(
        self,
        pending: Awaitable[object],
        chain: list[tuple[int, Callable[..., Any]]],
        index: int,
        stanza: etree._Element,
        origin: ClientSession,
        bounce: bool,
    ) -> None:
        """The "stanza/out" filter at `index` of `chain` asked to wait: wait, then go
        on from it."""
        if not await self._pass_after(chain, index, pending, stanza, origin, origin):
            return
        previous, self._waits = self._waits, []
        try:
            self._dispatch(stanza, origin, bounce)
            later = self._waits
        finally:
            self._waits = previous
        if later:
            await asyncio.gather(*later)

    async def _pass_after(
        self,
        chain: list[tuple[int, Callable[..., Any]]],
        index: int,
        pending: Awaitable[object] | None,
        stanza: etree._Element,
        subject: ClientSession,
        origin: ClientSession | None,
    ) -> bool:
        """Wait for `pending`, then run `chain` on from `index`; True if it passes.

        Each filter may ask this stanza to wait WAITS_PER_FILTER times; one that
        asks again after that cannot judge (its store fails), so the stanza is
        refused rather than wait for ever. `origin`: the local sender, for
        the refusal."""
        waits: dict[int, int] = {}  # filter position -> waits it asked for
        while True:
            if pending is not None:
                if not await self._waited(pending, stanza, origin):
                    return False
                waits[index] = waits.get(index, 0) + 1
            pending = None
            for position in range(index, len(chain)):
                try:
                    verdict = chain[position][1](stanza, subject)
                except Exception:
                    # A module's bug, as in `deliver`: refused, not lost in _run_serially.
                    log.exception("a filter failed on a %s after a wait", stanza.tag)
                    self.refuse_unjudged(stanza, origin)
                    return False
                if verdict is True:
                    continue
                if verdict is False:
                    return False
                if waits.get(position, 0) >= WAITS_PER_FILTER:
                    self.refuse_unjudged(stanza, origin)
                    return False
                index, pending = position, verdict
                break
            else:
                return True

    async def _waited(
        self,
        pending: Awaitable[object],
        stanza: etree._Element,
        origin: ClientSession | None = None,
    ) -> bool:
        """Wait for what a filter needs, at most FILTER_WAIT seconds; False (and the
        stanza refused) when it failed or took too long."""
        try:
            async with asyncio.timeout(FILTER_WAIT):
                await pending
            return True
        except Exception as exc:
            log.error("a filter waited in vain (%s) for %s", exc or type(exc).__name__, stanza.tag)
            self.refuse_unjudged(stanza, origin)
            return False

    def refuse_unjudged(
        self, stanza: etree._Element, origin: ClientSession | None = None
    ) -> None:
        """A filter could not judge the stanza (its rules did not load), or routing it
        raised (a module's bug, `ClientSession.receive`): neither let through what may
        be blocked nor lose it silently; presence is dropped.

        The error for a local sender (`origin`) goes straight to its session:
        through the filters it would meet the same unreadable rules. One delivery of a
        message among several chosen sessions is answered only if no other took it
        (`refuse`)."""
        if stanza.tag == ns.C_PRESENCE:
            return
        if origin is None:
            self.refuse(stanza, "internal-server-error", "try again later")
            return
        type_ = stanza.get("type")
        if type_ == "error" or (stanza.tag == ns.C_IQ and type_ not in ("get", "set")):
            return
        if stanza.tag == ns.C_MESSAGE:
            self.ledger.bounced += 1
        origin.deliver(error_reply(stanza, "internal-server-error", "try again later"))

    def _dispatch(self, stanza: etree._Element, origin: ClientSession | None, bounce: bool) -> None:
        to = stanza.get("to")
        try:
            if to is None:
                self._to_self(stanza, origin)
                return
            jid = parse_jid(to)
        except StanzaError as exc:
            self.reply_error(stanza, exc)
            return
        if jid.domain not in self.hosts:
            component = self.components.get(jid.domain)
            if component is not None:
                component(Routed(stanza, jid, origin, bounce))
            else:
                self.remote.route(stanza, bounce)
            return
        if not jid.user:
            if jid.resource:
                self.bounce(stanza, "service-unavailable")
                return
            address = "host"
        else:
            address = "full" if jid.resource else "bare"
        event = _EVENTS[(stanza.tag, address)]
        routed = Routed(stanza, jid, origin, bounce)
        if self._serial and jid.user and jid.bare in self._serial:
            # Something for this user still waits on storage (a subscription
            # answer, say): this stanza goes after it, not ahead of it, and its
            # sender waits with it (_serially).
            self._serially(jid.bare, lambda: self.events.fire(event, routed))
        else:
            self.events.fire(event, routed)

    def deliver(self, session: ClientSession, stanza: etree._Element) -> bool:
        """Hand a stanza to a local session, through the "stanza/in" filters.

        A filter that needs storage first returns what to wait for: the
        delivery then waits, in order with everything else for that account,
        and the sender of the stanza being routed waits with it. False when
        the session could not take the stanza (its stream is closing): then
        the "delivery/failure" hook (stanza, session) decides, and by default
        a message goes where one for an offline user goes and an IQ request
        is answered with an error, so nothing vanishes in the gap between a
        stream closing and its session ending.
        """
        if self._serial and session.bare in self._serial and _SERIAL.get() != session.bare:
            # Something for this account waits (its privacy record, say): after it.
            self._deliver_later(None, 0, session, stanza)
            return True
        try:
            chain = self._in_by_tag.get(stanza.tag, self._in)
            for entry in chain:
                verdict = entry[1](stanza, session)
                if verdict is True:
                    continue
                if verdict is False:
                    self._untaken += 1
                else:
                    self._deliver_later(verdict, chain.index(entry), session, stanza)
                return True
        except Exception:
            # A module's bug: this delivery cannot be judged, the others still go.
            log.exception("a stanza/in filter failed delivering to %s", session.jid)
            self._untaken += 1
            self.refuse_unjudged(stanza)
            return False
        if session.deliver(stanza):
            return True
        # Its transport is going: nothing more is routed to it (its end follows), so
        # the fallback below cannot choose it again.
        self.directory.remove(session)
        self._serially(session.bare, lambda: self._undelivered(stanza, session))
        return False

    def _deliver_later(
        self,
        pending: Awaitable[object] | None,
        index: int,
        session: ClientSession,
        stanza: etree._Element,
    ) -> None:
        """Queue the rest of a delivery behind what the account waits for; the stanza
        being routed (and so its sender) waits for it too (_serially). A message the
        delivery rules chose `session` for is not known to be taken until then."""
        self._untaken += 1
        shared = self.shared if self.shared is not None and self.shared.stanza is stanza else None
        outcome = self._outcome_of(stanza)
        if outcome is not None:
            outcome.pending += 1
        self._serially(
            session.bare,
            functools.partial(
                self._deliver_after, pending, index, session, stanza, shared, outcome
            ),
        )

    async def _deliver_after(
        self,
        pending: Awaitable[object] | None,
        index: int,
        session: ClientSession,
        stanza: etree._Element,
        shared: SharedDelivery | None,
        outcome: _Outcome | None,
    ) -> None:
        """The "stanza/in" filter at `index` asked to wait (or, with no `pending`,
        the account had something waiting): wait, then go on from that filter.
        `shared`: the delivery, when the rules gave the same message to other sessions;
        `outcome`: that message's, which this delivery settles its share of."""
        chain = self._in_by_tag.get(stanza.tag, self._in)  # the one `index` is in
        try:
            token = _OUTCOME.set(outcome)  # what the filters refuse counts against it
            try:
                passed = await self._pass_after(chain, index, pending, stanza, session, None)
            finally:
                _OUTCOME.reset(token)
            if passed and await self._deliver_judged(session, stanza, shared):
                if outcome is not None:
                    outcome.taken = True
        finally:
            if outcome is not None:
                self._share_settled(outcome)

    async def _deliver_judged(
        self, session: ClientSession, stanza: etree._Element, shared: SharedDelivery | None
    ) -> bool:
        """The filters let a waiting delivery through: hand it over, or, if `session`
        is gone, route it on. False when it was left to another chosen session."""
        if self.directory.get(session.bare, session.resource) is not session:
            # It ended meanwhile. If another session chosen for the same message is
            # still bound, that one has it (or refused it); else a message is routed
            # again as if it had just come (other resources, or offline storage), the
            # rest as for any session that just ended.
            chosen = shared.sessions if shared is not None else ()
            if stanza.tag != ns.C_MESSAGE:
                await self._undelivered(stanza, session)
            elif any(
                s is not session and self.directory.get(s.bare, s.resource) is s for s in chosen
            ):
                return False
            else:
                self._route_again(stanza, session)
            return True
        previous, self.shared = self.shared, shared
        try:
            delivered = session.deliver(stanza)
        finally:
            self.shared = previous
        if not delivered:
            self.directory.remove(session)
            await self._undelivered(stanza, session)
        return True

    def _outcome_of(self, stanza: etree._Element) -> _Outcome | None:
        """The outcome a delivery or refusal of `stanza` now counts against: that of the
        message `_give` is handing to its chosen sessions (made at the first delivery
        not taken on the spot), or that of the waiting delivery being finished."""
        routed = self._delivering
        if routed is not None and routed.stanza is stanza:
            if self._outcome is None:
                self._outcome = _Outcome(routed)
            return self._outcome
        outcome = _OUTCOME.get()
        if outcome is not None and outcome.routed.stanza is stanza and outcome.pending:
            return outcome
        return None

    def _share_settled(self, outcome: _Outcome) -> None:
        """One of the deliveries (or the routing call) `outcome` waited for is done."""
        outcome.pending -= 1
        if outcome.pending:
            return
        if outcome.taken:
            if self._delivered:
                self.events.notify("message/delivered", outcome.routed)
        elif outcome.refusal is not None:
            self.bounce(outcome.routed.stanza, *outcome.refusal)

    def refuse(self, stanza: etree._Element, condition: str, text: str | None = None) -> None:
        """A "stanza/in" filter refuses to deliver `stanza` to one session, and its sender
        is owed `condition` (privacy: <service-unavailable/>). For a message the
        delivery rules gave to several sessions, the error goes only if none of them
        took it (the first refusal's condition), once they all answered: a message that
        reached one resource was delivered, and an error would make the sender's client
        send it again. Anything else is answered at once (`bounce`)."""
        outcome = self._outcome_of(stanza)
        if outcome is None:
            self.bounce(stanza, condition, text)
        elif outcome.refusal is None:
            outcome.refusal = (condition, text)

    def _route_again(self, stanza: etree._Element, session: ClientSession) -> None:
        """A message its chosen session could not take: the rules again, now without it."""
        if stanza.get("type") in ("error", "groupchat"):
            return  # an error is never answered; groupchat is not an account's
        to = stanza.get("to")
        jid = JID(session.bare) if to is None else parse_jid(to)
        event = "message/full" if jid.resource else "message/bare"
        self.events.fire(event, Routed(stanza, jid))

    async def _undelivered(self, stanza: etree._Element, session: ClientSession) -> None:
        if await self.events.fire_async("delivery/failure", stanza, session):
            return
        type_ = stanza.get("type")
        if stanza.tag == ns.C_MESSAGE and type_ not in ("error", "groupchat"):
            await self._offline(stanza, session.bare)
        elif stanza.tag == ns.C_IQ and type_ in ("get", "set"):
            self.bounce(stanza, "service-unavailable")

    def _to_self(self, stanza: etree._Element, origin: ClientSession | None) -> None:
        """No 'to': the stanza is for the sender's own account (RFC 6120 section 10.3)."""
        if stanza.tag == ns.C_PRESENCE and origin is not None:
            self.broadcast_presence(stanza, origin)
        elif stanza.tag == ns.C_IQ:
            sender = stanza.get("from") or ""
            self.events.fire("iq/bare", Routed(stanza, JID(JID(sender).bare), origin))
        elif stanza.tag == ns.C_MESSAGE:
            # RFC 6120 10.3.1: as if addressed to the sender's bare JID. Routed again
            # (stream management, another node: no origin), its stamped 'from' names
            # the sender; dropped there, it would be neither delivered nor stored.
            if origin is not None:
                self.events.fire("message/bare", Routed(stanza, JID(origin.bare), origin))
                return
            sender = JID(JID(stanza.get("from") or "").bare)
            if sender.user and sender.domain in self.hosts:
                self.events.fire("message/bare", Routed(stanza, sender))

    # --- the default handlers: RFC 6121 section 8 ----------------------------------------

    def _message_host(self, routed: Routed) -> bool:
        """A message to the server's own domain that no module took: the sender learns
        nobody here takes it (RFC 6120 8.3.3.19; Prosody answers every unhandled
        stanza so), whatever its type but error, rather than have it vanish."""
        self.bounce(routed.stanza, "service-unavailable")
        return True

    def _presence_host(self, routed: Routed) -> bool:
        """Presence to the server's own domain that no module took: ignored, as presence
        to an address that takes none is (RFC 6121 8.5.1); answering every directed
        presence and probe some client sends its server would only be noise."""
        return True

    def _iq_unhandled(self, routed: Routed) -> bool:
        self.bounce(routed.stanza, "service-unavailable")
        return True

    def _message_full(self, routed: Routed) -> bool:
        stanza, jid = routed.stanza, routed.to
        session = self.directory.get(jid.bare, jid.resource)
        if session is not None:
            self._give(routed, [session])
            return True
        type_ = stanza.get("type")
        if type_ == "groupchat":
            self.bounce(stanza, "service-unavailable")
        elif type_ == "headline":
            # RFC 6121 8.5.3.2.1: ignored (it was for that resource only; an error would
            # tell the sender the resource is gone), as ejabberd does.
            self.ledger.drop("not-stored")
        elif type_ != "error":
            self._message_bare(routed)  # as Prosody and ejabberd do
        return True

    def _message_bare(self, routed: Routed) -> bool:
        if self.directory.has(routed.to.bare):  # the usual case, without _to_account's frame
            self._message_to_account(routed)
            return True
        return self._to_account(routed, self._message_to_account, self._no_such_user)

    def _to_account(
        self,
        routed: Routed,
        to_account: Callable[[Routed], None],
        no_account: Callable[[Routed], None] | None,
    ) -> bool:
        """Hand a stanza for a bare JID to `to_account`, once the account is known to
        exist: at once when it has a session here, else after asking storage
        (RFC 6121 8.5.1), in order with whatever else waits for that account;
        `no_account` answers it when there is no such account."""
        bare = routed.to.bare
        if self.directory.has(bare):
            to_account(routed)
        else:
            self._serially(bare, lambda: self._if_account(routed, to_account, no_account))
        return True

    async def _if_account(
        self,
        routed: Routed,
        to_account: Callable[[Routed], None],
        no_account: Callable[[Routed], None] | None,
    ) -> None:
        jid = routed.to
        try:
            exists = await self.user_exists(jid.domain, jid.user)
        except Exception as exc:
            # Not known whether there is such an account: neither deliver nor say there
            # is none. The stanza is answered, never dropped unseen.
            if isinstance(exc, StorageError):
                log.error("is there an account %s? storage failed: %s", jid.bare, exc)
            else:
                log.exception("is there an account %s? the lookup failed", jid.bare)
            self._account_unknown(routed.stanza)
            return
        if exists:
            to_account(routed)
        elif no_account is not None:
            no_account(routed)

    def _account_unknown(self, stanza: etree._Element) -> None:
        """The account store did not answer for the recipient: a message gets
        internal-server-error of type wait (as `storage_call` answers a module's storage
        failure), so the sender may send it again; presence, which nobody answers, is
        only logged. No retry here: the sender's client is the one to retry (type wait),
        while this job holds up everything queued for the account."""
        if stanza.tag == ns.C_PRESENCE:
            return
        self.reply_error(
            stanza,
            StanzaError("internal-server-error", "storage is unavailable, try again later", "wait"),
        )

    def _no_such_user(self, routed: Routed) -> None:
        self.bounce(routed.stanza, "service-unavailable")

    def _no_such_contact(self, routed: Routed) -> None:
        """A subscription request or a probe to an account that does not exist is
        answered "unsubscribed" (RFC 6121 8.5.1, 3.1.3, 4.3.2), whether a local user or
        another server sent it, so the sender's roster stops waiting for an answer;
        other presence to it is ignored."""
        stanza = routed.stanza
        sender = stanza.get("from")
        if sender is None or stanza.get("type") not in ("subscribe", "probe"):
            return
        try:
            contact = parse_jid(sender).bare
        except StanzaError:
            return
        answer = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
        answer.set("type", "unsubscribed")
        answer.set("from", routed.to.bare)
        answer.set("to", contact)
        self.route(answer)

    def _message_to_account(self, routed: Routed) -> None:
        """RFC 6121 8.5.2.1.1 / 8.5.2.2.1: the highest non-negative priority resources
        (every non-negative one for a headline), else offline storage decides."""
        stanza, bare = routed.stanza, routed.to.bare
        type_ = stanza.get("type")
        if type_ == "error":
            return
        if type_ == "groupchat":
            self.bounce(stanza, "service-unavailable")
            return
        eligible = [s for s in self.directory.available(bare) if s.priority >= 0]
        if not eligible:
            # Offline storage decides, headlines included (a XEP-0334 <store/> hint).
            self._serially(bare, lambda: self._offline(stanza, bare))
            return
        if type_ != "headline" and len(eligible) > 1:  # one resource: nothing to choose
            top = max(s.priority for s in eligible)
            eligible = [s for s in eligible if s.priority == top]
        self._give(routed, eligible)

    def _give(self, routed: Routed, chosen: list[ClientSession]) -> None:
        """Deliver a message to the sessions the rules chose; "message/delivered" once
        one took it. Whatever a "stanza/in" filter refuses or makes wait is counted
        against the message's `_Outcome`, made only then: a message every session
        takes at once (most) costs two counter reads per session."""
        stanza = routed.stanza
        routed.recipients.extend(chosen)
        shared = SharedDelivery(stanza, chosen) if len(chosen) > 1 else None
        previous = self.shared, self._delivering, self._outcome
        self.shared, self._delivering, self._outcome = shared, routed, None
        taken = False  # by a session whose filters let it through at once
        try:
            for session in chosen:
                untaken = self._untaken
                self.deliver(session, stanza)
                taken = taken or self._untaken == untaken
        finally:
            outcome = self._outcome
            self.shared, self._delivering, self._outcome = previous
            if outcome is not None:  # this call's share; the waiting ones settle theirs
                outcome.taken = outcome.taken or taken
                self._share_settled(outcome)
        if outcome is None and taken and self._delivered:
            self.events.notify("message/delivered", routed)

    def _presence_full(self, routed: Routed) -> bool:
        """Subscription states and probes concern the account, whatever the resource
        (RFC 6121 8.5.3.1 -> sections 3 and 4.3); other presence goes to that
        resource if it is bound, and is ignored if not."""
        stanza, jid = routed.stanza, routed.to
        type_ = stanza.get("type")
        if type_ in ns.SUBSCRIPTION_TYPES or type_ == "probe":
            self._presence_bare(routed)
            return True
        session = self.directory.get(jid.bare, jid.resource)
        if session is not None:
            self.deliver(session, stanza)
        return True

    def _presence_bare(self, routed: Routed) -> bool:
        return self._to_account(routed, self._presence_to_account, self._no_such_contact)

    def _presence_to_account(self, routed: Routed) -> None:
        stanza, bare = routed.stanza, routed.to.bare
        type_ = stanza.get("type")
        if type_ in ns.SUBSCRIPTION_TYPES or type_ == "probe":
            event = f"presence/{type_}"
            if self.events.hooked(event):
                self._serially(bare, lambda: self.events.fire_async(event, stanza, bare))
                return
        available = self.directory.available(bare)
        if type_ == "error" and not available:
            # An error about a subscription request the account sent (stamped
            # with its bare JID, RFC 6121 3.1.2) reaches the client that sent
            # it, even one that has not sent presence yet.
            available = self.directory.resources(bare)
        if type_ != "probe":
            for session in available:
                self.deliver(session, stanza)

    def _iq_full(self, routed: Routed) -> bool:
        stanza, jid = routed.stanza, routed.to
        session = self.directory.get(jid.bare, jid.resource)
        if session is not None:
            self.deliver(session, stanza)
        elif stanza.get("type") in ("get", "set"):
            self.bounce(stanza, "service-unavailable")
        return True

    def ahead(self, bare: str, work: Callable[[], Awaitable[object]], wait: float) -> None:
        """Run `work()` before any stanza routed to the local account `bare` from now on
        reaches it: as a job in the account's serial queue, so that those queue behind
        it, while what `work` delivers to the account goes straight through (XEP-0160:
        stored messages before new ones). The client whose stanza set it off is not
        held for it. After `wait` seconds the queue goes on without it, as a store that
        hangs must not hold the account's stanzas for good: `work` runs on, and what it
        delivers then reaches the account after them (logged)."""
        self._serially(bare, functools.partial(self._ahead, bare, work, wait), hold=False)

    def behind(self, bare: str, job: Callable[[_T], object], arg: _T) -> bool:
        """Queue `job(arg)` behind the routing jobs the local account `bare` has queued
        here, and say True; False, queueing nothing, when it has none. For what reaches
        the account without being routed here (a stanza another node forwarded,
        xmppd.cluster.inbox): it must not overtake what `ahead` put first, nor what
        waits on storage for the account. Nobody's stanza waits for the job. `arg`
        rather than a closure: with no queue (most stanzas) none is built."""
        if bare not in self._serial:
            return False
        self._serially(bare, functools.partial(job, arg), hold=False)
        return True

    async def _ahead(self, bare: str, work: Callable[[], Awaitable[object]], wait: float) -> None:
        task = self._spawn(work(), self._current_account(), serial=bare)
        done, _ = await asyncio.wait((task,), timeout=wait)
        if not done:
            log.warning(
                "%s: what had to reach it first still runs after %g s: the stanzas "
                "for it go on, and what that delivers follows them", bare, wait,
            )

    def _serially(
        self, bare: str, job: Callable[[], object], hold: bool = True
    ) -> asyncio.Future[None]:
        """Run `job` after the jobs already queued for `bare`; the future is done when it ran.

        Whatever waits on storage for one recipient (is there such an
        account, store it offline, a subscription request, a privacy record)
        keeps the order the stanzas arrived in, whatever order the backend
        answers in.

        The stanza being routed waits for the job (its sender's session stops
        reading until it ran: backpressure instead of a queue per stanza in
        memory); a job queued by another job makes that one's future wait for
        it too, so the sender is held until the whole chain ran. With `hold` False
        neither waits for it (`ahead`: work for the account, not the sender's stanza).
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acting = self._acting or self._current_account()
        if acting is not None:  # the job is the sender's work until it ran
            self._track(acting, done)
        if hold:
            if self._waits is not None:
                self._waits.append(done)
            elif (runner := asyncio.current_task()) is not None and runner in self._followups:
                self._followups[runner].append(done)
        queue = self._serial.get(bare)
        if queue is None:
            queue = self._serial[bare] = deque()
            # Nobody's work: it runs the jobs of every sender to `bare`.
            self._spawn(self._run_serially(bare, queue), None)
        queue.append(_Job(job, done, acting))
        return done

    async def _run_serially(self, bare: str, queue: deque[_Job]) -> None:
        _SERIAL.set(bare)  # this task's context: what its jobs deliver to `bare` goes now
        me = asyncio.current_task()
        assert me is not None
        try:
            while queue:
                job, done, acting = queue.popleft()
                if acting is None:
                    self._working_for.pop(me, None)
                else:
                    self._working_for[me] = acting  # what the job starts is its sender's work
                followups = self._followups[me] = []
                try:
                    pending = job()
                    if inspect.isawaitable(pending):
                        await pending
                except Exception:
                    log.exception("routing to %s failed", bare)
                finally:
                    del self._followups[me]
                    _done_after(done, followups)
        finally:
            self._working_for.pop(me, None)
            del self._serial[bare]
            for _, done, _ in queue:  # cancelled: whoever waits for these must not hang
                if not done.done():
                    done.set_result(None)

    def broadcast_presence(self, stanza: etree._Element, origin: ClientSession) -> None:
        """Presence without 'to': the client's own availability (RFC 6121 section 4.2).

        Every available resource of the user gets it here, the sender itself
        included while it is connected (RFC 6121 4.2.2 and 4.5.2: an entity
        is implicitly subscribed to its own presence; clients take the echo
        as the sign they are online). The "presence/self" filters (stanza,
        origin) see it synchronously first; the "presence/broadcast" hook
        (stanza, origin, initial) lets the presence module tell contacts,
        where `initial` says the resource just became available.

        A presence still in the session's pipeline when its stream ended (it
        waited for a filter; see `session_ended`) is still processed if it is
        unavailable (its status is the user's last word), and dropped if it is
        available: the session is gone, so announcing it would leave it
        online for good.
        """
        type_ = stanza.get("type")
        if type_ not in (None, "unavailable"):
            self.bounce(stanza, "bad-request", "presence of this type needs a 'to'")
            return
        bound = self.directory.get(origin.bare, origin.resource) is origin
        if type_ is None and not bound:
            return
        if not self.events.passes("presence/self", stanza, origin):
            return
        initial = type_ is None and not origin.available
        origin.available = type_ is None
        origin.presence = stanza if type_ is None else None
        try:
            origin.priority = int(stanza.findtext(f"{{{ns.CLIENT}}}priority") or 0)
        except ValueError:
            origin.priority = 0
        self.directory.presence_changed(origin)
        for session in self.directory.resources(origin.bare):
            if session.available or session is origin:
                self.deliver(session, stanza)
        # Sync handlers first, in this call: what must come before anything else
        # reaches the account (the offline module queues the stored messages ahead).
        self.events.notify("presence/broadcast", stanza, origin, initial)
        if self.events.hooked("presence/broadcast"):
            self.spawn(self.events.fire_async("presence/broadcast", stanza, origin, initial))

    async def _offline(self, stanza: etree._Element, bare: str) -> None:
        """No resource takes the message: offline storage may ("message/offline");
        else a chat or normal message bounces and a headline is counted as not stored."""
        if await self.events.fire_async("message/offline", stanza, bare):
            return
        if stanza.get("type") in (None, "normal", "chat"):
            self.bounce(stanza, "service-unavailable", "the recipient is offline")
        else:
            self.ledger.drop("not-stored")  # a headline, with no offline storage

    # --- errors ------------------------------------------------------------------------

    def bounce(self, stanza: etree._Element, condition: str, text: str | None = None) -> None:
        """Answer `stanza` with an error, unless it is itself an error (no error loops)."""
        if stanza.get("type") == "error" or stanza.get("from") is None:
            return
        if stanza.tag == ns.C_MESSAGE:
            self.ledger.bounced += 1
        if stanza.tag == ns.C_IQ and stanza.get("type") not in ("get", "set"):
            return
        self.route(error_reply(stanza, condition, text))

    def reply_error(self, stanza: etree._Element, exc: StanzaError) -> None:
        """Answer `stanza` with `exc`, unless it is an error or an IQ result (RFC 6120
        8.2.3 and 8.3.1: never answered)."""
        if stanza.get("type") in ("error", "result") or stanza.get("from") is None:
            return
        if stanza.tag == ns.C_MESSAGE:
            self.ledger.bounced += 1
        self.route(error_from(stanza, exc))

    def spawn(self, coro: Awaitable[object], account: str | None = None) -> asyncio.Future[Any]:
        """Run `coro` as a task the router tracks (drained at shutdown, errors logged).

        It is the work of `account` (`account_work`) when that is given, or when a
        client's stanza of that account is being routed, or when the task that spawns
        it is itself such work: whatever a client's stanza sets off through `spawn`
        counts, however many tasks deep, so that an account's removal can wait for
        all of it."""
        return self._spawn(coro, account or self._acting or self._current_account())

    def spawn_shared(self, coro: Awaitable[object]) -> asyncio.Future[Any]:
        """`spawn` for work of nobody in particular, even when one account's stanza
        starts it: a connection to a peer, a queue many senders feed. Counted as that
        account's, it would keep the account's removal waiting for others' traffic."""
        return self._spawn(coro, None)

    def _current_account(self) -> str | None:
        task = asyncio.current_task()
        return None if task is None else self._working_for.get(task)

    def _spawn(
        self, coro: Awaitable[object], acting: str | None, serial: str | None = None
    ) -> asyncio.Future[Any]:
        """`serial`: the account whose queue the task counts as running (`ahead`), so
        that what it delivers there goes straight; None for any other task."""
        task: asyncio.Future[Any]
        if asyncio.iscoroutine(coro):
            # Not in the account queue's context (_SERIAL) of a job that starts it: what
            # the task delivers later must queue like anything else; nor in the
            # outcome of a delivery it was started from (_OUTCOME): a refusal it makes
            # later is its own, not one more of that delivery's.
            context = contextvars.copy_context()
            context.run(_SERIAL.set, serial)
            context.run(_OUTCOME.set, None)
            task = asyncio.get_running_loop().create_task(coro, context=context)
        else:
            task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if acting is not None:
            self._working_for[task] = acting
            self._track(acting, task)
        return task

    def _track(self, account: str, work: asyncio.Future[Any]) -> None:
        tracked = self._work.get(account)
        if tracked is None:
            tracked = self._work[account] = set()
        tracked.add(work)
        work.add_done_callback(functools.partial(self._work_done, account))

    def _work_done(self, account: str, work: asyncio.Future[Any]) -> None:
        self._working_for.pop(work, None)
        tracked = self._work.get(account)
        if tracked is not None:
            tracked.discard(work)
            if not tracked:
                del self._work[account]

    def account_work(self, bare: str) -> frozenset[asyncio.Future[Any]]:
        """What the stanzas of the local account `bare` set off that is not done yet
        (handlers of its IQs, writes its presence started, its queued stanzas): an
        account's removal waits for it, so that no write of the account lands after
        its data was deleted."""
        return frozenset(self._work.get(bare, ()))

    def _task_done(self, task: asyncio.Future[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("routing task failed", exc_info=exc)

    def pending(self) -> frozenset[asyncio.Future[object]]:
        """The routing tasks in flight now: the work an action started is what
        appears after it (Server.end_account_sessions waits for exactly that)."""
        return frozenset(self._tasks)

    async def drain(self) -> None:
        """Wait for routing tasks in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _done_after(done: asyncio.Future[None], followups: list[asyncio.Future[None]]) -> None:
    """Complete a job's `done` once the jobs it queued (`followups`) are: its sender is
    held until the whole chain ran, not just its first link."""
    if not followups:
        if not done.done():
            done.set_result(None)
        return
    remaining = len(followups)

    def one_done(_: asyncio.Future[None]) -> None:
        nonlocal remaining
        remaining -= 1
        if not remaining and not done.done():
            done.set_result(None)

    for followup in followups:
        followup.add_done_callback(one_done)
