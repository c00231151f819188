"""storage/turns.py: a cap on calls under way, per calling loop."""

from __future__ import annotations

import asyncio

from xmppd.storage.turns import Turns


async def test_at_most_limit_under_way_and_the_rest_in_order() -> None:
    turns = Turns(2)
    release = asyncio.Event()
    under_way = peak = 0
    started: list[int] = []

    async def call(n: int) -> None:
        nonlocal under_way, peak
        async with turns():
            under_way += 1
            peak = max(peak, under_way)
            started.append(n)
            await release.wait()
            under_way -= 1

    tasks = [asyncio.create_task(call(n)) for n in range(6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert started == [0, 1]
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2
    assert started == list(range(6))


def test_each_loop_counts_its_own_turns() -> None:
    turns = Turns(1)

    async def hold_one() -> asyncio.Semaphore:
        gate = turns()
        assert turns() is gate  # the same gate for every call from this loop
        await gate.acquire()  # held when the loop ends: the next loop is not affected
        return gate

    first = asyncio.run(hold_one())
    second = asyncio.run(hold_one())
    assert first is not second
