"""Multi-user chat rooms whose copy moves: fenced writes, unloading, invitations.

Two nodes on the same stores (SQLite or DynamoDB items, files for blobs, each
node with backends of its own, as two processes have): a room loaded
by the second node makes the first node's copy stale, and what that copy
writes afterwards must be refused (modules/_muc_store.py). A persistent room
nobody is in is unloaded from memory and comes back whole at its next
stanza. An invitation is kept with the room's state, so its decline is
accepted on whichever node runs the room next.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from lxml import etree

from tests.modules.slow_stores import HeldWritesSQLite
from tests.modules.test_muc import (
    MUC_USER,
    ROOM,
    Clock,
    U,
    admin_iq,
    codes,
    condition,
    join,
    messages,
    owner_iq,
    presences,
    say,
    submit,
    written,
)
from tests.storage.services import dynamodb_config, moto_service  # noqa: F401  (fixture)
from xmppd.modules import _muc_store
from xmppd.modules._muc_room import MUC_OWNER, Room
from xmppd.modules._muc_store import GEN, GONE, TOMBSTONE_KEEP, pack_history, unpack_history
from xmppd.modules.muc import Muc
from xmppd.storage.backends import dynamodb
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import ItemBackend
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, TestSession, parse_stanza
from xmppd.xml import ns

Nodes = Callable[..., Awaitable[tuple[ModuleHarness, Clock]]]


@pytest.fixture(params=["sqlite", "dynamodb"])
async def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Nodes]:
    """Make nodes over the same stores, each with backends of its own (as two processes
    have): items in SQLite (one file) or DynamoDB (moto's, one table), blobs in files."""
    opened: list[ItemBackend | FileBlobBackend] = []
    moto = request.getfixturevalue("moto_service") if request.param == "dynamodb" else None

    async def node(**options: object) -> tuple[ModuleHarness, Clock]:
        items: ItemBackend
        if moto is None:
            items = await SQLiteItemBackend.open(tmp_path / "items.db")
        else:
            items = await DynamoDBItemBackend.from_config(dynamodb_config(moto))
        blobs = await FileBlobBackend.open(tmp_path / "blobs")
        opened.extend((items, blobs))
        if not opened[2:]:  # the first node: nothing left by another test in the table
            await items.delete("localhost/muc_rooms", "room")
        storage = Storage(items, blobs, NullCache())
        h = await ModuleHarness({"disco": {}, "muc": dict(options)}, storage=storage).start()
        clock = Clock()
        h.host.module(Muc).clock = clock
        return h, clock

    yield node
    for backend in opened:
        await backend.close()


async def stored(h: ModuleHarness) -> tuple[dict[str, object], int, list[str]]:
    """The room's stored state, its generation and the bodies of its stored history."""
    item = await h.host.items("localhost", "muc_rooms").get("room")
    blob = await h.host.blobs("localhost", "muc_history").get("room")
    assert item is not None and blob is not None
    bodies = [
        etree.fromstring(xml).findtext(f"{{{ns.CLIENT}}}body") or ""
        for _, xml in json.loads(unpack_history(blob.data)[1])
    ]
    return json.loads(str(item.attrs["state"])), int(item.attrs[GEN]), bodies


async def persistent_room(h: ModuleHarness, owner: TestSession, **config: str) -> None:
    await join(h, owner, "Alice")
    reply = await owner_iq(h, owner, "set", submit(persistentroom="1", **config))
    assert reply.get("type") == "result", etree.tostring(reply)
    owner.take()


async def test_a_stale_copys_writes_are_refused_and_never_overwrite_newer_state(
    nodes: Nodes, caplog: pytest.LogCaptureFixture
) -> None:
    a, clock_a = await nodes()
    alice = a.session("alice@localhost/a")
    await persistent_room(a, alice)
    await say(a, alice, subject="one")
    await say(a, alice, "first")
    await written(a)

    # The room moves: node b loads it (its copy the newer) and changes it.
    b, clock_b = await nodes()
    alice_b = b.session("alice@localhost/b")
    await join(b, alice_b, "Alice")
    clock_b.now += 1
    await say(b, alice_b, subject="two")
    await say(b, alice_b, "second")
    await written(b)
    newer = await stored(b)
    assert newer[0]["subject"] == "two" and newer[2] == ["first", "second"]

    # Node a's copy does not know: its history write comes after b's, and is refused.
    clock_a.now += 2
    with caplog.at_level(logging.WARNING, "xmppd.modules.muc"):
        got = await say(a, alice, "stale message")  # its write done meanwhile
        await written(a)
    assert await stored(b) == newer
    assert "refused a stale write of room@conference.localhost" in caplog.text
    # The stale copy is gone from node a, its occupant told (332), not left in it.
    assert ROOM not in a.host.module(Muc).rooms
    shut = [p for p in presences(got + alice.take()) if p.get("type") == "unavailable"]
    assert shut and "332" in codes(shut[-1])

    # Node c loads it: b's state write (a subject) comes after, and is refused.
    c, _ = await nodes()
    alice_c = c.session("alice@localhost/c")
    await join(c, alice_c, "Alice")
    with caplog.at_level(logging.WARNING, "xmppd.modules.muc"):
        await say(b, alice_b, subject="stale")
        await written(b)
    state, gen, bodies = await stored(c)
    assert (state["subject"], gen, bodies) == ("two", 2, ["first", "second"])
    assert ROOM not in b.host.module(Muc).rooms

    # A destroyed room is not brought back by a stale copy either (c's, d loaded it).
    d, _ = await nodes()
    alice_d = d.session("alice@localhost/d")
    await join(d, alice_d, "Alice")
    await owner_iq(d, alice_d, "set", "<destroy/>")
    await written(d)
    with caplog.at_level(logging.WARNING, "xmppd.modules.muc"):
        await say(c, alice_c, subject="back from the dead")
        await written(c)
    tombstone = await d.host.items("localhost", "muc_rooms").get("room")
    assert tombstone is not None and set(tombstone.attrs) == {GEN, GONE}  # no room
    assert caplog.text.count("refused a stale write of room@conference.localhost") == 3


async def test_an_empty_persistent_room_is_unloaded_and_comes_back_whole(nodes: Nodes) -> None:
    h, clock = await nodes(unload_after=60)
    muc = h.host.module(Muc)
    alice, bob = h.session("alice@localhost/a"), h.session("bob@localhost/b")
    await persistent_room(h, alice, roomname="Kept", membersonly="1")
    await admin_iq(h, alice, "set", "<item affiliation='admin' jid='bob@localhost'/>")
    await say(h, alice, subject="Topic")
    clock.now += 1
    await h.send(
        alice, f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='carol@localhost'/>"
        "</x></message>",
    )
    # Someone in it: never unloaded, however long.
    muc.unload_idle()
    clock.now += 1000
    muc.unload_idle()
    assert ROOM in muc.rooms
    await say(h, alice, "last words")  # its history write waits a second: still pending
    await h.send(alice, f"<presence to='{ROOM}/Alice' type='unavailable'/>")
    muc.unload_idle()  # empty since now
    clock.now += 59
    muc.unload_idle()
    assert ROOM in muc.rooms
    clock.now += 1
    muc.unload_idle()
    assert ROOM not in muc.rooms  # unloaded, its history write still under way

    # A join right away loads it again, after that write: nothing is lost.
    got = await join(h, bob, "Bob")
    assert codes(presences(got)[-1]) == {"110"}
    assert item_of(presences(got)[-1]) == ("admin", "moderator")
    assert got[-1].findtext(f"{{{ns.CLIENT}}}subject") == "Topic"
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)[:-1]] == ["last words"]
    room = muc.rooms[ROOM]
    assert room.config.name == "Kept" and room.config.members_only
    assert room.invited == {"carol@localhost": "alice@localhost/a"}
    (refused,) = await join(h, h.session("dave@localhost/d"), "Dave")  # members only
    assert condition(refused) == "registration-required"


