"""The AWS backends' calls run on the AWS I/O loop (storage/backends/_aws.py), not on
the loop that asks: botocore's CPU work must not make the serving loop lag.

What must hold: every request is built, signed and sent on the I/O thread;
cancelling the asking task abandons the request there; backends opened from
different loops share the one thread and leave nothing running or connected on
it once closed. (How much the serving loop gains is a benchmark's question,
bench/storage_bench.py, not a test's: CPU shares measured inside the whole
suite depended on what the collector had to walk.)"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import types
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import aiohttp
import pytest

from xmppd.storage.backends._aws import (
    IO_THREAD_NAME,
    AwsCaller,
    ClientSettings,
    on_io_loop,
    open_client,
)
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.s3 import MULTIPART_THRESHOLD, S3BlobBackend
from xmppd.storage.base import Query
from xmppd.storage.devservices import HOST, LocalService

from .services import dynamodb, s3_config


async def io_loop_state() -> tuple[int, int]:
    """Tasks (other than this probe) and open aiohttp connectors on the I/O loop."""

    async def probe() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        connectors = [
            obj
            for obj in _live(aiohttp.BaseConnector)
            if not obj.closed and getattr(obj, "_loop", None) is loop
        ]
        return len(tasks), len(connectors)

    return await on_io_loop(probe())


def _live(kind: type) -> list[Any]:
    return [obj for obj in gc.get_objects() if isinstance(obj, kind)]


async def settled(expected: tuple[int, int]) -> tuple[int, int]:
    """The I/O loop's state once it stops changing toward `expected` (cleanup there
    finishes a moment after the asking side has its answer)."""
    state = await io_loop_state()
    for _ in range(50):
        if state == expected:
            break
        await asyncio.sleep(0.02)
        state = await io_loop_state()
    return state


def record_threads(client: Any) -> list[str]:
    """Names of the threads that sign each request the client sends."""
    seen: list[str] = []

    def before_sign(**_: Any) -> None:
        seen.append(threading.current_thread().name)

    client.raw.meta.events.register("before-sign", before_sign)
    return seen


async def test_dynamodb_requests_are_made_on_the_io_thread(moto_service: LocalService) -> None:
    ns = f"io{uuid.uuid4().hex[:8]}.example/store"
    async with dynamodb(moto_service) as items:
        seen = record_threads(items._client)
        await items.put(ns, "a", {"v": 1})
        assert (await items.get(ns, "a")) is not None
        assert len((await items.query(ns, Query())).items) == 1
        assert sorted(await items.batch_get(ns, ["a", "b"])) == ["a"]
    assert len(seen) == 4 and set(seen) == {IO_THREAD_NAME}
    assert threading.current_thread().name != IO_THREAD_NAME


async def test_s3_requests_and_presigning_are_done_on_the_io_thread(
    seaweedfs_service: LocalService,
) -> None:
    ns = f"io{uuid.uuid4().hex[:8]}.example/files"
    blobs = await S3BlobBackend.from_config(s3_config(seaweedfs_service))
    try:
        seen = record_threads(blobs._client)
        await blobs.put(ns, "k", b"data")
        blob = await blobs.get(ns, "k")  # the streaming body is read there too
        assert blob is not None and blob.data == b"data"
        assert await blobs.presign(ns, "k", "GET") is not None
        assert (await blobs.list(ns)).keys == ["k"]
    finally:
        await blobs.close()
    assert len(seen) == 4 and set(seen) == {IO_THREAD_NAME}


async def test_cancelling_the_caller_cancels_the_work_on_the_io_loop() -> None:
    started, cancelled = threading.Event(), threading.Event()
    where: list[str] = []

    async def forever() -> None:
        where.append(threading.current_thread().name)
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.create_task(on_io_loop(forever()))
    assert await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(cancelled.wait, 5)
    assert where == [IO_THREAD_NAME]


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[tuple[int, asyncio.Event, asyncio.Event]]:
    """An HTTP endpoint that reads requests and never answers. Yields its port, an
    event set when a request arrives and one set when the client hangs up."""
    arrived, hung_up = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        arrived.set()
        await reader.read()  # until EOF: the client closed the connection
        hung_up.set()
        writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1], arrived, hung_up
    finally:
        server.close()


@contextlib.asynccontextmanager
async def five_stalled_calls(
    arrived: asyncio.Event, call: Callable[[], Coroutine[Any, Any, Any]]
) -> AsyncIterator[None]:
    """Five calls to a black hole whose pool takes two: the body runs once the first
    request has arrived and the rest have had time to go as far as they can; the
    calls are cancelled afterwards."""
    calls = [asyncio.create_task(call()) for _ in range(5)]
    try:
        await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.sleep(0.3)
        yield
    finally:
        for task in calls:
            task.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def black_hole_settings(port: int, connections: int = 4) -> ClientSettings:
    return ClientSettings(
        region="us-east-1",
        endpoint_url=f"http://{HOST}:{port}",
        access_key_id="testing",
        secret_access_key="testing",
        max_pool_connections=connections,
        connect_timeout=30,
        read_timeout=30,
        max_attempts=1,
    )


async def test_a_cancelled_request_is_abandoned_on_the_io_loop() -> None:
    """The HTTP request itself is given up (its connection closed) while the client
    stays open: the cancellation reached the task on the I/O loop."""
    before = await settled((0, 0))
    async with black_hole() as (port, arrived, hung_up):
        client = await open_client("dynamodb", black_hole_settings(port))
        try:
            task = asyncio.create_task(client.describe_table(TableName="t"))
            await asyncio.wait_for(arrived.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(hung_up.wait(), 5)
            assert await settled((0, before[1] + 1)) == (0, before[1] + 1)  # client still open
        finally:
            await client.close()
    assert await settled(before) == before


async def test_calls_beyond_the_pool_wait_before_their_request_is_built() -> None:
    """Requests are signed only when a connection can take them: queued calls hold
    no built request and are not even handed to the I/O loop (see AwsClient)."""
    async with black_hole() as (port, arrived, _):
        client = await open_client("dynamodb", black_hole_settings(port, connections=2))
        try:
            signed = record_threads(client)
            async with five_stalled_calls(arrived, lambda: client.describe_table(TableName="t")):
                assert len(signed) == 2
                tasks_on_io_loop, _ = await io_loop_state()
                assert tasks_on_io_loop == 2
        finally:
            await client.close()


async def test_backends_from_many_loops_share_one_io_thread_and_leave_nothing(
    moto_service: LocalService,
) -> None:
    before = await settled((0, 0))
    ns = f"io{uuid.uuid4().hex[:8]}.example/store"

    async def use(name: str) -> str:
        async with dynamodb(moto_service) as items:
            await items.put(ns, name, {"loop": name})
            return (await items.get(ns, name)).attrs["loop"]  # type: ignore[union-attr,return-value]

    def in_own_loop(name: str) -> Callable[[], str]:
        return lambda: asyncio.run(use(name))

    with ThreadPoolExecutor(max_workers=2) as pool:
        others = [pool.submit(in_own_loop(f"loop{n}")) for n in range(2)]
        here = await use("test-loop")
        results = [await asyncio.wrap_future(f) for f in others]
    assert [here, *results] == ["test-loop", "loop0", "loop1"]
    assert [t.name for t in threading.enumerate()].count(IO_THREAD_NAME) == 1
    assert await settled(before) == before


async def test_a_caller_loop_gone_before_the_answer_leaves_the_io_loop_well(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tool's asyncio.run() may end while its call still runs on the I/O loop: the
    answer has nowhere to go, and the I/O loop must neither log errors nor stop."""
    finishing = threading.Event()

    async def outlives_its_caller() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)  # winding down after the caller's loop has closed
            finishing.set()
            raise ValueError("an answer nobody waits for") from None
        return "unreachable"

    async def caller() -> None:
        asyncio.create_task(on_io_loop(outlives_its_caller()))
        await asyncio.sleep(0.1)  # asyncio.run then cancels the call and closes the loop

    with caplog.at_level("ERROR"):
        await asyncio.to_thread(asyncio.run, caller())
        assert await asyncio.to_thread(finishing.wait, 5)

        async def still_serving() -> str:
            return threading.current_thread().name

        assert await on_io_loop(still_serving()) == IO_THREAD_NAME
        await asyncio.sleep(0.1)
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_admitted_calls_wait_before_the_backend_method_runs() -> None:
    """A backend call beyond the pool waits at the door (see `admitted`), holding its
    arguments only: the method body, its request dicts and the layers below do not
    exist yet."""
    async with black_hole() as (port, arrived, _):
        client = await open_client("dynamodb", black_hole_settings(port, connections=2))
        items = DynamoDBItemBackend(client, "t", AwsCaller("dynamodb", "black hole", 1))
        try:
            async with five_stalled_calls(arrived, lambda: items.get("n/s", "k")):
                body = DynamoDBItemBackend.get.__wrapped__.__code__  # type: ignore[attr-defined]
                coroutines = [c for c in gc.get_objects() if isinstance(c, types.CoroutineType)]
                running = [c for c in coroutines if c.cr_code is body]
                assert len(running) == 2
        finally:
            await client.close()


async def test_operations_of_several_calls_work_with_one_connection(
    moto_service: LocalService, seaweedfs_service: LocalService
) -> None:
    """An admitted operation that makes several calls (batch writes, paged queries,
    multipart uploads) takes per-call turns apart from its admission: with a pool
    of one it still finishes instead of waiting for itself."""
    ns = f"io{uuid.uuid4().hex[:8]}.example/store"
    async with asyncio.timeout(60):
        async with dynamodb(moto_service, max_connections=1) as items:
            await items.batch_put(ns, {f"k{n}": {"n": n} for n in range(12)})
            assert len(await items.batch_get(ns, [f"k{n}" for n in range(12)])) == 12
            assert len((await items.query(ns, Query(limit=5))).items) == 5
        blobs = await S3BlobBackend.from_config(
            s3_config(seaweedfs_service, max_connections=1, max_blob_bytes=32 * 1024 * 1024)
        )
        try:
            big = bytes(range(256)) * (MULTIPART_THRESHOLD // 256 + 4096)  # 2 parts at once
            etag = await blobs.put(ns, "big", big)
            assert etag.endswith("-2")
            assert (await blobs.get(ns, "big")).data == big  # type: ignore[union-attr]
        finally:
            await blobs.close()
