"""Message Carbons (XEP-0280): every resource of a user sees the whole conversation.

A session opts in with <enable/> (state kept in memory, per session: it
ends with the session). Two filters do the work:

* "stanza/out" sees what a client sends: eligible messages are copied,
  wrapped in <sent/>, to the user's other opted-in resources;
* "stanza/in" sees every delivery to a local session: eligible messages are
  copied, wrapped in <received/>, to the user's other opted-in resources
  that do not get the original themselves. A message to the bare JID is
  delivered once per top-priority resource; the filter runs for each of
  those deliveries but sends the copies only on the first.

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

from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import IqRequest, Module
from xmppd.session import ClientSession
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"
HINTS = "urn:xmpp:hints"
DELAY = "urn:xmpp:delay"
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
        self.enabled: dict[str, set[ClientSession]] = {}  # bare JID -> sessions that opted in
        self.recent = RecentIds(RECENT_IDS)
        # The last message copied on delivery, and to whom: the same element
        # delivered again (bare JID, several top resources) is not copied twice.
        self._seen: etree._Element | None = None
        self._seen_owner = ""
        self.host.add_feature(CARBONS)
        self.host.iq(CARBONS, "set", self.toggle, to="both")
        # Lowest priority: a stanza another filter drops (blocking) is never copied.
        self.host.filter("stanza/out", self.on_out, priority=-100)
        self.host.filter("stanza/in", self.on_in, priority=-100)
        self.host.hook("session/closed", self.on_closed)

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
        if request.payload.tag == ENABLE:
            self.enabled.setdefault(session.bare, set()).add(session)
        else:
            self._forget(session)

    async def on_closed(self, session: ClientSession) -> bool:
        self._forget(session)
        return False

    def _forget(self, session: ClientSession) -> None:
        sessions = self.enabled.get(session.bare)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self.enabled[session.bare]

    def _interested(self, owner: str) -> list[ClientSession]:
        enabled = self.enabled.get(owner)
        if not enabled:
            return []
        return [s for s in self.host.available_sessions(owner) if s in enabled]

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
        if stanza.tag != ns.C_MESSAGE:
            return True
        owner = origin.bare
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

    def on_in(self, stanza: etree._Element, session: ClientSession) -> bool:
        if stanza.tag != ns.C_MESSAGE:
            return True
        private = _strip_private(stanza)
        owner = session.bare
        if stanza is self._seen and owner == self._seen_owner:
            return True
        if private:
            # Mark it: once stripped, a second delivery could not tell it was private.
            self._seen, self._seen_owner = stanza, owner
            return True
        interested = self._interested(owner)
        if not interested or _replayed(stanza, session.host):
            return True
        sender = stanza.get("from")
        peer = _bare(sender) or ""
        msg_id = stanza.get("id") or ""
        if not self._eligible(stanza, ("sent", owner, peer, msg_id)):
            return True
        if msg_id and stanza.get("type") != "error":
            self.recent.add(("received", owner, peer, msg_id))
        has_original = self._recipients(stanza, session)
        for other in interested:
            if other not in has_original and other.jid != sender:
                self.host.ledger.copies += 1
                self.host.deliver(other, wrap("received", stanza, owner, other.jid))
        # Set after delivering: the copies pass through this filter too.
        self._seen, self._seen_owner = stanza, owner
        return True

    def _recipients(self, stanza: etree._Element, session: ClientSession) -> set[ClientSession]:
        """The sessions the router gives this message to (RFC 6121 8.5.2)."""
        to = stanza.get("to") or ""
        if "/" in to and to.split("/", 1)[1] == session.resource:
            return {session}
        # To the bare JID, or to a resource that is gone: highest non-negative priority.
        eligible = [s for s in self.host.available_sessions(session.bare) if s.priority >= 0]
        if session not in eligible:
            return {session}
        top = max(s.priority for s in eligible)
        return {s for s in eligible if s.priority == top}


def _strip_private(stanza: etree._Element) -> bool:
    """Remove <private/> (the recipient must not see it); True if there was one."""
    found = False
    for child in stanza.findall(PRIVATE):
        stanza.remove(child)
        found = True
    return found


def _replayed(stanza: etree._Element, domain: str) -> bool:
    """Delayed by this server: an offline message delivered at login."""
    return any(d.get("from") == domain for d in stanza.findall(f"{{{DELAY}}}delay"))


MODULE = Carbons
