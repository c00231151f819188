"""The batch window: input from several clients gathers while the loop is busy, and
nothing else waits.

Each test runs a BatchingLoop of its own with protocols on one end of real socket
pairs and a thread writing to the other ends at set times. The windows are long
(half a second) so that a busy CI machine cannot blur what is measured.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from xmppd.batchloop import BatchingLoop, input_hook
from xmppd.pauses import TICK, PauseMonitor

pytestmark = pytest.mark.timeout(30)

WINDOW = 0.5


class Reader(asyncio.Protocol):
    """Notes when each read was handled; `on_read` runs for each."""

    def __init__(self, on_read: Callable[[bytes], None] | None = None) -> None:
        self.reads: list[tuple[float, bytes]] = []
        self.on_read = on_read
        self.note_input = input_hook(asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        self.note_input(self)
        self.reads.append((time.monotonic(), data))
        if self.on_read is not None:
            self.on_read(data)

    def handled(self, byte: bytes) -> float:
        return next(when for when, data in self.reads if byte in data)


async def write_later(schedule: list[tuple[float, socket.socket, bytes]]) -> None:
    """Write each chunk to its socket at its offset (seconds) from the thread's start,
    from a thread; return when the last one is written. Not through to_thread: a
    thread's result ends the loop's sleep, which would blur what is measured."""

    def run() -> None:
        start = time.monotonic()
        for offset, sock, chunk in schedule:
            time.sleep(max(0.0, start + offset - time.monotonic()))
            sock.sendall(chunk)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():  # noqa: ASYNC110 -- an Event set from the thread would end
        await asyncio.sleep(0.05)  # the loop's sleep (call_soon_threadsafe), blurring it


def run_on(window: float, main: Callable[[BatchingLoop], Coroutine[Any, Any, Any]]) -> Any:
    with asyncio.Runner(loop_factory=lambda: BatchingLoop(window)) as runner:
        loop = runner.get_loop()
        assert isinstance(loop, BatchingLoop)
        return runner.run(main(loop))


async def readers_on(
    loop: BatchingLoop, count: int, on_read: Callable[[bytes], None] | None = None
) -> tuple[list[Reader], list[socket.socket]]:
    """`count` connections (clients), each a Reader on the loop's end."""
    readers, theirs = [], []
    for _ in range(count):
        ours, other = socket.socketpair()
        _, reader = await loop.connect_accepted_socket(lambda: Reader(on_read), ours)
        readers.append(reader)
        theirs.append(other)
    return readers, theirs


def burst(window: float) -> tuple[float, float, float]:
    """a from one client, x from another just after (the loop has two sources now),
    then b and c 120 and 240 ms after a: when a, b and c were handled."""

    async def main(loop: BatchingLoop) -> tuple[float, float, float]:
        (one, two), (s1, s2) = await readers_on(loop, 2)
        await write_later([(0.0, s1, b"a"), (0.02, s2, b"x"), (0.12, s1, b"b"), (0.24, s2, b"c")])
        await asyncio.sleep(window + 0.3)
        s1.close()
        s2.close()
        return one.handled(b"a"), one.handled(b"b"), two.handled(b"c")

    return run_on(window, main)  # type: ignore[no-any-return]


def test_input_from_several_clients_waits_for_the_window_while_busy() -> None:
    a, b, c = burst(WINDOW)
    # b and c came 120 and 240 ms after a: both waited for the window's end, together.
    assert b - a >= 0.4 and c - a >= 0.4
    assert abs(c - b) < 0.1


def test_without_a_window_input_is_handled_as_it_comes() -> None:
    a, b, c = burst(0.0)
    assert b - a < 0.4 and c - b > 0.05


async def round_trips(reader: Reader, sock: socket.socket, count: int = 10) -> list[float]:
    """A client in a thread of its own sends a byte, waits until the loop has handled
    it, sends the next: how long each waited."""
    waits: list[float] = []

    def run() -> None:
        for i in range(count):
            sent = time.monotonic()
            sock.sendall(bytes([65 + i]))
            while len(reader.reads) <= i:
                time.sleep(0.001)
            waits.append(reader.reads[i][0] - sent)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():  # noqa: ASYNC110 -- an Event set from the thread would end
        await asyncio.sleep(0.05)  # the loop's sleep (call_soon_threadsafe), blurring it
    return waits


def test_one_clients_round_trips_are_never_held() -> None:
    async def main(loop: BatchingLoop) -> list[float]:
        (reader,), (sock,) = await readers_on(loop, 1)
        waits = await round_trips(reader, sock)
        sock.close()
        return waits

    waits = run_on(WINDOW, main)
    assert len(waits) == 10 and max(waits) < 0.2


