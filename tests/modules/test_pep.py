"""PEP (XEP-0163) and the pubsub engine under it (XEP-0060), without sockets.

The stanzas are the XEPs' examples (XEP-0163 section 4 and 6, XEP-0060
sections 6-8, XEP-0223, XEP-0172); each test names the example it follows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import pytest
from lxml import etree

from xmppd.modules._pubsub_engine import PubSubService
from xmppd.modules.caps import Identity, verification_string
from xmppd.modules.pep import Pep
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.base import ConditionFailed, Item, Page, Query, Write
from xmppd.storage.cache import TOMBSTONE_TTL, CachedItemBackend, MemoryCache
from xmppd.stream.errors import StanzaError
from xmppd.testing import ModuleHarness, TestSession, parse_stanza

PS = "http://jabber.org/protocol/pubsub"
OWNER = f"{PS}#owner"
EVENT = f"{PS}#event"
ERRORS = f"{PS}#errors"
NICK = "http://jabber.org/protocol/nick"
CAPS = "http://jabber.org/protocol/caps"
INFO = "http://jabber.org/protocol/disco#info"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
M = "{jabber:client}message"
IQ = "{jabber:client}iq"


@pytest.fixture
async def harness() -> ModuleHarness:
    limits = {"max_nodes": 5, "max_item_bytes": 4096, "inline_item_bytes": 1024}
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": limits, "disco": {}})
    harness.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    return await harness.start()


def pep(harness: ModuleHarness) -> Pep:
    module = harness.host.modules["pep"]
    assert isinstance(module, Pep)
    return module


async def befriend(harness: ModuleHarness, owner: str, contact: str, sub: str = "both") -> None:
    """Put `contact` in `owner`'s roster with `sub`, and the mirror item in the contact's."""
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    mirror = {"both": "both", "from": "to", "to": "from"}[sub]
    for a, b, s in ((owner, contact, sub), (contact, owner, mirror)):
        await roster.update(a, b, lambda _, b=b, s=s: RosterItem(b, subscription=s))  # type: ignore[misc]


def caps_ver(notify: Iterable[str]) -> tuple[list[str], str]:
    features = [INFO, *(f"{node}+notify" for node in notify)]
    return features, verification_string([Identity("client", "pc", "t")], features)


async def online(
    harness: ModuleHarness,
    jid: str,
    notify: Iterable[str] = (),
    asked_before: list[bool] | None = None,
) -> TestSession:
    """A session that sends initial presence with caps asking for `notify`; it answers
    the server's disco#info like a client (whether it was asked is appended to
    `asked_before`). What came besides the presence echo and the disco#info stays
    received."""
    asked_before = [] if asked_before is None else asked_before
    features, ver = caps_ver(notify)
    session = harness.session(jid, available=False)
    presence = parse_stanza(
        f"<presence><c xmlns='{CAPS}' hash='sha-1' node='https://t.example' ver='{ver}'/>"
        "</presence>"
    )
    presence.set("from", session.jid)
    session.receive(presence)
    # The disco#info is sent while the presence is handled: answer it meanwhile, as a
    # client does (draining first would wait for the answer). Caps this server verified
    # before are not asked again.
    asked: list[etree._Element] = []
    for _ in range(300):
        asked = [s for s in session.received if s.tag == IQ]
        if asked:
            break
        await asyncio.sleep(0)
    asked_before.append(bool(asked))
    if asked:
        session.received.remove(asked[0])
        query = "".join(f"<feature var='{f}'/>" for f in features)
        result = parse_stanza(
            f"<iq type='result' id='{asked[0].get('id')}' to='{asked[0].get('from')}'>"
            f"<query xmlns='{INFO}' node='{asked[0][0].get('node')}'>"
            f"<identity category='client' type='pc' name='t'/>{query}</query></iq>"
        )
        result.set("from", session.jid)
        session.receive(result)
    await settle(harness)
    session.received = [s for s in session.received if s.tag != "{jabber:client}presence"]
    return session


async def ask(
    harness: ModuleHarness, session: TestSession, type_: str, payload: str, to: str | None = None
) -> etree._Element:
    """Send an IQ; return its answer and leave what else came (notifications) received."""
    to_attr = f" to='{to}'" if to else ""
    got = await harness.send(session, f"<iq type='{type_}' id='t1'{to_attr}>{payload}</iq>")
    answers = [r for r in got if r.tag == IQ and r.get("id") == "t1"]
    assert len(answers) == 1, [etree.tostring(r) for r in got]
    session.received.extend(r for r in got if r is not answers[0])
    return answers[0]


async def settle(harness: ModuleHarness) -> None:
    for _ in range(5):
        await harness.router.drain()
        await asyncio.sleep(0)


def publish_nick(nick: str, item_id: str = "current", options: str = "") -> str:
    """XEP-0172 example 3 (publishing a nickname), with optional publish-options."""
    return (
        f"<pubsub xmlns='{PS}'><publish node='{NICK}'><item id='{item_id}'>"
        f"<nick xmlns='{NICK}'>{nick}</nick></item></publish>{options}</pubsub>"
    )


def options_form(fields: dict[str, str], form_type: str = f"{PS}#publish-options") -> str:
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (
        f"<publish-options><x xmlns='jabber:x:data' type='submit'>"
        f"<field var='FORM_TYPE' type='hidden'><value>{form_type}</value></field>{values}"
        "</x></publish-options>"
    )


def publish_to(node: str, *, open_: bool = False) -> str:
    options = options_form({"pubsub#access_model": "open"}) if open_ else ""
    return (
        f"<pubsub xmlns='{PS}'><publish node='{node}'><item><a xmlns='x'/></item></publish>"
        f"{options}</pubsub>"
    )


def subscription(action: str, node: str, jid: str) -> str:
    return f"<pubsub xmlns='{PS}'><{action} node='{node}' jid='{jid}'/></pubsub>"


def events(stanzas: Iterable[etree._Element]) -> list[tuple[str | None, str | None, str]]:
    """(from, to, what) of each pubsub notification: what = 'item <id> <payload text>',
    'retract <id>', 'delete', 'purge'."""
    found = []
    for stanza in stanzas:
        event = stanza.find(f"{{{EVENT}}}event") if stanza.tag == M else None
        if event is None:
            continue
        for child in event:
            name = child.tag.split("}")[1]
            if name == "items":
                for entry in child:
                    kind = entry.tag.split("}")[1]
                    text = "".join(entry.itertext())
                    found.append(
                        (
                            stanza.get("from"),
                            stanza.get("to"),
                            f"{kind} {entry.get('id')} {text}".strip(),
                        )
                    )
            else:
                found.append((stanza.get("from"), stanza.get("to"), name))
    return found


def error_of(reply: etree._Element) -> tuple[str, str | None, str | None]:
    """(type, condition, pubsub#errors condition) of an error reply."""
    assert reply.get("type") == "error", etree.tostring(reply)
    error = reply.find("{jabber:client}error")
    assert error is not None
    condition = app = None
    for child in error:
        if child.tag.startswith(f"{{{STANZAS}}}") and not child.tag.endswith("text"):
            condition = child.tag.split("}")[1]
        elif child.tag.startswith(f"{{{ERRORS}}}"):
            app = child.tag.split("}")[1]
    return error.get("type") or "", condition, app


async def stored_names(harness: ModuleHarness, store: str = "pep") -> list[str]:
    page = await harness.host.items("localhost", store).query(Query(limit=1000))
    return [item.name for item in page.items]


# --- XEP-0163 section 4 and 6: publish, auto-create, notifications ----------------------------


async def test_publish_auto_creates_and_notifies_interested_resources(
    harness: ModuleHarness,
) -> None:
    await befriend(harness, "alice@localhost", "bob@localhost")
    alice = await online(harness, "alice@localhost/a", [NICK])
    alice_other = await online(harness, "alice@localhost/b", [NICK])
    bob = await online(harness, "bob@localhost/b", [NICK])
    bob_deaf = await online(harness, "bob@localhost/deaf", [])  # no +notify: filtered
    carol = await online(harness, "carol@localhost/c", [NICK])  # no subscription
    reply = await ask(harness, alice, "set", publish_nick("Alice"))
    assert reply.get("type") == "result"
    assert reply.find(f"{{{PS}}}pubsub/{{{PS}}}publish/{{{PS}}}item").get("id") == "current"
    await settle(harness)
    assert events(alice.take()) == [("alice@localhost", "alice@localhost/a", "item current Alice")]
    assert events(alice_other.take()) == [
        ("alice@localhost", "alice@localhost/b", "item current Alice")
    ]
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "item current Alice")]
    assert events(bob_deaf.take()) == []
    assert events(carol.take()) == []


