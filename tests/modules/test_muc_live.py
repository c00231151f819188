"""The live rooms' writes to Redis (modules/_muc_live.py) against a real redis-server:
what the next owner of a room reads after a failover must be there, Redis errors or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
from lxml import etree
from redis.asyncio import Redis

from tests.storage.services import redis_service, service_factory  # noqa: F401  (fixtures)
from xmppd.modules import _muc_live
from xmppd.modules._muc_live import LiveRooms, record_key
from xmppd.modules._muc_room import Limits, Room
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService
from xmppd.xml import ns

ROOM = "room@conference.localhost"
OTHER = "other@conference.localhost"
ALICE = "alice@localhost/desk"


@pytest.fixture
async def admin(redis_service: LocalService) -> AsyncIterator[Redis]:  # noqa: F811
    """The test's own connection: it grants and takes back the node's rights."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    # The node connects as "muc", a user the test can deny a command (a real error
    # reply from Redis, as an out-of-memory or read-only replica gives).
    await redis.acl_setuser(
        "muc", enabled=True, nopass=True, keys=["*"], channels=["*"], commands=["+@all"]
    )
    yield redis
    await redis.aclose()


class Refused(logging.Handler):
    """Set once the live rooms' writer logs a write it will try again."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "retrying" in record.getMessage():
            self.seen.set()


def stanza(xml: str) -> etree._Element:
    return etree.fromstring(f"<wrap xmlns='{ns.CLIENT}'>{xml}</wrap>")[0]


async def test_a_failed_write_is_retried_with_its_occupants_and_seen_ids(
    redis_service: LocalService,  # noqa: F811
    admin: Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Redis refuses the first write of a join and a message (the script is denied),
    then takes the retry: the occupant's record and the seen message ids are written
    (the retry once found them cleared from the room, and wrote neither: the next
    owner lost the occupant, and handled a re-routed message twice)."""
    monkeypatch.setattr(_muc_live, "RETRY_DELAY", 0.05)
    redis = Redis.from_url(devservices.redis_url(redis_service), username="muc", password="x")
    lost: list[str] = []
    live = LiveRooms(
        redis, "node-a", lambda jids: dict.fromkeys(jids, "node-a"),
        lambda jid, _room: lost.append(jid),
    )
    try:
        assert (await live.claim(ROOM)).ok
        room = Room(ROOM, Limits(), "alice@localhost")
        room.presence(stanza(f"<presence from='{ALICE}' to='{ROOM}/Alice'/>"), "Alice", 0.0)
        room.groupchat(
            stanza(f"<message from='{ALICE}' to='{ROOM}' type='groupchat' id='m1'>"
                   "<body>hi</body></message>"),
            0.0,
        )
        assert room.touched and room.seen_changed

        await admin.acl_setuser("muc", commands=["-evalsha"])
        refused = Refused()
        live.log.addHandler(refused)
        try:
            live.changed(room, state=True, history=True)
            await refused.seen.wait()  # the first write refused
        finally:
            live.log.removeHandler(refused)
        await admin.acl_setuser("muc", commands=["+evalsha"])
        await live.flush()

        written = await admin.hgetall(record_key(ROOM))
        record = {k.decode(): v.decode() for k, v in written.items()}
        assert record["node"] == "node-a"
        assert json.loads(record["o:Alice"])["jid"] == ALICE
        assert json.loads(record["seen"]) == [f"{ALICE}\0m1"]
        assert "state" in record and "history" in record
        assert lost == []
    finally:
        await redis.aclose()


def occupied_room() -> Room:
    """A room with Alice in it, who said something (occupant, history, seen ids)."""
    room = Room(ROOM, Limits(), "alice@localhost")
    room.presence(stanza(f"<presence from='{ALICE}' to='{ROOM}/Alice'/>"), "Alice", 0.0)
    room.groupchat(
        stanza(f"<message from='{ALICE}' to='{ROOM}' type='groupchat' id='m1'>"
               "<body>hi</body></message>"),
        0.0,
    )
    return room


async def record_of(admin: Redis) -> dict[str, str]:
    written = await admin.hgetall(record_key(ROOM))
    return {k.decode(): v.decode() for k, v in written.items()}


