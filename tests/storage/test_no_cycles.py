"""Storage calls leave no reference cycles behind.

What refcounting cannot free, the collector must find, walking every object
alive at that moment: with 1,000 operations in flight that walk is what held
the serving loop for 5-15 ms (bench/storage_bench.py). botocore, for one, made
a cycle per response until its parser defaults were set (storage/backends/_aws.py).
Every backend, embedded and cloud, bare and behind a cache, is checked."""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import pytest

from xmppd.storage.base import BlobBackend, ItemBackend


@pytest.fixture
def saved_garbage() -> Iterator[Callable[[Callable[[], Awaitable[None]]], Awaitable[Counter[str]]]]:
    async def run(work: Callable[[], Awaitable[None]]) -> Counter[str]:
        await work()  # first calls fill caches (service models, connections, ring)
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            await work()
            gc.collect()
            return Counter(type(obj).__qualname__ for obj in gc.garbage)
        finally:
            gc.set_debug(0)
            gc.garbage.clear()

    yield run
    gc.set_debug(0)


async def test_item_calls_make_no_cycles(
    item_backend: ItemBackend, ns: str, saved_garbage: Callable[..., Awaitable[Counter[str]]]
) -> None:
    async def work() -> None:
        for n in range(10):
            await item_backend.put(ns, f"k{n % 3}", {"n": n})
            assert (await item_backend.get(ns, f"k{n % 3}")) is not None
            assert await item_backend.get(ns, "absent") is None

    assert await saved_garbage(work) == Counter()


async def test_blob_calls_make_no_cycles(
    blob_backend: BlobBackend, ns: str, saved_garbage: Callable[..., Awaitable[Counter[str]]]
) -> None:
    async def work() -> None:
        for n in range(10):
            await blob_backend.put(ns, f"b{n % 3}", b"x" * 1024)
            assert (await blob_backend.get(ns, f"b{n % 3}")) is not None
            assert await blob_backend.get(ns, "absent") is None

    assert await saved_garbage(work) == Counter()