async def test_last_item_at_login_and_caps_asked_once(harness: ModuleHarness) -> None:
    """XEP-0163 6.2: a contact's resource that comes online gets the last item; the
    same caps a second time are known without asking the client again."""
    await befriend(harness, "alice@localhost", "bob@localhost")
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    asked: list[bool] = []
    bob = await online(harness, "bob@localhost/b", [NICK], asked)
    assert asked == [True]
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "item current Alice")]
    # Same caps again: not asked again, the item comes anyway.
    asked.clear()
    bob2 = await online(harness, "bob@localhost/b2", [NICK], asked)
    assert asked == [False]
    received = bob2.take()
    assert events(received) == [("alice@localhost", "bob@localhost/b2", "item current Alice")]


async def test_last_item_on_new_presence_subscription(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    carol = await online(harness, "carol@localhost/c", [NICK])
    assert events(carol.take()) == []
    await befriend(harness, "alice@localhost", "carol@localhost", "from")
    await settle(harness)
    assert events(carol.take()) == [("alice@localhost", "carol@localhost/c", "item current Alice")]


async def test_retract_and_items_and_access(harness: ModuleHarness) -> None:
    """XEP-0060 6.5 (items), 7.2 (retract with notification), 6.1.3.2 (presence
    subscription required)."""
    await befriend(harness, "alice@localhost", "bob@localhost")
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    bob = await online(harness, "bob@localhost/b", [NICK])
    bob.take()
    carol = harness.session("carol@localhost/c")
    items = f"<pubsub xmlns='{PS}'><items node='{NICK}'/></pubsub>"
    reply = await harness.iq(bob, "get", items, to="alice@localhost")
    assert [i.get("id") for i in reply.iter(f"{{{PS}}}item")] == ["current"]
    reply = await harness.iq(carol, "get", items, to="alice@localhost")
    assert error_of(reply) == ("auth", "not-authorized", "presence-subscription-required")
    retract = f"<pubsub xmlns='{PS}'><retract node='{NICK}' notify='true'><item id='current'/>"
    reply = await harness.iq(alice, "set", retract + "</retract></pubsub>")
    assert reply.get("type") == "result"
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "retract current")]
    reply = await harness.iq(bob, "get", items, to="alice@localhost")
    assert list(reply.iter(f"{{{PS}}}item")) == []
    # Retracting it again: item-not-found.
    reply = await harness.iq(alice, "set", retract + "</retract></pubsub>")
    assert error_of(reply)[1] == "item-not-found"


async def test_only_the_account_publishes(harness: ModuleHarness) -> None:
    await befriend(harness, "alice@localhost", "bob@localhost")
    bob = harness.session("bob@localhost/b")
    reply = await harness.iq(bob, "set", publish_nick("Mallory"), to="alice@localhost")
    assert error_of(reply)[1] == "forbidden"
    assert await stored_names(harness) == []


# --- XEP-0223 private storage and publish-options ---------------------------------------------


