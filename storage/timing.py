"""How long the stores and the cache take, and how often they fail: for /metrics.

`instrument(storage)` puts a timing wrapper around the item store, the blob
store and the cache of an open `Storage`, beneath the read-through cache
(so the store figures are the real round trips, cache misses and writes;
the cache figures every cache call). Each call costs two clock reads and a
few integer additions, nothing next to a storage round trip; the node's
metrics read the counts when scraped (xmppd.metrics).

Errors are the exceptions a call raised, except the contract's own
outcomes (ConditionFailed: a conditional write that lost, TooLarge: a value
refused by size). The read-through cache turns a failing cache call into a
miss, so cache errors show here and nowhere else.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from .base import (
    Attrs,
    Blob,
    BlobBackend,
    BlobPage,
    ConditionFailed,
    Item,
    ItemBackend,
    Page,
    Query,
    TooLarge,
    Write,
)
from .cache import Cache, CachedBlobBackend, CachedItemBackend

BOUNDS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
"""Seconds: the buckets of the latency histograms."""

_OUTCOMES = (ConditionFailed, TooLarge)


class OpStats:
    """Calls of one part: a latency histogram (counts per bucket of BOUNDS, total) and errors."""

    __slots__ = ("buckets", "count", "total", "errors")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BOUNDS) + 1)  # the last one: above every bound
        self.count = 0
        self.total = 0.0
        self.errors = 0

    def add(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(BOUNDS, seconds)] += 1
        self.count += 1
        self.total += seconds


class StorageStats:
    __slots__ = ("items", "blobs", "cache")

    def __init__(self) -> None:
        self.items = OpStats()
        self.blobs = OpStats()
        self.cache = OpStats()


class _Timed:
    """Forward every call to `inner`, timing the coroutines this class names."""

    def __init__(self, inner: Any, stats: OpStats) -> None:
        self.inner = inner
        self.stats = stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # describe(), name, backend specifics

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        stats = self.stats
        started = time.perf_counter()
        try:
            return await getattr(self.inner, method)(*args, **kwargs)
        except _OUTCOMES:
            raise
        except Exception:
            stats.errors += 1
            raise
        finally:
            stats.add(time.perf_counter() - started)


class TimedItemBackend(_Timed, ItemBackend):
    def __init__(self, inner: ItemBackend, stats: OpStats) -> None:
        super().__init__(inner, stats)
        self.name = inner.name

    async def get(self, namespace: str, name: str) -> Item | None:
        result: Item | None = await self._call("get", namespace, name)
        return result

    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        result: Item = await self._call(
            "put", namespace, name, attrs, if_absent=if_absent, if_version=if_version
        )
        return result

    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        return bool(await self._call("delete", namespace, name, if_version=if_version))

    async def query(self, namespace: str, query: Query) -> Page:
        result: Page = await self._call("query", namespace, query)
        return result

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        result: dict[str, Item] = await self._call("batch_get", namespace, names)
        return result

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        await self._call("batch_put", namespace, items)

    async def transact(self, writes: Sequence[Write]) -> None:
        await self._call("transact", writes)

    async def close(self) -> None:
        await self.inner.close()


class TimedBlobBackend(_Timed, BlobBackend):
    def __init__(self, inner: BlobBackend, stats: OpStats) -> None:
        super().__init__(inner, stats)
        self.name = inner.name

    async def get(self, namespace: str, key: str) -> Blob | None:
        result: Blob | None = await self._call("get", namespace, key)
        return result

    async def put(
        self,
        namespace: str,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        return str(
            await self._call(
                "put", namespace, key, data, if_none_match=if_none_match, if_match=if_match
            )
        )

    async def delete(self, namespace: str, key: str, *, if_match: str | None = None) -> bool:
        return bool(await self._call("delete", namespace, key, if_match=if_match))

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage:
        result: BlobPage = await self._call(
            "list", namespace, prefix, limit=limit, page_token=page_token
        )
        return result

    async def presign(
        self, namespace: str, key: str, method: Literal["GET", "PUT"], expires: int = 300
    ) -> str | None:
        result: str | None = await self._call("presign", namespace, key, method, expires)
        return result

    async def close(self) -> None:
        await self.inner.close()


class TimedCache(_Timed, Cache):
    async def get(self, key: str) -> bytes | None:
        result: bytes | None = await self._call("get", key)
        return result

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        result: dict[str, bytes] = await self._call("get_many", keys)
        return result

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        await self._call("set", key, value, ttl)

    async def add(self, key: str, value: bytes, ttl: int) -> None:
        await self._call("add", key, value, ttl)

    async def delete(self, key: str) -> None:
        await self._call("delete", key)

    async def close(self) -> None:
        await self.inner.close()

    def describe(self) -> str:
        return str(self.inner.describe())


def instrument(storage: Any) -> StorageStats:
    """Time the parts of an open `Storage` (xmppd.storage.factory) from now on.

    The wrappers go beneath the read-through cache, so `storage.items`,
    `.blobs` and `.cache` stay the objects the rest of the node holds; the
    cache the cache wrappers call, and the stores they read through to,
    are the timed ones. Closing the storage closes the real parts."""
    stats = StorageStats()
    items, blobs = storage.items, storage.blobs
    if isinstance(items, CachedItemBackend) and isinstance(blobs, CachedBlobBackend):
        timed_items = TimedItemBackend(items.backend, stats.items)
        items.backend = timed_items
        blobs.backend = TimedBlobBackend(blobs.backend, stats.blobs)
        timed_cache = TimedCache(items.cache, stats.cache)
        items.cache = blobs.cache = timed_cache
    else:  # no cache
        timed_items = storage.items = TimedItemBackend(items, stats.items)
        storage.blobs = TimedBlobBackend(blobs, stats.blobs)
    storage.direct_items = timed_items
    return stats
