"""What one node changes takes effect on the others at once (xmppd.cluster.bus), real clients.

Two nodes in this process on the same storage (the embedded default, where
each node has its own in-process cache, and the cloud stores with the
shared memcached ring) and a real redis-server: caches and module state
invalidated over the cluster bus, account changes ending sessions on every
node, the login throttle counted in Redis, last activity across nodes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest
from redis.asyncio import Redis
from slixmpp import JID
from slixmpp.xmlstream import ET

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from tests.integration.test_account_changes import xmppctl
from tests.integration.test_cluster import (
    online,
    received,
    seen_on,
    until,
)
from tests.integration.test_privacy_blocking import error_of, friends, privacy_iq, settle
from tests.integration.test_privacy_blocking import online as blocking_client
from tests.integration.test_vcard_private_register import (
    IMAGE,
    Prefs,
    login,
    photo_of,
    publish_vcard,
    vcard_of,
)
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.adminapi import admin_dir
from xmppd.auth.throttle import MemoryFailureCounter
from xmppd.cluster.bus import RedisBus
from xmppd.cluster.caches import share_memory_cache
from xmppd.cluster.throttle import RETRY_AFTER, RedisFailureCounter, count_key
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.cache import MemoryCache
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}


async def nodes(
    start_server: StartServer, redis: LocalService, **sections: Any
) -> tuple[Server, Server]:
    url = devservices.redis_url(redis)
    a = await start_server(
        users=PASSWORDS, cluster={"redis_url": url, "node_name": "node-a"}, **sections
    )
    b = await start_server(users={}, cluster={"redis_url": url, "node_name": "node-b"}, **sections)
    return a, b


def notices(node: Server) -> int:
    """Privacy notices `node` heard from the others. The node that made a change
    sends its notice before answering the client, so in practice the other node
    has it before the client's next stanza; the tests wait for it rather than
    rely on two sockets' order in one busy event loop."""
    assert node.cluster is not None
    return node.cluster.bus.received["privacy"]


async def test_a_block_set_through_one_node_applies_to_a_stanza_routed_by_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    """bob's messages are routed by node B, which judges them with alice's rules as it
    holds them; alice blocks bob (and later unblocks him) through node A."""
    a, b = await nodes(start_server, redis_service)
    alice = await blocking_client(a, "alice@localhost/desk")
    bob = await blocking_client(b, "bob@localhost/laptop")
    await until(seen_on(b, "alice@localhost/desk"))
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="before", mtype="chat")
    assert await received(alice, timeout=5) == "before"  # B now holds alice's (empty) rules

    heard = notices(b)
    await alice.plugin["xep_0191"].block(JID("bob@localhost"), timeout=10)
    await until(lambda: notices(b) > heard)
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="blocked", mtype="chat")
    condition, _ = error_of(await asyncio.wait_for(bob.messages.get(), 5))
    assert condition == "service-unavailable"

    heard = notices(b)
    await alice.plugin["xep_0191"].unblock(JID("bob@localhost"), timeout=10)
    await until(lambda: notices(b) > heard)
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="after", mtype="chat")
    assert await received(alice, timeout=5) == "after"
    await settle(alice)
    assert alice.messages.empty()
    for client in (alice, bob):
        await close(client)


async def test_a_privacy_list_set_through_one_node_applies_on_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    """alice's default list, set through node A, refuses carol's messages routed by B."""
    a, b = await nodes(start_server, redis_service)
    alice = await blocking_client(a, "alice@localhost/desk")
    carol = await blocking_client(b, "carol@localhost/phone")
    await until(seen_on(b, "alice@localhost/desk"))
    carol.send_message(mto=JID("alice@localhost/desk"), mbody="before", mtype="chat")
    assert await received(alice, timeout=5) == "before"

    await privacy_iq(
        alice,
        "set",
        "<list name='quiet'><item type='jid' value='carol@localhost' action='deny' order='1'>"
        "<message/></item></list>",
    )
    heard = notices(b)
    await privacy_iq(alice, "set", "<default name='quiet'/>")
    await until(lambda: notices(b) > heard)
    carol.send_message(mto=JID("alice@localhost/desk"), mbody="denied", mtype="chat")
    condition, _ = error_of(await asyncio.wait_for(carol.messages.get(), 5))
    assert condition == "service-unavailable"
    await settle(alice)
    assert alice.messages.empty()
    for client in (alice, carol):
        await close(client)


