"""Fixtures for the storage contract suite (test_contract.py).

Every backend runs the same tests. A backend joins by registering a factory:

    ITEM_BACKENDS: dict[str, ItemFactory]   name -> factory
    BLOB_BACKENDS: dict[str, BlobFactory]

A factory is called with the test's `pytest.FixtureRequest` and returns an
async context manager yielding a ready backend, closed on exit:

    @asynccontextmanager
    async def sqlite_items(request):
        backend = await SQLiteItemBackend.open(request.getfixturevalue("tmp_path") / "db")
        try:
            yield backend
        finally:
            await backend.close()

The backend may be shared between tests (one table, one bucket): the suite
never assumes it starts empty, it works in fresh namespaces (fixtures `ns`,
`ns2`). Blob backends must be built with max_blob_bytes=TEST_MAX_BLOB_BYTES.

Cloud backends (storage-B) live in tests/storage/cloud.py, imported here when
present. It exposes ITEM_BACKENDS / BLOB_BACKENDS dicts of the same shape,
merged into the ones below, and may list extra pytest fixtures (for example a
session-scoped service its factories reach with request.getfixturevalue) in
a FIXTURES tuple of names. A factory whose service is unavailable calls
pytest.skip, or pytest.fail when the environment variable CI is "true".
"""

from __future__ import annotations

import importlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import pytest

from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import BlobBackend, ItemBackend
from xmppd.storage.cache import CachedBlobBackend, CachedItemBackend, MemoryCache

TEST_MAX_BLOB_BYTES = 1024 * 1024

ItemFactory = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[ItemBackend]]
BlobFactory = Callable[[pytest.FixtureRequest], AbstractAsyncContextManager[BlobBackend]]


@asynccontextmanager
async def _sqlite_items(request: pytest.FixtureRequest) -> AsyncIterator[ItemBackend]:
    backend = await SQLiteItemBackend.open(request.getfixturevalue("tmp_path") / "items.sqlite3")
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def _memory_items(request: pytest.FixtureRequest) -> AsyncIterator[ItemBackend]:
    yield MemoryItemBackend()


@asynccontextmanager
async def _sqlite_memorycache_items(request: pytest.FixtureRequest) -> AsyncIterator[ItemBackend]:
    async with _sqlite_items(request) as backend:
        yield CachedItemBackend(backend, MemoryCache(max_items=1000), ttl=300)


@asynccontextmanager
async def _files_blobs(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    root = request.getfixturevalue("tmp_path") / "blobs"
    backend = await FileBlobBackend.open(root, max_blob_bytes=TEST_MAX_BLOB_BYTES)
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def _memory_blobs(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    yield MemoryBlobBackend(max_blob_bytes=TEST_MAX_BLOB_BYTES)


@asynccontextmanager
async def _files_memorycache_blobs(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    async with _files_blobs(request) as backend:
        yield CachedBlobBackend(backend, MemoryCache(max_items=1000), ttl=300)


ITEM_BACKENDS: dict[str, ItemFactory] = {
    "sqlite": _sqlite_items,
    "memory": _memory_items,
    "sqlite+memorycache": _sqlite_memorycache_items,
}
BLOB_BACKENDS: dict[str, BlobFactory] = {
    "files": _files_blobs,
    "memory": _memory_blobs,
    "files+memorycache": _files_memorycache_blobs,
}

try:
    _cloud = importlib.import_module("tests.storage.cloud")
except ModuleNotFoundError as exc:
    if exc.name != "tests.storage.cloud":
        raise
else:
    ITEM_BACKENDS.update(getattr(_cloud, "ITEM_BACKENDS", {}))
    BLOB_BACKENDS.update(getattr(_cloud, "BLOB_BACKENDS", {}))
    for _name in getattr(_cloud, "FIXTURES", ()):
        globals()[_name] = getattr(_cloud, _name)


@pytest.fixture(params=list(ITEM_BACKENDS))
async def item_backend(request: pytest.FixtureRequest) -> AsyncIterator[ItemBackend]:
    async with ITEM_BACKENDS[request.param](request) as backend:
        yield backend


@pytest.fixture(params=list(BLOB_BACKENDS))
async def blob_backend(request: pytest.FixtureRequest) -> AsyncIterator[BlobBackend]:
    async with BLOB_BACKENDS[request.param](request) as backend:
        yield backend


def _fresh_namespace(store: str) -> str:
    return f"t{uuid.uuid4().hex[:12]}.example/{store}"


@pytest.fixture
def ns() -> str:
    """A namespace no other test uses, shaped like the real ones ("<vhost>/<store>")."""
    return _fresh_namespace("store")


@pytest.fixture
def ns2() -> str:
    return _fresh_namespace("other")
