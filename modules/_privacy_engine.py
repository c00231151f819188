"""One model for privacy lists (XEP-0016) and blocking (XEP-0191), and its enforcement.

The model
---------
Each user has ONE record in item store "privacy" (item name: the user's bare
JID), holding everything both protocols manage, so that any change is one
conditional write and two clients editing at once cannot lose each other's
update:

* ``lists``: named privacy lists, each an ordered tuple of items (type
  jid | group | subscription | none for the fall-through, value, allow/deny,
  order, and the stanza kinds message / iq / presence-in / presence-out it
  covers, none meaning every stanza both ways);
* ``default``: the name of the default list, or None;
* ``blocklist``: the XEP-0191 blocked JIDs.

Active lists are per session and live only in memory, as XEP-0016 says.

The blocklist is a separate part of the record, always applied FIRST, then
the session's active list or else the default list. XEP-0191 section 3
suggests (SHOULD) writing blocked JIDs into the default privacy list instead
(ejabberd does; Prosody keeps its blocklist apart from privacy lists). We do
not, because that mapping lets a session escape every block just by
activating another list (XEP-0191 section 3, item 5), and
turns a block into a default-list change subject to XEP-0016's <conflict/>
rules while another resource is online. Applying the blocklist in front of
whatever list applies keeps both promises: a blocked JID is blocked for every
session, whatever lists say, and a privacy list means exactly what it says
for everything not blocked. Both protocols still share one back-end record
(XEP-0191's MUST). Blocked JIDs are not shown as a privacy list.

JIDs match as XEP-0016 section 2.1 / XEP-0191 section 4 say: user@domain/
resource matches that resource only, user@domain any resource, domain/resource
that resource at any address of the domain, domain the domain, every address
at it and its subdomains. Stanzas between a user's own resources and to or
from the user's own server (a bare hosted domain) are never blocked: the
former as XEP-0016 requires, the latter so that a "deny everything" list
cannot cut a session off from its own server (results, pushes).

Enforcement
-----------
`PrivacyEngine` (one per module host, shared by modules "privacy" and
"blocking", whichever are enabled) keeps the record and the roster view of
every user it may need to judge in memory, so that the synchronous filters
never wait: users with a session on this node stay loaded (preloaded on
"session/bound", updated on every change made here and on every roster
change); others are kept in a bounded LRU. A filter that meets a user it
has not loaded yet returns the load: the router makes the stanza wait for
it, in order with the sender's next stanzas and with everything else for
the recipient, and runs the filter again (ModuleHost.filter).

* "stanza/out": the user's own stanzas. Refused ones get <not-acceptable/>
  (plus <blocked xmlns='urn:xmpp:blocking:errors'/> when the blocklist
  refused it).
* "stanza/in": stanzas about to reach a session. The recipient's rules
  (message / iq / presence-in; others only by items that cover everything):
  refused messages and IQ get/set get <service-unavailable/>
  (`ModuleHost.refuse`: a message the delivery rules gave to several
  resources only when none of them took it), everything else is dropped
  silently. For presence sent in a local user's name (the
  presence module's broadcasts, answers to probes), the SENDER's
  presence-out rules too, since only the sender's lists know whether that
  contact may see it. A carbon (XEP-0280) comes from the user's own bare
  JID but is judged by the message it forwards, as if the session had
  received or sent that itself, so no copy carries what its rules refuse.
* `presence_gate`: the presence module's own presences in a user's name
  (broadcast copies, probes and their answers, unavailable) have no origin
  session and skip "stanza/out"; the module asks the sender's rules before
  routing each, which is the only check for a contact on another server.
* `event_gate`: PEP's events in a user's name (notifications, last items)
  likewise have no origin session; PEP asks the account's rules (blocklist,
  default list) for each recipient, from the state held here.
* "message/offline", presence subscription-request and probe hooks: the
  user's default list and blocklist, so a blocked JID can neither fill the
  user's offline store nor ask for a subscription or a probe answer. Its
  answers and cancellations still change the roster (the subscription
  states are the servers', RFC 6121 3.1-3.3, and the two rosters would
  drift apart); "stanza/in" keeps them from the user's resources. (IQs to the
  user's bare JID, which the server answers on the user's behalf, reach no
  filter or hook yet: see .coord/requests-privacy-blocking.md.)

When rules change for a session, contacts that stop (or start) being allowed
to see its presence get unavailable presence (or its current presence), and
the session stops (or starts) seeing theirs (XEP-0191 3.3/3.4, XEP-0016
2.10/2.11), as far as the roster and this node's sessions show them.

In a cluster every node holds the rules of the users it judges stanzas for
(the sender's and the recipient's; the node that routes a stanza runs
"stanza/in" for a recipient on another node). A node that changes a record
(or a user's roster, which rules by group or subscription read) tells the
others over the cluster bus (`NOTICE`), which drop their copy and read the
record again at the next stanza for that user; a node that may have missed
notices drops every copy. So a privacy list or a block set through one node
applies on every node from the next stanza on.
"""

from __future__ import annotations

import asyncio
import copy
import enum
import functools
import json
import logging
import secrets
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from lxml import etree

from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import IqRequest, Module, ModuleHost
from xmppd.modules.roster import RosterModule
from xmppd.storage.base import (
    UNCHANGED,
    AttrValue,
    Contended,
    Item,
    StorageError,
    TooLarge,
    Unchanged,
)
from xmppd.stream.errors import StanzaError, error_reply
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.session import ClientSession

log = logging.getLogger("xmppd.modules.privacy")

NS_PRIVACY = "jabber:iq:privacy"
NS_BLOCKING = "urn:xmpp:blocking"
NS_BLOCKING_ERRORS = "urn:xmpp:blocking:errors"
STORE = "privacy"
ACTIVE = "privacy/active"  # the key of a session's active list name in its state bag

Kind = Literal["message", "iq", "presence-in", "presence-out"]
KINDS: tuple[Kind, ...] = ("message", "iq", "presence-in", "presence-out")
ItemType = Literal["jid", "group", "subscription"]
SUBSCRIPTIONS = frozenset({"none", "to", "from", "both"})

