"""The shared cache: memcached nodes chosen by a ketama ring (uhashring).

Placement: `HashRing(servers, hash_fn="ketama")`, the libketama continuum, so
adding or losing one of N nodes moves only about 1/N of the keys, and
`sync_client` (for command-line tools, pymemcache) places every key on the
same node as the server's asyncio client does.

Every node has its own native asyncio client (aiomcache, `pool_size`
connections) and every call is bounded by `timeout`. A cache failure is never
an error: a timeout or connection error on a node is a miss, and the node is
marked down for `down_for` seconds, during which its keys are misses without
any network call.

Why keys of a down node are not remapped to the other nodes: memcached keeps
no history, so a remapped key would be filled on another node B while the
writes of the outage invalidate B only. When the first node returns (it was
slow or cut off, not restarted, so it still holds its old entries) or when it
fails again later, readers would find entries that missed invalidations: stale
data. Keeping the placement fixed leaves one gap, the invalidations this
process could not send to the node while it was down. They are remembered
(up to MAX_PENDING keys per node) and replayed as deletes before the node
serves anything again; past that many, the node is flushed on its return.
Other processes track their own failed invalidations the same way; what a
node cannot be told by anyone is bounded by the cache TTL.

A call cancelled by its timeout may leave a reply in flight on its
connection; aiomcache would put that connection back in the pool and the next
call would read the old reply (possibly an old value). `_SafePool` closes
such connections instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aiomcache
from aiomcache.pool import Connection, MemcachePool
from uhashring import HashRing

from .cache import Cache
from .config import MemcachedCacheConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_PENDING = 1_000  # remembered failed invalidations per down node
MAX_RELATIVE_TTL = 30 * 24 * 3600  # memcached reads larger exptimes as Unix times
_NODE_ERRORS = (OSError, asyncio.IncompleteReadError, aiomcache.ClientException)


def parse_server(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def valid_key(key: str) -> bool:
    """memcached's text protocol: 1-250 bytes, no spaces or control characters."""
    raw = key.encode("utf-8")
    return 0 < len(raw) <= 250 and all(32 < b != 127 for b in raw)


def _exptime(ttl: int) -> int:
    return int(time.time()) + ttl if ttl > MAX_RELATIVE_TTL else ttl


class _SafePool(MemcachePool):
    """A pool that drops a connection whose call was cancelled mid-reply."""

    def release(self, conn: Connection) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            conn.reader.set_exception(ConnectionAbortedError("call cancelled mid-reply"))
        super().release(conn)


class _Node:
    __slots__ = ("name", "client", "gate", "down_until", "pending", "overflowed", "recovering")

    def __init__(self, name: str, pool_size: int) -> None:
        host, port = parse_server(name)
        self.name = name
        self.client = aiomcache.Client(host, port, pool_size=pool_size)
        self.client._pool = _SafePool(host, port, minsize=pool_size, maxsize=pool_size)
        self.gate = asyncio.Semaphore(pool_size)  # one call per pooled connection
        self.down_until = 0.0
        self.pending: set[bytes] = set()  # invalidations that failed while down
        self.overflowed = False
        self.recovering = False


