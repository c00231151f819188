"""ModuleHost.remove_account: every module's data of the user goes; a storage failure
part way is reported, and running the removal again finishes it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.modules.slow_stores import GatedSQLite
from xmppd.modulehost import AccountDataRemains, Module, installed_modules
from xmppd.modules import _pubsub_engine
from xmppd.modules._muc_room import MUC
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.base import Query, StorageError
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, RecordingRemote, TestSession, parse_stanza
from xmppd.xml import ns

MODULES: dict[str, dict[str, Any] | None] = {
    name: {}
    for name in (
        "roster",
        "presence",
        "offline",
        "last",
        "vcard",
        "private",
        "privacy",
        "blocking",
        "register",
    )
}
PRIVACY = "jabber:iq:privacy"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"


async def entries(harness: ModuleHarness, user: str) -> set[str]:
    """'<namespace> <name>' for every item and blob named for `user`."""
    found: set[str] = set()
    items, blobs = harness.storage.items, harness.storage.blobs
    for namespace in await items.namespaces():  # type: ignore[attr-defined]
        page = await items.query(namespace, Query(limit=1000))
        found |= {f"{namespace} {i.name}" for i in page.items if _owned(i.name, user)}
    for namespace in await blobs.namespaces():  # type: ignore[attr-defined]
        listing = await blobs.list(namespace)
        found |= {f"{namespace} {key}" for key in listing.keys if _owned(key, user)}
    return found


def _owned(name: str, user: str) -> bool:
    return name == user or name.startswith((f"{user}/", f"{user}@"))


async def filled() -> ModuleHarness:
    """zed (and alice, to check nothing of hers goes) with data in every module."""
    harness = await ModuleHarness(MODULES).start()
    for user in ("zed", "alice"):
        await harness.host.accounts["localhost"].register(user, f"{user}-secret-1")
        session = await harness.login(f"{user}@localhost/r")
        for payload in (
            "<query xmlns='jabber:iq:roster'><item jid='bob@localhost'/></query>",
            "<vCard xmlns='vcard-temp'><FN>Someone</FN></vCard>",
            "<query xmlns='jabber:iq:private'><p xmlns='urn:test:prefs'/></query>",
            f"<query xmlns='{PRIVACY}'><list name='l'><item action='deny' order='1'/></list>"
            "</query>",
            "<block xmlns='urn:xmpp:blocking'><item jid='eve@localhost'/></block>",
        ):
            reply = await harness.iq(session, "set", payload)
            assert reply.get("type") == "result", payload
        await harness.end_session(session)  # last activity
    bob = harness.session("bob@localhost/b")
    for user in ("zed", "alice"):
        for n in range(3):
            await harness.send(bob, f"<message to='{user}@localhost'><body>{n}</body></message>")
    return harness


async def test_a_failure_part_way_is_reported_and_a_second_run_finishes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = await filled()
    alices = await entries(harness, "alice")
    stores = {entry.split()[0] for entry in await entries(harness, "zed")}
    assert stores == {
        "localhost/accounts",
        "localhost/roster",
        "localhost/vcard",
        "localhost/private",
        "localhost/privacy",
        "localhost/offline",  # items and blobs
        "localhost/last",
    }

    blobs = harness.storage.blobs
    delete = blobs.delete
    failures = iter([True])  # the first offline blob cannot be deleted

    async def failing_delete(namespace: str, key: str, **kwargs: Any) -> bool:
        if namespace == "localhost/offline" and next(failures, False):
            raise StorageError("memory", "delete", "the disk is on fire")
        return await delete(namespace, key, **kwargs)

    monkeypatch.setattr(blobs, "delete", failing_delete)
    with pytest.raises(AccountDataRemains) as failed:
        await harness.host.remove_account("localhost", "zed")
    assert list(failed.value.failed) == ["offline"]
    assert "the disk is on fire" in str(failed.value)
    left = await entries(harness, "zed")
    assert left and {entry.split()[0] for entry in left} == {"localhost/offline"}
    assert not await harness.host.accounts["localhost"].exists("zed")

    # the name as an operator may type it: the stores use the normalized one
    assert await harness.host.remove_account("localhost", "Zed") == "leftovers"
    assert await entries(harness, "zed") == set()
    assert await harness.host.remove_account("localhost", "zed") == "nothing"
    assert await harness.host.remove_account("localhost", "no@such name") == "nothing"
    assert await entries(harness, "alice") == alices  # the neighbour keeps everything


PIPELINED = (
    "<vCard xmlns='vcard-temp'><FN>Written after the removal</FN></vCard>",
    "<query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query>",
    "<query xmlns='jabber:iq:private'><q xmlns='urn:test:late'/></query>",
)


async def test_writes_pipelined_after_an_in_band_removal_leave_nothing() -> None:
    """A client sends <remove/> and, before the answer, a vCard, a roster item and
    private XML: they were read before the removal, so they are done before the data
    goes, never after it."""
    harness = await ModuleHarness(MODULES).start()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = await harness.login("zed@localhost/r")
    for n, xml in enumerate(
        ("<query xmlns='jabber:iq:register'><remove/></query>", *PIPELINED)
    ):
        stanza = parse_stanza(f"<iq type='set' id='p{n}'>{xml}</iq>")
        stanza.set("from", zed.jid)
        zed.receive(stanza)  # one read: every stanza is routed before the removal runs
    await harness.router.drain()
    answers = {s.get("id"): s.get("type") for s in zed.take() if s.tag == ns.C_IQ}
    assert answers["p0"] == "result"
    assert await entries(harness, "zed") == set()
    assert zed.input_holds > 0  # nothing more is read from the removed account
    assert zed.terminated is not None
    assert not await harness.host.accounts["localhost"].exists("zed")


async def test_an_administrators_removal_waits_for_the_sessions_writes() -> None:
    """Removed by an administrator (xmppctl, the admin API) while two of its sessions
    write: what they sent before is done first, and deleted with the rest."""
    harness = await ModuleHarness(MODULES).start()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    sessions = [await harness.login(f"zed@localhost/{r}") for r in ("a", "b")]
    for session in sessions:
        for n, xml in enumerate(PIPELINED):
            stanza = parse_stanza(f"<iq type='set' id='w{n}'>{xml}</iq>")
            stanza.set("from", session.jid)
            session.receive(stanza)
    assert await harness.host.remove_account("localhost", "zed") == "account"
    await harness.router.drain()
    assert await entries(harness, "zed") == set()
    assert all(session.input_holds > 0 for session in sessions)


# --- modules turned off when the account is removed ------------------------------------

PUBSUB = "http://jabber.org/protocol/pubsub"
MUC_OWNER = "http://jabber.org/protocol/muc#owner"
MUC_ADMIN = "http://jabber.org/protocol/muc#admin"
PERSISTENT = (
    "<x xmlns='jabber:x:data' type='submit'><field var='muc#roomconfig_persistentroom'>"
    "<value>1</value></field></x>"
)


async def _chat(harness: ModuleHarness, zed: TestSession) -> None:
    """A room of alice's where zed is a member and one zed made, where he spoke."""
    alice = harness.session("alice@localhost/a")
    for owner, room in ((alice, "aliceroom"), (zed, "zedroom")):
        jid = f"{room}@conference.localhost"
        await harness.send(owner, f"<presence to='{jid}/n'><x xmlns='{MUC}'/></presence>")
        configure = f"<query xmlns='{MUC_OWNER}'>{PERSISTENT}</query>"
        reply = await harness.iq(owner, "set", configure, jid)
        assert reply.get("type") == "result"
    member = f"<query xmlns='{MUC_ADMIN}'><item affiliation='member' jid='zed@localhost'/></query>"
    reply = await harness.iq(alice, "set", member, "aliceroom@conference.localhost")
    assert reply.get("type") == "result"
    await harness.send(
        zed, "<message to='zedroom@conference.localhost' type='groupchat'><body>hi</body></message>"
    )


