"""A forwarded stanza that waits in a node's memory behind an account's queued jobs
(xmppd.cluster.waiting) survives that node's death, over a link and through the inbox.

Two real nodes in this process on one real redis-server and one storage: bob, on B,
sends alice a message while node A, where she just logged in, still reads her stored
messages (its store holds the read), so A queues it behind them. Then A dies: it
stops beating, reading its inbox and taking frames, and does nothing more (the held
read never answers there), and B reaps it, as a live node does a dead one's. The
message must reach alice afterwards: from offline storage, after the stored ones.

And at a clean stop: what the stopping node's last read of its inbox queues behind an
account's jobs is routed before its writer stops, or kept on the node if it comes
after (`Cluster.stop`).
"""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from tests.integration.clients import Client, close
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import online, received, seen_on, until
from tests.integration.test_cluster_modules import WAIT, new_message_while_stored_ones_are_read
from xmppd.cluster import schema
from xmppd.cluster.directory import node_of
from xmppd.cluster.tasks import cancel_for_sure
from xmppd.modules.offline import STORE as OFFLINE_STORE
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.base import Item, ItemBackend
from xmppd.storage.devservices import LocalService
from xmppd.storage.timing import OpStats, TimedItemBackend

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


class HeldOfflineWrites(TimedItemBackend):
    """A node's item store whose reads of the offline counters wait while the test holds
    them: storing a message offline waits for the store."""

    def __init__(self, inner: ItemBackend) -> None:
        super().__init__(inner, OpStats())
        self.gate = asyncio.Event()
        self.held = asyncio.Event()  # set once a read waits at the shut gate

    async def get(self, namespace: str, name: str) -> Item | None:
        if namespace.endswith(f"/{OFFLINE_STORE}") and not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await super().get(namespace, name)


async def forwarded_jobs_at_stop(
    start_server: StartServer, redis: LocalService
) -> tuple[Server, Server, HeldOfflineWrites, Client, asyncio.Task[None]]:
    """Nodes A and B, no links (what B sends A waits in A's inbox). alice/desk is on A;
    A stops reading its inbox, bob (on B) sends her "bare" to her bare JID, then
    "full" to alice/desk, both left in A's inbox. alice logs in again on B as
    alice/desk, priority -1 (a message to her bare JID is not for her). Then A stops:
    its last read of the inbox routes "bare" to offline storage, whose write waits
    (the store holds it), and queues "full" behind it (`Router.behind`); when "full"
    has its turn, alice/desk is on B: it is forwarded there. Returns the stop, running."""
    url = devservices.redis_url(redis)
    section = {"redis_url": url, "link": {"enabled": False}}
    a = await start_server(cluster={**section, "node_name": "node-a"})
    b = await start_server(users={}, cluster={**section, "node_name": "node-b"})
    assert a.cluster is not None and a.cluster.inbox is not None and b.cluster is not None
    old = await online(a, "alice@localhost/desk", "alice-secret")
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    await until(seen_on(b, "alice@localhost/desk"), WAIT)
    await a.cluster.inbox.pause()
    forwarded = b.cluster.stats.forwards_out
    bob.send_message(mto="alice@localhost", mbody="bare", mtype="chat")
    bob.send_message(mto="alice@localhost/desk", mbody="full", mtype="chat")
    await until(lambda: b.cluster is not None and b.cluster.stats.forwards_out == forwarded + 2)
    await b.cluster.writer.flush()
    alice = await online(b, "alice@localhost/desk", "alice-secret", priority=-1)
    await until(lambda: node_of_replica(a, "alice@localhost", "desk") == "node-b", WAIT)
    held = HeldOfflineWrites(a.storage.items)
    a.storage.items = held  # what the offline module stores with from now (ModuleHost.items)
    stopping = asyncio.ensure_future(a.stop())
    await asyncio.wait_for(held.held.wait(), WAIT)  # "bare" is being stored
    old.abort()
    await close(bob)
    return a, b, held, alice, stopping


def node_of_replica(node: Server, bare: str, resource: str) -> str | None:
    """Where `node`'s replica has bare/resource bound on another node (None: nowhere)."""
    assert node.cluster is not None
    session = node.cluster.directory._remote.get(bare, {}).get(resource)
    return None if session is None else node_of(session)


