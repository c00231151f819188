"""A new user's first days, end to end, with real slixmpp clients (issue 4's "done when").

Two people register in-band, log in, add each other, see presence, chat, go
offline and get their messages later, block and unblock, keep a vCard and
private data; then the node is replaced by another one on the same data and
everything is still there.
"""

from __future__ import annotations

import asyncio
from typing import Any

from slixmpp import JID, Iq, Message, Presence

from tests.integration.clients import Client, close, connect, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.test_vcard_private_register import Prefs
from xmppd.server import Server

MODULES: dict[str, Any] = {
    name: {}
    for name in (
        "disco",
        "ping",
        "version",
        "time",
        "roster",
        "presence",
        "offline",
        "last",
        "vcard",
        "private",
        "privacy",
        "blocking",
        "carbons",
        "caps",
    )
}
MODULES["register"] = {"allow_registration": True}
AVAILABLE = ("available", "chat", "away", "xa", "dnd")
PLUGINS = ("xep_0030", "xep_0049", "xep_0054", "xep_0077", "xep_0191", "xep_0203")


class Person(Client):
    """A slixmpp client with the plugins a desktop client has, recording presences."""

    def __init__(self, jid: str, password: str, register: bool) -> None:
        super().__init__(jid, password)
        self.presences: asyncio.Queue[Presence] = asyncio.Queue()
        self.add_event_handler("presence", self.presences.put_nowait)
        self.add_event_handler("message_error", self.messages.put_nowait)
        for plugin in PLUGINS:
            self.register_plugin(plugin)
        self.plugin["xep_0049"].register(Prefs)
        if register:
            self.add_event_handler("register", self._register)

    async def _register(self, _form: Iq) -> None:
        iq = self.Iq()
        iq["type"] = "set"
        iq["register"]["username"] = self.boundjid.user
        iq["register"]["password"] = self.password
        await iq.send(timeout=10)

    async def presence_from(self, sender: str, types: tuple[str, ...]) -> Presence:
        async with asyncio.timeout(10):
            while True:
                presence = await self.presences.get()
                if str(presence["from"]) == sender and presence["type"] in types:
                    return presence

    async def message(self) -> Message:
        return await asyncio.wait_for(self.messages.get(), 10)


async def sign_in(server: Server, jid: str, password: str, register: bool = False) -> Person:
    person = Person(jid, password, register)
    person.ssl_context = insecure_context()
    person.enable_direct_tls = False  # STARTTLS on 5222, as most clients do
    person.enable_plaintext = False
    person.connect("127.0.0.1", port_of(server, "starttls"))
    await asyncio.wait_for(person.started.wait(), 15)
    await person.get_roster(timeout=10)
    return person


async def subscription(server: Server, owner: str, contact: str) -> str | None:
    item = await server.modules.modules["roster"].item(owner, contact)  # type: ignore[attr-defined]
    return None if item is None else str(item.subscription)


async def wait_for(predicate: Any, timeout: float = 10) -> None:
    """Wait for server-side state that nothing signals."""
    async with asyncio.timeout(timeout):
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_a_new_users_first_days(start_server: StartServer) -> None:
    server = await start_server(users={}, modules=MODULES)

    # register in-band, then log in
    alice = await sign_in(server, "alice@localhost/laptop", "wonderland-42", register=True)
    bob = await sign_in(server, "bob@localhost/phone", "builder-1999", register=True)
    await close(alice)
    alice = await sign_in(server, "alice@localhost/laptop", "wonderland-42")
    alice.send_presence()
    bob.send_presence()

    # add each other (slixmpp approves and subscribes back by default)
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    await wait_for(lambda: has_subscription(server, "alice@localhost", "bob@localhost", "both"))
    await wait_for(lambda: has_subscription(server, "bob@localhost", "alice@localhost", "both"))

    async def alice_sees_both() -> bool:  # the roster push follows the stored change
        return bool(alice.client_roster["bob@localhost"]["subscription"] == "both")

    await wait_for(alice_sees_both)

    # presence and chat
    bob.send_presence(pshow="away", pstatus="on the train")
    seen = await alice.presence_from("bob@localhost/phone", ("away",))
    assert seen["status"] == "on the train"
    alice.send_message(mto=JID("bob@localhost"), mbody="tea at five?", mtype="chat")
    got = await bob.message()
    assert got["body"] == "tea at five?" and got["from"] == alice.boundjid

    # bob goes offline; alice writes; bob gets it later, stamped
    await close(bob)
    await alice.presence_from("bob@localhost/phone", ("unavailable",))
    alice.send_message(mto=JID("bob@localhost"), mbody="missed you", mtype="chat")
    await asyncio.sleep(0.3)
    bob = await sign_in(server, "bob@localhost/phone", "builder-1999")
    bob.send_presence()
    late = await bob.message()
    assert late["body"] == "missed you" and late["delay"]["stamp"] is not None

    # alice blocks bob: his messages are refused; unblocked, they arrive again
    await alice.plugin["xep_0191"].block(JID("bob@localhost"), timeout=10)
    bob.send_message(mto=JID("alice@localhost"), mbody="hello?", mtype="chat")
    refused = await bob.message()
    assert (refused["type"], refused["error"]["condition"]) == ("error", "service-unavailable")
    await alice.plugin["xep_0191"].unblock(JID("bob@localhost"), timeout=10)
    bob.send_message(mto=JID("alice@localhost"), mbody="hello again", mtype="chat")
    assert (await alice.message())["body"] == "hello again"

    # vCard and private data
    vcard = alice.plugin["xep_0054"].make_vcard()
    vcard["FN"] = "Alice Liddell"
    await alice.plugin["xep_0054"].publish_vcard(vcard, timeout=10)
    prefs = Prefs()
    prefs["nick"] = "Al"
    await alice.plugin["xep_0049"].store(prefs, timeout=10)
    await close(alice)
    await close(bob)

    # another node on the same data replaces this one
    await server.stop()
    node2 = await start_server(users={}, modules=MODULES)
    alice = await sign_in(node2, "alice@localhost/desktop", "wonderland-42")
    bob = await sign_in(node2, "bob@localhost/tablet", "builder-1999")
    assert alice.client_roster["bob@localhost"]["subscription"] == "both"
    assert bob.client_roster["alice@localhost"]["subscription"] == "both"
    card = await bob.plugin["xep_0054"].get_vcard(JID("alice@localhost"), local=False, timeout=10)
    assert card["vcard_temp"]["FN"] == "Alice Liddell"
    kept = await alice.plugin["xep_0049"].retrieve("test_prefs", timeout=10)
    assert kept["private"]["test_prefs"]["nick"] == "Al"
    blocked = await alice.plugin["xep_0191"].get_blocked(timeout=10)
    assert not blocked["blocklist"]["items"]
    alice.send_presence()
    bob.send_presence()
    await bob.presence_from("alice@localhost/desktop", AVAILABLE)
    # and a wrong password is still wrong on the new node
    stranger = await connect(node2, "alice@localhost/x", "not-her-password", expect_failure=True)
    stranger.abort()
    await close(alice)
    await close(bob)


async def has_subscription(server: Server, owner: str, contact: str, state: str) -> bool:
    return await subscription(server, owner, contact) == state
