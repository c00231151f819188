"""disco, ping, version and time through the module host, without sockets."""

from __future__ import annotations

import asyncio

import pytest
from lxml import etree

from xmppd.testing import ModuleHarness, parse_stanza

DISCO_INFO = "http://jabber.org/protocol/disco#info"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


@pytest.fixture
async def harness() -> ModuleHarness:
    return await ModuleHarness({"disco": {}, "ping": {}, "version": {}, "time": {}}).start()


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error"
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


async def test_disco_info_lists_exactly_the_enabled_features(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert reply.get("type") == "result" and reply.get("from") == "localhost"
    assert reply.get("to") == "alice@localhost/a"
    features = {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}
    assert features == {
        DISCO_INFO,
        "http://jabber.org/protocol/disco#items",
        "urn:xmpp:ping",
        "jabber:iq:version",
        "urn:xmpp:time",
    }


async def test_disabled_module_is_absent() -> None:
    harness = await ModuleHarness({"disco": {}, "ping": {}}).start()
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    features = {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}
    assert "jabber:iq:version" not in features
    reply = await harness.iq(alice, "get", "<query xmlns='jabber:iq:version'/>", to="localhost")
    assert condition(reply) == "service-unavailable"


async def test_ping_and_unknown_namespace(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", "<ping xmlns='urn:xmpp:ping'/>", to="localhost")
    assert reply.get("type") == "result" and len(reply) == 0
    reply = await harness.iq(alice, "get", "<query xmlns='urn:example:nothing'/>", to="localhost")
    assert condition(reply) == "service-unavailable"


async def test_iq_with_two_children_is_bad_request(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(
        alice, "get", "<ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/>", to="localhost"
    )
    assert condition(reply) == "bad-request"


async def test_version_hides_os_by_default_and_shows_it_on_request() -> None:
    for show_os in (False, True):
        harness = await ModuleHarness(
            {"version": {"show_os": show_os, "name": "chat.example"}}
        ).start()
        alice = harness.session("alice@localhost/a")
        reply = await harness.iq(alice, "get", "<query xmlns='jabber:iq:version'/>", to="localhost")
        assert reply.findtext("{jabber:iq:version}query/{jabber:iq:version}name") == "chat.example"
        assert (reply.find("{jabber:iq:version}query/{jabber:iq:version}os") is not None) == show_os


async def test_time_is_utc(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", "<time xmlns='urn:xmpp:time'/>", to="localhost")
    assert reply.findtext("{urn:xmpp:time}time/{urn:xmpp:time}tzo") == "+00:00"
    assert reply.findtext("{urn:xmpp:time}time/{urn:xmpp:time}utc").endswith("Z")


async def test_account_disco_only_for_its_owner(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    own = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="alice@localhost")
    assert own.get("type") == "result"
    assert own.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity").get("category") == "account"
    other = await harness.iq(bob, "get", f"<query xmlns='{DISCO_INFO}'/>", to="alice@localhost")
    assert condition(other) == "service-unavailable"


async def test_routing_rules_for_messages(harness: ModuleHarness) -> None:
    """RFC 6121 section 8: highest priority wins, negative never gets bare-JID messages."""
    alice = harness.session("alice@localhost/a")
    bob1 = harness.session("bob@localhost/one")
    bob2 = harness.session("bob@localhost/two")
    bob1.priority, bob2.priority = 5, 1
    await harness.send(alice, "<message to='bob@localhost' type='chat'><body>1</body></message>")
    assert len(bob1.take()) == 1 and bob2.take() == []
    bob1.priority = -1
    await harness.send(alice, "<message to='bob@localhost' type='chat'><body>2</body></message>")
    assert bob1.take() == [] and len(bob2.take()) == 1
    # full JID: delivered to that resource whatever its priority
    await harness.send(
        alice, "<message to='bob@localhost/one' type='chat'><body>3</body></message>"
    )
    assert len(bob1.take()) == 1
    # unknown user: service-unavailable back to the sender
    replies = await harness.send(
        alice, "<message to='nobody@localhost' type='chat'><body>4</body></message>"
    )
    assert condition(replies[0]) == "service-unavailable"
    # malformed 'to'
    replies = await harness.send(alice, "<message to='a@b@c' type='chat'><body>5</body></message>")
    assert condition(replies[0]) == "jid-malformed"
    # remote domain: no s2s yet
    replies = await harness.send(
        alice, "<message to='x@remote.example' type='chat'><body>6</body></message>"
    )
    assert condition(replies[0]) == "remote-server-not-found"


async def test_stanzas_for_a_user_keep_order_behind_storage_work() -> None:
    """A presence sent after a subscription answer must not overtake it while the
    answer waits on storage (the user's client would see presence from a stranger)."""
    harness = await ModuleHarness({"disco": {}}).start()
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")

    async def slow_subscribed(stanza: etree._Element, bare: str) -> bool:
        await asyncio.sleep(0.05)  # a roster write
        harness.router.deliver(alice, stanza)
        return True

    harness.host.hook("presence/subscribed", slow_subscribed)
    bob_presence = "<presence to='alice@localhost/a'><show>chat</show></presence>"
    stanza = parse_stanza("<presence to='alice@localhost' type='subscribed'/>")
    stanza.set("from", "bob@localhost")
    harness.router.route(stanza)
    await harness.send(bob, bob_presence)
    got = [(s.get("type"), s.findtext("{jabber:client}show")) for s in alice.take()]
    assert got == [("subscribed", None), (None, "chat")]


# (payload, to) -> the answer alice gets: RFC 6120 10.3.3 / 8.1.1.1, an IQ with no 'to' is
# handled by the server for the sender's account, like one to the account's bare JID.
OWN_ACCOUNT_IQS = [
    ("<ping xmlns='urn:xmpp:ping'/>", None, "result"),
    ("<ping xmlns='urn:xmpp:ping'/>", "alice@localhost", "result"),
    ("<ping xmlns='urn:xmpp:ping'/>", "bob@localhost", "service-unavailable"),
    ("<query xmlns='jabber:iq:version'/>", None, "result"),
    ("<query xmlns='jabber:iq:version'/>", "bob@localhost", "service-unavailable"),
    ("<time xmlns='urn:xmpp:time'/>", None, "result"),
    ("<time xmlns='urn:xmpp:time'/>", "alice@localhost", "result"),
    (f"<query xmlns='{DISCO_INFO}'/>", None, "result"),
    (f"<query xmlns='{DISCO_INFO}'/>", "alice@localhost", "result"),
    ("<query xmlns='jabber:iq:roster'/>", None, "result"),
    ("<vCard xmlns='vcard-temp'/>", None, "result"),
    ("<query xmlns='jabber:iq:private'><x xmlns='urn:t'/></query>", None, "result"),
    ("<query xmlns='urn:example:nothing'/>", None, "service-unavailable"),
    ("<query xmlns='urn:example:nothing'/>", "alice@localhost", "service-unavailable"),
]


@pytest.mark.parametrize(("payload", "to", "answer"), OWN_ACCOUNT_IQS)
async def test_iq_with_no_to_is_for_the_account(payload: str, to: str | None, answer: str) -> None:
    harness = ModuleHarness(
        {
            "disco": {},
            "ping": {},
            "version": {},
            "time": {},
            "roster": {},
            "vcard": {},
            "private": {},
        }
    )
    await harness.start()
    alice = harness.session("alice@localhost/a")
    harness.session("bob@localhost/b")
    reply = await harness.iq(alice, "get", payload, to=to)
    assert (reply.get("type") if answer == "result" else condition(reply)) == answer
    assert reply.get("from") in (None, to or "alice@localhost")
    if "version" in payload and answer == "result":
        assert reply.findtext("{jabber:iq:version}query/{jabber:iq:version}name") == "xmppd"
    if DISCO_INFO in payload:  # the account's own identity, as for its bare JID
        identity = reply.find(f"{{{DISCO_INFO}}}query/{{{DISCO_INFO}}}identity")
        assert identity is not None and identity.get("category") == "account"


REMOTE = "x@remote.example"
# RFC 6120 10.4.3: what a client sends to a domain this server cannot reach, and the answer
REMOTE_STANZAS = [
    (f"<message to='{REMOTE}' id='i'><body>b</body></message>", "remote-server-not-found"),
    (f"<message to='{REMOTE}' type='error' id='i'/>", None),  # never an error for an error
    (f"<iq type='get' to='{REMOTE}' id='i'><q xmlns='urn:q'/></iq>", "remote-server-not-found"),
    (
        "<iq type='set' to='remote.example' id='i'><q xmlns='urn:q'/></iq>",
        "remote-server-not-found",
    ),
    (f"<iq type='result' to='{REMOTE}' id='i'/>", None),
    (f"<iq type='error' to='{REMOTE}' id='i'/>", None),
    (f"<presence to='{REMOTE}/r' id='i'/>", "remote-server-not-found"),  # directed
    (f"<presence type='probe' to='{REMOTE}' id='i'/>", "remote-server-not-found"),
    (f"<presence type='error' to='{REMOTE}' id='i'/>", None),
]


@pytest.mark.parametrize(("xml", "answer"), REMOTE_STANZAS)
async def test_stanzas_to_an_unreachable_domain(
    harness: ModuleHarness, xml: str, answer: str | None
) -> None:
    alice = harness.session("alice@localhost/a")
    replies = await harness.send(alice, xml)
    assert [condition(r) for r in replies] == ([answer] if answer else [])
    for reply in replies:
        assert reply.get("id") == "i" and reply.get("to") == alice.jid


async def test_routing_without_bounce_reports_nothing(harness: ModuleHarness) -> None:
    """The presence module's broadcast copies: an unreachable contact is no error each time."""
    alice = harness.session("alice@localhost/a")
    copy = parse_stanza(f"<presence from='{alice.jid}' to='{REMOTE}'/>")
    harness.host.route(copy, bounce=False)
    await harness.router.drain()
    assert alice.take() == []
    harness.host.route(copy)
    await harness.router.drain()
    assert [condition(r) for r in alice.take()] == ["remote-server-not-found"]
