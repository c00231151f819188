"""A persistent room's writes to the stores, fenced by a generation number.

On a cluster a room moves between nodes. The node it left may still have a
write of the room under way or queued (its event loop stalled, the store
slow, a node taken for dead while it lives); landing after the new owner's
writes, it would put older state back. So every stored room carries a
**generation**: the attribute `gen` of its item in `muc_rooms`, and a field
of its history blob in `muc_history`. Each load of the room takes the next
generation (`load`: one conditional write), and every write is conditional
on the stored generation being no newer than the writer's own, on the item
store's conditional put (`ItemStore.modify`: a version check on SQLite, a
condition expression on DynamoDB) and on the blob store's etag. A write
from an older copy is refused (`Stale`) and writes nothing.

A destroyed room leaves a **tombstone**, not nothing: an item with no state,
its attribute `gone` the time of the destroy, and a generation past every
copy the destroy could have raced (`delete`). Without it a copy that never
wrote the room (made persistent on a node whose first write was slow, and
taken over meanwhile by a node that destroyed it) would find the name free
and write the room back. A copy that believed it stored finds a tombstone
(or nothing, before tombstones were kept) and is refused too. For the same
reason a node that takes over a room the stores do not hold yet (its live
copy in Redis) first writes a tombstone past the copy it takes over from
(`load`, `live`), then the room over it. A room created again under a
destroyed name starts past the tombstone; a tombstone goes once
TOMBSTONE_KEEP has passed (`sweep`), as long as a live room's lease in Redis
lasts: only a copy whose write is still under way a day after the destroy
could write the room back then. A room created
over a tombstone or nothing deletes any history blob left under its name (a
destroy whose history delete failed for good, an older copy's late write)
before its state is written, and starts past that history's generation
(`write_state`), so no leftover can refuse its writes or reach its joiners;
a history an older copy writes later still is older than the generation the
room was created at (`BORN`), and not loaded with it (`history_floor`).
"""

from __future__ import annotations

import asyncio
import json

from xmppd.modules._muc_room import Room
from xmppd.storage.base import (
    MODIFY_TRIES,
    UNCHANGED,
    Attrs,
    Blob,
    BlobStore,
    ConditionFailed,
    Contended,
    Item,
    ItemEdit,
    ItemStore,
    Query,
    Unchanged,
    backoff,
)

GEN = "gen"
GONE = "gone"  # a tombstone's attribute: when the room was destroyed (epoch seconds)
BORN = "born"
"""A room's attribute: the generation it was created at. A history blob older than that
is not the room's own but a destroyed room's of the same name (`history_floor`)."""
TOMBSTONE_KEEP = 86400.0
"""Seconds a tombstone stays: as long as a live room's lease in Redis (_muc_live.TTL),
past which no copy taken over can still be running, its writes under way."""
SWEEP_PAGE = 100


class Stale(Exception):
    """The stores hold a newer copy of the room than the one that tried to write."""

    def __init__(self, room_jid: str, stored: int | None, mine: int) -> None:
        found = "deleted" if stored is None else f"at generation {stored}"
        super().__init__(f"{room_jid}: stored {found}, this copy is generation {mine}")


def gen_of(item: Item) -> int:
    """The item's generation (0: written before generations were kept)."""
    return int(item.attrs.get(GEN, 0))


def pack_history(gen: int, history: bytes) -> bytes:
    """The history blob: `Room.history_json()` with the generation that wrote it."""
    return b'{"gen": %d, "history": %s}' % (gen, history)


def unpack_history(data: bytes) -> tuple[int, bytes]:
    """(generation, `Room.history_json()`) of a history blob; a bare list is a blob
    written before generations were kept (generation 0)."""
    decoded = json.loads(data)
    if isinstance(decoded, list):
        return 0, data
    return int(decoded["gen"]), json.dumps(decoded["history"]).encode()


def history_floor(item: Item | None) -> int:
    """The oldest generation whose history blob belongs to the room `item` holds (the
    item `load` returned): its birth for a stored room (0 if created before births
    were kept); for a tombstone (a room the stores do not hold yet, which has written
    no history) past every blob under the name, which `load` fenced past."""
    if item is None:
        return 0
    return gen_of(item) if is_tombstone(item) else int(item.attrs.get(BORN, 0))


def is_tombstone(item: Item) -> bool:
    """Is the item a destroyed room's tombstone (a generation and no room)?"""
    return GONE in item.attrs


def tombstone(gen: int, now: float) -> Attrs:
    return {GEN: gen, GONE: int(now)}


async def load(
    items: ItemStore, blobs: BlobStore, local: str, live: bool, now: float
) -> Item | None:
    """The room's item, its generation taken one further (written): every write of a
    copy loaded before is refused from now on. None if the room is not stored, or a
    tombstone (`is_tombstone`): the generation a room made under that name starts
    past. `live`: a copy ran the room (its record in Redis), which the stores may
    not hold yet, that copy's first write still under way: a tombstone is written
    past any generation that copy can have, so that its write is refused."""

    async def next_gen(current: Item | None) -> ItemEdit:
        if current is not None and not is_tombstone(current):
            return {**current.attrs, GEN: gen_of(current) + 1}
        if not live:
            return UNCHANGED
        # That copy's generation: past a tombstone, or past a leftover history
        # (`write_state`) at most.
        newest = gen_of(current) + 1 if current is not None else 0
        leftover = await blobs.get(local)
        if leftover is not None:
            newest = max(newest, unpack_history(leftover.data)[0] + 1)
        return tombstone(newest + 1, now)

    return (await items.modify(local, next_gen, what="muc room")).after