class MemcachedCache(Cache):
    def __init__(
        self,
        servers: Sequence[str],
        *,
        pool_size: int = 4,
        timeout: float = 0.25,
        down_for: float = 30.0,
        max_value_bytes: int = 65536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not servers:
            raise ValueError("memcached: no servers")
        self.servers = list(dict.fromkeys(servers))
        self.timeout = timeout
        self.down_for = down_for
        self.max_value_bytes = max_value_bytes
        self._clock = clock
        self._ring = HashRing(nodes=self.servers, hash_fn="ketama")
        self._nodes = {name: _Node(name, pool_size) for name in self.servers}

    @classmethod
    async def from_config(cls, cfg: MemcachedCacheConfig) -> MemcachedCache:
        """No connection is made here: a memcached node that is down at startup is a
        miss like any other, never a reason not to start."""
        return cls(
            cfg.servers,
            pool_size=cfg.pool_size,
            timeout=cfg.timeout,
            down_for=cfg.down_for,
            max_value_bytes=cfg.max_value_bytes,
        )

    def describe(self) -> str:
        return f"memcached ketama ring over {len(self.servers)} nodes: {', '.join(self.servers)}"

    def node_for(self, key: str) -> str:
        """The server that holds `key` (the same answer as `sync_client`'s)."""
        return str(self._ring.get_node(key))

    def is_down(self, server: str) -> bool:
        return self._nodes[server].down_until > self._clock()

    # -- node health -----------------------------------------------------------

    def _mark_down(self, node: _Node, exc: BaseException) -> None:
        if node.down_until <= self._clock():
            log.warning(
                "memcached %s failed (%r); its keys are misses for %ss",
                node.name,
                exc,
                self.down_for,
            )
        node.down_until = self._clock() + self.down_for

    async def _usable(self, node: _Node) -> bool:
        """False while the node is down or replaying the invalidations it missed."""
        if node.down_until > self._clock() or node.recovering:
            return False
        if not node.pending and not node.overflowed:
            return True
        pending, overflowed = node.pending, node.overflowed
        node.pending, node.overflowed, node.recovering = set(), False, True
        try:
            async with asyncio.timeout(self.timeout * (4 + len(pending) / 100)):
                if overflowed:
                    await node.client.flush_all()
                else:
                    await asyncio.gather(*(node.client.delete(key) for key in pending))
        except (*_NODE_ERRORS, TimeoutError) as exc:
            self._mark_down(node, exc)
            node.pending |= pending  # calls made meanwhile were remembered too
            node.overflowed = node.overflowed or overflowed or len(node.pending) > MAX_PENDING
            return False
        finally:
            node.recovering = False
        log.info("memcached %s is back; replayed its missed invalidations", node.name)
        return True

    def _remember(self, node: _Node, key: bytes) -> None:
        if node.overflowed:
            return
        node.pending.add(key)
        if len(node.pending) > MAX_PENDING:
            node.pending.clear()
            node.overflowed = True

    async def _on_node(
        self, node: _Node, call: Callable[[Any], Awaitable[T]], invalidated: Sequence[bytes]
    ) -> T | None:
        """Run `call(client)` on one node; None on any failure. If the call would have
        invalidated keys (`invalidated`) and fails, they are remembered for replay.

        Only the network call is under `timeout`: waiting for a free connection is
        this process's own queue, and a busy node must not be marked down for it.
        Nor for this loop's own stall: a timeout that fires more than a timeout late
        (the loop held up by a collection, or a host that did not run it) is a miss,
        the node left up; a node that really hangs is marked down at the next call."""
        if node.down_until <= self._clock():
            async with node.gate:
                if await self._usable(node):
                    loop = asyncio.get_running_loop()
                    started = loop.time()
                    try:
                        async with asyncio.timeout(self.timeout):
                            return await call(node.client)
                    except TimeoutError as exc:
                        if loop.time() - started <= 2 * self.timeout:
                            self._mark_down(node, exc)
                    except _NODE_ERRORS as exc:
                        self._mark_down(node, exc)
        for key in invalidated:
            self._remember(node, key)
        return None

    async def _run(
        self, key: str, call: Callable[[Any, bytes], Awaitable[T]], *, invalidates: bool
    ) -> T | None:
        if not valid_key(key):
            return None
        raw = key.encode("utf-8")
        node = self._nodes[self.node_for(key)]
        return await self._on_node(
            node, lambda client: call(client, raw), [raw] if invalidates else []
        )

    # -- Cache -----------------------------------------------------------------

    async def get(self, key: str) -> bytes | None:
        value = await self._run(key, lambda client, raw: client.get(raw), invalidates=False)
        return bytes(value) if value is not None else None

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        by_node: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            if valid_key(key):
                by_node.setdefault(self.node_for(key), []).append(key)

        async def fetch(server: str, names: list[str]) -> dict[str, bytes]:
            raw = [k.encode("utf-8") for k in names]
            values = await self._on_node(
                self._nodes[server], lambda client: client.multi_get(*raw), []
            )
            if values is None:
                return {}
            return {k: bytes(v) for k, v in zip(names, values, strict=True) if v is not None}

        found: dict[str, bytes] = {}
        for part in await asyncio.gather(*(fetch(s, names) for s, names in by_node.items())):
            found.update(part)
        return found

    async def set(self, key: str, value: bytes, ttl: int) -> None:
        if len(value) > self.max_value_bytes:
            await self.delete(key)  # an older value must not outlive this write
            return
        await self._run(
            key,
            lambda client, raw: client.set(raw, bytes(value), exptime=_exptime(ttl)),
            invalidates=True,
        )

    async def add(self, key: str, value: bytes, ttl: int) -> None:
        if len(value) > self.max_value_bytes:
            return
        await self._run(
            key,
            lambda client, raw: client.add(raw, bytes(value), exptime=_exptime(ttl)),
            invalidates=False,
        )

    async def delete(self, key: str) -> None:
        await self._run(key, lambda client, raw: client.delete(raw), invalidates=True)

    async def close(self) -> None:
        await asyncio.gather(
            *(node.client.close() for node in self._nodes.values()), return_exceptions=True
        )


class KetamaHasher:
    """pymemcache's hasher interface over the same uhashring ketama ring."""

    def __init__(self) -> None:
        self._ring = HashRing(nodes=[], hash_fn="ketama")

    def add_node(self, node: str) -> None:
        self._ring.add_node(node)

    def remove_node(self, node: str) -> None:
        self._ring.remove_node(node)

    def get_node(self, key: str) -> str | None:
        node = self._ring.get_node(key)
        return None if node is None else str(node)


def sync_client(cfg: MemcachedCacheConfig) -> Any:
    """A blocking pymemcache HashClient for command-line tools (never for the server's
    event loop), placing keys exactly like MemcachedCache. A failed node is a miss and
    is skipped for cfg.down_for seconds but never removed from the ring, for the same
    reason MemcachedCache does not remap (retry_attempts is effectively infinite)."""
    from pymemcache.client.hash import HashClient

    return HashClient(
        [parse_server(server) for server in cfg.servers],
        hasher=KetamaHasher,
        connect_timeout=cfg.timeout,
        timeout=cfg.timeout,
        ignore_exc=True,
        retry_attempts=2**31,
        retry_timeout=cfg.down_for,
        dead_timeout=cfg.down_for,
    )
