"""A node killed with SIGKILL sends no unavailable presence for its users: the node
that reaps it does, to their contacts and their other resources (docs/cluster.md),
except for resumable stream management sessions, which XEP-0198 keeps "available"
while they await resumption: those are announced gone when their resume timeout
ends on another node (the orphan sweep), if nobody resumed them.

Node A is a real `python -m xmppd` process (a SIGKILL that is one); node B runs in
this process. Clients speak the raw protocol over TLS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import StartServer, port_of
from tests.integration.test_cluster import until
from tests.integration.test_cluster_modules import befriend
from tests.integration.test_sm_cluster import (
    NodeProcess,
    cluster,
    node_process,  # noqa: F401  (fixture)
)
from tests.integration.test_sm_haproxy import PASSWORD, login_at
from tests.integration.test_stream_management import Stream, modules
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster.heartbeat import INTERVAL, TTL
from xmppd.cluster.smstore import PREFIX
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

REAPED_WITHIN = TTL + INTERVAL + 2.0
"""Seconds from the kill to the reap (the heartbeat bound), plus slack for the test."""
C = "{jabber:client}"


async def unavailable_from(stream: Stream, jid: str, timeout: float) -> float:
    """Wait for an unavailable presence from `jid`; when it came (monotonic)."""
    async with asyncio.timeout(timeout):
        while True:
            element = await stream.next("unavailable", timeout=timeout)
            if element.tag == f"{C}presence" and element.get("from") == jid:
                return time.monotonic()


async def online(port: int, user: str, resource: str, sm: str | None = None) -> Stream:
    """Logged in, stream management enabled with `sm` attributes if given, available,
    and its own presence echoed (the broadcast to its contacts has started)."""
    stream = await login_at(port, user, resource)
    if sm is not None:
        await stream.enable(sm)
    await stream.send("<presence/>")
    await stream.next(f'from="{user}@localhost/{resource}"')
    return stream


async def start(
    redis: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> tuple[Server, NodeProcess]:
    users = {name: PASSWORD for name in ("alice", "bob", "carol")}
    storage: dict[str, Any] = (
        storage_section if storage_section is not None else {"cache": {"backend": "none"}}
    )
    b = await start_server(
        users=users, cluster=cluster(redis, "node-b"), storage=storage,
        modules=modules(orphan_sweep=0.2),
    )
    await befriend(b, "alice@localhost", "bob@localhost")
    await befriend(b, "carol@localhost", "bob@localhost")
    a: NodeProcess = await node_process(
        tmp_path, cluster=cluster(redis, "node-a"), storage=storage
    )
    return b, a


async def test_contacts_hear_a_killed_node_s_users_go(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """alice on node A, killed; her contact bob and her other resource, both on node B,
    get her unavailable presence from the node that reaps A, within the reap bound."""
    b, a = await start(redis_service, start_server, node_process, tmp_path, storage_section)
    bob = await online(port_of(b, "direct_tls"), "bob", "desk")
    laptop = await online(port_of(b, "direct_tls"), "alice", "laptop")
    alice = await online(a.port, "alice", "phone")
    await bob.next('from="alice@localhost/phone"')  # her available presence reached bob
    await until(lambda: (s := b.router.directory.get("alice@localhost", "phone")) is not None
                and s.available)
    await a.kill()
    killed = time.monotonic()
    gone = await unavailable_from(bob, "alice@localhost/phone", REAPED_WITHIN)
    print(f"\nbob heard alice go {gone - killed:.1f} s after the kill")
    await unavailable_from(laptop, "alice@localhost/phone", 5)
    assert b.router.directory.get("alice@localhost", "phone") is None
    for stream in (bob, laptop):
        await stream.close()
    alice.drop()


async def test_a_resumable_session_is_announced_gone_at_its_timeout_not_at_the_reap(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """carol (plain) and alice (resumable, max 3 s) on node A, killed: bob hears carol go
    at the reap; alice's session awaits resumption (XEP-0198: no unavailable then) and
    bob hears her go when its timeout ends on node B, nobody having resumed it."""
    b, a = await start(redis_service, start_server, node_process, tmp_path, storage_section)
    bob = await online(port_of(b, "direct_tls"), "bob", "desk")
    carol = await online(a.port, "carol", "phone")
    alice = await online(a.port, "alice", "phone", sm="resume='true' max='3'")
    for user in ("alice", "carol"):
        await bob.next(f'from="{user}@localhost/phone"')
        await until(lambda u=user: (s := b.router.directory.get(f"{u}@localhost", "phone"))
                    is not None and s.available and s.state.get("sm/resumable") is (
                        True if u == "alice" else None))
    # Its stream management record holds its presence (written in a batch: a presence
    # changed within that window before a SIGKILL is not known to the other nodes).
    redis = Redis.from_url(devservices.redis_url(redis_service))
    try:
        deadline = time.monotonic() + 5
        while not [k for k in await redis.keys(PREFIX + "*")
                   if await redis.hget(k, "presence")]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()
    await a.kill()
    killed = time.monotonic()
    carol_gone = await unavailable_from(bob, "carol@localhost/phone", REAPED_WITHIN)
    alice_gone = await unavailable_from(bob, "alice@localhost/phone", 15)
    print(f"\nbob heard carol go {carol_gone - killed:.1f} s after the kill, "
          f"alice {alice_gone - killed:.1f} s")
    assert alice_gone - carol_gone > 1.5  # her resume timeout (3 s, whole seconds), not the reap
    await bob.close()
    for stream in (alice, carol):
        stream.drop()


async def test_a_node_restarted_at_once_announces_its_previous_process_s_users_gone(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """Node A killed and started again under its name before anyone reaped it: it reaps
    its previous process itself at start, and tells alice's contacts she went."""
    b, a = await start(redis_service, start_server, node_process, tmp_path, storage_section)
    bob = await online(port_of(b, "direct_tls"), "bob", "desk")
    alice = await online(a.port, "alice", "phone")
    await bob.next('from="alice@localhost/phone"')
    await until(lambda: (s := b.router.directory.get("alice@localhost", "phone")) is not None
                and s.available)
    await a.kill()
    killed = time.monotonic()
    storage = storage_section if storage_section is not None else {"cache": {"backend": "none"}}
    await node_process(tmp_path, cluster=cluster(redis_service, "node-a"), storage=storage)
    gone = await unavailable_from(bob, "alice@localhost/phone", TTL - 1)  # before a reap
    print(f"\nbob heard alice go {gone - killed:.1f} s after the kill (node A restarted)")
    await bob.close()
    alice.drop()


async def test_entities_that_got_directed_presence_hear_a_killed_node_s_user_go(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """carol on node A sends directed presence to alice on node B (not her contact),
    then node A is killed: alice gets carol's unavailable from the node that reaps A
    (RFC 6121 4.6.3), which read the session's directed-presence targets from Redis."""
    b, a = await start(redis_service, start_server, node_process, tmp_path, storage_section)
    alice = await online(port_of(b, "direct_tls"), "alice", "desk")
    carol = await online(a.port, "carol", "phone")
    await carol.send("<presence to='alice@localhost/desk'/>")
    await alice.next('from="carol@localhost/phone"')
    await until(lambda: (s := b.router.directory.get("carol@localhost", "phone")) is not None
                and s.available)
    # Node A wrote the target to Redis (in a task of its own, after routing it).
    redis = Redis.from_url(devservices.redis_url(redis_service))
    key = "xmppd:presence:directed:carol@localhost/phone"
    try:
        deadline = time.monotonic() + 5
        while await redis.get(key) is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await a.kill()
        await unavailable_from(alice, "carol@localhost/phone", REAPED_WITHIN)
        assert await redis.get(key) is None  # taken by the reaping node
    finally:
        await redis.aclose()
    await alice.close()
    carol.drop()
