"""Archive writes of one host, batched: many messages, one storage call.

Archiving every message writes two items (the sender's archive and the
recipient's). One write per call made a busy client wait on storage round
trips for each of its messages (a SQLite transaction, a DynamoDB request):
chat went at the rate of the store's latency. Queued here, the writes that
come while a batch is being written go together in the next one
(`ItemStore.batch_put`: one SQLite transaction; DynamoDB requests 16 at a
time), by a task that runs while there is something to write, and up to
RUNNERS of them while a whole batch or more waits (a remote store's round
trips overlap). Each write has a future, done when its batch is written or failed
(logged; the caller has delivered the message already), which the module
counts for its backpressure and as the account's work. A batch whose write
fails is tried again after RETRY_WAITS, so that a short failure of the store
loses nothing from the archive.

A batch is written only for the accounts that still exist, looked up once
per account and batch (and try): a message delivered to a session of an account
being removed (still bound, on another node say) must not be archived
once the removal deleted the archive. As the write is the account's work,
a removal that began after the lookup waits for it, and deletes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from xmppd.storage.base import Attrs, ItemStore, StorageError

BATCH = 100
"""Items per storage call at most."""
RUNNERS = 4
"""Batches written at once at most."""
RETRY_WAITS = (0.5, 1.0, 2.0)
"""Seconds before each new try of a batch whose write failed: a short failure of the
store (its write lock held a moment, throttling past the backend's own retries) loses
no message from the archive. The batch's writers wait meanwhile, so their clients are
slowed as by a slow store; a longer outage loses the batch (logged as an error)."""

log = logging.getLogger(__name__)


class Writer:
    """Queues items for one item store and writes them in batches."""

    def __init__(
        self,
        store: ItemStore,
        spawn: Callable[[Awaitable[None]], asyncio.Future[Any]],
        exists: Callable[[str], Awaitable[bool]],
    ) -> None:
        """`exists(user)`: whether the account whose archive is "<user>/" exists."""
        self.store = store
        self._spawn = spawn
        self._exists = exists
        self._queued: dict[str, Attrs] = {}  # the same name twice: written once, the last
        self._done: dict[str, asyncio.Future[None]] = {}
        self._runners = 0

    def add(self, name: str, attrs: Attrs) -> asyncio.Future[None]:
        """Queue a write; the future is done once it was written (or failed, logged)."""
        self._queued[name] = attrs
        done = self._done.get(name)
        if done is None:
            done = self._done[name] = asyncio.get_running_loop().create_future()
        if self._runners == 0 or (
            self._runners < RUNNERS and len(self._queued) >= BATCH * self._runners
        ):
            self._runners += 1
            self._spawn(self._run())
        return done

    async def _run(self) -> None:
        try:
            while self._queued:
                names = list(self._queued)[:BATCH]
                batch = {name: self._queued.pop(name) for name in names}
                waiting = [self._done.pop(name) for name in names]
                try:
                    await self._put(batch)
                finally:
                    for future in waiting:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._runners -= 1

    async def _of_accounts(self, batch: dict[str, Attrs]) -> dict[str, Attrs]:
        """The items of `batch` whose account exists (the others are logged)."""
        users = list({name.partition("/")[0] for name in batch})
        found = await asyncio.gather(*(self._exists(user) for user in users))
        gone = {user for user, exists in zip(users, found, strict=True) if not exists}
        if not gone:
            return batch
        kept = {name: attrs for name, attrs in batch.items() if name.partition("/")[0] not in gone}
        log.info("%d messages not archived in %s: no account %s", len(batch) - len(kept),
                 self.store.namespace, ", ".join(sorted(gone)))
        return kept

    async def _put(self, batch: dict[str, Attrs]) -> None:
        """Write one batch, trying again after each of RETRY_WAITS; logged if it fails."""
        for wait in (*RETRY_WAITS, None):
            try:
                if kept := await self._of_accounts(batch):
                    await self.store.batch_put(kept)
                return
            except StorageError as exc:
                if wait is None:
                    log.error("%d messages not archived in %s: %s", len(batch),
                              self.store.namespace, exc)
                    return
                log.warning("%d messages not archived in %s yet (tried again in %g s): %s",
                            len(batch), self.store.namespace, wait, exc)
            except Exception:
                log.exception("%d messages not archived in %s", len(batch),
                              self.store.namespace)
                return
            await asyncio.sleep(wait)
