"""Ending the cluster's background tasks for sure."""

from __future__ import annotations

import asyncio


async def cancel_for_sure(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait until it is done, cancelling again as long as it runs.

    A cancellation can be swallowed on Python 3.11 when it lands as redis-py's read
    completes (seen under load: a node's stop then hung for good stopping the inbox), and
    the task goes on looping; asking again ends it at its next await."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.2)
    if not task.cancelled():
        task.exception()  # retrieved: a failure was logged where it happened
