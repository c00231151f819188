"""Which stanzas a peer may send, and the `<bad-request/>` for those it may not
(RFC 6120 8.2.3, RFC 6121 4.7.1 and 5.2.2).

Every stream that reads stanzas (client, server, component) asks this before
it routes one. Without it a malformed stanza went one of two wrong ways: an
IQ of an unknown type to the server or to an account was dropped without an
answer (the modules answer only get and set), and one to a full JID reached
the other user as it came, who cannot answer an IQ without an id or one with
two payloads either. Refusing it where it enters gives the sender an error
it can act on, and nothing malformed gets further.

The check is split for the client stream's sake, where it runs once per chat
message: `ROUTABLE_TYPES` is the fast test (a dict and a set look-up), and
only a stanza that fails it, or any IQ, gets the full look of `refusal`.
"""

from __future__ import annotations

from lxml import etree

from xmppd.stream.errors import error_reply
from xmppd.xml import ns

MESSAGE_TYPES: frozenset[str | None] = frozenset(
    {None, "chat", "error", "groupchat", "headline", "normal"}
)
PRESENCE_TYPES: frozenset[str | None] = frozenset(
    {
        None,  # available
        "error",
        "probe",
        "subscribe",
        "subscribed",
        "unavailable",
        "unsubscribe",
        "unsubscribed",
    }
)
IQ_TYPES = frozenset({"get", "set", "result", "error"})
_REQUESTS = frozenset({"get", "set"})
_UNANSWERED = frozenset({"result", "error"})

ROUTABLE_TYPES: dict[object, frozenset[str | None]] = {
    ns.C_MESSAGE: MESSAGE_TYPES,
    ns.C_PRESENCE: PRESENCE_TYPES,
    ns.C_IQ: frozenset(),  # an IQ has an id and payload rules too: always `refusal`
}
"""By 'jabber:client' tag: the 'type' values (None: absent) with which a stanza of
that kind is routed without a closer look. A stanza whose type is not in its set
goes to `refusal`."""


def refusal(stanza: etree._Element, tag: object) -> str | None:
    """Why `stanza` (a 'jabber:client' stanza with the qualified `tag`) is malformed,
    as the text of its `<bad-request/>`; None when it may be routed.

    A message of a type this server does not know is routed, as type 'normal'
    (set here), not refused. RFC 6121 5.2.2 tells an application that receives
    one to treat it as 'normal'; ejabberd's parser turns it into 'normal' and
    Prosody routes it unchanged. Refusing it would lose a message some newer
    client meant; passing it unchanged would let the hops after this one
    disagree on what it is (the router stores only 'normal' and 'chat' messages
    offline, and would drop it as if it were a headline). Presence has no such
    rule: RFC 6121 4.7.1 lists its types, and a presence of another type has no
    meaning to route or broadcast.

    The restricted parser refuses comments and processing instructions, so an
    IQ's children are all elements and `len` counts its payloads.
    """
    type_ = stanza.get("type")
    if tag == ns.C_MESSAGE:
        if type_ not in MESSAGE_TYPES:
            stanza.set("type", "normal")
        return None
    if tag == ns.C_PRESENCE:
        if type_ in PRESENCE_TYPES:
            return None
        return "a presence type must be absent or one of RFC 6121 4.7.1"
    if type_ not in IQ_TYPES:
        return "an IQ's type must be get, set, result or error (RFC 6120 8.2.3)"
    if stanza.get("id") is None:
        return "an IQ needs an id (RFC 6120 8.2.3)"
    if type_ in _REQUESTS and len(stanza) != 1:
        return "an IQ get or set needs exactly one child element (RFC 6120 8.2.3)"
    return None


def bad_request(stanza: etree._Element, text: str) -> etree._Element | None:
    """The `<bad-request/>` answer to a stanza `refusal` refused, or None when it must
    not be answered: an error (RFC 6120 8.3.1: no error for an error, against loops)
    or an IQ result (8.2.3: a response is never answered). Such a stanza is
    dropped, as ejabberd drops one it cannot parse: nothing waits for a
    response without an id, or of no known type, to arrive."""
    if stanza.get("type") in _UNANSWERED:
        return None
    return error_reply(stanza, "bad-request", text)
