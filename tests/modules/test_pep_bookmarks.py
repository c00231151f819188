"""XEP-0402 5.3 and XEP-0411: the same bookmarks through XEP-0402 PEP items, XEP-0048 in
private XML storage and XEP-0048 in PEP, whichever a client writes, without sockets."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from lxml import etree

from tests.modules.test_pep import befriend, error_of, events, online
from xmppd.modules._pubsub_engine import ITEMS_READ
from xmppd.modules.pep import Pep
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.base import Item
from xmppd.testing import ModuleHarness, TestSession

PS = "http://jabber.org/protocol/pubsub"
NATIVE = "urn:xmpp:bookmarks:1"
LEGACY = "storage:bookmarks"
PRIVATE = "jabber:iq:private"
INFO = "http://jabber.org/protocol/disco#info"
EXTENSIONS = "<extensions><x xmlns='urn:e'/></extensions>"


@pytest.fixture
async def harness() -> ModuleHarness:
    modules = {"roster": {}, "presence": {}, "pep": {}, "private": {}, "disco": {}}
    harness = ModuleHarness(modules, users={"alice@localhost"})
    return await harness.start()


async def ok(harness: ModuleHarness, session: TestSession, type_: str, payload: str,
             to: str | None = None) -> etree._Element:
    reply = await harness.iq(session, type_, payload, to)
    assert reply.get("type") == "result", etree.tostring(reply)
    return reply


NATIVE_OPTIONS = (
    "<publish-options><x xmlns='jabber:x:data' type='submit'>"
    f"<field var='FORM_TYPE' type='hidden'><value>{PS}#publish-options</value></field>"
    "<field var='pubsub#persist_items'><value>true</value></field>"
    "<field var='pubsub#max_items'><value>max</value></field>"
    "<field var='pubsub#send_last_published_item'><value>never</value></field>"
    "<field var='pubsub#access_model'><value>whitelist</value></field>"
    "</x></publish-options>"
)


def publish_native(room: str, conference: str) -> str:
    """XEP-0402 example 3."""
    return (f"<pubsub xmlns='{PS}'><publish node='{NATIVE}'><item id='{room}'>"
            f"<conference xmlns='{NATIVE}' {conference}</conference></item></publish>"
            f"{NATIVE_OPTIONS}</pubsub>")


async def native(harness: ModuleHarness, session: TestSession) -> dict[str, str]:
    """Room -> the XEP-0402 conference, canonical XML."""
    reply = await ok(harness, session, "get",
                     f"<pubsub xmlns='{PS}'><items node='{NATIVE}'/></pubsub>")
    return {item.get("id") or "": _canonical(item[0]) for item in reply.iter(f"{{{PS}}}item")}


async def private(harness: ModuleHarness, session: TestSession) -> etree._Element:
    reply = await ok(harness, session, "get",
                     f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'/></query>")
    storage = reply.find(f"{{{PRIVATE}}}query/{{{LEGACY}}}storage")
    assert storage is not None
    return storage


async def legacy_pep(harness: ModuleHarness, session: TestSession) -> etree._Element:
    reply = await ok(harness, session, "get",
                     f"<pubsub xmlns='{PS}'><items node='{LEGACY}'/></pubsub>")
    storage = reply.find(f".//{{{PS}}}item/{{{LEGACY}}}storage")
    assert storage is not None
    return storage


def rooms(storage: etree._Element) -> dict[str, tuple[str | None, str | None, str | None]]:
    """Room -> (name, autojoin, nick) of a XEP-0048 <storage/>."""
    return {c.get("jid") or "": (c.get("name"), c.get("autojoin"), c.findtext(f"{{{LEGACY}}}nick"))
            for c in storage.findall(f"{{{LEGACY}}}conference")}


def _canonical(element: etree._Element) -> str:
    return etree.tostring(etree.fromstring(etree.tostring(element)), method="c14n").decode()


def conference(attrs: str, inner: str = "") -> str:
    xml = f"<conference xmlns='{NATIVE}' {attrs}>{inner}</conference>"
    return _canonical(etree.fromstring(xml))


async def test_conversion_is_advertised_on_the_account(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await ok(harness, alice, "get", f"<query xmlns='{INFO}'/>", "alice@localhost")
    features = {f.get("var") for f in reply.iter(f"{{{INFO}}}feature")}
    assert {f"{NATIVE}#compat", f"{NATIVE}#compat-pep",
            "urn:xmpp:bookmarks-conversion:0"} <= features


async def test_native_bookmarks_appear_in_both_legacy_stores(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    # A URL bookmark a legacy client keeps: XEP-0402 has no place for it, it stays.
    await ok(harness, alice, "set", f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'>"
             "<url name='Site' url='https://a.example/'/></storage></query>")
    await ok(harness, alice, "set", publish_native(
        "theplay@conference.shakespeare.lit",
        f"name='The Play' autojoin='true'><nick>JC</nick>{EXTENSIONS}"))
    await ok(harness, alice, "set", publish_native("orchard@conference.shakespeare.lit",
                                                   "name='Orchard'>"))
    expected = {"theplay@conference.shakespeare.lit": ("The Play", "true", "JC"),
                "orchard@conference.shakespeare.lit": ("Orchard", "false", None)}
    stored = await private(harness, alice)
    assert rooms(stored) == expected
    assert [u.get("url") for u in stored.findall(f"{{{LEGACY}}}url")] == ["https://a.example/"]
    assert rooms(await legacy_pep(harness, alice)) == expected
    # A retraction (XEP-0402 example 6) leaves it out of both.
    await ok(harness, alice, "set", f"<pubsub xmlns='{PS}'><retract node='{NATIVE}' notify='true'>"
             "<item id='orchard@conference.shakespeare.lit'/></retract></pubsub>")
    del expected["orchard@conference.shakespeare.lit"]
    assert rooms(await private(harness, alice)) == expected
    assert rooms(await legacy_pep(harness, alice)) == expected


async def test_private_storage_bookmarks_become_native_items(harness: ModuleHarness) -> None:
    alice = await online(harness, "alice@localhost/a", [NATIVE])
    await ok(harness, alice, "set", publish_native(
        "theplay@conference.shakespeare.lit",
        f"name='The Play' autojoin='true'><nick>JC</nick>{EXTENSIONS}"))
    await ok(harness, alice, "set", publish_native("gone@conference.shakespeare.lit", "name='G'>"))
    # XEP-0048 example 3 in private storage: the play renamed, gone dropped, one new.
    stanza = (f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'>"
              "<conference name='Play' autojoin='1' jid='theplay@conference.shakespeare.lit'>"
              "<nick>JC</nick></conference>"
              "<conference jid='new@conference.shakespeare.lit' autojoin='false'>"
              "<password>pw</password></conference>"
              "<url name='Site' url='https://a.example/'/></storage></query>")
    alice.take()
    got = await harness.send(alice, f"<iq type='set' id='p1'>{stanza}</iq>")
    assert [r.get("type") for r in got if r.get("id") == "p1"] == ["result"]
    # The client's other resources hear of it as of any XEP-0402 change.
    assert sorted(what for _, _, what in events(got)) == [
        "item new@conference.shakespeare.lit pw",
        "item theplay@conference.shakespeare.lit JC",
        "retract gone@conference.shakespeare.lit",
    ]
    assert await native(harness, alice) == {
        # The client's <extensions/> kept (XEP-0402 5.3.2).
        "theplay@conference.shakespeare.lit": conference(
            "name='Play' autojoin='true'", f"<nick>JC</nick>{EXTENSIONS}"),
        "new@conference.shakespeare.lit": conference("", "<password>pw</password>"),
    }
    # The other XEP-0048 store has the same, and the stored private data is the client's.
    assert rooms(await legacy_pep(harness, alice)) == {
        "theplay@conference.shakespeare.lit": ("Play", "1", "JC"),
        "new@conference.shakespeare.lit": (None, "false", None),
    }
    assert len((await private(harness, alice)).findall(f"{{{LEGACY}}}url")) == 1
    # A <storage/> with nothing changed writes nothing new.
    got = await harness.send(alice, f"<iq type='set' id='p2'>{stanza}</iq>")
    assert [r.get("type") for r in got if r.get("id") == "p2"] == ["result"]
    assert events(got) == []


async def test_legacy_pep_bookmarks_become_native_items_and_private(
    harness: ModuleHarness,
) -> None:
    alice = harness.session("alice@localhost/a")
    await ok(harness, alice, "set",
             f"<pubsub xmlns='{PS}'><publish node='{LEGACY}'><item id='current'>"
             f"<storage xmlns='{LEGACY}'><conference jid='a@c.example' name='A' autojoin='true'>"
             "<nick>al</nick></conference></storage></item></publish></pubsub>")
    assert await native(harness, alice) == {
        "a@c.example": conference("name='A' autojoin='true'", "<nick>al</nick>")}
    assert rooms(await private(harness, alice)) == {"a@c.example": ("A", "true", "al")}


async def contact_reads(harness: ModuleHarness, node: str) -> etree._Element:
    """What bob, with a presence subscription to alice, gets asking for her `node`."""
    bob = harness.session("bob@localhost/b")
    return await harness.iq(bob, "get", f"<pubsub xmlns='{PS}'><items node='{node}'/></pubsub>",
                            "alice@localhost")


@pytest.fixture
async def friends() -> ModuleHarness:
    modules = {"roster": {}, "presence": {}, "pep": {}, "private": {}, "disco": {}}
    harness = ModuleHarness(modules, users={"alice@localhost", "bob@localhost"})
    await harness.start()
    await befriend(harness, "alice@localhost", "bob@localhost")
    return harness


@pytest.mark.parametrize("node", [NATIVE, LEGACY])
async def test_private_bookmarks_never_land_in_a_node_contacts_read(
    friends: ModuleHarness, node: str,
) -> None:
    """A bookmark node a client made readable by its contacts (published to without
    the publish-options XEP-0402 5.2 requires, then configured so, or made before the
    server enforced them) is made whitelist again when the conversion copies the
    private bookmarks, room passwords included, into it."""
    alice = friends.session("alice@localhost/a")
    payload = (f"<conference xmlns='{NATIVE}'/>" if node == NATIVE
               else f"<storage xmlns='{LEGACY}'/>")
    await ok(friends, alice, "set", f"<pubsub xmlns='{PS}'><publish node='{node}'>"
             f"<item id='x@c.example'>{payload}</item></publish></pubsub>")
    await ok(friends, alice, "set",
             f"<pubsub xmlns='{PS}#owner'><configure node='{node}'><x xmlns='jabber:x:data' "
             f"type='submit'><field var='FORM_TYPE' type='hidden'><value>{PS}#node_config</value>"
             "</field><field var='pubsub#access_model'><value>presence</value></field></x>"
             "</configure></pubsub>")
    assert (await contact_reads(friends, node)).get("type") == "result"
    await ok(friends, alice, "set", f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'>"
             "<conference jid='secret@c.example'><password>pw</password></conference>"
             "</storage></query>")
    reply = await contact_reads(friends, node)
    assert reply.get("type") == "error"
    assert b"pw" not in etree.tostring(reply)
    assert error_of(reply)[1:] == ("not-allowed", "closed-node")


@pytest.mark.parametrize("node", [NATIVE, LEGACY])
async def test_bookmark_nodes_made_without_options_are_whitelist(
    friends: ModuleHarness, node: str,
) -> None:
    """A client's publish without publish-options makes the node private, not presence."""
    alice = friends.session("alice@localhost/a")
    payload = (f"<conference xmlns='{NATIVE}'><password>pw</password></conference>"
               if node == NATIVE else f"<storage xmlns='{LEGACY}'/>")
    await ok(friends, alice, "set", f"<pubsub xmlns='{PS}'><publish node='{node}'>"
             f"<item id='x@c.example'>{payload}</item></publish></pubsub>")
    assert error_of(await contact_reads(friends, node))[1:] == ("not-allowed", "closed-node")


