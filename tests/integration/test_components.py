"""External components (XEP-0114): a slixmpp ComponentXMPP serving gateway.localhost.

The component exchanges messages, presence and IQ with real slixmpp clients
over TLS; then hand-driven component streams that misbehave (a wrong secret,
an unknown domain, a spoofed 'from', an oversized stanza, no handshake, a
second connection for a connected domain) each get their stream error, and
nothing they sent is delivered: a marker the test sends afterwards is the
first thing the user receives. Last, two cluster nodes on one Redis: the
component on one, the user on the other.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import slixmpp
from lxml import etree
from slixmpp import JID, Iq
from slixmpp.exceptions import IqError

from tests.integration.clients import Client, close, connect, read_until
from tests.integration.conftest import StartServer, write_config
from tests.integration.test_workers import xmppctl
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.components.service import TABLE
from xmppd.config import load_config
from xmppd.metrics import exposition
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService, free_ports

pytestmark = pytest.mark.timeout(60)

DOMAIN = "gateway.localhost"
SECRET = "s3cret-for-the-gateway-0123"
WAIT = 10.0


def components_section(**extra: Any) -> dict[str, Any]:
    return {
        "listeners": [{"address": "127.0.0.1", "port": 0}],
        "auth_timeout": 1.0,
        "max_stanza_bytes": 10240,
        "domains": {DOMAIN: {"secret": SECRET, "name": "Test gateway"}},
        **extra,
    }


async def start(start_server: StartServer, **sections: Any) -> Server:
    sections.setdefault("components", components_section())
    return await start_server(**sections)


def port(server: Server) -> int:
    assert server.components is not None
    return server.components.listening[0][1]


class Gateway(slixmpp.ComponentXMPP):
    """A component that records what reaches it and answers disco#info itself."""

    def __init__(self, domain: str = DOMAIN, secret: str = SECRET) -> None:
        super().__init__(domain, secret)
        self.register_plugin("xep_0030")
        self.register_plugin("xep_0199")
        self.messages: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
        self.presences: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        self.started = asyncio.Event()
        self.ended = asyncio.Event()
        self.add_event_handler("session_start", lambda _: self.started.set())
        self.add_event_handler("disconnected", lambda _: self.ended.set())
        self.add_event_handler("message", self.messages.put_nowait)
        self.add_event_handler("presence_available", self.presences.put_nowait)
        self.plugin["xep_0030"].add_identity(category="gateway", itype="irc", name="Test gateway")


async def gateway(server: Server, domain: str = DOMAIN) -> Gateway:
    component = Gateway(domain)
    component.connect("127.0.0.1", port(server))
    await asyncio.wait_for(component.started.wait(), WAIT)
    return component


async def stop(component: Gateway) -> None:
    if not component.ended.is_set():
        component.disconnect()
        await asyncio.wait_for(component.ended.wait(), WAIT)


async def user(server: Server, jid: str, password: str) -> Client:
    """A slixmpp client over TLS whose `messages` also get the error messages."""
    client = await connect(server, jid, password)
    client.add_event_handler("message_error", client.messages.put_nowait)
    return client


async def until(predicate: Callable[[], bool]) -> None:
    """Wait for node state that nothing signals (a connection_lost, a bus notice)."""
    async with asyncio.timeout(WAIT):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


async def next_message(client: Client | Gateway) -> slixmpp.Message:
    return await asyncio.wait_for(client.messages.get(), WAIT)


# --- a component and users --------------------------------------------------------------


