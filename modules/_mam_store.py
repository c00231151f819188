"""The message archive's storage layout (XEP-0313): ids, items, pages, removal.

Per virtual host, item store "mam": one item per archived message, named
"<user>/<id>", with the attributes `with` (the other party's bare JID),
`peer` (its full JID, as the message named it), `ts` (microseconds since
the epoch) and `stanza` (the message as routed, serialized). An archive is
one name prefix, and name order is time order: the id starts with the
timestamp (14 hex digits), then 8 random hex digits keep two messages of
the same microsecond apart.

The id ends with a MAC (16 hex digits, HMAC-SHA256 under a key kept per host
in the item store "mam_key", of the owner, the sender's bare JID and the rest
of the id). The id is what XEP-0359 stamps on the recipient's copy
(<stanza-id by='owner'/>): the MAC lets any node of a cluster tell one of
ours (a message routed again: another resource, offline storage, a node that
could not deliver) from one another entity forged (XEP-0359 section 5), with
no lookup and no state, and a message routed again is archived again under
the same name: once. With the sender in the MAC, an id someone else learnt
(a client's forward, a remote server) is not ours on their messages: it
cannot put their message in the archive in place of the one it names.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from xmppd.storage.base import (
    MAX_ITEM_BYTES,
    Attrs,
    Item,
    ItemStore,
    Query,
    TooLarge,
)
from xmppd.storage.codec import name_token

STORE = "mam"
KEY_STORE = "mam_key"
KEY_ITEM = "key"
TS_DIGITS = 14  # hex digits of the microsecond timestamp: enough until the year 4253
ID_LENGTH = TS_DIGITS + 8 + 16
PAGE = 100  # items per storage query when reading or deleting a whole archive
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class Entry:
    """One archived message as a query returns it."""

    id: str
    ts: int  # microseconds since the epoch
    stanza: bytes


@dataclass(slots=True)
class Bounds:
    """Which part of an archive a query reads, as item ids (exclusive) and times
    (microseconds, inclusive), with the other party's JID (bare or full)."""

    with_bare: str | None = None
    with_full: str | None = None
    after: str | None = None
    before: str | None = None
    start: int | None = None
    end: int | None = None


def now_us() -> int:
    return time.time_ns() // 1000


def timestamp_of(archive_id: str) -> int:
    """The microseconds an id (one `is_id` accepts) was made at."""
    return int(archive_id[:TS_DIGITS], 16)


def is_id(value: str) -> bool:
    """True if `value` has the shape of an archive id (not whether it is stored)."""
    return len(value) == ID_LENGTH and set(value) <= _HEX


class Ids:
    """Makes and checks archive ids with one host's key."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def make(self, owner: str, sender: str, ts: int | None = None) -> str:
        """A new id in `owner`'s archive for a message from `sender` (a bare JID)."""
        stem = f"{now_us() if ts is None else ts:0{TS_DIGITS}x}{secrets.token_hex(4)}"
        return stem + self._mac(owner, sender, stem)

    def ours(self, owner: str, sender: str, archive_id: str) -> bool:
        """True if this server made `archive_id` for `owner`'s archive, for a message
        from `sender`."""
        if not is_id(archive_id):
            return False
        stem = archive_id[: TS_DIGITS + 8]
        mac = self._mac(owner, sender, stem)
        return hmac.compare_digest(archive_id[TS_DIGITS + 8 :], mac)

    def _mac(self, owner: str, sender: str, stem: str) -> str:
        digest = hmac.new(self._key, f"{owner}\0{sender}\0{stem}".encode(), hashlib.sha256)
        return digest.hexdigest()[:16]


async def load_key(store: ItemStore) -> bytes:
    """The host's id key, made by the first node that starts (a node that loses the
    race to write it reads the winner's): every node must check every id alike."""
    key = await store.random_once(KEY_ITEM, "key")
    if not isinstance(key, bytes) or len(key) < 16:
        raise RuntimeError(f"the archive id key in {store.namespace} is unreadable")
    return key


