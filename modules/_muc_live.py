"""Multi-user chat's live rooms in Redis (on a cluster): which node runs each room,
and what another node needs to run it on with its occupants.

One hash per room, `xmppd:muc:room:<room JID>`:

    node      the node that runs the room, "" once it let go: a lease. A node
              runs a room only after CLAIM gave it the lease, which it does
              only if no other live node holds it (alive key,
              xmppd.cluster.schema.alive_key), and every write is fenced by it
              (SAVE writes nothing for a node that does not hold it).
    state     Room.live_state() as JSON: configuration, affiliations, subject,
              occupant-id secret, pending invitations, locked (a temporary
              room is nowhere else).
    history   the discussion history as JSON (Room.history_json).
    seen      the ids of the last messages handled (Room.seen): a message a
              dead node's reaper routes again is dropped by the next owner.
    o:<nick>  one occupant (Room.occupant_record) and `nodes`, the node of each
              of its sessions.

A persistent room that is handed over cleanly leaves no `state` or `history`
(the stores have them, written before the lease is let go); a node killed
leaves all of it, at most one pipeline round trip behind the room.

One hash per service, `xmppd:muc:public:<service>`: room JID -> name of every
live public room (not locked), on whichever node it runs: the room directory.

One string, `xmppd:muc:epoch`: a random token, set by the first claim after
Redis started empty (or was flushed). A node keeps, for each lease, the
epoch it held it under. Redis that comes back empty forgets every record:
a lease this node held whose record is gone, under an epoch Redis no
longer has, was lost with the data, not taken, and nobody claimed the room
since (a claim would have made the record): the node holds it again, and
writes the room's whole record back (`reclaimed`), instead of dropping a
room its occupants are still in. A record gone under the same epoch was
dropped or let expire by another node that ran the room: lost, as a record
another node holds is.

Another node may claim the room after the flush, run it, and drop it (a
temporary room emptied, a room destroyed) before this node looks: the
record gone, the epoch new, it would bring the room back. So for
`reclaim_for()` seconds after the epoch was set (`xmppd:muc:reclaim`, the
epoch with that TTL) a dropped room that ran leaves its record as a fence,
`node` empty (a lease let go: lost to HOLD) and `dropped`, which expires
with the window; past the window nothing is held again (every node that
reaches Redis has refreshed its leases by then), so nothing needs a fence.

Writes are batched as the cluster writer's are: a room that changed is marked
and the call returns; one task writes every marked room in one pipeline, and
what changes meanwhile goes in the next. A batch that fails is written again, whole
(the occupants and message ids it took from its rooms included), before what came since.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.modules._muc_room import Room

KEY = "xmppd:muc:room:"
PUBLIC = "xmppd:muc:public:"
EPOCH = "xmppd:muc:epoch"
RECLAIM = "xmppd:muc:reclaim"
"""The epoch, for `reclaim_for()` seconds after it was set: while it lasts, a lease Redis
lost may be held again, and a room dropped leaves a fence (module docstring)."""
TTL = 86400
"""Seconds a record lives after its holder last wrote or refreshed it (`keep`): what a
killed node leaves behind goes a day after it died, whoever comes back to it or not."""
REFRESHES = 4
"""`keep` runs this many times per TTL: a record outlives a few refreshes lost to a Redis
outage before its live room's lease could lapse."""


