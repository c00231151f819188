"""The direct links between cluster nodes (xmppd.cluster.link): two nodes in this process
on a real redis-server, real clients; stanzas between them go over a TCP link, not
through Redis, with the guarantees the inbox stream gives (order, nothing lost or
repeated when the link breaks, nothing taken from a peer that cannot authenticate)."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.clients import Client, close
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import (
    online,
    received,
    seen_on,
    two_nodes,
    until,
)
from xmppd.cluster import link as link_module
from xmppd.cluster import schema, wire
from xmppd.cluster.link import CONNECTING, UP, Inbound
from xmppd.cluster.node import Cluster
from xmppd.cluster.writer import Op
from xmppd.connection import C2SConnection
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)



def linked(sender: Server, receiver: Server) -> bool:
    assert sender.cluster is not None and sender.cluster.link is not None
    assert receiver.cluster is not None
    peer = sender.cluster.link._peers.get(receiver.cluster.node)
    return peer is not None and peer.state == UP


def link_port(node: Server) -> tuple[str, int]:
    assert node.cluster is not None and node.cluster.link is not None
    address = node.cluster.link.address
    assert address is not None
    host, _, port = address.rpartition(":")
    return host, int(port)


async def inbox_length(redis: LocalService, node: str) -> int:
    client = Redis.from_url(devservices.redis_url(redis))
    try:
        return int(await client.xlen(schema.inbox_key(node)))
    finally:
        await client.aclose()


async def pair(
    start_server: StartServer, redis: LocalService, **cluster_a: Any
) -> tuple[Server, Server, Client, Client]:
    """alice on A, bob on B, each seeing the other, the link from A to B up; `cluster_a`:
    more of A's cluster section (its `link`, `forward_wait`)."""
    if not cluster_a:
        a, b = await two_nodes(start_server, redis)
    else:
        url = devservices.redis_url(redis)
        a = await start_server(cluster={"redis_url": url, "node_name": "node-a", **cluster_a})
        b = await start_server(users={}, cluster={"redis_url": url, "node_name": "node-b"})
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    await until(lambda: linked(a, b))
    return a, b, alice, bob


