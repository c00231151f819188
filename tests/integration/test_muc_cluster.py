"""Multi-user chat across cluster nodes: one live owner per room (docs/architecture.md).

Three nodes on one Redis and the same stores, in this process; slixmpp clients
with xep_0045 spread over them. The room's name is chosen so that its owner
(rendezvous hashing over the live nodes, `owner_of`) is a node no client is
on, so that every stanza to the room crosses nodes and every stanza from it
crosses back.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lxml import etree
from redis.asyncio import Redis
from slixmpp import JID, Iq, Message
from slixmpp.exceptions import IqError, PresenceError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from tests.integration.clients import close, insecure_context
from tests.integration.conftest import StartServer
from tests.integration.test_muc import MODULES, USERS, Chatter, chatter
from tests.integration.test_sm_cluster import (
    NodeProcess,
    cluster,
    node_process,  # noqa: F401  (fixture)
)
from tests.storage.services import service_factory  # noqa: F401  (fixture)
from xmppd.cluster import schema
from xmppd.cluster.heartbeat import INTERVAL, TTL
from xmppd.modules import _muc_live
from xmppd.modules._muc_send import SLICE
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
    redis_service: LocalService, start_server: StartServer  # noqa: F811
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
    redis_service: LocalService, start_server: StartServer  # noqa: F811
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

    # The new owner took the occupants over (Redis): they are still in the room.
    assert await self_ping(bob, JID(f"{room}/Bob")) is None
    assert await self_ping(alice, JID(f"{room}/Alice")) is None
    alice.send_message(mto=room, mbody="after the stop", mtype="groupchat")
    assert (await bob.said())["body"] == "after the stop"
    assert (await alice.said())["body"] == "before the stop"  # her own, reflected
    assert (await alice.said())["body"] == "after the stop"
    info = await bob.plugin["xep_0030"].get_info(jid=room, timeout=WAIT)
    assert ("conference", "text", None, "Kept") in info["disco_info"]["identities"]
    # A newcomer sees both of them, the stored subject and the whole history.
    carol = await chatter(a, "carol@localhost/laptop")
    _own, subject, occupants, history = await carol.muc.join_muc_wait(
        room, "Carol", timeout=WAIT
    )
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob", "Carol"]
    assert subject["subject"] == "Still here"
    assert [m["body"] for m in history] == ["before the stop", "after the stop"]
    for client in (alice, bob, carol):
        await close(client)


async def test_a_room_carries_on_when_its_owner_node_is_killed(
    redis_service: LocalService,
    start_server: StartServer,
    node_process: Callable[..., Any],  # noqa: F811
    tmp_path: Path,
    storage_section: dict[str, Any] | None,
) -> None:
    """The room's owner is a real process, killed (SIGKILL) mid-conversation, with one
    occupant's session (Carol's); the others are on the two nodes that live (in this
    process). Once the dead node is reaped the room runs on another node with the
    occupants that live, who are told that Carol left, and who never rejoin; the last
    message the dead node handled, routed again by its reaper, is not delivered (nor
    kept in history) twice."""
    storage: dict[str, Any] = (
        storage_section if storage_section is not None else {"cache": {"backend": "none"}}
    )

    def inbox_only(node: str) -> dict[str, Any]:
        # What this test needs is node-a's inbox stream holding the last message when
        # it dies (its reaper routes it again): stanzas through Redis, not the links
        # (over a link, what node-a did not acknowledge is routed again by its sender:
        # tests/integration/test_cluster_link.py).
        return {**cluster(redis_service, node), "link": {"enabled": False}}

    b = await start_server(
        users=USERS, modules=MODULES, cluster=inbox_only("node-b"), storage=storage
    )
    c = await start_server(
        users={}, modules=MODULES, cluster=inbox_only("node-c"), storage=storage
    )
    a: NodeProcess = await node_process(
        tmp_path, cluster=inbox_only("node-a"), storage=storage, modules=MODULES
    )
    for node in (b, c):
        assert node.cluster is not None
        while node.cluster.nodes != {"node-a", "node-b", "node-c"}:
            await node.cluster.heartbeat.beat()
    room = room_owned_by("node-a", ("node-a", "node-b", "node-c"))
    alice = await chatter(b, "alice@localhost/desk")
    bob = await chatter(c, "bob@localhost/phone")
    carol = Chatter("carol@localhost/laptop", USERS["carol"])  # on the node to be killed
    carol.ssl_context = insecure_context()
    carol.enable_direct_tls, carol.enable_starttls = True, False
    carol.connect("127.0.0.1", a.port)
    await asyncio.wait_for(carol.started.wait(), 15)
    await create(alice, room, "Alice", persistentroom=True, roomname="Survivor")
    await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    await carol.muc.join_muc_wait(room, "Carol", timeout=WAIT)
    await alice.presence_of("Carol")
    await bob.presence_of("Carol")
    alice.muc.set_subject(room, "Before the kill")
    await asyncio.wait_for(bob.subjects.get(), WAIT)  # his join's (none)
    await asyncio.wait_for(bob.subjects.get(), WAIT)
    alice.send_message(mto=room, mbody="stored", mtype="groupchat")
    assert (await bob.said())["body"] == "stored"

    # The last message before the kill: handled by node-a (Bob has it, its id is in
    # the room's record in Redis) and still in node-a's inbox, which its reaper routes
    # again. The process is frozen (SIGSTOP) before its inbox is looked at, so that it
    # cannot trim it in between; tried again in the rare case that it just had.
    redis = Redis.from_url(devservices.redis_url(redis_service))
    deadline = time.monotonic() + WAIT
    last: list[str] = []
    try:
        while True:
            assert time.monotonic() < deadline, "node-a trimmed its inbox every time"
            message = alice.make_message(mto=room, mbody=f"last {len(last)}", mtype="groupchat")
            message["id"] = f"last-{len(last)}"
            message.send()
            last.append(f"last {len(last)}")
            assert (await bob.said())["body"] == last[-1]
            record = f"xmppd:muc:room:{room.bare}"
            while f"last-{len(last) - 1}" not in str(await redis.hget(record, "seen")):
                assert time.monotonic() < deadline, "node-a never wrote the room's record"
                await asyncio.sleep(0.01)
            a.process.send_signal(signal.SIGSTOP)
            if await redis.xlen(schema.inbox_key("node-a")):
                break
            a.process.send_signal(signal.SIGCONT)
    finally:
        await redis.aclose()
    await a.kill()
    killed = time.monotonic()
    assert await self_ping(bob, JID(f"{room}/Bob"), TTL + INTERVAL + WAIT) is None
    print(f"\nthe self-ping was answered {time.monotonic() - killed:.1f} s after the kill")
    for client in (alice, bob):  # Carol's session died with node-a: she left
        gone = await client.presence_of("Carol", "unavailable")
        assert gone["muc"]["role"] == "none"
    assert await self_ping(alice, JID(f"{room}/Alice")) is None
    info = await bob.plugin["xep_0030"].get_info(jid=room, timeout=WAIT)
    assert ("conference", "text", None, "Survivor") in info["disco_info"]["identities"]

    alice.send_message(mto=room, mbody="after the kill", mtype="groupchat")
    # The self-ping came after the replayed message, on the same path: a copy of it
    # would be here first.
    assert (await bob.said())["body"] == "after the kill"
    carol = await chatter(b, "carol@localhost/laptop")  # back, on another node
    _own, subject, occupants, history = await carol.muc.join_muc_wait(
        room, "Carol", timeout=WAIT
    )
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob", "Carol"]
    assert subject["subject"] == "Before the kill"
    assert [m["body"] for m in history] == ["stored", *last, "after the kill"]
    for client in (alice, bob, carol):
        await close(client)


def room_moving_to(node: str, before: frozenset[str], after: frozenset[str]) -> JID:
    """A room owned by `node` among `after` and by another node among `before`."""
    return next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", before) != node
        and owner_of(jid, after) == node
    )


async def two_nodes(
    start_server: StartServer, url: str, modules: dict[str, Any] = MODULES
) -> tuple[Server, Server]:
    a = await start_server(
        users=USERS, modules=modules, cluster={"redis_url": url, "node_name": "muc-a"}
    )
    b = await start_server(
        users={}, modules=modules, cluster={"redis_url": url, "node_name": "muc-b"}
    )
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != {"muc-a", "muc-b"}:
            await node.cluster.heartbeat.beat()
    return a, b


async def test_a_node_that_joins_takes_over_the_rooms_it_now_owns(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """A room owned by b among {a, b} whose owner among {a, b, c} is c: when c joins, b
    lets it go (written, then its lease in Redis), c takes it over at its next stanza,
    with its occupant: her self-ping succeeds, and she talks on without rejoining."""
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = room_moving_to("muc-c", frozenset({"muc-a", "muc-b"}), frozenset(NODES))
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

    assert await self_ping(alice, JID(f"{room}/Alice")) is None
    assert room.bare in c.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    alice.send_message(mto=room, mbody="still here", mtype="groupchat")
    assert (await alice.said())["body"] == "still here"
    bob = await chatter(a, "bob@localhost/phone")
    _own, subject, occupants, _ = await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    assert subject["subject"] == "Moving"
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob"]
    for client in (alice, bob):
        await close(client)


async def test_messages_sent_while_a_node_joins_appear_once_in_one_order(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """The window between a node's first heartbeat and the others' next one: c owns the
    (temporary) room as soon as it beats, while a and b still send its stanzas to b.
    c waits for b's lease instead of running a room of its own; b lets go at its
    next beat and c runs on from what b left in Redis. Every message, sent from the
    three nodes before and after the handover, reaches every occupant once, in one
    order, and the one who joined meanwhile gets what came before as history."""
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    for node in (a, b):  # their beats come when the test says (it beats them by hand)
        assert node.cluster is not None and node.cluster.heartbeat._task is not None
        node.cluster.heartbeat._task.cancel()
    room = room_moving_to("muc-c", frozenset({"muc-a", "muc-b"}), frozenset(NODES))
    alice = await chatter(a, "alice@localhost/desk")
    bob = await chatter(b, "bob@localhost/phone")
    await create(alice, room, "Alice")  # temporary: Redis is the only place it is
    await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)

    c = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "muc-c"}
    )
    assert c.cluster is not None and c.cluster.nodes == frozenset(NODES)
    assert a.cluster is not None and b.cluster is not None
    assert a.cluster.nodes == b.cluster.nodes == {"muc-a", "muc-b"}  # not yet
    carol = await chatter(c, "carol@localhost/laptop")
    joining = asyncio.ensure_future(carol.muc.join_muc_wait(room, "Carol", timeout=WAIT))
    await asyncio.sleep(0)  # the task's first step sends the join
    for n in range(2):
        carol.send_message(mto=room, mbody=f"carol {n}", mtype="groupchat")
    for n in range(2):  # in the window: a and b still send to b
        alice.send_message(mto=room, mbody=f"alice {n}", mtype="groupchat")
        bob.send_message(mto=room, mbody=f"bob {n}", mtype="groupchat")
    before = [str((await alice.said())["body"]) for _ in range(4)]
    assert [str((await bob.said())["body"]) for _ in range(4)] == before
    assert not joining.done()  # c waits for b to let go

    for node in (a, b):
        await node.cluster.heartbeat.beat()
    _own, _subject, occupants, history = await joining
    assert [p["from"].resource for p in occupants] == ["Alice", "Bob", "Carol"]
    assert [m["body"] for m in history] == before
    for n in range(2, 4):
        alice.send_message(mto=room, mbody=f"alice {n}", mtype="groupchat")
        bob.send_message(mto=room, mbody=f"bob {n}", mtype="groupchat")
    assert [str((await carol.said())["body"]) for _ in history] == before  # (the queue's)
    after = [str((await carol.said())["body"]) for _ in range(6)]
    assert after[:2] == ["carol 0", "carol 1"]
    for client in (alice, bob):
        assert [str((await client.said())["body"]) for _ in range(6)] == after
    sent = {f"{who} {n}" for who in ("alice", "bob") for n in range(4)} | {"carol 0", "carol 1"}
    assert sorted(before + after) == sorted(sent)
    assert room.bare in c.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    assert room.bare not in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    for client in (alice, bob, carol):
        await close(client)


async def test_the_room_directory_lists_the_live_rooms_of_every_node(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """disco#items on the service, asked on a node that runs no room, lists a public
    temporary room that runs on another node (Redis lists it), not a hidden one, and
    no longer once the room is gone (its last occupant left)."""
    a, b, _c = await three_nodes(start_server, redis_service)
    room, hidden = room_owned_by("muc-c"), room_owned_by("muc-a")
    alice = await chatter(a, "alice@localhost/desk")
    bob = await chatter(b, "bob@localhost/phone")
    await create(alice, room, "Alice", roomname="Elsewhere")
    await create(alice, hidden, "Alice", roomname="Hidden", publicroom=False)
    assert not b.modules.modules["muc"].rooms  # type: ignore[attr-defined]

    async def listed() -> dict[str, str]:
        """What the directory lists: one query (what the room's node wrote a moment
        ago may not be in Redis yet, so callers ask until they see it)."""
        items = await bob.plugin["xep_0030"].get_items(jid="conference.localhost", timeout=WAIT)
        return {str(jid): name for jid, _node, name in items["disco_items"]["items"]}

    deadline = time.monotonic() + WAIT
    while (found := await listed()) != {room.bare: "Elsewhere"}:
        assert time.monotonic() < deadline, f"the directory lists {found}"
    alice.muc.leave_muc(room, "Alice")
    while room.bare in (found := await listed()):
        assert time.monotonic() < deadline, f"the directory still lists {found}"
    for client in (alice, bob):
        await close(client)


async def test_a_lease_left_by_an_earlier_process_is_let_go(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """A room's lease held by a live node that does not run the room (an earlier
    process of that node's name died holding it, and the name came back before its
    heartbeat expired): the room's owner asks that node, which lets go, and the room
    runs; a join does not wait for ever."""
    url = devservices.redis_url(redis_service)
    a, _b = await two_nodes(start_server, url)
    room = next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", frozenset({"muc-a", "muc-b"}))
        == "muc-a"
    )
    redis = Redis.from_url(url)
    try:
        await redis.hset(f"xmppd:muc:room:{room.bare}", "node", "muc-b")
    finally:
        await redis.aclose()
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", roomname="Fresh")
    assert await self_ping(alice, JID(f"{room}/Alice")) is None
    await close(alice)


async def test_a_copy_whose_lease_another_node_took_stops_and_the_room_goes_on(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """The room's lease taken by another node (as when the room's node, its event loop
    stalled past the heartbeat's TTL, was taken for dead): the old copy's next write
    is refused and it stops (forgetting the lease's epoch); the room's next stanza
    waits for the lease, which the node holding it lets go when asked (it does not run
    the room), and the room goes on from Redis with its occupant."""
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", frozenset({"muc-a", "muc-b"}))
        == "muc-b"
    )
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", roomname="Fenced")
    rooms = b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    assert room.bare in rooms
    redis = Redis.from_url(url)
    try:
        await redis.hset(f"xmppd:muc:room:{room.bare}", "node", "muc-a")
    finally:
        await redis.aclose()
    alice.send_message(mto=room, mbody="before", mtype="groupchat")
    assert (await alice.said())["body"] == "before"  # handled, then its write refused
    shut = await alice.presence_of("Alice", "unavailable")  # told, not left believing
    assert {110, 332} <= set(shut["muc"]["status_codes"])
    deadline = time.monotonic() + WAIT
    while room.bare in rooms:
        assert time.monotonic() < deadline, "the old copy went on"
        await asyncio.sleep(0.01)
    live = b.modules.modules["muc"].live  # type: ignore[attr-defined]
    assert room.bare not in live._epochs  # the lost lease's epoch went with the copy
    # The room heard her leave too: she joins again, a full join.
    await alice.muc.join_muc_wait(room, "Alice", timeout=WAIT)
    alice.send_message(mto=room, mbody="after", mtype="groupchat")
    assert (await alice.said())["body"] == "after"
    assert room.bare in rooms
    assert await self_ping(alice, JID(f"{room}/Alice")) is None
    await close(alice)


async def test_a_room_wanted_back_while_it_is_handed_over_keeps_its_lease(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """The node set flaps: b starts handing its room over, then owns it again, and a
    stanza for the room reaches b before the release is written. The load waits for
    the hand-over, then claims: b runs the room with the lease (a claim that went
    first was undone by the release: the room's next write refused, its occupant
    told she was out, and another node free to run it too)."""
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = room_owned_by("muc-b", ("muc-a", "muc-b"))
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", roomname="Flapping")
    muc = b.modules.modules["muc"]
    assert room.bare in muc.rooms  # type: ignore[attr-defined]

    # One turn of b's loop: the room, busy sending (a big room's output, routed a
    # slice at a time: the hand-over waits for it), moves away (b taken for leaving)
    # and back, and a message for it arrives.
    noise = [
        etree.fromstring(f"<message xmlns='jabber:client' type='error' from='{room}'"
                         f" to='localhost' id='{n}'/>")
        for n in range(20 * SLICE)
    ]
    muc.outbox.send(room.bare, noise)  # type: ignore[attr-defined]
    muc._leaving.add("muc-b")  # type: ignore[attr-defined]
    muc._nodes_changed(b.cluster.nodes)  # type: ignore[attr-defined, union-attr]
    assert room.bare not in muc.rooms  # type: ignore[attr-defined]
    muc._leaving.discard("muc-b")  # type: ignore[attr-defined]
    message = etree.fromstring(
        f"<message xmlns='jabber:client' from='{alice.boundjid}' to='{room}'"
        " type='groupchat' id='back'><body>back</body></message>"
    )
    b.router.route(message)

    assert (await alice.said())["body"] == "back"
    assert await self_ping(alice, JID(f"{room}/Alice")) is None  # still in, never told out
    alice.send_message(mto=room, mbody="and on", mtype="groupchat")
    assert (await alice.said())["body"] == "and on"
    redis = Redis.from_url(url)
    try:
        assert await redis.hget(f"xmppd:muc:room:{room.bare}", "node") == b"muc-b"
    finally:
        await redis.aclose()
    assert room.bare in muc.rooms  # type: ignore[attr-defined]
    await close(alice)


@pytest.mark.parametrize("how", ["heartbeat lapsed", "node set changed"])
async def test_a_node_finds_at_once_that_it_lost_a_quiet_rooms_lease(
    redis_service: LocalService, start_server: StartServer, how: str  # noqa: F811
) -> None:
    """b's lease of a quiet room was taken (by a, while b was taken for dead): b finds
    out as soon as its heartbeat sees it had lapsed, or the live nodes change, not at
    the room's next write or its refresh (every 6 hours): the room goes from b and
    its occupant is told she is out (332), before anyone says anything, and b forgets
    the epoch it held the lease under."""
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", frozenset({"muc-a", "muc-b"}))
        == owner_of(jid, frozenset(NODES)) == "muc-b"
    )
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", roomname="Quiet")
    rooms = b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    assert room.bare in rooms
    redis = Redis.from_url(url)
    try:
        await redis.hset(f"xmppd:muc:room:{room.bare}", "node", "muc-a")
        if how == "heartbeat lapsed":
            assert b.cluster is not None
            await redis.delete(schema.alive_key("muc-b"))  # expired, b's loop stalled
            await b.cluster.heartbeat.beat()
        else:
            c = await start_server(
                users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "muc-c"}
            )
            for node in (b, c):
                assert node.cluster is not None
                while node.cluster.nodes != frozenset(NODES):
                    await node.cluster.heartbeat.beat()
    finally:
        await redis.aclose()
    shut = await alice.presence_of("Alice", "unavailable")
    assert {110, 332} <= set(shut["muc"]["status_codes"])
    assert room.bare not in rooms
    live = b.modules.modules["muc"].live  # type: ignore[attr-defined]
    assert room.bare not in live._epochs  # nor the lost lease's epoch (kept for ever)
    await close(alice)


async def test_a_quiet_room_keeps_its_lease_and_its_state(
    redis_service: LocalService, start_server: StartServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Records live TTL seconds (2 here, a day in production) after their last
    refresh: a room where nobody says anything for longer keeps its lease, its
    password and its occupant, and its next writes are taken."""
    monkeypatch.setattr(_muc_live, "TTL", 2)
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", frozenset({"muc-a", "muc-b"}))
        == "muc-b"
    )
    alice = await chatter(a, "alice@localhost/desk")
    bob = await chatter(a, "bob@localhost/phone")
    await create(alice, room, "Alice", passwordprotectedroom=True, roomsecret="sesame")
    await asyncio.sleep(3 * _muc_live.TTL)  # quiet
    redis = Redis.from_url(url)
    try:
        key = f"xmppd:muc:room:{room.bare}"
        assert await redis.hget(key, "node") == b"muc-b"
        assert await redis.ttl(key) > 0
    finally:
        await redis.aclose()
    with pytest.raises(PresenceError) as refused:
        await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    assert refused.value.condition == "not-authorized"  # still password-protected
    await bob.muc.join_muc_wait(room, "Bob", password="sesame", timeout=WAIT)
    await alice.presence_of("Bob")
    alice.send_message(mto=room, mbody="still here", mtype="groupchat")
    assert (await bob.said())["body"] == "still here"
    assert room.bare in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    for client in (alice, bob):
        await close(client)


