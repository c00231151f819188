"""Fan-out of one publish to a pubsub node with 10,000 subscribers: time and loop lag.

In-process and without sockets: the real pubsub module, engine and router
over the embedded default storage (SQLite items, folder blobs, the
in-process cache) in a temporary directory; each subscriber is a bound
session whose transport serialises what it is given (the work a stream's
writer does, minus the socket). The subscriptions are stored as the engine
stores them (one item each), in bulk. Then the owner publishes, several
times, and the script reports per publish:

* fan-out time: from the publish request to the last subscriber's copy;
* loop lag: the longest the event loop went without running a ticker task
  (what every other stream on the node would have waited), in wall-clock
  time and in the loop thread's CPU time (the latter leaves out the time
  other processes of a busy machine took the core), and how many times the
  loop ran during the fan-out;
* CPU seconds of the process for the fan-out.

The objects made during setup are frozen out of the garbage collector
(`gc.freeze()`), as the server does once started.

    .venv/bin/python bench/pubsub_fanout.py [--subscribers 10000] [--publishes 5]

Prints JSON (one object per publish, then the medians) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lxml import etree

from xmppd.modules._pubsub_engine import Subscription, encode_subscription
from xmppd.storage.config import StorageConfig
from xmppd.storage.factory import open_storage
from xmppd.stream.errors import StreamError
from xmppd.testing import ModuleHarness, TestSession

SERVICE = "pubsub.localhost"
PS = "http://jabber.org/protocol/pubsub"
ENTRY = "<entry xmlns='http://www.w3.org/2005/Atom'><title>Soliloquy</title></entry>"


class Counting:
    """A transport that serialises each stanza, as a stream's writer would, and counts."""

    def __init__(self, done: asyncio.Event, expected: list[int]) -> None:
        self.done = done
        self.expected = expected
        self.bytes = 0

    def send(self, stanza: etree._Element) -> bool:
        self.bytes += len(etree.tostring(stanza))
        self.expected[0] -= 1
        if not self.expected[0]:
            self.done.set()
        return True

    # The rest of xmppd.session.Transport: a fan-out never closes, pauses or drops, and
    # nothing comes from another node.
    def send_serialized(self, data: bytes) -> None:
        pass

    def close(self, error: StreamError) -> None:
        raise AssertionError(f"a fan-out closed a stream: {error}")

    def pause_input(self) -> None:
        pass

    def resume_input(self) -> None:
        pass

    def drop(self) -> None:
        raise AssertionError("a fan-out dropped a connection")


async def run(subscribers: int, publishes: int, data_dir: Path) -> dict[str, Any]:
    harness = ModuleHarness(
        {"roster": {}, "disco": {}, "pubsub": {"max_subscribers": max(subscribers, 1)}}
    )
    harness.storage = await open_storage(StorageConfig(), data_dir)
    harness.host.storage = harness.storage
    await harness.start()
    owner = harness.session("hamlet@localhost/elsinore")
    await harness.send(owner, f"<iq type='set' id='c' to='{SERVICE}'><pubsub xmlns='{PS}'>"
                              "<create node='big'/></pubsub></iq>")
    await harness.router.drain()
    service = harness.host.modules["pubsub"].service(SERVICE)  # type: ignore[attr-defined]
    node = await service.existing("big")
    sessions = [harness.session(f"u{i}@localhost/r") for i in range(subscribers)]
    for start in range(0, subscribers, 500):
        await service.items.batch_put({
            service.subscription_key(node, s.jid): encode_subscription(Subscription(s.jid, f"s{i}"))
            for i, s in enumerate(sessions[start:start + 500], start)
        })
    await service.items.put(service.counter_key(node), {"n": subscribers})
    gc.collect()
    gc.freeze()  # as the server does once started (xmppd/server.py): setup is not garbage
    results = []
    for n in range(publishes):
        done = asyncio.Event()
        expected = [subscribers]
        for session in sessions:
            session.transport = Counting(done, expected)
        lag = await measure(harness, owner, n, done)
        results.append(lag)
    await harness.storage.close()
    return {
        "subscribers": subscribers,
        "runs": results,
        "median": {k: statistics.median(r[k] for r in results) for k in results[0]},
    }


async def measure(
    harness: ModuleHarness, owner: TestSession, n: int, done: asyncio.Event
) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    longest = longest_cpu = 0.0
    turns = 0

    async def ticker() -> None:
        nonlocal longest, longest_cpu, turns
        last, last_cpu = loop.time(), time.thread_time()
        while True:
            await asyncio.sleep(0)
            now, now_cpu = loop.time(), time.thread_time()
            longest, last = max(longest, now - last), now
            longest_cpu, last_cpu = max(longest_cpu, now_cpu - last_cpu), now_cpu
            turns += 1

    ticking = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    cpu, started = time.process_time(), time.perf_counter()
    await harness.send(owner, f"<iq type='set' id='p{n}' to='{SERVICE}'><pubsub xmlns='{PS}'>"
                              f"<publish node='big'><item id='i{n}'>{ENTRY}</item></publish>"
                              "</pubsub></iq>")
    await done.wait()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    ticking.cancel()
    await harness.router.drain()
    owner.take()
    return {
        "fanout_ms": round(elapsed * 1000, 1),
        "cpu_ms": round(cpu * 1000, 1),
        "max_loop_lag_ms": round(longest * 1000, 2),
        "max_loop_lag_cpu_ms": round(longest_cpu * 1000, 2),
        "loop_turns": turns,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--publishes", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(asyncio.run(run(args.subscribers, args.publishes, Path(tmp))), indent=1))


if __name__ == "__main__":
    main()