async def _pubsub(
    harness: ModuleHarness, zed: TestSession, service: str = "pubsub.localhost"
) -> None:
    """A node zed owns, with an item, and a subscription to alice's node."""
    alice = harness.session("alice@localhost/a")
    for owner, node in ((zed, "zednode"), (alice, "alicenode")):
        reply = await harness.iq(
            owner, "set", f"<pubsub xmlns='{PUBSUB}'><create node='{node}'/></pubsub>", service
        )
        assert reply.get("type") == "result", etree.tostring(reply)
    for payload in (
        "<publish node='zednode'><item id='1'><x xmlns='urn:test'/></item></publish>",
        "<subscribe node='alicenode' jid='zed@localhost'/>",
    ):
        reply = await harness.iq(zed, "set", f"<pubsub xmlns='{PUBSUB}'>{payload}</pubsub>",
                                 service)
        assert reply.get("type") == "result", etree.tostring(reply)


async def _iqs(harness: ModuleHarness, zed: TestSession, *payloads: str) -> None:
    for payload in payloads:
        reply = await harness.iq(zed, "set", payload)
        assert reply.get("type") == "result", etree.tostring(reply)


async def _from_bob(harness: ModuleHarness, zed: TestSession, xml: str) -> None:
    await harness.end_session(zed)
    await harness.send(harness.session("bob@localhost/b"), xml)


