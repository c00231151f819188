"""The node's counts in Prometheus' text format, served by the admin API at /metrics.

The hot path keeps plain integers (xmppd.ledger, AuthStats); this collector
reads them only when scraped, so a scrape costs the server nothing between
scrapes and a message costs no lock. prometheus_client writes the format.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from xmppd import package_version
from xmppd.pauses import PauseStats
from xmppd.storage.timing import BOUNDS as TIMING_BOUNDS
from xmppd.storage.timing import OpStats, StorageStats
from xmppd.traffic import Traffic

if TYPE_CHECKING:
    from xmppd.cluster import Cluster
    from xmppd.cluster.stats import ClusterStats
    from xmppd.components.service import ComponentService
    from xmppd.s2s.service import S2SService
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
    "rerouted": (
        "xmppd_messages_rerouted",
        "Delivered messages a stream-managed session never acknowledged, routed again.",
    ),
    "from_remote": ("xmppd_messages_from_remote", "Messages received from remote servers."),
    "to_remote": ("xmppd_messages_to_remote", "Messages handed to a remote server's stream."),
    "to_service": ("xmppd_messages_to_service", "Messages a service of the server took (MUC)."),
    "from_service": (
        "xmppd_messages_from_service",
        "Messages the server made: rooms, notifications, archive results, announcements.",
    ),
}


class ServerCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        yield from _node(server)
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
        yield from _traffic(server.traffic)
        yield GaugeMetricFamily(
            "xmppd_sessions",
            "Bound client sessions on this node.",
            value=server.router.directory.count(),
        )
        yield _histogram(
            "xmppd_routing_seconds",
            "Time to route one stanza (sampled, one in 64; waits on storage excluded).",
            server.router.route_time,
        )
        for module in server.modules.modules.values():
            yield from module.metrics()
        yield from _storage(server.storage_stats)
        if server.cluster is not None:
            yield from _cluster(server.cluster)
        if server.s2s is not None:
            yield from _s2s(server.s2s)
        if server.components is not None:
            yield from _components(server.components)


def _node(server: Server) -> Iterator[Metric]:
    """What runs here: the version (a rolling upgrade shows node by node) and when the
    certificate it serves expires (read again by each reload), for an alert before
    clients refuse it."""
    build = GaugeMetricFamily(
        "xmppd_build_info", "Always 1; the version of xmppd this node runs.", labels=["version"]
    )
    build.add_metric([package_version()], 1)
    yield build
    expiry = GaugeMetricFamily(
        "xmppd_tls_cert_not_after_seconds",
        "When the certificate this node serves expires (Unix time).",
        labels=["cert"],
    )
    expiry.add_metric([str(server.tls.cert_path)], server.tls.not_after)
    yield expiry


def _traffic(traffic: Traffic) -> Iterator[Metric]:
    """Connections accepted, logins and their failures, stanzas by kind (xmppd.traffic)."""
    yield CounterMetricFamily(
        "xmppd_connections_accepted",
        "Client connections accepted (not those refused by the per-address limit).",
        value=traffic.connections,
    )
    yield CounterMetricFamily(
        "xmppd_logins", "Successful logins (SASL success).", value=traffic.logins
    )
    failures = CounterMetricFamily(
        "xmppd_login_failures",
        "Failed login attempts, by the SASL condition sent (RFC 6120 6.5): not-authorized "
        "for wrong credentials, temporary-auth-failure for a banned address or a store "
        "error, aborted, invalid-mechanism, encryption-required, ...",
        labels=["reason"],
    )
    for reason in sorted({"not-authorized", *traffic.login_failures}):
        failures.add_metric([reason], traffic.login_failures[reason])
    yield failures
    stanzas = CounterMetricFamily(
        "xmppd_stanzas",
        "Stanzas from bound clients (in) and written to their streams (out), by kind.",
        labels=["direction", "kind"],
    )
    for direction, counts in (("in", traffic.stanzas_in), ("out", traffic.stanzas_out)):
        for kind, count in counts.items():
            stanzas.add_metric([direction, kind], count)
    yield stanzas


def _storage(stats: StorageStats) -> Iterator[Metric]:
    """Every call of the item store, the blob store and the cache (xmppd.storage.timing)."""
    latency = HistogramMetricFamily(
        "xmppd_storage_seconds",
        "Duration of each call to a part of the storage: items and blobs (the stores, "
        "beneath the cache: misses and writes), cache (every cache call).",
        labels=["part"],
    )
    errors = CounterMetricFamily(
        "xmppd_storage_errors", "Calls that failed, by part of the storage.", labels=["part"]
    )
    for part in ("items", "blobs", "cache"):
        ops: OpStats = getattr(stats, part)
        cumulative, buckets = 0, []
        for bound, count in zip((*map(str, TIMING_BOUNDS), "+Inf"), ops.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        latency.add_metric([part], buckets, sum_value=ops.total)
        errors.add_metric([part], ops.errors)
    yield latency
    yield errors


def _cluster(cluster: Cluster) -> Iterator[Metric]:
    """The node's side of the cluster (xmppd.cluster.stats); only on a cluster node."""
    stats = cluster.stats
    forwards = CounterMetricFamily(
        "xmppd_cluster_forwards",
        "Stanzas passed between nodes: out (queued for another node), in (taken from "
        "this node's inbox), refused (routed on this node instead: Redis unreachable "
        "or too many writes waiting, the node gone, its inbox full, the hop limit).",
        labels=["direction"],
    )
    forwards.add_metric(["out"], stats.forwards_out)
    forwards.add_metric(["in"], stats.forwards_in)
    forwards.add_metric(["refused"], stats.forwards_refused)
    yield forwards
    ends = CounterMetricFamily(
        "xmppd_cluster_session_ends",
        "Requests to end a session on its node (conflict, kick): out and in.",
        labels=["direction"],
    )
    ends.add_metric(["out"], stats.ends_out)
    ends.add_metric(["in"], stats.ends_in)
    yield ends
    yield _histogram(
        "xmppd_cluster_forward_latency_seconds",
        "From a stanza queued on the sending node to its node taking it from the inbox "
        "(sampled, one in 16; assumes the nodes' clocks agree).",
        stats.forward_latency,
    )
    yield from _links(stats)
    yield GaugeMetricFamily(
        "xmppd_cluster_redis_up",
        "1 when every part of the node (writer, inbox, events, heartbeat) reaches Redis.",
        value=int(stats.redis_up),
    )
    yield CounterMetricFamily(
        "xmppd_cluster_redis_reconnects",
        "Times a part of the node got Redis back after losing it.",
        value=stats.reconnects,
    )
    yield CounterMetricFamily(
        "xmppd_cluster_redis_errors",
        "Redis operations that failed (each retry counts).",
        value=stats.redis_errors,
    )
    yield GaugeMetricFamily(
        "xmppd_cluster_write_queue",
        "Writes (table changes, forwarded stanzas) waiting to be sent to Redis.",
        value=cluster.writer.queued,
    )
    yield GaugeMetricFamily(
        "xmppd_cluster_remote_sessions",
        "Sessions of other nodes in this node's replica of the table.",
        value=cluster.directory.remote_count(),
    )


