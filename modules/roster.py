"""The roster: jabber:iq:roster (RFC 6121 section 2) with roster versioning (XEP-0237).

Storage: one item per user in the store "roster" of the user's virtual host,
named by the localpart, holding the whole roster compressed (attribute
"items"), a counter ("n") and an epoch ("epoch"). One item per user keeps a
roster get to one read, and makes every change one conditional write:
nodes that change the same roster at the same time re-read and retry, so
none of their changes is lost. The version a client sees is "<epoch>-<n>";
the random epoch is made when the roster is first stored, so a roster that
was deleted and made again never repeats an old version.

Size: at most `max_items` roster items (default 1000) plus `max_pending`
pending inbound requests from people not in the roster (default 100), and
the compressed roster must fit one storage item (256 KB). A change beyond
either limit is refused with resource-constraint, and nothing is written.

Reads: the decoded roster of recently read accounts stays in memory
(`DecodedCache`, bounded by `cache_items` items in all) and is served only
while the stored bytes are the ones it was decoded from, so a presence probe
or a PEP access check on an unchanged roster decodes nothing, and a roster
another node changed is decoded again. Everything the API returns is a copy:
a caller may change it without changing what the next read returns. Rosters
over OFF_LOOP_BYTES compressed are decoded, copied and encoded in a thread.
The cache keeps each item as a `Row`, a tuple of strings and ints like its
stored form, not as a RosterItem: the garbage collector stops tracking such
tuples, so that a full collection does not walk every cached item (100,000
by default). As RosterItems with their group lists, 90,000 cached items made
the full collection that about every other decoding of a large roster set off
take 16-23 ms on a node, holding the loop; as rows it takes 0.15-3.5 ms
(docs/bench.md, "the cache out of the collector's way").

Pushes: every stored change of a shown item, and a client's roster set that
changed nothing (RFC 6121 2.1.6: each successful set is pushed, with the
version it was read at). Two changes to one roster can finish their writes
in one order and push in the other. A push's id carries the roster version it shows, and a
session drops a push older than one it already had for the same contact.
Two nodes pushing to a session on a third still race: each node only knows
what it pushed itself.

Other modules use `RosterModule.get/item/update/subscribe_changes` (the
presence module for subscription states, privacy lists for groups).
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import secrets
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field

from xmppd.jid import parse_jid
from xmppd.modulehost import IqRequest, Module, ModuleHost
from xmppd.modules._decoded_cache import OFF_LOOP_BYTES, DecodedCache
from xmppd.storage.base import (
    MAX_ITEM_BYTES,
    UNCHANGED,
    Contended,
    Item,
    StorageError,
    TooLarge,
    Unchanged,
)
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.session import ClientSession

ROSTER = "jabber:iq:roster"
STORE = "roster"
ROSTERVER = "urn:xmpp:features:rosterver"
Q_QUERY = f"{{{ROSTER}}}query"
Q_ITEM = f"{{{ROSTER}}}item"
Q_GROUP = f"{{{ROSTER}}}group"

Subscription = Literal["none", "to", "from", "both"]
_SUB_CODES: dict[str, Subscription] = {"n": "none", "t": "to", "f": "from", "b": "both"}
_CODE_OF_SUB = {sub: code for code, sub in _SUB_CODES.items()}
_ASK, _PENDING_IN, _APPROVED, _HIDDEN = 1, 2, 4, 8

EMPTY_VERSION = "0"  # the version of a roster that was never stored
# Room left in a storage item for the name and the other attributes.
MAX_ROSTER_BYTES = MAX_ITEM_BYTES - 4096


Row = tuple[str | None, str, int, tuple[str, ...]]
"""A roster item as stored and cached: name, subscription code, flags (_ASK, ...),
groups. Of atomic values only, so that the collector untracks it (see above)."""
Rows = dict[str, Row]  # by contact bare JID


@dataclass(slots=True)
class RosterItem:
    jid: str  # contact bare JID
    name: str | None = None
    subscription: Subscription = "none"
    ask: bool = False  # outbound subscribe pending (ask='subscribe')
    pending_in: bool = False  # inbound subscribe request not yet answered (not shown in roster)
    approved: bool = False  # pre-approved inbound (RFC 6121 3.4)
    groups: list[str] = field(default_factory=list)
    # False for an entry that only carries a pending inbound request from
    # someone the user never put in the roster (RFC 6121 3.1.3): kept, but
    # not shown in roster results or pushes until the user acts on it.
    in_roster: bool = True

    def copy(self) -> RosterItem:
        # Field by field, not dataclasses.replace: a roster read copies every
        # item it hands out, and replace() costs about twice as much.
        return RosterItem(
            jid=self.jid,
            name=self.name,
            subscription=self.subscription,
            ask=self.ask,
            pending_in=self.pending_in,
            approved=self.approved,
            groups=list(self.groups),
            in_roster=self.in_roster,
        )


@dataclass
class Roster:
    """A snapshot of one user's roster."""

    version: str
    items: dict[str, RosterItem]  # by contact bare JID (incl. pending_in-only entries)