async def test_component_exchanges_messages_presence_and_iq_with_users(
    start_server: StartServer,
) -> None:
    server = await start(start_server)
    component = await gateway(server)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    alice.register_plugin("xep_0030")
    alice.register_plugin("xep_0199")
    presences: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
    alice.add_event_handler("presence_available", presences.put_nowait)
    alice.send_presence()
    try:
        # A user's message reaches the component, from her full JID.
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="hello bot", mtype="chat")
        got = await next_message(component)
        assert (got["from"], got["to"], got["body"]) == (
            JID("alice@localhost/desk"), JID(f"bot@{DOMAIN}"), "hello bot"
        )
        # The component's message reaches her, from the address at its domain.
        component.send_message(
            mto="alice@localhost", mfrom=f"bot@{DOMAIN}/x", mbody="hi alice", mtype="chat"
        )
        got = await next_message(alice)
        assert (got["from"], got["body"]) == (JID(f"bot@{DOMAIN}/x"), "hi alice")

        # Presence both ways: directed presence from her, the component's to her.
        alice.send_presence(pto=f"bot@{DOMAIN}")
        seen = await asyncio.wait_for(component.presences.get(), WAIT)
        assert seen["from"] == JID("alice@localhost/desk")
        component.send_presence(pto="alice@localhost", pfrom=f"bot@{DOMAIN}/x", pstatus="here")
        while (seen := await asyncio.wait_for(presences.get(), WAIT))["from"] != JID(
            f"bot@{DOMAIN}/x"
        ):
            pass  # her own presence echo first
        assert seen["status"] == "here"

        # IQ both ways: she asks the component, the component asks her and the server.
        info = await alice.plugin["xep_0030"].get_info(jid=DOMAIN, timeout=WAIT)
        assert ("gateway", "irc", None, "Test gateway") in info["disco_info"]["identities"]
        rtt = await component.plugin["xep_0199"].ping(
            "alice@localhost/desk", ifrom=f"{DOMAIN}", timeout=WAIT
        )
        assert rtt >= 0
        server_info = await component.plugin["xep_0030"].get_info(
            jid="localhost", ifrom=DOMAIN, timeout=WAIT
        )
        assert "http://jabber.org/protocol/disco#info" in server_info["disco_info"]["features"]

        # The server lists it in disco#items, with its configured name.
        items = await alice.plugin["xep_0030"].get_items(jid="localhost", timeout=WAIT)
        assert (DOMAIN, None, "Test gateway") in items["disco_items"]["items"]
        assert server.components is not None and DOMAIN in server.components.serving
        metrics = await metrics_text(server)
        assert f'xmppd_component_connected{{domain="{DOMAIN}"}} 1.0' in metrics
        # The ledger: her message went to the component, the component's came to her.
        ledger = server.router.ledger
        assert (ledger.received, ledger.to_remote) == (1, 1)
        assert (ledger.from_remote, ledger.delivered) == (1, 1)
        assert ledger.snapshot()["lost"] == 0
    finally:
        await close(alice)
        await stop(component)


async def test_presence_subscription_with_a_component_contact(start_server: StartServer) -> None:
    server = await start(start_server)
    component = await gateway(server)
    subscriptions: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
    unavailable: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
    for event in ("presence_subscribe", "presence_subscribed"):
        component.add_event_handler(event, subscriptions.put_nowait)
    component.add_event_handler("presence_unavailable", unavailable.put_nowait)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    pushed: dict[str, str] = {}
    pushes = asyncio.Event()

    def on_push(iq: slixmpp.Iq) -> None:
        for jid, item in iq["roster"]["items"].items():
            pushed[str(jid)] = item["subscription"]
        pushes.set()

    async def pushed_as(state: str) -> None:
        async with asyncio.timeout(WAIT):
            while pushed.get(f"bot@{DOMAIN}") != state:
                pushes.clear()
                await pushes.wait()

    alice.add_event_handler("roster_update", on_push)
    try:
        await alice.get_roster()
        alice.send_presence()
        # She asks; the component approves and asks back; her client approves
        # (slixmpp's auto_authorize): both, with roster pushes from the server.
        alice.send_presence(pto=f"bot@{DOMAIN}", ptype="subscribe")
        request = await asyncio.wait_for(subscriptions.get(), WAIT)
        assert (request["type"], request["from"]) == ("subscribe", JID("alice@localhost"))
        component.send_presence(pto="alice@localhost", pfrom=f"bot@{DOMAIN}", ptype="subscribed")
        await pushed_as("to")
        component.send_presence(pto="alice@localhost", pfrom=f"bot@{DOMAIN}", ptype="subscribe")
        # (Her client may also ask again first: auto_subscribe.)
        while (answer := await asyncio.wait_for(subscriptions.get(), WAIT))["type"] != "subscribed":
            assert answer["type"] == "subscribe"
        assert answer["from"] == JID("alice@localhost")
        await pushed_as("both")
        # Her going offline reaches the component, a contact with a subscription.
        await close(alice)
        gone = await asyncio.wait_for(unavailable.get(), WAIT)
        assert gone["from"] == JID("alice@localhost/desk")
    finally:
        await close(alice)
        await stop(component)


