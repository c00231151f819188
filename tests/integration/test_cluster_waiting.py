"""A forwarded stanza that waits in a node's memory behind an account's queued jobs
(xmppd.cluster.waiting) survives that node's death, over a link and through the inbox.

Two real nodes in this process on one real redis-server and one storage: bob, on B,
sends alice a message while node A, where she just logged in, still reads her stored
messages (its store holds the read), so A queues it behind them. Then A dies: it
stops beating, reading its inbox and taking frames, and does nothing more (the held
read never answers there), and B reaps it, as a live node does a dead one's. The
message must reach alice afterwards: from offline storage, after the stored ones.
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import online, received, until
from tests.integration.test_cluster_modules import WAIT, new_message_while_stored_ones_are_read
from xmppd.cluster import schema
from xmppd.cluster.tasks import cancel_for_sure
from xmppd.server import Server
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)


async def die(node: Server) -> None:
    """What a SIGKILL leaves of `node` as the others see it: no more beats (its alive
    key gone, as when it expires), no more reads of its inbox (nothing trimmed either),
    and frames on its links refused as by a node past its TTL. Its memory stays, but
    nothing in it runs on that matters here: the read its store holds never ends."""
    cluster = node.cluster
    assert cluster is not None and cluster.inbox is not None
    heartbeat = cluster.heartbeat
    assert heartbeat._task is not None
    heartbeat._task.cancel()
    if heartbeat.keep_alive is not None:
        await heartbeat.keep_alive.stop()
    if cluster.link is not None:
        cluster.link.live = lambda: False
    reader = cluster.inbox._task
    assert reader is not None
    await cancel_for_sure(reader)
    cluster.inbox._task = None  # its stop at the test's end has no reader to stop
    await cluster.redis.delete(schema.alive_key(cluster.node))


@pytest.mark.parametrize("link", [True, False], ids=["link", "inbox"])
async def test_a_stanza_waiting_behind_stored_messages_survives_its_node_s_death(
    redis_service: LocalService, start_server: StartServer, link: bool
) -> None:
    """Before, A let go of "new" once it was queued: its inbox entry was trimmed within
    a second, its link frame acknowledged within 50 ms, and the reaper found nothing.
    Now its copy is in A's waiting stream before either, and the reaper routes it."""
    a, b, held, alice, bob = await new_message_while_stored_ones_are_read(
        start_server, redis_service, link
    )
    assert a.cluster is not None and b.cluster is not None
    try:
        if link:
            assert b.cluster.link is not None
            assert b.cluster.stats.link_stanzas_out > 0
            peers = b.cluster.link._peers
            # B holds nothing for A once A acknowledged the frame.
            await until(lambda: not any(peer.held for peer in peers.values()), WAIT)
        else:
            # A's inbox holds nothing once A trimmed the entry.
            await until_trimmed(b.cluster.redis, a.cluster.node)
        await die(a)
        await b.cluster.heartbeat.beat()  # B finds A's key gone: it reaps A
        await until(lambda: b.router.ledger.offline == 4, WAIT)  # 3 stored before, "new"
        later = await online(b, "alice@localhost/laptop", "alice-secret")
        got = [await received(later, WAIT) for _ in range(4)]
        assert got == ["old0", "old1", "old2", "new"]
        await close(later)
        await close(bob)
    finally:
        held.gate.set()  # A's stop at the end waits for the queue behind the read
        alice.abort()


async def until_trimmed(redis: Redis, node: str) -> None:
    """Until `node`'s inbox holds no entry (Redis answers: not `until`'s condition)."""
    for _ in range(int(WAIT / 0.05)):
        if await redis.xlen(schema.inbox_key(node)) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the inbox of {node} was not trimmed")