async def test_private_storage_with_publish_options(harness: ModuleHarness) -> None:
    """XEP-0223 example 1; XEP-0060 7.1.5 (precondition-not-met)."""
    await befriend(harness, "alice@localhost", "bob@localhost")
    alice = harness.session("alice@localhost/a")
    bob = await online(harness, "bob@localhost/b", ["storage:bookmarks"])
    private = options_form({"pubsub#persist_items": "true", "pubsub#access_model": "whitelist"})
    publish = (
        f"<pubsub xmlns='{PS}'><publish node='storage:bookmarks'><item id='current'>"
        "<storage xmlns='storage:bookmarks'><conference jid='a@b' autojoin='true'/></storage>"
        f"</item></publish>{private}</pubsub>"
    )
    assert (await harness.iq(alice, "set", publish)).get("type") == "result"
    await settle(harness)
    assert events(bob.take()) == []  # whitelist: contacts get nothing
    items = f"<pubsub xmlns='{PS}'><items node='storage:bookmarks'/></pubsub>"
    reply = await harness.iq(bob, "get", items, to="alice@localhost")
    assert error_of(reply) == ("cancel", "not-allowed", "closed-node")
    reply = await harness.iq(alice, "get", items)
    assert [i.get("id") for i in reply.iter(f"{{{PS}}}item")] == ["current"]
    # A publish whose options do not match the node: conflict, nothing changed.
    public = options_form({"pubsub#access_model": "open"})
    reply = await harness.iq(alice, "set", publish.replace(private, public))
    assert error_of(reply) == ("cancel", "conflict", "precondition-not-met")
    reply = await harness.iq(bob, "get", items, to="alice@localhost")
    assert error_of(reply)[2] == "closed-node"


async def test_public_data_xep0222(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    carol = harness.session("carol@localhost/c")
    reply = await harness.iq(
        alice, "set", publish_nick("Alice", options=options_form({"pubsub#access_model": "open"}))
    )
    assert reply.get("type") == "result"
    items = f"<pubsub xmlns='{PS}'><items node='{NICK}'/></pubsub>"
    reply = await harness.iq(carol, "get", items, to="alice@localhost")
    assert [i.get("id") for i in reply.iter(f"{{{PS}}}item")] == ["current"]


async def test_malformed_forms_change_nothing(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bad_type = options_form({"pubsub#access_model": "open"}, form_type="urn:wrong")
    reply = await harness.iq(alice, "set", publish_nick("A", options=bad_type))
    assert error_of(reply)[1] == "bad-request"
    unknown = options_form({"pubsub#no_such_option": "1"})
    reply = await harness.iq(alice, "set", publish_nick("A", options=unknown))
    assert error_of(reply) == ("cancel", "conflict", "precondition-not-met")
    two_items = (
        f"<pubsub xmlns='{PS}'><publish node='n'><item id='1'><a xmlns='x'/></item>"
        "<item id='2'><a xmlns='x'/></item></publish></pubsub>"
    )
    reply = await harness.iq(alice, "set", two_items)
    assert error_of(reply) == ("modify", "bad-request", "invalid-payload")
    # XEP-0060 7.1.3.4 to 7.1.3.6: no item, no payload, two payloads in one item.
    no_item = f"<pubsub xmlns='{PS}'><publish node='n'/></pubsub>"
    assert error_of(await harness.iq(alice, "set", no_item))[2] == "item-required"
    empty = f"<pubsub xmlns='{PS}'><publish node='n'><item id='1'/></publish></pubsub>"
    assert error_of(await harness.iq(alice, "set", empty))[2] == "payload-required"
    two = (
        f"<pubsub xmlns='{PS}'><publish node='n'><item><a xmlns='x'/><b xmlns='x'/></item>"
        "</publish></pubsub>"
    )
    assert error_of(await harness.iq(alice, "set", two))[2] == "invalid-payload"
    assert await stored_names(harness) == []
    await harness.iq(alice, "set", publish_nick("A"))
    configure = (
        f"<pubsub xmlns='{OWNER}'><configure node='{NICK}'><x xmlns='jabber:x:data' "
        f"type='submit'><field var='FORM_TYPE' type='hidden'><value>{PS}#node_config</value>"
        "</field><field var='pubsub#max_items'><value>lots</value></field></x></configure>"
        "</pubsub>"
    )
    reply = await harness.iq(alice, "set", configure)
    assert error_of(reply)[1] == "not-acceptable"
    node = await pep(harness).service("alice@localhost").node(NICK)
    assert node is not None and node.config["pubsub#max_items"] == 1


# --- XEP-0060 section 8: configure, max_items, delete, purge -----------------------------------


def configure_form(fields: dict[str, str]) -> str:
    values = "".join(f"<field var='{k}'><value>{v}</value></field>" for k, v in fields.items())
    return (
        f"<pubsub xmlns='{OWNER}'><configure node='{NICK}'><x xmlns='jabber:x:data' "
        f"type='submit'><field var='FORM_TYPE' type='hidden'><value>{PS}#node_config</value>"
        f"</field>{values}</x></configure></pubsub>"
    )


async def test_max_items_and_configure(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("A", "1"))
    get = f"<pubsub xmlns='{OWNER}'><configure node='{NICK}'/></pubsub>"
    form = await harness.iq(alice, "get", get)
    fields = {
        f.get("var"): f.findtext("{jabber:x:data}value") for f in form.iter("{jabber:x:data}field")
    }
    assert fields["pubsub#max_items"] == "1" and fields["pubsub#access_model"] == "presence"
    reply = await harness.iq(alice, "set", configure_form({"pubsub#max_items": "2"}))
    assert reply.get("type") == "result"
    for item_id in ("2", "3"):
        await harness.iq(alice, "set", publish_nick("A" + item_id, item_id))
    items = f"<pubsub xmlns='{PS}'><items node='{NICK}'/></pubsub>"
    reply = await harness.iq(alice, "get", items)
    assert [i.get("id") for i in reply.iter(f"{{{PS}}}item")] == ["2", "3"]
    # max_items='1' in the request: the newest.
    reply = await harness.iq(alice, "get", items.replace("/>", " max_items='1'/>"))
    assert [i.get("id") for i in reply.iter(f"{{{PS}}}item")] == ["3"]
    # 'max': as many as the service allows (256 by default).
    await harness.iq(alice, "set", configure_form({"pubsub#max_items": "max"}))
    for item_id in ("4", "5"):
        await harness.iq(alice, "set", publish_nick("A" + item_id, item_id))
    reply = await harness.iq(alice, "get", items)
    assert [i.get("id") for i in reply.iter(f"{{{PS}}}item")] == ["2", "3", "4", "5"]
    # Down to one: the older item records are deleted too, not only unlisted.
    await harness.iq(alice, "set", configure_form({"pubsub#max_items": "1"}))
    assert [n for n in await stored_names(harness) if "/i/" in n] == [
        "alice/i/http%3A%2F%2Fjabber.org%2Fprotocol%2Fnick/5"
    ]


async def test_delete_and_purge_notify(harness: ModuleHarness) -> None:
    await befriend(harness, "alice@localhost", "bob@localhost")
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("A"))
    bob = await online(harness, "bob@localhost/b", [NICK])
    bob.take()
    purge = f"<pubsub xmlns='{OWNER}'><purge node='{NICK}'/></pubsub>"
    assert (await harness.iq(alice, "set", purge)).get("type") == "result"
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "purge")]
    delete = f"<pubsub xmlns='{OWNER}'><delete node='{NICK}'/></pubsub>"
    assert (await harness.iq(alice, "set", delete)).get("type") == "result"
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "delete")]
    assert await stored_names(harness) == []
    reply = await harness.iq(alice, "set", delete)
    assert error_of(reply)[1] == "item-not-found"
    reply = await harness.iq(bob, "set", delete, to="alice@localhost")
    assert error_of(reply)[1] == "forbidden"


