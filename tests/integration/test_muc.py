"""Multi-user chat with real clients: slixmpp's xep_0045 against a real node.

What a desktop client does in a room, on the embedded and the cloud storage:
create and configure a room, join, talk, change the subject, change nick,
get history on join; moderation (kick, ban) as the kicked client sees it;
and a persistent room (configuration, affiliations, subject, history) that
is still there after the node restarts on the same stores.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from slixmpp import JID, Message, Presence
from slixmpp.exceptions import PresenceError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from tests.integration.clients import Client, close, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.test_account_removal import xmppctl
from tests.integration.test_user_journey import MODULES as JOURNEY_MODULES
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.server import Server

pytestmark = pytest.mark.timeout(60)

ROOM = JID("lobby@conference.localhost")
USERS = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
MODULES: dict[str, Any] = {**JOURNEY_MODULES, "muc": {}}


class Chatter(Client):
    """A client with MUC (xep_0045) and what it uses, recording groupchat traffic."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        for plugin in ("xep_0030", "xep_0004", "xep_0045", "xep_0203", "xep_0199"):
            self.register_plugin(plugin)
        self.groupchat: asyncio.Queue[Message] = asyncio.Queue()
        self.subjects: asyncio.Queue[Message] = asyncio.Queue()
        self.room_presence: asyncio.Queue[Presence] = asyncio.Queue()
        self.add_event_handler("groupchat_message", self._groupchat)
        self.add_event_handler("groupchat_subject", self.subjects.put_nowait)
        self.add_event_handler("groupchat_presence", self.room_presence.put_nowait)

    def _groupchat(self, message: Message) -> None:
        if message["body"]:
            self.groupchat.put_nowait(message)

    @property
    def muc(self) -> Any:
        return self.plugin["xep_0045"]

    async def said(self) -> Message:
        return await asyncio.wait_for(self.groupchat.get(), 10)

    async def presence_of(self, nick: str, type_: str = "available") -> Presence:
        """The next room presence from `nick` of `type_` (others are skipped)."""
        while True:
            presence = await asyncio.wait_for(self.room_presence.get(), 10)
            if presence["from"].resource == nick and presence["type"] == type_:
                return presence


async def chatter(server: Server, jid: str) -> Chatter:
    client = Chatter(jid, USERS[JID(jid).user])
    client.ssl_context = insecure_context()
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "starttls"))
    await asyncio.wait_for(client.started.wait(), 15)
    return client


async def create_room(owner: Chatter, nick: str, **config: Any) -> None:
    """Join a new room (201), then submit the configuration form with `config`."""
    own, _subject, _occupants, _history = await owner.muc.join_muc_wait(ROOM, nick, timeout=10)
    assert 201 in own["muc"]["status_codes"]
    form = await owner.muc.get_room_config(ROOM)
    form.set_values({f"muc#roomconfig_{var}": value for var, value in config.items()})
    await owner.muc.set_room_config(ROOM, form)


async def test_join_talk_subject_and_nick_change(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=MODULES)
    alice = await chatter(server, "alice@localhost/desk")
    bob = await chatter(server, "bob@localhost/phone")
    await create_room(alice, "Alice", roomname="Lobby")
    _own, _subject, occupants, _history = await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob"]  # slixmpp counts itself
    await alice.presence_of("Bob")

    alice.send_message(mto=ROOM, mbody="hello room", mtype="groupchat")
    heard = await bob.said()
    assert (heard["from"], heard["body"]) == (JID(f"{ROOM}/Alice"), "hello room")
    assert heard.xml.find("{urn:xmpp:occupant-id:0}occupant-id").get("id")
    assert (await alice.said())["body"] == "hello room"  # the room reflects it

    assert not (await asyncio.wait_for(bob.subjects.get(), 10))["subject"]  # his join: none
    alice.muc.set_subject(ROOM, "Plans for today")
    bob_subject = await asyncio.wait_for(bob.subjects.get(), 10)
    assert bob_subject["subject"] == "Plans for today"
    assert bob_subject["from"] == JID(f"{ROOM}/Alice")

    assert await bob.muc.set_self_nick(ROOM, "Robert", timeout=10) == "Robert"
    gone = await alice.presence_of("Bob", "unavailable")
    assert 303 in gone["muc"]["status_codes"] and gone["muc"]["item_nick"] == "Robert"
    await alice.presence_of("Robert")
    bob.send_message(mto=ROOM, mbody="now Robert", mtype="groupchat")
    assert (await alice.said())["from"] == JID(f"{ROOM}/Robert")
    await close(alice)
    await close(bob)