ChangeCallback = Callable[[str, RosterItem | None, str | None], None]


class RosterFull(StanzaError):
    def __init__(self, text: str) -> None:
        super().__init__("resource-constraint", text, "cancel")


class RosterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_items: int = Field(1000, ge=1, le=10000)
    max_pending: int = Field(100, ge=0, le=1000)
    max_name_length: int = Field(256, ge=1, le=3071)  # item names and group names, characters
    max_groups: int = Field(64, ge=1, le=1000)  # groups per item
    # Decoded roster items kept in memory, summed over the cached rosters
    # (~330 bytes each: 100,000 is ~33 MB); 0 turns the cache off.
    cache_items: int = Field(100_000, ge=0, le=10_000_000)


@dataclass
class _Stored:
    """A roster as read from storage, with what a conditional write needs."""

    item: Item | None
    epoch: str
    counter: int
    rows: Rows  # shared with the cache: never changed
    size: int  # compressed bytes read: a large roster is encoded again in a thread

    @property
    def version(self) -> str:
        return f"{self.epoch}-{self.counter}" if self.epoch else EMPTY_VERSION


INTERESTED = "roster/interested"
"""In a session's state bag once it asked for the roster (RFC 6121 2.1.6: only then
does it get pushes); True if it uses roster versioning (pushes carry 'ver')."""

PUSHED = "roster/pushed"
"""In a session's (local) state bag: contact -> (epoch, counter) of the newest push
it was given for that contact, so that an older push arriving late is dropped."""
PUSH_ID = "push-"


