"""The server's event loop: uvloop, letting input gather for a short window while busy.

Why: each time the loop wakes from idle it pays a fixed cost (on a shared
host mostly refilling cold CPU caches) whatever it carries, and at a few
thousand stanzas a second a wake-up carries one or two. Measured on this
project's bench (docs/bench.md, "A batch window"), on one core: a 10 ms
window took a chat message at 3000 msg/s over 1000 TLS clients from 85 to
70 us of CPU, and a message crossing two cluster nodes at 1000 msg/s from
286 to 147 us. Interrupt moderation on network cards makes the same trade.

How: once input arrives (a protocol calls `note_input`), the loop handles it
at once, then, when nothing else is queued, sleeps until `window` has passed
since it last polled, and polls again: what arrived meanwhile is handled in
one turn. Work already queued (callbacks, task steps, writes) always runs
before the loop sleeps, so only new input (and timers due during the sleep)
waits, at most `window`. A loop busy for longer than the window never sleeps,
and a turn with no new input disarms it: an idle server blocks in the kernel
as usual and handles its next input at once. A window of 0 turns this off.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from typing import Any, TypeVarTuple

import uvloop

monotonic = time.monotonic
_Ts = TypeVarTuple("_Ts")


class BatchingLoop(uvloop.Loop):  # type: ignore[misc]  # uvloop's Loop is untyped
    """uvloop with a batch window (seconds; 0: none). `slept` totals the gathering
    sleeps and `last_sleep` is the latest as (start, end) on time.monotonic's clock,
    so that the loop-lag monitor does not count them as lag."""

    def __init__(self, window: float) -> None:
        super().__init__()
        self.window = 0.0
        self.input_seen = True  # input since the last turn; pinned True while the window is 0
        self.slept = 0.0
        self.last_sleep = (0.0, 0.0)
        self._armed = False
        self._queued = 0  # callbacks queued through call_soon, ever
        self._queued_at_turn = 0
        self._polled = 0.0  # when the loop last looked for input, roughly
        self.set_window(window)

    def set_window(self, window: float) -> None:
        """Change the window (a reload may): from the next input on."""
        self.window = window
        self.input_seen = window <= 0

    def call_soon(
        self,
        callback: Callable[[*_Ts], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        # Counted so that a turn knows whether anything else is queued behind it:
        # uvloop does not tell the length of its ready queue.
        self._queued += 1
        return super().call_soon(callback, *args, context=context)

    def call_soon_threadsafe(
        self,
        callback: Callable[[*_Ts], object],
        *args: *_Ts,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        self._queued += 1  # racing another thread's increment only costs one sleep's delay
        return super().call_soon_threadsafe(callback, *args, context=context)

    def note_input(self) -> None:
        """A protocol read something: arm the turn if it is not armed."""
        if self.input_seen:
            return
        self.input_seen = True
        if not self._armed:
            self._armed = True
            self._polled = monotonic()  # the loop has just polled: it woke for this input
            self._queued_at_turn = self._queued
            super().call_soon(self._turn)

    def _turn(self) -> None:
        """Runs once per loop iteration while armed, ahead of what the iteration's
        input queued; sleeps only when nothing was queued since its last run."""
        if self._queued != self._queued_at_turn:
            self._queued_at_turn = self._queued
            super().call_soon(self._turn)
            return
        if self.window <= 0 or not self.input_seen:
            self._armed = False  # idle (or turned off): block in the kernel until input
            return
        self.input_seen = False
        now = monotonic()
        rest = self._polled + self.window - now
        if rest > 0:
            time.sleep(rest)
            end = monotonic()
            self.slept += end - now
            self.last_sleep = (now, end)
            now = end
        self._polled = now
        super().call_soon(self._turn)


def _no_batching() -> None:
    pass


def input_hook(loop: Any) -> Callable[[], None]:
    """What a protocol calls on each read: the loop's `note_input`, or nothing on
    another loop (tests run servers on asyncio's own)."""
    return loop.note_input if isinstance(loop, BatchingLoop) else _no_batching


def sleep_overlap(loop: Any, since: float, until: float) -> float:
    """How much of [since, until] (time.monotonic) the loop spent in its latest
    gathering sleep: a timer late by that much was late by design, not lag."""
    if not isinstance(loop, BatchingLoop):
        return 0.0
    start, end = loop.last_sleep
    return max(0.0, min(end, until) - max(start, since))
