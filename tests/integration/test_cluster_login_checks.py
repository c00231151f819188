"""Guesses sent at once from one address to two nodes of a cluster, over real TLS sockets
and a real redis-server: the nodes together check no more of them than the address has
failures left, every attempt past those gets the banned
address's answer, and users behind one address logging in on both nodes at once are
all served."""

from __future__ import annotations

import pytest
from redis import Redis as SyncRedis

from tests.integration.clients import HEADER, RawClient
from tests.integration.conftest import StartServer
from tests.integration.test_auth_throttle import STRANGER, WRONG, failures, outcome, plain
from tests.integration.test_cluster_bus import nodes
from xmppd.cluster.throttle import count_key
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

LIMITS = {"auth_failures_before_ban": 3, "auth_ban_seconds": 60, "auth_failure_delay": 0.01}


async def streams_on(servers: list[Server]) -> list[RawClient]:
    """One stream from STRANGER to each of `servers`, at its features."""
    opened = []
    for server in servers:
        raw = await RawClient.open(server, source=STRANGER)
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        opened.append(raw)
    return opened


async def two_failures_left_one(a: Server, b: Server) -> None:
    """Two wrong passwords for bob from STRANGER, one on each node: one failure left."""
    for raw in await streams_on([a, b]):
        await raw.send(plain("bob", WRONG))
        assert failures(await raw.read_until(b"</failure>")) == ["not-authorized"]
        await raw.close()


def address_failures(redis: LocalService) -> int:
    with SyncRedis.from_url(devservices.redis_url(redis)) as admin:
        return int(admin.get(count_key(f"ip:{STRANGER}")) or 0)


def judge(replies: list[bytes], a: Server, b: Server, redis: LocalService) -> None:
    """One guess was checked, its failure banned the address; every other attempt got
    the same refusal, unchecked."""
    conditions = [failures(reply) for reply in replies]
    assert conditions.count(["not-authorized"]) == 1, replies
    banned = [reply for reply in replies if failures(reply) == ["temporary-auth-failure"]]
    assert len(banned) == len(replies) - 1, replies
    assert len(set(banned)) == 1  # the same bytes on both nodes
    assert a.throttle.stats.failures + b.throttle.stats.failures == 3  # 2 before, 1 now
    assert address_failures(redis) == 3
    assert a.throttle.stats.refusals + b.throttle.stats.refusals == len(replies) - 1


async def test_plain_guesses_at_once_on_two_nodes_get_only_the_failures_left(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b = await nodes(start_server, redis_service, limits=LIMITS)
    await two_failures_left_one(a, b)
    streams = await streams_on([a, b] * 4)
    # Written without a wait between them: both nodes run in this event loop, so all
    # eight are in their sockets before either reads one.
    for raw in streams:
        raw.writer.write(plain("alice", WRONG).encode())
    replies = [await outcome(raw) for raw in streams]
    for raw in streams:
        await raw.close()
    judge(replies, a, b, redis_service)


async def test_users_behind_one_address_logging_in_on_two_nodes_at_once_are_all_served(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Six right passwords from one address, three per node, with a ban after three
    failures: the checks past three wait for one to end on either node, then are
    checked; none is refused for the others' checks."""
    a, b = await nodes(start_server, redis_service, limits=LIMITS)
    streams = await streams_on([a, b] * 3)
    for raw in streams:
        raw.writer.write(plain("alice", "alice-secret").encode())
    replies = [await outcome(raw) for raw in streams]
    for raw in streams:
        await raw.close()
    assert all(b"<success" in reply for reply in replies), replies
    assert a.throttle.stats.refusals == b.throttle.stats.refusals == 0
