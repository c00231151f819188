"""Copy every item and blob from one storage configuration to another.

Used by `xmppctl migrate --from A.yml --to B.yml` (for example from the
embedded SQLite + folder default to DynamoDB + S3). Run it with the servers
stopped: it reads a consistent source only if nobody writes to it meanwhile.

* Namespaces come from each source backend's `namespaces()`.
* Resumable: an item or blob already in the destination with equal content
  is left alone, so an interrupted run is simply run again.
* Verified: whatever was not found equal is written and then read back from
  the destination store itself (never through a cache) and compared.
* Items are copied a page at a time (one batch_get and one batch_put per
  page); blobs several at a time. Versions are not copied: the destination
  numbers each item from its own history (1 for a new one), which only means a
  client holding an old version re-reads once.
* Writes go through the destination's cache wrapper, so a cache shared with
  running servers is invalidated; reads bypass caches.
* Nothing is deleted: destination entries the source lacks stay.

The result counts, per namespace, the items ("items:<namespace>") and blobs
("blobs:<namespace>") the destination holds from the source (copied now or
found equal); a caller that passes `unchanged` learns how many of those were
found equal (not written), so it can say what this run really copied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from .base import BlobBackend, ItemBackend, ListsNamespaces, Query, StorageError
from .config import NoCacheConfig, StorageConfig
from .factory import open_storage

Progress = Callable[[str, int, int | None], None]
"""progress(namespace, done, total): called as a namespace advances; total is None
because the stores cannot count without reading everything first."""

ITEM_PAGE = 100
BLOB_PAGE = 100
BLOB_CONCURRENCY = 8


def _raw(backend: ItemBackend | BlobBackend) -> ItemBackend | BlobBackend:
    """The store behind a cache wrapper (CachedItemBackend / CachedBlobBackend)."""
    inner = getattr(backend, "backend", None)
    return inner if isinstance(inner, ItemBackend | BlobBackend) else backend


async def _namespaces(backend: ItemBackend | BlobBackend) -> list[str]:
    if not isinstance(backend, ListsNamespaces):
        raise StorageError(backend.name, "migrate", "this backend cannot list its namespaces")
    return await backend.namespaces()


def _no_progress(namespace: str, done: int, total: int | None) -> None:
    return None


async def migrate(
    src: StorageConfig,
    src_data_dir: Path,
    dst: StorageConfig,
    dst_data_dir: Path,
    progress: Progress | None = None,
    unchanged: dict[str, int] | None = None,
) -> dict[str, int]:
    """Copy everything from `src` to `dst` (see the module docstring)."""
    report = progress or _no_progress
    source = await open_storage(
        src.model_copy(update={"cache": NoCacheConfig(backend="none")}), Path(src_data_dir)
    )
    try:
        target = await open_storage(dst, Path(dst_data_dir))
        try:
            return await copy_all(
                source.items, source.blobs, target.items, target.blobs, report, unchanged
            )
        finally:
            await target.close()
    finally:
        await source.close()


async def copy_all(
    src_items: ItemBackend,
    src_blobs: BlobBackend,
    dst_items: ItemBackend,
    dst_blobs: BlobBackend,
    progress: Progress,
    unchanged: dict[str, int] | None = None,
) -> dict[str, int]:
    """`migrate` on backends that are already open."""
    counts: dict[str, int] = {}
    equal = unchanged if unchanged is not None else {}
    for namespace in await _namespaces(_raw(src_items)):
        store = f"items:{namespace}"
        equal[store] = 0
        counts[store] = await copy_items(src_items, dst_items, namespace, progress, equal, store)
    for namespace in await _namespaces(_raw(src_blobs)):
        store = f"blobs:{namespace}"
        equal[store] = 0
        counts[store] = await copy_blobs(src_blobs, dst_blobs, namespace, progress, equal, store)
    return counts


async def copy_items(
    src: ItemBackend,
    dst: ItemBackend,
    namespace: str,
    progress: Progress,
    unchanged: dict[str, int] | None = None,
    store: str = "",
) -> int:
    source = _raw(src)
    check = _raw(dst)
    assert isinstance(source, ItemBackend) and isinstance(check, ItemBackend)
    done = 0
    query = Query(limit=ITEM_PAGE)
    while True:
        page = await source.query(namespace, query)
        wanted = {item.name: item.attrs for item in page.items}
        present = await check.batch_get(namespace, list(wanted))
        stale = {
            name: attrs
            for name, attrs in wanted.items()
            if name not in present or present[name].attrs != attrs
        }
        if unchanged is not None:
            unchanged[store] += len(wanted) - len(stale)
        if stale:
            await dst.batch_put(namespace, stale)
            written = await check.batch_get(namespace, list(stale))
            for name, attrs in stale.items():
                if name not in written or written[name].attrs != attrs:
                    raise StorageError(
                        check.name, "migrate", f"{namespace}/{name}: the copy reads back different"
                    )
        done += len(wanted)
        progress(namespace, done, None)
        if page.next_token is None:
            return done
        query.page_token = page.next_token


async def copy_blobs(
    src: BlobBackend,
    dst: BlobBackend,
    namespace: str,
    progress: Progress,
    unchanged: dict[str, int] | None = None,
    store: str = "",
) -> int:
    source = _raw(src)
    check = _raw(dst)
    assert isinstance(source, BlobBackend) and isinstance(check, BlobBackend)
    gate = asyncio.Semaphore(BLOB_CONCURRENCY)

    async def copy(key: str) -> int:
        async with gate:
            blob = await source.get(namespace, key)
            if blob is None:  # deleted since the listing
                return 0
            there = await check.get(namespace, key)
            if there is not None and there.data == blob.data:
                if unchanged is not None:
                    unchanged[store] += 1
                return 1
            await dst.put(namespace, key, blob.data)
            there = await check.get(namespace, key)
            if there is None or there.data != blob.data:
                raise StorageError(
                    check.name, "migrate", f"{namespace}/{key}: the copy reads back different"
                )
            return 1

    done = 0
    token: str | None = None
    while True:
        page = await source.list(namespace, limit=BLOB_PAGE, page_token=token)
        done += sum(await asyncio.gather(*(copy(key) for key in page.keys)))
        progress(namespace, done, None)
        token = page.next_token
        if token is None:
            return done
