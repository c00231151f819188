"""Presence and presence subscriptions (RFC 6121 sections 3 and 4).

The subscription state machine is the two pure functions `outbound` and
`inbound` (RFC 6121 Appendix A, pre-approval of section 3.4 included); the
module applies them to the roster with conditional writes and then routes,
delivers or drops the stanza as the tables say.

* The user's own subscription presences are caught in the "stanza/out"
  filter (synchronous), stamped with the user's bare JID and queued: roster
  change and push first, then routing.
* Subscription presences addressed to a local user arrive through the
  "presence/subscribe" ... hooks and are queued the same way.
* Each account has one queue of subscription changes (modules/_queues.py),
  worked by one task in the order they came: every change rewrites the
  account's roster, so run at once they would conflict or land out of order.
  A change its own client sent counts as that client's work until made, so the
  router stops reading a client with WORK_PER_SENDER of them in flight
  (`Router._hold_if_busy`); changes from contacts (other servers, other local
  users) wait INBOUND_WAITING at most per account, and one more is refused
  with a resource-constraint error (type wait) to its sender. The queue's task
  is the account's work (`ModuleHost.spawn(..., account)`), so the account's
  removal waits until its queue is empty before the data goes; a contact's
  change that runs once the account is gone writes nothing (a request is
  answered "unsubscribed", as one to no account). The account's own changes
  need no such check: its sessions are read no more once it is gone, and what
  they sent before is made before the data goes.
* An approval (the user's, pre-approval, or the server's automatic one) sends
  the user's presence to the contact after the "subscribed" (RFC 6121 3.1.5):
  at once to a remote contact; a local contact's queue probes for it once it
  took the "subscribed" and pushed the change, so the presence does not
  overtake them (`_send_on_approval`).
* A subscribe request not yet answered is
  `pending_in` in the roster item, and the stanza itself is kept whole
  (modules/_requests.py: a <nick/>, a XEP-0379 <preauth/> survive) and
  delivered at each initial presence until the user answers it; it is
  forgotten when answered, cancelled, removed with the roster item or
  with the account.
* "presence/broadcast": initial presence sends probes to the contacts the
  user is subscribed to, hands the new resource the presence of the user's
  other resources and any pending requests; every broadcast goes to the
  contacts subscribed to the user; unavailable also goes to every entity
  that got directed presence from that session (section 4.6), including
  when the connection just drops. One session's broadcasts are handled in
  the order it sent them. The roster read of a broadcast (and of a probe
  answer) is made again when a change that may have ended a contact's
  subscription was stored meanwhile (`_current`): nothing of the user's
  reaches a contact after the unavailable that change sent. The copies to
  each contact are routed with bounce=False: a remote domain that cannot be
  reached is reported once, by the error answering the probe at initial
  presence, not at every change.
* "session/lost": an available session whose cluster node died (the node
  that reaped it fires it) gets the unavailable its node owed, to contacts,
  the user's other resources and the entities it sent directed presence to:
  on a cluster each session's directed-presence targets are kept in Redis
  (`xmppd:presence:directed:<full JID>`, written when the set changes, deleted
  when the session ends) for the reaping node to read.
* "session/resumed": a session a client resumed here from another node takes
  its directed-presence targets over from Redis (its old node ended its copy
  without an unavailable), so they get one when it leaves.
* "presence/probe": answered with the last presence of each available
  resource when the prober is subscribed; otherwise silently ignored, and
  nothing when the user is offline (RFC 6121 4.3.2 allows either).

Every presence the module makes in a user's name (broadcast copies, probes,
probe answers, the unavailable at logout or for a lost session) is routed
without an origin session, so no "stanza/out" filter sees it: the user's
blocklist and privacy lists are asked first (`presence_gate` of the privacy
or blocking module, when one is enabled), so that a blocked or denied contact
on another server sees nothing. Local contacts are judged again at delivery.
"""

from __future__ import annotations

import asyncio
import copy
import json
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar

from lxml import etree
from redis.exceptions import RedisError