class RosterModule(Module):
    name = "roster"
    Options = RosterOptions

    def setup(self) -> None:
        self.host.iq(ROSTER, "get", self._on_get, to="account")
        self.host.iq(ROSTER, "set", self._on_set, to="account")
        self.host.add_stream_feature("bound", _rosterver_feature)
        # Pushes go from the node where the roster changed to every interested resource.
        self.host.share_state(INTERESTED)
        # Two changes to one roster can finish their writes in one order and
        # push in the other (two tasks, or two nodes): the client must end on
        # the newer item, so each session drops pushes older than one it had.
        self.host.filter("stanza/in", _drop_stale_push, kinds=("iq",))
        # Interested resources (RFC 6121 2.1.6): sessions that asked for the
        # roster, each with whether it uses versioning (gets 'ver' in pushes).
        self._listeners: list[ChangeCallback] = []
        self._decoded = DecodedCache(_decode_rows, _weight, self.opts.cache_items)

    def reconfigure(self, options: BaseModel) -> None:
        super().reconfigure(options)
        self._decoded.resize(self.opts.cache_items)

    @property
    def opts(self) -> RosterOptions:
        return self.options  # type: ignore[return-value]

    # --- the API other modules use ------------------------------------------------------

    async def get(self, owner_bare: str) -> Roster:
        stored = await self._read(owner_bare)
        if stored.size >= OFF_LOOP_BYTES:
            # Making 11,000 items takes ~7 ms: in a thread, as decoding them.
            return Roster(stored.version, await asyncio.to_thread(_items, stored.rows))
        return Roster(stored.version, _items(stored.rows))

    async def item(self, owner_bare: str, contact_bare: str) -> RosterItem | None:
        row = (await self._read(owner_bare)).rows.get(contact_bare)
        return None if row is None else _item(contact_bare, row)

    async def update(
        self,
        owner_bare: str,
        contact_bare: str,
        change: Callable[[RosterItem | None], RosterItem | None],
    ) -> RosterItem | None:
        """Apply `change` to one item and store it; None removes the item.

        `change` gets a copy of the current item (or None) and may run more
        than once when another writer got there first, so it must only
        compute from its argument. An exception it raises (a StanzaError for
        a refused change) propagates and nothing is written. Interested
        resources get a roster push and change listeners are told.
        """
        return (await self.modify(owner_bare, contact_bare, change))[1]

    def subscribe_changes(self, callback: ChangeCallback) -> None:
        """Call `callback(owner_bare, item, removed_jid)` after every stored change.

        `item` is the new item, or None when it was removed; then
        `removed_jid` names it (else it is None). Runs synchronously: keep
        it quick (caches of privacy lists, blocking, ...).
        """
        self._listeners.append(callback)

    async def modify(
        self,
        owner_bare: str,
        contact_bare: str,
        change: Callable[[RosterItem | None], RosterItem | None],
        push_unchanged: bool = False,
    ) -> tuple[RosterItem | None, RosterItem | None]:
        """`update`, also returning the item as it was before the change won.

        `push_unchanged`: a change that leaves a shown item as it was still pushes it,
        with the version it was read at (a client's roster set: RFC 6121 2.1.6, 2.3.2
        push every successful set to all interested resources, the sender too)."""
        store = self.host.items(_domain(owner_bare), STORE)
        # What the attempt whose write won computed: (before, after, version)
        # and the roster it wrote, to keep decoded.
        outcome: tuple[RosterItem | None, RosterItem | None, str] = (None, None, "")
        written: tuple[bytes, Rows] | None = None

        async def edit(stored_item: Item | None) -> dict[str, Any] | Unchanged:
            nonlocal outcome, written
            stored = await self._stored(owner_bare, stored_item)
            row = stored.rows.get(contact_bare)
            before = None if row is None else _item(contact_bare, row)
            after = change(None if row is None else _item(contact_bare, row))
            if after is not None:
                after.jid = contact_bare
            outcome, written = (before, after, stored.version), None
            if after == before:
                return UNCHANGED
            counter = stored.counter + 1
            epoch = stored.epoch or secrets.token_hex(4)
            args = (stored.rows, contact_bare, before, after, epoch, counter)
            if stored.size >= OFF_LOOP_BYTES:
                rows, attrs = await asyncio.to_thread(self._rewrite, *args)
            else:
                rows, attrs = self._rewrite(*args)
            outcome, written = (before, after, f"{epoch}-{counter}"), (attrs["items"], rows)
            return attrs

        try:
            done = await store.modify(_localpart(owner_bare), edit, what="roster")
        except Contended:
            raise StanzaError("resource-constraint", "the roster is busy, try again") from None
        except TooLarge as exc:
            raise RosterFull("the roster is too large to store") from exc
        before, after, version = outcome
        if done.written:
            if written is not None:
                self._decoded.remember(owner_bare, *written)
            self._changed(owner_bare, contact_bare, before, after, version)
        elif push_unchanged and after is not None and after.in_roster:
            self._push(owner_bare, item_element(after), version)
        return before, after  # made for this call from rows: the caller's to keep

    def _rewrite(
        self,
        rows: Rows,
        contact: str,
        before: RosterItem | None,
        after: RosterItem | None,
        epoch: str,
        counter: int,
    ) -> tuple[Rows, dict[str, Any]]:
        """The roster with `after` in place of `before`, checked and encoded.

        Runs in a thread for a large roster, so it only reads the shared
        `rows`, and makes new ones."""
        rows = dict(rows)
        if after is None:
            del rows[contact]
        else:
            rows[contact] = _row(after)
            self._check_limits(before, after, rows)
        return rows, _encode(epoch, counter, rows)

    # --- IQ handlers ---------------------------------------------------------------------

    async def _on_get(self, request: IqRequest) -> etree._Element | None:
        if not request.from_owner:
            raise StanzaError("service-unavailable")
        owner = request.target
        client_ver = request.payload.get("ver")
        session = self._session_of(request)
        if session is not None:
            # Pushes carry 'ver' when it was given.
            self.host.set_state(session, INTERESTED, client_ver is not None)
        roster = await self._read_for_client(owner)
        if client_ver is not None and client_ver == roster.version:
            return None  # XEP-0237: the client's copy is current; pushes follow
        query = etree.Element(Q_QUERY, nsmap={None: ROSTER})
        if client_ver is not None:
            query.set("ver", roster.version)
        for item in roster.items.values():
            if item.in_roster:
                query.append(item_element(item))
        return query

    async def _on_set(self, request: IqRequest) -> None:
        if not request.from_owner:
            raise StanzaError("forbidden", "only the account itself may change its roster")
        owner = request.target
        children = [c for c in request.payload if isinstance(c.tag, str)]
        if len(children) != 1 or children[0].tag != Q_ITEM:
            raise StanzaError("bad-request", "a roster set holds exactly one item")
        element = children[0]
        contact = self.check_contact(element.get("jid"), owner)
        if element.get("subscription") == "remove":
            await self.remove(owner, contact)
            return None
        name = element.get("name") or None
        groups = self.check_groups([group.text or "" for group in element.iterchildren(Q_GROUP)])
        self.check_name(name)

        def set_item(current: RosterItem | None) -> RosterItem:
            # RFC 6121 2.1.5: the client sets name and groups only; subscription
            # states are the server's (other 'subscription' values, 'ask' and
            # 'approved' from a client are ignored).
            item = current or RosterItem(jid=contact)
            item.name = name
            item.groups = groups
            item.in_roster = True
            return item

        await self._write(owner, contact, set_item, push_unchanged=True)
        return None

    def check_contact(self, value: str | None, owner: str) -> str:
        """The bare JID of a contact `owner` may have in the roster (else StanzaError)."""
        if not value:
            raise StanzaError("bad-request", "the item has no 'jid'")
        jid = parse_jid(value)
        if jid.resource:
            raise StanzaError("bad-request", "roster items are bare JIDs")
        if jid.bare == owner:
            raise StanzaError("not-allowed", "you cannot add yourself to your roster")
        return jid.bare

    def check_name(self, name: str | None) -> None:
        """A contact's name as the options allow it (StanzaError not-acceptable)."""
        if name is not None and len(name) > self.opts.max_name_length:
            raise StanzaError("not-acceptable", "the name is too long")

    def check_groups(self, texts: list[str]) -> list[str]:
        """An item's groups as the options allow them (StanzaError), in the given order."""
        options = self.opts
        groups: list[str] = []
        for text in texts:
            if not text.strip():
                raise StanzaError("not-acceptable", "empty group name")
            if len(text) > options.max_name_length:
                raise StanzaError("not-acceptable", "the group name is too long")
            if text in groups:
                raise StanzaError("bad-request", f"group {text[:40]!r} appears twice")
            groups.append(text)
        if len(groups) > options.max_groups:
            raise StanzaError("not-acceptable", f"at most {options.max_groups} groups per item")
        return groups

    async def remove(self, owner: str, contact: str) -> None:
        """RFC 6121 2.5.2: remove the item and cancel subscriptions both ways (a client's
        removal, and xmppctl roster-remove); StanzaError item-not-found if there is none."""
        before, _ = await self._write(
            owner, contact, lambda current: None if current and current.in_roster else current
        )
        if before is None or not before.in_roster:
            raise StanzaError("item-not-found", "no such roster item")
        _end_subscriptions(self.host, owner, before)

    async def _write(
        self,
        owner: str,
        contact: str,
        change: Callable[[RosterItem | None], RosterItem | None],
        push_unchanged: bool = False,
    ) -> tuple[RosterItem | None, RosterItem | None]:
        """`modify` for client requests: storage failures become stanza errors."""
        try:
            return await self.modify(owner, contact, change, push_unchanged)
        except StorageError as exc:
            self.log.error("roster of %s: %s", owner, exc)
            raise StanzaError("internal-server-error", "the roster could not be stored") from None

    async def _read_for_client(self, owner: str) -> Roster:
        try:
            return await self.get(owner)
        except StorageError as exc:
            self.log.error("roster of %s: %s", owner, exc)
            raise StanzaError("internal-server-error", "the roster could not be read") from None

    def _session_of(self, request: IqRequest) -> ClientSession | None:
        resource = request.sender.resource
        return self.host.session(request.sender.bare, resource)

    # --- limits, pushes, listeners --------------------------------------------------------

    def _check_limits(self, before: RosterItem | None, after: RosterItem, rows: Rows) -> None:
        options = self.opts
        if after.in_roster and not (before is not None and before.in_roster):
            if sum(1 for r in rows.values() if not r[2] & _HIDDEN) > options.max_items:
                raise RosterFull(f"the roster is full ({options.max_items} items)")
        if before is None and not after.in_roster:
            if sum(1 for r in rows.values() if r[2] & _HIDDEN) > options.max_pending:
                raise RosterFull("too many pending subscription requests")

    def _changed(
        self,
        owner: str,
        contact: str,
        before: RosterItem | None,
        after: RosterItem | None,
        version: str,
    ) -> None:
        shown_before = before is not None and before.in_roster
        shown_after = after is not None and after.in_roster
        if shown_before or shown_after:
            element = item_element(after) if after is not None and shown_after else None
            if element is None:
                element = etree.Element(Q_ITEM)
                element.set("jid", contact)
                element.set("subscription", "remove")
            old = item_element(before) if before is not None and shown_before else None
            if old is None or etree.tostring(old) != etree.tostring(element):
                self._push(owner, element, version)
        self._tell_listeners(owner, after, contact if after is None else None)

    def _tell_listeners(self, owner: str, item: RosterItem | None, removed: str | None) -> None:
        for callback in self._listeners:
            try:
                callback(owner, item, removed)
            except Exception:
                self.log.exception("roster change listener %r failed", callback)

    def _push(self, owner: str, element: etree._Element, version: str) -> None:
        """A roster push to each interested resource, on any node (RFC 6121 2.1.6)."""
        for session in self.host.sessions(owner):
            uses_ver = session.state.get(INTERESTED)
            if uses_ver is None:
                continue  # it never asked for the roster: no pushes (RFC 6121 2.1.6)
            iq = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
            iq.set("type", "set")
            # The id carries the version whether the client uses it or not.
            iq.set("id", f"{PUSH_ID}{version}-{secrets.token_hex(4)}")
            iq.set("to", session.jid)
            query = etree.SubElement(iq, Q_QUERY, nsmap={None: ROSTER})
            if uses_ver:
                query.set("ver", version)
            query.append(copy.deepcopy(element))
            self.host.deliver(session, iq)

    async def remove_user(self, vhost: str, username: str) -> bool:
        """Delete the roster and end the account's subscriptions as for a removed item
        (`_remove_roster`); change listeners are told of each item that goes."""
        return await _remove_roster(self.host, vhost, username, self)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """With the module off, the same as on (`_remove_roster`): the contacts are told,
        and local contacts' rosters lose their item for the account, since no presence
        module is there to act on what they are sent."""
        return await _remove_roster(host, vhost, username, None)

    async def _read(self, owner_bare: str) -> _Stored:
        store = self.host.items(_domain(owner_bare), STORE)
        return await self._stored(owner_bare, await store.get(_localpart(owner_bare)))

    async def _stored(self, owner_bare: str, stored: Item | None) -> _Stored:
        """The roster in `stored`, decoded only when the cache has not these bytes."""
        return await _read_stored(stored, functools.partial(self._decoded.decode, owner_bare))