async def metrics_text(server: Server) -> str:
    return exposition(server).decode()


async def test_not_connected_bounces_remote_server_timeout(start_server: StartServer) -> None:
    server = await start(start_server)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    alice.register_plugin("xep_0030")
    try:
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="anyone?", mtype="chat")
        got = await next_message(alice)
        assert got["type"] == "error"
        assert got["error"]["condition"] == "remote-server-timeout"
        assert got["error"]["type"] == "wait"
        with pytest.raises(IqError) as exc:
            await alice.plugin["xep_0030"].get_info(jid=DOMAIN, timeout=WAIT)
        assert exc.value.condition == "remote-server-timeout"

        # Once it connects, the same address works; once it leaves, it bounces again.
        component = await gateway(server)
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="now?", mtype="chat")
        assert (await next_message(component))["body"] == "now?"
        await stop(component)
        components = server.components
        assert components is not None
        await until(lambda: DOMAIN not in components.serving)  # its connection_lost
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="gone?", mtype="chat")
        assert (await next_message(alice))["error"]["condition"] == "remote-server-timeout"
    finally:
        await close(alice)


async def test_xmppctl_components_lists_them(start_server: StartServer, tmp_path: Path) -> None:
    section = components_section()
    section["domains"]["other.localhost"] = {"secret": "another-secret-0123456789"}
    server = await start(start_server, components=section)
    component = await gateway(server)
    try:
        code, out, err = await xmppctl(tmp_path / "xmppd.yml", "components")
        assert code == 0, err
        rows = [line.split("\t") for line in out.splitlines()]
        assert [r[:3] for r in rows] == [
            [DOMAIN, "connected", "-"],
            ["other.localhost", "not-connected"],
        ]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[0][3])
        assert re.fullmatch(r"127\.0\.0\.1:\d+", rows[0][4])  # the component's address
    finally:
        await stop(component)


async def test_stanzas_queued_when_the_connection_drops_are_bounced(
    start_server: StartServer,
) -> None:
    """A message routed to the component in the loop iteration its connection drops
    (a reset: connection_lost comes before the write) is bounced, not lost."""
    server = await start(start_server)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    component = await gateway(server)
    try:
        assert server.components is not None
        conn = server.components.serving[DOMAIN]
        assert conn.transport is not None
        conn.transport.abort()
        server.router.route(
            etree.fromstring(
                "<message xmlns='jabber:client' from='alice@localhost/desk' "
                f"to='bot@{DOMAIN}' type='chat' id='m1'><body>in flight</body></message>"
            )
        )
        got = await next_message(alice)
        assert (got["type"], got["id"]) == ("error", "m1")
        assert got["error"]["condition"] == "remote-server-timeout"
        # Its one fate in the ledger is the bounce: it never reached the component.
        assert (server.router.ledger.bounced, server.router.ledger.to_remote) == (1, 0)
        await asyncio.wait_for(component.ended.wait(), WAIT)
    finally:
        await close(alice)
        await stop(component)


async def test_a_dead_component_host_is_noticed_without_traffic(
    start_server: StartServer,
) -> None:
    """A component whose host died (power cut, network cut) leaves a half-open
    connection; the domain stays taken and every reconnect is refused with <conflict/>
    until the server notices. With nothing to send it never would: the component
    socket has TCP keepalive probes, after a minute of silence."""
    server = await start(start_server)
    component = await gateway(server)
    try:
        assert server.components is not None
        conn = server.components.serving[DOMAIN]
        assert conn.transport is not None
        sock = conn.transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux: noticed within 60 + 3 * 10 s
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 10
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        await stop(component)


# --- misbehaving component streams ------------------------------------------------------------


def header(domain: str = DOMAIN) -> bytes:
    return (
        "<stream:stream xmlns='jabber:component:accept' "
        f"xmlns:stream='http://etherx.jabber.org/streams' to='{domain}'>"
    ).encode()