def _links(stats: ClusterStats) -> Iterator[Metric]:
    """The direct links between nodes (xmppd.cluster.link)."""
    frames = CounterMetricFamily(
        "xmppd_cluster_link_frames",
        "Frames sent to (out) and handled from (in) other nodes over direct links.",
        labels=["direction"],
    )
    frames.add_metric(["out"], stats.link_frames_out)
    frames.add_metric(["in"], stats.link_frames_in)
    yield frames
    items = CounterMetricFamily(
        "xmppd_cluster_link_stanzas",
        "Stanzas and session ends sent to (out) and handled from (in) other nodes over "
        "direct links.",
        labels=["direction"],
    )
    items.add_metric(["out"], stats.link_stanzas_out)
    items.add_metric(["in"], stats.link_stanzas_in)
    yield items
    events = CounterMetricFamily(
        "xmppd_cluster_link_events",
        "On the direct links: acks and refusals (nack) received; stanzas sent through "
        "Redis instead (fallback: no link in time, Redis unhealthy, too much unacked); "
        "stanzas routed again here (reroute: the peer died or refused); links dialed "
        "again after one broke (reconnect); connections refused at the handshake "
        "(auth_failure).",
        labels=["event"],
    )
    for event, value in (
        ("ack", stats.link_acks),
        ("nack", stats.link_nacks),
        ("fallback", stats.link_fallbacks),
        ("reroute", stats.link_reroutes),
        ("reconnect", stats.link_reconnects),
        ("auth_failure", stats.link_auth_failures),
    ):
        events.add_metric([event], value)
    yield events


def _s2s(service: S2SService) -> Iterator[Metric]:
    """Federation (xmppd.s2s); only with an s2s section."""
    connections = GaugeMetricFamily(
        "xmppd_s2s_connections",
        "Server-to-server streams open now, by direction and how the peer (in) or this "
        "server (out) authenticated: EXTERNAL, dialback, or none yet.",
        labels=["direction", "mechanism"],
    )
    counts = Counter(
        ("out" if c.outgoing else "in", c.stream.mechanism or "none") for c in service.connections
    )
    for (direction, mechanism), count in sorted(counts.items()):
        connections.add_metric([direction, mechanism], count)
    yield connections
    failures = CounterMetricFamily(
        "xmppd_s2s_link_failures",
        "Outgoing streams that could not be set up, by the condition their stanzas bounced "
        "with (remote-server-not-found, remote-server-timeout); policy-violation: streams cut "
        "because the peer stopped reading.",
        labels=["condition"],
    )
    for condition, count in sorted(service.failures.items()):
        failures.add_metric([condition], count)
    yield failures


def _components(service: ComponentService) -> Iterator[Metric]:
    """External components (xmppd.components); only with a components section."""
    connected = GaugeMetricFamily(
        "xmppd_component_connected",
        "1 for each configured component domain connected to this node, else 0.",
        labels=["domain"],
    )
    for domain in sorted(service.config.domains):
        connected.add_metric([domain], 1 if domain in service.serving else 0)
    yield connected
    yield GaugeMetricFamily(
        "xmppd_component_connections",
        "Component connections open now on this node, authenticated or not yet.",
        value=len(service.connections),
    )
    refusals = CounterMetricFamily(
        "xmppd_component_refusals",
        "Component streams this node ended with a stream error, by condition "
        "(not-authorized: a wrong secret; host-unknown; conflict; connection-timeout; ...).",
        labels=["condition"],
    )
    for condition, count in sorted(service.refusals.items()):
        refusals.add_metric([condition], count)
    yield refusals


def _histogram(name: str, text: str, stats: PauseStats) -> HistogramMetricFamily:
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, stats.bounds), "+Inf"), stats.buckets, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return HistogramMetricFamily(name, text, buckets=buckets, sum_value=stats.total)


def exposition(server: Server) -> bytes:
    """The current metrics of `server`, in the text format, with the process' own
    (process_*: memory, open files and their limit, CPU, start time; python_info)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return generate_latest(registry)
