"""Multi-user chat (XEP-0045) at conference.<host>, with XEP-0410 and XEP-0421.

This module is the room's host: it serves the service domain, finds or
loads the room a stanza is for, hands the stanza to the room
(modules/_muc_room.py, pure state transitions), routes what the room
answers, and writes what the room marked changed. Rooms live in this
node's memory while they are in use; persistent ones are read from the
stores the first time a stanza names them (stanzas for a room that is
loading wait in order, up to MAX_WAITING of them, and leaves past that
apart), written back after each change, and unloaded once
nobody has been in them for `unload_after` seconds (`unload_idle`).

Storage (per virtual host):
- item store "muc_rooms": one item per persistent room, named by the
  room's local part: its configuration, affiliations, subject, creator and
  occupant-id secret as JSON, plus `public` and `creator` attributes so the
  room directory and the rooms-per-user limit are one query each, and `gen`,
  the generation that fences its writes (modules/_muc_store.py: a copy of
  the room older than the one that last wrote is refused), and `born`, the
  generation it was created at (a history blob older than that is a
  destroyed room's, and not loaded). A destroyed
  room leaves a tombstone (`gen` and `gone`, no state) for a day, so that
  no older copy's late write brings it back (`sweep_tombstones`).
- blob store "muc_history": one blob per persistent room, the last
  `history_length` messages. A join reads nothing from storage (the room
  is in memory); the blob is read once when the room loads and written at
  most once per HISTORY_WRITE seconds while people talk, and at stop.

A write that storage fails is tried again after RETRY_WAITS: a change an owner
was told was made is not lost to a short failure of the store.

On a cluster, each room has one live owner node: the live node with the
highest rendezvous weight for the room's JID (`owner_of`), which every node
computes alike from the heartbeats' node set. A stanza for a room that
arrives elsewhere is forwarded to its owner's router (`forward_to_node`,
through the owner's inbox, keeping each node's order); the owner runs the
room as a node alone would, and its output reaches occupants on any node
through the session table. A node runs a room only while it holds the
room's lease in Redis (modules/_muc_live.py), where it also keeps what the
next owner needs: the room's state, history, last message ids and
occupants. When the node set changes, a node hands over the rooms it no
longer owns (stores written, then the last change and the lease let go in
Redis); the new owner, which kept their stanzas waiting meanwhile, claims
the lease and runs the room on with its occupants (sessions that died with
a node leave). A node that stops cleanly tells the others first (a cluster
notice, "muc"), so they stop counting it as an owner before it hands its
rooms over.

The choice of one live owner per room (and why not shared state in Redis)
is in docs/architecture.md, "Multi-user chat".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field

from xmppd.jid import JID
from xmppd.modulehost import Module, ModuleHost, Routed
from xmppd.modules import _muc_store
from xmppd.modules._muc_live import LiveRooms
from xmppd.modules._muc_room import (
    MUC,
    MUC_ADMIN,
    MUC_OWNER,
    OCCUPANT_ID,
    PING,
    REGISTER,
    Limits,
    Out,
    Room,
)
from xmppd.modules._muc_send import Outbox
from xmppd.modules._muc_store import Stale, pack_history, unpack_history
from xmppd.storage.base import UNCHANGED, Blob, Item, Query, StorageError, Unchanged
from xmppd.stream.errors import StanzaError, error_reply
from xmppd.xml import ns

DISCO_INFO = "http://jabber.org/protocol/disco#info"
DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
HISTORY_WRITE = 1.0  # seconds between two writes of one room's history
RETRY_WAITS = (0.5, 1.0, 2.0)
"""Seconds before each new try of a room's write that storage failed: a short failure
loses no change an owner or admin was told was made; a longer one is logged, and the
room's next change writes its whole state again."""
UNLOAD_SWEEP = 30.0
"""Seconds between two looks for persistent rooms empty for `unload_after` seconds: a
room is unloaded between `unload_after` and that plus UNLOAD_SWEEP after it emptied."""
TOMBSTONE_SWEEP = 3600.0
"""Seconds between two sweeps of the tombstones of rooms destroyed more than
`_muc_store.TOMBSTONE_KEEP` seconds ago (each node sweeps; a delete is conditional)."""
MAX_LISTED = 1000  # stored public rooms the directory (disco#items) lists
MAX_WAITING = 1000
"""Stanzas one room may have waiting while it loads (its lease claimed, its state read):
past that, each is answered resource-constraint (wait) at once, never queued without
bound while Redis or the stores are slow (the outbox's MAX_BACKLOG does the same for
what the room sends). A leave (unavailable presence) is not: it waits apart, one per
session (`_leave_later`), for up to MAX_WAITING sessions, more than a room holds."""
CLAIM_RETRY = 1.0  # seconds between two claims of a room another node still runs
ASK_AFTER = 4.0
"""Seconds a claim waits for the holder to let go at its heartbeat (every 3 s) before it
asks the holder to let go at once (a lease left by an earlier process of its name)."""


NOTICE = "muc"
"""Cluster notice topic: {"leaving": node}, sent by a node that stops, before it
writes and drops its rooms; {"released": room JID}, sent by a node that let go of a
room's lease (the new owner, waiting to claim it, tries again at once);
{"release": room JID, "holder": node}, sent by an owner that waits for the lease:
the holder lets go at once if it does not run the room; {"forget": bare JID}, sent
by the node where an account was removed: every node drops its affiliations and
registered nicks from the rooms it runs."""


def owner_of(room_jid: str, nodes: frozenset[str]) -> str:
    """The room's owner among `nodes` by rendezvous (highest random weight) hashing:
    every node that sees the same set picks the same owner, and a node joining or
    leaving moves only the rooms whose highest weight it has or had."""
    return max(
        nodes, key=lambda node: hashlib.sha256(f"{node}\0{room_jid}".encode()).digest()
    )


def _names(state: dict[str, Any], bare: str) -> bool:
    """Does a stored room's state name `bare` (affiliation, registered nick, creator)?"""
    return (
        bare in state.get("affiliations", {})
        or bare in state.get("registered", {})
        or state.get("creator") == bare
    )


