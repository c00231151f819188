"""Multi-user chat (XEP-0045, XEP-0410, XEP-0421) without sockets.

Each test drives the muc module through a real router and module host with
TestSessions as the users' clients, and reads what each client was sent:
the XEP's use cases (join, nick change, leave, messages, subject, private
messages, history, room creation and configuration, moderation, destruction,
invitations, disco) and its errors, the service's limits, and rooms kept
across a restart of the module (the same stores, a new host).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.modules.slow_stores import SlowReadSQLite
from xmppd.modules import _muc_send
from xmppd.modules import muc as muc_module
from xmppd.modules._muc_room import MUC, MUC_ADMIN, MUC_OWNER, MUC_USER, OCCUPANT_ID, Room
from xmppd.modules._muc_store import unpack_history
from xmppd.modules.muc import Muc
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import StorageError
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, TestSession, parse_stanza
from xmppd.xml import ns

ROOM = "room@conference.localhost"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
U = f"{{{MUC_USER}}}"
DATA = "jabber:x:data"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def harness(**options: Any) -> tuple[ModuleHarness, Clock]:
    h = await ModuleHarness({"disco": {}, "muc": options}).start()
    clock = Clock()
    h.host.module(Muc).clock = clock
    return h, clock


def condition(stanza: etree._Element) -> str:
    assert stanza.get("type") == "error", etree.tostring(stanza)
    error = stanza.find(f"{{{ns.CLIENT}}}error")
    assert error is not None
    return next(etree.QName(c).localname for c in error if etree.QName(c).namespace == STANZAS)


def codes(stanza: etree._Element) -> set[str]:
    return {s.get("code", "") for s in stanza.iterfind(f"{U}x/{U}status")}


def item(stanza: etree._Element) -> etree._Element:
    found = stanza.find(f"{U}x/{U}item")
    assert found is not None, etree.tostring(stanza)
    return found


def presences(stanzas: list[etree._Element]) -> list[etree._Element]:
    return [s for s in stanzas if s.tag == ns.C_PRESENCE]


def messages(stanzas: list[etree._Element]) -> list[etree._Element]:
    return [s for s in stanzas if s.tag == ns.C_MESSAGE]


async def join(
    h: ModuleHarness,
    session: TestSession,
    nick: str,
    room: str = ROOM,
    extra: str = "",
    muc: bool = True,
) -> list[etree._Element]:
    x = f"<x xmlns='{MUC}'>{extra}</x>" if muc else ""
    return await h.send(session, f"<presence to='{room}/{nick}'>{x}</presence>")


async def owner_iq(
    h: ModuleHarness, session: TestSession, type_: str, payload: str, room: str = ROOM
) -> etree._Element:
    return await h.iq(session, type_, f"<query xmlns='{MUC_OWNER}'>{payload}</query>", to=room)


async def admin_iq(
    h: ModuleHarness, session: TestSession, type_: str, items: str, room: str = ROOM
) -> etree._Element:
    return await h.iq(session, type_, f"<query xmlns='{MUC_ADMIN}'>{items}</query>", to=room)


async def say(
    h: ModuleHarness, session: TestSession, body: str = "", subject: str | None = None,
    to: str = ROOM, type_: str = "groupchat",
) -> list[etree._Element]:
    """Send a message to the room (or an occupant); return what came back to the sender."""
    payload = f"<body>{body}</body>" if subject is None else f"<subject>{subject}</subject>"
    return await h.send(session, f"<message to='{to}' type='{type_}'>{payload}</message>")


def submit(**fields: str) -> str:
    body = "".join(
        f"<field var='{var if var.startswith('muc#') else 'muc#roomconfig_' + var}'>"
        f"<value>{value}</value></field>"
        for var, value in fields.items()
    )
    return f"<x xmlns='{DATA}' type='submit'>{body}</x>"


async def instant_room(
    h: ModuleHarness, owner: TestSession, nick: str = "owner", room: str = ROOM, **config: str
) -> None:
    """Create `room` with `owner` in it and submit `config` (none: an instant room)."""
    await join(h, owner, nick, room)
    reply = await owner_iq(h, owner, "set", submit(**config), room)
    assert reply.get("type") == "result", etree.tostring(reply)
    owner.take()


async def test_creating_a_room_locks_it_until_the_owner_configures_it() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    got = await join(h, alice, "Alice")
    (self_presence,) = presences(got)
    # The (empty) subject ends the join, also of a new room: clients wait for it.
    assert got[-1].find(f"{{{ns.CLIENT}}}subject") is not None
    assert self_presence.get("from") == f"{ROOM}/Alice"
    assert codes(self_presence) == {"110", "201"}
    assert (item(self_presence).get("affiliation"), item(self_presence).get("role")) == (
        "owner",
        "moderator",
    )
    # Locked: nobody else gets in (XEP-0045 10.1.1) until the configuration is submitted.
    (refused,) = await join(h, bob, "Bob")
    assert condition(refused) == "item-not-found"
    form = await owner_iq(h, alice, "get", "")
    fields = {f.get("var") for f in form.iter(f"{{{DATA}}}field")}
    assert {"muc#roomconfig_persistentroom", "muc#roomconfig_membersonly",
            "muc#roomconfig_whois", "muc#roomconfig_maxusers"} <= fields
    got = await h.send(
        alice,
        f"<iq type='set' id='c' to='{ROOM}'><query xmlns='{MUC_OWNER}'>"
        f"{submit(roomname='Lobby')}</query></iq>",
    )
    assert [(s.tag, s.get("type")) for s in got] == [(ns.C_IQ, "result")]
    joined = await join(h, bob, "Bob")
    assert codes(presences(joined)[-1]) == {"110"}


async def test_cancelling_the_form_of_a_new_room_destroys_it() -> None:
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    await join(h, alice, "Alice")
    reply = await owner_iq(h, alice, "set", f"<x xmlns='{DATA}' type='cancel'/>")
    assert reply.get("type") == "result"
    assert ROOM not in h.host.module(Muc).rooms


async def test_a_join_without_the_muc_element_makes_an_instant_room() -> None:
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    joined = await join(h, alice, "Alice", muc=False)
    assert codes(presences(joined)[0]) == {"110"}
    assert not h.host.module(Muc).rooms[ROOM].locked


async def test_join_presence_order_and_occupant_ids() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    got = await join(h, bob, "Bob", extra="<password>ignored</password>")
    # Existing occupants first, then the newcomer's own presence (110), then the subject.
    kinds = [(s.tag, s.get("from")) for s in got]
    assert kinds == [
        (ns.C_PRESENCE, f"{ROOM}/Alice"),
        (ns.C_PRESENCE, f"{ROOM}/Bob"),
        (ns.C_MESSAGE, ROOM),
    ]
    assert codes(got[1]) == {"110"}
    # Semi-anonymous by default: bob sees no JID, alice (a moderator) sees his.
    assert item(got[0]).get("jid") is None
    (seen,) = alice.take()
    assert item(seen).get("jid") == "bob@localhost/b"
    ids = {s.find(f"{{{OCCUPANT_ID}}}occupant-id").get("id") for s in (got[1], seen)}
    assert len(ids) == 1 and "bob" not in next(iter(ids))


async def test_non_anonymous_rooms_show_jids_to_all_with_status_100() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice", whois="anyone")
    got = await join(h, bob, "Bob")
    assert item(got[0]).get("jid") == "alice@localhost/a"
    assert codes(got[1]) == {"110", "100"}


async def test_nick_conflict_and_nick_change_keep_the_occupant_id() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    (refused,) = await h.send(bob, f"<presence to='{ROOM}/Alice'/>")
    assert condition(refused) == "conflict"
    before = next(iter(alice.take()), None)
    assert before is None
    got = await h.send(bob, f"<presence to='{ROOM}/Robert'/>")
    gone, back = got
    assert gone.get("type") == "unavailable" and codes(gone) == {"110", "303"}
    assert item(gone).get("nick") == "Robert" and item(gone).get("role") == "participant"
    assert back.get("from") == f"{ROOM}/Robert" and codes(back) == {"110"}
    seen_gone, seen_back = alice.take()
    assert codes(seen_gone) == {"303"}
    oid = f"{{{OCCUPANT_ID}}}occupant-id"
    assert seen_gone.find(oid).get("id") == seen_back.find(oid).get("id")
    # A third user may not take a nick through a join either.
    (refused,) = await join(h, h.session("carol@localhost/c"), "Robert")
    assert condition(refused) == "conflict"


async def test_one_user_in_a_room_from_two_clients_under_one_nick() -> None:
    h, _ = await harness(max_occupants=2)
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    phone = h.session("bob@localhost/phone")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    bob.take()
    # The room is full (2), but the second client of an occupant is not a newcomer.
    got = await join(h, phone, "Bob")
    assert [(s.tag, s.get("from")) for s in got] == [
        (ns.C_PRESENCE, f"{ROOM}/Alice"),
        (ns.C_PRESENCE, f"{ROOM}/Bob"),
        (ns.C_MESSAGE, ROOM),
    ]
    assert codes(got[1]) == {"110"}
    assert alice.take() == [] and bob.take() == []  # nobody else sees a change
    # Both clients get the room's messages and the occupant's private messages.
    await say(h, alice, "to all")
    await say(h, alice, "to bob", to=f"{ROOM}/Bob", type_="chat")
    for client in (bob, phone):
        assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in client.take()] == ["to all", "to bob"]
    # Either client speaks as the one occupant.
    await say(h, phone, "from the phone")
    (heard,) = alice.take()
    assert heard.get("from") == f"{ROOM}/Bob"
    bob.take()
    phone.take()
    # One client leaving: it alone is told; the occupant stays.
    (left,) = await h.send(bob, f"<presence to='{ROOM}/Bob' type='unavailable'/>")
    assert left.get("type") == "unavailable" and codes(left) == {"110"}
    assert alice.take() == []
    await say(h, alice, "still here?")
    assert len(phone.take()) == 1 and bob.take() == []
    # A kick removes the occupant with every client it has.
    await join(h, bob, "Bob")
    bob.take()
    phone.take()
    await admin_iq(h, alice, "set", "<item nick='Bob' role='none'/>")
    for client in (bob, phone):
        (kicked,) = client.take()
        assert codes(kicked) == {"110", "307"}
    assert h.host.module(Muc).rooms[ROOM].by_jid.keys() == {"alice@localhost/a"}


async def test_groupchat_subject_and_leaving() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    got = await h.send(
        bob, f"<message to='{ROOM}' type='groupchat' id='m1'><body>hi</body></message>"
    )
    (echo,) = got
    (copy,) = alice.take()
    for m in (echo, copy):
        assert m.get("from") == f"{ROOM}/Bob" and m.get("id") == "m1"
        assert m.findtext(f"{{{ns.CLIENT}}}body") == "hi"
    # Participants may not change the subject by default; moderators may.
    (refused,) = await say(h, bob, subject="x")
    assert condition(refused) == "forbidden"
    await say(h, alice, subject="News")
    (subject,) = bob.take()
    assert subject.findtext(f"{{{ns.CLIENT}}}subject") == "News"
    # A newcomer gets the subject, from the nick that set it, after the history.
    got = messages(await join(h, h.session("carol@localhost/c"), "Carol"))
    assert got[-1].findtext(f"{{{ns.CLIENT}}}subject") == "News"
    assert got[-1].get("from") == f"{ROOM}/Alice"
    assert got[0].findtext(f"{{{ns.CLIENT}}}body") == "hi"
    alice.take()
    bob.take()
    left = await h.send(
        bob, f"<presence to='{ROOM}/Bob' type='unavailable'><status>bye</status></presence>"
    )
    assert left[0].get("type") == "unavailable" and codes(left[0]) == {"110"}
    (seen,) = [p for p in alice.take() if p.get("from") == f"{ROOM}/Bob"]
    assert seen.findtext(f"{{{ns.CLIENT}}}status") == "bye"
    # Not an occupant any more: no more messages.
    (refused,) = await say(h, bob, "x")
    assert condition(refused) == "not-acceptable"


async def test_an_occupant_may_leave_by_presence_to_the_bare_room() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    (refused,) = await h.send(bob, f"<presence to='{ROOM}'/>")
    assert condition(refused) == "jid-malformed"  # a join must name its nick
    await join(h, bob, "Bob")
    alice.take()
    (left,) = await h.send(bob, f"<presence to='{ROOM}' type='unavailable'/>")
    assert left.get("type") == "unavailable" and codes(left) == {"110"}
    assert left.get("from") == f"{ROOM}/Bob"
    (seen,) = [p for p in alice.take() if p.get("from") == f"{ROOM}/Bob"]
    assert seen.get("type") == "unavailable"
    (refused,) = await say(h, bob, "x")
    assert condition(refused) == "not-acceptable"


async def test_a_temporary_room_vanishes_when_it_empties() -> None:
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    await h.send(alice, f"<presence to='{ROOM}/Alice' type='unavailable'/>")
    assert ROOM not in h.host.module(Muc).rooms
    # Joining again creates a new room, locked again.
    assert "201" in codes(presences(await join(h, alice, "Alice"))[0])


async def test_a_session_that_ends_leaves_its_rooms() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    await h.end_session(bob)
    (gone,) = alice.take()
    assert gone.get("type") == "unavailable" and gone.get("from") == f"{ROOM}/Bob"


async def test_an_occupant_whose_client_is_gone_is_removed_with_333() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    refused = f"<error type='cancel'><service-unavailable xmlns='{STANZAS}'/></error>"
    await h.send(bob, f"<message to='{ROOM}/Alice' type='error'>{refused}</message>")
    assert alice.take() == []  # one refused message is no reason to go
    gone = f"<error type='wait'><recipient-unavailable xmlns='{STANZAS}'/></error>"
    await h.send(bob, f"<presence to='{ROOM}/Bob' type='error'>{gone}</presence>")
    (left,) = alice.take()
    assert left.get("type") == "unavailable" and codes(left) == {"333"}


async def test_clients_cannot_forge_occupant_ids() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    forged = f"<occupant-id xmlns='{OCCUPANT_ID}' id='forged'/>"
    await h.send(bob, f"<presence to='{ROOM}/Bob'><x xmlns='{MUC}'/>{forged}</presence>")
    await h.send(bob, f"<message to='{ROOM}' type='groupchat'><body>x</body>{forged}</message>")
    await h.send(bob, f"<message to='{ROOM}/Alice' type='chat'><body>x</body>{forged}</message>")
    got = alice.take()
    assert len(got) == 3
    for stanza in got:
        (oid,) = stanza.iterfind(f"{{{OCCUPANT_ID}}}occupant-id")
        assert oid.get("id") == h.host.module(Muc).rooms[ROOM].occupant_id("bob@localhost")


async def test_a_live_groupchat_message_carries_no_delay_but_the_rooms_in_history() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    forged = (
        f"<message to='{ROOM}' type='groupchat'><body>live</body>"
        f"<delay xmlns='urn:xmpp:delay' from='{ROOM}' stamp='2001-01-01T00:00:00Z'/>"
        f"<x xmlns='jabber:x:delay' from='{ROOM}' stamp='20010101T00:00:00'/>"
        f"<x xmlns='{MUC_USER}'><status code='104'/></x></message>"
    )
    await h.send(bob, forged)
    (heard,) = alice.take()
    assert heard.findtext(f"{{{ns.CLIENT}}}body") == "live"
    assert heard.find("{urn:xmpp:delay}delay") is None
    assert heard.find("{jabber:x:delay}x") is None
    assert heard.find(f"{U}x") is None  # no status code of the occupant's making
    # History on join: the room's own delay, with the time the room got it.
    carol = h.session("carol@localhost/c")
    (old,) = messages(await join(h, carol, "Carol"))[:1]
    delays = old.findall("{urn:xmpp:delay}delay")
    assert [d.get("from") for d in delays] == [ROOM]
    assert not delays[0].get("stamp", "").startswith("2001")


async def test_private_messages_between_occupants() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    assert await say(h, bob, "psst", to=f"{ROOM}/Alice", type_="chat") == []
    (pm,) = alice.take()
    assert pm.get("from") == f"{ROOM}/Bob" and pm.findtext(f"{{{ns.CLIENT}}}body") == "psst"
    assert pm.find(f"{U}x") is not None
    (refused,) = await say(h, bob, "x", to=f"{ROOM}/Nobody", type_="chat")
    assert condition(refused) == "item-not-found"
    outsider = h.session("eve@localhost/e")
    (refused,) = await say(h, outsider, "x", to=f"{ROOM}/Alice", type_="chat")
    assert condition(refused) == "not-acceptable"


async def test_history_on_join_honours_maxstanzas_maxchars_seconds_and_since() -> None:
    h, clock = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    for n in range(5):
        clock.now += 10
        await say(h, alice, f"m{n}")

    async def history(spec: str) -> list[str]:
        bob = h.session("bob@localhost/b")
        got = messages(await join(h, bob, "Bob", extra=spec))
        await h.send(bob, f"<presence to='{ROOM}/Bob' type='unavailable'/>")
        bodies = [m.findtext(f"{{{ns.CLIENT}}}body") for m in got[:-1]]
        for m in got[:-1]:
            assert m.find("{urn:xmpp:delay}delay").get("from") == ROOM
        return bodies

    assert await history("") == ["m0", "m1", "m2", "m3", "m4"]
    assert await history("<history maxstanzas='2'/>") == ["m3", "m4"]
    assert await history("<history maxstanzas='0'/>") == []
    assert await history("<history seconds='15'/>") == ["m3", "m4"]
    assert await history("<history since='1970-01-12T13:46:50Z'/>") == ["m1", "m2", "m3", "m4"]
    bob = h.session("bob@localhost/b")
    one = len(etree.tostring(messages(await join(h, bob, "Bob"))[0], encoding="unicode"))
    await h.send(bob, f"<presence to='{ROOM}/Bob' type='unavailable'/>")
    assert await history(f"<history maxchars='{one + 1}'/>") == ["m4"]
    assert await history("<history maxchars='0'/>") == []


async def test_history_keeps_at_most_the_configured_length() -> None:
    h, clock = await harness(max_history=3)
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    for n in range(5):
        clock.now += 10
        await say(h, alice, f"m{n}")
    got = messages(await join(h, h.session("bob@localhost/b"), "Bob"))
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in got[:-1]] == ["m2", "m3", "m4"]
    (refused,) = [await owner_iq(h, alice, "set", submit(**{"muc#maxhistoryfetch": "9"}))]
    assert condition(refused) == "not-acceptable"


async def test_members_only_password_ban_and_max_users_refuse_joins() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice", membersonly="1")
    (refused,) = await join(h, bob, "Bob")
    assert condition(refused) == "registration-required"
    reply = await admin_iq(h, alice, "set", "<item affiliation='member' jid='bob@localhost'/>")
    assert reply.get("type") == "result"
    assert codes(presences(await join(h, bob, "Bob"))[-1]) == {"110"}

    room2 = "secret@conference.localhost"
    await instant_room(h, alice, "Alice", room2, passwordprotectedroom="1", roomsecret="pw",
                       maxusers="2")
    (refused,) = await join(h, bob, "Bob", room2)
    assert condition(refused) == "not-authorized"
    assert codes(presences(await join(h, bob, "Bob", room2, "<password>pw</password>"))[-1]) == {
        "110"
    }
    (refused,) = await join(h, h.session("carol@localhost/c"), "Carol", room2,
                            "<password>pw</password>")
    assert condition(refused) == "service-unavailable"

    await admin_iq(h, alice, "set", "<item affiliation='outcast' jid='carol@localhost'/>", room2)
    await h.send(bob, f"<presence to='{room2}/Bob' type='unavailable'/>")
    (refused,) = await join(h, h.session("carol@localhost/c"), "Carol", room2,
                            "<password>pw</password>")
    assert condition(refused) == "forbidden"


async def test_kick_voice_and_ban_with_status_codes() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice", moderatedroom="1")
    visitor = presences(await join(h, bob, "Bob"))[-1]
    assert item(visitor).get("role") == "visitor"
    (refused,) = await say(h, bob, "x")
    assert condition(refused) == "forbidden"
    await admin_iq(h, alice, "set", "<item nick='Bob' role='participant'/>")
    assert item(bob.take()[0]).get("role") == "participant"
    assert len(await say(h, bob, "x")) == 1
    # A participant may not kick; the owner may not be kicked.
    await join(h, carol, "Carol")
    reply = await admin_iq(h, bob, "set", "<item nick='Carol' role='none'/>")
    assert condition(reply) == "forbidden"
    reply = await admin_iq(h, alice, "set", "<item nick='Alice' role='none'/>")
    assert condition(reply) == "not-allowed"
    alice.take()
    bob.take()
    reply = await admin_iq(
        h, alice, "set", "<item nick='Carol' role='none'><reason>spam</reason></item>"
    )
    assert reply.get("type") == "result"
    kicked = [p for p in carol.take() if p.get("type") == "unavailable"]
    assert codes(kicked[0]) == {"110", "307"}
    assert item(kicked[0]).find(f"{U}actor").get("nick") == "Alice"
    assert item(kicked[0]).findtext(f"{U}reason") == "spam"
    assert codes(bob.take()[0]) == {"307"}
    # Banning an occupant removes it (301) and keeps it out.
    reply = await admin_iq(h, alice, "set", "<item affiliation='outcast' jid='bob@localhost'/>")
    assert codes(bob.take()[0]) == {"110", "301"}
    (refused,) = await join(h, bob, "Bob")
    assert condition(refused) == "forbidden"
    banned = await admin_iq(h, alice, "get", "<item affiliation='outcast'/>")
    assert [i.get("jid") for i in banned.iter(f"{{{MUC_ADMIN}}}item")] == ["bob@localhost"]


async def test_a_moderator_silences_or_kicks_nobody_above_its_affiliation() -> None:
    """XEP-0045 8.2, 8.4: an admin made carol (no affiliation) a moderator; bob is a
    member, dave has none."""
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol, dave = h.session("carol@localhost/c"), h.session("dave@localhost/d")
    await instant_room(h, alice, "Alice")
    await admin_iq(h, alice, "set", "<item affiliation='member' jid='bob@localhost'/>")
    for session, nick in ((bob, "Bob"), (carol, "Carol"), (dave, "Dave")):
        await join(h, session, nick)
    await admin_iq(h, alice, "set", "<item nick='Carol' role='moderator'/>")
    for stanza in ("<item nick='Bob' role='visitor'/>", "<item nick='Bob' role='none'/>"):
        assert condition(await admin_iq(h, carol, "set", stanza)) == "not-allowed"
    assert (await admin_iq(h, carol, "set", "<item nick='Dave' role='visitor'/>")).get(
        "type"
    ) == "result"
    assert (await admin_iq(h, carol, "set", "<item nick='Dave' role='none'/>")).get(
        "type"
    ) == "result"
    # The owner, above the member, still may.
    assert (await admin_iq(h, alice, "set", "<item nick='Bob' role='visitor'/>")).get(
        "type"
    ) == "result"


async def test_voice_request_and_approval() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice", moderatedroom="1")
    await join(h, bob, "Bob")
    alice.take()
    ask = (
        f"<message to='{ROOM}'><x xmlns='{DATA}' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>"
        "<field var='muc#role'><value>participant</value></field></x></message>"
    )
    assert await h.send(bob, ask) == []
    (request,) = alice.take()
    assert request.get("from") == ROOM
    values = {
        f.get("var"): f.findtext(f"{{{DATA}}}value") for f in request.iter(f"{{{DATA}}}field")
    }
    assert values["muc#roomnick"] == "Bob" and values["muc#jid"] == "bob@localhost/b"
    assert values["muc#request_allow"] == "false"
    approve = (
        f"<message to='{ROOM}'><x xmlns='{DATA}' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#request</value></field>"
        "<field var='muc#role'><value>participant</value></field>"
        "<field var='muc#roomnick'><value>Bob</value></field>"
        "<field var='muc#request_allow'><value>true</value></field></x></message>"
    )
    (refused,) = await h.send(bob, approve)  # not a moderator
    assert condition(refused) == "forbidden"
    await h.send(alice, approve)
    (voiced,) = bob.take()
    assert item(voiced).get("role") == "participant"
    (refused,) = await h.send(bob, ask)  # has voice already
    assert condition(refused) == "not-acceptable"


async def test_affiliation_rules() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    # The last owner stays.
    reply = await admin_iq(h, alice, "set", "<item affiliation='member' jid='alice@localhost'/>")
    assert condition(reply) == "conflict"
    await admin_iq(h, alice, "set", "<item affiliation='admin' jid='bob@localhost'/>")
    assert item(bob.take()[-1]).get("role") == "moderator"
    # An admin may not touch owners nor make admins.
    reply = await admin_iq(h, bob, "set", "<item affiliation='outcast' jid='alice@localhost'/>")
    assert condition(reply) == "not-allowed"
    reply = await admin_iq(h, bob, "set", "<item affiliation='admin' jid='carol@localhost'/>")
    assert condition(reply) == "not-allowed"
    reply = await admin_iq(h, bob, "set", "<item affiliation='member' jid='carol@localhost'/>")
    assert reply.get("type") == "result"
    owners = await admin_iq(h, bob, "get", "<item affiliation='owner'/>")
    assert [i.get("jid") for i in owners.iter(f"{{{MUC_ADMIN}}}item")] == ["alice@localhost"]
    assert condition(await owner_iq(h, bob, "get", "")) == "forbidden"
    moderators = await admin_iq(h, bob, "get", "<item role='moderator'/>")
    assert {i.get("nick") for i in moderators.iter(f"{{{MUC_ADMIN}}}item")} == {"Alice", "Bob"}
    # An affiliation item may name an occupant by nick (slixmpp's set_affiliation does).
    await join(h, h.session("carol@localhost/c"), "Carol")
    reply = await admin_iq(h, bob, "set", "<item affiliation='outcast' nick='Carol'/>")
    assert reply.get("type") == "result"
    assert h.host.module(Muc).rooms[ROOM].affiliation("carol@localhost") == "outcast"
    reply = await admin_iq(h, bob, "set", "<item affiliation='member' nick='Nobody'/>")
    assert condition(reply) == "bad-request"


async def test_an_admin_batch_is_judged_whole_and_applied_all_or_nothing() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice")
    await admin_iq(h, alice, "set", "<item affiliation='owner' jid='bob@localhost'/>")
    await join(h, bob, "Bob")
    await join(h, carol, "Carol")
    room = h.host.module(Muc).rooms[ROOM]
    for session in (alice, bob, carol):
        session.take()
    # Each item alone leaves an owner; both together leave none.
    reply = await admin_iq(
        h, alice, "set",
        "<item affiliation='member' jid='alice@localhost'/>"
        "<item affiliation='admin' jid='bob@localhost'/>",
    )
    assert condition(reply) == "conflict"
    assert room.affiliations == {"alice@localhost": "owner", "bob@localhost": "owner"}
    # An item that fails after one that would have banned: nothing happens at all.
    reply = await admin_iq(
        h, alice, "set",
        "<item affiliation='outcast' jid='carol@localhost'/><item nick='Carol' role='none'/>",
    )
    assert condition(reply) == "item-not-found"
    # The same occupant kicked twice in one batch: an error, not a crash halfway.
    reply = await admin_iq(
        h, alice, "set", "<item nick='Carol' role='none'/><item nick='Carol' role='none'/>"
    )
    assert condition(reply) == "item-not-found"
    assert "Carol" in room.occupants and room.affiliation("carol@localhost") == "none"
    assert carol.take() == [] and bob.take() == []
    # A batch that holds together is applied whole.
    reply = await admin_iq(
        h, alice, "set",
        "<item affiliation='member' jid='alice@localhost'/><item nick='Carol' role='none'/>",
    )
    assert reply.get("type") == "result"
    assert room.affiliations == {"alice@localhost": "member", "bob@localhost": "owner"}
    (kicked,) = [p for p in carol.take() if p.get("type") == "unavailable"]
    assert codes(kicked) == {"110", "307"}
    # A room whose owners' accounts were removed has none: its admins still act.
    await admin_iq(h, bob, "set", "<item affiliation='admin' jid='alice@localhost'/>")
    await h.host.module(Muc).remove_user("localhost", "bob")
    reply = await admin_iq(h, alice, "set", "<item affiliation='member' jid='dave@localhost'/>")
    assert reply.get("type") == "result"


async def test_configuration_changes_are_announced_and_members_only_removes_others() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    await join(h, carol, "Carol")
    await admin_iq(h, alice, "set", "<item affiliation='member' jid='bob@localhost'/>")
    bob.take()
    carol.take()
    await owner_iq(h, alice, "set", submit(whois="anyone"))
    (notice,) = bob.take()
    assert notice.get("type") == "groupchat" and codes(notice) == {"104", "172"}
    carol.take()
    await owner_iq(h, alice, "set", submit(membersonly="1"))
    removed = [p for p in carol.take() if p.tag == ns.C_PRESENCE]
    assert codes(removed[0]) == {"110", "322"} and removed[0].get("type") == "unavailable"
    assert [codes(s) for s in bob.take()] == [{"322"}, {"104"}]


async def test_destroying_a_room_names_the_alternate_venue() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    reply = await owner_iq(h, bob, "set", "<destroy/>")
    assert condition(reply) == "forbidden"
    bob.take()
    reply = await owner_iq(
        h,
        alice,
        "set",
        "<destroy jid='other@conference.localhost'><reason>moved</reason></destroy>",
    )
    assert reply.get("type") == "result"
    (gone,) = bob.take()
    destroy = gone.find(f"{U}x/{U}destroy")
    assert gone.get("type") == "unavailable"
    assert destroy.get("jid") == "other@conference.localhost"
    assert destroy.findtext(f"{U}reason") == "moved"
    assert ROOM not in h.host.module(Muc).rooms


async def test_mediated_invitations_and_declines() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice", membersonly="1")
    reply = await h.send(
        alice,
        f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='bob@localhost'>"
        "<reason>come</reason></invite></x></message>",
    )
    assert reply == []
    (invite,) = bob.take()
    assert invite.get("from") == ROOM
    assert invite.find(f"{U}x/{U}invite").get("from") == "alice@localhost/a"
    assert invite.findtext(f"{U}x/{U}invite/{U}reason") == "come"
    # Inviting to a members-only room made bob a member: he may join.
    assert codes(presences(await join(h, bob, "Bob"))[-1]) == {"110"}
    carol = h.session("carol@localhost/c")
    decline_to = (
        f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><decline to='{{}}'>"
        "<reason>busy</reason></decline></x></message>"
    )
    # Only an invitee declines, and only to whoever invited it (not to a JID it names).
    (refused,) = await h.send(carol, decline_to.format("alice@localhost"))
    assert condition(refused) == "not-acceptable"
    alice.take()
    await h.send(
        alice, f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='carol@localhost'/></x>"
        "</message>",
    )
    assert len(carol.take()) == 1  # the invitation
    assert await h.send(carol, decline_to.format("dave@localhost")) == []
    (decline,) = alice.take()
    assert decline.get("to") == "alice@localhost/a"
    assert decline.find(f"{U}x/{U}decline").get("from") == "carol@localhost"
    (refused,) = await h.send(carol, decline_to.format("alice@localhost"))  # once
    assert condition(refused) == "not-acceptable"
    # A member may not invite to a members-only room unless the owner allows it.
    reply = await h.send(
        bob,
        f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='carol@localhost'/></x>"
        "</message>",
    )
    assert condition(reply[0]) == "forbidden"


async def test_affiliations_and_registrations_are_capped_and_invitations_rate_limited() -> None:
    h, clock = await harness(max_affiliations=10, message_burst=2, messages_per_second=1.0)
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    room = h.host.module(Muc).rooms[ROOM]
    nick_form = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>{}</value></field></x></query>"
    )
    # In an open room anyone registers, and becomes a member: up to the cap.
    for n in range(9):
        user = h.session(f"user{n}@localhost/r")
        reply = await h.iq(user, "set", nick_form.format(f"nick{n}"), to=ROOM)
        assert reply.get("type") == "result", etree.tostring(reply)
    late = h.session("late@localhost/r")
    reply = await h.iq(late, "set", nick_form.format("late"), to=ROOM)
    assert condition(reply) == "resource-constraint"
    assert "late@localhost" not in room.registered | room.affiliations
    # Nor by a ban, nor by an invitation to a members-only room.
    reply = await admin_iq(h, alice, "set", "<item affiliation='outcast' jid='eve@localhost'/>")
    assert condition(reply) == "resource-constraint"
    reply = await admin_iq(h, alice, "set", "<item affiliation='none' jid='user0@localhost'/>")
    assert reply.get("type") == "result"  # what does not grow the room passes
    await owner_iq(h, alice, "set", submit(membersonly="1"))
    alice.take()
    invite = f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='{{}}'/></x></message>"
    (refused,) = await h.send(alice, invite.format("carol@localhost"))
    assert condition(refused) == "resource-constraint"
    assert "carol@localhost" not in room.affiliations
    # Invitations spend the inviter's message tokens (a member's: the room stays).
    clock.now += 10
    for _ in range(2):
        assert await h.send(alice, invite.format("user1@localhost")) == []
    (refused,) = await h.send(alice, invite.format("user1@localhost"))
    assert condition(refused) == "resource-constraint"
    # A change that would make the stored state too large to store is refused, and
    # nothing of it is made.
    room.limits.max_state_bytes = len(json.dumps(room.snapshot())) + 100
    clock.now += 10
    reply = await owner_iq(h, alice, "set", submit(roomdesc="d" * 200))
    assert condition(reply) == "resource-constraint"
    assert room.config.description == ""
    (refused,) = await say(h, alice, subject="s" * 200)
    assert condition(refused) == "resource-constraint"
    assert room.subject == ""


async def test_direct_invitations_pass_between_users() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await h.send(
        alice,
        f"<message to='bob@localhost/b'><x xmlns='jabber:x:conference' jid='{ROOM}'/>"
        "</message>",
    )
    (invite,) = bob.take()
    assert invite.find("{jabber:x:conference}x").get("jid") == ROOM


async def test_nickname_registration_reserves_the_nick_and_makes_a_member() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    register = "<query xmlns='jabber:iq:register'/>"
    form = await h.iq(bob, "get", register, to=ROOM)
    assert "muc#register_roomnick" in etree.tostring(form).decode()
    nick_form = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>{}</value></field></x></query>"
    )
    # Alice's nick is in use by her: not Bob's to register.
    assert condition(await h.iq(bob, "set", nick_form.format("Alice"), to=ROOM)) == "conflict"
    got = await h.send(bob, f"<iq type='set' id='r' to='{ROOM}'>{nick_form.format('bobby')}</iq>")
    assert got[0].get("type") == "result"
    assert item(got[1]).get("affiliation") == "member" and item(got[1]).get("role") == "participant"
    again = await h.iq(bob, "get", register, to=ROOM)
    assert again.findtext("{*}query/{*}username") == "bobby"
    reserved = await h.iq(
        bob, "get",
        "<query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/>", to=ROOM,
    )
    assert reserved.find("{*}query/{*}identity").get("name") == "bobby"
    # Nobody else may take a registered nick, by joining or by changing to it.
    (refused,) = await join(h, carol, "bobby")
    assert condition(refused) == "conflict"
    await join(h, carol, "Carol")
    (refused,) = await h.send(carol, f"<presence to='{ROOM}/bobby'/>")
    assert condition(refused) == "conflict"
    bob.take()
    assert [s.get("from") for s in presences(await h.send(bob, f"<presence to='{ROOM}/bobby'/>"))] \
        == [f"{ROOM}/Bob", f"{ROOM}/bobby"]
    # Removing the registration frees the nick and ends the membership it gave.
    removed = await h.send(
        bob, f"<iq type='set' id='x' to='{ROOM}'><query xmlns='jabber:iq:register'><remove/>"
        "</query></iq>"
    )
    assert removed[0].get("type") == "result"
    assert item(removed[1]).get("affiliation") == "none"
    assert item(removed[1]).get("role") == "participant"
    banned = h.session("eve@localhost/e")
    await admin_iq(h, alice, "set", "<item affiliation='outcast' jid='eve@localhost'/>")
    assert condition(await h.iq(banned, "get", register, to=ROOM)) == "forbidden"


async def test_iqs_between_occupants_are_relayed_under_their_nicks() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    await h.send(bob, f"<iq type='get' id='v1' to='{ROOM}/Alice'><vCard xmlns='vcard-temp'/></iq>")
    (asked,) = alice.take()
    assert (asked.get("from"), asked.get("to")) == (f"{ROOM}/Bob", "alice@localhost/a")
    # Its id is Bob's behind the room's tag, which finds his client when she answers.
    assert asked.get("id").endswith("v1") and asked.get("id") != "v1"
    assert asked.find("{vcard-temp}vCard") is not None
    await h.send(alice, f"<iq type='result' id='{asked.get('id')}' to='{ROOM}/Bob'>"
                        "<vCard xmlns='vcard-temp'><FN>Alice</FN></vCard></iq>")
    (answer,) = bob.take()
    assert (answer.get("from"), answer.get("type"), answer.get("id")) == (
        f"{ROOM}/Alice", "result", "v1"
    )
    assert answer.findtext("{vcard-temp}vCard/{vcard-temp}FN") == "Alice"
    # Errors are relayed too, and never answered.
    await h.send(bob, f"<iq type='get' id='v2' to='{ROOM}/Alice'><vCard xmlns='vcard-temp'/></iq>")
    (asked,) = alice.take()
    await h.send(alice, f"<iq type='error' id='{asked.get('id')}' to='{ROOM}/Bob'>"
                        f"<error type='cancel'><item-not-found xmlns='{STANZAS}'/></error></iq>")
    (error,) = bob.take()
    assert error.get("from") == f"{ROOM}/Alice" and condition(error) == "item-not-found"
    assert error.get("id") == "v2"
    assert alice.take() == []
    assert condition(await h.iq(bob, "get", "<vCard xmlns='vcard-temp'/>", to=f"{ROOM}/Nobody")) \
        == "item-not-found"
    eve = h.session("eve@localhost/e")
    assert condition(await h.iq(eve, "get", "<vCard xmlns='vcard-temp'/>", to=f"{ROOM}/Alice")) \
        == "not-acceptable"
    # A result from someone not in the room is dropped, not answered.
    assert await h.send(eve, f"<iq type='result' id='x' to='{ROOM}/Alice'/>") == []
    assert alice.take() == []


async def test_self_ping() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    ping = "<ping xmlns='urn:xmpp:ping'/>"
    assert (await h.iq(alice, "get", ping, to=f"{ROOM}/Alice")).get("type") == "result"
    assert condition(await h.iq(bob, "get", ping, to=f"{ROOM}/Alice")) == "not-acceptable"


async def test_disco_of_service_rooms_and_occupants() -> None:
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice", roomname="Lobby")
    await instant_room(h, alice, "Alice", "hidden@conference.localhost", publicroom="0")
    info = await h.iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                      to="conference.localhost")
    assert "conference" in etree.tostring(info).decode()
    items = await h.iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#items'/>",
                       to="conference.localhost")
    listed = [(i.get("jid"), i.get("name")) for i in items.iter("{*}item")]
    assert listed == [(ROOM, "Lobby")]
    info = await h.iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                      to=ROOM)
    features = {f.get("var") for f in info.iter("{*}feature")}
    assert {"muc_public", "muc_temporary", "muc_open", "muc_semianonymous", OCCUPANT_ID} <= features
    occupants = await h.iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#items'/>",
                           to=ROOM)
    assert [i.get("jid") for i in occupants.iter("{*}item")] == [f"{ROOM}/Alice"]
    hidden = await h.iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#items'/>",
                        to="hidden@conference.localhost")
    assert len(hidden[0]) == 0
    missing = await h.iq(bob, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                         to="nothere@conference.localhost")
    assert condition(missing) == "item-not-found"


async def test_limits_rooms_per_user_message_size_and_rate() -> None:
    h, clock = await harness(max_rooms_per_user=1, max_message_bytes=300, message_burst=2,
                             messages_per_second=1.0)
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    (refused,) = await join(h, alice, "Alice", "second@conference.localhost")
    assert condition(refused) == "not-allowed"
    big = "x" * 400
    (refused,) = await say(h, alice, big)
    assert condition(refused) == "policy-violation"
    for _ in range(2):
        assert len(await say(h, alice, "a")) == 1
    (refused,) = await say(h, alice, "a")
    assert condition(refused) == "resource-constraint"
    clock.now += 1.0
    assert len(await say(h, alice, "a")) == 1


async def test_presence_updates_and_nick_changes_have_the_message_limits() -> None:
    h, clock = await harness(message_burst=2, messages_per_second=1.0, max_presence_bytes=512)
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    big = f"<status>{'x' * 600}</status>"
    (refused,) = await h.send(bob, f"<presence to='{ROOM}/Bob'><x xmlns='{MUC}'/>{big}</presence>")
    assert condition(refused) == "policy-violation"  # kept for every newcomer: not that
    await join(h, bob, "Bob")
    alice.take()
    (refused,) = await h.send(bob, f"<presence to='{ROOM}/Bob'>{big}</presence>")
    assert condition(refused) == "policy-violation"
    clock.now += 2.0  # its token back
    # An update and a nick change go to everyone: they spend the sender's tokens.
    await h.send(bob, f"<presence to='{ROOM}/Bob'><show>away</show></presence>")
    await h.send(bob, f"<presence to='{ROOM}/Robert'/>")
    assert len(presences(alice.take())) == 3
    (refused,) = await h.send(bob, f"<presence to='{ROOM}/Robert'><show>dnd</show></presence>")
    assert condition(refused) == "resource-constraint"
    (refused,) = await h.send(bob, f"<presence to='{ROOM}/Bobby'/>")
    assert condition(refused) == "resource-constraint"
    assert alice.take() == []
    assert h.host.module(Muc).rooms[ROOM].occupants["Robert"].show == "away"
    clock.now += 1.0
    await h.send(bob, f"<presence to='{ROOM}/Robert'><show>dnd</show></presence>")
    assert len(presences(alice.take())) == 1
    # Leaving is never refused.
    await h.send(bob, f"<presence to='{ROOM}/Robert' type='unavailable'/>")
    assert "Robert" not in h.host.module(Muc).rooms[ROOM].occupants


class RemoteServer:
    """Stands for s2s: what the router sends to remote domains, kept."""

    def __init__(self) -> None:
        self.sent: list[etree._Element] = []

    def route(self, stanza: etree._Element, bounce: bool = True) -> None:
        self.sent.append(stanza)


async def remote_join(h: ModuleHarness, jid: str, room: str) -> list[etree._Element]:
    """A join as a remote server's user's would arrive over s2s; what went back."""
    remote = h.router.remote = RemoteServer()
    stanza = parse_stanza(f"<presence to='{room}/Remote'><x xmlns='{MUC}'/></presence>")
    stanza.set("from", jid)
    h.router.route(stanza)
    await h.router.drain()
    return remote.sent


async def test_only_local_users_create_rooms_unless_allowed() -> None:
    h, _ = await harness()
    muc = h.host.module(Muc)
    (refused,) = await remote_join(h, "mallory@remote.example/x", ROOM)
    assert condition(refused) == "not-allowed"
    assert ROOM not in muc.rooms
    # They join rooms local users made.
    await instant_room(h, h.session("alice@localhost/a"), "Alice")
    joined = await remote_join(h, "mallory@remote.example/x", ROOM)
    assert codes(presences(joined)[-1]) == {"110"}
    assert "Remote" in muc.rooms[ROOM].occupants
    h, _ = await harness(allow_remote_creators=True)
    joined = await remote_join(h, "mallory@remote.example/x", ROOM)
    assert codes(presences(joined)[-1]) == {"110", "201"}
    assert h.host.module(Muc).rooms[ROOM].affiliation("mallory@remote.example") == "owner"


async def test_a_reload_changes_the_limits_of_rooms_already_live() -> None:
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    assert len(await say(h, alice, "x" * 400)) == 1
    muc = h.host.modules["muc"]
    muc.reconfigure(muc.options.model_copy(update={"max_message_bytes": 300}))
    (refused,) = await say(h, alice, "x" * 400)
    assert condition(refused) == "policy-violation"


async def test_max_occupants_of_the_service() -> None:
    h, _ = await harness(max_occupants=1)
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    (refused,) = await join(h, bob, "Bob")
    assert condition(refused) == "service-unavailable"
    reply = await owner_iq(h, alice, "set", submit(maxusers="5"))
    assert condition(reply) == "not-acceptable"


async def test_a_persistent_room_survives_a_restart_and_a_destroyed_one_does_not() -> None:
    h, clock = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice", persistentroom="1", roomname="Kept", membersonly="1")
    await admin_iq(h, alice, "set", "<item affiliation='member' jid='bob@localhost'/>")
    registered = await h.iq(
        h.session("bob@localhost/b"), "set",
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='muc#register_roomnick'><value>Bobby</value></field></x></query>", to=ROOM,
    )
    assert registered.get("type") == "result"
    await say(h, alice, subject="Topic")
    clock.now += 1
    await say(h, alice, "remember me")
    occupant_id = h.host.module(Muc).rooms[ROOM].occupant_id("bob@localhost")
    await h.send(alice, f"<presence to='{ROOM}/Alice' type='unavailable'/>")
    await h.host.stop()

    # A new host on the same stores: the room is read back on first use.
    again = ModuleHarness({"disco": {}, "muc": {}})
    again.storage = h.storage
    again.host.storage = h.storage
    await again.start()
    bob = again.session("bob@localhost/b")
    got = await join(again, bob, "Bob")
    assert codes(presences(got)[-1]) == {"110"}
    assert got[-1].findtext(f"{{{ns.CLIENT}}}subject") == "Topic"
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)[:-1]] == ["remember me"]
    room = again.host.module(Muc).rooms[ROOM]
    assert room.config.name == "Kept" and room.occupant_id("bob@localhost") == occupant_id
    assert room.registered == {"bob@localhost": "Bobby"}
    (refused,) = await join(again, again.session("carol@localhost/c"), "Carol")
    assert condition(refused) == "registration-required"
    third = ModuleHarness({"disco": {}, "muc": {}})
    third.storage = third.host.storage = h.storage
    await third.start()
    directory = await third.iq(
        third.session("dave@localhost/d"), "get",
        "<query xmlns='http://jabber.org/protocol/disco#items'/>", to="conference.localhost",
    )
    # A stored public room is listed before anything loaded it.
    assert [(i.get("jid"), i.get("name")) for i in directory.iter("{*}item")] == [(ROOM, "Kept")]
    # Persistent rooms stay when they empty; destroying one removes it from the stores
    # (its tombstone left: a generation, no room; modules/_muc_store.py).
    alice2 = again.session("alice@localhost/a")
    await join(again, alice2, "Alice")
    await owner_iq(again, alice2, "set", "<destroy/>")
    await again.host.stop()
    items = again.host.items("localhost", "muc_rooms")
    tombstone = await items.get("room")
    assert tombstone is not None and set(tombstone.attrs) == {"gen", "gone"}
    assert await again.host.blobs("localhost", "muc_history").get("room") is None


async def test_a_room_change_whose_write_failed_a_moment_is_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the SQLite file's write lock when the owner makes bob a
    member of a persistent room: the owner is told it is done, and the room's write
    fails ("database is locked"). Once the lock is gone the change is stored, and a
    restart keeps it. Before, the failure was logged and the change lost from the
    stores, so the room came back without it."""
    path = tmp_path / "items.sqlite3"
    storage = Storage(
        SQLiteItemBackend(path, busy_timeout=0.1),
        await FileBlobBackend.open(tmp_path / "blobs"),
        NullCache(),
    )
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        h = await ModuleHarness({"disco": {}, "muc": {}}, storage=storage).start()
        alice = h.session("alice@localhost/a")
        await instant_room(h, alice, "Alice", persistentroom="1")
        locker.execute("BEGIN IMMEDIATE")
        made = asyncio.create_task(
            admin_iq(h, alice, "set", "<item affiliation='member' jid='bob@localhost'/>")
        )
        async with asyncio.timeout(30):
            while "could not store room@conference.localhost" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        locker.execute("ROLLBACK")
        assert (await made).get("type") == "result"
        await h.host.stop()
        item = await h.host.items("localhost", "muc_rooms").get("room")
        assert item is not None
        assert "bob@localhost" in json.loads(str(item.attrs["state"]))["affiliations"]
    finally:
        locker.close()
        await storage.close()


