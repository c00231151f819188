"""PEP (XEP-0163) with real slixmpp clients: avatars (XEP-0084) and nicknames (XEP-0172)
published from one client reach the user's other client and a contact's, through
entity capabilities (XEP-0115), on both storage profiles and across a restart."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lxml import etree
from slixmpp import JID, Message
from slixmpp.exceptions import IqError

from tests.integration.clients import Client, close, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.test_account_removal import xmppctl, zeds_entries
from tests.integration.test_cluster import until
from xmppd.modules._pubsub_engine import PubSubService
from xmppd.modules.pep import NOTIFY, Pep
from xmppd.modules.pubsub import PubSub
from xmppd.modules.roster import RosterItem, RosterModule
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.base import ItemStore
from xmppd.storage.devservices import LocalService

MODULES = {"disco": {}, "caps": {}, "roster": {}, "presence": {}, "pep": {}}
PLUGINS = ("xep_0030", "xep_0115", "xep_0060", "xep_0163", "xep_0084", "xep_0172")
NICK = "http://jabber.org/protocol/nick"
BOOKMARKS = "urn:xmpp:bookmarks:1"
PUBSUB = "http://jabber.org/protocol/pubsub"
AVATAR_DATA = "urn:xmpp:avatar:data"
# Over the default inline_item_bytes (32 KiB): kept in the blob store.
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 160


class PepClient(Client):
    """A client interested in nicknames and avatar metadata, recording the notifications."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.nicks: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (from, nick)
        self.avatars: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (from, item id)
        self.add_event_handler("user_nick_publish", self._nick)
        self.add_event_handler("avatar_metadata_publish", self._avatar)

    def _nick(self, msg: Message) -> None:
        item = msg["pubsub_event"]["items"]["item"]
        self.nicks.put_nowait((str(msg["from"]), item["nick"]["nick"]))

    def _avatar(self, msg: Message) -> None:
        item = msg["pubsub_event"]["items"]["item"]
        self.avatars.put_nowait((str(msg["from"]), item["id"]))


async def online(
    server: Server, jid: str, password: str, interests: tuple[str, ...] = ()
) -> PepClient:
    """Log in, compute caps with the +notify features (those of the plugins and
    `interests`), then send initial presence."""
    client = PepClient(jid, password)
    for plugin in PLUGINS:
        client.register_plugin(plugin)
    client.ssl_context = insecure_context()
    client.enable_direct_tls = True
    client.enable_starttls = False
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "direct_tls"))
    await asyncio.wait_for(client.started.wait(), 15)
    for namespace in interests:
        client.plugin["xep_0030"].add_feature(f"{namespace}+notify")
    await client.plugin["xep_0115"].update_caps(broadcast=False)
    client.send_presence()
    return client


async def befriend(server: Server, one: str, other: str) -> None:
    """A mutual presence subscription, written before anyone logs in."""
    roster = server.modules.module(RosterModule)

    def both(contact: str) -> Callable[[RosterItem | None], RosterItem]:
        return lambda _: RosterItem(jid=contact, subscription="both")

    await roster.modify(one, other, both(other))
    await roster.modify(other, one, both(one))


async def next_of(queue: asyncio.Queue[tuple[str, str]]) -> tuple[str, str]:
    return await asyncio.wait_for(queue.get(), 10)


async def publish_avatar(client: PepClient) -> str:
    avatar_id = hashlib.sha1(IMAGE).hexdigest()
    await client.plugin["xep_0084"].publish_avatar(IMAGE, timeout=10)
    await client.plugin["xep_0084"].publish_avatar_metadata(
        [{"id": avatar_id, "type": "image/png", "bytes": len(IMAGE)}], timeout=10
    )
    return avatar_id


