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

An item absent while the copy believes it stored means a newer copy
destroyed the room: refused too. A room created again under the name of one
destroyed starts past any history the old one left (`write_state`), so no
leftover can refuse its writes.
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
    Unchanged,
    backoff,
)

GEN = "gen"


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


async def load(items: ItemStore, local: str) -> Item | None:
    """The room's item, its generation taken one further (written): every write of a
    copy loaded before is refused from now on. None if the room is not stored."""

    def next_gen(current: Item | None) -> ItemEdit:
        if current is None:
            return UNCHANGED
        return {**current.attrs, GEN: gen_of(current) + 1}

    return (await items.modify(local, next_gen, what="muc room")).after


def _check(room: Room, current: Item | None) -> None:
    if current is None:
        if room.stored:  # a newer copy destroyed it
            raise Stale(room.jid, None, room.gen)
    elif gen_of(current) > room.gen:
        raise Stale(room.jid, gen_of(current), room.gen)


async def write_state(
    items: ItemStore, blobs: BlobStore, room: Room, local: str, attrs: Attrs
) -> None:
    """Write the room's item (`attrs` and its generation) unless a newer copy wrote."""

    async def change(current: Item | None) -> ItemEdit:
        _check(room, current)
        if current is None:
            # Created: past the generation of a history a destroyed room of this name
            # may have left (a blob deleted after its item, or not at all).
            leftover = await blobs.get(local)
            if leftover is not None:
                room.gen = max(room.gen, unpack_history(leftover.data)[0] + 1)
        return {**attrs, GEN: room.gen}

    await items.modify(local, change, what="muc room")


async def delete(items: ItemStore, blobs: BlobStore, room: Room, local: str) -> None:
    """Delete the room's item and history unless a newer copy wrote them."""

    def change(current: Item | None) -> ItemEdit:
        _check(room, current)
        return None

    def history(current: Blob | None) -> bytes | None | Unchanged:
        if current is not None and unpack_history(current.data)[0] > room.gen:
            raise Stale(room.jid, unpack_history(current.data)[0], room.gen)
        return None

    await items.modify(local, change, what="muc room")
    await blobs.modify(local, history, what="muc history")


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
