"""The login throttle's counts in Redis (xmppd.cluster.throttle) on its own connection,
against a real redis-server: a login given up while its read waits leaves the
connection and the other logins' reads alone (no outage declared for it); a Redis that
lost its scripts still counts; a Redis that does not answer within the throttle's
timeout has the attempt judged on the node's own count and its connection dropped,
and is asked again on a new one `RETRY_AFTER` seconds later."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from xmppd.auth.throttle import MemoryFailureCounter
from xmppd.cluster import throttle
from xmppd.cluster.throttle import RETRY_AFTER, RedisFailureCounter, count_key
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)



async def test_a_login_given_up_while_its_read_waits_leaves_the_others_theirs(
    redis_service: LocalService,
) -> None:
    counter = RedisFailureCounter(
        Redis.from_url(devservices.redis_url(redis_service)), 60.0, MemoryFailureCounter(60.0)
    )
    try:
        assert await counter.record_failure("ip:1") == 1  # connected
        given_up = asyncio.create_task(counter.failures("ip:1"))
        other = asyncio.create_task(counter.failures("ip:1"))
        await asyncio.sleep(0)  # both tasks' first step: both reads are sent, unanswered
        given_up.cancel()  # its client went away mid-login
        assert await other == 1  # Redis' count, not the node's own (0)
        assert counter._down_until is None
        assert given_up.cancelled()
    finally:
        await counter.close()


async def test_a_redis_that_lost_its_scripts_still_counts(redis_service: LocalService) -> None:
    counter = RedisFailureCounter(
        Redis.from_url(devservices.redis_url(redis_service)), 60.0, MemoryFailureCounter(60.0)
    )
    try:
        assert await counter.record_failure("ip:1") == 1
        with SyncRedis.from_url(devservices.redis_url(redis_service)) as admin:
            admin.script_flush()
            assert await counter.record_failure("ip:1") == 2
            assert admin.pttl(count_key("ip:1")) > 59_000
        assert counter._down_until is None
    finally:
        await counter.close()


async def test_a_failure_counts_every_key_in_one_round_trip(
    redis_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed login counts its address and its address with the account: both in one
    round trip, each once, also when Redis lost its scripts between two failures."""
    counter = RedisFailureCounter(
        Redis.from_url(devservices.redis_url(redis_service)), 60.0, MemoryFailureCounter(60.0)
    )
    trips: list[int] = []
    call = counter._channel.call

    async def counted(commands: Any, **kwargs: Any) -> list[Any]:
        trips.append(len(commands))
        return await call(commands, **kwargs)

    monkeypatch.setattr(counter._channel, "call", counted)
    try:
        await counter.record_failure("warm")  # the script loaded (a fresh Redis has not)
        trips.clear()
        assert await counter.record_failure("ip:1", "pair:1:alice") == 1
        assert trips == [2]
        assert await counter.record_failure("ip:1", "pair:1:bob") == 2
        with SyncRedis.from_url(devservices.redis_url(redis_service)) as admin:
            admin.script_flush()
            assert await counter.record_failure("ip:1", "pair:1:alice") == 3
            counts = [admin.get(count_key(key)) for key in ("ip:1", "pair:1:alice", "pair:1:bob")]
        assert counts == [b"3", b"2", b"1"]  # each counted once, the flush notwithstanding
        assert counter._down_until is None
    finally:
        await counter.close()


async def test_a_redis_that_does_not_answer_is_judged_locally_then_asked_on_a_new_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(throttle, "TIMEOUT", 0.1)
    connections: list[asyncio.Event] = []  # each set once its connection is closed
    arrived = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        closed = asyncio.Event()
        connections.append(closed)
        arrived.set()
        while await reader.read(65536):
            pass  # read, never answered
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    now = [0.0]
    counter = RedisFailureCounter(
        Redis.from_url(f"redis://127.0.0.1:{port}"),
        60.0,
        MemoryFailureCounter(60.0),
        clock=lambda: now[0],
    )
    try:
        async with asyncio.timeout(10):
            # judged on this node's count, one timeout late, not an exception
            assert await counter.record_failure("ip:1") == 1
            # on a busy host the timeout can end the call before this loop ran the
            # server's accept: the connection was made (its SYN went), so wait for it
            await arrived.wait()
            [first] = connections
            await first.wait()  # dropped: not kept behind a read that got no answer
            assert await counter.record_failure("ip:1") == 2  # Redis not asked again yet
            assert len(connections) == 1
            now[0] += RETRY_AFTER
            arrived.clear()
            assert await counter.failures("ip:1") == 2  # asked again, still silent
            await arrived.wait()
            assert len(connections) == 2
    finally:
        await counter.close()
        server.close()
        await server.wait_closed()
