"""The XEP-0060 publish-subscribe service at pubsub.<host>, one per virtual host.

The same engine as PEP (modules/_pubsub_engine.py) with a service's rules:
any account of the virtual host may create nodes (and owns them), nodes
default to the open access model and `default_max_items` items, and
notifications go to the explicit subscribers the node's access model
still admits. Disco#info describes the service and each node; disco#items
lists the nodes not closed to the asker, and a node's items. Nodes may use the authorize access
model (XEP-0060 6.1.6, 8.6): a subscription waits, pending, for an owner to
submit the authorization form the service sent each owner in a message, and
the subscriber is told the outcome (subscribed or none).

The service's data is in the item and blob stores "pubsub" of its own
domain (namespace "pubsub.<host>/pubsub"); each domain served is noted under its
host (modules/_pubsub_services.py), for an account's removal with the module off.
"""

from __future__ import annotations

import re
import secrets

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from xmppd.jid import JID, InvalidJID, parse_jid
from xmppd.modulehost import Module, ModuleHost, Routed, storage_call
from xmppd.modules.roster import RosterModule
from xmppd.storage.base import Contended, Item, StorageError
from xmppd.stream.errors import StanzaError, error_from, error_reply

from ._pubsub_cleanup import clear_deleted, finish_deletions
from ._pubsub_engine import (
    MAX_AFFILIATIONS,
    MAX_ITEMS,
    Event,
    Limits,
    Node,
    PubSubService,
    decode_node,
    encode_node,
    no_relation,
)
from ._pubsub_fanout import FanOut, Recipient
from ._pubsub_forms import DATA, PUBSUB, PUBSUB_EVENT, PUBSUB_OWNER, SUBSCRIBE_AUTHORIZATION
from ._pubsub_protocol import FEATURES, RSM, PubSubProtocol, Request, event_message
from ._pubsub_services import record_services, recorded_services

DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
MAX_DISCO_ITEMS = 1000  # nodes or items listed in one disco#items answer
SERVICE_FEATURES = (*FEATURES, "access-authorize", "subscription-notifications")
"""PEP has no authorize model; this service has."""
SUBDOMAIN = re.compile(r"^[a-z0-9-]{1,63}$")
_X = f"{{{DATA}}}x"
_FIELD = f"{{{DATA}}}field"
_VALUE = f"{{{DATA}}}value"


class PubSubOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    subdomain: StrictStr = Field(default="pubsub", pattern=SUBDOMAIN.pattern)
    name: StrictStr = "Publish-Subscribe"
    max_item_bytes: StrictInt = Field(default=256 * 1024, ge=1024, le=16 * 1024 * 1024)
    max_items: StrictInt = Field(default=1000, ge=1, le=MAX_ITEMS)  # per node; 'max'
    default_max_items: StrictInt = Field(default=10, ge=1, le=MAX_ITEMS)
    max_nodes: StrictInt = Field(default=10_000, ge=1, le=1_000_000)  # per service
    max_subscriptions: StrictInt = Field(default=1000, ge=1, le=100_000)  # per account
    max_subscribers: StrictInt = Field(default=100_000, ge=1, le=1_000_000)  # per node
    # per node, owner included; all in the node's record, which every publish reads
    max_affiliations: StrictInt = Field(default=1000, ge=1, le=MAX_AFFILIATIONS)
    inline_item_bytes: StrictInt = Field(default=32 * 1024, ge=256, le=128 * 1024)


def _limits(opts: PubSubOptions) -> Limits:
    return Limits.of(opts, opts.default_max_items, "open")


