"""The verified entity capabilities (XEP-0115) PEP keeps in the item store "caps",
bounded whatever clients send.

Every presence may carry a caps hash never seen before, and a client that
answers the disco#info to match it gets it verified: kept as it came, one
entry per hash forever, one account sending fresh hashes would grow the
store without end. So the store is a table of `CAPS_SLOTS` entries per
virtual host: a hash has one slot (from a digest of it), the entry names
the hash it holds, and a new one takes its slot over. Each account stores
at most `STORES_PER_WINDOW` new hashes per `WINDOW_SECONDS`, each of at most
`MAX_FEATURES_BYTES`; past that a
verified answer serves its resource (and this node's memory) without
being stored, so one account cannot push the hashes of everyone's clients
out of the table. Real client versions are few and shared by many
accounts: they fit the table and find their slot again after an eviction.

Peers keep this in memory instead (Prosody's mod_pep: an LRU of 10,000
hashes; ejabberd's mod_caps: a database table with a cache in front); the
store here lets every node of a cluster know a hash one node verified.
"""

from __future__ import annotations

import hashlib
import json
import time

from xmppd.storage.base import ItemStore

CAPS_SLOTS = 4096
"""Entries of one virtual host's caps store, at most (each a few KB of features)."""
STORES_PER_WINDOW = 10
"""New hashes one account may store per window (a new client version is rare)."""
WINDOW_SECONDS = 3600.0
MAX_FEATURES_BYTES = 16 * 1024
"""A stored entry's features, at most (real clients list some KB); larger ones
serve their resource only."""
MAX_TRACKED = 10_000
"""Accounts whose stores of the current window are remembered (memory bound)."""


def slot_of(key: str) -> str:
    """The item name of the slot for the caps `key` ("<hash>/<ver>")."""
    digest = hashlib.sha256(key.encode()).digest()
    return f"slot/{int.from_bytes(digest[:4], 'big') % CAPS_SLOTS}"


class CapsStore:
    """Reads and writes verified caps in their slots, with each account's budget
    of new ones (counted on this node only: a cluster of n nodes lets an account
    store n times as many, still bounded)."""

    def __init__(self) -> None:
        # bare JID -> [start of its window, hashes it stored in that window]
        self._stores: dict[str, list[float]] = {}

    @staticmethod
    async def read(items: ItemStore, key: str) -> list[str] | None:
        """The features stored for `key`, if its slot holds that hash."""
        item = await items.get(slot_of(key))
        if item is None or item.attrs.get("k") != key:
            return None
        features: list[str] = json.loads(str(item.attrs["f"]))
        return features

    async def store(self, items: ItemStore, bare: str, key: str, features: list[str]) -> bool:
        """Store verified `features` for `key` in its slot, if they are at most
        `MAX_FEATURES_BYTES` and `bare` has budget left in its window; whether
        they were stored."""
        encoded = json.dumps(features, separators=(",", ":"))
        if len(encoded) > MAX_FEATURES_BYTES or not self._spend(bare):
            return False
        await items.put(slot_of(key), {"k": key, "f": encoded})
        return True

    def _spend(self, bare: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        entry = self._stores.get(bare)
        if entry is None or now - entry[0] >= WINDOW_SECONDS:
            if len(self._stores) >= MAX_TRACKED:
                self._forget_expired(now)
            entry = self._stores[bare] = [now, 0]
        if entry[1] >= STORES_PER_WINDOW:
            return False
        entry[1] += 1
        return True

    def _forget_expired(self, now: float) -> None:
        """Drop the accounts whose window is over; all of them if none is (a flood
        of accounts then costs each a fresh budget, never unbounded memory)."""
        self._stores = {
            bare: entry for bare, entry in self._stores.items()
            if now - entry[0] < WINDOW_SECONDS
        }
        if len(self._stores) >= MAX_TRACKED:
            self._stores.clear()