async def written(h: ModuleHarness) -> None:
    """Return once every write of the node's rooms is done."""
    muc = h.host.module(Muc)
    await h.router.drain()
    while muc._saving:
        await asyncio.gather(*(w for _, w in muc._saving.values()), return_exceptions=True)
    await h.router.drain()  # what a write that was refused sent


async def room_with_stored_history(
    h: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> TestSession:
    """alice's persistent room, its history ("remember me") written to the store."""
    monkeypatch.setattr(muc_module, "HISTORY_WRITE", 0.0)
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice", persistentroom="1")
    await say(h, alice, "remember me")
    await written(h)
    assert await h.host.blobs("localhost", "muc_history").get("room") is not None
    return alice


def history_delete_fails_once(h: ModuleHarness) -> None:
    """The next delete of a history blob fails (a short failure of the blob store)."""
    backend = h.storage.blobs
    real_delete = backend.delete
    failures = [StorageError("memory", "delete", "a short failure")]

    async def delete(namespace: str, key: str, **kw: Any) -> bool:
        if namespace.endswith("muc_history") and failures:
            raise failures.pop()
        return await real_delete(namespace, key, **kw)

    backend.delete = delete  # type: ignore[method-assign]


async def test_a_destroy_whose_history_delete_failed_once_deletes_it_on_the_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A persistent room with stored history is destroyed: its tombstone is written,
    then the history's delete fails once. The retry deletes the history and leaves the
    tombstone. Before, the retry took this copy's own tombstone for a newer copy's
    destroy ("refused a stale write ... dropping this copy") and the destroyed room's
    history stayed in the store."""
    monkeypatch.setattr(muc_module, "RETRY_WAITS", (0.0,))
    h, _ = await harness()
    alice = await room_with_stored_history(h, monkeypatch)
    history_delete_fails_once(h)
    reply = await owner_iq(h, alice, "set", "<destroy/>")
    assert reply.get("type") == "result"
    await written(h)
    assert "could not store room@conference.localhost yet" in caplog.text  # it failed
    assert "stale write" not in caplog.text
    assert await h.host.blobs("localhost", "muc_history").get("room") is None
    tombstone = await h.host.items("localhost", "muc_rooms").get("room")
    assert tombstone is not None and set(tombstone.attrs) == {"gen", "gone"}


async def test_a_room_made_temporary_then_persistent_again_is_stored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A persistent room made temporary leaves a tombstone (its item deleted, written
    by this copy); made persistent again, the room is written over that tombstone.
    Before, the tombstone's generation was past this copy's own, so the write was
    refused as a newer copy's ("refused a stale write ... dropping this copy")."""
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice", persistentroom="1")
    for persistent in ("0", "1"):
        reply = await owner_iq(h, alice, "set", submit(persistentroom=persistent))
        assert reply.get("type") == "result"
        await written(h)
    assert "stale write" not in caplog.text
    assert h.host.module(Muc).rooms[ROOM].occupant_record("Alice") is not None  # not dropped
    item = await h.host.items("localhost", "muc_rooms").get("room")
    assert item is not None and "state" in item.attrs


async def test_a_room_made_over_a_destroyed_rooms_leftover_history_never_shows_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """alice's persistent room is destroyed, and its history's delete fails with no
    retry left: the history stays under the tombstone. carol makes a persistent room
    of the same name; after a restart a joiner of carol's room is not served alice's
    history: carol's room deleted the leftover before its state was written. Before,
    the loaded room read the leftover blob as its own history."""
    monkeypatch.setattr(muc_module, "RETRY_WAITS", ())
    h, _ = await harness()
    alice = await room_with_stored_history(h, monkeypatch)
    history_delete_fails_once(h)
    await owner_iq(h, alice, "set", "<destroy/>")
    await written(h)
    assert "could not store room@conference.localhost" in caplog.text
    assert await h.host.blobs("localhost", "muc_history").get("room") is not None
    carol = h.session("carol@localhost/c")
    await instant_room(h, carol, "Carol", persistentroom="1")
    await h.host.stop()
    again = ModuleHarness({"disco": {}, "muc": {}})
    again.storage = again.host.storage = h.storage
    await again.start()
    got = await join(again, again.session("dave@localhost/d"), "Dave")
    assert codes(presences(got)[-1]) == {"110"}  # a room loaded, not made
    assert again.host.module(Muc).rooms[ROOM].affiliations["carol@localhost"] == "owner"
    # no history, only the (empty) subject
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)] == [None]