async def test_avatar_and_nick_reach_other_clients_and_survive_a_restart(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    desk = await online(server, "alice@localhost/desk", "alice-secret")
    await desk.plugin["xep_0172"].publish_nick("Alice", timeout=10)
    avatar_id = await publish_avatar(desk)

    # Logging in brings the last items (XEP-0163 6.2), the user's own and a contact's.
    phone = await online(server, "alice@localhost/phone", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    for client in (phone, bob):
        assert await next_of(client.nicks) == ("alice@localhost", "Alice")
        assert await next_of(client.avatars) == ("alice@localhost", avatar_id)

    # A new nickname: every interested resource is notified, the publisher's too.
    await phone.plugin["xep_0172"].publish_nick("Alice L.", timeout=10)
    for client in (desk, phone, bob):
        while (got := await next_of(client.nicks))[1] != "Alice L.":
            assert got == ("alice@localhost", "Alice")  # the earlier one, late
        assert got == ("alice@localhost", "Alice L.")

    # The contact fetches the avatar's data (XEP-0084 example 4) by the metadata's id.
    result = await bob.plugin["xep_0084"].retrieve_avatar(
        JID("alice@localhost"), avatar_id, timeout=10
    )
    assert result["pubsub"]["items"]["item"]["avatar_data"]["value"] == IMAGE

    # Not alice: bob cannot publish to her nodes.
    try:
        payload = desk.plugin["xep_0172"].stanza.UserNick().xml
        await bob.plugin["xep_0060"].publish(
            JID("alice@localhost"), NICK, payload=payload, timeout=10
        )
        raise AssertionError("bob published to alice's PEP")
    except IqError as exc:
        assert exc.condition == "forbidden"
    for client in (desk, phone, bob):
        await close(client)

    await server.stop()
    server = await start_server(users={}, modules=MODULES)
    bob = await online(server, "bob@localhost/home", "bob-secret")
    assert await next_of(bob.nicks) == ("alice@localhost", "Alice L.")
    assert await next_of(bob.avatars) == ("alice@localhost", avatar_id)
    result = await bob.plugin["xep_0084"].retrieve_avatar(
        JID("alice@localhost"), avatar_id, timeout=10
    )
    assert result["pubsub"]["items"]["item"]["avatar_data"]["value"] == IMAGE
    await close(bob)


async def test_private_data_stays_private(start_server: StartServer) -> None:
    """XEP-0223: publish-options whitelist + persist_items; a contact gets no notification
    and cannot read it, the owner's other client reads it back."""
    server = await start_server(modules=MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    desk = await online(server, "alice@localhost/desk", "alice-secret")
    options = desk.plugin["xep_0004"].make_form("submit")
    options.add_field(
        "FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#publish-options"
    )
    options.add_field("pubsub#persist_items", value=True)
    options.add_field("pubsub#access_model", value="whitelist")
    nick = desk.plugin["xep_0172"].stanza.UserNick()
    nick["nick"] = "secret"
    await desk.plugin["xep_0163"].publish(
        nick, node="urn:test:private", options=options, timeout=10
    )
    bob = await online(server, "bob@localhost/home", "bob-secret")
    try:
        await bob.plugin["xep_0060"].get_items(
            JID("alice@localhost"), "urn:test:private", timeout=10
        )
        raise AssertionError("bob read alice's private node")
    except IqError as exc:
        assert exc.condition == "not-allowed"
    phone = await online(server, "alice@localhost/phone", "alice-secret")
    result = await phone.plugin["xep_0060"].get_items(
        JID("alice@localhost"), "urn:test:private", timeout=10
    )
    assert result.xml.findtext(f".//{{{NICK}}}nick") == "secret"
    for client in (desk, bob, phone):
        await close(client)


async def test_a_blocked_contact_gets_no_events(start_server: StartServer) -> None:
    """XEP-0163 4.3.3: Alice blocks Bob (XEP-0191, with slixmpp's plugin): he gets
    her new nickname neither live nor at a later login. Carol's nickname, last in
    Bob's roster, marks where Alice's last item would have come at that login;
    Alice's nickname after the unblock, where the blocked one would have come live."""
    users = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
    server = await start_server(users=users, modules={**MODULES, "blocking": {}})
    await befriend(server, "alice@localhost", "bob@localhost")
    await befriend(server, "bob@localhost", "carol@localhost")
    carol = await online(server, "carol@localhost/c", "carol-secret")
    await carol.plugin["xep_0172"].publish_nick("Carol", timeout=10)
    desk = await online(server, "alice@localhost/desk", "alice-secret")
    desk.register_plugin("xep_0191")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    assert await next_of(bob.nicks) == ("carol@localhost", "Carol")
    await desk.plugin["xep_0191"].block([JID("bob@localhost")], timeout=10)
    await desk.plugin["xep_0172"].publish_nick("Hidden", timeout=10)
    later = await online(server, "bob@localhost/later", "bob-secret")
    assert await next_of(later.nicks) == ("carol@localhost", "Carol")
    await desk.plugin["xep_0191"].unblock([JID("bob@localhost")], timeout=10)
    await desk.plugin["xep_0172"].publish_nick("Shown", timeout=10)
    for client in (bob, later):
        assert await next_of(client.nicks) == ("alice@localhost", "Shown")
    for client in (carol, desk, bob, later):
        await close(client)


def listen(client: PepClient) -> dict[str, asyncio.Queue[str]]:
    """Queues of the item ids published and retracted and the nodes deleted that
    `client` is told of."""
    queues: dict[str, asyncio.Queue[str]] = {k: asyncio.Queue() for k in ("publish", "retract")}
    queues["delete"] = asyncio.Queue()
    for kind in ("publish", "retract"):
        key = "item" if kind == "publish" else "retract"
        client.add_event_handler(
            f"pubsub_{kind}",
            lambda msg, kind=kind, key=key: queues[kind].put_nowait(
                msg["pubsub_event"]["items"][key]["id"]
            ),
        )
    client.add_event_handler(
        "pubsub_delete",
        lambda msg: queues["delete"].put_nowait(msg["pubsub_event"]["delete"]["node"]),
    )
    return queues


async def test_pubsub_service_with_slixmpp(start_server: StartServer) -> None:
    """XEP-0060 at pubsub.localhost: create, subscribe, publish with notification,
    disco of nodes; after a restart the item is still there, and retract and delete
    notify the subscriber."""
    modules = {**MODULES, "pubsub": {}}
    server = await start_server(modules=modules)
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    heard = listen(bob)
    service = JID("pubsub.localhost")
    await alice.plugin["xep_0060"].create_node(service, "news", timeout=10)
    await bob.plugin["xep_0060"].subscribe(service, "news", timeout=10)
    nick = alice.plugin["xep_0172"].stanza.UserNick()
    nick["nick"] = "hello"
    await alice.plugin["xep_0060"].publish(
        service, "news", id="first", payload=nick.xml, timeout=10
    )
    assert await asyncio.wait_for(heard["publish"].get(), 10) == "first"
    nodes = await alice.plugin["xep_0030"].get_items(jid=service, timeout=10)
    assert [node for _, node, _ in nodes["disco_items"]["items"]] == ["news"]
    for client in (alice, bob):
        await close(client)

    await server.stop()
    server = await start_server(users={}, modules=modules)
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    bob = await online(server, "bob@localhost/home", "bob-secret")
    heard = listen(bob)
    items = await bob.plugin["xep_0060"].get_items(service, "news", timeout=10)
    assert items.xml.findtext(f".//{{{NICK}}}nick") == "hello"
    await alice.plugin["xep_0060"].retract(service, "news", "first", notify=True, timeout=10)
    assert await asyncio.wait_for(heard["retract"].get(), 10) == "first"
    await alice.plugin["xep_0060"].delete_node(service, "news", timeout=10)
    assert await asyncio.wait_for(heard["delete"].get(), 10) == "news"
    for client in (alice, bob):
        await close(client)


async def test_publish_on_one_node_notifies_a_contact_on_another(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Two nodes on one Redis: bob's client on B asks for nicknames; alice publishes on
    A, whose replica of bob's session carries what it asked for (shared state)."""
    url = devservices.redis_url(redis_service)
    a = await start_server(modules=MODULES, cluster={"redis_url": url, "node_name": "node-a"})
    b = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "node-b"}
    )
    await befriend(a, "alice@localhost", "bob@localhost")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await alice.plugin["xep_0172"].publish_nick("Alice", timeout=10)
    bob = await online(b, "bob@localhost/home", "bob-secret")
    assert await next_of(bob.nicks) == ("alice@localhost", "Alice")  # from B, at login

    def a_knows_bobs_interests() -> bool:
        replica = a.router.directory.get("bob@localhost", "home")
        return replica is not None and NICK in replica.state.get(NOTIFY, ())

    await until(a_knows_bobs_interests)
    await alice.plugin["xep_0172"].publish_nick("Alice on A", timeout=10)
    assert await next_of(bob.nicks) == ("alice@localhost", "Alice on A")
    for client in (alice, bob):
        await close(client)


async def test_xmppctl_unregister_leaves_no_pep_data(
    start_server: StartServer, tmp_path: Path
) -> None:
    """zed publishes an avatar (a blob) and a nickname and subscribes to alice's node;
    `xmppctl unregister` (no node running, the modules loaded by xmppctl) deletes all
    of it: nothing of zed's in the stores, and alice's node no longer lists zed."""
    users = {"alice": "alice-secret", "zed": "zed-secret"}
    server = await start_server(users=users, modules=MODULES)
    await befriend(server, "alice@localhost", "zed@localhost")
    alice = await online(server, "alice@localhost/desk", "alice-secret")
    await alice.plugin["xep_0172"].publish_nick("Alice", timeout=10)
    zed = await online(server, "zed@localhost/pc", "zed-secret")
    await zed.plugin["xep_0172"].publish_nick("Zed", timeout=10)
    await publish_avatar(zed)
    await zed.plugin["xep_0060"].subscribe(JID("alice@localhost"), NICK, timeout=10)
    stored = await zeds_entries(server)
    assert len(stored["blobs:localhost/pep"]) == 1
    assert await server.modules.items("localhost", "pep").get("/u/zed%40localhost")
    for client in (alice, zed):
        await close(client)
    await server.stop()

    code, _out, err = await xmppctl(
        "-c", str(tmp_path / "xmppd.yml"), "unregister", "zed@localhost"
    )
    assert code == 0, err
    server = await start_server(users={}, modules=MODULES)
    assert await zeds_entries(server) == {}
    assert await server.modules.items("localhost", "pep").get("/u/zed%40localhost") is None
    service = server.modules.module(Pep).service("alice@localhost")
    node = await service.existing(NICK)
    assert await service.subscribers(node) == []
    assert await service.subscription_count(node) == 0


async def test_bookmarks_xep0402(start_server: StartServer) -> None:
    """XEP-0402 with slixmpp's stanzas: a bookmark published with the XEP's
    publish-options reaches the user's other client (not a contact's), is read back
    whole by a new client, and its removal is notified."""
    server = await start_server(modules=MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    desk = await online(server, "alice@localhost/desk", "alice-secret", (BOOKMARKS,))
    phone = await online(server, "alice@localhost/phone", "alice-secret", (BOOKMARKS,))
    bob = await online(server, "bob@localhost/home", "bob-secret", (BOOKMARKS,))
    heard, bob_heard = listen(phone), listen(bob)
    desk.register_plugin("xep_0402")
    for room, name in (("council@conference.localhost", "Council"), ("tea@conf.localhost", "Tea")):
        conference = desk.plugin["xep_0402"].stanza.Conference()
        conference["name"] = name
        conference["autojoin"] = True
        conference["nick"] = "alice"
        await desk.plugin["xep_0060"].publish(
            JID("alice@localhost"),
            BOOKMARKS,
            id=room,
            payload=conference.xml,
            options=bookmark_options(desk),
            timeout=10,
        )
        assert await asyncio.wait_for(heard["publish"].get(), 10) == room
    # A new client reads them all (send_last_published_item is never for bookmarks).
    laptop = await online(server, "alice@localhost/laptop", "alice-secret")
    items = await laptop.plugin["xep_0060"].get_items(JID("alice@localhost"), BOOKMARKS, timeout=10)
    stored = {item.get("id"): item for item in items.xml.iter(f"{{{PUBSUB}}}item")}
    assert set(stored) == {"council@conference.localhost", "tea@conf.localhost"}
    council = stored["council@conference.localhost"].find(f"{{{BOOKMARKS}}}conference")
    assert council is not None and council.get("name") == "Council"
    assert council.findtext(f"{{{BOOKMARKS}}}nick") == "alice"
    await desk.plugin["xep_0060"].retract(
        JID("alice@localhost"), BOOKMARKS, "tea@conf.localhost", notify=True, timeout=10
    )
    assert await asyncio.wait_for(heard["retract"].get(), 10) == "tea@conf.localhost"
    assert bob_heard["publish"].empty() and bob_heard["retract"].empty()
    for client in (desk, phone, bob, laptop):
        await close(client)


def bookmark_options(client: PepClient) -> Any:
    """XEP-0402 section 5.2's publish-options."""
    form = client.plugin["xep_0004"].make_form("submit")
    form.add_field(
        "FORM_TYPE", ftype="hidden", value="http://jabber.org/protocol/pubsub#publish-options"
    )
    form.add_field("pubsub#persist_items", value="true")
    form.add_field("pubsub#max_items", value="max")
    form.add_field("pubsub#send_last_published_item", value="never")
    form.add_field("pubsub#access_model", value="whitelist")
    return form


async def test_notifications_to_another_node_go_in_one_forward(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Two nodes on one Redis: three subscribers of a pubsub.localhost node are bound
    on B (two full JIDs and one bare JID); a publish on A reaches each of them once,
    through one forward from A to B carrying the three recipients, not three."""
    url = devservices.redis_url(redis_service)
    modules = {**MODULES, "pubsub": {}}
    users = {"alice": "alice-secret", "bob": "bob-secret", "carol": "carol-secret"}
    a = await start_server(
        users=users, modules=modules, cluster={"redis_url": url, "node_name": "node-a"}
    )
    b = await start_server(
        users={}, modules=modules, cluster={"redis_url": url, "node_name": "node-b"}
    )
    service = JID("pubsub.localhost")
    alice = await online(a, "alice@localhost/desk", "alice-secret")
    await alice.plugin["xep_0060"].create_node(service, "news", timeout=10)
    clients = [
        await online(b, "bob@localhost/home", "bob-secret"),
        await online(b, "bob@localhost/work", "bob-secret"),
        await online(b, "carol@localhost/home", "carol-secret"),
    ]
    heard = [listen(client) for client in clients]
    for client, bare in zip(clients, (False, False, True), strict=True):
        await client.plugin["xep_0060"].subscribe(service, "news", bare=bare, timeout=10)
    await until(lambda: all(
        a.router.directory.get(jid.split("/")[0], jid.split("/")[1]) is not None
        for jid in ("bob@localhost/home", "bob@localhost/work", "carol@localhost/home")
    ))
    assert a.cluster is not None
    before = a.cluster.stats.forwards_out
    nick = alice.plugin["xep_0172"].stanza.UserNick()
    nick["nick"] = "hello"
    await alice.plugin["xep_0060"].publish(service, "news", id="1", payload=nick.xml, timeout=10)
    for queues in heard:
        assert await asyncio.wait_for(queues["publish"].get(), 10) == "1"
    assert a.cluster.stats.forwards_out - before == 1
    # Exactly once: the next thing each hears is the next item.
    await alice.plugin["xep_0060"].publish(service, "news", id="2", payload=nick.xml, timeout=10)
    for queues in heard:
        assert await asyncio.wait_for(queues["publish"].get(), 10) == "2"
    for client in (alice, *clients):
        await close(client)


async def test_two_nodes_subscribing_and_publishing_at_once_lose_nothing(
    start_server: StartServer,
) -> None:
    """Two servers on the same stores (each with its own cache) subscribe thirty
    accounts each to one pubsub node while one of them publishes: every
    subscription is stored once, the node's count agrees, every item is listed."""
    modules = {**MODULES, "pubsub": {}}
    a = await start_server(modules=modules)
    b = await start_server(users={}, modules=modules)
    on_a = a.modules.module(PubSub).service("pubsub.localhost")
    on_b = b.modules.module(PubSub).service("pubsub.localhost")
    await on_a.create("alice@localhost", "hot", None)

    async def subscribe(service: PubSubService, prefix: str) -> None:
        for n in range(30):
            jid = f"{prefix}{n}@localhost"
            await service.subscribe(jid, "hot", jid)

    async def publish() -> None:
        for n in range(10):
            item = etree.fromstring(f"<item xmlns='{PUBSUB}' id='{n}'><x xmlns='urn:x'/></item>")
            await on_a.publish("alice@localhost", "hot", item, {}, auto_create=False)

    await asyncio.gather(subscribe(on_a, "a"), subscribe(on_b, "b"), publish())
    # What the store holds, past either server's cache (the embedded profile's is
    # in-process: two servers on one database without a cluster do not share it).
    stored = PubSubService(
        ItemStore(a.storage.direct_items, "pubsub.localhost", "pubsub"),
        on_a.blobs, "", on_a.limits, on_a.relation,
    )
    node = await stored.existing("hot")
    subscribers = await stored.subscribers(node)
    expected = {f"{p}{n}@localhost" for p in "ab" for n in range(30)}
    assert sorted(s.jid for s in subscribers) == sorted(expected)
    assert await stored.subscription_count(node) == 60
    assert [entry[0] for entry in node.items] == [str(n) for n in range(10)]


async def test_a_new_avatar_is_in_the_presence_of_each_resource_on_each_node(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """XEP-0398 on a cluster: alice publishes an avatar from her client on A; her
    other resource, on B, broadcasts its presence again with the new vCard hash
    (B hears of it through the cluster), so bob sees it from both resources."""
    url = devservices.redis_url(redis_service)
    modules = {**MODULES, "vcard": {}}
    a = await start_server(modules=modules, cluster={"redis_url": url, "node_name": "node-a"})
    b = await start_server(
        users={}, modules=modules, cluster={"redis_url": url, "node_name": "node-b"}
    )
    await befriend(a, "alice@localhost", "bob@localhost")
    bob = await online(a, "bob@localhost/home", "bob-secret")
    hashes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()

    def seen(presence: Any) -> None:
        photo = presence.xml.findtext("{vcard-temp:x:update}x/{vcard-temp:x:update}photo")
        if photo:
            hashes.put_nowait((str(presence["from"]), photo))

    bob.add_event_handler("presence_available", seen)
    phone = await online(b, "alice@localhost/phone", "alice-secret")
    desk = await online(a, "alice@localhost/desk", "alice-secret")
    await until(lambda: a.router.directory.get("alice@localhost", "phone") is not None)
    avatar_id = await publish_avatar(desk)
    heard: set[str] = set()
    while heard != {"alice@localhost/desk", "alice@localhost/phone"}:
        sender, photo = await asyncio.wait_for(hashes.get(), 10)
        if photo == avatar_id:
            heard.add(sender)
    for client in (bob, phone, desk):
        await close(client)
