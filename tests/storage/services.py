"""Pytest fixtures that start real storage services on 127.0.0.1 (free ports).

The process handling lives in xmppd.storage.devservices (shared with
bench/storage_bench.py); this module adds the pytest policy: a service whose
binary is missing skips the test locally but fails it when CI=true, and every
service is stopped and its files removed at teardown.

Session-scoped: moto, SeaweedFS and a 3-node memcached ring, each started once
per run. Tests that kill or pause servers (test_memcached, test_outage) use
`service_factory` to get their own, function-scoped processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import pytest

from xmppd.storage import devservices
from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
from xmppd.storage.config import DynamoDBItemsConfig, MemcachedCacheConfig, S3BlobsConfig
from xmppd.storage.devservices import LocalService, ServiceMissing

TEST_TABLE = "xmppd-test"
TEST_BUCKET = "xmppd-test"


def in_ci() -> bool:
    """Whether this run is CI's (CI=true, as CI services set it): there every test must
    run, so what would skip elsewhere fails."""
    return os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> NoReturn:
    """Skip locally; in CI no test may skip, so fail loudly."""
    if in_ci():
        pytest.fail(f"required service unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def start(make: Callable[[], LocalService]) -> LocalService:
    """Build and start a service; a missing binary skips (or fails in CI)."""
    try:
        service = make()
    except ServiceMissing as exc:
        unavailable(str(exc))
    return service.start()


def dynamodb_config(service: LocalService, **overrides: object) -> DynamoDBItemsConfig:
    fields: dict[str, object] = {
        "backend": "dynamodb",
        "table": TEST_TABLE,
        "endpoint_url": devservices.moto_endpoint(service),
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "timeout": 5.0,
        "retries": 2,
        **overrides,
    }
    return DynamoDBItemsConfig.model_validate(fields)


def s3_config(service: LocalService, **overrides: object) -> S3BlobsConfig:
    """S3 settings for moto or SeaweedFS (SeaweedFS checks these credentials)."""
    fields: dict[str, object] = {
        "backend": "s3",
        "bucket": TEST_BUCKET,
        "endpoint_url": devservices.s3_endpoint(service),
        "access_key_id": devservices.S3_ACCESS_KEY,
        "secret_access_key": devservices.S3_SECRET_KEY,
        "timeout": 5.0,
        "retries": 2,
        **overrides,
    }
    return S3BlobsConfig.model_validate(fields)


def memcached_config(services: list[LocalService], **overrides: object) -> MemcachedCacheConfig:
    fields: dict[str, object] = {
        "backend": "memcached",
        "servers": [f"{devservices.HOST}:{s.port}" for s in services],
        **overrides,
    }
    return MemcachedCacheConfig.model_validate(fields)


def _prepare(coro_factory: Callable[[], Coroutine[object, object, None]]) -> None:
    """Run one coroutine (table/bucket creation) on its own loop in a thread: these
    fixtures are first requested from inside a running test loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro_factory()).result()


@pytest.fixture(scope="session")
def moto_service() -> Iterator[LocalService]:
    """moto's server with the test table created through the backend's create_table."""
    from xmppd.storage.backends.dynamodb import DynamoDBItemBackend
    from xmppd.storage.backends.s3 import S3BlobBackend

    service = start(devservices.moto_server)

    async def create() -> None:
        items = await DynamoDBItemBackend.from_config(dynamodb_config(service, create_table=True))
        await items.close()
        blobs = await S3BlobBackend.from_config(s3_config(service, create_bucket=True))
        await blobs.close()

    try:
        _prepare(create)
        yield service
    finally:
        devservices.cleanup(service)


@pytest.fixture(scope="session")
def seaweedfs_service() -> Iterator[LocalService]:
    """`weed mini` with the test bucket created through the backend's create_bucket."""
    from xmppd.storage.backends.s3 import S3BlobBackend

    service = start(devservices.seaweedfs)

    async def create() -> None:
        blobs = await S3BlobBackend.from_config(s3_config(service, create_bucket=True))
        await blobs.close()

    try:
        _prepare(create)
        yield service
    finally:
        devservices.cleanup(service)


@pytest.fixture(scope="session")
def memcached_ring() -> Iterator[list[LocalService]]:
    """Three memcached processes shared by the "+memcached" contract variants."""
    nodes: list[LocalService] = []
    try:
        for _ in range(3):
            nodes.append(start(devservices.memcached))
        yield nodes
    finally:
        for node in nodes:
            devservices.cleanup(node)


@pytest.fixture
def service_factory() -> Iterator[Callable[[Callable[[], LocalService]], LocalService]]:
    """Start private services for one test (ones it may kill, pause or restart)."""
    started: list[LocalService] = []

    def make(factory: Callable[[], LocalService]) -> LocalService:
        service = start(factory)
        started.append(service)
        return service

    try:
        yield make
    finally:
        for service in started:
            devservices.cleanup(service)


@pytest.fixture
def redis_service(
    service_factory: Callable[[Callable[[], LocalService]], LocalService],
) -> LocalService:
    """A redis-server of the test's own: the cluster tests stop, pause and restart it."""
    return service_factory(devservices.redis_server)


FIXTURES = ("moto_service", "seaweedfs_service", "memcached_ring", "service_factory")


@contextlib.asynccontextmanager
async def dynamodb(
    moto_service: LocalService, **overrides: object
) -> AsyncIterator[DynamoDBItemBackend]:
    """A DynamoDB backend on moto's server, closed afterwards."""
    backend = await DynamoDBItemBackend.from_config(dynamodb_config(moto_service, **overrides))
    try:
        yield backend
    finally:
        await backend.close()