async def roster_read_on(client: Client) -> Any:
    """The whole roster as the client's node reads it: a get without 'ver', because
    the roster push bob's other node sends him (across nodes) gives his client the
    new version, and a get with it would be answered "unchanged", read from nowhere."""
    iq = client.Iq()
    iq["type"] = "get"
    iq.enable("roster")
    return (await iq.send(timeout=10))["roster"]["items"]


async def test_a_write_through_one_node_is_not_served_stale_by_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    """vCard (a blob), private XML and the roster (items): node B has each cached
    when bob changes it through node A; B then serves the new one."""
    a, b = await nodes(start_server, redis_service)
    bob_a = await login(a, "bob@localhost/desk", "bob-secret")
    bob_b = await login(b, "bob@localhost/phone", "bob-secret")
    alice_b = await login(b, "alice@localhost/desk", "alice-secret")
    private_a, private_b = bob_a.plugin["xep_0049"], bob_b.plugin["xep_0049"]

    async def nick_on_b() -> str:
        got = await private_b.retrieve("test_prefs", timeout=10)
        return str(got["private"]["test_prefs"]["nick"])

    await publish_vcard(bob_a, "Bob One")
    assert (await vcard_of(alice_b, "bob@localhost"))["vcard_temp"]["FN"] == "Bob One"
    prefs = Prefs()
    prefs["nick"] = "one"
    await private_a.store(prefs, timeout=10)
    assert await nick_on_b() == "one"
    assert "carol@localhost" not in await roster_read_on(bob_b)

    await publish_vcard(bob_a, "Bob Two")
    prefs["nick"] = "two"
    await private_a.store(prefs, timeout=10)
    await bob_a.update_roster(JID("carol@localhost"), name="Carol", timeout=10)

    assert (await vcard_of(alice_b, "bob@localhost"))["vcard_temp"]["FN"] == "Bob Two"
    assert await nick_on_b() == "two"
    items = await roster_read_on(bob_b)
    assert items[JID("carol@localhost")]["name"] == "Carol"
    for client in (bob_a, bob_b, alice_b):
        await close(client)


async def test_an_avatar_set_through_one_node_is_in_presence_sent_through_the_other(
    redis_service: LocalService,
    start_server: StartServer,
) -> None:
    """Node B stamps bob's presence with the avatar hash it holds; bob changes his
    vCard through node A."""
    a, b = await nodes(start_server, redis_service)
    bob_a = await login(a, "bob@localhost/desk", "bob-secret")
    bob_b = await login(b, "bob@localhost/phone", "bob-secret")
    alice_b = await login(b, "alice@localhost/desk", "alice-secret")
    bob_b.send_presence(pto=alice_b.boundjid.full)  # B now holds bob's hash: no avatar
    assert not photo_of(await asyncio.wait_for(alice_b.presences.get(), 10))

    assert b.cluster is not None
    heard = b.cluster.bus.received["vcard-photo"]
    await publish_vcard(bob_a, "Bob", IMAGE)
    # As in the privacy tests: wait for B to hear the notice rather than rely on the
    # order of two sockets (Redis, bob's) in one busy event loop.
    await until(lambda: b.cluster is not None and b.cluster.bus.received["vcard-photo"] > heard)
    bob_b.send_presence(pto=alice_b.boundjid.full)
    presence = await asyncio.wait_for(alice_b.presences.get(), 10)
    assert photo_of(presence) == hashlib.sha1(IMAGE).hexdigest()
    for client in (bob_a, bob_b, alice_b):
        await close(client)