async def test_a_destroyed_rooms_history_written_late_never_shows_in_a_new_room(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """alice's persistent room is destroyed (history deleted); carol makes a persistent
    room of the same name, which writes its state and no history yet. Then the history
    blob of alice's room lands again (an older copy's write, late). After a restart a
    joiner of carol's room is not served it: it is older than the generation carol's
    room was created at. Before, the loaded room took any history blob as its own."""
    h, _ = await harness()
    alice = await room_with_stored_history(h, monkeypatch)
    histories = h.host.blobs("localhost", "muc_history")
    old = await histories.get("room")
    assert old is not None
    await owner_iq(h, alice, "set", "<destroy/>")
    carol = h.session("carol@localhost/c")
    await instant_room(h, carol, "Carol", persistentroom="1")
    await written(h)
    assert await histories.get("room") is None
    await histories.put("room", old.data, if_none_match=True)  # the older copy's write
    await h.host.stop()
    again = ModuleHarness({"disco": {}, "muc": {}})
    again.storage = again.host.storage = h.storage
    await again.start()
    dave = again.session("dave@localhost/d")
    got = await join(again, dave, "Dave")
    assert again.host.module(Muc).rooms[ROOM].affiliations["carol@localhost"] == "owner"
    # no history, only the (empty) subject
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)] == [None]
    assert "ignored a history of generation" in caplog.text
    await say(again, dave, "mine")
    await again.host.stop()
    blob = await histories.get("room")  # carol's room's next write replaced it
    assert blob is not None and unpack_history(blob.data)[0] > unpack_history(old.data)[0]
    assert "remember me" not in blob.data.decode() and "mine" in blob.data.decode()


