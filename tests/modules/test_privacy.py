"""Privacy lists (XEP-0016) through the module host, without sockets."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from xmppd.jid import JID
from xmppd.modules._privacy_engine import (
    EFFECTS_SLICE,
    KINDS,
    IndexedList,
    PrivacyEngine,
    PrivacyItem,
    RosterEntry,
    check_list,
    make_item,
)
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Attrs, ConditionFailed, Item, ItemBackend
from xmppd.testing import (
    ModuleHarness,
    RecordingRemote,
    TestSession,
    parse_stanza,
    without_echo,
)

PRIVACY = "jabber:iq:privacy"
BLOCKING = "urn:xmpp:blocking"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
P = f"{{{PRIVACY}}}"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def chat(to: str, body: str = "hi") -> str:
    return f"<message to='{to}' type='chat' id='m1'><body>{body}</body></message>"


def bodies(stanzas: list[etree._Element]) -> list[str | None]:
    return [s.findtext("{jabber:client}body") for s in stanzas if s.get("type") != "error"]


def presences(stanzas: list[etree._Element]) -> list[tuple[str | None, str | None]]:
    return [(s.get("from"), s.get("type")) for s in stanzas if s.tag == "{jabber:client}presence"]


def list_pushes(stanzas: list[etree._Element]) -> list[str | None]:
    return [
        lst.get("name")
        for s in stanzas
        if s.tag == "{jabber:client}iq" and s.get("type") == "set"
        for lst in s.iterfind(f"{P}query/{P}list")
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


async def privacy(
    harness: ModuleHarness, session: TestSession, type_: str, inner: str = ""
) -> etree._Element:
    return await iq(harness, session, type_, f"<query xmlns='{PRIVACY}'>{inner}</query>")


async def set_list(
    harness: ModuleHarness, session: TestSession, name: str, items: str
) -> etree._Element:
    return await privacy(harness, session, "set", f"<list name='{name}'>{items}</list>")


def ok(reply: etree._Element) -> None:
    assert reply.get("type") == "result", etree.tostring(reply)


async def make(**modules: Any) -> ModuleHarness:
    harness = ModuleHarness({"disco": {}, "privacy": {}, **modules})
    harness.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    return await harness.start()


@pytest.fixture
async def harness() -> ModuleHarness:
    return await make()


def summary(reply: etree._Element) -> dict[str, Any]:
    query = reply.find(f"{P}query")
    assert query is not None, etree.tostring(reply)
    return {
        "active": [e.get("name") for e in query.iterfind(f"{P}active")],
        "default": [e.get("name") for e in query.iterfind(f"{P}default")],
        "lists": [e.get("name") for e in query.iterfind(f"{P}list")],
    }


# --- the protocol ----------------------------------------------------------------------------


async def test_create_get_edit_remove_with_pushes(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/b", available=False)
    assert summary(await privacy(harness, alice, "get")) == {
        "active": [],
        "default": [],
        "lists": [],
    }
    items = (
        "<item type='jid' value='Tybalt@Example.com' action='deny' order='3'>"
        "<presence-out/><message/></item>"
        "<item type='subscription' value='both' action='allow' order='1'/>"
        "<item action='deny' order='10'><iq/><presence-in/></item>"
    )
    ok(await set_list(harness, alice, "public", items))
    assert list_pushes(alice.take()) == ["public"]
    assert list_pushes(other.take()) == ["public"]

    reply = await privacy(harness, alice, "get", "<list name='public'/>")
    (lst,) = reply.iterfind(f"{P}query/{P}list")
    assert lst.get("name") == "public"
    got = [
        (dict(i.attrib), [etree.QName(c).localname for c in i]) for i in lst.iterfind(f"{P}item")
    ]
    assert got == [  # in processing order, JIDs normalized, kinds in schema order
        ({"type": "subscription", "value": "both", "action": "allow", "order": "1"}, []),
        (
            {"type": "jid", "value": "tybalt@example.com", "action": "deny", "order": "3"},
            ["message", "presence-out"],
        ),
        ({"action": "deny", "order": "10"}, ["iq", "presence-in"]),
    ]

    ok(await set_list(harness, alice, "private", "<item action='deny' order='1'/>"))
    ok(await privacy(harness, alice, "set", "<default name='public'/>"))
    ok(await privacy(harness, alice, "set", "<active name='private'/>"))
    assert summary(await privacy(harness, alice, "get")) == {
        "active": ["private"],
        "default": ["public"],
        "lists": ["public", "private"],
    }
    # the active list is per session
    assert summary(await privacy(harness, other, "get"))["active"] == []

    # replace a list (not a delta)
    other.take()
    ok(await set_list(harness, alice, "public", "<item action='allow' order='5'/>"))
    assert list_pushes(other.take()) == ["public"]
    reply = await privacy(harness, alice, "get", "<list name='public'/>")
    assert len(list(reply.iter(f"{P}item"))) == 1

    # remove a list (the sender's own active list may go) and push it
    ok(await set_list(harness, alice, "private", ""))
    assert list_pushes(other.take()) == ["private"]
    assert summary(await privacy(harness, alice, "get")) == {
        "active": [],
        "default": ["public"],
        "lists": ["public"],
    }
    reply = await privacy(harness, alice, "get", "<list name='private'/>")
    assert condition(reply) == "item-not-found"


async def test_decline_active_and_default(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await set_list(harness, alice, "l", "<item action='deny' order='1'><message/></item>")
    ok(await privacy(harness, alice, "set", "<active name='l'/>"))
    ok(await privacy(harness, alice, "set", "<default name='l'/>"))
    ok(await privacy(harness, alice, "set", "<active/>"))
    ok(await privacy(harness, alice, "set", "<default/>"))
    assert summary(await privacy(harness, alice, "get")) == {
        "active": [],
        "default": [],
        "lists": ["l"],
    }
    # removing the default list also clears the default
    await privacy(harness, alice, "set", "<default name='l'/>")
    ok(await set_list(harness, alice, "l", ""))
    assert summary(await privacy(harness, alice, "get"))["default"] == []


BAD_ITEMS = [
    "<item type='jid' value='a@b' order='1'/>",  # no action
    "<item type='jid' value='a@b' action='block' order='1'/>",
    "<item type='jid' value='a@b' action='deny'/>",  # no order
    "<item type='jid' value='a@b' action='deny' order='-1'/>",
    "<item type='jid' value='a@b' action='deny' order='x'/>",
    "<item type='jid' value='a@b' action='deny' order='4294967296'/>",
    "<item type='jid' action='deny' order='1'/>",  # no value
    "<item type='jid' value='a@b@c' action='deny' order='1'/>",
    "<item type='subscription' value='pending' action='deny' order='1'/>",
    "<item type='group' value='' action='deny' order='1'/>",
    "<item type='role' value='x' action='deny' order='1'/>",
    "<item value='a@b' action='deny' order='1'/>",  # value without type
    "<item action='deny' order='1'><presence/></item>",  # unknown kind
    "<item action='deny' order='1'><message xmlns='urn:other'/></item>",
    "<item action='allow' order='1'/><item action='deny' order='1'/>",  # duplicate order
    "<entry action='deny' order='1'/>",
]


@pytest.mark.parametrize("items", BAD_ITEMS)
async def test_malformed_list_is_bad_request_and_changes_nothing(
    harness: ModuleHarness, items: str
) -> None:
    alice = harness.session("alice@localhost/a")
    ok(await set_list(harness, alice, "l", "<item action='allow' order='7'/>"))
    alice.take()
    assert condition(await set_list(harness, alice, "l", items)) == "bad-request"
    assert list_pushes(alice.take()) == []
    reply = await privacy(harness, alice, "get", "<list name='l'/>")
    assert [i.get("order") for i in reply.iter(f"{P}item")] == ["7"]


@pytest.mark.parametrize(
    ("type_", "inner", "expected"),
    [
        ("get", "<list name='a'/><list name='b'/>", "bad-request"),
        ("get", "<list/>", "bad-request"),
        ("get", "<active/>", "bad-request"),
        ("get", "<list name='missing'/>", "item-not-found"),
        ("set", "", "bad-request"),
        ("set", "<active name='l'/><default name='l'/>", "bad-request"),
        ("set", "<list name='a'/><list name='b'/>", "bad-request"),
        ("set", "<list/>", "bad-request"),
        ("set", "<frob/>", "bad-request"),
        ("set", "<active name=''/>", "bad-request"),
        ("set", "<active name='missing'/>", "item-not-found"),
        ("set", "<default name='missing'/>", "item-not-found"),
        ("set", "<list name='missing'/>", "item-not-found"),  # removing what is not there
    ],
)
async def test_request_errors(
    harness: ModuleHarness, type_: str, inner: str, expected: str
) -> None:
    alice = harness.session("alice@localhost/a")
    await set_list(harness, alice, "l", "<item action='allow' order='1'/>")
    await privacy(harness, alice, "set", "<default name='l'/>")
    alice.take()
    assert condition(await privacy(harness, alice, type_, inner)) == expected
    assert list_pushes(alice.take()) == []
    assert summary(await privacy(harness, alice, "get")) == {
        "active": [],
        "default": ["l"],
        "lists": ["l"],
    }


async def test_wrong_payload_element_is_bad_request(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await iq(harness, alice, "get", f"<list xmlns='{PRIVACY}' name='x'/>")
    assert condition(reply) == "bad-request"


async def test_other_accounts_lists_are_not_reachable(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await set_list(harness, alice, "l", "<item action='deny' order='1'/>")
    for type_, inner in (("get", ""), ("get", "<list name='l'/>"), ("set", "<list name='l'/>")):
        reply = await iq(
            harness, bob, type_, f"<query xmlns='{PRIVACY}'>{inner}</query>", to="alice@localhost"
        )
        assert condition(reply) == "service-unavailable"
    assert summary(await privacy(harness, alice, "get"))["lists"] == ["l"]


async def test_limits() -> None:
    harness = await make(privacy={"max_lists": 2, "max_items": 2})
    alice = harness.session("alice@localhost/a")
    ok(await set_list(harness, alice, "a", "<item action='allow' order='1'/>"))
    ok(await set_list(harness, alice, "b", "<item action='allow' order='1'/>"))
    reply = await set_list(harness, alice, "c", "<item action='allow' order='1'/>")
    assert condition(reply) == "policy-violation"
    ok(await set_list(harness, alice, "b", "<item action='deny' order='1'/>"))  # an edit
    three = "".join(f"<item action='allow' order='{i}'/>" for i in range(3))
    assert condition(await set_list(harness, alice, "a", three)) == "policy-violation"
    assert summary(await privacy(harness, alice, "get"))["lists"] == ["a", "b"]


# --- conflicts (XEP-0016 2.2 rule 11, 2.5, 2.8) --------------------------------------------


async def test_conflicts_with_other_resources(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/b")
    await set_list(harness, alice, "one", "<item action='allow' order='1'/>")
    await set_list(harness, alice, "two", "<item action='allow' order='1'/>")
    await privacy(harness, alice, "set", "<default name='one'/>")

    # other uses the default list: it may be neither changed, declined nor removed
    assert condition(await privacy(harness, alice, "set", "<default name='two'/>")) == "conflict"
    assert condition(await privacy(harness, alice, "set", "<default/>")) == "conflict"
    assert condition(await set_list(harness, alice, "one", "")) == "conflict"
    ok(await privacy(harness, alice, "set", "<default name='one'/>"))  # no change: fine
    # a list active for another resource may not be removed; editing is fine
    ok(await privacy(harness, other, "set", "<active name='two'/>"))
    assert condition(await set_list(harness, alice, "two", "")) == "conflict"
    ok(await set_list(harness, alice, "two", "<item action='deny' order='2'/>"))
    # now nobody else uses the default: alice may change it
    ok(await privacy(harness, alice, "set", "<default name='two'/>"))
    ok(await set_list(harness, alice, "one", ""))  # and remove the old one
    assert summary(await privacy(harness, alice, "get")) == {
        "active": [],
        "default": ["two"],
        "lists": ["two"],
    }
    # when the other resource goes away, its active list is free
    harness.router.unbind(other)  # type: ignore[arg-type]
    await harness.host.fire("session/closed", other)
    ok(await set_list(harness, alice, "two", ""))


# --- enforcement -----------------------------------------------------------------------------


async def test_message_items_deny_messages_only(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await set_list(
        harness,
        alice,
        "l",
        "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>",
    )
    await privacy(harness, alice, "set", "<active name='l'/>")
    alice.take()
    replies = await harness.send(bob, chat("alice@localhost/a"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert alice.take() == []
    replies = await harness.send(
        bob, "<iq type='get' id='p' to='alice@localhost/a'><ping xmlns='urn:xmpp:ping'/></iq>"
    )
    assert replies == [] and len(alice.take()) == 1
    # message-only items do not cover what alice sends
    assert await harness.send(alice, chat("bob@localhost", "out")) == []
    assert bodies(bob.take()) == ["out"]


async def test_iq_items_deny_iq_get_set_with_error_and_results_silently(
    harness: ModuleHarness,
) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await set_list(harness, alice, "l", "<item action='deny' order='1'><iq/></item>")
    await privacy(harness, alice, "set", "<active name='l'/>")
    alice.take()
    replies = await harness.send(
        bob, "<iq type='set' id='p' to='alice@localhost/a'><x xmlns='urn:x'/></iq>"
    )
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert await harness.send(bob, "<iq type='result' id='r' to='alice@localhost/a'/>") == []
    assert alice.take() == []
    assert await harness.send(bob, chat("alice@localhost/a", "msg")) == []
    assert bodies(alice.take()) == ["msg"]


async def test_presence_in_and_out_items(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await set_list(
        harness,
        alice,
        "l",
        "<item type='jid' value='bob@localhost' action='deny' order='1'><presence-in/></item>"
        "<item type='jid' value='carol@localhost' action='deny' order='2'><presence-out/></item>",
    )
    await privacy(harness, alice, "set", "<active name='l'/>")
    carol = harness.session("carol@localhost/c")
    alice.take()
    # presence-in: bob's presence never arrives, without an error to bob
    assert await harness.send(bob, "<presence to='alice@localhost/a'/>") == []
    assert presences(alice.take()) == []
    # presence-in covers notifications only: subscription requests still come
    assert await harness.send(bob, "<presence type='subscribe' to='alice@localhost'/>") == []
    assert presences(alice.take()) == [("bob@localhost/b", "subscribe")]
    # presence-out: alice's directed presence to carol is refused, without <blocked/>
    replies = await harness.send(alice, "<presence to='carol@localhost'/>")
    assert [condition(r) for r in replies] == ["not-acceptable"]
    assert replies[0].find("{jabber:client}error/{urn:xmpp:blocking:errors}blocked") is None
    assert presences(carol.take()) == []
    # carol's presence to alice and alice's to bob are fine
    assert await harness.send(carol, "<presence to='alice@localhost/a'/>") == []
    assert presences(alice.take()) == [("carol@localhost/c", None)]
    assert await harness.send(alice, "<presence to='bob@localhost'/>") == []
    assert presences(bob.take()) == [("alice@localhost/a", None)]


async def test_item_without_kinds_blocks_everything_both_ways(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await set_list(
        harness, alice, "l", "<item type='jid' value='bob@localhost' action='deny' order='1'/>"
    )
    await privacy(harness, alice, "set", "<active name='l'/>")
    alice.take()
    assert await harness.send(bob, "<presence type='subscribe' to='alice@localhost'/>") == []
    assert [condition(r) for r in await harness.send(bob, chat("alice@localhost/a"))] == [
        "service-unavailable"
    ]
    assert alice.take() == []
    for stanza in (
        chat("bob@localhost"),
        "<iq type='get' id='q' to='bob@localhost/b'><ping xmlns='urn:xmpp:ping'/></iq>",
        "<presence type='subscribe' to='bob@localhost'/>",
    ):
        replies = await harness.send(alice, stanza)
        assert [condition(r) for r in replies] == ["not-acceptable"], stanza
    assert bob.take() == []


async def test_order_and_fall_through(harness: ModuleHarness) -> None:
    """Items apply in ascending order; the first match decides; no match: allowed."""
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    carol = harness.session("carol@localhost/c")
    dave = harness.session("dave@localhost/d")
    await set_list(
        harness,
        alice,
        "l",
        "<item action='deny' order='20'><message/></item>"
        "<item type='jid' value='bob@localhost' action='allow' order='10'><message/></item>",
    )
    await set_list(
        harness,
        alice,
        "m",
        "<item type='jid' value='carol@localhost' action='deny' order='1'><message/></item>",
    )
    await privacy(harness, alice, "set", "<active name='l'/>")
    alice.take()
    await harness.send(bob, chat("alice@localhost/a", "bob"))
    assert [condition(r) for r in await harness.send(carol, chat("alice@localhost/a"))] == [
        "service-unavailable"
    ]
    assert bodies(alice.take()) == ["bob"]
    await privacy(harness, alice, "set", "<active name='m'/>")
    alice.take()
    await harness.send(dave, chat("alice@localhost/a", "dave"))  # falls through: allowed
    assert bodies(alice.take()) == ["dave"]


async def test_active_list_replaces_default_for_that_session_only(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/b")
    bob = harness.session("bob@localhost/b")
    await set_list(harness, alice, "strict", "<item action='deny' order='1'><message/></item>")
    await set_list(harness, alice, "open", "<item action='allow' order='1'/>")
    await privacy(harness, alice, "set", "<default name='strict'/>")
    await privacy(harness, alice, "set", "<active name='open'/>")
    alice.take(), other.take()
    await harness.send(bob, chat("alice@localhost/a", "to a"))
    replies = await harness.send(bob, chat("alice@localhost/b", "to b"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert bodies(alice.take()) == ["to a"] and other.take() == []
    # an edit of the active list applies at once
    await set_list(harness, alice, "open", "<item action='deny' order='1'><message/></item>")
    alice.take()
    replies = await harness.send(bob, chat("alice@localhost/a", "again"))
    assert [condition(r) for r in replies] == ["service-unavailable"]


async def test_own_resources_and_server_are_never_blocked(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/b")
    await set_list(harness, alice, "all", "<item action='deny' order='1'/>")
    await privacy(harness, alice, "set", "<default name='all'/>")
    alice.take(), other.take()
    assert await harness.send(other, chat("alice@localhost/a", "mine")) == []
    assert bodies(alice.take()) == ["mine"]
    reply = await iq(
        harness, alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", "localhost"
    )
    assert reply.get("type") == "result"
    # and the lists stay manageable (results come from the user's own account)
    ok(await privacy(harness, alice, "get"))


async def test_blocklist_applies_whatever_the_active_list_says() -> None:
    harness = await make(blocking={})
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await set_list(harness, alice, "open", "<item action='allow' order='1'/>")
    await privacy(harness, alice, "set", "<active name='open'/>")
    await iq(
        harness, alice, "set", f"<block xmlns='{BLOCKING}'><item jid='bob@localhost'/></block>"
    )
    alice.take()
    replies = await harness.send(bob, chat("alice@localhost/a"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    replies = await harness.send(alice, chat("bob@localhost"))
    assert [condition(r) for r in replies] == ["not-acceptable"]
    assert replies[0].find("{jabber:client}error/{urn:xmpp:blocking:errors}blocked") is not None
    # the blocklist is not shown as a privacy list
    assert summary(await privacy(harness, alice, "get"))["lists"] == ["open"]


async def test_default_list_keeps_denied_messages_out_of_offline_storage() -> None:
    harness = await make(offline={})
    alice = harness.session("alice@localhost/a")
    await set_list(
        harness,
        alice,
        "l",
        "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>",
    )
    await privacy(harness, alice, "set", "<default name='l'/>")
    harness.router.unbind(alice)  # type: ignore[arg-type]
    await harness.host.fire("session/closed", alice)
    bob = harness.session("bob@localhost/b")
    carol = harness.session("carol@localhost/c")
    replies = await harness.send(bob, chat("alice@localhost", "denied"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert await harness.send(carol, chat("alice@localhost", "kept")) == []
    alice = harness.session("alice@localhost/back", available=False)
    assert bodies(without_echo(alice, await harness.send(alice, "<presence/>"))) == ["kept"]


# --- roster-based items (the real roster module) ------------------------------------------


async def roster_harness(**modules: Any) -> tuple[ModuleHarness, RosterModule]:
    harness = await make(roster={}, **modules)
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    return harness, roster


async def put_contact(
    roster: RosterModule, owner: str, contact: str, subscription: str, *groups: str
) -> None:
    await roster.update(
        owner,
        contact,
        lambda _: RosterItem(jid=contact, subscription=subscription, groups=list(groups)),  # type: ignore[arg-type]
    )


async def test_group_items_follow_roster_changes() -> None:
    harness, roster = await roster_harness()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    carol = harness.session("carol@localhost/c")
    await put_contact(roster, "alice@localhost", "bob@localhost", "none", "Enemies")
    await put_contact(roster, "alice@localhost", "carol@localhost", "none", "Friends")
    # a group that is not in the roster: item-not-found, nothing stored
    reply = await set_list(
        harness, alice, "g", "<item type='group' value='Nobody' action='deny' order='1'/>"
    )
    assert condition(reply) == "item-not-found"
    ok(
        await set_list(
            harness,
            alice,
            "g",
            "<item type='group' value='Enemies' action='deny' order='1'><message/></item>",
        )
    )
    ok(await privacy(harness, alice, "set", "<active name='g'/>"))
    alice.take()
    replies = await harness.send(bob, chat("alice@localhost/a", "bob"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    await harness.send(carol, chat("alice@localhost/a", "carol"))
    assert bodies(alice.take()) == ["carol"]
    # bob leaves the group, carol joins it: the list follows at once
    await put_contact(roster, "alice@localhost", "bob@localhost", "none", "Friends")
    await put_contact(roster, "alice@localhost", "carol@localhost", "none", "Enemies")
    await harness.send(bob, chat("alice@localhost/a", "bob again"))
    replies = await harness.send(carol, chat("alice@localhost/a", "carol again"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert bodies(alice.take()) == ["bob again"]
    # removed from the roster: in no group
    await roster.update("alice@localhost", "carol@localhost", lambda _: None)
    await harness.send(carol, chat("alice@localhost/a", "carol gone"))
    assert bodies(alice.take()) == ["carol gone"]


async def test_subscription_items() -> None:
    """ "none" also covers JIDs not in the roster at all (the heuristic of XEP-0016 2.15)."""
    harness, roster = await roster_harness()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    stranger = harness.session("stranger@localhost/s")
    await put_contact(roster, "alice@localhost", "bob@localhost", "both")
    await set_list(
        harness, alice, "h", "<item type='subscription' value='none' action='deny' order='437'/>"
    )
    await privacy(harness, alice, "set", "<default name='h'/>")
    alice.take()
    await harness.send(bob, chat("alice@localhost/a", "friend"))
    replies = await harness.send(stranger, chat("alice@localhost/a", "spam"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert bodies(alice.take()) == ["friend"]
    await put_contact(roster, "alice@localhost", "bob@localhost", "none")
    replies = await harness.send(bob, chat("alice@localhost/a", "now denied"))
    assert [condition(r) for r in replies] == ["service-unavailable"]


async def test_presence_out_change_sends_unavailable_and_stops_broadcasts() -> None:
    harness, roster = await roster_harness(presence={})
    for owner, contact in (
        ("alice@localhost", "bob@localhost"),
        ("bob@localhost", "alice@localhost"),
    ):
        await put_contact(roster, owner, contact, "both")
    alice = harness.session("alice@localhost/a", available=False)
    bob = harness.session("bob@localhost/b", available=False)
    await harness.send(alice, "<presence/>")
    await harness.send(bob, "<presence/>")
    alice.take(), bob.take()
    await set_list(
        harness,
        alice,
        "quiet",
        "<item type='jid' value='bob@localhost' action='deny' order='1'><presence-out/></item>",
    )
    ok(await privacy(harness, alice, "set", "<active name='quiet'/>"))
    assert presences(bob.take()) == [("alice@localhost/a", "unavailable")]
    assert presences(alice.take()) == []  # presence-in is untouched
    await harness.send(alice, "<presence><show>away</show></presence>")
    assert presences(bob.take()) == []
    await harness.send(bob, "<presence><show>chat</show></presence>")
    assert presences(alice.take()) == [("bob@localhost/b", None)]
    # declining the active list: bob sees alice's current presence again
    ok(await privacy(harness, alice, "set", "<active/>"))
    got = [p for p in bob.take() if p.tag == "{jabber:client}presence"]
    assert [(p.get("from"), p.findtext("{jabber:client}show")) for p in got] == [
        ("alice@localhost/a", "away")
    ]


# --- concurrency ---------------------------------------------------------------------------


class YieldingBackend(MemoryItemBackend):
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
async def test_concurrent_list_and_block_updates_lose_nothing(
    kind: str, sqlite_backend: ItemBackend
) -> None:
    """Lists and blocklist share one record: concurrent edits of either must all survive."""
    harness = ModuleHarness({"privacy": {}, "blocking": {}})
    backend: ItemBackend = YieldingBackend() if kind == "memory" else sqlite_backend
    harness.storage.items = backend
    await harness.start()
    one = harness.session("alice@localhost/one")
    two = harness.session("alice@localhost/two")
    for i in range(6):
        session = (one, two)[i % 2]
        payload = (
            f"<query xmlns='{PRIVACY}'><list name='l{i}'><item action='deny' order='{i}'/>"
            "</list></query>"
            if i % 3
            else f"<block xmlns='{BLOCKING}'><item jid='u{i}@example.net'/></block>"
        )
        stanza = parse_stanza(f"<iq type='set' id='c{i}'>{payload}</iq>")
        stanza.set("from", session.jid)
        harness.router.route(stanza, session)
    await harness.router.drain()
    answers = [s for s in one.take() + two.take() if s.get("id", "").startswith("c")]
    assert sorted(a.get("type") for a in answers) == ["result"] * 6
    lists = summary(await privacy(harness, one, "get"))["lists"]
    assert sorted(lists) == ["l1", "l2", "l4", "l5"]
    reply = await iq(harness, one, "get", f"<blocklist xmlns='{BLOCKING}'/>")
    assert sorted(i.get("jid") for i in reply.iter(f"{{{BLOCKING}}}item")) == [
        "u0@example.net",
        "u3@example.net",
    ]
    if isinstance(backend, YieldingBackend):
        assert backend.conflicts > 0


async def test_privacy_and_blocking_share_one_engine() -> None:
    """Both modules on: one set of filters and hooks, so nothing is judged or refused twice."""
    harness = ModuleHarness({"privacy": {}, "blocking": {}})
    await harness.start()
    privacy_module = harness.host.modules["privacy"]
    blocking_module = harness.host.modules["blocking"]
    assert privacy_module.engine is blocking_module.engine  # type: ignore[attr-defined]
    assert len(harness.host.filters_in) == 1 and len(harness.host.filters_out) == 1


# --------------------------------------------------------------------------- backpressure


async def held_while_loading(
    harness: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> tuple[TestSession, TestSession, asyncio.Event]:
    """alice and bob online; bob's privacy record is not in memory and its load waits
    for the returned event, as a slow store would."""
    alice = await harness.login("alice@localhost/a")
    bob = await harness.login("bob@localhost/b")
    engine = harness.host.modules["privacy"].engine  # type: ignore[attr-defined]
    engine._states.pop("bob@localhost")
    gate = asyncio.Event()
    load = engine._load

    async def slow_load(bare: str) -> Any:
        await gate.wait()
        return await load(bare)

    monkeypatch.setattr(engine, "_load", slow_load)
    return alice, bob, gate


def route_as(harness: ModuleHarness, session: TestSession, xml: str) -> None:
    """`session`'s client sends `xml`, through its session's pipeline as the server does."""
    stanza = parse_stanza(xml)
    stanza.set("from", session.jid)
    session.receive(stanza)


async def test_a_held_message_stops_its_sender_being_read_until_it_is_released(
    harness: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    carol = await harness.login("carol@localhost/c")
    alice, bob, gate = await held_while_loading(harness, monkeypatch)
    route_as(harness, alice, chat("bob@localhost/b", "one"))
    route_as(harness, alice, chat("bob@localhost", "two"))
    route_as(harness, carol, chat("bob@localhost/b", "three"))
    await asyncio.sleep(0.01)
    assert bob.take() == []
    assert alice.input_holds == 1  # TCP backpressure: the connection stops reading
    assert carol.input_holds == 1  # her message waits for bob's rules too
    gate.set()
    await harness.router.drain()
    got = bodies(bob.take())
    assert sorted(got) == ["one", "three", "two"]
    assert got.index("one") < got.index("two")  # each sender's order holds
    assert alice.input_holds == 0 and carol.input_holds == 0


async def test_a_held_message_for_a_session_that_ended_goes_offline_and_frees_its_sender(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = await make(offline={})
    alice, bob, gate = await held_while_loading(harness, monkeypatch)
    route_as(harness, alice, chat("bob@localhost/b", "while you were going"))
    await asyncio.sleep(0.01)
    assert alice.input_holds == 1
    harness.router.session_ended(bob)
    gate.set()
    await harness.router.drain()
    assert alice.input_holds == 0
    stored = await harness.host.items("localhost", "offline").get("bob")
    assert stored is not None and stored.attrs["count"] == 1  # not dropped: kept for bob


async def test_a_load_that_hangs_refuses_the_held_stanzas_and_frees_their_sender(
    harness: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("xmppd.router.FILTER_WAIT", 0.05)
    alice, bob, _never = await held_while_loading(harness, monkeypatch)
    route_as(harness, alice, chat("bob@localhost/b", "lost in the store"))
    await harness.router.drain()
    assert alice.input_holds == 0
    assert bob.take() == []
    errors = [s for s in alice.take() if s.get("type") == "error"]
    assert [condition(e) for e in errors] == ["internal-server-error"]


async def test_presence_out_items_hold_for_contacts_on_other_servers() -> None:
    """Broadcast copies, probe answers and the unavailable at logout are made by the
    server, with no origin session: a presence-out item still keeps them from a contact
    on another server, whose own server judges nothing in alice's name."""
    harness, roster = await roster_harness(presence={})
    for contact in ("bob@example.net", "dora@example.net"):
        await put_contact(roster, "alice@localhost", contact, "both")
    remote = RecordingRemote()
    harness.router.remote = remote
    alice = harness.session("alice@localhost/a", available=False)
    item = "<item type='jid' value='bob@example.net' action='deny' order='1'><presence-out/></item>"
    await set_list(harness, alice, "quiet", item)
    ok(await privacy(harness, alice, "set", "<default name='quiet'/>"))
    await harness.send(alice, "<presence/>")
    await harness.send(alice, "<presence><show>away</show></presence>")
    probe = "<presence type='probe' from='bob@example.net/x' to='alice@localhost'/>"
    harness.host.route(parse_stanza(probe))
    await harness.router.drain()
    await harness.end_session(alice)
    sent = list(remote.routed)
    # a probe is no presence notification: presence-out items leave it alone
    assert remote.take("bob@example.net") == [("alice@localhost/a", "probe")]
    remote.routed = sent
    assert remote.take("dora@example.net") == [
        ("alice@localhost/a", None),
        ("alice@localhost/a", "probe"),
        ("alice@localhost/a", None),
        ("alice@localhost/a", "unavailable"),
    ]