def forget_node_record(node: Server) -> None:
    """As if `node` ran on another machine: xmppctl here does not find it."""
    for record in admin_dir(node.config.data_dir).glob("*.json"):
        if json.loads(record.read_text())["url"] == node.admin.url:
            record.unlink()


async def sessions_a_does_not_know_yet(
    a: Server, b: Server, user: str
) -> tuple[Client, Client]:
    """Two sessions of `user` on node B: one node A knows, and one bound after A stopped
    hearing the session table (a login A's replica has not caught up with)."""
    assert a.cluster is not None
    known = await online(b, f"{user}@localhost/known", PASSWORDS[user])
    await until(seen_on(a, f"{user}@localhost/known"))
    await a.cluster.sync.stop()
    unknown = await online(b, f"{user}@localhost/new", PASSWORDS[user])
    await until(seen_on(b, f"{user}@localhost/new"))
    assert a.router.directory.get(f"{user}@localhost", "new") is None
    return known, unknown


async def ended(client: Client) -> list[str]:
    await asyncio.wait_for(client.ended.wait(), 10)
    return client.stream_errors


async def test_xmppctl_unregister_through_one_node_ends_the_sessions_on_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    a, b = await nodes(start_server, redis_service)
    forget_node_record(b)
    known, unknown = await sessions_a_does_not_know_yet(a, b, "carol")
    code, out, err = await xmppctl(a, "unregister", "carol@localhost")
    assert (code, err) == (0, ""), out
    assert out.endswith("unregistered carol@localhost\n")
    assert await ended(known) == ["not-authorized"]
    assert await ended(unknown) == ["not-authorized"]
    refused = await connect(b, "carol@localhost", "carol-secret", expect_failure=True)
    await close(refused)


async def test_xmppctl_passwd_through_one_node_ends_the_sessions_on_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    a, b = await nodes(start_server, redis_service)
    forget_node_record(b)
    known, unknown = await sessions_a_does_not_know_yet(a, b, "carol")
    code, out, err = await xmppctl(a, "passwd", "carol@localhost", stdin="carol-new\n")
    assert (code, err) == (0, ""), out
    assert await ended(known) == ["not-authorized"]
    assert await ended(unknown) == ["not-authorized"]
    again = await connect(b, "carol@localhost/back", "carol-new")
    await close(again)


async def test_an_in_band_password_change_on_one_node_ends_the_sessions_on_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    """XEP-0077 through node A: carol's sessions on B end, the one A's replica has not
    caught up with too (the cluster bus reaches it), and the one that asked stays."""
    a, b = await nodes(start_server, redis_service)
    known, unknown = await sessions_a_does_not_know_yet(a, b, "carol")
    asker = await online(a, "carol@localhost/asker", "carol-secret")
    iq = asker.make_iq_set(ito="localhost")
    iq.xml.append(ET.fromstring(
        "<query xmlns='jabber:iq:register'>"
        "<username>carol</username><password>carol-new-secret</password></query>"
    ))
    await iq.send(timeout=10)
    assert await ended(known) == ["not-authorized"]
    assert await ended(unknown) == ["not-authorized"]
    assert not asker.ended.is_set()
    again = await connect(b, "carol@localhost/back", "carol-new-secret")
    await close(again)
    await close(asker)


