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

Every login reads a count twice (`AuthThrottle.reserve`, or `refused` for
SCRAM, before the password check, `admit` after it), and a failed one
records two counts (its address, its address with the account) in one
round trip, so the counts go over a connection of their own
(xmppd.cluster.channel), one round trip per call, instead of redis-py's
command path: about a third of the CPU per read. Not the writer's or the
inbox's connection: a round trip waits for every one sent before it on its
connection (the inbox's is mostly a blocking XREAD), and a call that
exceeds `TIMEOUT` drops its connection, which would fail the message path's
round trips waiting on it. A login given up (its client went away) while its
read waits leaves the connection as it is: the reply is read and dropped,
and the other logins' reads go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from xmppd.auth.throttle import FailureCounter
from xmppd.cluster import schema
from xmppd.cluster.channel import Channel, Command

log = logging.getLogger(__name__)

T = TypeVar("T")

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
        self.lifetime_ms = max(1, int(lifetime * 1000))
        self.fallback = fallback
        self.clock = clock
        self._channel = Channel(redis)
        self._record_sha = redis.register_script(RECORD).sha  # computed here, not asked
        self._down_until: float | None = None  # while set, Redis is not asked

    async def record_failure(self, key: str, *more: str) -> int:
        keys = [count_key(each) for each in (key, *more)]
        result = await self._call(
            lambda: self._record(keys), lambda: self.fallback.record_failure(key, *more)
        )
        return int(result)

    async def failures(self, key: str) -> int:
        result = await self._call(
            lambda: self._ask(("GET", count_key(key))), lambda: self.fallback.failures(key)
        )
        return int(result) if result is not None else 0

    async def clear(self, key: str) -> None:
        await self._call(
            lambda: self._ask(("DEL", count_key(key))), lambda: self.fallback.clear(key)
        )

    def set_lifetime(self, lifetime: float) -> None:
        self.lifetime_ms = max(1, int(lifetime * 1000))
        self.fallback.set_lifetime(lifetime)

    async def close(self) -> None:
        """Close the connection (the node stops)."""
        await self._channel.release()

    async def _record(self, keys: list[str]) -> Any:
        """The script once per key, all in one round trip; the first key's count."""
        replies = await self._channel.call(
            [("EVALSHA", self._record_sha, 1, key, self.lifetime_ms) for key in keys],
            drop_if_cancelled=False,
        )
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted empty or was flushed: EVAL runs the script and caches it
            # (only where it was missing: the others counted already).
            again = await self._channel.call(
                [("EVAL", RECORD, 1, keys[n], self.lifetime_ms) for n in missing],
                drop_if_cancelled=False,
            )
            for n, reply in zip(missing, again, strict=True):
                replies[n] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[0]

    async def _ask(self, command: Command) -> Any:
        """One command, one round trip; an error reply is raised. A caller cancelled
        from outside (its login was given up) leaves the connection to the others."""
        [reply] = await self._channel.call([command], drop_if_cancelled=False)
        if isinstance(reply, Exception):
            raise reply
        return reply

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
            if isinstance(exc, TimeoutError):
                # Redis does not answer: the next call makes another connection (as
                # redis-py's client did), not one behind the reads still unanswered.
                await self._channel.release()
            if self._down_until is None:
                log.error(
                    "auth throttle: Redis failed (%s); counting failed logins on this node "
                    "alone until it answers", str(exc) or type(exc).__name__,
                )
            self._down_until = self.clock() + RETRY_AFTER
            return await local()
        if self._down_until is not None:
            log.info("auth throttle: counting failed logins in Redis again")
            self._down_until = None
        return result