PRIORITY = 1000  # privacy is the first delivery rule (XEP-0016 2.2 rule 4)
MAX_CACHED_OFFLINE = 2048  # records kept for users with no session here
LOAD_TRIES = 3
NOTICE = "privacy"
"""Cluster bus topic: {"bare": ...} whose record or roster another node changed."""
ROSTER_TRIES = 3
EFFECTS_SLICE = 500  # roster entries judged per loop turn after a change of rules
# A carbon's wrappers (XEP-0280) and the message each forwards (XEP-0297).
CARBON_RECEIVED = "{urn:xmpp:carbons:2}received"
CARBON_SENT = "{urn:xmpp:carbons:2}sent"
FORWARDED_MESSAGE = f"{{urn:xmpp:forward:0}}forwarded/{ns.C_MESSAGE}"
_PRESENCE_HOOKS = ("subscribe", "probe")
"""What a refused JID's presence may not do at all: ask. Its answers (subscribed, to
the user's own request) and cancellations (unsubscribe, unsubscribed) still change
the user's roster, as RFC 6121 3.1-3.3 say the server does: dropped here, they left
the user's roster saying a subscription the contact had ended (and PEP, or a later
unblock, going by it); their delivery passes "stanza/in", which refuses them."""


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrivacyItem:
    """One rule of a privacy list; `pattern` is the parsed JID of jid items."""

    order: int
    allow: bool
    type: ItemType | None = None
    value: str | None = None
    kinds: frozenset[Kind] = frozenset()  # empty: every stanza, both directions
    pattern: tuple[str, str, str] | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"order": self.order, "action": "allow" if self.allow else "deny"}
        if self.type is not None:
            out["type"] = self.type
            out["value"] = self.value
        if self.kinds:
            out["kinds"] = [k for k in KINDS if k in self.kinds]
        return out


def make_item(
    order: int,
    allow: bool,
    type_: str | None = None,
    value: str | None = None,
    kinds: Iterable[str] = (),
) -> PrivacyItem:
    """A validated item; ValueError says what is wrong (the protocol turns it into bad-request)."""
    if not 0 <= order <= 0xFFFFFFFF:
        raise ValueError("'order' must be an unsigned 32-bit integer")
    kind_set = frozenset(kinds)
    if not kind_set <= frozenset(KINDS):
        raise ValueError(f"unknown stanza kinds: {sorted(kind_set - frozenset(KINDS))}")
    if type_ is None:
        if value is not None:
            raise ValueError("a fall-through item (no 'type') has no 'value'")
        return PrivacyItem(order, allow, None, None, kind_set)  # type: ignore[arg-type]
    if value is None:
        raise ValueError(f"an item of type {type_!r} needs a 'value'")
    if type_ == "jid":
        jid = parse_value_jid(value)
        return PrivacyItem(order, allow, "jid", jid.full, kind_set, jid_pattern(jid))  # type: ignore[arg-type]
    if type_ == "subscription":
        if value not in SUBSCRIPTIONS:
            raise ValueError("a subscription item's value is none, to, from or both")
        return PrivacyItem(order, allow, "subscription", value, kind_set)  # type: ignore[arg-type]
    if type_ == "group":
        if not value:
            raise ValueError("a group item needs a group name")
        return PrivacyItem(order, allow, "group", value, kind_set)  # type: ignore[arg-type]
    raise ValueError(f"unknown item type {type_!r}")


def parse_value_jid(value: str) -> JID:
    try:
        jid = JID(value)
    except InvalidJID as exc:
        raise ValueError(f"invalid JID {value!r}: {exc}") from None
    if not jid.domain:
        raise ValueError("empty JID")
    return jid


def check_list(items: Iterable[PrivacyItem]) -> tuple[PrivacyItem, ...]:
    """Items sorted by order; duplicate orders are refused (XEP-0016 2.1)."""
    ordered = tuple(sorted(items, key=lambda i: i.order))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if a.order == b.order:
            raise ValueError(f"two items have order {a.order}")
    return ordered


