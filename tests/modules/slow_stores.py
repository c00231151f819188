"""Item stores slower than the client that writes to them, for the tests of backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import Item, Write


class GatedSQLite(SQLiteItemBackend):
    """SQLite whose writes wait until the test opens the gate: a store slower than the
    client that writes to it."""

    def __init__(self, path: Path, **options: Any) -> None:
        super().__init__(path, **options)
        self.gate = asyncio.Event()

    async def transact(self, writes: Sequence[Write]) -> None:
        await self.gate.wait()
        await super().transact(writes)


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
