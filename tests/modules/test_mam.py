"""Message Archive Management (XEP-0313) and stanza ids (XEP-0359) on a module host."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.modules.slow_stores import GatedSQLite
from xmppd.modules import _mam_writer
from xmppd.modules._mam_store import STORE
from xmppd.modules.mam import WRITES_PER_SENDER
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Attrs, Query, StorageError
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import (
    ModuleHarness,
    RecordingRemote,
    TestSession,
    parse_stanza,
    without_echo,
)
from xmppd.xep227.stores import Summary, export_user

MAM = "urn:xmpp:mam:2"
SID = "urn:xmpp:sid:0"
RSM = "http://jabber.org/protocol/rsm"
FORWARD = "urn:xmpp:forward:0"
CARBONS = "urn:xmpp:carbons:2"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
BODY = "{jabber:client}body"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def chat(to: str, body: str, extra: str = "", type_: str = "chat") -> str:
    return f"<message to='{to}' type='{type_}' id='m-{body}'><body>{body}</body>{extra}</message>"


def stanza_ids(stanza: etree._Element) -> list[tuple[str | None, str | None]]:
    return [(s.get("by"), s.get("id")) for s in stanza.iterchildren(f"{{{SID}}}stanza-id")]


async def make(mam: dict[str, Any] | None = None, **modules: Any) -> ModuleHarness:
    enabled = {"disco": {}, "offline": {}, "carbons": {}, "mam": mam or {}, **modules}
    harness = ModuleHarness(enabled)
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


def form(**fields: str | list[str]) -> str:
    parts = [f"<field var='FORM_TYPE' type='hidden'><value>{MAM}</value></field>"]
    for name, value in fields.items():
        values = value if isinstance(value, list) else [value]
        inner = "".join(f"<value>{v}</value>" for v in values)
        parts.append(f"<field var='{name.rstrip('_').replace('_', '-')}'>{inner}</field>")
    return f"<x xmlns='jabber:x:data' type='submit'>{''.join(parts)}</x>"


def rsm(max_: int | None = None, after: str | None = None, before: str | None = None) -> str:
    inner = "" if max_ is None else f"<max>{max_}</max>"
    if after is not None:
        inner += f"<after>{after}</after>"
    if before is not None:
        inner += f"<before>{before}</before>" if before else "<before/>"
    return f"<set xmlns='{RSM}'>{inner}</set>"


class Answer:
    """What one query brought: the results in order, the IQ reply and its <fin/>."""

    def __init__(self, session: TestSession, replies: list[etree._Element]) -> None:
        self.iq = next(r for r in replies if r.tag == "{jabber:client}iq")
        assert replies[-1] is self.iq, "every result comes before the IQ result"
        self.results = [r for r in replies if r.tag == "{jabber:client}message"]
        if self.iq.get("type") == "result":
            assert self.iq.find(f"{{{MAM}}}fin") is not None
        self.ids: list[str] = []
        self.bodies: list[str | None] = []
        self.messages: list[etree._Element] = []
        for message in self.results:
            assert message.get("to") == session.jid
            assert message.get("from") == session.bare
            result = message.find(f"{{{MAM}}}result")
            assert result is not None and result.get("queryid") == "q1"
            forwarded = result.find(f"{{{FORWARD}}}forwarded")
            assert forwarded is not None
            assert forwarded.find("{urn:xmpp:delay}delay").get("stamp", "").endswith("Z")  # type: ignore[union-attr]
            inner = forwarded.find("{jabber:client}message")
            assert inner is not None
            self.ids.append(result.get("id", ""))
            self.bodies.append(inner.findtext(BODY))
            self.messages.append(inner)

    @property
    def fin(self) -> etree._Element:
        assert self.iq.get("type") == "result", etree.tostring(self.iq)
        found = self.iq.find(f"{{{MAM}}}fin")
        assert found is not None
        return found

    @property
    def complete(self) -> bool:
        return self.fin.get("complete") == "true"

    @property
    def first_last(self) -> tuple[str | None, str | None]:
        return (
            self.fin.findtext(f"{{{RSM}}}set/{{{RSM}}}first"),
            self.fin.findtext(f"{{{RSM}}}set/{{{RSM}}}last"),
        )


async def query(
    harness: ModuleHarness, session: TestSession, inner: str = "", to: str | None = None
) -> Answer:
    to_attr = f" to='{to}'" if to else ""
    replies = await harness.send(
        session,
        f"<iq type='set' id='t1'{to_attr}><query xmlns='{MAM}' queryid='q1'>{inner}</query></iq>",
    )
    return Answer(session, replies)


async def error_of(harness: ModuleHarness, session: TestSession, inner: str) -> str:
    answer = await query(harness, session, inner)
    assert answer.results == []
    return condition(answer.iq)


async def stored(harness: ModuleHarness, user: str) -> int:
    page = await harness.host.items("localhost", STORE).query(Query(prefix=f"{user}/", limit=1000))
    return len(page.items)


async def test_disco_features_on_the_account() -> None:
    harness = await make()
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="alice@localhost")
    features = {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}
    assert {MAM, f"{MAM}#extended", SID} <= features


async def test_both_archives_keep_each_message_once_with_carbons_and_two_resources() -> None:
    harness = await make()
    a1 = harness.session("alice@localhost/one")
    a2 = harness.session("alice@localhost/two")
    bob = harness.session("bob@localhost/b")
    for session in (a1, a2, bob):
        reply = await harness.iq(session, "set", f"<enable xmlns='{CARBONS}'/>")
        assert reply.get("type") == "result"
    await harness.send(a1, chat("bob@localhost", "hello"))
    [to_bob] = bob.take()
    [sent_carbon] = a2.take()
    assert sent_carbon.find(f"{{{CARBONS}}}sent") is not None
    # the recipient's copy carries its archive id; the sender's stanza none of alice's
    [(by, bob_id)] = stanza_ids(to_bob)
    assert by == "bob@localhost" and bob_id
    await harness.send(bob, chat("alice@localhost", "hi back"))
    got = a1.take() + a2.take()
    assert len(got) == 2  # both top resources get the original, no carbon on top
    ids = {tuple(stanza_ids(m)) for m in got}
    assert len(ids) == 1
    [[(by, alice_id)]] = ids  # type: ignore[misc]
    assert by == "alice@localhost"
    await harness.router.drain()

    mine = await query(harness, a1)
    assert mine.bodies == ["hello", "hi back"] and mine.complete
    assert mine.ids[1] == alice_id
    assert mine.messages[0].get("from") == "alice@localhost/one"
    assert mine.messages[0].get("to") == "bob@localhost"
    assert stanza_ids(mine.messages[1]) == []  # the result's id says it; not repeated inside
    theirs = await query(harness, bob)
    assert theirs.bodies == ["hello", "hi back"] and theirs.ids[0] == bob_id
    assert await stored(harness, "alice") == 2 and await stored(harness, "bob") == 2


async def test_an_offline_message_is_archived_with_the_id_it_is_delivered_with() -> None:
    harness = await make()
    alice = harness.session("alice@localhost/a")
    await harness.send(alice, chat("bob@localhost", "while away"))
    bob = harness.session("bob@localhost/b", available=False)
    archived = await query(harness, bob)
    assert archived.bodies == ["while away"]
    got = without_echo(bob, await harness.send(bob, "<presence/>"))
    [message] = [m for m in got if m.tag == "{jabber:client}message"]
    assert stanza_ids(message) == [("bob@localhost", archived.ids[0])]


async def test_a_message_bounced_for_want_of_offline_storage_is_not_archived() -> None:
    """Its sender is told it did not arrive (service-unavailable): the recipient's archive
    must not hold it either, whether offline storage is off or the queue is full."""
    harness = await make(offline={"max_messages": 1})
    alice = harness.session("alice@localhost/a")
    assert await harness.send(alice, chat("bob@localhost", "kept")) == []
    [bounced] = await harness.send(alice, chat("bob@localhost", "over the quota"))
    assert condition(bounced) == "service-unavailable"
    bob = harness.session("bob@localhost/b", available=False)
    assert (await query(harness, bob)).bodies == ["kept"]
    # with no offline module at all
    harness = ModuleHarness({"disco": {}, "mam": {}})
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    [bounced] = await harness.send(alice, chat("bob@localhost", "nobody keeps it"))
    assert condition(bounced) == "service-unavailable"
    await harness.router.drain()
    assert await stored(harness, "bob") == 0
    assert await stored(harness, "alice") == 1  # what alice sent, bounced or not


async def test_a_message_routed_again_keeps_its_id_and_is_archived_once() -> None:
    """What a cluster node that could not deliver (or stream management) routes again
    carries the stanza-id stamped the first time: kept, not taken for a forgery."""
    harness = await make()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, chat("bob@localhost", "once"))
    [first] = bob.take()
    await harness.end_session(bob)
    harness.router.route(first)  # again, as another node hands it back
    await harness.router.drain()
    assert await stored(harness, "bob") == 1
    back = harness.session("bob@localhost/c", available=False)
    [archived_id] = (await query(harness, back)).ids
    assert stanza_ids(first) == [("bob@localhost", archived_id)]
    got = without_echo(back, await harness.send(back, "<presence/>"))
    [offline] = [m for m in got if m.tag == "{jabber:client}message"]
    assert stanza_ids(offline) == [("bob@localhost", archived_id)]


async def test_forged_stanza_ids_are_stripped() -> None:
    harness = await make()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    shaped = "0" * 38  # the shape of one of ours, without our MAC
    forged = (
        f"<stanza-id xmlns='{SID}' by='alice@localhost' id='{shaped}'/>"
        f"<stanza-id xmlns='{SID}' by='localhost' id='x1'/>"
        f"<stanza-id xmlns='{SID}' by='bob@localhost' id='x2'/>"
        f"<stanza-id xmlns='{SID}' by='room@muc.example.org' id='theirs'/>"
    )
    await harness.send(bob, chat("alice@localhost", "forged", forged))
    [got] = alice.take()
    ids = stanza_ids(got)
    assert ("room@muc.example.org", "theirs") in ids  # another entity's: not ours to judge
    [(_, real)] = [i for i in ids if i[0] == "alice@localhost"]
    assert len(ids) == 2
    assert (await query(harness, alice)).ids == [real]
    # alice passes the message on to another server: her archive's id stays here
    harness.router.remote = remote = RecordingRemote()
    await harness.send(alice, chat("carol@elsewhere.example", "fwd", f"<stanza-id xmlns='{SID}'"
                                   f" by='alice@localhost' id='{real}'/>"))
    [passed_on] = remote.routed
    assert stanza_ids(passed_on) == []
    # the same from another server (s2s hands it to the router with no local origin)
    remote = parse_stanza(chat("alice@localhost", "from afar", forged))
    remote.set("from", "mallory@evil.example/x")
    harness.router.route(remote)
    await harness.router.drain()
    [afar] = alice.take()
    assert [by for by, _ in stanza_ids(afar)] == ["room@muc.example.org", "alice@localhost"]
    assert stanza_ids(afar)[1][1] != shaped
    # a bodyless message is not archived, and a forged id on it is stripped all the same
    await harness.send(bob, f"<message to='alice@localhost'>{forged}</message>")
    [bare] = alice.take()
    assert stanza_ids(bare) == [("room@muc.example.org", "theirs")]


async def test_a_client_stamps_no_stanza_id_for_us() -> None:
    """XEP-0359 section 5: only the entity named in 'by' stamps its ids. A client that
    learnt an id of bob's archive and sends it back to bob must not have its message
    archived under that id, in place of the message the id names."""
    harness = await make()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, chat("bob@localhost", "original"))
    [(_, bob_id)] = stanza_ids(bob.take()[0])
    replayed = (
        f"<stanza-id xmlns='{SID}' by='bob@localhost' id='{bob_id}'/>"
        f"<stanza-id xmlns='{SID}' by='localhost' id='x1'/>"
        f"<stanza-id xmlns='{SID}' by='room@muc.example.org' id='theirs'/>"
    )
    await harness.send(alice, chat("bob@localhost", "replayed", replayed))
    [got] = bob.take()
    [(by, new_id)] = [i for i in stanza_ids(got) if i[0] != "room@muc.example.org"]
    assert by == "bob@localhost" and new_id != bob_id
    await harness.router.drain()
    archive = await query(harness, bob)
    assert archive.bodies == ["original", "replayed"]
    assert archive.ids == [bob_id, new_id]
    # to another server, and in the sender's own archive: none of ours either
    harness.router.remote = remote = RecordingRemote()
    await harness.send(alice, chat("carol@elsewhere.example", "out", replayed))
    [passed_on] = remote.routed
    assert stanza_ids(passed_on) == [("room@muc.example.org", "theirs")]
    await harness.router.drain()
    sent = (await query(harness, alice)).messages
    theirs = [("room@muc.example.org", "theirs")]
    assert [stanza_ids(m) for m in sent] == [[], theirs, theirs]


async def test_an_id_learnt_by_another_sender_is_not_ours_on_its_message() -> None:
    """bob forwards alice's message to mallory on another server (XEP-0297: the
    stanza-id inside the <forwarded/> goes with it); mallory sends it back to bob on a
    message of hers. Her message is stamped an id of its own: it does not replace
    alice's in bob's archive, although the id is one this server made for bob."""
    harness = await make()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, chat("bob@localhost", "from alice"))
    [original] = bob.take()
    [(_, alice_id)] = stanza_ids(original)
    harness.router.remote = remote = RecordingRemote()
    forward = (
        f"<message to='mallory@evil.example' type='chat'><body>look</body><forwarded "
        f"xmlns='{FORWARD}'>{etree.tostring(original).decode()}</forwarded></message>"
    )
    await harness.send(bob, forward)
    [passed_on] = remote.routed
    assert f"id=\"{alice_id}\"".encode() in etree.tostring(passed_on)  # mallory has it
    replay = parse_stanza(chat(
        "bob@localhost", "from mallory",
        f"<stanza-id xmlns='{SID}' by='bob@localhost' id='{alice_id}'/>",
    ))
    replay.set("from", "mallory@evil.example/x")
    harness.router.route(replay)
    await harness.router.drain()
    [got] = bob.take()
    [(by, mallory_id)] = stanza_ids(got)
    assert by == "bob@localhost" and mallory_id != alice_id
    archive = await query(harness, bob)
    assert archive.bodies == ["from alice", "look", "from mallory"]
    assert archive.ids[0] == alice_id and archive.ids[2] == mallory_id


async def test_hints_and_types_that_are_not_archived() -> None:
    harness = await make()
    alice = harness.session("alice@localhost/a")
    harness.session("bob@localhost/b")
    await harness.send(alice, chat("bob@localhost", "1", "<no-store xmlns='urn:xmpp:hints'/>"))
    await harness.send(
        alice, chat("bob@localhost", "2", "<no-permanent-store xmlns='urn:xmpp:hints'/>")
    )
    await harness.send(alice, chat("bob@localhost", "3", type_="headline"))
    await harness.send(alice, chat("bob@localhost", "4", type_="error"))
    await harness.send(
        alice, "<message to='bob@localhost' type='chat'><active "
        "xmlns='http://jabber.org/protocol/chatstates'/></message>"
    )
    await harness.send(
        alice, f"<message to='bob@localhost'><sent xmlns='{CARBONS}'><forwarded xmlns='{FORWARD}'>"
        "<message xmlns='jabber:client'><body>copy</body></message></forwarded></sent>"
        "<body>wrapped</body></message>"
    )
    # a <store/> hint keeps even a bodyless message; a normal one with a body is kept
    await harness.send(
        alice, "<message to='bob@localhost'><store xmlns='urn:xmpp:hints'/><received "
        "xmlns='urn:xmpp:receipts' id='x'/></message>"
    )
    await harness.send(alice, chat("bob@localhost", "normal", type_="normal"))
    await harness.router.drain()
    assert await stored(harness, "alice") == 2
    assert await stored(harness, "bob") == 2
    assert (await query(harness, alice)).bodies == [None, "normal"]


async def test_a_message_blocking_refuses_is_in_neither_archive_that_refused_it() -> None:
    """XEP-0313 section 5.1: an archive holds what its owner would have received; and
    a message the sender's own blocking drops (XEP-0191) never left."""
    harness = await make(blocking={})
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    block = "<block xmlns='urn:xmpp:blocking'><item jid='alice@localhost'/></block>"
    assert (await harness.iq(bob, "set", block)).get("type") == "result"
    [refused] = await harness.send(alice, chat("bob@localhost", "to a blocker"))
    assert condition(refused) == "service-unavailable"
    [dropped] = await harness.send(bob, chat("alice@localhost", "to the blocked"))
    assert condition(dropped) == "not-acceptable"
    await harness.router.drain()
    assert (await query(harness, bob)).bodies == []
    assert (await query(harness, alice)).bodies == ["to a blocker"]  # what she sent


