"""Personal Eventing Protocol (XEP-0163): a pubsub service on every account.

Avatars (XEP-0084), nicknames (XEP-0172), bookmarks (XEP-0402), OMEMO keys
and private storage (XEP-0223) all ride on it. The engine is
modules/_pubsub_engine.py; this module adds what makes PEP personal:

* nodes are created by the account's first publish to them, with the
  publish-options as configuration (so XEP-0223's whitelist + persist_items
  and XEP-0222's open model are set in one request);
* notifications go to the owner's and its contacts' resources that asked
  for them with "<node>+notify" in their entity capabilities (XEP-0115);
  those the contacts get are the ones the node's access model lets see it
  (presence: a presence subscription; roster: the allowed groups; whitelist:
  affiliations); explicit XEP-0060 subscribers get them too;
* the last item of each node a resource asked for comes when that resource
  becomes available (its own and its contacts' nodes) and when a contact
  gains a presence subscription; the OWNER's roster says whether a contact
  has one (the contact's may lag behind it);
* nothing goes to a JID the owner's blocklist or privacy lists keep from
  receiving its stanzas (XEP-0163 4.3.3): events have no origin session, so
  no filter of the owner's sees them, and the privacy engine is asked for
  each recipient (`PrivacyEngine.event_gate`).

What each resource asked for (its "+notify" node names) is computed from its
caps when its presence changes: a caps hash seen before (on any node: the
verified disco#info is kept in the item store "caps", read through the
shared cache, a bounded table: modules/_pep_caps.py) costs no round trip; a
new one is asked of the client with disco#info and checked against the hash
before it is kept. The names are kept in the session's shared state, so in
a cluster the node where a contact publishes knows who wants it.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable, Iterable
from urllib.parse import quote

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from xmppd.modulehost import IqRequest, Module, ModuleHost, Routed, storage_call
from xmppd.modules.blocking import Blocking
from xmppd.modules.caps import CAPS, DISCO_INFO, Identity, verification_string
from xmppd.modules.disco import DISCO_ITEMS, Disco
from xmppd.modules.privacy import Privacy
from xmppd.modules.private import Private
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.modules.vcard import VCard
from xmppd.session import ClientSession
from xmppd.storage.base import Contended, Item, StorageError
from xmppd.stream.errors import StanzaError

from ._pep_avatar import CONVERSION, AvatarConversion
from ._pep_bookmarks import FEATURES as BOOKMARK_FEATURES
from ._pep_bookmarks import PRIVATE_NODES, BookmarksConversion
from ._pep_caps import CapsStore
from ._privacy_engine import PeerGate
from ._pubsub_cleanup import clear_deleted, finish_deletions
from ._pubsub_engine import (
    MAX_AFFILIATIONS,
    MAX_ITEMS,
    Event,
    Limits,
    Node,
    PubSubService,
    decode_node,
    judge,
    no_relation,
)
from ._pubsub_fanout import FAN_OUT_BATCH, FanOut, Recipient
from ._pubsub_forms import DATA, PUBSUB, PUBSUB_OWNER
from ._pubsub_protocol import FEATURES, RSM, PubSubProtocol, Request, event_message

AVATAR_NOTICE = "pep/avatar"
"""Cluster notice: an account's avatar hash changed; each node re-sends its sessions' presence."""
NOTIFY = "pep/notify"
"""In a session's (shared) state: the node names it wants notifications of."""
CAPS_TIMEOUT = 10.0  # seconds to wait for a client's disco#info
MAX_DISCO_ITEMS = 1000  # nodes or item ids in one disco#items answer
MAX_CAPS_KEPT = 10_000  # verified caps kept in memory (each client version is one)
_CAPS_C = f"{{{CAPS}}}c"
_X_UPDATE = "{vcard-temp:x:update}x"
_INFO = f"{{{DISCO_INFO}}}"

log = logging.getLogger(__name__)

PublishListener = Callable[[str, Event], Awaitable[None]]
"""(owner bare JID, event) after a client published to or retracted from its own
PEP node (only the account may); the conversions of XEP-0398 and XEP-0411 listen."""


class PepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_item_bytes: StrictInt = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_items: StrictInt = Field(default=256, ge=1, le=MAX_ITEMS)  # per node; 'max'
    max_nodes: StrictInt = Field(default=100, ge=1, le=10_000)  # per account
    max_subscriptions: StrictInt = Field(default=1000, ge=1, le=100_000)  # per account
    max_subscribers: StrictInt = Field(default=100_000, ge=1, le=1_000_000)  # per node
    # per node, owner included; all in the node's record, which every publish reads
    max_affiliations: StrictInt = Field(default=100, ge=1, le=MAX_AFFILIATIONS)
    inline_item_bytes: StrictInt = Field(default=32 * 1024, ge=256, le=128 * 1024)


def _limits(opts: PepOptions) -> Limits:
    return Limits.of(opts, 1, "presence")


class Pep(Module):
    name = "pep"
    Options = PepOptions
    requires = ("roster", "presence")

    def reconfigure(self, options: BaseModel) -> None:
        super().reconfigure(options)
        self.limits = _limits(options)  # type: ignore[arg-type]

    def setup(self) -> None:
        self.limits = _limits(self.options)  # type: ignore[arg-type]
        self.protocol = PubSubProtocol(
            self._notify, self._send_last, self._deleted, auto_create=True
        )
        self.fanout = FanOut(self.host)
        # Another node's notifications for sessions here (FanOut.send), to a virtual host.
        self.host.on("message/host", self._fanout_in, priority=10)
        for namespace in (PUBSUB, PUBSUB_OWNER):
            self.host.iq(namespace, "get", self._iq, to="account")
            self.host.iq(namespace, "set", self._iq, to="account")
        self.host.add_feature(PUBSUB, "account")
        self.host.add_feature(RSM, "account")  # items and the owner's lists come in pages
        for feature in FEATURES:
            self.host.add_feature(f"{PUBSUB}#{feature}", "account")
        self.host.share_state(NOTIFY)
        self.host.hook("presence/broadcast", self._on_presence, priority=-10)
        # Per caps (hash, ver) verified on this node, what the store said.
        self._caps: dict[str, list[str]] = {}
        self._caps_store = CapsStore()  # bounded, per account and in all (_pep_caps.py)
        # disco#info questions under way: every one, and the first per caps hash.
        self._asks: set[asyncio.Future[list[str] | None]] = set()
        self._asking: dict[str, asyncio.Future[list[str] | None]] = {}
        # Node records being read for last items, shared by the logins that want them.
        self._reading: dict[tuple[str, str], asyncio.Future[dict[str, Item]]] = {}
        # Caps being read from the store, shared likewise.
        self._caps_reading: dict[str, asyncio.Future[list[str] | None]] = {}
        self.host.hook("server/stopping", self._stopping)
        self.host.on_cluster_notice(
            AVATAR_NOTICE, lambda notice: self._resend_here(str(notice["bare"])), lambda: None
        )
        self._listeners: list[PublishListener] = []
        if self.host.config is not None and "vcard" in self.host.config.modules:
            self.host.add_feature(CONVERSION, "server")
            self.host.add_feature(CONVERSION, "account")
        if self.host.config is not None and "private" in self.host.config.modules:
            for feature in BOOKMARK_FEATURES:
                self.host.add_feature(feature, "account")

    async def start(self) -> None:
        self.roster = self.host.module(RosterModule)
        self.roster.subscribe_changes(self._on_roster_change)
        # The blocklist and privacy lists, whichever module holds them (one engine).
        self.rules: Privacy | Blocking | None = self.host.find_module(
            Privacy
        ) or self.host.find_module(Blocking)
        # Here, not in setup(): every module is set up by now, whatever the config's order.
        disco = self.host.find_module(Disco)
        if disco is not None:
            disco.add_account_identity("pubsub", "pep")
            disco.add_account_items(self._disco_items)
        vcard = self.host.find_module(VCard)
        if vcard is not None:
            avatars = AvatarConversion(self, vcard)
            self.listen(avatars.published)
            vcard.listen(avatars.vcard_set)
        private = self.host.find_module(Private)
        if private is not None:
            bookmarks = BookmarksConversion(self)
            self.listen(bookmarks.published)
            private.listen(bookmarks.private_set)
        self.host.spawn(self._resume())

    async def _resume(self) -> None:
        """Clear what node deletions a stopped or dead node left (their tombstones)."""
        for vhost in self.host.hosts:
            await finish_deletions(self.store(vhost))

    def _deleted(self, service: PubSubService, node: Node) -> None:
        """A node is gone: its subscriptions are cleared in the background, in batches."""
        self.host.spawn(clear_deleted(service, service.tombstone_key(node)))

    def resend_presence(self, bare: str) -> None:
        """Every available resource of `bare`, on every node, broadcasts its last
        presence again: the vcard module stamps the new avatar hash into it, so
        contacts of an account whose XEP-0084 avatar changed see it at once
        (XEP-0153 clients learn a new avatar only from presence; a client that
        published through PEP does not send one for it). The other nodes hear of it
        through the cluster bus, after the vcard module's own notice (one channel,
        in order); a notice lost costs only the early update: the hash goes out
        with the user's next presence, as without this."""
        self._resend_here(bare)
        self.host.notify_cluster(AVATAR_NOTICE, {"bare": bare})

    def _resend_here(self, bare: str) -> None:
        """The last presence of each of `bare`'s resources bound here, without its
        avatar hash (the stamp of the old one, which an empty <photo/> would keep)."""
        for session in self.host.available_sessions(bare):
            if (
                session.presence is not None
                and self.host.node_of(session) is None
                and self.host.is_bound(session)
            ):
                presence = copy.deepcopy(session.presence)
                for update in presence.findall(_X_UPDATE):
                    presence.remove(update)
                self.host.resend(presence, session)

    def listen(self, listener: PublishListener) -> None:
        """Call `listener` after each item a client publishes to or retracts from its
        own PEP (not after `publish` and `retract`, so that a conversion never
        triggers the reverse one)."""
        self._listeners.append(listener)

    async def publish(
        self,
        bare: str,
        name: str,
        item: etree._Element,
        options: dict[str, object] | None = None,
        *,
        enforce: bool = False,
    ) -> Event:
        """Publish `item` to the account's node `name` as the account itself (made
        with `options` when new; with `enforce`, an existing node is reconfigured
        with them in the same transaction, so that private data never lands in a
        node its owner's contacts may read), notifying as a client's publish does;
        listeners are not called."""
        service = self.service(bare)
        event = await service.publish(
            bare, name, item, dict(options or {}), auto_create=True,
            on_existing="apply" if enforce else "ignore",
        )
        await self._deliver(service, event)
        return event

    async def retract(self, bare: str, name: str, item_id: str) -> None:
        """Retract an item of the account's node as the account, notified to all who
        may see the node; listeners are not called."""
        service = self.service(bare)
        await self._deliver(service, await service.retract(bare, name, item_id))

    # --- the account's service ---------------------------------------------------------------

    def store(self, vhost: str) -> PubSubService:
        """The PEP store of `vhost` as a whole: its subscribers' index, its tombstones."""
        return PubSubService(
            self.host.items(vhost, "pep"), self.host.blobs(vhost, "pep"), "", self.limits,
            self._relation,
        )

    def service(self, bare: str) -> PubSubService:
        user, vhost = bare.split("@", 1)
        return PubSubService(
            self.host.items(vhost, "pep"),
            self.host.blobs(vhost, "pep"),
            f"{user}/",
            self.limits,
            self._relation,
            owner=bare,
            node_defaults=PRIVATE_NODES,
        )

    async def _relation(self, owner: str, contact: str) -> tuple[str, list[str]] | None:
        item = await self.roster.item(owner, contact)
        return None if item is None else (item.subscription, list(item.groups))

    async def _iq(self, request: IqRequest) -> etree._Element | None:
        action = next((c for c in request.payload if isinstance(c.tag, str)), None)
        reading = (
            request.stanza.get("type") == "get" and request.payload.tag == f"{{{PUBSUB}}}pubsub"
        )
        joining = action is not None and action.tag in (
            f"{{{PUBSUB}}}subscribe", f"{{{PUBSUB}}}unsubscribe", f"{{{PUBSUB}}}options")
        if not request.from_owner:
            if not await self.host.user_exists(request.host, request.target.split("@", 1)[0]):
                raise StanzaError("service-unavailable")  # RFC 6121 8.5.1: no such account
            if not (reading or joining):
                raise StanzaError("forbidden", "only the account may change its PEP nodes")
        requester = request.stanza.get("from") or request.target
        work = self.protocol.handle(
            Request(self.service(request.target), requester,
                    request.stanza.get("type", ""), request.payload)
        )
        try:
            return await storage_call(work, "pep")
        except Contended:
            raise StanzaError("resource-constraint", "the node is busy, retry", "wait") from None

    async def _disco_items(self, request: IqRequest) -> etree._Element | None:
        """The owner's nodes, or a node's item ids (XEP-0060 5.2, 5.5 on PEP)."""
        if not request.from_owner:
            return None
        service = self.service(request.target)
        name = request.payload.get("node")
        answer = etree.Element(f"{{{DISCO_ITEMS}}}query", nsmap={None: DISCO_ITEMS})
        if name is None:
            for node in await storage_call(service.node_names(MAX_DISCO_ITEMS), "pep"):
                etree.SubElement(answer, f"{{{DISCO_ITEMS}}}item", jid=request.target, node=node)
            return answer
        found = await storage_call(service.node(name), "pep")
        if found is None:
            raise StanzaError("item-not-found", "no such node")
        answer.set("node", name)
        for item_id, _blob in found.items[-MAX_DISCO_ITEMS:]:
            etree.SubElement(answer, f"{{{DISCO_ITEMS}}}item", jid=request.target, name=item_id)
        return answer

    # --- notifications -----------------------------------------------------------------------

    async def _notify(self, service: PubSubService, event: Event) -> None:
        """A client's change: delivered, then told to the listeners (items only)."""
        await self._deliver(service, event)
        if event.kind in ("items", "retract") and service.owner:
            for listener in self._listeners:
                await listener(service.owner, event)

    async def _deliver(self, service: PubSubService, event: Event) -> None:
        """Send `event` to everyone who should see it (see the module docstring),
        through the fan-out: in batches, one forward per cluster node."""
        node = event.node
        if not node.config.get("pubsub#deliver_notifications", True):
            return
        payload = bool(node.config.get("pubsub#deliver_payloads", True))
        owner = service.owner or ""
        await self.fanout.send(
            owner.rsplit("@", 1)[-1],
            lambda body: event_message(owner, "", event, payload=payload, include_body=body),
            await self._recipients(service, node, owner),
        )

    async def _recipients(
        self, service: PubSubService, node: Node, owner: str
    ) -> list[Recipient]:
        """The resources (and bare JIDs of explicit subscriptions) to notify, each once:
        none the owner's blocklist or privacy lists keep from it (`_gate`)."""
        wanted: dict[str, Recipient] = {}
        gate = await self._gate(owner)
        for session in self.host.available_sessions(owner):
            if node.name in session.state.get(NOTIFY, ()):
                wanted[session.jid] = Recipient(session.jid, session)
        try:
            roster = await self.roster.get(owner)
        except StorageError as exc:
            log.warning("notifications of %s to contacts not sent: %s", owner, exc)
            roster = None
        if roster is not None:
            for count, item in enumerate(roster.items.values(), 1):
                if count % FAN_OUT_BATCH == 0:
                    await asyncio.sleep(0)
                if item.subscription not in ("from", "both") or not self.host.serves(
                    item.jid.rsplit("@", 1)[-1]
                ):
                    continue
                sessions = [
                    s for s in self.host.available_sessions(item.jid)
                    if node.name in s.state.get(NOTIFY, ()) and (gate is None or gate(s.jid))
                ]
                relation = (item.subscription, list(item.groups))
                if sessions and judge(node, item.jid, owner, [relation]) is None:
                    wanted.update((s.jid, Recipient(s.jid, s)) for s in sessions)
        subs = [
            s for s in await service.subscribers(node)
            if s.state == "subscribed" and s.option("pubsub#deliver")
        ]
        for sub in await service.audience(node, subs):
            if gate is None or gate(sub.jid):
                wanted[sub.jid] = Recipient(sub.jid, include_body=sub.option("pubsub#include_body"))
        return list(wanted.values())

    async def _gate(self, owner: str) -> PeerGate | None:
        """Which JIDs the owner's blocklist and privacy lists let get its events, judged
        here because the events, sent in the owner's name by no session, pass no
        filter of the owner's (`PrivacyEngine.event_gate`); None: all of them."""
        return None if self.rules is None else await self.rules.event_gate(owner)

    def _fanout_in(self, routed: Routed) -> bool:
        if not FanOut.is_fanout(routed):
            return False
        self.host.spawn(self.fanout.expand(routed.stanza))
        return True

    async def _send_last(self, service: PubSubService, node: Node, to: str) -> None:
        """The node's last item to `to`, unless the owner's rules keep it from `to`."""
        await self._send_last_past(await self._gate(service.owner or ""), service, node, to)

    async def _send_last_past(
        self, gate: PeerGate | None, service: PubSubService, node: Node, to: str
    ) -> None:
        """`_send_last` with the owner's `gate` already asked for."""
        if gate is not None and not gate(to):
            return
        item = await service.last_item(node)
        if item is not None:
            event = Event("items", node, item, item.get("id"))
            payload = bool(node.config.get("pubsub#deliver_payloads", True))
            self.host.ledger.from_service += 1
            self.host.route(event_message(service.owner or "", to, event, payload=payload),
                            bounce=False)

    async def send_last_items(
        self, owners: Iterable[str], session: ClientSession, names: Iterable[str]
    ) -> None:
        """The last item of each node `names` of each of `owners` that `session` may
        see: one batch read per virtual host (through the shared cache). `owners`
        other than the session's account come from ITS roster, which may still say
        'to' where an owner revoked the subscription (an unsubscribed its server
        never applied): the presence and roster models read each OWNER's roster
        (once, all owners at once) before their nodes' items go."""
        names = list(names)
        by_vhost: dict[str, list[str]] = {}
        for owner in owners:
            by_vhost.setdefault(owner.rsplit("@", 1)[-1], []).append(owner)
        for vhost, vhost_owners in by_vhost.items():
            keys: dict[str, tuple[str, str]] = {}
            for owner in vhost_owners:
                service = self.service(owner)
                for name in names:
                    keys[service.node_key(name)] = (owner, name)
            try:
                found = await self._node_records(vhost, list(keys))
            except StorageError as exc:
                log.warning("last items for %s not sent: %s", session.jid, exc)
                continue
            nodes = [(keys[key][0], decode_node(keys[key][1], record))
                     for key, record in found.items()]
            nodes = [
                (owner, node) for owner, node in nodes
                if node.config.get("pubsub#send_last_published_item") == "on_sub_and_presence"
            ]
            relations = await self._relations(
                {owner for owner, node in nodes
                 if owner != session.bare and _needs_relation(node, owner, session.bare)},
                session.bare,
            )
            nodes = [
                (owner, node) for owner, node in nodes
                if owner == session.bare
                or judge(node, session.bare, owner, [relations.get(owner)]) is None
            ]
            # Each owner's rules asked for once, all at once, not once per node in turn.
            gated = sorted({owner for owner, _ in nodes})
            gates = dict(zip(gated, await asyncio.gather(*map(self._gate, gated)), strict=True))
            for owner, node in nodes:
                try:
                    await self._send_last_past(
                        gates[owner], self.service(owner), node, session.jid
                    )
                except StorageError as exc:
                    log.warning("last item of %s %s not sent: %s", owner, node.name, exc)

    async def _node_records(self, vhost: str, keys: list[str]) -> dict[str, Item]:
        """`batch_get` of node records, sharing the reads under way: the logins of a
        storm ask for the same contacts' records at once, before the first answer
        has filled the shared cache, so without this each would read them all from
        the store. A record read for one login is waited for by the others."""
        futures: dict[str, asyncio.Future[dict[str, Item]]] = {}
        mine = [key for key in keys if (vhost, key) not in self._reading]
        if mine:
            read = asyncio.ensure_future(self.host.items(vhost, "pep").batch_get(mine))
            for key in mine:
                self._reading[(vhost, key)] = read
            read.add_done_callback(lambda done: self._done_reading(vhost, mine, done))
        for key in keys:
            futures[key] = self._reading[(vhost, key)]
        found: dict[str, Item] = {}
        for shared in {id(f): f for f in futures.values()}.values():
            found.update(await asyncio.shield(shared))
        return {key: found[key] for key in keys if key in found}

    def _done_reading(
        self, vhost: str, keys: list[str], read: asyncio.Future[dict[str, Item]]
    ) -> None:
        """A read is over: later logins read afresh (through the cache)."""
        for key in keys:
            if self._reading.get((vhost, key)) is read:
                del self._reading[(vhost, key)]
        if not read.cancelled():
            read.exception()  # retrieved: each waiter has it raised

    async def _relations(
        self, owners: set[str], contact: str
    ) -> dict[str, tuple[str, list[str]] | None]:
        """`contact` in each of `owners`' rosters, read at once; one that cannot be
        read counts as absent (its items are not sent)."""
        ordered = sorted(owners)
        read = await asyncio.gather(
            *(self._relation(owner, contact) for owner in ordered), return_exceptions=True
        )
        relations: dict[str, tuple[str, list[str]] | None] = {}
        for owner, relation in zip(ordered, read, strict=True):
            if isinstance(relation, StorageError):
                log.warning("last items of %s for %s not sent: %s", owner, contact, relation)
                relation = None
            elif isinstance(relation, BaseException):
                raise relation
            relations[owner] = relation
        return relations

    # --- presence: what each resource wants --------------------------------------------------

    async def _on_presence(
        self, stanza: etree._Element, session: ClientSession, initial: bool
    ) -> bool:
        if stanza.get("type") == "unavailable":
            return False
        before = set(session.state.get(NOTIFY, ()))
        names = await self._interests(stanza, session)
        if names is None:
            return False
        if sorted(names) != sorted(before):
            self.host.set_state(session, NOTIFY, sorted(names) or None)
        new = names if initial else names - before
        if not new or not self.host.is_bound(session):
            return False
        try:
            roster = await self.roster.get(session.bare)
        except StorageError as exc:
            log.warning("last items for %s not sent: %s", session.jid, exc)
            return False
        contacts = [
            item.jid for item in roster.items.values()
            if item.subscription in ("to", "both") and self.host.serves(item.jid.rsplit("@", 1)[-1])
        ]
        await self.send_last_items([session.bare, *contacts], session, new)
        return False

    async def _interests(self, stanza: etree._Element, session: ClientSession) -> set[str] | None:
        """The "+notify" node names of the resource's caps (None: keep what it had)."""
        c = stanza.find(_CAPS_C)
        if c is None:
            return set()
        ver, hash_, node = c.get("ver"), c.get("hash"), c.get("node")
        if not ver or not node:
            return set()
        key = f"{hash_ or 'legacy'}/{quote(ver, safe='')}"
        features = self._caps.get(key)
        if features is None:
            features = await self._stored_caps(session.host, key)
        if features is None:
            features = await self._asked_caps(session, f"{node}#{ver}", hash_, ver, key)
        if features is None:
            return None
        return {f[: -len("+notify")] for f in features if f.endswith("+notify")}

    async def _asked_caps(
        self, session: ClientSession, node: str, hash_: str | None, ver: str, key: str
    ) -> list[str] | None:
        """Ask the resource, or wait for the answer of another resource with the same
        caps being asked already (a login storm of one client version asks once)."""
        shared = hash_ == "sha-1"
        try:
            pending = self._asking.get(key) if shared else None
            if pending is not None:
                await asyncio.shield(pending)
                if key in self._caps:  # verified; else this resource is asked too
                    return self._caps[key]
            ask = asyncio.ensure_future(self._ask_caps(session, node, hash_, ver, key))
            self._asks.add(ask)
            ask.add_done_callback(self._asks.discard)
            if shared and key not in self._asking:
                self._asking[key] = ask
                ask.add_done_callback(lambda _: self._asking.pop(key, None))
            return await asyncio.shield(ask)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return None  # the node stops: the question was cancelled, not this presence

    async def _stopping(self) -> bool:
        """Questions to clients are not waited for at shutdown (they may never answer)."""
        for ask in list(self._asks):
            ask.cancel()
        return False

    async def _stored_caps(self, vhost: str, key: str) -> list[str] | None:
        """The caps from the store, one read however many logins bring a hash at once."""
        read = self._caps_reading.get(key)
        if read is None:
            read = asyncio.ensure_future(self._read_caps(vhost, key))
            self._caps_reading[key] = read
            read.add_done_callback(lambda _: self._caps_reading.pop(key, None))
        return await asyncio.shield(read)

    async def _read_caps(self, vhost: str, key: str) -> list[str] | None:
        try:
            features = await CapsStore.read(self.host.items(vhost, "caps"), key)
        except StorageError:
            return None
        if features is None:
            return None
        if len(self._caps) >= MAX_CAPS_KEPT:
            self._caps.clear()
        self._caps[key] = features
        return features

    async def _ask_caps(
        self, session: ClientSession, node: str, hash_: str | None, ver: str, key: str
    ) -> list[str] | None:
        """disco#info of the resource; kept (shared) only when it matches its hash.
        An answer that does not match serves this resource only."""
        iq = etree.Element("{jabber:client}iq", nsmap={None: "jabber:client"})
        iq.set("type", "get")
        iq.set("from", session.bare)
        iq.set("to", session.jid)
        etree.SubElement(iq, f"{_INFO}query", nsmap={None: DISCO_INFO}, node=node)
        try:
            answer = await self.host.send_iq(iq, CAPS_TIMEOUT)
        except (StanzaError, TimeoutError) as exc:
            log.debug("caps of %s unknown: %s", session.jid, exc)
            return None
        query = answer.find(f"{_INFO}query")
        if query is None:
            return None
        features = [f.get("var") or "" for f in query.findall(f"{_INFO}feature")]
        identities = [
            Identity(i.get("category") or "", i.get("type") or "", i.get("name"),
                     i.get("{http://www.w3.org/XML/1998/namespace}lang"))
            for i in query.findall(f"{_INFO}identity")
        ]
        forms = query.findall(f"{{{DATA}}}x")
        if hash_ == "sha-1" and verification_string(identities, features, forms) == ver:
            if len(self._caps) >= MAX_CAPS_KEPT:
                self._caps.clear()  # the store still has them
            self._caps[key] = features
            try:
                items = self.host.items(session.host, "caps")
                if not await self._caps_store.store(items, session.bare, key, features):
                    log.debug("caps %s of %s serve it unstored (its budget)", key, session.jid)
            except StorageError as exc:
                log.warning("caps %s not stored: %s", key, exc)
        return features

    # --- a new presence subscription: the contact gets the last items ------------------------

    def _on_roster_change(self, owner: str, item: RosterItem | None, removed: str | None) -> None:
        if item is None or item.subscription not in ("from", "both"):
            return
        for session in self.host.available_sessions(item.jid):
            names = session.state.get(NOTIFY)
            if names and self.host.is_bound(session):
                self.host.spawn(self.send_last_items([owner], session, names))

    # --- account removal ---------------------------------------------------------------------

    async def remove_user(self, vhost: str, username: str) -> bool:
        """Delete the account's subscriptions to and affiliations with the nodes of the accounts of
        every host, and its own nodes (every one, whatever `max_nodes` says now) with their
        items, blobs and subscriptions, and the subscribers' and affiliates' index entries
        of them (cleared here rather than in the background:
        nothing is left once this returns; a removal that failed part way left
        tombstones, which running it again clears)."""
        return await _purge(self.host, self.limits, vhost, username)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        return await _purge(host, _limits(PepOptions()), vhost, username)