class RawComponent:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.seen = b""  # read already, not yet looked at by read_to_close

    @classmethod
    async def open(cls, server: Server, domain: str = DOMAIN) -> tuple[RawComponent, str]:
        """Connected, header sent; returns it and the stream id the server gave."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port(server))
        raw = cls(reader, writer)
        writer.write(header(domain))
        raw.seen = await read_until(reader, b">")
        found = re.search(rb"id='([^']+)'", raw.seen)
        return raw, found.group(1).decode() if found else ""

    async def handshake_accepted(self) -> None:
        self.seen = b""
        await read_until(self.reader, b"<handshake")

    def send(self, data: str | bytes) -> None:
        self.writer.write(data.encode() if isinstance(data, str) else data)

    async def read_to_close(self) -> bytes:
        buf, self.seen = self.seen, b""
        async with asyncio.timeout(WAIT):
            while chunk := await self.reader.read(65536):
                buf += chunk
        self.writer.close()
        return buf


def handshake(stream_id: str, secret: str = SECRET) -> str:
    digest = hashlib.sha1((stream_id + secret).encode()).hexdigest()
    return f"<handshake>{digest}</handshake>"


def message(sender: str, to: str, body: str) -> str:
    return f"<message from='{sender}' to='{to}' type='chat'><body>{body}</body></message>"


async def marker_first(server: Server, user: Client, body: str) -> None:
    """A real component sends `body` to the user: it must be the first message the user
    got (nothing the bad stream sent before it closed was delivered)."""
    component = await gateway(server)
    component.send_message(mto=str(user.boundjid), mfrom=f"bot@{DOMAIN}", mbody=body)
    got = await next_message(user)
    await stop(component)
    assert got["body"] == body


def stream_error(data: bytes) -> str:
    found = re.search(rb"<stream:error[^>]*><([a-z-]+) xmlns=.urn:ietf:params:xml:ns:xmpp-st", data)
    return found.group(1).decode() if found else data.decode(errors="replace")


async def test_a_component_that_stops_reading_is_cut_off(start_server: StartServer) -> None:
    """A hung component (it no longer reads its socket) must not make the server buffer
    every stanza for its domain without bound: past the backlog limit its stream ends
    with <policy-violation/>, and what comes next for the domain is bounced."""
    server = await start(start_server)
    assert server.components is not None
    service = server.components
    raw, sid = await RawComponent.open(server)
    raw.send(handshake(sid))
    await raw.handshake_accepted()  # and from now on it reads nothing
    body = "x" * 8000
    routed = 0
    while DOMAIN in service.serving and routed < 5000:  # 40 MB at most
        server.router.route(
            etree.fromstring(
                "<message xmlns='jabber:client' from='nobody@localhost/r' "
                f"to='bot@{DOMAIN}' type='chat'><body>{body}</body></message>"
            )
        )
        routed += 1
        if routed % 20 == 0:
            await asyncio.sleep(0)  # the flush: the transport writes what it can
    assert DOMAIN not in service.serving, f"still connected after {routed} messages"
    assert service.refusals["policy-violation"] == 1
    raw.writer.close()


async def test_wrong_secret_is_not_authorized(start_server: StartServer) -> None:
    server = await start(start_server)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    try:
        raw, sid = await RawComponent.open(server)
        raw.send(handshake(sid, "not-the-secret-at-all-0000"))
        raw.send(message(f"bot@{DOMAIN}", "alice@localhost", "sneaked in"))
        assert stream_error(await raw.read_to_close()) == "not-authorized"
        assert server.components is not None and not server.components.serving
        await marker_first(server, alice, "marker")
    finally:
        await close(alice)


async def test_unknown_domain_is_host_unknown(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="xmppd.components")
    server = await start(start_server)
    raw, sid = await RawComponent.open(server, "other.localhost")
    # The secret of another component does not open an unconfigured domain either.
    raw.send(handshake(sid))
    assert stream_error(await raw.read_to_close()) == "host-unknown"
    assert server.components is not None and not server.components.serving
    # The operator reads which domain was asked for (a typo in the component's config).
    logged = [r.getMessage() for r in caplog.records if r.name == "xmppd.components"]
    assert any("host-unknown" in line and '"other.localhost"' in line for line in logged), logged


async def test_spoofed_from_is_invalid_from_and_not_delivered(start_server: StartServer) -> None:
    server = await start(start_server)
    bob = await user(server, "bob@localhost/desk", "bob-secret")
    try:
        raw, sid = await RawComponent.open(server)
        raw.send(handshake(sid))
        await raw.handshake_accepted()
        raw.send(message("alice@localhost/desk", "bob@localhost", "spoofed"))
        assert stream_error(await raw.read_to_close()) == "invalid-from"
        await marker_first(server, bob, "marker")
    finally:
        await close(bob)


async def test_oversized_stanza_is_policy_violation_and_not_delivered(
    start_server: StartServer,
) -> None:
    server = await start(start_server)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    try:
        raw, sid = await RawComponent.open(server)
        raw.send(handshake(sid))
        await raw.handshake_accepted()
        raw.send(message(f"bot@{DOMAIN}", "alice@localhost", "x" * 20000))  # limit: 10240
        assert stream_error(await raw.read_to_close()) == "policy-violation"
        await marker_first(server, alice, "marker")
    finally:
        await close(alice)


async def test_no_handshake_times_out(start_server: StartServer) -> None:
    server = await start(start_server)
    raw, _ = await RawComponent.open(server)
    # A stanza before the handshake is refused at once...
    raw.send(message(f"bot@{DOMAIN}", "alice@localhost", "early"))
    assert stream_error(await raw.read_to_close()) == "not-authorized"
    # ...and a stream that sends nothing is closed after auth_timeout (1 s here).
    raw, _ = await RawComponent.open(server)
    assert stream_error(await raw.read_to_close()) == "connection-timeout"
    assert server.components is not None
    assert server.components.refusals["connection-timeout"] == 1


async def test_second_connection_for_a_domain_is_refused_with_conflict(
    start_server: StartServer,
) -> None:
    server = await start(start_server)
    alice = await user(server, "alice@localhost/desk", "alice-secret")
    component = await gateway(server)
    try:
        raw, sid = await RawComponent.open(server)
        raw.send(handshake(sid))
        raw.send(message(f"bot@{DOMAIN}", "alice@localhost", "from the second"))
        assert stream_error(await raw.read_to_close()) == "conflict"
        # The first keeps the domain.
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="still you?", mtype="chat")
        assert (await next_message(component))["body"] == "still you?"
        component.send_message(mto="alice@localhost/desk", mfrom=f"bot@{DOMAIN}", mbody="yes")
        assert (await next_message(alice))["body"] == "yes"
    finally:
        await close(alice)
        await stop(component)


# --- a cluster ----------------------------------------------------------------------------


async def test_component_on_another_cluster_node(
    start_server: StartServer, redis_service: LocalService, tmp_path: Path  # noqa: F811
) -> None:
    url = devservices.redis_url(redis_service)
    a = await start(start_server, cluster={"redis_url": url, "node_name": "comp-a"})
    b = await start(start_server, users={}, cluster={"redis_url": url, "node_name": "comp-b"})
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != frozenset({"comp-a", "comp-b"}):
            await node.cluster.heartbeat.beat()
    component = await gateway(b)
    alice = await user(a, "alice@localhost/desk", "alice-secret")
    try:
        seen = a.components
        assert seen is not None
        await until(lambda: seen.elsewhere.get(DOMAIN) == "comp-b")  # the bus notice
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="across", mtype="chat")
        got = await next_message(component)
        assert (got["from"], got["body"]) == (JID("alice@localhost/desk"), "across")
        component.send_message(mto="alice@localhost/desk", mfrom=f"bot@{DOMAIN}", mbody="back")
        assert (await next_message(alice))["body"] == "back"
        iq = Iq(alice, stype="get", sto=DOMAIN)
        iq.enable("disco_info")
        answer = await iq.send(timeout=WAIT)
        assert answer["type"] == "result"

        code, out, err = await xmppctl(tmp_path / "xmppd.yml", "components")
        assert code == 0, err
        assert out.startswith(f"{DOMAIN}\tconnected\tcomp-b\t")

        # A node started later learns it from Redis; a second connection to it conflicts.
        c = await start(start_server, users={}, cluster={"redis_url": url, "node_name": "comp-c"})
        assert c.components is not None and c.components.elsewhere == {DOMAIN: "comp-b"}
        raw, sid = await RawComponent.open(c)
        raw.send(handshake(sid))
        assert stream_error(await raw.read_to_close()) == "conflict"

        # Gone from b: a bounces again.
        await stop(component)
        await until(lambda: DOMAIN not in seen.elsewhere)
        alice.send_message(mto=f"bot@{DOMAIN}", mbody="anyone?", mtype="chat")
        assert (await next_message(alice))["error"]["condition"] == "remote-server-timeout"

        # Node b stopping with the component connected takes it out of the table.
        component = await gateway(b)
        await until(lambda: seen.elsewhere.get(DOMAIN) == "comp-b")
        await b.stop()
        await asyncio.wait_for(component.ended.wait(), WAIT)
        assert c.cluster is not None
        assert await c.cluster.redis.hgetall(TABLE) == {}
        await until(lambda: DOMAIN not in seen.elsewhere)
    finally:
        await close(alice)
        await stop(component)


async def test_a_restarted_node_clears_what_its_killed_predecessor_left_in_the_table(
    start_server: StartServer, redis_service: LocalService  # noqa: F811
) -> None:
    """A node killed with a component connected leaves its entry in the hash; started
    again under the same name (a worker restarted by `--workers`, a container with a
    fixed name), it is live again and that entry must not keep its component away
    from the other nodes."""
    url = devservices.redis_url(redis_service)
    a = await start(start_server, cluster={"redis_url": url, "node_name": "comp-a"})
    assert a.cluster is not None and a.components is not None
    # What the killed comp-b left: its entry, and a's copy of it (comp-b came back
    # before its heartbeat expired, so a never saw it leave the live set).
    await a.cluster.redis.hset(TABLE, DOMAIN, "comp-b")
    a.components.elsewhere[DOMAIN] = "comp-b"
    b = await start(start_server, users={}, cluster={"redis_url": url, "node_name": "comp-b"})
    assert await a.cluster.redis.hgetall(TABLE) == {}
    seen = a.components
    await until(lambda: DOMAIN not in seen.elsewhere)  # b's bus notice
    assert b.components is not None and not b.components.serving
    c = await start(start_server, users={}, cluster={"redis_url": url, "node_name": "comp-c"})
    assert c.components is not None and c.components.elsewhere == {}
    component = await gateway(c)  # not refused with <conflict/>
    try:
        await until(lambda: seen.elsewhere == {DOMAIN: "comp-c"})
    finally:
        await stop(component)


async def test_workers_share_the_component_port(
    tmp_path: Path, redis_service: LocalService  # noqa: F811
) -> None:
    """`xmppd --workers N` starts N nodes with reuse_port (xmppd.cli.server): each binds
    the component port as it binds the client ports, and the component may land on
    any of them."""
    fixed = free_ports(1)[0]
    section = components_section(listeners=[{"address": "127.0.0.1", "port": fixed}])
    url = devservices.redis_url(redis_service)
    workers: list[Server] = []
    try:
        for node in ("w-1", "w-2"):
            path = write_config(
                tmp_path, components=section, cluster={"redis_url": url, "node_name": node}
            )
            worker = Server(load_config(path), reuse_port=True)
            await worker.start()
            workers.append(worker)
        assert [port(w) for w in workers] == [fixed, fixed]
        component = await gateway(workers[1])
        await stop(component)
    finally:
        for worker in workers:
            await worker.stop()


async def test_table_follows_a_disconnect_and_a_reconnect_announced_back_to_back(
    start_server: StartServer, redis_service: LocalService  # noqa: F811
) -> None:
    """A component that leaves and connects again to the node at once: the node
    announces "gone" then "here" as two tasks (connection_closed, authenticated), and
    the hash must end as "here" (the "gone" task's read and delete must not straddle
    the "here" write)."""
    url = devservices.redis_url(redis_service)
    a = await start(start_server, cluster={"redis_url": url, "node_name": "comp-a"})
    assert a.cluster is not None and a.components is not None
    service = a.components
    await service._announce(DOMAIN, True)
    assert await a.cluster.redis.hgetall(TABLE) == {DOMAIN.encode(): b"comp-a"}
    await asyncio.gather(service._announce(DOMAIN, False), service._announce(DOMAIN, True))
    assert await a.cluster.redis.hgetall(TABLE) == {DOMAIN.encode(): b"comp-a"}

