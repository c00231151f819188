"""The storage contract every backend implements and every module uses.

Two adapters keep all durable state, so that a node can die or be added
without losing anything:

* an item store (SimpleDB-like): namespaces of items, each a name plus
  attributes and a version used for conditional writes;
* a blob store (S3-like): keys to byte strings with etags.

Backends see a *namespace* string ("<vhost>/<store>", e.g. "localhost/roster")
on every call; modules never do: they get an ItemStore / BlobStore handle
bound to their virtual host and store name (see `ItemStore` below), so two
domains or two deployments sharing one table or bucket cannot collide.

Every read-modify-write of a module goes through `ItemStore.modify` /
`BlobStore.modify`: one place for the conditional write, the retries and
their backoff (`backoff`), and one exception when a key stays contended.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import inspect
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar, runtime_checkable

AttrValue = str | int | bytes
Attrs = Mapping[str, AttrValue]


PRIVATE_DIR = 0o700
"""The mode of the folders a store makes: they hold the accounts' keys and messages,
for the service user alone."""


class StorageError(Exception):
    """A backend failed; the message names backend, operation and cause."""

    def __init__(self, backend: str, operation: str, cause: str) -> None:
        super().__init__(f"{backend}: {operation} failed: {cause}")
        self.backend = backend
        self.operation = operation
        self.cause = cause


@runtime_checkable
class ListsNamespaces(Protocol):
    """A backend that can name every namespace it holds something in: for migration and
    tests, never for serving (DynamoDB scans its whole table for it)."""

    async def namespaces(self) -> list[str]: ...


class NoStoreYet(StorageError):
    """A store opened read-only (xmppctl check) is not there: the server makes it at
    its first start, so this is no error, but the path may be mistyped."""

    def __init__(self, backend: str, where: str) -> None:
        super().__init__(backend, "open", f"no store at {where} yet")
        self.where = where


class ConditionFailed(Exception):
    """A conditional write lost: the item/blob exists, is absent, or has another version.

    Read-modify-write then re-reads and retries: `ItemStore.modify` and
    `BlobStore.modify` do that for their callers.
    """


class Contended(ConditionFailed):
    """`modify` lost the race for one item or blob on every try.

    A ConditionFailed, so code that already treats a lost conditional write as
    "busy, try later" handles it unchanged; the message names the key."""

    def __init__(self, what: str, namespace: str, key: str, tries: int) -> None:
        super().__init__(f"{what} {namespace}/{key}: another writer won all {tries} tries")
        self.namespace = namespace
        self.key = key
        self.tries = tries


class TooLarge(Exception):
    """A value is over the backend's or the configured size limit."""


# Limits every backend enforces, so that data accepted by the embedded default
# also fits DynamoDB (1024-byte sort keys, 400 KB items) and S3 (1024-byte keys,
# with room left for the namespace prefix). Over a limit: TooLarge.
MAX_KEY_BYTES = 768  # item names and blob keys, UTF-8
MAX_ATTR_NAME_BYTES = 255
MAX_ITEM_BYTES = 256 * 1024  # item name + attribute names + values
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # attribute ints are signed 64-bit


def check_key(key: str) -> None:
    """Reject names/keys no backend can hold the same way (ValueError, TooLarge)."""
    if not isinstance(key, str) or not key:
        raise ValueError("item names and blob keys must be non-empty strings")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise TooLarge(f"key is over {MAX_KEY_BYTES} bytes")


def check_blob_size(key: str, data: bytes, limit: int) -> None:
    """Refuse a blob over the backend's `limit` (TooLarge), before anything is written."""
    if len(data) > limit:
        raise TooLarge(f"blob {key[:40]!r} is {len(data)} bytes, over {limit}")


