"""A node's membership in a cluster: the Redis connection and the tasks that use it.

`Cluster` owns the parts (each in its own module, one job each) and their
order: connect (a clear error if Redis is unreachable), then the
heartbeat, the replica of the session table, the bus (xmppd.cluster.bus),
the inbox; at stop, the writes and notices still queued, the node's own
sessions removed from the table
(others stop routing here), the inbox read a last time, then the rest.
"""

from __future__ import annotations

import asyncio
import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster.bus import RedisBus
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.heartbeat import Heartbeat
from xmppd.cluster.inbox import Inbox
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync
from xmppd.cluster.writer import Writer
from xmppd.config import ClusterConfig, redact_url
from xmppd.router import Router

log = logging.getLogger("xmppd.cluster")

CONNECT_TIMEOUT = 5.0
FLUSH_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 5


class ClusterUnavailable(Exception):
    """Redis cannot be reached at start; the message names the URL (without password)."""


class Cluster:
    def __init__(self, config: ClusterConfig) -> None:
        self.node = config.node_name
        self.url = redact_url(config.redis_url)
        self.redis = Redis.from_url(
            config.redis_url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL,
        )
        self.stats = ClusterStats()
        self.writer = Writer(self.redis, self.node, self.stats)
        self.directory = ClusterDirectory(self.node, self.writer)
        self.heartbeat = Heartbeat(self.redis, self.node, self.rewrite_local, self.stats)
        self.sync = ReplicaSync(self.redis, self.directory, self.rewrite_local, self.stats)
        self.inbox: Inbox | None = None
        self.bus = RedisBus(self.redis, self.node)

    async def start(self, router: Router) -> None:
        """Join the cluster; ClusterUnavailable if Redis does not answer."""
        try:
            await self.redis.ping()
            # A process that ran under this name before and died may have left
            # sessions in the table, which nobody would reap while this one beats.
            await self.heartbeat.reap(self.node)
            self.writer.start()
            await self.heartbeat.start()
            await self.sync.start()
            await self.bus.start()
            self.inbox = Inbox(
                self.redis, self.node, self.directory, router, self.stats, self.sync
            )
            await self.inbox.start()
        except (RedisError, OSError) as exc:
            await self.stop()
            raise ClusterUnavailable(
                f"cluster: Redis at {self.url} is unreachable: {exc}"
            ) from None
        log.info("cluster: node %s joined through Redis at %s", self.node, self.url)

    async def stop(self) -> None:
        """Leave the cluster: this node's sessions leave the table first."""
        try:
            async with asyncio.timeout(FLUSH_TIMEOUT):
                await self.writer.flush()
                await self.bus.flush()
                await self.heartbeat.stop()
        except (RedisError, OSError, TimeoutError) as exc:
            log.error("cluster: could not remove this node's sessions from Redis: %s", exc)
        if self.inbox is not None:
            await self.inbox.stop()
        await self.sync.stop()
        await self.bus.stop()
        await self.writer.stop()
        await self.redis.aclose()

    def rewrite_local(self) -> None:
        """Write every local session into the table again (Redis may have lost them)."""
        for session, entry in self.directory.local_entries():
            self.writer.updated(session, entry)
