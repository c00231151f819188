"""The message archive (XEP-0313) with real slixmpp clients over TLS."""

from __future__ import annotations

import asyncio
from typing import Any

from slixmpp import JID

from tests.integration.clients import Client, close, connect
from tests.integration.conftest import StartServer
from xmppd.server import Server

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
