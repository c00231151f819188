"""A removed account leaves nothing behind that a new account of the same name inherits.

zed fills every store a module keeps for a user (roster with a contact,
vCard with a photo, private XML, a privacy list and a block, offline
messages, one of them large, and last activity), then goes: with `xmppctl
unregister` in a process of its own while no node runs, with xmppctl while
the node runs, and with in-band removal (XEP-0077). A new zed registers and
finds nothing: no offline message, no last activity, an empty roster, vCard,
private storage, privacy lists and blocklist; and the stores themselves hold
no item or blob of zed's. Both on the embedded and the cloud storage.

jürgen (a name the stores escape) has rights in rooms and nodes of a second
host and of another account (multi-user chat, pubsub, PEP): removed, no item
or blob of any store names him any more.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.etree import ElementTree as ET

import pytest
import yaml
from slixmpp import JID
from slixmpp.exceptions import IqError

from tests.integration.clients import close
from tests.integration.conftest import StartServer
from tests.integration.test_user_journey import MODULES, Person, sign_in, wait_for
from tests.integration.test_vcard_private_register import IMAGE, Prefs
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.base import BlobBackend, ItemBackend, Query
from xmppd.storage.devservices import LocalService
from xmppd.testing import parse_stanza

PASSWORD = "zed-secret-1"
LARGE = "z" * 100_000  # larger than a cache entry may be (64 KiB): read from the blob store
PLUGINS = ("xep_0012", "xep_0016")


async def zeds_entries(server: Server) -> dict[str, list[str]]:
    """Every item and blob of an account named zed, by namespace, read from the stores
    themselves (behind the cache)."""
    items: ItemBackend = getattr(server.storage.items, "backend", server.storage.items)
    blobs: BlobBackend = getattr(server.storage.blobs, "backend", server.storage.blobs)
    found: dict[str, list[str]] = {}
    for namespace in await items.namespaces():  # type: ignore[attr-defined]
        token: str | None = None
        while True:
            page = await items.query(namespace, Query(limit=1000, page_token=token))
            names = [item.name for item in page.items if _is_zeds(item.name)]
            if names:
                found.setdefault(f"items:{namespace}", []).extend(names)
            if (token := page.next_token) is None:
                break
    for namespace in await blobs.namespaces():  # type: ignore[attr-defined]
        token = None
        while True:
            listing = await blobs.list(namespace, page_token=token)
            keys = [key for key in listing.keys if _is_zeds(key)]
            if keys:
                found.setdefault(f"blobs:{namespace}", []).extend(keys)
            if (token := listing.next_token) is None:
                break
    return found


def _is_zeds(name: str) -> bool:
    """Named by zed's user name ("zed", "zed/..."), or bare JID (privacy records)."""
    return name == "zed" or name.startswith(("zed/", "zed@"))


async def person(server: Server, jid: str, password: str, register: bool = False) -> Person:
    client = await sign_in(server, jid, password, register)
    for plugin in PLUGINS:
        client.register_plugin(plugin)
    return client