async def test_the_never_policy_archives_nothing() -> None:
    harness = await make({"default_policy": "never"})
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, chat("bob@localhost", "nothing kept"))
    [got] = bob.take()
    assert stanza_ids(got) == []
    await harness.router.drain()
    assert await stored(harness, "alice") == 0 and await stored(harness, "bob") == 0


async def conversation(harness: ModuleHarness, count: int) -> tuple[TestSession, list[str]]:
    """alice and bob take turns (alice first); alice's archive ids, oldest first."""
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    for n in range(count):
        sender, to = (alice, "bob@localhost") if n % 2 == 0 else (bob, "alice@localhost")
        await harness.send(sender, chat(to, f"m{n}"))
    alice.take()
    bob.take()
    await harness.router.drain()
    ids: list[str] = []
    bodies: list[str | None] = []
    while True:  # page by page: max_page may be smaller than the conversation
        page = await query(harness, alice, rsm(after=ids[-1]) if ids else "")
        ids += page.ids
        bodies += page.bodies
        if page.complete:
            break
    assert bodies == [f"m{n}" for n in range(count)]
    return alice, ids


async def test_paging_forward_and_backward() -> None:
    harness = await make()
    alice, ids = await conversation(harness, 5)
    page = await query(harness, alice, rsm(2))
    assert page.ids == ids[:2] and not page.complete
    assert page.first_last == (ids[0], ids[1])
    page = await query(harness, alice, rsm(2, after=ids[1]))
    assert page.ids == ids[2:4] and not page.complete
    page = await query(harness, alice, rsm(2, after=ids[3]))
    assert page.ids == ids[4:] and page.complete
    # backward: the last page first, then before its first item
    page = await query(harness, alice, rsm(2, before=""))
    assert page.ids == ids[3:] and not page.complete
    assert page.first_last == (ids[3], ids[4])
    page = await query(harness, alice, rsm(2, before=ids[3]))
    assert page.ids == ids[1:3] and not page.complete
    page = await query(harness, alice, rsm(2, before=ids[1]))
    assert page.ids == ids[:1] and page.complete
    # after the last one: an empty, complete page
    page = await query(harness, alice, rsm(2, after=ids[4]))
    assert page.ids == [] and page.complete and page.first_last == (None, None)
    # flip-page: the same page, newest first
    flipped = await query(harness, alice, rsm(2, before="") + f"<flip-page xmlns='{MAM}'/>")
    assert flipped.ids == [ids[4], ids[3]]


