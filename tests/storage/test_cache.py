"""MemoryCache, cache keys and the read-through wrappers' invalidation rules."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.base import Attrs, Blob, ConditionFailed, Delete, Item, Put, Query
from xmppd.storage.cache import (
    MAX_KEY_LENGTH,
    TOMBSTONE_TTL,
    Cache,
    CachedBlobBackend,
    CachedItemBackend,
    MemoryCache,
    NullCache,
    cache_key,
    store_scope,
)

NS = "example.com/roster"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingCache(MemoryCache):
    """A MemoryCache that remembers which calls were made."""

    def __init__(self) -> None:
        super().__init__(max_items=1000)
        self.calls: list[tuple[str, str]] = []

    async def get(self, key: str) -> bytes | None:
        self.calls.append(("get", key))
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        self.calls.append(("set", key))
        await super().set(key, value, ttl)

    async def add(self, key: str, value: bytes, ttl: int) -> None:
        self.calls.append(("add", key))
        await super().add(key, value, ttl)


class BrokenCache(Cache):
    """Every call fails, the way a dead memcached might."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def get(self, key: str) -> bytes | None:
        raise self.exc

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        raise self.exc

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        raise self.exc

    async def add(self, key: str, value: bytes, ttl: int) -> None:
        raise self.exc

    async def delete(self, key: str) -> None:
        raise self.exc

    def describe(self) -> str:
        return "broken"


class CountingItems(MemoryItemBackend):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.pause: asyncio.Event | None = None  # when set: get waits after reading
        self.read_done = asyncio.Event()

    async def get(self, namespace: str, name: str) -> Item | None:
        self.reads += 1
        item = await super().get(namespace, name)
        if self.pause is not None:
            self.read_done.set()
            await self.pause.wait()
        return item

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        self.reads += 1
        found = {}
        for name in names:
            item = await super().get(namespace, name)
            if item is not None:
                found[name] = item
        return found


class CountingBlobs(MemoryBlobBackend):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get(self, namespace: str, key: str) -> Blob | None:
        self.reads += 1
        return await super().get(namespace, key)


# -- MemoryCache ---------------------------------------------------------------------


async def test_memory_cache_lru_eviction() -> None:
    cache = MemoryCache(max_items=2)
    await cache.set("a", b"1", 0)
    await cache.set("b", b"2", 0)
    assert await cache.get("a") == b"1"  # a is now the most recent
    await cache.set("c", b"3", 0)
    assert await cache.get("b") is None
    assert await cache.get("a") == b"1"
    assert await cache.get("c") == b"3"
    assert len(cache) == 2


async def test_memory_cache_ttl() -> None:
    clock = Clock()
    cache = MemoryCache(clock=clock)
    await cache.set("short", b"x", 10)
    await cache.set("forever", b"y", 0)
    clock.now += 9.9
    assert await cache.get("short") == b"x"
    clock.now += 0.2
    assert await cache.get("short") is None
    clock.now += 10**9
    assert await cache.get("forever") == b"y"


async def test_memory_cache_add_only_if_absent() -> None:
    clock = Clock()
    cache = MemoryCache(clock=clock)
    await cache.add("k", b"first", 5)
    await cache.add("k", b"second", 5)
    assert await cache.get("k") == b"first"
    clock.now += 6  # expired entries count as absent
    await cache.add("k", b"third", 5)
    assert await cache.get("k") == b"third"
    await cache.delete("k")
    assert await cache.get("k") is None


async def test_memory_cache_value_cap() -> None:
    cache = MemoryCache(max_value_bytes=4)
    await cache.set("k", b"1234", 0)
    assert await cache.get("k") == b"1234"
    await cache.set("k", b"12345", 0)  # too big: not stored, and the old value goes
    assert await cache.get("k") is None
    await cache.add("k", b"12345", 0)
    assert await cache.get("k") is None


async def test_null_cache() -> None:
    cache = NullCache()
    await cache.set("k", b"v", 0)
    await cache.add("k", b"v", 0)
    assert await cache.get("k") is None
    assert cache.describe() == "none"