# --- explicit subscriptions (XEP-0060 6.1, 6.2) -------------------------------------------------


async def test_subscribe_gets_last_item_and_notifications(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(
        alice, "set", publish_nick("A", options=options_form({"pubsub#access_model": "open"}))
    )
    carol = harness.session("carol@localhost/c")
    subscribe = subscription("subscribe", NICK, "carol@localhost/c")
    reply = await ask(harness, carol, "set", subscribe, to="alice@localhost")
    sub = reply.find(f"{{{PS}}}pubsub/{{{PS}}}subscription")
    assert sub is not None and sub.get("subscription") == "subscribed" and sub.get("subid")
    await settle(harness)
    assert events(carol.take()) == [("alice@localhost", "carol@localhost/c", "item current A")]
    await harness.iq(alice, "set", publish_nick("B", "new"))
    await settle(harness)
    assert events(carol.take()) == [("alice@localhost", "carol@localhost/c", "item new B")]
    # Someone else's JID: invalid-jid (XEP-0060 6.1.3.1).
    other = subscribe.replace("carol@localhost/c", "bob@localhost")
    reply = await harness.iq(carol, "set", other, to="alice@localhost")
    assert error_of(reply)[2] == "invalid-jid"
    unsubscribe = subscription("unsubscribe", NICK, "carol@localhost/c")
    reply = await harness.iq(carol, "set", unsubscribe, to="alice@localhost")
    assert reply.get("type") == "result"
    reply = await harness.iq(carol, "set", unsubscribe, to="alice@localhost")
    assert error_of(reply) == ("cancel", "unexpected-request", "not-subscribed")


# --- limits ---------------------------------------------------------------------------------


async def test_limits(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    big = "x" * 5000
    reply = await harness.iq(alice, "set", publish_nick(big))
    assert error_of(reply) == ("modify", "not-acceptable", "payload-too-big")
    assert await stored_names(harness) == []
    for n in range(5):
        reply = await harness.iq(alice, "set", publish_to(f"n{n}"))
        assert reply.get("type") == "result"
    reply = await harness.iq(alice, "set", publish_nick("A"))
    assert error_of(reply) == ("cancel", "not-allowed", "max-nodes-exceeded")
    assert len([n for n in await stored_names(harness) if "/n/" in n]) == 5


async def test_a_reload_applies_new_limits(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    assert (await harness.iq(alice, "set", publish_nick("x" * 3000))).get("type") == "result"
    pep = harness.host.modules["pep"]
    pep.reconfigure(pep.options.model_copy(update={"max_item_bytes": 2048}))
    reply = await harness.iq(alice, "set", publish_nick("x" * 3000))
    assert error_of(reply) == ("modify", "not-acceptable", "payload-too-big")


async def test_subscriptions_per_user_limit() -> None:
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {"max_subscriptions": 1}})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    for node in ("one", "two"):
        await harness.iq(alice, "set", publish_to(node, open_=True))
    carol = harness.session("carol@localhost/c")
    one = subscription("subscribe", "one", "carol@localhost")
    ok = await harness.iq(carol, "set", one, to="alice@localhost")
    assert ok.get("type") == "result"
    two = subscription("subscribe", "two", "carol@localhost")
    refused = await harness.iq(carol, "set", two, to="alice@localhost")
    assert error_of(refused) == ("cancel", "not-allowed", "too-many-subscriptions")


# --- storage: large items, concurrent publishers, removal ------------------------------------


async def test_large_item_in_the_blob_store(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    data = "d" * 2000  # over inline_item_bytes (1024), under max_item_bytes (4096)
    await harness.iq(alice, "set", publish_nick(data, "big"))
    blobs = await harness.host.blobs("localhost", "pep").list("alice/")
    assert len(blobs.keys) == 1
    reply = await harness.iq(alice, "get", f"<pubsub xmlns='{PS}'><items node='{NICK}'/></pubsub>")
    assert "".join(reply.itertext()) == data
    await harness.iq(alice, "set", publish_nick("small", "big"))  # replaced: the blob goes
    assert (await harness.host.blobs("localhost", "pep").list("alice/")).keys == []


class InterleavingItems(MemoryItemBackend):
    """An item store whose reads yield to the loop, as a networked one does: concurrent
    read-modify-writes then really read the same version before either writes."""

    lost = 0  # conditional writes refused

    async def get(self, namespace: str, name: str) -> Item | None:
        found = await super().get(namespace, name)
        await asyncio.sleep(0)  # the answer travels back while others read too
        return found

    async def transact(self, writes: Sequence[Write]) -> None:
        try:
            await super().transact(writes)
        except ConditionFailed:
            self.lost += 1
            raise


async def test_concurrent_publishers_lose_nothing() -> None:
    """Six publishes to one node at once (as from six cluster nodes): all read the
    same record; the conditional write makes the losers retry, so every item is
    listed and stored."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {}})
    harness.storage.items = items = InterleavingItems()
    await harness.start()
    service: PubSubService = pep(harness).service("alice@localhost")
    form = etree.fromstring(
        f"<x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'><value>{PS}#node_config"
        "</value></field><field var='pubsub#max_items'><value>10</value></field></x>"
    )
    await service.create("alice@localhost", "n", form)

    def item(i: int) -> etree._Element:
        return etree.fromstring(f"<item xmlns='{PS}' id='{i}'><a xmlns='x'/></item>")

    await asyncio.gather(
        *(service.publish("alice@localhost", "n", item(i), {}, auto_create=False) for i in range(6))
    )
    node = await service.existing("n")
    assert sorted(entry[0] for entry in node.items) == [str(i) for i in range(6)]
    assert len(await service.item_elements(node, [str(i) for i in range(6)])) == 6
    assert items.lost >= 5  # they did collide: at least one loser per winner but the last


async def test_account_removal_leaves_nothing(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("d" * 2000))  # a blob too
    await harness.iq(alice, "set", publish_to("other", open_=True))
    carol = harness.session("carol@localhost/c")
    subscribe = subscription("subscribe", "other", "carol@localhost")
    assert (await harness.iq(carol, "set", subscribe, to="alice@localhost")).get("type") == "result"
    await harness.iq(carol, "set", publish_nick("C"))
    assert await pep(harness).remove_user("localhost", "alice") is True
    left = await stored_names(harness)
    assert left and all(n.startswith(("carol/", "/u/")) for n in left)
    assert (await harness.host.blobs("localhost", "pep").list("alice/")).keys == []
    # Carol's subscription to alice's node is in carol's index; removing carol clears it.
    assert await pep(harness).remove_user("localhost", "carol") is True
    assert await stored_names(harness) == []
    assert await pep(harness).remove_user("localhost", "carol") is False


async def test_disco_says_pep(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{INFO}'/>", to="alice@localhost")
    identities = [(i.get("category"), i.get("type")) for i in reply.iter(f"{{{INFO}}}identity")]
    assert ("pubsub", "pep") in identities
    features = {f.get("var") for f in reply.iter(f"{{{INFO}}}feature")}
    assert {f"{PS}#publish", f"{PS}#publish-options", f"{PS}#auto-create"} <= features


async def test_roster_access_model_by_group(harness: ModuleHarness) -> None:
    """XEP-0060 6.1.3.3 (not-in-roster-group) and notifications by group."""
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    for contact, group in (("bob@localhost", "friends"), ("carol@localhost", "work")):
        await befriend(harness, "alice@localhost", contact)
        await roster.update(
            "alice@localhost",
            contact,
            lambda _, c=contact, g=group: RosterItem(c, subscription="both", groups=[g]),  # type: ignore[misc]
        )
    bob = await online(harness, "bob@localhost/b", [NICK])
    carol = await online(harness, "carol@localhost/c", [NICK])
    alice = harness.session("alice@localhost/a")
    options = options_form(
        {"pubsub#access_model": "roster", "pubsub#roster_groups_allowed": "friends"}
    )
    assert (await ask(harness, alice, "set", publish_nick("A", options=options))).get(
        "type"
    ) == "result"
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "item current A")]
    assert events(carol.take()) == []
    items = f"<pubsub xmlns='{PS}'><items node='{NICK}'/></pubsub>"
    reply = await harness.iq(carol, "get", items, to="alice@localhost")
    assert error_of(reply) == ("auth", "not-authorized", "not-in-roster-group")
    # At login too: the allowed group's resource gets the last item, the other not.
    bob2 = await online(harness, "bob@localhost/b2", [NICK])
    assert events(bob2.take()) == [("alice@localhost", "bob@localhost/b2", "item current A")]
    carol2 = await online(harness, "carol@localhost/c2", [NICK])
    assert events(carol2.take()) == []


async def test_notifications_without_payloads(harness: ModuleHarness) -> None:
    """XEP-0060 7.1.2.2: pubsub#deliver_payloads false sends the item id only."""
    await befriend(harness, "alice@localhost", "bob@localhost")
    bob = await online(harness, "bob@localhost/b", [NICK])
    alice = harness.session("alice@localhost/a")
    options = options_form({"pubsub#deliver_payloads": "false"})
    await ask(harness, alice, "set", publish_nick("Alice", options=options))
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "item current")]


