"""Two nodes on one cloud deployment (DynamoDB + S3 + the memcached ring).

Stateless nodes are only correct if what one node writes, the other reads at
once (the shared cache is invalidated on every write), and if two nodes
changing one account at the same moment lose nothing (conditional writes
with retry).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from slixmpp import JID

from tests.integration.clients import close
from tests.integration.conftest import cloud_storage, write_config
from tests.integration.test_user_journey import sign_in
from xmppd.config import load_config
from xmppd.server import Server
from xmppd.storage.devservices import LocalService

MODULES: dict[str, dict[str, object]] = {
    name: {} for name in ("disco", "roster", "presence", "vcard", "private")
}


async def two_nodes(
    tmp_path: Path, moto: LocalService, weed: LocalService, ring: list[LocalService]
) -> tuple[Server, Server]:
    storage = cloud_storage(moto, weed, ring)
    nodes = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        node = Server(load_config(write_config(folder, modules=MODULES, storage=storage)))
        await node.start()
        nodes.append(node)
    await nodes[0].accounts["localhost"].register("alice", "alice-secret")
    return nodes[0], nodes[1]


async def test_a_write_on_one_node_is_read_on_the_other(
    tmp_path: Path,
    moto_service: LocalService,
    seaweedfs_service: LocalService,
    memcached_ring: list[LocalService],
) -> None:
    a, b = await two_nodes(tmp_path, moto_service, seaweedfs_service, memcached_ring)
    try:
        on_a = await sign_in(a, "alice@localhost/desk", "alice-secret")
        on_b = await sign_in(b, "alice@localhost/phone", "alice-secret")
        plugin_a, plugin_b = on_a.plugin["xep_0054"], on_b.plugin["xep_0054"]
        for name in ("first", "second", "third"):
            # read through node b (filling the shared cache), write through node a
            await plugin_b.get_vcard(JID("alice@localhost"), local=False, timeout=10)
            card = plugin_a.make_vcard()
            card["FN"] = name
            await plugin_a.publish_vcard(card, timeout=10)
            seen = await plugin_b.get_vcard(JID("alice@localhost"), local=False, timeout=10)
            assert seen["vcard_temp"]["FN"] == name
        await close(on_a)
        await close(on_b)
    finally:
        await a.stop()
        await b.stop()


async def test_concurrent_roster_changes_on_two_nodes_lose_nothing(
    tmp_path: Path,
    moto_service: LocalService,
    seaweedfs_service: LocalService,
    memcached_ring: list[LocalService],
) -> None:
    a, b = await two_nodes(tmp_path, moto_service, seaweedfs_service, memcached_ring)
    try:
        on_a = await sign_in(a, "alice@localhost/desk", "alice-secret")
        on_b = await sign_in(b, "alice@localhost/phone", "alice-secret")

        async def add(client: object, names: list[str]) -> None:
            for name in names:
                iq = client.Iq()  # type: ignore[attr-defined]
                iq["type"] = "set"
                iq["roster"]["items"] = {f"{name}@localhost": {"name": name, "groups": []}}
                await iq.send(timeout=20)

        from_a = [f"a{n}" for n in range(15)]
        from_b = [f"b{n}" for n in range(15)]
        await asyncio.gather(add(on_a, from_a), add(on_b, from_b))
        roster = await a.modules.modules["roster"].get("alice@localhost")  # type: ignore[attr-defined]
        assert set(roster.items) == {f"{n}@localhost" for n in from_a + from_b}
        await close(on_a)
        await close(on_b)
    finally:
        await a.stop()
        await b.stop()
