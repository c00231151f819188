"""Cloud backends for the contract suite (see the protocol in conftest.py).

Items: DynamoDB on moto's server, bare and behind the memcached ring.
Blobs: S3 on SeaweedFS and on moto, and SeaweedFS behind the memcached ring.
The servers are session-scoped (tests/storage/services.py); each test gets its
own client, since a client belongs to the event loop of the test that made it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.s3 import S3BlobBackend
from xmppd.storage.base import BlobBackend, ItemBackend
from xmppd.storage.cache import CachedBlobBackend, CachedItemBackend
from xmppd.storage.memcached import MemcachedCache

from .services import (
    FIXTURES,
    dynamodb_config,
    memcached_config,
    memcached_ring,
    moto_service,
    s3_config,
    seaweedfs_service,
    service_factory,
)

__all__ = [
    "BLOB_BACKENDS",
    "FIXTURES",
    "ITEM_BACKENDS",
    "memcached_ring",
    "moto_service",
    "seaweedfs_service",
    "service_factory",
]


def _max_blob_bytes() -> int:
    from .conftest import TEST_MAX_BLOB_BYTES  # conftest imports this module: look up late

    return TEST_MAX_BLOB_BYTES


async def _memcached(request: pytest.FixtureRequest) -> MemcachedCache:
    cfg = memcached_config(request.getfixturevalue("memcached_ring"))
    return await MemcachedCache.from_config(cfg)


@asynccontextmanager
async def dynamodb_moto(request: pytest.FixtureRequest) -> AsyncIterator[ItemBackend]:
    backend = await DynamoDBItemBackend.from_config(
        dynamodb_config(request.getfixturevalue("moto_service"))
    )
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def dynamodb_moto_memcached(request: pytest.FixtureRequest) -> AsyncIterator[ItemBackend]:
    cache = await _memcached(request)
    async with dynamodb_moto(request) as backend:
        try:
            yield CachedItemBackend(backend, cache, ttl=300)
        finally:
            await cache.close()


@asynccontextmanager
async def _s3(request: pytest.FixtureRequest, fixture: str) -> AsyncIterator[S3BlobBackend]:
    cfg = s3_config(request.getfixturevalue(fixture), max_blob_bytes=_max_blob_bytes())
    backend = await S3BlobBackend.from_config(cfg)
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def s3_seaweedfs(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    async with _s3(request, "seaweedfs_service") as backend:
        yield backend


@asynccontextmanager
async def s3_moto(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    async with _s3(request, "moto_service") as backend:
        yield backend


@asynccontextmanager
async def s3_seaweedfs_memcached(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    cache = await _memcached(request)
    async with _s3(request, "seaweedfs_service") as backend:
        try:
            yield CachedBlobBackend(backend, cache, ttl=300)
        finally:
            await cache.close()


ITEM_BACKENDS = {
    "dynamodb-moto": dynamodb_moto,
    "dynamodb-moto+memcached": dynamodb_moto_memcached,
}
BLOB_BACKENDS = {
    "s3-seaweedfs": s3_seaweedfs,
    "s3-moto": s3_moto,
    "s3-seaweedfs+memcached": s3_seaweedfs_memcached,
}