async def fill_every_store(server: Server) -> Person:
    """zed, with a contact (alice, online, returned), leaves data in every store."""
    await server.accounts["localhost"].register("zed", PASSWORD)
    alice = await person(server, "alice@localhost/desk", "alice-secret")
    alice.send_presence()
    zed = await person(server, "zed@localhost/laptop", PASSWORD)
    zed.send_presence()
    zed.send_presence(pto="alice@localhost", ptype="subscribe")  # alice's client agrees
    await wait_for(lambda: _has_subscription(server, "zed@localhost", "alice@localhost", "both"))

    vcard = zed.plugin["xep_0054"].make_vcard()
    vcard["FN"] = "Zed"
    vcard["PHOTO"]["TYPE"] = "image/png"
    vcard["PHOTO"]["BINVAL"] = IMAGE
    await zed.plugin["xep_0054"].publish_vcard(vcard, timeout=10)
    prefs = Prefs()
    prefs["nick"] = "zz"
    await zed.plugin["xep_0049"].store(prefs, timeout=10)
    rule = {"value": "mallory@localhost", "action": "deny", "order": "1", "type": "jid"}
    await zed.plugin["xep_0016"].edit_list("strict", [rule], timeout=10)
    await zed.plugin["xep_0016"].make_default("strict", timeout=10)
    await zed.plugin["xep_0191"].block(JID("eve@localhost"), timeout=10)

    zed.send_presence(ptype="unavailable", pstatus="gone fishing")
    await alice.presence_from("zed@localhost/laptop", ("unavailable",))
    await close(zed)
    await server.router.drain()  # the hooks of that presence: last activity is written
    last = await server.modules.items("localhost", "last").get("zed")
    assert last is not None and last.attrs["status"] == "gone fishing"

    alice.send_message(mto=JID("zed@localhost"), mbody="msg for zed while offline", mtype="chat")
    alice.send_message(mto=JID("zed@localhost"), mbody=LARGE, mtype="chat")
    # The server handles alice's stanzas in order: once this is answered, the messages
    # were routed, and their storing is among the router's tasks.
    await alice.plugin["xep_0030"].get_info(jid="localhost", timeout=10)
    await server.router.drain()
    offline = await server.modules.items("localhost", "offline").get("zed")
    assert offline is not None and offline.attrs["count"] == 2

    stored = await zeds_entries(server)
    for store in ("accounts", "roster", "privacy", "offline", "last"):
        assert f"items:localhost/{store}" in stored, (store, stored)
    for store in ("vcard", "private", "offline"):
        assert f"blobs:localhost/{store}" in stored, (store, stored)
    assert len(stored["blobs:localhost/offline"]) == 2
    return alice


async def _has_subscription(server: Server, owner: str, contact: str, wanted: str) -> bool:
    item = await server.modules.modules["roster"].item(owner, contact)  # type: ignore[attr-defined]
    return item is not None and item.subscription == wanted


