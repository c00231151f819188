"""Message Carbons (XEP-0280) through the module host, without sockets."""

from __future__ import annotations

import pytest
from lxml import etree

from xmppd.modules._privacy_engine import PrivacyEngine
from xmppd.testing import ModuleHarness, TestSession, without_echo

CARBONS = "urn:xmpp:carbons:2"
FORWARD = "urn:xmpp:forward:0"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
MUC_USER = "http://jabber.org/protocol/muc#user"
ENABLE = f"<enable xmlns='{CARBONS}'/>"
DISABLE = f"<disable xmlns='{CARBONS}'/>"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def carbon(stanza: etree._Element, kind: str) -> etree._Element:
    """The forwarded original inside a <sent/> or <received/> carbon, checked for shape."""
    assert stanza.tag == "{jabber:client}message"
    wrapper = stanza.find(f"{{{CARBONS}}}{kind}")
    assert wrapper is not None, etree.tostring(stanza)
    inner = wrapper.find(f"{{{FORWARD}}}forwarded/{{jabber:client}}message")
    assert inner is not None
    return inner


def body(stanza: etree._Element) -> str | None:
    return stanza.findtext("{jabber:client}body")


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"disco": {}, "carbons": {}, "offline": {}})
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


async def enabled(harness: ModuleHarness, jid: str, priority: int = 0) -> TestSession:
    session = harness.session(jid)
    session.priority = priority
    reply = await harness.iq(session, "set", ENABLE)
    assert reply.get("type") == "result" and len(reply) == 0
    return session


def msg(to: str, text: str = "hi", extra: str = "", type_: str = "chat", id_: str = "m1") -> str:
    return f"<message to='{to}' type='{type_}' id='{id_}'><body>{text}</body>{extra}</message>"