async def test_filters() -> None:
    harness = await make()
    alice, ids = await conversation(harness, 4)
    carol = harness.session("carol@localhost/c")
    harness.users.add("carol@localhost")
    await harness.send(carol, chat("alice@localhost", "from carol"))
    await harness.router.drain()
    alice.take()
    assert (await query(harness, alice, form(with_="carol@localhost"))).bodies == ["from carol"]
    assert (await query(harness, alice, form(with_="carol@localhost/c"))).bodies == ["from carol"]
    assert (await query(harness, alice, form(with_="carol@localhost/other"))).bodies == []
    with_bob = await query(harness, alice, form(with_="bob@localhost"))
    assert with_bob.ids == ids and with_bob.complete
    assert (await query(harness, alice, form(after_id=ids[1]))).bodies == ["m2", "m3", "from carol"]
    assert (await query(harness, alice, form(before_id=ids[2]))).ids == ids[:2]
    both = await query(harness, alice, form(after_id=ids[0], before_id=ids[3]))
    assert both.ids == ids[1:3]
    chosen = await query(harness, alice, form(ids=[ids[2], ids[0]]))
    assert chosen.ids == [ids[0], ids[2]]
    # start and end are inclusive, XEP-0082 stamps with a zone
    assert (await query(harness, alice, form(start="1970-01-01T00:00:00Z"))).bodies[0] == "m0"
    assert (await query(harness, alice, form(end="2000-01-01T00:00:00Z"))).ids == []
    assert (await query(harness, alice, form(start="2999-01-01T00:00:00+02:00"))).ids == []
    # with and paging together
    page = await query(harness, alice, form(with_="bob@localhost") + rsm(3, before=""))
    assert page.ids == ids[1:] and not page.complete