def check_item(name: str, attrs: Attrs) -> None:
    """Validate an item before writing it: same rules on every backend.

    bool is refused (it would read back as int on some backends and as bool on
    others); ints must fit 64 bits; str, int and bytes stay distinct types."""
    check_key(name)
    size = len(name.encode("utf-8"))
    for key, value in attrs.items():
        if not isinstance(key, str) or not key:
            raise ValueError("attribute names must be non-empty strings")
        key_size = len(key.encode("utf-8"))
        if key_size > MAX_ATTR_NAME_BYTES:
            raise ValueError(f"attribute name over {MAX_ATTR_NAME_BYTES} bytes: {key[:40]!r}")
        if isinstance(value, bool) or not isinstance(value, str | int | bytes):
            raise ValueError(
                f"attribute {key!r}: expected str, int or bytes, got {type(value).__name__}"
            )
        if isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                raise ValueError(f"attribute {key!r}: integer out of 64-bit range")
            size += key_size + 8
        elif isinstance(value, str):
            size += key_size + len(value.encode("utf-8"))
        else:
            size += key_size + len(value)
    if size > MAX_ITEM_BYTES:
        raise TooLarge(f"item {name[:40]!r} is {size} bytes, over {MAX_ITEM_BYTES}")


def check_writes(writes: Sequence[Write]) -> None:
    """Validate a transaction: each item at most once (as DynamoDB requires)."""
    seen: set[tuple[str, str]] = set()
    for write in writes:
        if isinstance(write, Put):
            check_item(write.name, write.attrs)
            check_condition(write.if_absent, write.if_version)
        else:
            check_key(write.name)
        ident = (write.namespace, write.name)
        if ident in seen:
            raise ValueError(f"item {write.name!r} appears twice in one transaction")
        seen.add(ident)


def check_query(query: Query) -> None:
    if query.limit < 1:
        raise ValueError("query limit must be at least 1")
    for key, value in query.where.items():
        if isinstance(value, bool) or not isinstance(value, str | int | bytes):
            raise ValueError(f"where {key!r}: expected str, int or bytes")


def check_condition(if_absent: bool, if_version: int | None) -> None:
    if if_absent and if_version is not None:
        raise ValueError("if_absent and if_version exclude each other")


@dataclass(frozen=True, slots=True)
class Item:
    name: str
    attrs: dict[str, AttrValue]
    version: int


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Item]
    next_token: str | None = None


@dataclass(frozen=True, slots=True)
class Put:
    """One write inside `ItemBackend.transact`."""

    namespace: str
    name: str
    attrs: Attrs
    if_absent: bool = False
    if_version: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    namespace: str
    name: str
    if_version: int | None = None


Write = Put | Delete


@dataclass(frozen=True, slots=True)
class Blob:
    key: str
    data: bytes
    etag: str


@dataclass(frozen=True, slots=True)
class BlobPage:
    keys: list[str]
    next_token: str | None = None


@dataclass(slots=True)
class Query:
    """What `ItemBackend.query` selects, in backend-independent terms.

    * `where`: attribute equality, type-sensitive (1 never matches "1").
    * `prefix`: item names starting with it.
    * `order_by`: None or "name" sorts by item name (code point order, which is
      UTF-8 byte order); an attribute name sorts by (value, item name) and
      leaves out items without that attribute; values of different types sort
      int < str < bytes. `descending` reverses the whole order.
    * `limit` (>= 1) caps a page; a page may hold fewer items even when more
      follow. `next_token` None means nothing follows (a token may still lead
      to an empty last page).
    * `page_token` resumes after the last item of the previous page of the same
      query, even if items were added or removed in between; in name order,
      `storage.codec.name_token(name)` starts right after any name.
    """

    where: dict[str, AttrValue] = field(default_factory=dict)
    prefix: str | None = None
    order_by: str | None = None  # None or "name": by item name; else an attribute
    descending: bool = False
    limit: int = 100
    page_token: str | None = None


# --- read-modify-write (`ItemStore.modify`, `BlobStore.modify`) ---------------------------

MODIFY_TRIES = 10
"""Attempts `modify` makes by default. One key has few real writers (a user's
resources, a few nodes), so ten lost races in a row means a hot key: better to
fail the request after about a second than to hold it."""
BACKOFF_BASE = 0.005  # seconds; a rival's write takes milliseconds
BACKOFF_CAP = 0.25  # seconds; bounds the wait of one retry


