"""The server's event loop: uvloop, letting input gather for a short window while busy.

Why: each time the loop wakes from idle it pays a fixed cost (on a shared
host mostly refilling cold CPU caches) whatever it carries, and at a few
thousand stanzas a second a wake-up carries one or two. Measured on this
project's bench (docs/bench.md, "A batch window"), on one core: a 10 ms
window took a chat message at 3000 msg/s over 1000 TLS clients from 85 to
70 us of CPU, and a message crossing two cluster nodes at 1000 msg/s from
286 to 147 us. Interrupt moderation on network cards makes the same trade.

How: once input comes from more than one source (a protocol calls
`note_input` with itself on each read; a cluster link's read carries many
clients' stanzas and counts as several), the loop handles it at once, then,
when nothing else is queued, sleeps until `window` has passed since it last
polled, and polls again: what arrived meanwhile is handled in one turn.
Callbacks queued through call_soon (task steps, flushes) run before the
loop sleeps (uvloop's own, like a new connection's connection_made, are not
seen and may wait like input), and one queued by another thread (a key
derivation's or a store's result) ends the sleep, so what waits is input (a
client's, or a reply from Redis or memcached), at most `window`, and timers
due meanwhile. One client's round trips (a login, a ping on a quiet server)
never arm it, a loop busy for longer than the window never sleeps, and a
turn with no new input disarms it: the loop then blocks in the kernel as
usual and handles its next input at once. A window of 0 turns this off; a
reload sets `window` on the running loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
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
        self.window = window
        self.slept = 0.0
        self.last_sleep = (0.0, 0.0)
        self._armed = False
        self._queued = 0  # callbacks queued through call_soon, ever
        self._queued_at_turn = 0
        self._polled = 0.0  # when the loop last looked for input, roughly
        self._source: object = None  # whose input came last
        self._sources = 0  # changes of source since the last turn that slept or disarmed
        self._woken = threading.Event()  # set by other threads' callbacks: ends a sleep
        self._context = contextvars.Context()  # the turn's: not a copy of whoever armed it

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
        # A thread's result (a key derivation, a store's call) ends a sleep at once:
        # only input waits for the window. Counted before the event is set, so a turn
        # that clears the event and then finds the count unchanged cannot miss it.
        handle = super().call_soon_threadsafe(callback, *args, context=context)
        self._queued += 1  # racing another thread's increment only costs one sleep's delay
        self._woken.set()
        return handle

    def note_input(self, source: object) -> None:
        """A protocol read something; `source` is the protocol. The loop gathers only
        while input comes from more than one source: one client's round trips (a
        login, a ping) gain nothing from waiting and are never held."""
        if source is not self._source:
            self._source = source
            self._sources += 1
            if self._sources > 1 and not self._armed and self.window > 0:
                self._arm()

    def note_shared_input(self) -> None:
        """A read that carries many clients' stanzas (a cluster link): counts as input
        from several sources."""
        self._source = None
        self._sources += 2
        if not self._armed and self.window > 0:
            self._arm()

    def _arm(self) -> None:
        self._armed = True
        self._polled = monotonic()  # the loop has just polled: it woke for this input
        self._queued_at_turn = self._queued
        super().call_soon(self._turn, context=self._context)

    def _turn(self) -> None:
        """Runs once per loop iteration while armed, ahead of what the iteration's
        input queued; sleeps only when nothing was queued since its last run."""
        self._woken.clear()
        if self._queued != self._queued_at_turn:
            self._queued_at_turn = self._queued
            super().call_soon(self._turn, context=self._context)
            return
        sources, self._sources, self._source = self._sources, 0, None
        if self.window <= 0 or sources < 2:
            self._armed = False  # idle, one client, or off: block in the kernel until input
            return
        now = monotonic()
        rest = self._polled + self.window - now
        if rest > 0:
            self._woken.wait(rest)
            end = monotonic()
            self.slept += end - now
            self.last_sleep = (now, end)
            now = end
        self._polled = now
        super().call_soon(self._turn, context=self._context)


def _no_batching(source: object = None) -> None:
    pass


def input_hook(loop: Any) -> Callable[[object], None]:
    """What a client's protocol calls on each read, with itself: the loop's
    `note_input`, or nothing on another loop (tests run servers on asyncio's own)."""
    return loop.note_input if isinstance(loop, BatchingLoop) else _no_batching


def shared_input_hook(loop: Any) -> Callable[[], None]:
    """The same for a protocol whose reads carry many clients' stanzas (a cluster link)."""
    return loop.note_shared_input if isinstance(loop, BatchingLoop) else _no_batching


def sleep_overlap(loop: Any, since: float, until: float) -> float:
    """How much of [since, until] (time.monotonic) the loop spent in its latest
    gathering sleep: a timer late by that much was late by design, not lag."""
    if not isinstance(loop, BatchingLoop):
        return 0.0
    start, end = loop.last_sleep
    return max(0.0, min(end, until) - max(start, since))