async def test_describe() -> None:
    assert MemoryCache(max_items=7).describe() == "in-process LRU (7 items)"


# -- keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["plain", "with space", "tab\there", "nl\n", "😀", "x" * 1000, "a:b", "%3A"]
)
def test_cache_keys_are_memcached_safe(name: str) -> None:
    key = cache_key("i", NS, name)
    assert len(key.encode()) <= MAX_KEY_LENGTH
    assert all(33 <= ord(char) < 127 for char in key)
    assert key.startswith("x1:")  # versioned


def test_cache_keys_are_unambiguous() -> None:
    keys = {
        cache_key("i", "a:b", "c"),
        cache_key("i", "a", "b:c"),
        cache_key("b", "a", "b:c"),
        cache_key("i", "a", "b%3Ac"),
        cache_key("i", "a", "x" * 1000),
        cache_key("i", "a", "x" * 1001),
        cache_key("i", "b", "x" * 1000),
    }
    assert len(keys) == 7


# -- CachedItemBackend ----------------------------------------------------------


async def test_read_through_fills_with_add() -> None:
    store, cache = CountingItems(), RecordingCache()
    items = CachedItemBackend(store, cache, ttl=60)
    await store.put(NS, "alice", {"v": 1})
    assert await items.get(NS, "alice") == Item("alice", {"v": 1}, 1)
    key = cache_key("i", NS, "alice")
    assert ("add", key) in cache.calls
    assert ("set", key) not in cache.calls
    assert await items.get(NS, "alice") == Item("alice", {"v": 1}, 1)
    assert store.reads == 1


async def test_absence_is_cached_and_invalidated() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    assert await items.get(NS, "bob") is None
    assert await items.get(NS, "bob") is None
    assert store.reads == 1
    await items.put(NS, "bob", {"v": 1}, if_absent=True)
    assert await items.get(NS, "bob") == Item("bob", {"v": 1}, 1)


@pytest.mark.parametrize("write", ["put", "delete", "batch_put", "transact"])
async def test_writes_invalidate(write: str) -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    await items.put(NS, "k", {"v": 1})
    assert await items.get(NS, "k") == Item("k", {"v": 1}, 1)
    if write == "put":
        await items.put(NS, "k", {"v": 2})
    elif write == "delete":
        await items.delete(NS, "k")
    elif write == "batch_put":
        await items.batch_put(NS, {"k": {"v": 2}})
    else:
        await items.transact([Put(NS, "k", {"v": 2}, if_version=1), Put(NS, "other", {})])
    expected = None if write == "delete" else Item("k", {"v": 2}, 2)
    assert await items.get(NS, "k") == expected
    assert (await items.batch_get(NS, ["k"])).get("k") == expected


async def test_condition_failed_invalidates_stale_entry() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    await store.put(NS, "k", {"n": 1})
    cached = await items.get(NS, "k")
    await store.put(NS, "k", {"n": 5})  # another node wrote past this cache
    assert await items.get(NS, "k") == cached  # stale, as expected of a cache
    assert cached is not None
    with pytest.raises(ConditionFailed):
        await items.put(NS, "k", {"n": 2}, if_version=cached.version)
    assert await items.get(NS, "k") == Item("k", {"n": 5}, 2)  # the retry sees the store


async def test_failed_transaction_invalidates_its_items() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    await store.put(NS, "a", {"n": 1})
    await items.get(NS, "a")
    await store.put(NS, "a", {"n": 7})
    with pytest.raises(ConditionFailed):
        await items.transact([Put(NS, "a", {"n": 2}, if_version=1), Delete(NS, "b")])
    assert await items.get(NS, "a") == Item("a", {"n": 7}, 2)