# --- account removal ------------------------------------------------------------------------


async def _remove_roster(
    host: ModuleHost, vhost: str, username: str, live: RosterModule | None
) -> bool:
    """Delete the account's roster and tell its contacts, the module on (`live`) or off.

    Each contact is sent what a removal of its item sends (RFC 6121 2.5.2, 3.2.2:
    unsubscribe, unsubscribed, and its available resources' unavailable), over s2s
    for a remote one. A local contact's roster is changed by the presence module
    acting on those stanzas (the subscription goes; the item stays, the contact's to
    remove); with no presence module enabled (presence off, or the roster off and so
    presence too) nothing would act on them, and the account's item is removed from
    the contact's roster here. Those rosters change before the account's own goes, so a removal
    that fails part way (StorageError) finds the contacts again when it is run again.
    """
    owner = f"{username}@{vhost}"
    store = host.items(vhost, STORE)
    stored = await store.get(username)
    if stored is None:
        return False
    if live is not None:
        rows = (await live._stored(owner, stored)).rows
    else:
        rows = (await _read_stored(stored, _decode_uncached)).rows
    if host.modules.get("presence") is None:
        for contact in rows:
            if host.serves(_domain(contact)):
                await _drop_contact_item(host, live, contact, owner)
    await store.delete(username)
    if live is not None:
        live._decoded.forget(owner)
    for contact, row in rows.items():
        if live is not None:
            live._tell_listeners(owner, None, contact)
        _end_subscriptions(host, owner, _item(contact, row))
    return True