from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import Module, ModuleHost
from xmppd.modules._queues import AccountQueues
from xmppd.modules._requests import SubscriptionRequests
from xmppd.modules.blocking import Blocking
from xmppd.modules.privacy import Privacy
from xmppd.modules.roster import Roster, RosterItem, RosterModule, Subscription
from xmppd.storage.base import StorageError
from xmppd.stream.errors import StanzaError, error_reply
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.session import ClientSession

PRE_APPROVAL = "urn:xmpp:features:pre-approval"
MAX_DIRECTED = 1000  # directed-presence targets remembered per session
INBOUND_WAITING = 100
"""Subscription presences from contacts that may wait for one account's queue: a flood
(from another server, which nothing holds back) is answered, not piled up."""
ROSTER_RETRY = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
"""Seconds between reads of the roster a presence broadcast needs while storage fails."""
# In each session's state bag: whether its availability went to its contacts,
# and the entities it sent directed available presence to (RFC 6121 4.6).
ANNOUNCED = "presence/announced"
DIRECTED = "presence/directed"
# On a cluster, a session's directed-presence targets as a JSON list, for the node that
# reaps it if its own dies. The expiry only clears what a lost delete left behind; it
# is renewed at each change, so a session whose targets stay the same for longer
# than that is reaped without their unavailable.
DIRECTED_KEY = "xmppd:presence:directed:"
DIRECTED_TTL = 7 * 86400

Kind = Literal["subscribe", "subscribed", "unsubscribe", "unsubscribed"]
T = TypeVar("T")
Gate = Callable[[etree._Element], bool]
"""The sender's privacy rules on one presence the server makes in its name (True: send it)."""


# --- the state machine (RFC 6121 Appendix A) ------------------------------------------------


_WITH_TO: dict[Subscription, Subscription] = {
    "none": "to",
    "to": "to",
    "from": "both",
    "both": "both",
}
_WITHOUT_TO: dict[Subscription, Subscription] = {
    "none": "none",
    "to": "none",
    "from": "from",
    "both": "from",
}
_WITH_FROM: dict[Subscription, Subscription] = {
    "none": "from",
    "to": "both",
    "from": "from",
    "both": "both",
}
_WITHOUT_FROM: dict[Subscription, Subscription] = {
    "none": "none",
    "to": "to",
    "from": "none",
    "both": "to",
}


def _drop_if_empty(item: RosterItem) -> RosterItem | None:
    """An entry kept only for a pending request goes when nothing is pending any more."""
    if not item.in_roster and not (item.pending_in or item.ask or item.approved):
        if item.subscription == "none":
            return None
    return item


def outbound(kind: Kind, item: RosterItem | None, contact: str) -> tuple[RosterItem | None, bool]:
    """The user sent `kind` to `contact`: (new item, route it?). Appendix A.2, section 3.4."""
    if kind == "subscribe":
        new = item.copy() if item is not None else RosterItem(jid=contact)
        new.in_roster = True  # RFC 6121 3.1.2: the contact goes into the roster
        if new.subscription in ("none", "from"):
            new.ask = True
        return new, True
    if item is None:
        if kind == "subscribed":  # pre-approval (3.4) of someone not in the roster
            return RosterItem(jid=contact, approved=True), False
        return None, kind == "unsubscribe"
    new = item.copy()
    if kind == "unsubscribe":
        new.subscription = _WITHOUT_TO[new.subscription]
        new.ask = False
        return new, True
    if kind == "subscribed":
        if new.subscription in ("from", "both"):
            return item, False
        if new.pending_in:
            new.subscription = _WITH_FROM[new.subscription]
            new.pending_in = new.approved = False
            new.in_roster = True  # RFC 6121 3.1.5
            return new, True
        new.approved = True
        new.in_roster = True
        return new, False
    # unsubscribed
    if new.pending_in or new.subscription in ("from", "both"):
        new.subscription = _WITHOUT_FROM[new.subscription]
        new.pending_in = new.approved = False
        return _drop_if_empty(new), True
    if new.approved:  # cancels a pre-approval
        new.approved = False
        return _drop_if_empty(new), False
    return item, False