def _needs_relation(node: Node, owner: str, contact: str) -> bool:
    """Does the access model's verdict on `contact` rest on the owner's roster?"""
    model = node.config.get("pubsub#access_model")
    return model in ("presence", "roster") and judge(node, contact, owner, None) is not None


async def _purge(host: ModuleHost, limits: Limits, vhost: str, username: str) -> bool:
    """`Pep.remove_user`, from storage alone: the module keeps nothing of an account in
    memory that outlives its sessions, so the same runs with the module off."""
    bare = f"{username}@{vhost}"
    found = False

    def service(vhost: str, prefix: str, owner: str | None = None) -> PubSubService:
        return PubSubService(
            host.items(vhost, "pep"), host.blobs(vhost, "pep"), prefix, limits, no_relation,
            owner=owner,
        )

    for other in host.hosts:
        found = await service(other, "").drop_subscriptions_of(bare) or found
        found = await service(other, "").drop_affiliations_of(bare) or found
    own = service(vhost, f"{username}/", bare)
    await finish_deletions(own, own.prefix)
    # Every node, a page at a time, however many `max_nodes` allows now: the prefix
    # deletion below takes the records of a node left out, but not its subscribers'
    # `/u/` nor its affiliates' `/a/` entries, which only the deletion's clean-up finds.
    async for page in own.node_pages():
        for node in page:
            deleted = await own.delete(None, node.name)
            await clear_deleted(own, own.tombstone_key(deleted.node))
            found = True
    found = await host.items(vhost, "pep").delete_prefix(f"{username}/") > 0 or found
    found = await host.blobs(vhost, "pep").delete_prefix(f"{username}/") > 0 or found
    return found


MODULE = Pep
