"""Rosters, subscriptions and presence with real slixmpp clients over TLS."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

import slixmpp
from slixmpp import JID

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from xmppd.server import Server

MODULES: dict[str, Any] = {"disco": {}, "ping": {}, "roster": {}, "presence": {}}
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret"}
AVAILABLE = ("available", "chat", "away", "xa", "dnd")


class Presences:
    """Every presence a client received, taken out by what a test waits for, in any order:
    a server may send the contact's presence just before the "subscribed" that explains it."""

    def __init__(self, client: Client) -> None:
        self.received: list[slixmpp.Presence] = []
        self.arrived = asyncio.Event()
        client.add_event_handler("presence", self._add)

    def _add(self, presence: slixmpp.Presence) -> None:
        self.received.append(presence)
        self.arrived.set()

    async def take(self, types: tuple[str, ...], sender: str) -> slixmpp.Presence:
        while True:
            for presence in self.received:
                if presence["type"] in types and str(presence["from"]) == sender:
                    self.received.remove(presence)
                    return presence
            self.arrived.clear()
            await self.arrived.wait()


PRESENCES: weakref.WeakKeyDictionary[Client, Presences] = weakref.WeakKeyDictionary()


async def online(server: Server, jid: str, *, presence: bool = True) -> Client:
    """A client that answers subscription requests only when told, and keeps what it hears."""
    client = await connect(server, jid, PASSWORDS[JID(jid).user])
    client.auto_authorize = None
    client.auto_subscribe = False
    PRESENCES[client] = Presences(client)
    await client.get_roster(timeout=10)
    if presence:
        client.send_presence()
    return client


async def expect(
    client: Client, type_: str | tuple[str, ...], sender: str, timeout: float = 10
) -> slixmpp.Presence:
    """A presence of `type_` from `sender` (a bare or full JID), once it has come."""
    types = (type_,) if isinstance(type_, str) else type_
    async with asyncio.timeout(timeout):
        return await PRESENCES[client].take(types, sender)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """Wait for client-side state that roster pushes update (nothing else signals it)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def roster_set(client: Client, jid: str, name: str, groups: list[str]) -> None:
    iq = client.Iq()
    iq["type"] = "set"
    iq["roster"]["items"] = {jid: {"name": name, "groups": groups}}
    reply = await iq.send(timeout=10)
    assert reply["type"] == "result"


def subscription(client: Client, contact: str) -> str:
    return str(client.client_roster[contact]["subscription"])


async def befriend(alice: Client, bob: Client) -> None:
    """Subscribe both ways, each side approving by hand."""
    for asker, answerer in ((alice, bob), (bob, alice)):
        asker.send_presence(pto=answerer.boundjid.bare, ptype="subscribe")
        await expect(answerer, "subscribe", asker.boundjid.bare)
        answerer.send_presence(pto=asker.boundjid.bare, ptype="subscribed")
        await expect(asker, "subscribed", answerer.boundjid.bare)
    await until(lambda: subscription(alice, "bob@localhost") == "both")
    await until(lambda: subscription(bob, "alice@localhost") == "both")


async def test_mutual_subscription_presence_and_going_offline(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await online(server, "alice@localhost/desk")
    bob = await online(server, "bob@localhost/phone")
    await befriend(alice, bob)
    # each was told about the other when their subscription was approved
    await expect(alice, AVAILABLE, "bob@localhost/phone")
    await expect(bob, AVAILABLE, "alice@localhost/desk")
    # the server keeps the same states
    roster = server.modules.modules["roster"]
    for owner, contact in (("alice", "bob"), ("bob", "alice")):
        item = await roster.item(f"{owner}@localhost", f"{contact}@localhost")  # type: ignore[attr-defined]
        assert item.subscription == "both" and not item.ask and not item.pending_in

    bob.send_presence(pshow="away", pstatus="in a meeting")
    update = await expect(alice, "away", "bob@localhost/phone")
    assert update["status"] == "in a meeting"

    # a clean logout: alice sees bob go
    await close(bob)
    await expect(alice, "unavailable", "bob@localhost/phone")

    # back again: the probe at login shows bob that alice is online, alice sees him come
    bob = await online(server, "bob@localhost/tablet")
    await expect(bob, AVAILABLE, "alice@localhost/desk")
    await expect(alice, AVAILABLE, "bob@localhost/tablet")

    # the TCP connection just drops: alice still learns that bob is gone
    assert bob.transport is not None
    bob.transport.abort()
    await expect(alice, "unavailable", "bob@localhost/tablet")
    await close(alice)


async def test_request_to_offline_user_waits_for_login(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await online(server, "alice@localhost/desk")
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    await until(lambda: alice.client_roster["bob@localhost"]["pending_out"])
    # bob logs in without sending presence: nothing yet; the request comes with his presence
    bob = await online(server, "bob@localhost/phone", presence=False)
    assert "alice@localhost" not in bob.client_roster  # a pending request is no roster item
    bob.send_presence()
    await expect(bob, "subscribe", "alice@localhost")
    bob.send_presence(pto="alice@localhost", ptype="subscribed")
    await expect(alice, "subscribed", "bob@localhost")
    await expect(alice, AVAILABLE, "bob@localhost/phone")
    await until(lambda: subscription(alice, "bob@localhost") == "to")
    await until(lambda: subscription(bob, "alice@localhost") == "from")
    await close(alice)
    await close(bob)


async def test_roster_survives_a_restart(start_server: StartServer) -> None:
    first = await start_server(modules=MODULES)
    alice = await online(first, "alice@localhost/desk")
    bob = await online(first, "bob@localhost/phone")
    await befriend(alice, bob)
    await roster_set(alice, "bob@localhost", "Bobby", ["Friends", "Work"])
    await roster_set(alice, "carol@localhost", "Carol", [])
    await until(lambda: alice.client_roster["bob@localhost"]["name"] == "Bobby")
    version = alice.client_roster.version
    assert version  # the server offers roster versioning and slixmpp uses it
    await close(alice)
    await close(bob)
    await first.stop()

    second = await start_server(users={}, modules=MODULES)  # same data_dir
    alice = await online(second, "alice@localhost/laptop", presence=False)
    roster = alice.client_roster
    assert set(roster) >= {"bob@localhost", "carol@localhost"}
    assert roster["bob@localhost"]["name"] == "Bobby"
    assert sorted(roster["bob@localhost"]["groups"]) == ["Friends", "Work"]
    assert subscription(alice, "bob@localhost") == "both"
    assert subscription(alice, "carol@localhost") == "none"
    # a client whose copy is current gets an empty answer (XEP-0237)
    iq = alice.Iq()
    iq["type"] = "get"
    iq["roster"]["ver"] = version
    reply = await iq.send(timeout=10)
    assert reply["type"] == "result" and len(reply.xml) == 0
    # and presence works as before the restart
    alice.send_presence()
    bob = await online(second, "bob@localhost/phone")
    await expect(alice, AVAILABLE, "bob@localhost/phone")
    await expect(bob, AVAILABLE, "alice@localhost/laptop")
    await close(alice)
    await close(bob)