class PubSub(Module):
    name = "pubsub"
    Options = PubSubOptions
    # Its domains are served from setup(), one under each host of that moment.
    fixed_options = ("subdomain", "name")
    hosts_fixed = True

    def reconfigure(self, options: BaseModel) -> None:
        super().reconfigure(options)
        self.limits = _limits(options)  # type: ignore[arg-type]

    def setup(self) -> None:
        opts: PubSubOptions = self.options  # type: ignore[assignment]
        self.limits = _limits(opts)
        self.protocol = PubSubProtocol(
            self._notify, self._send_last, self._deleted, auto_create=False,
            ask_owners=self._ask_owners,
        )
        self.fanout = FanOut(self.host)
        self.domains = {f"{opts.subdomain}.{vhost}": vhost for vhost in self.host.hosts}
        for domain in self.domains:
            self.host.serve_domain(domain, self._stanza, opts.name)

    async def start(self) -> None:
        # Before the first stanza, and once for the node's life: neither the subdomain
        # nor the hosts change by a reload while the module is on (fixed_options,
        # hosts_fixed), so every domain this node may store data under is noted here.
        await record_services(self.host, self.domains)
        self.roster = self.host.find_module(RosterModule)
        self.host.spawn(self._resume())

    async def _resume(self) -> None:
        """Clear what node deletions a stopped or dead node left (their tombstones)."""
        for domain in self.domains:
            await finish_deletions(self.service(domain))

    def _deleted(self, service: PubSubService, node: Node) -> None:
        """A node is gone: its subscriptions are cleared in the background, in batches."""
        self.host.spawn(clear_deleted(service, service.tombstone_key(node)))

    def service(self, domain: str) -> PubSubService:
        return PubSubService(
            self.host.items(domain, "pubsub"),
            self.host.blobs(domain, "pubsub"),
            "",
            self.limits,
            self._relation,
        )

    async def _relation(self, owner: str, contact: str) -> tuple[str, list[str]] | None:
        if self.roster is None:
            return None
        item = await self.roster.item(owner, contact)
        return None if item is None else (item.subscription, list(item.groups))

    # --- stanzas to the service ------------------------------------------------------------

    def _stanza(self, routed: Routed) -> None:
        stanza = routed.stanza
        if FanOut.is_fanout(routed):  # another node's notifications, for sessions here
            self.host.spawn(self.fanout.expand(stanza))
            return
        if stanza.tag == "{jabber:client}message" and stanza.get("type") != "error":
            form = stanza.find(_X)
            if form is not None and _field(form, "FORM_TYPE") == SUBSCRIBE_AUTHORIZATION:
                self.host.spawn(self._authorization(stanza, form, routed.to.domain))
            return
        if stanza.tag != "{jabber:client}iq" or stanza.get("type") not in ("get", "set"):
            return  # presence, other messages and IQ answers to the service: nothing to do
        self.host.spawn(self._iq(stanza, routed.to.domain))

    async def _iq(self, stanza: etree._Element, domain: str) -> None:
        try:
            payload = await self._answer(stanza, domain)
        except StanzaError as exc:
            self.host.route(error_from(stanza, exc))
            return
        except Exception:
            self.log.exception("pubsub request failed")
            self.host.route(error_reply(stanza, "internal-server-error"))
            return
        result = etree.Element("{jabber:client}iq", nsmap={None: "jabber:client"})
        result.set("type", "result")
        result.set("id", stanza.get("id", ""))
        result.set("from", stanza.get("to", domain))
        result.set("to", stanza.get("from", ""))
        if payload is not None:
            result.append(payload)
        self.host.route(result)

    async def _answer(self, stanza: etree._Element, domain: str) -> etree._Element | None:
        if len(stanza) != 1 or not isinstance(stanza[0].tag, str) or not stanza.get("id"):
            raise StanzaError("bad-request", "an IQ get/set needs an id and one child")
        payload = stanza[0]
        requester = stanza.get("from") or ""
        try:
            sender = JID(requester)
        except InvalidJID:
            raise StanzaError("jid-malformed") from None
        if JID(stanza.get("to") or domain).user:
            raise StanzaError("service-unavailable")
        service = self.service(domain)
        type_ = stanza.get("type", "")
        if payload.tag in (f"{{{PUBSUB}}}pubsub", f"{{{PUBSUB_OWNER}}}pubsub"):
            if not self.host.serves(sender.domain):
                raise StanzaError("forbidden", "only accounts of this server use this service")
            work = self.protocol.handle(Request(service, requester, type_, payload))
            try:
                return await storage_call(work, "pubsub")
            except Contended:
                raise StanzaError("resource-constraint", "the node is busy", "wait") from None
        if type_ == "get" and payload.tag == f"{{{DISCO_INFO}}}query":
            return await storage_call(self._disco_info(service, payload), "pubsub")
        if type_ == "get" and payload.tag == f"{{{DISCO_ITEMS}}}query":
            return await storage_call(
                self._disco_items(service, domain, requester, payload), "pubsub"
            )
        raise StanzaError("service-unavailable")

    # --- disco ----------------------------------------------------------------------------

    async def _disco_info(
        self, service: PubSubService, query: etree._Element
    ) -> etree._Element:
        name = query.get("node")
        answer = etree.Element(f"{{{DISCO_INFO}}}query", nsmap={None: DISCO_INFO})
        if name is None:
            _identity(answer, "service", self.options.name)  # type: ignore[attr-defined]
            features = [  # RSM: items and the owner's lists come in pages (XEP-0059 8)
                DISCO_INFO, DISCO_ITEMS, PUBSUB, RSM,
                *(f"{PUBSUB}#{f}" for f in SERVICE_FEATURES),
            ]
        else:
            await service.existing(name)
            answer.set("node", name)
            _identity(answer, "leaf", None)
            features = [DISCO_INFO, DISCO_ITEMS, PUBSUB, RSM]
        for var in features:
            etree.SubElement(answer, f"{{{DISCO_INFO}}}feature", var=var)
        return answer

    async def _disco_items(
        self, service: PubSubService, domain: str, requester: str, query: etree._Element
    ) -> etree._Element:
        """The nodes (XEP-0060 5.2) but those closed to the requester, or a node's item
        ids (5.5) for those who may read it."""
        name = query.get("node")
        answer = etree.Element(f"{{{DISCO_ITEMS}}}query", nsmap={None: DISCO_ITEMS})
        if name is None:
            bare = requester.split("/", 1)[0]
            for node_name in await service.listed_nodes(bare, MAX_DISCO_ITEMS):
                etree.SubElement(answer, f"{{{DISCO_ITEMS}}}item", jid=domain, node=node_name)
            return answer
        node = await service.existing(name)
        await service.check_access(node, requester)
        answer.set("node", name)
        for item_id, _blob in node.items[-MAX_DISCO_ITEMS:]:
            etree.SubElement(answer, f"{{{DISCO_ITEMS}}}item", jid=domain, name=item_id)
        return answer

    # --- the authorize access model (XEP-0060 6.1.6, 8.6) ------------------------------------

    async def _ask_owners(self, service: PubSubService, node: Node, jid: str, subid: str) -> None:
        """Send each owner the subscription authorization form (XEP-0060 8.6.1)."""
        domain = service.items.namespace.rsplit("/", 1)[0]
        for owner in node.owners:
            message = etree.Element("{jabber:client}message", nsmap={None: "jabber:client"})
            message.set("from", domain)
            message.set("to", owner)
            message.set("id", secrets.token_hex(8))
            x = etree.SubElement(message, _X, nsmap={None: DATA}, type="form")
            etree.SubElement(x, f"{{{DATA}}}title").text = "PubSub subscriber request"
            etree.SubElement(x, f"{{{DATA}}}instructions").text = (
                "To approve this entity's subscription request, click the OK button. "
                "To deny the request, click the cancel button."
            )
            for var, type_, label, value in (
                ("FORM_TYPE", "hidden", None, SUBSCRIBE_AUTHORIZATION),
                ("pubsub#subid", "hidden", None, subid),
                ("pubsub#node", "text-single", "Node ID", node.name),
                ("pubsub#subscriber_jid", "jid-single", "Subscriber Address", jid),
                ("pubsub#allow", "boolean",
                 "Allow this JID to subscribe to this pubsub node?", "false"),
            ):
                field = etree.SubElement(x, _FIELD, var=var, type=type_)
                if label:
                    field.set("label", label)
                etree.SubElement(field, _VALUE).text = value
            self.host.ledger.from_service += 1
            self.host.route(message, bounce=False)

    async def _authorization(self, stanza: etree._Element, form: etree._Element,
                             domain: str) -> None:
        """An owner's submitted authorization form: approve or deny, then tell the
        subscriber (XEP-0060 8.6.2). A form that cannot be applied gets a message
        error back."""
        try:
            if form.get("type") == "cancel":
                return
            if form.get("type") != "submit":
                raise StanzaError("bad-request", "submit the authorization form")
            name = _field(form, "pubsub#node")
            jid = _field(form, "pubsub#subscriber_jid")
            allow = _field(form, "pubsub#allow")
            if not name or not jid or allow not in ("1", "true", "0", "false"):
                raise StanzaError("bad-request", "the form needs the node, the JID and allow")
            jid = str(parse_jid(jid))  # as the subscription's key names it
            service = self.service(domain)
            work = service.authorize(stanza.get("from") or "", name, jid, allow in ("1", "true"))
            try:
                state = await storage_call(work, "pubsub")
            except Contended:
                raise StanzaError("resource-constraint", "the node is busy", "wait") from None
        except StanzaError as exc:
            self.host.route(error_from(stanza, exc), bounce=False)
            return
        message = etree.Element("{jabber:client}message", nsmap={None: "jabber:client"})
        message.set("from", domain)
        message.set("to", jid)
        event = etree.SubElement(message, f"{{{PUBSUB_EVENT}}}event", nsmap={None: PUBSUB_EVENT})
        etree.SubElement(event, f"{{{PUBSUB_EVENT}}}subscription", node=name, jid=jid,
                         subscription=state)
        self.host.ledger.from_service += 1
        self.host.route(message, bounce=False)
        if state == "subscribed":
            try:
                node = await service.node(name)
                if node is not None and node.config.get(
                    "pubsub#send_last_published_item", "never"
                ) != "never":
                    await self._send_last(service, node, jid)
            except StorageError as exc:
                self.log.warning("last item of %s not sent to %s: %s", name, jid, exc)

    # --- notifications ---------------------------------------------------------------------

    async def _notify(self, service: PubSubService, event: Event) -> None:
        """To the subscribers the access model admits (all of them for a delete or
        purge), through the fan-out: in batches, one forward per cluster node."""
        node = event.node
        if not node.config.get("pubsub#deliver_notifications", True):
            return
        payload = bool(node.config.get("pubsub#deliver_payloads", True))
        domain = service.items.namespace.rsplit("/", 1)[0]
        subs = [
            s for s in await service.subscribers(node)
            if s.state == "subscribed" and s.option("pubsub#deliver")
        ]
        if event.kind not in ("delete", "purge"):
            subs = await service.audience(node, subs)
        await self.fanout.send(
            domain,
            lambda body: event_message(domain, "", event, payload=payload, include_body=body),
            [Recipient(s.jid, include_body=s.option("pubsub#include_body")) for s in subs],
        )

    async def _send_last(self, service: PubSubService, node: Node, to: str) -> None:
        item = await service.last_item(node)
        if item is not None:
            domain = service.items.namespace.rsplit("/", 1)[0]
            event = Event("items", node, item, item.get("id"))
            payload = bool(node.config.get("pubsub#deliver_payloads", True))
            self.host.ledger.from_service += 1
            self.host.route(event_message(domain, to, event, payload=payload), bounce=False)

    # --- account removal -------------------------------------------------------------------

    async def remove_user(self, vhost: str, username: str) -> bool:
        """Drop the account's subscriptions and affiliations on the service of every
        host (an account of one may use another's), and on those the module served
        before at another subdomain (`_served`: a move back would find them); delete
        the nodes it alone owned, with their items, their subscriptions and the
        subscribers' index entries of them, cleared here rather than in the
        background, so that nothing is left once this returns (a removal that failed
        part way left a tombstone, which running it again clears)."""
        bare = f"{username}@{vhost}"
        found = False
        for domain in sorted(set(self.domains) | await _served(self.host)):
            found = await _purge(self.service(domain), bare) or found
        return found

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """As `remove_user`, with the module off, its options (the subdomain) gone: on
        every service it served (`_served`)."""
        limits = _limits(PubSubOptions())
        found = False
        for domain in sorted(await _served(host)):
            service = PubSubService(
                host.items(domain, "pubsub"), host.blobs(domain, "pubsub"), "", limits,
                no_relation,
            )
            found = await _purge(service, f"{username}@{vhost}") or found
        return found


