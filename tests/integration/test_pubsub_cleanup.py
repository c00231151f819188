"""What a deleted pubsub or PEP node leaves behind, with real slixmpp clients on both
storage profiles: nothing once its clearing ran, in the background after an
owner's delete, at the next start after a node died part way, and at once when
`xmppctl unregister` removes the node's owner; a subscriber's list never names it."""

from __future__ import annotations

from pathlib import Path

from slixmpp import JID

from tests.integration.conftest import StartServer
from tests.integration.test_account_removal import xmppctl, zeds_entries
from tests.integration.test_pep import MODULES, NICK, befriend, close, online
from xmppd.modules.pubsub import PubSub
from xmppd.server import Server
from xmppd.storage.base import ItemBackend, Query

SERVICE = JID("pubsub.localhost")
PUBSUB_STORE = "pubsub.localhost/pubsub"
PEP_STORE = "localhost/pep"


async def stored(server: Server, namespace: str) -> list[str]:
    """Every item name of a store, read from the store itself (behind the cache)."""
    items: ItemBackend = getattr(server.storage.items, "backend", server.storage.items)
    names: list[str] = []
    token: str | None = None
    while True:
        page = await items.query(namespace, Query(limit=1000, page_token=token))
        names += [item.name for item in page.items]
        if (token := page.next_token) is None:
            return names


async def subscribed_nodes(client: object, service: JID) -> list[str]:
    """The nodes the client's account is subscribed to (XEP-0060 5.6, all nodes)."""
    answer = await client.plugin["xep_0060"].get_subscriptions(service, timeout=10)  # type: ignore[attr-defined]
    return [sub["node"] for sub in answer["pubsub"]["subscriptions"]]


async def test_an_owners_delete_clears_every_subscribers_list(start_server: StartServer) -> None:
    """A node with 61 subscribers (more than a batch) is deleted: once the clearing
    the delete started is over, the service's store holds the remaining node and
    the node count only (no subscription, subscription count, index entry nor
    tombstone), and a subscriber at its
    limit of one subscription may subscribe to another node."""
    server = await start_server(modules={**MODULES, "pubsub": {"max_subscriptions": 1}})
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    pubsub = alice.plugin["xep_0060"]
    for name in ("old", "new"):
        await pubsub.create_node(SERVICE, name, timeout=10)
    await bob.plugin["xep_0060"].subscribe(SERVICE, "old", timeout=10)
    for chunk in (range(0, 40), range(40, 60)):  # the owner subscribes others (8.8.2)
        fans = [(JID(f"fan{i:02}@localhost"), "subscribed") for i in chunk]
        await pubsub.modify_subscriptions(SERVICE, "old", fans, timeout=10)
    assert len(await stored(server, PUBSUB_STORE)) > 120  # subscriptions and indexes

    await pubsub.delete_node(SERVICE, "old", timeout=10)
    await server.router.drain()  # the clearing, spawned by the delete
    assert await stored(server, PUBSUB_STORE) == ["n/new", "nodes"]  # "nodes": the count
    await bob.plugin["xep_0060"].subscribe(SERVICE, "new", timeout=10)
    assert await subscribed_nodes(bob, SERVICE) == ["new"]
    for client in (alice, bob):
        await close(client)


async def test_a_deletion_cut_short_is_finished_at_the_next_start(
    start_server: StartServer,
) -> None:
    """The node's record goes, and its node dies before clearing anything: the
    subscriber's list no longer names it (and drops the entry), and the next start
    clears the subscriptions and the tombstone."""
    modules = {**MODULES, "pubsub": {}}
    server = await start_server(modules=modules)
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    await alice.plugin["xep_0060"].create_node(SERVICE, "old", timeout=10)
    await bob.plugin["xep_0060"].subscribe(SERVICE, "old", timeout=10)
    # The owner's deletion as far as its transaction: what a node that died leaves.
    await server.modules.module(PubSub).service("pubsub.localhost").delete(
        "alice@localhost", "old"
    )
    assert await subscribed_nodes(bob, SERVICE) == []
    left = await stored(server, PUBSUB_STORE)
    assert not [name for name in left if name.startswith("/u/")], left
    for client in (alice, bob):
        await close(client)
    await server.stop()

    server = await start_server(users={}, modules=modules)
    await server.router.drain()  # what the start took up
    assert await stored(server, PUBSUB_STORE) == []