async def test_a_full_jid_filter_matches_however_the_message_wrote_the_jid() -> None:
    """'with' is normalized (RFC 7622) when the query is read: so must the JIDs the
    archive keeps be, or a message written to 'Bob@LocalHost/B' is never found."""
    harness = await make()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/B")
    await harness.send(alice, chat("Bob@LocalHost/B", "to bob"))
    stanza = parse_stanza(chat("alice@localhost", "from afar"))
    stanza.set("from", "Carol@Elsewhere.Example/Phone")
    harness.router.route(stanza)
    await harness.router.drain()
    bob.take()
    alice.take()
    assert (await query(harness, alice, form(with_="bob@localhost/B"))).bodies == ["to bob"]
    assert (await query(harness, bob, form(with_="alice@localhost/a"))).bodies == ["to bob"]
    carol = form(with_="carol@elsewhere.example/Phone")
    assert (await query(harness, alice, carol)).bodies == ["from afar"]


async def test_errors() -> None:
    harness = await make()
    alice, ids = await conversation(harness, 2)
    assert await error_of(harness, alice, form(start="yesterday")) == "bad-request"
    assert await error_of(harness, alice, form(end="2024-01-01T00:00:00")) == "bad-request"
    # XEP-0313 4.1.5: a field the server does not know is feature-not-implemented
    assert await error_of(harness, alice, form(colour="blue")) == "feature-not-implemented"
    assert await error_of(harness, alice, form(with_="a@b@c")) == "bad-request"
    assert await error_of(harness, alice, rsm(max_=-1)) == "bad-request"
    unknown = "f" * len(ids[0])
    assert await error_of(harness, alice, form(after_id=unknown)) == "item-not-found"
    assert await error_of(harness, alice, form(before_id="nope")) == "item-not-found"
    assert await error_of(harness, alice, rsm(2, after=unknown)) == "item-not-found"
    assert await error_of(harness, alice, rsm(2, before=unknown)) == "item-not-found"
    assert await error_of(harness, alice, form(ids=[ids[0], unknown])) == "item-not-found"
    # 'ids' with other bounds, the epoch (0) as well as any other time
    epoch = "1970-01-01T00:00:00Z"
    assert await error_of(harness, alice, form(ids=[ids[0]], start=epoch)) == "bad-request"
    assert await error_of(harness, alice, form(ids=[ids[0]], end=epoch)) == "bad-request"
    # an id of bob's archive is not one of alice's
    bob = harness.session("bob@localhost/b2")
    [bob_id, _] = (await query(harness, bob)).ids
    assert await error_of(harness, alice, form(after_id=bob_id)) == "item-not-found"