# --- the indexed lists -------------------------------------------------------------------------


def linear_first_match(
    items: tuple[PrivacyItem, ...], kind: str | None, peer: JID, roster: dict[str, RosterEntry]
) -> PrivacyItem | None:
    """XEP-0016 2.2 read literally: the first item, in order, that covers the stanza."""
    for item in items:
        if item.kinds and kind not in item.kinds:
            continue
        if item.type is None:
            return item
        entry = roster.get(peer.bare, RosterEntry())
        if item.type == "subscription" and entry.subscription == item.value:
            return item
        if item.type == "group" and item.value in entry.groups:
            return item
        if item.type == "jid":
            assert item.pattern is not None
            user, domain, resource = item.pattern
            if user:
                covered = (peer.user, peer.domain) == (user, domain) and (
                    not resource or peer.resource == resource
                )
            elif resource:
                covered = (peer.domain, peer.resource) == (domain, resource)
            else:
                covered = peer.domain == domain or peer.domain.endswith("." + domain)
            if covered:
                return item
    return None


def test_indexed_lists_pick_the_first_matching_item_as_a_linear_scan_would() -> None:
    rng = random.Random(16)
    jids = [
        "a@x.example", "a@x.example/r", "b@x.example", "x.example", "example",
        "x.example/r", "y.example", "a@y.example/s", "chat.x.example", "b@chat.x.example/r",
    ]  # fmt: skip
    roster = {
        "a@x.example": RosterEntry("both", frozenset({"friends", "work"})),
        "b@x.example": RosterEntry("from", frozenset({"work"})),
        "a@y.example": RosterEntry("to", frozenset()),
    }
    for _ in range(300):
        items = []
        for order in rng.sample(range(100), rng.randint(0, 12)):
            type_ = rng.choice(["jid", "jid", "group", "subscription", None])
            value = {
                "jid": lambda: rng.choice(jids),
                "group": lambda: rng.choice(["friends", "work", "none"]),
                "subscription": lambda: rng.choice(["none", "to", "from", "both"]),
                None: lambda: None,
            }[type_]()
            kinds = rng.sample(KINDS, rng.choice([0, 0, 1, 2]))
            items.append(make_item(order, rng.random() < 0.5, type_, value, kinds))
        ordered = check_list(items)
        for kind in (None, *KINDS):
            indexed = IndexedList(ordered, kind)
            for value in jids:
                peer = JID(value)
                expected = linear_first_match(ordered, kind, peer, roster)
                assert indexed.first_match(peer, roster) is expected, (ordered, kind, value)


