"""A link receiver (xmppd.cluster.link.Inbound) with a long backlog (frames that waited
for the sender's Redis items) handles it in slices, the event loop turning between
them, in order."""

from __future__ import annotations

import asyncio

import pytest

from xmppd.cluster.link import YIELD_EVERY, Inbound, Link
from xmppd.cluster.stats import ClusterStats

pytestmark = pytest.mark.timeout(10)


class Handled:
    """Stands in for the ItemHandler: records what it is given."""

    def __init__(self) -> None:
        self.items: list[bytes] = []

    def handle(self, items: list[dict[bytes, bytes]]) -> None:
        self.items += [item[b"stanza"] for item in items]


async def test_a_long_backlog_is_handled_in_slices_in_order() -> None:
    link = Link("node-b", "127.0.0.1", 0, None, ClusterStats(), sync=None)  # type: ignore[arg-type]
    link.live = lambda: True
    handled = Handled()
    link.items = handled  # type: ignore[assignment]
    link.inbox = object()  # type: ignore[assignment]  # frames below wait for nothing
    inbound = Inbound(link)
    inbound.peer = "node-a"
    total = 3 * YIELD_EVERY + 7
    for seq in range(1, total + 1):
        inbound._backlog.append((seq, 0, 0, [b"to", b"u@x/r", b"stanza", str(seq).encode()]))
    inbound._process()
    assert len(handled.items) == YIELD_EVERY  # the rest after the loop turns
    for _ in range(10):
        await asyncio.sleep(0)
    assert handled.items == [str(seq).encode() for seq in range(1, total + 1)]
    assert inbound.last == total
    inbound.connection_lost(None)