async def test_xmppctl_unregister_leaves_nothing_in_pubsub_stores(
    start_server: StartServer, tmp_path: Path
) -> None:
    """zed owns a service node and a PEP node, bob subscribed to both and is a
    member of the latter; zed subscribed to alice's service node and PEP node and
    is a publisher of the former and a member of the latter. After `xmppctl
    unregister zed` (no node running), nothing of zed is stored, bob's
    subscription and affiliation lists are gone from both stores, no tombstone
    waits, and alice's nodes list neither zed's affiliations nor its
    subscription."""
    users = {"alice": "alice-secret", "bob": "bob-secret", "zed": "zed-secret"}
    modules = {**MODULES, "pubsub": {}}
    server = await start_server(users=users, modules=modules)
    await befriend(server, "alice@localhost", "zed@localhost")
    await befriend(server, "bob@localhost", "zed@localhost")
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    zed = await online(server, "zed@localhost/pc", "zed-secret")
    await alice.plugin["xep_0172"].publish_nick("Alice", timeout=10)
    await zed.plugin["xep_0172"].publish_nick("Zed", timeout=10)
    await alice.plugin["xep_0060"].create_node(SERVICE, "news", timeout=10)
    await zed.plugin["xep_0060"].create_node(SERVICE, "zeds", timeout=10)
    await alice.plugin["xep_0060"].modify_affiliations(
        SERVICE, "news", [(JID("zed@localhost"), "publisher")], timeout=10
    )
    await zed.plugin["xep_0060"].subscribe(SERVICE, "news", timeout=10)
    await zed.plugin["xep_0060"].subscribe(JID("alice@localhost"), NICK, timeout=10)
    await bob.plugin["xep_0060"].subscribe(SERVICE, "zeds", timeout=10)
    await bob.plugin["xep_0060"].subscribe(JID("zed@localhost"), NICK, timeout=10)
    for owner, other in ((zed, "bob@localhost"), (alice, "zed@localhost")):
        await owner.plugin["xep_0060"].modify_affiliations(
            owner.boundjid.bare, NICK, [(JID(other), "member")], timeout=10
        )
    assert await server.modules.items("localhost", "pep").get("/a/bob%40localhost")
    for client in (alice, bob, zed):
        await close(client)
    await server.stop()

    code, _out, err = await xmppctl(
        "-c", str(tmp_path / "xmppd.yml"), "unregister", "zed@localhost"
    )
    assert code == 0, err
    server = await start_server(users={}, modules=modules)
    assert await zeds_entries(server) == {}
    for namespace in (PEP_STORE, PUBSUB_STORE):
        names = await stored(server, namespace)
        assert not [n for n in names if n.startswith(("/u/", "/a/", "/d/"))], (namespace, names)
        assert not [n for n in names if "zed" in n], (namespace, names)
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    answer = await alice.plugin["xep_0060"].get_node_affiliations(SERVICE, "news", timeout=10)
    affiliations = answer["pubsub_owner"]["affiliations"]
    assert [(str(a["jid"]), a["affiliation"]) for a in affiliations] == [
        ("alice@localhost", "owner")
    ]
    answer = await alice.plugin["xep_0060"].get_node_subscriptions(SERVICE, "news", timeout=10)
    assert not list(answer["pubsub_owner"]["subscriptions"])
    answer = await alice.plugin["xep_0060"].get_node_affiliations(
        JID("alice@localhost"), NICK, timeout=10
    )
    assert [str(a["jid"]) for a in answer["pubsub_owner"]["affiliations"]] == [
        "alice@localhost"
    ]
    await close(alice)


async def test_a_removed_account_leaves_nothing_on_another_hosts_services(
    start_server: StartServer,
) -> None:
    """zed@localhost subscribed to a node of pubsub.example.net, where dora made it a
    publisher, and to dora@example.net's PEP nickname: its removal takes all of it
    out of example.net's stores, and dora's nodes list no subscription of zed."""
    server = await start_server(
        users={"zed": "zed-secret"},
        modules={**MODULES, "pubsub": {}},
        hosts=["localhost", "example.net"],
    )
    await server.accounts["example.net"].register("dora", "dora-secret")
    await befriend(server, "dora@example.net", "zed@localhost")
    dora = await online(server, "dora@example.net/desk", "dora-secret")
    zed = await online(server, "zed@localhost/pc", "zed-secret")
    far = JID("pubsub.example.net")
    await dora.plugin["xep_0172"].publish_nick("Dora", timeout=10)
    await dora.plugin["xep_0060"].create_node(far, "far", timeout=10)
    await dora.plugin["xep_0060"].modify_affiliations(
        far, "far", [(JID("zed@localhost"), "publisher")], timeout=10
    )
    await zed.plugin["xep_0060"].subscribe(far, "far", timeout=10)
    await zed.plugin["xep_0060"].subscribe(JID("dora@example.net"), NICK, timeout=10)
    await close(zed)

    await server.modules.remove_account("localhost", "zed")
    for namespace in ("example.net/pep", "pubsub.example.net/pubsub"):
        names = await stored(server, namespace)
        assert not [n for n in names if "zed" in n], (namespace, names)
    for service, node in ((far, "far"), (JID("dora@example.net"), NICK)):
        answer = await dora.plugin["xep_0060"].get_node_subscriptions(service, node, timeout=10)
        assert not list(answer["pubsub_owner"]["subscriptions"])
    answer = await dora.plugin["xep_0060"].get_node_affiliations(far, "far", timeout=10)
    affiliations = answer["pubsub_owner"]["affiliations"]
    assert [str(a["jid"]) for a in affiliations] == ["dora@example.net"]
    await close(dora)
