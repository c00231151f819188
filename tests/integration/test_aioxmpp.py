"""aioxmpp, a second real client library, against a real node: TLS with the
certificate checked, PEP (XEP-0163), avatars (XEP-0084) and bookmarks (XEP-0048
against slixmpp's XEP-0402) across the two libraries, the pubsub service
(XEP-0060), and multi-user chat (XEP-0045) with aioxmpp and slixmpp occupants in
one room, on the embedded and the cloud storage. The clients run in their own virtualenv
(tests/integration/aioxmpp_client.py says why and how)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import certifi
import pytest
from slixmpp import JID

from tests.integration.aioxmpp_client import AgentError, Connect, aioxmpp, start_agent
from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.test_muc import USERS, chatter
from tests.integration.test_pep import (
    BOOKMARKS,
    IMAGE,
    PUBSUB,
    befriend,
    bookmark_options,
    next_of,
    online,
    publish_avatar,
)

__all__ = ["aioxmpp"]  # fixture, used by name

pytestmark = pytest.mark.timeout(90)

NOTE = "urn:xmppd:test:note"  # the agent's payload namespace, here a PEP node
SERVICE = "pubsub.localhost"
ROOM = "aiox@conference.localhost"
MODULES: dict[str, Any] = {
    "disco": {},
    "caps": {},
    "roster": {},
    "presence": {},
    "ping": {},
    "pep": {},
    "pubsub": {},
    "muc": {},
}


async def test_login_checks_the_certificate(start_server: StartServer, aioxmpp: Connect) -> None:
    """Both TLS listeners, with aioxmpp's PKIX check of the server certificate on: the
    pyOpenSSL pin of requirements/aioxmpp.in keeps that check working."""
    server = await start_server(modules=MODULES)
    for direct_tls in (False, True):
        client = await aioxmpp(
            server, "alice@localhost/aiox", "alice-secret", direct_tls=direct_tls
        )
        await client.close()
        assert client.process.returncode == 0, client.log()
    with pytest.raises(AgentError, match="certificate verify failed"):
        # Trusting only the public CAs, aioxmpp refuses the self-signed certificate.
        await start_agent(server, "alice@localhost/aiox", "alice-secret", cafile=certifi.where())


async def test_pep_notifies_contacts_and_sends_the_last_item(
    start_server: StartServer, aioxmpp: Connect
) -> None:
    """aioxmpp's PEPClient: a claimed node puts `+notify` in its caps; a publish
    reaches the publisher's contacts and itself, and a contact logging in later gets
    the last item."""
    server = await start_server(modules=MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    alice = await aioxmpp(server, "alice@localhost/desk", "alice-secret", notify=(NOTE,))
    bob = await aioxmpp(server, "bob@localhost/home", "bob-secret", notify=(NOTE,))

    item = await alice.request("pep_publish", node=NOTE, text="at the beach", item="mood")
    assert item == "mood"
    for client in (bob, alice):
        heard = await client.expect("pep", node=NOTE, item="mood")
        assert (heard["from"], heard["text"]) == ("alice@localhost", "at the beach")

    await alice.request("pep_publish", node=NOTE, text="back home", item="mood")
    phone = await aioxmpp(server, "bob@localhost/phone", "bob-secret", notify=(NOTE,))
    last = await phone.expect("pep", node=NOTE, **{"from": "alice@localhost"})
    assert (last["item"], last["text"]) == ("mood", "back home")


async def test_avatars_between_aioxmpp_and_slixmpp(
    start_server: StartServer, aioxmpp: Connect
) -> None:
    """XEP-0084 both ways between two libraries: aioxmpp's AvatarService publishes,
    a slixmpp contact (xep_0084) is notified; slixmpp publishes, aioxmpp is."""
    server = await start_server(modules=MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    alice = await aioxmpp(server, "alice@localhost/desk", "alice-secret", avatars=True)
    bob = await online(server, "bob@localhost/home", "bob-secret")  # slixmpp

    image = base64.b64encode(IMAGE).decode()
    avatar_id = await alice.request("avatar_publish", png_base64=image)
    assert avatar_id == hashlib.sha1(IMAGE).hexdigest()
    assert await next_of(bob.avatars) == ("alice@localhost", avatar_id)

    bob_id = await publish_avatar(bob)
    heard = await alice.expect("avatar", **{"from": "bob@localhost"})
    assert heard["ids"] == [bob_id]
    await close(bob)


async def test_aioxmpp_bookmarks_are_the_xep0402_bookmarks(
    start_server: StartServer, aioxmpp: Connect
) -> None:
    """aioxmpp 0.13 keeps bookmarks the XEP-0048 way, in private storage; slixmpp
    reads and writes XEP-0402 ones in PEP. With `private` and `pep`, each sees the
    other's (XEP-0411)."""
    server = await start_server(modules={**MODULES, "private": {}})
    old = await aioxmpp(server, "alice@localhost/old", "alice-secret")
    await old.request(
        "bookmark_add", room="council@conference.localhost", name="Council", nick="alice"
    )
    new = await online(server, "alice@localhost/new", "alice-secret", (BOOKMARKS,))
    new.register_plugin("xep_0402")
    items = await new.plugin["xep_0060"].get_items(JID("alice@localhost"), BOOKMARKS, timeout=10)
    stored = {item.get("id"): item for item in items.xml.iter(f"{{{PUBSUB}}}item")}
    council = stored["council@conference.localhost"].find(f"{{{BOOKMARKS}}}conference")
    assert council is not None and council.get("name") == "Council"
    assert council.findtext(f"{{{BOOKMARKS}}}nick") == "alice"

    conference = new.plugin["xep_0402"].stanza.Conference()
    conference["name"], conference["nick"] = "Tea", "al"
    await new.plugin["xep_0060"].publish(
        JID("alice@localhost"),
        BOOKMARKS,
        id="tea@conference.localhost",
        payload=conference.xml,
        options=bookmark_options(new),
        timeout=10,
    )
    assert await old.request("bookmarks") == [
        ["council@conference.localhost", "Council", "alice"],
        ["tea@conference.localhost", "Tea", "al"],
    ]
    await close(new)


