"""The embedded item store: one SQLite file, driven from one worker thread.

sqlite3 calls block, so they never run on the event loop: a single-thread
executor owns the only connection. That serializes this process's writes
(no "database is locked" between our own calls) and gives every call a
consistent view. Several processes may share the file: WAL lets readers run
beside the writer, and each write takes the lock up front (BEGIN IMMEDIATE) so
a conditional check and its write are one atomic step across processes too.

Items live in `items`; `item_attrs` repeats each attribute as a typed SQLite
value (INTEGER, TEXT or BLOB in an untyped column, so 1 and "1" stay apart and
sort int < str < bytes) to answer `where` and `order_by` from an index.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ..base import (
    PRIVATE_DIR,
    Attrs,
    AttrValue,
    ConditionFailed,
    Delete,
    Item,
    ItemBackend,
    NoStoreYet,
    Page,
    Put,
    Query,
    StorageError,
    Write,
    check_condition,
    check_item,
    check_query,
    check_writes,
)
from ..codec import decode_attrs, decode_token, encode_attrs, encode_token
from ..config import SQLiteItemsConfig
from ..turns import Turns

T = TypeVar("T")

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    attrs BLOB NOT NULL,
    PRIMARY KEY (namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_attrs (
    namespace TEXT NOT NULL,
    attr TEXT NOT NULL,
    value NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (namespace, attr, value, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS item_attrs_by_item ON item_attrs (namespace, name);
"""
_BATCH = 500  # names per IN (...) list, well under SQLite's variable limit
HANDED_OVER = 4  # calls queued at the worker at once: enough to keep it busy (storage/turns.py)


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string above every string starting with `prefix` (None: no bound),
    so a prefix becomes an index range."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code <= 0x10FFFF:
            chars[-1] = chr(0xE000 if 0xD800 <= code <= 0xDFFF else code)
            return "".join(chars)
        chars.pop()
    return None


