"""Presence and subscriptions (RFC 6121 sections 3-4) through the module host, without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import pytest
from lxml import etree

from tests.modules.slow_stores import GatedSQLite
from xmppd.modules import presence as presence_module
from xmppd.modules.presence import inbound, outbound
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.router import WORK_PER_SENDER
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.base import Item, StorageError
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, RecordingRemote, TestSession, parse_stanza, without_echo

R = "jabber:iq:roster"
P = "{jabber:client}presence"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"

# --- RFC 6121 Appendix A, table by table ------------------------------------------------

STATES: dict[str, dict[str, object]] = {
    "None": {},
    "None + Pending Out": {"ask": True},
    "None + Pending In": {"pending_in": True},
    "None + Pending Out/In": {"ask": True, "pending_in": True},
    "To": {"subscription": "to"},
    "To + Pending In": {"subscription": "to", "pending_in": True},
    "From": {"subscription": "from"},
    "From + Pending Out": {"subscription": "from", "ask": True},
    "Both": {"subscription": "both"},
}
SAME = "no state change"


def state(name: str, **extra: object) -> RosterItem:
    return RosterItem("c@x", **{**STATES[name], **extra})  # type: ignore[arg-type]


# (existing state, passes on (route / deliver), new state); "+approved" marks pre-approval
OUTBOUND = {
    "subscribe": [  # A.2.1
        ("None", True, "None + Pending Out"),
        ("None + Pending Out", True, SAME),
        ("None + Pending In", True, "None + Pending Out/In"),
        ("None + Pending Out/In", True, SAME),
        ("To", True, SAME),
        ("To + Pending In", True, SAME),
        ("From", True, "From + Pending Out"),
        ("From + Pending Out", True, SAME),
        ("Both", True, SAME),
    ],
    "unsubscribe": [  # A.2.2
        ("None", True, SAME),
        ("None + Pending Out", True, "None"),
        ("None + Pending In", True, SAME),
        ("None + Pending Out/In", True, "None + Pending In"),
        ("To", True, "None"),
        ("To + Pending In", True, "None + Pending In"),
        ("From", True, SAME),
        ("From + Pending Out", True, "From"),
        ("Both", True, "From"),
    ],
    "subscribed": [  # A.2.3, with pre-approval (3.4) where no request is pending
        ("None", False, "None+approved"),
        ("None + Pending Out", False, "None + Pending Out+approved"),
        ("None + Pending In", True, "From"),
        ("None + Pending Out/In", True, "From + Pending Out"),
        ("To", False, "To+approved"),
        ("To + Pending In", True, "Both"),
        ("From", False, SAME),
        ("From + Pending Out", False, SAME),
        ("Both", False, SAME),
    ],
    "unsubscribed": [  # A.2.4
        ("None", False, SAME),
        ("None + Pending Out", False, SAME),
        ("None + Pending In", True, "None"),
        ("None + Pending Out/In", True, "None + Pending Out"),
        ("To", False, SAME),
        ("To + Pending In", True, "To"),
        ("From", True, "None"),
        ("From + Pending Out", True, "None + Pending Out"),
        ("Both", True, "To"),
    ],
}
INBOUND = {
    "subscribe": [  # A.3.1 (no delivery where an automatic "subscribed" answers)
        ("None", True, "None + Pending In"),
        ("None + Pending Out", True, "None + Pending Out/In"),
        ("None + Pending In", False, SAME),
        ("None + Pending Out/In", False, SAME),
        ("To", True, "To + Pending In"),
        ("To + Pending In", False, SAME),
        ("From", False, SAME),
        ("From + Pending Out", False, SAME),
        ("Both", False, SAME),
    ],
    "unsubscribe": [  # A.3.2
        ("None", False, SAME),
        ("None + Pending Out", False, SAME),
        ("None + Pending In", True, "None"),
        ("None + Pending Out/In", True, "None + Pending Out"),
        ("To", False, SAME),
        ("To + Pending In", True, "To"),
        ("From", True, "None"),
        ("From + Pending Out", True, "None + Pending Out"),
        ("Both", True, "To"),
    ],
    "subscribed": [  # A.3.3
        ("None", False, SAME),
        ("None + Pending Out", True, "To"),
        ("None + Pending In", False, SAME),
        ("None + Pending Out/In", True, "To + Pending In"),
        ("To", False, SAME),
        ("To + Pending In", False, SAME),
        ("From", False, SAME),
        ("From + Pending Out", True, "Both"),
        ("Both", False, SAME),
    ],
    "unsubscribed": [  # A.3.4
        ("None", False, SAME),
        ("None + Pending Out", True, "None"),
        ("None + Pending In", False, SAME),
        ("None + Pending Out/In", True, "None + Pending In"),
        ("To", True, "None"),
        ("To + Pending In", True, "None + Pending In"),
        ("From", False, SAME),
        ("From + Pending Out", True, "From"),
        ("Both", True, "From"),
    ],
}


def expected_item(old: str, new: str) -> RosterItem:
    if new == SAME:
        return state(old)
    name, _, flag = new.partition("+approved")
    return state(name, approved=True) if new.endswith("+approved") else state(name)


@pytest.mark.parametrize(
    ("kind", "old", "passes", "new"),
    [(k, *row) for k, rows in OUTBOUND.items() for row in rows],
)
def test_outbound_table(kind: str, old: str, passes: bool, new: str) -> None:
    item, route = outbound(kind, state(old), "c@x")  # type: ignore[arg-type]
    assert route == passes
    assert item == expected_item(old, new)


@pytest.mark.parametrize(
    ("kind", "old", "passes", "new"),
    [(k, *row) for k, rows in INBOUND.items() for row in rows],
)
def test_inbound_table(kind: str, old: str, passes: bool, new: str) -> None:
    item, deliver, reply = inbound(kind, state(old), "c@x")  # type: ignore[arg-type]
    assert deliver == passes
    assert item == expected_item(old, new)
    auto = kind == "subscribe" and STATES[old].get("subscription") in ("from", "both")
    assert reply == ("subscribed" if auto else None)


def test_transitions_without_an_item() -> None:
    item, route = outbound("subscribe", None, "c@x")
    assert route and item == RosterItem("c@x", ask=True)
    assert outbound("unsubscribe", None, "c@x") == (None, True)
    assert outbound("subscribed", None, "c@x") == (RosterItem("c@x", approved=True), False)
    assert outbound("unsubscribed", None, "c@x") == (None, False)
    # a request from someone not in the roster is kept out of sight
    assert inbound("subscribe", None, "c@x") == (
        RosterItem("c@x", pending_in=True, in_roster=False),
        True,
        None,
    )
    for kind in ("subscribed", "unsubscribe", "unsubscribed"):
        assert inbound(kind, None, "c@x") == (None, False, None)  # type: ignore[arg-type]


def test_pre_approval_and_pending_only_entries() -> None:
    approved = state("None", approved=True)
    assert inbound("subscribe", approved, "c@x") == (state("From"), False, "subscribed")
    assert inbound("subscribe", state("To", approved=True), "c@x")[0] == state("Both")
    assert outbound("unsubscribed", approved, "c@x") == (state("None"), False)
    hidden = RosterItem("c@x", pending_in=True, in_roster=False)
    assert outbound("unsubscribed", hidden, "c@x") == (None, True)  # declined: gone
    assert inbound("unsubscribe", hidden, "c@x") == (None, True, None)  # withdrawn: gone
    assert outbound("subscribed", hidden, "c@x") == (state("From"), True)  # now in the roster
    assert outbound("subscribe", hidden, "c@x")[0] == state("None + Pending Out/In")


# --- the module with sessions -------------------------------------------------------------


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"roster": {}, "presence": {}})
    harness.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    return await harness.start()


def roster_of(harness: ModuleHarness) -> RosterModule:
    module = harness.host.modules["roster"]
    assert isinstance(module, RosterModule)
    return module


async def login(harness: ModuleHarness, jid: str, presence: str = "<presence/>") -> TestSession:
    """Bind, fetch the roster (an interested resource), send initial presence.

    What the initial presence brought, besides its echo, stays in `session.received`."""
    session = harness.session(jid, available=False)
    await harness.iq(session, "get", f"<query xmlns='{R}'/>")
    got = await harness.send(session, presence)
    session.received.extend(without_echo(session, got))
    return session


async def logout(harness: ModuleHarness, session: TestSession) -> None:
    """What the server does when a connection ends, cleanly or not."""
    await harness.end_session(session)


def presences(stanzas: Sequence[etree._Element], type_: str | None = "any") -> list[tuple]:
    return [
        (s.get("type"), s.get("from"), s.get("to"))
        for s in stanzas
        if s.tag == P and (type_ == "any" or s.get("type") == type_)
    ]


def pushed(stanzas: Sequence[etree._Element]) -> list[tuple[str, str, str | None]]:
    """(jid, subscription, ask) of each roster push."""
    return [
        (item.get("jid"), item.get("subscription"), item.get("ask"))
        for s in stanzas
        if s.tag == "{jabber:client}iq" and s.get("type") == "set"
        for item in s.iter(f"{{{R}}}item")
    ]


async def sub_of(harness: ModuleHarness, owner: str, contact: str) -> str | None:
    item = await roster_of(harness).item(owner, contact)
    return None if item is None else item.subscription


async def subscribe_both_ways(harness: ModuleHarness, a: TestSession, b: TestSession) -> None:
    for x, y in ((a, b), (b, a)):
        await harness.send(x, f"<presence type='subscribe' to='{y.bare}'/>")
        await harness.send(y, f"<presence type='subscribed' to='{x.bare}'/>")
    a.take()
    b.take()


async def test_mutual_subscription_and_presence(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b", "<presence><show>away</show></presence>")
    # alice asks: stamped with her bare JID, her roster shows ask='subscribe'
    replies = await harness.send(alice, "<presence type='subscribe' to='bob@localhost/b' id='s'/>")
    assert pushed(replies) == [("bob@localhost", "none", "subscribe")]
    got = bob.take()
    assert presences(got) == [("subscribe", "alice@localhost", "bob@localhost")]
    assert got[0].get("id") == "s"
    assert pushed(got) == []  # a pending inbound request is not a roster change
    # bob approves: both rosters change, alice gets bob's presence
    replies = await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")
    assert pushed(replies) == [("alice@localhost", "from", None)]
    got = alice.take()
    assert ("subscribed", "bob@localhost", "alice@localhost") in presences(got)
    assert (None, "bob@localhost/b", "alice@localhost") in presences(got)
    assert [p for p in got if p.tag == P and p.get("type") is None][0].findtext(
        "{jabber:client}show"
    ) == "away"
    assert pushed(got) == [("bob@localhost", "to", None)]
    # and the other way round
    await harness.send(bob, "<presence type='subscribe' to='alice@localhost'/>")
    assert presences(alice.take()) == [("subscribe", "bob@localhost", "alice@localhost")]
    replies = await harness.send(alice, "<presence type='subscribed' to='bob@localhost'/>")
    assert pushed(replies) == [("bob@localhost", "both", None)]
    got = bob.take()
    assert pushed(got) == [("alice@localhost", "both", None)]
    assert (None, "alice@localhost/a", "bob@localhost") in presences(got)
    assert await sub_of(harness, "alice@localhost", "bob@localhost") == "both"
    assert await sub_of(harness, "bob@localhost", "alice@localhost") == "both"
    # presence updates now reach the contact
    await harness.send(alice, "<presence><status>hi</status></presence>")
    (update,) = [p for p in bob.take() if p.tag == P]
    assert (
        update.get("from") == "alice@localhost/a"
        and update.findtext("{jabber:client}status") == "hi"
    )


async def test_presence_goes_only_to_subscribers(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    carol = await login(harness, "carol@localhost/c")
    await harness.send(bob, "<presence type='subscribe' to='alice@localhost'/>")
    await harness.send(alice, "<presence type='subscribed' to='bob@localhost'/>")
    bob.take()
    carol.take()
    await harness.send(alice, "<presence><show>dnd</show></presence>")
    assert presences(bob.take()) == [(None, "alice@localhost/a", "bob@localhost")]
    assert carol.take() == []  # not subscribed
    # alice only has 'from': bob's updates don't reach her
    await harness.send(bob, "<presence><show>xa</show></presence>")
    assert alice.take() == []


async def test_unsolicited_subscribed_is_dropped(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    # bob "approves" a request alice never made: that is a pre-approval on bob's side
    replies = await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")
    assert pushed(replies) == [("alice@localhost", "none", None)]
    item = await roster_of(harness).item("bob@localhost", "alice@localhost")
    assert item is not None and item.approved
    assert alice.take() == []  # never routed
    assert await roster_of(harness).item("alice@localhost", "bob@localhost") is None
    # a forged subscribed reaching alice directly is dropped too (A.3.3, "None")
    await harness.host.fire(
        "presence/subscribed",
        etree.fromstring(
            "<presence xmlns='jabber:client' type='subscribed' from='carol@localhost'/>"
        ),
        "alice@localhost",
    )
    assert (
        alice.take() == [] and await sub_of(harness, "alice@localhost", "carol@localhost") is None
    )


async def test_pre_approval(harness: ModuleHarness) -> None:
    features = [make() for make in harness.host.stream_features["bound"]]
    assert any(f.tag == "{urn:xmpp:features:pre-approval}sub" for f in features)
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")
    bob.take()
    got = await harness.send(alice, "<presence type='subscribe' to='bob@localhost'/>")
    assert presences(bob.take()) == []  # answered by the server, bob is not asked
    assert ("subscribed", "bob@localhost", "alice@localhost") in presences(got)
    assert (None, "bob@localhost/b", "alice@localhost") in presences(got)
    assert await sub_of(harness, "alice@localhost", "bob@localhost") == "to"
    assert await sub_of(harness, "bob@localhost", "alice@localhost") == "from"


async def test_pending_request_is_delivered_at_login(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    await harness.send(alice, "<presence type='subscribe' to='bob@localhost'/>")
    item = await roster_of(harness).item("bob@localhost", "alice@localhost")
    assert item is not None and item.pending_in and not item.in_roster
    bob = harness.session("bob@localhost/b", available=False)
    roster = await harness.iq(bob, "get", f"<query xmlns='{R}'/>")
    assert len(roster[0]) == 0  # not a roster item
    got = await harness.send(bob, "<presence/>")
    assert presences(got, "subscribe") == [("subscribe", "alice@localhost", "bob@localhost")]
    # unanswered: again at the next login
    await logout(harness, bob)
    bob = await login(harness, "bob@localhost/b2")
    assert presences(bob.take(), "subscribe") == [("subscribe", "alice@localhost", "bob@localhost")]
    # answered: no more
    await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")
    await harness.send(bob, "<presence type='unavailable'/>")
    assert presences(await harness.send(bob, "<presence/>"), "subscribe") == []
    assert await sub_of(harness, "alice@localhost", "bob@localhost") == "to"


async def test_declined_request_from_stranger_leaves_no_trace(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await harness.send(alice, "<presence type='subscribe' to='bob@localhost'/>")
    bob.take()
    replies = await harness.send(bob, "<presence type='unsubscribed' to='alice@localhost'/>")
    assert pushed(replies) == []
    assert await roster_of(harness).item("bob@localhost", "alice@localhost") is None
    got = alice.take()
    assert ("unsubscribed", "bob@localhost", "alice@localhost") in presences(got)
    assert pushed(got) == [("bob@localhost", "none", None)]


async def test_probes_at_initial_presence(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b", "<presence><priority>5</priority></presence>")
    bob2 = await login(harness, "bob@localhost/b2", "<presence><show>away</show></presence>")
    await subscribe_both_ways(harness, alice, bob)
    await logout(harness, alice)
    bob.take()
    bob2.take()
    alice = harness.session("alice@localhost/new", available=False)
    got = without_echo(alice, await harness.send(alice, "<presence/>"))
    # the probe answers: the last presence of each of bob's available resources
    answers = {p.get("from"): p for p in got if p.tag == P and p.get("type") is None}
    assert set(answers) == {"bob@localhost/b", "bob@localhost/b2"}
    assert answers["bob@localhost/b"].findtext("{jabber:client}priority") == "5"
    assert answers["bob@localhost/b2"].findtext("{jabber:client}show") == "away"
    assert all(p.get("to") == "alice@localhost/new" for p in answers.values())
    # bob's resources see alice come online once each, and no probe reaches a client
    for session in (bob, bob2):
        assert presences(session.take()) == [(None, "alice@localhost/new", "bob@localhost")]


async def test_probe_from_non_subscriber_is_ignored(harness: ModuleHarness) -> None:
    await login(harness, "bob@localhost/b")
    carol = await login(harness, "carol@localhost/c")
    assert await harness.send(carol, "<presence type='probe' to='bob@localhost'/>") == []
    # a subscribed contact may probe (clients should not, but the answer is the same)
    await roster_of(harness).update(
        "bob@localhost", "carol@localhost", lambda _: RosterItem("x", subscription="from")
    )
    got = await harness.send(carol, "<presence type='probe' to='bob@localhost'/>")
    assert presences(got) == [(None, "bob@localhost/b", "carol@localhost/c")]


ONE, TWO, IDLE = "alice@localhost/one", "alice@localhost/two", "alice@localhost/idle"
END = "the connection ends"
# (who acts, what it does, the presences each of alice's resources then receives, in order)
OWN_PRESENCE = [
    # RFC 6121 4.2.2: initial presence goes to every available resource, the sender
    # included (once), and the new resource gets the presence of the others
    (TWO, "<presence/>", {TWO: [(None, TWO, None), (None, ONE, TWO)], ONE: [(None, TWO, None)]}),
    # a later broadcast: the echo again, the others are not sent again
    (
        TWO,
        "<presence><show>away</show></presence>",
        {TWO: [(None, TWO, None)], ONE: [(None, TWO, None)]},
    ),
    # RFC 6121 4.5.2: unavailable too, to the sender while it is connected
    (
        TWO,
        "<presence type='unavailable'/>",
        {TWO: [("unavailable", TWO, None)], ONE: [("unavailable", TWO, None)]},
    ),
    # one more unavailable is broadcast (and echoed) like the first
    (
        TWO,
        "<presence type='unavailable'/>",
        {TWO: [("unavailable", TWO, None)], ONE: [("unavailable", TWO, None)]},
    ),
    # an unavailable resource (like one that never sent presence) gets the others' no more
    (ONE, "<presence><show>dnd</show></presence>", {ONE: [(None, ONE, None)]}),
    # a connection that ends: the others get the server's unavailable, the gone one nothing
    (TWO, "<presence/>", {TWO: [(None, TWO, None), (None, ONE, TWO)], ONE: [(None, TWO, None)]}),
    (ONE, END, {TWO: [("unavailable", ONE, None)]}),
]


async def test_own_presence_echo_and_other_resources(harness: ModuleHarness) -> None:
    sessions = {
        ONE: await login(harness, ONE, "<presence><show>chat</show></presence>"),
        TWO: harness.session(TWO, available=False),
        IDLE: harness.session(IDLE, available=False),  # bound, never sent presence
    }
    for step, (who, action, expected) in enumerate(OWN_PRESENCE):
        if action == END:
            await harness.end_session(sessions[who])
        else:
            replies = await harness.send(sessions[who], action)
            sessions[who].received.extend(replies)
        for jid, session in sessions.items():
            got = session.take()
            assert presences(got) == expected.get(jid, []), (step, jid)
            if step == 0 and jid == TWO:  # the other resource's last presence, as it sent it
                assert got[1].findtext("{jabber:client}show") == "chat"


async def test_unavailable_on_logout_and_on_dropped_connection(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    # explicit unavailable
    await harness.send(alice, "<presence type='unavailable'><status>bye</status></presence>")
    (gone,) = bob.take()
    assert (gone.get("type"), gone.get("from")) == ("unavailable", "alice@localhost/a")
    assert gone.findtext("{jabber:client}status") == "bye"
    # back, then the connection drops: the server's unavailable reaches bob
    await harness.send(alice, "<presence/>")
    assert presences(bob.take()) == [(None, "alice@localhost/a", "bob@localhost")]
    await logout(harness, alice)
    assert presences(bob.take()) == [("unavailable", "alice@localhost/a", "bob@localhost")]


async def test_directed_presence_gets_unavailable_at_session_end(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    carol = await login(harness, "carol@localhost/c")
    # carol is no contact: directed presence to her bare JID and to bob's full JID
    await harness.send(alice, "<presence to='carol@localhost'><show>chat</show></presence>")
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    assert presences(carol.take()) == [(None, "alice@localhost/a", "carol@localhost")]
    assert presences(bob.take()) == [(None, "alice@localhost/a", "bob@localhost/b")]
    # a broadcast does not reach them (they are not subscribed)
    await harness.send(alice, "<presence><show>away</show></presence>")
    assert carol.take() == [] and bob.take() == []
    # directed unavailable to bob: he is off the list
    await harness.send(alice, "<presence type='unavailable' to='bob@localhost/b'/>")
    assert presences(bob.take()) == [("unavailable", "alice@localhost/a", "bob@localhost/b")]
    await logout(harness, alice)
    assert presences(carol.take()) == [("unavailable", "alice@localhost/a", "carol@localhost")]
    assert bob.take() == []


async def test_directed_presence_from_unavailable_session(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a", available=False)
    carol = await login(harness, "carol@localhost/c")
    await harness.send(alice, "<presence to='carol@localhost'/>")
    assert presences(carol.take()) == [(None, "alice@localhost/a", "carol@localhost")]
    await logout(harness, alice)  # never sent broadcast presence
    assert presences(carol.take()) == [("unavailable", "alice@localhost/a", "carol@localhost")]


async def test_unsubscribe_and_cancel(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    # alice no longer wants bob's presence (3.3): bob gets unsubscribe, alice gets his unavailable
    replies = await harness.send(alice, "<presence type='unsubscribe' to='bob@localhost'/>")
    assert pushed(replies) == [("bob@localhost", "from", None)]
    assert presences(replies) == [("unavailable", "bob@localhost/b", "alice@localhost")]
    got = bob.take()
    assert ("unsubscribe", "alice@localhost", "bob@localhost") in presences(got)
    assert pushed(got) == [("alice@localhost", "to", None)]
    # alice cancels bob's subscription to her (3.2): bob gets her unavailable
    replies = await harness.send(alice, "<presence type='unsubscribed' to='bob@localhost'/>")
    assert pushed(replies) == [("bob@localhost", "none", None)]
    got = bob.take()
    assert ("unsubscribed", "alice@localhost", "bob@localhost") in presences(got)
    assert ("unavailable", "alice@localhost/a", "bob@localhost") in presences(got)
    assert pushed(got) == [("alice@localhost", "none", None)]
    assert await sub_of(harness, "alice@localhost", "bob@localhost") == "none"
    assert await sub_of(harness, "bob@localhost", "alice@localhost") == "none"


async def test_roster_remove_ends_both_subscriptions(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    reply = await harness.iq(
        alice,
        "set",
        f"<query xmlns='{R}'><item jid='bob@localhost' subscription='remove'/></query>",
    )
    assert reply.get("type") == "result"
    assert await roster_of(harness).item("alice@localhost", "bob@localhost") is None
    assert await sub_of(harness, "bob@localhost", "alice@localhost") == "none"
    got = bob.take()
    assert ("unsubscribe", "alice@localhost", "bob@localhost") in presences(got)
    assert ("unsubscribed", "alice@localhost", "bob@localhost") in presences(got)
    assert ("unavailable", "alice@localhost/a", "bob@localhost") in presences(got)


async def test_subscribe_to_missing_or_remote_contacts(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    got = await harness.send(alice, "<presence type='subscribe' to='nobody@localhost'/>")
    # the server answers for the missing account: "unsubscribed" once, and the ask is gone
    assert presences(got).count(("unsubscribed", "nobody@localhost", "alice@localhost")) == 1
    assert pushed(got) == [
        ("nobody@localhost", "none", "subscribe"),
        ("nobody@localhost", "none", None),
    ]
    got = await harness.send(alice, "<presence type='subscribe' to='x@remote.example'/>")
    assert pushed(got) == [("x@remote.example", "none", "subscribe")]
    (error,) = [p for p in got if p.tag == P]
    assert error.get("type") == "error" and error.get("from") == "x@remote.example"
    assert error.find(f"{{jabber:client}}error/{{{STANZAS}}}remote-server-not-found") is not None
    # subscriptions to oneself are ignored
    assert await harness.send(alice, "<presence type='subscribe' to='alice@localhost'/>") == []
    assert await roster_of(harness).item("alice@localhost", "alice@localhost") is None


async def test_full_roster_refuses_new_subscription(harness: ModuleHarness) -> None:
    limited = ModuleHarness({"roster": {"max_items": 1, "max_pending": 1}, "presence": {}})
    limited.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    await limited.start()
    alice = await login(limited, "alice@localhost/a")
    await limited.send(alice, "<presence type='subscribe' to='bob@localhost'/>")
    got = await limited.send(alice, "<presence type='subscribe' to='carol@localhost'/>")
    (error,) = [p for p in got if p.tag == P]
    assert error.get("type") == "error"
    assert error.find(f"{{jabber:client}}error/{{{STANZAS}}}resource-constraint") is not None
    assert await roster_of(limited).item("carol@localhost", "alice@localhost") is None
    # pending requests from strangers are capped too
    carol = limited.session("carol@localhost/c", available=False)
    refused = await limited.send(carol, "<presence type='subscribe' to='bob@localhost'/>")
    bob = await roster_of(limited).get("bob@localhost")
    assert list(bob.items) == ["alice@localhost"]
    # and the requester is told, not left waiting for an answer that never comes
    (error,) = [p for p in refused if p.tag == P]
    assert error.get("type") == "error" and error.get("from") == "bob@localhost"
    assert error.find(f"{{jabber:client}}error/{{{STANZAS}}}resource-constraint") is not None


async def test_account_removal_deletes_roster_and_ends_subscriptions(
    harness: ModuleHarness,
) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    removed: list[tuple[str, str | None]] = []
    roster_of(harness).subscribe_changes(lambda owner, _, jid: removed.append((owner, jid)))
    await harness.host.remove_user_data("localhost", "alice")
    await harness.router.drain()
    assert (await roster_of(harness).get("alice@localhost")).items == {}
    assert ("alice@localhost", "bob@localhost") in removed
    got = bob.take()
    assert ("unsubscribe", "alice@localhost", "bob@localhost") in presences(got)
    assert ("unsubscribed", "alice@localhost", "bob@localhost") in presences(got)
    assert await sub_of(harness, "bob@localhost", "alice@localhost") == "none"


# --- subscription requests kept whole (RFC 6121 3.1.3) -----------------------------------

NICK = "http://jabber.org/protocol/nick"
PARS = "urn:xmpp:pars:0"
REQUEST = (
    "<presence type='subscribe' to='bob@localhost' id='req'>"
    f"<nick xmlns='{NICK}'>Al</nick><preauth xmlns='{PARS}' token='tok'/>"
    "<status>hi bob</status></presence>"
)


async def kept_requests(harness: ModuleHarness, user: str = "bob") -> list[str]:
    page = await harness.host.items("localhost", "subscription-requests").query(prefix=f"{user}/")
    return [str(item.attrs["jid"]) for item in page.items]


def request_of(stanzas: Sequence[etree._Element]) -> etree._Element:
    (request,) = [s for s in stanzas if s.tag == P and s.get("type") == "subscribe"]
    return request


async def test_request_for_an_offline_user_comes_whole_to_each_resource(
    harness: ModuleHarness,
) -> None:
    alice = await login(harness, "alice@localhost/a")
    await harness.send(alice, REQUEST)
    assert await kept_requests(harness) == ["alice@localhost"]
    for resource in ("phone", "laptop"):  # every initial presence, until answered
        bob = await login(harness, f"bob@localhost/{resource}")
        request = request_of(bob.take())
        assert (request.get("from"), request.get("to")) == ("alice@localhost", "bob@localhost")
        assert request.get("id") == "req"
        assert request.findtext(f"{{{NICK}}}nick") == "Al"
        assert request.find(f"{{{PARS}}}preauth").get("token") == "tok"  # type: ignore[union-attr]
        assert request.findtext("{jabber:client}status") == "hi bob"


async def test_request_to_an_online_user_is_kept_for_its_next_resources(
    harness: ModuleHarness,
) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/phone")
    await harness.send(alice, REQUEST)
    assert request_of(bob.take()).findtext(f"{{{NICK}}}nick") == "Al"
    laptop = await login(harness, "bob@localhost/laptop")
    assert request_of(laptop.take()).findtext(f"{{{NICK}}}nick") == "Al"


async def test_a_request_too_large_to_keep_comes_as_a_plain_one(harness: ModuleHarness) -> None:
    alice = await login(harness, "alice@localhost/a")
    big = REQUEST.replace("hi bob", "x" * 5000)
    await harness.send(alice, big)
    assert await kept_requests(harness) == []
    bob = await login(harness, "bob@localhost/b")
    request = request_of(bob.take())
    assert (request.get("from"), len(request)) == ("alice@localhost", 0)


async def answer_approve(harness: ModuleHarness, alice: TestSession, bob: TestSession) -> None:
    await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")


async def answer_deny(harness: ModuleHarness, alice: TestSession, bob: TestSession) -> None:
    await harness.send(bob, "<presence type='unsubscribed' to='alice@localhost'/>")


async def answer_cancel(harness: ModuleHarness, alice: TestSession, bob: TestSession) -> None:
    await harness.send(alice, "<presence type='unsubscribe' to='bob@localhost'/>")


async def answer_roster_remove(
    harness: ModuleHarness, alice: TestSession, bob: TestSession
) -> None:
    # bob first puts alice in his roster (a roster set), then removes her
    item = "<item jid='alice@localhost' name='Al'/>"
    await harness.iq(bob, "set", f"<query xmlns='{R}'>{item}</query>")
    remove = "<item jid='alice@localhost' subscription='remove'/>"
    await harness.iq(bob, "set", f"<query xmlns='{R}'>{remove}</query>")


async def answer_account_removed(
    harness: ModuleHarness, alice: TestSession, bob: TestSession
) -> None:
    await harness.host.remove_user_data("localhost", "bob")
    await harness.router.drain()


async def answer_requester_removed(
    harness: ModuleHarness, alice: TestSession, bob: TestSession
) -> None:
    await harness.host.remove_user_data("localhost", "alice")  # her roster cancels it
    await harness.router.drain()


@pytest.mark.parametrize("known", [False, True], ids=["stranger", "in-roster"])
@pytest.mark.parametrize(
    "answer",
    [
        answer_approve,
        answer_deny,
        answer_cancel,
        answer_roster_remove,
        answer_account_removed,
        answer_requester_removed,
    ],
)
async def test_a_kept_request_goes_when_answered(
    harness: ModuleHarness,
    answer: Callable[[ModuleHarness, TestSession, TestSession], Awaitable[None]],
    known: bool,
) -> None:
    alice = await login(harness, "alice@localhost/a")
    bob = harness.session("bob@localhost/b", available=False)
    if known:  # bob has alice in his roster already: the entry outlives the request
        await harness.iq(bob, "set", f"<query xmlns='{R}'><item jid='alice@localhost'/></query>")
    await harness.send(alice, REQUEST)
    assert await kept_requests(harness) == ["alice@localhost"]
    await answer(harness, alice, bob)
    await harness.router.drain()
    assert await kept_requests(harness) == []
    again = await login(harness, "bob@localhost/again")
    assert presences(again.take(), "subscribe") == []


# --- a remote domain that cannot be reached (RFC 6120 10.4.3) -----------------------------


async def test_subscription_to_a_remote_domain_is_answered_before_any_presence(
    harness: ModuleHarness,
) -> None:
    """The error comes back to the account's bare JID (the request was stamped with it):
    it reaches a client that has sent no presence yet, as conformance scripts do."""
    alice = harness.session("alice@localhost/a", available=False)
    for kind in ("subscribe", "unsubscribe"):
        got = await harness.send(alice, f"<presence type='{kind}' to='x@remote.example'/>")
        (error,) = [p for p in got if p.tag == P]
        assert error.get("type") == "error" and error.get("to") == "alice@localhost"
        assert (
            error.find(f"{{jabber:client}}error/{{{STANZAS}}}remote-server-not-found") is not None
        )


async def test_broadcast_to_remote_contacts_is_reported_once_by_the_probe(
    harness: ModuleHarness,
) -> None:
    for contact, sub in (("x@remote.example", "both"), ("y@remote.example", "from")):
        await roster_of(harness).update(
            "alice@localhost", contact, lambda _, sub=sub: RosterItem("", subscription=sub)
        )
    alice = harness.session("alice@localhost/a", available=False)
    got = without_echo(alice, await harness.send(alice, "<presence/>"))
    # x: the probe bounces; y only gets alice's presence, which reports nothing
    assert presences(got) == [("error", "x@remote.example", "alice@localhost/a")]
    for xml in ("<presence><show>away</show></presence>", "<presence type='unavailable'/>"):
        assert without_echo(alice, await harness.send(alice, xml)) == []


class RosterReadsFail(MemoryItemBackend):
    """Roster reads fail `failures` times (a storage outage), then work again."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    async def get(self, namespace: str, name: str) -> Item | None:
        if self.failures and "roster" in namespace:
            self.failures -= 1
            raise StorageError("memory", "get", "disk on fire")
        return await super().get(namespace, name)


