"""Blocking Command (XEP-0191) through the module host, without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.storage.services import dynamodb_config, service_factory  # noqa: F401  (fixture)
from xmppd.jid import JID
from xmppd.modules._privacy_engine import BlockSet, IndexedList, PrivacyEngine, make_item
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.storage import devservices
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Attrs, ConditionFailed, Item, ItemBackend, StorageError
from xmppd.storage.cache import CachedItemBackend, MemoryCache
from xmppd.storage.devservices import LocalService
from xmppd.storage.factory import Storage
from xmppd.testing import (
    ModuleHarness,
    RecordingRemote,
    TestSession,
    parse_stanza,
    without_echo,
)

BLOCKING = "urn:xmpp:blocking"
ERRORS = "urn:xmpp:blocking:errors"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
B = f"{{{BLOCKING}}}"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def blocked_marker(reply: etree._Element) -> bool:
    return reply.find(f"{{jabber:client}}error/{{{ERRORS}}}blocked") is not None


def chat(to: str, body: str = "hi") -> str:
    return f"<message to='{to}' type='chat' id='m1'><body>{body}</body></message>"


def bodies(stanzas: list[etree._Element]) -> list[str | None]:
    return [s.findtext("{jabber:client}body") for s in stanzas if s.get("type") != "error"]


def pushes(stanzas: list[etree._Element], local: str) -> list[list[str]]:
    """The JIDs of each blocking push of kind `local` (block/unblock) among `stanzas`."""
    return [
        [i.get("jid") for i in iq.iter(f"{B}item")]
        for iq in stanzas
        if iq.tag == "{jabber:client}iq"
        and iq.get("type") == "set"
        and iq.find(f"{B}{local}") is not None
    ]


async def iq(
    harness: ModuleHarness, session: TestSession, type_: str, payload: str, to: str | None = None
) -> etree._Element:
    """Send an IQ and return its answer, leaving anything else (pushes) in `session.received`."""
    to_attr = f" to='{to}'" if to else ""
    stanzas = await harness.send(session, f"<iq type='{type_}' id='t1'{to_attr}>{payload}</iq>")
    answers = [s for s in stanzas if s.tag == "{jabber:client}iq" and s.get("id") == "t1"]
    assert len(answers) == 1, [etree.tostring(s) for s in stanzas]
    session.received.extend(s for s in stanzas if s is not answers[0])
    return answers[0]


async def block(harness: ModuleHarness, session: TestSession, *jids: str) -> etree._Element:
    items = "".join(f"<item jid='{j}'/>" for j in jids)
    return await iq(harness, session, "set", f"<block xmlns='{BLOCKING}'>{items}</block>")


async def unblock(harness: ModuleHarness, session: TestSession, *jids: str) -> etree._Element:
    items = "".join(f"<item jid='{j}'/>" for j in jids)
    return await iq(harness, session, "set", f"<unblock xmlns='{BLOCKING}'>{items}</unblock>")


async def blocklist(harness: ModuleHarness, session: TestSession) -> list[str]:
    reply = await iq(harness, session, "get", f"<blocklist xmlns='{BLOCKING}'/>")
    assert reply.get("type") == "result", etree.tostring(reply)
    return [i.get("jid") for i in reply.iter(f"{B}item")]


async def make(**modules: Any) -> ModuleHarness:
    harness = ModuleHarness({"disco": {}, "blocking": {}, **modules})
    harness.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    return await harness.start()


@pytest.fixture
async def harness() -> ModuleHarness:
    return await make()


# --- protocol -----------------------------------------------------------------------------


async def test_disco_feature() -> None:
    harness = await make(privacy={})
    alice = harness.session("alice@localhost/a")
    reply = await iq(harness, alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    features = {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}
    assert {BLOCKING, "jabber:iq:privacy"} <= features


async def test_block_unblock_and_pushes_to_every_resource(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/b", available=False)  # bound, never available
    assert await blocklist(harness, alice) == []
    reply = await block(harness, alice, "Bob@LocalHost", "carol@localhost", "bob@localhost")
    assert reply.get("type") == "result" and len(reply) == 0
    assert pushes(alice.take(), "block") == [["bob@localhost", "carol@localhost"]]
    assert pushes(other.take(), "block") == [["bob@localhost", "carol@localhost"]]
    assert await blocklist(harness, alice) == ["bob@localhost", "carol@localhost"]
    # blocking again is harmless and keeps one entry
    await block(harness, alice, "bob@localhost")
    assert await blocklist(harness, other) == ["bob@localhost", "carol@localhost"]
    other.take()

    reply = await unblock(harness, alice, "BOB@localhost", "nobody@localhost")
    assert reply.get("type") == "result"
    assert pushes(other.take(), "unblock") == [["bob@localhost", "nobody@localhost"]]
    assert await blocklist(harness, alice) == ["carol@localhost"]

    await block(harness, alice, "dave@localhost")
    other.take()
    reply = await unblock(harness, alice)  # unblock all
    assert reply.get("type") == "result"
    assert pushes(other.take(), "unblock") == [[]]
    assert await blocklist(harness, alice) == []


@pytest.mark.parametrize(
    ("type_", "payload", "expected"),
    [
        ("set", f"<block xmlns='{BLOCKING}'/>", "bad-request"),
        ("set", f"<block xmlns='{BLOCKING}'><item/></block>", "bad-request"),
        ("set", f"<block xmlns='{BLOCKING}'><item jid='a@b@c'/></block>", "jid-malformed"),
        ("set", f"<block xmlns='{BLOCKING}'><item jid=''/></block>", "jid-malformed"),
        ("set", f"<block xmlns='{BLOCKING}'><foo jid='x@y'/></block>", "bad-request"),
        (
            "set",
            f"<block xmlns='{BLOCKING}'><item jid='x@localhost'/><item/></block>",
            "bad-request",
        ),
        ("set", f"<unblock xmlns='{BLOCKING}'><item/></unblock>", "bad-request"),
        ("set", f"<blocklist xmlns='{BLOCKING}'/>", "bad-request"),
        ("get", f"<block xmlns='{BLOCKING}'><item jid='x@y'/></block>", "bad-request"),
        ("set", f"<frobnicate xmlns='{BLOCKING}'/>", "bad-request"),
    ],
)
async def test_malformed_requests_change_nothing(
    harness: ModuleHarness, type_: str, payload: str, expected: str
) -> None:
    alice = harness.session("alice@localhost/a")
    await block(harness, alice, "bob@localhost")
    alice.take()
    reply = await iq(harness, alice, type_, payload)
    assert condition(reply) == expected
    assert pushes(alice.take(), "block") == [] and pushes(alice.received, "unblock") == []
    assert await blocklist(harness, alice) == ["bob@localhost"]


async def test_other_accounts_blocklist_is_not_reachable(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await block(harness, alice, "carol@localhost")
    reply = await iq(harness, bob, "get", f"<blocklist xmlns='{BLOCKING}'/>", to="alice@localhost")
    assert condition(reply) == "service-unavailable"
    reply = await iq(
        harness,
        bob,
        "set",
        f"<unblock xmlns='{BLOCKING}'/>",
        to="alice@localhost",
    )
    assert condition(reply) == "service-unavailable"
    assert await blocklist(harness, alice) == ["carol@localhost"]
    # and to the server itself: not where the blocklist lives
    reply = await iq(harness, alice, "get", f"<blocklist xmlns='{BLOCKING}'/>", to="localhost")
    assert condition(reply) == "service-unavailable"


async def test_size_limit() -> None:
    harness = await make(blocking={"max_blocked": 2})
    alice = harness.session("alice@localhost/a")
    await block(harness, alice, "a@x", "b@x")
    reply = await block(harness, alice, "c@x")
    assert condition(reply) == "policy-violation"
    await block(harness, alice, "a@x")  # already there: not over the limit
    assert await blocklist(harness, alice) == ["a@x", "b@x"]


# --- enforcement --------------------------------------------------------------------------


async def test_blocked_contact_cannot_reach_the_user(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    alice2 = harness.session("alice@localhost/b")
    bob = harness.session("bob@localhost/b")
    await block(harness, alice, "bob@localhost")
    alice.take(), alice2.take()

    # a message to the bare JID reaches both resources normally: one error, nothing delivered
    replies = await harness.send(bob, chat("alice@localhost"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert not blocked_marker(replies[0])  # the blocker's side is not disclosed
    replies = await harness.send(bob, chat("alice@localhost/b"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    # IQ get/set: service-unavailable; results and errors: dropped
    replies = await harness.send(
        bob, "<iq type='get' id='q1' to='alice@localhost/a'><ping xmlns='urn:xmpp:ping'/></iq>"
    )
    assert [condition(r) for r in replies] == ["service-unavailable"]
    replies = await harness.send(bob, "<iq type='result' id='q2' to='alice@localhost/a'/>")
    assert replies == []
    # presence: silently dropped (directed and subscription requests alike)
    assert await harness.send(bob, "<presence to='alice@localhost/a'/>") == []
    assert await harness.send(bob, "<presence type='subscribe' to='alice@localhost'/>") == []
    assert alice.take() == [] and alice2.take() == []

    # carol is not blocked
    carol = harness.session("carol@localhost/c")
    assert await harness.send(carol, chat("alice@localhost/a", "from carol")) == []
    assert bodies(alice.take()) == ["from carol"]


async def test_user_cannot_reach_blocked_contact(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await block(harness, alice, "bob@localhost")
    alice.take()
    for stanza in (
        chat("bob@localhost"),
        chat("bob@localhost/b"),
        "<iq type='get' id='q1' to='bob@localhost/b'><ping xmlns='urn:xmpp:ping'/></iq>",
        "<presence to='bob@localhost'/>",
        "<presence type='subscribe' to='bob@localhost'/>",
    ):
        replies = await harness.send(alice, stanza)
        assert [condition(r) for r in replies] == ["not-acceptable"], stanza
        assert blocked_marker(replies[0])
        assert replies[0].get("from") in ("bob@localhost", "bob@localhost/b")
    # errors and IQ results are dropped without an error about them
    assert await harness.send(alice, "<iq type='result' id='x' to='bob@localhost/b'/>") == []
    assert (
        await harness.send(
            alice,
            "<message type='error' to='bob@localhost'><error type='cancel'>"
            f"<gone xmlns='{STANZAS}'/></error></message>",
        )
        == []
    )
    assert bob.take() == []
    # the server itself and the user's own account stay reachable
    reply = await iq(harness, alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert reply.get("type") == "result"


async def test_domain_block_covers_its_users_but_not_own_resources_or_server() -> None:
    harness = await make()
    alice = harness.session("alice@localhost/a")
    alice2 = harness.session("alice@localhost/b")
    bob = harness.session("bob@localhost/b")
    await block(harness, alice, "localhost")
    alice.take(), alice2.take()
    replies = await harness.send(bob, chat("alice@localhost/a"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert await harness.send(alice2, chat("alice@localhost/a", "own")) == []
    assert bodies(alice.take()) == ["own"]
    reply = await iq(harness, alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert reply.get("type") == "result"


async def test_full_jid_block_covers_only_that_resource(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    phone = harness.session("bob@localhost/phone")
    laptop = harness.session("bob@localhost/laptop")
    await block(harness, alice, "bob@localhost/phone")
    alice.take()
    replies = await harness.send(phone, chat("alice@localhost/a", "phone"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert await harness.send(laptop, chat("alice@localhost/a", "laptop")) == []
    assert bodies(alice.take()) == ["laptop"]


def test_jid_matching_rules() -> None:
    """XEP-0191 section 4 / XEP-0016 section 2.1, all four forms."""

    def pattern_matches(value: str, peer: JID) -> bool:
        """Does a privacy list item of type jid with `value` cover `peer`?"""
        item = make_item(1, False, "jid", value)
        return IndexedList([item], None).first_match(peer, {}) is item

    peer = JID("romeo@montague.net/orchard")
    assert pattern_matches("romeo@montague.net/orchard", peer)
    assert not pattern_matches("romeo@montague.net/garden", peer)
    assert pattern_matches("romeo@montague.net", peer)
    assert not pattern_matches("juliet@montague.net", peer)
    assert pattern_matches("montague.net/orchard", peer)
    assert not pattern_matches("montague.net/garden", peer)
    assert pattern_matches("montague.net", peer)
    assert pattern_matches("net", peer)  # "an address containing a subdomain"
    assert not pattern_matches("tague.net", peer)
    assert pattern_matches("montague.net", JID("chat.montague.net"))
    assert not pattern_matches("romeo@montague.net", JID("montague.net"))
    for value in (
        "romeo@montague.net/orchard",
        "romeo@montague.net",
        "montague.net/orchard",
        "montague.net",
    ):
        assert BlockSet([value]).matches(peer)
        assert BlockSet([value]).matches(peer) == pattern_matches(value, peer)
    assert not BlockSet(["romeo@montague.net/garden", "tague.net", "x@montague.net"]).matches(peer)
    assert not BlockSet([]).matches(peer)


async def test_unblocked_contact_gets_through_again(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await block(harness, alice, "bob@localhost")
    await harness.send(bob, chat("alice@localhost", "blocked"))
    await unblock(harness, alice, "bob@localhost")
    alice.take()
    assert await harness.send(bob, chat("alice@localhost", "again")) == []
    assert bodies(alice.take()) == ["again"]
    assert await harness.send(alice, chat("bob@localhost", "back")) == []
    assert bodies(bob.take()) == ["back"]


async def test_block_applies_after_relogin_and_across_sessions(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await block(harness, alice, "bob@localhost")
    harness.router.unbind(alice)  # type: ignore[arg-type]
    await harness.host.fire("session/closed", alice)
    # a new harness over the same storage: nothing held in memory any more
    fresh = ModuleHarness({"blocking": {}}, users=set(harness.users))
    fresh.storage = harness.storage
    fresh.host.storage = harness.storage
    await fresh.start()
    alice = fresh.session("alice@localhost/new")
    await fresh.host.fire("session/bound", alice)
    bob = fresh.session("bob@localhost/b")
    replies = await fresh.send(bob, chat("alice@localhost"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert alice.take() == []


async def test_stanza_before_rules_are_loaded_is_held_not_leaked(harness: ModuleHarness) -> None:
    """A session whose "session/bound" preload has not finished must not see blocked stanzas."""
    alice = harness.session("alice@localhost/a")
    await block(harness, alice, "bob@localhost")
    engine = PrivacyEngine.attach(harness.host)
    alice.take()
    engine._states.clear()  # as if this node had never loaded alice
    bob = harness.session("bob@localhost/b")
    carol = harness.session("carol@localhost/c")
    replies = await harness.send(bob, chat("alice@localhost/a", "blocked"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    engine._states.clear()
    await harness.send(carol, chat("alice@localhost/a", "one"))
    await harness.send(carol, chat("alice@localhost/a", "two"))
    assert bodies(alice.take()) == ["one", "two"]
    engine._states.clear()
    replies = await harness.send(alice, chat("bob@localhost", "out"))
    assert [condition(r) for r in replies] == ["not-acceptable"] and bob.take() == []


# --- offline, presence, subscriptions --------------------------------------------------------


async def test_message_from_blocked_jid_is_not_stored_offline() -> None:
    harness = await make(offline={})
    alice = harness.session("alice@localhost/a")
    await block(harness, alice, "bob@localhost")
    harness.router.unbind(alice)  # type: ignore[arg-type]
    await harness.host.fire("session/closed", alice)
    bob = harness.session("bob@localhost/b")
    carol = harness.session("carol@localhost/c")
    replies = await harness.send(bob, chat("alice@localhost", "blocked"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert await harness.send(carol, chat("alice@localhost", "stored")) == []

    alice = harness.session("alice@localhost/again", available=False)
    got = without_echo(alice, await harness.send(alice, "<presence/>"))  # offline messages come
    assert bodies(got) == ["stored"]


async def presence_harness() -> tuple[ModuleHarness, RosterModule]:
    harness = await make(roster={}, presence={}, privacy={})
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    for owner, contact in (
        ("alice@localhost", "bob@localhost"),
        ("bob@localhost", "alice@localhost"),
        ("alice@localhost", "carol@localhost"),
        ("carol@localhost", "alice@localhost"),
    ):
        await roster.update(
            owner, contact, lambda _, c=contact: RosterItem(jid=c, subscription="both")
        )
    return harness, roster


async def online(harness: ModuleHarness, jid: str) -> TestSession:
    session = harness.session(jid, available=False)
    await harness.host.fire("session/bound", session)
    await harness.send(session, "<presence/>")
    return session


def presences(stanzas: list[etree._Element]) -> list[tuple[str | None, str | None]]:
    return [(s.get("from"), s.get("type")) for s in stanzas if s.tag == "{jabber:client}presence"]


async def test_block_sends_unavailable_both_ways_and_stops_presence() -> None:
    harness, _ = await presence_harness()
    alice = await online(harness, "alice@localhost/a")
    bob = await online(harness, "bob@localhost/b")
    carol = await online(harness, "carol@localhost/c")
    await harness.router.drain()
    alice.take(), bob.take(), carol.take()

    await block(harness, alice, "bob@localhost")
    assert presences(bob.take()) == [("alice@localhost/a", "unavailable")]
    assert presences(alice.take()) == [("bob@localhost/b", "unavailable")]

    # new broadcasts do not cross the block, in either direction
    await harness.send(alice, "<presence><show>away</show></presence>")
    await harness.send(bob, "<presence><show>dnd</show></presence>")
    assert presences(bob.take()) == []
    assert presences(alice.take()) == []
    assert presences(carol.take()) == [("alice@localhost/a", None)]  # carol is not bob's contact
    # a probe from the blocked contact gets no answer
    await harness.send(bob, "<presence type='probe' to='alice@localhost'/>")
    assert presences(bob.take()) == []

    # unblock: both see each other's current presence again
    await unblock(harness, alice, "bob@localhost")
    got = bob.take()
    assert presences(got) == [("alice@localhost/a", None)]
    assert [p.findtext("{jabber:client}show") for p in got if p.tag.endswith("presence")] == [
        "away"
    ]
    assert presences(alice.take()) == [("bob@localhost/b", None)]


async def test_subscription_request_from_blocked_contact_is_dropped() -> None:
    harness, roster = await presence_harness()
    alice = await online(harness, "alice@localhost/a")
    dave = harness.session("dave@localhost/d")
    await block(harness, alice, "dave@localhost")
    alice.take()
    assert await harness.send(dave, "<presence type='subscribe' to='alice@localhost'/>") == []
    assert presences(alice.take()) == []
    assert await roster.item("alice@localhost", "dave@localhost") is None
    # and alice cannot subscribe to dave while she blocks him
    replies = await harness.send(alice, "<presence type='subscribe' to='dave@localhost'/>")
    assert [condition(r) for r in replies] == ["not-acceptable"]
    assert await roster.item("alice@localhost", "dave@localhost") is None


async def test_a_blocked_contacts_cancellations_change_the_roster_unseen() -> None:
    """Bob blocks Alice; she revokes his subscription to her (unsubscribed), then
    cancels hers to him (unsubscribe). The subscription states are the servers'
    (RFC 6121 3.2, 3.3): Bob's roster follows hers, else it would go on saying he
    may see her (PEP's last items at his logins went by it). His resource sees
    neither stanza: the send returns once the roster work it queued is done."""
    harness, roster = await presence_harness()
    bob = await online(harness, "bob@localhost/b")
    alice = await online(harness, "alice@localhost/a")
    await block(harness, bob, "alice@localhost")
    bob.take()
    await harness.send(alice, "<presence type='unsubscribed' to='bob@localhost'/>")
    assert (await roster.item("alice@localhost", "bob@localhost")).subscription == "to"
    assert (await roster.item("bob@localhost", "alice@localhost")).subscription == "from"
    await harness.send(alice, "<presence type='unsubscribe' to='bob@localhost'/>")
    assert (await roster.item("alice@localhost", "bob@localhost")).subscription == "none"
    assert (await roster.item("bob@localhost", "alice@localhost")).subscription == "none"
    assert presences(bob.take()) == []


async def test_a_blocked_contacts_approval_of_the_users_request_is_kept_unseen() -> None:
    """Bob asked Carol for her presence, then blocked her; her approval (subscribed)
    answers his own request and changes his roster ('to'), as hers ('from'), but
    neither it nor her presence reaches his resource while she is blocked."""
    harness, roster = await presence_harness()
    bob = await online(harness, "bob@localhost/b")
    carol = await online(harness, "carol@localhost/c")
    await harness.send(bob, "<presence type='subscribe' to='carol@localhost'/>")
    await block(harness, bob, "carol@localhost")
    bob.take()
    await harness.send(carol, "<presence type='subscribed' to='bob@localhost'/>")
    assert (await roster.item("carol@localhost", "bob@localhost")).subscription == "from"
    bobs = await roster.item("bob@localhost", "carol@localhost")
    assert (bobs.subscription, bobs.ask) == ("to", False)
    assert presences(bob.take()) == []


# --- concurrency and storage failures --------------------------------------------------------


class YieldingBackend(MemoryItemBackend):
    """Memory storage that lets other tasks run between read and write, counting lost races."""

    def __init__(self) -> None:
        super().__init__()
        self.conflicts = 0

    async def get(self, namespace: str, name: str) -> Item | None:
        item = await super().get(namespace, name)
        await asyncio.sleep(0)
        return item

    async def put(self, namespace: str, name: str, attrs: Attrs, **kw: Any) -> Item:
        try:
            return await super().put(namespace, name, attrs, **kw)
        except ConditionFailed:
            self.conflicts += 1
            raise


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[SQLiteItemBackend]:
    backend = await SQLiteItemBackend.open(tmp_path / "items.sqlite")
    yield backend
    await backend.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_concurrent_blocks_lose_nothing(kind: str, sqlite_backend: ItemBackend) -> None:
    harness = ModuleHarness({"blocking": {}})
    backend: ItemBackend = YieldingBackend() if kind == "memory" else sqlite_backend
    harness.storage.items = backend
    await harness.start()
    one = harness.session("alice@localhost/one")
    two = harness.session("alice@localhost/two")
    jids = [f"user{i}@example.net" for i in range(8)]
    for i, jid in enumerate(jids):  # all in flight at once: each IQ runs in its own task
        session = (one, two)[i % 2]
        payload = f"<block xmlns='{BLOCKING}'><item jid='{jid}'/></block>"
        harness.router.route(_iq(session, f"b{i}", payload), session)
    await harness.router.drain()
    results = [s for s in one.take() + two.take() if s.get("id", "").startswith("b")]
    assert sorted(r.get("type") for r in results) == ["result"] * 8
    assert sorted(await blocklist(harness, one)) == sorted(jids)
    if isinstance(backend, YieldingBackend):
        assert backend.conflicts > 0  # the race really happened and was retried


def _iq(session: TestSession, id_: str, payload: str) -> etree._Element:
    stanza = parse_stanza(f"<iq type='set' id='{id_}'>{payload}</iq>")
    stanza.set("from", session.jid)
    return stanza


class FailingWrites(MemoryItemBackend):
    async def put(self, namespace: str, name: str, attrs: Attrs, **kw: Any) -> Item:
        raise StorageError("memory", "put", "disk on fire")


class FailingReads(MemoryItemBackend):
    async def get(self, namespace: str, name: str) -> Item | None:
        raise StorageError("memory", "get", "disk on fire")


async def test_storage_failure_is_an_error_not_a_silent_drop() -> None:
    harness = ModuleHarness({"blocking": {}})
    harness.storage.items = FailingWrites()
    await harness.start()
    alice = harness.session("alice@localhost/a")
    reply = await block(harness, alice, "bob@localhost")
    assert condition(reply) == "internal-server-error"
    assert pushes(alice.take(), "block") == []
    assert await blocklist(harness, alice) == []


@pytest.mark.services
async def test_a_block_whose_write_timed_out_but_landed_is_what_applies(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
) -> None:
    """moto's DynamoDB hangs while alice blocks bob: the write times out, alice gets an
    error, and the write lands once moto runs again. What applies is then what the store
    has: her blocklist reads bob, his messages are refused. Before, this node kept the
    rules it held before the write, on which blocking again changed nothing (the store
    had bob already): "blocked" for alice, while bob's messages still reached her."""
    moto = service_factory(devservices.moto_server)
    backend = await DynamoDBItemBackend.from_config(
        dynamodb_config(moto, create_table=True, timeout=0.5, retries=0)
    )
    cache = MemoryCache()
    storage = Storage(CachedItemBackend(backend, cache), MemoryBlobBackend(), cache, backend)
    try:
        harness = ModuleHarness({"blocking": {}}, storage=storage)
        harness.users.update({"alice@localhost", "bob@localhost"})
        await harness.start()
        alice = await harness.login("alice@localhost/a")  # her rules (none) read and cached
        bob = harness.session("bob@localhost/b")
        moto.pause()  # the write's read is the cache's; the write itself hangs
        try:
            assert condition(await block(harness, alice, "bob@localhost")) == (
                "internal-server-error"
            )
        finally:
            moto.resume()
        async with asyncio.timeout(30):
            # moto applies the write when it runs again: nothing signals that
            while await backend.get("localhost/privacy", "alice@localhost") is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        assert await blocklist(harness, alice) == ["bob@localhost"]
        replies = await harness.send(bob, chat("alice@localhost/a"))
        assert [condition(r) for r in replies] == ["service-unavailable"]
        alice.take()
        assert (await block(harness, alice, "bob@localhost")).get("type") == "result"
        replies = await harness.send(bob, chat("alice@localhost/a"))
        assert [condition(r) for r in replies] == ["service-unavailable"]
        assert [s for s in alice.take() if s.tag == "{jabber:client}message"] == []
    finally:
        await storage.close()


async def test_unreadable_rules_refuse_rather_than_deliver() -> None:
    harness = ModuleHarness({"blocking": {}}, users={"alice@localhost"})
    harness.storage.items = FailingReads()
    await harness.start()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    replies = await harness.send(bob, chat("alice@localhost/a"))
    assert [condition(r) for r in replies] == ["internal-server-error"]
    assert alice.take() == []


async def test_blocked_contact_gets_no_answers_on_the_users_behalf() -> None:
    """XEP-0191 3.3: IQs the server answers for the account (vCard here) are refused too."""
    harness = await make(vcard={})
    alice = await harness.login("alice@localhost/a")
    bob = await harness.login("bob@localhost/b")
    vcard = "<vCard xmlns='vcard-temp'/>"
    before = await iq(harness, bob, "get", vcard, to="alice@localhost")
    assert condition(before) != "service-unavailable"
    await block(harness, alice, "bob@localhost")
    refused = await iq(harness, bob, "get", vcard, to="alice@localhost")
    assert condition(refused) == "service-unavailable"
    # alice asking about herself is never blocked
    own = await iq(harness, alice, "get", vcard, to="alice@localhost")
    assert own.get("type") == "result"


async def test_a_record_changed_elsewhere_is_reloaded_at_the_next_login(
    harness: ModuleHarness,
) -> None:
    """The copy kept while the user has no session here is refreshed when one starts:
    another process (xmppctl removing the account, another node) may have changed it."""
    alice = await harness.login("alice@localhost/a")
    await block(harness, alice, "bob@localhost")
    await harness.end_session(alice)
    assert await harness.host.items("localhost", "privacy").delete("alice@localhost")
    alice = await harness.login("alice@localhost/a")
    assert await blocklist(harness, alice) == []
    bob = harness.session("bob@localhost/b")
    await harness.send(bob, chat("alice@localhost/a", "hello"))
    assert bodies(alice.take()) == ["hello"]


# --- presence to contacts on other servers ---------------------------------------------------


async def test_no_presence_reaches_a_blocked_contact_on_another_server() -> None:
    """The server's own presence copies have no origin session, so no "stanza/out" filter:
    they are judged against the blocklist before they leave for another server."""
    harness = await make(roster={}, presence={})
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    for contact in ("bob@example.net", "dora@example.net"):
        await roster.update(
            "alice@localhost", contact, lambda _, c=contact: RosterItem(jid=c, subscription="both")
        )
    remote = RecordingRemote()
    harness.router.remote = remote
    alice = await online(harness, "alice@localhost/a")
    await harness.router.drain()
    assert remote.take("bob@example.net") == [
        ("alice@localhost/a", None),
        ("alice@localhost/a", "probe"),
    ]

    await block(harness, alice, "bob@example.net")
    await harness.router.drain()
    assert remote.take("bob@example.net") == [("alice@localhost/a", "unavailable")]
    remote.take("dora@example.net")
    await harness.send(alice, "<presence><show>away</show></presence>")
    await harness.send(alice, "<presence><show>dnd</show></presence>")
    await harness.end_session(alice)
    routed = list(remote.routed)
    assert remote.take("bob@example.net") == []
    remote.routed = routed  # a contact not blocked still sees every change
    assert remote.take("dora@example.net") == [
        ("alice@localhost/a", None),
        ("alice@localhost/a", None),
        ("alice@localhost/a", "unavailable"),
    ]

    # at the next login: no probe to bob, nor presence
    alice = await online(harness, "alice@localhost/again")
    await harness.router.drain()
    assert remote.take("bob@example.net") == []


async def test_a_lost_sessions_unavailable_waits_for_rules_not_loaded_here() -> None:
    """A session of a node that died: the node that reaps it may hold no rules of the
    user's; the unavailable it owes waits for them, and skips the blocked contact."""
    harness = await make(roster={}, presence={})
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    for contact in ("bob@example.net", "dora@example.net"):
        await roster.update(
            "alice@localhost", contact, lambda _, c=contact: RosterItem(jid=c, subscription="both")
        )
    alice = harness.session("alice@localhost/a")
    await block(harness, alice, "bob@example.net")
    harness.router.unbind(alice)
    PrivacyEngine.attach(harness.host)._states.clear()  # this node never met alice
    remote = RecordingRemote()
    harness.router.remote = remote
    await harness.host.fire("session/lost", "alice@localhost/a")
    await harness.router.drain()
    routed = list(remote.routed)
    assert remote.take("bob@example.net") == []
    remote.routed = routed
    assert remote.take("dora@example.net") == [("alice@localhost/a", "unavailable")]