async def test_reader_racing_a_writer_cannot_refill_old_value() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    await store.put(NS, "k", {"v": "old"})
    gate = store.pause = asyncio.Event()
    reader = asyncio.create_task(items.get(NS, "k"))
    await store.read_done.wait()  # the reader holds the old value...
    store.pause = None
    await items.put(NS, "k", {"v": "new"})  # ...while a writer commits
    gate.set()
    assert await reader == Item("k", {"v": "old"}, 1)
    assert await items.get(NS, "k") == Item("k", {"v": "new"}, 2)


async def test_a_read_that_outlived_a_writers_tombstone_does_not_refill_the_old_value() -> None:
    """The reader holds the old value while a writer commits and tombstones the key, and
    answers only after the tombstone expired (a hung store's retries, a stalled loop):
    the old value must not be cached for the whole ttl."""
    clock = Clock()
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache(clock=clock), clock=clock)
    await store.put(NS, "k", {"v": "old"})
    gate = store.pause = asyncio.Event()
    reader = asyncio.create_task(items.get(NS, "k"))
    await store.read_done.wait()
    store.pause = None
    await items.put(NS, "k", {"v": "new"})
    clock.now += TOMBSTONE_TTL + 1
    gate.set()
    assert await reader == Item("k", {"v": "old"}, 1)
    assert await items.get(NS, "k") == Item("k", {"v": "new"}, 2)


async def test_reads_after_a_write_fill_again_once_the_tombstone_expires() -> None:
    clock = Clock()
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache(clock=clock))
    await items.put(NS, "k", {"v": 1})
    await items.get(NS, "k")
    await items.get(NS, "k")
    assert store.reads == 2  # within the tombstone's life: no fill
    clock.now += TOMBSTONE_TTL + 1
    await items.get(NS, "k")
    await items.get(NS, "k")
    assert store.reads == 3


async def test_batch_get_mixes_hits_and_misses() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    await store.batch_put(NS, {"a": {"v": 1}, "b": {"v": 2}})
    await items.get(NS, "a")
    reads = store.reads
    got = await items.batch_get(NS, ["a", "b", "c"])
    assert got == {"a": Item("a", {"v": 1}, 1), "b": Item("b", {"v": 2}, 1)}
    assert store.reads == reads + 1
    assert await items.batch_get(NS, ["a", "b", "c"]) == got
    assert store.reads == reads + 1  # b and the absent c are cached now


async def test_query_goes_to_the_store() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache())
    await store.put(NS, "a", {"v": 1})
    await items.get(NS, "a")
    await store.put(NS, "a", {"v": 2})
    page = await items.query(NS, Query())
    assert page.items == [Item("a", {"v": 2}, 2)]


async def test_oversized_items_are_not_cached() -> None:
    store = CountingItems()
    items = CachedItemBackend(store, MemoryCache(), max_value_bytes=100)
    await items.put(NS, "big", {"v": b"x" * 200})
    await items.get(NS, "big")
    await items.get(NS, "big")
    assert store.reads == 2


async def test_garbage_in_cache_is_a_miss() -> None:
    store, cache = CountingItems(), MemoryCache()
    items = CachedItemBackend(store, cache)
    await store.put(NS, "k", {"v": 1})
    for junk in (b"Zjunk", b"I", b"I" + bytes(8) + b"s\x00\x00\x00\x09abc"):
        await cache.set(cache_key("i", NS, "k"), junk, 60)
        assert await items.get(NS, "k") == Item("k", {"v": 1}, 1)
        await cache.set(cache_key("i", NS, "k"), junk, 60)
        assert await items.batch_get(NS, ["k"]) == {"k": Item("k", {"v": 1}, 1)}