async def test_a_cross_node_message_goes_over_the_link_not_through_redis(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None
    before = b.cluster.stats.forwards_in
    alice.send_message(mto="bob@localhost/phone", mbody="over the link", mtype="chat")
    assert await received(bob) == "over the link"
    stats = b.cluster.stats
    assert stats.link_stanzas_in >= 1 and stats.link_frames_in >= 1
    # Everything B took from A came over the link: none through its inbox stream.
    assert stats.forwards_in - before == 1
    assert a.cluster.stats.link_stanzas_out >= 1
    await until(lambda: a.cluster is not None and a.cluster.stats.link_acks >= 1)
    assert b.cluster.inbox is not None and b.cluster.inbox._last == "0-0"
    assert await inbox_length(redis_service, "node-b") == 0
    await close(alice)
    await close(bob)


async def test_nodes_with_a_configured_secret_prove_that_one(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """cluster.secret (kept as a SecretStr in the config) is the key both ends use;
    none is made in Redis."""
    secret = "0123456789abcdef-configured"
    section = {"redis_url": devservices.redis_url(redis_service), "secret": secret}
    a = await start_server(cluster={**section, "node_name": "node-a"})
    b = await start_server(users={}, cluster={**section, "node_name": "node-b"})
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    await until(lambda: linked(a, b))
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    assert a.cluster.link.secret == b.cluster.link.secret == secret.encode()
    client = Redis.from_url(devservices.redis_url(redis_service))
    try:
        assert await client.get(schema.LINK_SECRET) is None
    finally:
        await client.aclose()
    await close(alice)
    await close(bob)


def link_family(sender: Server, receiver: Server) -> int:
    """The address family of the socket `sender` sends to `receiver` on."""
    assert sender.cluster is not None and sender.cluster.link is not None
    assert receiver.cluster is not None
    conn = sender.cluster.link._peers[receiver.cluster.node]._conn
    assert conn is not None and conn.transport is not None
    return int(conn.transport.get_extra_info("socket").family)


def link_modes(sender: Server, receiver: Server) -> tuple[type, type]:
    """How each end of the link from `sender` to `receiver` seals what it sends."""
    assert sender.cluster is not None and sender.cluster.link is not None
    assert receiver.cluster is not None and receiver.cluster.link is not None
    conn = sender.cluster.link._peers[receiver.cluster.node]._conn
    assert conn is not None
    inbound = receiver.cluster.link._inbound[sender.cluster.node]
    return type(conn.handshake.send), type(inbound.handshake.send)


@pytest.mark.parametrize(
    ("place", "family", "mode"),
    [
        ("one host", socket.AF_UNIX, wire.Clear),  # no network path: in clear
        ("two hosts", socket.AF_INET, wire.Sealed),
        ("unix off", socket.AF_INET, wire.Sealed),
    ],
)
async def test_nodes_link_over_a_unix_socket_on_one_host_and_tcp_otherwise(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    place: str, family: int, mode: type,
) -> None:
    """Two nodes in one kernel and network namespace (the workers of `--workers N`) link
    over B's abstract Unix socket. Nodes that say they run in kernels of their own do not
    dial it (another host's abstract name may exist here and be someone else's), nor
    does a node with `cluster.link.unix: false`: TCP, sealed."""
    if place == "two hosts":
        hosts = iter(["host-1", "host-2", "host-3"])
        monkeypatch.setattr(link_module, "host_identity", lambda: next(hosts))
    link_a = {"link": {"unix": False}} if place == "unix off" else {}
    a, b, alice, bob = await pair(start_server, redis_service, **link_a)
    assert link_family(a, b) == family
    assert link_modes(a, b) == (mode, mode)
    alice.send_message(mto="bob@localhost/phone", mbody=place, mtype="chat")
    assert await received(bob) == place
    assert b.cluster is not None and b.cluster.stats.link_stanzas_in == 1
    await close(alice)
    await close(bob)


class Relay:
    """The network between A and B: B advertises this TCP address, which passes each
    connection on to B's link port, keeps what crosses either way, and, asked to,
    flips one bit in the tag of the next DATA frame from A (someone on the path)."""

    def __init__(self) -> None:
        self.target: tuple[str, int] | None = None
        self.ready = asyncio.Event()
        self.crossed = bytearray()
        self.connections = 0
        self.tamper = False
        self.tampered = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    def to(self, node: Server) -> None:
        """Relay to `node`'s link port (it advertises this relay's)."""
        assert node.cluster is not None and node.cluster.link is not None
        server = node.cluster.link._server
        assert server is not None
        self.target = server.sockets[0].getsockname()[:2]
        self.ready.set()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.ready.wait()
        assert self.target is not None
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.connections += 1
        for task in (self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False)):
            self._tasks.add(asyncio.create_task(task))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, from_dialer: bool
    ) -> None:
        frames = wire.FrameReader(wire.MAX_FRAME)
        try:
            while chunk := await reader.read(65536):
                self.crossed += chunk
                if from_dialer:  # frame by frame, to alter one
                    chunk = b"".join(self._alter(kind, body) for kind, body in frames.feed(chunk))
                writer.write(chunk)
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _alter(self, kind: bytes, body: bytes) -> bytes:
        if kind == wire.DATA and self.tamper:
            self.tamper = False
            self.tampered += 1
            body = body[:-1] + bytes([body[-1] ^ 0x01])
        return wire.frame(kind, body)

    async def close(self) -> None:
        self.server.close()
        for task in self._tasks:
            task.cancel()


async def relayed_pair(
    start_server: StartServer, redis: LocalService, relay: Relay
) -> tuple[Server, Server, Client, Client]:
    """As `pair`, on different hosts (TCP), A's link to B through `relay`."""
    url = devservices.redis_url(redis)
    port = await relay.start()
    a = await start_server(cluster={"redis_url": url, "node_name": "node-a"})
    b = await start_server(users={}, cluster={
        "redis_url": url, "node_name": "node-b", "link_advertise": f"127.0.0.1:{port}",
    })
    relay.to(b)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    await until(lambda: linked(a, b))
    assert link_family(a, b) == socket.AF_INET and relay.connections >= 1
    return a, b, alice, bob