async def xmppctl(*argv: str) -> tuple[int, str, str]:
    """The installed command in a process of its own, without blocking this loop."""
    exe = shutil.which("xmppctl", path=str(Path(sys.executable).parent))
    command = [exe] if exe else [sys.executable, "-m", "xmppd.cli.ctl"]
    process = await asyncio.create_subprocess_exec(
        *command,
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def assert_zed_starts_empty(server: Server, alice: Person) -> None:
    """A new zed registers in-band and finds none of the old zed's data."""
    assert await zeds_entries(server) == {}
    # alice's roster keeps zed, but no subscription either way (RFC 6121 2.5.2, 3.3)
    item = await server.modules.modules["roster"].item(  # type: ignore[attr-defined]
        "alice@localhost", "zed@localhost"
    )
    assert item is None or (item.subscription, item.ask, item.pending_in) == ("none", False, False)

    zed = await person(server, "zed@localhost/new", "another-secret", register=True)
    try:  # not available yet: the server answers from storage
        await zed.plugin["xep_0012"].get_last_activity(JID("zed@localhost"), timeout=10)
        raise AssertionError("the new zed has the old zed's last activity")
    except IqError as exc:
        assert exc.condition == "item-not-found"
    roster = await zed.get_roster(timeout=10)
    assert not roster["roster"]["items"]
    card = await zed.plugin["xep_0054"].get_vcard(JID("zed@localhost"), local=False, timeout=10)
    assert card["vcard_temp"]["FN"] == "" and not card["vcard_temp"]["PHOTO"]["BINVAL"]
    kept = await zed.plugin["xep_0049"].retrieve("test_prefs", timeout=10)
    assert kept["private"]["test_prefs"]["nick"] == ""
    lists = await zed.plugin["xep_0016"].get_privacy_lists(timeout=10)
    assert [element.tag for element in lists["privacy"].xml] == []
    assert not (await zed.plugin["xep_0191"].get_blocked(timeout=10))["blocklist"]["items"]

    # no offline message waits: the first message the new zed gets is a new one
    zed.send_presence()
    alice.send_message(mto=JID("zed@localhost"), mbody="hello new zed", mtype="chat")
    assert (await zed.message())["body"] == "hello new zed"
    await close(zed)


async def test_xmppctl_unregister_leaves_nothing_behind(
    start_server: StartServer, tmp_path: Path
) -> None:
    server = await start_server(modules=MODULES)
    alice = await fill_every_store(server)
    await close(alice)
    await server.stop()

    code, out, err = await xmppctl("-c", str(tmp_path / "xmppd.yml"), "unregister", "zed@localhost")
    assert (code, out, err) == (0, "unregistered zed@localhost\n", "")

    node2 = await start_server(users={}, modules=MODULES)  # the same data
    alice = await person(node2, "alice@localhost/desk", "alice-secret")
    await assert_zed_starts_empty(node2, alice)
    await close(alice)


async def test_xmppctl_unregister_with_modules_turned_off_leaves_nothing_behind(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The operator turned vCards and offline messages off for a while: zed's vCard and
    waiting messages still go with him, and are not there when they are turned on."""
    server = await start_server(modules=MODULES)
    alice = await fill_every_store(server)
    await close(alice)
    await server.stop()
    config = yaml.safe_load((tmp_path / "xmppd.yml").read_text())
    for name in ("vcard", "offline"):
        del config["modules"][name]
    (tmp_path / "off.yml").write_text(yaml.safe_dump(config))

    code, out, err = await xmppctl("-c", str(tmp_path / "off.yml"), "unregister", "zed@localhost")
    assert (code, out, err) == (0, "unregistered zed@localhost\n", "")

    node2 = await start_server(users={}, modules=MODULES)  # both on again, the same data
    alice = await person(node2, "alice@localhost/desk", "alice-secret")
    await assert_zed_starts_empty(node2, alice)
    await close(alice)


async def test_xmppctl_unregister_with_the_roster_turned_off_takes_zed_from_rosters(
    start_server: StartServer, tmp_path: Path
) -> None:
    """The operator turned the roster (and so presence) off: zed's roster still goes,
    and alice's stored roster loses its item for zed, nobody being there to act on the
    unsubscribe and unsubscribed she is sent."""
    server = await start_server(modules=MODULES)
    alice = await fill_every_store(server)
    await close(alice)
    await server.stop()
    config = yaml.safe_load((tmp_path / "xmppd.yml").read_text())
    for name in ("roster", "presence"):
        del config["modules"][name]
    (tmp_path / "off.yml").write_text(yaml.safe_dump(config))

    code, out, err = await xmppctl("-c", str(tmp_path / "off.yml"), "unregister", "zed@localhost")
    assert (code, out, err) == (0, "unregistered zed@localhost\n", "")

    node2 = await start_server(users={}, modules=MODULES)  # the roster on again
    roster = node2.modules.modules["roster"]
    assert await roster.item("alice@localhost", "zed@localhost") is None  # type: ignore[attr-defined]
    alice = await person(node2, "alice@localhost/desk", "alice-secret")
    await assert_zed_starts_empty(node2, alice)
    await close(alice)


async def test_xmppctl_unregister_while_a_node_runs(
    start_server: StartServer, tmp_path: Path
) -> None:
    """xmppctl asks the running node to remove the account, so the node's own cache
    (in-process on the embedded default, which another process cannot reach) forgets
    it too. What the node holds in memory for a user with no session (privacy
    lists) is reloaded at login."""
    server = await start_server(modules=MODULES)
    alice = await fill_every_store(server)

    code, out, err = await xmppctl("-c", str(tmp_path / "xmppd.yml"), "unregister", "zed@localhost")
    assert (code, err) == (0, "")
    told, done = out.splitlines()
    assert told.startswith("ended 0 session(s) on the node at http://127.0.0.1:"), out
    assert done == "unregistered zed@localhost"
    await assert_zed_starts_empty(server, alice)
    await close(alice)


async def test_in_band_removal_leaves_nothing_behind(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await fill_every_store(server)
    zed = await person(server, "zed@localhost/laptop", PASSWORD)
    zed.send_presence(ppriority=-1)  # available, but the offline messages stay stored
    await alice.presence_from("zed@localhost/laptop", ("available",))
    await server.router.drain()
    offline = await server.modules.items("localhost", "offline").get("zed")
    assert offline is not None and offline.attrs["count"] == 2
    await zed.plugin["xep_0077"].cancel_registration(timeout=10)
    await asyncio.wait_for(zed.ended.wait(), 10)
    assert zed.stream_errors == ["not-authorized"]
    # alice, no longer subscribed, is told zed is gone (RFC 6121 3.2.2)
    await alice.presence_from("zed@localhost/laptop", ("unavailable",))
    # The session ended (after the removal) in the server before the client saw it; its
    # unavailable presence must record no last activity for the removed account.
    await server.router.drain()

    await assert_zed_starts_empty(server, alice)
    await close(alice)


SHARED = {**MODULES, "muc": {}, "pep": {}, "pubsub": {}}
PUBSUB, OWNER = "http://jabber.org/protocol/pubsub", "http://jabber.org/protocol/pubsub#owner"
OPEN = (
    "<configure><x xmlns='jabber:x:data' type='submit'><field var='FORM_TYPE'>"
    "<value>http://jabber.org/protocol/pubsub#node_config</value></field>"
    "<field var='pubsub#access_model'><value>open</value></field></x></configure>"
)
NICK = (
    "<query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>"
    "<field var='FORM_TYPE'><value>http://jabber.org/protocol/muc#register</value></field>"
    "<field var='muc#register_roomnick'><value>J</value></field></x></query>"
)


async def iq_set(client: Person, to: str, xml: str) -> None:
    iq = client.make_iq_set(ito=JID(to))
    iq.append(ET.fromstring(xml))
    await iq.send(timeout=10)


async def mentions(server: Server, bare: str) -> list[str]:
    """Every item or blob whose name or attributes name `bare`, however encoded."""
    items: ItemBackend = getattr(server.storage.items, "backend", server.storage.items)
    blobs: BlobBackend = getattr(server.storage.blobs, "backend", server.storage.blobs)
    spellings = (bare, quote(bare), json.dumps(bare)[1:-1], quote(bare.split("@")[0]) + "/")
    found = []
    for namespace in await items.namespaces():  # type: ignore[attr-defined]
        page = await items.query(namespace, Query(limit=1000))
        for item in page.items:
            values = [v.decode(errors="replace") if isinstance(v, bytes) else str(v)
                      for v in item.attrs.values()]
            text = " ".join([item.name, *values])
            if any(s in text for s in spellings) or item.name == bare.split("@")[0]:
                found.append(f"{namespace} {item.name}")
    for namespace in await blobs.namespaces():  # type: ignore[attr-defined]
        listing = await blobs.list(namespace)
        found += [f"{namespace} {k}" for k in listing.keys if any(s in k for s in spellings)]
    return found


async def test_a_removed_account_keeps_no_rights_in_rooms_or_nodes_of_any_host(
    start_server: StartServer,
) -> None:
    """jürgen@localhost is admin of a room and has a nick there, publisher of and
    subscribed to a pubsub node, and the same on alice's PEP node, all at the second
    host b.test or alice's: removed in-band, nothing in any store names him."""
    server = await start_server(modules=SHARED, hosts=["localhost", "b.test"])
    jurgen = "jürgen@localhost"
    await server.accounts["localhost"].register("jürgen", PASSWORD)
    alice = await person(server, "alice@localhost/desk", "alice-secret")
    him = await person(server, f"{jurgen}/laptop", PASSWORD)
    alice.register_plugin("xep_0045")
    room = JID("den@conference.b.test")
    await alice.plugin["xep_0045"].join_muc_wait(room, "Alice", timeout=10)
    form = await alice.plugin["xep_0045"].get_room_config(room)
    form.set_values({"muc#roomconfig_persistentroom": "1"})
    await alice.plugin["xep_0045"].set_room_config(room, form)
    await alice.plugin["xep_0045"].set_affiliation(room, "admin", jid=JID(jurgen))
    await iq_set(him, str(room), NICK)
    for service, node in (("pubsub.b.test", "news"), ("alice@localhost", "urn:test:news")):
        create = f"<pubsub xmlns='{PUBSUB}'><create node='{node}'/>{OPEN}</pubsub>"
        await iq_set(alice, service, create)
        await iq_set(
            alice, service,
            f"<pubsub xmlns='{OWNER}'><affiliations node='{node}'>"
            f"<affiliation jid='{jurgen}' affiliation='publisher'/></affiliations></pubsub>",
        )
        subscribe = f"<pubsub xmlns='{PUBSUB}'><subscribe node='{node}' jid='{jurgen}'/></pubsub>"
        await iq_set(him, service, subscribe)
    await server.router.drain()
    await asyncio.sleep(0.5)  # the room is written in the background
    before = await mentions(server, jurgen)
    for store in ("muc_rooms", "pubsub", "pep"):
        assert any(f"/{store} " in entry for entry in before), (store, before)

    await him.plugin["xep_0077"].cancel_registration(timeout=10)
    await asyncio.wait_for(him.ended.wait(), 10)
    await server.router.drain()
    await server.modules.modules["muc"].stop()  # type: ignore[attr-defined]  # written
    assert await mentions(server, jurgen) == []
    await close(alice)


async def test_a_write_running_on_another_cluster_node_is_done_before_the_data_goes(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """zed, on node b, sets his vCard, whose write hangs there; node a removes him: a
    waits until b's work for zed is done before the modules delete, so the vCard does
    not land after the deletion for a new zed to find."""
    url = devservices.redis_url(redis_service)
    a = await start_server(modules=MODULES, cluster={"redis_url": url, "node_name": "rm-a"})
    b = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "rm-b"}
    )
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != {"rm-a", "rm-b"}:
            await node.cluster.heartbeat.beat()
    await a.accounts["localhost"].register("zed", PASSWORD)
    vcard = b.modules.modules["vcard"]
    write, entered, gate = vcard._write, asyncio.Event(), asyncio.Event()  # type: ignore[attr-defined]

    async def hanging_write(*args: Any) -> Any:
        entered.set()
        await gate.wait()
        return await write(*args)

    vcard._write = hanging_write  # type: ignore[attr-defined]
    zed = await person(b, "zed@localhost/laptop", PASSWORD)
    card = zed.plugin["xep_0054"].make_vcard()
    card["FN"] = "Zed"
    publishing = asyncio.ensure_future(zed.plugin["xep_0054"].publish_vcard(card, timeout=30))
    await asyncio.wait_for(entered.wait(), 10)

    removal = asyncio.ensure_future(a.modules.remove_account("localhost", "zed"))
    try:
        await asyncio.sleep(1.0)
        assert not removal.done(), "a deleted zed's data while b still wrote his vCard"
    finally:
        gate.set()
    assert await asyncio.wait_for(removal, 30) == "account"
    await asyncio.gather(publishing, return_exceptions=True)
    await b.router.drain()
    assert await zeds_entries(a) == {}
    await close(zed)


async def _two_nodes(
    redis_service: LocalService, start_server: StartServer, prefix: str
) -> tuple[Server, Server]:
    """Nodes a and b of one cluster, each seeing the other, and zed registered."""
    url = devservices.redis_url(redis_service)
    names = {f"{prefix}-a", f"{prefix}-b"}
    a = await start_server(modules=MODULES, cluster={"redis_url": url, "node_name": f"{prefix}-a"})
    b = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": f"{prefix}-b"}
    )
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != names:
            await node.cluster.heartbeat.beat()
    await a.accounts["localhost"].register("zed", PASSWORD)
    return a, b


