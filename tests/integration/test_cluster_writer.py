"""The writer (xmppd.cluster.writer) and the reaper (xmppd.cluster.heartbeat) on a real
redis-server: what a batch answered "node gone" costs, the queue's bound while Redis
does not take writes and the resync after it, a reap racing the reaped node's
heartbeat.

Redis "does not take writes" while the writer's task is not started yet: what is
queued then waits, as in an outage, and the bound applies; starting the task is
Redis answering again."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

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
    writer.local = directory.written
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


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def overflowing(monkeypatch: pytest.MonkeyPatch, redis: Redis) -> tuple[Writer, ClusterDirectory]:
    """A writer whose queue holds 20 operations and sends 5 per round trip (so that a
    few sessions are past one batch and the bound), with a directory of its own."""
    monkeypatch.setattr(writer_module, "MAX_PENDING", 20)
    monkeypatch.setattr(writer_module, "BATCH", 5)
    writer = Writer(redis, "node-a", ClusterStats())
    directory = ClusterDirectory("node-a", writer)
    writer.local = directory.written
    return writer, directory


def fill(writer: Writer, directory: ClusterDirectory, session: ClientSession) -> None:
    """Write `session` again until the queue is at its bound."""
    while writer.queued < writer_module.MAX_PENDING:
        writer.updated(session, directory.written[session])


async def table(redis: Redis) -> tuple[set[str], set[str]]:
    """The full JIDs node-a's set lists, and those the accounts' hashes hold."""
    members = {m.decode() for m in await redis.smembers(schema.node_sessions_key("node-a"))}
    held = set()
    async for key in redis.scan_iter(match=schema.sessions_key("*")):
        bare = key.decode().removeprefix(schema.sessions_key(""))
        held |= {f"{bare}/{resource.decode()}" for resource in await redis.hkeys(key)}
    return members, held


async def test_a_session_bound_and_gone_during_an_overflow_is_not_left_in_the_table(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session binds while Redis takes nothing, its bind behind more than one batch;
    the queue fills; it logs out and its unbind is dropped. When Redis answers, the
    resync must not go by the table alone (the bind is not applied yet): the bind is
    applied after it, and the session would stay in the table for the node's life."""
    writer, directory = overflowing(monkeypatch, redis)
    sessions = [ClientSession(f"f{n}@x/r") for n in range(8)]
    for session in sessions:
        directory.add(session)
    ghost = ClientSession("a@x/r")
    directory.add(ghost)  # ninth: past the first batch
    fill(writer, directory, sessions[0])
    directory.remove(ghost)
    assert writer.queued == writer_module.MAX_PENDING  # its unbind was dropped
    writer.start()
    try:
        await asyncio.wait_for(writer.flush(), 10)
    finally:
        await writer.stop()
    members, held = await table(redis)
    assert members == held == {s.jid for s in sessions}


async def test_after_an_overflow_the_queue_drains_under_steady_writes(
    redis: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """More local sessions than one batch, the queue at its bound, a write dropped; once
    Redis answers, a presence change comes with every batch answered. The sessions are
    written again once: the queue falls under its bound, stanzas for other nodes are
    taken again, and the writer goes idle; the rewrite does not make the writes that
    come meanwhile be dropped and call for another rewrite, round after round."""
    writer, directory = overflowing(monkeypatch, redis)
    sessions = [ClientSession(f"m{n}@x/r") for n in range(38)]
    for session in sessions:
        directory.add(session)  # past the bound: dropped, the resync writes them
    busy = sessions[0]
    fill(writer, directory, busy)
    writer.updated(busy, directory.written[busy])  # dropped
    caplog.set_level(logging.INFO, logger=writer_module.__name__)
    writer.start()
    sizes = []
    try:
        for _ in range(60):  # one write per batch answered
            writer.updated(busy, directory.written[busy])
            queued = writer.queued
            await until(lambda queued=queued: writer.queued != queued)
            sizes.append(writer.queued)
        # At most the bound and one rewrite (3 ops to list the node, one per session).
        assert max(sizes) <= writer_module.MAX_PENDING + 3 + len(sessions)
        assert writer.queued < writer_module.MAX_PENDING
        assert writer.forward("node-b", "bob@x/phone", message(1))
        await asyncio.wait_for(writer.flush(), 10)
        assert writer.queued == 0
    finally:
        await writer.stop()
    rewrites = [r for r in caplog.records if "sessions of this node" in r.getMessage()]
    assert len(rewrites) == 1
    members, held = await table(redis)
    assert members == held == {s.jid for s in sessions}


async def test_a_resync_redis_refuses_is_logged_and_tried_again_on_its_own(
    redis: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading the node's set for the resync fails (here: the key holds a string, so
    Redis answers WRONGTYPE, and refuses the binds too). A warning names the cause, and
    the resync is tried again after a pause, also once nothing else is left to write;
    once Redis takes it, the table holds the node's sessions."""
    monkeypatch.setattr(writer_module, "RETRY_DELAY", 0.05)
    writer, directory = overflowing(monkeypatch, redis)
    await redis.set(schema.node_sessions_key("node-a"), "not a set")
    sessions = [ClientSession(f"u{n}@x/r") for n in range(8)]
    for session in sessions:
        directory.add(session)
    fill(writer, directory, sessions[0])
    writer.updated(sessions[0], directory.written[sessions[0]])  # dropped
    retried = asyncio.Event()  # warned while nothing else was queued

    class Warned(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if (
                record.levelno == logging.WARNING
                and "WRONGTYPE" in record.getMessage()
                and not writer.queued
            ):
                retried.set()

    handler = Warned()
    logging.getLogger(writer_module.__name__).addHandler(handler)
    writer.start()
    try:
        await asyncio.wait_for(retried.wait(), 10)
        await redis.delete(schema.node_sessions_key("node-a"))
        await asyncio.wait_for(writer.flush(), 10)
    finally:
        logging.getLogger(writer_module.__name__).removeHandler(handler)
        await writer.stop()
    members, held = await table(redis)
    assert members == held == {s.jid for s in sessions}


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
