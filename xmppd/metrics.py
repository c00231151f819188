"""The node's counts in Prometheus' text format, served by the admin API at /metrics.

The hot path keeps plain integers (xmppd.ledger, AuthStats); this collector
reads them only when scraped, so a scrape costs the server nothing between
scrapes and a message costs no lock. prometheus_client writes the format.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from xmppd.pauses import BUCKETS, PauseStats

if TYPE_CHECKING:
    from xmppd.server import Server

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MESSAGE_COUNTS = {
    # ledger attribute: (metric name, help)
    "received": ("xmppd_messages_received", "Messages received from local clients."),
    "delivered": ("xmppd_messages_delivered", "Messages handed to a client session."),
    "written": ("xmppd_messages_written", "Delivered messages written to a transport."),
    "copies": ("xmppd_messages_carbon_copies", "Carbon copies among the delivered."),
    "offline": ("xmppd_messages_offline_stored", "Messages stored for offline users."),
    "replayed": ("xmppd_messages_offline_replayed", "Stored messages delivered at login."),
    "bounced": ("xmppd_messages_bounced", "Messages answered with an error instead."),
}


class ServerCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        ledger = server.router.ledger
        for attr, (name, text) in MESSAGE_COUNTS.items():
            yield CounterMetricFamily(name, text, value=getattr(ledger, attr))
        dropped = CounterMetricFamily(
            "xmppd_messages_dropped",
            "Messages that reached nobody, by reason (see xmppd.ledger.RULES).",
            labels=["reason"],
        )
        for reason, count in sorted(ledger.dropped.items()):
            dropped.add_metric([reason], count)
        yield dropped
        stats = server.throttle.stats
        yield CounterMetricFamily(
            "xmppd_auth_failures", "Logins refused for wrong credentials.", value=stats.failures
        )
        yield CounterMetricFamily(
            "xmppd_auth_bans", "Client addresses banned for failed logins.", value=stats.bans
        )
        yield CounterMetricFamily(
            "xmppd_auth_refusals", "Logins refused because the address was banned.",
            value=stats.refusals,
        )
        pauses = server.pauses
        yield _histogram(
            "xmppd_event_loop_lag_seconds", "How late a 100 ms loop timer fired.", pauses.loop_lag
        )
        yield _histogram("xmppd_gc_pause_seconds", "Collections, any generation.", pauses.gc)
        yield GaugeMetricFamily(
            "xmppd_connections", "Open client connections.", value=len(server.connections)
        )
        yield GaugeMetricFamily(
            "xmppd_sessions",
            "Bound client sessions on this node.",
            value=server.router.directory.count(),
        )
        for module in server.modules.modules.values():
            yield from module.metrics()


def _histogram(name: str, text: str, stats: PauseStats) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, BUCKETS), "+Inf"), stats.buckets, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=stats.total)


def exposition(server: Server) -> bytes:
    """The current metrics of `server`, in the text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    return generate_latest(registry)