async def test_a_removed_account_keeps_no_affiliation_or_nick_in_any_room() -> None:
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice", persistentroom="1")
    stored = "stored@conference.localhost"
    await instant_room(h, alice, "Alice", stored, persistentroom="1")
    for room in (ROOM, stored):
        await admin_iq(h, alice, "set", "<item affiliation='admin' jid='bob@localhost'/>", room)
        await admin_iq(h, alice, "set", "<item affiliation='member' jid='carol@localhost'/>", room)
    await h.send(alice, f"<presence to='{stored}/Alice' type='unavailable'/>")
    muc = h.host.module(Muc)
    await muc.stop()  # every write done
    del muc.rooms[stored]  # as on a node where that room is not live
    await h.send(
        alice, f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='bob@localhost'/></x>"
        "</message>",
    )
    assert "bob@localhost" in muc.rooms[ROOM].invited

    assert await muc.remove_user("localhost", "bob") is True
    assert muc.rooms[ROOM].affiliation("bob@localhost") == "none"
    assert muc.rooms[ROOM].invited == {}  # nor an invitation to decline
    await muc.stop()
    for name in ("room", "stored"):
        item = await h.host.items("localhost", "muc_rooms").get(name)
        assert item is not None
        assert "bob@localhost" not in str(item.attrs["state"])
        assert "carol@localhost" in str(item.attrs["state"])
    assert await muc.remove_user("localhost", "bob") is False  # nothing left