async def test_another_users_archive_is_forbidden() -> None:
    harness = await make()
    alice, _ = await conversation(harness, 2)
    bob = harness.session("bob@localhost/b3")
    answer = await query(harness, bob, to="alice@localhost")
    assert answer.results == [] and condition(answer.iq) == "forbidden"
    form_get = f"<query xmlns='{MAM}'/>"
    assert condition(await harness.iq(bob, "get", form_get, to="alice@localhost")) == "forbidden"
    # the owner may address its own bare JID, or nothing at all
    assert len((await query(harness, alice, to="alice@localhost")).ids) == 2


async def test_the_query_form_and_metadata() -> None:
    harness = await make()
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{MAM}'/>")
    x = reply.find(f"{{{MAM}}}query/{{jabber:x:data}}x")
    assert x is not None and x.get("type") == "form"
    fields = {f.get("var"): f for f in x.iter("{jabber:x:data}field")}
    assert set(fields) == {"FORM_TYPE", "with", "start", "end", "before-id", "after-id", "ids"}
    # 'ids' is a list-multi open to any value, listing none (XEP-0313 4.1.5, XEP-0122)
    assert fields["ids"].get("type") == "list-multi"
    assert fields["ids"].find("{jabber:x:data}value") is None
    validate = fields["ids"].find("{http://jabber.org/protocol/xdata-validate}validate")
    assert validate is not None and validate.get("datatype") == "xs:string"
    assert validate.find("{http://jabber.org/protocol/xdata-validate}open") is not None
    empty = await harness.iq(alice, "get", f"<metadata xmlns='{MAM}'/>")
    metadata = empty.find(f"{{{MAM}}}metadata")
    assert metadata is not None and len(metadata) == 0
    alice, ids = await conversation(harness, 3)
    reply = await harness.iq(alice, "get", f"<metadata xmlns='{MAM}'/>")
    start = reply.find(f"{{{MAM}}}metadata/{{{MAM}}}start")
    end = reply.find(f"{{{MAM}}}metadata/{{{MAM}}}end")
    assert start is not None and end is not None
    assert (start.get("id"), end.get("id")) == (ids[0], ids[-1])
    prefs = await harness.iq(alice, "get", f"<prefs xmlns='{MAM}'/>")
    assert condition(prefs) == "feature-not-implemented"