async def test_presence_effects_of_a_long_list_on_a_large_roster_come_in_slices() -> None:
    """1000 contacts and a 250-item list (the default maximum): activating it judges every
    contact twice, in slices with the loop running between them, and the last item
    still decides (the index keeps first-match order). How long it takes is measured,
    not asserted here (docs/bench.md, "Privacy lists on a large roster")."""
    harness, roster = await roster_harness(presence={}, blocking={})
    for i in range(1000):
        await put_contact(roster, "alice@localhost", f"c{i}@example.net", "both")
    harness.router.remote = RecordingRemote()
    alice = harness.session("alice@localhost/a", available=False)
    await harness.host.fire("session/bound", alice)
    await harness.send(alice, "<presence/>")
    items = "".join(
        f"<item type='jid' value='x{i}@elsewhere.example' action='deny' order='{i}'>"
        "<presence-out/></item>"
        for i in range(249)
    ) + "<item type='jid' value='c999@example.net' action='deny' order='999'/>"
    await set_list(harness, alice, "long", items)
    harness.router.remote = remote = RecordingRemote()
    engine = PrivacyEngine.attach(harness.host)
    before = engine._snapshot("alice@localhost")
    harness.host.set_state(alice, "privacy/active", "long")
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.create_task(count_turns())
    await asyncio.sleep(0)  # the counter is waiting for its next turn
    turns = 0
    await engine._presence_effects("alice@localhost", before)
    counter.cancel()
    assert remote.take("c999@example.net") == [("alice@localhost/a", "unavailable")]
    assert EFFECTS_SLICE <= 500 and turns >= 2  # the loop ran between the slices