async def test_a_removed_account_is_forgotten_by_other_hosts_rooms_whatever_its_name() -> None:
    """jürgen@a.test, admin of rooms at conference.b.test (one live, one only stored)
    and with a nick registered in one: removed, he is in none of them, though the
    stored JSON spells his name with an escape."""
    h = await ModuleHarness({"disco": {}, "muc": {}}, hosts=["a.test", "b.test"]).start()
    jurgen, alice = "jürgen@a.test", h.session("alice@b.test/a")
    rooms = ["live@conference.b.test", "stored@conference.b.test"]
    for room in rooms:
        await instant_room(h, alice, "Alice", room, persistentroom="1")
        await admin_iq(h, alice, "set", f"<item affiliation='admin' jid='{jurgen}'/>", room)
        await admin_iq(h, alice, "set", "<item affiliation='member' jid='carol@b.test'/>", room)
    nick = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>J</value></field></x></query>"
    )
    reply = await h.iq(h.session(f"{jurgen}/j"), "set", nick, to=rooms[1])
    assert reply.get("type") == "result"
    await h.send(alice, f"<presence to='{rooms[1]}/Alice' type='unavailable'/>")
    muc = h.host.module(Muc)
    await muc.stop()
    del muc.rooms[rooms[1]]  # as on a node where that room is not live
    stored = await h.host.items("b.test", "muc_rooms").get("stored")
    assert stored is not None and "j\\u00fcrgen" in str(stored.attrs["state"])

    assert await muc.remove_user("a.test", "jürgen") is True
    assert muc.rooms[rooms[0]].affiliation(jurgen) == "none"
    await muc.stop()
    for name in ("live", "stored"):
        item = await h.host.items("b.test", "muc_rooms").get(name)
        assert item is not None
        state = json.loads(str(item.attrs["state"]))
        assert jurgen not in state["affiliations"] and jurgen not in state["registered"]
        assert "carol@b.test" in state["affiliations"]
    assert await muc.remove_user("a.test", "jürgen") is False  # nothing left