async def test_disco_and_enable_disable(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert CARBONS in {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}
    for payload in (ENABLE, DISABLE):
        assert (await harness.iq(alice, "set", payload)).get("type") == "result"
        assert (await harness.iq(alice, "set", payload, to="localhost")).get("type") == "result"
    bad = await harness.iq(alice, "set", f"<private xmlns='{CARBONS}'/>")
    assert condition(bad) == "bad-request"
    assert condition(await harness.iq(alice, "get", ENABLE)) == "service-unavailable"
    bob = harness.session("bob@localhost/b")
    other = await harness.iq(bob, "set", ENABLE, to="alice@localhost")
    assert condition(other) == "forbidden"


async def test_received_carbons_for_a_full_jid_message(harness: ModuleHarness) -> None:
    bob = harness.session("bob@localhost/b")
    a1 = await enabled(harness, "alice@localhost/one")
    a2 = await enabled(harness, "alice@localhost/two")
    a3 = harness.session("alice@localhost/three")  # did not enable
    await harness.send(bob, msg("alice@localhost/one"))
    [original] = a1.take()
    assert original.find(f"{{{CARBONS}}}received") is None and body(original) == "hi"
    [copy] = a2.take()
    assert copy.get("from") == "alice@localhost" and copy.get("to") == "alice@localhost/two"
    assert copy.get("type") == "chat"
    inner = carbon(copy, "received")
    assert inner.get("from") == "bob@localhost/b" and inner.get("to") == "alice@localhost/one"
    assert body(inner) == "hi"
    assert a3.take() == []


async def test_bare_jid_message_to_several_top_resources_is_not_duplicated(
    harness: ModuleHarness,
) -> None:
    bob = harness.session("bob@localhost/b")
    top1 = await enabled(harness, "alice@localhost/top1", priority=5)
    top2 = await enabled(harness, "alice@localhost/top2", priority=5)
    low = await enabled(harness, "alice@localhost/low", priority=1)
    negative = await enabled(harness, "alice@localhost/neg", priority=-1)
    await harness.send(bob, msg("alice@localhost"))
    for top in (top1, top2):
        [original] = top.take()
        assert original.find(f"{{{CARBONS}}}received") is None
    for other in (low, negative):
        [copy] = other.take()
        assert body(carbon(copy, "received")) == "hi"


async def test_message_to_a_gone_resource_follows_bare_rules(harness: ModuleHarness) -> None:
    bob = harness.session("bob@localhost/b")
    top1 = await enabled(harness, "alice@localhost/top1", priority=5)
    top2 = await enabled(harness, "alice@localhost/top2", priority=5)
    low = await enabled(harness, "alice@localhost/low", priority=1)
    await harness.send(bob, msg("alice@localhost/gone"))
    assert [len(s.take()) for s in (top1, top2, low)] == [1, 1, 1]


async def test_sent_carbons(harness: ModuleHarness) -> None:
    bob = harness.session("bob@localhost/b")
    a1 = await enabled(harness, "alice@localhost/one")
    a2 = await enabled(harness, "alice@localhost/two")
    replies = await harness.send(a1, msg("bob@localhost", "hello"))
    assert replies == []  # the sender gets no copy of its own message
    [copy] = a2.take()
    assert copy.get("from") == "alice@localhost" and copy.get("to") == "alice@localhost/two"
    inner = carbon(copy, "sent")
    assert inner.get("from") == "alice@localhost/one" and inner.get("to") == "bob@localhost"
    assert body(inner) == "hello"
    assert [body(s) for s in bob.take()] == ["hello"]


async def test_private_and_no_copy(harness: ModuleHarness) -> None:
    bob1 = await enabled(harness, "bob@localhost/one")
    bob2 = await enabled(harness, "bob@localhost/two")
    a1 = await enabled(harness, "alice@localhost/one")
    a2 = await enabled(harness, "alice@localhost/two")
    private = f"<private xmlns='{CARBONS}'/><no-copy xmlns='urn:xmpp:hints'/>"
    await harness.send(a1, msg("bob@localhost/one", "secret", private))
    assert a2.take() == [] and bob2.take() == []
    [delivered] = bob1.take()
    assert delivered.find(f"{{{CARBONS}}}private") is None  # stripped (XEP-0280 section 9)
    assert delivered.find("{urn:xmpp:hints}no-copy") is not None
    await harness.send(a1, msg("bob@localhost/one", "hint", "<no-copy xmlns='urn:xmpp:hints'/>"))
    assert a2.take() == [] and bob2.take() == [] and len(bob1.take()) == 1
    # private to the bare JID of two top resources: neither sees <private/>, no copies
    await harness.send(a1, msg("bob@localhost", "both", f"<private xmlns='{CARBONS}'/>"))
    for bob in (bob1, bob2):
        [got] = bob.take()
        assert (
            got.find(f"{{{CARBONS}}}private") is None and got.find(f"{{{CARBONS}}}received") is None
        )


@pytest.mark.parametrize(
    ("stanza", "copied"),
    [
        (msg("alice@localhost/one", type_="normal"), True),
        ("<message to='alice@localhost/one' type='normal'/>", False),
        (
            "<message to='alice@localhost/one'>"
            "<received xmlns='urn:xmpp:receipts' id='x'/></message>",
            True,
        ),
        (
            "<message to='alice@localhost/one' type='chat'>"
            "<composing xmlns='http://jabber.org/protocol/chatstates'/></message>",
            True,
        ),
        (msg("alice@localhost/one", type_="headline"), False),
        (msg("alice@localhost/one", type_="groupchat"), False),
        (
            msg("alice@localhost/one", extra="<x xmlns='http://jabber.org/protocol/muc#user'/>"),
            False,
        ),
        (
            msg(
                "alice@localhost/one",
                extra=f"<received xmlns='{CARBONS}'><forwarded xmlns='{FORWARD}'/></received>",
            ),
            False,
        ),
        ("<message to='alice@localhost/one' type='error' id='zzz'><body>e</body></message>", False),
    ],
    ids=[
        "normal-body",
        "normal-empty",
        "receipt",
        "chat-state",
        "headline",
        "groupchat",
        "muc-pm",
        "carbon",
        "unrelated-error",
    ],
)
async def test_eligibility(harness: ModuleHarness, stanza: str, copied: bool) -> None:
    bob = harness.session("bob@localhost/b")
    await enabled(harness, "alice@localhost/one")
    a2 = await enabled(harness, "alice@localhost/two")
    await harness.send(bob, stanza)
    assert len(a2.take()) == int(copied)


async def test_errors_answering_copied_messages_are_copied(harness: ModuleHarness) -> None:
    bob = harness.session("bob@localhost/b")
    a1 = await enabled(harness, "alice@localhost/one")
    a2 = await enabled(harness, "alice@localhost/two")
    await harness.send(a1, msg("bob@localhost/b", id_="q1"))
    assert len(a2.take()) == 1 and len(bob.take()) == 1
    await harness.send(
        bob, "<message to='alice@localhost/one' type='error' id='q1'><error/></message>"
    )
    [copy] = a2.take()
    assert carbon(copy, "received").get("type") == "error"
    # and the other way: alice answers bob's message with an error
    await harness.send(bob, msg("alice@localhost/one", id_="q2"))
    assert len(a2.take()) == 1
    await harness.send(a1, "<message to='bob@localhost/b' type='error' id='q2'><error/></message>")
    [copy] = a2.take()
    assert carbon(copy, "sent").get("type") == "error"
    # a server bounce (offline user... here: unknown user) answering a copied message
    await harness.send(a1, msg("nobody@localhost", id_="q3"))
    assert len(a2.take()) == 2  # the sent carbon, then the copied error
    assert len(a1.received) == 0


async def test_disable_and_unavailable_and_closed(harness: ModuleHarness) -> None:
    bob = harness.session("bob@localhost/b")
    a1 = await enabled(harness, "alice@localhost/one")
    a2 = await enabled(harness, "alice@localhost/two")
    await harness.iq(a2, "set", DISABLE)
    await harness.send(bob, msg("alice@localhost/one"))
    assert a2.take() == []
    await harness.iq(a2, "set", ENABLE)
    a2.available = False  # no presence sent: not an available resource
    await harness.send(bob, msg("alice@localhost/one"))
    assert a2.take() == []
    a2.available = True
    harness.router.unbind(a2)
    await harness.host.fire("session/closed", a2)
    carbons = harness.host.modules["carbons"]
    assert carbons.opted_in == {"alice@localhost": 1}  # type: ignore[attr-defined]
    await harness.host.fire("session/closed", a1)
    assert carbons.opted_in == {}  # type: ignore[attr-defined]


async def test_message_to_own_account(harness: ModuleHarness) -> None:
    a1 = await enabled(harness, "alice@localhost/one", priority=1)
    a2 = await enabled(harness, "alice@localhost/two", priority=5)
    a3 = await enabled(harness, "alice@localhost/three", priority=1)
    await harness.send(a1, msg("alice@localhost", "note"))
    assert [body(s) for s in a2.take()] == ["note"]  # the top resource gets the original
    [copy] = a3.take()
    assert body(carbon(copy, "received")) == "note"
    assert a1.take() == []  # the sender gets neither a sent nor a received copy


async def test_offline_messages_replayed_at_login_are_not_copied(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    neg = await enabled(harness, "bob@localhost/neg", priority=-1)
    await harness.send(alice, msg("bob@localhost", "while away"))
    assert neg.take() == []
    bob = harness.session("bob@localhost/b", available=False)
    await harness.iq(bob, "set", ENABLE)
    replayed = without_echo(bob, await harness.send(bob, "<presence/>"))
    assert [body(s) for s in replayed] == ["while away"]
    assert [s for s in neg.take() if s.tag == "{jabber:client}message"] == []


# --- carbons and the owner's blocking and privacy rules -------------------------------------


async def with_rules() -> ModuleHarness:
    harness = ModuleHarness(
        {"disco": {}, "carbons": {}, "offline": {}, "blocking": {}, "privacy": {}}
    )
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


async def rule(harness: ModuleHarness, session: TestSession, payload: str) -> None:
    """A blocking or privacy IQ-set of `session`'s, answered with a result; pushes dropped."""
    reply = await harness.iq(session, "set", payload)
    assert reply.get("type") == "result", etree.tostring(reply)
    session.take()


BLOCK_BOB = "<block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block>"


@pytest.mark.parametrize("loaded", [True, False], ids=["rules-loaded", "rules-loading"])
async def test_no_received_carbon_of_a_message_from_a_blocked_contact(loaded: bool) -> None:
    """alice/one (top priority) blocks bob; alice/two has carbons on: bob's message is
    refused, and no <received/> copy of it reaches alice/two, whether alice's rules are
    in memory or the filter has to wait for them."""
    harness = await with_rules()
    bob = harness.session("bob@localhost/b")
    one = await enabled(harness, "alice@localhost/one", priority=5)
    two = await enabled(harness, "alice@localhost/two", priority=0)
    await rule(harness, one, BLOCK_BOB)
    two.take()
    if not loaded:
        PrivacyEngine.attach(harness.host)._states.clear()  # as if never loaded here
    replies = await harness.send(bob, msg("alice@localhost", "blocked"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert one.take() == [] and two.take() == []
    await harness.send(bob, msg("alice@localhost/one", "to one"))
    assert one.take() == [] and two.take() == []


async def test_carbons_follow_the_receiving_sessions_active_list() -> None:
    """Active lists are per session (XEP-0016): a resource whose list refuses bob gets no
    copy of the conversation with him, sent or received, while the others do."""
    harness = await with_rules()
    bob = harness.session("bob@localhost/b")
    one = await enabled(harness, "alice@localhost/one", priority=5)
    two = await enabled(harness, "alice@localhost/two", priority=0)
    three = await enabled(harness, "alice@localhost/three", priority=0)
    items = "<item type='jid' value='bob@localhost' action='deny' order='1'/>"
    privacy = "<query xmlns='jabber:iq:privacy'>{}</query>"
    await rule(harness, two, privacy.format(f"<list name='nobob'>{items}</list>"))
    await rule(harness, two, privacy.format("<active name='nobob'/>"))
    one.take(), three.take()

    await harness.send(bob, msg("alice@localhost", "in"))
    assert [body(s) for s in one.take()] == ["in"]
    assert two.take() == []
    [copy] = three.take()
    assert body(carbon(copy, "received")) == "in"

    assert await harness.send(one, msg("bob@localhost", "out")) == []
    assert [body(s) for s in bob.take()] == ["out"]
    assert two.take() == []
    [copy] = three.take()
    assert body(carbon(copy, "sent")) == "out"


@pytest.mark.parametrize("loaded", [True, False], ids=["rules-loaded", "rules-loading"])
@pytest.mark.parametrize("to", ["alice@localhost", "alice@localhost/one"])
async def test_no_carbon_of_a_message_every_chosen_resource_refused(to: str, loaded: bool) -> None:
    """alice/one, the resource chosen for bob's message, refuses it by its active list;
    alice/two's rules would let bob in, but it gets no <received/> copy either: bob
    was told the message did not arrive, and nothing else received it (XEP-0280 copies
    what was delivered). Also when alice/one's delivery has to wait for the rules to
    load: the copies wait for its outcome."""
    harness = await with_rules()
    bob = harness.session("bob@localhost/b")
    one = await enabled(harness, "alice@localhost/one", priority=5)
    two = await enabled(harness, "alice@localhost/two", priority=0)
    privacy = "<query xmlns='jabber:iq:privacy'>{}</query>"
    items = "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>"
    await rule(harness, one, privacy.format(f"<list name='nobob'>{items}</list>"))
    await rule(harness, one, privacy.format("<active name='nobob'/>"))
    two.take()
    if not loaded:
        PrivacyEngine.attach(harness.host)._states.clear()  # as if never loaded here
    replies = await harness.send(bob, msg(to, "refused"))
    assert [condition(r) for r in replies] == ["service-unavailable"]
    assert one.take() == [] and two.take() == []


@pytest.mark.parametrize("loaded", [True, False], ids=["rules-loaded", "rules-loading"])
async def test_a_message_one_chosen_resource_refused_is_copied_from_the_one_that_took_it(
    loaded: bool,
) -> None:
    """alice/one and alice/two share the top priority, so both are chosen for bob's
    message to alice's bare JID; alice/one's active list refuses bob, alice/two takes
    it. bob gets no error (the message arrived); alice/three (lower priority, carbons
    on) gets a <received/> copy; alice/four (lower priority, carbons on, an active list
    refusing bob) gets none, and its refusal of the copy tells bob nothing either;
    alice/one gets neither the message nor a copy."""
    harness = await with_rules()
    bob = harness.session("bob@localhost/b")
    one = await enabled(harness, "alice@localhost/one", priority=5)
    two = await enabled(harness, "alice@localhost/two", priority=5)
    three = await enabled(harness, "alice@localhost/three", priority=0)
    four = await enabled(harness, "alice@localhost/four", priority=0)
    privacy = "<query xmlns='jabber:iq:privacy'>{}</query>"
    items = "<item type='jid' value='bob@localhost' action='deny' order='1'><message/></item>"
    await rule(harness, one, privacy.format(f"<list name='nobob'>{items}</list>"))
    await rule(harness, one, privacy.format("<active name='nobob'/>"))
    await rule(harness, four, privacy.format("<active name='nobob'/>"))
    for session in (two, three):
        session.take()
    if not loaded:
        PrivacyEngine.attach(harness.host)._states.clear()  # as if never loaded here
    assert await harness.send(bob, msg("alice@localhost", "in")) == []
    assert one.take() == [] and four.take() == []
    assert [body(s) for s in two.take()] == ["in"]
    [copy] = three.take()
    assert body(carbon(copy, "received")) == "in"
