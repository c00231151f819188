"""The embedded default's in-process cache, kept coherent across the nodes of a cluster.

Several nodes may share one SQLite file and blob folder (or the cloud
stores) with each its own in-process `MemoryCache`. Every write through the
cache (CachedItemBackend, CachedBlobBackend) ends by overwriting the key
with a short-lived tombstone (`MemoryCache.set`): the same `set` is sent over
the cluster bus (the write returns once Redis has it, `Bus.sent`) and applied
on every other node, so none serves the old
value, and the tombstone also stops a read that fetched the old value there
just before the write from putting it back. The bus may lose notices only
while a node's connection to Redis is broken; that node then clears its
whole cache (`lost`), so nothing stale outlives a reconnect. A node whose own
publishing fails keeps its notices and sends them when Redis answers again.

Memcached is one cache shared by every node already, and no cache has
nothing to invalidate: neither needs the bus.
"""

from __future__ import annotations

import base64

from xmppd.cluster.bus import Bus, Payload
from xmppd.storage.cache import Cache, MemoryCache

TOPIC = "storage-cache"


def share_memory_cache(bus: Bus, cache: Cache) -> bool:
    """Pass `cache`'s writes to the other nodes and apply theirs, if it is in-process;
    False (nothing to do) for any other cache."""
    if not isinstance(cache, MemoryCache):
        return False

    async def written(key: str, value: bytes | None, ttl: int) -> None:
        encoded = None if value is None else base64.b64encode(value).decode("ascii")
        bus.publish(TOPIC, {"key": key, "value": encoded, "ttl": ttl})
        await bus.sent()  # the write returns once the other nodes can hear of it

    def heard(payload: Payload) -> None:
        value = payload["value"]
        cache.apply(
            str(payload["key"]),
            None if value is None else base64.b64decode(value),
            int(payload["ttl"]),
        )

    cache.on_write = written
    bus.subscribe(TOPIC, heard, cache.clear)
    return True
