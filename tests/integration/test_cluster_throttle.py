"""The login throttle's counts in Redis (xmppd.cluster.throttle) on its own connection,
against a real redis-server: a login given up while its read waits leaves the
connection and the other logins' reads alone (no outage declared for it); a Redis that
lost its scripts still counts; a Redis that does not answer within the throttle's
timeout has the attempt judged on the node's own count and its connection dropped,
and is asked again on a new one `RETRY_AFTER` seconds later. The password checks under
way are counted in Redis too: two nodes together run no more of an address's checks
than it has failures left, a dead node's checks expire, and while Redis fails the
checks are taken on the node."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from xmppd.auth.throttle import AuthThrottle, Check, MemoryFailureCounter
from xmppd.cluster import throttle
from xmppd.cluster.throttle import RETRY_AFTER, RedisFailureCounter, checks_key, count_key
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


def node_throttle(redis_service: LocalService, before_ban: int) -> AuthThrottle:
    """What a node of a cluster makes: its own counter on the shared Redis."""
    counter = RedisFailureCounter(
        Redis.from_url(devservices.redis_url(redis_service)), 60.0, MemoryFailureCounter(60.0)
    )
    return AuthThrottle(counter, before_ban, 60.0, failure_delay=0.01)


async def close_throttle(node: AuthThrottle) -> None:
    assert isinstance(node.counter, RedisFailureCounter)
    await node.counter.close()


async def waits(attempt: asyncio.Future[Check | None]) -> bool:
    """True when `attempt` is still waiting for a turn after a few rechecks."""
    await asyncio.sleep(3 * throttle.RECHECK_AFTER)
    return not attempt.done()


async def test_two_nodes_run_no_more_checks_of_an_address_than_its_failures_left(
    redis_service: LocalService,
) -> None:
    """One failure of three counted: the two nodes together take two checks, and the
    attempts past those wait, on either node, whichever node ends a check; once the
    checks' failures ban the address every waiting attempt is refused."""
    a, b = node_throttle(redis_service, 3), node_throttle(redis_service, 3)
    ip, alice = "192.0.2.7", "alice@example.org"
    try:
        assert await a.failed(ip, "bob@example.org") == 0.01
        on_a = await a.reserve(ip, alice)
        on_b = await b.reserve(ip, alice)
        assert on_a is not None and on_b is not None
        more = [asyncio.ensure_future(node.reserve(ip, alice)) for node in (a, b, a, b)]
        assert all([await waits(attempt) for attempt in more])  # not one more check
        assert await b.reserve("192.0.2.8", alice) is not None  # another address: free
        assert await b.failed(ip, alice) == 0.02
        await b.release(on_b)  # 2 failures + 1 check under way: still the ban's worth
        assert all([await waits(attempt) for attempt in more])
        assert await a.failed(ip, alice) is not None  # the third failure: banned
        await a.release(on_a)
        async with asyncio.timeout(10):
            assert await asyncio.gather(*more) == [None] * 4  # refused, on both nodes
        assert a.stats.refusals + b.stats.refusals == 4
        with SyncRedis.from_url(devservices.redis_url(redis_service)) as admin:
            assert admin.zcard(checks_key(f"ip:{ip}")) == 0  # every check given back
    finally:
        await close_throttle(a)
        await close_throttle(b)


async def test_a_check_given_back_on_one_node_lets_an_attempt_waiting_on_the_other_in(
    redis_service: LocalService,
) -> None:
    """Users behind one address (a NAT) logging in on two nodes at once: past the ban's
    worth of checks they wait, and are checked as the others' checks end, not refused."""
    a, b = node_throttle(redis_service, 1), node_throttle(redis_service, 1)
    ip, alice = "192.0.2.7", "alice@example.org"
    try:
        first = await a.reserve(ip, alice)
        assert first is not None
        second = asyncio.ensure_future(b.reserve(ip, alice))
        assert await waits(second)
        await a.release(first)  # a right password: no failure
        async with asyncio.timeout(10):
            check = await second
        assert check is not None
        await b.release(check)
        assert a.stats.refusals == b.stats.refusals == 0
    finally:
        await close_throttle(a)
        await close_throttle(b)


