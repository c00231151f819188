"""Values decoded from stored bytes, kept so that reading unchanged bytes decodes nothing.

The roster (modules/roster.py) stores each account's roster as one compressed
item, and every read of it used to decompress and parse all of it: once per
presence probe, per PEP access check, per login. A decoded value is a pure
function of the bytes it came from, so an entry is served only when the bytes
just read are the very bytes it was decoded from. Whatever wrote the item in
between (this node, another node, a restore that reset the store's versions),
a changed item can never be answered from here; the check costs one bytes
comparison, microseconds for the largest item.

Large values are decoded in a thread, so that the event loop goes on serving
other sessions meanwhile, and readers that want the same large bytes decoded
at once share one decoding. Values handed out are shared between readers:
the caller must not mutate them (the roster copies what it gives away).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

OFF_LOOP_BYTES = 8 * 1024
"""Stored size from which decoding (and the roster's copying and encoding) runs in
a thread. Measured on a roster of one-group contacts: 1,100 items (the default
limits) are ~6 KB compressed and decode in ~1.5 ms, on the loop and, with the
cache, once per change; 11,000 items are ~57 KB and take ~14 ms, too long to
hold the loop. A thread makes no decoding cheaper (it contends for the GIL),
it only shortens the loop's longest wait, so small rosters stay on the loop."""


@dataclass(slots=True)
class _Entry(Generic[T]):
    raw: bytes
    value: T
    weight: int


class DecodedCache(Generic[T]):
    """An LRU of decoded values by key, bounded by the sum of their weights.

    The bound is a weight (the roster counts items) rather than a number of
    entries because one roster can be ten thousand times larger than another:
    a count of entries would bound nothing in bytes."""

    def __init__(
        self, decode: Callable[[bytes], T], weight: Callable[[T], int], budget: int
    ) -> None:
        self._decode = decode
        self._weight = weight
        self._budget = budget
        self._total = 0
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        self._running: dict[str, tuple[bytes, asyncio.Future[T]]] = {}

    async def decode(self, key: str, raw: bytes) -> T:
        """`raw` decoded: from memory when `key`'s entry came from equal bytes."""
        entry = self._entries.get(key)
        if entry is not None and entry.raw == raw:
            self._entries.move_to_end(key)
            return entry.value
        if len(raw) < OFF_LOOP_BYTES:
            value = self._decode(raw)
        else:
            value = await self._decode_off_loop(key, raw)
        self.remember(key, raw, value)
        return value

    def remember(self, key: str, raw: bytes, value: T) -> None:
        """Keep `value` as what `raw` decodes to (after a write: its new bytes)."""
        self.forget(key)
        weight = self._weight(value)
        if weight > self._budget:
            return
        self._entries[key] = _Entry(raw, value, weight)
        self._total += weight
        self._shrink()

    def forget(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._total -= entry.weight

    def resize(self, budget: int) -> None:
        """A reload changed the bound: evict down to it at once."""
        self._budget = budget
        self._shrink()

    def __len__(self) -> int:
        return len(self._entries)

    def _shrink(self) -> None:
        while self._total > self._budget:
            _, oldest = self._entries.popitem(last=False)
            self._total -= oldest.weight

    async def _decode_off_loop(self, key: str, raw: bytes) -> T:
        running = self._running.get(key)
        if running is None or running[0] != raw:
            future = asyncio.ensure_future(asyncio.to_thread(self._decode, raw))
            running = self._running[key] = (raw, future)
            future.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: a reader that gives up does not cancel the others' decoding.
        return await asyncio.shield(running[1])

    def _finished(self, key: str, done: asyncio.Future[T]) -> None:
        running = self._running.get(key)
        if running is not None and running[1] is done:
            del self._running[key]
        if not done.cancelled():
            done.exception()  # seen by the awaiting readers; not "never retrieved" if none is left
