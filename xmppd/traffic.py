"""Stanzas in and out by kind, connections, and the outcome of every login attempt.

What an operator graphs first: how much traffic, of which kind, and whether
logins fail (and why). Plain integers in dicts bumped on the stanza path, for
the reason given in xmppd.ledger; xmppd.metrics reads them at scrape time.
"""

from __future__ import annotations

from collections import Counter

from xmppd.xml import ns

KINDS: dict[object, str] = {ns.C_MESSAGE: "message", ns.C_PRESENCE: "presence", ns.C_IQ: "iq"}
"""The three stanza kinds of RFC 6120 8, by qualified tag; anything else counts as "other"."""


class Traffic:
    """The counts of one node since it started (`Server.traffic`)."""

    __slots__ = ("stanzas_in", "stanzas_out", "connections", "logins", "login_failures")

    def __init__(self) -> None:
        # Stanzas from bound clients, and stanzas written to their streams.
        self.stanzas_in = dict.fromkeys((*KINDS.values(), "other"), 0)
        self.stanzas_out = dict.fromkeys((*KINDS.values(), "other"), 0)
        self.connections = 0  # client connections accepted (the gauge is Server.connections)
        self.logins = 0  # SASL successes
        self.login_failures: Counter[str] = Counter()  # by the SASL failure condition sent

    def received(self, tag: object) -> None:
        self.stanzas_in[KINDS.get(tag, "other")] += 1

    def sent(self, tag: object) -> None:
        self.stanzas_out[KINDS.get(tag, "other")] += 1

    def sasl_outcome(self, condition: str | None) -> None:
        """None for a success, else the RFC 6120 6.5 condition the client was sent."""
        if condition is None:
            self.logins += 1
        else:
            self.login_failures[condition] += 1
