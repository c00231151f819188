"""Offline messages (XEP-0160) through the module host, without sockets."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.modules.slow_stores import GatedSQLite
from tests.storage.services import (  # noqa: F401  (fixture)
    dynamodb_config,
    s3_config,
    service_factory,
)
from xmppd.modules.offline import PAGE, Offline, decide
from xmppd.router import Router
from xmppd.storage import devservices
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.backends.s3 import S3BlobBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import (
    BlobStore,
    ConditionFailed,
    ItemStore,
    Page,
    Query,
    StorageError,
    Write,
)
from xmppd.storage.cache import CachedItemBackend, MemoryCache, NullCache
from xmppd.storage.devservices import LocalService
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, TestSession, parse_stanza, without_echo

DELAY = "urn:xmpp:delay"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
DISCO_INFO = "http://jabber.org/protocol/disco#info"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def bodies(stanzas: list[etree._Element]) -> list[str | None]:
    return [s.findtext("{jabber:client}body") for s in stanzas]


def chat(to: str, body: str, extra: str = "", type_: str = "chat") -> str:
    return f"<message to='{to}' type='{type_}' id='m-{body}'><body>{body}</body>{extra}</message>"


async def make(options: dict[str, Any] | None = None, **modules: Any) -> ModuleHarness:
    harness = ModuleHarness({"disco": {}, "offline": options or {}, **modules})
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


def offline_module(harness: ModuleHarness) -> Offline:
    module = harness.host.modules["offline"]
    assert isinstance(module, Offline)
    return module


async def stored_count(harness: ModuleHarness, user: str = "bob") -> int:
    page = await harness.host.items("localhost", "offline").query(prefix=f"{user}/", limit=1000)
    blobs = await harness.host.blobs("localhost", "offline").list(f"{user}/")
    assert len(page.items) == len(blobs.keys), "index and blobs disagree"
    counter = await harness.host.items("localhost", "offline").get(user)
    if counter is not None:
        assert counter.attrs["count"] == len(page.items), "counter disagrees with the index"
    return len(page.items)


async def login(harness: ModuleHarness, jid: str, priority: int = 0) -> TestSession:
    session = harness.session(jid, available=False)
    # what the session is handed in reply (its offline messages) stays in `received`
    session.received = without_echo(
        session,
        await harness.send(session, f"<presence><priority>{priority}</priority></presence>"),
    )
    return session


@pytest.fixture
async def harness() -> ModuleHarness:
    return await make()


async def test_stored_then_delivered_in_order_with_delay(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    for n in range(5):
        assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
    assert await stored_count(harness) == 5
    bob = harness.session("bob@localhost/phone", available=False)
    got = without_echo(bob, await harness.send(bob, "<presence/>"))
    assert bodies(got) == [f"m{n}" for n in range(5)]
    for stanza in got:
        assert stanza.get("from") == "alice@localhost/a"
        assert stanza.get("to") == "bob@localhost"
        delay = stanza.find(f"{{{DELAY}}}delay")
        assert delay is not None and delay.get("from") == "localhost"
        assert delay.get("stamp", "").endswith("Z") and "T" in delay.get("stamp", "")
    assert await stored_count(harness) == 0
    # a second login gets nothing again
    bob2 = await login(harness, "bob@localhost/desk")
    assert bob2.take() == []


async def test_message_to_full_jid_of_a_gone_resource_is_stored(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    assert await harness.send(alice, chat("bob@localhost/old", "hi")) == []
    bob = await login(harness, "bob@localhost/new")
    assert bodies(bob.take()) == ["hi"]


async def test_what_is_not_stored(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    # headline: dropped silently (RFC 6121 8.5.2.2.1); groupchat and unknown user: errors
    assert await harness.send(alice, chat("bob@localhost", "h", type_="headline")) == []
    [reply] = await harness.send(alice, chat("bob@localhost", "g", type_="groupchat"))
    assert condition(reply) == "service-unavailable"
    [reply] = await harness.send(alice, chat("nobody@localhost", "x"))
    assert condition(reply) == "service-unavailable"
    # an error message is never stored, and never answered
    assert await harness.send(alice, chat("bob@localhost", "e", type_="error")) == []
    # <no-store/> (XEP-0334): not stored, the sender learns it was not delivered
    [reply] = await harness.send(
        alice, chat("bob@localhost", "n", "<no-store xmlns='urn:xmpp:hints'/>")
    )
    assert condition(reply) == "service-unavailable"
    # a bare chat state (XEP-0085): dropped without an error, even with <no-store/>
    for extra in ("", "<no-store xmlns='urn:xmpp:hints'/>"):
        replies = await harness.send(
            alice,
            "<message to='bob@localhost' type='chat'>"
            f"<composing xmlns='http://jabber.org/protocol/chatstates'/>{extra}</message>",
        )
        assert replies == []
    assert await stored_count(harness) == 0


async def test_store_hint_and_bodyless_payloads_are_stored(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.send(
        alice,
        "<message to='bob@localhost' type='chat' id='s1'>"
        "<gone xmlns='http://jabber.org/protocol/chatstates'/>"
        "<store xmlns='urn:xmpp:hints'/></message>",
    )
    await harness.send(
        alice,
        "<message to='bob@localhost' id='r1'><received xmlns='urn:xmpp:receipts' id='x'/>"
        "</message>",
    )
    assert await stored_count(harness) == 2
    bob = await login(harness, "bob@localhost/b")
    assert [s.get("id") for s in bob.take()] == ["s1", "r1"]


@pytest.mark.parametrize(
    ("xml", "decision"),
    [
        ("<message type='chat'><body>x</body></message>", "store"),
        ("<message><thread>t</thread></message>", "store"),
        ("<message type='chat'/>", "discard"),
        (
            "<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>",
            "discard",
        ),
        ("<message><body>x</body><no-store xmlns='urn:xmpp:hints'/></message>", "refuse"),
        ("<message type='headline'><body>x</body></message>", "discard"),
        (
            "<message type='headline'><body>x</body><store xmlns='urn:xmpp:hints'/></message>",
            "store",
        ),
    ],
)
def test_decide(xml: str, decision: str) -> None:
    assert decide(parse_stanza(xml)) == decision


async def test_negative_priority_waits_until_priority_is_raised(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.send(alice, chat("bob@localhost", "one"))
    bob = await login(harness, "bob@localhost/b", priority=-1)
    assert bob.take() == []
    assert await stored_count(harness) == 1
    # while the only resource is negative, messages still go to storage (XEP-0160 step 2)
    await harness.send(alice, chat("bob@localhost", "two"))
    assert bob.take() == []
    got = without_echo(bob, await harness.send(bob, "<presence><priority>1</priority></presence>"))
    assert bodies(got) == ["one", "two"]
    assert await stored_count(harness) == 0
    # a later presence update does not look at storage again
    away = await harness.send(bob, "<presence><show>away</show></presence>")
    assert without_echo(bob, away) == []


async def test_quota_by_count_answers_service_unavailable() -> None:
    harness = await make({"max_messages": 3})
    alice = harness.session("alice@localhost/a")
    for n in range(3):
        assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
    [reply] = await harness.send(alice, chat("bob@localhost", "over"))
    assert condition(reply) == "service-unavailable"
    assert reply.get("id") == "m-over"
    assert await stored_count(harness) == 3
    bob = await login(harness, "bob@localhost/b")
    assert bodies(bob.take()) == ["m0", "m1", "m2"]
    # the queue emptied: the quota is free again
    await harness.send(bob, "<presence type='unavailable'/>")
    assert await harness.send(alice, chat("bob@localhost", "again")) == []
    assert await stored_count(harness) == 1


async def test_quota_by_bytes() -> None:
    harness = await make({"max_bytes": 2048})
    alice = harness.session("alice@localhost/a")
    assert await harness.send(alice, chat("bob@localhost", "x" * 900)) == []
    [reply] = await harness.send(alice, chat("bob@localhost", "y" * 1500))
    assert condition(reply) == "service-unavailable"
    [reply] = await harness.send(alice, chat("bob@localhost", "z" * 4000))  # bigger than all
    assert condition(reply) == "service-unavailable"
    assert await stored_count(harness) == 1


class YieldingItems(MemoryItemBackend):
    """Memory backends never suspend; these do, so concurrent writers really interleave."""

    async def get(self, namespace: str, name: str) -> Any:
        await asyncio.sleep(0)
        return await super().get(namespace, name)

    async def transact(self, writes: Sequence[Write]) -> None:
        await asyncio.sleep(0)
        await super().transact(writes)


class YieldingBlobs(MemoryBlobBackend):
    async def put(self, namespace: str, key: str, data: bytes, **kwargs: Any) -> str:
        await asyncio.sleep(0)
        return await super().put(namespace, key, data, **kwargs)


def yielding_storage() -> Storage:
    return Storage(YieldingItems(), YieldingBlobs(), NullCache())


async def test_concurrent_stores_keep_order_and_lose_nothing() -> None:
    harness = ModuleHarness({"offline": {}})
    harness.storage = harness.host.storage = yielding_storage()
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    module = offline_module(harness)
    stanzas = [parse_stanza(chat("bob@localhost", f"c{n}")) for n in range(30)]
    for stanza in stanzas:
        stanza.set("from", "alice@localhost/a")
    results = await asyncio.gather(*(module.on_offline(s, "bob@localhost") for s in stanzas))
    assert all(results)
    assert await stored_count(harness) == 30
    bob = await login(harness, "bob@localhost/b")
    # tasks started in this order and the per-recipient lock is fair: order is kept
    assert bodies(bob.take()) == [f"c{n}" for n in range(30)]
    assert len(module.locks) == 0  # no lock left behind


async def test_two_nodes_sharing_storage_lose_nothing() -> None:
    """Two module hosts over one store: only conditional writes keep them apart."""
    storage = yielding_storage()
    nodes = []
    for _ in range(2):
        harness = ModuleHarness({"offline": {"max_messages": 1000}}, users={"bob@localhost"})
        harness.storage = harness.host.storage = storage
        await harness.start()
        nodes.append(offline_module(harness))
    stanzas = []
    for n in range(40):
        stanza = parse_stanza(chat("bob@localhost", f"c{n}"))
        stanza.set("from", "alice@localhost/a")
        stanzas.append(stanza)
    results = await asyncio.gather(
        *(nodes[n % 2].on_offline(s, "bob@localhost") for n, s in enumerate(stanzas))
    )
    assert all(results)
    items = ItemStore(storage.items, "localhost", "offline")
    index = (await items.query(prefix="bob/", limit=1000)).items
    assert len(index) == 40
    counter = await items.get("bob")
    assert counter is not None and counter.attrs["count"] == 40 and counter.attrs["next"] == 40
    # each node's own messages keep their relative order (its lock is FIFO)
    blobs = BlobStore(storage.blobs, "localhost", "offline")
    order = []
    for item in index:
        blob = await blobs.get(str(item.attrs["blob"]))
        assert blob is not None
        order.append(int(etree.fromstring(blob.data).findtext("{jabber:client}body")[1:]))
    assert sorted(order) == list(range(40))
    for node in range(2):
        mine = [n for n in order if n % 2 == node]
        assert mine == sorted(mine)


class FailingBlobs(MemoryBlobBackend):
    async def put(self, namespace: str, key: str, data: bytes, **kwargs: Any) -> str:
        raise StorageError("test", "put", "disk on fire")


class FailingTransactions(MemoryItemBackend):
    async def transact(self, writes: Sequence[Write]) -> None:
        raise StorageError("test", "transact", "table on fire")


@pytest.mark.parametrize("broken", ["blobs", "items"])
async def test_store_failure_is_an_error_to_the_sender(broken: str) -> None:
    harness = ModuleHarness({"offline": {}})
    if broken == "blobs":
        harness.storage.blobs = FailingBlobs()
    else:
        harness.storage.items = FailingTransactions()
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    [reply] = await harness.send(alice, chat("bob@localhost", "lost?"))
    assert condition(reply) == "internal-server-error"
    assert reply.get("id") == "m-lost?"
    # no blob left behind when the index could not be written
    assert (await harness.host.blobs("localhost", "offline").list("bob/")).keys == []


class SelfDestructingSession(TestSession):
    """A session whose connection drops after it was handed `limit` stanzas."""

    def __init__(self, jid: str, router: Router, limit: int) -> None:
        super().__init__(jid)
        self.router = router
        self.limit = limit

    def deliver(self, stanza: etree._Element) -> bool:
        super().deliver(stanza)
        if len(self.received) == self.limit:
            self.router.unbind(self)
            self.available = False
        return True


async def test_session_gone_mid_delivery_keeps_the_rest(harness: ModuleHarness) -> None:
    module = offline_module(harness)
    alice = harness.session("alice@localhost/a")
    total = PAGE + 7
    for n in range(total):
        await harness.send(alice, chat("bob@localhost", f"m{n}"))
    bob = SelfDestructingSession("bob@localhost/b", harness.router, PAGE)
    harness.router.bind(bob)
    bob.available = True
    await module.deliver_stored(bob)
    assert bodies(bob.take()) == [f"m{n}" for n in range(PAGE)]
    assert await stored_count(harness) == 7
    again = await login(harness, "bob@localhost/c")
    assert bodies(again.take()) == [f"m{n}" for n in range(PAGE, total)]


async def test_unbound_session_gets_nothing_and_nothing_is_removed(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.send(alice, chat("bob@localhost", "keep"))
    ghost = TestSession("bob@localhost/ghost")
    ghost.available = True
    await offline_module(harness).deliver_stored(ghost)
    assert ghost.take() == [] and await stored_count(harness) == 1


async def test_message_stored_while_user_logs_in_is_delivered_at_once(
    harness: ModuleHarness,
) -> None:
    """The router saw nobody available; by the time it was stored, bob was there."""
    bob = await login(harness, "bob@localhost/b")
    stanza = parse_stanza(chat("bob@localhost", "late"))
    stanza.set("from", "alice@localhost/a")
    assert await offline_module(harness).on_offline(stanza, "bob@localhost")
    await harness.router.drain()
    assert bodies(bob.take()) == ["late"]
    assert await stored_count(harness) == 0


class HeldReads(MemoryItemBackend):
    """Memory items whose queries (the index a delivery of stored messages reads first)
    wait while the test holds them: a store that answers a login's read only after
    a new message for the user came."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = asyncio.Event()  # set once a query waits at the shut gate

    async def query(self, namespace: str, query: Query) -> Page:
        if not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await super().query(namespace, query)


