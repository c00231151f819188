"""The roster's decoded-roster cache: reads of an unchanged roster decode nothing, a
changed one is never served stale, callers cannot change what the cache holds, and
large rosters are decoded and encoded off the event loop."""

from __future__ import annotations

import asyncio
import gc
import json
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from xmppd.modules import roster as roster_mod
from xmppd.modules._decoded_cache import OFF_LOOP_BYTES, DecodedCache
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import ItemBackend
from xmppd.testing import ModuleHarness

OWNER = "alice@localhost"



class Codec:
    """Records each decompression (a decoding of a stored roster) and compression (an
    encoding) of the roster module, and the thread it ran in."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.decodes: list[int] = []
        self.encodes: list[int] = []
        monkeypatch.setattr(roster_mod, "zlib", self)

    def decompress(self, data: bytes) -> bytes:
        self.decodes.append(threading.get_ident())
        return zlib.decompress(data)

    def compress(self, data: bytes, level: int = -1) -> bytes:
        self.encodes.append(threading.get_ident())
        return zlib.compress(data, level)


async def node(backend: ItemBackend | None = None, **options: Any) -> RosterModule:
    harness = ModuleHarness({"roster": options})
    if backend is not None:
        harness.storage.items = backend
    await harness.start()
    module = harness.host.modules["roster"]
    assert isinstance(module, RosterModule)
    return module


def contact(n: int) -> str:
    return f"contact{n:05}@example.org"


def full_roster(size: int) -> dict[str, RosterItem]:
    return {
        contact(n): RosterItem(contact(n), name=f"Contact {n}", subscription="both", groups=["g"])
        for n in range(size)
    }


async def store_directly(
    module: RosterModule, items: dict[str, RosterItem], epoch: str, n: int
) -> None:
    """Write a roster item as another node (or a restore) would, around this module."""
    store = module.host.items("localhost", "roster")
    await store.put("alice", stored_form(epoch, n, items))


def stored_form(epoch: str, n: int, items: dict[str, RosterItem]) -> dict[str, Any]:
    """`items` as the module stores them."""
    return roster_mod._encode(epoch, n, {jid: roster_mod._row(i) for jid, i in items.items()})


def add(name: str | None = None) -> Callable[[RosterItem | None], RosterItem]:
    return lambda current: RosterItem("ignored", name=name)


async def test_unchanged_roster_is_decoded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(monkeypatch)
    module = await node(max_items=2000)
    await store_directly(module, full_roster(1100), "e1", 1)
    for n in range(1000):
        item = await module.item(OWNER, contact(n))
        assert item is not None and item.name == f"Contact {n}"
    assert len((await module.get(OWNER)).items) == 1100
    assert len(codec.decodes) == 1
    # A write keeps what it wrote decoded: the next read decodes nothing.
    await module.update(OWNER, "new@example.org", add("New"))
    assert (await module.item(OWNER, "new@example.org")) == RosterItem("new@example.org", "New")
    assert len(codec.decodes) == 1


async def check_never_stale(first: RosterModule, second: RosterModule) -> None:
    await first.update(OWNER, "bob@localhost", add("Bob"))
    assert (await first.item(OWNER, "bob@localhost")) == RosterItem("bob@localhost", "Bob")
    version = (await first.get(OWNER)).version
    # Another node changes the roster: the first sees the change at once.
    await second.update(OWNER, "bob@localhost", add("Robert"))
    await second.update(OWNER, "carol@localhost", add("Carol"))
    assert (await first.item(OWNER, "bob@localhost")) == RosterItem("bob@localhost", "Robert")
    roster = await first.get(OWNER)
    assert set(roster.items) == {"bob@localhost", "carol@localhost"}
    assert roster.version != version
    # A change through the store around both modules, keeping epoch and counter (a
    # restore from a backup): what is stored is what is read.
    epoch, n = roster.version.split("-")
    await store_directly(first, {"dave@localhost": RosterItem("dave@localhost")}, epoch, int(n))
    assert set((await first.get(OWNER)).items) == {"dave@localhost"}
    assert await first.item(OWNER, "bob@localhost") is None
    # Deleted and made again with the same epoch, counter and store version: still fresh.
    store = first.host.items("localhost", "roster")
    await store.delete("alice")
    await store_directly(first, {"erin@localhost": RosterItem("erin@localhost")}, "e", 1)
    await first.get(OWNER)
    await store.delete("alice")
    await store_directly(first, {"fred@localhost": RosterItem("fred@localhost")}, "e", 1)
    assert set((await first.get(OWNER)).items) == {"fred@localhost"}
    await store.delete("alice")
    assert (await first.get(OWNER)).items == {}


async def test_a_roster_changed_elsewhere_is_never_served_stale_memory() -> None:
    shared = MemoryItemBackend()
    await check_never_stale(await node(shared), await node(shared))


async def test_a_roster_changed_elsewhere_is_never_served_stale_sqlite(tmp_path: Path) -> None:
    # Two connections to one file, as two nodes on one store.
    first = await SQLiteItemBackend.open(tmp_path / "x.db")
    second = await SQLiteItemBackend.open(tmp_path / "x.db")
    try:
        await check_never_stale(await node(first), await node(second))
    finally:
        await first.close()
        await second.close()


async def test_what_a_caller_changes_is_not_what_the_next_read_returns() -> None:
    module = await node()
    await module.update(OWNER, "bob@localhost", add("Bob"))
    await module.update(OWNER, "carol@localhost", add("Carol"))
    expected = await module.get(OWNER)

    item = await module.item(OWNER, "bob@localhost")
    assert item is not None
    item.name, item.subscription = "Mallory", "both"
    item.groups.append("mutated")
    roster = await module.get(OWNER)
    roster.items["carol@localhost"].groups.append("mutated")
    roster.items["carol@localhost"].in_roster = False
    del roster.items["bob@localhost"]
    before, after = await module.modify(OWNER, "carol@localhost", add("Caroline"))
    assert before is not None and after is not None
    before.name = after.name = "mutated"
    before.groups.append("mutated")
    after.groups.append("mutated")

    assert await module.item(OWNER, "bob@localhost") == expected.items["bob@localhost"]
    now = await module.get(OWNER)
    assert now.items["bob@localhost"] == expected.items["bob@localhost"]
    assert now.items["carol@localhost"] == RosterItem("carol@localhost", "Caroline")


async def test_large_rosters_are_decoded_and_encoded_off_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    codec = Codec(monkeypatch)
    module = await node(max_items=10000)
    big = stored_form("e1", 1, full_roster(11000))["items"]
    assert len(big) >= OFF_LOOP_BYTES  # else this test shows nothing
    await store_directly(module, full_roster(11000), "e1", 1)
    loop_thread = threading.get_ident()

    # Readers that come together share one decoding, in a thread.
    found = await asyncio.gather(*(module.item(OWNER, contact(n)) for n in range(10)))
    assert [i.jid if i else None for i in found] == [contact(n) for n in range(10)]
    assert len(codec.decodes) == 1 and codec.decodes[0] != loop_thread
    # A change of a large roster encodes it in a thread too.
    encoded = len(codec.encodes)  # store_directly encodes too, on the loop
    await module.update(OWNER, contact(0), add("Zero"))
    assert len(codec.encodes) == encoded + 1 and codec.encodes[-1] != loop_thread
    # So does decoding after another node's change.
    await store_directly(module, full_roster(11000), "e1", 3)
    assert (await module.item(OWNER, contact(0))) is not None
    assert len(codec.decodes) == 2 and codec.decodes[1] != loop_thread

    # A small roster stays on the loop: the hop to a thread would cost more.
    await store_directly(module, full_roster(10), "e1", 4)
    await module.get(OWNER)
    assert codec.decodes[2] == loop_thread


async def test_the_cache_is_bounded_in_items(monkeypatch: pytest.MonkeyPatch) -> None:
    codec = Codec(monkeypatch)
    module = await node(cache_items=25)
    for user in ("a", "b", "c"):
        store = module.host.items("localhost", "roster")
        await store.put(user, stored_form("e", 1, full_roster(10)))
    for user in ("a", "b", "a", "b"):  # 2 x 11 fits in 25
        await module.get(f"{user}@localhost")
    assert len(codec.decodes) == 2
    await module.get("c@localhost")  # evicts a, the least recently read
    await module.get("b@localhost")
    assert len(codec.decodes) == 3
    await module.get("a@localhost")
    assert len(codec.decodes) == 4
    # 0 turns it off.
    module.reconfigure(module.Options.model_validate({"cache_items": 0}))
    await module.get("a@localhost")
    await module.get("a@localhost")
    assert len(codec.decodes) == 6


def test_decoded_cache_evicts_by_weight() -> None:
    cache: DecodedCache[str] = DecodedCache(bytes.decode, len, budget=10)
    cache.remember("a", b"aaaa", "aaaa")
    cache.remember("b", b"bbbb", "bbbb")
    cache.remember("c", b"cccc", "cccc")  # 12 > 10: a goes
    assert len(cache) == 2
    cache.remember("big", b"x" * 11, "x" * 11)  # over the budget alone: not kept
    assert len(cache) == 2
    cache.resize(4)
    assert len(cache) == 1


async def test_cached_rosters_give_the_garbage_collector_nothing_to_walk() -> None:
    """A full collection walks every object the collector tracks: as RosterItems with
    group lists, each cached item was two of them (a 10,000-item roster decoded again
    set off collections of ~20 ms over a full cache: docs/bench.md). The cache keeps
    tuples of atomic values, which the collector stops tracking."""
    module = await node(max_items=5000)
    compact = {contact(n): [f"Contact {n}", "b", 0, ["g", "h"]] for n in range(5000)}
    data = zlib.compress(json.dumps(compact).encode())
    store = module.host.items("localhost", "roster")
    await store.put("alice", {"epoch": "e", "n": 1, "items": data})
    gc.collect()
    before = len(gc.get_objects())
    item = await module.item(OWNER, contact(7))
    assert item is not None and item.groups == ["g", "h"]  # a list of its own to change
    del item
    gc.collect()
    assert len(gc.get_objects()) - before < 500  # not one or two per item: 5,000 or 10,000
    assert (await module.get(OWNER)).items[contact(4999)].name == "Contact 4999"
