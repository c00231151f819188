"""In-process item and blob stores with the same semantics as the real ones.

For tests that need no disk: nothing survives the process. Each method does
its work without awaiting in between, so on one event loop every call is
atomic, conditional writes included. Returned items and blobs are copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

from ..base import (
    Attrs,
    AttrValue,
    Blob,
    BlobBackend,
    BlobPage,
    ConditionFailed,
    Delete,
    Item,
    ItemBackend,
    Page,
    Put,
    Query,
    Write,
    check_blob_size,
    check_condition,
    check_item,
    check_key,
    check_query,
    check_writes,
)
from ..codec import decode_token, encode_token
from .files import decode_list_token, encode_list_token

_RANK = {int: 0, str: 1, bytes: 2}  # the order across types, as in SQLite


def _sort_value(value: AttrValue) -> tuple[int, AttrValue]:
    return (_RANK[type(value)], value)


class MemoryItemBackend(ItemBackend):
    name = "memory"

    def __init__(self) -> None:
        self._data: dict[str, dict[str, tuple[int, dict[str, AttrValue]]]] = {}

    def describe(self) -> str:
        return "in-process memory (not persistent)"

    def _check_version(
        self, namespace: str, name: str, if_absent: bool, if_version: int | None
    ) -> int | None:
        entry = self._data.get(namespace, {}).get(name)
        current = entry[0] if entry else None
        if if_absent and current is not None:
            raise ConditionFailed(f"{namespace}/{name}: exists (version {current})")
        if if_version is not None and current != if_version:
            raise ConditionFailed(
                f"{namespace}/{name}: version is {current}, expected {if_version}"
            )
        return current

    def _store(self, namespace: str, name: str, attrs: Attrs, current: int | None) -> Item:
        version = (current or 0) + 1
        stored = dict(attrs)
        self._data.setdefault(namespace, {})[name] = (version, stored)
        return Item(name, dict(stored), version)

    async def get(self, namespace: str, name: str) -> Item | None:
        entry = self._data.get(namespace, {}).get(name)
        return Item(name, dict(entry[1]), entry[0]) if entry else None

    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        check_item(name, attrs)
        check_condition(if_absent, if_version)
        current = self._check_version(namespace, name, if_absent, if_version)
        return self._store(namespace, name, attrs, current)

    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        self._check_version(namespace, name, False, if_version)
        return self._data.get(namespace, {}).pop(name, None) is not None

    async def query(self, namespace: str, query: Query) -> Page:
        check_query(query)
        by_attr = query.order_by not in (None, "name")
        data = self._data.get(namespace, {})
        rows: list[tuple[tuple[object, ...], list[AttrValue], str]] = []  # sort key, token, name
        for name, (_, attrs) in data.items():
            if query.prefix and not name.startswith(query.prefix):
                continue
            if any(
                key not in attrs or _sort_value(attrs[key]) != _sort_value(value)
                for key, value in query.where.items()
            ):
                continue
            if not by_attr:
                rows.append(((name,), [name], name))
            elif query.order_by in attrs:
                value = attrs[query.order_by]
                rows.append(((_sort_value(value), name), [value, name], name))
        rows.sort(key=lambda row: row[0], reverse=query.descending)
        if query.page_token is not None:
            last = decode_token(query.page_token, 2 if by_attr else 1)
            cursor = (_sort_value(last[0]), last[1]) if by_attr else (last[0],)
            rows = [row for row in rows if _after(row[0], cursor, query.descending)]
        page = rows[: query.limit]
        items = [Item(name, dict(data[name][1]), data[name][0]) for _, _, name in page]
        token = encode_token(page[-1][1]) if len(rows) > query.limit else None
        return Page(items, token)

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        for name, attrs in items.items():
            check_item(name, attrs)
        for name, attrs in items.items():
            self._store(namespace, name, attrs, self._check_version(namespace, name, False, None))

    async def namespaces(self) -> list[str]:
        return sorted(ns for ns, items in self._data.items() if items)

    async def transact(self, writes: Sequence[Write]) -> None:
        check_writes(writes)
        currents = [
            self._check_version(
                w.namespace, w.name, isinstance(w, Put) and w.if_absent, w.if_version
            )
            for w in writes
        ]
        for write, current in zip(writes, currents, strict=True):
            if isinstance(write, Put):
                self._store(write.namespace, write.name, write.attrs, current)
            elif isinstance(write, Delete):
                self._data.get(write.namespace, {}).pop(write.name, None)


class MemoryBlobBackend(BlobBackend):
    name = "memory"

    def __init__(self, *, max_blob_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_blob_bytes = max_blob_bytes
        self._data: dict[str, dict[str, bytes]] = {}

    def describe(self) -> str:
        return "in-process memory (not persistent)"

    def _check(self, namespace: str, key: str, if_none_match: bool, if_match: str | None) -> None:
        data = self._data.get(namespace, {}).get(key)
        if if_none_match and data is not None:
            raise ConditionFailed(f"{namespace}/{key}: exists")
        if if_match is not None and (data is None or _etag(data) != if_match):
            raise ConditionFailed(f"{namespace}/{key}: etag differs from {if_match}")

    async def get(self, namespace: str, key: str) -> Blob | None:
        check_key(key)
        data = self._data.get(namespace, {}).get(key)
        return None if data is None else Blob(key, data, _etag(data))

    async def put(
        self,
        namespace: str,
        key: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
    ) -> str:
        check_key(key)
        check_blob_size(key, data, self.max_blob_bytes)
        self._check(namespace, key, if_none_match, if_match)
        self._data.setdefault(namespace, {})[key] = bytes(data)
        return _etag(data)

    async def delete(self, namespace: str, key: str, *, if_match: str | None = None) -> bool:
        check_key(key)
        self._check(namespace, key, False, if_match)
        return self._data.get(namespace, {}).pop(key, None) is not None

    async def namespaces(self) -> list[str]:
        return sorted(ns for ns, blobs in self._data.items() if blobs)

    async def list(
        self, namespace: str, prefix: str = "", *, limit: int = 1000, page_token: str | None = None
    ) -> BlobPage:
        if limit < 1:
            raise ValueError("list limit must be at least 1")
        after = decode_list_token(page_token) if page_token else None
        keys = sorted(
            key
            for key in self._data.get(namespace, {})
            if key.startswith(prefix) and (after is None or key > after)
        )
        page = keys[:limit]
        return BlobPage(page, encode_list_token(page[-1]) if len(keys) > limit else None)


def _after(key: tuple[object, ...], cursor: tuple[object, ...], descending: bool) -> bool:
    return key < cursor if descending else key > cursor  # type: ignore[operator]


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
