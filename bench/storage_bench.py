"""Storage benchmark: every backend, with and without the memcached ring.

usage: python bench/storage_bench.py [--ops N] [--concurrency C] [--out DIR] [--no-pin]

Starts its own servers on 127.0.0.1 (memcached x3, moto, SeaweedFS: the same
launchers the tests use, xmppd.storage.devservices) and runs on uvloop, the
server's loop. Three parts:

1. Throughput and latency: N writes, then N reads of the same keys, C at a
   time, per backend (items: sqlite, dynamodb-moto; blobs: files,
   s3-seaweedfs), bare and behind the ring. Reads of written keys are hot: behind
   the ring, the first read of a key fills the cache and later ones hit.
2. Hot read: one 1 KiB blob read 500 times in a row, straight from S3 and
   through the ring. Target: the ring at least 5x faster (median latency).
3. Event-loop lag with 1,000 operations kept in flight (1,000 clients, each
   starting its next op when the last ends; 10% writes) over the ring, for
   the SQLite and the DynamoDB item stores. Target: worst lag under 10 ms.
   As in bench/harness (server on one core, load on the other), this process
   runs on CPU 0 and the servers it talks to on CPU 1 (--no-pin to let them
   share): moto is a Python program that burns a core of its own, and sharing
   cores with it put the bench process off the CPU for half of its longest
   ticks. The CPU the loop's own thread used between two ticks, its own share
   of the lag, is printed beside it (thread CPU: the AWS backends' calls run on
   their own thread, see storage/backends/_aws.py), and so is the whole
   process's. Long-lived objects are frozen out of the collector first
   (gc.freeze), as a server does once started; the figures without that are
   printed too.

moto serialises requests (see devservices.serve_moto) and is a fake written
in Python: its numbers say little about DynamoDB and much about our client.
Prints tables; writes JSON and Markdown to --out (default bench/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import uvloop

from xmppd.storage import devservices
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.backends.s3 import S3BlobBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import BlobBackend, ItemBackend
from xmppd.storage.cache import CachedBlobBackend, CachedItemBackend
from xmppd.storage.config import DynamoDBItemsConfig, S3BlobsConfig
from xmppd.storage.memcached import MemcachedCache

NS = "bench.example/store"
BLOB = bytes(range(256)) * 4  # 1 KiB
ATTRS: dict[str, str | int | bytes] = {"jid": "someone@bench.example", "sub": "both", "n": 1}


@dataclass
class Row:
    backend: str
    cache: str
    op: str
    ops: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float


class Services:
    """The servers of one bench run, stopped and removed at the end."""

    def __init__(self) -> None:
        self.ring = [devservices.memcached().start() for _ in range(3)]
        self.moto = devservices.moto_server().start()
        self.seaweedfs = devservices.seaweedfs().start()
        self.tmp = Path(tempfile.mkdtemp(prefix="xmppd-storage-bench-"))

    def pin(self) -> bool:
        """Servers on CPU 1, this process on CPU 0; False where there is one CPU."""
        if len(os.sched_getaffinity(0)) < 2:
            return False
        for service in [*self.ring, self.moto, self.seaweedfs]:
            assert service.proc is not None
            os.sched_setaffinity(service.proc.pid, {1})
        os.sched_setaffinity(0, {0})
        return True

    def close(self) -> None:
        for service in [*self.ring, self.moto, self.seaweedfs]:
            devservices.cleanup(service)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def ring_servers(self) -> list[str]:
        return [f"{devservices.HOST}:{node.port}" for node in self.ring]

    def dynamodb(self) -> DynamoDBItemsConfig:
        return DynamoDBItemsConfig(
            backend="dynamodb",
            table="bench",
            endpoint_url=devservices.moto_endpoint(self.moto),
            access_key_id="bench",
            secret_access_key="bench",
            create_table=True,
        )

    def s3(self) -> S3BlobsConfig:
        return S3BlobsConfig(
            backend="s3",
            bucket="bench",
            endpoint_url=devservices.s3_endpoint(self.seaweedfs),
            access_key_id=devservices.S3_ACCESS_KEY,
            secret_access_key=devservices.S3_SECRET_KEY,
            create_bucket=True,
        )


@contextlib.asynccontextmanager
async def item_backend(services: Services, name: str, cached: bool) -> AsyncIterator[ItemBackend]:
    backend: ItemBackend
    if name == "sqlite":
        backend = await SQLiteItemBackend.open(services.tmp / f"items-{time.monotonic_ns()}.db")
    else:
        backend = await DynamoDBItemBackend.from_config(services.dynamodb())
    ring = MemcachedCache(services.ring_servers()) if cached else None
    try:
        yield CachedItemBackend(backend, ring, ttl=300) if ring else backend
    finally:
        await backend.close()
        if ring:
            await ring.close()


@contextlib.asynccontextmanager
async def blob_backend(services: Services, name: str, cached: bool) -> AsyncIterator[BlobBackend]:
    backend: BlobBackend
    if name == "files":
        backend = await FileBlobBackend.open(services.tmp / f"blobs-{time.monotonic_ns()}")
    else:
        backend = await S3BlobBackend.from_config(services.s3())
    ring = MemcachedCache(services.ring_servers()) if cached else None
    try:
        yield CachedBlobBackend(backend, ring, ttl=300) if ring else backend
    finally:
        await backend.close()
        if ring:
            await ring.close()


async def timed(
    label: tuple[str, str, str], count: int, concurrency: int, op: Callable[[int], Awaitable[Any]]
) -> Row:
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(n: int) -> None:
        async with gate:
            started = time.perf_counter()
            await op(n)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(count)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return Row(
        *label,
        ops=count,
        ops_per_s=count / elapsed,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
    )


async def measure(
    name: str, cached: bool, backend: ItemBackend | BlobBackend, ops: int, concurrency: int
) -> list[Row]:
    """Puts of fresh keys, then gets of 100 keys written beforehand straight to the store
    (not through the cache: a write leaves a short tombstone in the ring, and reads
    right after a write are misses by design). Behind the ring the first get of each
    key fills it and the rest hit."""
    cache = "memcached" if cached else "none"
    prefix = f"{time.monotonic_ns()}-"
    store = getattr(backend, "backend", backend)

    async def put(n: int) -> object:
        if isinstance(backend, ItemBackend):
            return await backend.put(NS, f"{prefix}w{n}", ATTRS)
        return await backend.put(NS, f"{prefix}w{n}", BLOB)

    async def get(n: int) -> object:
        return await backend.get(NS, f"{prefix}r{n % 100}")

    for n in range(100):
        if isinstance(store, ItemBackend):
            await store.put(NS, f"{prefix}r{n}", ATTRS)
        else:
            await store.put(NS, f"{prefix}r{n}", BLOB)
    return [
        await timed((name, cache, "put"), ops, concurrency, put),
        await timed((name, cache, "get"), ops, concurrency, get),
    ]


async def throughput(services: Services, ops: int, concurrency: int) -> list[Row]:
    rows: list[Row] = []
    for cached in (False, True):
        async with item_backend(services, "sqlite", cached) as items:
            rows += await measure("sqlite", cached, items, ops, concurrency)
        async with item_backend(services, "dynamodb", cached) as items:
            rows += await measure("dynamodb-moto", cached, items, ops, concurrency)
        async with blob_backend(services, "files", cached) as blobs:
            rows += await measure("files", cached, blobs, ops, concurrency)
        async with blob_backend(services, "s3", cached) as blobs:
            rows += await measure("s3-seaweedfs", cached, blobs, ops, concurrency)
    rows.sort(key=lambda r: (r.backend, r.op, r.cache))
    return rows


async def hot_read(services: Services, reads: int = 500) -> dict[str, float]:
    """Median latency of reading one 1 KiB blob again and again, one read at a time."""
    result: dict[str, float] = {}
    for cached in (False, True):
        async with blob_backend(services, "s3", cached) as blobs:
            await getattr(blobs, "backend", blobs).put(NS, "hot", BLOB)  # no tombstone
            await blobs.get(NS, "hot")  # fills the ring
            samples = []
            for _ in range(reads):
                started = time.perf_counter()
                blob = await blobs.get(NS, "hot")
                samples.append(time.perf_counter() - started)
                assert blob is not None and blob.data == BLOB
            result["memcached" if cached else "s3"] = statistics.median(samples) * 1000
    result["speedup"] = result["s3"] / result["memcached"]
    return result


async def loop_lag(services: Services, store: str, freeze: bool) -> dict[str, float]:
    """Worst and p99 loop lag while 1,000 cache+store operations stay in flight."""
    lags: list[float] = []
    cpu: list[float] = []  # the loop thread's CPU between ticks: its share of the lag
    process_cpu: list[float] = []  # every thread's, the AWS I/O thread's included
    stop = asyncio.Event()
    measuring = False
    ops = 0

    async def ticker() -> None:
        while not stop.is_set():
            before, counted = time.perf_counter(), measuring
            cpu_before, process_before = time.thread_time(), time.process_time()
            await asyncio.sleep(0.001)
            if counted and measuring:
                lags.append(time.perf_counter() - before - 0.001)
                cpu.append(time.thread_time() - cpu_before)
                process_cpu.append(time.process_time() - process_before)

    async with item_backend(services, store, cached=True) as items:
        keys = [f"user{i}" for i in range(1000)]
        await getattr(items, "backend", items).batch_put(NS, {key: ATTRS for key in keys})
        for start in range(0, len(keys), 100):  # a warm cache, whichever variant runs first
            await asyncio.gather(*(items.get(NS, key) for key in keys[start : start + 100]))

        async def client(n: int) -> None:
            nonlocal ops
            step = 0
            while not stop.is_set():
                key = keys[(n + 37 * step) % len(keys)]
                if (n + step) % 10 == 0:
                    await items.put(NS, key, ATTRS)
                else:
                    await items.get(NS, key)
                if measuring:
                    ops += 1
                step += 1

        tasks = [asyncio.create_task(ticker())]
        for n in range(1000):
            tasks.append(asyncio.create_task(client(n)))
            if n % 50 == 49:
                await asyncio.sleep(0)  # start the clients over a few loop turns
        await asyncio.sleep(0.2)
        if freeze:
            gc.freeze()
        measuring = True
        started = time.perf_counter()
        await asyncio.sleep(2.0)
        measuring = False
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*tasks)
        if freeze:
            gc.unfreeze()
    lags.sort()
    return {
        "worst_ms": lags[-1] * 1000,
        "p99_ms": lags[int(len(lags) * 0.99)] * 1000,
        "cpu_worst_ms": max(cpu) * 1000,
        "process_cpu_worst_ms": max(process_cpu) * 1000,
        "ops_per_s": ops / elapsed,
    }


def idle_lag(seconds: float = 2.0) -> float:
    """The machine's own noise: worst lag of an idle loop (ms)."""

    async def run() -> float:
        worst = 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            worst = max(worst, time.perf_counter() - before - 0.001)
        return worst * 1000

    return uvloop.run(run())


