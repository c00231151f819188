"""Service discovery for the server and for accounts (XEP-0030).

Features and identities are whatever the enabled modules registered with
the host, so disco always says exactly what this server does.
"""

from __future__ import annotations

from lxml import etree

from xmppd.modulehost import IqRequest, Module
from xmppd.stream.errors import StanzaError

DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"


class Disco(Module):
    name = "disco"

    def setup(self) -> None:
        # Server info nodes that answer like the server itself (XEP-0115 "node#ver").
        self.server_info_nodes: set[str] = set()
        self.host.add_identity("server", "im", "xmppd")
        for scope in ("server", "account"):
            self.host.add_feature(DISCO_INFO, scope)  # type: ignore[arg-type]
            self.host.add_feature(DISCO_ITEMS, scope)  # type: ignore[arg-type]
        self.host.iq(DISCO_INFO, "get", self.info, to="both")
        self.host.iq(DISCO_ITEMS, "get", self.items, to="both")

    async def info(self, request: IqRequest) -> etree._Element:
        node = request.payload.get("node")
        if node is not None and ("@" in request.target or node not in self.server_info_nodes):
            raise StanzaError("item-not-found", "no such node")
        query = etree.Element(f"{{{DISCO_INFO}}}query", nsmap={None: DISCO_INFO})
        if node is not None:
            query.set("node", node)
        if "@" in request.target:
            if not request.from_owner:
                # Without presence subscriptions (roster module) only the owner may look.
                raise StanzaError("service-unavailable")
            identities: list[tuple[str, str, str | None]] = [("account", "registered", None)]
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

    def remove_server_info_node(self, node: str) -> None:
        self.server_info_nodes.discard(node)

    def add_server_info_node(self, node: str) -> None:
        """Answer disco#info for `node` with the server's own info (XEP-0115 caps)."""
        self.server_info_nodes.add(node)

    async def items(self, request: IqRequest) -> etree._Element:
        if request.payload.get("node") is not None:
            raise StanzaError("item-not-found", "no such node")
        if "@" in request.target and not request.from_owner:
            raise StanzaError("service-unavailable")
        query = etree.Element(f"{{{DISCO_ITEMS}}}query", nsmap={None: DISCO_ITEMS})
        if "@" not in request.target:
            # The services inside the server under this host (XEP-0030 section 4).
            for domain, name in sorted(self.host.components.items()):
                if domain.endswith("." + request.target):
                    item = etree.SubElement(query, f"{{{DISCO_ITEMS}}}item")
                    item.set("jid", domain)
                    if name:
                        item.set("name", name)
        return query


MODULE = Disco
