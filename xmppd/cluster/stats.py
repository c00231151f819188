"""What a cluster node counts for /metrics: forwards, Redis health, forward latency.

Plain integers bumped on the message path and read at scrape time
(xmppd.metrics), as the message ledger does: no lock, no label lookup per
stanza. The latency of a forward is sampled (one stanza in
`LATENCY_SAMPLE`): the sender puts its wall-clock time in the inbox entry,
the receiving node subtracts it from its own when it takes the entry, so
the figure covers the writer's queue, Redis and the reader's wait, and
assumes the nodes' clocks agree (NTP) when they are on different machines.
"""

from __future__ import annotations

from xmppd.pauses import PauseStats

LATENCY_SAMPLE = 16
"""One forwarded stanza in this many carries its send time (a power of two)."""

LATENCY_BOUNDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Seconds: the buckets of the forward latency histogram."""


class ClusterStats:
    __slots__ = (
        "forwards_out",
        "forwards_refused",
        "forwards_in",
        "ends_out",
        "ends_in",
        "reconnects",
        "redis_errors",
        "forward_latency",
        "link_frames_out",
        "link_stanzas_out",
        "link_frames_in",
        "link_stanzas_in",
        "link_acks",
        "link_nacks",
        "link_fallbacks",
        "link_reroutes",
        "link_reconnects",
        "link_auth_failures",
        "_down",
    )

    def __init__(self) -> None:
        self.forwards_out = 0  # stanzas queued for another node's inbox
        # Not taken into another node's inbox, routed here instead: too many writes
        # waiting for Redis, cut off from it or waited forward_wait, the node reaped, its
        # inbox full, the hop limit (xmppd.cluster.writer).
        self.forwards_refused = 0
        self.forwards_in = 0  # stanzas taken from this node's inbox
        self.ends_out = 0  # requests to end a session on another node
        self.ends_in = 0
        self.reconnects = 0  # times a part of the node got Redis back after losing it
        self.redis_errors = 0  # failed Redis operations (each retry counts)
        self.forward_latency = PauseStats(LATENCY_BOUNDS)
        # The direct links between nodes (xmppd.cluster.link): frames and the items
        # (stanzas, stream ends) in them, each way; acks and refusals (nacks) received;
        # items sent through Redis instead (no link, not live in time, too much unacked);
        # items routed again here (their peer died or refused them); links made again
        # after one was lost; connections refused at the handshake.
        self.link_frames_out = 0
        self.link_stanzas_out = 0
        self.link_frames_in = 0
        self.link_stanzas_in = 0
        self.link_acks = 0
        self.link_nacks = 0
        self.link_fallbacks = 0
        self.link_reroutes = 0
        self.link_reconnects = 0
        self.link_auth_failures = 0
        self._down: set[str] = set()  # the parts that cannot reach Redis now

    @property
    def redis_up(self) -> bool:
        return not self._down

    def failed(self, part: str) -> None:
        """`part` (writer, inbox, events) could not reach Redis."""
        self.redis_errors += 1
        self._down.add(part)

    def recovered(self, part: str) -> None:
        """`part` reached Redis again (called on every success is fine: cheap when up)."""
        if part in self._down:
            self._down.discard(part)
            self.reconnects += 1
