"""Multi-user chat across cluster nodes: one live owner per room (docs/architecture.md).

Three nodes on one Redis and the same stores, in this process; slixmpp clients
with xep_0045 spread over them. The room's name is chosen so that its owner
(rendezvous hashing over the live nodes, `owner_of`) is a node no client is
on, so that every stanza to the room crosses nodes and every stanza from it
crosses back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from slixmpp import JID, Iq
from slixmpp.exceptions import IqError

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import redis_service  # noqa: F401  (fixture)
from tests.integration.test_muc import MODULES, USERS, Chatter, chatter
from tests.integration.test_sm_cluster import (
    NodeProcess,
    cluster,
    node_process,  # noqa: F401  (fixture)
)
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import schema
from xmppd.cluster.heartbeat import INTERVAL, TTL
from xmppd.modules.muc import owner_of
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

pytestmark = pytest.mark.timeout(60)

NODES = ("muc-a", "muc-b", "muc-c")
WAIT = 10.0


def room_owned_by(node: str, nodes: tuple[str, ...] = NODES) -> JID:
    """A room JID whose owner among `nodes` is `node`."""
    for n in range(1000):
        jid = f"room{n}@conference.localhost"
        if owner_of(jid, frozenset(nodes)) == node:
            return JID(jid)
    raise AssertionError("no such room")


async def three_nodes(start_server: StartServer, redis: LocalService) -> list[Server]:
    url = devservices.redis_url(redis)
    nodes = []
    for i, name in enumerate(NODES):
        cluster = {"redis_url": url, "node_name": name}
        nodes.append(
            await start_server(users=USERS if i == 0 else {}, modules=MODULES, cluster=cluster)
        )
    for node in nodes:  # each has seen the others' heartbeats
        assert node.cluster is not None
        while node.cluster.nodes != frozenset(NODES):
            await node.cluster.heartbeat.beat()
    return nodes


async def create(owner: Chatter, room: JID, nick: str, **config: Any) -> None:
    own, _subject, _occupants, _history = await owner.muc.join_muc_wait(room, nick, timeout=WAIT)
    assert 201 in own["muc"]["status_codes"]
    form = await owner.muc.get_room_config(room)
    form.set_values({f"muc#roomconfig_{var}": value for var, value in config.items()})
    await owner.muc.set_room_config(room, form)


async def self_ping(client: Chatter, occupant: JID, timeout: float = WAIT) -> str | None:
    """XEP-0410: ping our own occupant JID; None if answered, else the error condition."""
    iq = Iq(client, stype="get", sto=occupant)
    iq.enable("ping")
    try:
        await iq.send(timeout=timeout)
    except IqError as exc:
        return str(exc.condition)
    return None


async def test_occupants_on_three_nodes_share_one_room(
    start_server: StartServer, redis_service: LocalService  # noqa: F811
) -> None:
    a, b, _c = await three_nodes(start_server, redis_service)
    room = room_owned_by("muc-c")
    alice = await chatter(a, "alice@localhost/desk")
    bob = await chatter(b, "bob@localhost/phone")
    carol = await chatter(a, "carol@localhost/laptop")
    await create(alice, room, "Alice", roomname="Spread")
    _own, _subject, occupants, _ = await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob"]
    _own, _subject, occupants, _ = await carol.muc.join_muc_wait(room, "Carol", timeout=WAIT)
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob", "Carol"]
    await alice.presence_of("Carol")
    await bob.presence_of("Carol")

    # Two senders on two nodes, interleaved as fast as they go: one order for all
    # (within the room's burst of 10 messages per occupant).
    for n in range(8):
        alice.send_message(mto=room, mbody=f"alice {n}", mtype="groupchat")
        bob.send_message(mto=room, mbody=f"bob {n}", mtype="groupchat")
    seen = []
    for client in (alice, bob, carol):
        seen.append([str((await client.said())["body"]) for _ in range(16)])
    assert seen[0] == seen[1] == seen[2]
    sent = [f"{who} {n}" for who in ("alice", "bob") for n in range(8)]
    assert sorted(seen[0]) == sorted(sent)

    for client in (alice, bob, carol):  # the subject on join (empty)
        await asyncio.wait_for(client.subjects.get(), WAIT)
    await alice.muc.set_role(room, "Bob", "moderator")  # a moderator changes the subject
    bob.muc.set_subject(room, "Across nodes")  # from node b, via c, to a
    for client in (alice, carol):
        subject = await asyncio.wait_for(client.subjects.get(), WAIT)
        assert (subject["subject"], subject["from"]) == ("Across nodes", JID(f"{room}/Bob"))
    for client in (alice, bob, carol):
        await close(client)


async def test_a_room_carries_on_when_its_owner_node_stops(
    start_server: StartServer, redis_service: LocalService  # noqa: F811
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    room = room_owned_by("muc-c")
    alice = await chatter(a, "alice@localhost/desk")
    bob = await chatter(b, "bob@localhost/phone")
    await create(alice, room, "Alice", persistentroom=True, roomname="Kept")
    await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    alice.muc.set_subject(room, "Still here")
    await asyncio.wait_for(bob.subjects.get(), WAIT)  # his join's (none)
    await asyncio.wait_for(bob.subjects.get(), WAIT)
    alice.send_message(mto=room, mbody="before the stop", mtype="groupchat")
    assert (await bob.said())["body"] == "before the stop"
    assert await self_ping(bob, JID(f"{room}/Bob")) is None  # an occupant

    await c.stop()  # the owner, cleanly: the room moves to a or b

    # The new owner's room has no occupants: the self-ping says so, and they rejoin.
    assert await self_ping(bob, JID(f"{room}/Bob")) == "not-acceptable"
    bob.muc.rooms.pop(room, None)  # slixmpp's own record of the room
    _own, subject, _occupants, history = await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    assert subject["subject"] == "Still here"
    assert [m["body"] for m in history] == ["before the stop"]
    info = await bob.plugin["xep_0030"].get_info(jid=room, timeout=WAIT)
    assert ("conference", "text", None, "Kept") in info["disco_info"]["identities"]
    assert await self_ping(alice, JID(f"{room}/Alice")) == "not-acceptable"
    alice.muc.rooms.pop(room, None)
    _own, _subject, occupants, _ = await alice.muc.join_muc_wait(room, "Alice", timeout=WAIT)
    assert [p["from"].resource for p in occupants] == ["Bob", "Alice"]  # Bob rejoined first
    alice.send_message(mto=room, mbody="after the stop", mtype="groupchat")
    assert (await bob.said())["body"] == "before the stop"  # the history of his rejoin
    assert (await bob.said())["body"] == "after the stop"
    for client in (alice, bob):
        await close(client)


async def test_a_room_carries_on_when_its_owner_node_is_killed(
    redis_service: LocalService,  # noqa: F811
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """The room's owner is a real process, killed (SIGKILL) mid-conversation; its
    occupants are on the two nodes that live (in this process). What the owner had
    stored (configuration, subject, history) is there on the new owner once the dead
    node is reaped; the occupants' self-ping, sent right after the kill, is answered
    then (the reaper routes what the dead node's inbox held), with not-acceptable, and
    they rejoin."""
    storage: dict[str, Any] = (
        storage_section if storage_section is not None else {"cache": {"backend": "none"}}
    )
    b = await start_server(
        users=USERS, modules=MODULES, cluster=cluster(redis_service, "node-b"), storage=storage
    )
    c = await start_server(
        users={}, modules=MODULES, cluster=cluster(redis_service, "node-c"), storage=storage
    )
    a: NodeProcess = await node_process(
        tmp_path, cluster=cluster(redis_service, "node-a"), storage=storage, modules=MODULES
    )
    for node in (b, c):
        assert node.cluster is not None
        while node.cluster.nodes != {"node-a", "node-b", "node-c"}:
            await node.cluster.heartbeat.beat()
    room = room_owned_by("node-a", ("node-a", "node-b", "node-c"))
    alice = await chatter(b, "alice@localhost/desk")
    bob = await chatter(c, "bob@localhost/phone")
    await create(alice, room, "Alice", persistentroom=True, roomname="Survivor")
    await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    alice.muc.set_subject(room, "Before the kill")
    await asyncio.wait_for(bob.subjects.get(), WAIT)  # his join's (none)
    await asyncio.wait_for(bob.subjects.get(), WAIT)
    alice.send_message(mto=room, mbody="stored", mtype="groupchat")
    assert (await bob.said())["body"] == "stored"
    # The owner writes history at most once a second: wait until it is in the store.
    history = b.modules.modules["muc"].host.blobs("localhost", "muc_history")
    deadline = time.monotonic() + WAIT
    while await history.get(room.user) is None:
        assert time.monotonic() < deadline, "the owner never wrote the history"
        await asyncio.sleep(0.1)

    # The dead node's inbox is routed again by its reaper, with what it handled and had
    # not trimmed yet (at least once: up to a second's worth, docs/cluster.md), the joins
    # included: wait until it trimmed them, so that what the reaper replays is only
    # what comes after the kill.
    redis = Redis.from_url(devservices.redis_url(redis_service))
    try:
        while await redis.xlen(schema.inbox_key("node-a")):
            assert time.monotonic() < deadline + 5, "node-a never trimmed its inbox"
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()
    await a.kill()
    killed = time.monotonic()
    condition = await self_ping(bob, JID(f"{room}/Bob"), TTL + INTERVAL + WAIT)
    print(f"\nthe self-ping was answered {time.monotonic() - killed:.1f} s after the kill")
    assert condition == "not-acceptable"
    bob.muc.rooms.pop(room, None)
    _own, subject, _occupants, history_ = await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    assert subject["subject"] == "Before the kill"
    assert [m["body"] for m in history_] == ["stored"]
    info = await bob.plugin["xep_0030"].get_info(jid=room, timeout=WAIT)
    assert ("conference", "text", None, "Survivor") in info["disco_info"]["identities"]
    assert await self_ping(alice, JID(f"{room}/Alice")) == "not-acceptable"
    alice.muc.rooms.pop(room, None)
    await alice.muc.join_muc_wait(room, "Alice", timeout=WAIT)
    alice.send_message(mto=room, mbody="after the kill", mtype="groupchat")
    assert (await bob.said())["body"] == "stored"  # the history of his rejoin
    assert (await bob.said())["body"] == "after the kill"
    for client in (alice, bob):
        await close(client)


async def test_a_node_that_joins_takes_over_the_rooms_it_now_owns(
    start_server: StartServer, redis_service: LocalService  # noqa: F811
) -> None:
    """A room owned by b among {a, b} whose owner among {a, b, c} is c: when c joins, b
    lets it go (written), c loads it from the stores at its next stanza; the occupants
    learn it by self-ping and rejoin, to the stored subject."""
    url = devservices.redis_url(redis_service)
    a = await start_server(
        users=USERS, modules=MODULES, cluster={"redis_url": url, "node_name": "muc-a"}
    )
    b = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "muc-b"}
    )
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != {"muc-a", "muc-b"}:
            await node.cluster.heartbeat.beat()
    room = next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", frozenset({"muc-a", "muc-b"}))
        == "muc-b" and owner_of(jid, frozenset(NODES)) == "muc-c"
    )
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", persistentroom=True)
    alice.muc.set_subject(room, "Moving")
    await asyncio.wait_for(alice.subjects.get(), WAIT)  # the join's (none)
    await asyncio.wait_for(alice.subjects.get(), WAIT)
    assert room.bare in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]

    c = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "muc-c"}
    )
    for node in (a, b, c):  # the next heartbeat of each, without waiting for it
        assert node.cluster is not None
        while node.cluster.nodes != frozenset(NODES):
            await node.cluster.heartbeat.beat()
    assert room.bare not in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]

    assert await self_ping(alice, JID(f"{room}/Alice")) == "not-acceptable"
    alice.muc.rooms.pop(room, None)
    _own, subject, occupants, _ = await alice.muc.join_muc_wait(room, "Alice", timeout=WAIT)
    assert subject["subject"] == "Moving"
    assert [p["from"].resource for p in occupants] == ["Alice"]
    assert room.bare in c.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    await close(alice)
