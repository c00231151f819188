"""Last Activity (XEP-0012) through the module host, without sockets."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from lxml import etree

from xmppd.modules.last import Last
from xmppd.modules.roster import RosterItem, RosterModule, Subscription
from xmppd.storage.backends.memory import MemoryBlobBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, parse_stanza

LAST = "jabber:iq:last"
QUERY = f"<query xmlns='{LAST}'/>"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DISCO_INFO = "http://jabber.org/protocol/disco#info"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def seconds(reply: etree._Element) -> int:
    assert reply.get("type") == "result", etree.tostring(reply)
    query = reply.find(f"{{{LAST}}}query")
    assert query is not None
    return int(query.get("seconds", "-1"))


def status(reply: etree._Element) -> str | None:
    return reply.findtext(f"{{{LAST}}}query")


def subscription(sub: Subscription) -> Callable[[RosterItem | None], RosterItem]:
    return lambda item: RosterItem(jid="", subscription=sub)


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"disco": {}, "roster": {}, "last": {}})
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


def roster_module(harness: ModuleHarness) -> RosterModule:
    module = harness.host.modules["roster"]
    assert isinstance(module, RosterModule)
    return module


def last_module(harness: ModuleHarness) -> Last:
    module = harness.host.modules["last"]
    assert isinstance(module, Last)
    return module


async def test_server_uptime(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", QUERY, to="localhost")
    assert reply.get("from") == "localhost" and seconds(reply) in (0, 1)
    last_module(harness).started -= 3600
    assert 3600 <= seconds(await harness.iq(alice, "get", QUERY, to="localhost")) <= 3601


async def test_logout_time_and_status_for_the_owner(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a", available=False)
    await harness.send(alice, "<presence/>")
    await harness.send(
        alice, "<presence type='unavailable'><status>gone fishing</status></presence>"
    )
    item = await harness.host.items("localhost", "last").get("alice")
    assert item is not None and item.attrs["status"] == "gone fishing"
    # pretend the logout was ten minutes ago
    await harness.host.items("localhost", "last").put(
        "alice", {"time": int(time.time()) - 600, "status": "gone fishing"}
    )
    # an IQ without 'to' is for the sender's own account
    reply = await harness.iq(alice, "get", QUERY)
    assert 600 <= seconds(reply) <= 601 and status(reply) == "gone fishing"
    assert reply.get("from") == "alice@localhost"


async def test_online_user_is_zero(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a", available=False)
    await harness.send(alice, "<presence/>")
    await harness.send(alice, "<presence type='unavailable'><status>bye</status></presence>")
    await harness.host.items("localhost", "last").put("alice", {"time": 1, "status": "bye"})
    await harness.send(alice, "<presence/>")
    reply = await harness.iq(alice, "get", QUERY, to="alice@localhost")
    assert seconds(reply) == 0 and not status(reply)


async def test_dropped_connection_is_recorded(harness: ModuleHarness) -> None:
    """The server's own unavailable presence for a vanished session counts as a logout."""
    alice = harness.session("alice@localhost/a", available=False)
    await harness.send(alice, "<presence/>")
    await harness.end_session(alice)
    item = await harness.host.items("localhost", "last").get("alice")
    assert item is not None and item.attrs["status"] == ""
    assert abs(int(time.time()) - int(item.attrs["time"])) <= 1


