"""The batch window: input gathers while the loop is busy, and nothing else waits.

Each test runs a BatchingLoop of its own with a protocol on one end of a real
socket pair and a thread writing to the other end at set times. The windows
are long (hundreds of ms) so that a busy CI machine cannot blur what is
measured.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from xmppd.batchloop import BatchingLoop, input_hook
from xmppd.pauses import TICK, PauseMonitor

pytestmark = pytest.mark.timeout(30)


class Reader(asyncio.Protocol):
    """Notes when each read was handled; `on_read` runs for each."""

    def __init__(self, on_read: Callable[[bytes], None] | None = None) -> None:
        self.reads: list[tuple[float, bytes]] = []
        self.on_read = on_read
        self.note_input = input_hook(asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        self.note_input()
        self.reads.append((time.monotonic(), data))
        if self.on_read is not None:
            self.on_read(data)

    def handled(self, byte: bytes) -> float:
        return next(when for when, data in self.reads if byte in data)


async def write_later(sock: socket.socket, schedule: list[tuple[float, bytes]]) -> None:
    """Write each chunk at its offset (seconds) from now, from a thread, and return
    when the last one is written."""
    start = time.monotonic()

    def run() -> None:
        for offset, chunk in schedule:
            time.sleep(max(0.0, start + offset - time.monotonic()))
            sock.sendall(chunk)

    await asyncio.to_thread(run)


def run_on(window: float, main: Callable[[BatchingLoop], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=lambda: BatchingLoop(window)) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, BatchingLoop)
        return runner.run(main(loop))


async def reader_on(
    loop: BatchingLoop, on_read: Callable[[bytes], None] | None = None
) -> tuple[Reader, socket.socket]:
    ours, theirs = socket.socketpair()
    _, reader = await loop.connect_accepted_socket(lambda: Reader(on_read), ours)
    return reader, theirs


def burst(window: float) -> tuple[float, float, float]:
    """Three bytes 50 ms apart: when each was handled."""

    async def main(loop: BatchingLoop) -> tuple[float, float, float]:
        reader, theirs = await reader_on(loop)
        await write_later(theirs, [(0.0, b"a"), (0.05, b"b"), (0.1, b"c")])
        await asyncio.sleep(window + 0.2)
        theirs.close()
        return reader.handled(b"a"), reader.handled(b"b"), reader.handled(b"c")

    return run_on(window, main)  # type: ignore[no-any-return]


def test_input_that_comes_while_busy_waits_for_the_window() -> None:
    a, b, c = burst(0.3)
    # b and c came 50 and 100 ms after a: both waited for the window's end, together.
    assert b - a >= 0.25 and c - a >= 0.25
    assert abs(c - b) < 0.05


def test_without_a_window_input_is_handled_as_it_comes() -> None:
    a, b, c = burst(0.0)
    assert b - a < 0.25 and c - b > 0.02


def test_the_first_input_after_idle_is_handled_at_once() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float, float, float]:
        reader, theirs = await reader_on(loop)
        sent_a = time.monotonic()
        theirs.sendall(b"a")
        await asyncio.sleep(1.0)  # one window's wait, then idle: the turn disarms
        slept_while_idle = loop.slept
        sent_b = time.monotonic()
        theirs.sendall(b"b")
        await asyncio.sleep(0.5)
        theirs.close()
        return reader.handled(b"a") - sent_a, reader.handled(b"b") - sent_b, \
            slept_while_idle, loop.slept

    wait_a, wait_b, slept_idle, slept = run_on(0.3, main)
    assert wait_a < 0.15 and wait_b < 0.15
    # One window after each input, not a sleep per window all along the idle second.
    assert slept_idle < 0.45
    assert slept < 0.9


def test_work_queued_by_input_runs_before_the_loop_sleeps() -> None:
    async def main(loop: BatchingLoop) -> float:
        done: asyncio.Future[float] = loop.create_future()

        async def steps() -> None:
            for _ in range(20):
                await asyncio.sleep(0)  # each step is a callback queued on the loop
            done.set_result(time.monotonic())

        tasks = []
        reader, theirs = await reader_on(loop, lambda _: tasks.append(loop.create_task(steps())))
        theirs.sendall(b"a")
        finished = await asyncio.wait_for(done, 5)
        theirs.close()
        return finished - reader.handled(b"a")

    assert run_on(0.5, main) < 0.2


def test_a_loop_busy_for_longer_than_the_window_does_not_sleep() -> None:
    def busy(_: bytes) -> None:
        end = time.monotonic() + 0.06  # each read takes longer than the window
        while time.monotonic() < end:
            pass

    async def main(loop: BatchingLoop) -> tuple[float, int]:
        reader, theirs = await reader_on(loop, busy)
        await write_later(theirs, [(i * 0.02, b"x") for i in range(25)])
        await asyncio.sleep(0.3)
        theirs.close()
        return loop.slept, len(reader.reads)

    slept, reads = run_on(0.05, main)
    assert reads >= 5
    assert slept < 0.06  # at most the one window after the last read


def test_a_window_set_at_run_time_applies_from_the_next_input() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float]:
        reader, theirs = await reader_on(loop)
        loop.set_window(0.3)
        await write_later(theirs, [(0.0, b"a"), (0.05, b"b")])
        await asyncio.sleep(0.5)
        theirs.close()
        return reader.handled(b"a"), reader.handled(b"b")

    a, b = run_on(0.0, main)
    assert b - a >= 0.25


def test_the_windows_sleep_is_not_counted_as_loop_lag() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float]:
        monitor = PauseMonitor()
        monitor.start()
        try:
            _, theirs = await reader_on(loop)
            await write_later(theirs, [(i * 0.02, b"x") for i in range(60)])
            await asyncio.sleep(TICK)
            theirs.close()
        finally:
            monitor.stop()
        return loop.slept, monitor.loop_lag.worst

    slept, worst_lag = run_on(0.3, main)
    assert slept > 0.6  # the loop did sleep through ticks' due times
    assert worst_lag < 0.1
