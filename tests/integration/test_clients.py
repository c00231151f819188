"""Real slixmpp clients log in over TLS with every mechanism and chat."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from slixmpp import JID

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from xmppd.server import Server

MECHANISMS = ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"]


async def exchange(a: Client, b: Client) -> None:
    a.send_message(mto=b.boundjid, mbody="hello bob", mtype="chat")
    got = await asyncio.wait_for(b.messages.get(), 10)
    assert got["body"] == "hello bob"
    assert got["from"] == a.boundjid  # stamped by the server
    b.send_message(mto=JID(a.boundjid.bare), mbody="hi alice", mtype="chat")
    back = await asyncio.wait_for(a.messages.get(), 10)
    assert back["body"] == "hi alice"
    assert back["from"] == b.boundjid


@pytest.mark.smoke
@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("direct_tls", [False, True], ids=["starttls", "direct-tls"])
async def test_login_and_chat(server: Server, mechanism: str, direct_tls: bool) -> None:
    alice = await connect(
        server, "alice@localhost/desk", "alice-secret", direct_tls=direct_tls, mechanism=mechanism
    )
    bob = await connect(server, "bob@localhost/phone", "bob-secret", direct_tls=direct_tls)
    alice.send_presence()
    bob.send_presence()
    await asyncio.sleep(0.1)
    assert alice.boundjid.full == "alice@localhost/desk"
    await exchange(alice, bob)
    await close(alice)
    await close(bob)


@pytest.mark.parametrize(
    "mechanism", ["SCRAM-SHA-1-PLUS", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-512-PLUS"]
)
async def test_scram_plus_with_slixmpp_over_tls12(server: Server, mechanism: str) -> None:
    """slixmpp binds to tls-unique, which exists on TLS 1.2 only (RFC 9266)."""
    alice = await connect(
        server, "alice@localhost/plus", "alice-secret", mechanism=mechanism, max_tls12=True
    )
    assert alice.started.is_set()
    await close(alice)


async def test_wrong_password_fails(server: Server) -> None:
    client = await connect(server, "alice@localhost/x", "wrong", expect_failure=True)
    assert not client.started.is_set()
    client.abort()


async def test_same_resource_kicks_the_first_with_conflict(server: Server) -> None:
    first = await connect(server, "alice@localhost/same", "alice-secret")
    second = await connect(server, "alice@localhost/same", "alice-secret")
    await asyncio.wait_for(first.ended.wait(), 10)
    assert first.stream_errors == ["conflict"]
    assert second.boundjid.full == "alice@localhost/same"
    bob = await connect(server, "bob@localhost/b", "bob-secret")
    bob.send_presence()
    second.send_presence()
    await asyncio.sleep(0.1)
    await exchange(bob, second)
    await close(second)
    await close(bob)


async def test_server_made_resource_and_disco_ping_version_time(server: Server) -> None:
    client = await connect(server, "alice@localhost", "alice-secret")
    assert client.boundjid.resource  # server-made
    client.register_plugin("xep_0030")
    client.register_plugin("xep_0199")
    client.register_plugin("xep_0092")
    client.register_plugin("xep_0202")
    info = await client.plugin["xep_0030"].get_info(jid=JID("localhost"), timeout=10)
    features = set(info["disco_info"]["features"])
    assert {
        "urn:xmpp:ping",
        "jabber:iq:version",
        "urn:xmpp:time",
        "http://jabber.org/protocol/disco#info",
    } <= features
    identities = info["disco_info"]["identities"]
    assert ("server", "im", None, "xmppd") in identities
    rtt = await client.plugin["xep_0199"].ping(jid=JID("localhost"), timeout=10)
    assert rtt >= 0
    version = await client.plugin["xep_0092"].get_version(JID("localhost"), timeout=10)
    assert version["software_version"]["name"] == "xmppd"
    assert "os" not in version["software_version"].values or not version["software_version"]["os"]
    time_ = await client.plugin["xep_0202"].get_entity_time(JID("localhost"), timeout=10)
    # slixmpp's own parser appends a second 'Z' to <utc/>, so read the XML itself.
    utc = time_.xml.find("{urn:xmpp:time}time/{urn:xmpp:time}utc").text
    parsed = datetime.strptime(utc, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - parsed).total_seconds()) < 60
    await close(client)


async def test_two_virtual_hosts(start_server: StartServer) -> None:
    server = await start_server(users={}, hosts=["localhost", "chat.example"])
    await server.accounts["localhost"].register("alice", "alice-secret")
    await server.accounts["chat.example"].register("carol", "carol-secret")
    alice = await connect(server, "alice@localhost/a", "alice-secret")
    carol = await connect(server, "carol@chat.example/c", "carol-secret")
    # accounts are per host: alice does not exist on chat.example
    stranger = await connect(server, "alice@chat.example/x", "alice-secret", expect_failure=True)
    stranger.abort()
    alice.send_presence()
    carol.send_presence()
    await asyncio.sleep(0.1)
    await exchange(alice, carol)
    await close(alice)
    await close(carol)
