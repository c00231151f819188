"""The message archive (XEP-0313) with real slixmpp clients over TLS."""

from __future__ import annotations

import asyncio
from typing import Any

from slixmpp import JID, Message

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from tests.integration.test_cluster import seen_on, two_nodes, until
from xmppd.config import DEFAULT_MODULES
from xmppd.server import Server
from xmppd.storage.devservices import LocalService
from xmppd.testing import parse_stanza

MODULES: dict[str, Any] = {
    "disco": {},
    "roster": {},
    "presence": {},
    "offline": {},
    "carbons": {},
    "mam": {},
}
MAM = "urn:xmpp:mam:2"


async def client(server: Server, jid: str, password: str) -> Client:
    c = await connect(server, jid, password)
    for plugin in ("xep_0030", "xep_0059", "xep_0313", "xep_0359"):
        c.register_plugin(plugin)
    return c


async def archived(server: Server, user: str) -> int:
    page = await server.modules.items("localhost", "mam").query(prefix=f"{user}/", limit=100)
    return len(page.items)


async def wait_archived(server: Server, user: str, count: int) -> None:
    """The recipient's copy is written in a task after delivery: poll the store."""
    async with asyncio.timeout(10):
        while await archived(server, user) != count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_slixmpp_pages_through_the_archive(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await client(server, "alice@localhost/desk", "alice-secret")
    bob = await client(server, "bob@localhost/phone", "bob-secret")
    for c in (alice, bob):
        c.send_presence()
    info = await bob.plugin["xep_0030"].get_info(jid=JID("bob@localhost"))
    features = info["disco_info"]["features"]
    assert MAM in features and f"{MAM}#extended" in features and "urn:xmpp:sid:0" in features

    for n in range(5):
        alice.send_message(mto=JID("bob@localhost"), mbody=f"m{n}", mtype="chat")
    delivered = [await asyncio.wait_for(bob.messages.get(), 10) for _ in range(5)]
    assert [m["body"] for m in delivered] == [f"m{n}" for n in range(5)]
    stamped = [m["stanza_id"]["id"] for m in delivered]
    assert all(m["stanza_id"]["by"] == JID("bob@localhost") for m in delivered)
    await wait_archived(server, "bob", 5)
    await wait_archived(server, "alice", 5)

    # page by page (two at a time) forward, then backward from the last page
    forward = [m async for m in bob.plugin["xep_0313"].iterate(rsm={"max": 2})]
    assert [m["mam_result"]["forwarded"]["stanza"]["body"] for m in forward] == [
        f"m{n}" for n in range(5)
    ]
    assert [m["mam_result"]["id"] for m in forward] == stamped
    backward = [m async for m in bob.plugin["xep_0313"].iterate(rsm={"max": 2}, reverse=True)]
    assert [m["mam_result"]["id"] for m in backward] == stamped[::-1]

    # one page: not complete; the last: complete
    first = await bob.plugin["xep_0313"].retrieve(rsm={"max": 2})
    assert first["mam_fin"]["complete"] != "true"
    assert first["mam_fin"]["rsm"]["last"] == stamped[1]
    last = await bob.plugin["xep_0313"].retrieve(rsm={"max": 2, "after": stamped[2]})
    assert last["mam_fin"]["complete"] == "true"
    assert [m["mam_result"]["id"] for m in last["mam"]["results"]] == stamped[3:]

    # the sender's own archive, filtered by the other party
    sent = [m async for m in alice.plugin["xep_0313"].iterate(with_jid=JID("bob@localhost"))]
    assert [m["mam_result"]["forwarded"]["stanza"]["body"] for m in sent] == [
        f"m{n}" for n in range(5)
    ]
    await close(alice)
    await close(bob)


async def next_message(c: Client) -> Message:
    return await asyncio.wait_for(c.messages.get(), 10)


async def test_a_message_crossing_cluster_nodes_is_archived_once_on_each_side(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """alice on node A, bob on node B: the node that routes a message archives it, for
    both parties, once; B takes the stanza-id A stamped as one of the server's own."""
    modules = {name: {} for name in DEFAULT_MODULES} | {"mam": {}}  # mam is opt-in
    a, b = await two_nodes(start_server, redis_service, modules=modules)
    bob = await client(b, "bob@localhost/phone", "bob-secret")
    alice = await client(a, "alice@localhost/desk", "alice-secret")
    for c in (alice, bob):
        c.send_presence()
    await until(seen_on(a, "bob@localhost/phone"))
    await until(seen_on(b, "alice@localhost/desk"))
    alice.send_message(mto=JID("bob@localhost"), mbody="across", mtype="chat")
    there = await next_message(bob)
    bob.send_message(mto=JID("alice@localhost"), mbody="and back", mtype="chat")
    back = await next_message(alice)
    assert (there["body"], back["body"]) == ("across", "and back")
    await wait_archived(a, "bob", 2)
    await wait_archived(a, "alice", 2)

    # B routes again what A stamped (as it does with a stanza it could not deliver):
    # the id is kept, bob gets it again with the same id, and his archive still has 2
    again = parse_stanza(str(there))
    b.router.route(again)
    repeat = await next_message(bob)
    assert repeat["stanza_id"]["id"] == there["stanza_id"]["id"]
    for node in (a, b):
        await node.router.drain()
    assert await archived(a, "bob") == 2 and await archived(a, "alice") == 2

    # queried on either node, the archive has the ids the recipients were given
    bobs = [m async for m in bob.plugin["xep_0313"].iterate()]
    assert [m["mam_result"]["id"] for m in bobs][0] == there["stanza_id"]["id"]
    alices = [m async for m in alice.plugin["xep_0313"].iterate()]
    assert [m["mam_result"]["id"] for m in alices][1] == back["stanza_id"]["id"]
    assert [m["mam_result"]["forwarded"]["stanza"]["body"] for m in alices] == [
        "across", "and back"
    ]
    await close(alice)
    await close(bob)
