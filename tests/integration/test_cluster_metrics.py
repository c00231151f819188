"""The cluster's figures on each node's /metrics, scraped as Prometheus does.

Two nodes in this process on a real redis-server (as tests/integration/
test_cluster.py), real clients; the figures are read over the admin API.
"""

from __future__ import annotations

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.dashboard import exported, graphed, not_exported
from tests.integration.test_cluster import (
    online,
    received,
    seen_on,
    two_nodes,
    until,
)
from tests.integration.test_cluster_link import linked
from tests.integration.test_message_load import scrape
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster.stats import LATENCY_SAMPLE
from xmppd.router import ROUTE_SAMPLE
from xmppd.storage.devservices import LocalService

MESSAGES = 2 * ROUTE_SAMPLE
"""Enough that the sampled histograms hold some (every LATENCY_SAMPLE-th forward, every
ROUTE_SAMPLE-th routed stanza)."""


async def test_forwards_latency_and_redis_health_on_metrics(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    a, b = await two_nodes(start_server, redis_service)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    await until(lambda: linked(a, b))
    for n in range(MESSAGES):
        alice.send_message(mto="bob@localhost/phone", mbody=f"m{n}", mtype="chat")
    for n in range(MESSAGES):
        assert await received(bob) == f"m{n}"

    on_a, on_b = await scrape(a), await scrape(b)
    assert on_a["xmppd_cluster_forwards_total{out}"] >= MESSAGES
    assert on_b["xmppd_cluster_forwards_total{in}"] >= MESSAGES
    assert on_a["xmppd_cluster_forwards_total{refused}"] == 0
    assert on_b["xmppd_cluster_forward_latency_seconds_count"] >= MESSAGES // LATENCY_SAMPLE
    assert 0 < on_b["xmppd_cluster_forward_latency_seconds_sum"] < MESSAGES  # seconds
    assert on_a["xmppd_routing_seconds_count"] >= MESSAGES // ROUTE_SAMPLE
    # ... all over the direct link, acknowledged
    assert on_a["xmppd_cluster_link_stanzas_total{out}"] >= MESSAGES
    assert on_b["xmppd_cluster_link_stanzas_total{in}"] >= MESSAGES
    assert on_b["xmppd_cluster_link_frames_total{in}"] >= 1
    await until(lambda: a.cluster is not None and a.cluster.stats.link_acks > 0)
    on_a = await scrape(a)
    assert on_a["xmppd_cluster_link_events_total{ack}"] > 0
    for event in ("nack", "fallback", "reroute", "auth_failure"):
        assert on_a[f"xmppd_cluster_link_events_total{{{event}}}"] == 0
    for node in (on_a, on_b):
        assert node["xmppd_cluster_redis_up"] == 1
        assert node["xmppd_cluster_write_queue"] == 0
        assert node["xmppd_cluster_remote_sessions"] == 1
        assert node["xmppd_cluster_redis_reconnects_total"] == 0
    # Every panel of the Grafana dashboard in docs/ graphs what a cluster node exports.
    assert not_exported(await exported(a), graphed()) == {}

    # Redis goes away: the nodes say so; it comes back: up again, and the reconnects counted
    redis_service.stop()
    alice.send_message(mto="bob@localhost/phone", mbody="while Redis is down", mtype="chat")

    assert a.cluster is not None
    stats = a.cluster.stats
    await until(lambda: not stats.redis_up, timeout=20)
    down = await scrape(a)
    assert down["xmppd_cluster_redis_up"] == 0 and down["xmppd_cluster_redis_errors_total"] > 0
    redis_service.start()
    await until(lambda: stats.redis_up, timeout=20)
    back = await scrape(a)
    assert back["xmppd_cluster_redis_up"] == 1
    assert back["xmppd_cluster_redis_reconnects_total"] > 0
    await close(alice)
    await close(bob)
