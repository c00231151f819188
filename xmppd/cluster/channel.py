"""One connection kept by one task on the message path, used without redis-py's command machinery.

Why: a command through redis-py (pipeline object, retry wrapper, each argument
encoded in Python, response callbacks, observability hooks, the pool taken and
given back) cost ~100 us of CPU per round trip here, against ~40 us for the same
command packed by hiredis and read from the connection directly (an EVALSHA of
FORWARD or an XREAD, one at a time against a local Redis). The writer and the
inbox make about one round trip per stanza between nodes at ordinary rates, so
they keep one connection of the client's pool and use its lower-level API:
`send_packed_command` (connects when needed, and PINGs first once it has been
idle for `health_check_interval`, as any command does) and `read_response`
(the client's socket timeout applies; none is set by the cluster).

Any failure other than Redis answering an error to one command drops the
connection (its state is unknown: a reply may be half read) and reaches the
caller, which retries as it did with the client (xmppd.cluster.writer,
xmppd.cluster.inbox); the next call takes a fresh connection from the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError
from redis.typing import EncodableT

Command = Sequence[EncodableT]


class Channel:
    def __init__(self, redis: Redis) -> None:
        self.pool = redis.connection_pool
        self._conn: AbstractConnection | None = None

    async def call(self, commands: Sequence[Command]) -> list[Any]:
        """Send `commands` in one round trip and return their answers in order (raw:
        bytes, ints, lists); an error Redis answered to one command is returned in
        its place, as a pipeline does with raise_on_error=False."""
        conn = self._conn
        if conn is None:
            conn = self._conn = await self.pool.get_connection()
        try:
            # The stub declares a 1-tuple; any number of arguments is packed.
            packed = [hiredis.pack_command(tuple(c)) for c in commands]  # type: ignore[arg-type]
            await conn.send_packed_command(packed)
            results: list[Any] = []
            for _ in commands:
                try:
                    results.append(await conn.read_response())
                except ResponseError as error:
                    results.append(error)
            return results
        except BaseException:
            self._conn = None
            await conn.disconnect(nowait=True)
            await self.pool.release(conn)
            raise

    async def release(self) -> None:
        """Give the connection back to the pool (the task stops)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self.pool.release(conn)
