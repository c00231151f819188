"""Storage config models and open_storage on the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import BlobStore, ItemStore, StorageError
from xmppd.storage.cache import CachedBlobBackend, CachedItemBackend, MemoryCache, NullCache
from xmppd.storage.config import (
    DynamoDBItemsConfig,
    FilesBlobsConfig,
    MemcachedCacheConfig,
    MemoryCacheConfig,
    NoCacheConfig,
    S3BlobsConfig,
    SQLiteItemsConfig,
    StorageConfig,
)
from xmppd.storage.factory import open_storage


def test_defaults_are_the_embedded_store() -> None:
    cfg = StorageConfig()
    assert cfg.items == SQLiteItemsConfig(path="items.sqlite3")
    assert cfg.blobs == FilesBlobsConfig(path="blobs", max_blob_bytes=16 * 1024 * 1024)
    assert cfg.cache == MemoryCacheConfig(max_items=100_000, max_value_bytes=65536, ttl=300)


def test_backend_picked_by_name_and_defaulted_when_left_out() -> None:
    cfg = StorageConfig.model_validate(
        {
            "items": {"backend": "dynamodb", "table": "t", "endpoint_url": "http://127.0.0.1:1"},
            "blobs": {"backend": "s3", "bucket": "b"},
            "cache": {"backend": "memcached", "servers": ["10.0.0.1:11211", "[::1]:11212"]},
        }
    )
    assert isinstance(cfg.items, DynamoDBItemsConfig) and cfg.items.table == "t"
    assert isinstance(cfg.blobs, S3BlobsConfig) and cfg.blobs.max_blob_bytes == 64 * 1024 * 1024
    assert isinstance(cfg.cache, MemcachedCacheConfig) and cfg.cache.pool_size == 4
    cfg = StorageConfig.model_validate({"items": {"path": "x.db"}, "cache": {"ttl": 5}})
    assert cfg.items == SQLiteItemsConfig(path="x.db")
    assert cfg.cache == MemoryCacheConfig(ttl=5)
    assert isinstance(
        StorageConfig.model_validate({"cache": {"backend": "none"}}).cache, NoCacheConfig
    )


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"items": {"backend": "mysql"}}, ("items",)),
        ({"items": {"pth": "x"}}, ("items", "sqlite", "pth")),
        ({"items": {"backend": "dynamodb", "max_connections": 0}}, ("items", "dynamodb")),
        ({"items": {"backend": "dynamodb", "retries": -1}}, ("items", "dynamodb")),
        ({"blobs": {"backend": "s3"}}, ("blobs", "s3", "bucket")),
        ({"blobs": {"backend": "s3", "bucket": "b", "acl": "x"}}, ("blobs", "s3", "acl")),
        ({"cache": {"backend": "memcached", "servers": []}}, ("cache", "memcached", "servers")),
        ({"cache": {"backend": "memcached"}}, ("cache", "memcached", "servers")),
        ({"cache": {"backend": "memcached", "servers": ["localhost"]}}, ("cache", "memcached")),
        ({"cache": {"backend": "memcached", "servers": ["h:0"]}}, ("cache", "memcached")),
        ({"cache": {"backend": "memcached", "servers": ["h:1"], "max_value_bytes": 2**21}}, ()),
        ({"cache": {"backend": "none", "ttl": 1}}, ("cache", "none", "ttl")),
        ({"cache": {"max_items": 0}}, ("cache", "memory", "max_items")),
        ({"items": {}, "extra": 1}, ("extra",)),
    ],
)
def test_bad_config_is_rejected_with_its_location(data: dict, where: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as info:
        StorageConfig.model_validate(data)
    loc = info.value.errors()[0]["loc"]
    assert loc[: len(where)] == where


async def test_open_embedded_default(tmp_path: Path) -> None:
    storage = await open_storage(StorageConfig(), tmp_path)
    try:
        assert isinstance(storage.items, CachedItemBackend)
        assert isinstance(storage.items.backend, SQLiteItemBackend)
        assert isinstance(storage.blobs, CachedBlobBackend)
        assert isinstance(storage.blobs.backend, FileBlobBackend)
        assert isinstance(storage.cache, MemoryCache)
        assert storage.items.cache is storage.cache is storage.blobs.cache
        assert storage.describe() == [
            f"items: sqlite {tmp_path / 'items.sqlite3'}",
            f"blobs: files {tmp_path / 'blobs'}",
            "cache: in-process LRU (100000 items)",
        ]
        roster = ItemStore(storage.items, "example.com", "roster")
        await roster.put("bob@example.com", {"name": "Bob"})
        assert (await roster.get("bob@example.com")) is not None
        offline = BlobStore(storage.blobs, "example.com", "offline")
        await offline.put("alice/1", b"<message/>")
        assert (await offline.list("alice/")).keys == ["alice/1"]
    finally:
        await storage.close()
        await storage.close()
    assert (tmp_path / "items.sqlite3").is_file()
    assert (tmp_path / "blobs").is_dir()


async def test_open_without_cache_and_with_absolute_paths(tmp_path: Path) -> None:
    cfg = StorageConfig(
        items=SQLiteItemsConfig(path=str(tmp_path / "abs" / "db.sqlite3")),
        blobs=FilesBlobsConfig(path=str(tmp_path / "abs" / "blobs"), max_blob_bytes=10),
        cache=NoCacheConfig(backend="none"),
    )
    storage = await open_storage(cfg, tmp_path / "data")
    try:
        assert isinstance(storage.items, SQLiteItemBackend)
        assert isinstance(storage.blobs, FileBlobBackend)
        assert storage.blobs.max_blob_bytes == 10
        assert isinstance(storage.cache, NullCache)
        assert storage.describe()[2] == "cache: none"
    finally:
        await storage.close()
    assert (tmp_path / "abs" / "db.sqlite3").is_file()
    assert not (tmp_path / "data").exists()


async def test_open_failure_closes_what_was_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed: list[SQLiteItemBackend] = []
    real_close = SQLiteItemBackend.close

    async def close(self: SQLiteItemBackend) -> None:
        closed.append(self)
        await real_close(self)

    monkeypatch.setattr(SQLiteItemBackend, "close", close)
    (tmp_path / "blocker").write_bytes(b"")
    cfg = StorageConfig(blobs=FilesBlobsConfig(path="blocker/blobs"))
    with pytest.raises(StorageError, match="blocker"):
        await open_storage(cfg, tmp_path)
    assert len(closed) == 1