async def test_a_tcp_link_carries_no_stanza_in_clear(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What crosses the network between two hosts: the handshake (names, nonces, keys,
    MACs), then sealed frames; no stanza, no JID, in either direction."""
    hosts = iter(["host-1", "host-2", "host-3"])
    monkeypatch.setattr(link_module, "host_identity", lambda: next(hosts))
    relay = Relay()
    a, b, alice, bob = await relayed_pair(start_server, redis_service, relay)
    assert b.cluster is not None
    body = "the plans for the heist at midnight"
    for n in range(5):
        alice.send_message(mto="bob@localhost/phone", mbody=f"{body} {n}", mtype="chat")
    assert [await received(bob) for _ in range(5)] == [f"{body} {n}" for n in range(5)]
    assert b.cluster.stats.link_stanzas_in == 5  # over the link, through the relay
    crossed = bytes(relay.crossed)
    assert len(crossed) > 5 * len(body)
    for clear in (body.encode(), b"alice@localhost", b"bob@localhost", b"<message", b"stanza"):
        assert clear not in crossed
    await relay.close()
    await close(alice)
    await close(bob)


async def test_a_tampered_data_frame_closes_the_link_and_loses_or_repeats_nothing(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One bit flipped in a DATA frame on the way: B refuses it and closes the link
    (handling nothing of it, nor after it), A dials again, B's handshake says what it
    handled, and A sends the rest: bob gets every message once, in order."""
    hosts = iter(["host-1", "host-2", "host-3"])
    monkeypatch.setattr(link_module, "host_identity", lambda: next(hosts))
    caplog.set_level(logging.WARNING, "xmppd.cluster.link")
    relay = Relay()
    a, b, alice, bob = await relayed_pair(start_server, redis_service, relay)
    assert a.cluster is not None and b.cluster is not None
    count = 60
    for n in range(count):
        if n in (20, 40):
            relay.tamper = True
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
        await asyncio.sleep(0.005)
    got = [await received(bob, 5.0) for _ in range(count)]
    assert got == [str(n) for n in range(count)]
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)  # and nothing twice
    assert relay.tampered == 2
    failures = [r.getMessage() for r in caplog.records if "does not authenticate" in r.getMessage()]
    assert len(failures) == 2 and all("link from node node-a failed" in f for f in failures)
    assert a.cluster.stats.link_reconnects == 2 and relay.connections == 3
    assert a.cluster.stats.link_fallbacks == 0  # all over the link
    assert b.cluster.stats.link_stanzas_in == count
    await relay.close()
    await close(alice)
    await close(bob)


