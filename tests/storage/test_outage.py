"""Cloud backends when their server hangs, dies and comes back.

A hung server (SIGSTOP: connections open, nothing answers) must end in a clear
StorageError bounded by the timeouts, not a hang; a dead one (connection
refused) likewise, quickly; nothing already stored may be damaged; and the same
backend object must work again once the server is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from xmppd.storage import devservices
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.s3 import S3BlobBackend
from xmppd.storage.base import Item, Query, StorageError
from xmppd.storage.devservices import LocalService

from .services import dynamodb_config, s3_config

pytestmark = pytest.mark.services

Factory = Callable[[Callable[[], LocalService]], LocalService]
TIMEOUT = 0.5
RETRIES = 1
# (retries + 1) attempts of one timeout each, plus jittered backoff, plus slack for a busy box
BOUND = (RETRIES + 1) * TIMEOUT + 1.5


async def fails_within(
    bound: float, call: Callable[[], Awaitable[Any]], backend: str, operation: str
) -> StorageError:
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        try:
            async with asyncio.timeout(bound * 3):  # a hang must fail the test, not stall it
                await call()
        except TimeoutError:
            pytest.fail(f"{backend} {operation} hung past {bound * 3:.0f}s")
    elapsed = time.monotonic() - started
    assert elapsed < bound, f"{operation} took {elapsed:.1f}s to fail"
    error = caught.value
    assert (error.backend, error.operation) == (backend, operation)
    assert str(error).startswith(f"{backend}: {operation} failed: ")
    return error


async def test_dynamodb_outage(service_factory: Factory) -> None:
    server = service_factory(devservices.moto_server)
    cfg = dynamodb_config(server, create_table=True, timeout=TIMEOUT, retries=RETRIES)
    items = await DynamoDBItemBackend.from_config(cfg)
    ns = "example.org/roster"
    try:
        await items.put(ns, "alice", {"v": 1})

        server.pause()  # hung: every call must end in a timeout-bounded StorageError
        try:
            error = await fails_within(BOUND, lambda: items.get(ns, "alice"), "dynamodb", "get")
            assert "timeout" in error.cause.lower() or "timed out" in error.cause.lower()
            await fails_within(BOUND, lambda: items.put(ns, "alice", {"v": 2}), "dynamodb", "put")
            await fails_within(BOUND, lambda: items.query(ns, Query()), "dynamodb", "query")
        finally:
            server.resume()

        await asyncio.sleep(0.5)  # let the server finish the writes it got while frozen
        # Back: the same backend works; the write that timed out was applied whole or
        # not at all, never half. The server may process it after waking, once per
        # attempt (an unconditional put retried: one version bump per attempt).
        item = await items.get(ns, "alice")
        assert item is not None
        assert item == Item("alice", {"v": 1}, 1) or (
            item.attrs == {"v": 2} and 2 <= item.version <= RETRIES + 2
        )
        latest = await items.put(ns, "alice", {"v": 3}, if_version=item.version)
        assert await items.get(ns, "alice") == latest

        server.kill()  # dead: connection refused, so no timeout to wait for
        error = await fails_within(BOUND, lambda: items.get(ns, "alice"), "dynamodb", "get")
        assert "connect" in error.cause.lower()

        server.start()  # moto keeps nothing on disk: the table comes back empty
        fresh = await DynamoDBItemBackend.from_config(cfg)
        await fresh.close()
        await items.put(ns, "bob", {"v": 1})
        assert await items.get(ns, "bob") == Item("bob", {"v": 1}, 1)
    finally:
        await items.close()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


async def test_s3_seaweedfs_outage(service_factory: Factory) -> None:
    server = service_factory(devservices.seaweedfs)
    cfg = s3_config(server, create_bucket=True, timeout=TIMEOUT, retries=RETRIES)
    blobs = await S3BlobBackend.from_config(cfg)
    ns = "example.org/offline"
    old, new = b"old" * 1000, b"new" * 1000
    try:
        await blobs.put(ns, "msg", old)
        await blobs.put(ns, "other", b"untouched")

        server.pause()
        try:
            error = await fails_within(BOUND, lambda: blobs.get(ns, "msg"), "s3", "get")
            assert "timeout" in error.cause.lower() or "timed out" in error.cause.lower()
            await fails_within(BOUND, lambda: blobs.put(ns, "msg", new), "s3", "put")
            await fails_within(BOUND, lambda: blobs.list(ns), "s3", "list")
            await fails_within(BOUND, lambda: blobs.delete(ns, "gone"), "s3", "head")
            url = await blobs.presign(ns, "msg", "GET")  # signing needs no server
            assert url is not None and url.startswith(cfg.endpoint_url or "")
        finally:
            server.resume()

        await asyncio.sleep(0.5)  # let the server finish the writes it got while frozen
        blob = await blobs.get(ns, "msg")
        assert blob is not None and blob.data in (old, new)  # whole, never a mix
        assert blob.etag == _md5(blob.data)
        await blobs.put(ns, "msg", new, if_match=blob.etag)

        server.kill()
        error = await fails_within(BOUND, lambda: blobs.get(ns, "msg"), "s3", "get")
        assert "connect" in error.cause.lower()

        server.start()  # same data directory: everything written before the crash is there
        for key, data in (("msg", new), ("other", b"untouched")):
            got = await blobs.get(ns, key)
            assert got is not None and got.data == data and got.etag == _md5(data)
        assert (await blobs.list(ns)).keys == ["msg", "other"]
    finally:
        await blobs.close()
