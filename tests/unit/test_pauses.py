"""The loop-lag and collector-pause monitor measures what kept the loop from running."""

from __future__ import annotations

import asyncio
import gc
import time

from xmppd.pauses import TICK, PauseMonitor, PauseStats


def test_stats_bucket_count_and_worst() -> None:
    stats = PauseStats()
    for seconds in (0.0005, 0.003, 0.02, 0.2, 2.0):
        stats.add(seconds)
    assert stats.buckets == [1, 1, 0, 1, 0, 1, 0, 1]
    assert (stats.count, stats.worst, stats.over(0.01), stats.over(0.1)) == (5, 2.0, 3, 2)
    assert abs(stats.total - 2.2235) < 1e-9


async def test_a_blocked_loop_and_a_collection_are_measured() -> None:
    monitor = PauseMonitor()
    monitor.start()
    try:
        await asyncio.sleep(TICK * 1.5)  # one timely tick
        time.sleep(0.25)  # noqa: ASYNC251 -- blocking the loop is what is measured
        await asyncio.sleep(TICK * 1.5)
        gc.collect()
    finally:
        monitor.stop()
    lag = monitor.loop_lag
    assert lag.count >= 2
    assert lag.worst >= 0.1 and lag.over(0.1) == 1
    assert monitor.gc.count >= 1 and monitor.gc.total > 0
    assert monitor._on_gc not in gc.callbacks