async def test_a_lease_redis_lost_with_its_data_is_held_again_and_written_back(
    redis_service: LocalService, admin: Redis  # noqa: F811
) -> None:
    """Redis comes back empty (FLUSHALL, as a restart without persistence): the node
    that runs the room, finding its record gone with the epoch it claimed it under,
    holds the lease again and writes the whole record back, at its refresh (a
    heartbeat's lapse) or at its next write, rather than take the room for lost
    (every occupant told 332)."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    lost: list[str] = []
    live = LiveRooms(
        redis, "node-a", lambda jids: dict.fromkeys(jids, "node-a"),
        lambda jid, _room: lost.append(jid),
    )
    try:
        assert (await live.claim(ROOM)).ok
        room = occupied_room()
        live.changed(room, state=True, history=True)
        await live.flush()
        whole = await record_of(admin)
        assert {"node", "state", "history", "seen", "o:Alice"} <= whole.keys()

        await admin.flushall()
        gone, again = await live.keep({ROOM: room})
        assert gone == [] and ROOM in again
        live.reclaimed(ROOM, room, again[ROOM])
        await live.flush()
        assert await record_of(admin) == whole
        assert await admin.ttl(record_key(ROOM)) > 0

        # At a write, as well: a message, and the record back whole (Alice too).
        await admin.flushall()
        room.groupchat(
            stanza(f"<message from='{ALICE}' to='{ROOM}' type='groupchat' id='m2'>"
                   "<body>still here</body></message>"),
            0.0,
        )
        live.changed(room, state=False, history=True)
        await live.flush()  # the write that found the record gone
        await live.flush()  # the whole record, written again
        record = await record_of(admin)
        assert record["node"] == "node-a" and "o:Alice" in record and "state" in record
        assert json.loads(record["seen"]) == [f"{ALICE}\0m1", f"{ALICE}\0m2"]
        assert lost == []
    finally:
        await redis.aclose()


@pytest.mark.parametrize("how", [
    "claimed since the flush",
    "dropped by another node",
    "run and dropped since the flush",
    "dropped since the flush, then claimed and never made",
    "flushed longer ago than the reclaim window",
])
async def test_a_lease_another_node_took_is_still_lost_after_redis_lost_its_data(
    redis_service: LocalService, admin: Redis, how: str  # noqa: F811
) -> None:
    """No split brain: a room another node claimed after Redis came back empty is given
    up (its record names that node); so is one whose record another node dropped
    without a flush (the epoch is the one the lease was taken under: nothing was lost,
    the room moved). Nor does a temporary room come back that another node claimed
    after the flush, ran and dropped (it emptied) before this node looked: the drop
    left a fence for the reclaim window (`reclaim_for`), which a claim for a stanza
    that made no room, and its drop, keep. Past the window, nothing is held again."""
    url = devservices.redis_url(redis_service)
    redis_a, redis_b = Redis.from_url(url), Redis.from_url(url)
    lost: list[str] = []
    a = LiveRooms(
        redis_a, "node-a", lambda jids: dict.fromkeys(jids, "node-a"),
        lambda jid, _room: lost.append(jid),
    )
    b = LiveRooms(redis_b, "node-b", lambda jids: {}, lambda jid, _room: None)
    try:
        assert (await a.claim(ROOM)).ok
        room = occupied_room()
        a.changed(room, state=True, history=True)
        await a.flush()
        if how != "dropped by another node":
            await admin.flushall()
        if how == "flushed longer ago than the reclaim window":
            assert (await b.claim(OTHER)).ok  # sets the new epoch
            await admin.delete(_muc_live.RECLAIM)  # as its TTL ends
        else:  # node-a taken for dead (no alive key here)
            assert (await b.claim(ROOM)).ok
        if how != "claimed since the flush":  # b ran the room, it emptied
            b.changed(occupied_room(), state=True, history=True)
            await b.drop(ROOM, ran=True)
            assert (await record_of(admin)).keys() <= {"node", "dropped"}
        if how == "dropped since the flush, then claimed and never made":
            assert (await b.claim(ROOM)).ok
            await b.drop(ROOM, ran=False)
        assert await a.keep({ROOM: room}) == ([ROOM], {})
        a.changed(room, state=False, history=True)
        await a.flush()
        assert lost == [ROOM]  # the write refused too
        record = await record_of(admin)
        if how == "claimed since the flush":
            assert record["node"] == "node-b"
        else:  # a fence, or nothing: the room not brought back
            assert record in ({}, {"node": "", "dropped": "1"})
    finally:
        await redis_a.aclose()
        await redis_b.aclose()


async def test_a_fence_lasts_the_reclaim_window_and_a_room_never_made_leaves_none(
    redis_service: LocalService, admin: Redis  # noqa: F811
) -> None:
    """A drop's fence is only there while a lease Redis lost may be held again: it goes
    with the window, and a claim for a stanza that made no room (an error to a name
    nobody uses) leaves nothing behind, so stanzas to made-up names fill no memory."""
    redis = Redis.from_url(devservices.redis_url(redis_service))
    live = LiveRooms(redis, "node-b", lambda jids: {}, lambda jid, _room: None)
    try:
        assert (await live.claim(OTHER)).ok
        await live.drop(OTHER, ran=False)
        assert await admin.exists(record_key(OTHER)) == 0
        assert (await live.claim(ROOM)).ok
        await live.drop(ROOM, ran=True)
        assert await record_of(admin) == {"node": "", "dropped": "1"}
        # It expires with the window, not a TTL after the drop (the script sets the
        # window's PTTL, which Redis 7.0 may read a millisecond apart from its clock).
        ends = await admin.execute_command("PEXPIRETIME", record_key(ROOM))
        window = await admin.execute_command("PEXPIRETIME", _muc_live.RECLAIM)
        assert 0 < ends <= window + 2
    finally:
        await redis.aclose()
