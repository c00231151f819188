"""A node whose event loop stalls past the heartbeat's TTL is busy, not dead.

Two real node processes on a real redis-server, both started through
tests/integration/stallnode.py (the heartbeat's timings shortened: TTL 2 s,
interval 0.5 s, wedge bound 5 s) so that one's event loop can be blocked with
`time.sleep` in a callback on it. Blocked for twice the TTL, it is not reaped
(its heartbeat thread kept saying it is alive); blocked for good, it is reaped
once the wedge bound has passed, within the bound docs/cluster.md gives
(WEDGED + TTL + INTERVAL, plus the reaper's own interval).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import write_config
from tests.integration.stallnode import INTERVAL, TTL, WEDGED
from tests.integration.test_cluster_failures import Node
from xmppd.cluster import schema
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(90)



class StallNode(Node):
    """A node run by stallnode.py; `stall(what)` blocks its loop."""

    def __init__(self, name: str, config: Path) -> None:
        super().__init__(name, config)
        self.stall_file = config.with_suffix(".stall")

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.integration.stallnode", "-c", str(self.config),
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "XMPPD_STALL_FILE": str(self.stall_file)},
        )
        self._reading = asyncio.create_task(self._read())
        await self.logged("xmppd ready", timeout=30)

    def stall(self, what: str) -> None:
        self.stall_file.write_text(what)


@pytest.fixture
async def nodes(tmp_path: Path, redis_service: LocalService) -> AsyncIterator[Any]:
    started: list[StallNode] = []

    async def start(name: str) -> StallNode:
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(
            folder,
            data_dir=str(tmp_path / "data"),
            log_level="info",
            storage={"cache": {"backend": "none"}},
            cluster={"redis_url": devservices.redis_url(redis_service), "node_name": name},
        )
        node = StallNode(name, config)
        started.append(node)
        await node.start()
        return node

    yield start
    for node in started:
        if node.proc is not None and node.proc.returncode is None and node.stall_file.parent:
            node.kill()  # a loop blocked for good answers no SIGTERM
        await node.close()
        (tmp_path / f"{node.name}.log").write_text("".join(node.lines))


async def test_a_busy_loop_is_not_reaped_and_a_hung_one_is_within_the_bound(
    nodes: Callable[[str], Any], redis_service: LocalService
) -> None:
    watcher: StallNode = await nodes("watcher")
    stalled: StallNode = await nodes("stalled")
    await watcher.logged("live nodes: stalled watcher", timeout=10)
    redis = Redis.from_url(devservices.redis_url(redis_service))
    try:
        # The key's TTL is the heartbeat's (the node's first write of it, at start,
        # uses the default 10 s).
        for _ in range(50):  # its next beat: INTERVAL at most
            if await redis.ttl(schema.alive_key("stalled")) <= TTL:
                break
            await asyncio.sleep(INTERVAL / 5)
        # Busy: blocked for twice the TTL (shorter than the wedge bound).
        stalled.stall(str(2 * TTL))
        await stalled.logged("blocking the event loop", timeout=5)
        await stalled.logged("the loop runs again", timeout=2 * TTL + 5)
        await asyncio.sleep(2 * INTERVAL)  # the watcher's next beats
        reaped = [line for line in watcher.lines if "node stalled missed" in line]
        assert reaped == []
        assert b"stalled" in await redis.smembers(schema.NODES)

        # Hung: blocked for good, reaped once the wedge bound has passed.
        mark = len(stalled.lines)
        stalled.stall("forever")
        await stalled.logged("blocking the event loop for forever", timeout=5)
        began = time.monotonic()
        assert len(stalled.lines) > mark
        await watcher.logged("node stalled missed its heartbeats", timeout=WEDGED + TTL + 10)
        took = time.monotonic() - began
        assert WEDGED <= took <= WEDGED + TTL + 2 * INTERVAL + 1.5, took
        assert re.search("event loop has not run for", "".join(stalled.lines))
        # The watcher logs the miss, then reaps: on a busy machine the script may land
        # a moment after the line.
        for _ in range(50):
            if b"stalled" not in await redis.smembers(schema.NODES):
                break
            await asyncio.sleep(0.1)
        assert b"stalled" not in await redis.smembers(schema.NODES)
    finally:
        await redis.aclose()