async def test_pubsub_service_create_subscribe_publish_items_retract(
    start_server: StartServer, aioxmpp: Connect
) -> None:
    """aioxmpp's PubSubClient on the pubsub service: a node created by one user,
    subscribed to by another, who is notified of publishes and retractions and can
    fetch the latest items and items by id; disco lists the node."""
    server = await start_server(modules=MODULES)
    alice = await aioxmpp(server, "alice@localhost/desk", "alice-secret")
    bob = await aioxmpp(server, "bob@localhost/home", "bob-secret")

    assert await alice.request("pubsub_create", service=SERVICE, node="news") == "news"
    assert "news" in await bob.request("pubsub_nodes", service=SERVICE)
    assert await bob.request("pubsub_subscribe", service=SERVICE, node="news") == "subscribed"
    for n in range(1, 4):
        item = await alice.request(
            "pubsub_publish", service=SERVICE, node="news", text=f"story {n}", item=f"s{n}"
        )
        assert item == f"s{n}"
        heard = await bob.expect("pubsub_item", node="news", item=f"s{n}")
        assert (heard["from"], heard["text"]) == (SERVICE, f"story {n}")

    latest = await bob.request("pubsub_items", service=SERVICE, node="news", max_items=2)
    assert sorted(latest) == [["s2", "story 2"], ["s3", "story 3"]]
    assert await bob.request("pubsub_items", service=SERVICE, node="news", ids=["s1"]) == [
        ["s1", "story 1"]
    ]

    await alice.request("pubsub_retract", service=SERVICE, node="news", item="s2")
    await bob.expect("pubsub_retract", node="news", item="s2")
    remaining = await alice.request("pubsub_items", service=SERVICE, node="news")
    assert sorted(remaining) == [["s1", "story 1"], ["s3", "story 3"]]
    with pytest.raises(AgentError, match="forbidden"):  # not the owner
        await bob.request("pubsub_publish", service=SERVICE, node="news", text="mine")


async def test_muc_with_aioxmpp_and_slixmpp_occupants(
    start_server: StartServer, aioxmpp: Connect
) -> None:
    """Two aioxmpp clients (aioxmpp.MUCClient) and a slixmpp one in one room: an
    instant room created by aioxmpp, joins seen by everyone, messages from either
    library reaching the others, and a subject change."""
    server = await start_server(users=USERS, modules=MODULES)
    alice = await aioxmpp(server, "alice@localhost/desk", "alice-secret")
    bob = await aioxmpp(server, "bob@localhost/home", "bob-secret")
    carol = await chatter(server, "carol@localhost/laptop")  # slixmpp

    joined = await alice.request("muc_join", room=ROOM, nick="Alice")
    assert joined == {"me": "Alice", "created": True, "occupants": ["Alice"]}
    joined = await bob.request("muc_join", room=ROOM, nick="Bob")
    assert joined["occupants"] == ["Alice", "Bob"]
    await alice.expect("muc_join", nick="Bob")
    _own, _subject, occupants, _history = await carol.muc.join_muc_wait(
        JID(ROOM), "Carol", timeout=10
    )
    assert sorted(p["from"].resource for p in occupants) == ["Alice", "Bob", "Carol"]
    for client in (alice, bob):
        await client.expect("muc_join", nick="Carol")

    await alice.request("muc_send", room=ROOM, body="hello from aioxmpp")
    heard = await bob.expect("muc_message", nick="Alice")
    assert heard["body"] == "hello from aioxmpp"
    said = await carol.said()
    assert (said["from"], said["body"]) == (JID(f"{ROOM}/Alice"), "hello from aioxmpp")

    carol.send_message(mto=JID(ROOM), mbody="hello from slixmpp", mtype="groupchat")
    for client in (alice, bob):
        heard = await client.expect("muc_message", nick="Carol")
        assert heard["body"] == "hello from slixmpp"

    assert not (await asyncio.wait_for(carol.subjects.get(), 10))["subject"]  # her join's
    # The owner: participants may not change it in a room of the default configuration.
    await alice.request("muc_subject", room=ROOM, subject="aioxmpp and slixmpp")
    for client in (alice, bob):
        changed = await client.expect("muc_subject", subject="aioxmpp and slixmpp")
        assert changed["nick"] == "Alice"
    subject = await asyncio.wait_for(carol.subjects.get(), 10)
    assert (subject["from"], subject["subject"]) == (JID(f"{ROOM}/Alice"), "aioxmpp and slixmpp")

    await close(carol)


async def test_aioxmpp_leaves_a_room(start_server: StartServer, aioxmpp: Connect) -> None:
    server = await start_server(users=USERS, modules=MODULES)
    alice = await aioxmpp(server, "alice@localhost/desk", "alice-secret")
    carol = await chatter(server, "carol@localhost/laptop")  # slixmpp
    await alice.request("muc_join", room=ROOM, nick="Alice")
    await carol.muc.join_muc_wait(JID(ROOM), "Carol", timeout=10)
    try:
        await alice.request("muc_leave", room=ROOM, timeout=5)
        assert (await carol.presence_of("Alice", "unavailable"))["type"] == "unavailable"
    finally:
        await close(carol)