# --- a message to the bare JID, given to several resources ----------------------------------

NOBOB = "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>"


async def refusing(harness: ModuleHarness, session: TestSession) -> None:
    """Make `session`'s active list refuse bob's messages."""
    ok(await set_list(harness, session, "nobob", NOBOB))
    ok(await privacy(harness, session, "set", "<active name='nobob'/>"))


@pytest.mark.parametrize("loaded", [True, False], ids=["rules-loaded", "rules-loading"])
@pytest.mark.parametrize("refuser", ["alice@localhost/a", "alice@localhost/b"])
async def test_a_message_one_resource_refuses_and_another_takes_is_not_bounced(
    refuser: str, loaded: bool
) -> None:
    """alice/a and alice/b share the top priority, so both are given bob's message to
    alice's bare JID (RFC 6121 8.5.2.1.1). One's active list refuses bob: that one does
    not get it, the other does, and bob gets no error, which would be false (his
    client might send it again). Whichever session is asked first, and whether the
    rules are in memory or the deliveries wait for them to load."""
    harness = await make()
    first = harness.session("alice@localhost/a")
    second = harness.session("alice@localhost/b")
    bob = harness.session("bob@localhost/b")
    refuses, takes = (first, second) if refuser == first.jid else (second, first)
    await refusing(harness, refuses)
    first.take(), second.take()
    if not loaded:
        PrivacyEngine.attach(harness.host)._states.clear()  # as if never loaded here
    assert await harness.send(bob, chat("alice@localhost", "hello")) == []
    assert refuses.take() == []
    assert bodies(takes.take()) == ["hello"]
    # a headline goes to every non-negative resource (8.5.2.1.1): the same holds
    headline = "<message to='alice@localhost' type='headline'><body>news</body></message>"
    assert await harness.send(bob, headline) == []
    assert refuses.take() == [] and bodies(takes.take()) == ["news"]


