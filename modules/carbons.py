"""Message Carbons (XEP-0280): every resource of a user sees the whole conversation.

A session opts in with <enable/> (a flag in the session's own state: it
ends with the session; shared, so that in a cluster the node routing a
message copies it to opted-in resources on other nodes too). Two handlers
do the work, each once per message:

* the "stanza/out" filter sees what a client sends: eligible messages are
  copied, wrapped in <sent/>, to the user's other opted-in resources;
* "message/delivered" comes after the router delivered a message to a
  local account, with the resources the delivery rules chose: eligible
  messages are copied, wrapped in <received/>, to the user's other
  opted-in resources that did not get the original themselves. Before
  that, a handler on "message/bare" and "message/full" strips <private/>.

Eligibility follows XEP-0280 section 6: chat messages, normal messages with
a body or with IM payloads (chat states, receipts, markers, invitations,
call signalling), and errors answering a message that was eligible; never
groupchat or headline messages, MUC private messages, carbons themselves,
or messages marked <private/> (XEP-0280 section 9, stripped before the
recipient sees it) or <no-copy/> (XEP-0334). Offline messages replayed at
login are not copied: they are storage being emptied, not new traffic.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

from lxml import etree

from xmppd.events import HIGHEST
from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import IqRequest, Module, Routed
from xmppd.session import ClientSession
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"
HINTS = "urn:xmpp:hints"
MUC_USER = "http://jabber.org/protocol/muc#user"

ENABLE, DISABLE = f"{{{CARBONS}}}enable", f"{{{CARBONS}}}disable"
PRIVATE = f"{{{CARBONS}}}private"
BODY = f"{{{ns.CLIENT}}}body"
# A message carrying one of these is never copied.
EXCLUDING = frozenset(
    {
        PRIVATE,
        f"{{{HINTS}}}no-copy",
        f"{{{CARBONS}}}sent",
        f"{{{CARBONS}}}received",
        f"{{{MUC_USER}}}x",
    }
)
# Payloads that make a bodyless normal message part of the conversation.
IM_PAYLOADS = frozenset(
    {
        "http://jabber.org/protocol/chatstates",
        "urn:xmpp:receipts",
        "urn:xmpp:chat-markers:0",
        "jabber:x:conference",
        "urn:xmpp:jingle-message:0",
        "urn:xmpp:jingle-message:1",
    }
)
RECENT_IDS = 4096  # remembered eligible message ids, to recognise errors answering them

Key = tuple[str, str, str, str]  # direction, owner bare, peer bare, message id


class RecentIds:
    """A bounded set of recently copied messages: an error answering one of them is copied too."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._keys: OrderedDict[Key, None] = OrderedDict()

    def add(self, key: Key) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self.size:
            self._keys.popitem(last=False)

    def __contains__(self, key: Key) -> bool:
        return key in self._keys


def _bare(jid: str | None) -> str | None:
    try:
        return JID(jid).bare if jid else None
    except InvalidJID:
        return None


def wrap(kind: str, stanza: etree._Element, owner: str, to: str) -> etree._Element:
    """<message from=owner to=to><{kind}><forwarded>stanza</forwarded></{kind}></message>."""
    message = etree.Element(ns.C_MESSAGE, nsmap={None: ns.CLIENT})
    message.set("from", owner)
    message.set("to", to)
    if (type_ := stanza.get("type")) is not None:
        message.set("type", type_)
    carbon = etree.SubElement(message, f"{{{CARBONS}}}{kind}", nsmap={None: CARBONS})
    forwarded = etree.SubElement(carbon, f"{{{FORWARD}}}forwarded", nsmap={None: FORWARD})
    forwarded.append(copy.deepcopy(stanza))
    return message


