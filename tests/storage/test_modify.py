"""`ItemStore.modify` / `BlobStore.modify`: read-modify-write with one retry policy.

Run on the embedded backends (SQLite, folder; memory and the cached variants
too, through the conftest fixtures). Racing writers are made to really
interleave: a change that awaits a barrier holds every writer between its
read and its write until all have read, so all but one write must lose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from xmppd.storage import base
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    MAX_ITEM_BYTES,
    UNCHANGED,
    AttrValue,
    Blob,
    BlobBackend,
    BlobStore,
    ConditionFailed,
    Contended,
    Item,
    ItemBackend,
    ItemStore,
    TooLarge,
    WithWrites,
    backoff,
)


def item_store(backend: ItemBackend, ns: str) -> ItemStore:
    vhost, store = ns.split("/")
    return ItemStore(backend, vhost, store)


def blob_store(backend: BlobBackend, ns: str) -> BlobStore:
    vhost, store = ns.split("/")
    return BlobStore(backend, vhost, store)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays modify asked for (each still a real, jittered sleep)."""
    asked: list[float] = []

    def recording(attempt: int) -> float:
        delay = backoff(attempt)
        asked.append(delay)
        return delay

    monkeypatch.setattr(base, "backoff", recording)
    return asked


class Gate:
    """Holds the first call of each racer after its read until `racers` have read."""

    def __init__(self, racers: int) -> None:
        self.barrier = asyncio.Barrier(racers)
        self.calls = 0

    async def first_read_done(self, seen: set[int], racer: int) -> None:
        self.calls += 1
        if racer not in seen:
            seen.add(racer)
            await asyncio.wait_for(self.barrier.wait(), 10)


def add_attr(gate: Gate, racer: int) -> Callable[[Item | None], Awaitable[dict[str, AttrValue]]]:
    """A change adding attribute "r<racer>" to whatever is stored, after the gate."""
    seen: set[int] = set()

    async def change(current: Item | None) -> dict[str, AttrValue]:
        await gate.first_read_done(seen, racer)
        return {**(current.attrs if current else {}), f"r{racer}": racer}

    return change


# --- items -------------------------------------------------------------------------------------


@pytest.mark.parametrize("existing", [False, True], ids=["absent", "present"])
async def test_racing_item_writers_all_land(
    item_backend: ItemBackend, ns: str, sleeps: list[float], existing: bool
) -> None:
    store = item_store(item_backend, ns)
    if existing:
        await store.put("k", {"old": 1})
    gate = Gate(3)
    results = await asyncio.gather(*(store.modify("k", add_attr(gate, r)) for r in range(3)))
    item = await store.get("k")
    assert item is not None
    assert item.attrs == {**({"old": 1} if existing else {}), "r0": 0, "r1": 1, "r2": 2}
    # All three read the same state, so two lost at least once; each loss is one
    # backoff and one more call of the change.
    assert gate.calls >= 5
    assert len(sleeps) == gate.calls - 3
    assert all(r.written for r in results)
    assert max(r.after.version for r in results if r.after) == item.version


async def test_two_nodes_on_one_sqlite_file_lose_nothing(tmp_path: Path) -> None:
    """Two backends on one file are two nodes: each increments a shared counter 15 times."""
    nodes = [await SQLiteItemBackend.open(tmp_path / "items.db") for _ in range(2)]
    try:
        stores = [ItemStore(node, "example.com", "counters") for node in nodes]
        calls = 0

        async def increment(current: Item | None) -> dict[str, int]:
            nonlocal calls
            calls += 1
            await asyncio.sleep(0)  # another writer may go between this read and the write
            n = current.attrs["n"] if current else 0
            assert isinstance(n, int)
            return {"n": n + 1}

        async def writer(store: ItemStore) -> None:
            for _ in range(15):
                await store.modify("counter", increment, tries=30)

        await asyncio.gather(*(writer(s) for s in stores for _ in range(2)))
        item = await stores[0].get("counter")
        assert item is not None and item.attrs == {"n": 60}
        assert calls > 60  # the writers really collided
    finally:
        for node in nodes:
            await node.close()


