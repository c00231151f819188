"""storage.timing: each call of a wrapped part is timed; a failure counts, an outcome not."""

from __future__ import annotations

import pytest

from xmppd.storage.base import ConditionFailed, ItemBackend, StorageError
from xmppd.storage.cache import MemoryCache, NullCache
from xmppd.storage.timing import OpStats, TimedCache, TimedItemBackend


class Failing(NullCache):
    """A cache whose reads fail, as a memcached that went away."""

    async def get(self, key: str) -> bytes | None:
        raise OSError("connection refused")


async def test_cache_calls_are_timed_and_failures_counted() -> None:
    stats = OpStats()
    cache = TimedCache(MemoryCache(max_items=10, max_value_bytes=100), stats)
    await cache.set("k", b"v", 0)
    assert await cache.get("k") == b"v"
    assert (stats.count, stats.errors) == (2, 0)
    assert sum(stats.buckets) == 2 and stats.total > 0
    failing = TimedCache(Failing(), stats)
    with pytest.raises(OSError):
        await failing.get("k")
    assert (stats.count, stats.errors) == (3, 1)
    assert failing.describe() == "none"


class Store(ItemBackend):
    """A store whose reads fail and whose conditional writes lose."""

    name = "fake"

    async def get(self, namespace: str, name: str) -> None:
        raise StorageError("fake", "get", "the table is gone")

    async def put(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        raise ConditionFailed("exists")

    async def delete(self, *args: object, **kwargs: object) -> bool:  # type: ignore[override]
        return True

    async def query(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        return None

    async def transact(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        return None


async def test_a_store_error_counts_and_a_lost_condition_does_not() -> None:
    stats = OpStats()
    store = TimedItemBackend(Store(), stats)
    assert store.name == "fake"
    with pytest.raises(StorageError):
        await store.get("ns", "a")
    with pytest.raises(ConditionFailed):
        await store.put("ns", "a", {}, if_absent=True)
    assert await store.delete("ns", "a") is True
    assert (stats.count, stats.errors) == (3, 1)