class Carbons(Module):
    name = "carbons"

    def setup(self) -> None:
        # bare JID -> how many of its sessions opted in: the message path asks this
        # first, so users without carbons cost one dict lookup.
        self.opted_in: dict[str, int] = {}
        self.recent = RecentIds(RECENT_IDS)
        self.host.add_feature(CARBONS)
        self.host.iq(CARBONS, "set", self.toggle, to="both")
        # Lowest priority: a stanza another filter drops (blocking) is never copied.
        self.host.filter("stanza/out", self.on_out, priority=-100, kinds=("message",))
        self.host.on("message/bare", self.strip_private, priority=HIGHEST)
        self.host.on("message/full", self.strip_private, priority=HIGHEST)
        self.host.on("message/delivered", self.on_delivered)
        self.host.hook("session/closed", self.on_closed)
        # A message is copied on the node that routes it, to resources on any node.
        self.host.share_state(self.name)

    # --- enable / disable --------------------------------------------------------------

    async def toggle(self, request: IqRequest) -> None:
        if request.payload.tag not in (ENABLE, DISABLE) or len(request.payload):
            raise StanzaError("bad-request", "expected an empty <enable/> or <disable/>")
        if "@" in request.target and not request.from_owner:
            raise StanzaError("forbidden", "carbons are set for your own account")
        sender = request.sender
        session = self.host.session(sender.bare, sender.resource)
        if session is None:
            raise StanzaError("not-allowed", "carbons are for clients of this server")
        self._set(session, request.payload.tag == ENABLE)

    async def on_closed(self, session: ClientSession) -> bool:
        self._set(session, False)
        return False

    def _set(self, session: ClientSession, enabled: bool) -> None:
        if bool(session.state.get(self.name)) == enabled:
            return
        self.host.set_state(session, self.name, True if enabled else None)
        count = self.opted_in.get(session.bare, 0) + (1 if enabled else -1)
        if count > 0:
            self.opted_in[session.bare] = count
        else:
            self.opted_in.pop(session.bare, None)

    def _interested(self, owner: str) -> list[ClientSession]:
        """The sessions of `owner` that want copies. The message path asks first, in
        its own frame, whether any can (`owner in opted_in`, or clustered): most
        users have none, and then cost one dict lookup."""
        return [s for s in self.host.available_sessions(owner) if s.state.get(self.name)]

    # --- eligibility -------------------------------------------------------------------

    def _eligible(self, stanza: etree._Element, answered: Key) -> bool:
        """XEP-0280 section 6; `answered` is what an error would be answering."""
        type_ = stanza.get("type") or "normal"
        if type_ in ("groupchat", "headline"):
            return False
        if any(child.tag in EXCLUDING for child in stanza):
            return False
        if type_ == "error":
            return answered in self.recent
        if type_ == "chat":
            return True
        for child in stanza:
            if child.tag == BODY:
                return True
            if isinstance(child.tag, str) and etree.QName(child).namespace in IM_PAYLOADS:
                return True
        return False

    # --- sent carbons ------------------------------------------------------------------

    def on_out(self, stanza: etree._Element, origin: ClientSession) -> bool:
        owner = origin.bare
        # `opted_in` counts this node's sessions; in a cluster another node's may have.
        if (owner not in self.opted_in and not self.host.clustered) or (
            stanza.tag != ns.C_MESSAGE
        ):
            return True
        others = [s for s in self._interested(owner) if s is not origin]
        if not others:
            return True
        to = stanza.get("to")
        peer = _bare(to) if to is not None else owner
        if peer is None or peer == owner:
            return True  # malformed (the router says so), or to oneself: received carbons
        msg_id = stanza.get("id") or ""
        if not self._eligible(stanza, ("received", owner, peer, msg_id)):
            return True
        if msg_id and stanza.get("type") != "error":
            self.recent.add(("sent", owner, peer, msg_id))
        for session in others:
            self.host.ledger.copies += 1
            self.host.deliver(session, wrap("sent", stanza, owner, session.jid))
        return True

    # --- received carbons --------------------------------------------------------------

    def strip_private(self, routed: Routed) -> bool:
        """Remove <private/> before any resource sees the message; no copies then."""
        stanza = routed.stanza
        for child in stanza:
            if child.tag == PRIVATE:
                stanza.remove(child)
                routed.private = True
                break
        return False

    def on_delivered(self, routed: Routed) -> None:
        if routed.private:
            return
        owner = routed.to.bare
        if owner not in self.opted_in and not self.host.clustered:
            return
        interested = self._interested(owner)
        if not interested:
            return
        stanza = routed.stanza
        sender = stanza.get("from")
        peer = _bare(sender) or ""
        msg_id = stanza.get("id") or ""
        if not self._eligible(stanza, ("sent", owner, peer, msg_id)):
            return
        if msg_id and stanza.get("type") != "error":
            self.recent.add(("received", owner, peer, msg_id))
        for other in interested:
            if other not in routed.recipients and other.jid != sender:
                self.host.ledger.copies += 1
                self.host.deliver(other, wrap("received", stanza, owner, other.jid))


MODULE = Carbons
