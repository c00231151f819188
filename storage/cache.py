"""The cache in front of the stores: read-through, invalidated on every write.

`Cache` is a byte-string key/value cache (in-process LRU here, memcached in
storage/memcached.py). `CachedItemBackend` and `CachedBlobBackend` wrap a
store so hot reads skip the network, under three rules:

* a cache failure or timeout is a miss, never an error and never lost data:
  the store stays the truth and is always written first;
* a write does not delete its key but overwrites it with a short-lived
  tombstone. Readers treat the tombstone as a miss and fill with `add`
  (set-if-absent), which the tombstone makes fail, so a reader that fetched
  the old value just before the write cannot put it back into the cache;
* the key is invalidated after a ConditionFailed too, so a retrying
  read-modify-write sees the store, not the stale entry that made it lose;
* a store read that took longer than FILL_WITHIN fills nothing: a write made
  while it ran may have left a tombstone that is gone by the time it would fill.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import math
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Literal

from .base import (
    Attrs,
    Blob,
    BlobBackend,
    BlobPage,
    Item,
    ItemBackend,
    Page,
    Query,
    Write,
)
from .codec import decode_attrs, encode_attrs
from .config import MemoryCacheConfig

log = logging.getLogger(__name__)

CACHE_SCHEMA = "x1"  # bump when the value encoding changes: old entries are then ignored
MAX_KEY_LENGTH = 250  # memcached's limit
TOMBSTONE_TTL = 5  # seconds; longer than a store read normally takes
FILL_WITHIN = TOMBSTONE_TTL / 2
"""Seconds a store read may take and still fill the cache. A write that lands while
the read runs leaves a tombstone that refuses the read's (old) value for TOMBSTONE_TTL
(memcached: at least TTL - 1, its clock ticks in whole seconds); a slower read (a hung
store's retries, a stalled loop) would put the old value back once the tombstone is
gone, for the whole cache ttl."""

_TOMBSTONE = b"T"
_ABSENT = b"-"
_ITEM = b"I"
_BLOB = b"B"
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_KEY_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@-")


class Cache(abc.ABC):
    """An async byte cache. Implementations may raise; the Cached* wrappers
    turn any exception into a miss. ttl is in seconds, 0 meaning no expiry."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """Hits among `keys`; override where the cache has a multi-get."""
        found: dict[str, bytes] = {}
        for key in keys:
            value = await self.get(key)
            if value is not None:
                found[key] = value
        return found

    @abc.abstractmethod
    async def set(self, key: str, value: bytes, ttl: int) -> None: ...

    @abc.abstractmethod
    async def add(self, key: str, value: bytes, ttl: int) -> None:
        """Set only if the key is absent (a live entry is left alone)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for the startup log."""


class NullCache(Cache):
    """No caching: every read goes to the store."""

    async def get(self, key: str) -> bytes | None:
        return None

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        return None

    async def add(self, key: str, value: bytes, ttl: int) -> None:
        return None

    async def delete(self, key: str) -> None:
        return None

    def describe(self) -> str:
        return "none"


class MemoryCache(Cache):
    """An in-process LRU with TTLs. Right for one node; several nodes that share
    the stores must each hear the others' invalidations: a cluster node sets
    `on_write` to pass every `set` and `delete` to the other nodes, which
    `apply` it (xmppd.cluster.caches), and `clear`s when some may have been lost.
    Several nodes without a cluster: use memcached."""

    def __init__(
        self,
        max_items: int = 100_000,
        max_value_bytes: int = 65536,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_items = max_items
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # value, deadline
        # Awaited with (key, value, ttl) after a local set, (key, None, 0) after a delete.
        self.on_write: Callable[[str, bytes | None, int], Awaitable[None]] | None = None

    def _live(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, deadline = entry
        if deadline <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        self._set(key, value, ttl)
        if self.on_write is not None:
            await self.on_write(key, value, ttl)

    def apply(self, key: str, value: bytes | None, ttl: int) -> None:
        """Another node's `set` (or, with None, `delete`) of `key`; not passed on."""
        if value is None:
            self._entries.pop(key, None)
        else:
            self._set(key, value, ttl)

    def clear(self) -> None:
        """Forget everything (invalidations from other nodes may have been lost)."""
        self._entries.clear()

    def _set(self, key: str, value: bytes, ttl: int) -> None:
        if len(value) > self.max_value_bytes:
            self._entries.pop(key, None)  # an older value must not outlive this write
            return
        self._entries[key] = (bytes(value), self._clock() + ttl if ttl > 0 else math.inf)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_items:
            self._entries.popitem(last=False)

    async def add(self, key: str, value: bytes, ttl: int) -> None:
        if self._live(key) is None:
            self._set(key, value, ttl)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)
        if self.on_write is not None:
            await self.on_write(key, None, 0)

    @classmethod
    async def from_config(cls, cfg: MemoryCacheConfig) -> MemoryCache:
        return cls(cfg.max_items, cfg.max_value_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self) -> str:
        return f"in-process LRU ({self.max_items} items)"