Scenario = Callable[[ModuleHarness, TestSession], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {
    "roster": lambda h, zed: _iqs(
        h, zed, "<query xmlns='jabber:iq:roster'><item jid='carol@localhost'/></query>"
    ),
    "presence": lambda h, zed: _from_bob(
        h, zed, "<presence to='zed@localhost' type='subscribe'/>"
    ),
    "offline": lambda h, zed: _from_bob(
        h, zed, "<message to='zed@localhost'><body>x</body></message>"
    ),
    "last": lambda h, zed: h.end_session(zed),
    "vcard": lambda h, zed: _iqs(h, zed, "<vCard xmlns='vcard-temp'><FN>Zed</FN></vCard>"),
    "private": lambda h, zed: _iqs(
        h, zed, "<query xmlns='jabber:iq:private'><p xmlns='urn:test:prefs'/></query>"
    ),
    "privacy": lambda h, zed: _iqs(
        h, zed, f"<query xmlns='{PRIVACY}'><list name='l'><item action='deny' order='1'/></list>"
        "</query>",
    ),
    "blocking": lambda h, zed: _iqs(
        h, zed, "<block xmlns='urn:xmpp:blocking'><item jid='eve@localhost'/></block>"
    ),
    "pep": lambda h, zed: _iqs(
        h, zed, f"<pubsub xmlns='{PUBSUB}'><publish node='urn:test:n'><item id='1'>"
        "<x xmlns='urn:test:n'/></item></publish></pubsub>",
    ),
    "pubsub": _pubsub,
    "muc": _chat,
    # a note to oneself: archived in zed's archive alone (a message to bob would be
    # in bob's archive too, which is bob's and stays)
    "mam": lambda h, zed: h.send(
        zed, "<message to='zed@localhost' type='chat'><body>note</body></message>"
    ),
}
"""How to give zed data in each module that keeps some per user."""
NO_USER_DATA = {
    "adhoc", "admin_commands", "caps", "carbons", "disco", "ping", "register",
    "stream_management", "time", "version",
}
"""The modules that keep nothing per user in storage."""
SHARED = {"privacy": {"privacy", "blocking"}, "blocking": {"privacy", "blocking"}}
"""Modules that keep one record together: either deletes it, so both are turned off."""


def test_every_installed_module_is_known_to_the_removal_tests() -> None:
    """A new module is either in SCENARIOS (and purges its data with the module off,
    which the test below checks) or declared to keep nothing per user."""
    installed = installed_modules()
    assert set(installed) == set(SCENARIOS) | NO_USER_DATA
    for name in NO_USER_DATA:
        assert installed[name].remove_user is Module.remove_user, name
    for name in SCENARIOS:
        assert installed[name].purge_user.__func__ is not Module.purge_user.__func__, name  # type: ignore[attr-defined]


def _needs(name: str, installed: dict[str, type[Module]]) -> set[str]:
    """`name` and every module it requires, through those."""
    found = {name}
    for needed in installed[name].requires:
        found |= _needs(needed, installed)
    return found


async def _mentions(harness: ModuleHarness, bare: str) -> list[str]:
    """Every item or blob whose name or content names `bare` (or its user's prefix),
    but other users' rosters (with the presence module on, a contact's roster keeps its
    item for a removed account, the subscription gone, for the contact to remove)."""
    user = bare.split("@")[0]
    found = []
    items, blobs = harness.storage.items, harness.storage.blobs
    for namespace in await items.namespaces():  # type: ignore[attr-defined]
        page = await items.query(namespace, Query(limit=1000))
        for item in page.items:
            text = repr(item.attrs)
            if _owned(item.name, user) or bare in item.name or (
                bare in text and namespace != "localhost/roster"
            ):
                found.append(f"{namespace} {item.name}")
    for namespace in await blobs.namespaces():  # type: ignore[attr-defined]
        for key in (await blobs.list(namespace)).keys:
            blob = await blobs.get(namespace, key)
            if _owned(key, user) or bare in key or (blob and bare.encode() in blob.data):
                found.append(f"{namespace} {key}")
    return found


@pytest.mark.parametrize("module", sorted(SCENARIOS))
async def test_the_data_of_a_module_turned_off_goes_with_the_account(module: str) -> None:
    """zed has data in `module`; the operator turns it off; zed is removed (by every
    module still on); a new zed finds nothing when the module is on again."""
    installed = installed_modules()
    on = {name: {} for name in _needs(module, installed) | {"disco"}}
    before = await ModuleHarness(on).start()
    await before.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = await before.login("zed@localhost/r")
    await SCENARIOS[module](before, zed)
    await before.router.drain()
    await before.host.stop()
    assert await _mentions(before, "zed@localhost"), f"{module} stored nothing for zed"
    alices = await entries(before, "alice")

    gone = SHARED.get(module, {module})
    off = {name: {} for name in installed if not gone & _needs(name, installed)}
    after = await ModuleHarness(off, storage=before.storage).start()
    assert await after.host.remove_account("localhost", "zed") == "account"
    await after.router.drain()
    await after.host.stop()
    assert await _mentions(after, "zed@localhost") == []
    assert await entries(after, "alice") == alices


# --- the roster turned off: the contacts are told all the same ---------------------------


async def _roster_item(harness: ModuleHarness, owner: str, contact: str, sub: str) -> None:
    roster = harness.host.find_module(RosterModule)
    assert roster is not None
    await roster.update(owner, contact, lambda _: RosterItem(jid=contact, subscription=sub))  # type: ignore[arg-type]


def _presences(stanzas: list[etree._Element]) -> set[tuple[str | None, str | None, str | None]]:
    return {
        (s.get("from"), s.get("to"), s.get("type")) for s in stanzas if s.tag == ns.C_PRESENCE
    }


async def test_with_the_roster_off_contacts_are_told_and_lose_their_item() -> None:
    """zed shares presence both ways with alice (local), sees rob's and is seen by ann
    (both remote); the roster and presence modules are turned off, zed is removed while
    online: rob is sent unsubscribe, ann unsubscribed and zed's unavailable, over s2s,
    as with the roster on; alice's client gets all three, and her stored roster loses
    zed (no presence module acts on what she is sent) and keeps her other contact."""
    on = await ModuleHarness({"roster": {}, "presence": {}}).start()
    await on.host.accounts["localhost"].register("zed", "zed-secret-1")
    for owner, contact, sub in (
        ("zed@localhost", "alice@localhost", "both"),
        ("zed@localhost", "rob@remote.example", "to"),
        ("zed@localhost", "ann@remote.example", "from"),
        ("alice@localhost", "zed@localhost", "both"),
        ("alice@localhost", "carol@localhost", "to"),
    ):
        await _roster_item(on, owner, contact, sub)
    await on.host.stop()

    off = await ModuleHarness({"disco": {}}, storage=on.storage).start()
    off.router.remote = remote = RecordingRemote()
    zed = off.session("zed@localhost/z")
    alice = off.session("alice@localhost/a")
    assert await off.host.remove_account("localhost", "zed") == "account"
    await off.router.drain()
    assert _presences(remote.routed) == {
        ("zed@localhost", "rob@remote.example", "unsubscribe"),
        ("zed@localhost", "ann@remote.example", "unsubscribed"),
        (zed.jid, "ann@remote.example", "unavailable"),
    }
    assert _presences(alice.take()) == {  # her client is told, as on a server of its own
        ("zed@localhost", "alice@localhost", "unsubscribe"),
        ("zed@localhost", "alice@localhost", "unsubscribed"),
        (zed.jid, "alice@localhost", "unavailable"),
    }
    await off.host.stop()

    again = await ModuleHarness({"roster": {}}, storage=on.storage).start()
    roster = again.host.find_module(RosterModule)
    assert roster is not None
    assert list((await roster.get("alice@localhost")).items) == ["carol@localhost"]
    assert (await roster.get("zed@localhost")).items == {}


def _no_listing(storage: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make listing the stores' namespaces fail: on DynamoDB it is a Scan of the whole
    table, which no serving path (an in-band removal is one) may do."""

    async def refuse() -> list[str]:
        raise AssertionError("a serving path listed the store's namespaces")

    for backend in (storage.items, storage.blobs):
        monkeypatch.setattr(backend, "namespaces", refuse)


async def _records(harness: ModuleHarness, vhost: str) -> list[str]:
    page = await harness.host.items(vhost, "pubsub_services").query(Query(limit=100))
    return [item.name for item in page.items]


@pytest.mark.parametrize("at_removal", [None, "pubsub"])
async def test_every_pubsub_service_it_served_is_cleaned(
    monkeypatch: pytest.MonkeyPatch, at_removal: str | None
) -> None:
    """zed owns a node and is subscribed to alice's on the service at the default
    subdomain and on one the operator had moved to ps.localhost (and b.test's); each
    start noted its service domains under their host. With pubsub turned off, its
    options (the subdomain) gone, or on at the default subdomain again, the removal
    finds the services from those notes (and pubsub.localhost, whose note is gone
    here as from before notes were kept, as the default) without listing the store,
    and leaves nothing of zed's in any, alice's nodes and the notes (the server's,
    not zed's) kept."""
    storage = None
    for host, subdomain in (("localhost", "pubsub"), ("localhost", "ps"), ("b.test", "ps")):
        on = await ModuleHarness(
            {"disco": {}, "pubsub": {"subdomain": subdomain}}, hosts=["localhost", "b.test"],
            storage=storage,
        ).start()
        storage = on.storage
        if not await on.host.accounts["localhost"].exists("zed"):
            await on.host.accounts["localhost"].register("zed", "zed-secret-1")
        await _pubsub(on, on.session("zed@localhost/r"), f"{subdomain}.{host}")
        await on.router.drain()
        await on.host.stop()
    assert on.storage is storage
    assert await _records(on, "localhost") == ["ps.localhost", "pubsub.localhost"]
    assert await _records(on, "b.test") == ["ps.b.test", "pubsub.b.test"]
    assert await on.host.items("localhost", "pubsub_services").delete("pubsub.localhost")
    alices = await _mentions(on, "alice@localhost")
    assert len(alices) >= 3, alices  # her node on each service

    modules: dict[str, dict[str, Any] | None] = {"disco": {}}
    if at_removal is not None:
        modules["pubsub"] = {"subdomain": at_removal}
    off = await ModuleHarness(modules, hosts=["localhost", "b.test"], storage=storage).start()
    with monkeypatch.context() as patched:
        _no_listing(storage, patched)
        assert await off.host.remove_account("localhost", "zed") == "account"
        await off.router.drain()
    await off.host.stop()
    assert await _mentions(off, "zed@localhost") == []
    assert await _mentions(off, "alice@localhost") == alices
    noted = ["ps.localhost"] if at_removal is None else ["ps.localhost", "pubsub.localhost"]
    assert await _records(off, "localhost") == noted
    assert await _records(off, "b.test") == ["ps.b.test", "pubsub.b.test"]


async def test_every_node_of_a_service_is_cleaned_past_max_nodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """alice made seven nodes; zed is a publisher of the last one and owns the one
    before it, in name order. The operator lowers `max_nodes` to 2: zed's removal
    still reaches every node, and alice's nodes stay. The walk reads two records a
    query here, so it goes through several pages; with the module off (the default
    `max_nodes` then, more than these nodes) the same paged walk runs."""
    monkeypatch.setattr(_pubsub_engine, "AFFILIATION_SCAN", 2)
    for on_at_removal in (True, False):
        before = await ModuleHarness({"disco": {}, "pubsub": {}}).start()
        await before.host.accounts["localhost"].register("zed", "zed-secret-1")
        alice = before.session("alice@localhost/a")
        zed = before.session("zed@localhost/r")
        for creator, node in [(alice, f"n{i}") for i in range(6)] + [(zed, "n6"), (alice, "n7")]:
            reply = await before.iq(
                creator, "set", f"<pubsub xmlns='{PUBSUB}'><create node='{node}'/></pubsub>",
                "pubsub.localhost",
            )
            assert reply.get("type") == "result", etree.tostring(reply)
        publisher = (
            f"<pubsub xmlns='{PUBSUB}#owner'><affiliations node='n7'>"
            "<affiliation jid='zed@localhost' affiliation='publisher'/></affiliations></pubsub>"
        )
        reply = await before.iq(alice, "set", publisher, "pubsub.localhost")
        assert reply.get("type") == "result", etree.tostring(reply)
        await before.host.stop()
        assert await _mentions(before, "zed@localhost")

        modules: dict[str, dict[str, Any] | None] = {"disco": {}}
        if on_at_removal:
            modules["pubsub"] = {"max_nodes": 2}
        after = await ModuleHarness(modules, storage=before.storage).start()
        with monkeypatch.context() as patched:
            _no_listing(before.storage, patched)
            assert await after.host.remove_account("localhost", "zed") == "account"
        await after.router.drain()
        await after.host.stop()
        assert await _mentions(after, "zed@localhost") == [], on_at_removal
        nodes = await after.storage.items.query("pubsub.localhost/pubsub", Query(prefix="n/"))
        assert [item.name for item in nodes.items] == [f"n/n{i}" for i in (0, 1, 2, 3, 4, 5, 7)]


async def _pep_records(harness: ModuleHarness) -> dict[str, dict[str, Any]]:
    """Every record of localhost's PEP store, by name."""
    page = await harness.storage.items.query("localhost/pep", Query(limit=1000))
    return {item.name: dict(item.attrs) for item in page.items}


async def test_every_pep_node_is_cleaned_past_max_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """zed made seven PEP nodes; alice subscribed to the first and the last, and zed
    made her a member of the one before the last, so her `/u/` and `/a/` indexes name
    his nodes. The operator lowers `max_nodes` to 2: zed's removal still deletes every
    node with its clean-up, so neither index names any of them after it (the prefix
    deletion alone would take the nodes past the limit but leave those entries). The
    walk reads two records a query here, so it goes through several pages; with the
    module off (the default `max_nodes` then) the same paged walk runs."""
    monkeypatch.setattr(_pubsub_engine, "AFFILIATION_SCAN", 2)
    pep_on: dict[str, dict[str, Any] | None] = {"roster": {}, "presence": {}, "pep": {}}
    for on_at_removal in (True, False):
        before = await ModuleHarness({**pep_on, "disco": {}}).start()
        await before.host.accounts["localhost"].register("zed", "zed-secret-1")
        zed = before.session("zed@localhost/r")
        alice = before.session("alice@localhost/a")
        open_ = (
            f"<publish-options><x xmlns='jabber:x:data' type='submit'>"
            f"<field var='FORM_TYPE' type='hidden'><value>{PUBSUB}#publish-options</value>"
            "</field><field var='pubsub#access_model'><value>open</value></field>"
            "</x></publish-options>"
        )
        await _iqs(before, zed, *(
            f"<pubsub xmlns='{PUBSUB}'><publish node='n{i}'><item id='1'><x xmlns='urn:t'/>"
            f"</item></publish>{open_}</pubsub>" for i in range(7)
        ))
        await _iqs(before, zed, (
            f"<pubsub xmlns='{PUBSUB}#owner'><affiliations node='n5'>"
            "<affiliation jid='alice@localhost' affiliation='member'/></affiliations></pubsub>"
        ))
        for node in ("n0", "n6"):
            reply = await before.iq(
                alice, "set",
                f"<pubsub xmlns='{PUBSUB}'><subscribe node='{node}' jid='alice@localhost'/>"
                "</pubsub>",
                "zed@localhost",
            )
            assert reply.get("type") == "result", etree.tostring(reply)
        await before.router.drain()
        await before.host.stop()
        indexes = {
            name: json.loads(attrs["s"])
            for name, attrs in (await _pep_records(before)).items() if name.startswith("/")
        }
        assert indexes == {
            "/u/alice%40localhost": [
                ["zed/", "n0", "alice@localhost"], ["zed/", "n6", "alice@localhost"]
            ],
            "/a/alice%40localhost": [["zed/", "n5"]],
        }

        modules: dict[str, dict[str, Any] | None] = {"disco": {}}
        if on_at_removal:
            modules |= {**pep_on, "pep": {"max_nodes": 2}}
        after = await ModuleHarness(modules, storage=before.storage).start()
        assert await after.host.remove_account("localhost", "zed") == "account"
        await after.router.drain()
        await after.host.stop()
        assert await _mentions(after, "zed@localhost") == [], on_at_removal
        # alice's indexes named only zed's nodes: emptied, they are gone, and so is
        # every record of zed's nodes, their subscriptions and tombstones.
        assert await _pep_records(after) == {}, on_at_removal


async def test_with_the_roster_on_and_presence_off_local_contacts_lose_their_item() -> None:
    """The roster module on but not presence: nothing acts on the unsubscribe alice is
    sent, so the removal takes zed out of her roster itself, through the module: her
    client, which asked for the roster, gets the push."""
    harness = await ModuleHarness({"roster": {}}).start()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    await _roster_item(harness, "zed@localhost", "alice@localhost", "both")
    await _roster_item(harness, "alice@localhost", "zed@localhost", "both")
    alice = await harness.login("alice@localhost/a")
    reply = await harness.iq(alice, "get", "<query xmlns='jabber:iq:roster'/>")
    assert reply.get("type") == "result"
    assert await harness.host.remove_account("localhost", "zed") == "account"
    await harness.router.drain()
    pushed = [
        (item.get("jid"), item.get("subscription"))
        for iq in alice.take() if iq.tag == ns.C_IQ and iq.get("type") == "set"
        for item in iq.iter("{jabber:iq:roster}item")
    ]
    assert pushed == [("zed@localhost", "remove")]
    roster = harness.host.find_module(RosterModule)
    assert roster is not None and await roster.item("alice@localhost", "zed@localhost") is None


# --- subscription presences from contacts, queued for the account ---------------------

ZED = "zed@localhost"
BOB = "bob@remote.example"


def _from_contact(type_: str, sender: str = BOB) -> etree._Element:
    stanza = parse_stanza(f"<presence type='{type_}' to='{ZED}'/>")
    stanza.set("from", sender)
    return stanza


async def test_a_contact_s_change_under_way_is_made_before_the_data_goes(
    tmp_path: Path,
) -> None:
    """bob (another server) asks zed for a subscription while zed's roster store is
    slow; zed is removed while the change waits for its write. The change is made
    before zed's data goes, or it would write the roster (and keep the request) after
    the removal deleted them, for a new account of the name to inherit."""
    items = await GatedSQLite.open(tmp_path / "items.sqlite3")
    items.gate.set()
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    harness = await ModuleHarness({"roster": {}, "presence": {}}, storage=storage).start()
    harness.router.remote = RecordingRemote()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    items.gate.clear()
    harness.router.route(_from_contact("subscribe"))  # zed exists by its account alone
    await items.waiting.wait()  # the change's roster write waits at the gate
    unregistered = asyncio.Event()

    async def removed() -> None:
        unregistered.set()

    removal = asyncio.ensure_future(harness.host.remove_account("localhost", "zed", removed))
    await unregistered.wait()
    if not harness.router.account_work(ZED):
        # Nothing of zed's under way for the removal to wait for: it finishes while the
        # change waits. (One that waits for the change would wait for a shut gate.)
        await removal
    items.gate.set()
    assert await removal == "account"
    await harness.router.drain()
    assert await entries(harness, "zed") == set()


async def test_a_contact_s_change_after_the_removal_stores_nothing() -> None:
    """zed is removed while a session of his is still bound (on another node, or one
    not ended yet: the router then takes the account for existing): bob's subscription
    request that comes next is answered "unsubscribed" as one to no account (RFC 6121
    3.1.3, 8.5.1), is not delivered, and stores nothing; his other subscription
    presences are ignored."""
    harness = await ModuleHarness({"roster": {}, "presence": {}}).start()
    harness.router.remote = remote = RecordingRemote()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = await harness.login(f"{ZED}/r")
    harness.users.discard(ZED)  # zed exists by his account alone, as on a server
    assert await harness.host.remove_account("localhost", "zed") == "account"
    for type_ in ("subscribe", "subscribed", "unsubscribe", "unsubscribed"):
        harness.router.route(_from_contact(type_))
    await harness.router.drain()
    assert await entries(harness, "zed") == set()
    assert remote.take(BOB) == [(ZED, "unsubscribed")]
    assert [s for s in zed.take() if s.tag == ns.C_PRESENCE] == []


async def test_a_message_after_the_removal_is_bounced_not_stored() -> None:
    """zed is removed while a session of his is still bound but not available (the
    router then takes the account for existing, and the message for offline storage):
    bob's message is answered service-unavailable, as one to no account (RFC 6121
    8.5.1), and nothing is stored for a new account of the name to receive."""
    harness = await ModuleHarness({"offline": {}}).start()
    harness.router.remote = remote = RecordingRemote()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    await harness.login(f"{ZED}/r", available=False)
    harness.users.discard(ZED)  # zed exists by his account alone, as on a server
    assert await harness.host.remove_account("localhost", "zed") == "account"
    message = parse_stanza(f"<message to='{ZED}' type='chat'><body>hi</body></message>")
    message.set("from", f"{BOB}/x")
    harness.router.route(message)
    await harness.router.drain()
    assert await entries(harness, "zed") == set()
    errors = [s for s in remote.routed if s.tag == ns.C_MESSAGE and s.get("type") == "error"]
    assert [e.get("to") for e in errors] == [f"{BOB}/x"]
    assert errors[0].find(f"{{jabber:client}}error/{{{STANZAS}}}service-unavailable") is not None


async def test_a_message_being_stored_offline_leaves_no_archive_behind(
    tmp_path: Path,
) -> None:
    """A message for zed (offline) waits for a slow store when zed is removed: the
    removal waits for its offline copy and for its archive copy, or the archive
    would keep a message of an account that is gone, for a new one of the name."""
    items = await GatedSQLite.open(tmp_path / "items.sqlite3")
    items.gate.set()
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    harness = await ModuleHarness({"offline": {}, "mam": {}}, storage=storage).start()
    harness.router.remote = RecordingRemote()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    items.gate.clear()
    message = parse_stanza(f"<message to='{ZED}' type='chat'><body>kept</body></message>")
    message.set("from", f"{BOB}/r")
    harness.router.route(message)
    await items.waiting.wait()  # a write of the message waits at the gate
    unregistered = asyncio.Event()

    async def removed() -> None:
        unregistered.set()

    removal = asyncio.ensure_future(harness.host.remove_account("localhost", "zed", removed))
    await unregistered.wait()
    if not harness.router.account_work(ZED):
        await removal  # nothing to wait for: the removal ends while the write waits
    items.gate.set()
    assert await removal == "account"
    await harness.router.drain()
    assert await entries(harness, "zed") == set()


async def test_a_message_delivered_after_the_removal_leaves_no_archive_behind() -> None:
    """zed is removed while a session of his is still bound (on another node, or one not
    ended yet): a message delivered to it is not archived once his archive is gone."""
    harness = await ModuleHarness({"offline": {}, "mam": {}}).start()
    harness.router.remote = RecordingRemote()
    await harness.host.accounts["localhost"].register("zed", "zed-secret-1")
    zed = await harness.login(f"{ZED}/r")
    harness.users.discard(ZED)  # zed exists by his account alone, as on a server
    assert await harness.host.remove_account("localhost", "zed") == "account"
    message = parse_stanza(f"<message to='{ZED}' type='chat'><body>late</body></message>")
    message.set("from", f"{BOB}/r")
    harness.router.route(message)
    await harness.router.drain()
    assert [m.findtext("{jabber:client}body") for m in zed.take()] == ["late"]
    assert await entries(harness, "zed") == set()