def _check(room: Room, current: Item | None) -> None:
    if current is None or is_tombstone(current):
        if room.stored:  # a newer copy destroyed it
            raise Stale(room.jid, None, room.gen)
    if current is not None and gen_of(current) > room.gen:
        raise Stale(room.jid, gen_of(current), room.gen)


async def write_state(
    items: ItemStore, blobs: BlobStore, room: Room, local: str, attrs: Attrs
) -> None:
    """Write the room's item (`attrs`, its generation and the one it was created at)
    unless a newer copy wrote."""

    def drop_leftover(current: Blob | None) -> bytes | None | Unchanged:
        if current is None:
            return UNCHANGED
        room.gen = max(room.gen, unpack_history(current.data)[0] + 1)
        return None

    async def change(current: Item | None) -> ItemEdit:
        _check(room, current)
        if current is None or is_tombstone(current):
            # Created (over nothing or a tombstone): a history blob under the name is
            # a destroyed room's (its delete failed, or an older copy wrote it late;
            # this room writes its history after its state). It goes, lest this room
            # serve it to its joiners once loaded again; and this room starts past its
            # generation, so that no copy that read it can refuse this room's writes.
            await blobs.modify(local, drop_leftover, what="muc history")
            born = room.gen
        else:
            born = int(current.attrs.get(BORN, 0))
        return {**attrs, GEN: room.gen, BORN: born}

    await items.modify(local, change, what="muc room")


async def delete(
    items: ItemStore, blobs: BlobStore, room: Room, local: str, now: float
) -> None:
    """Replace the room's item by a tombstone, and delete its history, unless a newer
    copy wrote them. The tombstone's generation is past this copy's and past what
    any older copy may have taken from the history blob (`write_state`): every
    write of an older copy, queued or late, is refused, even one of a copy that
    never wrote the room."""
    blob = await blobs.get(local)  # read first: what an older copy read is no newer
    leftover = unpack_history(blob.data)[0] if blob is not None else -1
    fence = 0

    def change(current: Item | None) -> ItemEdit:
        nonlocal fence
        _check(room, current)
        stored = gen_of(current) if current is not None else 0
        fence = max(room.gen, leftover + 1, stored) + 1
        return tombstone(fence, now)

    def history(current: Blob | None) -> bytes | None | Unchanged:
        if current is not None and unpack_history(current.data)[0] >= fence:
            raise Stale(room.jid, unpack_history(current.data)[0], room.gen)
        return None

    await items.modify(local, change, what="muc room")
    # The tombstone is this copy's now: should the history's delete fail, a retry
    # passes `_check` (the stores no longer hold the room, and the tombstone is at
    # this copy's generation), writes it again past itself and deletes the history,
    # rather than take it for a newer copy's destroy.
    room.gen, room.stored = fence, False
    await blobs.modify(local, history, what="muc history")


async def sweep(items: ItemStore, blobs: BlobStore, before: float) -> int:
    """Delete the tombstones of rooms destroyed at `before` or earlier, each conditional
    on what was read (a room made again meanwhile stays), after a history an older
    copy wrote after the destroy (older than the tombstone: while the tombstone is
    there, a room made again writes past it). How many went.

    One pass over the rooms in name order, SWEEP_PAGE at a time: a query sorted by
    `gone` would be a scan and a sort in memory on DynamoDB at every page (capped
    there at SORT_CAP items, past which it fails: docs/storage.md), and tombstones
    are made by anyone who may destroy a room."""
    swept = 0
    token: str | None = None
    while True:
        page = await items.query(Query(limit=SWEEP_PAGE, page_token=token))
        for item in page.items:
            if not is_tombstone(item) or int(item.attrs[GONE]) > before:
                continue

            def history(current: Blob | None, gen: int = gen_of(item)) -> bytes | None | Unchanged:
                if current is None or unpack_history(current.data)[0] >= gen:
                    return UNCHANGED
                return None

            await blobs.modify(item.name, history, what="muc history")
            try:
                await items.delete(item.name, if_version=item.version)
            except ConditionFailed:
                continue  # written since: a room made again, or a newer tombstone
            swept += 1
        if (token := page.next_token) is None:
            return swept


async def write_history(blobs: BlobStore, room: Room, local: str) -> None:
    """Write the room's history unless a newer copy wrote it. Conditional on the etag
    this copy last read or wrote (`Room.history_etag`), so the usual write is one put;
    after a lost race the blob is read, and the write refused if it is newer."""
    data = pack_history(room.gen, room.history_json())
    for lost in range(MODIFY_TRIES):
        if lost:  # as the stores' own retries: two racing copies do not hammer the blob
            await asyncio.sleep(backoff(lost - 1))
        try:
            if room.history_etag is None:
                room.history_etag = await blobs.put(local, data, if_none_match=True)
            else:
                room.history_etag = await blobs.put(local, data, if_match=room.history_etag)
            return
        except ConditionFailed:
            current = await blobs.get(local)
            if current is not None and (stored := unpack_history(current.data)[0]) > room.gen:
                raise Stale(room.jid, stored, room.gen) from None
            room.history_etag = None if current is None else current.etag
    raise Contended("muc history", blobs.namespace, local, MODIFY_TRIES)