async def test_a_message_handled_twice_is_delivered_and_kept_once() -> None:
    """A groupchat message whose sender and id (origin-id first) the room has seen is
    dropped: a dead cluster node's inbox routed again by its reaper replays what that
    node had handled (docs/architecture.md, "Node killed")."""
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take()
    first = f"<message to='{ROOM}' type='groupchat' id='m1'><body>once</body></message>"
    assert len(await h.send(bob, first)) == 1
    assert len(alice.take()) == 1
    assert await h.send(bob, first) == []
    assert alice.take() == []
    # The same id from another sender is another message; origin-id wins over id.
    assert len(await h.send(
        alice, f"<message to='{ROOM}' type='groupchat' id='m1'><body>mine</body></message>"
    )) == 1
    bob.take()
    with_origin = (
        f"<message to='{ROOM}' type='groupchat' id='{{}}'><body>tagged</body>"
        "<origin-id xmlns='urn:xmpp:sid:0' id='o1'/></message>"
    )
    assert len(await h.send(bob, with_origin.format("x1"))) == 1
    assert await h.send(bob, with_origin.format("x2")) == []
    history = messages(await join(h, h.session("carol@localhost/c"), "Carol"))[:-1]
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in history] == ["once", "mine", "tagged"]


async def test_occupants_restored_from_their_records_are_the_same_occupants() -> None:
    """What a cluster node keeps in Redis for the next owner (live state, one record
    per occupant, the ids seen) makes a room with the same occupants, in the same
    order, with their roles, presence and sessions: no stanza to anyone."""
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    bob2 = h.session("bob@localhost/b2")
    await instant_room(h, alice, "Alice")
    await h.send(bob, f"<presence to='{ROOM}/Bob'><show>away</show></presence>")
    await join(h, bob2, "Bob")
    await h.send(bob, f"<message to='{ROOM}' type='groupchat' id='m1'><body>x</body></message>")
    room = h.host.module(Muc).rooms[ROOM]
    assert room.touched >= {"Alice", "Bob"}
    again = Room.restore_live(ROOM, room.limits, room.live_state())
    again.add_occupants(
        record for nick in reversed(room.occupants)
        if (record := room.occupant_record(nick)) is not None
    )
    again.load_seen(room.seen)
    assert list(again.occupants) == ["Alice", "Bob"]
    for nick, occupant in room.occupants.items():
        copy = again.occupants[nick]
        assert (copy.jid, copy.others, copy.role, copy.show) == (
            occupant.jid, occupant.others, occupant.role, occupant.show
        )
        assert again.occupant_id(copy.jid.bare) == room.occupant_id(occupant.jid.bare)
    assert again.occupant_of("bob@localhost/b2") is again.occupants["Bob"]
    replayed = etree.fromstring(
        f"<message xmlns='jabber:client' from='bob@localhost/b' to='{ROOM}' type='groupchat'"
        " id='m1'><body>x</body></message>"
    )
    assert again.groupchat(replayed, 0.0) == []
    # A newcomer of the restored room is placed after them.
    joined = again.presence(etree.fromstring(
        f"<presence xmlns='jabber:client' from='carol@localhost/c' to='{ROOM}/Carol'/>"
    ), "Carol", 0.0)
    assert joined and list(again.occupants) == ["Alice", "Bob", "Carol"]


async def big_room(h: ModuleHarness, count: int) -> list[TestSession]:
    """`count` occupants (u0 created it, instant), what they were sent taken."""
    sessions = [await h.login(f"u{n}@localhost/r") for n in range(count)]
    for n, session in enumerate(sessions):
        await join(h, session, f"n{n}", muc=False)
    for session in sessions:
        session.take()
    return sessions


async def test_a_big_rooms_fan_out_lets_the_loop_run_between_slices(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A join, a message, a nick change and a leave in a room bigger than a slice are
    routed a slice at a time, the event loop turning between slices (so that the
    heartbeat and other streams are not held up behind a big room)."""
    monkeypatch.setattr(_muc_send, "SLICE", 16)
    h, _ = await harness(max_occupants=100)
    sessions = await big_room(h, 40)
    newcomer = await h.login("new@localhost/r")
    everyone = [*sessions, newcomer]
    turns: list[int] = []
    running = True

    async def ticker() -> None:
        while running:
            turns.append(sum(len(s.received) for s in everyone))
            await asyncio.sleep(0)

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    for session, xml in [
        (newcomer, f"<presence to='{ROOM}/new'/>"),  # 81 presences, the subject
        (sessions[1], f"<message to='{ROOM}' type='groupchat'><body>hi</body></message>"),
        (sessions[2], f"<presence to='{ROOM}/renamed'/>"),  # 82 presences
        (sessions[3], f"<presence to='{ROOM}/n3' type='unavailable'/>"),  # 41
    ]:
        mark, before = len(turns), sum(len(s.received) for s in everyone)
        stanza = parse_stanza(xml)
        stanza.set("from", session.jid)
        session.receive(stanza)
        await h.router.drain()
        during = [before, *turns[mark:], sum(len(s.received) for s in everyone)]
        steps = [b - a for a, b in zip(during, during[1:], strict=False)]
        assert max(steps) <= 16, steps
        assert sum(steps) > 40 and len([s for s in steps if s]) >= 3, steps
    running = False
    await ticking
    got = newcomer.take()
    assert len(presences(got)) == 41 + 2 + 1  # the room, the nick change, the leave
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)] == [None, "hi"]


async def test_a_big_rooms_output_keeps_the_rooms_one_order() -> None:
    """Stanzas for a big room arriving while the output of the one before is still
    being sent wait behind it: every occupant gets the newcomer's presence before the
    message sent after the join, and the messages in the order the room took them;
    the newcomer gets the occupants, the subject, then the messages."""
    h, _ = await harness(max_occupants=700)
    sessions = await big_room(h, 300)
    newcomer = await h.login("new@localhost/r")
    stanzas = [(newcomer, f"<presence to='{ROOM}/new'/>")] + [
        (sessions[n], f"<message to='{ROOM}' type='groupchat'><body>m{n}</body></message>")
        for n in range(5)
    ] + [(sessions[5], f"<presence to='{ROOM}/n5' type='unavailable'/>")]
    for session, xml in stanzas:  # in one turn of the loop, as from one inbox read
        stanza = parse_stanza(xml)
        stanza.set("from", session.jid)
        session.receive(stanza)
    await h.router.drain()
    bodies = [f"m{n}" for n in range(5)]
    for session in [sessions[0], *sessions[6:]]:
        got = session.take()
        assert [s.get("from") for s in got] == (
            [f"{ROOM}/new"] + [f"{ROOM}/n{n}" for n in range(5)] + [f"{ROOM}/n5"]
        )
        assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)] == bodies
    got = newcomer.take()
    assert len(presences(got)) == 301 + 1
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)] == [None, *bodies]
    assert got[-1].get("type") == "unavailable"


async def test_a_room_whose_output_backs_up_refuses_more_fan_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past MAX_BACKLOG stanzas waiting in its outbox a room refuses messages and
    presence updates (resource-constraint, wait) instead of queueing without end;
    a leave still passes, and once the outbox drains, messages pass again."""
    monkeypatch.setattr(_muc_send, "SLICE", 16)
    monkeypatch.setattr(_muc_send, "MAX_BACKLOG", 40)
    h, _ = await harness()
    sessions = await big_room(h, 30)
    sent = [
        (sessions[n], f"<message to='{ROOM}' type='groupchat'><body>m{n}</body></message>")
        for n in range(3)
    ] + [
        (sessions[3], f"<presence to='{ROOM}/n3'><show>away</show></presence>"),
        (sessions[4], f"<presence to='{ROOM}/n4' type='unavailable'/>"),
    ]
    for session, xml in sent:  # in one turn of the loop: nothing drains meanwhile
        stanza = parse_stanza(xml)
        stanza.set("from", session.jid)
        session.receive(stanza)
    await h.router.drain()
    await h.host.module(Muc).outbox.all_sent()
    bodies = [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(sessions[9].take())]
    assert bodies == ["m0", "m1"]  # 14 + 30 waiting after the second: over 40
    (refused,) = [s for s in sessions[2].take() if s.get("type") == "error"]
    assert condition(refused) == "resource-constraint"
    assert refused.find(f"{{{ns.CLIENT}}}error").get("type") == "wait"
    (refused,) = [s for s in sessions[3].take() if s.get("type") == "error"]
    assert condition(refused) == "resource-constraint"
    assert "n4" not in h.host.module(Muc).rooms[ROOM].occupants  # leaving always passes
    assert len(await say(h, sessions[2], "again")) == 1


def history_ids(data: bytes) -> list[tuple[str, str]]:
    """(body, occupant id) of each message of a stored history."""
    found: list[tuple[str, str]] = []
    for _, xml in json.loads(unpack_history(data)[1]):
        message = etree.fromstring(xml)
        oid = message.find(f"{{{OCCUPANT_ID}}}occupant-id")
        body = message.findtext(f"{{{ns.CLIENT}}}body") or ""
        found.append((body, oid.get("id", "") if oid is not None else ""))
    return found


async def test_a_removed_account_leaves_no_trace_of_its_jid_in_its_rooms() -> None:
    """bob created two persistent rooms (one live here, one only stored) and spoke in
    both: removed, neither keeps him as creator (nor counts them against a new bob's
    limit), and his messages stay in the history under his nick with an occupant id
    that is not the one a new bob@localhost gets, still one for all of them."""
    h, _ = await harness(max_rooms_per_user=2)
    bob, alice = h.session("bob@localhost/b"), h.session("alice@localhost/a")
    rooms = ["live@conference.localhost", "stored@conference.localhost"]
    for room in rooms:
        await instant_room(h, bob, "Bob", room, persistentroom="1")
        await join(h, alice, "Alice", room)
        for body in ("one", "two"):
            await h.send(
                bob, f"<message to='{room}' type='groupchat' id='{body}'><body>{body}</body>"
                "</message>",
            )
        await say(h, alice, "hers", to=room)
    muc = h.host.module(Muc)
    await h.send(bob, f"<presence to='{rooms[1]}/Bob' type='unavailable'/>")
    await h.send(alice, f"<presence to='{rooms[1]}/Alice' type='unavailable'/>")
    await muc.stop()  # every write done
    del muc.rooms[rooms[1]]  # as on a node where that room is not live
    assert muc.rooms[rooms[0]].seen  # his last message ids, with his full JID
    before: dict[str, list[tuple[str, str]]] = {}
    for name in ("live", "stored"):
        blob = await h.host.blobs("localhost", "muc_history").get(name)
        assert blob is not None
        before[name] = history_ids(blob.data)

    assert await muc.remove_user("localhost", "bob") is True
    live = muc.rooms[rooms[0]]
    assert live.creator == "" and not [k for k in live.seen if k.startswith("bob@")]
    await muc.stop()
    assert await muc._stored_rooms_of("localhost", "bob@localhost") == set()
    for name in ("live", "stored"):
        item = await h.host.items("localhost", "muc_rooms").get(name)
        assert item is not None and "bob@localhost" not in str(item.attrs)
        blob = await h.host.blobs("localhost", "muc_history").get(name)
        assert blob is not None and b"bob@localhost" not in blob.data
        said = history_ids(blob.data)
        assert [body for body, _ in said] == ["one", "two", "hers"]
        (his,) = {oid for body, oid in said if body != "hers"}
        (old_id,) = {oid for body, oid in before[name] if body != "hers"}
        assert his and his != old_id and said[2] == before[name][2]  # alice's as it was
    # A new bob@localhost is someone else: not the author of the old messages.
    new_bob = h.session("bob@localhost/new")
    got = await join(h, new_bob, "Bob", rooms[1])
    history = [m for m in messages(got) if m.findtext(f"{{{ns.CLIENT}}}body")]
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in history] == ["one", "two", "hers"]
    new_id = h.host.module(Muc).rooms[rooms[1]].occupant_id("bob@localhost")
    assert new_id == before["stored"][0][1]  # XEP-0421: the same JID, the same id...
    ids = [m.find(f"{{{OCCUPANT_ID}}}occupant-id").get("id") for m in history[:2]]
    assert new_id not in ids  # ...but the old messages no longer carry it
    assert await muc.remove_user("localhost", "bob") is False  # nothing left of the old one