async def test_names_that_fit_no_key_are_refused(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", publish_to("\u00e9" * 60))  # 360 bytes escaped
    assert error_of(reply)[1] == "not-acceptable"
    reply = await harness.iq(alice, "set", publish_nick("A", item_id="i" * 301))
    assert error_of(reply)[1] == "not-acceptable"
    assert await stored_names(harness) == []


class CountingItems(MemoryItemBackend):
    """Counts the PEP node and item records read from the store itself (behind any cache)."""

    node_reads = 0
    item_reads = 0

    def _count(self, namespace: str, names: Iterable[str]) -> None:
        if namespace.endswith("/pep"):
            for name in names:
                self.node_reads += "/n/" in name
                self.item_reads += "/i/" in name

    async def get(self, namespace: str, name: str) -> Item | None:
        self._count(namespace, [name])
        return await super().get(namespace, name)

    # batch_get is the base class's loop over get: counted there, once per name.


@pytest.mark.parametrize("cached", [True, False])
async def test_login_storm_reads_last_items_through_the_cache(cached: bool) -> None:
    """Ten users with the same twenty contacts (each with a nickname and avatar
    metadata) log in: with the shared cache, the contacts' node records (which hold
    the last items) are read from the store once in all, not once per login."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {}})
    store = CountingItems()
    now = [0.0]
    cache = MemoryCache(clock=lambda: now[0])
    harness.storage.items = CachedItemBackend(store, cache) if cached else store
    await harness.start()
    avatar = "urn:xmpp:avatar:metadata"
    contacts = [f"c{i}@localhost" for i in range(20)]
    harness.users.update(contacts)  # accounts: a probe to no such account cancels the sub
    for contact in contacts:
        service = pep(harness).service(contact)
        for node in (NICK, avatar):
            item = etree.fromstring(f"<item xmlns='{PS}' id='1'><x xmlns='{node}'/></item>")
            await service.publish(contact, node, item, {}, auto_create=True)
    viewers = [f"v{i}@localhost" for i in range(10)]
    for viewer in viewers:
        for contact in contacts:
            await befriend(harness, viewer, contact)
    now[0] += TOMBSTONE_TTL + 1  # the writes' tombstones are gone: reads fill the cache
    store.node_reads = 0
    for viewer in viewers:
        session = await online(harness, f"{viewer}/r", [NICK, avatar])
        assert len(events(session.take())) == 2 * len(contacts)
    # Each login asks for the viewer's own two nodes (none: every viewer's are
    # different keys) and the contacts' forty (the same for all).
    assert store.item_reads == 0  # the last items ride in the node records
    if cached:
        assert store.node_reads == 2 * len(contacts) + 2 * len(viewers)
    else:
        assert store.node_reads == (2 * len(contacts) + 2) * len(viewers)


class NetworkedCountingItems(CountingItems):
    """Counting, and each read yields to the loop as a networked store's does."""

    async def get(self, namespace: str, name: str) -> Item | None:
        await asyncio.sleep(0)
        return await super().get(namespace, name)


class GatedItems(MemoryItemBackend):
    """Reads of names ending in "slow" wait for `gate`; others yield once."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def get(self, namespace: str, name: str) -> Item | None:
        if name.endswith("slow"):
            await self.gate.wait()
        else:
            await asyncio.sleep(0)
        return await super().get(namespace, name)


async def test_a_shared_read_is_forgotten_when_it_ends_whoever_waits_for_it() -> None:
    """Two logins share a slow read; the second's own read ends first: it is
    forgotten at once (a later login reads afresh), not when the slow one ends."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {}})
    harness.storage.items = store = GatedItems()
    await harness.start()
    module = pep(harness)
    first = asyncio.ensure_future(module._node_records("localhost", ["a/slow"]))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(module._node_records("localhost", ["a/slow", "b/fast"]))
    for _ in range(10):
        await asyncio.sleep(0)
    assert set(module._reading) == {("localhost", "a/slow")}
    store.gate.set()
    assert await first == {} and await second == {}
    assert module._reading == {}


async def test_a_login_storm_at_once_reads_each_record_once() -> None:
    """Ten users with the same twenty contacts log in at the same moment, before any
    read has filled the cache: each contact's node record is still read from the
    store once in all (the reads under way are shared), not once per login."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {}})
    store = NetworkedCountingItems()
    now = [0.0]
    harness.storage.items = CachedItemBackend(store, MemoryCache(clock=lambda: now[0]))
    await harness.start()
    avatar = "urn:xmpp:avatar:metadata"
    contacts = [f"c{i}@localhost" for i in range(20)]
    harness.users.update(contacts)  # accounts: a probe to no such account cancels the sub
    for contact in contacts:
        service = pep(harness).service(contact)
        for node in (NICK, avatar):
            item = etree.fromstring(f"<item xmlns='{PS}' id='1'><x xmlns='{node}'/></item>")
            await service.publish(contact, node, item, {}, auto_create=True)
    viewers = [f"v{i}@localhost" for i in range(10)]
    for viewer in viewers:
        for contact in contacts:
            await befriend(harness, viewer, contact)
    await online(harness, "v0@localhost/first", [NICK, avatar])  # the caps are known now
    now[0] += TOMBSTONE_TTL + 1
    harness.storage.items = CachedItemBackend(store, MemoryCache(clock=lambda: now[0]))
    store.node_reads = 0
    errors: list[dict[str, object]] = []  # what callbacks raised, the loop would only log
    asyncio.get_running_loop().set_exception_handler(lambda _loop, context: errors.append(context))
    sessions = [harness.session(f"{viewer}/r", available=False) for viewer in viewers]
    for session in sessions:
        session.receive(caps_presence(session, [NICK, avatar]))
    await settle(harness)
    for session in sessions:
        assert len(events(session.take())) == 2 * len(contacts)
    assert store.node_reads == 2 * len(contacts) + 2 * len(viewers)
    assert pep(harness)._reading == {}  # nothing kept once read: later logins read afresh
    assert errors == []
    nick = etree.fromstring(f"<item xmlns='{PS}' id='2'><nick xmlns='{NICK}'>new</nick></item>")
    await pep(harness).service("c0@localhost").publish("c0@localhost", NICK, nick, {},
                                                       auto_create=True)
    late = await online(harness, "v1@localhost/late", [NICK])
    assert ("c0@localhost", "v1@localhost/late", "item 2 new") in events(late.take())


def caps_presence(session: TestSession, notify: Iterable[str]) -> etree._Element:
    _features, ver = caps_ver(notify)
    presence = parse_stanza(
        f"<presence><c xmlns='{CAPS}' hash='sha-1' node='https://t.example' ver='{ver}'/>"
        "</presence>"
    )
    presence.set("from", session.jid)
    return presence


async def test_one_question_for_a_login_storm_of_one_client(harness: ModuleHarness) -> None:
    """Three resources with the same new caps come online at once: one disco#info; the
    other two take its verified answer and get the last item too."""
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    sessions = [harness.session(f"alice@localhost/r{i}", available=False) for i in range(3)]
    for session in sessions:
        session.receive(caps_presence(session, [NICK]))
    for _ in range(300):
        asked = [(s, q) for s in sessions for q in s.received if q.tag == IQ]
        if asked:
            break
        await asyncio.sleep(0)
    for _ in range(50):
        await asyncio.sleep(0)
    asked = [(s, q) for s in sessions for q in s.received if q.tag == IQ]
    assert len(asked) == 1
    session, question = asked[0]
    features, _ver = caps_ver([NICK])
    query = "".join(f"<feature var='{f}'/>" for f in features)
    answer = parse_stanza(
        f"<iq type='result' id='{question.get('id')}' to='alice@localhost'>"
        f"<query xmlns='{INFO}'><identity category='client' type='pc' name='t'/>{query}"
        "</query></iq>"
    )
    answer.set("from", session.jid)
    session.receive(answer)
    await settle(harness)
    for session in sessions:
        assert events(session.take()) == [("alice@localhost", session.jid, "item current Alice")]


async def test_shutdown_does_not_wait_for_a_silent_client(harness: ModuleHarness) -> None:
    session = harness.session("bob@localhost/b", available=False)
    session.receive(caps_presence(session, [NICK]))
    for _ in range(300):
        if [s for s in session.received if s.tag == IQ]:
            break
        await asyncio.sleep(0)
    assert [s for s in session.received if s.tag == IQ]  # asked, never answers
    await harness.host.fire("server/stopping")
    await asyncio.wait_for(harness.router.drain(), 1)  # not the 10 s of the question


async def test_disco_items_lists_own_nodes_and_items(harness: ModuleHarness) -> None:
    """XEP-0060 5.2 and 5.5 on the account's bare JID (owner only)."""
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("A"))
    items = "http://jabber.org/protocol/disco#items"
    reply = await harness.iq(alice, "get", f"<query xmlns='{items}'/>", to="alice@localhost")
    assert [(i.get("jid"), i.get("node")) for i in reply.iter(f"{{{items}}}item")] == [
        ("alice@localhost", NICK)
    ]
    reply = await harness.iq(
        alice, "get", f"<query xmlns='{items}' node='{NICK}'/>", to="alice@localhost"
    )
    assert [i.get("name") for i in reply.iter(f"{{{items}}}item")] == ["current"]
    bob = harness.session("bob@localhost/b")
    reply = await harness.iq(bob, "get", f"<query xmlns='{items}'/>", to="alice@localhost")
    assert error_of(reply)[1] == "service-unavailable"


