"""XML namespaces of the XMPP core and the extensions the core itself speaks."""

STREAMS = "http://etherx.jabber.org/streams"
CLIENT = "jabber:client"
SERVER = "jabber:server"
TLS = "urn:ietf:params:xml:ns:xmpp-tls"
SASL = "urn:ietf:params:xml:ns:xmpp-sasl"
DIALBACK = "jabber:server:dialback"  # XEP-0220
DIALBACK_FEATURE = "urn:xmpp:features:dialback"
SASL_CB = "urn:xmpp:sasl-cb:0"  # XEP-0440
BIND = "urn:ietf:params:xml:ns:xmpp-bind"
SESSION = "urn:ietf:params:xml:ns:xmpp-session"
STREAM_ERRORS = "urn:ietf:params:xml:ns:xmpp-streams"
STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"
XML = "http://www.w3.org/XML/1998/namespace"

# Clark-notation tags used on hot paths, computed once.
C_MESSAGE = f"{{{CLIENT}}}message"
C_PRESENCE = f"{{{CLIENT}}}presence"
C_IQ = f"{{{CLIENT}}}iq"
C_ERROR = f"{{{CLIENT}}}error"
STANZA_TAGS = frozenset({C_MESSAGE, C_PRESENCE, C_IQ})
XML_LANG = f"{{{XML}}}lang"

SUBSCRIPTION_TYPES = frozenset({"subscribe", "subscribed", "unsubscribe", "unsubscribed"})
"""Presence types that manage a subscription (RFC 6121 section 3), routed to the bare JID."""
