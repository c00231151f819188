"""The roster module (RFC 6121 section 2, XEP-0237) through the module host, without sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest
from lxml import etree

from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Attrs, ConditionFailed, Item, ItemBackend, Page, Query, StorageError
from xmppd.testing import ModuleHarness, TestSession

R = "jabber:iq:roster"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
Q = f"{{{R}}}query"
ITEM = f"{{{R}}}item"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def roster_module(harness: ModuleHarness) -> RosterModule:
    module = harness.host.modules["roster"]
    assert isinstance(module, RosterModule)
    return module


def items_of(reply: etree._Element) -> dict[str, dict[str, object]]:
    """The items of a roster result or push, as plain data."""
    query = reply.find(Q)
    assert query is not None, etree.tostring(reply)
    return {
        item.get("jid"): {
            **dict(item.attrib),
            "groups": [g.text for g in item.iterchildren(f"{{{R}}}group")],
        }
        for item in query.iterchildren(ITEM)
    }


def pushes(stanzas: Sequence[etree._Element]) -> list[etree._Element]:
    return [s for s in stanzas if s.tag == "{jabber:client}iq" and s.get("type") == "set"]


async def roster_set(harness: ModuleHarness, session: TestSession, item: str) -> etree._Element:
    """Send a roster set; return the answer, leaving the pushes in `session.received`."""
    stanzas = await harness.send(
        session, f"<iq type='set' id='s1'><query xmlns='{R}'>{item}</query></iq>"
    )
    (reply,) = [s for s in stanzas if s.get("id") == "s1"]
    session.received.extend(s for s in stanzas if s.get("id") != "s1")
    return reply


@pytest.fixture
async def harness() -> ModuleHarness:
    return await ModuleHarness({"roster": {"max_items": 5, "max_name_length": 20}}).start()


async def test_empty_roster_and_versioning(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    assert reply.get("type") == "result" and items_of(reply) == {}
    assert reply.find(Q).get("ver") is None  # the client did not ask for versioning
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}' ver=''/>")
    empty_ver = reply.find(Q).get("ver")
    assert empty_ver
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}' ver='{empty_ver}'/>")
    assert reply.get("type") == "result" and len(reply) == 0

    assert (await roster_set(harness, alice, "<item jid='bob@localhost'/>")).get("type") == "result"
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}' ver='{empty_ver}'/>")
    ver1 = reply.find(Q).get("ver")
    assert ver1 not in (None, empty_ver) and list(items_of(reply)) == ["bob@localhost"]
    # current: empty result; pushes carry the new version
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}' ver='{ver1}'/>")
    assert len(reply) == 0
    await roster_set(harness, alice, "<item jid='carol@localhost'/>")
    (push,) = pushes(alice.take())
    ver2 = push.find(Q).get("ver")
    assert ver2 not in (ver1, empty_ver)
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}' ver='{ver1}'/>")
    assert reply.find(Q).get("ver") == ver2 and len(items_of(reply)) == 2


async def test_stream_feature_is_advertised(harness: ModuleHarness) -> None:
    features = [make() for make in harness.host.stream_features["bound"]]
    assert any(f.tag == "{urn:xmpp:features:rosterver}ver" for f in features)


async def test_set_name_groups_and_ignored_attributes(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    reply = await roster_set(
        harness,
        alice,
        "<item jid='Bob@LocalHost' name='Bob' subscription='both' ask='subscribe'"
        " approved='true'><group>Friends</group><group>Work</group></item>",
    )
    assert reply.get("type") == "result" and len(reply) == 0
    (push,) = pushes(alice.take())
    assert push.get("to") == "alice@localhost/a" and push.get("from") is None
    assert items_of(push) == {
        "bob@localhost": {
            "jid": "bob@localhost",
            "name": "Bob",
            "subscription": "none",
            "groups": ["Friends", "Work"],
        }
    }
    # an update replaces name and groups; the subscription state stays the server's
    await roster_set(harness, alice, "<item jid='bob@localhost' subscription='foobar'/>")
    (push,) = pushes(alice.take())
    assert items_of(push)["bob@localhost"] == {
        "jid": "bob@localhost",
        "subscription": "none",
        "groups": [],
    }
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    assert items_of(reply) == items_of(push)


async def test_pushes_go_to_interested_resources_only(harness: ModuleHarness) -> None:
    a1 = harness.session("alice@localhost/one")
    a2 = harness.session("alice@localhost/two")  # never asks for the roster
    a3 = harness.session("alice@localhost/three")
    bob = harness.session("bob@localhost/b")
    await harness.iq(a1, "get", f"<query xmlns='{R}' ver=''/>")
    await harness.iq(a3, "get", f"<query xmlns='{R}'/>")
    await harness.iq(bob, "get", f"<query xmlns='{R}'/>")
    await roster_set(harness, a2, "<item jid='carol@localhost'/>")
    assert a2.take() == [] and bob.take() == []
    (p1,) = pushes(a1.take())
    (p3,) = pushes(a3.take())
    assert p1.find(Q).get("ver") and p3.find(Q).get("ver") is None  # ver only where used
    assert p1.get("id") != p3.get("id")
    # a closed session is no longer interested
    harness.router.unbind(a3)
    await harness.host.fire("session/closed", a3)
    await roster_set(harness, a1, "<item jid='dave@localhost'/>")
    assert a3.take() == [] and len(pushes(a1.take())) == 1


async def test_a_set_that_changes_nothing_is_still_pushed(harness: ModuleHarness) -> None:
    """RFC 6121 2.1.6, 2.3.2: a successful set goes to every interested resource, the
    sender too, whether or not it changed the item; with the version it is current at."""
    a1 = harness.session("alice@localhost/one")
    a2 = harness.session("alice@localhost/two")
    await harness.iq(a1, "get", f"<query xmlns='{R}' ver=''/>")
    await harness.iq(a2, "get", f"<query xmlns='{R}'/>")
    item = "<item jid='bob@localhost' name='Bob'><group>Friends</group></item>"
    await roster_set(harness, a1, item)
    (first,) = pushes(a1.take())
    a2.take()
    reply = await roster_set(harness, a1, item)
    assert reply.get("type") == "result"
    (again,) = pushes(a1.take())
    (other,) = pushes(a2.take())
    expected = {"bob@localhost": {"jid": "bob@localhost", "name": "Bob",
                                  "subscription": "none", "groups": ["Friends"]}}
    assert items_of(again) == items_of(other) == expected
    assert again.find(Q).get("ver") == first.find(Q).get("ver")  # nothing changed


async def test_remove(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    await roster_set(harness, alice, "<item jid='bob@localhost'><group>G</group></item>")
    alice.take()
    reply = await roster_set(harness, alice, "<item jid='bob@localhost' subscription='remove'/>")
    assert reply.get("type") == "result"
    (push,) = pushes(alice.take())
    assert items_of(push) == {
        "bob@localhost": {"jid": "bob@localhost", "subscription": "remove", "groups": []}
    }
    assert items_of(await harness.iq(alice, "get", f"<query xmlns='{R}'/>")) == {}
    reply = await roster_set(harness, alice, "<item jid='bob@localhost' subscription='remove'/>")
    assert condition(reply) == "item-not-found"


async def test_remove_cancels_subscriptions_both_ways(harness: ModuleHarness) -> None:
    """RFC 6121 2.5.2: unsubscribe and unsubscribed go to the contact (here with no presence
    module: the router hands them to the contact's available resources)."""
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    alice.presence = etree.Element("{jabber:client}presence")
    await roster_module(harness).update(
        "alice@localhost",
        "bob@localhost",
        lambda _: RosterItem("bob@localhost", subscription="both"),
    )
    await roster_set(harness, alice, "<item jid='bob@localhost' subscription='remove'/>")
    got = [(s.get("type"), s.get("from")) for s in bob.take()]
    assert ("unsubscribe", "alice@localhost") in got
    assert ("unsubscribed", "alice@localhost") in got
    assert ("unavailable", "alice@localhost/a") in got


BAD_SETS = [
    ("<item jid='bob@localhost'/><item jid='carol@localhost'/>", "bad-request"),
    ("", "bad-request"),
    ("<item name='no jid'/>", "bad-request"),
    ("<item jid='a@b@c'/>", "jid-malformed"),
    ("<item jid='@localhost'/>", "jid-malformed"),
    ("<item jid='bob@localhost/res'/>", "bad-request"),
    ("<item jid='alice@localhost'/>", "not-allowed"),
    ("<item jid='bob@localhost'><group>G</group><group>G</group></item>", "bad-request"),
    ("<item jid='bob@localhost'><group/></item>", "not-acceptable"),
    ("<item jid='bob@localhost'><group>  </group></item>", "not-acceptable"),
    (f"<item jid='bob@localhost'><group>{'g' * 21}</group></item>", "not-acceptable"),
    (f"<item jid='bob@localhost' name='{'n' * 21}'/>", "not-acceptable"),
    ("<item jid='bob@localhost' subscription='remove'/>", "item-not-found"),
]


@pytest.mark.parametrize(("item", "expected"), BAD_SETS)
async def test_rejected_sets_change_nothing(
    harness: ModuleHarness, item: str, expected: str
) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    await roster_set(harness, alice, "<item jid='zed@localhost' name='Zed'><group>Z</group></item>")
    alice.take()
    before = await roster_module(harness).get("alice@localhost")
    assert condition(await roster_set(harness, alice, item)) == expected
    assert alice.take() == []  # no push
    assert await roster_module(harness).get("alice@localhost") == before


async def test_roster_limits() -> None:
    harness = await ModuleHarness({"roster": {"max_items": 2, "max_groups": 2}}).start()
    alice = harness.session("alice@localhost/a")
    groups = "".join(f"<group>g{i}</group>" for i in range(3))
    reply = await roster_set(harness, alice, f"<item jid='bob@localhost'>{groups}</item>")
    assert condition(reply) == "not-acceptable"
    for user in ("bob", "carol"):
        reply = await roster_set(harness, alice, f"<item jid='{user}@localhost'/>")
        assert reply.get("type") == "result"
    before = await roster_module(harness).get("alice@localhost")
    assert condition(await roster_set(harness, alice, "<item jid='dave@localhost'/>")) == (
        "resource-constraint"
    )
    # changing an existing item is still fine when the roster is full
    reply = await roster_set(harness, alice, "<item jid='bob@localhost' name='B'/>")
    assert reply.get("type") == "result"
    after = await roster_module(harness).get("alice@localhost")
    assert set(after.items) == set(before.items)


async def test_other_users_roster_is_off_limits(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    harness.users.add("bob@localhost")
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}'/>", to="bob@localhost")
    assert condition(reply) == "service-unavailable"
    reply = await harness.iq(
        alice, "set", f"<query xmlns='{R}'><item jid='x@localhost'/></query>", to="bob@localhost"
    )
    assert condition(reply) == "forbidden"
    assert (await roster_module(harness).get("bob@localhost")).items == {}
    # addressed to one's own bare JID is the same as no 'to'
    reply = await harness.iq(
        alice, "set", f"<query xmlns='{R}'><item jid='x@localhost'/></query>", to="alice@localhost"
    )
    assert reply.get("type") == "result"
    reply = await harness.iq(alice, "get", f"<query xmlns='{R}'/>", to="alice@localhost")
    assert list(items_of(reply)) == ["x@localhost"]


async def test_pending_only_entries_are_not_shown(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    module = roster_module(harness)
    await module.update(
        "alice@localhost",
        "bob@localhost",
        lambda _: RosterItem("bob@localhost", pending_in=True, in_roster=False),
    )
    await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    assert alice.take() == []  # no push for a hidden entry
    assert items_of(await harness.iq(alice, "get", f"<query xmlns='{R}'/>")) == {}
    reply = await roster_set(harness, alice, "<item jid='bob@localhost' subscription='remove'/>")
    assert condition(reply) == "item-not-found"
    # putting the contact in the roster shows it, keeping the pending request
    await roster_set(harness, alice, "<item jid='bob@localhost' name='Bob'/>")
    assert list(items_of(pushes(alice.take())[0])) == ["bob@localhost"]
    item = await module.item("alice@localhost", "bob@localhost")
    assert item is not None and item.pending_in and item.in_roster and item.name == "Bob"


async def test_update_api_and_change_listeners(harness: ModuleHarness) -> None:
    module = roster_module(harness)
    seen: list[tuple[str, RosterItem | None, str | None]] = []
    module.subscribe_changes(lambda owner, item, removed: seen.append((owner, item, removed)))
    item = await module.update(
        "alice@localhost", "bob@localhost", lambda _: RosterItem("ignored", name="Bob")
    )
    assert item == RosterItem("bob@localhost", name="Bob")  # the key wins over the item's jid
    assert seen == [("alice@localhost", item, None)]
    # no change: no write, no notification
    version = (await module.get("alice@localhost")).version
    assert await module.update("alice@localhost", "bob@localhost", lambda cur: cur) == item
    assert (await module.get("alice@localhost")).version == version and len(seen) == 1

    def refuse(current: RosterItem | None) -> RosterItem | None:
        assert current is not None
        current.name = "mutated"  # a copy: the stored item is untouched
        raise ValueError("no")

    with pytest.raises(ValueError):
        await module.update("alice@localhost", "bob@localhost", refuse)
    assert await module.item("alice@localhost", "bob@localhost") == item
    assert await module.update("alice@localhost", "bob@localhost", lambda _: None) is None
    assert seen[-1] == ("alice@localhost", None, "bob@localhost")
    assert await module.item("alice@localhost", "bob@localhost") is None


class FailingPuts(MemoryItemBackend):
    async def put(self, namespace: str, name: str, attrs: Attrs, **kwargs: object) -> Item:
        raise StorageError("memory", "put", "disk on fire")


async def test_storage_failure_is_an_error_not_a_silent_drop(harness: ModuleHarness) -> None:
    harness.storage.items = FailingPuts()
    alice = harness.session("alice@localhost/a")
    reply = await roster_set(harness, alice, "<item jid='bob@localhost'/>")
    assert condition(reply) == "internal-server-error"


# --- concurrency: two nodes writing one roster ---------------------------------------------


class Interleaving(ItemBackend):
    """Yields to the loop inside every call and counts lost conditional writes,
    so that concurrent read-modify-write cycles really overlap."""

    def __init__(self, backend: ItemBackend) -> None:
        self.backend = backend
        self.conflicts = 0

    async def get(self, namespace: str, name: str) -> Item | None:
        await asyncio.sleep(0)
        return await self.backend.get(namespace, name)

    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        await asyncio.sleep(0)
        try:
            return await self.backend.put(
                namespace, name, attrs, if_absent=if_absent, if_version=if_version
            )
        except ConditionFailed:
            self.conflicts += 1
            raise

    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        return await self.backend.delete(namespace, name, if_version=if_version)

    async def query(self, namespace: str, query: Query) -> Page:
        return await self.backend.query(namespace, query)

    async def transact(self, writes: Sequence[object]) -> None:  # type: ignore[override]
        raise NotImplementedError


async def two_nodes(backends: tuple[ItemBackend, ItemBackend]) -> list[RosterModule]:
    modules = []
    for backend in backends:
        harness = ModuleHarness({"roster": {}})
        harness.storage.items = backend
        await harness.start()
        modules.append(roster_module(harness))
    return modules


async def concurrent_writers(node1: RosterModule, node2: RosterModule) -> None:
    """Each node adds its own contacts and both add groups to one shared contact."""
    owner = "alice@localhost"

    def add_group(group: str):  # type: ignore[no-untyped-def]
        def change(item: RosterItem | None) -> RosterItem:
            item = item or RosterItem("shared@localhost")
            item.groups.append(group)
            return item

        return change

    jobs = []
    for i in range(8):
        for n, node in enumerate((node1, node2)):
            contact = f"c{n}-{i}@localhost"
            jobs.append(node.update(owner, contact, lambda _, c=contact: RosterItem(c)))
            jobs.append(node.update(owner, "shared@localhost", add_group(f"n{n}-{i}")))
    await asyncio.gather(*jobs)
    roster = await node1.get(owner)
    assert set(roster.items) == {f"c{n}-{i}@localhost" for n in (0, 1) for i in range(8)} | {
        "shared@localhost"
    }
    groups = roster.items["shared@localhost"].groups
    assert sorted(groups) == sorted(f"n{n}-{i}" for n in (0, 1) for i in range(8))
    assert await node2.get(owner) == roster


async def test_concurrent_updates_lose_nothing_memory() -> None:
    shared = Interleaving(MemoryItemBackend())
    node1, node2 = await two_nodes((shared, shared))
    await concurrent_writers(node1, node2)
    assert shared.conflicts > 0  # the writers really collided


async def test_concurrent_updates_lose_nothing_sqlite(tmp_path: Path) -> None:
    # Two backends on one file: two nodes, each with its own connection and thread. Opened one
    # after the other: two first opens of a new file at once can fail with "database is
    # locked" (see .coord/requests-roster-presence.md).
    backends = (
        await SQLiteItemBackend.open(tmp_path / "x.db"),
        await SQLiteItemBackend.open(tmp_path / "x.db"),
    )
    counted = (Interleaving(backends[0]), Interleaving(backends[1]))
    try:
        node1, node2 = await two_nodes(counted)
        await concurrent_writers(node1, node2)
        assert counted[0].conflicts + counted[1].conflicts > 0
    finally:
        for backend in backends:
            await backend.close()


class FirstWriteReturnsLate(MemoryItemBackend):
    """The first write lands at once but its caller hears of it only after `release`,
    as when a storage round trip is slow to answer: a later change then pushes first."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.first_written = asyncio.Event()
        self.writes = 0

    async def put(self, namespace: str, name: str, attrs: Attrs, **kwargs: object) -> Item:
        written = await super().put(namespace, name, attrs, **kwargs)  # type: ignore[arg-type]
        self.writes += 1
        if self.writes == 1:
            self.first_written.set()
            await self.release.wait()
        return written


async def test_a_late_push_never_undoes_a_newer_one() -> None:
    backend = FirstWriteReturnsLate()
    harness = ModuleHarness({"roster": {}})
    harness.storage.items = backend
    await harness.start()
    module = roster_module(harness)
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "get", f"<query xmlns='{R}'/>")
    older = asyncio.ensure_future(
        module.update("alice@localhost", "bob@localhost", lambda _: RosterItem("bob@localhost"))
    )
    await asyncio.wait_for(backend.first_written.wait(), 5)
    await module.update(
        "alice@localhost",
        "bob@localhost",
        lambda item: RosterItem("bob@localhost", name="Bob", subscription="to"),
    )
    backend.release.set()
    await older
    seen = [items_of(p)["bob@localhost"] for p in pushes(alice.take())]
    assert seen and seen[-1].get("subscription") == "to" and seen[-1].get("name") == "Bob"
    assert len(seen) == 1  # the older push was dropped, not delivered after the newer one