async def test_more_items_than_one_transaction_takes(harness: ModuleHarness) -> None:
    """A hundred items dropped at once (max_items lowered, then the node deleted):
    ninety go in the node's transaction (DynamoDB takes 100 writes), the rest after."""
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("0", "0"))
    await harness.iq(alice, "set", configure_form({"pubsub#max_items": "max"}))
    for i in range(1, 101):
        await harness.iq(alice, "set", publish_nick(str(i), str(i)))

    def item_records(names: list[str]) -> list[str]:
        return [n for n in names if "/i/" in n]

    assert len(item_records(await stored_names(harness))) == 101
    await harness.iq(alice, "set", configure_form({"pubsub#max_items": "1"}))
    assert item_records(await stored_names(harness)) == [
        "alice/i/http%3A%2F%2Fjabber.org%2Fprotocol%2Fnick/100"
    ]
    await harness.iq(alice, "set", configure_form({"pubsub#max_items": "max"}))
    for i in range(101, 201):
        await harness.iq(alice, "set", publish_nick(str(i), str(i)))
    await harness.iq(alice, "set", f"<pubsub xmlns='{OWNER}'><delete node='{NICK}'/></pubsub>")
    assert await stored_names(harness) == []


async def test_a_new_interest_later_brings_the_last_item(harness: ModuleHarness) -> None:
    """A client that starts asking for a node later (new caps in a later presence)
    gets that node's last item then, and nothing again for nodes it had."""
    await befriend(harness, "alice@localhost", "bob@localhost")
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    await harness.iq(alice, "set", publish_to("urn:other"))
    bob = await online(harness, "bob@localhost/b", ["urn:other"])
    assert len(events(bob.take())) == 1  # urn:other's item, at login
    bob.receive(caps_presence(bob, ["urn:other", NICK]))
    questions: list[etree._Element] = []
    for _ in range(300):
        questions = [s for s in bob.received if s.tag == IQ]
        if questions:
            break
        await asyncio.sleep(0)
    features, _ver = caps_ver(["urn:other", NICK])
    query = "".join(f"<feature var='{f}'/>" for f in features)
    answer = parse_stanza(
        f"<iq type='result' id='{questions[0].get('id')}' to='bob@localhost'>"
        f"<query xmlns='{INFO}'><identity category='client' type='pc' name='t'/>{query}"
        "</query></iq>"
    )
    answer.set("from", bob.jid)
    bob.receive(answer)
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "item current Alice")]