def reclaim_for() -> int:
    """Seconds after Redis came back empty during which a node may hold again a lease
    Redis lost: two refreshes (`keep`, every TTL/REFRESHES, and at once when the node's
    heartbeat finds it had lapsed), so that a node that reaches Redis has found its
    leases by then. (A function: tests shorten TTL.)"""
    return max(1, TTL // 2)


REDIS_WAIT = 5.0
RETRY_DELAY = 0.5
_ALIVE_BEFORE, _ALIVE_AFTER = schema.alive_key("\0").split("\0")

CLAIM = """
-- KEYS record, epoch, reclaim; ARGV node, ttl, alive key prefix, alive key suffix,
-- new epoch, reclaim window
local holder = redis.call('HGET', KEYS[1], 'node')
if holder and holder ~= '' and holder ~= ARGV[1]
   and redis.call('EXISTS', ARGV[3] .. holder .. ARGV[4]) == 1 then
  return {0, holder, {}, ''}
end
if redis.call('SET', KEYS[2], ARGV[5], 'NX') then
  redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6])
end
redis.call('HSET', KEYS[1], 'node', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, holder or '', redis.call('HGETALL', KEYS[1]), redis.call('GET', KEYS[2])}
"""
"""Take the room's lease unless another live node holds it: {1, previous holder, the
record, the epoch} or {0, holder, {}, ''}."""

HOLD = """
local holder = redis.call('HGET', KEYS[1], 'node')
if holder == ARGV[1] then return 1 end
if holder or ARGV[3] == '' then return 0 end
local epoch = redis.call('GET', KEYS[2])
if epoch == ARGV[3] then return 0 end
if not epoch then
  redis.call('SET', KEYS[2], ARGV[4])
  redis.call('SET', KEYS[3], ARGV[4], 'EX', ARGV[5])
  epoch = ARGV[4]
elseif redis.call('GET', KEYS[3]) ~= epoch then
  return 0
end
redis.call('HSET', KEYS[1], 'node', ARGV[1])
return epoch
"""
"""The start of SAVE and KEEP (KEYS record, epoch, reclaim; ARGV node, ttl, the lease's
epoch, a new epoch, the reclaim window): 1 if this node holds the lease, 0 if it lost
it, or the epoch it holds it again under, Redis having lost the record with its epoch
(EPOCH) less than the reclaim window ago (RECLAIM)."""

SAVE = """
-- KEYS record, epoch, reclaim, public; ARGV node, ttl, the lease's epoch, new epoch,
-- reclaim window, release, room, list ('1', '0', ''), name, ndel, fields to delete...,
-- field, value, ...
local held = hold(KEYS, ARGV)
if held == 0 then return 0 end
local ndel = tonumber(ARGV[10])
for i = 11, 10 + ndel do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = 11 + ndel, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[8] == '1' then redis.call('HSET', KEYS[4], ARGV[7], ARGV[9])
elseif ARGV[8] == '0' then redis.call('HDEL', KEYS[4], ARGV[7]) end
if ARGV[6] == '1' then redis.call('HSET', KEYS[1], 'node', '') end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return held
"""
"""Write what changed (and let go of the lease if asked), if this node holds it (HOLD's
answer)."""

DROP = """
-- KEYS record, public, reclaim; ARGV node, room, ran ('1': the room ran, '0': never made)
local holder = redis.call('HGET', KEYS[1], 'node')
if holder and holder ~= ARGV[1] then return 0 end
local fence = ARGV[3] == '1' or redis.call('HEXISTS', KEYS[1], 'dropped') == 1
local left = redis.call('PTTL', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('HDEL', KEYS[2], ARGV[2])
if fence and left > 0 then
  redis.call('HSET', KEYS[1], 'node', '', 'dropped', '1')
  redis.call('PEXPIRE', KEYS[1], left)
end
return 1
"""
"""The room is gone (destroyed, a temporary room emptied, never created). While a lease
Redis lost may still be held again (RECLAIM), a room that ran leaves its record as a
fence: `node` empty (a lease let go, which HOLD does not take again) and `dropped`
(kept by a claim, so that a later drop of a room never made there fences it too),
until the window ends."""

KEEP = """
-- KEYS record, epoch, reclaim; ARGV node, ttl, the lease's epoch, new epoch, reclaim window
local held = hold(KEYS, ARGV)
if held ~= 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return held
"""
"""The room this node runs lives on: its record's TTL starts again, if this node still
holds the lease (HOLD's answer)."""


def _with_hold(script: str) -> str:
    return f"local function hold(KEYS, ARGV)\n{HOLD}\nend\n{script}"


@dataclass
class Claimed:
    ok: bool
    holder: str  # the node that holds the lease (ok: the one that held it before, or "")
    record: dict[str, str] = field(default_factory=dict)


@dataclass
class _Change:
    room_jid: str
    room: Room | None  # None: only the lease to let go, or the record to drop
    state: bool = False
    history: bool = False
    release: bool = False
    drop: bool = False
    ran: bool = False  # a drop of a room that ran here (DROP)
    done: list[asyncio.Future[None]] = field(default_factory=list)
    # Taken from the room (Room.touched, Room.seen_changed) when the write is built, and
    # kept here until it is written: a write that fails is tried again with them.
    touched: set[str] = field(default_factory=set)
    seen: bool = False


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def record_key(room_jid: str) -> str:
    return KEY + room_jid


class LiveRooms:
    def __init__(
        self,
        redis: Redis,
        node: str,
        nodes_of: Callable[[list[str]], dict[str, str | None]],
        lost: Callable[[str, Room], None],
    ) -> None:
        """`nodes_of(full JIDs)`: the node each session is bound on; `lost(room JID,
        room)`: a write of that room was refused, another node holds its lease now
        (the room may have been loaded again meanwhile: not that one)."""
        self.redis = redis
        self.node = node
        self.nodes_of = nodes_of
        self.lost = lost
        self._claim = redis.register_script(CLAIM)
        self._save = redis.register_script(_with_hold(SAVE))
        self._drop = redis.register_script(DROP)
        self._keep = redis.register_script(_with_hold(KEEP))
        self._epochs: dict[str, str] = {}  # room JID -> the epoch its lease was taken under
        self._pending: list[_Change] = []
        self._last: dict[str, _Change] = {}  # room JID -> its change in _pending
        self._task: asyncio.Task[None] | None = None
        self.closing = False  # the node stops: a failed write is not tried again
        self.log = logging.getLogger("xmppd.modules.muc")

    async def claim(self, room_jid: str) -> Claimed:
        async with asyncio.timeout(REDIS_WAIT):
            ok, holder, flat, epoch = await self._claim(
                keys=[record_key(room_jid), EPOCH, RECLAIM],
                args=[
                    self.node, TTL, _ALIVE_BEFORE, _ALIVE_AFTER, secrets.token_hex(8),
                    reclaim_for(),
                ],
            )
        record = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        if ok:
            self._epochs[room_jid] = _text(epoch)
        return Claimed(bool(ok), holder.decode() if isinstance(holder, bytes) else "", record)

    def changed(self, room: Room, state: bool, history: bool) -> None:
        """Write what the room's last transition changed (with the next batch)."""
        if not (state or history or room.touched or room.seen_changed):
            return
        change = self._change(room.jid, room)
        change.state |= state
        change.history |= history

    def release(self, room_jid: str, room: Room | None) -> asyncio.Future[None]:
        """Write the room's last change and let go of its lease: done once written."""
        change = self._change(room_jid, room)
        change.release = True
        return self._done(change)

    def drop(self, room_jid: str, ran: bool) -> asyncio.Future[None]:
        """The room is gone: its record and its directory entry go. `ran`: the room ran
        here (emptied, destroyed), not a name claimed for a stanza and never made: a
        lease Redis lost is not taken again over it (DROP)."""
        change = self._change(room_jid, None)
        change.drop = True
        change.ran = ran
        return self._done(change)

    @staticmethod
    def keep_every() -> float:
        """Seconds between two `keep`s (read when the module starts: tests shorten TTL)."""
        return TTL / REFRESHES

    async def keep(self, rooms: dict[str, Room]) -> tuple[list[str], dict[str, str]]:
        """The rooms this node runs, quiet or not, keep their records (one round trip):
        a record expires only when its node stopped refreshing it, that is died. (Not
        PERSIST while leased: a killed node's records would then stay in Redis for
        ever, and in the room directory.) A room whose record Redis lost with its
        epoch is held again. Returns the rooms whose lease this node no longer holds,
        and those it holds again, each with its epoch, to write back whole
        (`reclaimed`; the caller checks they are still the ones it ran)."""
        if not rooms:
            return [], {}
        try:
            async with asyncio.timeout(REDIS_WAIT):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for room_jid in rooms:
                        await self._keep(
                            keys=[record_key(room_jid), EPOCH, RECLAIM],
                            args=self._hold_args(room_jid, TTL),
                            client=pipe,
                        )
                    kept = await pipe.execute()
        except (RedisError, OSError, TimeoutError) as exc:
            self.log.error("muc: could not refresh the live rooms in Redis (%s)", exc)
            return [], {}
        lost = [room_jid for room_jid, held in zip(rooms, kept, strict=True) if not held]
        again = {
            room_jid: _text(held)
            for room_jid, held in zip(rooms, kept, strict=True)
            if held and held != 1
        }
        return lost, again

    def reclaimed(self, room_jid: str, room: Room, epoch: str) -> None:
        """Redis lost the room's record (it came back empty), and this node holds the
        lease again, under `epoch`: the whole record is written again, as the next
        owner needs it (state, history, every occupant, the last message ids)."""
        self.log.warning("muc: Redis had lost %s; this node holds it again", room_jid)
        self._epochs[room_jid] = epoch
        room.touched |= set(room.occupants)
        room.seen_changed = True
        self.changed(room, state=True, history=True)

    def lost_lease(self, room_jid: str) -> None:
        """The room's lease is not this node's any more (another node took it, or the
        stores hold a newer copy) and its copy went: its epoch goes too, lest the
        epochs of every room this node ever lost stay in memory. The caller knows
        which copy went (a copy loaded since holds a lease of its own: not that one)."""
        self._epochs.pop(room_jid, None)

    def _hold_args(self, room_jid: str, ttl: int) -> list[Any]:
        """HOLD's arguments: node, ttl, the lease's epoch, a new epoch, the reclaim
        window."""
        return [
            self.node, ttl, self._epochs.get(room_jid, ""), secrets.token_hex(8), reclaim_for()
        ]

    async def flush(self) -> None:
        """Return once what was marked so far is written (or given up on)."""
        while self._task is not None and not self._task.done():
            await asyncio.gather(asyncio.shield(self._task), return_exceptions=True)

    async def public_rooms(self, service: str) -> dict[str, str]:
        """Room JID -> name of the live public rooms of `service`, on any node."""
        async with asyncio.timeout(REDIS_WAIT):
            listed = await self.redis.hgetall(PUBLIC + service)
            rooms = {_text(jid): _text(name) for jid, name in listed.items()}
            if not rooms:
                return {}
            async with self.redis.pipeline(transaction=False) as pipe:
                for jid in rooms:
                    pipe.exists(record_key(jid))
                exists = await pipe.execute()
        gone = [jid for jid, there in zip(rooms, exists, strict=True) if not there]
        if gone:  # a record expired (its node died and nobody came back to the room)
            await self.redis.hdel(PUBLIC + service, *gone)
        return {jid: name for jid, name in rooms.items() if jid not in gone}

    # --- the batch writer ----------------------------------------------------------------

    def _change(self, room_jid: str, room: Room | None) -> _Change:
        """The room's pending change to add to: its last one, unless that one ends
        something (a release, a drop) or was another Room of that name; changes
        are written in the order they were made."""
        change = self._last.get(room_jid)
        if change is None or change.release or change.drop or room is None or (
            change.room is not room
        ):
            change = _Change(room_jid, room)
            self._pending.append(change)
            self._last[room_jid] = change
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return change

    @staticmethod
    def _done(change: _Change) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        change.done.append(future)
        return future

    async def _run(self) -> None:
        while self._pending:
            batch, self._pending, self._last = self._pending, [], {}
            try:
                await self._write(batch)
            except (RedisError, OSError, TimeoutError) as exc:
                if not self.closing:
                    self.log.error("muc: could not write live rooms to Redis (%s); retrying", exc)
                    self._pending = batch + self._pending  # older than what came meanwhile
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                # Stopping: given up (a lease left behind goes with this node's alive key).
                self.log.error("muc: could not write live rooms to Redis (%s)", exc)
            for change in batch:
                for future in change.done:
                    if not future.done():
                        future.set_result(None)

    async def _write(self, batch: list[_Change]) -> None:
        async with asyncio.timeout(REDIS_WAIT):
            async with self.redis.pipeline(transaction=False) as pipe:
                for change in batch:
                    room_jid = change.room_jid
                    public = PUBLIC + room_jid.split("@", 1)[1]
                    if change.drop:
                        await self._drop(
                            keys=[record_key(room_jid), public, RECLAIM],
                            args=[self.node, room_jid, "1" if change.ran else "0"],
                            client=pipe,
                        )
                    else:
                        await self._save(
                            keys=[record_key(room_jid), EPOCH, RECLAIM, public],
                            args=self._args(change), client=pipe,
                        )
                results = await pipe.execute()
        for change, written in zip(batch, results, strict=True):
            if change.drop or change.release:
                self._epochs.pop(change.room_jid, None)
            if change.room is None or change.release or written == 1:
                continue
            if not written:
                self.log.warning("muc: %s is run by another node now; letting go",
                                 change.room_jid)
                self.lost(change.room_jid, change.room)
            else:
                self.reclaimed(change.room_jid, change.room, _text(written))

    def _args(self, change: _Change) -> list[Any]:
        room_jid, room = change.room_jid, change.room
        delete: list[str] = []
        fields: list[str] = []
        listed = ""
        name = ""
        if room is not None:
            change.touched |= room.touched
            room.touched = set()
            records = {nick: room.occupant_record(nick) for nick in change.touched}
            jids = [
                jid for r in records.values() if r is not None for jid in (r["jid"], *r["others"])
            ]
            nodes = self.nodes_of(jids) if jids else {}
            for nick, occupant in records.items():
                if occupant is None:
                    delete.append(f"o:{nick}")
                    continue
                sessions = (occupant["jid"], *occupant["others"])
                occupant["nodes"] = {jid: nodes.get(jid) for jid in sessions}
                fields += [f"o:{nick}", json.dumps(occupant)]
            if change.release and room.config.persistent:
                delete += ["state", "history"]  # the stores have them (written first)
            else:
                if change.state:
                    fields += ["state", json.dumps(room.live_state())]
                if change.history:
                    fields += ["history", room.history_json().decode()]
            change.seen |= room.seen_changed
            room.seen_changed = False
            if change.seen:
                fields += ["seen", json.dumps(list(room.seen))]
            if change.state:
                listed = "1" if room.config.public and not room.locked else "0"
                name = room.config.name
        release = "1" if change.release else "0"
        return [
            *self._hold_args(room_jid, TTL), release, room_jid, listed, name, len(delete),
            *delete, *fields,
        ]