async def forget_stored(
    host: ModuleHost,
    vhost: str,
    bare: str,
    live: Callable[[str], Room | None],
    after: Callable[[Room], None],
) -> bool:
    """`Room.forget` in every stored room of `vhost`'s service that does not run here
    (`live`, by the room's local part: one that does was done from memory, and is
    written from there): its state and its history. Every room's history is read,
    since anyone may speak in an open room; the reads of a page of rooms go together.
    Both writes are conditional on what was read, so that a message the room's node
    stored meanwhile is not lost. A room loaded here meanwhile is forgotten in memory
    too, and handed to `after` to be written."""
    rooms, histories = host.items(vhost, "muc_rooms"), host.blobs(vhost, "muc_history")

    def state_without(current: Item | None) -> dict[str, object] | Unchanged:
        if current is None or _muc_store.is_tombstone(current):  # destroyed since read
            return UNCHANGED
        state = json.loads(str(current.attrs["state"]))
        if not Room.forget_stored(state, bare):
            return UNCHANGED
        attrs = {**current.attrs, "state": json.dumps(state)}
        if attrs.get("creator") == bare:
            attrs["creator"] = ""
        return attrs

    async def forget_in(item: Item) -> bool:
        # Decoded: the JSON spells a JID's non-ASCII letters as \u escapes.
        state = json.loads(str(item.attrs.get("state") or "{}"))
        if live(item.name) is not None:
            return False
        found = False
        if _names(state, bare):
            found = (await rooms.modify(item.name, state_without, what="muc room")).written

        def history_without(blob: Blob | None) -> bytes | Unchanged:
            if blob is None:
                return UNCHANGED
            gen, history = unpack_history(blob.data)
            data = Room.forget_history(history, str(state.get("secret")), bare)
            return UNCHANGED if data is None else pack_history(gen, data)

        if "secret" in state:
            changed = await histories.modify(item.name, history_without, what="muc history")
            found = changed.written or found
        room = live(item.name)
        if room is not None and room.forget(bare):  # loaded meanwhile
            after(room)
        return found

    found = False
    token: str | None = None
    while True:
        page = await rooms.query(Query(limit=100, page_token=token))
        found = any(await asyncio.gather(*(forget_in(item) for item in page.items))) or found
        if (token := page.next_token) is None:
            return found


class MucOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subdomain: str = "conference"  # the service is <subdomain>.<host> for every host
    name: str = "Chatrooms"
    max_rooms_per_user: int = Field(10, ge=0)  # rooms a user created that still exist
    allow_remote_creators: bool = False  # users of other servers may create rooms
    max_occupants: int = Field(200, ge=1)  # per room; a room's max users is at most this
    max_history: int = Field(50, ge=0)  # messages a room keeps for joins
    max_message_bytes: int = Field(16384, ge=256)
    messages_per_second: float = Field(2.0, gt=0)  # per occupant, sustained
    message_burst: int = Field(10, ge=1)
    max_presence_bytes: int = Field(4096, ge=512)  # an occupant's presence payload
    max_affiliations: int = Field(1000, ge=10)  # per room, registered nicks included
    # Seconds a persistent room with nobody in it stays in memory before it is unloaded
    # (its state is in the stores; it loads again at its next stanza).
    unload_after: float = Field(300.0, gt=0)


