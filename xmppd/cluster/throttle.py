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

The password checks under way (`AuthThrottle.reserve`) are counted here
too, or each node would run an address's failures left at once: a sorted
set per address, `xmppd:auth:checks:<key>`, one member per check scored
with the time (Redis' clock, not the nodes') it expires, `CHECK_LIFETIME`
after it was taken, so that a node that dies mid-check holds no check for
ever. One script reads the address's failures, drops the expired checks,
and takes a check only while failures plus checks stay below the ban; the
check's end removes its member. An attempt that finds no check left judges
again every `RECHECK_AFTER` seconds (a check that ends on another node wakes
no one here). While Redis fails the node's own counter takes the checks (per
node then, as the failures are); a check Redis took that cannot be given
back while it fails expires in Redis by itself.

Every login reads a count and takes a check before its password check
(`AuthThrottle.reserve`: one script; SCRAM also reads the count with
`refused` before its challenge), gives the check back after it, and reads
the count again (`admit`) on success; a failed one records two counts (its
address, its address with the account) in one round trip. So the counts go
over a connection of their own
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
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT

from xmppd.auth.throttle import Check, FailureCounter
from xmppd.cluster import schema
from xmppd.cluster.channel import Channel, Command

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT = 1.0
"""Seconds one Redis call may take before the attempt is judged locally."""
RETRY_AFTER = 5.0
"""Seconds after a failure during which the local counter is used without asking Redis."""

CHECK_LIFETIME = 10.0
"""Seconds a check taken in Redis counts at most: longer than a password check takes
(a store read and a key derivation), short enough that the checks of a node that
died mid-check delay its addresses' next logins only this long."""
RECHECK_AFTER = 0.1
"""Seconds after which an attempt waiting for a check (maybe another node's) judges again."""

RECORD = """
-- KEYS[1] the count; ARGV[1] its lifetime in milliseconds
local count = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return count
"""

TAKE_CHECK = """
-- KEYS[1] the failure count, KEYS[2] its checks under way (member -> expiry, ms);
-- ARGV[1] failures before the ban, ARGV[2] a check's lifetime (ms), ARGV[3] this check
local failures = tonumber(redis.call('GET', KEYS[1]) or '0')
local limit = tonumber(ARGV[1])
if failures >= limit then
    return {failures, 0}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if failures + redis.call('ZCARD', KEYS[2]) >= limit then
    return {failures, 0}
end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return {failures, 1}
"""


def count_key(key: str) -> str:
    return f"{schema.PREFIX}auth:{key}"


def checks_key(key: str) -> str:
    """The sorted set of `key`'s checks under way."""
    return f"{schema.PREFIX}auth:checks:{key}"


class RedisFailureCounter:
    """A `FailureCounter` in Redis, with `fallback` (in-process) while Redis fails."""

    recheck_after: float | None = RECHECK_AFTER

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
        # Their SHA1 is computed here, not asked of Redis.
        self._record_script = redis.register_script(RECORD)
        self._take_script = redis.register_script(TAKE_CHECK)
        self._down_until: float | None = None  # while set, Redis is not asked
        self._giving_back: set[asyncio.Task[None]] = set()  # checks whose answer was lost

    async def record_failure(self, key: str, *more: str) -> int:
        calls: list[list[EncodableT]] = [
            [1, count_key(each), self.lifetime_ms] for each in (key, *more)
        ]
        replies = await self._call(
            lambda: self._scripts(self._record_script, calls),
            lambda: self._local_record(key, *more),
        )
        return int(replies[0])

    async def _local_record(self, key: str, *more: str) -> list[Any]:
        return [await self.fallback.record_failure(key, *more)]

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

    async def take_check(self, key: str, limit: int) -> tuple[int, Check | None]:
        return await self._call(
            lambda: self._take_shared(key, limit), lambda: self.fallback.take_check(key, limit)
        )

    async def _take_shared(self, key: str, limit: int) -> tuple[int, Check | None]:
        member = uuid.uuid4().hex
        call: list[EncodableT] = [
            2, count_key(key), checks_key(key), limit, int(CHECK_LIFETIME * 1000), member
        ]
        try:
            [(failures, taken)] = await self._scripts(self._take_script, [call])
        except BaseException:
            # The script may have run with its answer lost (the login given up as the
            # reply came, a timeout): no caller will end that check, which would hold
            # one of the address's places for CHECK_LIFETIME. Given back on its own.
            task = asyncio.get_running_loop().create_task(self._give_back(key, member))
            self._giving_back.add(task)
            task.add_done_callback(self._giving_back.discard)
            raise
        return int(failures), Check(key, member) if taken else None

    async def _give_back(self, key: str, member: str) -> None:
        """Remove a check whose taking may or may not have happened; best effort (it
        expires in Redis by itself)."""
        try:
            await self._ask(("ZREM", checks_key(key), member))
        except (RedisError, OSError, TimeoutError):
            pass

    async def end_check(self, check: Check) -> None:
        member = check.member
        if member is None:  # taken by the fallback while Redis failed
            await self.fallback.end_check(check)
            return
        await self._call(
            lambda: self._ask(("ZREM", checks_key(check.key), member)), _expires_in_redis
        )

    async def close(self) -> None:
        """Close the connection (the node stops)."""
        for task in list(self._giving_back):
            task.cancel()
        await self._channel.release()

    async def _scripts(self, script: AsyncScript, calls: list[list[EncodableT]]) -> list[Any]:
        """`script` once per call (its key count, keys and arguments), all in one round
        trip; their replies."""
        replies = await self._channel.call(
            [("EVALSHA", script.sha, *call) for call in calls], drop_if_cancelled=False
        )
        missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            # Redis restarted empty or was flushed: EVAL runs the script and caches it
            # (only where it was missing: the others ran already).
            again = await self._channel.call(
                [("EVAL", script.script, *calls[n]) for n in missing], drop_if_cancelled=False
            )
            for n, reply in zip(missing, again, strict=True):
                replies[n] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies

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


async def _expires_in_redis() -> None:
    """A check Redis took cannot be given back while it fails: it expires there by
    itself, `CHECK_LIFETIME` after it was taken (this node's counter never had it)."""