async def test_change_that_raises_writes_nothing(item_backend: ItemBackend, ns: str) -> None:
    store = item_store(item_backend, ns)
    stored = await store.put("k", {"v": 1})

    class Refused(Exception):
        pass

    def refuse(current: Item | None) -> dict[str, int]:
        raise Refused

    with pytest.raises(Refused):
        await store.modify("k", refuse)
    with pytest.raises(Refused):
        await store.modify("absent", refuse)
    assert await store.get("k") == stored
    assert await store.get("absent") is None


async def test_exhaustion_raises_contended(
    item_backend: ItemBackend, ns: str, sleeps: list[float]
) -> None:
    """Another writer changes the item between every read and write: every try loses."""
    store = item_store(item_backend, ns)
    await store.put("hot", {"n": 0})
    calls = 0

    async def overtaken(current: Item | None) -> dict[str, int]:
        nonlocal calls
        calls += 1
        await store.put("hot", {"n": -calls})  # the rival's unconditional write
        return {"n": 1}

    with pytest.raises(Contended) as info:
        await store.modify("hot", overtaken, tries=4, what="counter")
    assert isinstance(info.value, ConditionFailed)  # callers' existing handlers still apply
    assert (info.value.namespace, info.value.key, info.value.tries) == (ns, "hot", 4)
    assert str(info.value) == f"counter {ns}/hot: another writer won all 4 tries"
    assert calls == 4
    assert len(sleeps) == 3
    item = await store.get("hot")
    assert item is not None and item.attrs == {"n": -4}  # none of modify's writes landed


async def test_unchanged_and_delete(item_backend: ItemBackend, ns: str) -> None:
    store = item_store(item_backend, ns)
    stored = await store.put("k", {"v": 1})
    kept = await store.modify("k", lambda current: UNCHANGED)
    assert (kept.before, kept.after, kept.written) == (stored, stored, False)
    assert await store.get("k") == stored

    gone = await store.modify("k", lambda current: None)
    assert (gone.before, gone.after, gone.written) == (stored, None, True)
    assert await store.get("k") is None
    nothing = await store.modify("k", lambda current: None)  # absent stays absent, no write
    assert (nothing.before, nothing.after, nothing.written) == (None, None, False)


async def test_returns_what_was_read_and_written(item_backend: ItemBackend, ns: str) -> None:
    store = item_store(item_backend, ns)
    created = await store.modify("k", lambda current: {"v": 1})
    assert created.before is None and created.after == await store.get("k")
    changed = await store.modify("k", lambda current: {"v": 2})
    assert changed.before == created.after
    assert changed.after is not None and changed.after.attrs == {"v": 2}
    assert changed.after == await store.get("k")


async def test_too_large_propagates_without_retry(
    item_backend: ItemBackend, ns: str, sleeps: list[float]
) -> None:
    store = item_store(item_backend, ns)
    with pytest.raises(TooLarge):
        await store.modify("k", lambda current: {"v": b"x" * MAX_ITEM_BYTES})
    assert sleeps == []
    assert await store.get("k") is None


async def test_with_writes_commit_together_and_retry_on_their_conditions(
    item_backend: ItemBackend, ns: str, sleeps: list[float]
) -> None:
    """A counter and a log entry written as one (offline messages' append); the
    entry's own condition failing is a lost race like the counter's."""
    store = item_store(item_backend, ns)

    def append(current: Item | None) -> WithWrites:
        n = current.attrs["next"] if current else 0
        assert isinstance(n, int)
        entry = store.put_op(f"log/{n}", {"entry": n}, if_absent=True)
        return WithWrites({"next": n + 1}, [entry])

    await store.put("log/0", {"entry": "a rival's"})  # its counter not visible yet
    with pytest.raises(Contended):
        await store.modify("counter", append, tries=1)
    assert await store.get("counter") is None  # the counter's write failed with the entry's
    await store.put("counter", {"next": 1})  # the rival's counter shows up
    done = await store.modify("counter", append)
    assert done.written and done.after is None  # transactions report no version
    assert (await store.get("counter")).attrs == {"next": 2}  # type: ignore[union-attr]
    assert (await store.get("log/1")).attrs == {"entry": 1}  # type: ignore[union-attr]