async def test_a_storage_outage_delays_the_unavailable_but_does_not_lose_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The roster the unavailable broadcast goes by cannot be read when alice leaves:
    read again until it can, or bob sees her online until her next login."""
    monkeypatch.setattr(presence_module, "ROSTER_RETRY", (0.01, 0.01, 0.01))
    harness = ModuleHarness({"roster": {}, "presence": {}})
    items = RosterReadsFail()
    harness.storage.items = items
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    items.failures = 2
    await harness.send(alice, "<presence type='unavailable'/>")
    await harness.router.drain()
    assert ("unavailable", "alice@localhost/a", "bob@localhost") in presences(bob.take())
    assert items.failures == 0


async def test_a_sender_of_many_subscription_requests_is_slowed(tmp_path: Path) -> None:
    """A client sends 200 subscription requests while the roster store is slow: the
    router stops reading it once WORK_PER_SENDER of them are in flight instead of
    holding a task per request; then every request is written and sent."""
    items = await GatedSQLite.open(tmp_path / "items.sqlite3")
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    harness = ModuleHarness({"roster": {}, "presence": {}})
    harness.storage = harness.host.storage = storage
    contacts = [f"c{n}@localhost" for n in range(200)]
    harness.users.update(contacts)
    await harness.start()
    alice = harness.session("alice@localhost/a")
    for contact in contacts:
        stanza = parse_stanza(f"<presence type='subscribe' to='{contact}'/>")
        stanza.set("from", alice.jid)
        alice.receive(stanza)
    for _ in range(50):
        await asyncio.sleep(0)
    assert alice.input_holds == 1  # the connection is not read while the store is slow
    # the requests in flight, the session's pipeline and the request it waits for
    assert len(harness.router.account_work("alice@localhost")) <= WORK_PER_SENDER + 2
    idle = asyncio.Event()
    alice.when_idle(idle.set)
    items.gate.set()
    await idle.wait()
    await harness.router.drain()
    assert alice.input_holds == 0
    for contact in contacts:
        item = await roster_of(harness).item("alice@localhost", contact)
        assert item is not None and item.ask, contact  # written: the request is pending
    await storage.close()


class FirstRosterReadAnswersLate(MemoryItemBackend):
    """Once armed, the next roster read reads at once and answers when the test opens
    the gate: a read that began before a write and returns after it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.held = asyncio.Event()
        self.gate = asyncio.Event()

    async def get(self, namespace: str, name: str) -> Item | None:
        found = await super().get(namespace, name)
        if self.armed and "roster" in namespace:
            self.armed = False
            self.held.set()
            await self.gate.wait()
        return found


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition()` holds (the test's timeout bounds it)."""
    while not condition():  # noqa: ASYNC110 - nothing signals a delivery
        await asyncio.sleep(0)


async def late_read_harness() -> tuple[ModuleHarness, FirstRosterReadAnswersLate]:
    harness = ModuleHarness({"roster": {}, "presence": {}})
    items = FirstRosterReadAnswersLate()
    harness.storage.items = items
    harness.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    await harness.start()
    return harness, items


def sent_by(session: TestSession, stanza: str) -> None:
    """`stanza` from `session`, without waiting for what it sets off."""
    element = parse_stanza(stanza)
    element.set("from", session.jid)
    session.receive(element)


async def test_a_broadcast_never_reaches_a_contact_after_its_cancellation() -> None:
    """alice's new presence reads her roster (bob subscribed), she cancels bob's
    subscription, the read answers: bob must not get her presence after the
    unavailable the cancellation sent him (RFC 6121 3.2.2, 4.4.2); carol still does."""
    harness, items = await late_read_harness()
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    carol = await login(harness, "carol@localhost/c")
    await subscribe_both_ways(harness, alice, bob)
    await subscribe_both_ways(harness, alice, carol)
    items.armed = True
    sent_by(alice, "<presence><show>away</show></presence>")
    await items.held.wait()
    sent_by(alice, "<presence type='unsubscribed' to='bob@localhost'/>")
    await until(lambda: ("unavailable", "alice@localhost/a", "bob@localhost")
                in presences(bob.received))
    items.gate.set()
    await harness.router.drain()
    got = presences(bob.take())
    assert ("unsubscribed", "alice@localhost", "bob@localhost") in got
    assert [p for p in got if p[1] == alice.jid][-1][0] == "unavailable", got
    assert presences(carol.take()) == [(None, alice.jid, "carol@localhost")]


async def test_a_probe_is_not_answered_after_a_cancellation() -> None:
    """bob probes alice, her roster is read (bob subscribed), she cancels his
    subscription, the read answers: no presence of hers after that unavailable."""
    harness, items = await late_read_harness()
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    items.armed = True
    sent_by(bob, "<presence type='probe' to='alice@localhost'/>")
    await items.held.wait()
    sent_by(alice, "<presence type='unsubscribed' to='bob@localhost'/>")
    await until(lambda: ("unavailable", "alice@localhost/a", "bob@localhost")
                in presences(bob.received))
    items.gate.set()
    await harness.router.drain()
    got = presences(bob.take())
    assert [p for p in got if p[1] == alice.jid][-1][0] == "unavailable", got


async def test_a_request_answered_by_the_server_brings_the_presence(
    harness: ModuleHarness,
) -> None:
    """bob already lets alice see his presence, her server lost that (her item is
    "from"): her new request is answered "subscribed" by bob's server (RFC 6121
    3.1.3), and his presence comes with it, as after an approval (3.1.5)."""
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    await subscribe_both_ways(harness, alice, bob)
    await roster_of(harness).update(
        "alice@localhost", "bob@localhost", lambda _: RosterItem("", subscription="from")
    )
    alice.take()
    got = presences(await harness.send(alice, "<presence type='subscribe' to='bob@localhost'/>"))
    assert ("subscribed", "bob@localhost", "alice@localhost") in got
    assert (None, "bob@localhost/b", "alice@localhost") in got
    assert presences(bob.take()) == []  # no request to answer


async def test_a_remote_request_answered_by_the_server_brings_the_presence(
    harness: ModuleHarness,
) -> None:
    remote = harness.router.remote = RecordingRemote()
    await roster_of(harness).update(
        "bob@localhost", "x@remote.example", lambda _: RosterItem("", subscription="both")
    )
    await login(harness, "bob@localhost/b")
    remote.take("x@remote.example")
    stanza = parse_stanza("<presence type='subscribe' to='bob@localhost'/>")
    stanza.set("from", "x@remote.example/r")
    harness.router.route(stanza)
    await harness.router.drain()
    assert remote.take("x@remote.example") == [
        ("bob@localhost", "subscribed"), ("bob@localhost/b", None)
    ]


def in_order(stanzas: Sequence[etree._Element]) -> list[tuple[str, str | None, str | None]]:
    """Each presence as ("presence", type, from) and each roster push as ("push", jid,
    subscription), in the order they came."""
    order: list[tuple[str, str | None, str | None]] = []
    for stanza in stanzas:
        if stanza.tag == P:
            order.append(("presence", stanza.get("type"), stanza.get("from")))
        order.extend(("push", jid, sub) for jid, sub, _ in pushed([stanza]))
    return order


@pytest.mark.parametrize("pre_approved", [False, True])
async def test_a_local_approval_comes_before_the_contacts_presence(
    harness: ModuleHarness, pre_approved: bool
) -> None:
    """RFC 6121 3.1.5/3.1.6: alice gets bob's "subscribed" and the push before bob's
    presence (once), whether bob approves her request or had pre-approved it."""
    alice = await login(harness, "alice@localhost/a")
    bob = await login(harness, "bob@localhost/b")
    if pre_approved:
        await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")
        got = await harness.send(alice, "<presence type='subscribe' to='bob@localhost'/>")
    else:
        await harness.send(alice, "<presence type='subscribe' to='bob@localhost'/>")
        alice.take()
        await harness.send(bob, "<presence type='subscribed' to='alice@localhost'/>")
        got = alice.take()
    order = in_order(got)
    assert order.count(("presence", None, "bob@localhost/b")) == 1
    presence = order.index(("presence", None, "bob@localhost/b"))
    assert order.index(("presence", "subscribed", "bob@localhost")) < presence, order
    assert order.index(("push", "bob@localhost", "to")) < presence, order


async def test_a_remote_contact_gets_the_presence_right_after_the_approval(
    harness: ModuleHarness,
) -> None:
    """A remote contact's server has its own order: the presence follows at once."""
    remote = harness.router.remote = RecordingRemote()
    stanza = parse_stanza("<presence type='subscribe' to='alice@localhost'/>")
    stanza.set("from", "x@remote.example/r")
    harness.router.route(stanza)
    await harness.router.drain()
    alice = await login(harness, "alice@localhost/a")
    remote.take("x@remote.example")
    await harness.send(alice, "<presence type='subscribed' to='x@remote.example'/>")
    assert remote.take("x@remote.example") == [
        ("alice@localhost", "subscribed"), ("alice@localhost/a", None)
    ]