@dataclass(frozen=True, slots=True)
class PrivacyData:
    """One user's stored record; `version` is the item-store version (0: none stored)."""

    lists: Mapping[str, tuple[PrivacyItem, ...]] = field(default_factory=dict)
    default: str | None = None
    blocklist: tuple[str, ...] = ()
    version: int = 0
    blocked: BlockSet = field(init=False, compare=False, repr=False)
    needs_roster: bool = field(init=False, compare=False, repr=False)  # group/subscription items
    # (list name, kind) -> its items indexed, made at the first stanza that needs them
    indexed: dict[tuple[str, Kind | None], IndexedList] = field(
        init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocked", BlockSet(self.blocklist))
        needs = any(i.type in ("group", "subscription") for lst in self.lists.values() for i in lst)
        object.__setattr__(self, "needs_roster", needs)
        object.__setattr__(self, "indexed", {})

    def index(self, name: str, kind: Kind | None) -> IndexedList:
        """List `name` as it applies to stanzas of `kind`, indexed (kept with this record)."""
        key = (name, kind)
        found = self.indexed.get(key)
        if found is None:
            found = self.indexed[key] = IndexedList(self.lists.get(name, ()), kind)
        return found

    def same_content(self, other: PrivacyData) -> bool:
        return (self.lists, self.default, self.blocklist) == (
            other.lists,
            other.default,
            other.blocklist,
        )

    def with_list(self, name: str, items: tuple[PrivacyItem, ...] | None) -> PrivacyData:
        """A copy with list `name` set, or removed (None; the default goes with it)."""
        lists = dict(self.lists)
        default = self.default
        if items is None:
            lists.pop(name, None)
            if default == name:
                default = None
        else:
            lists[name] = items
        return replace(self, lists=lists, default=default)


def decode(item: Item | None) -> PrivacyData:
    """The record as stored; ValueError if it is not one we wrote."""
    if item is None:
        return EMPTY
    raw = item.attrs.get("data")
    if not isinstance(raw, str):
        raise ValueError(f"privacy record {item.name!r} has no 'data'")
    doc = json.loads(raw)
    lists = {
        name: check_list(
            make_item(
                int(i["order"]),
                i["action"] == "allow",
                i.get("type"),
                i.get("value"),
                i.get("kinds", ()),
            )
            for i in items
        )
        for name, items in doc.get("lists", {}).items()
    }
    default = doc.get("default")
    if default is not None and default not in lists:
        default = None
    blocklist = tuple(str(j) for j in doc.get("blocklist", ()))
    return PrivacyData(lists, default, blocklist, item.version)


def encode(data: PrivacyData) -> dict[str, AttrValue]:
    doc = {
        "v": 1,
        "default": data.default,
        "lists": {name: [i.to_json() for i in items] for name, items in data.lists.items()},
        "blocklist": list(data.blocklist),
    }
    return {"data": json.dumps(doc, separators=(",", ":"), ensure_ascii=False)}


# --- matching and evaluation ----------------------------------------------------------------


def jid_pattern(jid: JID) -> tuple[str, str, str]:
    return (jid.user, jid.domain, jid.resource)


class BlockSet:
    """The blocklist indexed so a check costs a few set lookups, however long the list."""

    __slots__ = ("full", "bare", "domain_resource", "domain")

    def __init__(self, jids: Iterable[str]) -> None:
        self.full: set[str] = set()
        self.bare: set[str] = set()
        self.domain_resource: set[tuple[str, str]] = set()
        self.domain: set[str] = set()
        for value in jids:
            user, domain, resource = jid_pattern(JID(value))
            if user and resource:
                self.full.add(f"{user}@{domain}/{resource}")
            elif user:
                self.bare.add(f"{user}@{domain}")
            elif resource:
                self.domain_resource.add((domain, resource))
            else:
                self.domain.add(domain)

    def __bool__(self) -> bool:
        return bool(self.full or self.bare or self.domain_resource or self.domain)

    def matches(self, peer: JID) -> bool:
        if not self:
            return False
        if peer.user:
            if peer.bare in self.bare:
                return True
            if peer.resource and peer.full in self.full:
                return True
        if peer.resource and (peer.domain, peer.resource) in self.domain_resource:
            return True
        if self.domain:
            labels = peer.domain.split(".")
            return any(".".join(labels[i:]) in self.domain for i in range(len(labels)))
        return False


class IndexedList:
    """A privacy list's items for one stanza kind, indexed by what they match, so that
    judging a stanza costs a few dict lookups however long the list: the presence
    broadcast and the presence effects of a change judge every contact in a roster.

    The first item that matches wins (XEP-0016 2.2): each index keeps the first item
    of every key, and `decide` takes the lowest order among the few that match."""

    __slots__ = ("full", "bare", "domain_resource", "domain", "subscription", "group", "rest")

    def __init__(self, items: Iterable[PrivacyItem], kind: Kind | None) -> None:
        self.full: dict[tuple[str, str, str], PrivacyItem] = {}
        self.bare: dict[tuple[str, str], PrivacyItem] = {}
        self.domain_resource: dict[tuple[str, str], PrivacyItem] = {}
        self.domain: dict[str, PrivacyItem] = {}
        self.subscription: dict[str, PrivacyItem] = {}
        self.group: dict[str, PrivacyItem] = {}
        self.rest: PrivacyItem | None = None  # the first fall-through item
        for item in items:  # in order: setdefault keeps the first of each key
            if item.kinds and kind not in item.kinds:
                continue
            if item.type is None:
                if self.rest is None:
                    self.rest = item
            elif item.type == "subscription":
                self.subscription.setdefault(item.value or "", item)
            elif item.type == "group":
                self.group.setdefault(item.value or "", item)
            else:
                assert item.pattern is not None
                user, domain, resource = item.pattern
                if user and resource:
                    self.full.setdefault((user, domain, resource), item)
                elif user:
                    self.bare.setdefault((user, domain), item)
                elif resource:
                    self.domain_resource.setdefault((domain, resource), item)
                else:
                    self.domain.setdefault(domain, item)

    def first_match(self, peer: JID, roster: Mapping[str, RosterEntry]) -> PrivacyItem | None:
        found = self.rest
        if peer.user:
            if peer.resource:
                found = _earlier(found, self.full.get((peer.user, peer.domain, peer.resource)))
            found = _earlier(found, self.bare.get((peer.user, peer.domain)))
        if peer.resource and self.domain_resource:
            found = _earlier(found, self.domain_resource.get((peer.domain, peer.resource)))
        if self.domain:
            labels = peer.domain.split(".")
            for i in range(len(labels)):
                found = _earlier(found, self.domain.get(".".join(labels[i:])))
        if self.subscription or self.group:
            entry = roster.get(peer.bare, NOT_IN_ROSTER)
            found = _earlier(found, self.subscription.get(entry.subscription))
            for group in entry.groups:
                found = _earlier(found, self.group.get(group))
        return found


def _earlier(a: PrivacyItem | None, b: PrivacyItem | None) -> PrivacyItem | None:
    if a is None:
        return b
    if b is None or a.order < b.order:
        return a
    return b


@dataclass(frozen=True, slots=True)
class RosterEntry:
    subscription: str = "none"
    groups: frozenset[str] = frozenset()


NOT_IN_ROSTER = RosterEntry()
EMPTY = PrivacyData()


class Verdict(enum.Enum):
    ALLOW = "allow"
    BLOCKED = "blocked"  # by the XEP-0191 blocklist
    DENIED = "denied"  # by a privacy list


def applied_list(data: PrivacyData, active: str | None) -> str | None:
    """The list that applies: the session's active list, else the default (no layering)."""
    if active is not None and active in data.lists:
        return active
    return data.default


def decide(
    data: PrivacyData,
    active: str | None,
    kind: Kind | None,
    peer: JID,
    roster: Mapping[str, RosterEntry],
) -> Verdict:
    """Judge one stanza exchanged with `peer`; `kind` None: only all-stanza items apply."""
    if data.blocked.matches(peer):
        return Verdict.BLOCKED
    name = applied_list(data, active)
    if name is None:
        return Verdict.ALLOW
    item = data.index(name, kind).first_match(peer, roster)
    if item is None or item.allow:
        return Verdict.ALLOW
    return Verdict.DENIED


def is_notification(stanza: etree._Element) -> bool:
    """Presence "notifications" are availability only, not subscriptions or probes."""
    return stanza.tag == ns.C_PRESENCE and stanza.get("type") in (None, "unavailable")


def inbound_kind(stanza: etree._Element) -> Kind | None:
    if stanza.tag == ns.C_MESSAGE:
        return "message"
    if stanza.tag == ns.C_IQ:
        return "iq"
    return "presence-in" if is_notification(stanza) else None


def outbound_kind(stanza: etree._Element) -> Kind | None:
    """Only presence-out is a kind of its own outbound; the rest obey all-stanza items."""
    return "presence-out" if is_notification(stanza) else None


# --- enforcement ----------------------------------------------------------------------------


class RosterLike(Protocol):
    """What the engine uses of the roster module (IM-MODULES.md)."""

    async def get(self, owner_bare: str) -> Any: ...

    def subscribe_changes(self, callback: Callable[[str, Any, str | None], None]) -> None: ...


@dataclass(slots=True)
class UserState:
    data: PrivacyData
    roster: dict[str, RosterEntry]  # filled only when a list has group/subscription items


Policy = tuple[PrivacyData, str | None]
Gate = Callable[[etree._Element], bool]
"""May this presence, made by the server in a user's name, go where it is addressed?"""
PeerGate = Callable[[str], bool]
"""May the server send a user's PEP events to this JID?"""
ENGINE_USERS = ("privacy", "blocking")  # the modules that share one engine per host


def roster_view(roster: Any) -> dict[str, RosterEntry]:
    return {
        contact: RosterEntry(item.subscription, frozenset(item.groups))
        for contact, item in roster.items.items()
    }


def unavailable(from_: str, to: str) -> etree._Element:
    presence = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
    presence.set("type", "unavailable")
    presence.set("from", from_)
    presence.set("to", to)
    return presence


def _holds(stack: list[etree._Element], stanza: etree._Element) -> bool:
    return any(s is stanza for s in stack)


def _answered(stanza: etree._Element) -> bool:
    """Whether a refused delivery owes its sender an error: not presence (XEP-0016 2.14),
    nor a groupchat or headline message, as ejabberd and Prosody do. Rooms commonly
    remove an occupant whose delivery bounces (the ghost clean-up XEP-0410 describes),
    so a blocked participant would cost the user the room, and the room would learn of
    the block; a headline is never answered (RFC 6121 drops one to an unavailable
    resource silently, where a chat message bounces)."""
    if stanza.tag == ns.C_PRESENCE:
        return False
    return stanza.tag != ns.C_MESSAGE or stanza.get("type") not in ("groupchat", "headline")


class PrivacyEngine:
    """The in-memory rules of the users this node serves, and the filters and hooks using them."""

    @classmethod
    def attach(cls, host: ModuleHost) -> PrivacyEngine:
        """The engine of the host's privacy or blocking module, whichever was set up first,
        else a new one (which registers the filters and hooks): one per host, whatever is on."""
        for name in ENGINE_USERS:
            engine = getattr(host.modules.get(name), "engine", None)
            if isinstance(engine, PrivacyEngine):
                return engine
        return cls(host)

    def __init__(self, host: ModuleHost) -> None:
        self.host = host
        self.roster: RosterLike | None = None
        self._states: OrderedDict[str, UserState] = OrderedDict()
        self._loading: dict[str, asyncio.Future[UserState]] = {}
        # Loads that may have read a record another node changed since: read again.
        self._superseded: weakref.WeakSet[asyncio.Future[UserState]] = weakref.WeakSet()
        self._roster_loading: dict[str, bool] = {}  # bare -> changed while loading
        self._pass_all: list[etree._Element] = []  # our own errors and presences: no checks
        self._pass_sender: list[etree._Element] = []  # unavailable on block: skip sender rules
        # One lock per user whose presence effects are being applied (`_presence_effects`).
        self._effects: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._started = False
        host.filter("stanza/out", self._filter_out, PRIORITY)
        host.filter("stanza/in", self._filter_in, PRIORITY)
        host.hook("session/bound", self._session_bound)
        host.hook("message/offline", self._message_offline, PRIORITY)
        host.hook("iq/account", self._iq_to_account, PRIORITY)
        # The stanza/in filter runs on the sender's node, for recipients on any node.
        host.share_state(ACTIVE)
        host.on_cluster_notice(NOTICE, self._changed_elsewhere, self._forget_all)

    async def start(self) -> None:
        """Find the roster and hook presence subscriptions (runs once, after every setup())."""
        if self._started:
            return
        self._started = True
        roster = self.host.find_module(RosterModule)
        if roster is not None:
            self.roster = roster
            roster.subscribe_changes(self._roster_changed)
        # Hooking these only where another module handles them: with no hook at all
        # the router delivers subscriptions to available sessions, through stanza/in.
        for type_ in _PRESENCE_HOOKS:
            event = f"presence/{type_}"
            if self.host.has_hook(event):
                self.host.hook(event, self._presence_to_user, PRIORITY)

    # --- what the protocol modules use -----------------------------------------------------

    async def data(self, bare: str) -> PrivacyData:
        return (await self.state(bare)).data

    async def state(self, bare: str) -> UserState:
        """The user's record and roster view, loaded if this node does not hold it."""
        while True:
            state = self._states.get(bare)
            if state is not None:
                self._states.move_to_end(bare)
                return state
            loading = self._loading.get(bare)
            if loading is None:
                loading = self._loading[bare] = asyncio.ensure_future(self._load(bare))
                loading.add_done_callback(lambda done: self._done_loading(bare, done))
            loaded = await asyncio.shield(loading)
            if loading not in self._superseded:
                return self._install(bare, loaded)

    def _done_loading(self, bare: str, done: asyncio.Future[UserState]) -> None:
        if self._loading.get(bare) is done:
            del self._loading[bare]

    def active(self, session: ClientSession) -> str | None:
        return session.state.get(ACTIVE)

    def session(self, full_jid: str) -> ClientSession | None:
        bare, _, resource = full_jid.partition("/")
        return self.host.session(bare, resource)

    def in_use_elsewhere(
        self, bare: str, data: PrivacyData, name: str, sender: ClientSession | None
    ) -> bool:
        """Does list `name` apply to a connected resource other than `sender`? (XEP-0016 2.2)"""
        return any(
            session is not sender and applied_list(data, session.state.get(ACTIVE)) == name
            for session in self.host.sessions(bare)
        )

    async def update(
        self, bare: str, change: Callable[[PrivacyData], PrivacyData]
    ) -> tuple[PrivacyData, PrivacyData]:
        """Read-modify-write the record; (old, new). `change` may raise StanzaError to refuse,
        leaving the record as it was; the contacts' view of presence follows the change."""
        store = self.host.items(bare.rsplit("@", 1)[-1], STORE)
        outcome = (EMPTY, EMPTY)  # (old, new) as computed by the attempt whose write won

        def edit(item: Item | None) -> dict[str, AttrValue] | Unchanged:
            nonlocal outcome
            try:
                old = decode(item)
            except ValueError:
                log.exception("cannot read the privacy record of %s", bare)
                raise StanzaError("internal-server-error", "privacy storage failed") from None
            new = change(old)
            outcome = (old, new)
            return UNCHANGED if new.same_content(old) else encode(new)

        try:
            done = await store.modify(bare, edit, what="privacy record")
        except Contended:
            raise StanzaError(
                "resource-constraint", "too many concurrent privacy changes; retry"
            ) from None
        except TooLarge:
            raise StanzaError(
                "policy-violation", "privacy lists and blocklist are over the size limit"
            ) from None
        except StorageError:
            log.exception("cannot read or write the privacy record of %s", bare)
            # A write that timed out may still land: the rules held here (and on the
            # other nodes) may be the old ones now, so they are read again when needed.
            self._forget(bare)
            self.host.notify_cluster(NOTICE, {"bare": bare})
            raise StanzaError("internal-server-error", "privacy storage failed") from None
        old, new = outcome
        if not done.written:
            return old, old
        self.host.notify_cluster(NOTICE, {"bare": bare})
        await self.host.cluster_notices_sent()  # before the client hears "done"
        assert done.after is not None  # `edit` never deletes
        new = replace(new, version=done.after.version)
        before = self._snapshot(bare)
        # Installed even for users not loaded here: a load in flight may have read
        # the previous version, and the newer version wins in _install.
        roster = await self._load_roster(bare) if new.needs_roster else {}
        self._install(bare, UserState(new, roster))
        await self._presence_effects(bare, before)
        return old, new

    async def remove_user(self, bare: str) -> bool:
        """Delete the user's lists and blocklist (one record), and hold none here either.

        A user loaded here keeps a state, an empty one: with none, the filters
        would make the stanzas to the user's sessions (the removal's own result)
        wait for a load that the end of those sessions makes pointless."""
        found = await self.host.items(bare.rsplit("@", 1)[-1], STORE).delete(bare)
        self.host.notify_cluster(NOTICE, {"bare": bare})
        await self.host.cluster_notices_sent()
        if bare in self._states:
            self._states[bare] = UserState(EMPTY, {})
        return found

    async def set_active(self, session: ClientSession, name: str | None) -> None:
        """Make `name` the session's active list (None: decline; the default applies)."""
        state = await self.state(session.bare)
        if name is not None and name not in state.data.lists:
            raise StanzaError("item-not-found", "no privacy list by that name")
        before = self._snapshot(session.bare)
        self.host.set_state(session, ACTIVE, name)
        await self._presence_effects(session.bare, before)

    def forget_active(self, session: ClientSession) -> None:
        self.host.set_state(session, ACTIVE, None)

    def push(self, bare: str, payload: etree._Element) -> None:
        """An IQ-set with `payload` to every connected resource of `bare` (list/block pushes)."""
        for session in self.host.sessions(bare):
            iq = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
            iq.set("type", "set")
            iq.set("id", f"push-{secrets.token_hex(6)}")
            iq.set("from", bare)
            iq.set("to", session.jid)
            iq.append(copy.deepcopy(payload))
            self.host.deliver(session, iq)

    async def roster_groups(self, bare: str) -> set[str] | None:
        """The user's roster groups, or None without a roster module."""
        if self.roster is None:
            return None
        roster = await self.roster.get(bare)
        return {g for item in roster.items.values() for g in item.groups}

    def presence_gate(self, sender: str) -> Gate | None | asyncio.Future[Gate | None]:
        """Which presences the server may send in `sender`'s name (a full JID, or a bare
        one: a session gone with its node, judged by the default list): the presence
        module asks before routing its broadcast copies, probe answers and unavailables,
        which no "stanza/out" filter sees (they have no origin session). None: all of
        them, as for most users (no rules), at the cost of one lookup; a future when the
        rules are not in memory yet."""
        try:
            jid = JID(sender)
        except InvalidJID:
            return None
        state = self._states.get(jid.bare)
        if state is None:
            return self.host.spawn(self._gate_when_loaded(jid))
        return self._gate(jid, state)

    async def event_gate(self, bare: str) -> PeerGate | None:
        """Which JIDs may get the PEP events (notifications, last items) the server sends
        in `bare`'s name. They have no origin session, so no "stanza/out" filter sees
        them, and "stanza/in" asks the sender's rules for presence only: without this a
        contact the user blocked would still get every event (XEP-0163 4.3.3: not one to
        a subscriber blocked from receiving any kind of stanza). The account's rules
        judge, the blocklist and the default list (no session sends them), for every
        kind the contact may be kept from receiving: stanzas of all kinds (an outbound
        message obeys only those items) and presence-out. None: all may (no rules, most
        users). Rules held here cost no read; others are loaded once. Rules that cannot
        be read let only the user's own resources through: a fault never lifts a block."""
        try:
            state = await self.state(bare)
        except Exception:
            log.exception("cannot load the privacy record of %s: its events stay its own", bare)
            return functools.partial(self._own_resource, bare)
        if state.data.default is None and not state.data.blocked:
            return None
        return functools.partial(self._event_allowed, bare, state)

    def _own_resource(self, owner: str, to: str) -> bool:
        try:
            return self._exempt(JID(to), owner)
        except InvalidJID:
            return False

    def _event_allowed(self, owner: str, state: UserState, to: str) -> bool:
        try:
            peer = JID(to)
        except InvalidJID:
            return False
        if self._exempt(peer, owner):
            return True
        return all(
            decide(state.data, None, kind, peer, state.roster) is Verdict.ALLOW
            for kind in (None, "presence-out")
        )

    async def _gate_when_loaded(self, jid: JID) -> Gate | None:
        try:
            state = await self.state(jid.bare)
        except Exception:
            log.exception("cannot load the privacy record of %s: its presence stays here", jid)
            return self._local_notifications
        return self._gate(jid, state)

    def _gate(self, jid: JID, state: UserState) -> Gate | None:
        session = self.session(jid.full) if jid.resource else None
        active = session.state.get(ACTIVE) if session is not None else None
        if active is None and state.data.default is None and not state.data.blocked:
            return None
        return functools.partial(self._presence_allowed, jid.bare, state, active)

    def _presence_allowed(
        self, owner: str, state: UserState, active: str | None, presence: etree._Element
    ) -> bool:
        """Availability for a local user is judged at delivery, per resource (the
        sender's rules in `_filter_in`); everything else here, by the address it goes to."""
        if self._local_notifications(presence):
            return True
        try:
            peer = JID(presence.get("to", ""))
        except InvalidJID:
            return True  # the router answers jid-malformed
        if self._exempt(peer, owner):
            return True
        kind = outbound_kind(presence)
        return decide(state.data, active, kind, peer, state.roster) is Verdict.ALLOW

    def _local_notifications(self, presence: etree._Element) -> bool:
        if not is_notification(presence):
            return False
        user, _, domain = presence.get("to", "").partition("/")[0].rpartition("@")
        return bool(user) and domain in self.host.hosts

    # --- loading -------------------------------------------------------------------------

    async def _load(self, bare: str) -> UserState:
        store = self.host.items(bare.rsplit("@", 1)[-1], STORE)
        for attempt in range(LOAD_TRIES):
            try:
                data = decode(await store.get(bare))
                break
            except StorageError:
                if attempt == LOAD_TRIES - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
        roster = await self._load_roster(bare) if data.needs_roster else {}
        return UserState(data, roster)

    async def _load_roster(self, bare: str) -> dict[str, RosterEntry]:
        if self.roster is None:
            return {}
        view: dict[str, RosterEntry] = {}
        for _ in range(ROSTER_TRIES):
            self._roster_loading[bare] = False
            try:
                view = roster_view(await self.roster.get(bare))
            finally:
                changed = self._roster_loading.pop(bare, False)
            if not changed:
                break
        return view

    def _install(self, bare: str, state: UserState) -> UserState:
        """Keep the newer of `state` and what is held."""
        current = self._states.get(bare)
        if current is None or state.data.version > current.data.version:
            self._states[bare] = current = state
        self._states.move_to_end(bare)
        self._evict()
        return current

    def _loaded(self, bare: str) -> asyncio.Future[UserState]:
        """What a filter returns when `bare`'s rules are not in memory: the stanza
        waits for them (the router's pipeline, see ModuleHost.filter), and the
        filter runs again once they are."""
        return self.host.spawn(self.state(bare))

    def _evict(self) -> None:
        excess = len(self._states) - MAX_CACHED_OFFLINE - self.host.session_count()
        if excess <= 0:
            return
        idle = [b for b in self._states if not self.host.sessions(b)]
        for bare in idle[:excess]:  # least recently used first
            del self._states[bare]

    # --- roster and session events ------------------------------------------------------

    def _roster_changed(self, owner: str, item: Any, removed: str | None) -> None:
        # Another node may hold rules by group or subscription for the owner.
        self.host.notify_cluster(NOTICE, {"bare": owner})
        if owner in self._roster_loading:
            self._roster_loading[owner] = True
        state = self._states.get(owner)
        if state is None or not state.data.needs_roster:
            return
        if item is not None:
            state.roster[item.jid] = RosterEntry(item.subscription, frozenset(item.groups))
        elif removed is not None:
            state.roster.pop(removed, None)

    def _changed_elsewhere(self, notice: dict[str, Any]) -> None:
        """Another node changed the user's record or roster: read it again when needed."""
        self._forget(str(notice["bare"]))

    def _forget_all(self) -> None:
        """Notices from other nodes may have been lost: hold nothing that could be stale."""
        for bare in list(self._states) + list(self._loading):
            self._forget(bare)

    def _forget(self, bare: str) -> None:
        self._states.pop(bare, None)
        loading = self._loading.pop(bare, None)
        if loading is not None:
            self._superseded.add(loading)

    async def _session_bound(self, session: ClientSession) -> None:
        bare = session.bare
        if len(self.host.sessions(bare)) == 1 and bare not in self._loading:
            # The user's first session here: the copy kept since the last one may be
            # stale, as another node or xmppctl (removing the account) may have changed
            # or deleted the record meanwhile; one read makes it current.
            self._states.pop(bare, None)
        try:
            await self.state(session.bare)
        except Exception:
            log.exception("cannot preload the privacy record of %s", session.bare)

    # --- filters ---------------------------------------------------------------------------

    def _filter_out(
        self, stanza: etree._Element, origin: ClientSession
    ) -> bool | asyncio.Future[UserState]:
        state = self._states.get(origin.bare)
        if state is not None:
            active = origin.state.get(ACTIVE)
            if active is None and state.data.default is None and not state.data.blocked:
                return True  # no rules (most users): judged before reading the stanza
        to = stanza.get("to")
        if state is None and to is not None:
            return self._loaded(origin.bare)
        if state is None or to is None:
            return True  # to the user's own account; presence broadcasts are judged per contact
        try:
            peer = JID(to)
        except InvalidJID:
            return True  # the router answers jid-malformed
        if self._exempt(peer, origin.bare):
            return True
        verdict = decide(state.data, active, outbound_kind(stanza), peer, state.roster)
        if verdict is Verdict.ALLOW:
            return True
        if _wants_error(stanza):
            if stanza.tag == ns.C_MESSAGE:
                self.host.ledger.bounced += 1  # answered: the message's fate (ledger)
            error = error_reply(stanza, "not-acceptable", type_="cancel")
            if verdict is Verdict.BLOCKED:
                etree.SubElement(
                    error.find(ns.C_ERROR),  # type: ignore[arg-type]
                    f"{{{NS_BLOCKING_ERRORS}}}blocked",
                    nsmap={None: NS_BLOCKING_ERRORS},
                )
            self._deliver_own(origin, error)
        return False

    def _filter_in(
        self, stanza: etree._Element, session: ClientSession
    ) -> bool | asyncio.Future[UserState]:
        if self._pass_all and _holds(self._pass_all, stanza):
            return True
        owner = session.bare
        state = self._states.get(owner)
        if state is not None:
            active = session.state.get(ACTIVE)
            judge_owner = (
                active is not None or state.data.default is not None or state.data.blocked
            )
            is_presence = stanza.tag == ns.C_PRESENCE
            if not (judge_owner or is_presence):
                return True  # no rules of the owner's, no presence: nothing to judge
        sender = stanza.get("from")
        if not sender:
            return True
        if state is None:
            return self._loaded(owner)
        judge_sender = is_presence and not (
            self._pass_sender and _holds(self._pass_sender, stanza)
        )
        if not (judge_owner or judge_sender):
            return True
        try:
            peer = JID(sender)
        except InvalidJID:
            return True
        if self._exempt(peer, owner):
            if judge_owner and sender == owner and stanza.tag == ns.C_MESSAGE:
                if self._carbon_allowed(stanza, owner, state, active):
                    return True
                self.host.ledger.drop("refused")  # a copy counted by carbons, never shown
                return False
            return True
        if judge_owner:
            verdict = decide(state.data, active, inbound_kind(stanza), peer, state.roster)
            if verdict is not Verdict.ALLOW:
                if _answered(stanza):
                    # For this session only: another one the rules chose may take it.
                    self.host.refuse(stanza, "service-unavailable")
                return False
        local_sender = bool(peer.user) and peer.domain in self.host.hosts
        if judge_sender and local_sender:
            sender_state = self._states.get(peer.bare)
            if sender_state is None:
                return self._loaded(peer.bare)
            sender_session = self.session(peer.full) if peer.resource else None
            sender_active = sender_session.state.get(ACTIVE) if sender_session else None
            verdict = decide(
                sender_state.data,
                sender_active,
                outbound_kind(stanza),
                JID(session.jid),
                sender_state.roster,
            )
            if verdict is not Verdict.ALLOW:
                return False  # presence: never an error
        return True

    def _carbon_allowed(
        self, stanza: etree._Element, owner: str, state: UserState, active: str | None
    ) -> bool:
        """A carbon (XEP-0280) comes from the user's own bare JID, which no rule refuses,
        yet carries a message exchanged with someone else: it is judged as that message
        would be, had this session sent or received it itself, so that a copy never shows
        what the rules keep out (a blocked contact's message that another resource, or a
        filter still loading the rules, refused). Refused copies vanish silently: the
        peer got its answer for the original."""
        kind: Kind | None
        for wrapper in stanza:
            if wrapper.tag == CARBON_RECEIVED:
                address, kind = "from", "message"
            elif wrapper.tag == CARBON_SENT:
                address, kind = "to", None
            else:
                continue
            inner = wrapper.find(FORWARDED_MESSAGE)
            try:
                peer = JID(inner.get(address, "")) if inner is not None else None
            except InvalidJID:
                return False
            if peer is None or not peer.domain or self._exempt(peer, owner):
                return True
            return decide(state.data, active, kind, peer, state.roster) is Verdict.ALLOW
        return True

    def _exempt(self, peer: JID, owner: str) -> bool:
        """One's own resources and one's own server are never blocked (XEP-0016 2.1 note)."""
        if peer.user:
            return peer.bare == owner
        return peer.domain in self.host.hosts

    def _refuse_inbound(self, stanza: etree._Element) -> None:
        """XEP-0016 2.14 / XEP-0191 3.3: a message or an IQ get/set refused for the whole
        account (no session judged it) gets <service-unavailable/>."""
        self.host.bounce(stanza, "service-unavailable")

    def _deliver_own(self, session: ClientSession, stanza: etree._Element) -> None:
        """Hand the user an error we made in a blocked contact's name, past our own filter."""
        self._pass_all.append(stanza)
        try:
            self.host.deliver(session, stanza)
        finally:
            self._pass_all.pop()

    # --- hooks -------------------------------------------------------------------------------

    async def _message_offline(self, stanza: etree._Element, bare: str) -> bool:
        """A refused message is not stored offline; the sender is told, as if online (a
        groupchat or headline message is not: `_answered`)."""
        verdict = await self._judge_for_account(stanza, bare, "message")
        if verdict is Verdict.ALLOW:
            return False
        if verdict is None:  # rules unknown: neither store what may be blocked nor lose it
            self.host.bounce(stanza, "internal-server-error")
        elif _answered(stanza):
            self._refuse_inbound(stanza)
        return True

    async def _iq_to_account(self, stanza: etree._Element, bare: str) -> bool:
        """IQs the server answers on the user's behalf (vCard, last activity, disco)."""
        verdict = await self._judge_for_account(stanza, bare, "iq")
        if verdict is Verdict.ALLOW:
            return False
        if verdict is None:
            self.host.bounce(stanza, "internal-server-error")
        else:
            self._refuse_inbound(stanza)
        return True

    async def _presence_to_user(self, stanza: etree._Element, bare: str) -> bool:
        """Subscription requests and probes from a refused JID vanish silently."""
        return await self._judge_for_account(stanza, bare, None) is not Verdict.ALLOW

    async def _judge_for_account(
        self, stanza: etree._Element, bare: str, kind: Kind | None
    ) -> Verdict | None:
        """Judge a stanza for the user as a whole (default list and blocklist);
        None when the record cannot be read."""
        try:
            peer = JID(stanza.get("from", ""))
        except InvalidJID:
            return Verdict.ALLOW
        if not peer.domain or self._exempt(peer, bare):
            return Verdict.ALLOW
        try:
            state = await self.state(bare)
        except Exception:
            log.exception("cannot load the privacy record of %s", bare)
            return None
        return decide(state.data, None, kind, peer, state.roster)

    # --- presence after a change -------------------------------------------------------------

    def _snapshot(self, bare: str) -> dict[ClientSession, Policy]:
        state = self._states.get(bare)
        if state is None:
            return {}
        return {
            s: (state.data, s.state.get(ACTIVE)) for s in self.host.available_sessions(bare)
        }

    async def _presence_effects(self, bare: str, before: dict[ClientSession, Policy]) -> None:
        """Contacts who may no longer see a session get unavailable presence, those who may
        again get its presence; the session likewise stops or starts seeing local contacts.

        A roster of thousands times several sessions is judged in slices, the loop free
        between them; the effects of one user's changes run one at a time, in order, so
        that a block and the unblock right after it reach each contact in that order."""
        lock = self._effects.get(bare)
        if lock is None:
            lock = self._effects[bare] = asyncio.Lock()
        async with lock:
            await self._apply_presence_effects(bare, before)

    async def _apply_presence_effects(
        self, bare: str, before: dict[ClientSession, Policy]
    ) -> None:
        state = self._states.get(bare)
        if self.roster is None or state is None or not before:
            return
        changed = [
            (s, old, s.state.get(ACTIVE))
            for s, old in before.items()
            if s.available
            and (old[0] is not state.data or old[1] != s.state.get(ACTIVE))
            and self.session(s.jid) is s
        ]
        if not changed:
            return
        try:
            view = roster_view(await self.roster.get(bare))
        except Exception:
            log.exception("cannot read the roster of %s", bare)
            return
        judged = 0
        for session, (old_data, old_active), new_active in changed:
            new_data = state.data
            for contact, entry in view.items():
                judged += 1
                if judged % EFFECTS_SLICE == 0:
                    await asyncio.sleep(0)
                    if not session.available or self.session(session.jid) is not session:
                        break  # gone meanwhile: its unavailable went by the new rules
                if entry.subscription in ("from", "both"):
                    for target in self._contact_addresses(contact):
                        was = decide(old_data, old_active, "presence-out", target, view)
                        now = decide(new_data, new_active, "presence-out", target, view)
                        self._presence_out_changed(session, target, was, now)
                if entry.subscription in ("to", "both"):
                    for other in self.host.available_sessions(contact):
                        peer = JID(other.jid)
                        was = decide(old_data, old_active, "presence-in", peer, view)
                        now = decide(new_data, new_active, "presence-in", peer, view)
                        self._presence_in_changed(session, other, was, now)

    def _contact_addresses(self, contact: str) -> list[JID]:
        """Where a contact sees presence: each online resource here; a remote one's bare JID."""
        if contact.rsplit("@", 1)[-1] not in self.host.hosts:
            return [JID(contact)]
        return [JID(s.jid) for s in self.host.available_sessions(contact)]

    def _presence_out_changed(
        self, session: ClientSession, target: JID, was: Verdict, now: Verdict
    ) -> None:
        if (was is Verdict.ALLOW) == (now is Verdict.ALLOW):
            return
        if now is not Verdict.ALLOW:
            presence = unavailable(session.jid, target.full)
            self._pass_sender.append(presence)
            try:
                self.host.route(presence)
            finally:
                self._pass_sender.pop()
        elif session.presence is not None:
            presence = copy.deepcopy(session.presence)
            presence.set("from", session.jid)
            presence.set("to", target.full)
            self.host.route(presence)

    def _presence_in_changed(
        self, session: ClientSession, other: ClientSession, was: Verdict, now: Verdict
    ) -> None:
        if (was is Verdict.ALLOW) == (now is Verdict.ALLOW):
            return
        if now is not Verdict.ALLOW:
            presence = unavailable(other.jid, session.jid)
            self._deliver_own(session, presence)
        elif other.presence is not None:
            presence = copy.deepcopy(other.presence)
            presence.set("from", other.jid)
            presence.set("to", session.jid)
            self.host.deliver(session, presence)


class EngineModule(Module):
    """What the privacy and the blocking module share: the host's one engine, the
    get and set IQs of `namespace` to an account, and an account's rules removed
    with it. A subclass answers the IQs."""

    namespace: ClassVar[str]

    def setup(self) -> None:
        self.engine = PrivacyEngine.attach(self.host)
        self.host.add_feature(self.namespace)
        self.host.iq(self.namespace, "get", self.get, to="account")
        self.host.iq(self.namespace, "set", self.set, to="account")

    async def start(self) -> None:
        await self.engine.start()

    async def remove_user(self, vhost: str, username: str) -> bool:
        return await self.engine.remove_user(f"{username}@{vhost}")

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """The one record privacy and blocking share (either may be off)."""
        return await host.items(vhost, STORE).delete(f"{username}@{vhost}")

    def presence_gate(self, sender: str) -> Gate | None | asyncio.Future[Gate | None]:
        """See `PrivacyEngine.presence_gate`: for the presence module."""
        return self.engine.presence_gate(sender)

    async def event_gate(self, bare: str) -> PeerGate | None:
        """See `PrivacyEngine.event_gate`: for PEP."""
        return await self.engine.event_gate(bare)

    async def get(self, request: IqRequest) -> etree._Element | None:
        raise NotImplementedError

    async def set(self, request: IqRequest) -> etree._Element | None:
        raise NotImplementedError


def owner_only(request: IqRequest) -> None:
    """Another account's rules are nobody's business: answer as for an unknown namespace."""
    if not request.from_owner:
        raise StanzaError("service-unavailable")


def _wants_error(stanza: etree._Element) -> bool:
    """Errors never answer errors, nor IQ results (RFC 6120 8.3.1)."""
    type_ = stanza.get("type")
    if type_ == "error":
        return False
    return stanza.tag != ns.C_IQ or type_ in ("get", "set")
