"""The writer (xmppd.cluster.writer) and the reaper (xmppd.cluster.heartbeat) on a real
redis-server: what a batch answered "node gone" costs, the queue's bound while Redis
does not take writes, a reap racing the reaped node's heartbeat."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from lxml import etree
from redis.asyncio import Redis

from xmppd.cluster import schema
from xmppd.cluster import writer as writer_module
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.heartbeat import Heartbeat
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.writer import Writer
from xmppd.session import ClientSession
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def redis(redis_service: LocalService) -> AsyncIterator[Redis]:
    client = Redis.from_url(devservices.redis_url(redis_service))
    yield client
    await client.aclose()


def message(n: int) -> etree._Element:
    return etree.fromstring(f"<message xmlns='jabber:client' id='m{n}'/>")


async def test_a_batch_of_forwards_to_a_reaped_node_drops_its_sessions_once(
    redis: Redis,
) -> None:
    """Every forward of a batch to a reaped node is refused; each is routed again, but
    the replica is walked for that node once, not once per stanza (a walk of 100k
    remote sessions takes tens of milliseconds of the event loop)."""
    writer = Writer(redis, "node-a", ClusterStats())
    gone: list[str] = []
    rerouted: list[str | None] = []
    writer.on_gone = gone.append
    writer.reroute = lambda stanza, hops, avoid: rerouted.append(stanza.get("id"))
    await redis.set(schema.gone_key("node-b"), "1", ex=60)
    for n in range(200):  # several inbox entries (PER_ENTRY) in one batch
        assert writer.forward("node-b", "bob@x/phone", message(n))
    writer.start()
    try:
        await writer.flush()
    finally:
        await writer.stop()
    assert rerouted == [f"m{n}" for n in range(200)]
    assert gone == ["node-b"]


async def test_past_the_bound_table_writes_are_dropped_and_the_sessions_written_again(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While Redis takes nothing, logins and logouts past MAX_PENDING queued writes are
    dropped, not queued without end; once it answers, the table gets this node's
    sessions as they are then: the ones bound written, the ones gone (their unbind
    dropped, or a leftover) removed."""
    monkeypatch.setattr(writer_module, "MAX_PENDING", 20)
    writer = Writer(redis, "node-a", ClusterStats())
    directory = ClusterDirectory("node-a", writer)
    writer.local_entries = directory.local_entries
    leftover = schema.Entry("old@x/r", "node-a", 0, True, sid="s")
    await redis.hset(schema.sessions_key("old@x"), "r", leftover.encode())
    await redis.sadd(schema.node_sessions_key("node-a"), "old@x/r")
    sessions = [ClientSession(f"u{n}@x/r") for n in range(60)]
    for session in sessions:  # the writer's task is not running: Redis takes nothing
        directory.add(session)
        assert writer.queued <= 20
    for session in sessions[:30]:
        directory.remove(session)
        assert writer.queued <= 20
    writer.start()
    try:
        await writer.flush()
    finally:
        await writer.stop()
    members = {m.decode() for m in await redis.smembers(schema.node_sessions_key("node-a"))}
    assert members == {s.jid for s in sessions[30:]}
    for n, session in enumerate(sessions):
        stored = await redis.hget(schema.sessions_key(session.bare), "r")
        assert (stored is not None) == (n >= 30), session.jid
    assert await redis.hget(schema.sessions_key("old@x"), "r") is None


async def test_a_reap_leaves_a_node_whose_alive_key_is_set_again(redis: Redis) -> None:
    """The reaper saw node-b's alive key expired; node-b (its keep-alive thread) sets it
    again and writes its sessions back before REAP runs: REAP must leave them, or
    node-b would live on without its sessions and never notice."""
    entry = schema.Entry("bob@x/phone", "node-b", 0, True, sid="s")
    await redis.hset(schema.sessions_key("bob@x"), "phone", entry.encode())
    await redis.sadd(schema.node_sessions_key("node-b"), "bob@x/phone")
    await redis.sadd(schema.NODES, "node-b")
    await redis.set(schema.alive_key("node-b"), "1", ex=60)  # set again after the check
    reaper = Heartbeat(redis, "node-a", lambda: None, ClusterStats())
    assert await reaper.reap("node-b") == []
    assert await redis.hget(schema.sessions_key("bob@x"), "phone") is not None
    assert await redis.sismember(schema.NODES, "node-b")
    assert not await redis.exists(schema.gone_key("node-b"))
    # Its key expired for good: reaped.
    await redis.delete(schema.alive_key("node-b"))
    assert [e.jid for e in await reaper.reap("node-b")] == ["bob@x/phone"]
    assert await redis.hget(schema.sessions_key("bob@x"), "phone") is None
