"""Two nodes sharing their sessions through a real Redis (xmppd.cluster), real clients.

Both nodes run in this process on the same storage (embedded or cloud, as
every integration test), each with the cluster section naming its own node
and the same redis-server, started for the test on a free port.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import pytest
from redis.asyncio import Redis

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import RemoteTransport, schema
from xmppd.server import Server, StartupError
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

DELIVERY = 1.0
"""Seconds a cross-node message may take (the issue: within a second)."""


@pytest.fixture
def redis_service(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
) -> Iterator[LocalService]:
    yield service_factory(devservices.redis_server)


async def two_nodes(start_server: StartServer, redis: LocalService) -> tuple[Server, Server]:
    url = devservices.redis_url(redis)
    a = await start_server(cluster={"redis_url": url, "node_name": "node-a"})
    b = await start_server(users={}, cluster={"redis_url": url, "node_name": "node-b"})
    return a, b


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


def seen_on(node: Server, jid: str, priority: int = 0) -> Callable[[], bool]:
    """True once `node` knows `jid` as available with `priority`."""
    bare, _, resource = jid.partition("/")

    def check() -> bool:
        session = node.router.directory.get(bare, resource)
        return session is not None and session.available and session.priority == priority

    return check


async def online(node: Server, jid: str, password: str, priority: int = 0) -> Client:
    client = await connect(node, jid, password)
    client.send_presence(ppriority=priority)
    return client


async def received(client: Client, timeout: float = DELIVERY) -> str:
    message = await asyncio.wait_for(client.messages.get(), timeout)
    return str(message["body"])


async def test_a_message_reaches_a_session_on_the_other_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b = await two_nodes(start_server, redis_service)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    session = a.router.directory.get("bob@localhost", "phone")
    assert session is not None and isinstance(session.transport, RemoteTransport)
    alice.send_message(mto="bob@localhost/phone", mbody="to the full JID", mtype="chat")
    assert await received(bob) == "to the full JID"
    alice.send_message(mto="bob@localhost", mbody="to the bare JID", mtype="chat")
    assert await received(bob) == "to the bare JID"
    # and back, from B to A
    bob.send_message(mto="alice@localhost", mbody="hello back", mtype="chat")
    assert await received(alice) == "hello back"
    await close(alice)
    await close(bob)


async def test_a_bare_jid_message_goes_to_the_highest_priority_on_either_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b = await two_nodes(start_server, redis_service)
    phone = await online(b, "bob@localhost/phone", "bob-secret", priority=1)
    alice = await online(b, "alice@localhost/desk", "alice-secret")
    desk = await online(a, "bob@localhost/desk", "bob-secret", priority=5)
    await until(seen_on(b, "bob@localhost/desk", priority=5))
    alice.send_message(mto="bob@localhost", mbody="for the top resource", mtype="chat")
    assert await received(desk) == "for the top resource"
    await asyncio.sleep(0.2)
    assert phone.messages.empty()
    # the priority drops below the phone's: the next one goes to the phone
    desk.send_presence(ppriority=0)
    await until(seen_on(b, "bob@localhost/desk", priority=0))
    alice.send_message(mto="bob@localhost", mbody="now the phone", mtype="chat")
    assert await received(phone) == "now the phone"
    for client in (alice, phone, desk):
        await close(client)


async def test_the_same_resource_on_the_other_node_ends_the_first_with_conflict(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b = await two_nodes(start_server, redis_service)
    first = await online(b, "bob@localhost/phone", "bob-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    second = await online(a, "bob@localhost/phone", "bob-secret")
    await asyncio.wait_for(first.ended.wait(), 5)
    assert first.stream_errors == ["conflict"]
    assert not second.ended.is_set()
    await until(lambda: b.router.directory.get("bob@localhost", "phone") is not None)
    await until(seen_on(b, "bob@localhost/phone"))
    # the table holds the newer one: the other node routes to it
    alice = await online(b, "alice@localhost/desk", "alice-secret")
    alice.send_message(mto="bob@localhost/phone", mbody="to the newer login", mtype="chat")
    assert await received(second) == "to the newer login"
    await close(alice)
    await close(second)


async def test_a_stopped_node_s_sessions_are_gone_and_messages_go_offline(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b = await two_nodes(start_server, redis_service)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    await b.stop()
    await asyncio.wait_for(bob.ended.wait(), 5)
    # at once, from the stopping node's own unbinds, not a heartbeat later
    await until(lambda: not a.router.directory.has("bob@localhost"), timeout=1.0)
    alice.send_message(mto="bob@localhost", mbody="while you were away", mtype="chat")
    await asyncio.sleep(0.2)
    await a.router.drain()
    later = await online(a, "bob@localhost/laptop", "bob-secret")
    assert await received(later, timeout=5) == "while you were away"
    await close(later)
    await close(alice)
    bob.abort()


async def test_a_dead_node_is_reaped_by_the_heartbeat(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """A node whose heartbeat key expired (here: one that never had one) loses its
    sessions from the table and from every replica on the next beat."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None
    ghost = schema.Entry("bob@localhost/ghost", "node-dead", 0, True)
    redis = a.cluster.redis
    await redis.hset(schema.sessions_key("bob@localhost"), "ghost", ghost.encode())
    await redis.sadd(schema.node_sessions_key("node-dead"), ghost.jid)
    await redis.sadd(schema.NODES, "node-dead")
    await redis.publish(schema.EVENTS, schema.set_event(ghost, 1))
    await until(lambda: b.router.directory.get("bob@localhost", "ghost") is not None)
    await a.cluster.heartbeat.beat()
    await until(lambda: not b.router.directory.has("bob@localhost"))
    assert not a.router.directory.has("bob@localhost")
    assert await redis.exists(schema.sessions_key("bob@localhost")) == 0
    assert not await redis.sismember(schema.NODES, "node-dead")