async def logging_in_while_reads_are_held(
    options: dict[str, Any] | None = None,
) -> tuple[ModuleHarness, HeldReads, TestSession, TestSession]:
    """alice has sent bob three messages, stored; bob sends his initial presence and
    the delivery of the stored ones waits for the store; then alice sends "new"."""
    items = HeldReads()
    harness = ModuleHarness(
        {"disco": {}, "offline": options or {}},
        storage=Storage(items, MemoryBlobBackend(), NullCache()),
    )
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    alice = harness.session("alice@localhost/a")
    for n in range(3):
        assert await harness.send(alice, chat("bob@localhost", f"old{n}")) == []
    items.gate.clear()
    bob = harness.session("bob@localhost/phone", available=False)
    presence = parse_stanza("<presence/>")
    presence.set("from", bob.jid)
    bob.receive(presence)
    await items.held.wait()
    new = parse_stanza(chat("bob@localhost", "new"))
    new.set("from", alice.jid)
    alice.receive(new)  # routed now: delivered, or queued behind the stored ones
    return harness, items, alice, bob


async def test_stored_messages_reach_the_client_before_a_new_one() -> None:
    """XEP-0160, RFC 6121 8.5.2: the stored messages first. Before, their delivery
    started from an async hook and read the store while a new message went straight
    to the client, ahead of them."""
    harness, items, _, bob = await logging_in_while_reads_are_held()
    assert bodies(without_echo(bob, bob.take())) == []  # "new" waits behind them
    items.gate.set()
    await harness.router.drain()
    assert bodies(bob.take()) == ["old0", "old1", "old2", "new"]
    assert await stored_count(harness) == 0