class BatchSizes(MemoryItemBackend):
    """Records how many item records of the PEP store each batch read asks for."""

    largest = 0
    total = 0

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        if namespace.endswith("/pep"):
            asked = sum("/i/" in name for name in names)
            self.largest = max(self.largest, asked)
            self.total += asked
        return await super().batch_get(namespace, names)


async def test_conversions_read_a_large_node_a_page_at_a_time() -> None:
    """Sixty XEP-0402 bookmarks of 20 KiB each (their <extensions/>): both conversions
    read them a page at a time, never the node at once, each record once, and still
    carry every room and keep the extensions of a changed one."""
    modules = {"roster": {}, "presence": {}, "pep": {}, "private": {}, "disco": {}}
    harness = ModuleHarness(modules, users={"alice@localhost"})
    harness.storage.items = store = BatchSizes()
    await harness.start()
    module = harness.host.modules["pep"]
    assert isinstance(module, Pep)
    big = f"<extensions><x xmlns='urn:e'>{'e' * 20_000}</x></extensions>"
    for i in range(60):
        item = etree.fromstring(f"<item xmlns='{PS}' id='r{i:02}@c.example'>"
                                f"<conference xmlns='{NATIVE}' name='R{i}'>{big}</conference>"
                                "</item>")
        await module.publish("alice@localhost", NATIVE, item, {"pubsub#max_items": "max"})
    alice = harness.session("alice@localhost/a")
    store.largest = store.total = 0
    await ok(harness, alice, "set", publish_native("new@c.example", "name='New'>"))
    assert store.total == 61  # each record read once, none again for the next page
    expected = {f"r{i:02}@c.example": (f"R{i}", "false", None) for i in range(60)}
    expected["new@c.example"] = ("New", "false", None)
    assert rooms(await private(harness, alice)) == expected
    assert rooms(await legacy_pep(harness, alice)) == expected
    assert 0 < store.largest <= ITEMS_READ
    # Back: r00 renamed, new@ dropped, the rest the same.
    store.largest = 0
    conferences = "".join(f"<conference jid='r{i:02}@c.example' name='R{i}'/>"
                          for i in range(1, 60))
    await ok(harness, alice, "set", f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'>"
             f"<conference jid='r00@c.example' name='First'/>{conferences}</storage></query>")
    assert 0 < store.largest <= ITEMS_READ
    service = module.service("alice@localhost")
    node = await service.existing(NATIVE)
    assert sorted(entry[0] for entry in node.items) == sorted(
        f"r{i:02}@c.example" for i in range(60))
    (first,) = await service.item_elements(node, ["r00@c.example"])
    assert first[0].get("name") == "First"
    assert first.find(f"{{{NATIVE}}}conference/{{{NATIVE}}}extensions") is not None