class SQLiteItemBackend(ItemBackend):
    name = "sqlite"

    def __init__(
        self, path: Path, *, busy_timeout: float = 10.0, read_only: bool = False
    ) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        # Opened with mode=ro, nothing made nor set up: what xmppctl check reads.
        self.read_only = read_only
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xmppd-sqlite")
        self._turns = Turns(HANDED_OVER)
        self._conn: sqlite3.Connection | None = None  # used only on the worker thread
        self._closed = False

    @classmethod
    async def open(cls, path: Path, *, read_only: bool = False) -> SQLiteItemBackend:
        """Open (creating if needed) and check the database now, so a bad path
        fails at startup rather than at the first login; `read_only`: only open
        a database that exists (NoStoreYet if none)."""
        if read_only and not await asyncio.to_thread(path.exists):
            raise NoStoreYet(cls.name, str(path))
        backend = cls(path, read_only=read_only)
        try:
            await backend._run("open", lambda conn: None)
        except BaseException:
            await backend.close()
            raise
        return backend

    @classmethod
    async def from_config(
        cls, cfg: SQLiteItemsConfig, data_dir: Path, *, read_only: bool = False
    ) -> SQLiteItemBackend:
        return await cls.open(data_dir / cfg.path, read_only=read_only)

    def describe(self) -> str:
        return f"sqlite {self.path}"

    # -- worker-thread plumbing ------------------------------------------------

    async def _run(self, operation: str, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StorageError(self.name, operation, "backend is closed")
        loop = asyncio.get_running_loop()
        try:
            async with self._turns():
                return await loop.run_in_executor(self._executor, self._call, fn)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(self.name, operation, f"{self.path}: {exc}") from exc

    def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            self._conn = self._connect()
        return fn(self._conn)

    def _connect(self) -> sqlite3.Connection:
        """Open and set up the file, waiting out another process doing the same.

        Switching a new file to WAL takes an exclusive lock that SQLite does not
        wait for on its busy timeout, so two nodes starting together on a fresh
        data_dir would see "database is locked": retry until the timeout.
        """
        if self.read_only:
            return self._open_read_only()
        self.path.parent.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                return self._open_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)  # on the store's own worker thread, never the event loop

    def _open_read_only(self) -> sqlite3.Connection:
        """The database as it is: no WAL switch, no schema (a write each).

        With no -wal file beside it no process has it open, and a read-only
        connection would make the -wal and -shm files (it cannot remove them
        again): so it is opened as immutable, which makes nothing. With one, a
        server is using it, and its -wal and -shm files are read as they are."""
        wal = self.path.with_name(self.path.name + "-wal")
        immutable = "" if wal.exists() else "&immutable=1"
        uri = f"{self.path.absolute().as_uri()}?mode=ro{immutable}"
        conn = sqlite3.connect(uri, uri=True, timeout=self._busy_timeout, isolation_level=None)
        try:
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this server's {SCHEMA_VERSION}"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_once(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None)
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this server's {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                # CREATE ... IF NOT EXISTS: another process may have just done it.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- statements (worker thread) --------------------------------------------

    @staticmethod
    def _apply_put(
        conn: sqlite3.Connection,
        namespace: str,
        name: str,
        attrs: Attrs,
        if_absent: bool,
        if_version: int | None,
    ) -> int:
        row = conn.execute(
            "SELECT version FROM items WHERE namespace = ? AND name = ?", (namespace, name)
        ).fetchone()
        current: int | None = row[0] if row else None
        if if_absent and current is not None:
            raise ConditionFailed(f"{namespace}/{name}: exists (version {current})")
        if if_version is not None and current != if_version:
            raise ConditionFailed(
                f"{namespace}/{name}: version is {current}, expected {if_version}"
            )
        version = (current or 0) + 1
        conn.execute(
            "INSERT INTO items (namespace, name, version, attrs) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (namespace, name) DO UPDATE"
            " SET version = excluded.version, attrs = excluded.attrs",
            (namespace, name, version, encode_attrs(attrs)),
        )
        if current is not None:
            conn.execute(
                "DELETE FROM item_attrs WHERE namespace = ? AND name = ?", (namespace, name)
            )
        conn.executemany(
            "INSERT INTO item_attrs (namespace, attr, value, name) VALUES (?, ?, ?, ?)",
            [(namespace, key, value, name) for key, value in attrs.items()],
        )
        return version

    @staticmethod
    def _apply_delete(
        conn: sqlite3.Connection, namespace: str, name: str, if_version: int | None
    ) -> bool:
        if if_version is not None:
            row = conn.execute(
                "SELECT version FROM items WHERE namespace = ? AND name = ?", (namespace, name)
            ).fetchone()
            current = row[0] if row else None
            if current != if_version:
                raise ConditionFailed(
                    f"{namespace}/{name}: version is {current}, expected {if_version}"
                )
        deleted = conn.execute(
            "DELETE FROM items WHERE namespace = ? AND name = ?", (namespace, name)
        ).rowcount
        conn.execute("DELETE FROM item_attrs WHERE namespace = ? AND name = ?", (namespace, name))
        return deleted > 0

    # -- ItemBackend -----------------------------------------------------------

    async def get(self, namespace: str, name: str) -> Item | None:
        def run(conn: sqlite3.Connection) -> Item | None:
            row = conn.execute(
                "SELECT version, attrs FROM items WHERE namespace = ? AND name = ?",
                (namespace, name),
            ).fetchone()
            return Item(name, decode_attrs(row[1]), row[0]) if row else None

        return await self._run("get", run)

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
        attrs = dict(attrs)

        def run(conn: sqlite3.Connection) -> int:
            return self._transaction(
                conn, lambda c: self._apply_put(c, namespace, name, attrs, if_absent, if_version)
            )

        version = await self._run("put", run)
        return Item(name, attrs, version)

    async def delete(self, namespace: str, name: str, *, if_version: int | None = None) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            return self._transaction(
                conn, lambda c: self._apply_delete(c, namespace, name, if_version)
            )

        return await self._run("delete", run)

    async def query(self, namespace: str, query: Query) -> Page:
        check_query(query)
        by_attr = query.order_by not in (None, "name")
        joins: list[str] = []
        params: list[Any] = []
        if by_attr:
            joins.append(
                "JOIN item_attrs AS o ON o.namespace = i.namespace AND o.name = i.name"
                " AND o.attr = ?"
            )
            params.append(query.order_by)
        for n, (key, value) in enumerate(query.where.items()):
            joins.append(
                f"JOIN item_attrs AS w{n} ON w{n}.namespace = i.namespace"
                f" AND w{n}.name = i.name AND w{n}.attr = ? AND w{n}.value = ?"
            )
            params += [key, value]
        conds = ["i.namespace = ?"]
        params.append(namespace)
        if query.prefix:
            conds.append("i.name >= ?")
            params.append(query.prefix)
            upper = prefix_upper_bound(query.prefix)
            if upper is not None:
                conds.append("i.name < ?")
                params.append(upper)
        cmp = "<" if query.descending else ">"
        if query.page_token is not None:
            last = decode_token(query.page_token, 2 if by_attr else 1)
            if by_attr:
                conds.append(f"(o.value, i.name) {cmp} (?, ?)")
            else:
                conds.append(f"i.name {cmp} ?")
            params += last
        direction = "DESC" if query.descending else "ASC"
        order = f"o.value {direction}, i.name {direction}" if by_attr else f"i.name {direction}"
        sql = (
            "SELECT i.name, i.version, i.attrs"
            + (", o.value" if by_attr else "")
            + " FROM items AS i "
            + " ".join(joins)
            + " WHERE "
            + " AND ".join(conds)
            + f" ORDER BY {order} LIMIT ?"
        )
        params.append(query.limit + 1)

        def run(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        rows = await self._run("query", run)
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        items = [Item(row[0], decode_attrs(row[2]), row[1]) for row in rows]
        token = None
        if more:
            last_row = rows[-1]
            sort_key: list[AttrValue] = [last_row[3], last_row[0]] if by_attr else [last_row[0]]
            token = encode_token(sort_key)
        return Page(items, token)

    async def batch_get(self, namespace: str, names: Sequence[str]) -> dict[str, Item]:
        wanted = list(dict.fromkeys(names))

        def run(conn: sqlite3.Connection) -> dict[str, Item]:
            found: dict[str, Item] = {}
            for start in range(0, len(wanted), _BATCH):
                chunk = wanted[start : start + _BATCH]
                marks = ",".join("?" * len(chunk))
                for name, version, attrs in conn.execute(
                    "SELECT name, version, attrs FROM items"
                    f" WHERE namespace = ? AND name IN ({marks})",
                    [namespace, *chunk],
                ):
                    found[name] = Item(name, decode_attrs(attrs), version)
            return found

        return await self._run("batch_get", run)

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        for name, attrs in items.items():
            check_item(name, attrs)
        rows = [(name, dict(attrs)) for name, attrs in items.items()]

        def apply(conn: sqlite3.Connection) -> None:
            for name, attrs in rows:
                self._apply_put(conn, namespace, name, attrs, False, None)

        await self._run("batch_put", lambda conn: self._transaction(conn, apply))

    async def transact(self, writes: Sequence[Write]) -> None:
        check_writes(writes)
        writes = list(writes)

        def apply(conn: sqlite3.Connection) -> None:
            for write in writes:
                if isinstance(write, Put):
                    self._apply_put(
                        conn,
                        write.namespace,
                        write.name,
                        write.attrs,
                        write.if_absent,
                        write.if_version,
                    )
                elif isinstance(write, Delete):
                    self._apply_delete(conn, write.namespace, write.name, write.if_version)

        await self._run("transact", lambda conn: self._transaction(conn, apply))

    async def namespaces(self) -> list[str]:
        """Every namespace holding at least one item, sorted (for migration)."""

        def run(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute("SELECT DISTINCT namespace FROM items ORDER BY namespace")
            return [row[0] for row in rows]

        return await self._run("namespaces", run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._disconnect)
        finally:
            self._executor.shutdown(wait=False)
