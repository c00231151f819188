"""Item stores slower than the client that writes to them, for the tests of backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Attrs, Item, Write


class GatedSQLite(SQLiteItemBackend):
    """SQLite whose writes (puts, batches and transactions; deletes pass) wait until the test
    opens the gate: a store slower than the client that writes to it."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()  # set when a write first waits at the shut gate

    async def _pass(self) -> None:
        if not self.gate.is_set():
            self.waiting.set()
        await self.gate.wait()

    async def put(
        self,
        namespace: str,
        name: str,
        attrs: Attrs,
        *,
        if_absent: bool = False,
        if_version: int | None = None,
    ) -> Item:
        await self._pass()
        return await super().put(
            namespace, name, attrs, if_absent=if_absent, if_version=if_version
        )

    async def transact(self, writes: Sequence[Write]) -> None:
        await self._pass()
        await super().transact(writes)

    async def batch_put(self, namespace: str, items: Mapping[str, Attrs]) -> None:
        await self._pass()
        await super().batch_put(namespace, items)


class SlowReadSQLite(SQLiteItemBackend):
    """SQLite whose reads wait until the test opens the gate (open at first): a store
    slower than the stanzas that wait for what it holds."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.gate = asyncio.Event()
        self.gate.set()

    async def get(self, namespace: str, name: str) -> Item | None:
        await self.gate.wait()
        return await super().get(namespace, name)


class HeldWritesSQLite(SQLiteItemBackend):
    """SQLite whose puts and deletes wait until the test opens the gate (reads do not):
    a write read-and-decided, then late to land (a node's store slow, its loop stalled)."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.gate = asyncio.Event()
        self.held = asyncio.Event()  # set once a write waits at the gate

    async def put(self, namespace: str, name: str, attrs: Attrs, **condition: Any) -> Item:
        self.held.set()
        await self.gate.wait()
        return await super().put(namespace, name, attrs, **condition)

    async def delete(self, namespace: str, name: str, **condition: Any) -> bool:
        self.held.set()
        await self.gate.wait()
        return await super().delete(namespace, name, **condition)