@pytest.mark.parametrize("loaded", [True, False], ids=["rules-loaded", "rules-loading"])
async def test_a_message_every_resource_refuses_is_bounced_once(loaded: bool) -> None:
    """Both top resources refuse bob: nobody took it, so bob is told, once
    (XEP-0016: <service-unavailable/>), and it is not stored offline either."""
    harness = await make(offline={})
    first = harness.session("alice@localhost/a")
    second = harness.session("alice@localhost/b")
    bob = harness.session("bob@localhost/b")
    await refusing(harness, first)
    ok(await privacy(harness, second, "set", "<active name='nobob'/>"))
    first.take(), second.take()
    if not loaded:
        PrivacyEngine.attach(harness.host)._states.clear()
    replies = await harness.send(bob, chat("alice@localhost", "nobody"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert first.take() == [] and second.take() == []
    assert await harness.host.items("localhost", "offline").get("alice") is None


@pytest.mark.parametrize("loaded", [True, False], ids=["rules-loaded", "rules-loading"])
async def test_the_top_resource_refusing_is_not_passed_on_to_a_lower_one(loaded: bool) -> None:
    """alice/top (priority 5) alone is chosen for a message to alice's bare JID and its
    active list refuses bob; alice/low (priority 1) would take it. The rules chose
    alice/top and its list decides (docs/modules.md, as Prosody and ejabberd do): bob
    gets <service-unavailable/>, and alice/low gets nothing."""
    harness = await make()
    top = harness.session("alice@localhost/top")
    top.priority = 5
    low = harness.session("alice@localhost/low")
    low.priority = 1
    bob = harness.session("bob@localhost/b")
    await refusing(harness, top)
    top.take(), low.take()
    if not loaded:
        PrivacyEngine.attach(harness.host)._states.clear()
    replies = await harness.send(bob, chat("alice@localhost", "to the top"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert top.take() == [] and low.take() == []


@pytest.mark.parametrize("kind", ["groupchat", "headline", "chat"])
async def test_a_refused_groupchat_or_headline_is_dropped_without_an_answer(kind: str) -> None:
    """alice's active list refuses everything from the room. A groupchat message from it
    (and a headline) vanishes without an error, which could make the room remove her
    and would tell it of the block; a chat message still gets <service-unavailable/>."""
    harness = await make()
    alice = harness.session("alice@localhost/a")
    room = harness.session("bob@localhost/room")  # stands for the room's sender JID
    ok(await set_list(harness, alice, "noroom",
                      "<item type='jid' value='bob@localhost' action='deny' order='1'/>"))
    ok(await privacy(harness, alice, "set", "<active name='noroom'/>"))
    alice.take()
    message = f"<message to='alice@localhost/a' type='{kind}'><body>hi</body></message>"
    replies = await harness.send(room, message)
    assert alice.take() == []
    assert [condition(r) for r in replies] == ([] if kind != "chat" else ["service-unavailable"])


@pytest.mark.parametrize("kind", ["headline", "chat"])
async def test_a_refused_headline_for_an_account_with_no_resource_to_take_it_gets_no_error(
    kind: str,
) -> None:
    """alice's default list refuses bob's messages, and she has no resource that takes
    messages (priority -1): the account's rules judge bob's message there. A headline
    vanishes without an answer, as it would at a resource (the error would tell bob of
    the block); a chat message gets <service-unavailable/> and is not stored."""
    harness = await make(offline={})
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    ok(await set_list(harness, alice, "nobob", NOBOB))
    ok(await privacy(harness, alice, "set", "<default name='nobob'/>"))
    alice.take()
    alice.priority = -1  # not eligible: the message goes to the account's rules
    replies = await harness.send(
        bob, f"<message to='alice@localhost' type='{kind}'><body>news</body></message>"
    )
    expected = [] if kind == "headline" else ["service-unavailable"]
    assert [condition(r) for r in replies] == expected
    assert alice.take() == []
    assert await harness.host.items("localhost", "offline").get("alice") is None