async def test_a_query_loads_an_unloaded_room_and_it_unloads_again(nodes: Nodes) -> None:
    h, clock = await nodes(unload_after=10)
    muc = h.host.module(Muc)
    alice = h.session("alice@localhost/a")
    await persistent_room(h, alice, roomname="Quiet")
    await h.send(alice, f"<presence to='{ROOM}/Alice' type='unavailable'/>")
    muc.unload_idle()
    clock.now += 10
    muc.unload_idle()
    assert muc.rooms == {}
    info = await h.iq(
        h.session("dave@localhost/d"), "get",
        "<query xmlns='http://jabber.org/protocol/disco#info'/>", to=ROOM,
    )
    assert info.get("type") == "result"
    assert info.find("{*}query/{*}identity").get("name") == "Quiet"
    assert ROOM in muc.rooms
    muc.unload_idle()
    clock.now += 10
    muc.unload_idle()
    assert muc.rooms == {}


async def test_a_decline_after_the_room_moved_is_accepted(nodes: Nodes) -> None:
    a, _ = await nodes()
    alice = a.session("alice@localhost/a")
    await persistent_room(a, alice)
    await a.send(
        alice, f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><invite to='carol@localhost'/>"
        "</x></message>",
    )
    await written(a)
    # The room now runs on node b (loaded from the stores), where the decline goes.
    b, _ = await nodes()
    alice_b = b.session("alice@localhost/a")  # the inviter, bound on b now
    carol = b.session("carol@localhost/c")
    decline = (
        f"<message to='{ROOM}'><x xmlns='{MUC_USER}'><decline to='alice@localhost'>"
        "<reason>busy</reason></decline></x></message>"
    )
    assert await b.send(carol, decline) == []
    (told,) = alice_b.take()
    assert told.find(f"{U}x/{U}decline").get("from") == "carol@localhost"
    assert told.findtext(f"{U}x/{U}decline/{U}reason") == "busy"
    await written(b)
    # Once: the decline is kept too, wherever the room runs next.
    c, _ = await nodes()
    (refused,) = await c.send(c.session("carol@localhost/c"), decline)
    assert condition(refused) == "not-acceptable"