async def test_a_link_in_clear_over_tcp_is_refused(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """A dialer that knows the secret and asks for frames in clear over TCP (what someone
    on the path would want a node to do): refused at its hello."""
    a, b, alice, bob = await pair(start_server, redis_service)
    assert b.cluster is not None
    host, port = link_port(b)
    assert b.cluster.link is not None
    dialer = wire.Dialer(b.cluster.link.secret, "node-c", "node-b", "inc")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(dialer.hello(sealed=False))
    assert await reader.read() == b""  # no challenge: closed
    writer.close()
    await until(lambda: b.cluster is not None and b.cluster.stats.link_auth_failures == 1)
    await close(alice)
    await close(bob)


async def test_a_crossing_stanza_is_written_to_the_client_as_the_sender_serialised_it(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B writes the bytes A serialised to bob's stream as they are (not parsed and
    serialised again), and counts them as it counts what it serialises itself: a chat
    message as delivered, an error message not."""
    a, b, alice, bob = await pair(start_server, redis_service)
    written: list[bytes] = []
    send_serialized = C2SConnection.send_serialized

    def spy(self: C2SConnection, data: bytes) -> bool | None:
        taken = send_serialized(self, data)
        if taken:
            written.append(data)
        return taken

    monkeypatch.setattr(C2SConnection, "send_serialized", spy)
    delivered = b.router.ledger.delivered
    body = 'h\u00e9llo <&> "x" \U0001f600'
    alice.send_message(mto="bob@localhost/phone", mbody=body, mtype="chat")
    message = await asyncio.wait_for(bob.messages.get(), 5)
    assert message["body"] == body and message["from"] == "alice@localhost/desk"
    assert len(written) == 1 and written[0].startswith(b'<message xmlns="jabber:client" ')
    assert b.router.ledger.delivered == delivered + 1
    alice.send_message(mto="bob@localhost/phone", mbody="an error", mtype="error")
    message = await asyncio.wait_for(bob.messages.get(), 5)
    assert message["type"] == "error" and message["body"] == "an error"
    assert len(written) == 2
    assert b.router.ledger.delivered == delivered + 1  # an error is not counted
    await close(alice)
    await close(bob)


async def test_messages_across_the_link_keep_their_order(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, alice, bob = await pair(start_server, redis_service)
    assert b.cluster is not None
    count = 200
    for n in range(count):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    got = [await received(bob, 5.0) for _ in range(count)]
    assert got == [str(n) for n in range(count)]
    assert b.cluster.stats.link_stanzas_in >= count
    assert b.cluster.inbox is not None and b.cluster.inbox._last == "0-0"
    await close(alice)
    await close(bob)


async def test_a_conflict_from_another_node_goes_over_the_link(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b = await two_nodes(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None
    first = await online(b, "bob@localhost/phone", "bob-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    await until(lambda: linked(a, b))
    second = await online(a, "bob@localhost/phone", "bob-secret")
    await asyncio.wait_for(first.ended.wait(), 5)
    assert first.stream_errors == ["conflict"]
    assert b.cluster.stats.ends_in == 1
    assert b.cluster.stats.link_stanzas_in >= 1
    assert b.cluster.inbox is not None and b.cluster.inbox._last == "0-0"
    await close(second)


async def test_a_connection_without_the_secret_is_refused_and_delivers_nothing(
    redis_service: LocalService, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, alice, bob = await pair(start_server, redis_service)
    assert b.cluster is not None
    host, port = link_port(b)
    caplog.set_level(logging.WARNING, "xmppd.cluster.link")
    stanza = b"<message xmlns='jabber:client' to='bob@localhost/phone'><body>x</body></message>"
    fields = [b"to", b"bob@localhost/phone", b"stanza", stanza, b"hops", b"1"]

    # 1. Data without a handshake.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(wire.data(1, 0, fields))
    assert await reader.read() == b""  # closed, nothing answered
    writer.close()

    # 2. A handshake with the wrong key: the proof does not verify.
    dialer = wire.Dialer(b"not the cluster secret", "node-a", "node-b", "intruder")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(dialer.hello())
    frames = wire.FrameReader(wire.MAX_HELLO)
    challenge: list[tuple[bytes, bytes]] = []
    while not challenge:
        chunk = await reader.read(4096)
        assert chunk
        challenge = frames.feed(chunk)
    kind, body = challenge[0]
    assert kind == wire.CHALLENGE
    with pytest.raises(wire.WireError):
        dialer.answer(kind, body)  # nor does B's answer, without the key
    writer.write(wire.message(wire.PROOF, mac="00" * 32) + wire.data(1, 0, fields))
    assert await reader.read() == b""  # no welcome: closed
    writer.close()

    await until(lambda: b.cluster is not None and b.cluster.stats.link_auth_failures == 2)
    refusals = [r.getMessage() for r in caplog.records if "refused a link" in r.getMessage()]
    assert len(refusals) == 2 and all(f"from {host}:" in line for line in refusals)
    assert b.cluster.stats.link_stanzas_in == 0
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)
    await close(alice)
    await close(bob)


async def test_a_link_cut_mid_traffic_loses_and_repeats_nothing(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The link is cut (from B's end, then from A's) while B has handled frames it has
    not acknowledged yet: A dials again, B's handshake says what it handled, and A
    sends only the rest."""
    monkeypatch.setattr(link_module, "ACK_DELAY", 30.0)  # B handles, does not ack yet
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    link_b = b.cluster.link

    def unacked_on_b() -> bool:
        inbound = link_b._inbound.get("node-a")
        return inbound is not None and inbound.last > inbound.acked

    count = 300
    for n in range(count):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
        if n in (100, 200):
            await until(unacked_on_b)
            if n == 100:
                inbound = link_b._inbound["node-a"]
                assert inbound.transport is not None
                inbound.transport.abort()
            else:
                outbound = a.cluster.link._peers["node-b"]._conn
                assert outbound is not None and outbound.transport is not None
                outbound.transport.abort()
                monkeypatch.setattr(link_module, "ACK_DELAY", 0.005)
    got = [await received(bob, 5.0) for _ in range(count)]
    assert sorted(got, key=int) == [str(n) for n in range(count)]  # all, each once
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)  # and nothing twice
    assert a.cluster.stats.link_reconnects >= 1
    assert a.cluster.stats.link_fallbacks == 0  # all over the link
    await close(alice)
    await close(bob)


