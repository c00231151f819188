"""Connections, logins, login failures and stanzas by kind on /metrics, from real clients.

The scrape goes through the admin API over HTTP and is parsed by
prometheus_client's own parser, as Prometheus would read it.
"""

from __future__ import annotations

from tests.integration.clients import close, connect
from tests.integration.conftest import StartServer
from tests.integration.dashboard import exported, graphed, not_exported
from tests.integration.test_cluster import until
from tests.integration.test_message_load import scrape


def grew(before: dict[str, float], after: dict[str, float], sample: str) -> float:
    return after.get(sample, 0) - before.get(sample, 0)


async def test_logins_failures_and_stanzas_by_kind(start_server: StartServer) -> None:
    server = await start_server()
    before = await scrape(server)
    intruder = await connect(server, "bob@localhost/x", "wrong", expect_failure=True)
    await close(intruder)
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    bob = await connect(server, "bob@localhost/desk", "bob-secret")
    await alice.get_roster()  # an iq in, its result out
    alice.send_presence()  # presence in; alice gets her own presence back
    for n in range(3):
        alice.send_message(mto="bob@localhost/desk", mbody=f"hello {n}", mtype="chat")
    for _ in range(3):
        await bob.messages.get()
    await until(lambda: server.router.ledger.written >= 3)
    after = await scrape(server)
    await close(alice)
    await close(bob)

    assert grew(before, after, "xmppd_connections_accepted_total") == 3
    assert after["xmppd_connections"] == 2
    assert after["xmppd_sessions"] == 2
    assert grew(before, after, "xmppd_logins_total") == 2
    assert grew(before, after, "xmppd_login_failures_total{not-authorized}") == 1
    assert grew(before, after, "xmppd_stanzas_total{in}{message}") == 3
    assert grew(before, after, "xmppd_stanzas_total{out}{message}") == 3
    # Alice's roster get and each client's bind-time iqs (slixmpp asks for the roster);
    # every iq a client sends is answered.
    assert grew(before, after, "xmppd_stanzas_total{in}{iq}") >= 1
    assert grew(before, after, "xmppd_stanzas_total{out}{iq}") >= grew(
        before, after, "xmppd_stanzas_total{in}{iq}"
    )
    assert grew(before, after, "xmppd_stanzas_total{in}{presence}") >= 1
    assert grew(before, after, "xmppd_stanzas_total{out}{presence}") >= 1
    assert "xmppd_routing_seconds_count" in after  # sampled (one in 64): maybe still 0
    for part in ("items", "blobs", "cache"):
        assert f"xmppd_storage_seconds_count{{{part}}}" in after
        assert f"xmppd_storage_errors_total{{{part}}}" in after

    # Every panel of the Grafana dashboard in docs/ graphs what a node exports, the
    # process' own metrics included (the cluster's figures come from cluster nodes:
    # tests/integration/test_cluster_metrics.py checks every panel there).
    panels = graphed()
    assert all(panels.values()), panels  # each panel reads some metric
    single = {
        title: {m for m in used if not m.startswith("xmppd_cluster_")}
        for title, used in panels.items()
    }
    assert not_exported(await exported(server), single) == {}
    assert {
        "xmppd_logins_total", "xmppd_stanzas_total", "xmppd_storage_seconds_bucket",
        "xmppd_tls_cert_not_after_seconds", "process_open_fds", "process_max_fds",
    } <= set().union(*panels.values())