def item_of(presence: etree._Element) -> tuple[str | None, str | None]:
    found = presence.find(f"{U}x/{U}item")
    assert found is not None
    return found.get("affiliation"), found.get("role")


async def test_a_room_stored_before_generations_loads_and_is_written_with_one(
    nodes: Nodes,
) -> None:
    """An item without `gen` and a history blob that is a bare list (as stored before
    generations were kept) load as generation 0; the load takes generation 1, and
    the next writes carry it."""
    h, clock = await nodes()
    bob = h.session("bob@localhost/b")
    room = Room(ROOM, h.host.module(Muc).limits, "alice@localhost")
    room.affiliations["alice@localhost"] = "owner"
    room.subject = "Old"
    room.config.persistent = True
    items = h.host.items("localhost", "muc_rooms")
    await items.put("room", {"state": json.dumps(room.snapshot()), "public": 1,
                             "creator": "alice@localhost"})
    said = f"<message xmlns='{ns.CLIENT}' type='groupchat' from='{ROOM}/Alice'>" \
        "<body>kept</body></message>"
    await h.host.blobs("localhost", "muc_history").put(
        "room", json.dumps([[clock.now - 10, said]]).encode()
    )
    got = await join(h, bob, "Bob")
    assert got[-1].findtext(f"{{{ns.CLIENT}}}subject") == "Old"
    assert [m.findtext(f"{{{ns.CLIENT}}}body") for m in messages(got)[:-1]] == ["kept"]
    await say(h, bob, "new")
    await written(h)
    state, gen, bodies = await stored(h)
    assert (state["subject"], gen, bodies) == ("Old", 1, ["kept", "new"])


async def handed_over(a: ModuleHarness, b: ModuleHarness) -> None:
    """Node b takes a's room over as a cluster node does after a's lease lapsed: from
    the record a's live copy left in Redis (state, history, occupants; the module's
    own `_read`, as its load does), the stores as they are; a's copy runs on, stale."""
    room = a.host.module(Muc).rooms[ROOM]
    record = {
        "state": json.dumps(room.live_state()),
        "history": room.history_json().decode(),
        **{f"o:{nick}": json.dumps(room.occupant_record(nick)) for nick in room.occupants},
    }
    muc = b.host.module(Muc)
    copy, _ = await muc._read(ROOM, record)
    assert copy is not None
    muc.rooms[ROOM] = copy
    muc._after(copy)  # as the load does: what the stores lack is written
    await written(b)