async def _served(host: ModuleHost) -> set[str]:
    """The service domains the module served under the hosts of `host`: those it noted
    when it served them, and the default `pubsub.<host>` (served before services were
    noted). One query per host, never a listing of the whole store (on DynamoDB a Scan
    of the table, which an in-band removal must not cost)."""
    domains = {f"{PubSubOptions().subdomain}.{vhost}" for vhost in host.hosts}
    for vhost in host.hosts:
        domains |= _services(await recorded_services(host, vhost), [vhost])
    return domains


async def _purge(service: PubSubService, bare: str) -> bool:
    """Drop `bare`'s subscriptions and affiliations on one service, and the nodes it
    alone owned: every node, a page at a time (the service keeps no index of a user's
    affiliations), however many `max_nodes` allows now."""
    await finish_deletions(service)
    found = await service.drop_subscriptions_of(bare)
    async for page in service.node_pages():
        for listed in page:
            if bare not in listed.affiliations:
                continue
            node = await service.node(listed.name)  # as it is now, not as listed
            if node is None or bare not in node.affiliations:
                continue
            found = True
            if node.owners == [bare]:
                deleted = await service.delete(None, node.name)
                await clear_deleted(service, service.tombstone_key(deleted.node))
            else:
                await service.items.modify(
                    service.node_key(node.name),
                    lambda item, n=node.name: _without(n, item, bare),
                    what="node",
                )
    return found


def _services(domains: list[str], hosts: list[str]) -> set[str]:
    """The domains among `domains` that are a subdomain of one of `hosts` (one DNS label
    below it, as the `subdomain` option allows): a pubsub service's. A record that is
    not (written by hand) is left alone, never taken for a service."""
    found = set()
    for domain in domains:
        label, _, parent = domain.partition(".")
        if parent in hosts and SUBDOMAIN.match(label):
            found.add(domain)
    return found


def _without(name: str, item: Item | None, bare: str) -> dict[str, str | bytes | int] | None:
    if item is None:
        return None
    node = decode_node(name, item)
    node.affiliations.pop(bare, None)
    return encode_node(node)


def _field(form: etree._Element, var: str) -> str | None:
    for field in form.findall(_FIELD):
        if field.get("var") == var:
            return field.findtext(_VALUE)
    return None


def _identity(query: etree._Element, type_: str, name: str | None) -> None:
    identity = etree.SubElement(query, f"{{{DISCO_INFO}}}identity", category="pubsub")
    identity.set("type", type_)
    if name:
        identity.set("name", name)


MODULE = PubSub