async def test_failed_logins_on_one_node_count_on_the_other(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    limits = {"auth_failure_delay": 0.01, "auth_failures_before_ban": 3}
    a, b = await nodes(start_server, redis_service, limits=limits)
    for node in (a, a, b):
        refused = await connect(node, "alice@localhost", "wrong", expect_failure=True)
        await close(refused)
    # the third failure, on B, banned the address on both nodes: even the right
    # password is refused, unchecked
    for node in (b, a):
        banned = await connect(node, "alice@localhost", "alice-secret", expect_failure=True)
        await close(banned)
    assert b.throttle.stats.bans == 1
    assert a.throttle.stats.refusals >= 1 and b.throttle.stats.refusals >= 1


async def last_activity(client: Client, of: str) -> tuple[int, str]:
    iq = client.make_iq_get(queryxmlns="jabber:iq:last", ito=of)
    result = await iq.send(timeout=10)
    query = result.xml.find("{jabber:iq:last}query")
    assert query is not None
    return int(query.get("seconds", "-1")), query.text or ""


async def logout(client: Client, status: str) -> None:
    client.send_presence(ptype="unavailable", pstatus=status)
    await close(client)


async def test_last_activity_across_nodes(
    redis_service: LocalService,
    start_server: StartServer
) -> None:
    """Online on another node is online; a logout recorded by one node is what the
    other answers, even when it had the previous one cached."""
    a, b = await nodes(start_server, redis_service)
    alice, bob = await friends(a)  # subscribed to each other, both on A
    watcher = await online(b, "alice@localhost/watch", "alice-secret")
    assert await last_activity(watcher, "bob@localhost") == (0, "")
    store = a.modules.items("localhost", "last")

    async def logged_out(status: str) -> None:
        async with asyncio.timeout(10):
            while True:
                item = await store.get("bob")
                if item is not None and item.attrs.get("status") == status:
                    return
                await asyncio.sleep(0.02)

    await logout(bob, "first")
    await logged_out("first")
    assert (await last_activity(watcher, "bob@localhost"))[1] == "first"
    bob = await online(a, "bob@localhost/laptop", "bob-secret")
    await until(seen_on(b, "bob@localhost/laptop"))
    assert await last_activity(watcher, "bob@localhost") == (0, "")
    await logout(bob, "second")
    await logged_out("second")
    assert (await last_activity(watcher, "bob@localhost"))[1] == "second"
    for client in (alice, watcher):
        await close(client)


async def test_the_embedded_cache_is_invalidated_on_the_other_node_and_flushed_after_a_reconnect(
    redis_service: LocalService,
) -> None:
    """The bus and two in-process caches, without servers: a write (a tombstone) on
    one is applied on the other; a node whose subscription broke forgets everything."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    buses = [RedisBus(redis, "n1"), RedisBus(redis, "n2")]
    caches = [MemoryCache(), MemoryCache()]
    for bus, cache in zip(buses, caches, strict=True):
        assert share_memory_cache(bus, cache)
        await bus.start()
    try:
        await caches[1].add("k", b"old", 300)
        await caches[0].set("k", b"T", 5)  # what a write through the cache does
        await until(lambda: caches[1]._live("k") == b"T")
        await caches[1].add("other", b"cached", 300)
        await redis.client_kill_filter(_type="pubsub")  # both subscriptions drop
        await until(lambda: buses[1].resets > 0 and len(caches[1]) == 0, timeout=10)
        # and the bus works again after the reconnect
        await caches[1].delete("k")
        await caches[0].add("k", b"x", 300)
        await caches[1].set("k", b"T", 5)
        await until(lambda: caches[0]._live("k") == b"T")
    finally:
        for bus in buses:
            await bus.stop()
        await redis.aclose()


async def test_the_throttle_falls_back_to_the_node_s_own_count_while_redis_fails(
    redis_service: LocalService,
) -> None:
    now = [0.0]
    redis = Redis.from_url(devservices.redis_url(redis_service))
    counter = RedisFailureCounter(redis, 60.0, MemoryFailureCounter(60.0), clock=lambda: now[0])
    try:
        assert await counter.record_failure("ip:1") == 1
        assert await counter.record_failure("ip:1") == 2
        assert await redis.pttl(count_key("ip:1")) > 59_000  # expires after the last failure
        redis_service.stop()
        # neither a lockout nor an exception: this node counts on its own
        assert await counter.record_failure("ip:1") == 1
        assert await counter.failures("ip:1") == 1
        redis_service.start()
        assert await counter.failures("ip:1") == 1  # not asking Redis again so soon
        now[0] += RETRY_AFTER
        assert await counter.failures("ip:1") == 0  # Redis restarted empty: its count
        await counter.clear("ip:1")
    finally:
        await counter.close()
        await redis.aclose()
