"""xmppd.cluster.settle: an account's removal waits for the other nodes' answers, and
gives up on a node that cannot answer (gone from the cluster, or past the time limit),
and on all of them once Redis, which carries the answers, does not answer either.

The nodes talk through an in-memory bus that delivers each notice to every other
node on the next loop turn, as Redis pub/sub does (never back to the sender)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable

import pytest

from xmppd.cluster import settle
from xmppd.cluster.bus import Handler, Lost, Payload
from xmppd.cluster.settle import AccountSettling, RedisSilent

pytestmark = pytest.mark.timeout(10)


class Wire:
    """Every node's bus: what one publishes, the others' subscribers get."""

    def __init__(self) -> None:
        self.handlers: dict[str, dict[str, list[Handler]]] = defaultdict(lambda: defaultdict(list))

    def bus(self, node: str) -> NodeBus:
        return NodeBus(self, node)


class NodeBus:
    def __init__(self, wire: Wire, node: str) -> None:
        self.wire, self.node = wire, node

    def publish(self, topic: str, payload: Payload) -> None:
        loop = asyncio.get_running_loop()
        for node, topics in self.wire.handlers.items():
            if node != self.node:
                for handler in topics[topic]:
                    loop.call_soon(handler, dict(payload))

    def subscribe(self, topic: str, handler: Handler, lost: Lost) -> None:
        self.wire.handlers[self.node][topic].append(handler)

    async def sent(self) -> None:
        return None


async def redis_answers() -> None:
    return None


def node(
    wire: Wire,
    name: str,
    settled: list[str],
    gate: asyncio.Event,
    probe: Callable[[], Awaitable[str | None]] = redis_answers,
) -> AccountSettling:
    async def settle_here(bare: str) -> None:
        await gate.wait()
        settled.append(f"{name} {bare}")

    return AccountSettling(
        wire.bus(name), lambda: name, settle_here, asyncio.ensure_future, probe
    )


async def test_the_asker_waits_until_every_other_node_settled_the_account() -> None:
    wire, settled, gate = Wire(), list[str](), asyncio.Event()
    a = node(wire, "a", settled, gate)
    node(wire, "b", settled, gate)
    node(wire, "c", settled, gate)
    asking = asyncio.ensure_future(a.elsewhere("zed@x", lambda: frozenset("abc"), 5.0))
    await asyncio.sleep(0.2)
    assert not asking.done()  # b and c still work for zed
    gate.set()
    assert await asking == frozenset()
    assert sorted(settled) == ["b zed@x", "c zed@x"]  # not a: it settles itself


async def test_a_node_that_cannot_answer_is_waited_for_only_while_it_is_live() -> None:
    wire, settled, gate = Wire(), list[str](), asyncio.Event()
    gate.set()
    a = node(wire, "a", settled, gate)
    node(wire, "b", settled, gate)  # "c" is listed but hears nothing: killed
    live = {"a", "b", "c"}
    assert await a.elsewhere("zed@x", lambda: frozenset(live), 0.3) == {"c"}
    asking = asyncio.ensure_future(a.elsewhere("zed@x", lambda: frozenset(live), 5.0))
    await asyncio.sleep(0.2)
    live.discard("c")  # its heartbeat expired
    assert await asyncio.wait_for(asking, 2.0) == frozenset()


async def test_a_node_alone_asks_nobody() -> None:
    wire, settled, gate = Wire(), list[str](), asyncio.Event()
    a = node(wire, "a", settled, gate)
    assert await a.elsewhere("zed@x", lambda: frozenset(), 5.0) == frozenset()
    assert await a.elsewhere("zed@x", lambda: frozenset({"a"}), 5.0) == frozenset()


async def test_the_asker_stops_waiting_once_redis_does_not_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """b works for zed (its gate shut) and c hears nothing: while Redis answers, a keeps
    waiting; at the first look after Redis stops answering, it gives up, naming the
    problem and the nodes it did not hear, well before its own bound."""
    monkeypatch.setattr(settle, "RECHECK", 0.05)
    wire, settled, gate = Wire(), list[str](), asyncio.Event()
    problem: list[str] = []
    looks = asyncio.Event()

    async def probe() -> str | None:
        looks.set()
        return problem[0] if problem else None

    a = node(wire, "a", settled, gate, probe)
    node(wire, "b", settled, gate)
    asking = asyncio.ensure_future(a.elsewhere("zed@x", lambda: frozenset("abc"), 60.0))
    await asyncio.wait_for(looks.wait(), 5)
    looks.clear()
    await asyncio.wait_for(looks.wait(), 5)  # a second look, Redis answering: still waits
    assert not asking.done()
    problem.append("Redis at redis://r did not answer within 2 s")
    with pytest.raises(RedisSilent) as silent:
        await asyncio.wait_for(asking, 5)
    assert silent.value.problem == "Redis at redis://r did not answer within 2 s"
    assert silent.value.nodes == {"b", "c"}