async def _remove_zed_while_b_hangs(a: Server, b: Server, gate: asyncio.Event) -> None:
    """a removes zed while a write for him hangs on b until `gate` opens; then nothing
    of zed's may be left. The gate opens once the account is deleted: at once if b
    counts the hung write as zed's work (the removal waits for it; it would wait for a
    shut gate), else only after the removal finished without it."""
    unregistered = asyncio.Event()

    async def removed() -> None:
        unregistered.set()

    removal = asyncio.ensure_future(a.modules.remove_account("localhost", "zed", removed))
    await asyncio.wait_for(unregistered.wait(), 10)
    if not b.router.account_work("zed@localhost"):
        await asyncio.wait_for(removal, 60)
    gate.set()
    assert await asyncio.wait_for(removal, 60) == "account"
    await b.router.drain()
    assert await zeds_entries(a) == {}


async def test_a_subscription_queued_on_another_cluster_node_is_not_left_behind(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """alice's subscription request to zed waits in zed's queue of subscription changes
    on node b, its roster write hung there; node a removes zed. b's queued change is
    zed's work, which a waits for before the modules delete: no roster and no kept
    request of zed's is left for a new zed to inherit."""
    a, b = await _two_nodes(redis_service, start_server, "sub")
    roster = b.modules.modules["roster"]
    modify, entered, gate = roster.modify, asyncio.Event(), asyncio.Event()  # type: ignore[attr-defined]

    async def hanging_modify(owner: str, contact: str, change: Any) -> Any:
        if owner == "zed@localhost":
            entered.set()
            await gate.wait()
        return await modify(owner, contact, change)

    roster.modify = hanging_modify  # type: ignore[attr-defined]
    request = parse_stanza("<presence type='subscribe' to='zed@localhost'/>")
    request.set("from", "alice@localhost")
    b.router.route(request)
    await asyncio.wait_for(entered.wait(), 10)
    await _remove_zed_while_b_hangs(a, b, gate)


async def test_an_offline_message_stored_on_another_cluster_node_is_not_left_behind(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """alice's message to zed (offline) is being stored on node b, the write hung there;
    node a removes zed. b's store is zed's work, which a waits for before the modules
    delete (b's lock on zed's queue is b's alone): no message is left for a new zed."""
    a, b = await _two_nodes(redis_service, start_server, "off")
    offline = b.modules.modules["offline"]
    store, entered, gate = offline.store, asyncio.Event(), asyncio.Event()  # type: ignore[attr-defined]

    async def hanging_store(vhost: str, user: str, data: bytes) -> None:
        entered.set()
        await gate.wait()
        await store(vhost, user, data)

    offline.store = hanging_store  # type: ignore[attr-defined]
    message = parse_stanza("<message to='zed@localhost' type='chat'><body>hi</body></message>")
    message.set("from", "alice@localhost/x")
    b.router.route(message)
    await asyncio.wait_for(entered.wait(), 10)
    await _remove_zed_while_b_hangs(a, b, gate)


async def test_a_removal_on_a_cluster_cut_off_from_redis_is_refused_at_once(
    redis_service: LocalService,
    start_server: StartServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis hangs (SIGSTOP: no error, no answer): no node could end zed's sessions on
    the others or hear that their work is done, so an in-band removal and `xmppctl
    unregister` are refused at once (not after waiting for the other nodes' answers),
    naming the account and the cause, and nothing is deleted; once Redis answers,
    `xmppctl unregister` removes zed."""
    url = devservices.redis_url(redis_service)
    a = await start_server(modules=MODULES, cluster={"redis_url": url, "node_name": "cut-a"})
    b = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "cut-b"}
    )
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != {"cut-a", "cut-b"}:
            await node.cluster.heartbeat.beat()
    await a.accounts["localhost"].register("zed", PASSWORD)
    zed = await person(a, "zed@localhost/laptop", PASSWORD)
    ctl = ("-c", str(tmp_path / "xmppd.yml"), "unregister", "zed@localhost")
    redis_service.pause()
    try:
        with pytest.raises(IqError) as refused:  # not IqTimeout: an answer, and an error
            await zed.plugin["xep_0077"].cancel_registration(timeout=20)
        code, out, err = await xmppctl(*ctl)
    finally:
        redis_service.resume()
    assert refused.value.condition == "internal-server-error"
    assert "cluster is unreachable" in refused.value.text
    assert code == 1, (out, err)
    assert "zed@localhost was not removed: Redis at" in err, err
    assert "run unregister again" in err
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(m.startswith("zed@localhost not removed: Redis at") for m in logged), logged
    assert await a.accounts["localhost"].exists("zed")

    code, out, err = await xmppctl(*ctl)
    assert (code, err) == (0, ""), out
    assert out.endswith("unregistered zed@localhost\n")
    assert not await a.accounts["localhost"].exists("zed")
    await close(zed)


async def test_redis_going_silent_during_a_removal_fails_it_soon_saying_what_remains(
    redis_service: LocalService,
    start_server: StartServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Redis answers the PING that lets `xmppctl unregister` start, then hangs (SIGSTOP)
    while the removing node waits for the other's answer, which cannot come: the
    removal deletes the account and its data, and fails at its next PING of Redis
    (not after the other nodes' 35 s), saying that it is deleted, naming Redis and the
    node it could not hear, what may remain, and to run it again. Once Redis answers,
    zed's session on that node ends and running it again leaves nothing of zed's."""
    url = devservices.redis_url(redis_service)
    a = await start_server(modules=MODULES, cluster={"redis_url": url, "node_name": "mute-a"})
    b = await start_server(
        users={}, modules=MODULES, cluster={"redis_url": url, "node_name": "mute-b"}
    )
    for node in (a, b):
        assert node.cluster is not None
        while node.cluster.nodes != {"mute-a", "mute-b"}:
            await node.cluster.heartbeat.beat()
    await a.accounts["localhost"].register("zed", PASSWORD)
    zed = await person(b, "zed@localhost/laptop", PASSWORD)
    ended = asyncio.Event()
    zed.add_event_handler("disconnected", lambda _: ended.set())

    silenced = False
    for node in (a, b):  # xmppctl asks either one
        cluster = node.cluster
        assert cluster is not None

        async def answered_then_silent(wait: float, ping: Any = cluster.unreachable) -> Any:
            nonlocal silenced
            problem = await ping(wait)
            if not silenced:  # the first removal only
                silenced = True
                redis_service.pause()
            return problem

        cluster.unreachable = answered_then_silent  # type: ignore[method-assign]
    ctl = ("-c", str(tmp_path / "xmppd.yml"), "unregister", "zed@localhost")
    try:
        code, out, err = await xmppctl(*ctl)
    finally:
        redis_service.resume()
    assert code == 1, (out, err)
    assert "zed@localhost is deleted, but Redis at redis://" in err, err
    assert "did not answer within 2 s before node mute-" in err, err
    assert "a session of it may stay open until Redis answers" in err, err
    assert err.rstrip().endswith("run unregister again to finish"), err
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(
        m.startswith("admin: removing zed@localhost failed: zed@localhost is deleted, but Redis")
        for m in logged
    ), logged
    assert not await a.accounts["localhost"].exists("zed")

    await asyncio.wait_for(ended.wait(), 30)  # the notice to end it went out with Redis back
    code, out, err = await xmppctl(*ctl)
    assert (code, err) == (0, "") or err == "xmppctl: zed@localhost does not exist\n", out
    assert await zeds_entries(a) == {}
    await close(zed)