async def test_max_is_capped_at_max_page() -> None:
    harness = await make({"max_page": 3})
    alice, ids = await conversation(harness, 5)
    page = await query(harness, alice, rsm(50))
    assert page.ids == ids[:3] and not page.complete
    assert await error_of(harness, alice, form(ids=ids[:4])) == "bad-request"  # over max_page
    assert (await query(harness, alice, form(ids=ids[:3]))).ids == ids[:3]
    assert (await query(harness, alice, rsm(3, after=ids[2]))).ids == ids[3:]


async def test_account_removal_deletes_the_whole_archive() -> None:
    harness = await make()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = harness.session("zed@localhost/z")
    bob = harness.session("bob@localhost/b")
    for n in range(130):  # more than a page of deletes
        await harness.send(zed, chat("bob@localhost", f"n{n}"))
    await harness.router.drain()
    bob.take()
    assert await stored(harness, "zed") == 130
    assert await harness.host.remove_account("localhost", "zed") == "account"
    await harness.router.drain()
    assert await stored(harness, "zed") == 0
    assert await stored(harness, "bob") == 130  # bob's own record of the conversation stays


async def test_an_export_counts_the_archive_as_skipped() -> None:
    """XEP-0227 has no place for an archive: `xmppctl export` says what it left out."""
    harness = await make()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = harness.session("zed@localhost/z")
    harness.session("bob@localhost/b")
    for n in range(3):
        await harness.send(zed, chat("bob@localhost", f"n{n}"))
    await harness.router.drain()
    summary = Summary()
    user = await export_user(harness.host, "localhost", "zed", summary)
    assert summary.counts["archive"].skipped == 3 and summary.counts["archive"].copied == 0
    assert "archive: 0 copied, 3 skipped, 0 failed" in summary.lines()
    assert MAM.encode() not in etree.tostring(user)


