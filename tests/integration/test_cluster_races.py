"""Races between two nodes on a real redis-server, real clients: a stanza forwarded to a
session that leaves before it arrives, a stream end to a node that refuses frames, a
reap that crosses the reaped node's heartbeat. Each must end with the stanza delivered,
stored or bounced, and no ghost session left."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import online, received, seen_on, until
from tests.integration.test_cluster_link import linked
from xmppd.cluster import schema
from xmppd.cluster.inbox import ItemHandler
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)


async def nodes(
    start_server: StartServer, redis: LocalService, link: bool
) -> tuple[Server, Server]:
    url = devservices.redis_url(redis)
    section: dict[str, Any] = {"redis_url": url, "link": {"enabled": link}}
    a = await start_server(cluster={**section, "node_name": "node-a"})
    b = await start_server(users={}, cluster={**section, "node_name": "node-b"})
    return a, b


async def owner_of(redis: Redis, jid: str) -> str | None:
    """The node the table has `jid` bound on."""
    bare, _, resource = jid.partition("/")
    entry = await redis.hget(schema.sessions_key(bare), resource)
    return None if entry is None else schema.Entry.decode(jid, entry).node


@pytest.mark.parametrize("link", [True, False], ids=["link", "redis"])
async def test_a_bare_jid_message_whose_resource_left_reaches_a_lower_priority_one(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    link: bool,
) -> None:
    """alice/phone (priority 5) on B, alice/laptop (priority 0) on A: bob's message to
    alice goes to the phone; the phone leaves as it arrives on B. B must route it again
    by the bare-JID rules (the laptop gets it), not drop it because the laptop is
    available: the laptop never got a copy from A."""
    a, b = await nodes(start_server, redis_service, link)
    laptop = await online(a, "alice@localhost/laptop", "alice-secret", priority=0)
    phone = await online(b, "alice@localhost/phone", "alice-secret", priority=5)
    bob = await online(a, "bob@localhost/desk", "bob-secret")
    await until(seen_on(a, "alice@localhost/phone", priority=5))
    await until(seen_on(b, "alice@localhost/laptop", priority=0))
    real_handle = ItemHandler.handle

    def leave_first(handler: ItemHandler, items: list[dict[bytes, bytes]]) -> None:
        # The phone logs out between A's choice and B's handling.
        for item in items:
            if item.get(b"to") == b"alice@localhost/phone":
                session = b.router.directory.get("alice@localhost", "phone")
                if session is not None:
                    b.router.directory.remove(session)
        real_handle(handler, items)

    monkeypatch.setattr(ItemHandler, "handle", leave_first)
    bob.send_message(mto="alice@localhost", mbody="for alice", mtype="chat")
    assert await received(laptop, timeout=5) == "for alice"
    assert phone.messages.empty()
    for client in (laptop, phone, bob):
        await close(client)


async def test_a_conflict_refused_by_a_lapsed_node_still_ends_the_old_session(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """alice/R on B; B's heartbeat lapses (it refuses link frames), and alice logs in
    again on A with the same resource: A's <conflict/> for B's session is NACKed. It
    goes through Redis instead, and the old session ends: no ghost on B."""
    a, b = await nodes(start_server, redis_service, True)
    old = await online(b, "alice@localhost/R", "alice-secret")
    bob = await online(b, "bob@localhost/desk", "bob-secret")  # A links to B
    await until(seen_on(a, "alice@localhost/R"))
    assert a.cluster is not None and b.cluster is not None and b.cluster.link is not None
    await until(lambda: linked(a, b))
    b.cluster.link.live = lambda: False  # B's heartbeat lapsed: it refuses frames
    new = await online(a, "alice@localhost/R", "alice-secret")
    await until(lambda: b.router.directory.local.get("alice@localhost", "R") is None, 10)
    assert a.cluster.stats.link_nacks >= 1
    redis = Redis.from_url(devservices.redis_url(redis_service))
    try:
        assert await owner_of(redis, "alice@localhost/R") == "node-a"
    finally:
        await redis.aclose()
    for client in (new, bob, old):
        await close(client)


async def test_a_session_whose_resource_another_node_took_ends_when_its_node_rewrites(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """alice/R on B; B is reaped (its gone mark set: A's <conflict/> for it is refused
    by Redis, as after a reap) while alice logs in again on A. When B writes its
    sessions again (its heartbeat found its key expired), the table keeps A's newer
    entry, and B ends its own session with <conflict/> instead of keeping a ghost."""
    a, b = await nodes(start_server, redis_service, False)
    old = await online(b, "alice@localhost/R", "alice-secret")
    await until(seen_on(a, "alice@localhost/R"))
    assert b.cluster is not None
    redis = Redis.from_url(devservices.redis_url(redis_service))
    beating = b.cluster.heartbeat._task
    assert beating is not None
    beating.cancel()  # B's beats stop (its next one would clear the gone mark)
    try:
        await redis.set(schema.gone_key("node-b"), "1", ex=60)
        new = await online(a, "alice@localhost/R", "alice-secret")
        assert a.cluster is not None
        await a.cluster.writer.flush()
        await asyncio.sleep(0.2)
        assert b.router.directory.local.get("alice@localhost", "R") is not None
        b.cluster.rewrite_local()
        await until(lambda: b.router.directory.local.get("alice@localhost", "R") is None, 5)
        assert await owner_of(redis, "alice@localhost/R") == "node-a"
    finally:
        await redis.aclose()
    for client in (new, old):
        await close(client)
