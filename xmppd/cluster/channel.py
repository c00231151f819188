"""The connection the message path talks to Redis on: xmppd's own protocol, hiredis' parser.

Why not redis-py's connection: its asyncio connection reads a reply through a
StreamReader, a parser object and a future per read, with a timeout context
and hooks around each command; at ordinary rates a stanza between nodes
costs two round trips (the sender's FORWARD, the receiver's XREAD). Here the
transport's `data_received` feeds `hiredis.Reader` and completes each round
trip by calling its callback there, with every reply of that round trip; the
writer and the inbox await it through `call`: one future per round trip and
their task resumed once, nothing more.

The connection's settings come from the client the node made from
`cluster.redis_url` (redis-py parses it): host and port, or a unix socket
path; TLS with redis-py's context for rediss://; AUTH with the URL's user
and password (or the client's credential provider); SELECT of its database.
It speaks RESP2: replies keep the shapes the callers read (an XREAD is a
list, a Lua `false` is None), and no boolean reply can be mistaken for
"nothing parsed yet".

Any failure other than Redis answering an error to one command (the peer
closed, a write failed, a reply that does not parse, a caller that gave up
waiting: Redis may have stopped answering) drops the connection and fails
every round trip still waiting on it; the callers retry as they did with the
client (xmppd.cluster.writer, xmppd.cluster.inbox), and the next round trip
connects again. A caller whose giving up says nothing about Redis (the login
throttle's, for a login whose client went away) can leave the connection
open: its replies are read in turn and dropped. An error reply (NOSCRIPT,
OOM, READONLY, WRONGTYPE) is returned in its command's place as redis-py's
exception for it, as a pipeline does with raise_on_error=False: never
skipped.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, cast

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.credentials import UsernamePasswordCredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.typing import EncodableT

Command = Sequence[EncodableT]

Done = Callable[[list[Any] | BaseException], None]
"""Called once per round trip: with its replies in order, or with why it failed."""

_PENDING = object()
"""What the parser answers while a reply is incomplete (a reply may be None or False)."""


class _RoundTrip:
    __slots__ = ("count", "replies", "done")

    def __init__(self, count: int, done: Done) -> None:
        self.count = count
        self.replies: list[Any] = []
        self.done = done


class Link(asyncio.Protocol):
    """One connection: round trips answered in the order they were sent (Redis
    answers one client's commands in order)."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(notEnoughData=_PENDING)
        self._transport: asyncio.Transport | None = None
        self._waiting: deque[_RoundTrip] = deque()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it.
        self._transport = cast(asyncio.Transport, transport)

    def send(self, commands: Sequence[Command], done: Done) -> None:
        """Write `commands` at once; `done` gets their replies (or the failure).

        No commands: `done` gets no replies at once. Queued, a round trip that
        waits for none would take the next round trip's replies as its own,
        keep them, and leave every later one on the connection waiting."""
        if not commands:
            done([])
            return
        if self.closed or self._transport is None:
            done(RedisConnectionError("the connection to Redis is closed"))
            return
        # The stub declares a 1-tuple; any number of arguments is packed.
        packed = [hiredis.pack_command(tuple(c)) for c in commands]  # type: ignore[arg-type]
        self._waiting.append(_RoundTrip(len(commands), done))
        self._transport.write(b"".join(packed))

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        try:
            while (reply := reader.gets()) is not _PENDING:
                if not waiting:
                    raise hiredis.ProtocolError("a reply nobody asked for")
                if isinstance(reply, hiredis.ReplyError):
                    reply = BaseParser.parse_error(str(reply))
                trip = waiting[0]
                trip.replies.append(reply)
                if len(trip.replies) == trip.count:
                    waiting.popleft()
                    trip.done(trip.replies)
        except hiredis.ProtocolError as exc:
            self.close(RedisConnectionError(f"Redis sent what does not parse: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed'}"))

    def close(self, why: BaseException) -> None:
        """Drop the connection; every round trip still waiting fails with `why`."""
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        waiting, self._waiting = self._waiting, deque()
        for trip in waiting:
            trip.done(why)


async def connect(redis: Redis) -> Link:
    """A Link with the settings of `redis` (its URL), authenticated and on its database."""
    pool = redis.connection_pool
    settings = pool.connection_class(**pool.connection_kwargs)
    loop = asyncio.get_running_loop()
    timeout = settings.socket_connect_timeout
    try:
        async with asyncio.timeout(timeout):
            if isinstance(settings, UnixDomainSocketConnection):
                _, link = await loop.create_unix_connection(Link, settings.path)
            else:
                assert isinstance(settings, Connection)
                ssl = settings.ssl_context.get() if isinstance(settings, SSLConnection) else None
                _, link = await loop.create_connection(
                    Link, settings.host, settings.port, ssl=ssl
                )
    except (OSError, TimeoutError) as exc:
        raise RedisConnectionError(f"connecting to Redis failed: {exc or 'timed out'}") from exc
    # From here the connection is open: every way out but a finished handshake closes
    # it. A credential provider may wait (a token service) and the caller give up then.
    try:
        handshake: list[Command] = []
        if settings.credential_provider or settings.username or settings.password:
            provider = settings.credential_provider or UsernamePasswordCredentialProvider(
                settings.username, settings.password
            )
            handshake.append(("AUTH", *await provider.get_credentials_async()))
        if settings.db:
            handshake.append(("SELECT", settings.db))
        for reply in await call(link, handshake):
            if isinstance(reply, Exception):
                raise reply
    except BaseException:
        link.close(RedisConnectionError("the handshake with Redis failed or was given up"))
        raise
    return link


async def call(
    link: Link, commands: Sequence[Command], drop_if_cancelled: bool = True
) -> list[Any]:
    """`link.send`, awaited: the replies, or the failure raised.

    Cancelled while it waits: the connection is dropped, which is what a caller
    whose cancellation means "Redis is too slow" (a timeout) wants. A caller
    cancelled for its own reasons, with others waiting on the same connection,
    passes `drop_if_cancelled=False`: its replies are still read, in order, and
    thrown away."""
    answer: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()

    def done(replies: list[Any] | BaseException) -> None:
        if answer.done():
            return
        if isinstance(replies, BaseException):
            answer.set_exception(replies)
        else:
            answer.set_result(replies)

    link.send(commands, done)
    try:
        return await answer
    except asyncio.CancelledError:
        if drop_if_cancelled:
            link.close(RedisConnectionError("a round trip to Redis was given up"))
        raise


class Channel:
    """A Link made when first needed and made again after it failed: what the writer,
    the inbox and the login throttle (xmppd.cluster.throttle) each keep."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._link: Link | None = None
        self._connecting: asyncio.Task[Link] | None = None

    async def link(self) -> Link:
        """The connection, made if there is none or it failed.

        Callers that come while it is being made wait for that one attempt and
        share its outcome, its failure too: each making its own would leave all
        but the last open for nobody. A caller that gives up waiting does not end
        the attempt for the others (the channel keeps what it makes)."""
        link = self._link
        if link is not None and not link.closed:
            return link
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.create_task(self._connect())
            connecting.add_done_callback(self._connected)
        return await asyncio.shield(connecting)

    async def _connect(self) -> Link:
        try:
            link = self._link = await connect(self.redis)
        except asyncio.CancelledError:
            # Only `release` cancels it: the callers waiting learn why from their call.
            raise RedisConnectionError("the channel was released while it connected") from None
        return link

    def _connected(self, attempt: asyncio.Task[Link]) -> None:
        if self._connecting is attempt:
            self._connecting = None

    async def call(
        self, commands: Sequence[Command], drop_if_cancelled: bool = True
    ) -> list[Any]:
        """Send `commands` in one round trip and return their answers in order (raw:
        bytes, ints, lists); an error Redis answered to one command is returned in
        its place. No commands: no answers, and no connection made for them. For
        `drop_if_cancelled`, see `call`."""
        if not commands:
            return []
        return await call(await self.link(), commands, drop_if_cancelled)

    async def release(self) -> None:
        """Close the connection, or end the attempt to make it: the task that used it
        stops, or wants a new one (the next call connects again)."""
        connecting, self._connecting = self._connecting, None
        if connecting is not None:
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
        link, self._link = self._link, None
        if link is not None:
            link.close(RedisConnectionError("the channel was released"))