def backoff(attempt: int) -> float:
    """Seconds to wait after the `attempt`-th (0-based) lost conditional write.

    "Full jitter": uniform over a window that doubles with each loss up to a
    cap. The writers that lost one race pick different delays instead of
    colliding again in lockstep, and a key that stays busy gets spread-out
    retries; the cap keeps MODIFY_TRIES attempts within about a second."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2**attempt))


class Unchanged(enum.Enum):
    """The type of UNCHANGED: a one-member enum, so type checkers can tell it from a value."""

    UNCHANGED = "unchanged"


UNCHANGED = Unchanged.UNCHANGED
"""What a `modify` change returns to write nothing: the stored value is already right."""


@dataclass(frozen=True, slots=True)
class WithWrites:
    """An item change committed in one transaction with other writes of the same store.

    `attrs` means what a plain change return means (None: delete; an absent
    item then stays absent and only `writes` are made). The item's condition is
    part of the transaction, so `writes` land only together with the change
    they were computed from; a condition of theirs that fails is a lost race
    too, and the change runs again."""

    attrs: Attrs | None
    writes: Sequence[Write]


ItemEdit = Attrs | None | Unchanged | WithWrites
BlobEdit = bytes | None | Unchanged
V = TypeVar("V", Item, Blob)
E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Modified(Generic[V]):
    """What `modify` did, as of the attempt whose write won.

    `before`: what that attempt read. `after`: what is stored now, the new item
    (with its version) or blob (with its etag); None when deleted or left
    absent, and after a WithWrites change (transactions report no versions);
    `before` itself when nothing was written (`written` False)."""

    before: V | None
    after: V | None
    written: bool


async def _edit_of(change: Callable[[V | None], E | Awaitable[E]], current: V | None) -> E:
    """Call a change that may be a plain or a coroutine function."""
    edit = change(current)
    if inspect.isawaitable(edit):
        return await edit
    return edit


async def _retry(
    attempt: Callable[[], Awaitable[Modified[V] | None]],
    tries: int,
    what: str,
    namespace: str,
    key: str,
) -> Modified[V]:
    """Run `attempt` (None: its write lost) until it wins, `backoff` between tries."""
    if tries < 1:
        raise ValueError("tries must be at least 1")
    for lost in range(tries):
        if lost:
            await asyncio.sleep(backoff(lost - 1))
        done = await attempt()
        if done is not None:
            return done
    raise Contended(what, namespace, key, tries)


class ItemBackend(abc.ABC):
    """A concrete item store (SQLite, DynamoDB, ...). Every method is a coroutine
    that never blocks the event loop."""

    name: str = "items"

    @abc.abstractmethod
    async def get(self, namespace: str, name: str) -> Item | None: ...

    @abc.abstractmethod
    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        """Write the whole item (attributes replaced), returning it with its new version.

        Raises ConditionFailed when `if_absent` and the item exists, or when
        `if_version` is given and differs from the stored version (or the item
        is absent)."""

    @abc.abstractmethod
    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        """True if an item was deleted. ConditionFailed on a version mismatch."""

    @abc.abstractmethod
    async def query(self, namespace: str, query: Query) -> Page: ...

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        found: dict[str, Item] = {}
        for name in names:
            item = await self.get(namespace, name)
            if item is not None:
                found[name] = item
        return found

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        for name, attrs in items.items():
            await self.put(namespace, name, attrs)

    @abc.abstractmethod
    async def transact(self, writes: Sequence[Write]) -> None:
        """All writes or none; ConditionFailed if any condition fails."""

    async def close(self) -> None:
        return None


class BlobBackend(abc.ABC):
    """A concrete blob store (folder, S3, ...)."""

    name: str = "blobs"

    @abc.abstractmethod
    async def get(self, namespace: str, key: str) -> Blob | None: ...

    @abc.abstractmethod
    async def put(
        self,
        namespace: str,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        """Store `data`, returning the new etag. ConditionFailed when
        `if_none_match` and the key exists, or `if_match` differs."""

    @abc.abstractmethod
    async def delete(self, namespace: str, key: str, *, if_match: str | None = None) -> bool: ...

    @abc.abstractmethod
    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage: ...

    async def presign(
        self, namespace: str, key: str, method: Literal["GET", "PUT"], expires: int = 300
    ) -> str | None:
        """A URL a client can use directly, or None when the backend has none."""
        return None

    async def close(self) -> None:
        return None


class ItemStore:
    """An item store as a module sees it: bound to one virtual host and store name."""

    __slots__ = ("backend", "namespace")

    def __init__(self, backend: ItemBackend, vhost: str, store: str) -> None:
        self.backend = backend
        self.namespace = f"{vhost}/{store}"

    async def get(self, name: str) -> Item | None:
        return await self.backend.get(self.namespace, name)

    async def put(
        self, name: str, attrs: Attrs, *, if_absent: bool = False, if_version: int | None = None
    ) -> Item:
        return await self.backend.put(
            self.namespace, name, attrs, if_absent=if_absent, if_version=if_version
        )

    async def delete(self, name: str, *, if_version: int | None = None) -> bool:
        return await self.backend.delete(self.namespace, name, if_version=if_version)

    async def query(self, query: Query | None = None, **kwargs: object) -> Page:
        return await self.backend.query(self.namespace, query or Query(**kwargs))  # type: ignore[arg-type]

    async def batch_get(self, names: Sequence[str]) -> dict[str, Item]:
        return await self.backend.batch_get(self.namespace, names)

    async def batch_put(self, items: Mapping[str, Attrs]) -> None:
        await self.backend.batch_put(self.namespace, items)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every item whose name starts with `prefix` (a user's data when it goes);
        how many were deleted. Not atomic: a failure leaves the rest for a second run."""
        deleted = 0
        token: str | None = None
        while True:
            page = await self.query(Query(prefix=prefix, limit=100, page_token=token))
            for item in page.items:
                deleted += await self.delete(item.name)
            if (token := page.next_token) is None:
                return deleted

    async def random_once(self, name: str, attr: str) -> AttrValue | None:
        """Item `name`'s `attr`, made of 32 random bytes by the first caller ever (one
        that loses the race to write it reads the winner's): a secret every node of a
        deployment must hold alike. None only if the item holds no such attribute."""
        item = await self.get(name)
        if item is None:
            try:
                item = await self.put(name, {attr: secrets.token_bytes(32)}, if_absent=True)
            except ConditionFailed:
                item = await self.get(name)
        return item.attrs.get(attr) if item is not None else None

    async def modify(
        self,
        name: str,
        change: Callable[[Item | None], ItemEdit | Awaitable[ItemEdit]],
        *,
        tries: int = MODIFY_TRIES,
        what: str = "item",
    ) -> Modified[Item]:
        """Read-modify-write one item without losing a concurrent writer's change.

        `change(current)` gets the item (None when absent) and returns the new
        attributes, None to delete, UNCHANGED to write nothing, or WithWrites to
        commit other writes with it; it may be a coroutine function. The write
        is conditional on what was read. When another writer got there first,
        `change` runs again on a fresh read after a `backoff`: it must compute
        only from its argument and what it reads itself. An exception it raises
        propagates and nothing is written; so do write errors other than a lost
        race (TooLarge, StorageError). After `tries` lost races: Contended,
        naming `what` and the item."""
        return await _retry(
            lambda: self._modify_once(name, change), tries, what, self.namespace, name
        )

    async def _modify_once(
        self, name: str, change: Callable[[Item | None], ItemEdit | Awaitable[ItemEdit]]
    ) -> Modified[Item] | None:
        before = await self.get(name)
        edit: ItemEdit = await _edit_of(change, before)
        try:
            return await self._write_edit(name, before, edit)
        except ConditionFailed:
            return None

    async def _write_edit(self, name: str, before: Item | None, edit: ItemEdit) -> Modified[Item]:
        if isinstance(edit, WithWrites):
            writes = [*self._own_write(name, before, edit.attrs), *edit.writes]
            if not writes:
                return Modified(before, before, written=False)
            await self.transact(writes)
            return Modified(before, None, written=True)
        if isinstance(edit, Unchanged) or (edit is None and before is None):
            return Modified(before, before, written=False)
        if edit is None:
            assert before is not None
            await self.delete(name, if_version=before.version)
            return Modified(before, None, written=True)
        if before is None:
            return Modified(before, await self.put(name, edit, if_absent=True), written=True)
        return Modified(before, await self.put(name, edit, if_version=before.version), written=True)

    def _own_write(self, name: str, before: Item | None, attrs: Attrs | None) -> list[Write]:
        """The modified item's own conditional write inside a WithWrites transaction."""
        if attrs is None:
            return [] if before is None else [self.delete_op(name, if_version=before.version)]
        if before is None:
            return [self.put_op(name, attrs, if_absent=True)]
        return [self.put_op(name, attrs, if_version=before.version)]

    def put_op(
        self, name: str, attrs: Attrs, *, if_absent: bool = False, if_version: int | None = None
    ) -> Put:
        """A put of this store, for `transact`."""
        return Put(self.namespace, name, attrs, if_absent=if_absent, if_version=if_version)

    def delete_op(self, name: str, *, if_version: int | None = None) -> Delete:
        """A delete of this store, for `transact`."""
        return Delete(self.namespace, name, if_version=if_version)

    async def transact(self, writes: Sequence[Write]) -> None:
        """All of `writes` (made with put_op/delete_op) or none; ConditionFailed if one fails."""
        if any(w.namespace != self.namespace for w in writes):
            raise ValueError("a store's transaction may only write to that store")
        await self.backend.transact(writes)


