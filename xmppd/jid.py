"""JID parsing (RFC 7622) on top of slixmpp's JID, which caches preparation."""

from __future__ import annotations

from slixmpp import JID
from slixmpp.jid import InvalidJID

from xmppd.stream.errors import StanzaError

__all__ = ["JID", "InvalidJID", "parse_jid"]


def parse_jid(value: str) -> JID:
    """Parse an address from a stanza; a bad one is the sender's jid-malformed error."""
    try:
        jid = JID(value)
    except InvalidJID as exc:
        raise StanzaError("jid-malformed", str(exc)) from None
    if not jid.domain:
        raise StanzaError("jid-malformed", "empty address")
    return jid