def cache_key(kind: Literal["i", "b"], namespace: str, name: str, scope: str = "") -> str:
    """A memcached-safe key: printable ASCII without spaces, at most 250 bytes,
    unambiguous across namespaces; long keys are replaced by their hash.

    `scope` tells deployments apart (see `store_scope`): two deployments that
    share a memcached ring but not a table or bucket must never read each
    other's entries."""
    key = f"{CACHE_SCHEMA}:{scope}{kind}:{_escape(namespace)}:{_escape(name)}"
    if len(key) <= MAX_KEY_LENGTH:
        return key
    return f"{CACHE_SCHEMA}:{scope}{kind}:#{hashlib.sha256(key.encode('ascii')).hexdigest()}"


def store_scope(identity: str) -> str:
    """A short cache-key prefix for the store described by `identity` (backend,
    table or path, endpoint): the same for every node of one deployment."""
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:10] + "."


def _escape(text: str) -> str:
    return "".join(chr(b) if b in _KEY_SAFE else f"%{b:02X}" for b in text.encode("utf-8"))


def encode_item(item: Item | None) -> bytes:
    if item is None:
        return _ABSENT
    return _ITEM + _U64.pack(item.version) + encode_attrs(item.attrs)


def decode_item(name: str, raw: bytes) -> Item | None:
    """The cached item (None: cached as absent); ValueError if `raw` is not ours."""
    if raw == _ABSENT:
        return None
    if raw[:1] != _ITEM or len(raw) < 9:
        raise ValueError("not a cached item")
    return Item(name, decode_attrs(memoryview(raw)[9:]), _U64.unpack_from(raw, 1)[0])


def encode_blob(blob: Blob | None) -> bytes:
    if blob is None:
        return _ABSENT
    etag = blob.etag.encode("utf-8")
    return b"".join((_BLOB, _U16.pack(len(etag)), etag, blob.data))


def decode_blob(key: str, raw: bytes) -> Blob | None:
    if raw == _ABSENT:
        return None
    if raw[:1] != _BLOB or len(raw) < 3:
        raise ValueError("not a cached blob")
    (size,) = _U16.unpack_from(raw, 1)
    if len(raw) < 3 + size:
        raise ValueError("truncated cached blob")
    return Blob(key, raw[3 + size :], raw[3 : 3 + size].decode("utf-8"))