def inbound(
    kind: Kind, item: RosterItem | None, contact: str
) -> tuple[RosterItem | None, bool, Kind | None]:
    """`contact` sent `kind` to the user: (new item, deliver it?, automatic reply). Appendix A.3."""
    if kind == "subscribe":
        if item is not None and item.subscription in ("from", "both"):
            return item, False, "subscribed"
        if item is not None and item.approved:
            new = item.copy()
            new.subscription = _WITH_FROM[new.subscription]
            new.approved = False
            return new, False, "subscribed"
        if item is not None and item.pending_in:
            return item, False, None
        new = item.copy() if item is not None else RosterItem(jid=contact, in_roster=False)
        new.pending_in = True
        return new, True, None
    if item is None:
        return None, False, None
    new = item.copy()
    if kind == "unsubscribe":
        if not (new.pending_in or new.subscription in ("from", "both")):
            return item, False, None
        new.subscription = _WITHOUT_FROM[new.subscription]
        new.pending_in = False
        return _drop_if_empty(new), True, None
    if kind == "subscribed":
        if not (new.ask and new.subscription in ("none", "from")):
            return item, False, None
        new.subscription = _WITH_TO[new.subscription]
        new.ask = False
        return new, True, None
    # unsubscribed
    if not (new.ask or new.subscription in ("to", "both")):
        return item, False, None
    new.subscription = _WITHOUT_TO[new.subscription]
    new.ask = False
    return new, True, None


# --- the module --------------------------------------------------------------------------


