"""Three nodes on one Redis, real clients spread over them: the modules across nodes.

What a module keeps on a session (its last presence, carbons enabled, the
roster "interested" flag, the active privacy list) is decided on by the
node that routes a stanza, which may not be the session's own: these tests
put the deciding node and the session on different nodes. Each node runs in
this process on the same storage (embedded or cloud, as every integration
test); rosters are written before any node reads them, so no node holds a
stale copy (the coherence of caches across nodes is not what is tested here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from slixmpp import Iq, Message, Presence
from slixmpp.xmlstream import ET

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import USERS, StartServer
from tests.integration.test_cluster import online, received, seen_on, until
from tests.integration.test_cluster_link import linked
from xmppd.config import DEFAULT_MODULES
from xmppd.modules.offline import STORE as OFFLINE_STORE
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.base import ItemBackend, Page, Query
from xmppd.storage.devservices import LocalService
from xmppd.storage.timing import OpStats, TimedItemBackend

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # generous: a loaded CI machine runs three nodes and their clients in one process
"""Seconds a stanza crossing nodes may take here (the issue: milliseconds)."""

PRIVACY = "jabber:iq:privacy"


async def three_nodes(start_server: StartServer, redis: LocalService) -> list[Server]:
    url = devservices.redis_url(redis)
    users = {**USERS, "carol": "carol-secret"}
    nodes = [await start_server(users=users, cluster={"redis_url": url, "node_name": "node-a"})]
    for name in ("node-b", "node-c"):
        nodes.append(await start_server(users={}, cluster={"redis_url": url, "node_name": name}))
    return nodes


async def befriend(node: Server, one: str, other: str) -> None:
    """A mutual subscription, written before anyone logs in."""
    roster = node.modules.module(RosterModule)

    def both(contact: str) -> Callable[[RosterItem | None], RosterItem]:
        def change(item: RosterItem | None) -> RosterItem:
            new = item.copy() if item is not None else RosterItem(jid=contact)
            new.subscription, new.in_roster = "both", True
            return new

        return change

    await roster.modify(one, other, both(other))
    await roster.modify(other, one, both(one))


def replica(node: Server, jid: str) -> Any:
    """The session `node` has for `jid` (a replica if it is bound elsewhere), or None."""
    bare, _, resource = jid.partition("/")
    return node.router.directory.get(bare, resource)


def has_state(node: Server, jid: str, key: str) -> Callable[[], bool]:
    return lambda: (s := replica(node, jid)) is not None and s.state.get(key) is not None


def has_presence(node: Server, jid: str) -> Callable[[], bool]:
    return lambda: (s := replica(node, jid)) is not None and s.presence is not None


def presences(client: Client) -> asyncio.Queue[Presence]:
    queue: asyncio.Queue[Presence] = asyncio.Queue()
    client.add_event_handler("presence", queue.put_nowait)
    return queue


async def presence_from(
    queue: asyncio.Queue[Presence], jid: str, type_: str = "available"
) -> Presence:
    """The next presence from `jid` of `type_`; others (echoes, other contacts) skipped."""
    async with asyncio.timeout(WAIT):
        while True:
            presence = await queue.get()
            # (slixmpp's presence["type"] is the <show/> when there is one)
            if presence["from"].full == jid and presence.xml.get("type", "available") == type_:
                return presence


async def iq_set(client: Client, payload: ET.Element) -> Iq:
    iq = client.make_iq_set()
    iq.append(payload)
    return await iq.send(timeout=WAIT)


async def test_probes_and_a_new_resource_get_the_last_presence_of_resources_elsewhere(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    await befriend(a, "alice@localhost", "bob@localhost")
    desk = await connect(a, "alice@localhost/desk", "alice-secret")
    desk.send_presence(pshow="away", pstatus="at my desk")
    await until(has_presence(b, "alice@localhost/desk"))
    await until(has_presence(c, "alice@localhost/desk"))
    # bob's probe at his login is answered on B, from B's replica of alice/desk
    bob = await connect(b, "bob@localhost/phone", "bob-secret")
    bob_in = presences(bob)
    bob.send_presence()
    seen = await presence_from(bob_in, "alice@localhost/desk")
    assert (seen["show"], seen["status"]) == ("away", "at my desk")
    await until(has_presence(c, "bob@localhost/phone"))
    # alice's new resource on C learns of her resource on A, and of bob on B
    phone = await connect(c, "alice@localhost/phone", "alice-secret")
    phone_in = presences(phone)
    phone.send_presence()
    sibling = await presence_from(phone_in, "alice@localhost/desk")
    assert sibling["status"] == "at my desk"
    await presence_from(phone_in, "bob@localhost/phone")
    for client in (desk, bob, phone):
        await close(client)


async def test_presence_broadcast_and_directed_presence_reach_other_nodes(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    await befriend(a, "alice@localhost", "bob@localhost")
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    carol = await online(c, "carol@localhost/pc", "carol-secret")
    bob_in, carol_in = presences(bob), presences(carol)
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await presence_from(bob_in, "alice@localhost/desk")  # her initial presence
    alice.send_presence(pshow="dnd", pstatus="busy")
    # (bob may get her first presence twice: broadcast, and the answer to his probe)
    while (await presence_from(bob_in, "alice@localhost/desk"))["show"] != "dnd":
        pass
    # carol is no contact: only presence directed to her reaches her, and its end
    alice.send_presence(pto="carol@localhost/pc", pstatus="hello carol")
    directed = await presence_from(carol_in, "alice@localhost/desk")
    assert directed["status"] == "hello carol"
    await close(alice)
    await presence_from(carol_in, "alice@localhost/desk", "unavailable")
    await presence_from(bob_in, "alice@localhost/desk", "unavailable")
    for client in (bob, carol):
        await close(client)


async def test_a_roster_change_is_pushed_to_interested_resources_on_two_other_nodes(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    desk = await online(a, "alice@localhost/desk", "alice-secret")
    pushes: dict[str, asyncio.Queue[Iq]] = {}
    others: list[Client] = []
    for node, resource in ((b, "phone"), (c, "pad")):
        client = await online(node, f"alice@localhost/{resource}", "alice-secret")
        others.append(client)
        queue = pushes[resource] = asyncio.Queue()
        client.add_event_handler(
            "roster_update", lambda iq, q=queue: q.put_nowait(iq) if iq["type"] == "set" else None
        )
        await client.get_roster(timeout=WAIT)
        await until(has_state(a, f"alice@localhost/{resource}", "roster/interested"))
    await desk.update_roster("carol@localhost", name="Carol", timeout=WAIT)
    for resource in ("phone", "pad"):
        push = await asyncio.wait_for(pushes[resource].get(), WAIT)
        assert push["roster"]["items"]["carol@localhost"]["name"] == "Carol"
    for client in (desk, *others):
        await close(client)


async def test_carbons_reach_a_resource_on_another_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    desk = await online(a, "alice@localhost/desk", "alice-secret")
    phone = await online(b, "alice@localhost/phone", "alice-secret")
    bob = await online(c, "bob@localhost/pc", "bob-secret")
    phone.register_plugin("xep_0280")
    sent: asyncio.Queue[Message] = asyncio.Queue()
    got: asyncio.Queue[Message] = asyncio.Queue()
    phone.add_event_handler("carbon_sent", sent.put_nowait)
    phone.add_event_handler("carbon_received", got.put_nowait)
    await phone.plugin["xep_0280"].enable(timeout=WAIT)
    await until(has_state(a, "alice@localhost/phone", "carbons"))
    await until(has_state(c, "alice@localhost/phone", "carbons"))
    await until(seen_on(a, "bob@localhost/pc"))
    # sent on A: copied on A to the phone on B
    desk.send_message(mto="bob@localhost/pc", mbody="from my desk", mtype="chat")
    assert await received(bob, WAIT) == "from my desk"
    copy = await asyncio.wait_for(sent.get(), WAIT)
    assert copy["carbon_sent"]["body"] == "from my desk"
    # received on A, routed on C: copied on C to the phone on B
    bob.send_message(mto="alice@localhost/desk", mbody="to your desk", mtype="chat")
    assert await received(desk, WAIT) == "to your desk"
    copy = await asyncio.wait_for(got.get(), WAIT)
    assert copy["carbon_received"]["body"] == "to your desk"
    for client in (desk, phone, bob):
        await close(client)


async def test_the_active_privacy_list_of_a_recipient_on_another_node_is_honoured(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    query = ET.Element(f"{{{PRIVACY}}}query")
    rules = ET.SubElement(query, f"{{{PRIVACY}}}list", name="no-alice")
    deny = ET.SubElement(
        rules,
        f"{{{PRIVACY}}}item",
        type="jid",
        value="alice@localhost",
        action="deny",
        order="1",
    )
    ET.SubElement(deny, f"{{{PRIVACY}}}message")
    await iq_set(bob, query)
    active = ET.Element(f"{{{PRIVACY}}}query")
    ET.SubElement(active, f"{{{PRIVACY}}}active", name="no-alice")
    await iq_set(bob, active)
    await until(has_state(a, "bob@localhost/phone", "privacy/active"))
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    carol = await online(c, "carol@localhost/pc", "carol-secret")
    errors: asyncio.Queue[Message] = asyncio.Queue()
    alice.add_event_handler("message_error", errors.put_nowait)
    attempt = alice.make_message(mto="bob@localhost/phone", mbody="let me in", mtype="chat")
    attempt["id"] = "m1"
    attempt.send()
    refused = await asyncio.wait_for(errors.get(), WAIT)
    assert refused["id"] == "m1"
    assert refused["error"]["condition"] == "service-unavailable"
    # the list refuses alice only: carol's message after hers is the first bob gets
    carol.send_message(mto="bob@localhost/phone", mbody="from carol", mtype="chat")
    assert await received(bob, WAIT) == "from carol"
    for client in (alice, bob, carol):
        await close(client)


async def test_a_bare_jid_message_finds_the_top_resource_anywhere_and_offline_only_when_none(
    redis_service: LocalService, start_server: StartServer
) -> None:
    a, b, c = await three_nodes(start_server, redis_service)
    phone = await online(b, "bob@localhost/phone", "bob-secret", priority=1)
    desk = await online(c, "bob@localhost/desk", "bob-secret", priority=5)
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(seen_on(a, "bob@localhost/phone", priority=1))
    await until(seen_on(a, "bob@localhost/desk", priority=5))
    alice.send_message(mto="bob@localhost", mbody="for the top one", mtype="chat")
    assert await received(desk, WAIT) == "for the top one"
    # both still connected, neither available: the message is stored, not delivered
    phone.send_presence(ptype="unavailable")
    desk.send_presence(ptype="unavailable")
    for resource in ("phone", "desk"):
        await until(lambda r=resource: not replica(a, f"bob@localhost/{r}").available)
    alice.send_message(mto="bob@localhost", mbody="nobody is available", mtype="chat")
    await until(lambda: a.router.ledger.offline > 0)
    later = await online(a, "bob@localhost/laptop", "bob-secret")
    assert await received(later, WAIT) == "nobody is available"
    assert phone.messages.empty() and desk.messages.qsize() == 0
    for client in (alice, phone, desk, later):
        await close(client)


async def test_a_forwarded_stanza_waits_for_the_change_its_sender_made_before_it(
    redis_service: LocalService, start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's new presence reaches B twice: her entry through pub/sub, the broadcast to
    bob through B's inbox. Even with B's event channel slow, B hands bob the broadcast
    only once its replica has the new presence (what a probe on B would answer)."""
    a, b, _ = await three_nodes(start_server, redis_service)
    await befriend(a, "alice@localhost", "bob@localhost")
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    bob_in = presences(bob)
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await until(has_presence(b, "alice@localhost/desk"))
    assert b.cluster is not None
    sync = b.cluster.sync
    apply, loop = sync._apply, asyncio.get_running_loop()
    monkeypatch.setattr(sync, "_apply", lambda data: loop.call_later(0.3, apply, data))
    alice.send_presence(pshow="dnd")
    # (bob may get her first presence twice: broadcast, and the answer to his probe)
    while (await presence_from(bob_in, "alice@localhost/desk"))["show"] != "dnd":
        pass
    session = replica(b, "alice@localhost/desk")
    assert session.presence is not None
    assert session.presence.findtext("{jabber:client}show") == "dnd"
    for client in (alice, bob):
        await close(client)


