"""Server-to-server federation (RFC 6120): streams to and from other XMPP domains."""