async def test_the_checks_of_a_node_that_died_mid_check_expire(
    redis_service: LocalService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(throttle, "CHECK_LIFETIME", 0.5)
    a, b = node_throttle(redis_service, 1), node_throttle(redis_service, 1)
    ip, alice = "192.0.2.7", "alice@example.org"
    try:
        assert await a.reserve(ip, alice) is not None
        await close_throttle(a)  # node A is gone, its check never given back
        later = asyncio.ensure_future(b.reserve(ip, alice))
        assert await waits(later)  # the check counts while it may still run...
        async with asyncio.timeout(10):
            check = await later  # ...and expires: the address is not locked out
        assert check is not None
        await b.release(check)
    finally:
        await close_throttle(b)


async def test_checks_are_taken_on_the_node_while_redis_fails(
    redis_service: LocalService,
) -> None:
    """Neither an open door nor a lockout: the node's own counter takes the checks,
    with the node's own count of failures, while Redis fails; a check Redis took that
    ends meanwhile is left to expire there, and judging goes back to Redis after."""
    now = [0.0]
    counter = RedisFailureCounter(
        Redis.from_url(devservices.redis_url(redis_service)),
        60.0,
        MemoryFailureCounter(60.0),
        clock=lambda: now[0],
    )
    node = AuthThrottle(counter, 2, 60.0, failure_delay=0.01)
    ip, alice = "192.0.2.7", "alice@example.org"
    try:
        shared = await node.reserve(ip, alice)
        assert shared is not None and shared.member is not None  # taken in Redis
        redis_service.stop()
        await node.release(shared)  # cannot be given back: no exception, no local change
        assert counter._down_until is not None
        local = await node.reserve(ip, alice)
        assert local is not None and local.member is None  # taken on the node
        other = await node.reserve(ip, alice)  # 2 under way: the ban's worth
        assert other is not None
        third = asyncio.ensure_future(node.reserve(ip, alice))
        assert await waits(third)
        assert await node.failed(ip, alice) == 0.01  # counted on the node
        assert await node.failed(ip, alice) == 0.02  # banned on this node
        await node.release(local)
        await node.release(other)
        async with asyncio.timeout(10):
            assert await third is None
        redis_service.start()
        now[0] += RETRY_AFTER
        back = await node.reserve(ip, alice)  # Redis restarted empty: its count, its check
        assert back is not None and back.member is not None
        await node.release(back)
    finally:
        await counter.close()


async def test_a_check_taken_in_redis_whose_answer_was_lost_is_given_back(
    redis_service: LocalService,
) -> None:
    """The login is given up while its TAKE_CHECK is on the way (Redis holds it back:
    CLIENT PAUSE WRITE): the script still runs once Redis goes on, and nobody will end
    that check, which would hold one of the address's places for CHECK_LIFETIME. It
    is given back on its own."""
    url = devservices.redis_url(redis_service)
    counter = RedisFailureCounter(Redis.from_url(url), 60.0, MemoryFailureCounter(60.0))
    key = "ip:192.0.2.77"
    _, warm_up = await counter.take_check("ip:192.0.2.78", 3)  # Redis knows the script
    assert warm_up is not None
    await counter.end_check(warm_up)
    with SyncRedis.from_url(url) as admin:
        admin.config_resetstat()
        try:
            admin.execute_command("CLIENT", "PAUSE", 400, "WRITE")  # scripts wait
            taking = asyncio.ensure_future(counter.take_check(key, 3))
            await asyncio.sleep(0.1)  # sent, held by the pause
            taking.cancel()
            with pytest.raises(asyncio.CancelledError):
                await taking
            for _ in range(100):  # the pause ends; the script, then the give-back, run
                ran = admin.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
                if ran and admin.zcard(checks_key(key)) == 0:
                    break
                await asyncio.sleep(0.05)
            assert ran == 1  # the check was taken in Redis...
            assert admin.zcard(checks_key(key)) == 0  # ...and given back
        finally:
            await counter.close()
