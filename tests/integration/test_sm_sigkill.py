"""SIGKILL a node under chat load behind a real load balancer (HAProxy, TCP mode, round
robin) in front of three nodes sharing a real Redis (issue 14): the clients that were on
it resume on the others through the balancer within 5 s, and every numbered message
sent during the whole run is delivered live, replayed on resume, or read back from
offline storage. Lost messages are asserted to be none; duplicates are printed.

The node killed is a real `python -m xmppd` process (a SIGKILL that is one: no flush, no
goodbye, sockets cut by the kernel); the two that stay run in this process, so that
the test can see where the receivers' sessions are and what was stored offline.
Receivers and sender are test_sm_haproxy.py's raw XEP-0198 clients.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import StartServer, port_of
from tests.integration.test_cluster import until
from tests.integration.test_sm_cluster import (
    RESUME_WITHIN,
    NodeProcess,
    cluster,
    node_process,  # noqa: F401  (fixture)
)
from tests.integration.test_sm_haproxy import (
    PASSWORD,
    RECEIVERS,
    Receiver,
    finish,
    haproxy,  # noqa: F401  (fixture)
    login_at,
    lost_messages,
)
from tests.integration.test_stream_management import message
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import schema
from xmppd.cluster.directory import node_of
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(90)

DOOMED = "node-2"


class TimedReceiver(Receiver):
    """A receiver that notes when each of its resumptions was answered."""

    def __init__(self, port: int, user: str) -> None:
        super().__init__(port, user)
        self.resumed_at: list[float] = []

    async def _resume(self) -> None:
        await super()._resume()
        if not self.failed:
            self.resumed_at.append(time.monotonic())


async def test_sigkill_a_node_under_load_behind_haproxy(
    redis_service: LocalService,
    start_server: StartServer,
    haproxy: Any,  # noqa: F811
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    users = {name: PASSWORD for name in [*RECEIVERS, "sender"]}
    extra: dict[str, Any] = {}
    if storage_section is None:
        # Three nodes on one embedded store: no in-process cache (each would be stale).
        extra["storage"] = {"cache": {"backend": "none"}}
    else:
        extra["storage"] = storage_section
    stay = [
        await start_server(
            users=users if i == 0 else {}, cluster=cluster(redis_service, f"node-{i}"), **extra
        )
        for i in range(2)
    ]
    doomed: NodeProcess = await node_process(
        tmp_path, cluster=cluster(redis_service, DOOMED), **extra
    )
    sender_node = stay[1]
    port = await haproxy([*(port_of(node, "direct_tls") for node in stay), doomed.port])
    receivers = [TimedReceiver(port, user) for user in RECEIVERS]
    for receiver in receivers:
        await receiver.start()

    def where(user: str) -> str | None:
        session = sender_node.router.directory.get(f"{user}@localhost", "phone")
        if session is None:
            return None
        return node_of(session) or "node-1"  # None: a session of the sender's node

    await until(lambda: all(where(r.user) is not None for r in receivers))
    on_doomed = [r for r in receivers if where(r.user) == DOOMED]
    assert on_doomed  # round robin put some of them on the node to kill
    tasks = [asyncio.create_task(r.run()) for r in receivers]
    sender = await login_at(port_of(sender_node, "direct_tls"), "sender", "desk")
    sent: list[str] = []
    rounds = 0

    async def chat(count: int) -> None:
        nonlocal rounds
        for _ in range(count):
            for user in RECEIVERS:
                body = f"{user}-{rounds}"
                await sender.send(message(f"{user}@localhost/phone", body))
                sent.append(body)
            rounds += 1
            await asyncio.sleep(0.01)  # a steady chat rate, not a wait for anything

    redis = Redis.from_url(devservices.redis_url(redis_service))
    try:
        await chat(30)
        await doomed.kill()
        killed = time.monotonic()
        # Chat on while its clients resume elsewhere and until the node is reaped (its
        # inbox, which the sender's node forwarded into until they resumed, routed
        # again), and a second after that.
        reaped: float | None = None
        while reaped is None or time.monotonic() - reaped < 1.0:
            await chat(5)
            if reaped is None and not await redis.sismember(schema.NODES, DOOMED):
                reaped = time.monotonic()
            assert time.monotonic() - killed < 30, "the killed node was never reaped"
        await finish(receivers, sender, tasks)
        resume_times = [r.resumed_at[0] - killed for r in on_doomed if r.resumed_at]
        assert len(resume_times) == len(on_doomed)
        assert max(resume_times) < RESUME_WITHIN, resume_times
        assert all(where(r.user) in ("node-0", "node-1") for r in receivers)
        print(f"\nkilled {DOOMED} with {len(on_doomed)} receivers; resumed after "
              f"{', '.join(f'{t:.2f}' for t in sorted(resume_times))} s; "
              f"reaped after {reaped - killed:.1f} s")
        lost = await lost_messages(port, receivers, stay, sent, sender_node, survivors=stay)
    finally:
        await redis.aclose()
    live = Counter(body for r in receivers for body in r.bodies)
    print(f"duplicated live: {sorted(b for b, n in live.items() if n > 1)[:20]}")
    assert lost == [], f"{len(lost)} lost: {lost[:20]}"