async def test_with_writes_on_an_absent_item_makes_only_the_other_writes(
    item_backend: ItemBackend, ns: str
) -> None:
    store = item_store(item_backend, ns)
    entry = await store.put("log/0", {"entry": 0})
    done = await store.modify(
        "counter", lambda current: WithWrites(None, [store.delete_op("log/0", if_version=1)])
    )
    assert done.written and entry.version == 1
    assert await store.get("log/0") is None and await store.get("counter") is None
    nothing = await store.modify("counter", lambda current: WithWrites(None, []))
    assert not nothing.written


async def test_tries_must_be_positive(item_backend: ItemBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await item_store(item_backend, ns).modify("k", lambda current: {}, tries=0)


# --- blobs -------------------------------------------------------------------------------------


def append_line(gate: Gate, racer: int) -> Callable[[Blob | None], Awaitable[bytes]]:
    seen: set[int] = set()

    async def change(current: Blob | None) -> bytes:
        await gate.first_read_done(seen, racer)
        return (current.data if current else b"") + f"{racer}\n".encode()

    return change


@pytest.mark.parametrize("existing", [False, True], ids=["absent", "present"])
async def test_racing_blob_writers_all_land(
    blob_backend: BlobBackend, ns: str, sleeps: list[float], existing: bool
) -> None:
    store = blob_store(blob_backend, ns)
    if existing:
        await store.put("k", b"old\n")
    gate = Gate(3)
    await asyncio.gather(*(store.modify("k", append_line(gate, r)) for r in range(3)))
    blob = await store.get("k")
    assert blob is not None
    lines = blob.data.decode().split()
    assert lines[: int(existing)] == (["old"] if existing else [])
    assert sorted(lines[int(existing) :]) == ["0", "1", "2"]
    assert gate.calls >= 5
    assert len(sleeps) == gate.calls - 3


async def test_blob_change_that_raises_writes_nothing(blob_backend: BlobBackend, ns: str) -> None:
    store = blob_store(blob_backend, ns)
    etag = await store.put("k", b"v1")

    def refuse(current: Blob | None) -> bytes:
        raise KeyError("refused")

    with pytest.raises(KeyError):
        await store.modify("k", refuse)
    assert await store.get("k") == Blob("k", b"v1", etag)


async def test_blob_exhaustion_raises_contended(
    blob_backend: BlobBackend, ns: str, sleeps: list[float]
) -> None:
    store = blob_store(blob_backend, ns)
    await store.put("hot", b"0")
    calls = 0

    async def overtaken(current: Blob | None) -> bytes:
        nonlocal calls
        calls += 1
        await store.put("hot", f"rival {calls}".encode())
        return b"mine"

    with pytest.raises(Contended) as info:
        await store.modify("hot", overtaken, tries=3)
    assert (info.value.namespace, info.value.key, info.value.tries) == (ns, "hot", 3)
    assert calls == 3 and len(sleeps) == 2
    assert (await store.get("hot")).data == b"rival 3"  # type: ignore[union-attr]


async def test_blob_unchanged_write_and_delete(blob_backend: BlobBackend, ns: str) -> None:
    store = blob_store(blob_backend, ns)
    created = await store.modify("k", lambda current: b"v1")
    assert created.before is None and created.after == await store.get("k")
    kept = await store.modify("k", lambda current: UNCHANGED)
    assert not kept.written and kept.after == created.after
    gone = await store.modify("k", lambda current: None)
    assert gone.written and gone.before == created.after and gone.after is None
    assert await store.get("k") is None
    assert not (await store.modify("k", lambda current: None)).written


# --- the backoff policy ------------------------------------------------------------------------


def test_backoff_is_jittered_exponential_and_capped() -> None:
    for attempt in range(12):
        window = min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt)
        delays = [backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= window for d in delays)
        assert len(set(delays)) > 100  # jittered, not a fixed step
        assert max(delays) > window / 2