class _CacheUser:
    """Cache calls that cannot fail: errors become misses, logged without flooding."""

    _WARN_EVERY = 60.0

    def __init__(
        self,
        cache: Cache,
        ttl: int,
        max_value_bytes: int,
        scope: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cache = cache
        self.scope = scope
        self.ttl = ttl
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._last_warning = -self._WARN_EVERY

    def _failed(self, operation: str, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning >= self._WARN_EVERY:
            self._last_warning = now
            log.warning("cache %s failed, serving from the store: %r", operation, exc)
        else:
            log.debug("cache %s failed: %r", operation, exc)

    async def _lookup(self, keys: Sequence[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        try:
            if len(keys) == 1:
                value = await self.cache.get(keys[0])
                return {} if value is None else {keys[0]: value}
            return await self.cache.get_many(keys)
        except Exception as exc:
            self._failed("get", exc)
            return {}

    async def _fill(self, key: str, value: bytes, read_since: float) -> None:
        """Cache what a store read begun at `read_since` (this wrapper's clock) found."""
        if len(value) > self.max_value_bytes or self._clock() - read_since > FILL_WITHIN:
            return
        try:
            await self.cache.add(key, value, self.ttl)
        except Exception as exc:
            self._failed("add", exc)

    async def _invalidate(self, keys: Iterable[str]) -> None:
        for key in keys:
            try:
                await self.cache.set(key, _TOMBSTONE, TOMBSTONE_TTL)
            except Exception as exc:
                self._failed("invalidate", exc)


class CachedItemBackend(_CacheUser, ItemBackend):
    """An ItemBackend with read-through caching of get/batch_get."""

    def __init__(
        self,
        backend: ItemBackend,
        cache: Cache,
        *,
        ttl: int = 300,
        max_value_bytes: int = 65536,
        scope: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(cache, ttl, max_value_bytes, scope, clock)
        self.backend = backend
        self.name = backend.name

    def _cached(self, name: str, raw: bytes) -> tuple[bool, Item | None]:
        """(hit, item); a tombstone or an undecodable value is a miss."""
        if raw == _TOMBSTONE:
            return False, None
        try:
            return True, decode_item(name, raw)
        except ValueError as exc:
            self._failed("decode", exc)
            return False, None

    async def get(self, namespace: str, name: str) -> Item | None:
        key = cache_key("i", namespace, name, self.scope)
        raw = (await self._lookup([key])).get(key)
        if raw is not None:
            hit, item = self._cached(name, raw)
            if hit:
                return item
        started = self._clock()
        item = await self.backend.get(namespace, name)
        if raw != _TOMBSTONE:
            await self._fill(key, encode_item(item), started)
        return item

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        keys = {name: cache_key("i", namespace, name, self.scope) for name in dict.fromkeys(names)}
        cached = await self._lookup(list(keys.values()))
        found: dict[str, Item] = {}
        missing: list[str] = []
        for name, key in keys.items():
            hit, item = self._cached(name, cached[key]) if key in cached else (False, None)
            if not hit:
                missing.append(name)
            elif item is not None:
                found[name] = item
        if missing:
            started = self._clock()
            fetched = await self.backend.batch_get(namespace, missing)
            found.update(fetched)
            for name in missing:
                if cached.get(keys[name]) != _TOMBSTONE:
                    await self._fill(keys[name], encode_item(fetched.get(name)), started)
        return found

    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        try:
            return await self.backend.put(
                namespace, name, attrs, if_absent=if_absent, if_version=if_version
            )
        finally:
            await self._invalidate([cache_key("i", namespace, name, self.scope)])

    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        try:
            return await self.backend.delete(namespace, name, if_version=if_version)
        finally:
            await self._invalidate([cache_key("i", namespace, name, self.scope)])

    async def query(self, namespace: str, query: Query) -> Page:
        return await self.backend.query(namespace, query)

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        try:
            await self.backend.batch_put(namespace, items)
        finally:
            await self._invalidate(cache_key("i", namespace, name, self.scope) for name in items)

    async def transact(self, writes: Sequence[Write]) -> None:
        try:
            await self.backend.transact(writes)
        finally:
            await self._invalidate(cache_key("i", w.namespace, w.name, self.scope) for w in writes)

    async def close(self) -> None:
        await self.backend.close()


class CachedBlobBackend(_CacheUser, BlobBackend):
    """A BlobBackend with read-through caching of get; blobs over
    max_value_bytes are never cached."""

    def __init__(
        self,
        backend: BlobBackend,
        cache: Cache,
        *,
        ttl: int = 300,
        max_value_bytes: int = 65536,
        scope: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(cache, ttl, max_value_bytes, scope, clock)
        self.backend = backend
        self.name = backend.name

    async def get(self, namespace: str, key: str) -> Blob | None:
        ckey = cache_key("b", namespace, key, self.scope)
        raw = (await self._lookup([ckey])).get(ckey)
        if raw is not None and raw != _TOMBSTONE:
            try:
                return decode_blob(key, raw)
            except ValueError as exc:
                self._failed("decode", exc)
        started = self._clock()
        blob = await self.backend.get(namespace, key)
        if raw != _TOMBSTONE and (blob is None or len(blob.data) < self.max_value_bytes):
            await self._fill(ckey, encode_blob(blob), started)  # _fill checks the exact size
        return blob

    async def put(
        self,
        namespace: str,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        try:
            return await self.backend.put(
                namespace, key, data, if_none_match=if_none_match, if_match=if_match
            )
        finally:
            await self._invalidate([cache_key("b", namespace, key, self.scope)])

    async def delete(self, namespace: str, key: str, *, if_match: str | None = None) -> bool:
        try:
            return await self.backend.delete(namespace, key, if_match=if_match)
        finally:
            await self._invalidate([cache_key("b", namespace, key, self.scope)])

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage:
        return await self.backend.list(namespace, prefix, limit=limit, page_token=page_token)

    async def presign(
        self, namespace: str, key: str, method: Literal["GET", "PUT"], expires: int = 300
    ) -> str | None:
        return await self.backend.presign(namespace, key, method, expires)

    async def close(self) -> None:
        await self.backend.close()