async def test_a_forwarded_stanza_queued_at_stop_is_forwarded_before_the_writer_stops(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Before, the stop read its inbox a last time, flushed and stopped its writer
    without waiting for the jobs that read queued: "full", forwarded after the writer
    stopped, was queued for a task that was gone, and lost. Now the stop waits for
    them (at most FLUSH_TIMEOUT) before its writer's last flush."""
    _, _, held, alice, stopping = await forwarded_jobs_at_stop(start_server, redis_service)
    held.gate.set()
    await asyncio.wait_for(stopping, 30)
    assert await received(alice, WAIT) == "full"  # live, on B, not stored
    await close(alice)


async def test_what_routes_after_the_writer_stopped_stays_on_the_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """The store answers only once A's writer stopped (past the stop's wait): "full" is
    routed after the writer is gone. Before, it was queued for the writer's task all the
    same, and lost; now a stopped writer refuses it, and it is stored offline."""
    a, b, held, alice, stopping = await forwarded_jobs_at_stop(start_server, redis_service)
    assert a.cluster is not None
    writer = a.cluster.writer
    try:
        await until(lambda: writer._task is None, 30)  # stopped
    finally:
        held.gate.set()
    await asyncio.wait_for(stopping, 30)
    later = await online(b, "alice@localhost/laptop", "alice-secret")
    assert sorted([await received(later, WAIT) for _ in range(2)]) == ["bare", "full"]
    assert alice.messages.empty()
    await close(later)
    await close(alice)


async def test_the_copy_is_not_deleted_before_the_stanza_routed_again_is_stored(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """"new" waits on A behind alice's stored messages (its copy in A's waiting
    stream, its inbox entry trimmed). alice's session ends before its turn: at its
    turn it is routed again, to offline storage, whose write takes a while (held
    here). The copy is deleted at once (XDEL right after `reroute` returned), before
    the store wrote it: A dies now, and nothing holds "new" any more."""
    a, b, held, alice, bob = await new_message_while_stored_ones_are_read(
        start_server, redis_service, False
    )
    assert a.cluster is not None and b.cluster is not None
    redis = b.cluster.redis
    waiting = schema.waiting_key("node-a")
    writes = HeldOfflineWrites(held)
    try:
        await until_trimmed(redis, "node-a")  # "new"'s entry: gone from A's inbox
        assert await redis.xlen(waiting) == 1  # its copy
        alice.abort()
        await until(lambda: not a.router.directory.has("alice@localhost"), WAIT)
        a.storage.items = writes  # storing a message offline now waits
        held.gate.set()  # the stored messages' read answers: "new" has its turn
        await asyncio.wait_for(writes.held.wait(), WAIT)  # "new" is being stored
        await a.cluster.writer.flush()
        copies = await redis.xlen(waiting)  # 0: deleted while the store holds "new"
        await die(a)  # A is killed while its store still writes "new"
        await b.cluster.heartbeat.beat()  # B reaps A: moves A's inbox and waiting stream
        later = await online(b, "alice@localhost/laptop", "alice-secret")
        got = [await received(later, WAIT) for _ in range(3)]
        assert got == ["old0", "old1", "old2"]
        try:
            got.append(await received(later, WAIT))
        except TimeoutError:
            pass
        assert got == ["old0", "old1", "old2", "new"], (
            f"lost: copies in A's waiting stream at the kill: {copies}; "
            f"B stored {b.router.ledger.offline}"
        )
        await close(later)
    finally:
        writes.gate.set()
        await close(bob)


async def test_a_clean_stop_leaves_no_handled_entry_for_the_next_process(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """The stop's last read of A's inbox queues "full" behind "bare" (held on
    storage): that entry is unsafe when `finish` trims, and nothing trims it after
    its turn came. The stop is clean and "full" was delivered, yet A's inbox still
    holds it: the next process named node-a routes it again."""
    a, b, held, alice, stopping = await forwarded_jobs_at_stop(start_server, redis_service)
    assert b.cluster is not None
    held.gate.set()
    await asyncio.wait_for(stopping, 30)
    assert await received(alice, WAIT) == "full"  # live, on B
    left = await b.cluster.redis.xrange(schema.inbox_key("node-a"))
    # The next process named node-a routes what its inbox holds: "full" again.
    url = devservices.redis_url(redis_service)
    await start_server(
        users={}, cluster={"redis_url": url, "node_name": "node-a", "link": {"enabled": False}}
    )
    again = None
    try:
        again = await received(alice, 5)
    except TimeoutError:
        pass
    await close(alice)
    assert left == [] and again is None, (
        f"after a clean stop A's inbox held {len(left)} entries; "
        f"the next node-a delivered {again!r} again"
    )


class SlowCopies:
    """A's writer as the waiting stream sees it, answering only once `gate` is set: the
    copy's XADD waits in the writer's queue (a backlog of writes ahead of it)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.gate = asyncio.Event()

    def command(self, command: object, on_result: object = None) -> None:
        async def later() -> None:
            await self.gate.wait()
            self.inner.command(command, on_result)  # type: ignore[attr-defined]

        asyncio.ensure_future(later())


async def test_a_nack_at_stop_does_not_send_back_frames_already_handled(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """"new2" comes over the link while A holds it behind alice's stored messages and
    its copy is not written yet (unsafe). A starts a clean stop (its links refuse from
    now); "new3" comes and is refused with a NACK. The NACK names the last safe frame,
    before "new2": B routes "new2" again (to offline storage) though A handled it and
    delivers it live: alice gets it twice. Before the merge the NACK named the last
    frame handled, and B routed only "new3" again."""
    a, b, held, alice, bob = await new_message_while_stored_ones_are_read(
        start_server, redis_service, True
    )
    assert a.cluster is not None and b.cluster is not None and a.cluster.link is not None
    slow = SlowCopies(a.cluster.writer)
    a.cluster.waiting.writer = slow  # type: ignore[assignment]
    try:
        forwarded = a.cluster.stats.forwards_in
        bob.send_message(mto="alice@localhost", mbody="new2", mtype="chat")
        await until(lambda: a.cluster.stats.forwards_in > forwarded, WAIT)
        await a.cluster.link.drain()  # what Cluster.stop does first
        bob.send_message(mto="alice@localhost", mbody="new3", mtype="chat")
        await until(lambda: b.cluster.stats.link_nacks > 0, WAIT)
        await until(lambda: b.router.ledger.offline > 3, WAIT)  # "new3" routed again
        await asyncio.sleep(0.5)  # time for any other frame the NACK gave back
        stored_on_b = b.router.ledger.offline - 3  # old0..2 before
        slow.gate.set()
        held.gate.set()
        got = []
        for _ in range(7):
            try:
                got.append(await received(alice, 3))
            except TimeoutError:
                break
        assert got.count("new2") == 1 and stored_on_b == 1, (
            f"alice got {got}; B routed {stored_on_b} stanzas again (offline) after the NACK"
        )
    finally:
        slow.gate.set()
        held.gate.set()
        alice.abort()
        await close(bob)