Moved = tuple[ModuleHarness, ModuleHarness, HeldWritesSQLite, SQLiteItemBackend]


@pytest.fixture
async def moved_before_its_first_write(tmp_path: Path) -> AsyncIterator[Moved]:
    """A room made persistent on node a, whose first write to the stores is slow to
    land (held until the test opens `gate`), taken over by node b as after a's lease
    lapsed: (a, b, a's held item store, b's item store)."""
    held = await HeldWritesSQLite.open(tmp_path / "items.db")
    shared = await SQLiteItemBackend.open(tmp_path / "items.db")
    blobs_a = await FileBlobBackend.open(tmp_path / "blobs")
    blobs_b = await FileBlobBackend.open(tmp_path / "blobs")
    try:
        a = await ModuleHarness(
            {"disco": {}, "muc": {}}, storage=Storage(held, blobs_a, NullCache())
        ).start()
        b = await ModuleHarness(
            {"disco": {}, "muc": {}}, storage=Storage(shared, blobs_b, NullCache())
        ).start()
        alice = a.session("alice@localhost/a")
        await join(a, alice, "Alice")
        # Not through `a.iq`, which waits for the write too.
        configure = parse_stanza(
            f"<iq type='set' id='c1' to='{ROOM}'><query xmlns='{MUC_OWNER}'>"
            f"{submit(persistentroom='1', roomname='Old copy')}</query></iq>"
        )
        configure.set("from", alice.jid)
        alice.receive(configure)
        await held.held.wait()  # a's write decided, not landed
        assert [r.get("type") for r in alice.take() if r.get("id") == "c1"] == ["result"]
        assert await shared.get("localhost/muc_rooms", "room") is None
        await handed_over(a, b)
        yield a, b, held, shared
    finally:
        held.gate.set()
        for backend in (held, shared, blobs_a, blobs_b):
            await backend.close()


async def test_a_destroyed_room_is_not_brought_back_by_an_older_copys_late_write(
    moved_before_its_first_write: Moved, caplog: pytest.LogCaptureFixture
) -> None:
    """The room is destroyed on b; a's write, landing afterwards, is refused: the room
    is not back (it was, when the destroy of a room the stores never held left
    nothing for the late write to fail against), and a new room of that name is made
    and stored as any new room."""
    a, b, held, shared = moved_before_its_first_write
    alice_b = b.session("alice@localhost/a")
    reply = await owner_iq(b, alice_b, "set", "<destroy/>")
    assert reply.get("type") == "result", etree.tostring(reply)
    await written(b)
    assert ROOM not in b.host.module(Muc).rooms

    with caplog.at_level(logging.WARNING, "xmppd.modules.muc"):
        held.gate.set()  # a's write lands now
        await written(a)
    tombstone = await shared.get("localhost/muc_rooms", "room")
    assert tombstone is not None and set(tombstone.attrs) == {GEN, GONE}, tombstone
    assert "refused a stale write of room@conference.localhost" in caplog.text
    assert ROOM not in a.host.module(Muc).rooms

    # The name is free: a join makes a new room, stored past the destroyed one.
    bob = b.session("bob@localhost/b")
    got = await join(b, bob, "Bob")
    assert "201" in codes(presences(got)[-1])
    reply = await owner_iq(b, bob, "set", submit(persistentroom="1", roomname="New"))
    assert reply.get("type") == "result", etree.tostring(reply)
    await written(b)
    item = await shared.get("localhost/muc_rooms", "room")
    assert item is not None and int(item.attrs[GEN]) > int(tombstone.attrs[GEN])
    assert json.loads(str(item.attrs["state"]))["config"]["name"] == "New"
    assert json.loads(str(item.attrs["state"]))["creator"] == "bob@localhost"


