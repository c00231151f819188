"""The login throttle's failure counts in Redis, shared by every node of a cluster.

A guesser who spreads attempts over the nodes (a TCP load balancer does it
for them) must meet one count, not one per node. Each count is one Redis key,
`xmppd:auth:<key>`, changed by one script (INCR, then PEXPIRE: the count
expires `lifetime` seconds after the key's last failure, as in the in-process
`MemoryFailureCounter`), read with GET, forgotten with DEL.

When Redis fails or does not answer within `TIMEOUT`: the throttle neither
locks users out nor stops throttling. The attempt is counted and judged by
the node's own in-process counter instead (each node then throttles on its
own, as without a cluster), which is logged once per outage; for the next
`RETRY_AFTER` seconds the node does not try Redis again, so logins are not
each slowed by a timeout. Counts made locally during an outage are not
copied to Redis afterwards: an address keeps its local count on that node
and starts from Redis' count elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.auth.throttle import FailureCounter
from xmppd.cluster import schema

log = logging.getLogger(__name__)

TIMEOUT = 1.0
"""Seconds one Redis call may take before the attempt is judged locally."""
RETRY_AFTER = 5.0
"""Seconds after a failure during which the local counter is used without asking Redis."""

RECORD = """
-- KEYS[1] the count; ARGV[1] its lifetime in milliseconds
local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return count
"""

T = TypeVar("T")


def count_key(key: str) -> str:
    return f"{schema.PREFIX}auth:{key}"


class RedisFailureCounter:
    """A `FailureCounter` in Redis, with `fallback` (in-process) while Redis fails."""

    def __init__(
        self,
        redis: Redis,
        lifetime: float,
        fallback: FailureCounter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.lifetime_ms = max(1, int(lifetime * 1000))
        self.fallback = fallback
        self.clock = clock
        self._record = redis.register_script(RECORD)
        self._down_until: float | None = None  # while set, Redis is not asked

    async def record_failure(self, key: str) -> int:
        result = await self._call(
            lambda: self._record(keys=[count_key(key)], args=[self.lifetime_ms]),
            lambda: self.fallback.record_failure(key),
        )
        return int(result)

    async def failures(self, key: str) -> int:
        result = await self._call(
            lambda: self.redis.get(count_key(key)), lambda: self.fallback.failures(key)
        )
        return int(result) if result is not None else 0

    async def clear(self, key: str) -> None:
        await self._call(
            lambda: self.redis.delete(count_key(key)), lambda: self.fallback.clear(key)
        )

    def set_lifetime(self, lifetime: float) -> None:
        self.lifetime_ms = max(1, int(lifetime * 1000))
        self.fallback.set_lifetime(lifetime)

    async def _call(
        self, shared: Callable[[], Awaitable[T]], local: Callable[[], Awaitable[T]]
    ) -> T:
        if self._down_until is not None:
            if self.clock() < self._down_until:
                return await local()
        try:
            async with asyncio.timeout(TIMEOUT):
                result = await shared()
        except (RedisError, OSError, TimeoutError) as exc:
            if self._down_until is None:
                log.error(
                    "auth throttle: Redis failed (%s); counting failed logins on this node "
                    "alone until it answers", exc or type(exc).__name__,
                )
            self._down_until = self.clock() + RETRY_AFTER
            return await local()
        if self._down_until is not None:
            log.info("auth throttle: counting failed logins in Redis again")
            self._down_until = None
        return result
