"""xmppd.cluster.settle: an account's removal waits for the other nodes' answers, and
gives up on a node that cannot answer (gone from the cluster, or past the time limit).

The nodes talk through an in-memory bus that delivers each notice to every other
node on the next loop turn, as Redis pub/sub does (never back to the sender)."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from xmppd.cluster.bus import Handler, Lost, Payload
from xmppd.cluster.settle import AccountSettling

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


def node(wire: Wire, name: str, settled: list[str], gate: asyncio.Event) -> AccountSettling:
    async def settle_here(bare: str) -> None:
        await gate.wait()
        settled.append(f"{name} {bare}")

    return AccountSettling(wire.bus(name), lambda: name, settle_here, asyncio.ensure_future)


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