async def test_a_link_that_goes_silent_is_dialed_anew_and_loses_nothing(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B stops reading its end of the link, which stays open (a connection a NAT dropped
    without a word looks the same to A): A's frames wait unacknowledged until
    ACK_DEADLINE, then A dials again and sends them on the new connection."""
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    alice.send_message(mto="bob@localhost/phone", mbody="before", mtype="chat")
    assert await received(bob) == "before"
    # The short deadline only while B's end is silent: a loop stalled past it (a busy
    # host) while a frame of a link that answers waited for its ack would dial again
    # too. The watch of the frames before it goes (armed with the default deadline),
    # and the first redial restores the default for the new connection.
    default = link_module.ACK_DEADLINE

    class Redialed(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "dialing again" in record.getMessage():
                link_module.ACK_DEADLINE = default

    redialed = Redialed()
    logging.getLogger(link_module.__name__).addHandler(redialed)
    try:
        monkeypatch.setattr(link_module, "ACK_DEADLINE", 0.5)
        a.cluster.link._peers["node-b"]._unwatch()
        silent = b.cluster.link._inbound["node-a"]
        assert silent.transport is not None
        silent.transport.pause_reading()
        for n in range(3):
            alice.send_message(mto="bob@localhost/phone", mbody=f"silent {n}", mtype="chat")
        got = [await received(bob, 5.0) for _ in range(3)]
    finally:
        logging.getLogger(link_module.__name__).removeHandler(redialed)
    assert got == [f"silent {n}" for n in range(3)]
    assert a.cluster.stats.link_reconnects == 1
    assert a.cluster.stats.link_fallbacks == 0  # over the new link, not through Redis
    assert b.cluster.link._inbound["node-a"] is not silent
    await close(alice)
    await close(bob)


async def test_a_node_that_is_not_live_refuses_and_the_sender_routes_again(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """B's heartbeat has lapsed (it may have been reaped): it refuses what comes over the
    link, and A routes it again on its own side (here: offline storage)."""
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and b.cluster is not None and b.cluster.link is not None
    b.cluster.link.live = lambda: False
    alice.send_message(mto="bob@localhost/phone", mbody="refused", mtype="chat")
    await until(lambda: a.cluster is not None and a.cluster.stats.link_nacks == 1)
    assert a.cluster.stats.link_reroutes == 1
    await a.router.drain()
    later = await online(a, "bob@localhost/laptop", "bob-secret")
    assert await received(later, timeout=5) == "refused"  # stored offline on A
    assert bob.messages.empty()
    await close(later)
    await close(alice)
    await close(bob)


async def test_stanzas_through_redis_then_over_the_link_keep_their_order(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk of a burst goes half through Redis (the link down, and Redis slowed
    down), half over the link dialed again: each frame carries the number of the last
    item through Redis before it, and B reads its inbox through before it handles the
    frame. B's client sees the burst in order."""
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None and b.cluster is not None
    writer = a.cluster.writer
    send = writer._send

    async def slow(batch: list[Op]) -> list[Any]:
        await asyncio.sleep(0.05)  # a slow Redis: the link would overtake it
        return await send(batch)

    monkeypatch.setattr(writer, "_send", slow)
    peer = a.cluster.link._peers["node-b"]
    stats_a = a.cluster.stats
    count, chunk = 200, 20
    for start in range(0, count, chunk):
        await until(lambda: peer.state == UP and peer.unacked_bytes == 0)
        peer._failed()  # holds nothing: nothing goes through Redis yet
        peer.retry_at = float("inf")
        for half in (range(start, start + chunk // 2), range(start + chunk // 2, start + chunk)):
            routed = stats_a.forwards_out + len(half)
            for n in half:
                alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
            await until(lambda r=routed: stats_a.forwards_out >= r)  # type: ignore[misc]
            peer.retry_at = 0.0  # the second half dials again and goes over the link
    got = [await received(bob, 5.0) for _ in range(count)]
    assert got == [str(n) for n in range(count)]
    stats = b.cluster.stats
    assert stats.link_stanzas_in > 0 and stats_a.link_fallbacks > 0  # both paths
    assert stats.forwards_in - stats.link_stanzas_in > 0
    await close(alice)
    await close(bob)


async def test_a_slow_receiver_past_the_unacked_bound_keeps_the_order(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B reads nothing from its link for a moment (a busy node) while a burst for bob
    crosses the bound on what may wait for its acks: the rest waits on A behind the
    frames written, not through Redis (it would overtake them), and goes once B acks.
    bob gets everything once, in order."""
    monkeypatch.setattr(link_module, "MAX_UNACKED", 2000)
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    peer = a.cluster.link._peers["node-b"]
    slow = b.cluster.link._inbound["node-a"]
    assert slow.transport is not None
    slow.transport.pause_reading()
    count = 100
    routed = a.cluster.stats.forwards_out + count
    for n in range(count):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    await until(lambda: a.cluster is not None and a.cluster.stats.forwards_out >= routed)
    assert peer.unacked_bytes > 2000  # past the bound
    await asyncio.sleep(0.3)  # what would have gone through Redis would be there now
    assert peer.held[-1].seq > peer._sent  # the rest waits on A, not written to B
    slow.transport.resume_reading()
    got = [await received(bob, 5.0) for _ in range(count)]
    assert got == [str(n) for n in range(count)]
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)  # and nothing twice
    assert a.cluster.stats.link_fallbacks == 0
    assert b.cluster.stats.link_stanzas_in == count
    await close(alice)
    await close(bob)


async def hold_frames(a: Server, b: Server, alice: Client, count: int) -> Inbound:
    """B reads nothing from its link from A, and alice sends bob `count` messages: A
    holds them in frames. Returns B's end of the link (to resume reading)."""
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    stats = a.cluster.stats
    slow = b.cluster.link._inbound["node-a"]
    assert slow.transport is not None
    slow.transport.pause_reading()
    routed = stats.forwards_out + count
    for n in range(count):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    await until(lambda: stats.forwards_out >= routed)
    assert a.cluster.link._peers["node-b"].held and stats.link_fallbacks == 0
    return slow


@pytest.mark.parametrize("end", ["acks", "give up"])
async def test_a_stanza_while_redis_is_unhealthy_does_not_overtake_the_frames_held(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    end: str,
) -> None:
    """B reads nothing from its link for a moment, so A holds frames for bob, and Redis
    hangs (SIGSTOP) long enough for A to count it unhealthy: the next message for bob
    goes through Redis (A's replica may be stale: forward_wait decides). Redis answers
    again before B reads its link: had the message gone to A's writer at once, it would
    reach B's inbox, and bob, before the frames. It waits on A until B acknowledges
    them (`end` "acks": B reads its link again), or until A gives the link up ("give
    up": what it held goes through Redis first). One sent once Redis is healthy again
    waits behind it (over the link it would overtake it). bob gets everything once, in
    order."""
    monkeypatch.setattr(link_module, "ACK_DEADLINE", 30.0)  # no new link meanwhile
    monkeypatch.setattr(link_module, "RETRY_DELAY", 30.0)
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    stats_a, stats_b, writer = a.cluster.stats, b.cluster.stats, a.cluster.writer
    peer = a.cluster.link._peers["node-b"]
    count = 20
    slow = await hold_frames(a, b, alice, count)
    assert slow.transport is not None
    routed = stats_a.forwards_out
    redis_service.pause()
    try:
        await until(lambda: not stats_a.redis_up, timeout=10)
        alice.send_message(mto="bob@localhost/phone", mbody="later", mtype="chat")
        await until(lambda: stats_a.forwards_out > routed)
    finally:
        redis_service.resume()
    await until(
        lambda: stats_a.redis_up and stats_b.redis_up and not writer.queued, timeout=10
    )
    await asyncio.sleep(1.0)  # B's inbox has read what reached it through Redis
    alice.send_message(mto="bob@localhost/phone", mbody="after", mtype="chat")
    await until(lambda: stats_a.forwards_out > routed + 1)
    assert len(peer.later) == 2
    if end == "acks":
        slow.transport.resume_reading()
    else:
        peer.give_up()
    got = [await received(bob, 5.0) for _ in range(count + 2)]
    assert got == [*(str(n) for n in range(count)), "later", "after"]
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)  # and nothing twice
    over_link = count if end == "acks" else 0  # the frames over the link, or their copies
    assert stats_b.link_stanzas_in == over_link
    assert stats_b.forwards_in - stats_b.link_stanzas_in == count + 2 - over_link
    assert stats_a.link_fallbacks == count + 2 - over_link
    await close(alice)
    await close(bob)


async def test_what_waits_for_the_acks_counts_toward_the_held_bound(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis unhealthy, what comes for a node whose link holds frames waits on the
    sender behind them (the test above), and counts toward MAX_HELD with them: a
    receiver that acknowledges nothing cannot make it grow without bound. Past it the
    link is given up: the frames, then what waited, then what comes, through Redis.
    bob gets everything once, in order."""
    monkeypatch.setattr(link_module, "ACK_DEADLINE", 30.0)  # no new link meanwhile
    monkeypatch.setattr(link_module, "RETRY_DELAY", 30.0)
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None
    stats_a, stats_b = a.cluster.stats, b.cluster.stats
    peer = a.cluster.link._peers["node-b"]
    count, waiting = 20, 8
    await hold_frames(a, b, alice, count)
    # Room for a few of the messages below beside the frames, not for all of them.
    monkeypatch.setattr(link_module, "MAX_HELD", peer.unacked_bytes + 3000)
    body = "x" * 1000
    routed = stats_a.forwards_out
    redis_service.pause()
    try:
        await until(lambda: not stats_a.redis_up, timeout=10)
        for n in range(waiting):
            alice.send_message(mto="bob@localhost/phone", mbody=f"{n} {body}", mtype="chat")
        await until(lambda: stats_a.forwards_out >= routed + waiting)
        assert peer.state != UP and not peer.held and not peer.later  # given up
    finally:
        redis_service.resume()
    got = [await received(bob, 10.0) for _ in range(count + waiting)]
    assert got == [*(str(n) for n in range(count)), *(f"{n} {body}" for n in range(waiting))]
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)  # and nothing twice
    assert stats_b.link_stanzas_in == 0  # B read none of the frames: their copies
    assert stats_a.link_fallbacks == count + waiting
    await close(alice)
    await close(bob)


async def test_what_waits_for_the_acks_expires_with_the_writer_cut_off(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis hangs past forward_wait: the writer cuts it off, and what the links keep
    for it behind their frames (the tests above) is routed again here with what the
    writer held (a message to offline storage), at once and ahead of what comes next
    (routed here too, as for a session that is gone). Left waiting for the acks, it
    would wait past forward_wait, and go to bob after what came next."""
    monkeypatch.setattr(link_module, "ACK_DEADLINE", 30.0)  # no new link meanwhile
    monkeypatch.setattr(link_module, "RETRY_DELAY", 30.0)
    a, b, alice, bob = await pair(start_server, redis_service, forward_wait=1)
    assert a.cluster is not None and a.cluster.link is not None
    stats, writer = a.cluster.stats, a.cluster.writer
    peer = a.cluster.link._peers["node-b"]
    count = 20
    slow = await hold_frames(a, b, alice, count)
    assert slow.transport is not None
    routed = stats.forwards_out
    ledger = a.router.ledger
    redis_service.pause()
    try:
        await until(lambda: not stats.redis_up, timeout=10)
        alice.send_message(mto="bob@localhost/phone", mbody="later", mtype="chat")
        await until(lambda: stats.forwards_out > routed)
        assert peer.later
        alice.send_presence(pstatus="busy")  # a write for the writer to fail on
        await until(lambda: writer.cut_off, timeout=10)
        assert not peer.later  # "later" was routed again with the writer's batch
        await until(lambda: ledger.offline == 1, timeout=1)
        alice.send_message(mto="bob@localhost/phone", mbody="next", mtype="chat")
        await until(lambda: ledger.offline == 2, timeout=1)
    finally:
        redis_service.resume()
    await until(lambda: not writer.cut_off, timeout=10)
    slow.transport.resume_reading()
    got = [await received(bob, 5.0) for _ in range(count)]
    assert got == [str(n) for n in range(count)]
    with pytest.raises(TimeoutError):
        await received(bob, 0.5)  # "later" and "next" are offline, in that order
    assert not peer.later and stats.forwards_refused == 1  # "later"; "next" stayed here
    await close(alice)
    await close(bob)


@pytest.mark.parametrize("first", ["inbox", "link"])
async def test_a_link_given_up_while_its_frames_wait_unread_repeats_nothing(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, first: str,
) -> None:
    """B is busy for a moment (reads nothing from its link) and A, past the held bound,
    gives the link up and sends everything through Redis, the frames B has not read yet
    too. The old connection would deliver those frames a second time, before or after
    their copies: B takes each frame once, from whichever path brings it first (`first`:
    its inbox reads the copies before it reads its link again, or after), and bob gets
    every message once, in order."""
    monkeypatch.setattr(link_module, "MAX_UNACKED", 2000)
    monkeypatch.setattr(link_module, "RETRY_DELAY", 5.0)  # no new link meanwhile
    caplog.set_level(logging.WARNING, "xmppd.cluster.link")
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None and b.cluster.inbox is not None
    peer = a.cluster.link._peers["node-b"]
    slow = b.cluster.link._inbound["node-a"]
    transport = slow.transport
    assert transport is not None
    inbox_held = asyncio.Event()
    if first == "link":
        handle_all = b.cluster.inbox._handle_all

        async def held(answer: Any) -> None:
            await inbox_held.wait()
            await handle_all(answer)

        monkeypatch.setattr(b.cluster.inbox, "_handle_all", held)
    else:
        inbox_held.set()
    transport.pause_reading()
    routed = a.cluster.stats.forwards_out + 50
    for n in range(50):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    await until(lambda: a.cluster is not None and a.cluster.stats.forwards_out >= routed)
    monkeypatch.setattr(link_module, "MAX_HELD", peer.unacked_bytes)
    for n in range(50, 100):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    await until(lambda: any("has not acknowledged" in r.getMessage() for r in caplog.records))
    await asyncio.sleep(0.3)
    if not slow.closed:  # "inbox": the copies closed it (nothing more comes from it)
        transport.resume_reading()  # B reads what the connection still holds
    await asyncio.sleep(0.3)
    inbox_held.set()
    got = [await received(bob, 5.0) for _ in range(100)]
    assert got == [str(n) for n in range(100)]
    with pytest.raises(TimeoutError):
        await received(bob, 1.0)  # and nothing twice
    assert (b.cluster.stats.link_stanzas_in > 0) == (first == "link")
    await close(alice)
    await close(bob)


async def test_past_the_held_bound_the_link_gives_up_and_redis_keeps_the_order(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """B reads nothing from its link, and A holds more than it may for it: A gives the
    link up, sends what it held through Redis, in order, then what comes after, and
    dials again (the new link's frames wait for what went through Redis). bob gets
    everything once, in order."""
    monkeypatch.setattr(link_module, "MAX_UNACKED", 2000)
    monkeypatch.setattr(link_module, "RETRY_DELAY", 0.1)
    caplog.set_level(logging.WARNING, "xmppd.cluster.link")
    a, b, alice, bob = await pair(start_server, redis_service)
    assert a.cluster is not None and a.cluster.link is not None
    assert b.cluster is not None and b.cluster.link is not None
    peer = a.cluster.link._peers["node-b"]
    stuck = b.cluster.link._inbound["node-a"]
    assert stuck.transport is not None
    stuck.transport.pause_reading()  # for good: A's next link replaces it
    stats_a = a.cluster.stats
    count = 100
    routed = stats_a.forwards_out + count // 2
    for n in range(count // 2):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    await until(lambda: stats_a.forwards_out >= routed)
    assert stats_a.link_fallbacks == 0 and peer.unacked_bytes > 2000
    monkeypatch.setattr(link_module, "MAX_HELD", peer.unacked_bytes)  # past it with the next
    for n in range(count // 2, count):
        alice.send_message(mto="bob@localhost/phone", mbody=str(n), mtype="chat")
    got = [await received(bob, 5.0) for _ in range(count)]
    assert got == [str(n) for n in range(count)]
    with pytest.raises(TimeoutError):
        await received(bob, 0.3)  # and nothing twice
    assert any("has not acknowledged" in r.getMessage() for r in caplog.records)
    stats = b.cluster.stats
    assert stats.forwards_in - stats.link_stanzas_in > 0  # through Redis, some
    await until(lambda: linked(a, b))  # and dialed again
    await close(alice)
    await close(bob)


async def test_a_node_not_serving_yet_takes_stanzas_through_its_inbox(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B is live (A sees it, its sessions, its link address) but does not serve yet (its
    modules load; here its `serve` is held back while a client is on it already): a
    message for bob and the end of bob's session (a newer login on A) are not refused
    and routed again on A, as for a dead node, but reach bob once B serves."""
    url = devservices.redis_url(redis_service)
    a = await start_server(cluster={"redis_url": url, "node_name": "node-a"})
    held_back: list[Cluster] = []

    async def later(cluster: Cluster) -> None:
        held_back.append(cluster)

    real_serve = Cluster.serve
    monkeypatch.setattr(Cluster, "serve", later)
    b = await start_server(users={}, cluster={"redis_url": url, "node_name": "node-b"})
    monkeypatch.setattr(Cluster, "serve", real_serve)
    assert a.cluster is not None and a.cluster.link is not None and held_back
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone"))
    link_a = a.cluster.link
    await until(lambda: "node-b" in link_a._peers and link_a._peers["node-b"].state != CONNECTING)
    alice.send_message(mto="bob@localhost/phone", mbody="early", mtype="chat")
    await until(lambda: a.cluster is not None and a.cluster.stats.forwards_out >= 1)
    newer = await online(a, "bob@localhost/phone", "bob-secret")  # ends bob's on B
    await asyncio.sleep(0.3)
    assert a.cluster.stats.link_nacks == 0 and a.cluster.stats.link_reroutes == 0
    assert not bob.ended.is_set()
    await real_serve(held_back[0])
    assert await received(bob, 5.0) == "early"
    await asyncio.wait_for(bob.ended.wait(), 5)
    assert bob.stream_errors == ["conflict"]
    with pytest.raises(TimeoutError):
        await received(newer, 0.3)  # not stored offline on A
    assert a.cluster.stats.link_nacks == 0 and a.cluster.stats.link_reroutes == 0
    await until(lambda: linked(a, b))  # the link once B serves
    await close(newer)
    await close(alice)