class HeldOfflineReads(TimedItemBackend):
    """A node's item store whose reads of the offline index wait while the test holds
    them: a store that answers the delivery of a login's stored messages only after a
    new message for the user came."""

    def __init__(self, inner: ItemBackend) -> None:
        super().__init__(inner, OpStats())
        self.gate = asyncio.Event()
        self.held = asyncio.Event()  # set once a read waits at the shut gate

    async def query(self, namespace: str, query: Query) -> Page:
        if namespace.endswith(f"/{OFFLINE_STORE}") and not self.gate.is_set():
            self.held.set()
            await self.gate.wait()
        return await super().query(namespace, query)


async def new_message_while_stored_ones_are_read(
    start_server: StartServer, redis: LocalService, link: bool | None = None
) -> tuple[Server, Server, HeldOfflineReads, Client, Client]:
    """Nodes A and B; bob, on B, has sent alice three messages, stored; alice logs in on
    A, whose store holds the read of them; then bob sends "new", and A has it. A's
    first_wait is longer than a test may run: the order may not depend on how fast
    this machine is. `link`: None, whichever way B sends; True, over B's link to A
    (up before "new" is sent); False, through A's inbox (no links)."""
    url = devservices.redis_url(redis)
    modules = {**{name: {} for name in DEFAULT_MODULES}, "offline": {"first_wait": 600}}
    links = {} if link is None else {"link": {"enabled": link}}
    a = await start_server(
        cluster={"redis_url": url, "node_name": "node-a", **links}, modules=modules
    )
    b = await start_server(
        users={}, cluster={"redis_url": url, "node_name": "node-b", **links}
    )
    assert a.cluster is not None
    bob = await online(b, "bob@localhost/phone", "bob-secret")
    for n in range(3):
        bob.send_message(mto="alice@localhost", mbody=f"old{n}", mtype="chat")
    await until(lambda: b.router.ledger.offline == 3, WAIT)
    held = HeldOfflineReads(a.storage.items)
    a.storage.items = held  # what the offline module reads from now (ModuleHost.items)
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await asyncio.wait_for(held.held.wait(), WAIT)  # her stored messages are being read
    await until(seen_on(b, "alice@localhost/desk"), WAIT)
    if link:
        await until(lambda: linked(b, a), WAIT)
    stats = a.cluster.stats
    forwarded = stats.forwards_in
    bob.send_message(mto="alice@localhost", mbody="new", mtype="chat")
    # On A: handed to her session (the bug), or queued behind the stored ones.
    await until(lambda: stats.forwards_in > forwarded, WAIT)
    return a, b, held, alice, bob


