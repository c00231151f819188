"""A cap on the calls a backend has handed to another thread at once.

Why it exists: a call handed over (to the SQLite worker thread, to the AWS I/O
loop) keeps a dozen or more objects alive until it is done: futures on both
sides, the executor's lock and condition, closures that chain one future to
the other. Handed over all at once, 1,000 calls in flight kept about 35,000
objects, which every young-generation collection walked: 6-10 ms of the
serving loop each time on a 2.5 GHz core. A call that waits for its turn on
the caller's loop keeps one future, and the worker is no less busy.
"""

from __future__ import annotations

import asyncio
import weakref


class Turns:
    """`async with turns():` waits until fewer than `limit` calls are under way.

    Counted per calling loop, because asyncio primitives belong to one loop: the
    server has one; tests and tools that share a backend between loops get a
    cap per loop, and the worker queues what exceeds it as it did before."""

    __slots__ = ("limit", "_gates")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    def __call__(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            gate = self._gates[loop] = asyncio.Semaphore(self.limit)
        return gate
