"""One pubsub notification to thousands of recipients: in batches, one forward per node.

A node with 10,000 subscribers means 10,000 messages for one publish. Two
costs are bounded here:

* the event loop: copies of the notification are made and routed
  `FAN_OUT_BATCH` at a time, the loop let run between batches, so other
  streams are served meanwhile;
* the cluster: the recipients whose sessions are bound on another node are
  grouped by that node (`ModuleHost.node_of`), and each node gets one
  forward (`ModuleHost.forward_to_node`) carrying the notification once and
  its recipients (up to `FORWARD_RECIPIENTS` a forward), instead of one
  forward per recipient. The receiving node expands it (`expand`) and
  routes each copy there.

The forward is a message from a service address to itself (the pubsub
service's domain, or PEP's virtual host) holding `<fanout xmlns=FANOUT>`
with the notification without its 'to' and one `<to jid=.../>` a
recipient. No client can send one: a client's 'from' is its own JID,
stamped by its stream, and a federated server's is its own domain; the
module that receives it checks that it came from no session and from the
address it is sent to (`is_fanout`).
"""

from __future__ import annotations

import asyncio
import copy
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lxml import etree

from xmppd.modulehost import ModuleHost, Routed
from xmppd.session import ClientSession

FANOUT = "urn:xmppd:pubsub:fanout"
FAN_OUT_BATCH = 256
"""Notifications routed between two turns of the event loop."""
FORWARD_RECIPIENTS = 2000
"""Recipients one forward to another node names at most (about 80 KB of JIDs)."""
_FANOUT = f"{{{FANOUT}}}fanout"
_TO = f"{{{FANOUT}}}to"


@dataclass(frozen=True, slots=True)
class Recipient:
    """Who gets a notification: `jid` (full, or bare for an explicit subscription
    of a bare JID); `session` when the caller holds it already (PEP's contacts'
    resources); `include_body` a subscription's pubsub#include_body (6.3)."""

    jid: str
    session: ClientSession | None = None
    include_body: bool = False


Make = Callable[[bool], etree._Element]
"""include_body -> the notification without a 'to' (built once per kind)."""


class FanOut:
    """Sends notifications for one module, from `address` (see the module docstring)."""

    def __init__(self, host: ModuleHost) -> None:
        self.host = host
        self.forwards = 0  # forwards sent to other nodes (the tests and bench count them)

    async def send(self, address: str, make: Make, recipients: Sequence[Recipient]) -> None:
        """Send the notification `make` builds to each of `recipients`: those bound on
        other nodes in one forward per node, the rest routed here, in batches."""
        templates: dict[bool, etree._Element] = {}
        here: list[tuple[bool, str]] = []
        away: dict[tuple[str, bool], list[str]] = {}
        for count, recipient in enumerate(recipients, 1):
            body = recipient.include_body
            if body not in templates:
                templates[body] = make(body)
            node = self._node_of(recipient)
            if node is None:
                here.append((body, recipient.jid))
            else:
                away.setdefault((node, body), []).append(recipient.jid)
            if count % FAN_OUT_BATCH == 0:
                await asyncio.sleep(0)
        for (node, body), jids in away.items():
            for start in range(0, len(jids), FORWARD_RECIPIENTS):
                chunk = jids[start:start + FORWARD_RECIPIENTS]
                if self.host.forward_to_node(node, _envelope(address, templates[body], chunk)):
                    self.forwards += 1
                else:  # no way there now: routed from here, one forward each if need be
                    here.extend((body, jid) for jid in chunk)
        await self._route(templates, here)

    def _node_of(self, recipient: Recipient) -> str | None:
        """The node to route `recipient`'s copy on; None: this one. A bare JID goes
        where the account has an available resource, this node first (the router
        there applies the bare-JID rules, reaching its resources elsewhere)."""
        if recipient.session is not None:
            return self.host.node_of(recipient.session)
        bare, _, resource = recipient.jid.partition("/")
        if resource:
            session = self.host.session(bare, resource)
            return None if session is None else self.host.node_of(session)
        nodes = [self.host.node_of(s) for s in self.host.available_sessions(bare)]
        return None if not nodes or None in nodes else nodes[0]

    async def _route(
        self, templates: dict[bool, etree._Element], recipients: list[tuple[bool, str]]
    ) -> None:
        for count, (body, jid) in enumerate(recipients, 1):
            message = copy.deepcopy(templates[body])
            message.set("to", jid)
            self.host.ledger.from_service += 1  # a notification the server makes (ledger)
            self.host.route(message, bounce=False)
            if count % FAN_OUT_BATCH == 0:
                await asyncio.sleep(0)

    @staticmethod
    def is_fanout(routed: Routed) -> bool:
        """A forward of another node's `send` (not a client's stanza: see the module
        docstring)."""
        stanza = routed.stanza
        return (
            routed.origin is None
            and stanza.tag == "{jabber:client}message"
            and stanza.get("from") == routed.to.domain
            and not routed.to.user
            and stanza.find(_FANOUT) is not None
        )

    async def expand(self, stanza: etree._Element) -> None:
        """Route here the copies a forward from another node carries."""
        fanout = stanza.find(_FANOUT)
        if fanout is None:
            return
        template = next((c for c in fanout if c.tag == "{jabber:client}message"), None)
        if template is None:
            return
        jids = [to.get("jid") or "" for to in fanout.iter(_TO)]
        await self._route({False: template}, [(False, jid) for jid in jids if jid])


def _envelope(address: str, template: etree._Element, jids: list[str]) -> etree._Element:
    message = etree.Element("{jabber:client}message", nsmap={None: "jabber:client"})
    message.set("from", address)
    message.set("to", address)
    message.set("type", "headline")
    message.set("id", secrets.token_hex(8))
    fanout = etree.SubElement(message, _FANOUT, nsmap={None: FANOUT})
    fanout.append(copy.deepcopy(template))
    for jid in jids:
        etree.SubElement(fanout, _TO, jid=jid)
    return message
