"""One callback per loop turn flushes every connection written to in that turn.

The loop is uvloop's (the server's) with `call_soon` counted, so a test sees how
many callbacks the flushes cost the loop as well as what ran and in which order.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from typing import Any

import pytest
import uvloop

from xmppd.flushes import Flushes

pytestmark = pytest.mark.timeout(10)


class CountingLoop(uvloop.Loop):  # type: ignore[misc]  # uvloop's Loop is untyped
    def __init__(self) -> None:
        super().__init__()
        self.scheduled = 0

    def call_soon(self, callback: Callable[..., object], *args: Any, **kw: Any) -> Any:
        self.scheduled += 1
        return super().call_soon(callback, *args, **kw)


def run(test: Callable[[CountingLoop], Any]) -> None:
    loop = CountingLoop()
    try:
        loop.run_until_complete(test(loop))
    finally:
        loop.close()


async def next_turns(count: int = 3) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def test_one_callback_flushes_every_connection_of_a_turn_in_order() -> None:
    async def test(loop: CountingLoop) -> None:
        flushes, ran = Flushes(), []
        before = loop.scheduled
        for n in range(100):
            flushes.add(lambda n=n: ran.append(n), loop)
        assert loop.scheduled - before == 1
        assert ran == []  # at the end of the turn, not at once
        await next_turns()
        assert ran == list(range(100))

    run(test)


def test_a_flush_asked_for_while_the_batch_runs_goes_in_a_later_one() -> None:
    async def test(loop: CountingLoop) -> None:
        flushes, ran = Flushes(), []

        def first() -> None:
            ran.append("first")
            loop.call_soon(ran.append, "queued meanwhile")
            flushes.add(lambda: ran.append("second"), loop)  # a session's end routes more

        flushes.add(first, loop)
        await next_turns()
        # Behind what was queued meanwhile: a batch of its own, not the end of the first.
        assert ran == ["first", "queued meanwhile", "second"]

    run(test)


def test_flushes_run_in_a_context_of_their_own() -> None:
    """Not in a copy of whoever asked first: a flush that ends a session routes its
    last presence, which must not see that caller's context (the router's marker of
    the account whose queue a task is working through)."""
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="none")

    async def test(loop: CountingLoop) -> None:
        flushes, seen = Flushes(), []

        async def writer() -> None:
            marker.set("alice's queue")
            flushes.add(lambda: seen.append(marker.get()), loop)

        await asyncio.ensure_future(writer())  # a task: its own context
        flushes.add(lambda: seen.append(marker.get()), loop)
        await next_turns()
        assert seen == ["none", "none"]

    run(test)


def test_an_interrupted_batch_leaves_the_rest_for_the_next() -> None:
    """A KeyboardInterrupt out of one flush: the connections behind it still owe
    their output and will not ask again (their flag is set), so they are not dropped."""
    loop = CountingLoop()
    flushes, ran = Flushes(), []

    def interrupted() -> None:
        raise KeyboardInterrupt

    try:
        flushes.add(lambda: ran.append(1), loop)
        flushes.add(interrupted, loop)
        flushes.add(lambda: ran.append(3), loop)
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(next_turns())
        loop.run_until_complete(next_turns())
        assert ran == [1, 3]
    finally:
        loop.close()


def test_a_failing_flush_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(loop: CountingLoop) -> None:
        flushes, ran = Flushes(), []

        def broken() -> None:
            raise RuntimeError("a connection's bug")

        flushes.add(lambda: ran.append(1), loop)
        flushes.add(broken, loop)
        flushes.add(lambda: ran.append(3), loop)
        await next_turns()
        assert ran == [1, 3]
        flushes.add(lambda: ran.append(4), loop)  # and the queue still works after it
        await next_turns()
        assert ran == [1, 3, 4]

    with caplog.at_level(logging.ERROR, logger="xmppd.flushes"):
        run(test)
    assert any(
        r.exc_info is not None and str(r.exc_info[1]) == "a connection's bug"
        for r in caplog.records
    )
