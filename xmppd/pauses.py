"""How long the event loop could not run: loop lag and garbage-collector pauses.

A message's latency is queueing behind whatever keeps the loop from running:
our own work, a collection, or the kernel giving the CPU to someone else.
These two measures tell the first two apart for an operator (in /metrics) and
for the benchmark (in the stop line); time spent waiting for a CPU is the
kernel's to tell (/proc/PID/schedstat), and the bench reads it there.

Loop lag is sampled by a timer every TICK seconds: how late it fires. The
collector's pauses come from gc.callbacks, which run on the thread that
collects, around each collection. Both cost nothing per message. The sleep of
a batch window (xmppd.batchloop) delays the timer on purpose and is not lag.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import time
from typing import Any

from xmppd.batchloop import sleep_overlap

TICK = 0.1  # seconds between loop-lag samples


BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)  # seconds; a Prometheus histogram's bounds


class PauseStats:
    """A histogram of one kind of pause (or latency), in seconds: counts per bucket
    (`bounds`, default BUCKETS), total, worst."""

    __slots__ = ("bounds", "buckets", "count", "total", "worst")

    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.total = 0.0
        self.worst = 0.0

    def add(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.worst:
            self.worst = seconds

    def over(self, seconds: float) -> int:
        """How many pauses were longer than `seconds` (one of the bounds)."""
        return sum(self.buckets[self.bounds.index(seconds) + 1 :])

    def snapshot(self) -> dict[str, float]:
        return {
            "count": self.count,
            "total_s": round(self.total, 4),
            "worst_s": round(self.worst, 4),
            "over_10ms": self.over(0.01),
            "over_100ms": self.over(0.1),
        }


class PauseMonitor:
    def __init__(self) -> None:
        self.loop_lag = PauseStats()  # how late each TICK timer fired
        self.gc = PauseStats()  # each collection, any generation
        self._gc_started = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self._due = time.monotonic() + TICK
        self._handle = asyncio.get_running_loop().call_later(TICK, self._tick)

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        late = now - self._due - sleep_overlap(loop, self._due, now)  # a batch window's wait
        self.loop_lag.add(max(0.0, late))  # is by design, not lag
        self._due = now + TICK
        self._handle = loop.call_later(TICK, self._tick)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc.add(time.perf_counter() - self._gc_started)

    def snapshot(self) -> dict[str, dict[str, float]]:
        return {"loop_lag": self.loop_lag.snapshot(), "gc": self.gc.snapshot()}
