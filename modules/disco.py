"""Service discovery for the server and for accounts (XEP-0030).

Features and identities are whatever the enabled modules registered with
the host, so disco always says exactly what this server does. Other modules
answer for nodes of the server's own (`serve_nodes`): ad-hoc commands list
theirs under "http://jabber.org/protocol/commands" (XEP-0050), and what a
node shows may depend on who asks (an administrator sees more).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lxml import etree

from xmppd.modulehost import IqRequest, Module
from xmppd.stream.errors import StanzaError

DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"

Identity = tuple[str, str, str | None]  # category, type, name


@dataclass(slots=True)
class NodeInfo:
    """What disco#info on a node of the server answers."""

    identities: list[Identity]
    features: list[str] = field(default_factory=list)


@dataclass(slots=True)
class NodeItem:
    """One item of disco#items on a node of the server."""

    jid: str
    node: str | None = None
    name: str | None = None


# A module's answer for a node of the server, or None when the node is not its own.
# Either may raise StanzaError (forbidden: the asker may not see the node).
InfoProvider = Callable[[IqRequest, str], NodeInfo | None]
ItemsProvider = Callable[[IqRequest, str], list[NodeItem] | None]
AccountItems = Callable[[IqRequest], Awaitable[etree._Element | None]]
"""Answers disco#items to an account (PEP: its nodes), or None to leave it to others."""


class Disco(Module):
    name = "disco"

    def setup(self) -> None:
        # Server info nodes that answer like the server itself (XEP-0115 "node#ver").
        self.server_info_nodes: set[str] = set()
        self._info_providers: list[InfoProvider] = []
        self._items_providers: list[ItemsProvider] = []
        # Identities of every account besides account/registered (PEP: pubsub/pep).
        self.account_identities: list[tuple[str, str, str | None]] = []
        self.account_items: list[AccountItems] = []
        self.host.add_identity("server", "im", "xmppd")
        for scope in ("server", "account"):
            self.host.add_feature(DISCO_INFO, scope)  # type: ignore[arg-type]
            self.host.add_feature(DISCO_ITEMS, scope)  # type: ignore[arg-type]
        self.host.iq(DISCO_INFO, "get", self.info, to="both")
        self.host.iq(DISCO_ITEMS, "get", self.items, to="both")

    async def info(self, request: IqRequest) -> etree._Element:
        node = request.payload.get("node")
        query = etree.Element(f"{{{DISCO_INFO}}}query", nsmap={None: DISCO_INFO})
        if node is not None:
            query.set("node", node)
        identities: list[Identity]
        if node is not None and ("@" in request.target or node not in self.server_info_nodes):
            answer = self._node_info(request, node)
            identities, features = answer.identities, set(answer.features)
        elif "@" in request.target:
            if not request.from_owner:
                # Without presence subscriptions (roster module) only the owner may look.
                raise StanzaError("service-unavailable")
            identities = [("account", "registered", None), *self.account_identities]
            features = self.host.features["account"]
        else:
            identities = self.host.identities
            features = self.host.features["server"]
        for category, type_, name in identities:
            identity = etree.SubElement(query, f"{{{DISCO_INFO}}}identity")
            identity.set("category", category)
            identity.set("type", type_)
            if name:
                identity.set("name", name)
        for var in sorted(features):
            etree.SubElement(query, f"{{{DISCO_INFO}}}feature").set("var", var)
        return query

    def add_account_identity(self, category: str, type_: str) -> None:
        """Announce an identity on every account's bare JID (XEP-0163: pubsub/pep)."""
        self.account_identities.append((category, type_, None))

    def add_account_items(self, provider: AccountItems) -> None:
        """Let `provider` answer disco#items to accounts first (XEP-0163: PEP nodes)."""
        self.account_items.append(provider)

    def remove_server_info_node(self, node: str) -> None:
        self.server_info_nodes.discard(node)

    def add_server_info_node(self, node: str) -> None:
        """Answer disco#info for `node` with the server's own info (XEP-0115 caps)."""
        self.server_info_nodes.add(node)

    def serve_nodes(self, info: InfoProvider, items: ItemsProvider) -> None:
        """Let a module answer disco#info and disco#items on nodes of the server (not of
        accounts): each provider returns None for a node that is not its own."""
        self._info_providers.append(info)
        self._items_providers.append(items)

    def _node_info(self, request: IqRequest, node: str) -> NodeInfo:
        if "@" not in request.target:
            for provider in self._info_providers:
                answer = provider(request, node)
                if answer is not None:
                    return answer
        raise StanzaError("item-not-found", "no such node")

    async def items(self, request: IqRequest) -> etree._Element:
        if "@" in request.target:
            for provider in self.account_items:
                answer = await provider(request)
                if answer is not None:
                    return answer
        node = request.payload.get("node")
        if node is not None and "@" in request.target:
            raise StanzaError("item-not-found", "no such node")
        if "@" in request.target and not request.from_owner:
            raise StanzaError("service-unavailable")
        query = etree.Element(f"{{{DISCO_ITEMS}}}query", nsmap={None: DISCO_ITEMS})
        if node is not None:
            query.set("node", node)
            for found in self._node_items(request, node):
                item = etree.SubElement(query, f"{{{DISCO_ITEMS}}}item")
                item.set("jid", found.jid)
                if found.node is not None:
                    item.set("node", found.node)
                if found.name:
                    item.set("name", found.name)
        elif "@" not in request.target:
            # The services inside the server under this host (XEP-0030 section 4).
            for domain, name in sorted(self.host.components.items()):
                if domain.endswith("." + request.target):
                    item = etree.SubElement(query, f"{{{DISCO_ITEMS}}}item")
                    item.set("jid", domain)
                    if name:
                        item.set("name", name)
        return query

    def _node_items(self, request: IqRequest, node: str) -> list[NodeItem]:
        if "@" not in request.target:
            for provider in self._items_providers:
                answer = provider(request, node)
                if answer is not None:
                    return answer
        raise StanzaError("item-not-found", "no such node")


MODULE = Disco