async def test_a_store_that_hangs_holds_new_messages_only_for_a_while(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past first_wait the new message goes on; the stored ones follow once the store
    answers, each once, and the wait is logged."""
    harness, items, alice, bob = await logging_in_while_reads_are_held({"first_wait": 0.05})
    sent = asyncio.Event()
    alice.when_idle(sent.set)  # alice waits with her message until it is delivered
    await sent.wait()
    assert bodies(without_echo(bob, bob.take())) == ["new"]
    assert "still runs after" in caplog.text
    items.gate.set()
    await harness.router.drain()
    assert bodies(bob.take()) == ["old0", "old1", "old2"]
    assert await stored_count(harness) == 0


async def started(storage: Storage, options: dict[str, Any]) -> ModuleHarness:
    harness = ModuleHarness({"offline": options}, storage=storage)
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


async def until(done: Callable[[], object], seconds: float = 30.0) -> None:
    """Wait for `done()` to hold (what retries make true some time later)."""
    async with asyncio.timeout(seconds):
        while not done():  # noqa: ASYNC110 - nothing signals a retry's end
            await asyncio.sleep(0.05)


@pytest.mark.services
async def test_a_delivery_an_outage_stopped_at_login_is_tried_again(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
    tmp_path: Path,
) -> None:
    """bob logs in while the item store (moto's DynamoDB) hangs: the read of his stored
    messages fails. Once it answers again he gets them in the same session, each once;
    before, they waited for his next login, which may be days later."""
    moto = service_factory(devservices.moto_server)
    items = await DynamoDBItemBackend.from_config(
        dynamodb_config(moto, create_table=True, timeout=0.5, retries=0)
    )
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    try:
        harness = await started(storage, {"retry_every": 0.2, "first_wait": 0.1})
        alice = harness.session("alice@localhost/a")
        for n in range(3):
            assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
        moto.pause()
        try:
            bob = await login(harness, "bob@localhost/b")
            assert bodies(bob.take()) == []
        finally:
            moto.resume()
        await until(lambda: len(bob.received) >= 3)
        await until(lambda: not offline_module(harness)._handed)
        assert bodies(bob.take()) == ["m0", "m1", "m2"]
        assert await stored_count(harness) == 0
    finally:
        await storage.close()


@pytest.mark.services
async def test_a_retried_write_whose_first_try_landed_stores_the_message_once(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
    tmp_path: Path,
) -> None:
    """moto's DynamoDB hangs while a message is queued for bob: the transaction times
    out, the backend sends it again, and moto, running again, applies the first and
    refuses the second (the counter moved). That refusal is no rival's write: the
    message is in the queue once, and bob gets it once. Before, the queue got it again
    under the next number, and bob got it twice."""
    moto = service_factory(devservices.moto_server)
    items = await DynamoDBItemBackend.from_config(
        dynamodb_config(moto, create_table=True, timeout=2.0, retries=1)
    )
    cache = MemoryCache()
    storage = Storage(
        CachedItemBackend(items, cache), await FileBlobBackend.open(tmp_path / "blobs"), cache
    )
    try:
        harness = await started(storage, {})
        module = offline_module(harness)
        assert await module.count("localhost", "bob") == 0  # the counter read, cached
        assert await stored_across_a_retry(moto, module)
        await harness.router.drain()
        assert await stored_count(harness) == 1
        bob = await login(harness, "bob@localhost/b")
        assert bodies(bob.take()) == ["once"]
    finally:
        await storage.close()


async def stored_across_a_retry(moto: LocalService, module: Offline) -> bool:
    """Store a message for bob while moto hangs past the backend's first try (2 s): the
    second is sent then, and moto, woken between, applies the first and answers the
    second. What the offline module answered."""
    stanza = parse_stanza(chat("bob@localhost", "once"))
    stanza.set("from", "alice@localhost/a")
    moto.pause()
    try:
        storing = asyncio.create_task(module.on_offline(stanza, "bob@localhost"))
        await asyncio.sleep(3.0)
    finally:
        moto.resume()
    return await storing


@pytest.mark.services
async def test_a_blob_put_retried_after_its_first_try_landed_is_no_failure(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
    tmp_path: Path,
) -> None:
    """moto's S3 hangs while a message for bob is written: the put times out, the
    backend sends it again, and moto, running again, stores the first and answers the
    second. The message is stored once and the sender told nothing. Before, the put was
    conditional on the key being new, so the second try reported the first one's blob
    as a rival's: the message was bounced with internal-server-error, its blob left."""
    moto = service_factory(devservices.moto_server)
    blobs = await S3BlobBackend.from_config(
        s3_config(moto, create_bucket=True, timeout=2.0, retries=1)
    )
    storage = Storage(
        await SQLiteItemBackend.open(tmp_path / "items.sqlite3"), blobs, NullCache()
    )
    try:
        harness = await started(storage, {})
        module = offline_module(harness)
        refused: list[etree._Element] = []
        harness.router.bounce = lambda stanza, *args: refused.append(stanza)  # type: ignore[method-assign]
        assert await stored_across_a_retry(moto, module)
        await harness.router.drain()
        assert refused == []
        assert await stored_count(harness) == 1
        bob = await login(harness, "bob@localhost/b")
        assert bodies(bob.take()) == ["once"]
    finally:
        await storage.close()


async def test_a_removal_that_failed_is_retried_without_handing_the_messages_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The messages reach bob, then their removal fails: another process holds the
    SQLite file's write lock. The removal is tried again while bob stays, and he is not
    handed them again meanwhile; once the lock goes, they are removed. Before, they
    stayed stored and came again at each login until one removal succeeded."""
    path = tmp_path / "items.sqlite3"
    items = SQLiteItemBackend(path, busy_timeout=0.2)
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        harness = await started(storage, {"retry_every": 0.1, "first_wait": 0.1})
        alice = harness.session("alice@localhost/a")
        for n in range(3):
            assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
        locker.execute("BEGIN IMMEDIATE")  # WAL: readers go on, writers get "locked"
        bob = await login(harness, "bob@localhost/b")
        await until(lambda: caplog.text.count("delivering offline messages") >= 3)
        assert bodies(bob.received) == ["m0", "m1", "m2"]  # each once, however many tries
        assert await stored_count(harness) == 3
        locker.execute("ROLLBACK")
        await until(lambda: not offline_module(harness)._handed)
        assert await stored_count(harness) == 0
        assert bodies(bob.take()) == ["m0", "m1", "m2"]
    finally:
        locker.close()
        await storage.close()


async def test_handed_messages_are_not_handed_again_after_away_and_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """bob is handed m0..m2, their removal fails (another process holds the SQLite
    file's write lock). His client sends unavailable, the retry timer runs, and he
    comes back with an available presence on the same stream: the messages are only
    removed, not handed to him again. Before, the timer took "unavailable" for "gone",
    forgot what the session had been handed, and it got each message twice."""
    path = tmp_path / "items.sqlite3"
    items = SQLiteItemBackend(path, busy_timeout=0.2)
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        harness = await started(storage, {"retry_every": 0.1, "first_wait": 0.1})
        module = offline_module(harness)
        alice = harness.session("alice@localhost/a")
        for n in range(3):
            assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
        locker.execute("BEGIN IMMEDIATE")  # WAL: readers go on, writers get "locked"
        bob = await login(harness, "bob@localhost/b")
        got = bob.take()
        assert bodies(got) == ["m0", "m1", "m2"]
        await until(lambda: "delivering offline messages" in caplog.text)
        await harness.send(bob, "<presence type='unavailable'/>")
        await until(lambda: not module._retry)  # the timer ran with bob away
        locker.execute("ROLLBACK")
        got += without_echo(bob, await harness.send(bob, "<presence/>"))
        await harness.router.drain()
        got += bob.take()
        assert bodies(got) == ["m0", "m1", "m2"]
        assert await stored_count(harness) == 0
        assert not module._handed
    finally:
        locker.close()
        await storage.close()


class HeldReadsFailedRemovals(HeldReads):
    """HeldReads whose transactions fail while `refuse` is set: a delivery's removal of
    what it handed over fails, and the next try's read waits while the test holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = False

    async def transact(self, writes: Sequence[Write]) -> None:
        if self.refuse:
            raise StorageError("memory", "transact", "a short failure")
        await super().transact(writes)


async def test_handed_messages_are_not_handed_again_after_away_mid_retry() -> None:
    """bob is handed m0..m2 and their removal fails. The timer's next try is reading
    his queue when he sends unavailable: that try stops without handing him anything,
    and when he comes back on the same stream the messages are only removed. Before,
    the stopped try forgot what he had been handed, and he got each message twice."""
    items = HeldReadsFailedRemovals()
    harness = await started(
        Storage(items, MemoryBlobBackend(), NullCache()), {"retry_every": 0.1, "first_wait": 0.1}
    )
    module = offline_module(harness)
    alice = harness.session("alice@localhost/a")
    for n in range(3):
        assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
    items.refuse = True
    bob = await login(harness, "bob@localhost/b")
    got = bob.take()
    assert bodies(got) == ["m0", "m1", "m2"]
    await until(lambda: module._retry)  # the removal failed
    items.held.clear()
    items.gate.clear()
    await items.held.wait()  # the timer's try reads the queue
    away = parse_stanza("<presence type='unavailable'/>")
    away.set("from", bob.jid)
    bob.receive(away)  # not `send`: that would wait for the held try, bob's work
    await until(lambda: not bob.available)
    items.refuse = False
    items.gate.set()
    await until(lambda: len(module.locks) == 0)  # that try has stopped
    got += without_echo(bob, bob.take())
    got += without_echo(bob, await harness.send(bob, "<presence/>"))
    await harness.router.drain()
    got += bob.take()
    assert bodies(got) == ["m0", "m1", "m2"]
    assert await stored_count(harness) == 0
    assert not module._handed


class FailingQueries(MemoryItemBackend):
    """Memory items whose reads of an offline queue fail `fails` times (a timeout or
    two), then work."""

    def __init__(self) -> None:
        super().__init__()
        self.fails = 0

    async def query(self, namespace: str, query: Query) -> Page:
        if self.fails and namespace.endswith("offline"):
            self.fails -= 1
            raise StorageError("memory", "query", "ReadTimeoutError (a blip)")
        return await super().query(namespace, query)


async def test_a_failed_read_at_login_still_delivers_the_stored_messages_first() -> None:
    """The first read of bob's queue at login fails (one timeout). The store answers
    again well within first_wait, so alice's new message waits behind the stored ones
    and reaches bob after them (XEP-0160, RFC 6121 8.5.2). Before, the login delivery
    gave up at the first error and left the stored ones to the retry timer: the new
    message overtook them."""
    items = FailingQueries()
    storage = Storage(items, MemoryBlobBackend(), NullCache())
    harness = await started(storage, {"retry_every": 60.0, "first_wait": 10.0})
    alice = harness.session("alice@localhost/a")
    for n in range(3):
        assert await harness.send(alice, chat("bob@localhost", f"m{n}")) == []
    items.fails = 1
    bob = await login(harness, "bob@localhost/b")
    assert await harness.send(alice, chat("bob@localhost", "new")) == []
    await harness.router.drain()
    assert bodies(bob.take()) == ["m0", "m1", "m2", "new"]
    assert await stored_count(harness) == 0


class AnswerLost(MemoryItemBackend):
    """Memory items where one transaction on bob's queue lands but its answer is lost,
    and the backend's resend is refused (the counter moved): DynamoDB after a timeout.
    `meanwhile` runs between the two: another node working on the same queue."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.meanwhile: Callable[[], Awaitable[None]] | None = None

    async def transact(self, writes: Sequence[Write]) -> None:
        await super().transact(writes)
        if self.armed and any(w.name.startswith("bob/") for w in writes):
            self.armed = False
            if self.meanwhile is not None:
                await self.meanwhile()
            raise ConditionFailed("the resend lost to its own first copy")


async def test_an_append_delivered_before_its_retry_is_not_appended_again() -> None:
    """Node A stores a message for bob; its transaction lands, but A hears of it only
    as a refused resend. Meanwhile bob logs in on node B, which delivers the message
    and removes it (index item and blob). A's retry no longer finds it in the index,
    yet must not append it again: that left an index item whose blob was gone, counted
    against bob's quota and logged as "has no blob" at his next login."""
    items = AnswerLost()
    storage = Storage(items, MemoryBlobBackend(), NullCache())
    node_a = await started(storage, {})
    node_b = await started(storage, {})
    got: list[etree._Element] = []

    async def bob_logs_in_on_b() -> None:
        bob = await login(node_b, "bob@localhost/b")
        got.extend(bob.take())

    items.meanwhile = bob_logs_in_on_b
    items.armed = True
    stanza = parse_stanza(chat("bob@localhost", "once"))
    stanza.set("from", "alice@localhost/a")
    assert await offline_module(node_a).on_offline(stanza, "bob@localhost")
    assert bodies(got) == ["once"]
    queue = node_a.host.items("localhost", "offline")
    page = await queue.query(prefix="bob/", limit=100)
    counter = await queue.get("bob")
    blobs = await node_a.host.blobs("localhost", "offline").list("bob/")
    assert page.items == [] and blobs.keys == []
    assert counter is not None
    assert [counter.attrs[a] for a in ("next", "count", "bytes")] == [1, 0, 0]


async def test_disco_advertises_msgoffline(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<query xmlns='{DISCO_INFO}'/>", to="localhost")
    assert "msgoffline" in {f.get("var") for f in reply.iter(f"{{{DISCO_INFO}}}feature")}


@pytest.fixture
async def real_storage(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = Storage(
        await SQLiteItemBackend.open(tmp_path / "items.sqlite3"),
        await FileBlobBackend.open(tmp_path / "blobs"),
        NullCache(),
    )
    yield storage
    await storage.close()


async def test_order_and_quota_on_sqlite_and_files(real_storage: Storage) -> None:
    harness = ModuleHarness({"offline": {"max_messages": 12}})
    harness.storage = harness.host.storage = real_storage
    harness.users.update({"alice@localhost", "bob@localhost"})
    await harness.start()
    module = offline_module(harness)
    stanzas = [parse_stanza(chat("bob@localhost", f"c{n}")) for n in range(15)]
    for stanza in stanzas:
        stanza.set("from", "alice@localhost/a")
    refused: list[etree._Element] = []
    harness.router.bounce = lambda stanza, *args: refused.append(stanza)  # type: ignore[method-assign]
    await asyncio.gather(*(module.on_offline(s, "bob@localhost") for s in stanzas))
    assert [s.findtext("{jabber:client}body") for s in refused] == ["c12", "c13", "c14"]
    assert await stored_count(harness) == 12
    bob = await login(harness, "bob@localhost/b")
    assert bodies(bob.take()) == [f"c{n}" for n in range(12)]
    assert await stored_count(harness) == 0


async def test_a_sender_to_many_offline_users_is_slowed_and_loses_nothing(
    tmp_path: Path,
) -> None:
    """A client writes to 200 offline users while the store is slow: its stanzas are
    not each queued as storage work in memory, the router holds the client (stops
    reading its connection) until the message before is stored; then every message
    is stored, none bounced."""
    items = await GatedSQLite.open(tmp_path / "items.sqlite3")
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    harness = ModuleHarness({"offline": {}})
    harness.storage = harness.host.storage = storage
    recipients = [f"u{n}@localhost" for n in range(200)]
    harness.users.update(recipients)
    await harness.start()
    alice = harness.session("alice@localhost/a")
    for n, to in enumerate(recipients):
        stanza = parse_stanza(chat(to, f"c{n}"))
        stanza.set("from", alice.jid)
        alice.receive(stanza)
    for _ in range(50):
        await asyncio.sleep(0)
    assert alice.input_holds == 1  # the connection is not read while the store is slow
    # One message's work, not one per message: the queue's runner, the session's
    # pipeline, and the message being stored (counted as its recipient's work).
    assert len(harness.router.pending()) <= 3
    idle = asyncio.Event()
    alice.when_idle(idle.set)
    items.gate.set()
    await idle.wait()
    await harness.router.drain()
    assert alice.input_holds == 0
    assert alice.take() == []  # nothing bounced
    for user in recipients:
        assert await stored_count(harness, user.split("@")[0]) == 1
    await storage.close()