async def test_no_such_account(harness: ModuleHarness) -> None:
    """RFC 6121 8.5.1: an IQ to an account that does not exist: service-unavailable."""
    bob = harness.session("bob@localhost/b")
    items = f"<pubsub xmlns='{PS}'><items node='{NICK}'/></pubsub>"
    reply = await harness.iq(bob, "get", items, to="nobody@localhost")
    assert error_of(reply)[1] == "service-unavailable"


async def test_affiliations_per_node_are_capped() -> None:
    """A PEP node keeps at most `max_affiliations` (the account counted): a request
    past it is refused whole, nothing indexed."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {"max_affiliations": 2}})
    harness.users.update({"alice@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    assert (await harness.iq(alice, "set", publish_to("n"))).get("type") == "result"
    request = (
        f"<pubsub xmlns='{OWNER}'><affiliations node='n'>"
        "<affiliation jid='bob@localhost' affiliation='member'/>"
        "<affiliation jid='carol@localhost' affiliation='member'/>"
        "</affiliations></pubsub>"
    )
    assert error_of(await harness.iq(alice, "set", request))[:2] == ("modify", "not-acceptable")
    service = pep(harness).service("alice@localhost")
    assert (await service.existing("n")).affiliations == {"alice@localhost": "owner"}
    assert await harness.host.items("localhost", "pep").get(
        service.affiliations_key("bob@localhost")) is None
    one = request.replace("<affiliation jid='carol@localhost' affiliation='member'/>", "")
    assert (await harness.iq(alice, "set", one)).get("type") == "result"


class InterleavingQueries(InterleavingItems):
    """`InterleavingItems` whose queries yield to the loop too."""

    async def query(self, namespace: str, query: Query) -> Page:
        page = await super().query(namespace, query)
        await asyncio.sleep(0)
        return page


async def test_concurrent_first_publishes_keep_the_node_limit() -> None:
    """Five first publishes at once, to five new nodes of an account allowed two (as
    from clients on several cluster nodes): the node count's conditional write
    makes the losers read it again, so two nodes are made and three refused."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {"max_nodes": 2}})
    harness.storage.items = items = InterleavingQueries()
    await harness.start()
    service: PubSubService = pep(harness).service("alice@localhost")

    def item() -> etree._Element:
        return etree.fromstring(f"<item xmlns='{PS}' id='1'><a xmlns='x'/></item>")

    results = await asyncio.gather(
        *(service.publish("alice@localhost", f"n{i}", item(), {}, auto_create=True)
          for i in range(5)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, StanzaError)]
    assert [r.condition for r in refused] == ["not-allowed"] * 3, results
    assert len(await service.node_names()) == 2
    assert (await service.items.get(service.node_count_key())).attrs == {"n": 2}
    assert items.lost > 0