@pytest.mark.parametrize("exc", [ConnectionError("down"), TimeoutError(), OSError("reset")])
async def test_cache_errors_are_misses(exc: Exception) -> None:
    store = CountingItems()
    items = CachedItemBackend(store, BrokenCache(exc))
    attrs: Attrs = {"v": 1}
    assert (await items.put(NS, "k", attrs)).version == 1
    assert await items.get(NS, "k") == Item("k", {"v": 1}, 1)
    assert await items.batch_get(NS, ["k", "x"]) == {"k": Item("k", {"v": 1}, 1)}
    with pytest.raises(ConditionFailed):
        await items.put(NS, "k", attrs, if_absent=True)
    await items.transact([Put(NS, "k", {"v": 2})])
    assert await items.delete(NS, "k") is True
    assert store.reads == 2

    blobs = CachedBlobBackend(MemoryBlobBackend(), BrokenCache(exc))
    etag = await blobs.put(NS, "b", b"data")
    assert await blobs.get(NS, "b") == Blob("b", b"data", etag)
    assert await blobs.delete(NS, "b") is True


async def test_cancellation_is_not_swallowed() -> None:
    items = CachedItemBackend(MemoryItemBackend(), BrokenCache(asyncio.CancelledError()))  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        await items.get(NS, "k")


# -- CachedBlobBackend -------------------------------------------------------------


async def test_blob_read_through_and_invalidation() -> None:
    clock = Clock()
    store = CountingBlobs()
    blobs = CachedBlobBackend(store, MemoryCache(clock=clock), max_value_bytes=1000)
    assert await blobs.get(NS, "k") is None
    assert await blobs.get(NS, "k") is None
    assert store.reads == 1
    etag = await blobs.put(NS, "k", b"one")
    assert await blobs.get(NS, "k") == Blob("k", b"one", etag)
    clock.now += TOMBSTONE_TTL + 1
    assert await blobs.get(NS, "k") == Blob("k", b"one", etag)
    assert await blobs.get(NS, "k") == Blob("k", b"one", etag)
    assert store.reads == 3
    etag2 = await blobs.put(NS, "k", b"two", if_match=etag)
    assert await blobs.get(NS, "k") == Blob("k", b"two", etag2)
    await blobs.delete(NS, "k")
    assert await blobs.get(NS, "k") is None


async def test_blob_condition_failed_invalidates() -> None:
    store = CountingBlobs()
    blobs = CachedBlobBackend(store, MemoryCache())
    etag = await blobs.put(NS, "k", b"one")
    await blobs.get(NS, "k")
    newer = await store.put(NS, "k", b"other node")
    with pytest.raises(ConditionFailed):
        await blobs.put(NS, "k", b"two", if_match=etag)
    assert await blobs.get(NS, "k") == Blob("k", b"other node", newer)


async def test_large_blobs_are_not_cached() -> None:
    store = CountingBlobs()
    blobs = CachedBlobBackend(store, MemoryCache(), max_value_bytes=100)
    await store.put(NS, "small", b"x" * 10)
    await store.put(NS, "large", b"x" * 100)
    for _ in range(3):
        await blobs.get(NS, "small")
        await blobs.get(NS, "large")
    assert store.reads == 1 + 3


async def test_blob_list_goes_to_the_store() -> None:
    store = CountingBlobs()
    blobs = CachedBlobBackend(store, MemoryCache())
    await blobs.put(NS, "a/1", b"")
    await store.put(NS, "a/2", b"")
    assert (await blobs.list(NS, "a/")).keys == ["a/1", "a/2"]


async def test_deployments_sharing_a_cache_do_not_share_entries() -> None:
    """Two stores (say two tables) behind one memcached ring: same namespace, same
    item name, different data — each must read its own, never the other's."""
    cache = MemoryCache(max_items=100, max_value_bytes=65536)
    one, two = MemoryItemBackend(), MemoryItemBackend()
    first = CachedItemBackend(one, cache, scope=store_scope("dynamodb table-a"))
    second = CachedItemBackend(two, cache, scope=store_scope("dynamodb table-b"))
    await one.put(NS, "alice", {"v": "from a"})
    await two.put(NS, "alice", {"v": "from b"})
    assert (await first.get(NS, "alice")).attrs["v"] == "from a"  # type: ignore[union-attr]
    assert (await second.get(NS, "alice")).attrs["v"] == "from b"  # type: ignore[union-attr]
