"""A real xmppd node in the test's event loop, on free loopback ports.

Every integration test runs twice: on the embedded default (SQLite, a
folder, an in-process cache) and on the cloud backends (DynamoDB on moto's
server, S3 on SeaweedFS, a three-node memcached ring), each test with its
own table and bucket. Without those services the cloud runs skip locally and
fail in CI (tests/storage/services.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.storage.services import (  # noqa: F401  (fixtures)
    memcached_ring,
    moto_service,
    redis_service,
    seaweedfs_service,
    service_factory,
    unavailable,
)
from xmppd.config import load_config
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

StartServer = Callable[..., Awaitable[Server]]

USERS = {"alice": "alice-secret", "bob": "bob-secret"}

STOP_TIMEOUT = 30
"""Seconds a server gets to stop in teardown. pytest-timeout bounds the test, not the
teardown after it timed out: a stop that hangs (what may have made it time out) would
stall the run instead of failing it."""


def write_config(tmp_path: Path, **sections: Any) -> Path:
    """A config file like an operator's: ports 0 pick free ports."""
    config: dict[str, Any] = {
        "hosts": ["localhost"],
        "data_dir": str(tmp_path / "data"),
        "log_level": "debug",
        "listeners": [
            {"type": "starttls", "address": "127.0.0.1", "port": 0},
            {"type": "direct_tls", "address": "127.0.0.1", "port": 0},
        ],
        "limits": {"auth_failure_delay": 0.05},
        "admin": {"port": 0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    path = tmp_path / "xmppd.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write in: a chmod 555 one, or (as root, who may
    write there anyway) a kernel folder that refuses even root; else the test skips
    (fails in CI, which runs as root on a machine with /sys)."""
    candidates = [tmp_path / "read-only", Path("/sys/kernel")]
    candidates[0].mkdir()
    candidates[0].chmod(0o555)
    for folder in candidates:
        try:
            (folder / ".probe").touch()
        except OSError:
            return folder
        (folder / ".probe").unlink()
    unavailable("no folder here refuses writes to this user")


@pytest.fixture(params=["embedded", "cloud"])
def storage_section(request: pytest.FixtureRequest) -> dict[str, Any] | None:
    """None for the embedded default; else the cloud storage keys of the config file."""
    if request.param == "embedded":
        return None
    moto = request.getfixturevalue("moto_service")
    weed = request.getfixturevalue("seaweedfs_service")
    ring = request.getfixturevalue("memcached_ring")
    return cloud_storage(moto, weed, ring)


def cloud_storage(
    moto: LocalService, weed: LocalService, ring: list[LocalService]
) -> dict[str, Any]:
    """The storage keys for DynamoDB on moto, S3 on SeaweedFS and the memcached ring,
    with a fresh table and bucket (created at start) so that tests never share data."""
    name = f"it-{uuid.uuid4().hex[:16]}"
    return {
        "items": {
            "backend": "dynamodb",
            "table": name,
            "create_table": True,
            "endpoint_url": devservices.moto_endpoint(moto),
            "access_key_id": "testing",
            "secret_access_key": "testing",
        },
        "blobs": {
            "backend": "s3",
            "bucket": name,
            "create_bucket": True,
            "endpoint_url": devservices.s3_endpoint(weed),
            "access_key_id": devservices.S3_ACCESS_KEY,
            "secret_access_key": devservices.S3_SECRET_KEY,
            # Not the default 5: on a loaded 2-core CI machine `weed mini` answered a
            # put with 500 InternalError for longer than 5 retries' ~1 s of backoff
            # (test_xep227, once). A real outage is tested in tests/storage.
            "retries": 10,
        },
        "cache": {
            "backend": "memcached",
            "servers": [f"{devservices.HOST}:{node.port}" for node in ring],
            # Not the 0.25 s default: on a loaded 2-core CI machine a call can take
            # that long, and a node whose invalidation timed out leaves the entry
            # stale on the ring for the others until its TTL (storage/memcached.py,
            # by design). The outage itself is tested in tests/storage.
            "timeout": 2.0,
        },
    }


@pytest.fixture
async def start_server(
    tmp_path: Path, storage_section: dict[str, Any] | None
) -> AsyncIterator[StartServer]:
    servers: list[Server] = []

    async def start(users: dict[str, str] | None = None, **sections: Any) -> Server:
        if storage_section is not None:
            sections.setdefault("storage", storage_section)
        server = Server(load_config(write_config(tmp_path, **sections)))
        await server.start()
        servers.append(server)
        for name, password in (USERS if users is None else users).items():
            await server.accounts["localhost"].register(name, password)
        return server

    yield start
    # Every server stopped even if another fails to (its ports and storage would leak
    # into the tests after it); then what failed is raised.
    failed: list[Exception] = []
    for server in servers:
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await server.stop()
        except Exception as exc:
            failed.append(exc)
    if failed:
        raise ExceptionGroup("servers that did not stop cleanly", failed)


@pytest.fixture
async def server(start_server: StartServer) -> Server:
    return await start_server()


def port_of(server: Server, listener_type: str) -> int:
    return next(lst.port for lst in server.listening if lst.type == listener_type)