async def test_a_removed_account_is_forgotten_by_the_stored_rooms_with_the_module_off() -> None:
    """bob created a persistent room and spoke there; multi-user chat is turned off
    when he is removed: the stored room forgets him all the same (creator, the occupant
    id of his messages), and keeps the messages."""
    h, _ = await harness()
    bob = h.session("bob@localhost/b")
    await instant_room(h, bob, "Bob", persistentroom="1")
    await say(h, bob, "kept")
    old_id = h.host.module(Muc).rooms[ROOM].occupant_id("bob@localhost")
    await h.host.stop()
    off = await ModuleHarness({"disco": {}}, storage=h.storage).start()

    assert await Muc.purge_user(off.host, "localhost", "bob") is True
    item = await off.host.items("localhost", "muc_rooms").get("room")
    assert item is not None and "bob@localhost" not in str(item.attrs)
    blob = await off.host.blobs("localhost", "muc_history").get("room")
    assert blob is not None
    ((body, oid),) = history_ids(blob.data)
    assert body == "kept" and oid and oid != old_id
    assert await Muc.purge_user(off.host, "localhost", "bob") is False


async def test_stanzas_past_max_waiting_for_a_loading_room_get_a_wait_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a room loads (its stores slow), stanzas for it wait, up to MAX_WAITING:
    the next is answered resource-constraint (wait) at once, not queued without bound;
    those that waited are handled, in order, once the room has loaded."""
    monkeypatch.setattr(muc_module, "MAX_WAITING", 3)
    items = await SlowReadSQLite.open(tmp_path / "items.sqlite3")
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    h = await ModuleHarness({"disco": {}, "muc": {}}, storage=storage).start()
    alice = h.session("alice@localhost/desk")
    items.gate.clear()  # the room's load waits for the stores
    for xml in (
        f"<presence to='{ROOM}/Alice'/>",  # waits: creates the room once loaded
        *(f"<message to='{ROOM}' type='groupchat' id='m{n}'><body>{n}</body></message>"
          for n in range(1, 4)),
    ):
        stanza = parse_stanza(xml)
        stanza.set("from", alice.jid)
        alice.receive(stanza)
    for _ in range(10):  # the stanzas routed; the room still loading
        await asyncio.sleep(0)
    refused = alice.take()
    assert [(s.get("id"), condition(s)) for s in refused] == [("m3", "resource-constraint")]
    error = refused[0].find(f"{{{ns.CLIENT}}}error")
    assert error is not None and error.get("type") == "wait"

    items.gate.set()
    await h.router.drain()
    got = alice.take()
    assert [s.get("from") for s in presences(got)] == [f"{ROOM}/Alice"]
    bodies = [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)]
    assert [b for b in bodies if b is not None] == ["1", "2"]  # after the join's subject
    await items.close()


async def test_a_leave_past_max_waiting_for_a_loading_room_is_kept_not_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bob joins a room that is loading (its stores slow), then leaves, his leave past
    MAX_WAITING: it is not refused (he would stay in the room, a ghost, believing he
    left) but handled after what waited, as one leave per session however often he
    says it. Anything else past MAX_WAITING is still refused, and so is a leave past
    MAX_WAITING sessions leaving (more than a room holds)."""
    monkeypatch.setattr(muc_module, "MAX_WAITING", 3)
    items = await SlowReadSQLite.open(tmp_path / "items.sqlite3")
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    h = await ModuleHarness({"disco": {}, "muc": {}}, storage=storage).start()
    alice, bob = h.session("alice@localhost/desk"), h.session("bob@localhost/phone")
    others = [h.session(f"carol@localhost/{n}") for n in range(3)]
    items.gate.clear()  # the room's load waits for the stores

    def send(session: TestSession, xml: str) -> None:
        stanza = parse_stanza(xml)
        stanza.set("from", session.jid)
        session.receive(stanza)

    send(alice, f"<presence to='{ROOM}/Alice'/>")  # waits: creates the room once loaded
    send(bob, f"<presence to='{ROOM}/Bob'/>")
    send(alice, f"<message to='{ROOM}' type='groupchat' id='m1'><body>1</body></message>")
    send(bob, f"<presence to='{ROOM}/Bob' type='unavailable'><status>bye</status></presence>")
    send(bob, f"<message to='{ROOM}' type='groupchat' id='m2'><body>2</body></message>")
    send(bob, f"<presence to='{ROOM}/Bob' type='unavailable'><status>gone</status></presence>")
    for carol in others:  # not in the room: their leaves are nothing, but take places
        send(carol, f"<presence to='{ROOM}/Carol' type='unavailable' id='{carol.jid}'/>")
    for _ in range(10):  # the stanzas routed; the room still loading
        await asyncio.sleep(0)
    assert [(s.get("id"), condition(s)) for s in bob.take()] == [("m2", "resource-constraint")]
    refused = [s for carol in others for s in carol.take()]
    assert [(s.get("id"), condition(s)) for s in refused] == [
        (others[2].jid, "resource-constraint")  # Bob and two others fill the places
    ]

    items.gate.set()
    await h.router.drain()
    got = bob.take()
    assert not [s for s in got if s.get("type") == "error"]
    bobs = [p for p in presences(got) if p.get("from") == f"{ROOM}/Bob"]
    assert [(p.get("type"), "110" in codes(p)) for p in bobs] == [
        (None, True), ("unavailable", True)
    ]
    assert bobs[1].findtext(f"{{{ns.CLIENT}}}status") == "gone"  # his last word
    said = [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)]
    assert "1" in said  # in the room when it was said, before his leave
    seen = [p for p in presences(alice.take()) if p.get("from") == f"{ROOM}/Bob"]
    assert [p.get("type") for p in seen] == [None, "unavailable"]
    assert list(h.host.module(Muc).rooms[ROOM].occupants) == ["Alice"]
    assert not h.host.module(Muc)._leaves  # nothing left waiting
    await items.close()


async def test_a_session_that_ends_while_its_join_waits_for_the_room_is_no_ghost(
    tmp_path: Path,
) -> None:
    """Bob's join waits for a room that is loading, and his session ends before it
    loads: once loaded, the room does not keep him as an occupant nobody will ever
    remove (a ghost the others would see), his leave is handled after his join."""
    items = await SlowReadSQLite.open(tmp_path / "items.sqlite3")
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    h = await ModuleHarness({"disco": {}, "muc": {}}, storage=storage).start()
    alice, bob = h.session("alice@localhost/desk"), h.session("bob@localhost/phone")
    items.gate.clear()  # the room's load waits for the stores
    for session, nick in ((alice, "Alice"), (bob, "Bob")):
        stanza = parse_stanza(f"<presence to='{ROOM}/{nick}'/>")
        stanza.set("from", session.jid)
        session.receive(stanza)
    for _ in range(10):  # the joins routed; the room still loading
        await asyncio.sleep(0)
    assert ROOM not in h.host.module(Muc).rooms
    h.router.session_ended(bob)  # (no drain: it would wait for the room's load)
    for _ in range(10):  # the session's end handled; the room still loading
        await asyncio.sleep(0)
    assert ROOM not in h.host.module(Muc).rooms
    items.gate.set()
    await h.router.drain()
    assert list(h.host.module(Muc).rooms[ROOM].occupants) == ["Alice"]
    seen = [p for p in presences(alice.take()) if p.get("from") == f"{ROOM}/Bob"]
    assert [p.get("type") for p in seen] == [None, "unavailable"]  # joined, then left
    await items.close()


async def test_a_second_client_under_a_variant_of_the_users_nick_is_not_merged() -> None:
    # Merged under "Bob", a phone that asked for "bob" would get its own presence from a
    # nick it did not ask for (no 210), and its next presence to room/bob would rename
    # the occupant for everyone. A variant is a conflict, as it is for anyone.
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    phone = h.session("bob@localhost/phone")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    alice.take(), bob.take()
    (refused,) = await join(h, phone, "bob")
    assert condition(refused) == "conflict"
    assert alice.take() == [] and bob.take() == []
    # Under the very nick it joins the occupant, and its updates rename nobody.
    got = await join(h, phone, "Bob")
    own = [p for p in presences(got) if "110" in codes(p)]
    assert [p.get("from") for p in own] == [f"{ROOM}/Bob"]
    await h.send(phone, f"<presence to='{ROOM}/Bob'><show>away</show></presence>")
    assert not any("303" in codes(p) for p in presences(alice.take()))
    assert set(h.host.module(Muc).rooms[ROOM].occupants) == {"Alice", "Bob"}


async def test_nicks_rfc_8266_tells_apart_are_two_nicks() -> None:
    # RFC 8266 2.2 maps case with toLowerCase(), not case folding: "Straße" and
    # "Strasse" are two nicknames.
    h, _ = await harness()
    alice, carol = h.session("alice@localhost/a"), h.session("carol@localhost/c")
    await instant_room(h, alice, "Straße")
    got = await join(h, carol, "Strasse")
    assert [p.get("type") for p in presences(got)] == [None, None]


async def test_nicks_are_compared_as_the_nickname_profile_folds_them() -> None:
    # XEP-0045 7.2.9's nick in use, compared as RFC 8266 compares nicknames: one that
    # differs from another only by case, width or spacing is that nick. Else a newcomer
    # takes "alice" beside "Alice" and passes for her in every client that shows nicks.
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice")
    for taken in ("alice", "ALICE", "\uff41lice", "Alice\u3000", " alice"):
        (refused,) = await join(h, bob, taken)
        assert condition(refused) == "conflict", taken
    assert alice.take() == []
    await join(h, bob, "Bob")
    alice.take(), bob.take()
    (refused,) = await h.send(bob, f"<presence to='{ROOM}/aLiCe'/>")
    assert condition(refused) == "conflict"
    # Her own nick is hers to write otherwise.
    got = presences(await h.send(alice, f"<presence to='{ROOM}/alice'/>"))
    assert [s.get("from") for s in got] == [f"{ROOM}/Alice", f"{ROOM}/alice"]
    # A registered nick is reserved the same way, and nobody registers a taken one.
    nick_form = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>{}</value></field></x></query>"
    )
    assert condition(await h.iq(bob, "set", nick_form.format("ALICE"), to=ROOM)) == "conflict"
    assert (await h.iq(bob, "set", nick_form.format("bobby"), to=ROOM)).get("type") == "result"
    (refused,) = await join(h, carol, "Bobby")
    assert condition(refused) == "conflict"
    await join(h, carol, "Carol")
    (refused,) = await h.send(carol, f"<presence to='{ROOM}/BOBBY'/>")
    assert condition(refused) == "conflict"