def test_once_only_one_client_sends_its_round_trips_are_not_held() -> None:
    async def main(loop: BatchingLoop) -> list[float]:
        (reader, _), (sock, other) = await readers_on(loop, 2)
        other.sendall(b"x")  # two clients: the window is armed
        waits = await round_trips(reader, sock)
        sock.close()
        other.close()
        return waits

    waits = run_on(WINDOW, main)
    assert len(waits) == 10
    assert sum(wait >= 0.2 for wait in waits) <= 1  # at most the window armed by both


def test_the_first_input_after_idle_is_handled_at_once() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float, float, float]:
        (one, two), (s1, s2) = await readers_on(loop, 2)
        sent = time.monotonic()
        s1.sendall(b"a")
        s2.sendall(b"x")
        await asyncio.sleep(2.0)  # one window's wait, then idle: the turn disarms
        slept_while_idle = loop.slept
        sent_b = time.monotonic()
        s1.sendall(b"b")
        await asyncio.sleep(0.5)
        s1.close()
        s2.close()
        return one.handled(b"a") - sent, one.handled(b"b") - sent_b, \
            slept_while_idle, loop.slept

    wait_a, wait_b, slept_idle, slept = run_on(WINDOW, main)
    assert wait_a < 0.2 and wait_b < 0.2
    # One window after the burst, not a sleep per window all along the idle time.
    assert slept_idle < 2 * WINDOW
    assert slept < 2 * WINDOW


def test_work_queued_by_input_runs_before_the_loop_sleeps() -> None:
    async def main(loop: BatchingLoop) -> float:
        done: asyncio.Future[float] = loop.create_future()

        async def steps() -> None:
            for _ in range(20):
                await asyncio.sleep(0)  # each step is a callback queued on the loop
            done.set_result(time.monotonic())

        tasks = []
        (_, two), (s1, s2) = await readers_on(
            loop, 2, lambda data: tasks.append(loop.create_task(steps())) if data == b"x" else None
        )
        s1.sendall(b"a")
        s2.sendall(b"x")  # the second source arms the window; its read starts the steps
        finished = await asyncio.wait_for(done, 5)
        s1.close()
        s2.close()
        return finished - two.handled(b"x")

    assert run_on(WINDOW, main) < 0.2


def test_a_threads_result_ends_the_sleep() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float]:
        done: asyncio.Future[float] = loop.create_future()

        async def in_thread() -> None:
            await asyncio.to_thread(time.sleep, 0.05)  # a key derivation, a store call
            done.set_result(time.monotonic())

        tasks = []
        def start(data: bytes) -> None:
            if data == b"x":
                tasks.append(loop.create_task(in_thread()))

        (_, two), (s1, s2) = await readers_on(loop, 2, start)
        s1.sendall(b"a")
        s2.sendall(b"x")
        finished = await asyncio.wait_for(done, 5)
        slept = loop.slept
        s1.close()
        s2.close()
        return finished - two.handled(b"x"), slept

    waited, slept = run_on(WINDOW, main)
    assert waited < 0.3  # not the window's 0.5 s
    assert slept > 0  # the loop was asleep when the thread finished


def test_a_loop_busy_for_longer_than_the_window_does_not_sleep() -> None:
    def busy(_: bytes) -> None:
        end = time.monotonic() + 0.06  # each read takes longer than the window
        while time.monotonic() < end:
            pass

    async def main(loop: BatchingLoop) -> tuple[float, int]:
        readers, socks = await readers_on(loop, 2, busy)
        await write_later([(i * 0.02, socks[i % 2], b"x") for i in range(25)])
        await asyncio.sleep(0.3)
        for sock in socks:
            sock.close()
        return loop.slept, sum(len(r.reads) for r in readers)

    slept, reads = run_on(0.05, main)
    assert reads >= 5
    assert slept < 0.06  # at most the one window after the last read


def test_a_window_set_at_run_time_applies_from_the_next_input() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float]:
        (one, two), (s1, s2) = await readers_on(loop, 2)
        loop.window = WINDOW
        await write_later([(0.0, s1, b"a"), (0.02, s2, b"x"), (0.12, s1, b"b")])
        await asyncio.sleep(WINDOW + 0.3)
        s1.close()
        s2.close()
        return one.handled(b"a"), one.handled(b"b")

    a, b = run_on(0.0, main)
    assert b - a >= 0.4


def test_the_windows_sleep_is_not_counted_as_loop_lag() -> None:
    async def main(loop: BatchingLoop) -> tuple[float, float]:
        monitor = PauseMonitor()
        monitor.start()
        try:
            _, socks = await readers_on(loop, 2)
            await write_later([(i * 0.02, socks[i % 2], b"x") for i in range(100)])
            await asyncio.sleep(TICK)
            for sock in socks:
                sock.close()
        finally:
            monitor.stop()
        return loop.slept, monitor.loop_lag.worst

    slept, worst_lag = run_on(0.3, main)
    assert slept > 0.9  # the loop did sleep through ticks' due times
    assert worst_lag < 0.1