# --- XEP-0163 4.3.3: no events to a contact the owner blocked --------------------------------


async def with_rules() -> ModuleHarness:
    """Alice, Bob and Carol share presence each with each; blocking and privacy on."""
    harness = ModuleHarness(
        {"roster": {}, "presence": {}, "pep": {}, "disco": {}, "blocking": {}, "privacy": {}}
    )
    harness.users.update({"alice@localhost", "bob@localhost", "carol@localhost"})
    await harness.start()
    await befriend(harness, "alice@localhost", "bob@localhost")
    await befriend(harness, "alice@localhost", "carol@localhost")
    await befriend(harness, "bob@localhost", "carol@localhost")
    return harness


BLOCK_BOB = "<block xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></block>"


async def test_a_blocked_contact_gets_no_events_live_at_login_or_subscribed() -> None:
    """Alice blocks Bob (XEP-0191): his resources that asked for her nickname get
    neither her new one nor, at login, the last one; nor does his explicit
    subscription (XEP-0060). Carol's copies of the same fan-out, and of the same
    login's last items, come after where Bob's would, and mark that they were sent."""
    harness = await with_rules()
    carol = harness.session("carol@localhost/c")
    await harness.iq(carol, "set", publish_nick("Carol"))
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    bob_plain = harness.session("bob@localhost/p")  # no +notify: only the subscription
    subscribe = subscription("subscribe", NICK, "bob@localhost/p")
    assert (await ask(harness, bob_plain, "set", subscribe, to="alice@localhost")).get(
        "type") == "result"
    bob = await online(harness, "bob@localhost/b", [NICK])
    carol_watching = await online(harness, "carol@localhost/w", [NICK])
    await settle(harness)
    for session in (bob_plain, bob, carol_watching):
        session.take()
    assert (await ask(harness, alice, "set", BLOCK_BOB)).get("type") == "result"
    await harness.iq(alice, "set", publish_nick("Alice again", "new"))
    await settle(harness)
    assert events(carol_watching.take()) == [
        ("alice@localhost", "carol@localhost/w", "item new Alice again")
    ]
    assert events(bob.take()) == []
    assert events(bob_plain.take()) == []
    # At login Bob's roster names Alice, then Carol: Carol's item comes after Alice's would.
    bob_later = await online(harness, "bob@localhost/later", [NICK])
    assert events(bob_later.take()) == [
        ("carol@localhost", "bob@localhost/later", "item current Carol")
    ]
    # Unblocked, he gets them again.
    unblock = "<unblock xmlns='urn:xmpp:blocking'><item jid='bob@localhost'/></unblock>"
    assert (await ask(harness, alice, "set", unblock)).get("type") == "result"
    await harness.iq(alice, "set", publish_nick("Alice three", "third"))
    await settle(harness)
    assert events(bob.take()) == [("alice@localhost", "bob@localhost/b", "item third Alice three")]
    assert events(bob_plain.take()) == [
        ("alice@localhost", "bob@localhost/p", "item third Alice three")
    ]


@pytest.mark.parametrize(
    ("kinds", "sent"),
    [
        ("", False),  # every stanza: an outbound message too
        ("<presence-out/>", False),  # XEP-0163 4.3.3: blocked from receiving any kind
        ("<message/>", True),  # only messages FROM Bob: he is not kept from receiving
    ],
)
async def test_the_owners_default_privacy_list_keeps_events_from_who_it_denies(
    kinds: str, sent: bool
) -> None:
    """Alice's default privacy list (XEP-0016) denies Bob: live events and last items
    reach him only when the item does not keep him from receiving anything of hers.
    Carol's copies mark where Bob's would have come (see the test above)."""
    harness = await with_rules()
    carol = harness.session("carol@localhost/c")
    await harness.iq(carol, "set", publish_nick("Carol"))
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    privacy = "<query xmlns='jabber:iq:privacy'>{}</query>"
    deny = (
        "<list name='l'><item type='jid' value='bob@localhost' action='deny' order='1'>"
        f"{kinds}</item><item action='allow' order='2'/></list>"
    )
    assert (await ask(harness, alice, "set", privacy.format(deny))).get("type") == "result"
    assert (await ask(harness, alice, "set", privacy.format("<default name='l'/>"))).get(
        "type") == "result"
    bob = await online(harness, "bob@localhost/b", [NICK])
    alices = [("alice@localhost", "bob@localhost/b", "item current Alice")] if sent else []
    assert events(bob.take()) == [
        *alices, ("carol@localhost", "bob@localhost/b", "item current Carol")
    ]
    carol_watching = await online(harness, "carol@localhost/w", [NICK])
    carol_watching.take()
    await harness.iq(alice, "set", publish_nick("Alice again", "new"))
    await settle(harness)
    assert events(carol_watching.take()) == [
        ("alice@localhost", "carol@localhost/w", "item new Alice again")
    ]
    again = [("alice@localhost", "bob@localhost/b", "item new Alice again")] if sent else []
    assert events(bob.take()) == again


@pytest.mark.parametrize("alices_side", ["to", None])
async def test_last_items_follow_the_owners_roster_not_the_contacts(
    alices_side: str | None,
) -> None:
    """XEP-0060 4.5, XEP-0163 4: under the presence model only those the OWNER shares
    presence with see the items. Alice revoked Bob's subscription (her item for him
    'to'), or removed him, but Bob's roster still says 'both' (his server never
    applied her unsubscribed): at login he gets no last item of hers. Carol's, next
    in his roster, marks where Alice's would have come."""
    harness = await with_rules()
    carol = harness.session("carol@localhost/c")
    await harness.iq(carol, "set", publish_nick("Carol"))
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", publish_nick("Alice"))
    roster = harness.host.modules["roster"]
    assert isinstance(roster, RosterModule)
    await roster.update(
        "alice@localhost", "bob@localhost",
        lambda _: None if alices_side is None else RosterItem("bob@localhost", subscription="to"),
    )
    assert (await roster.item("bob@localhost", "alice@localhost")).subscription == "both"
    bob = await online(harness, "bob@localhost/b", [NICK])
    assert events(bob.take()) == [("carol@localhost", "bob@localhost/b", "item current Carol")]
