"""Guesses sent at once from one address to two nodes of a cluster, over real TLS sockets
and a real redis-server: the nodes together check no more of them than the address has
failures left (PLAIN and SCRAM alike; SCRAM on a node alone too), every attempt past
those gets the banned address's answer, logged, and users behind one address logging in
on both nodes at once are all served."""

from __future__ import annotations

import base64
import logging

import pytest
import scramp
from redis import Redis as SyncRedis

from tests.integration.clients import HEADER, RawClient
from tests.integration.conftest import StartServer
from tests.integration.test_auth_throttle import STRANGER, WRONG, failures, outcome, plain
from tests.integration.test_cluster_bus import nodes
from tests.integration.test_scram_plus import SASL, element_text
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
    """Two wrong passwords for bob from STRANGER, one on each node (a is b: a node
    alone): one failure left."""
    for raw in await streams_on([a, b]):
        await raw.send(plain("bob", WRONG))
        assert failures(await raw.read_until(b"</failure>")) == ["not-authorized"]
        await raw.close()


def address_failures(redis: LocalService) -> int:
    with SyncRedis.from_url(devservices.redis_url(redis)) as admin:
        return int(admin.get(count_key(f"ip:{STRANGER}")) or 0)


def judge(
    replies: list[bytes], servers: set[Server], caplog: pytest.LogCaptureFixture
) -> None:
    """One guess was checked, its failure banned the address; every other attempt got
    the same refusal, unchecked, and a log line."""
    conditions = [failures(reply) for reply in replies]
    assert conditions.count(["not-authorized"]) == 1, replies
    banned = [reply for reply in replies if failures(reply) == ["temporary-auth-failure"]]
    assert len(banned) == len(replies) - 1, replies
    assert len(set(banned)) == 1  # the same bytes on every node
    assert sum(node.throttle.stats.failures for node in servers) == 3  # 2 before, 1 now
    assert sum(node.throttle.stats.refusals for node in servers) == len(replies) - 1
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == len(replies) - 1 and all(STRANGER in m for m in refusals)


async def test_plain_guesses_at_once_on_two_nodes_get_only_the_failures_left(
    redis_service: LocalService, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xmppd.auth.throttle")
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
    judge(replies, {a, b}, caplog)
    assert address_failures(redis_service) == 3


@pytest.mark.parametrize("cluster", [False, True], ids=["one node", "two nodes"])
async def test_scram_proofs_at_once_get_only_the_failures_left(
    cluster: bool,
    start_server: StartServer,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    """Eight SCRAM exchanges from one address (on two nodes: four per node), their
    client-final messages sent at once: one proof is checked (a guess: the client
    derived its key), the others are refused as the banned address's, unchecked."""
    caplog.set_level(logging.INFO, logger="xmppd.auth.throttle")
    if cluster:
        redis = request.getfixturevalue("redis_service")
        a, b = await nodes(start_server, redis, limits=LIMITS)
    else:
        a = b = await start_server(limits=LIMITS)
    await two_failures_left_one(a, b)
    streams = await streams_on([a, b] * 4)
    clients = []
    for raw in streams:
        client = scramp.ScramClient(["SCRAM-SHA-256"], "alice", WRONG)
        first = base64.b64encode(client.get_client_first().encode()).decode()
        await raw.send(f"<auth xmlns='{SASL}' mechanism='SCRAM-SHA-256'>{first}</auth>")
        challenge = await raw.read_until(b"</challenge>")  # not banned yet: a challenge
        client.set_server_first(base64.b64decode(element_text(challenge, "challenge")).decode())
        clients.append(client)
    for raw, client in zip(streams, clients, strict=True):
        final = base64.b64encode(client.get_client_final().encode()).decode()
        raw.writer.write(f"<response xmlns='{SASL}'>{final}</response>".encode())
    replies = [await outcome(raw) for raw in streams]
    for raw in streams:
        await raw.close()
    judge(replies, {a, b}, caplog)
    if cluster:
        assert address_failures(redis) == 3


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