async def test_a_node_clears_what_an_earlier_process_of_its_name_left(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """A node restarted under the same name after a crash: the sessions of its
    previous life are not in the table (nobody else would reap them: it beats)."""
    stale = schema.Entry("bob@localhost/old", "node-a", 0, True)
    client = Redis.from_url(devservices.redis_url(redis_service))
    await client.hset(schema.sessions_key("bob@localhost"), "old", stale.encode())
    await client.sadd(schema.node_sessions_key("node-a"), stale.jid)
    await client.aclose()
    a, b = await two_nodes(start_server, redis_service)
    assert not b.router.directory.has("bob@localhost")
    assert a.cluster is not None
    assert await a.cluster.redis.exists(schema.sessions_key("bob@localhost")) == 0


async def test_the_replica_is_reloaded_after_redis_restarts(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Events published while a node is cut off are lost; the reload after the
    reconnect (and each node writing its own sessions again) repairs the table."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    loads = a.cluster.sync.loads
    redis_service.restart()  # empty: nothing is saved
    await until(lambda: a.cluster is not None and a.cluster.sync.loads > loads, timeout=15)
    await until(seen_on(a, "bob@localhost/phone"), timeout=15)
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    alice.send_message(mto="bob@localhost", mbody="after the restart", mtype="chat")
    assert await received(bob, timeout=5) == "after the restart"
    await close(alice)
    await close(bob)


async def test_an_unreachable_redis_stops_the_start_with_a_clear_error(
    start_server: StartServer,
) -> None:
    port = devservices.free_ports(1)[0]
    with pytest.raises(StartupError) as info:
        await start_server(
            cluster={"redis_url": f"redis://user:secret@127.0.0.1:{port}/0", "node_name": "x"}
        )
    assert f"redis://user:***@127.0.0.1:{port}/0 is unreachable" in str(info.value)
    assert "secret" not in str(info.value)


async def test_a_bind_the_replica_did_not_know_of_still_ends_the_older_session(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Two logins on one resource before either node heard of the other: Redis, which
    orders the two writes, names the older one, and that one is ended."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None
    await a.cluster.sync.stop()  # A hears nothing from now on
    first = await online(b, "bob@localhost/phone", "bob-secret")
    await until(lambda: b.router.directory.get("bob@localhost", "phone") is not None)
    await asyncio.sleep(0.2)
    assert a.router.directory.get("bob@localhost", "phone") is None
    second = await online(a, "bob@localhost/phone", "bob-secret")
    await asyncio.wait_for(first.ended.wait(), 5)
    assert first.stream_errors == ["conflict"]
    assert not second.ended.is_set()
    await close(second)


async def test_a_dropped_event_channel_reloads_the_table(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Events published while the subscription is down are lost, so after it is back
    the node reads the table again."""
    a, _ = await two_nodes(start_server, redis_service)
    assert a.cluster is not None
    loads = a.cluster.sync.loads
    await a.cluster.redis.client_kill_filter(_type="pubsub")
    await until(lambda: a.cluster is not None and a.cluster.sync.loads > loads, timeout=10)


async def test_a_stanza_forwarded_while_redis_is_down_arrives_when_it_is_back(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """The writer keeps what it could not send, in order, and sends it again."""
    a, b = await two_nodes(start_server, redis_service)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    redis_service.stop()
    for n in range(3):
        alice.send_message(mto="bob@localhost/phone", mbody=f"during the outage {n}", mtype="chat")
    await asyncio.sleep(1.5)  # long enough for the writer to fail more than once
    redis_service.start()
    for n in range(3):
        assert await received(bob, timeout=10) == f"during the outage {n}"
    await close(alice)
    await close(bob)