def table(rows: list[Row]) -> str:
    lines = [
        "| backend | cache | op | ops/s | p50 ms | p99 ms |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.backend} | {r.cache} | {r.op} | {r.ops_per_s:,.0f} |"
            f" {r.p50_ms:.2f} | {r.p99_ms:.2f} |"
        )
    return "\n".join(lines)


async def run(args: argparse.Namespace, services: Services) -> dict[str, Any]:
    rows = await throughput(services, args.ops, args.concurrency)
    hot = await hot_read(services)
    lag = {
        f"{store}+memcached{'' if freeze else ' (no gc.freeze)'}": await loop_lag(
            services, store, freeze
        )
        for store in ("sqlite", "dynamodb")
        for freeze in (True, False)
    }
    return {"rows": [asdict(r) for r in rows], "hot_read": hot, "loop_lag": lag}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=1000, help="writes and reads per backend")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the servers share this process's CPU"
    )
    args = parser.parse_args()

    services = Services()
    try:
        pinned = not args.no_pin and services.pin()
        noise = idle_lag()
        result = uvloop.run(run(args, services))
    finally:
        services.close()
    result["idle_loop_worst_lag_ms"] = noise
    result["pinned"] = pinned
    result["machine"] = {"python": sys.version.split()[0], "platform": platform.platform()}

    hot, lag = result["hot_read"], result["loop_lag"]
    report = [
        f"# Storage bench ({args.ops} ops per backend, concurrency {args.concurrency})",
        "",
        table([Row(**r) for r in result["rows"]]),
        "",
        f"Hot 1 KiB blob read, median: S3 (SeaweedFS) {hot['s3']:.3f} ms, through memcached"
        f" {hot['memcached']:.3f} ms: {hot['speedup']:.1f}x"
        f" ({'meets' if hot['speedup'] >= 5 else 'MISSES'} the 5x target)",
        "",
        "Event-loop lag, 1,000 operations in flight (10% writes):",
        "",
        "| store | worst ms | p99 ms | CPU per tick, worst ms: loop thread | process | ops/s |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {v['worst_ms']:.1f} | {v['p99_ms']:.1f} | {v['cpu_worst_ms']:.1f} |"
            f" {v['process_cpu_worst_ms']:.1f} | {v['ops_per_s']:,.0f} |"
            for name, v in lag.items()
        ),
        "",
        f"Idle loop worst lag on this machine (noise floor): {noise:.1f} ms",
        "This process on CPU 0, the servers on CPU 1."
        if pinned
        else "This process and the servers shared the CPUs.",
    ]
    text = "\n".join(report)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"storage-{stamp}.json").write_text(json.dumps(result, indent=2))
    (args.out / f"storage-{stamp}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
