"""xmppd: an XMPP server whose nodes keep no durable state."""

__version__ = "0.1.0"