async def test_a_sender_faster_than_the_archive_waits_for_its_writes(tmp_path: Path) -> None:
    """Each message to a local account makes two writes (the sender's archive and the
    recipient's): past WRITES_PER_SENDER in flight, the next message waits in the
    sender's pipeline (its connection not read) until storage catches up; none is lost."""
    items = GatedSQLite(tmp_path / "items.db")
    items.gate.set()  # open while the module starts (its id key)
    storage = Storage(items, MemoryBlobBackend(), NullCache())
    harness = ModuleHarness({"disco": {}, "mam": {}}, storage=storage)
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    items.gate.clear()
    count = WRITES_PER_SENDER // 2 + 4
    for n in range(count):  # as the stream hands them over, without waiting
        stanza = parse_stanza(chat("bob@localhost", f"w{n}"))
        stanza.set("from", alice.jid)
        alice.receive(stanza)
    assert len(bob.take()) == WRITES_PER_SENDER // 2  # the rest wait behind the writes
    assert alice.input_holds == 1
    items.gate.set()
    await harness.router.drain()
    later = range(WRITES_PER_SENDER // 2, count)
    assert [m.findtext(BODY) for m in bob.take()] == [f"w{n}" for n in later]
    assert await stored(harness, "alice") == count and await stored(harness, "bob") == count


class FailingArchive(MemoryItemBackend):
    """Memory items whose archive writes fail, as a store that is down."""

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        if namespace.endswith("/mam"):
            raise StorageError("memory", "batch_put", "down for the test")
        await super().batch_put(namespace, items)


async def test_an_archive_that_cannot_be_written_is_logged_and_delivery_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_mam_writer, "RETRY_WAITS", (0.01, 0.01))
    storage = Storage(FailingArchive(), MemoryBlobBackend(), NullCache())
    harness = ModuleHarness({"disco": {}, "mam": {}}, storage=storage)
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    count = WRITES_PER_SENDER + 8  # past the bound: failed writes leave room too
    for n in range(count):
        await harness.send(alice, chat("bob@localhost", f"f{n}"))
    assert len(bob.take()) == count
    assert "messages not archived in localhost/mam: memory: batch_put failed" in caplog.text
    assert await stored(harness, "bob") == 0