class Muc(Module):
    name = "muc"
    Options = MucOptions
    # Its domains are served from setup(), one under each host of that moment.
    fixed_options = ("subdomain", "name")
    hosts_fixed = True

    def setup(self) -> None:
        options: MucOptions = self.options  # type: ignore[assignment]
        self.limits = Limits()  # shared by every room: a reload changes it in place
        self._set_limits(options)
        self.clock: Callable[[], float] = time.time
        self.rooms: dict[str, Room] = {}  # room bare JID -> live room
        self.outbox = Outbox(self.host)  # each room's output, in slices, in order
        self._loading: dict[str, list[Routed]] = {}  # room bare JID -> stanzas waiting
        # Room bare JID -> full JID -> its leave, come past MAX_WAITING (`_leave_later`).
        self._leaves: dict[str, dict[str, Routed]] = {}
        self._saving: dict[str, tuple[Room, asyncio.Future[None]]] = {}
        self.services: dict[str, str] = {}  # service domain -> virtual host
        # Full JID -> the rooms it sent presence to while its session lives: where to
        # look when the session ends (stale entries cost a lookup, nothing more).
        self._visited: dict[str, dict[str, str]] = {}  # full JID -> room -> nick
        # Nodes that said they are stopping and may still be listed (cluster).
        self._leaving: set[str] = set()
        # The live rooms' lease and state in Redis (cluster): modules/_muc_live.py.
        self.live: LiveRooms | None = None
        self._released: dict[str, asyncio.Event] = {}  # room -> wakes its claim
        self._handing: dict[str, asyncio.Future[None]] = {}  # rooms being handed over
        self._dropping: dict[str, asyncio.Future[None]] = {}  # records being dropped
        self._empty_since: dict[str, float] = {}  # persistent room seen empty -> since when
        self.host.every(UNLOAD_SWEEP, self.unload_idle)
        self._sweeping: asyncio.Future[int] | None = None
        self.host.every(TOMBSTONE_SWEEP, self._sweep_soon)
        redis, node = self.host.cluster_redis, self.host.node_name
        if redis is not None and node is not None:
            self.live = LiveRooms(redis, node, self._nodes_of, self._lost)
            self._keeping: asyncio.Future[None] | None = None
            self._keep_again = False
            self.host.every(self.live.keep_every(), self._keep_leases)
            self.host.on_cluster_lapse(self._keep_leases)
        for vhost in self.host.hosts:
            domain = f"{options.subdomain}.{vhost}"
            self.services[domain] = vhost
            self.host.serve_domain(domain, self._route, options.name)
        self.host.hook("session/closed", self._session_closed)
        if self.host.clustered:
            self.host.on_cluster_nodes(self._nodes_changed)
            self.host.on_cluster_notice(NOTICE, self._notice, lambda: None)
            self.host.hook("server/stopping", self._stopping)

    def reconfigure(self, options: BaseModel) -> None:
        super().reconfigure(options)
        self._set_limits(options)  # type: ignore[arg-type]

    def _set_limits(self, options: MucOptions) -> None:
        limits = self.limits
        limits.max_occupants = options.max_occupants
        limits.max_history = options.max_history
        limits.max_message_bytes = options.max_message_bytes
        limits.messages_per_second = options.messages_per_second
        limits.message_burst = options.message_burst
        limits.max_presence_bytes = options.max_presence_bytes
        limits.max_affiliations = options.max_affiliations

    async def stop(self) -> None:
        """Write what is not written yet (history waits up to HISTORY_WRITE)."""
        if self.live is not None:
            self.live.closing = True
        for room in self.rooms.values():
            if room.history_changed or room.persistent_changed:
                self._save(room, at_once=True)
        while self._saving:
            await asyncio.gather(*(w for _, w in self._saving.values()), return_exceptions=True)
        await self.outbox.all_sent()
        if self.live is not None:
            await self.live.flush()

    async def remove_user(self, vhost: str, username: str) -> bool:
        """`Room.forget` the account in every room of every host's service (an account
        of one host may be an admin of another's rooms), live and stored (an owner's
        rooms stay, without that owner). On a cluster the other nodes are told to do
        the same in the rooms they run (`_notice`), whose next write would otherwise
        put it back."""
        bare = f"{username}@{vhost}"
        if self.host.clustered:
            self.host.notify_cluster(NOTICE, {"forget": bare})
        found = self._forget_live(bare)
        for domain, service_host in self.services.items():

            def live(local: str, domain: str = domain) -> Room | None:
                return self.rooms.get(f"{local}@{domain}")

            found = await forget_stored(self.host, service_host, bare, live, self._after) or found
        if self.host.clustered:
            await self.host.cluster_notices_sent()
        return found

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """`Room.forget` in the stored rooms of every host (no node runs a room with
        the module off)."""
        found = False
        for service_host in host.hosts:
            found = await forget_stored(
                host, service_host, f"{username}@{vhost}", lambda _: None, lambda _: None
            ) or found
        return found

    def _forget_live(self, bare: str) -> bool:
        """`Room.forget` in every room this node runs, and in those unloaded whose write
        is pending (it would put the account back); each changed one is written."""
        found = False
        for room in list(self.rooms.values()):
            if room.forget(bare):
                found = True
                self._after(room)
        for room, _ in list(self._saving.values()):
            if self.rooms.get(room.jid) is not room and not room.destroyed and room.forget(bare):
                found = True
                self._save(room, at_once=True)  # its writer picks the change up
        return found

    # --- the cluster: one owner per room --------------------------------------------------

    def owner(self, room_jid: str) -> str | None:
        """The node that runs the room: None on a node alone."""
        nodes = self.host.cluster_nodes() - self._leaving
        if not nodes:
            return None
        return owner_of(room_jid, nodes)

    def _route(self, routed: Routed) -> None:
        """The service's handler: a stanza for a room another node owns goes there
        (handled here if it cannot: Redis cut off, or passed back and forth while two
        nodes' views of the node set differ, past the hop limit)."""
        to = routed.to
        stanza = routed.stanza
        if to.user and stanza.tag == ns.C_PRESENCE and stanza.get("type") is None:
            if routed.origin:  # the session's own node: where it ends
                self._visited.setdefault(routed.origin.jid, {})[to.bare] = to.resource
        if to.user and self.host.clustered:
            owner = self.owner(to.bare)
            if owner not in (None, self.host.node_name) and self.host.forward_to_node(
                owner, routed.stanza
            ):
                return
        self._handle(routed)

    def _nodes_changed(self, nodes: frozenset[str]) -> None:
        """The live nodes changed: let go of the rooms another node owns now, and take
        out of the others the occupants whose sessions died with a node."""
        self._leaving &= nodes  # gone for good (a node of that name may come back later)
        self._let_go()
        for room in list(self.rooms.values()):
            self._purge(room)
        self._keep_leases()  # a node that went may have taken a room of ours meanwhile

    def _notice(self, payload: dict[str, object]) -> None:
        forget = payload.get("forget")
        if isinstance(forget, str):  # an account removed on another node
            self._forget_live(forget)
        leaving = payload.get("leaving")
        if isinstance(leaving, str) and leaving != self.host.node_name:
            self._leaving.add(leaving)
            self._let_go()
        released = payload.get("released")
        if isinstance(released, str) and (event := self._released.get(released)):
            event.set()
        release = payload.get("release")
        if isinstance(release, str) and payload.get("holder") == self.host.node_name and not (
            release in self.rooms or release in self._loading or release in self._handing
        ):
            # A lease this node holds for a room it does not run: left by an earlier
            # process of this node's name, which died (or a hand-over that failed).
            self.log.info("muc: letting go of %s, which this node does not run", release)
            self._hand_over(release, None)

    def _nodes_of(self, jids: list[str]) -> dict[str, str | None]:
        """The node each session (full JID) is bound on; None: not bound here (or a
        user of another server)."""
        return {jid: self.host.session_node(*jid.partition("/")[::2]) for jid in jids}

    def _purge(self, room: Room) -> None:
        """Sessions bound on no live node leave the room, the others told (a node was
        killed: its sessions never said goodbye)."""
        nodes = self.host.cluster_nodes()
        ours = [jid for jid in room.by_jid if self.host.serves(JID(jid).domain)]  # not s2s
        gone = [jid for jid, node in self._nodes_of(ours).items() if node not in nodes]
        for jid in gone:
            if room.occupant_of(jid) is not None:
                self.log.info("muc: a session left %s with its node", room.jid)
                self._apply(room, room.session_gone(jid))

    def _keep_leases(self) -> None:
        """Every room this node runs keeps its record in Redis, quiet ones too
        (`LiveRooms.keep`), and a room whose lease another node took goes (`_lost`).
        Every TTL/4, and at once when the live nodes change or this node finds its
        heartbeat had lapsed: the lease of a room may have been taken while this node
        was taken for dead, and the room must not run on here, with an occupant list
        that is no longer the room's, until its next write (a quiet room: hours). A
        room whose record Redis lost with everything else (restarted empty, flushed;
        its heartbeat lapsed too) and that nobody claimed since is held again and
        written back whole, its occupants left in it. One round at a time; one asked
        for meanwhile follows it."""
        live = self.live
        if live is None:
            return
        if self._keeping is not None and not self._keeping.done():
            self._keep_again = True
            return

        async def keep() -> None:
            self._keep_again = True
            while self._keep_again:
                self._keep_again = False
                running = dict(self.rooms)
                lost, again = await live.keep(running)
                for room_jid in lost:
                    self._lost(room_jid, running[room_jid])
                for room_jid, epoch in again.items():  # Redis came back empty
                    if self.rooms.get(room_jid) is running[room_jid]:
                        live.reclaimed(room_jid, running[room_jid], epoch)

        self._keeping = self.host.spawn_shared(keep())

    def _lost(self, room_jid: str, room: Room) -> None:
        """Another node holds the room's lease now (this one was taken for dead), or
        nobody does and Redis did not lose it (a record Redis lost with its data is
        held again instead: `LiveRooms.reclaimed`), or the stores hold a newer copy
        (`Stale`): the room here is stale,
        and goes. Its occupants are told they are out (332), never left believing they
        are in a room that no longer hears them, and on a cluster each session's leave
        goes to the room wherever it runs now (the node that took it over has them as
        occupants): room and clients agree, and a client that joins again gets a full
        join. Stanzas for the room wait for the lease again."""
        if room_jid not in self.rooms or self.rooms[room_jid] is not room:
            return  # gone already, or loaded again since
        del self.rooms[room_jid]
        if self.live is not None:
            self.live.lost_lease(room_jid)
        sessions = [(jid, occupant.nick) for jid, occupant in room.by_jid.items()]
        out = room.shut_down()
        for jid, nick in sessions if self.live is not None else ():
            gone = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
            gone.set("type", "unavailable")
            gone.set("from", jid)
            gone.set("to", f"{room_jid}/{nick}")
            out.append(gone)
        self.outbox.send(room_jid, out)

    def _let_go(self) -> None:
        """Drop every live room this node does not own any more, after writing what it
        has not stored yet (a room that loads on its new owner waits for nothing here:
        the new owner may read the stores before this write; see docs/architecture.md).
        Its occupants find out by self-ping (XEP-0410) and rejoin there."""
        me = self.host.node_name
        for room_jid in [jid for jid in self.rooms if self.owner(jid) != me]:
            room = self.rooms.pop(room_jid)
            if room.config.persistent and (room.history_changed or room.persistent_changed):
                self._save(room, at_once=True)
            self.log.info("muc: %s moves to node %s", room_jid, self.owner(room_jid))
            self._hand_over(room_jid, room)

    def unload_idle(self) -> None:
        """Unload the persistent rooms nobody has been in for `unload_after` seconds, so
        that memory holds the rooms in use, not every room used since the start. Their
        state is in the stores (what is not yet is written first); the next stanza for
        one loads it again, after that write (and on a cluster, after its lease is let
        go): `_load` waits for both. Synchronous, so no stanza is handled between the
        look at a room and its unloading: a join either finds the room live and
        occupied (kept) or finds it gone and loads it."""
        options: MucOptions = self.options  # type: ignore[assignment]
        now = self.clock()
        for room_jid, room in list(self.rooms.items()):
            if not (room.empty and room.config.persistent) or room.locked:
                self._empty_since.pop(room_jid, None)
                continue
            if now - self._empty_since.setdefault(room_jid, now) < options.unload_after:
                continue
            del self.rooms[room_jid]
            del self._empty_since[room_jid]
            if room.history_changed or room.persistent_changed:
                self._save(room, at_once=True)
            self.log.debug("muc: %s unloaded, empty", room_jid)
            self._hand_over(room_jid, room)
        for gone in self._empty_since.keys() - self.rooms.keys():
            del self._empty_since[gone]

    def _sweep_soon(self) -> None:
        if self._sweeping is None or self._sweeping.done():
            self._sweeping = self.host.spawn_shared(self.sweep_tombstones())

    async def sweep_tombstones(self) -> int:
        """Delete the tombstones of rooms destroyed TOMBSTONE_KEEP seconds ago or more
        (`_muc_store.sweep`), lest the stores keep one for every name ever destroyed.
        How many went."""
        before = self.clock() - _muc_store.TOMBSTONE_KEEP
        swept = 0
        for vhost in set(self.services.values()):
            items = self.host.items(vhost, "muc_rooms")
            try:
                swept += await _muc_store.sweep(
                    items, self.host.blobs(vhost, "muc_history"), before
                )
            except Exception:  # the next sweep tries again
                self.log.exception("muc: could not sweep the tombstones of %s", vhost)
        return swept

    def _hand_over(self, room_jid: str, room: Room | None) -> None:
        """Let go of the room's lease once what this node wrote to the stores is there,
        and say so: the new owner claims it then, and reads the stores and Redis after
        every write of this node (so it misses nothing, and never runs the room while
        this node still does)."""
        live = self.live
        if live is None:
            return

        async def hand_over() -> None:
            while (pending := self._saving.get(room_jid)) is not None:
                await asyncio.gather(pending[1], return_exceptions=True)
            await self.outbox.sent(room_jid)  # the next owner's output comes after
            await live.release(room_jid, room)
            self.host.notify_cluster(NOTICE, {"released": room_jid})

        future = self.host.spawn(hand_over())
        self._handing[room_jid] = future
        future.add_done_callback(
            lambda done: self._handing.pop(room_jid) if self._handing.get(room_jid) is done
            else None
        )

    async def _stopping(self) -> bool:
        """A clean stop: the other nodes stop counting this one as an owner first, then
        its rooms are dropped and written (returns once written: before the cluster
        membership ends), and stanzas that still come here go to the new owners."""
        me = self.host.node_name
        assert me is not None
        self._leaving.add(me)
        if self.live is not None:
            self.live.closing = True
        self.host.notify_cluster(NOTICE, {"leaving": me})
        await self.host.cluster_notices_sent()
        self._let_go()
        while self._saving or self._handing:
            await asyncio.gather(
                *(w for _, w in self._saving.values()), *self._handing.values(),
                return_exceptions=True,
            )
        if self.live is not None:
            await self.live.flush()
        await self.host.cluster_notices_sent()
        return False

    # --- routing -------------------------------------------------------------------------

    def _handle(self, routed: Routed) -> None:
        stanza, to = routed.stanza, routed.to
        if stanza.get("type") == "error":
            room = self.rooms.get(to.bare)
            if room is not None and to.user:  # never answered
                if stanza.tag == ns.C_IQ and to.resource:
                    self._apply(room, room.iq_to_occupant(stanza, to.resource))
                else:  # perhaps a client gone
                    self._apply(room, room.bounced(stanza))
            return
        if not to.user:
            self._service(routed)
            return
        room_jid = to.bare
        room = self.rooms.get(room_jid)
        if room is not None:
            self._to_room(room_jid, room, routed, None)
            return
        waiting = self._loading.get(room_jid)
        if waiting is not None:
            if len(waiting) < MAX_WAITING:
                waiting.append(routed)
            elif not self._leave_later(room_jid, routed):
                # (an IQ result or an error is never answered: `_error` drops it)
                self._error(stanza, StanzaError(
                    "resource-constraint", "the room is loading, try again", "wait"
                ), room_jid)
            return
        self._loading[room_jid] = [routed]
        self.host.spawn(self._load(room_jid, routed))

    def _leave_later(self, room_jid: str, routed: Routed) -> bool:
        """Keep a leave (unavailable presence) that came for a loading room past
        MAX_WAITING, to be handled after the stanzas that wait (all sent before it): a
        session must always be able to leave, never be refused and stay in the room
        as a ghost. One per session (a later leave of the same session replaces it:
        the room hears one), so what waits here is bounded by the sessions that leave,
        and by MAX_WAITING of them. False: not a leave, or past that bound."""
        stanza = routed.stanza
        if stanza.tag != ns.C_PRESENCE or stanza.get("type") != "unavailable":
            return False
        leaves = self._leaves.setdefault(room_jid, {})
        sender = stanza.get("from", "")
        if sender not in leaves and len(leaves) >= MAX_WAITING:
            return False
        leaves[sender] = routed
        return True

    def _take_waiting(self, room_jid: str) -> list[Routed]:
        """What waits for the room, in the order it is handled: the stanzas, then the
        leaves that came past MAX_WAITING."""
        return [*self._loading.pop(room_jid, []), *self._leaves.pop(room_jid, {}).values()]

    async def _load(self, room_jid: str, first: Routed) -> None:
        """Read the room before handling what waits for it: on a cluster, once this
        node holds its lease, from Redis (occupants included) and the stores; on a
        node alone, a persistent room from the stores."""
        room: Room | None = None
        owned: set[str] | None = None
        past = 0  # the generation a room made now starts at (past a destroyed one's)
        claimed = self.live is None
        try:
            if (pending := self._saving.get(room_jid)) is not None:
                await asyncio.gather(pending[1], return_exceptions=True)  # a deletion, say
            if (dropping := self._dropping.get(room_jid)) is not None:
                await dropping
            if (handing := self._handing.get(room_jid)) is not None:
                # Handed over (unloaded, or moved away and back as the node set flapped):
                # its lease let go first, lest the queued release undo this claim.
                await asyncio.gather(handing, return_exceptions=True)
            record: dict[str, str] = {}
            if self.live is not None:
                got = await self._claim(room_jid)
                claimed, record = got is not None, got or {}
            if claimed:
                room, past = await self._read(room_jid, record)
                if room is None and (
                    first.stanza.tag == ns.C_PRESENCE and first.stanza.get("type") is None
                ):
                    creator = JID(first.stanza.get("from")).bare
                    owned = await self._stored_rooms_of(self._vhost(room_jid), creator)
        except Exception:
            self.log.exception("muc: could not load %s", room_jid)
            for routed in self._take_waiting(room_jid):
                self._error(
                    routed.stanza, StanzaError("internal-server-error", "try again"), room_jid
                )
            if claimed:
                self._hand_over(room_jid, None)
            return
        waiting = self._take_waiting(room_jid)
        owner = self.owner(room_jid) if self.host.clustered else None
        if owner not in (None, self.host.node_name) or not claimed:
            # The room moved while it loaded: to its new owner (here what cannot go).
            if claimed:
                self._hand_over(room_jid, None)
            waiting = [
                r for r in waiting
                if owner is None or not self.host.forward_to_node(owner, r.stanza)
            ]
            if not waiting:
                return
        if room is not None:
            self.rooms[room_jid] = room
            if self.live is not None:
                self._purge(room)  # sessions that died with the node that ran it
                self._after(room)
        made = False
        for n, routed in enumerate(waiting):
            live = self.rooms.get(room_jid)
            if live is None and made:
                # It went (emptied, destroyed) while these waited: the rest load it
                # again, claiming a lease once its record is dropped, as they would
                # have had they come later.
                for later in waiting[n:]:
                    self._handle(later)
                return
            self._to_room(room_jid, live, routed, owned, past)
            made = made or live is not None or room_jid in self.rooms
        if self.live is not None and room_jid not in self.rooms:
            # Never made, or gone already (dropped then): no record left behind.
            self._drop(room_jid, ran=False)

    def _drop(self, room_jid: str, ran: bool) -> None:
        """Drop the room's record (`ran`: the room ran here, `LiveRooms.drop`); a load of
        that room waits for it (a claim that went first would find the record, and lose
        it to the drop)."""
        assert self.live is not None
        dropping = self._dropping[room_jid] = self.live.drop(room_jid, ran)
        dropping.add_done_callback(
            lambda done: self._dropping.pop(room_jid)
            if self._dropping.get(room_jid) is done else None
        )

    async def _claim(self, room_jid: str) -> dict[str, str] | None:
        """Take the room's lease, waiting while another live node runs the room (it lets
        go at its next heartbeat, once it sees that this node owns the room): the
        room's record, or None if this node stopped being its owner meanwhile."""
        assert self.live is not None
        since = time.monotonic()
        while True:
            claimed = await self.live.claim(room_jid)
            if claimed.ok:
                if claimed.holder not in ("", self.host.node_name):
                    self.log.info("muc: %s taken over from node %s", room_jid, claimed.holder)
                return claimed.record
            if self.owner(room_jid) != self.host.node_name:
                return None
            if time.monotonic() - since > ASK_AFTER:
                # It has not let go at its heartbeat: perhaps it does not run the room.
                self.host.notify_cluster(NOTICE, {"release": room_jid, "holder": claimed.holder})
            event = self._released.setdefault(room_jid, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), CLAIM_RETRY)
            except TimeoutError:
                pass  # the notice may have been lost: ask again
            finally:
                self._released.pop(room_jid, None)

    async def _read(self, room_jid: str, record: dict[str, str]) -> tuple[Room | None, int]:
        """The room as Redis (`record`: a live room another node ran, occupants
        included) and the stores have it, None if it does not exist; and the
        generation a room made now under its name starts at (past the tombstone of
        one destroyed). What Redis has is newer than the stores (written within a
        round trip, the stores up to a second late): what the stores lack is written
        there, over a tombstone that fences the writes of the copy it came from
        (`_muc_store.load`)."""
        vhost = self._vhost(room_jid)
        local = room_jid.split("@", 1)[0]
        room: Room | None = None
        item: Item | None = None
        live = json.loads(record["state"]) if "state" in record else None
        if live is None or live["config"]["persistent"]:
            # This copy's generation: writes of any copy loaded before are refused.
            item = await _muc_store.load(
                self.host.items(vhost, "muc_rooms"), self.host.blobs(vhost, "muc_history"),
                local, live is not None, self.clock(),
            )
        stored = item is not None and not _muc_store.is_tombstone(item)
        if live is not None:  # the node that ran it was killed, or it is temporary
            room = Room.restore_live(room_jid, self.limits, live)
            room.persistent_changed = room.config.persistent
            room.stored = stored
        elif item is not None and stored:
            room = Room.restore(room_jid, self.limits, json.loads(str(item.attrs["state"])))
        if item is not None and room is None:
            return None, _muc_store.gen_of(item) + 1
        if room is None:
            return None, 0
        if item is not None:
            room.gen = _muc_store.gen_of(item)
        if "history" in record:
            room.load_history(record["history"].encode())
            room.history_changed = room.config.persistent
        elif room.config.persistent:
            blob = await self.host.blobs(vhost, "muc_history").get(local)
            if blob is not None:
                gen, history = unpack_history(blob.data)
                if gen >= _muc_store.history_floor(item):
                    room.load_history(history)
                else:  # a destroyed room's, written late: this room's next write replaces it
                    self.log.warning("muc: %s: ignored a history of generation %d, older than"
                                     " the room (a destroyed room's of that name)", room_jid, gen)
                room.history_etag = blob.etag
        room.add_occupants(
            json.loads(value) for key, value in record.items() if key.startswith("o:")
        )
        if "seen" in record:
            room.load_seen(json.loads(record["seen"]))
        return room, 0

    async def _stored_rooms_of(self, vhost: str, creator: str) -> set[str]:
        options: MucOptions = self.options  # type: ignore[assignment]
        found = await self._query(vhost, {"creator": creator}, options.max_rooms_per_user + 1)
        return {item.name for item in found}

    async def _query(self, vhost: str, where: dict[str, str | int], enough: int) -> list[Item]:
        """Stored rooms matching `where`, at most `enough`. Pages are followed: a
        backend that filters after reading (DynamoDB) may return short or empty pages
        before the end."""
        store = self.host.items(vhost, "muc_rooms")
        found: list[Item] = []
        token: str | None = None
        while len(found) < enough:
            page = await store.query(Query(where=where, limit=100, page_token=token))
            found += page.items
            if (token := page.next_token) is None:
                break
        return found[:enough]

    def _vhost(self, room_jid: str) -> str:
        return self.services[room_jid.split("@", 1)[1]]

    def _to_room(
        self,
        room_jid: str,
        room: Room | None,
        routed: Routed,
        owned: set[str] | None,
        past: int = 0,
    ) -> None:
        stanza = routed.stanza
        made = room is None
        try:
            if room is None:
                room = self._create(room_jid, routed, owned, past)
                if room is None:
                    return
            out = self._dispatch(room, routed)
        except StanzaError as exc:
            self._unmake(room_jid, made)
            self._error(stanza, exc, room_jid)
            return
        except Exception:
            # A bug must cost this stanza only, not the ones queued behind it.
            self.log.exception("muc: %s to %s failed", stanza.tag, room_jid)
            self._unmake(room_jid, made)
            self._error(stanza, StanzaError("internal-server-error"), room_jid)
            return
        if stanza.tag == ns.C_MESSAGE:
            self.host.ledger.to_service += 1  # its fate: the room's (an error is not here)
        self._apply(room, out)

    def _unmake(self, room_jid: str, made: bool) -> None:
        """The join that made the room was refused (a blank nick, a presence over the
        limit): the room, empty and never written, goes, or it would stay locked for
        an owner who is not in it, its name lost to everyone and counted against its
        creator's rooms for good. (`_load`, which made it, lets go of its lease.)"""
        room = self.rooms.get(room_jid)
        if made and room is not None and room.empty:
            del self.rooms[room_jid]

    def _apply(self, room: Room, out: Out) -> None:
        self.outbox.send(room.jid, out)
        self._after(room)

    def _create(
        self, room_jid: str, routed: Routed, owned: set[str] | None, past: int
    ) -> Room | None:
        """A presence to a room that does not exist creates it (its sender the owner),
        at generation `past` (past the tombstone of a room of that name destroyed)."""
        stanza = routed.stanza
        if stanza.tag != ns.C_PRESENCE:
            raise StanzaError("item-not-found", "no such room")
        if stanza.get("type") not in (None, "available"):
            return None
        if not routed.to.resource:
            raise StanzaError("jid-malformed", "join with room@service/nickname")
        sender = JID(stanza.get("from"))
        options: MucOptions = self.options  # type: ignore[assignment]
        if not options.allow_remote_creators and not self.host.serves(sender.domain):
            # A remote server's users are not limited by anything here (rooms per user
            # counts bare JIDs, which it makes at will): by default they join rooms,
            # they do not make them (Prosody's restrict_room_creation, ejabberd's
            # access_create do the same).
            raise StanzaError("not-allowed", "only users of this server create rooms")
        creator = sender.bare
        mine = {r.jid.split("@", 1)[0] for r in self.rooms.values() if r.creator == creator}
        if len(mine | (owned or set())) >= options.max_rooms_per_user:
            raise StanzaError("not-allowed", "you have created as many rooms as allowed")
        room = Room(room_jid, self.limits, creator)
        room.gen = past
        room.affiliations[creator] = "owner"
        # A client that speaks MUC gets a locked room to configure (reserved room,
        # or an empty form: instant); a legacy join gets an instant room.
        room.locked = stanza.find(f"{{{MUC}}}x") is not None
        room.persistent_changed = True  # its state, for the live copy (on a cluster)
        self.rooms[room_jid] = room
        return room

    def _dispatch(self, room: Room, routed: Routed) -> Out:
        stanza, nick, now = routed.stanza, routed.to.resource, self.clock()
        fans_out = stanza.get("type") == "groupchat" or (
            stanza.tag == ns.C_PRESENCE and stanza.get("type") in (None, "available")
        )
        if fans_out and self.outbox.busy(room.jid):
            # What goes to every occupant waits until the room has sent what it owes
            # (leaving, private messages and IQs pass).
            raise StanzaError("resource-constraint", "the room is busy, try again", "wait")
        if stanza.tag != ns.C_PRESENCE:
            room.require_configured(stanza)
        if stanza.tag == ns.C_PRESENCE:
            if not nick:
                # An occupant's presence to the bare room is meant for its own nick
                # (aioxmpp leaves that way; Prosody takes it so too); only a join
                # needs the nick spelled out.
                occupant = room.occupant_of(stanza.get("from", ""))
                if occupant is None:
                    raise StanzaError("jid-malformed", "join with room@service/nickname")
                nick = occupant.nick
            return room.presence(stanza, nick, now)
        if stanza.tag == ns.C_MESSAGE:
            if nick:
                if stanza.get("type") == "groupchat":
                    raise StanzaError("bad-request", "send groupchat to the room's address")
                return room.private_message(stanza, nick, now)
            if stanza.get("type") == "groupchat":
                return room.groupchat(stanza, now)
            return room.message_to_room(stanza, now)
        return self._room_iq(room, stanza, nick)

    def _room_iq(self, room: Room, stanza: etree._Element, nick: str) -> Out:
        if nick:
            relayed = room.iq_to_occupant(stanza, nick)
            if relayed or stanza.get("type") not in ("get", "set"):
                return relayed
            return [self._result(stanza)]  # the self-ping
        if stanza.get("type") not in ("get", "set"):
            return []
        if len(stanza) != 1:
            raise StanzaError("bad-request", "an IQ request has one child")
        query = stanza[0]
        kind = (query.tag, stanza.get("type"))
        if kind == (f"{{{DISCO_INFO}}}query", "get") and query.get("node") is None:
            return [self._result(stanza, room.disco_info())]
        if kind == (f"{{{DISCO_INFO}}}query", "get") and query.get("node") == "x-roomuser-item":
            return [self._result(stanza, room.reserved_nick(stanza))]
        if kind == (f"{{{REGISTER}}}query", "get"):
            return [self._result(stanza, room.registration_form(stanza))]
        if kind == (f"{{{REGISTER}}}query", "set"):
            return [self._result(stanza), *room.register(stanza, query)]
        if kind == (f"{{{DISCO_ITEMS}}}query", "get") and query.get("node") is None:
            return [self._result(stanza, room.disco_items(stanza.get("from", "")))]
        if kind == (f"{{{MUC_ADMIN}}}query", "get"):
            return [self._result(stanza, room.admin_get(stanza, query))]
        if kind == (f"{{{MUC_ADMIN}}}query", "set"):
            out = room.admin_set(stanza, query)
            return [self._result(stanza), *out]
        if kind == (f"{{{MUC_OWNER}}}query", "get"):
            return [self._result(stanza, room.config_form(stanza))]
        if kind == (f"{{{MUC_OWNER}}}query", "set"):
            destroy = query.find(f"{{{MUC_OWNER}}}destroy")
            if destroy is not None:
                out = room.destroy(stanza, destroy)
            else:
                out = room.configure(stanza, query)
            return [self._result(stanza), *out]
        raise StanzaError("service-unavailable")

    def _after(self, room: Room) -> None:
        """Keep what the transition changed: write it, or let the room go."""
        if room.destroyed or (room.empty and not room.config.persistent):
            jid = room.jid
            if jid in self.rooms and self.rooms[jid] is room:
                del self.rooms[jid]
                if self.live is not None:
                    self._drop(jid, ran=True)
            room.destroyed = True
            if room.stored or room.config.persistent:
                self._save(room, at_once=True)  # deletes what was stored
            return
        if not room.empty:
            self._empty_since.pop(room.jid, None)
        if self.live is not None:
            self.live.changed(room, room.persistent_changed, room.history_changed)
        if room.persistent_changed and (room.config.persistent or room.stored):
            self._save(room, at_once=True)
        elif room.history_changed and room.config.persistent:
            self._save(room, at_once=False)
        elif not room.config.persistent and not room.stored:
            room.persistent_changed = room.history_changed = False  # in Redis alone

    # --- storage -------------------------------------------------------------------------

    def _save(self, room: Room, at_once: bool) -> None:
        """Write the room's stored state: one writer per room name at a time, so a
        room destroyed and created again is written in that order."""
        pending = self._saving.get(room.jid)
        if pending is not None and pending[0] is room:
            return  # its writer picks the change up
        before = pending[1] if pending is not None else None
        writer = self.host.spawn(self._writer(room, at_once, before))
        self._saving[room.jid] = (room, writer)

    async def _writer(
        self, room: Room, at_once: bool, before: asyncio.Future[None] | None
    ) -> None:
        try:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            if not at_once:
                await asyncio.sleep(HISTORY_WRITE)  # many messages, one write
            waits = iter(RETRY_WAITS)
            while room.persistent_changed or room.history_changed or (
                room.destroyed and room.stored
            ):
                try:
                    await self._write(room)
                except StorageError as exc:
                    if (wait := next(waits, None)) is None:
                        raise
                    self.log.warning("muc: could not store %s yet (tried again in %g s): %s",
                                     room.jid, wait, exc)
                    await asyncio.sleep(wait)
        except Stale as exc:
            # Another copy of the room (loaded since, on another node) wrote newer state:
            # this copy is out of date, and its write is refused, not lost silently.
            self.log.warning("muc: refused a stale write of %s (%s); dropping this copy",
                             room.jid, exc)
            room.persistent_changed = room.history_changed = room.stored = False
            self._lost(room.jid, room)
        except Exception:
            self.log.exception("muc: could not store %s", room.jid)
        finally:
            current = self._saving.get(room.jid)
            if current is not None and current[0] is room:
                del self._saving[room.jid]

    async def _write(self, room: Room) -> None:
        vhost = self._vhost(room.jid)
        local = room.jid.split("@", 1)[0]
        items, blobs = self.host.items(vhost, "muc_rooms"), self.host.blobs(vhost, "muc_history")
        if room.destroyed or not room.config.persistent:
            room.persistent_changed = room.history_changed = False
            try:
                await _muc_store.delete(items, blobs, room, local, self.clock())
            except StorageError:
                room.persistent_changed = True  # still to delete: `_writer` tries again
                raise
            room.stored, room.history_etag = False, None
            return
        if room.persistent_changed:
            room.persistent_changed = False
            attrs = {
                "state": json.dumps(room.snapshot()),
                "public": int(room.config.public),
                "creator": room.creator,
            }
            try:
                await _muc_store.write_state(items, blobs, room, local, attrs)
            except StorageError:
                room.persistent_changed = True  # not written: `_writer` tries again
                raise
            room.stored = True
        if room.history_changed:
            room.history_changed = False
            try:
                await _muc_store.write_history(blobs, room, local)
            except StorageError:
                room.history_changed = True
                raise

    # --- the service itself --------------------------------------------------------------

    def _service(self, routed: Routed) -> None:
        stanza = routed.stanza
        if stanza.tag != ns.C_IQ:
            if stanza.tag == ns.C_MESSAGE:
                self._error(stanza, StanzaError("service-unavailable"))
            return
        if stanza.get("type") not in ("get", "set"):
            return
        query = stanza[0] if len(stanza) == 1 else None
        if query is None or stanza.get("type") != "get" or query.get("node") is not None:
            self._error(stanza, StanzaError("service-unavailable"))
        elif query.tag == f"{{{DISCO_INFO}}}query":
            info = etree.Element(f"{{{DISCO_INFO}}}query", nsmap={None: DISCO_INFO})
            identity = etree.SubElement(info, f"{{{DISCO_INFO}}}identity")
            identity.set("category", "conference")
            identity.set("type", "text")
            identity.set("name", self.options.name)  # type: ignore[attr-defined]
            for var in (DISCO_INFO, DISCO_ITEMS, MUC, OCCUPANT_ID, PING):
                etree.SubElement(info, f"{{{DISCO_INFO}}}feature").set("var", var)
            self.host.route(self._result(stanza, info))
        elif query.tag == f"{{{DISCO_ITEMS}}}query":
            self.host.spawn(self._directory(stanza, routed.to.domain))
        elif query.tag == f"{{{PING}}}ping":
            self.host.route(self._result(stanza))
        else:
            self._error(stanza, StanzaError("service-unavailable"))

    async def _directory(self, stanza: etree._Element, domain: str) -> None:
        """The public rooms: live ones (here, and on a cluster those Redis lists) and
        stored ones (one query each)."""
        vhost = self.services[domain]
        names: dict[str, str] = {}
        for room in self.rooms.values():
            if room.jid.endswith(f"@{domain}") and room.config.public and not room.locked:
                names[room.jid] = room.config.name
        try:
            stored = await self._query(vhost, {"public": 1}, MAX_LISTED)
            if self.live is not None:  # live ones on other nodes (temporary ones, say)
                for jid, name in (await self.live.public_rooms(domain)).items():
                    names.setdefault(jid, name)
        except Exception:
            self.log.exception("muc: could not list the rooms of %s", domain)
            self._error(stanza, StanzaError("internal-server-error", "try again"))
            return
        for item in stored:
            jid = f"{item.name}@{domain}"
            if jid not in self.rooms:
                names[jid] = json.loads(str(item.attrs["state"]))["config"]["name"]
        query = etree.Element(f"{{{DISCO_ITEMS}}}query", nsmap={None: DISCO_ITEMS})
        for jid, name in sorted(names.items()):
            element = etree.SubElement(query, f"{{{DISCO_ITEMS}}}item")
            element.set("jid", jid)
            if name:
                element.set("name", name)
        self.host.route(self._result(stanza, query))

    async def _session_closed(self, session: object) -> bool:
        """A session that ended without leaving its rooms leaves them now (the presence
        module's unavailable to directed-presence targets usually came first)."""
        jid = str(getattr(session, "jid", ""))
        for room_jid, nick in self._visited.pop(jid, {}).items():
            room = self.rooms.get(room_jid)
            if room is not None:
                if room.occupant_of(jid) is not None:
                    self._apply(room, room.session_gone(jid))
            elif room_jid in self._loading or (
                self.host.clustered and self.owner(room_jid) != self.host.node_name
            ):
                # Loading here (the session's join may wait in it: the leave goes
                # behind it, lest the join make a ghost once loaded), or run on another
                # node: tell it as the client would have (a room that does not know the
                # JID ignores it).
                gone = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
                gone.set("type", "unavailable")
                gone.set("from", jid)
                gone.set("to", f"{room_jid}/{nick}")
                self.host.route(gone)
        return False

    # --- replies -------------------------------------------------------------------------

    def _result(
        self, stanza: etree._Element, payload: etree._Element | None = None
    ) -> etree._Element:
        reply = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
        reply.set("type", "result")
        reply.set("from", stanza.get("to", ""))
        reply.set("to", stanza.get("from", ""))
        if stanza.get("id") is not None:
            reply.set("id", stanza.get("id", ""))
        if payload is not None:
            reply.append(payload)
        return reply

    def _error(
        self, stanza: etree._Element, exc: StanzaError, room_jid: str | None = None
    ) -> None:
        """Answer `stanza` with `exc`; for a room's stanza, after what the room sent
        before (its sender may be waiting for both, in order)."""
        if stanza.get("type") == "error" or (
            stanza.tag == ns.C_IQ and stanza.get("type") == "result"
        ):
            return
        reply = error_reply(stanza, exc.condition, exc.text, exc.type)
        if stanza.tag == ns.C_MESSAGE:
            self.host.ledger.bounced += 1
        if stanza.tag == ns.C_PRESENCE:
            # As XEP-0045's examples do: clients match a join error by it (never
            # echo the join's own <x/>, which may hold a password).
            reply.insert(0, etree.Element(f"{{{MUC}}}x", nsmap={None: MUC}))
        if room_jid is not None:
            self.outbox.send(room_jid, [reply])
        else:
            self.host.route(reply)


MODULE = Muc
