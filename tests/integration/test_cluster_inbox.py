"""A node's inbox reader (xmppd.cluster.inbox) on a real redis-server whose connection
to it goes silent: nothing answers on it any more and nothing closes it (a Redis host
gone behind a path that drops packets, a failover behind the same address), while new
connections reach Redis. The reader gives that connection up once a read took
BLOCK_MS plus READ_TIMEOUT, and reads what the other nodes add to the inbox meanwhile
on a new one, instead of waiting on it for good with the node alive and its inbox
filling."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from lxml import etree
from redis.asyncio import Redis

from xmppd.cluster import schema
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.heartbeat import TTL
from xmppd.cluster.inbox import BLOCK_MS, READ_TIMEOUT, RETRY_DELAY, Inbox, Item
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync
from xmppd.cluster.waiting import Waiting
from xmppd.cluster.writer import Writer
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)



class Relay:
    """A TCP relay to Redis whose open connections can be silenced: from `silence` on,
    what they carry either way is dropped and they stay open; connections made after
    are relayed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.silenced: set[asyncio.StreamWriter] = set()
        self.open: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)  # ended with the relay
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.open |= {writer, up_writer}
        pipes = [
            asyncio.create_task(self._pipe(reader, up_writer, writer)),
            asyncio.create_task(self._pipe(up_reader, writer, up_writer)),
        ]
        self.tasks.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        for end in (writer, up_writer):
            end.close()

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, own: asyncio.StreamWriter
    ) -> None:
        while data := await source.read(65536):
            if own in self.silenced or sink in self.silenced:
                continue  # silenced: dropped, the connection kept open
            sink.write(data)
            await sink.drain()

    def silence(self) -> None:
        self.silenced |= self.open


@contextlib.asynccontextmanager
async def relay_to(service: LocalService) -> AsyncIterator[tuple[Relay, int]]:
    relay = Relay(service.port)
    server = await asyncio.start_server(relay.serve, "127.0.0.1", 0)
    try:
        yield relay, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in relay.open:
            writer.transport.abort()
        for task in relay.tasks:
            task.cancel()
        await asyncio.gather(*relay.tasks, return_exceptions=True)


def nothing_queued(bare: str, job: object, item: Item) -> bool:
    """`Router.behind` of a node with no routing job queued: each stanza goes straight."""
    return False


def item(to: str, body: str) -> dict[str, bytes | str | int]:
    """An inbox entry another node's writer would add: one stanza for `to`."""
    stanza = f"<message xmlns='jabber:client' to='{to}' type='chat'><body>{body}</body></message>"
    return {"to": to, "stanza": stanza.encode(), "hops": 1}


async def test_a_silent_connection_is_given_up_and_the_inbox_read_on_a_new_one(
    redis_service: LocalService,
) -> None:
    direct = Redis.from_url(devservices.redis_url(redis_service))
    async with relay_to(redis_service) as (relay, port):
        redis = Redis.from_url(f"redis://127.0.0.1:{port}", socket_connect_timeout=2)
        stats = ClusterStats()
        writer = Writer(redis, "node-a", stats, 5.0, TTL)
        directory = ClusterDirectory("node-a", writer)
        sync = ReplicaSync(redis, directory, lambda: None, stats)
        rerouted: asyncio.Queue[str] = asyncio.Queue()

        def reroute(stanza: etree._Element, hops: int) -> None:
            rerouted.put_nowait(stanza.findtext("{jabber:client}body") or "")

        inbox = Inbox(
            redis, "node-a", directory, reroute, stats, sync, nothing_queued,
            Waiting(writer, "node-a"),
        )
        key = schema.inbox_key("node-a")
        inbox.start()
        try:
            await direct.xadd(key, item("bob@localhost/phone", "before"))
            assert await asyncio.wait_for(rerouted.get(), 5) == "before"
            relay.silence()  # the reader's connection: its next XREAD is never answered
            await direct.xadd(key, item("bob@localhost/phone", "after"))
            bound = BLOCK_MS / 1000 + READ_TIMEOUT + RETRY_DELAY + 2.0  # slack
            assert await asyncio.wait_for(rerouted.get(), bound) == "after"
        finally:
            await inbox.pause()
            await redis.aclose()
            await direct.aclose()


async def test_a_large_read_is_handled_in_slices_with_the_loop_turning_between(
    redis_service: LocalService,
) -> None:
    """One XREAD may bring BATCH entries of up to 64 stanzas each: the reader lets the
    event loop turn every YIELD_EVERY stanzas (the node's clients are served
    meanwhile), and handles them in order."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    stats = ClusterStats()
    writer = Writer(redis, "node-a", stats, 5.0, TTL)
    directory = ClusterDirectory("node-a", writer)
    sync = ReplicaSync(redis, directory, lambda: None, stats)
    bodies: list[str] = []
    turns: list[int] = []  # how many stanzas were handled at each turn of the loop
    done = asyncio.Event()
    total = 20 * 64

    def reroute(stanza: etree._Element, hops: int) -> None:
        bodies.append(stanza.findtext("{jabber:client}body") or "")
        if len(bodies) == total:
            done.set()

    async def watch() -> None:
        while not done.is_set():
            turns.append(len(bodies))
            await asyncio.sleep(0)

    key = schema.inbox_key("node-a")
    for entry in range(20):  # as a sender's writer puts 64 stanzas in a row in one entry
        fields: list[tuple[str, bytes | str | int]] = []
        for n in range(64):
            fields += item("bob@localhost/phone", str(entry * 64 + n)).items()
        await redis.execute_command("XADD", key, "*", *(v for pair in fields for v in pair))
    inbox = Inbox(
        redis, "node-a", directory, reroute, stats, sync, nothing_queued,
        Waiting(writer, "node-a"),
    )
    watcher = asyncio.create_task(watch())
    inbox.start()
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await inbox.pause()
        await watcher
        await redis.aclose()
    assert bodies == [str(n) for n in range(total)]
    assert any(0 < handled < total for handled in turns)


async def test_orphans_of_a_node_live_again_leave_its_sessions_in_the_replica(
    redis_service: LocalService,
) -> None:
    """Orphans (moved here by a reap) drop their node's sessions from the replica first,
    unless that node is live again (reaped while held up, it wrote its sessions back):
    then its sessions are real, and walking the replica for them on every read is
    wasted work on the event loop."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    stats = ClusterStats()
    writer = Writer(redis, "node-a", stats, 5.0, TTL)
    directory = ClusterDirectory("node-a", writer)
    directory.apply_set(schema.Entry("bob@localhost/phone", "node-b", 0, True, sid="s"))
    sync = ReplicaSync(redis, directory, lambda: None, stats)
    rerouted: asyncio.Queue[str] = asyncio.Queue()

    def reroute(stanza: etree._Element, hops: int) -> None:
        rerouted.put_nowait(stanza.findtext("{jabber:client}body") or "")

    inbox = Inbox(
        redis, "node-a", directory, reroute, stats, sync, nothing_queued,
        Waiting(writer, "node-a"),
    )
    inbox.is_live = lambda node: node == "node-b"
    orphan = {**item("carol@localhost/pc", "orphan"), "orphan": "node-b"}
    await redis.xadd(schema.inbox_key("node-a"), orphan)  # type: ignore[arg-type]
    inbox.start()
    try:
        assert await asyncio.wait_for(rerouted.get(), 5) == "orphan"
    finally:
        await inbox.pause()
        await redis.aclose()
    assert directory.get("bob@localhost", "phone") is not None