async def test_an_archive_write_that_failed_a_moment_is_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the SQLite file's write lock while alice writes to bob: the
    archive writes fail ("database is locked"). Once the lock is gone, both archives
    hold the message. Before, a failed batch was logged and lost from both."""
    path = tmp_path / "items.sqlite3"
    storage = Storage(
        SQLiteItemBackend(path, busy_timeout=0.1), MemoryBlobBackend(), NullCache()
    )
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        harness = ModuleHarness({"disco": {}, "mam": {}}, storage=storage)
        harness.users.update({"alice@localhost", "bob@localhost"})
        await harness.start()
        alice = harness.session("alice@localhost/a")
        bob = harness.session("bob@localhost/b")
        locker.execute("BEGIN IMMEDIATE")
        stanza = parse_stanza(chat("bob@localhost", "kept"))
        stanza.set("from", alice.jid)
        alice.receive(stanza)  # not drained: the archive's writes wait for the lock
        async with asyncio.timeout(30):
            while "not archived in localhost/mam" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        locker.execute("ROLLBACK")
        await harness.router.drain()
        assert [m.findtext(BODY) for m in bob.take()] == ["kept"]
        assert await stored(harness, "alice") == 1 and await stored(harness, "bob") == 1
    finally:
        locker.close()
        await storage.close()


@pytest.mark.parametrize("policy", ["sometimes", ""])
async def test_bad_options_are_refused(policy: str) -> None:
    with pytest.raises(Exception, match="default_policy"):
        await make({"default_policy": policy})
