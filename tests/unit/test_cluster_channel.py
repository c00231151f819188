"""The cluster's own Redis connection (xmppd.cluster.channel.Link): replies, however the
bytes arrive, complete each round trip in the order it was sent, with every reply in
its command's place (an error reply as redis-py's exception, a nil as None); a lost
connection or a reply nobody asked for fails what waits, never leaves it hanging."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, OutOfMemoryError

from xmppd.cluster import channel as channel_module
from xmppd.cluster.channel import Channel, Link


class Transport(asyncio.Transport):
    """What the link writes, and whether it was cut."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def abort(self) -> None:
        self.aborted = True


def link() -> tuple[Link, Transport]:
    made = Link()
    transport = Transport()
    made.connection_made(transport)
    return made, transport


def trip(made: Link, commands: list[tuple[Any, ...]]) -> list[Any]:
    """Send `commands`; the list gets the replies (or the failure) once they come."""
    answers: list[Any] = []
    made.send(commands, answers.append)
    return answers


def test_round_trips_complete_in_order_whatever_the_chunks() -> None:
    made, transport = link()
    first = trip(made, [("GET", "a"), ("EVALSHA", "x", 0), ("GET", "b")])
    second = trip(made, [("XREAD", "STREAMS", "s", "0-0")])
    assert transport.written.startswith(b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n")
    replies = (
        b"$-1\r\n"  # nil: a reply, not "nothing parsed yet"
        b"-NOSCRIPT No matching script.\r\n"
        b":0\r\n"
        b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    )
    for n in range(len(replies)):  # one byte at a time: every cut is a cut somewhere
        made.data_received(replies[n : n + 1])
        if n < len(replies) - 1:
            assert len(second) == 0
    [answer] = first
    assert answer[0] is None
    assert isinstance(answer[1], NoScriptError)
    assert answer[2] == 0
    assert second == [[[[b"s", [[b"1-1", [b"f", b"v"]]]]]]]
    assert not made.closed


def test_an_error_reply_keeps_its_place() -> None:
    made, _ = link()
    answers = trip(made, [("SET", "a", "1"), ("EVALSHA", "f", 0), ("PING",)])
    made.data_received(b"+OK\r\n-OOM command not allowed\r\n+PONG\r\n")
    [[ok, oom, pong]] = answers
    assert (ok, pong) == (b"OK", b"PONG")
    assert isinstance(oom, OutOfMemoryError)  # a ResponseError, as redis-py makes it


def test_a_lost_connection_fails_what_waits_and_what_comes_after() -> None:
    made, transport = link()
    waiting = trip(made, [("PING",), ("PING",)])
    made.data_received(b"+PONG\r\n")  # half the round trip
    made.connection_lost(ConnectionResetError())
    assert made.closed and transport.aborted
    assert isinstance(waiting[0], RedisConnectionError)
    later = trip(made, [("PING",)])
    assert isinstance(later[0], RedisConnectionError)


def test_a_reply_nobody_asked_for_drops_the_connection() -> None:
    made, transport = link()
    answered = trip(made, [("PING",)])
    waiting = trip(made, [("PING",)])
    made.data_received(b"+PONG\r\n+PONG\r\n+PONG\r\n")
    assert answered == [[b"PONG"]] and waiting == [[b"PONG"]]
    assert made.closed and transport.aborted


def test_unparsable_bytes_drop_the_connection() -> None:
    made, _ = link()
    waiting = trip(made, [("PING",)])
    made.data_received(b"?what\r\n")
    assert made.closed
    assert isinstance(waiting[0], RedisConnectionError)


def test_no_commands_get_no_replies_at_once_and_the_next_round_trip_its_own() -> None:
    made, transport = link()
    empty = trip(made, [])
    assert empty == [[]] and transport.written == b""
    after = trip(made, [("PING",)])
    made.data_received(b"+PONG\r\n")
    assert after == [[b"PONG"]]
    assert not made.closed


async def test_a_channel_answers_no_commands_without_connecting() -> None:
    channel = Channel(Redis.from_url("redis://127.0.0.1:1"))  # nothing listens there
    async with asyncio.timeout(5):
        assert await channel.call([]) == []
    assert channel._link is None


class Connects:
    """`connect` for Channel.link: counts the attempts; each waits until told how it ends."""

    def __init__(self) -> None:
        self.attempts = 0
        self.started = asyncio.Event()
        self.outcome: asyncio.Future[Link] | None = None

    async def __call__(self, redis: Redis) -> Link:
        self.attempts += 1
        self.outcome = asyncio.get_running_loop().create_future()
        self.started.set()
        return await self.outcome


def channel_with(connects: Connects, monkeypatch: pytest.MonkeyPatch) -> Channel:
    monkeypatch.setattr(channel_module, "connect", connects)
    return Channel(Redis.from_url("redis://127.0.0.1:1"))


async def test_callers_that_come_while_it_connects_share_one_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connects = Connects()
    channel = channel_with(connects, monkeypatch)
    first = asyncio.create_task(channel.link())
    second = asyncio.create_task(channel.link())
    await connects.started.wait()
    assert connects.outcome is not None
    made, _ = link()
    connects.outcome.set_result(made)
    async with asyncio.timeout(5):  # each caller with a connection of its own: one waits on
        assert await first is made and await second is made
    assert await channel.link() is made
    assert connects.attempts == 1


async def test_callers_that_come_while_it_connects_share_its_failure_then_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connects = Connects()
    channel = channel_with(connects, monkeypatch)
    callers = [asyncio.create_task(channel.link()) for _ in range(2)]
    await connects.started.wait()
    assert connects.outcome is not None
    refused = RedisConnectionError("connecting to Redis failed: refused")
    connects.outcome.set_exception(refused)
    async with asyncio.timeout(5):
        failures = await asyncio.gather(*callers, return_exceptions=True)
    assert failures == [refused, refused] and connects.attempts == 1
    connects.started.clear()
    again = asyncio.create_task(channel.link())
    await connects.started.wait()
    assert connects.attempts == 2
    await channel.release()
    with pytest.raises(RedisConnectionError):
        await again


async def test_a_caller_that_gives_up_leaves_the_attempt_to_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connects = Connects()
    channel = channel_with(connects, monkeypatch)
    quitter = asyncio.create_task(channel.link())
    patient = asyncio.create_task(channel.link())
    await connects.started.wait()
    quitter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await quitter
    assert connects.outcome is not None and not connects.outcome.cancelled()
    made, _ = link()
    connects.outcome.set_result(made)
    assert await patient is made and connects.attempts == 1


async def test_releasing_while_it_connects_ends_the_attempt_and_fails_its_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    connects = Connects()
    channel = channel_with(connects, monkeypatch)
    caller = asyncio.create_task(channel.link())
    await connects.started.wait()
    await channel.release()
    assert connects.outcome is not None and connects.outcome.cancelled()
    with pytest.raises(RedisConnectionError):
        await caller