async def test_history_on_join(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=MODULES)
    alice = await chatter(server, "alice@localhost/desk")
    await create_room(alice, "Alice")
    for n in range(4):
        alice.send_message(mto=ROOM, mbody=f"line {n}", mtype="groupchat")
        await alice.said()
    bob = await chatter(server, "bob@localhost/phone")
    _own, _subject, _occupants, history = await bob.muc.join_muc_wait(
        ROOM, "Bob", maxstanzas=2, timeout=10
    )
    assert [m["body"] for m in history] == ["line 2", "line 3"]
    assert all(m["delay"]["from"] == ROOM for m in history)
    carol = await chatter(server, "carol@localhost/laptop")
    _own, _subject, _occupants, history = await carol.muc.join_muc_wait(ROOM, "Carol", timeout=10)
    assert [m["body"] for m in history] == [f"line {n}" for n in range(4)]
    for client in (alice, bob, carol):
        await close(client)


async def test_kick_and_ban(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=MODULES)
    alice = await chatter(server, "alice@localhost/desk")
    bob = await chatter(server, "bob@localhost/phone")
    await create_room(alice, "Alice")
    await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)

    await alice.muc.set_role(ROOM, "Bob", "none", reason="cool down")
    kicked = await bob.presence_of("Bob", "unavailable")
    assert {110, 307} <= set(kicked["muc"]["status_codes"])
    assert 307 in (await alice.presence_of("Bob", "unavailable"))["muc"]["status_codes"]

    await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)
    await alice.muc.set_affiliation(ROOM, "outcast", jid=JID("bob@localhost"), reason="enough")
    banned = await bob.presence_of("Bob", "unavailable")
    assert {110, 301} <= set(banned["muc"]["status_codes"])
    with pytest.raises(PresenceError) as refused:
        await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)
    assert refused.value.condition == "forbidden"
    assert await alice.muc.get_affiliation_list(ROOM, "outcast") == [JID("bob@localhost")]
    await close(alice)
    await close(bob)


async def test_a_persistent_room_survives_a_restart(start_server: StartServer) -> None:
    first = await start_server(users=USERS, modules=MODULES)
    alice = await chatter(first, "alice@localhost/desk")
    await create_room(alice, "Alice", persistentroom=True, membersonly=True, roomname="Kept")
    await alice.muc.set_affiliation(ROOM, "member", jid=JID("bob@localhost"))
    alice.muc.set_subject(ROOM, "Still here")
    await asyncio.wait_for(alice.subjects.get(), 10)
    alice.send_message(mto=ROOM, mbody="before the restart", mtype="groupchat")
    await alice.said()
    await close(alice)
    await first.stop()

    second = await start_server(users={}, modules=MODULES)  # the same stores
    bob = await chatter(second, "bob@localhost/phone")
    _own, subject, _occupants, history = await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)
    assert subject["subject"] == "Still here"
    assert [m["body"] for m in history] == ["before the restart"]
    carol = await chatter(second, "carol@localhost/laptop")
    with pytest.raises(PresenceError) as refused:
        await carol.muc.join_muc_wait(ROOM, "Carol", timeout=10)
    assert refused.value.condition == "registration-required"  # still members-only
    info = await bob.plugin["xep_0030"].get_info(jid=ROOM, timeout=10)
    assert "muc_persistent" in info["disco_info"]["features"]
    assert ("conference", "text", None, "Kept") in info["disco_info"]["identities"]
    await close(bob)
    await close(carol)