async def test_bookmarks_past_what_the_legacy_stores_take_stop_the_reading() -> None:
    """XEP-0402 bookmarks whose XEP-0048 <storage/> neither store would take (over
    both `max_item_bytes` and private `max_bytes`): the conversion stops reading at
    that size, a page in, writes neither store, and the client's publish stands."""
    modules = {"roster": {}, "presence": {}, "pep": {"max_item_bytes": 4096},
               "private": {"max_bytes": 4096}, "disco": {}}
    harness = ModuleHarness(modules, users={"alice@localhost"})
    harness.storage.items = store = BatchSizes()
    await harness.start()
    module = harness.host.modules["pep"]
    assert isinstance(module, Pep)
    for i in range(200):
        item = etree.fromstring(f"<item xmlns='{PS}' id='r{i:03}@c.example'>"
                                f"<conference xmlns='{NATIVE}' name='{'n' * 1500}'/></item>")
        await module.publish("alice@localhost", NATIVE, item, {"pubsub#max_items": "max"})
    alice = harness.session("alice@localhost/a")
    store.total = 0
    await ok(harness, alice, "set", publish_native("new@c.example", "name='New'>"))
    assert 0 < store.total < 200
    reply = await harness.iq(alice, "get", f"<query xmlns='{PRIVATE}'><storage xmlns='{LEGACY}'/>"
                             "</query>")
    assert reply.find(f".//{{{LEGACY}}}storage/{{{LEGACY}}}conference") is None
    assert await module.service("alice@localhost").node(LEGACY) is None