async def _drop_contact_item(
    host: ModuleHost, live: RosterModule | None, contact: str, removed: str
) -> None:
    """Remove `removed` from `contact`'s roster: through the module when it is on (the
    contact's interested resources get the push), else in storage alone."""
    if live is not None:
        await live.modify(contact, removed, lambda _: None)
        return

    async def edit(stored: Item | None) -> dict[str, Any] | Unchanged:
        roster = await _read_stored(stored, _decode_uncached)
        if removed not in roster.rows:
            return UNCHANGED
        rest = {jid: row for jid, row in roster.rows.items() if jid != removed}
        epoch, counter = roster.epoch or secrets.token_hex(4), roster.counter + 1
        if roster.size >= OFF_LOOP_BYTES:
            return await asyncio.to_thread(_encode, epoch, counter, rest)
        return _encode(epoch, counter, rest)

    await host.items(_domain(contact), STORE).modify(_localpart(contact), edit, what="roster")


async def _read_stored(stored: Item | None, decode: Callable[[bytes], Awaitable[Rows]]) -> _Stored:
    """The roster in `stored`, its items decoded by `decode`: the module's cache, or
    `_decode_uncached` where the module is off."""
    if stored is None:
        return _Stored(None, "", 0, {}, 0)
    attrs = stored.attrs
    raw = attrs.get("items", b"")
    if not isinstance(raw, bytes):
        raw = b""
    rows = await decode(raw) if raw else {}
    epoch = attrs.get("epoch", "")
    counter = attrs.get("n", 0)
    return _Stored(
        stored,
        epoch if isinstance(epoch, str) else "",
        counter if isinstance(counter, int) else 0,
        rows,
        len(raw),
    )


