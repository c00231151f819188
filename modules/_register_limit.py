"""The per-address registration limit shared by a cluster's nodes (modules/register.py).

Behind a load balancer an address reaches every node: a count per node would let
it make N times the limit. On a cluster the registrations of the window are kept
in Redis, one sorted set per address (`xmppd:register:<address>`, scored by
Redis's own clock so the nodes' clocks do not matter), checked and added to in
one script so two nodes cannot both take the last slot. When Redis fails, the
node's own counter decides (logged; Redis taking over REDIS_WAIT counts as a
failure): registration stays possible, limited per node as on a node alone.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from xmppd.modules.register import RateLimit

PREFIX = "xmppd:register:"
REDIS_WAIT = 1.0  # seconds: a Redis that hangs longer counts as failed

# Drop the entries older than the window, then add one unless the address has
# `limit` already; the key lives as long as its newest entry matters.
_RESERVE = """
local now = redis.call('TIME')
local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - window)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
    return 0
end
redis.call('ZADD', KEYS[1], ms, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 1
"""

log = logging.getLogger("xmppd.modules.register")


@dataclass(frozen=True, slots=True)
class Slot:
    """A registration taken for an address: in Redis (`member`) or in the local counter."""

    key: str
    member: str | None = None
    stamp: float | None = None


class SharedRateLimit:
    """`RateLimit`'s reserve/release, counted in the cluster's Redis when there is one."""

    def __init__(self, local: RateLimit, redis: Redis | None) -> None:
        self.local = local
        self.redis = redis

    async def reserve(self, key: str) -> Slot | None:
        """A slot for one registration from `key`, or None when it is over the limit."""
        if self.redis is not None and self.local.limit:
            member = uuid.uuid4().hex
            try:
                async with asyncio.timeout(REDIS_WAIT):
                    taken = await self.redis.eval(
                        _RESERVE,
                        1,
                        PREFIX + key,
                        max(1, round(self.local.window * 1000)),
                        self.local.limit,
                        member,
                    )
            except (RedisError, OSError) as exc:  # TimeoutError too: Redis hangs
                log.warning(
                    "registration limit for %s counted on this node only: Redis: %s", key, exc
                )
            else:
                return Slot(key, member=member) if taken else None
        stamp = self.local.reserve(key)
        return None if stamp is None else Slot(key, stamp=stamp)

    async def release(self, slot: Slot) -> None:
        """Give a slot back (the registration failed: only accounts made count)."""
        if slot.stamp is not None:
            self.local.release(slot.key, slot.stamp)
            return
        if self.redis is None or slot.member is None:
            return
        try:
            async with asyncio.timeout(REDIS_WAIT):
                await self.redis.zrem(PREFIX + slot.key, slot.member)
        except (RedisError, OSError) as exc:
            log.warning("registration slot of %s not given back: Redis: %s", slot.key, exc)