class BlobStore:
    """A blob store as a module sees it: bound to one virtual host and store name."""

    __slots__ = ("backend", "namespace")

    def __init__(self, backend: BlobBackend, vhost: str, store: str) -> None:
        self.backend = backend
        self.namespace = f"{vhost}/{store}"

    async def get(self, key: str) -> Blob | None:
        return await self.backend.get(self.namespace, key)

    async def put(
        self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None
    ) -> str:
        return await self.backend.put(
            self.namespace, key, data, if_none_match=if_none_match, if_match=if_match
        )

    async def delete(self, key: str, *, if_match: str | None = None) -> bool:
        return await self.backend.delete(self.namespace, key, if_match=if_match)

    async def modify(
        self,
        key: str,
        change: Callable[[Blob | None], BlobEdit | Awaitable[BlobEdit]],
        *,
        tries: int = MODIFY_TRIES,
        what: str = "blob",
    ) -> Modified[Blob]:
        """`ItemStore.modify` for a blob: `change` returns the new data, None to
        delete, or UNCHANGED; writes are conditional on the etag read."""
        return await _retry(
            lambda: self._modify_once(key, change), tries, what, self.namespace, key
        )

    async def _modify_once(
        self, key: str, change: Callable[[Blob | None], BlobEdit | Awaitable[BlobEdit]]
    ) -> Modified[Blob] | None:
        before = await self.get(key)
        edit: BlobEdit = await _edit_of(change, before)
        try:
            return await self._write_edit(key, before, edit)
        except ConditionFailed:
            return None

    async def _write_edit(self, key: str, before: Blob | None, edit: BlobEdit) -> Modified[Blob]:
        if isinstance(edit, Unchanged) or (edit is None and before is None):
            return Modified(before, before, written=False)
        if edit is None:
            assert before is not None
            await self.delete(key, if_match=before.etag)
            return Modified(before, None, written=True)
        if before is None:
            etag = await self.put(key, edit, if_none_match=True)
        else:
            etag = await self.put(key, edit, if_match=before.etag)
        return Modified(before, Blob(key, edit, etag), written=True)

    async def list(
        self, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage:
        return await self.backend.list(self.namespace, prefix, limit=limit, page_token=page_token)

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every blob whose key starts with `prefix` (a user's data when it goes);
        how many were deleted. Not atomic: a failure leaves the rest for a second run."""
        deleted = 0
        token: str | None = None
        while True:
            page = await self.list(prefix, page_token=token)
            for key in page.keys:
                deleted += await self.delete(key)
            if (token := page.next_token) is None:
                return deleted

    async def presign(
        self, key: str, method: Literal["GET", "PUT"], expires: int = 300
    ) -> str | None:
        return await self.backend.presign(self.namespace, key, method, expires)