async def _decode_uncached(raw: bytes) -> Rows:
    """A stored roster's rows with no cache (the module off): in a thread when large."""
    if len(raw) >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(_decode_rows, raw)
    return _decode_rows(raw)


def _end_subscriptions(host: ModuleHost, owner: str, item: RosterItem) -> None:
    """Cancel the subscriptions of a removed item both ways (RFC 6121 2.5.2, 3.2.2)."""
    contact = item.jid
    if item.subscription in ("to", "both") or item.ask:
        _send_subscription(host, owner, contact, "unsubscribe")
    if item.subscription in ("from", "both") or item.pending_in:
        _send_subscription(host, owner, contact, "unsubscribed")
    if item.subscription in ("from", "both"):
        # The contact no longer may see the user's presence.
        for session in host.available_sessions(owner):
            presence = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
            presence.set("type", "unavailable")
            presence.set("from", session.jid)
            presence.set("to", contact)
            host.route(presence)


def _send_subscription(host: ModuleHost, owner: str, contact: str, type_: str) -> None:
    presence = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
    presence.set("type", type_)
    presence.set("from", owner)
    presence.set("to", contact)
    host.route(presence)


# --- serialization ------------------------------------------------------------------------


def _drop_stale_push(stanza: etree._Element, session: ClientSession) -> bool:
    """The "stanza/in" filter: False for a roster push older than the session's last
    push for the same contact. Only the server's own pushes (no 'from', which the
    router stamps on everything else) are judged."""
    if stanza.tag != ns.C_IQ or stanza.get("from") is not None:
        return True
    push_id = stanza.get("id") or ""
    if not push_id.startswith(PUSH_ID) or stanza.get("type") != "set":
        return True
    parts = push_id.split("-")
    item = stanza.find(f"{Q_QUERY}/{Q_ITEM}")
    if len(parts) != 4 or not parts[2].isdigit() or item is None:
        return True
    epoch, counter, contact = parts[1], int(parts[2]), item.get("jid", "")
    pushed: dict[str, tuple[str, int]] = session.state.setdefault(PUSHED, {})
    last = pushed.get(contact)
    if last is not None and last[0] == epoch and last[1] > counter:
        return False
    pushed[contact] = (epoch, counter)
    return True


