"""Two nodes sharing their sessions through a real Redis (xmppd.cluster), real clients.

Both nodes run in this process on the same storage (embedded or cloud, as
every integration test), each with the cluster section naming its own node
and the same redis-server, started for the test on a free port.
"""

from __future__ import annotations

import asyncio
import sys
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import pytest
from redis.asyncio import Redis

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from xmppd.cluster import RemoteTransport, schema
from xmppd.config import DEFAULT_MODULES
from xmppd.modulehost import Module
from xmppd.server import Server, StartupError
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService
from xmppd.stream.errors import StreamError

pytestmark = pytest.mark.timeout(60)

DELIVERY = 1.0
"""Seconds a cross-node message may take (the issue: within a second)."""



async def two_nodes(
    start_server: StartServer, redis: LocalService, **sections: Any
) -> tuple[Server, Server]:
    url = devservices.redis_url(redis)
    a = await start_server(cluster={"redis_url": url, "node_name": "node-a"}, **sections)
    b = await start_server(
        users={}, cluster={"redis_url": url, "node_name": "node-b"}, **sections
    )
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


async def test_a_clean_stop_leaves_the_inbox_empty(
    redis_service: LocalService, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The entry a stopping node writes to its own inbox to end its blocking read is
    skipped, not routed as a stanza, and trimmed like a handled one: the stop reads its
    inbox to the end at once and leaves nothing for the next process of its name."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    alice.send_message(mto="bob@localhost/phone", mbody="before the stop", mtype="chat")
    assert await received(bob) == "before the stop"
    await b.stop()
    assert await a.cluster.redis.xlen(schema.inbox_key("node-b")) == 0
    assert "inbox entry failed" not in caplog.text
    assert "could not read the inbox" not in caplog.text
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


class Exploding(Module):
    """A module that fails as the node starts: in setup() or in start(), as `failing` says
    (a bug, a resource it cannot get)."""

    name = "exploding"
    failing: ClassVar[str] = "setup"

    def setup(self) -> None:
        if self.failing == "setup":
            raise RuntimeError("exploding: cannot setup")

    async def start(self) -> None:
        if self.failing == "start":
            raise RuntimeError("exploding: cannot start")


@pytest.mark.parametrize("failing", ["setup", "start"])
async def test_a_start_that_fails_after_joining_the_cluster_leaves_it(
    redis_service: LocalService,
    start_server: StartServer,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """A module that raises as the node starts, once the node has joined the cluster:
    the start raises that error, after leaving the cluster as a stop would (the
    other nodes must not see it alive, nor route to it) and ending every task it
    started (they kept an in-process caller such as this test from ending)."""
    module = types.ModuleType("xmppd.modules.exploding")
    module.MODULE = Exploding  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xmppd.modules.exploding", module)
    monkeypatch.setattr(Exploding, "failing", failing)
    url = devservices.redis_url(redis_service)
    before = asyncio.all_tasks()
    with pytest.raises(RuntimeError, match=f"exploding: cannot {failing}"):
        async with asyncio.timeout(10):
            await start_server(
                cluster={"redis_url": url, "node_name": "node-a"},
                modules={**{name: {} for name in DEFAULT_MODULES}, "exploding": {}},
            )
    left = {task for task in asyncio.all_tasks() - before if not task.done()}
    admin = Redis.from_url(url)
    try:
        assert sorted(task.get_name() for task in left) == []
        assert not await admin.sismember(schema.NODES, "node-a")
        assert not await admin.exists(schema.alive_key("node-a"))
    finally:
        await admin.aclose()
        for task in left:  # failed: end them while Redis runs, or the run hangs at exit
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=5)


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


async def test_a_stanza_between_replicas_that_disagree_stops_at_the_hop_limit(
    redis_service: LocalService, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A believes bob/phone is on B, B believes it is on A: the message goes back and
    forth writer.MAX_HOPS times, then is handled as for a session that is gone (offline
    storage), where bob finds it at his next login."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None
    a.cluster.directory.apply_set(schema.Entry("bob@localhost/phone", "node-b", 0, True, sid="x"))
    b.cluster.directory.apply_set(schema.Entry("bob@localhost/phone", "node-a", 0, True, sid="y"))
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    alice.send_message(mto="bob@localhost/phone", mbody="round and round", mtype="chat")
    await until(lambda: "forwarded 3 times between nodes" in caplog.text)
    for node in (a, b):
        await node.router.drain()
    # the phone is still a ghost on both replicas: log in as another resource
    a.cluster.directory.apply_node_gone("node-b")
    later = await online(a, "bob@localhost/laptop", "bob-secret")
    assert await received(later, timeout=5) == "round and round"
    await close(later)
    await close(alice)


async def test_a_stale_request_to_end_a_session_spares_the_newer_one(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """The request to end a replaced session names that session: arriving after the
    resource was bound again on its node, it ends nothing."""
    a, b = await two_nodes(start_server, redis_service)
    first = await online(b, "bob@localhost/phone", "bob-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    old = a.router.directory.get("bob@localhost", "phone")
    second = await online(b, "bob@localhost/phone", "bob-secret")  # replaces it on B
    await asyncio.wait_for(first.ended.wait(), 5)
    await until(lambda: a.router.directory.get("bob@localhost", "phone") not in (None, old))
    assert old is not None
    old.terminate(StreamError("conflict", "a stale request"))
    # what A sends next reaches B's inbox after the request: when it arrives, the
    # request was handled
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    alice.send_message(mto="bob@localhost/phone", mbody="still there?", mtype="chat")
    assert await received(second) == "still there?"
    assert not second.ended.is_set()
    await close(alice)
    await close(second)


async def test_what_a_dead_node_left_in_its_inbox_is_routed_again_by_its_reaper(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Stanzas forwarded to a node that died before handling them are routed again by
    the node that reaps it (bob's session is gone: offline storage); a forward after
    the reap is refused and routed again by its sender, not left in a dead inbox."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None
    redis = a.cluster.redis
    ghost = schema.Entry("bob@localhost/ghost", "node-dead", 0, True, sid="g")
    await redis.hset(schema.sessions_key("bob@localhost"), "ghost", ghost.encode())
    await redis.sadd(schema.node_sessions_key("node-dead"), ghost.jid)
    await redis.sadd(schema.NODES, "node-dead")
    await redis.publish(schema.EVENTS, schema.set_event(ghost, 1))
    await until(lambda: b.router.directory.get("bob@localhost", "ghost") is not None)
    alice = await online(b, "alice@localhost/desk", "alice-secret")
    alice.send_message(mto="bob@localhost/ghost", mbody="before the reap", mtype="chat")
    await until_async(lambda: redis.xlen(schema.inbox_key("node-dead")), 1)
    # B does not hear of the reap: it still forwards to the dead node's session
    await b.cluster.sync.stop()
    await a.cluster.heartbeat.beat()
    await until(lambda: a.router.ledger.offline == 1)  # A took it over and stored it
    alice.send_message(mto="bob@localhost/ghost", mbody="after the reap", mtype="chat")
    await until(lambda: b.router.ledger.offline == 1)  # refused, routed again by B
    assert await redis.exists(schema.inbox_key("node-dead")) == 0
    # on B, which stored last: A's in-process cache does not see B's write (yet)
    later = await online(b, "bob@localhost/laptop", "bob-secret")
    got = {await received(later, timeout=5), await received(later, timeout=5)}
    assert got == {"before the reap", "after the reap"}
    await close(later)
    await close(alice)


async def test_stanzas_sent_at_once_to_a_node_share_an_entry_and_keep_their_order(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """A client's burst for sessions on one node is one inbox entry (xmppd.cluster.writer),
    not one per stanza; read back, here by the reaper of a node that died before it read
    it, its stanzas are routed again one by one, in order, as any orphan."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None
    redis = a.cluster.redis
    ghost = schema.Entry("bob@localhost/ghost", "node-dead", 0, True, sid="g")
    await redis.hset(schema.sessions_key("bob@localhost"), "ghost", ghost.encode())
    await redis.sadd(schema.node_sessions_key("node-dead"), ghost.jid)
    await redis.sadd(schema.NODES, "node-dead")
    await redis.publish(schema.EVENTS, schema.set_event(ghost, 1))
    await until(lambda: b.router.directory.get("bob@localhost", "ghost") is not None)
    alice = await online(b, "alice@localhost/desk", "alice-secret")
    # The first may wait for storage (bob's privacy list), and those behind it with it.
    alice.send_message(mto="bob@localhost/ghost", mbody="zero", mtype="chat")
    await until(lambda: b.cluster is not None and b.cluster.stats.forwards_out == 1)
    await b.cluster.writer.flush()
    bodies = ["one", "two", "three"]
    alice.send_raw("".join(
        f"<message xmlns='jabber:client' type='chat' to='bob@localhost/ghost'>"
        f"<body>{body}</body></message>"
        for body in bodies
    ))  # one write: the server routes the three in one go
    await until(lambda: b.cluster is not None and b.cluster.stats.forwards_out == 4)
    await b.cluster.writer.flush()
    assert await redis.xlen(schema.inbox_key("node-dead")) == 2
    await a.cluster.heartbeat.beat()
    await until(lambda: a.router.ledger.offline == 4)
    bodies.insert(0, "zero")
    later = await online(a, "bob@localhost/laptop", "bob-secret")
    assert [await received(later, timeout=5) for _ in bodies] == bodies
    await close(later)
    await close(alice)


async def until_async(value: Callable[[], Awaitable[object]], expected: object) -> None:
    """Until what `value` answers (from Redis) is `expected`."""
    deadline = time.monotonic() + 5.0
    while await value() != expected:
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_a_hung_redis_sends_cross_node_messages_offline_within_the_bound(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Redis frozen (SIGSTOP: connections stay open, nothing answers): a message for a
    session on the other node goes to offline storage after cluster.forward_wait plus
    at most one write timeout, and one sent after that goes there at once."""
    url = devservices.redis_url(redis_service)
    a = await start_server(cluster={"redis_url": url, "node_name": "node-a", "forward_wait": 1})
    b = await start_server(users={}, cluster={"redis_url": url, "node_name": "node-b"})
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    redis_service.pause()
    try:
        started = time.monotonic()
        alice.send_message(mto="bob@localhost", mbody="while redis hangs", mtype="chat")
        await until(lambda: a.router.ledger.offline == 1, timeout=10)
        waited = time.monotonic() - started
        alice.send_message(mto="bob@localhost", mbody="and at once", mtype="chat")
        await until(lambda: a.router.ledger.offline == 2, timeout=1)
    finally:
        redis_service.resume()
    assert waited < 1 + 2 + 0.5 + 0.5  # forward_wait, SEND_TIMEOUT, RETRY_DELAY, slack
    await close(alice)
    await close(bob)


async def settled(node: Server, timeout: float = 5.0) -> None:
    """Return once `node` has nothing in flight: no routing task and no write queued,
    both at once. A stanza going round between them never lets that happen."""
    assert node.cluster is not None
    writer = node.cluster.writer
    async with asyncio.timeout(timeout):
        while node.router.pending() or writer.queued:
            await node.router.drain()
            await writer.flush()


async def test_a_forward_redis_refuses_with_an_error_goes_offline_not_nowhere(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Redis answers the forward with an error (here OOM past maxmemory; a replica made
    read-only by a failover answers READONLY the same way): the pipeline succeeds, that
    one command failed, and its message must still go somewhere: offline storage, once.
    The replica still lists the recipient (its node lives; Redis only refuses writes),
    so the offline module, seeing an available session after storing, would hand it
    the message again, forwarded again, refused again (the loop once seen in CI,
    ~430 refusals in 5 s): the refused session counts as gone for a moment instead.
    The recipient finds the message at its next login."""
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    admin = Redis.from_url(devservices.redis_url(redis_service))
    await admin.config_set("maxmemory-policy", "noeviction")
    await admin.config_set("maxmemory", 1)
    try:
        alice.send_message(mto="bob@localhost/phone", mbody="refused by redis", mtype="chat")
        await until(lambda: a.router.ledger.offline >= 1)
        await settled(a)
        ledger = a.router.ledger.snapshot()
        assert (ledger["offline"], ledger["replayed"], ledger["lost"]) == (1, 0, 0)
        assert a.cluster.stats.forwards_refused == 1
    finally:
        await admin.config_set("maxmemory", 0)
        await admin.aclose()
    await close(bob)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    assert await received(bob) == "refused by redis"
    assert b.router.ledger.replayed == 1
    await close(alice)
    await close(bob)


async def test_a_node_stopped_while_redis_is_down_keeps_what_it_had_to_forward(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """A message for a session on another node still waits for Redis when this node
    stops (forward_wait longer than the stop's flush): it goes to offline storage,
    not away with the writer task."""
    url = devservices.redis_url(redis_service)
    a = await start_server(cluster={"redis_url": url, "node_name": "node-a", "forward_wait": 60})
    b = await start_server(users={}, cluster={"redis_url": url, "node_name": "node-b"})
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    assert a.cluster is not None
    stats = a.cluster.stats
    forwarded = stats.forwards_out
    redis_service.stop()
    alice.send_message(mto="bob@localhost/phone", mbody="queued at the stop", mtype="chat")
    await until(lambda: stats.forwards_out > forwarded)
    await a.stop()
    assert a.router.ledger.offline == 1
    await close(bob)
