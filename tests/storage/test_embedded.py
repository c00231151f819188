"""What the embedded backends promise beyond the shared contract: durability,
several processes on one file or folder, paths that stay inside the root."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import sqlite3
from pathlib import Path

import pytest

from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.backends.sqlite import HANDED_OVER, SQLiteItemBackend, prefix_upper_bound
from xmppd.storage.base import ConditionFailed, Item, NoStoreYet, StorageError

NS = "example.com/accounts"


async def test_sqlite_persists_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "items.sqlite3"
    backend = await SQLiteItemBackend.open(path)
    await backend.put(NS, "alice", {"key": b"\x00salted", "iterations": 4096})
    await backend.close()
    await backend.close()  # closing twice is harmless
    with pytest.raises(StorageError):
        await backend.get(NS, "alice")
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    again = await SQLiteItemBackend.open(path)
    try:
        assert await again.get(NS, "alice") == Item(
            "alice", {"key": b"\x00salted", "iterations": 4096}, 1
        )
    finally:
        await again.close()


async def test_sqlite_read_only_makes_nothing_and_reads_a_store_in_use(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "items.sqlite3"
    with pytest.raises(NoStoreYet, match="no store at"):
        await SQLiteItemBackend.open(path, read_only=True)
    assert not path.parent.exists()

    writer = await SQLiteItemBackend.open(path)  # a running server: its -wal is there
    await writer.put(NS, "alice", {"n": 1})
    reader = await SQLiteItemBackend.open(path, read_only=True)
    try:
        assert (await reader.get(NS, "alice")) == Item("alice", {"n": 1}, 1)
        with pytest.raises(StorageError, match="readonly"):
            await reader.put(NS, "bob", {"n": 2})
    finally:
        await reader.close()
        await writer.close()
    stopped = sorted(p.name for p in path.parent.iterdir())
    reader = await SQLiteItemBackend.open(path, read_only=True)  # the server stopped
    try:
        assert (await reader.get(NS, "alice")) == Item("alice", {"n": 1}, 1)
    finally:
        await reader.close()
    assert sorted(p.name for p in path.parent.iterdir()) == stopped == ["items.sqlite3"]


async def test_files_read_only_makes_nothing(tmp_path: Path) -> None:
    with pytest.raises(NoStoreYet, match="no store at"):
        await FileBlobBackend.open(tmp_path / "typo" / "blobs", read_only=True)
    assert os.listdir(tmp_path) == []


async def test_sqlite_refuses_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "items.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(StorageError, match="schema version 99"):
        await SQLiteItemBackend.open(path)


async def test_sqlite_two_processes_lose_no_update(tmp_path: Path) -> None:
    # two backends = two connections on two threads, as two worker processes would have
    path = tmp_path / "items.sqlite3"
    one, two = await SQLiteItemBackend.open(path), await SQLiteItemBackend.open(path)
    try:
        await one.put(NS, "counter", {"n": 0})

        async def increment(backend: SQLiteItemBackend) -> None:
            while True:
                item = await backend.get(NS, "counter")
                assert item is not None
                try:
                    await backend.put(
                        NS, "counter", {"n": int(item.attrs["n"]) + 1}, if_version=item.version
                    )
                    return
                except ConditionFailed:
                    await asyncio.sleep(0)

        await asyncio.gather(*(increment(b) for b in [one, two] * 10))
        final = await two.get(NS, "counter")
        assert final is not None and final.attrs["n"] == 20
    finally:
        await one.close()
        await two.close()


async def test_sqlite_bad_path_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        await SQLiteItemBackend.open(tmp_path / "file" / "items.sqlite3")
    (tmp_path / "junk.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError):
        await SQLiteItemBackend.open(tmp_path / "junk.sqlite3")


def test_prefix_upper_bound() -> None:
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\U0010ffff") is None
    assert prefix_upper_bound("a\ud7ff") == "a\ue000"


async def test_files_two_processes_lose_no_update(tmp_path: Path) -> None:
    # two backends do not share their in-process locks: only the lock file protects
    one = await FileBlobBackend.open(tmp_path / "blobs")
    two = await FileBlobBackend.open(tmp_path / "blobs")
    await one.put(NS, "counter", b"0")

    async def increment(backend: FileBlobBackend) -> None:
        while True:
            blob = await backend.get(NS, "counter")
            assert blob is not None
            try:
                value = str(int(blob.data) + 1).encode()
                await backend.put(NS, "counter", value, if_match=blob.etag)
                return
            except ConditionFailed:
                await asyncio.sleep(0)

    await asyncio.gather(*(increment(b) for b in [one, two] * 10))
    blob = await one.get(NS, "counter")
    assert blob is not None and blob.data == b"20"


async def test_files_stay_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "inner" / "blobs"
    backend = await FileBlobBackend.open(root)
    for key in ["../../escape", "..", "/abs", "a/../../b", "./x", "~/x", "x\\..\\..\\y"]:
        await backend.put("../" + NS, key, b"x")
        await backend.put("..", key, b"x")
    outside = [
        Path(dirpath) / name
        for dirpath, _, files in os.walk(tmp_path)
        for name in files
        if not Path(dirpath).is_relative_to(root)
    ]
    assert outside == []


async def test_files_leave_no_temporary_files_or_empty_dirs(tmp_path: Path) -> None:
    backend = await FileBlobBackend.open(tmp_path)
    await backend.put(NS, "alice@example.com/deep/er/1", b"x")
    await backend.put(NS, "alice@example.com/2", b"y")
    with pytest.raises(ConditionFailed):
        await backend.put(NS, "alice@example.com/2", b"z", if_none_match=True)
    names = [name for _, _, files in os.walk(tmp_path) for name in files]
    assert sorted(names) == [".lock", "1", "2"]
    await backend.delete(NS, "alice@example.com/deep/er/1")
    await backend.delete(NS, "alice@example.com/2")
    assert [d for d, _, _ in os.walk(tmp_path)] == [str(tmp_path), str(backend._namespace_dir(NS))]


async def test_files_ignore_foreign_files(tmp_path: Path) -> None:
    backend = await FileBlobBackend.open(tmp_path)
    await backend.put(NS, "k", b"x")
    ns_dir = backend._namespace_dir(NS)
    (ns_dir / "not%escaped").write_bytes(b"")
    (ns_dir / "ümlaut").write_bytes(b"")
    (ns_dir / ".tmp-left-over").write_bytes(b"")
    assert (await backend.list(NS)).keys == ["k"]


async def test_files_bad_root_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError):
        await FileBlobBackend.open(tmp_path / "file" / "blobs")


async def test_namespaces_for_migration(tmp_path: Path) -> None:
    sqlite = await SQLiteItemBackend.open(tmp_path / "db")
    memory_items = MemoryItemBackend()
    try:
        for items in (sqlite, memory_items):
            await items.put("b.example/roster", "x", {})
            await items.put("a.example/roster", "x", {})
            await items.put("c.example/gone", "x", {})
            await items.delete("c.example/gone", "x")
            assert await items.namespaces() == ["a.example/roster", "b.example/roster"]
    finally:
        await sqlite.close()
    for blobs in (await FileBlobBackend.open(tmp_path / "blobs"), MemoryBlobBackend()):
        await blobs.put("b.example/offline", "u/1", b"")
        await blobs.put("a.example/vcard", "u", b"")
        await blobs.put("c.example/gone", "x/y", b"")
        await blobs.delete("c.example/gone", "x/y")
        assert await blobs.namespaces() == ["a.example/vcard", "b.example/offline"]


async def test_two_backends_opening_one_new_file_at_once(tmp_path: Path) -> None:
    """Two nodes starting together on a fresh data_dir both get a working store."""
    for n in range(30):
        path = tmp_path / f"fresh{n}" / "items.sqlite3"
        a, b = SQLiteItemBackend(path), SQLiteItemBackend(path)
        try:
            assert await asyncio.gather(a.get("ns", "x"), b.get("ns", "x")) == [None, None]
        finally:
            await a.close()
            await b.close()


async def test_sqlite_hands_its_worker_a_few_calls_at_a_time(tmp_path: Path) -> None:
    """Calls beyond HANDED_OVER wait on the loop (one future each), not in the
    executor's queue with its futures, locks and closures (storage/turns.py)."""
    path = tmp_path / "items.sqlite3"
    backend = await SQLiteItemBackend.open(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # our writes now wait for this lock
        writes = [asyncio.create_task(backend.put(NS, f"u{n}", {"n": n})) for n in range(200)]
        await asyncio.sleep(0.2)
        queued = [
            f for f in gc.get_objects() if isinstance(f, concurrent.futures.Future) and not f.done()
        ]
        assert 1 <= len(queued) <= HANDED_OVER
        other.execute("COMMIT")
        await asyncio.gather(*writes)
        assert (await backend.get(NS, "u199")) == Item("u199", {"n": 199}, 1)
    finally:
        other.close()
        await backend.close()
