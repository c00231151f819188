"""vcard-temp (XEP-0054) and avatar hashes in presence (XEP-0153/XEP-0398), without sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable

import pytest
from lxml import etree

from tests.storage.services import s3_config, service_factory  # noqa: F401  (fixture)
from xmppd.modules import vcard as vcard_module
from xmppd.storage import devservices
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.backends.s3 import S3BlobBackend
from xmppd.storage.base import Blob, StorageError
from xmppd.storage.cache import CachedBlobBackend, MemoryCache
from xmppd.storage.devservices import LocalService
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, TestSession, parse_stanza

VCARD = "vcard-temp"
X_UPDATE = "vcard-temp:x:update"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
IMAGE_HASH = hashlib.sha1(IMAGE).hexdigest()


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def vcard_xml(fn: str, image: bytes | None = None) -> str:
    photo = ""
    if image is not None:
        encoded = base64.b64encode(image).decode()
        wrapped = "\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
        photo = f"<PHOTO><TYPE>image/png</TYPE><BINVAL>\n{wrapped}\n</BINVAL></PHOTO>"
    return f"<vCard xmlns='{VCARD}'><FN>{fn}</FN>{photo}</vCard>"


async def stored(harness: ModuleHarness, user: str = "alice") -> bytes | None:
    blob = await harness.host.blobs("localhost", "vcard").get(user)
    return None if blob is None else blob.data


def photo_of(presence: etree._Element) -> str | None:
    """The text of the x:update photo (None: no update element; "": empty photo)."""
    x = presence.findall(f"{{{X_UPDATE}}}x")
    assert len(x) <= 1, etree.tostring(presence)
    if not x:
        return None
    return x[0].findtext(f"{{{X_UPDATE}}}photo") or ""


@pytest.fixture
async def harness() -> ModuleHarness:
    return await ModuleHarness({"disco": {}, "vcard": {"max_bytes": 4096}}).start()


async def bound(harness: ModuleHarness, jid: str, available: bool = True) -> TestSession:
    session = harness.session(jid, available)
    await harness.host.fire("session/bound", session)
    await harness.router.drain()  # the hash loads in a task of its own
    return session


async def test_disco_feature(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(
        alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", to="localhost"
    )
    assert "vcard-temp" in {f.get("var") for f in reply.iter()}


async def test_own_vcard_empty_then_set_then_read_by_anyone(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    reply = await harness.iq(alice, "get", f"<vCard xmlns='{VCARD}'/>")
    assert reply.get("type") == "result"
    (card,) = reply
    assert card.tag == f"{{{VCARD}}}vCard" and len(card) == 0

    reply = await harness.iq(alice, "set", vcard_xml("Alice A."))
    assert reply.get("type") == "result" and len(reply) == 0
    for who, to in ((alice, None), (alice, "alice@localhost"), (bob, "alice@localhost")):
        reply = await harness.iq(who, "get", f"<vCard xmlns='{VCARD}'/>", to=to)
        assert reply.get("type") == "result"
        assert reply.findtext(f"{{{VCARD}}}vCard/{{{VCARD}}}FN") == "Alice A."
        assert reply.get("from") == "alice@localhost"


async def test_other_users_missing_vcard_and_missing_user(harness: ModuleHarness) -> None:
    bob = harness.session("bob@localhost/b")
    harness.users.add("carol@localhost")  # exists, never set a vCard
    reply = await harness.iq(bob, "get", f"<vCard xmlns='{VCARD}'/>", to="carol@localhost")
    assert condition(reply) == "item-not-found"
    reply = await harness.iq(bob, "get", f"<vCard xmlns='{VCARD}'/>", to="nobody@localhost")
    assert condition(reply) == "service-unavailable"


async def test_setting_another_users_vcard_is_forbidden(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.iq(alice, "set", vcard_xml("Alice"))
    before = await stored(harness)
    reply = await harness.iq(bob, "set", vcard_xml("Mallory"), to="alice@localhost")
    assert condition(reply) == "forbidden"
    assert await stored(harness) == before
    assert await stored(harness, "bob") is None


@pytest.mark.parametrize(
    "payload",
    [
        f"<VCARD xmlns='{VCARD}'><FN>x</FN></VCARD>",  # element names are case-sensitive
        f"<vCard xmlns='{VCARD}'><PHOTO><BINVAL>!!not base64!!</BINVAL></PHOTO></vCard>",
        f"<vCard xmlns='{VCARD}'>loose text<FN>x</FN></vCard>",
        f"<vCard xmlns='{VCARD}'><FN>x</FN>tail text</vCard>",
    ],
    ids=["wrong-element", "bad-base64", "text", "tail-text"],
)
async def test_malformed_vcard_is_bad_request(harness: ModuleHarness, payload: str) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", vcard_xml("Alice"))
    before = await stored(harness)
    reply = await harness.iq(alice, "set", payload)
    assert condition(reply) == "bad-request"
    assert await stored(harness) == before


async def test_get_with_wrong_element_is_bad_request(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", f"<VCARD xmlns='{VCARD}'/>")
    assert condition(reply) == "bad-request"


async def test_size_limit(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", vcard_xml("Alice"))
    before = await stored(harness)
    reply = await harness.iq(alice, "set", vcard_xml("A" * 5000))  # max_bytes is 4096 here
    assert condition(reply) == "not-acceptable"
    assert await stored(harness) == before
    reply = await harness.iq(alice, "set", vcard_xml("A" * 3000))
    assert reply.get("type") == "result"


async def test_empty_vcard_deletes(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", vcard_xml("Alice"))
    assert await stored(harness) is not None
    reply = await harness.iq(alice, "set", f"<vCard xmlns='{VCARD}'/>")
    assert reply.get("type") == "result"
    assert await stored(harness) is None


async def test_storage_failure_is_an_error_and_changes_nothing(
    harness: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", vcard_xml("Alice"))
    before = await stored(harness)

    async def broken(*args: object, **kwargs: object) -> str:
        raise StorageError("memory", "put", "disk on fire")

    monkeypatch.setattr(harness.storage.blobs, "put", broken)
    reply = await harness.iq(alice, "set", vcard_xml("Changed"))
    assert condition(reply) == "internal-server-error"
    monkeypatch.undo()
    assert await stored(harness) == before


@pytest.mark.services
async def test_a_vcard_whose_write_timed_out_but_landed_gives_its_hash(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],  # noqa: F811
) -> None:
    """moto's S3 hangs while alice sets a vCard with a photo: the write times out, she
    gets an error, and the write lands once moto runs again. Her presences then carry
    the stored photo's hash. Before, the node kept the hash it held before the write,
    until all her sessions had ended."""
    moto = service_factory(devservices.moto_server)
    s3 = await S3BlobBackend.from_config(
        s3_config(moto, create_bucket=True, timeout=0.5, retries=0)
    )
    cache = MemoryCache()
    storage = Storage(MemoryItemBackend(), CachedBlobBackend(s3, cache), cache)
    try:
        harness = await ModuleHarness({"vcard": {}}, storage=storage).start()
        alice = await bound(harness, "alice@localhost/a")  # no vCard: read and cached
        bob = await bound(harness, "bob@localhost/b")
        moto.pause()  # the write's read is the cache's; the write itself hangs
        try:
            reply = await harness.iq(alice, "set", vcard_xml("Alice", IMAGE))
            assert condition(reply) == "internal-server-error"
        finally:
            moto.resume()
        async with asyncio.timeout(30):
            # moto applies the write when it runs again: nothing signals that
            while await s3.get("localhost/vcard", "alice") is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await harness.send(alice, "<presence to='bob@localhost/b'/>")
        (directed,) = bob.take()
        assert photo_of(directed) == IMAGE_HASH
    finally:
        await storage.close()


class SlowBlobs(MemoryBlobBackend):
    """Every call yields to the loop, so concurrent writers really interleave."""

    async def get(self, namespace: str, key: str) -> Blob | None:
        await asyncio.sleep(0.001)
        return await super().get(namespace, key)

    async def put(self, namespace: str, key: str, data: bytes, **kwargs: object) -> str:
        await asyncio.sleep(0.001)
        return await super().put(namespace, key, data, **kwargs)  # type: ignore[arg-type]


def set_iq(session: TestSession, iq_id: str, payload: str) -> etree._Element:
    stanza = parse_stanza(f"<iq type='set' id='{iq_id}'>{payload}</iq>")
    stanza.set("from", session.jid)
    return stanza


async def test_concurrent_sets_on_one_node_last_wins() -> None:
    harness = ModuleHarness({"vcard": {}})
    harness.storage.blobs = SlowBlobs()
    await harness.start()
    alice = await bound(harness, "alice@localhost/a")
    harness.router.route(set_iq(alice, "one", vcard_xml("First", IMAGE)), alice)
    harness.router.route(set_iq(alice, "two", vcard_xml("Second")), alice)
    await harness.router.drain()
    replies = {r.get("id"): r.get("type") for r in alice.take()}
    assert replies == {"one": "result", "two": "result"}
    assert await stored(harness) == etree.tostring(etree.fromstring(vcard_xml("Second")))
    # the cached hash follows the last write: no photo
    await harness.send(alice, "<presence/>")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    (presence,) = bob.take()
    assert photo_of(presence) == ""


async def test_concurrent_sets_from_two_nodes_never_corrupt() -> None:
    """Two module hosts on one store (two cluster nodes): conditional writes retry, last wins."""
    shared = SlowBlobs()
    nodes = []
    for _ in range(2):
        node = ModuleHarness({"vcard": {}})
        node.storage.blobs = shared
        nodes.append(await node.start())
    sessions = [node.session(f"alice@localhost/n{i}") for i, node in enumerate(nodes)]
    cards = {}
    for round_ in range(5):
        for i, (node, session) in enumerate(zip(nodes, sessions, strict=True)):
            payload = vcard_xml(f"node{i}-round{round_}", IMAGE if i else None)
            cards[f"node{i}-round{round_}"] = payload
            node.router.route(set_iq(session, f"{i}-{round_}", payload), session)
    await asyncio.gather(*(node.router.drain() for node in nodes))
    for session in sessions:
        assert {r.get("type") for r in session.take()} == {"result"}
    data = await stored(nodes[0])
    assert data is not None
    fn = etree.fromstring(data).findtext(f"{{{VCARD}}}FN")
    assert fn is not None and data == etree.tostring(etree.fromstring(cards[fn]))


# --- avatar hash in presence --------------------------------------------------------------


async def test_hash_is_added_to_broadcast_and_directed_presence(harness: ModuleHarness) -> None:
    alice = await bound(harness, "alice@localhost/a")
    other = await bound(harness, "alice@localhost/other")
    bob = await bound(harness, "bob@localhost/b")
    await harness.iq(alice, "set", vcard_xml("Alice", IMAGE))

    await harness.send(alice, "<presence><show>away</show></presence>")
    (seen,) = other.take()
    assert photo_of(seen) == IMAGE_HASH
    assert seen.findtext("{jabber:client}show") == "away"
    assert alice.presence is not None and photo_of(alice.presence) == IMAGE_HASH

    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    (directed,) = bob.take()
    assert photo_of(directed) == IMAGE_HASH

    await harness.send(alice, "<presence type='unavailable' to='bob@localhost/b'/>")
    (gone,) = bob.take()
    assert photo_of(gone) is None


@pytest.mark.parametrize(
    ("client_x", "expected"),
    [
        ("", IMAGE_HASH),  # nothing: added
        (f"<x xmlns='{X_UPDATE}'/>", IMAGE_HASH),  # "not ready": MUST be overwritten
        (f"<x xmlns='{X_UPDATE}'><photo>0badc0ffee</photo></x>", IMAGE_HASH),  # stale: replaced
        (f"<x xmlns='{X_UPDATE}'><photo/></x>", ""),  # "no avatar" on purpose: kept
    ],
    ids=["absent", "empty-x", "other-hash", "empty-photo"],
)
async def test_client_update_element(harness: ModuleHarness, client_x: str, expected: str) -> None:
    alice = await bound(harness, "alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.iq(alice, "set", vcard_xml("Alice", IMAGE))
    await harness.send(alice, f"<presence to='bob@localhost/b'>{client_x}</presence>")
    (presence,) = bob.take()
    assert photo_of(presence) == expected


async def test_no_photo_is_an_empty_photo_element(harness: ModuleHarness) -> None:
    alice = await bound(harness, "alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    assert photo_of(bob.take()[0]) == ""
    await harness.iq(alice, "set", vcard_xml("Alice", IMAGE))
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    assert photo_of(bob.take()[0]) == IMAGE_HASH
    await harness.iq(alice, "set", vcard_xml("Alice"))  # photo removed
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    assert photo_of(bob.take()[0]) == ""


async def test_hash_is_loaded_at_session_bound(harness: ModuleHarness) -> None:
    data = etree.tostring(etree.fromstring(vcard_xml("Alice", IMAGE)))
    await harness.host.blobs("localhost", "vcard").put("alice", data)
    alice = await bound(harness, "alice@localhost/a")
    vcard = harness.host.modules["vcard"]
    assert vcard._photo["alice@localhost"] == IMAGE_HASH  # type: ignore[attr-defined]
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    assert photo_of(bob.take()[0]) == IMAGE_HASH
    # the last session going away forgets the hash
    harness.router.unbind(alice)
    await harness.host.fire("session/closed", alice)
    assert "alice@localhost" not in vcard._photo  # type: ignore[attr-defined]


async def test_presence_before_the_hash_loads_waits_and_keeps_its_order() -> None:
    harness = ModuleHarness({"vcard": {}})
    harness.storage.blobs = SlowBlobs()
    await harness.start()
    data = etree.tostring(etree.fromstring(vcard_xml("Alice", IMAGE)))
    await harness.host.blobs("localhost", "vcard").put("alice", data)
    other = harness.session("alice@localhost/other")
    alice = harness.session("alice@localhost/a", available=False)  # session/bound not run yet
    for xml in (
        "<presence/>",
        "<presence type='unavailable'/>",
        "<presence><show>dnd</show></presence>",
    ):
        stanza = parse_stanza(xml)
        stanza.set("from", alice.jid)
        alice.receive(stanza)  # as the connection hands them on, one read
    assert other.received == []  # the first waits for the hash, the others behind it
    assert alice.input_holds == 1  # and the connection is not read meanwhile
    await harness.router.drain()
    assert alice.input_holds == 0
    seen = other.take()
    assert [p.get("type") for p in seen] == [None, "unavailable", None]
    assert photo_of(seen[0]) == IMAGE_HASH and photo_of(seen[2]) == IMAGE_HASH
    assert seen[2].findtext("{jabber:client}show") == "dnd"


async def test_unreadable_hash_lets_presence_through_untouched(
    harness: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: object, **kwargs: object) -> Blob | None:
        raise StorageError("memory", "get", "unreachable")

    monkeypatch.setattr(harness.storage.blobs, "get", broken)
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.send(alice, f"<presence to='bob@localhost/b'><x xmlns='{X_UPDATE}'/></presence>")
    (presence,) = bob.take()
    assert photo_of(presence) == ""  # the client's own (empty) element, not ours
    monkeypatch.undo()
    # a later login retries the load
    await bound(harness, "alice@localhost/again")
    vcard = harness.host.modules["vcard"]
    assert vcard._photo["alice@localhost"] == ""  # type: ignore[attr-defined]


async def test_presence_of_a_session_that_ended_while_held_is_dropped() -> None:
    harness = ModuleHarness({"vcard": {}})
    harness.storage.blobs = SlowBlobs()
    await harness.start()
    other = harness.session("alice@localhost/other")
    alice = harness.session("alice@localhost/a", available=False)
    stanza = parse_stanza("<presence/>")
    stanza.set("from", alice.jid)
    harness.router.route(stanza, alice)
    harness.router.unbind(alice)
    await harness.host.fire("session/closed", alice)
    await harness.router.drain()
    assert other.received == [] and not alice.available


async def test_account_removed_deletes_the_vcard(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", vcard_xml("Alice"))
    await harness.host.remove_user_data("localhost", "alice")
    assert await stored(harness) is None


async def test_the_avatar_hash_comes_back_after_a_failed_set_once_the_store_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """alice's vCard has a photo (hash H). During a store outage her vCard set fails,
    which drops H (the write may still land), and her next presence cannot load it.
    Presences in the next LOAD_RETRY_AFTER seconds go without the hash and without a
    read of the store; once that has passed and the store is back (still holding H:
    the write never landed), the next presence carries H again. Before, the failed
    load left "unknown" cached, and her presences went without H until a new session
    of hers bound."""
    harness = await ModuleHarness({"vcard": {}}).start()
    vcard = harness.host.modules["vcard"]
    now = [1000.0]
    vcard.clock = lambda: now[0]  # type: ignore[attr-defined]
    alice = await bound(harness, "alice@localhost/a")
    await harness.iq(alice, "set", vcard_xml("Alice", IMAGE))
    bob = await bound(harness, "bob@localhost/b")
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    (presence,) = bob.take()
    assert photo_of(presence) == IMAGE_HASH

    reads: list[str] = []

    async def broken(*args: object, **kwargs: object) -> Blob | None:
        reads.append("failed")
        raise StorageError("memory", "get", "unreachable")

    monkeypatch.setattr(harness.storage.blobs, "get", broken)
    monkeypatch.setattr(harness.storage.blobs, "put", broken)
    reply = await harness.iq(alice, "set", vcard_xml("Alice 2", IMAGE))
    assert condition(reply) == "internal-server-error"
    reads.clear()
    for _ in range(3):  # during the outage: one load, then no read and no wait
        await harness.send(alice, "<presence to='bob@localhost/b'/>")
        (presence,) = bob.take()
        assert photo_of(presence) is None
    assert reads == ["failed"]
    monkeypatch.undo()  # the store is back, and holds H
    now[0] += vcard_module.LOAD_RETRY_AFTER
    await harness.send(alice, "<presence to='bob@localhost/b'/>")
    (presence,) = bob.take()
    assert photo_of(presence) == IMAGE_HASH