async def test_a_visitor_of_a_moderated_room_gets_no_voice_by_registering() -> None:
    # Registering a nick makes its user a member, and a member of a moderated room
    # has voice: a visitor who could register would give itself the voice only a
    # moderator grants (8.6). Its members and admins register as anywhere else.
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice", moderatedroom="1")
    await join(h, bob, "Bob")
    await join(h, carol, "Carol")
    nick_form = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>{}</value></field></x></query>"
    )
    register = "<query xmlns='jabber:iq:register'/>"
    alice.take(), bob.take(), carol.take()
    assert condition(await h.iq(bob, "get", register, to=ROOM)) == "forbidden"
    assert condition(await h.iq(bob, "set", nick_form.format("bobby"), to=ROOM)) == "forbidden"
    assert alice.take() == [] and carol.take() == []
    (refused,) = await say(h, bob, "heard at last")
    assert condition(refused) == "forbidden"
    # Made a member by an admin, Carol has voice, and registers her nick.
    await admin_iq(h, alice, "set", "<item affiliation='member' jid='carol@localhost'/>")
    carol.take()
    assert (await h.iq(carol, "set", nick_form.format("carol"), to=ROOM)).get("type") == "result"
    reserved = await h.iq(
        carol, "get",
        "<query xmlns='http://jabber.org/protocol/disco#info' node='x-roomuser-item'/>", to=ROOM,
    )
    assert reserved.find("{*}query/{*}identity").get("name") == "carol"


async def test_an_answer_between_occupants_goes_to_the_client_that_asked(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Bob is in the room from two clients under one nick; his phone asks Alice for her
    # vCard. Her answer is the phone's, not his first client's, which never asked
    # (and the phone would wait for it in vain).
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    phone = h.session("bob@localhost/phone")
    await instant_room(h, alice, "Alice")
    await join(h, bob, "Bob")
    await join(h, phone, "Bob")
    alice.take(), bob.take(), phone.take()
    for asker, id_ in ((phone, "p1"), (bob, "b1"), (phone, "p2")):
        await h.send(asker, f"<iq type='get' id='{id_}' to='{ROOM}/Alice'>"
                            "<vCard xmlns='vcard-temp'/></iq>")
    asked = alice.take()
    assert [a.get("from") for a in asked] == [f"{ROOM}/Bob"] * 3
    # Alice's client answers the second request with an error, the others with results,
    # in another order.
    for request in (asked[2], asked[0]):
        await h.send(alice, f"<iq type='result' id='{request.get('id')}' to='{ROOM}/Bob'/>")
    await h.send(alice, f"<iq type='error' id='{asked[1].get('id')}' to='{ROOM}/Bob'>"
                        f"<error type='cancel'><item-not-found xmlns='{STANZAS}'/></error></iq>")
    got_phone, got_bob = phone.take(), bob.take()
    assert [(a.get("id"), a.get("type"), a.get("from")) for a in got_phone] == [
        ("p2", "result", f"{ROOM}/Alice"), ("p1", "result", f"{ROOM}/Alice")
    ]
    assert [(a.get("id"), a.get("type")) for a in got_bob] == [("b1", "error")]
    # An answer to no request of its own (a made-up id, or one Bob's other client's
    # request had) reaches nobody.
    await h.send(alice, f"<iq type='result' id='b1' to='{ROOM}/Bob'/>")
    await h.send(alice, f"<iq type='result' id='{asked[0].get('id')[:-2]}b1' to='{ROOM}/Bob'/>")
    # Nor one whose id is not ASCII (the tag is compared as bytes), result or error.
    await h.send(alice, f"<iq type='result' id='\u00e9t\u00e9\u00e9t\u00e9\u00e9t\u00e9x' "
                        f"to='{ROOM}/Bob'/>")
    await h.send(alice, f"<iq type='error' id='\u00e9t\u00e9' to='{ROOM}/Bob'><error "
                        f"type='cancel'><item-not-found xmlns='{STANZAS}'/></error></iq>")
    assert phone.take() == [] and bob.take() == []
    # The room goes on relaying.
    await h.send(phone, f"<iq type='get' id='p3' to='{ROOM}/Alice'>"
                        "<ping xmlns='urn:xmpp:ping'/></iq>")
    (asked,) = alice.take()
    await h.send(alice, f"<iq type='result' id='{asked.get('id')}' to='{ROOM}/Bob'/>")
    assert [a.get("id") for a in phone.take()] == ["p3"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_banning_a_domain_bans_every_user_of_it() -> None:
    # An outcast JID may be a server's (as Prosody and ejabberd take it): the ban was
    # stored and answered with a result, yet its users stayed and joined on.
    h, _ = await harness()
    alice = h.session("alice@localhost/a")
    await instant_room(h, alice, "Alice")
    joined = await remote_join(h, "mallory@remote.example/x", ROOM)
    assert codes(presences(joined)[-1]) == {"110"}
    alice.take()
    joined.clear()
    reply, seen = await h.send(
        alice, f"<iq type='set' id='b' to='{ROOM}'><query xmlns='{MUC_ADMIN}'>"
        "<item affiliation='outcast' jid='remote.example'/></query></iq>"
    )
    assert reply.get("type") == "result"
    assert seen.get("from") == f"{ROOM}/Remote" and codes(seen) == {"301"}
    (out,) = joined
    assert out.get("type") == "unavailable" and codes(out) == {"110", "301"}
    assert item(out).get("affiliation") == item(seen).get("affiliation") == "outcast"
    for jid in ("mallory@remote.example/x", "eve@remote.example/y", "remote.example/z"):
        (refused,) = await remote_join(h, jid, ROOM)
        assert condition(refused) == "forbidden", jid
    # An affiliation of the user's own comes first: a member of a banned server joins.
    await admin_iq(h, alice, "set", "<item affiliation='member' jid='trusted@remote.example'/>")
    joined = await remote_join(h, "trusted@remote.example/t", ROOM)
    assert codes(presences(joined)[-1]) == {"110"}
    # Lifting the ban lets the server's users in again.
    await admin_iq(h, alice, "set", "<item affiliation='none' jid='remote.example'/>")
    (refused,) = await remote_join(h, "eve@remote.example/y", ROOM)
    # Refused for the nick (the member's), which a join is checked for after a ban.
    assert condition(refused) == "conflict"


async def test_a_locked_room_is_nobody_elses_until_its_owner_configures_it() -> None:
    # XEP-0045 10.1.2: until configured, the room is its owner's alone. A stranger who
    # registered a nick meanwhile would be a member of the room the owner is making
    # members-only; an invitation would go out from a room nobody may join yet.
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await join(h, alice, "Alice")
    alice.take()
    nick_form = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>bob</value></field></x></query>"
    )
    for type_, payload in (
        ("set", nick_form),
        ("get", "<query xmlns='jabber:iq:register'/>"),
        ("get", "<query xmlns='http://jabber.org/protocol/disco#info'/>"),
        ("get", "<query xmlns='http://jabber.org/protocol/disco#items'/>"),
    ):
        assert condition(await h.iq(bob, type_, payload, to=ROOM)) == "item-not-found", payload
    (refused,) = await h.send(
        bob, f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='carol@localhost'/></x>"
        "</message>"
    )
    assert condition(refused) == "item-not-found"
    assert alice.take() == [] and carol.take() == []
    # Made members-only, the room has no member its owner did not make.
    reply = await owner_iq(h, alice, "set", submit(membersonly="1"))
    assert reply.get("type") == "result"
    (refused,) = await join(h, bob, "Bob")
    assert condition(refused) == "registration-required"
    # Its owner had the room to itself all along.
    assert (await h.iq(alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>",
                       to=ROOM)).get("type") == "result"


async def test_a_nick_of_nothing_but_spaces_is_refused() -> None:
    # RFC 8266 trims a nickname's spaces, and an empty one is no nickname: a blank nick
    # shows as nobody in a client, and every message from it as if from nowhere.
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await instant_room(h, alice, "Alice")
    for blank in (" ", "\u00a0", "\u3000 "):
        (refused,) = await join(h, bob, blank)
        assert condition(refused) == "jid-malformed", repr(blank)
    (refused,) = await h.send(alice, f"<presence to='{ROOM}/ '/>")
    assert condition(refused) == "jid-malformed"
    nick_form = (
        "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
        "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
        "<field var='muc#register_roomnick'><value>\u00a0</value></field></x></query>"
    )
    assert condition(await h.iq(alice, "set", nick_form, to=ROOM)) == "not-acceptable"
    assert list(h.host.module(Muc).rooms[ROOM].occupants) == ["Alice"]


async def test_a_room_whose_first_join_fails_is_not_left_behind() -> None:
    # A join that makes a room and is then refused (here its presence is over the
    # limit) left an empty room, locked for an owner who is not in it: nobody else
    # could use the name again, and it counted against its creator's rooms for good.
    h, _ = await harness(max_presence_bytes=512, max_rooms_per_user=2)
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    muc = h.host.module(Muc)
    big = f"<status>{'x' * 600}</status>"
    for name in ("room", "other", "third"):
        (refused,) = await h.send(
            alice, f"<presence to='{name}@conference.localhost/Alice'><x xmlns='{MUC}'/>{big}"
            "</presence>"
        )
        assert condition(refused) == "policy-violation"
    assert muc.rooms == {}
    joined = await join(h, bob, "Bob")
    assert codes(presences(joined)[-1]) == {"110", "201"}
    await instant_room(h, alice, "Alice", "mine@conference.localhost")


async def test_no_one_acts_beyond_the_xep_0045_tables() -> None:
    # What the review checked (XEP-0045 5.2's tables): each refused, and nothing changed.
    h, _ = await harness()
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    carol = h.session("carol@localhost/c")
    await instant_room(h, alice, "Alice")
    await admin_iq(h, alice, "set", "<item affiliation='admin' jid='bob@localhost'/>"
                                    "<item affiliation='member' jid='carol@localhost'/>")
    await join(h, bob, "Bob")
    await join(h, carol, "Carol")
    room = h.host.module(Muc).rooms[ROOM]
    before = dict(room.affiliations)
    refusals = [
        # A member grants no membership and bans nobody.
        (carol, admin_iq, "<item affiliation='member' jid='dave@localhost'/>", "forbidden"),
        (carol, admin_iq, "<item affiliation='outcast' jid='dave@localhost'/>", "forbidden"),
        # An admin (a moderator) neither kicks, silences nor demotes the owner.
        (bob, admin_iq, "<item nick='Alice' role='none'/>", "not-allowed"),
        (bob, admin_iq, "<item nick='Alice' role='participant'/>", "not-allowed"),
        (bob, admin_iq, "<item affiliation='admin' jid='alice@localhost'/>", "not-allowed"),
        # Nor configures nor destroys the room: the owner's alone.
        (bob, owner_iq, submit(membersonly="1"), "forbidden"),
        (bob, owner_iq, "<destroy/>", "forbidden"),
    ]
    for who, kind, payload, expected in refusals:
        assert condition(await kind(h, who, "set", payload)) == expected, payload
    assert room.affiliations == before and not room.config.members_only
    assert {nick: o.role for nick, o in room.occupants.items()} == {
        "Alice": "moderator", "Bob": "moderator", "Carol": "participant"
    }
