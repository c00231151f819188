"""Blocking (XEP-0191) and privacy lists (XEP-0016) with real slixmpp clients over TLS."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from typing import Any

import slixmpp
from slixmpp import JID
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from xmppd.server import Server

MODULES: dict[str, Any] = {
    "disco": {},
    "roster": {},
    "presence": {},
    "privacy": {},
    "blocking": {},
}
PASSWORDS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
PRIVACY = "jabber:iq:privacy"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


async def online(server: Server, jid: str) -> Client:
    client = await connect(server, jid, PASSWORDS[JID(jid).user])
    client.register_plugin("xep_0030")
    client.register_plugin("xep_0191")
    pushes: asyncio.Queue[tuple[str, list[str]]] = asyncio.Queue()
    client.pushes = pushes  # type: ignore[attr-defined]
    for event in ("blocked", "unblocked"):
        client.add_event_handler(
            event,
            lambda iq, event=event: pushes.put_nowait(
                (event, sorted(str(i["jid"]) for i in iq[event[:-2]]))
            ),
        )
    client.add_event_handler("message_error", client.messages.put_nowait)
    client.send_presence()
    return client


async def next_message(client: Client, timeout: float = 10) -> slixmpp.Message:
    return await asyncio.wait_for(client.messages.get(), timeout)


def error_of(message: slixmpp.Message) -> tuple[str, bool]:
    """(condition, has <blocked xmlns='urn:xmpp:blocking:errors'/>) of an error message."""
    assert message["type"] == "error", message
    error = message.xml.find("{jabber:client}error")
    assert error is not None
    condition = next(c.tag.split("}")[1] for c in error if c.tag.startswith(f"{{{STANZAS}}}"))
    return condition, error.find("{urn:xmpp:blocking:errors}blocked") is not None


async def settle(client: Client) -> None:
    """A round trip to the server: everything it sent this client before has arrived."""
    await client.plugin["xep_0030"].get_info(jid=JID("localhost"), timeout=10)


async def test_block_and_unblock_with_slixmpp(start_server: StartServer) -> None:
    server = await start_server(users=PASSWORDS, modules=MODULES)
    alice = await online(server, "alice@localhost/desk")
    alice2 = await online(server, "alice@localhost/phone")
    bob = await online(server, "bob@localhost/laptop")

    info = await alice.plugin["xep_0030"].get_info(jid=JID("localhost"), timeout=10)
    assert {"urn:xmpp:blocking", PRIVACY} <= set(info["disco_info"]["features"])

    await alice.plugin["xep_0191"].block(JID("bob@localhost"), timeout=10)
    for resource in (alice, alice2):  # every resource, the one that asked included
        push = await asyncio.wait_for(resource.pushes.get(), 10)  # type: ignore[attr-defined]
        assert push == ("blocked", ["bob@localhost"])
    blocked = await alice2.plugin["xep_0191"].get_blocked_jids(timeout=10)
    assert blocked == {JID("bob@localhost")}

    # bob's message does not arrive; he is told the recipient is unavailable
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="let me in", mtype="chat")
    condition, marker = error_of(await next_message(bob))
    assert (condition, marker) == ("service-unavailable", False)
    # alice cannot write to bob either, and is told why
    alice.send_message(mto=JID("bob@localhost"), mbody="psst", mtype="chat")
    assert error_of(await next_message(alice)) == ("not-acceptable", True)
    await settle(alice)
    await settle(bob)
    assert alice.messages.empty() and alice2.messages.empty() and bob.messages.empty()

    await alice2.plugin["xep_0191"].unblock(JID("bob@localhost"), timeout=10)
    push = await asyncio.wait_for(alice.pushes.get(), 10)  # type: ignore[attr-defined]
    assert push == ("unblocked", ["bob@localhost"])
    assert await alice.plugin["xep_0191"].get_blocked_jids(timeout=10) == set()
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="hello again", mtype="chat")
    got = await next_message(alice)
    assert (got["type"], got["body"], str(got["from"])) == (
        "chat",
        "hello again",
        "bob@localhost/laptop",
    )
    for client in (alice, alice2, bob):
        await close(client)


def privacy_query(inner: str) -> ET.Element:
    return ET.fromstring(f"<query xmlns='{PRIVACY}'>{inner}</query>")


async def privacy_iq(client: Client, type_: str, inner: str) -> slixmpp.Iq:
    iq = client.make_iq_set() if type_ == "set" else client.make_iq_get()
    iq.append(privacy_query(inner))
    return await iq.send(timeout=10)


async def test_privacy_list_denying_a_jid_with_raw_iqs(start_server: StartServer) -> None:
    server = await start_server(users=PASSWORDS, modules=MODULES)
    alice = await online(server, "alice@localhost/desk")
    alice2 = await online(server, "alice@localhost/phone")
    bob = await online(server, "bob@localhost/laptop")
    carol = await online(server, "carol@localhost/tablet")
    privacy_pushes: asyncio.Queue[str] = asyncio.Queue()

    def on_push(iq: StanzaBase) -> None:
        if iq["type"] != "set":
            return  # answers to alice2's own requests
        lst = iq.xml.find(f"{{{PRIVACY}}}query/{{{PRIVACY}}}list")
        privacy_pushes.put_nowait(lst.get("name", "") if lst is not None else "")
        iq.reply().send()

    alice2.register_handler(
        Callback(
            "privacy push",
            MatchXPath(f"{{jabber:client}}iq/{{{PRIVACY}}}query"),
            on_push,
        )
    )

    await privacy_iq(
        alice,
        "set",
        "<list name='no-bob'>"
        "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>"
        "<item action='allow' order='2'/>"
        "</list>",
    )
    assert await asyncio.wait_for(privacy_pushes.get(), 10) == "no-bob"
    await privacy_iq(alice, "set", "<default name='no-bob'/>")
    names = await privacy_iq(alice, "get", "")
    query = names.xml.find(f"{{{PRIVACY}}}query")
    assert query is not None
    assert [e.get("name") for e in query.iter(f"{{{PRIVACY}}}list")] == ["no-bob"]
    assert query.find(f"{{{PRIVACY}}}default").get("name") == "no-bob"  # type: ignore[union-attr]

    bob.send_message(mto=JID("alice@localhost"), mbody="blocked by a list", mtype="chat")
    assert error_of(await next_message(bob)) == ("service-unavailable", False)
    carol.send_message(mto=JID("alice@localhost/desk"), mbody="from carol", mtype="chat")
    got = await next_message(alice)
    assert (got["body"], str(got["from"])) == ("from carol", "carol@localhost/tablet")
    await settle(alice)
    assert alice.messages.empty() and alice2.messages.empty()

    # a malformed list is refused and changes nothing
    bad = alice.make_iq_set()
    bad.append(privacy_query("<list name='no-bob'><item action='deny'/></list>"))
    try:
        await bad.send(timeout=10)
        raise AssertionError("a list item without 'order' was accepted")
    except slixmpp.exceptions.IqError as exc:
        assert exc.condition == "bad-request"
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="still blocked", mtype="chat")
    assert error_of(await next_message(bob)) == ("service-unavailable", False)

    # the default list applies to alice's other resource: she may not decline it for both
    decline = alice.make_iq_set()
    decline.append(privacy_query("<default/>"))
    try:
        await decline.send(timeout=10)
        raise AssertionError("declined a default list another resource uses")
    except slixmpp.exceptions.IqError as exc:
        assert exc.condition == "conflict"
    # but an active list is hers alone: bob reaches this resource, not the other
    await privacy_iq(alice, "set", "<list name='open'><item action='allow' order='1'/></list>")
    assert await asyncio.wait_for(privacy_pushes.get(), 10) == "open"
    await privacy_iq(alice, "set", "<active name='open'/>")
    bob.send_message(mto=JID("alice@localhost/desk"), mbody="free again", mtype="chat")
    assert (await next_message(alice))["body"] == "free again"
    bob.send_message(mto=JID("alice@localhost/phone"), mbody="not here", mtype="chat")
    assert error_of(await next_message(bob)) == ("service-unavailable", False)
    await settle(alice2)
    assert alice2.messages.empty()
    for client in (alice, alice2, bob, carol):
        await close(client)


async def presence_from(
    client: Client, sender: str, types: tuple[str, ...], timeout: float = 10
) -> slixmpp.Presence:
    """The next presence of one of `types` from `sender`; others are skipped."""
    queue: asyncio.Queue[slixmpp.Presence] = client.presences  # type: ignore[attr-defined]
    async with asyncio.timeout(timeout):
        while True:
            presence = await queue.get()
            if str(presence["from"]) == sender and presence["type"] in types:
                return presence


async def friends(server: Server) -> tuple[Client, Client]:
    """alice and bob, subscribed to each other, both available."""
    alice = await online(server, "alice@localhost/desk")
    bob = await online(server, "bob@localhost/laptop")
    for client in (alice, bob):
        client.auto_authorize = True
        client.auto_subscribe = False
        queue: asyncio.Queue[slixmpp.Presence] = asyncio.Queue()
        client.presences = queue  # type: ignore[attr-defined]
        client.add_event_handler("presence", queue.put_nowait)
    alice.send_presence(pto="bob@localhost", ptype="subscribe")
    bob.send_presence(pto="alice@localhost", ptype="subscribe")
    await presence_from(alice, "bob@localhost/laptop", AVAILABLE)
    await presence_from(bob, "alice@localhost/desk", AVAILABLE)
    # Presence can arrive just before the last "subscribed" is stored: wait for both rosters.
    roster = server.modules.modules["roster"]
    async with asyncio.timeout(10):
        for owner, contact in (("alice", "bob"), ("bob", "alice")):
            while True:
                item = await roster.item(f"{owner}@localhost", f"{contact}@localhost")  # type: ignore[attr-defined]
                if item is not None and item.subscription == "both":
                    break
                await asyncio.sleep(0.02)
    return alice, bob


AVAILABLE = ("available", "chat", "away", "xa", "dnd")


async def test_blocking_a_contact_hides_presence_both_ways(start_server: StartServer) -> None:
    server = await start_server(users=PASSWORDS, modules=MODULES)
    alice, bob = await friends(server)

    await alice.plugin["xep_0191"].block(JID("bob@localhost"), timeout=10)
    # XEP-0191 3.3: bob is told alice went away, and alice stops seeing bob
    await presence_from(bob, "alice@localhost/desk", ("unavailable",))
    await presence_from(alice, "bob@localhost/laptop", ("unavailable",))
    alice.send_presence(pshow="away")
    bob.send_presence(pshow="dnd")
    await settle(alice)
    await settle(bob)
    seen_by_bob = [str(p["from"]) for p in _drain(bob)]
    seen_by_alice = [str(p["from"]) for p in _drain(alice)]
    assert "alice@localhost/desk" not in seen_by_bob
    assert "bob@localhost/laptop" not in seen_by_alice

    # unblocking shows each the other's current presence again
    await alice.plugin["xep_0191"].unblock(JID("bob@localhost"), timeout=10)
    assert (await presence_from(bob, "alice@localhost/desk", AVAILABLE))["show"] == "away"
    assert (await presence_from(alice, "bob@localhost/laptop", AVAILABLE))["show"] == "dnd"
    for client in (alice, bob):
        await close(client)


def _drain(client: Client) -> list[slixmpp.Presence]:
    queue: asyncio.Queue[slixmpp.Presence] = client.presences  # type: ignore[attr-defined]
    got = []
    while not queue.empty():
        got.append(queue.get_nowait())
    return got


CARBONS = "urn:xmpp:carbons:2"


async def with_carbons(client: Client) -> asyncio.Queue[str]:
    """Carbons enabled for `client`; the queue gets the body of each <received/> copy."""
    copies: asyncio.Queue[str] = asyncio.Queue()

    def on_copy(message: StanzaBase) -> None:
        inner = message.xml.find(
            f"{{{CARBONS}}}received/{{urn:xmpp:forward:0}}forwarded/{{jabber:client}}message"
        )
        copies.put_nowait(inner.findtext("{jabber:client}body") if inner is not None else "")

    client.register_handler(
        Callback("carbon", MatchXPath(f"{{jabber:client}}message/{{{CARBONS}}}received"), on_copy)
    )
    enable = client.make_iq_set()
    enable.append(ET.fromstring(f"<enable xmlns='{CARBONS}'/>"))
    await enable.send(timeout=10)
    return copies


async def test_no_carbon_of_a_blocked_contacts_message(start_server: StartServer) -> None:
    """alice/desk (priority 5) blocks bob; alice/phone (priority 0) has carbons on. bob's
    message is refused, and alice/phone gets no copy of it; carol's next message is
    copied to alice/phone as usual."""
    server = await start_server(users=PASSWORDS, modules={**MODULES, "carbons": {}})
    desk = await online(server, "alice@localhost/desk")
    desk.send_presence(ppriority=5)
    phone = await online(server, "alice@localhost/phone")
    copies = await with_carbons(phone)
    bob = await online(server, "bob@localhost/laptop")
    carol = await online(server, "carol@localhost/tablet")
    await desk.plugin["xep_0191"].block(JID("bob@localhost"), timeout=10)
    await settle(desk)

    bob.send_message(mto=JID("alice@localhost"), mbody="let me in", mtype="chat")
    assert error_of(await next_message(bob)) == ("service-unavailable", False)
    carol.send_message(mto=JID("alice@localhost"), mbody="from carol", mtype="chat")
    assert (await next_message(desk))["body"] == "from carol"
    assert await asyncio.wait_for(copies.get(), 10) == "from carol"  # bob's came first, if any
    await settle(phone)
    assert copies.empty() and desk.messages.empty()
    for client in (desk, phone, bob, carol):
        await close(client)


async def test_a_message_one_resources_list_refuses_reaches_the_other_without_error(
    start_server: StartServer,
) -> None:
    """alice/desk and alice/phone share the top priority, so both are given bob's message
    to alice's bare JID; desk's active list refuses bob's messages, phone has no list.
    phone gets it, desk does not, and bob gets no error: the message was delivered, and
    an error would have his client send it again. alice/tablet (lower priority, carbons
    on) gets a <received/> copy. When both refuse, bob gets one error."""
    server = await start_server(users=PASSWORDS, modules={**MODULES, "carbons": {}})
    desk = await online(server, "alice@localhost/desk")
    desk.send_presence(ppriority=1)
    phone = await online(server, "alice@localhost/phone")
    phone.send_presence(ppriority=1)
    tablet = await online(server, "alice@localhost/tablet")
    copies = await with_carbons(tablet)
    bob = await online(server, "bob@localhost/laptop")
    await privacy_iq(
        desk,
        "set",
        "<list name='no-bob'>"
        "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>"
        "</list>",
    )
    await privacy_iq(desk, "set", "<active name='no-bob'/>")
    await settle(desk)

    bob.send_message(mto=JID("alice@localhost"), mbody="for whoever takes it", mtype="chat")
    got = await next_message(phone)
    assert (got["body"], str(got["from"])) == ("for whoever takes it", "bob@localhost/laptop")
    assert await asyncio.wait_for(copies.get(), 10) == "for whoever takes it"
    await settle(bob)  # an error would have come before this round trip's answer
    assert bob.messages.empty()
    await settle(desk)
    assert desk.messages.empty()

    await privacy_iq(phone, "set", "<active name='no-bob'/>")
    bob.send_message(mto=JID("alice@localhost"), mbody="for nobody", mtype="chat")
    assert error_of(await next_message(bob)) == ("service-unavailable", False)
    await settle(bob)
    assert bob.messages.empty()
    for client in (desk, phone, tablet):
        await settle(client)
        assert client.messages.empty()
    assert copies.empty()
    for client in (desk, phone, tablet, bob):
        await close(client)