async def test_invitations_mediated_and_direct_with_a_decline(start_server: StartServer) -> None:
    server = await start_server(users=USERS, modules=MODULES)
    alice = await chatter(server, "alice@localhost/desk")
    bob = await chatter(server, "bob@localhost/phone")
    carol = await chatter(server, "carol@localhost/laptop")
    for client in (alice, bob, carol):
        client.register_plugin("xep_0249")
        # Available, as a real client is: mediated invitations go to the bare JID.
        client.send_presence()
        await client.plugin["xep_0199"].ping(JID("localhost"), timeout=10)  # presence applied
    invites: asyncio.Queue[Message] = asyncio.Queue()
    direct: asyncio.Queue[Message] = asyncio.Queue()
    bob.add_event_handler("groupchat_invite", invites.put_nowait)
    carol.add_event_handler("groupchat_direct_invite", direct.put_nowait)
    await create_room(alice, "Alice", membersonly=True, roomname="Club")

    alice.muc.invite(ROOM, JID("bob@localhost"), reason="join us")
    invite = await asyncio.wait_for(invites.get(), 10)
    assert invite["from"] == ROOM
    assert invite["muc"]["invite"]["from"] == JID("alice@localhost/desk")
    assert invite["muc"]["invite"]["reason"] == "join us"
    await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)  # the invitation made him a member

    # XEP-0249: the invitation goes from user to user.
    alice.plugin["xep_0249"].send_invitation(JID("carol@localhost/laptop"), ROOM, reason="too")
    assert (await asyncio.wait_for(direct.get(), 10))["groupchat_invite"]["jid"] == ROOM
    # A mediated one carol declines through the room, which tells whoever invited her.
    # (slixmpp's groupchat_decline event fires only for components: a handler of our own.)
    declines: asyncio.Queue[Message] = asyncio.Queue()
    alice.register_handler(
        Callback("decline", StanzaPath("message/muc/decline"), declines.put_nowait)
    )
    carol_invites: asyncio.Queue[Message] = asyncio.Queue()
    carol.add_event_handler("groupchat_invite", carol_invites.put_nowait)
    alice.muc.invite(ROOM, JID("carol@localhost"))
    await asyncio.wait_for(carol_invites.get(), 10)
    carol.muc.decline(ROOM, JID("alice@localhost"), reason="busy")
    message = await asyncio.wait_for(declines.get(), 10)
    assert message["from"] == ROOM
    assert message["muc"]["decline"]["from"] == JID("carol@localhost")
    assert message["muc"]["decline"]["reason"] == "busy"
    rooms = await carol.plugin["xep_0030"].get_items(jid=JID("conference.localhost"), timeout=10)
    assert [(i[0], i[2]) for i in rooms["disco_items"]["items"]] == [(ROOM, "Club")]
    for client in (alice, bob, carol):
        await close(client)


async def test_xmppctl_unregister_takes_the_account_out_of_its_rooms(
    start_server: StartServer, tmp_path: Path
) -> None:
    # With no node running, xmppctl loads the configured modules itself: muc among them.
    first = await start_server(users=USERS, modules=MODULES)
    alice = await chatter(first, "alice@localhost/desk")
    await create_room(alice, "Alice", persistentroom=True, membersonly=True)
    await alice.muc.set_affiliation(ROOM, "admin", jid=JID("bob@localhost"))
    await close(alice)
    await first.stop()
    code, out, err = await xmppctl("-c", str(tmp_path / "xmppd.yml"), "unregister", "bob@localhost")
    assert (code, out, err) == (0, "unregistered bob@localhost\n", "")

    # A new bob is a stranger to the members-only room, not its admin.
    second = await start_server(users={"bob": "new-secret"}, modules=MODULES)
    bob = Chatter("bob@localhost/phone", "new-secret")
    bob.ssl_context = insecure_context()
    bob.enable_plaintext = False
    bob.connect("127.0.0.1", port_of(second, "starttls"))
    await asyncio.wait_for(bob.started.wait(), 15)
    with pytest.raises(PresenceError) as refused:
        await bob.muc.join_muc_wait(ROOM, "Bob", timeout=10)
    assert refused.value.condition == "registration-required"
    await close(bob)
