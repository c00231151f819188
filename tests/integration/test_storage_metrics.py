"""Store and cache latency and errors on /metrics, from a real node's real traffic."""

from __future__ import annotations

from tests.integration.clients import close, connect
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import until
from tests.integration.test_message_load import scrape


async def test_store_and_cache_calls_are_timed(start_server: StartServer) -> None:
    server = await start_server()
    before = await scrape(server)
    alice = await connect(server, "alice@localhost/desk", "alice-secret")  # credentials: items
    alice.send_presence()  # roster, privacy: read through the cache
    await alice.get_roster()
    bob = await connect(server, "bob@localhost/desk", "bob-secret")
    await close(bob)
    alice.send_message(mto="bob@localhost", mbody="stored offline", mtype="chat")  # a blob
    await until(lambda: server.router.ledger.offline == 1)
    await close(alice)
    after = await scrape(server)
    for part in ("items", "blobs"):
        grew = (
            after[f"xmppd_storage_seconds_count{{{part}}}"]
            - before[f"xmppd_storage_seconds_count{{{part}}}"]
        )
        assert grew > 0, part
        assert after[f"xmppd_storage_seconds_sum{{{part}}}"] > 0
        assert after[f"xmppd_storage_errors_total{{{part}}}"] == 0
    cache = "xmppd_storage_seconds_count{cache}"
    if server.config.storage.cache.backend != "none":
        assert after[cache] > before[cache]
