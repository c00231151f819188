"""Where every message went: the server's own account of its message traffic.

A load test or a benchmark that sees fewer messages arrive than it sent
cannot tell by itself whether the server lost them, stored them offline,
bounced them, or whether the load generator miscounted. These counts let it
reconcile. Once the server is idle, for the messages clients sent:

    received + from_remote + from_service
        == delivered - copies - replayed - rerouted
           + offline + bounced + to_remote + to_service + sum(dropped)

`delivered` counts messages handed to a client session, one per session
(a message to a bare JID with two top-priority resources counts two, the one
exception to the equation), and `written` those of them that reached the
session's transport. Besides the messages clients sent, sessions are handed
carbon copies (`copies`) and offline messages at login (`replayed`). A
delivered message that a stream-managed session (XEP-0198) never acknowledged
is routed again when that session ends (`rerouted`): it then meets a second
fate (another resource, offline storage), so its first delivery is taken
back out of the sum. So is one delivered to a session whose connection
dropped before it was written (C2SConnection._lost_queued).

Federation (xmppd/s2s): `from_remote` counts the messages that arrived on an
authenticated server-to-server stream (they then meet the same fates as a
client's), `to_remote` those written to the stream of a remote domain (its
server answers for them from there, as a client does for a delivered one).
External components (XEP-0114) count the same way: messages from one are
`from_remote`, messages written to one are `to_remote`.
A message waiting for a remote domain's stream to be set up is in neither
yet; if the stream cannot be set up, or the node stops first, it bounces. So
is one a stream took and lost with its connection before writing it: it waits
for a new stream again (once: lost so a second time, it bounces).

The server's own services count as a component does: `to_service` counts
the messages a multi-user chat room took (its fate, as written to a
component is), `from_service` those the server made: a room's messages to
its occupants (each message fanned out, subjects, private messages relayed
under a nick), PubSub and PEP notifications, archive query results
(XEP-0313) and announcements. A message a room refuses is `bounced`.

Error messages (bounces, and clients' own error replies) are outside the
ledger: an error is never answered, and a bounce is counted once, as the fate
of the message it answers. A message privacy lists or blocking refuse is
`bounced` when its sender is answered (the sender's own rules, or the
recipient's for a message that no other resource took), and a carbon copy the
rules keep from a resource is dropped as "refused" (XEP-0016 and XEP-0191
answer nothing for it). Not counted yet: a groupchat or headline message that
every chosen resource's rules refuse silently.

A message leaves the ledger without reaching anyone only under a `dropped`
reason. Those in RULES are the protocol's own (a chat state nobody stores);
any other is a loss to find and fix.

Plain integer attributes, not prometheus_client counters, because they are
bumped on the message path: an attribute increment costs a few tens of
nanoseconds, a locked counter ten times that. The metrics endpoint reads
them at scrape time.
"""

from __future__ import annotations

from collections import Counter

RULES = frozenset(
    # nobody online, and offline storage declines it (XEP-0160, XEP-0085); or a headline
    # to a resource that is not there (RFC 6121 8.5.3.2.1: ignored)
    {"not-stored"}
    # a carbon copy that privacy lists or blocking keep from one resource: the protocol
    # answers nothing for it (the original's sender got its answer)
    | {"refused"}
)
"""Drop reasons the protocol mandates; anything else in `dropped` is a loss."""


class MessageLedger:
    __slots__ = (
        "received",
        "delivered",
        "written",
        "copies",
        "offline",
        "replayed",
        "bounced",
        "rerouted",
        "from_remote",
        "to_remote",
        "to_service",
        "from_service",
        "dropped",
    )

    def __init__(self) -> None:
        self.received = 0  # message stanzas received from local clients
        self.delivered = 0  # handed to a local client session, one per session
        self.written = 0  # delivered ones serialized into the session's transport
        self.copies = 0  # carbon copies among the delivered (XEP-0280)
        self.offline = 0  # stored for an offline recipient
        self.replayed = 0  # stored ones handed to the recipient's session later
        self.bounced = 0  # answered with an error stanza instead
        self.rerouted = 0  # delivered ones a session never acknowledged, routed again (SM)
        self.from_remote = 0  # received from a remote domain's server (s2s)
        self.to_remote = 0  # written to the stream of a remote domain's server (s2s)
        self.to_service = 0  # taken by one of the server's services (a MUC room)
        self.from_service = 0  # made by the server: rooms, notifications, archive results
        self.dropped: Counter[str] = Counter()  # reason -> count

    def drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] += count

    def snapshot(self) -> dict[str, object]:
        """The counts as one JSON-able dict (the admin API and tests read this)."""
        return {
            "received": self.received,
            "delivered": self.delivered,
            "written": self.written,
            "copies": self.copies,
            "offline": self.offline,
            "replayed": self.replayed,
            "bounced": self.bounced,
            "rerouted": self.rerouted,
            "from_remote": self.from_remote,
            "to_remote": self.to_remote,
            "to_service": self.to_service,
            "from_service": self.from_service,
            "dropped": dict(self.dropped),
            "lost": sum(n for reason, n in self.dropped.items() if reason not in RULES),
        }
