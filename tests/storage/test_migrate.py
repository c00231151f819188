"""storage.migrate: embedded (SQLite + folder) to cloud (DynamoDB on moto, S3 on
SeaweedFS, memcached ring in front), including resuming and cache invalidation."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from xmppd.storage.base import Item, Query
from xmppd.storage.config import (
    FilesBlobsConfig,
    NoCacheConfig,
    SQLiteItemsConfig,
    StorageConfig,
)
from xmppd.storage.devservices import LocalService
from xmppd.storage.factory import Storage, open_storage
from xmppd.storage.migrate import migrate

from .services import dynamodb_config, memcached_config, s3_config

pytestmark = pytest.mark.services

ROSTER = {f"contact{i:03d}@example.net": {"sub": "both", "n": i} for i in range(230)}
ACCOUNTS = {
    "alice": {"salt": b"\x00\xffsalt", "iterations": 4096, "name": "Alice ü"},
    "a b/..": {"odd": ""},
    "😀": {"b": b""},
}
BLOBS = {
    "alice@example.org/vcard": b"<vCard/>",
    "a//b": b"empty segment",
    "..": b"dots",
    "big": bytes(range(256)) * 40_000,  # ~10 MiB: a multipart upload on S3
    **{f"offline/{i:03d}": f"<message id='{i}'/>".encode() for i in range(120)},
}


def embedded(tmp: Path) -> StorageConfig:
    return StorageConfig(
        items=SQLiteItemsConfig(path=str(tmp / "items.sqlite3")),
        blobs=FilesBlobsConfig(path=str(tmp / "blobs"), max_blob_bytes=64 * 1024 * 1024),
        cache=NoCacheConfig(backend="none"),
    )


@pytest.fixture
def cloud(
    moto_service: LocalService,
    seaweedfs_service: LocalService,
    memcached_ring: list[LocalService],
) -> StorageConfig:
    """A fresh table and bucket, so the destination starts empty."""
    name = f"migrate-{uuid.uuid4().hex[:8]}"
    return StorageConfig(
        items=dynamodb_config(moto_service, table=name, create_table=True),
        blobs=s3_config(seaweedfs_service, bucket=name, create_bucket=True),
        cache=memcached_config(memcached_ring),
    )


async def fill(storage: Storage) -> None:
    await storage.items.batch_put("example.org/roster", ROSTER)
    await storage.items.batch_put("example.org/accounts", ACCOUNTS)
    await storage.items.put("example.net/accounts", "bob", {"v": 1})
    for key, data in BLOBS.items():
        await storage.blobs.put("example.org/files", key, data)
    await storage.blobs.put("example.net/vcard", "bob", b"<vCard>bob</vCard>")


EXPECTED = {
    "items:example.net/accounts": 1,
    "items:example.org/accounts": len(ACCOUNTS),
    "items:example.org/roster": len(ROSTER),
    "blobs:example.net/vcard": 1,
    "blobs:example.org/files": len(BLOBS),
}


async def read_items(storage: Storage, namespace: str) -> dict[str, Item]:
    found: dict[str, Item] = {}
    query = Query(limit=1000)
    while True:
        page = await storage.items.query(namespace, query)
        found.update((item.name, item) for item in page.items)
        if page.next_token is None:
            return found
        query.page_token = page.next_token


async def assert_copied(storage: Storage) -> None:
    roster = await read_items(storage, "example.org/roster")
    assert {name: item.attrs for name, item in roster.items()} == ROSTER
    accounts = await read_items(storage, "example.org/accounts")
    assert {name: item.attrs for name, item in accounts.items()} == ACCOUNTS
    assert await storage.items.get("example.net/accounts", "bob") == Item("bob", {"v": 1}, 1)
    for key, data in BLOBS.items():
        blob = await storage.blobs.get("example.org/files", key)
        assert blob is not None and blob.data == data, key
    assert (await storage.blobs.get("example.net/vcard", "bob")) is not None


async def test_migrate_embedded_to_cloud(tmp_path: Path, cloud: StorageConfig) -> None:
    src = embedded(tmp_path / "src")
    source = await open_storage(src, tmp_path)
    try:
        await fill(source)
    finally:
        await source.close()

    target = await open_storage(cloud, tmp_path)
    try:  # a server read "absent" before the migration: that must not stick in the cache
        assert await target.items.get("example.net/accounts", "bob") is None
        assert await target.blobs.get("example.net/vcard", "bob") is None
    finally:
        await target.close()

    calls: list[tuple[str, int, int | None]] = []
    counts = await migrate(src, tmp_path, cloud, tmp_path, lambda *args: calls.append(args))
    assert counts == EXPECTED
    roster_progress = [done for ns, done, _ in calls if ns == "example.org/roster"]
    assert len(roster_progress) >= 3 and roster_progress == sorted(roster_progress)
    assert roster_progress[-1] == len(ROSTER)

    target = await open_storage(cloud, tmp_path)
    try:
        await assert_copied(target)  # through the memcached ring: nothing stale
        # damage the copy a little, then run again: only the damage is repaired
        await target.items.put("example.org/roster", "contact000@example.net", {"sub": "none"})
        await target.items.delete("example.org/accounts", "alice")
        await target.blobs.delete("example.org/files", "..")
    finally:
        await target.close()

    assert await migrate(src, tmp_path, cloud, tmp_path) == EXPECTED
    target = await open_storage(cloud, tmp_path)
    try:
        await assert_copied(target)
        roster = await read_items(target, "example.org/roster")
        repaired = roster.pop("contact000@example.net")
        assert repaired.version == 3  # damaged (2), then repaired (3)
        assert {item.version for item in roster.values()} == {1}  # equal ones left alone
        assert (await target.items.get("example.org/accounts", "alice")) is not None
    finally:
        await target.close()


async def test_interrupted_migration_resumes(tmp_path: Path, cloud: StorageConfig) -> None:
    src = embedded(tmp_path / "src")
    source = await open_storage(src, tmp_path)
    try:
        await fill(source)
    finally:
        await source.close()

    class Interrupted(Exception):
        pass

    def stop_midway(namespace: str, done: int, total: int | None) -> None:
        if namespace == "example.org/roster" and done >= 100:
            raise Interrupted

    with pytest.raises(Interrupted):
        await migrate(src, tmp_path, cloud, tmp_path, stop_midway)
    assert await migrate(src, tmp_path, cloud, tmp_path) == EXPECTED
    target = await open_storage(cloud, tmp_path)
    try:
        await assert_copied(target)
        roster = await read_items(target, "example.org/roster")
        assert {item.version for item in roster.values()} == {1}  # nothing written twice
    finally:
        await target.close()
