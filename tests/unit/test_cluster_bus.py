"""The cluster bus's message handling, without Redis: encoding, filtering, flushing."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from xmppd.cluster.bus import MAX_PENDING, RedisBus, encode, encode_lost


def bus_with_recorders(node: str = "n1") -> tuple[RedisBus, list[Any], list[str]]:
    """A bus (never connected) with one topic's handler and lost callback recording."""
    bus = RedisBus(Redis(), node)
    heard: list[Any] = []
    lost: list[str] = []
    bus.subscribe("cache", heard.append, lambda: lost.append("cache"))
    bus.subscribe("privacy", heard.append, lambda: lost.append("privacy"))
    return bus, heard, lost


async def test_a_notice_reaches_its_topic_s_handlers_only() -> None:
    bus, heard, lost = bus_with_recorders()
    bus.receive(encode("n2", "cache", {"key": "k", "ttl": 5}))
    bus.receive(encode("n2", "unknown-topic", {"x": 1}))
    assert heard == [{"key": "k", "ttl": 5}]
    assert lost == []


async def test_a_node_never_hears_its_own_notices() -> None:
    bus, heard, lost = bus_with_recorders("n1")
    bus.receive(encode("n1", "cache", {"key": "k"}))
    bus.receive(encode_lost("n1"))
    assert heard == [] and lost == []


async def test_a_lost_notice_flushes_every_topic() -> None:
    bus, heard, lost = bus_with_recorders()
    bus.receive(encode_lost("n2"))
    assert sorted(lost) == ["cache", "privacy"]
    assert bus.resets == 1


async def test_malformed_notices_and_failing_handlers_are_logged_not_raised() -> None:
    bus, heard, _ = bus_with_recorders()

    def broken(payload: Any) -> None:
        raise RuntimeError("boom")

    bus.subscribe("cache", broken, lambda: None)
    for data in (b"not json", b"{}", json.dumps({"node": "n2", "topic": "cache", "data": [1]})):
        bus.receive(data)
    bus.receive(encode("n2", "cache", {"key": "k"}))  # the next handler still runs
    assert heard == [{"key": "k"}]


async def test_an_overflowing_queue_becomes_one_lost_notice() -> None:
    bus, _, _ = bus_with_recorders()
    for n in range(MAX_PENDING + 3):
        bus.publish("cache", {"n": n})
    assert bus._overflowed  # sent first once Redis answers: every other node flushes
    assert len(bus._queue) == 3  # what came after the drop