def item_element(item: RosterItem) -> etree._Element:
    """The <item/> a client sees (pending_in is not shown: RFC 6121 3.1.3)."""
    element = etree.Element(Q_ITEM, nsmap={None: ROSTER})
    element.set("jid", item.jid)
    if item.name:
        element.set("name", item.name)
    element.set("subscription", item.subscription)
    if item.ask:
        element.set("ask", "subscribe")
    if item.approved:
        element.set("approved", "true")
    for group in item.groups:
        etree.SubElement(element, Q_GROUP).text = group
    return element


def _encode(epoch: str, counter: int, rows: Rows) -> dict[str, Any]:
    data = zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 6)
    if len(data) > MAX_ROSTER_BYTES:
        raise RosterFull("the roster is too large to store")
    return {"epoch": epoch, "n": counter, "items": data}


def _decode_rows(raw: bytes) -> Rows:
    """The stored JSON's lists as tuples: the same values, untracked by the collector."""
    return {
        jid: (name, code, flags, tuple(groups))
        for jid, (name, code, flags, groups) in json.loads(zlib.decompress(raw)).items()
    }


def _row(item: RosterItem) -> Row:
    flags = (
        (_ASK if item.ask else 0)
        | (_PENDING_IN if item.pending_in else 0)
        | (_APPROVED if item.approved else 0)
        | (0 if item.in_roster else _HIDDEN)
    )
    return (item.name, _CODE_OF_SUB[item.subscription], flags, tuple(item.groups))


def _item(jid: str, row: Row) -> RosterItem:
    """A RosterItem of its own, made from the shared `row`."""
    name, code, flags, groups = row
    return RosterItem(
        jid=jid,
        name=name,
        subscription=_SUB_CODES[code],
        ask=bool(flags & _ASK),
        pending_in=bool(flags & _PENDING_IN),
        approved=bool(flags & _APPROVED),
        groups=list(groups),
        in_roster=not flags & _HIDDEN,
    )


def _items(rows: Rows) -> dict[str, RosterItem]:
    """The roster's items, as a caller may keep and change them."""
    return {jid: _item(jid, row) for jid, row in rows.items()}


def _weight(rows: Rows) -> int:
    """A decoded roster's share of `cache_items` (an empty one still takes a slot)."""
    return len(rows) + 1


def _rosterver_feature() -> etree._Element:
    return etree.Element(f"{{{ROSTERVER}}}ver", nsmap={None: ROSTERVER})


def _domain(bare: str) -> str:
    return bare.rsplit("@", 1)[-1]


def _localpart(bare: str) -> str:
    if "@" not in bare:
        raise ValueError(f"{bare!r} is no user's bare JID")
    return bare.rsplit("@", 1)[0]


MODULE = RosterModule