async def test_an_older_copys_late_first_write_never_overwrites_the_newer_copys(
    moved_before_its_first_write: Moved, caplog: pytest.LogCaptureFixture
) -> None:
    """The room changes on b, which stored it; a's first write, landing afterwards, is
    refused (both copies were at generation 0, the stores holding neither when b
    took over: a's write overwrote b's)."""
    a, b, held, shared = moved_before_its_first_write
    alice_b = b.session("alice@localhost/a")
    reply = await owner_iq(b, alice_b, "set", submit(roomname="New copy"))
    assert reply.get("type") == "result", etree.tostring(reply)
    await written(b)

    with caplog.at_level(logging.WARNING, "xmppd.modules.muc"):
        held.gate.set()  # a's write lands now
        await written(a)
    item = await shared.get("localhost/muc_rooms", "room")
    assert item is not None
    assert json.loads(str(item.attrs["state"]))["config"]["name"] == "New copy"
    assert "refused a stale write of room@conference.localhost" in caplog.text
    assert ROOM not in a.host.module(Muc).rooms
    assert ROOM in b.host.module(Muc).rooms


async def test_a_tombstone_goes_once_no_copy_can_still_write(nodes: Nodes) -> None:
    """A destroyed room's tombstone stays TOMBSTONE_KEEP seconds, then a sweep deletes
    it (and nothing else: a stored room stays): the stores do not keep one for every
    name ever destroyed. The name is free all along."""
    h, clock = await nodes()
    muc = h.host.module(Muc)
    alice = h.session("alice@localhost/a")
    await persistent_room(h, alice, roomname="Gone soon")
    await say(h, alice, "words")
    kept = "kept@conference.localhost"
    await join(h, alice, "Alice", kept)
    reply = await owner_iq(h, alice, "set", submit(persistentroom="1"), kept)
    assert reply.get("type") == "result", etree.tostring(reply)
    await owner_iq(h, alice, "set", "<destroy/>")
    await written(h)
    items = h.host.items("localhost", "muc_rooms")
    tombstone = await items.get("room")
    assert tombstone is not None and set(tombstone.attrs) == {GEN, GONE}
    assert await h.host.blobs("localhost", "muc_history").get("room") is None

    # A history an older copy wrote after the destroy (at its own, older, generation).
    histories = h.host.blobs("localhost", "muc_history")
    await histories.put("room", pack_history(int(tombstone.attrs[GEN]) - 1, b"[]"))

    clock.now += TOMBSTONE_KEEP - 1
    assert await muc.sweep_tombstones() == 0
    assert await items.get("room") == tombstone
    clock.now += 1
    assert await muc.sweep_tombstones() == 1
    assert await items.get("room") is None
    assert await histories.get("room") is None
    assert await items.get("kept") is not None
    got = await join(h, h.session("bob@localhost/b"), "Bob")
    assert "201" in codes(presences(got)[-1])  # a new room


async def test_the_sweep_walks_every_room_a_page_at_a_time(
    nodes: Nodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tombstones among stored rooms, more than a page of each: every old one goes in
    one pass in name order, the rooms stay. (It asked for the tombstones sorted by
    `gone` from the start after each page: on DynamoDB a scan and a sort in memory
    per page, failing past SORT_CAP tombstones, every hour from then on.)"""
    monkeypatch.setattr(_muc_store, "SWEEP_PAGE", 2)
    monkeypatch.setattr(dynamodb, "SORT_CAP", 4)  # as if more than 10,000 tombstones
    h, clock = await nodes()
    muc = h.host.module(Muc)
    items = h.host.items("localhost", "muc_rooms")
    tag = uuid.uuid4().hex[:8]  # DynamoDB's table is shared by the tests
    rooms = {f"{tag}-room{n}" for n in range(4)}
    await items.batch_put({
        **{f"{tag}-gone{n}": {GEN: 1, GONE: int(clock.now)} for n in range(5)},
        **{name: {GEN: 0, "state": "{}", "public": 0, "creator": ""} for name in rooms},
    })
    clock.now += TOMBSTONE_KEEP
    assert await muc.sweep_tombstones() >= 5  # and any a test before left, as old
    assert {item.name for item in (await items.query(prefix=tag, limit=100)).items} == rooms