async def test_a_removed_account_loses_its_affiliation_in_a_room_another_node_runs(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """bob is removed on node a while his admin room runs on b: b forgets him too, so
    that its next write of the room does not put him back in the stores."""
    a, b = await two_nodes(start_server, devservices.redis_url(redis_service))
    room = room_owned_by("muc-b", ("muc-a", "muc-b"))
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", persistentroom="1")
    await alice.muc.set_affiliation(room, "admin", jid=JID("bob@localhost"))
    live = b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    assert live[str(room)].affiliation("bob@localhost") == "admin"

    assert await a.modules.remove_account("localhost", "bob") == "account"
    deadline = time.monotonic() + WAIT
    while live[str(room)].affiliation("bob@localhost") != "none":
        assert time.monotonic() < deadline, "node b still has bob as an admin"
        await asyncio.sleep(0.05)
    # b's next write of the room (a new member) leaves bob out.
    await alice.muc.set_affiliation(room, "member", jid=JID("carol@localhost"))
    stored = a.modules.items("localhost", "muc_rooms")
    while True:
        item = await stored.get(room.user)
        state = str(item.attrs["state"]) if item is not None else ""
        if "carol@localhost" in state:
            break
        assert time.monotonic() < deadline, "the room was not written"
        await asyncio.sleep(0.05)
    assert "bob@localhost" not in state
    await close(alice)


async def test_a_removed_creator_leaves_no_jid_in_a_room_another_node_runs(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """bob, on node a, created a persistent room that b runs and spoke there; removed
    on a, b forgets him as creator and gives his messages in the history an occupant
    id that is not his any more, in memory, in Redis and in the stores; the messages
    stay."""
    a, b = await two_nodes(start_server, devservices.redis_url(redis_service))
    room = room_owned_by("muc-b", ("muc-a", "muc-b"))
    bob = await chatter(a, "bob@localhost/desk")
    await create(bob, room, "Bob", persistentroom="1")
    bob.send_message(mto=room, mbody="remember this", mtype="groupchat")
    live = b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    deadline = time.monotonic() + WAIT
    while not live[str(room)].history:
        assert time.monotonic() < deadline, "the message did not reach the history"
        await asyncio.sleep(0.05)
    his = live[str(room)].occupant_id("bob@localhost")
    assert live[str(room)].creator == "bob@localhost"

    assert await a.modules.remove_account("localhost", "bob") == "account"
    while live[str(room)].creator or his in live[str(room)].history[0].xml:
        assert time.monotonic() < deadline, "node b still knows bob in the room"
        await asyncio.sleep(0.05)
    assert "remember this" in live[str(room)].history[0].xml
    redis = Redis.from_url(devservices.redis_url(redis_service))
    stored_item = a.modules.items("localhost", "muc_rooms")
    stored_history = a.modules.blobs("localhost", "muc_history")
    while True:
        record = await redis.hgetall(f"xmppd:muc:room:{room}")
        item = await stored_item.get(room.user)
        blob = await stored_history.get(room.user)
        kept = [
            str(record.get(b"state", b"")), str(record.get(b"history", b"")),
            str(item.attrs if item is not None else ""), str(blob.data if blob else ""),
        ]
        if blob is not None and not any("bob@localhost" in k or his in k for k in kept):
            break
        assert time.monotonic() < deadline, f"bob is still named: {kept}"
        await asyncio.sleep(0.1)
    assert "remember this" in kept[3]
    await redis.aclose()
    await close(bob)


async def test_a_decline_right_after_the_room_moved_is_accepted(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """An invitation is written with the room's live state when it is made, so carol's
    decline, sent right after the room moved to a node that joined, is accepted there
    and reaches alice (it was refused when pending invitations moved only with the
    room's next change of state)."""
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = room_moving_to("muc-c", frozenset({"muc-a", "muc-b"}), frozenset(NODES))
    alice = await chatter(a, "alice@localhost/desk")
    carol = await chatter(a, "carol@localhost/laptop")
    for client in (alice, carol):  # available: mediated invitations go to the bare JID
        client.send_presence()
        await client.plugin["xep_0199"].ping(JID("localhost"), timeout=WAIT)
    declines: asyncio.Queue[Message] = asyncio.Queue()
    alice.register_handler(
        Callback("decline", StanzaPath("message/muc/decline"), declines.put_nowait)
    )
    invites: asyncio.Queue[Message] = asyncio.Queue()
    carol.add_event_handler("groupchat_invite", invites.put_nowait)
    await create(alice, room, "Alice", roomname="Temporary")
    redis = Redis.from_url(url)
    try:  # the configuration written, so the invitation does not ride along with it
        deadline = time.monotonic() + WAIT
        while b"Temporary" not in (await redis.hget(f"xmppd:muc:room:{room}", "state") or b""):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
    finally:
        await redis.aclose()
    alice.muc.invite(room, JID("carol@localhost"))
    await asyncio.wait_for(invites.get(), WAIT)

    c = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "muc-c"}
    )
    for node in (a, b, c):
        assert node.cluster is not None
        while node.cluster.nodes != frozenset(NODES):
            await node.cluster.heartbeat.beat()
    assert room.bare not in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    carol.muc.decline(room, JID("alice@localhost"), reason="busy")
    message = await asyncio.wait_for(declines.get(), WAIT)
    assert message["from"] == room
    assert message["muc"]["decline"]["from"] == JID("carol@localhost")
    assert message["muc"]["decline"]["reason"] == "busy"
    assert room.bare in c.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    for client in (alice, carol):
        await close(client)


async def test_an_empty_persistent_room_is_unloaded_and_its_lease_let_go(
    redis_service: LocalService, start_server: StartServer  # noqa: F811
) -> None:
    """Nobody in it for `unload_after`: the room leaves its node's memory, written and
    its lease let go (no state left in Redis); a join right after loads it again on
    its owner, whole, and the room runs on there."""
    url = devservices.redis_url(redis_service)
    modules = {**MODULES, "muc": {"unload_after": 0.01}}
    a, b = await two_nodes(start_server, url, modules)
    room = next(
        JID(jid) for n in range(1000)
        if owner_of(jid := f"room{n}@conference.localhost", frozenset({"muc-a", "muc-b"}))
        == "muc-b"
    )
    muc = b.modules.modules["muc"]
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", persistentroom=True, roomname="Kept")
    alice.muc.set_subject(room, "Topic")
    await asyncio.wait_for(alice.subjects.get(), WAIT)  # the join's (none)
    await asyncio.wait_for(alice.subjects.get(), WAIT)
    alice.send_message(mto=room, mbody="remember", mtype="groupchat")
    assert (await alice.said())["body"] == "remember"
    alice.muc.leave_muc(room, "Alice")
    await alice.presence_of("Alice", "unavailable")
    deadline = time.monotonic() + WAIT
    while not muc.rooms[room.bare].empty:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    muc.unload_idle()  # type: ignore[attr-defined]
    await asyncio.sleep(0.05)
    muc.unload_idle()  # type: ignore[attr-defined]
    assert room.bare not in muc.rooms  # type: ignore[attr-defined]

    bob = await chatter(a, "bob@localhost/phone")  # joins at once: the room loads again
    _own, subject, occupants, history = await bob.muc.join_muc_wait(room, "Bob", timeout=WAIT)
    assert subject["subject"] == "Topic"
    assert [m["body"] for m in history] == ["remember"]
    assert [p["from"].resource for p in occupants] == ["Bob"]
    assert (await bob.said())["body"] == "remember"  # the history, as a message too
    bob.send_message(mto=room, mbody="back", mtype="groupchat")
    assert (await bob.said())["body"] == "back"
    assert muc.rooms[room.bare].config.name == "Kept"  # type: ignore[attr-defined]
    assert await self_ping(bob, JID(f"{room}/Bob")) is None
    redis = Redis.from_url(url)
    try:
        assert await redis.hget(f"xmppd:muc:room:{room.bare}", "node") == b"muc-b"
        bob.muc.leave_muc(room, "Bob")
        await bob.presence_of("Bob", "unavailable")
        while not muc.rooms[room.bare].empty:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline + WAIT
            await asyncio.sleep(0.01)
        muc.unload_idle()  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        muc.unload_idle()  # type: ignore[attr-defined]
        key = f"xmppd:muc:room:{room.bare}"
        while await redis.hget(key, "node") != b"":  # let go, written first
            assert time.monotonic() < deadline + WAIT, "the lease was not let go"
            await asyncio.sleep(0.01)
        assert not await redis.hexists(key, "state")
    finally:
        await redis.aclose()
    for client in (alice, bob):
        await close(client)


@pytest.mark.parametrize("how", ["refresh", "message", "beat"])
async def test_a_room_carries_on_when_redis_comes_back_empty(
    redis_service: LocalService, start_server: StartServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch, how: str,
) -> None:
    """Redis restarted without its data (FLUSHALL here): the room's node finds the room's
    record gone with the epoch it claimed it under, at its refresh of the leases (every
    TTL/4: 0.5 s here) or at the room's next write (a message), and holds the room
    again, writing its record back whole: its occupant stays in it, never told 332
    (system shutdown), and talks on. With "beat" the room's node beats first after the
    flush, when Redis lists no other node: the occupant's node, never reaped nor
    stopped, is still taken as live (else its occupant would be taken out of the room
    as gone with its node); with the others both heartbeats are written back at once."""
    if how in ("refresh", "beat"):
        monkeypatch.setattr(_muc_live, "TTL", 2)
    url = devservices.redis_url(redis_service)
    a, b = await two_nodes(start_server, url)
    room = room_owned_by("muc-b", ("muc-a", "muc-b"))
    alice = await chatter(a, "alice@localhost/desk")
    await create(alice, room, "Alice", roomname="Kept in memory")  # temporary: Redis alone
    assert room.bare in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    key = f"xmppd:muc:room:{room.bare}"
    redis = Redis.from_url(url)
    try:
        assert await redis.hexists(key, "o:Alice")
        async with redis.pipeline(transaction=True) as pipe:
            pipe.flushall()
            for node in ("muc-a", "muc-b") if how != "beat" else ():
                pipe.set(schema.alive_key(node), "1", ex=TTL)
                pipe.sadd(schema.NODES, node)
            await pipe.execute()
        if how == "beat":
            await b.cluster.heartbeat.beat()  # before muc-a's: it lists muc-b alone
            assert "muc-a" in b.cluster.nodes
        if how == "message":
            alice.send_message(mto=room, mbody="after the flush", mtype="groupchat")
            assert (await alice.said())["body"] == "after the flush"
        deadline = time.monotonic() + WAIT
        while not await redis.hexists(key, "o:Alice"):
            assert time.monotonic() < deadline, "the room's record was not written back"
            await asyncio.sleep(0.01)
        assert await redis.hget(key, "node") == b"muc-b"
        assert await redis.hget(f"xmppd:muc:public:{room.domain}", room.bare) is not None
    finally:
        await redis.aclose()
    assert await self_ping(alice, JID(f"{room}/Alice")) is None  # still an occupant
    alice.send_message(mto=room, mbody="and on", mtype="groupchat")
    assert (await alice.said())["body"] == "and on"
    told: list[Any] = []
    while not alice.room_presence.empty():
        told.append(alice.room_presence.get_nowait())
    assert not [p for p in told if p["type"] == "unavailable"], told
    assert room.bare in b.modules.modules["muc"].rooms  # type: ignore[attr-defined]
    await close(alice)
