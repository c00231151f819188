"""Build the configured stores, wrapped in the configured cache.

The cloud backends are imported only when configured, so the embedded
default starts without touching boto or memcached code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .base import BlobBackend, ItemBackend
from .cache import (
    Cache,
    CachedBlobBackend,
    CachedItemBackend,
    MemoryCache,
    NullCache,
    store_scope,
)
from .config import (
    BlobsConfig,
    CacheConfig,
    DynamoDBItemsConfig,
    FilesBlobsConfig,
    ItemsConfig,
    MemcachedCacheConfig,
    MemoryCacheConfig,
    NoCacheConfig,
    S3BlobsConfig,
    SQLiteItemsConfig,
    StorageConfig,
)

log = logging.getLogger(__name__)


class Storage:
    """The item store, blob store and cache of one server process.

    `items` and `blobs` already read through `cache`; modules reach them only
    through ItemStore / BlobStore handles. `direct_items` is the same item
    store without the cache, for data another process may change at any
    time (credentials, changed by xmppctl): the in-process cache cannot be
    invalidated from outside, so such reads must never be served from it."""

    def __init__(
        self,
        items: ItemBackend,
        blobs: BlobBackend,
        cache: Cache,
        direct_items: ItemBackend | None = None,
    ) -> None:
        self.items = items
        self.blobs = blobs
        self.cache = cache
        self.direct_items = direct_items if direct_items is not None else items
        self._closed = False

    def describe(self) -> list[str]:
        """One line per part, for the startup log."""
        return [
            f"items: {describe_backend(self.items)}",
            f"blobs: {describe_backend(self.blobs)}",
            f"cache: {self.cache.describe()}",
        ]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await _close_all([self.items, self.blobs, self.cache])


def describe_backend(backend: ItemBackend | BlobBackend) -> str:
    """One line that names a store and where it is (through a cache wrapper)."""
    inner = getattr(backend, "backend", backend)  # see through the cache wrapper
    describe = getattr(inner, "describe", None)
    return describe() if callable(describe) else inner.name


async def _close_all(parts: list[ItemBackend | BlobBackend | Cache]) -> None:
    for part in parts:
        try:
            await part.close()
        except Exception:
            log.exception("closing %s failed", type(part).__name__)


async def open_items(cfg: ItemsConfig, data_dir: Path, *, read_only: bool = False) -> ItemBackend:
    """The configured item store alone (xmppctl check opens each part on its own,
    `read_only`: making nothing, a missing store is NoStoreYet)."""
    if isinstance(cfg, SQLiteItemsConfig):
        from .backends.sqlite import SQLiteItemBackend

        return await SQLiteItemBackend.from_config(cfg, data_dir, read_only=read_only)
    assert isinstance(cfg, DynamoDBItemsConfig)
    from .backends.dynamodb import DynamoDBItemBackend

    return await DynamoDBItemBackend.from_config(cfg, read_only=read_only)


async def open_blobs(cfg: BlobsConfig, data_dir: Path, *, read_only: bool = False) -> BlobBackend:
    """The configured blob store alone (`read_only` as for open_items)."""
    if isinstance(cfg, FilesBlobsConfig):
        from .backends.files import FileBlobBackend

        return await FileBlobBackend.from_config(cfg, data_dir, read_only=read_only)
    assert isinstance(cfg, S3BlobsConfig)
    from .backends.s3 import S3BlobBackend

    return await S3BlobBackend.from_config(cfg, read_only=read_only)


async def open_cache(cfg: CacheConfig) -> Cache:
    """The configured cache alone."""
    if isinstance(cfg, MemoryCacheConfig):
        return await MemoryCache.from_config(cfg)
    if isinstance(cfg, MemcachedCacheConfig):
        from .memcached import MemcachedCache

        return await MemcachedCache.from_config(cfg)
    return NullCache()


async def open_storage(cfg: StorageConfig, data_dir: Path) -> Storage:
    """Open every configured part, or none: on a failure the parts already
    open are closed before the error propagates."""
    opened: list[ItemBackend | BlobBackend | Cache] = []
    try:
        items = await open_items(cfg.items, data_dir)
        opened.append(items)
        blobs = await open_blobs(cfg.blobs, data_dir)
        opened.append(blobs)
        cache = await open_cache(cfg.cache)
        opened.append(cache)
    except BaseException:
        await _close_all(opened)
        raise
    if isinstance(cfg.cache, NoCacheConfig):
        return Storage(items, blobs, cache)
    ttl, max_bytes = cfg.cache.ttl, cfg.cache.max_value_bytes
    return Storage(
        CachedItemBackend(
            items,
            cache,
            ttl=ttl,
            max_value_bytes=max_bytes,
            scope=store_scope(describe_backend(items)),
        ),
        CachedBlobBackend(
            blobs,
            cache,
            ttl=ttl,
            max_value_bytes=max_bytes,
            scope=store_scope(describe_backend(blobs)),
        ),
        cache,
        direct_items=items,
    )
