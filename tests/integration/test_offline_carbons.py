"""Offline messages, carbons and last activity with real slixmpp clients over TLS."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import slixmpp
from slixmpp import JID
from slixmpp.exceptions import IqError

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from xmppd.server import Server

MODULES: dict[str, Any] = {
    "disco": {},
    "roster": {},
    "presence": {},
    "offline": {},
    "last": {},
    "carbons": {},
}
CARBONS = "urn:xmpp:carbons:2"


async def client(server: Server, jid: str, password: str, *plugins: str) -> Client:
    c = await connect(server, jid, password)
    for plugin in plugins:
        c.register_plugin(plugin)
    return c


async def stored(server: Server, user: str) -> int:
    page = await server.modules.items("localhost", "offline").query(prefix=f"{user}/", limit=100)
    return len(page.items)


async def wait_stored(server: Server, user: str, count: int) -> None:
    """Storing runs in a task after the send: poll the store (nothing signals it)."""
    async with asyncio.timeout(10):
        while await stored(server, user) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def next_message(c: Client) -> slixmpp.Message:
    return await asyncio.wait_for(c.messages.get(), 10)


async def test_offline_message_waits_for_login_with_a_delay_stamp(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=MODULES)
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    errors: list[slixmpp.Message] = []
    alice.add_event_handler("message_error", errors.append)
    alice.send_presence()
    for n in range(3):
        alice.send_message(mto=JID("bob@localhost"), mbody=f"while you were out {n}", mtype="chat")
    await wait_stored(server, "bob", 3)
    bob = await client(server, "bob@localhost/phone", "bob-secret", "xep_0203")
    bob.send_presence()
    for n in range(3):
        got = await next_message(bob)
        assert got["body"] == f"while you were out {n}"
        assert got["from"] == JID("alice@localhost/desk")
        assert got["delay"]["from"] == JID("localhost")
        assert got["delay"]["stamp"] is not None
    await wait_stored(server, "bob", 0)  # removed once handed over, which may lag delivery
    assert errors == [], [str(e) for e in errors]
    await close(alice)
    await close(bob)


async def test_offline_messages_survive_a_restart(start_server: StartServer) -> None:
    first = await start_server(modules=MODULES)
    alice = await connect(first, "alice@localhost/desk", "alice-secret")
    alice.send_message(mto=JID("bob@localhost"), mbody="one", mtype="chat")
    alice.send_message(mto=JID("bob@localhost"), mbody="two", mtype="normal")
    await wait_stored(first, "bob", 2)
    await close(alice)
    await first.stop()
    second = await start_server(users={}, modules=MODULES)  # same data_dir
    bob = await client(second, "bob@localhost/phone", "bob-secret", "xep_0203")
    bob.send_presence()
    got = [await next_message(bob), await next_message(bob)]
    assert [m["body"] for m in got] == ["one", "two"]
    assert all(m["delay"]["from"] == JID("localhost") for m in got)
    await close(bob)


async def test_full_queue_bounces_to_the_sender(start_server: StartServer) -> None:
    server = await start_server(modules={**MODULES, "offline": {"max_messages": 1}})
    alice = await connect(server, "alice@localhost/desk", "alice-secret")
    errors: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    alice.add_event_handler("message_error", errors.put_nowait)
    alice.send_message(mto=JID("bob@localhost"), mbody="fits", mtype="chat")
    await wait_stored(server, "bob", 1)
    msg = alice.make_message(mto=JID("bob@localhost"), mbody="too many", mtype="chat")
    msg["id"] = "over-quota"
    msg.send()
    error = await asyncio.wait_for(errors.get(), 10)
    assert error["type"] == "error" and error["id"] == "over-quota"
    assert error["error"]["condition"] == "service-unavailable"
    await close(alice)


async def test_carbons_between_two_resources(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    desk = await client(server, "alice@localhost/desk", "alice-secret", "xep_0030", "xep_0280")
    phone = await client(server, "alice@localhost/phone", "alice-secret", "xep_0030", "xep_0280")
    bob = await connect(server, "bob@localhost/b", "bob-secret")
    info = await desk.plugin["xep_0030"].get_info(jid=JID("localhost"), timeout=10)
    assert CARBONS in info["disco_info"]["features"]
    received: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    sent: asyncio.Queue[slixmpp.Message] = asyncio.Queue()
    phone.add_event_handler("carbon_received", received.put_nowait)
    phone.add_event_handler("carbon_sent", sent.put_nowait)
    for c in (desk, phone, bob):
        c.send_presence()
    await desk.plugin["xep_0280"].enable(timeout=10)
    await phone.plugin["xep_0280"].enable(timeout=10)
    await asyncio.sleep(0.1)

    bob.send_message(mto=JID("alice@localhost/desk"), mbody="hi desk", mtype="chat")
    assert (await next_message(desk))["body"] == "hi desk"
    copy = await asyncio.wait_for(received.get(), 10)
    assert copy["from"] == JID("alice@localhost")
    inner = copy["carbon_received"]
    assert inner["body"] == "hi desk" and inner["from"] == JID("bob@localhost/b")

    desk.send_message(mto=JID("bob@localhost"), mbody="hello bob", mtype="chat")
    assert (await next_message(bob))["body"] == "hello bob"
    copy = await asyncio.wait_for(sent.get(), 10)
    inner = copy["carbon_sent"]
    assert inner["body"] == "hello bob" and inner["from"] == JID("alice@localhost/desk")

    # <private/>: no copy; bob does not see the element
    private = desk.make_message(mto=JID("bob@localhost/b"), mbody="just you", mtype="chat")
    private.xml.append(slixmpp.ET.Element(f"{{{CARBONS}}}private"))
    private.send()
    got = await next_message(bob)
    assert got["body"] == "just you" and got.xml.find(f"{{{CARBONS}}}private") is None
    desk.send_message(mto=JID("bob@localhost/b"), mbody="copied again", mtype="chat")
    assert (await next_message(bob))["body"] == "copied again"
    assert (await asyncio.wait_for(sent.get(), 10))["carbon_sent"]["body"] == "copied again"
    assert sent.empty() and received.empty()
    for c in (desk, phone, bob):
        await close(c)


async def test_last_activity(start_server: StartServer) -> None:
    started = time.monotonic()
    server = await start_server(modules=MODULES)
    alice = await client(server, "alice@localhost/desk", "alice-secret", "xep_0012")
    bob = await client(server, "bob@localhost/b", "bob-secret", "xep_0012")
    uptime = await bob.plugin["xep_0012"].get_last_activity(JID("localhost"), timeout=10)
    assert 0 <= uptime["last_activity"]["seconds"] <= time.monotonic() - started

    alice.send_presence()
    await asyncio.sleep(0.1)
    online = await alice.plugin["xep_0012"].get_last_activity(JID("alice@localhost"), timeout=10)
    assert online["last_activity"]["seconds"] == 0
    # bob has no subscription to alice: forbidden
    with pytest.raises(IqError) as denied:
        await bob.plugin["xep_0012"].get_last_activity(JID("alice@localhost"), timeout=10)
    assert denied.value.iq["error"]["condition"] == "forbidden"

    # bob subscribes, alice's client approves (slixmpp auto-authorizes)
    bob.send_presence()
    bob.send_presence_subscription(pto=JID("alice@localhost"))
    async with asyncio.timeout(10):
        while True:
            item = await server.modules.modules["roster"].item(  # type: ignore[attr-defined]
                "alice@localhost", "bob@localhost"
            )
            if item is not None and item.subscription in ("from", "both"):
                break
            await asyncio.sleep(0.05)

    logout = time.time()
    alice.send_presence(ptype="unavailable", pstatus="gone fishing")
    async with asyncio.timeout(10):
        while await server.modules.items("localhost", "last").get("alice") is None:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    await close(alice)
    last = await bob.plugin["xep_0012"].get_last_activity(JID("alice@localhost"), timeout=10)
    # Whole seconds on both sides: up to one more than the time since the logout.
    assert 0 <= last["last_activity"]["seconds"] <= time.time() - logout + 1
    assert last["last_activity"]["status"] == "gone fishing"
    # the owner may always ask about herself
    again = await client(server, "alice@localhost/other", "alice-secret", "xep_0012")
    own = await again.plugin["xep_0012"].get_last_activity(JID("alice@localhost"), timeout=10)
    assert own["last_activity"]["status"] == "gone fishing"
    await close(again)
    await close(bob)
