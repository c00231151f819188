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
from xmppd.cluster.inbox import BLOCK_MS, READ_TIMEOUT, RETRY_DELAY, Inbox
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync
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
        directory = ClusterDirectory("node-a", Writer(redis, "node-a", stats, 5.0, TTL))
        sync = ReplicaSync(redis, directory, lambda: None, stats)
        rerouted: asyncio.Queue[str] = asyncio.Queue()

        def reroute(stanza: etree._Element, hops: int) -> None:
            rerouted.put_nowait(stanza.findtext("{jabber:client}body") or "")

        inbox = Inbox(redis, "node-a", directory, reroute, stats, sync)
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