def item(
    user: str, archive_id: str, with_bare: str, peer: str, stanza: bytes
) -> tuple[str, Attrs]:
    """The item (name, attributes) of one archived message; the same id again is the
    same item (a message routed twice is archived once). TooLarge when it is over the
    item limit (checked here: a batch with one such item would be refused whole)."""
    name = f"{user}/{archive_id}"
    attrs = {"with": with_bare, "peer": peer, "ts": timestamp_of(archive_id), "stanza": stanza}
    size = len(name.encode()) + len(stanza) + len(with_bare.encode()) + len(peer.encode()) + 64
    if size > MAX_ITEM_BYTES:
        raise TooLarge(f"a message of {len(stanza)} bytes is over the item limit")
    return name, attrs


class Archive:
    """One host's archives: each account's is the prefix "<user>/"."""

    def __init__(self, store: ItemStore) -> None:
        self.store = store

    async def exists(self, user: str, archive_id: str) -> bool:
        return is_id(archive_id) and await self.store.get(f"{user}/{archive_id}") is not None

    async def get_many(self, user: str, ids: list[str]) -> dict[str, Entry]:
        """The entries of `ids` that are stored, by id."""
        names = [f"{user}/{i}" for i in ids if is_id(i)]
        found = await self.store.batch_get(names) if names else {}
        return {item.name.split("/", 1)[1]: _entry(item) for item in found.values()}

    async def page(
        self, user: str, bounds: Bounds, limit: int, backward: bool
    ) -> tuple[list[Entry], bool]:
        """Up to `limit` entries within `bounds`, the oldest first (backward: the newest
        ones, still returned oldest first), and whether more match beyond them."""
        found: list[Entry] = []
        async for entry in self._scan(user, bounds, backward):
            if len(found) == limit:
                return (found[::-1] if backward else found), True
            found.append(entry)
        return (found[::-1] if backward else found), False

    async def edge(self, user: str, newest: bool) -> Entry | None:
        """The oldest (or newest) entry of the archive, None when it is empty."""
        page = await self.store.query(Query(prefix=f"{user}/", limit=1, descending=newest))
        return _entry(page.items[0]) if page.items else None

    async def count(self, user: str) -> int:
        total = 0
        token: str | None = None
        while True:
            page = await self.store.query(Query(prefix=f"{user}/", limit=PAGE, page_token=token))
            total += len(page.items)
            if (token := page.next_token) is None:
                return total

    async def remove(self, user: str) -> int:
        """Delete the whole archive, a page at a time; how many messages went."""
        return await self.store.delete_prefix(f"{user}/")

    async def _scan(self, user: str, bounds: Bounds, backward: bool) -> AsyncIterator[Entry]:
        """Entries within `bounds` in time order (backward: newest first), read from
        storage a page at a time as the caller goes on."""
        prefix = f"{user}/"
        low = prefix  # names must be above this one
        if bounds.start is not None:
            low = max(low, f"{prefix}{bounds.start:0{TS_DIGITS}x}")
        if bounds.after is not None:
            low = max(low, prefix + bounds.after)
        high: str | None = None  # and below this one
        if bounds.end is not None:
            high = f"{prefix}{bounds.end:0{TS_DIGITS}x}g"  # 'g' sorts after every hex digit
        if bounds.before is not None:
            high = min(high or prefix + "g", prefix + bounds.before)
        where: dict[str, str | int | bytes] = {}
        if bounds.with_full is not None:
            where["peer"] = bounds.with_full
        elif bounds.with_bare is not None:
            where["with"] = bounds.with_bare
        start = high if backward else low
        token = name_token(start) if start is not None and start != prefix else None
        while True:
            page = await self.store.query(
                Query(where=where, prefix=prefix, limit=PAGE, descending=backward, page_token=token)
            )
            for item in page.items:
                if (backward and item.name <= low) or (
                    not backward and high is not None and item.name >= high
                ):
                    return
                yield _entry(item)
            if (token := page.next_token) is None:
                return


def _entry(item: Item) -> Entry:
    ts, stanza = item.attrs.get("ts", 0), item.attrs.get("stanza", b"")
    return Entry(
        item.name.split("/", 1)[1],
        ts if isinstance(ts, int) else 0,
        stanza if isinstance(stanza, bytes) else str(stanza).encode(),
    )