async def test_a_logout_whose_write_failed_a_moment_is_stored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the SQLite file's write lock when alice logs out: the write
    of her logout fails ("database is locked"). Once the lock is gone, her last activity
    is stored. Before, it was logged and lost: contacts read an older logout, or none."""
    path = tmp_path / "items.sqlite3"
    storage = Storage(
        SQLiteItemBackend(path, busy_timeout=0.1), MemoryBlobBackend(), NullCache()
    )
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        harness = ModuleHarness({"last": {}}, storage=storage)
        harness.users.update({"alice@localhost"})
        await harness.start()
        alice = harness.session("alice@localhost/a", available=False)
        await harness.send(alice, "<presence/>")
        locker.execute("BEGIN IMMEDIATE")
        stanza = parse_stanza("<presence type='unavailable'><status>away</status></presence>")
        stanza.set("from", alice.jid)
        alice.receive(stanza)  # not drained: the write waits for the lock
        async with asyncio.timeout(30):
            while "last activity of alice@localhost not stored" not in caplog.text:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        locker.execute("ROLLBACK")
        await harness.router.drain()
        item = await harness.host.items("localhost", "last").get("alice")
        assert item is not None and item.attrs["status"] == "away"
    finally:
        locker.close()
        await storage.close()


async def test_contacts_need_a_subscription(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a", available=False)
    await harness.send(alice, "<presence/>")
    logout = time.time()
    await harness.send(alice, "<presence type='unavailable'><status>zzz</status></presence>")
    harness.router.unbind(alice)
    bob = harness.session("bob@localhost/b")
    assert condition(await harness.iq(bob, "get", QUERY, to="alice@localhost")) == "forbidden"
    roster = roster_module(harness)
    for sub, allowed in (("none", False), ("to", False), ("from", True), ("both", True)):
        await roster.update("alice@localhost", "bob@localhost", subscription(sub))
        reply = await harness.iq(bob, "get", QUERY, to="alice@localhost")
        if allowed:
            # whole seconds: up to one more than the time since the logout
            assert 0 <= seconds(reply) <= time.time() - logout + 1
            assert status(reply) == "zzz"
        else:
            assert condition(reply) == "forbidden", sub
    # bob's subscription to alice's presence is what counts, not alice's to bob's
    await roster.update("alice@localhost", "bob@localhost", lambda item: None)
    await roster.update("bob@localhost", "alice@localhost", subscription("both"))
    assert condition(await harness.iq(bob, "get", QUERY, to="alice@localhost")) == "forbidden"


async def test_without_a_roster_module_only_the_owner_may_ask() -> None:
    harness = ModuleHarness({"last": {}})
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a", available=False)
    await harness.send(alice, "<presence/>")
    logout = time.time()
    await harness.send(alice, "<presence type='unavailable'/>")
    bob = harness.session("bob@localhost/b")
    assert condition(await harness.iq(bob, "get", QUERY, to="alice@localhost")) == "forbidden"
    assert 0 <= seconds(await harness.iq(alice, "get", QUERY)) <= time.time() - logout + 1


async def test_unknown_user_and_no_record(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", QUERY, to="nobody@localhost")
    assert condition(reply) == "service-unavailable"
    harness.users.add("carol@localhost")
    await roster_module(harness).update("carol@localhost", "alice@localhost", subscription("both"))
    reply = await harness.iq(alice, "get", QUERY, to="carol@localhost")
    assert condition(reply) == "item-not-found"


async def test_set_is_not_allowed(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", QUERY, to="localhost")
    assert condition(reply) == "service-unavailable"


async def test_an_older_logout_never_overwrites_a_newer_one(harness: ModuleHarness) -> None:
    module = last_module(harness)
    await module.record("alice@localhost", 2000, "newer")
    await module.record("alice@localhost", 1000, "older")
    item = await harness.host.items("localhost", "last").get("alice")
    assert item is not None and item.attrs == {"time": 2000, "status": "newer"}


async def test_disco_feature(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert LAST in {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}


async def test_logout_in_the_same_write_as_the_stream_close() -> None:
    """Presence, unavailable with a status, then </stream:stream>: all handled in one go,
    while vCard still holds the first presence for its avatar hash (issue 10)."""
    harness = ModuleHarness({"roster": {}, "presence": {}, "vcard": {}, "last": {}})
    await harness.start()
    alice = harness.session("alice@localhost/a", available=False)
    for xml in (
        "<presence><status>Hello</status></presence>",
        "<presence type='unavailable'><status>Goodbye</status></presence>",
    ):
        stanza = parse_stanza(xml)
        stanza.set("from", alice.jid)
        harness.router.route(stanza, alice)  # no await: the stream reads on
    harness.router.session_ended(alice)
    # asked right after the close
    bob = harness.session("alice@localhost/other", available=False)
    reply = await harness.iq(bob, "get", QUERY, to="alice@localhost")
    assert status(reply) == "Goodbye"
    await harness.router.drain()
    item = await harness.host.items("localhost", "last").get("alice")
    assert item is not None and item.attrs["status"] == "Goodbye"
    assert not alice.available


async def test_asked_while_the_logout_is_being_written(harness: ModuleHarness) -> None:
    """A query that arrives while the record is in flight answers from the logout."""
    alice = harness.session("alice@localhost/a", available=False)
    await harness.send(alice, "<presence/>")
    await harness.host.items("localhost", "last").put("alice", {"time": 1, "status": "older"})
    unavailable = parse_stanza("<presence type='unavailable'><status>newer</status></presence>")
    unavailable.set("from", alice.jid)
    harness.router.route(unavailable, alice)
    store = harness.host.items("localhost", "last")
    written = asyncio.Event()
    put = store.backend.put

    async def slow_put(*args: object, **kwargs: object) -> object:
        await written.wait()  # the write is held until the query has been answered
        return await put(*args, **kwargs)  # type: ignore[arg-type]

    store.backend.put = slow_put  # type: ignore[method-assign]
    other = harness.session("alice@localhost/b", available=False)
    answered = asyncio.Event()
    other.deliver = lambda stanza: (other.received.append(stanza), answered.set())  # type: ignore[method-assign]
    query = parse_stanza(f"<iq type='get' id='q' to='alice@localhost'>{QUERY}</iq>")
    query.set("from", other.jid)
    harness.router.route(query, other)
    async with asyncio.timeout(5):
        await answered.wait()
    assert status(other.received[0]) == "newer"
    written.set()
    await harness.router.drain()
    assert (await store.get("alice")).attrs["status"] == "newer"  # type: ignore[union-attr]