class Presence(Module):
    name = "presence"
    requires = ("roster",)

    def setup(self) -> None:
        self.host.filter("stanza/out", self._on_out, priority=-100, kinds=("presence",))
        for kind in ns.SUBSCRIPTION_TYPES:
            self.host.hook(f"presence/{kind}", self._make_inbound(kind))  # type: ignore[arg-type]
        self.host.hook("presence/probe", self._on_probe)
        self.host.hook("presence/broadcast", self._on_broadcast)
        self.host.hook("session/closed", self._on_session_closed)
        self.host.hook("session/lost", self._on_session_lost)
        self.host.hook("session/resumed", self._on_session_resumed)
        self.host.add_stream_feature("bound", _pre_approval_feature)
        # One lock per session with a broadcast in hand: its broadcasts go out in order.
        self._order: weakref.WeakValueDictionary[ClientSession, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        # The subscription changes of each account's roster, one at a time, in order;
        # and how many of an account's come from contacts (bounded: INBOUND_WAITING).
        self._changes = AccountQueues(self.host.spawn, self.log)
        self._inbound_waiting: dict[str, int] = {}
        self.requests = SubscriptionRequests(self.host)
        # Accounts whose roster a broadcast or a probe answer is reading: `_current`.
        self._reading: dict[str, _Reading] = {}
        # Sessions whose targets are being written to Redis -> changed again meanwhile
        # (one write at a time per session, so they land in the order of the changes).
        self._writing: dict[ClientSession, bool] = {}

    async def start(self) -> None:
        self.roster = self.host.module(RosterModule)
        self.roster.subscribe_changes(self._on_roster_change)
        # The blocklist and privacy lists, whichever module holds them (they share one
        # engine): asked before every presence made here in a user's name.
        self.rules: Privacy | Blocking | None = self.host.find_module(
            Privacy
        ) or self.host.find_module(Blocking)

    # --- what the user sends ---------------------------------------------------------------

    def _on_out(self, stanza: etree._Element, session: ClientSession) -> bool:
        if stanza.tag != ns.C_PRESENCE:
            return True
        to = stanza.get("to")
        if to is None:
            return True
        try:
            target = JID(to)
        except InvalidJID:
            return True  # the router answers jid-malformed
        type_ = stanza.get("type")
        if type_ in ns.SUBSCRIPTION_TYPES:
            if target.bare == session.bare or (
                not target.user and self.host.serves(target.domain)
            ):
                return False  # no subscriptions to oneself or to this server
            kind: Kind = type_  # type: ignore[assignment]
            contact = target.bare
            done = self._changes.add(
                session.bare, lambda: self._outbound(stanza, session, kind, contact)
            )
            # The sender's work until made: past WORK_PER_SENDER pieces of it the router
            # stops reading the sender (`Router._hold_if_busy`), so its queue stays short.
            self.host.spawn(done)
            return False
        if target.bare != session.bare:
            directed = session.state.setdefault(DIRECTED, set())
            if type_ is None:
                if target.full not in directed and len(directed) < MAX_DIRECTED:
                    directed.add(target.full)
                    self._save_directed(session)
            elif type_ == "unavailable" and target.full in directed:
                directed.discard(target.full)
                self._save_directed(session)
        return True

    async def _outbound(
        self, stanza: etree._Element, session: ClientSession, kind: Kind, contact: str
    ) -> None:
        owner = session.bare
        route = False

        def change(item: RosterItem | None) -> RosterItem | None:
            nonlocal route
            new, route = outbound(kind, item, contact)
            return new

        try:
            before, after = await self.roster.modify(owner, contact, change)
        except (StanzaError, StorageError) as exc:
            condition = exc.condition if isinstance(exc, StanzaError) else "internal-server-error"
            self.log.warning("%s from %s to %s not processed: %s", kind, owner, contact, exc)
            self.host.route(error_reply(stanza, condition))
            return
        if _answered(before, after):
            await self._forget_request(owner, contact)
        if not route:
            return
        out = copy.deepcopy(stanza)
        out.set("from", owner)  # RFC 6121 3.1.2 etc.: stamped with the bare JID
        out.set("to", contact)
        self.host.route(out)
        was_from = before is not None and before.subscription in ("from", "both")
        is_from = after is not None and after.subscription in ("from", "both")
        if is_from and not was_from:
            self._send_on_approval(owner, contact)  # RFC 6121 3.1.5
        elif was_from and not is_from:
            self._send_unavailable(owner, contact)  # RFC 6121 3.2.2

    # --- what contacts send ----------------------------------------------------------------

    def _make_inbound(self, kind: Kind) -> Callable[[etree._Element, str], Awaitable[bool]]:
        async def handler(stanza: etree._Element, owner: str) -> bool:
            self._queue_inbound(stanza, owner, kind)
            return True

        return handler

    def _queue_inbound(self, stanza: etree._Element, owner: str, kind: Kind) -> None:
        """Queue a contact's subscription presence for the account's roster, or refuse it
        when INBOUND_WAITING already wait: resource-constraint (type wait) tells the
        sender it was not taken and may be sent again."""
        sender = stanza.get("from")
        if sender is None:
            return
        try:
            contact = JID(sender).bare
        except InvalidJID:
            return
        if contact == owner:
            return
        waiting = self._inbound_waiting.get(owner, 0)
        if waiting >= INBOUND_WAITING:
            self.log.warning(
                "%s from %s to %s refused: %d subscription presences wait for that account",
                kind, contact, owner, waiting,
            )
            error = error_reply(stanza, "resource-constraint", "too many subscription"
                                " presences wait for this account, try again later")
            self.host.route(error, bounce=False)
            return
        self._inbound_waiting[owner] = waiting + 1
        done = self._changes.add(owner, lambda: self._inbound(stanza, owner, kind, contact))
        done.add_done_callback(lambda _: self._inbound_made(owner))

    def _inbound_made(self, owner: str) -> None:
        waiting = self._inbound_waiting.pop(owner) - 1
        if waiting:
            self._inbound_waiting[owner] = waiting

    async def _inbound(self, stanza: etree._Element, owner: str, kind: Kind, contact: str) -> None:
        deliver: bool = False
        reply: Kind | None = None

        def change(item: RosterItem | None) -> RosterItem | None:
            nonlocal deliver, reply
            new, deliver, reply = inbound(kind, item, contact)
            return new

        user, _, vhost = owner.partition("@")
        try:
            if not await self.host.user_exists(vhost, user):
                self._to_no_account(owner, kind, contact)
                return
            before, after = await self.roster.modify(owner, contact, change)
        except (StanzaError, StorageError) as exc:
            # Too many pending requests, or storage down: the sender learns it was not
            # taken (else it waits, "pending out", for an answer that never comes).
            condition = exc.condition if isinstance(exc, StanzaError) else "internal-server-error"
            self.log.warning("%s from %s to %s refused: %s", kind, contact, owner, exc)
            self.host.route(error_reply(stanza, condition), bounce=False)
            return
        if deliver:
            out = copy.deepcopy(stanza)
            out.set("from", contact)
            out.set("to", owner)
            for session in self.host.available_sessions(owner):
                self.host.deliver(session, copy.deepcopy(out))
            if kind == "subscribe":
                await self._keep_request(owner, contact, out)
        if _answered(before, after):
            await self._forget_request(owner, contact)  # cancelled by the requester
        if reply is not None:
            self.host.route(_presence(reply, owner, contact))
        was_from = before is not None and before.subscription in ("from", "both")
        is_from = after is not None and after.subscription in ("from", "both")
        if reply == "subscribed":
            # Approved by the server, pre-approved (3.4) or subscribed already (3.1.3,
            # a contact that lost its state): as after the user's own approval (3.1.5),
            # else the contact sees the user offline until the next presence change.
            self._send_on_approval(owner, contact)
        elif was_from and not is_from:
            self._send_unavailable(owner, contact)  # RFC 6121 3.3.3
        if kind == "subscribed" and _local_user(self.host, contact):
            if after is not None and after.subscription in ("to", "both"):
                # The approval of a local contact, taken: its presence now (3.1.6), in
                # answer to a probe, after this "subscribed" and the push (`_send_on_approval`).
                self._send_as(owner, [_presence("probe", owner, contact)])

    def _to_no_account(self, owner: str, kind: Kind, contact: str) -> None:
        """A contact's change that waited while the account was removed: nothing is
        written (the roster would come back after the removal deleted it, for a new
        account of the name to inherit). Answered as the router answers a subscription
        presence to no account (RFC 6121 3.1.3, 8.5.1): a request with "unsubscribed",
        so the contact stops waiting; the other kinds are ignored."""
        self.log.info("%s from %s to %s dropped: the account was removed", kind, contact, owner)
        if kind == "subscribe":
            self.host.route(_presence("unsubscribed", owner, contact))

    async def _on_probe(self, stanza: etree._Element, owner: str) -> bool:
        prober = stanza.get("from")
        if prober is None:
            return True
        try:
            prober_bare = JID(prober).bare
        except InvalidJID:
            return True
        if prober_bare != owner:
            try:
                item = await self._current(owner, lambda: self.roster.item(owner, prober_bare))
            except StorageError as exc:
                self.log.warning("probe from %s to %s dropped: %s", prober, owner, exc)
                return True
            if item is None or item.subscription not in ("from", "both"):
                return True
        self._send_available(owner, prober)
        return True

    # --- the user's own availability -------------------------------------------------------

    async def _on_broadcast(
        self, stanza: etree._Element, origin: ClientSession, initial: bool
    ) -> bool:
        # Each broadcast waits on storage (the roster): without the lock, an
        # available presence and the unavailable right after it could reach
        # contacts the other way round and leave the user online for them.
        lock = self._order.get(origin)
        if lock is None:
            lock = self._order[origin] = asyncio.Lock()
        async with lock:
            await self._broadcast(stanza, origin, initial)
        return False

    async def _broadcast(
        self, stanza: etree._Element, origin: ClientSession, initial: bool
    ) -> None:
        owner = origin.bare
        if stanza.get("type") == "unavailable":
            # Take the session's state before the first await: "session/closed" may run next.
            directed = origin.state.pop(DIRECTED, set())
            announced = origin.state.pop(ANNOUNCED, False)
            if directed:
                self._save_directed(origin)  # now none: the key goes
            subscribers: set[str] = set()
            if announced:
                subscribers = await self._contacts(owner, ("from", "both"))
            others = [t for t in directed if JID(t).bare not in subscribers]
            self._send_copies(stanza, [*subscribers, *others])
            return
        origin.state[ANNOUNCED] = True
        if initial:
            # RFC 6121 4.2.2: the new resource learns about the user's other resources.
            for other in self.host.available_sessions(owner):
                if other is not origin and other.presence is not None:
                    presence = copy.deepcopy(other.presence)
                    presence.set("from", other.jid)
                    presence.set("to", origin.jid)
                    self.host.deliver(origin, presence)
        what = "the presence of " + origin.jid
        roster = await self._current(owner, lambda: self._roster(owner, what))
        if roster is None:
            return
        self._send_copies(
            stanza, [i.jid for i in roster.items.values() if i.subscription in ("from", "both")]
        )
        if initial:
            probes = [
                _presence("probe", origin.jid, item.jid)
                for item in roster.items.values()
                if item.subscription in ("to", "both")
            ]
            self._send_as(origin.jid, probes, bounce=True)
            pending = [item.jid for item in roster.items.values() if item.pending_in]
            if pending:
                await self._deliver_requests(origin, pending)

    async def _deliver_requests(self, origin: ClientSession, contacts: list[str]) -> None:
        """RFC 6121 3.1.3: each request not yet answered, as its sender sent it."""
        owner = origin.bare
        try:
            kept = await self.requests.load(owner, contacts)
        except StorageError as exc:
            self.log.warning("subscription requests to %s read as plain ones: %s", owner, exc)
            kept = {}
        for contact in contacts:
            request = kept.get(contact)
            if request is None:  # too large to keep, or kept before requests were
                request = _presence("subscribe", contact, owner)
            request.set("from", contact)
            request.set("to", owner)
            self.host.deliver(origin, request)

    async def _on_session_closed(self, session: ClientSession) -> bool:
        """A session that never went available still owes its directed presences an unavailable.

        One that was available gets the unavailable broadcast the server
        fires for it, whichever of the two hooks runs first: that one cleans up.
        """
        if session.state.get(ANNOUNCED):
            return False
        directed = session.state.pop(DIRECTED, set())
        if directed:
            self._save_directed(session)
        self._send_as(session.jid, [_presence("unavailable", session.jid, t) for t in directed])
        return False

    async def _on_session_lost(self, jid: str) -> bool:
        """A session of a node that died: the unavailable presence its node would have
        broadcast (RFC 6121 4.5.2), to the contacts subscribed to the user, the
        user's other available resources and the entities it sent directed presence
        to (4.6.3; only its node knew them, so they come from Redis)."""
        owner = jid.partition("/")[0]
        stanza = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
        stanza.set("type", "unavailable")
        stanza.set("from", jid)
        for session in self.host.available_sessions(owner):
            copied = copy.deepcopy(stanza)
            copied.set("to", session.jid)
            self.host.deliver(session, copied)
        subscribers = await self._contacts(owner, ("from", "both"))
        directed = [t for t in await self._take_directed(jid) if JID(t).bare not in subscribers]
        self._send_copies(stanza, [*subscribers, *directed])
        return False

    async def _on_session_resumed(self, session: ClientSession) -> bool:
        """A session resumed from another node: the entities it sent directed presence
        to there (kept in Redis by that node, which ended its copy silently) are its own
        here, so that they get its unavailable presence when it leaves."""
        targets = await self._take_directed(session.jid)
        if targets:
            directed = session.state.setdefault(DIRECTED, set())
            directed.update(targets[: max(0, MAX_DIRECTED - len(directed))])
            self._save_directed(session)
        return False

    # --- directed presence in Redis (cluster) -------------------------------------------

    def _save_directed(self, session: ClientSession) -> None:
        """Write the session's directed-presence targets to Redis (on a cluster), or
        delete them when none are left; a write under way for the session writes again
        once done, with what its state holds then."""
        if self.host.cluster_redis is None:
            return
        if session in self._writing:
            self._writing[session] = True
            return
        self._writing[session] = False
        self.host.spawn(self._write_directed(session))

    async def _write_directed(self, session: ClientSession) -> None:
        redis = self.host.cluster_redis
        assert redis is not None
        key = DIRECTED_KEY + session.jid
        try:
            while True:
                targets = sorted(session.state.get(DIRECTED, ()))
                try:
                    if targets:
                        await redis.set(key, json.dumps(targets), ex=DIRECTED_TTL)
                    else:
                        await redis.delete(key)
                except (RedisError, OSError) as exc:  # TimeoutError too: Redis hangs
                    self.log.warning(
                        "directed presence targets of %s not saved: %s", session.jid, exc
                    )
                if not self._writing[session]:
                    return
                self._writing[session] = False
        finally:
            del self._writing[session]

    async def _take_directed(self, jid: str) -> list[str]:
        """The targets a lost session `jid` kept in Redis, deleted as they are read."""
        redis = self.host.cluster_redis
        if redis is None:
            return []
        key = DIRECTED_KEY + jid
        try:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.delete(key)
                raw, _ = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.log.warning("directed presence targets of %s not read: %s", jid, exc)
            return []
        if raw is None:
            return []
        try:
            targets = json.loads(raw)
        except ValueError:
            return []
        valid = []
        for target in targets if isinstance(targets, list) else ():
            try:
                valid.append(JID(target).full)
            except (InvalidJID, TypeError):
                continue
        return valid

    # --- kept subscription requests ---------------------------------------------------------

    async def _keep_request(self, owner: str, contact: str, stanza: etree._Element) -> None:
        try:
            if not await self.requests.keep(owner, contact, stanza):
                self.log.info("request from %s to %s too large to keep whole", contact, owner)
        except StorageError as exc:
            # The pending flag is stored: the user still gets a plain request at login.
            self.log.warning("subscription request from %s to %s not kept: %s", contact, owner, exc)

    async def _forget_request(self, owner: str, contact: str) -> None:
        try:
            await self.requests.forget(owner, contact)
        except StorageError as exc:
            self.log.warning("answered request from %s to %s not deleted: %s", contact, owner, exc)

    def _on_roster_change(self, owner: str, item: RosterItem | None, removed: str | None) -> None:
        """A roster entry removed (roster remove, the account removed) takes its request
        along; a change that may have ended a contact's subscription to the user is
        counted for the reads in flight of `_current`."""
        reading = self._reading.get(owner)
        if reading is not None and (item is None or item.subscription in ("none", "to")):
            reading.changes += 1
        if item is None and removed is not None:
            self.host.spawn(self._forget_request(owner, removed))

    async def remove_user(self, vhost: str, username: str) -> bool:
        return await self.purge_user(self.host, vhost, username)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """The subscription requests kept for the account (RFC 6121 3.1.3)."""
        return await SubscriptionRequests(host).forget_all(vhost, username)

    # --- helpers --------------------------------------------------------------------------

    async def _current(self, owner: str, read: Callable[[], Awaitable[T]]) -> T:
        """What `read()` gets from `owner`'s roster, for presence sent in the user's name
        right after it (no await between) to the contacts it shows subscribed to the user.

        A contact whose subscription ends (the user cancels it, the contact
        unsubscribes, the item is removed) is sent an unavailable presence once the
        change is stored (`_outbound`, `_inbound`, `RosterModule.remove`). A read that
        began before that write and answers after it would send the user's presence
        after that unavailable: the contact would see the user online, no longer
        allowed to (RFC 6121 3.2.2, 4.4.2). So while a read of the account is in
        flight, every change of its roster that may have ended such a subscription
        (counted synchronously as it is stored: `_on_roster_change`) makes the read
        run again. Cheaper than running broadcasts in the account's queue of
        subscription changes: no wait behind changes that wait on storage or on a
        flood of requests from other servers, one dict entry per account being read,
        and a second read only in the rare case. Only this node's changes are seen:
        one made on another node of a cluster still races."""
        reading = self._reading.setdefault(owner, _Reading())
        reading.readers += 1
        try:
            while True:
                seen = reading.changes
                result = await read()
                if reading.changes == seen:
                    return result
        finally:
            reading.readers -= 1
            if not reading.readers:
                del self._reading[owner]

    async def _contacts(self, owner: str, subscriptions: tuple[str, ...]) -> set[str]:
        roster = await self._roster(owner, f"the unavailable presence of {owner}")
        if roster is None:
            return set()
        return {i.jid for i in roster.items.values() if i.subscription in subscriptions}

    async def _roster(self, owner: str, what: str) -> Roster | None:
        """The roster a broadcast goes by, read again while storage fails (for about a
        minute, then None, logged): a broadcast given up at once would leave contacts
        seeing the user online long after it left (or not at all), until its next
        presence. The broadcast's order lock waits meanwhile, so what follows keeps
        its place."""
        for delay in ROSTER_RETRY:
            try:
                return await self.roster.get(owner)
            except StorageError as exc:
                self.log.warning("%s waits: its roster could not be read (%s); again in %g s",
                                 what, exc, delay)
                await asyncio.sleep(delay)
        try:
            return await self.roster.get(owner)
        except StorageError as exc:
            self.log.error("%s not sent: its roster could not be read: %s", what, exc)
            return None

    def _send_copies(self, stanza: etree._Element, targets: list[str]) -> None:
        """A copy of `stanza` (a presence of the user's, 'from' set) to each of `targets`."""
        copies = []
        for to in targets:
            out = copy.deepcopy(stanza)
            out.set("to", to)
            copies.append(out)
        self._send_as(stanza.get("from", ""), copies)

    def _send_available(self, owner: str, to: str) -> None:
        """The last presence of each of the user's available resources, to `to`."""
        for session in self.host.available_sessions(owner):
            if session.presence is not None:
                presence = copy.deepcopy(session.presence)
                presence.set("from", session.jid)
                presence.set("to", to)
                self._send_as(session.jid, [presence])

    def _send_on_approval(self, owner: str, contact: str) -> None:
        """The user's presence to a contact now allowed to see it (RFC 6121 3.1.5).

        It follows the "subscribed" the contact was just sent: a remote contact gets it
        at once (its server keeps the order they came in). A local contact's
        "subscribed" waits in the contact's queue of subscription changes, and a
        presence sent now would reach the contact before it and before the roster
        push (3.1.6 wants them first): so the contact's `_inbound` asks for the
        presence with a probe once it has handled that "subscribed"."""
        if not _local_user(self.host, contact):
            self._send_available(owner, contact)

    def _send_unavailable(self, owner: str, to: str) -> None:
        for session in self.host.available_sessions(owner):
            self._send_as(session.jid, [_presence("unavailable", session.jid, to)])

    def _send_as(self, sender: str, presences: list[etree._Element], bounce: bool = False) -> None:
        """Route presences the server makes in `sender`'s name. No "stanza/out" filter sees
        them (they have no origin session) and a contact on another server meets no
        "stanza/in" filter here, so the sender's blocklist and privacy lists are asked
        first: else a blocked contact (XEP-0191 3.3) or one a presence-out item denies
        (XEP-0016 2.11) would still see every change. `bounce`: see `Router.route`."""
        gate = self.rules.presence_gate(sender) if self.rules is not None and presences else None
        if isinstance(gate, asyncio.Future):
            self.host.spawn(self._send_when_judged(gate, presences, bounce))
        else:
            self._send_judged(gate, presences, bounce)

    async def _send_when_judged(
        self, gate: asyncio.Future[Gate | None], presences: list[etree._Element], bounce: bool
    ) -> None:
        """`_send_as` once the sender's rules are loaded (a user this node had not met)."""
        self._send_judged(await gate, presences, bounce)

    def _send_judged(
        self, gate: Gate | None, presences: list[etree._Element], bounce: bool
    ) -> None:
        for presence in presences:
            if gate is None or gate(presence):
                self.host.route(presence, bounce=bounce)


@dataclass(slots=True)
class _Reading:
    """An account whose roster `Presence._current` reads: how many such reads are in
    flight, and how many changes that may have ended a subscription to the user
    were stored since the first of them began."""

    readers: int = 0
    changes: int = 0


def _answered(before: RosterItem | None, after: RosterItem | None) -> bool:
    """A pending request was approved, denied or cancelled (the entry itself stays).

    An entry removed altogether is seen by `_on_roster_change`."""
    return before is not None and before.pending_in and after is not None and not after.pending_in


def _local_user(host: ModuleHost, bare: str) -> bool:
    """`bare` is an account of one of this server's virtual hosts."""
    user, _, domain = bare.rpartition("@")
    return bool(user) and host.serves(domain)


def _presence(type_: str, from_: str, to: str) -> etree._Element:
    presence = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
    presence.set("type", type_)
    presence.set("from", from_)
    presence.set("to", to)
    return presence


def _pre_approval_feature() -> etree._Element:
    return etree.Element(f"{{{PRE_APPROVAL}}}sub", nsmap={None: PRE_APPROVAL})


MODULE = Presence
