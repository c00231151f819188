"""What counts as an account's work (Router.account_work): what its stanzas start
through `spawn`, however many tasks deep, and nothing else.

An account's removal waits for that work (xmppd.modulehost). Work that serves
everybody (a connection to a peer domain, a room's output queue) must not count,
even when one account's stanza started it, or the removal would wait on other
people's traffic for its whole time limit. Nor may the attribution leak into a
task or a connection's callbacks made inside the account's work.
"""

from __future__ import annotations

import asyncio

import pytest

from xmppd.router import Router

ALICE = "alice@example.org"


async def no_account(user: str, host: str) -> bool:
    return False


@pytest.mark.timeout(10)
async def test_spawned_work_is_the_accounts_however_deep() -> None:
    router = Router(["example.org"], no_account)
    release = asyncio.Event()

    async def child() -> None:
        await release.wait()

    async def handler() -> None:
        router.spawn(child())  # the handler's own work: alice's too
        await release.wait()

    first = router.spawn(handler(), ALICE)
    await asyncio.sleep(0)
    assert first in router.account_work(ALICE)
    assert len(router.account_work(ALICE)) == 2
    release.set()
    await router.drain()
    assert router.account_work(ALICE) == frozenset()


@pytest.mark.timeout(10)
async def test_shared_work_and_what_it_starts_are_nobodys() -> None:
    router = Router(["example.org"], no_account)
    release = asyncio.Event()
    started: list[asyncio.Future[object]] = []

    async def later() -> None:
        await release.wait()

    async def long_lived() -> None:
        # A loop of its own (as a connection's reader), made inside alice's work: what
        # it spawns serves everybody.
        started.append(router.spawn(later()))
        await release.wait()

    async def handler() -> None:
        router.spawn_shared(later())
        asyncio.get_running_loop().call_soon(lambda: started.append(router.spawn(later())))
        await asyncio.create_task(long_lived())

    task = router.spawn(handler(), ALICE)
    for _ in range(5):
        await asyncio.sleep(0)
    assert router.account_work(ALICE) == {task}, "only the handler itself is alice's"
    assert len(started) == 2
    release.set()
    await router.drain()
