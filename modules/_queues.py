"""One ordered queue of jobs per account, worked by a single task.

The presence module's subscription changes all rewrite the account's roster; run at
once they conflict in the store and may land out of order, and a task per change lets
a sender (or a flood from other servers) make the server hold as many tasks as it
likes. Here an account's changes wait as jobs (a closure and a future, no task) and
one task per account with work runs them in the order they came: it starts when the
queue gets its first job and ends when the queue is empty. Bounding what waits is the
caller's business (`waiting` says how much does).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NamedTuple

Job = Callable[[], Awaitable[None]]
Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Future[Any]]


class _Queued(NamedTuple):
    run: Job
    done: asyncio.Future[None]


class AccountQueues:
    """The queues of the accounts that have work waiting, each worked by one task.

    `spawn(work, account)` starts the worker as that account's work (`ModuleHost.spawn`):
    a task the node waits for at shutdown, and the account's removal until the queue
    is empty, so that no job of it writes once the account's data is deleted.
    """

    def __init__(self, spawn: Spawn, log: logging.Logger) -> None:
        self._spawn = spawn
        self._log = log
        self._queues: dict[str, deque[_Queued]] = {}

    def add(self, account: str, job: Job) -> asyncio.Future[None]:
        """Run `job` after the jobs already queued for `account`; the future is done once
        it ran (or once the worker was stopped before it could: see `_work`)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.get(account)
        if queue is None:
            queue = self._queues[account] = deque()
            self._spawn(self._work(account, queue), account)
        queue.append(_Queued(job, done))
        return done

    def waiting(self, account: str) -> int:
        """Jobs of `account` not yet done, the one running included."""
        queue = self._queues.get(account)
        return 0 if queue is None else len(queue)

    async def _work(self, account: str, queue: deque[_Queued]) -> None:
        try:
            while queue:
                job, done = queue[0]  # stays counted by `waiting` while it runs
                try:
                    await job()
                except Exception:
                    self._log.exception("a queued change of %s failed", account)
                finally:
                    queue.popleft()
                    if not done.done():
                        done.set_result(None)
        finally:
            del self._queues[account]
            if queue:  # cancelled (the server stops): nobody waiting may hang
                self._log.warning(
                    "%d queued changes of %s not made: the server stopped", len(queue), account
                )
                for _, done in queue:
                    if not done.done():
                        done.set_result(None)
