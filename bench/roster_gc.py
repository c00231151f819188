"""Garbage-collector pauses while a node decodes a large roster again.

A real node in this process (xmppd.server.Server on the embedded default
storage in a temporary directory, listeners on free ports, uvloop), its
startup objects frozen out of the collector as `xmppd` does once started. An
account's roster of `--items` contacts (a name and one group each) is stored
as the roster module stores it; `--cached` other rosters of the same size
are read first, so that the module's cache of decoded rosters holds them, as
a busy node's does (100,000 items by default: `cache_items`). Then, `--runs`
times, the roster's cache entry is dropped (what a change made on another
node amounts to) and it is read again through the module's API (`get()`,
then `item()` of one contact after dropping it again), while:

* gc.callbacks time every collection (generation, milliseconds, objects
  collected), on whichever thread runs it: the decoding thread's collections
  hold the GIL, so the loop waits for them too;
* a ticker task asking to run every 0.5 ms records the longest gap (what every
  other stream on the node waits).

    .venv/bin/python bench/roster_gc.py [--items 10000] [--cached 9] [--runs 7]

Prints JSON: each run, then the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import uvloop
import yaml

from xmppd.config import load_config
from xmppd.modules.roster import STORE, RosterModule
from xmppd.server import Server

TICK = 0.0005


def stored_roster(items: int) -> dict[str, Any]:
    """A roster item as the module stores it (modules/roster.py): contacts with a name
    and one group, subscribed both ways."""
    compact = {
        f"contact{i}@example.net": [f"Contact {i}", "b", 0, [f"Group {i % 20}"]]
        for i in range(items)
    }
    data = zlib.compress(json.dumps(compact, separators=(",", ":")).encode(), 6)
    return {"epoch": "bench", "n": 1, "items": data}


class Collections:
    """Every collection while `recording`: generation, duration, objects collected (the
decoding thread's and the loop's alike)."""

    def __init__(self) -> None:
        self.recording = False
        self.seen: list[dict[str, Any]] = []
        self._started: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.perf_counter()
            return
        began = self._started.pop(thread, None)
        if self.recording and began is not None:
            self.seen.append({
                "generation": info["generation"],
                "ms": round((time.perf_counter() - began) * 1000, 2),
                "collected": info["collected"],
            })


async def longest_gap(operation: Any) -> float:
    """The longest wait, in ms, of a task asking to run every TICK while `operation` runs."""
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            gaps.append(time.perf_counter() - before - TICK)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(TICK * 4)
    await operation
    done = True
    await task
    return round(max(gaps) * 1000, 2)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "xmppd.yml"
        path.write_text(yaml.safe_dump({
            "hosts": ["localhost"],
            "data_dir": str(Path(tmp) / "data"),
            "log_level": "warning",
            "listeners": [{"type": "starttls", "address": "127.0.0.1", "port": 0}],
            "admin": {"port": 0},
        }))
        server = Server(load_config(path))
        await server.start()
        try:
            return await measure(server, args)
        finally:
            await server.stop()


async def measure(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    module = server.modules.modules["roster"]
    assert isinstance(module, RosterModule)
    store = server.modules.items("localhost", STORE)
    encoded = stored_roster(args.items)
    for n in range(args.cached + 1):
        await store.put(f"user{n}", encoded)
    gc.collect()
    gc.freeze()  # as `xmppd` does once started (xmppd/server.py)
    for n in range(1, args.cached + 1):  # the others' rosters, read since, and kept
        await module.item(f"user{n}@localhost", "contact0@example.net")
    owner = "user0@localhost"
    await module.item(owner, "contact0@example.net")
    collections = Collections()
    gc.callbacks.append(collections)
    runs = []
    try:
        for _ in range(args.runs):
            run: dict[str, Any] = {}
            for name, read in (
                ("get", lambda: module.get(owner)),
                ("item", lambda: module.item(owner, "contact1@example.net")),
            ):
                module._decoded.forget(owner)  # changed on another node
                collections.seen.clear()
                collections.recording = True
                run[f"{name}_gap_ms"] = await longest_gap(read())
                collections.recording = False
                seen = collections.seen
                run[f"{name}_collections"] = [
                    sum(1 for c in seen if c["generation"] == g) for g in (0, 1, 2)
                ]
                run[f"{name}_gc_ms"] = round(sum(c["ms"] for c in seen), 2)
                run[f"{name}_gc_worst_ms"] = max((c["ms"] for c in seen), default=0)
                run[f"{name}_full_ms"] = [c["ms"] for c in seen if c["generation"] == 2]
            runs.append(run)
            print(json.dumps(run), file=sys.stderr)
    finally:
        gc.callbacks.remove(collections)
    keys = ("get_gap_ms", "get_gc_ms", "get_gc_worst_ms", "item_gap_ms", "item_gc_ms",
            "item_gc_worst_ms")
    medians = {key: statistics.median(run[key] for run in runs) for key in keys}
    return {
        "items": args.items,
        "cached_rosters": args.cached,
        "tracked_objects": len(gc.get_objects()),  # not frozen, at the end
        "frozen_objects": gc.get_freeze_count(),
        "medians": medians,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--cached", type=int, default=9)
    parser.add_argument("--runs", type=int, default=7)
    print(json.dumps(uvloop.run(main(parser.parse_args())), indent=1))