async def test_stored_messages_reach_the_client_before_one_from_another_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """XEP-0160, RFC 6121 8.5.2: the stored messages first, also when the new one comes
    from a user on another node. Before, the node's inbox (or link) handed a forwarded
    message straight to the session, ahead of the stored ones its store was still
    reading."""
    _, _, held, alice, bob = await new_message_while_stored_ones_are_read(
        start_server, redis_service
    )
    held.gate.set()
    assert [await received(alice, WAIT) for _ in range(4)] == ["old0", "old1", "old2", "new"]
    await close(alice)
    await close(bob)


async def test_a_newer_login_elsewhere_ends_the_session_without_waiting_and_loses_nothing(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """The request to end a session (a newer login on its resource, on another node) does
    not wait behind what is queued for the account: the old session ends while its
    store still holds the stored messages, as on one node. The forwarded message queued
    behind them finds the session gone and is routed again; the stored ones stay
    stored: the newer session gets all four, once."""
    _, b, held, alice, bob = await new_message_while_stored_ones_are_read(
        start_server, redis_service
    )
    newer = await connect(b, "alice@localhost/desk", "alice-secret")
    await asyncio.wait_for(alice.ended.wait(), WAIT)  # with the gate still shut
    held.gate.set()
    newer.send_presence()
    assert sorted([await received(newer, WAIT) for _ in range(4)]) == [
        "new", "old0", "old1", "old2"
    ]
    await close(newer)
    await close(bob)
