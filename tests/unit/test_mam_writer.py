"""The archive's batching writer (modules/_mam_writer.py) over a store that waits."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from xmppd.modules._mam_writer import BATCH, RUNNERS, Writer
from xmppd.storage.base import Attrs


class GatedStore:
    """An item store's batch_put that waits for the test, counting calls at once."""

    namespace = "localhost/mam"

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.batches: list[dict[str, Attrs]] = []
        self.active = 0
        self.most = 0
        self.changed = asyncio.Condition()

    async def batch_put(self, items: Mapping[str, Attrs]) -> None:
        async with self.changed:
            self.active += 1
            self.most = max(self.most, self.active)
            self.batches.append(dict(items))
            self.changed.notify_all()
        await self.gate.wait()
        self.active -= 1

    async def until_active(self, count: int) -> None:
        async with self.changed:
            await self.changed.wait_for(lambda: self.active == count)


def writer_over(store: GatedStore) -> tuple[Writer, list[asyncio.Future[Any]]]:
    tasks: list[asyncio.Future[Any]] = []

    def spawn(work: Any) -> asyncio.Future[Any]:
        tasks.append(asyncio.ensure_future(work))
        return tasks[-1]

    async def exists(user: str) -> bool:
        return user != "gone"

    return Writer(store, spawn, exists), tasks  # type: ignore[arg-type]


async def test_writes_that_queue_meanwhile_go_in_batches_written_side_by_side() -> None:
    store = GatedStore()
    writer, tasks = writer_over(store)
    first = writer.add("u/0", {"n": 0})
    await store.until_active(1)
    assert store.batches == [{"u/0": {"n": 0}}]
    more = [writer.add(f"u/{n}", {"n": n}) for n in range(1, 1 + BATCH * RUNNERS + 50)]
    await store.until_active(RUNNERS)  # a batch per runner, the rest waits its turn
    assert not any(f.done() for f in [first, *more])
    store.gate.set()
    await asyncio.gather(first, *more, *tasks)
    assert store.most == RUNNERS
    assert all(len(batch) <= BATCH for batch in store.batches)
    written = [name for batch in store.batches for name in batch]
    assert sorted(written) == sorted(f"u/{n}" for n in range(1 + BATCH * RUNNERS + 50))


async def test_the_same_item_queued_twice_is_written_once_with_the_last_attributes() -> None:
    store = GatedStore()
    writer, tasks = writer_over(store)
    blocker = writer.add("u/first", {"n": 0})
    await store.until_active(1)
    once = writer.add("u/again", {"n": 1})
    twice = writer.add("u/again", {"n": 2})
    assert once is twice
    store.gate.set()
    await asyncio.gather(blocker, once, *tasks)
    assert store.batches[1:] == [{"u/again": {"n": 2}}]



async def test_items_of_an_account_that_is_gone_are_not_written() -> None:
    store = GatedStore()
    store.gate.set()
    writer, tasks = writer_over(store)
    kept, dropped = writer.add("u/1", {"n": 1}), writer.add("gone/2", {"n": 2})
    await asyncio.gather(kept, dropped, *tasks)
    assert store.batches == [{"u/1": {"n": 1}}]
    alone = writer.add("gone/3", {"n": 3})
    await asyncio.gather(alone, *tasks)
    assert store.batches == [{"u/1": {"n": 1}}]  # an empty batch is no call at all
