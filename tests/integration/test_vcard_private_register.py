"""vCard, avatar hashes, private XML, in-band registration and server caps, with slixmpp."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Iterable

from slixmpp import JID, Iq, Presence
from slixmpp.exceptions import IqError
from slixmpp.xmlstream import ElementBase

from tests.integration.clients import HEADER, Client, RawClient, close, insecure_context
from tests.integration.conftest import StartServer, port_of
from xmppd.server import Server
from xmppd.storage import devservices
from xmppd.storage.devservices import LocalService

MODULES = {
    "disco": {},
    "vcard": {},
    "private": {},
    "register": {"allow_registration": True, "min_password_length": 6},
    "caps": {},
}
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
X_UPDATE = "vcard-temp:x:update"


class Prefs(ElementBase):
    """An application's own element to keep in private storage."""

    name = "prefs"
    namespace = "urn:xmppd:test:prefs"
    plugin_attrib = "test_prefs"
    interfaces = {"nick"}
    sub_interfaces = interfaces


class PluginClient(Client):
    """A test client that also records available presences, registration and SASL errors."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.presences: asyncio.Queue[Presence] = asyncio.Queue()
        self.register_errors: list[str] = []
        self.auth_failures: list[str] = []  # SASL failure conditions, one per mechanism tried
        self.add_event_handler("presence_available", self.presences.put_nowait)
        self.add_event_handler(
            "failed_auth", lambda failure: self.auth_failures.append(failure["condition"])
        )


async def login(
    server: Server,
    jid: str,
    password: str,
    plugins: Iterable[str] = ("xep_0054", "xep_0049", "xep_0077"),
    *,
    expect_failure: bool = False,
    register: bool = False,
) -> PluginClient:
    """A slixmpp client over direct TLS with the plugins under test (optionally registering)."""
    client = PluginClient(jid, password)
    for plugin in plugins:
        client.register_plugin(plugin)
    if "xep_0049" in plugins:
        client.plugin["xep_0049"].register(Prefs)
    if register:

        async def on_register(_form: Iq) -> None:
            iq = client.Iq()
            iq["type"] = "set"
            iq["register"]["username"] = client.boundjid.user
            iq["register"]["password"] = client.password
            try:
                await iq.send(timeout=10)
            except IqError as exc:
                client.register_errors.append(exc.condition)

        client.add_event_handler("register", on_register)
    client.ssl_context = insecure_context()
    client.enable_direct_tls = True
    client.enable_starttls = False
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "direct_tls"))
    waiting = client.auth_failed if expect_failure else client.started
    await asyncio.wait_for(waiting.wait(), 15)
    return client


def photo_of(presence: Presence) -> str | None:
    return presence.xml.findtext(f"{{{X_UPDATE}}}x/{{{X_UPDATE}}}photo")


async def publish_vcard(client: Client, name: str, image: bytes | None = None) -> None:
    vcard = client.plugin["xep_0054"].make_vcard()
    vcard["FN"] = name
    if image is not None:
        vcard["PHOTO"]["TYPE"] = "image/png"
        vcard["PHOTO"]["BINVAL"] = image
    await client.plugin["xep_0054"].publish_vcard(vcard, timeout=10)


async def vcard_of(client: Client, bare: str) -> Iq:
    return await client.plugin["xep_0054"].get_vcard(JID(bare), local=False, timeout=10)


async def test_vcard_and_avatar_hash_in_presence(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await login(server, "alice@localhost/desk", "alice-secret")
    bob = await login(server, "bob@localhost/phone", "bob-secret")
    own = await vcard_of(alice, "alice@localhost")  # no vCard yet: an empty one
    assert own["vcard_temp"]["FN"] == ""

    await publish_vcard(alice, "Alice Liddell", IMAGE)
    seen = await vcard_of(bob, "alice@localhost")
    assert seen["vcard_temp"]["FN"] == "Alice Liddell"
    assert seen["vcard_temp"]["PHOTO"]["BINVAL"] == IMAGE

    try:  # setting someone else's vCard
        vcard = bob.plugin["xep_0054"].make_vcard()
        vcard["FN"] = "Mallory"
        await bob.plugin["xep_0054"].publish_vcard(vcard, jid=JID("alice@localhost"), timeout=10)
        raise AssertionError("bob changed alice's vCard")
    except IqError as exc:
        assert exc.condition == "forbidden"

    alice.send_presence(pto=bob.boundjid.full)  # directed presence: no roster needed
    presence = await asyncio.wait_for(bob.presences.get(), 10)
    assert presence["from"] == alice.boundjid
    assert photo_of(presence) == hashlib.sha1(IMAGE).hexdigest()
    await close(alice)
    await close(bob)


async def test_private_storage(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await login(server, "alice@localhost/desk", "alice-secret")
    prefs = Prefs()
    prefs["nick"] = "Hamlet"
    await alice.plugin["xep_0049"].store(prefs, timeout=10)
    iq = await alice.plugin["xep_0049"].retrieve("test_prefs", timeout=10)
    assert iq["private"]["test_prefs"]["nick"] == "Hamlet"
    bob = await login(server, "bob@localhost/phone", "bob-secret")
    iq = await bob.plugin["xep_0049"].retrieve("test_prefs", timeout=10)
    assert iq["private"]["test_prefs"]["nick"] == ""  # bob's own: empty
    await close(alice)
    await close(bob)


async def test_in_band_registration_then_login(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    newbie = await login(server, "newbie@localhost/first", "fresh-password", register=True)
    assert newbie.register_errors == []
    assert newbie.boundjid.bare == "newbie@localhost"
    await close(newbie)
    again = await login(server, "newbie@localhost/second", "fresh-password")
    await close(again)
    # the same name a second time: conflict, and the old password still holds
    copycat = await login(
        server, "newbie@localhost/x", "other-password", register=True, expect_failure=True
    )
    assert copycat.register_errors == ["conflict"]
    copycat.abort()


async def test_registration_refused_when_off(start_server: StartServer) -> None:
    modules = {**MODULES, "register": {}}
    server = await start_server(modules=modules)
    client = await login(
        server, "newbie@localhost/x", "fresh-password", register=True, expect_failure=True
    )
    assert client.register_errors == []  # never offered
    client.abort()
    raw = await RawClient.open(server)
    try:
        await raw.send(HEADER)
        features = await raw.read_until(b"</stream:features>")
        assert b"iq-register" not in features
        await raw.send(
            "<iq type='set' id='r1'><query xmlns='jabber:iq:register'>"
            "<username>newbie</username><password>fresh-password</password>"
            "</query></iq>"
        )
        reply = await raw.read_until(b"</iq>")
        assert b"type='error'" in reply or b'type="error"' in reply
        assert b"service-unavailable" in reply
    finally:
        await raw.close()
    assert not await server.accounts["localhost"].exists("newbie")


async def test_password_change_then_login(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await login(server, "alice@localhost/desk", "alice-secret")
    reply = await alice.plugin["xep_0077"].change_password("brand-new-secret", timeout=10)
    assert reply["type"] == "result"
    accounts = server.accounts["localhost"]
    assert await accounts.verify_plain("alice", "brand-new-secret")  # stored before the result
    assert not await accounts.verify_plain("alice", "alice-secret")
    await close(alice)
    failed = await login(server, "alice@localhost/x", "alice-secret", expect_failure=True)
    assert failed.auth_failures[0] == "not-authorized"
    assert not failed.started.is_set()
    failed.abort()
    alice = await login(server, "alice@localhost/desk", "brand-new-secret")
    assert alice.boundjid.full == "alice@localhost/desk"
    await close(alice)


async def test_account_removal(start_server: StartServer) -> None:
    server = await start_server(modules=MODULES)
    alice = await login(server, "alice@localhost/desk", "alice-secret")
    other = await login(server, "alice@localhost/phone", "alice-secret")
    await publish_vcard(alice, "Alice")
    await alice.plugin["xep_0077"].cancel_registration(timeout=10)
    for client in (alice, other):
        await asyncio.wait_for(client.ended.wait(), 10)
        assert client.stream_errors == ["not-authorized"]
    assert not await server.accounts["localhost"].exists("alice")
    failed = await login(server, "alice@localhost/x", "alice-secret", expect_failure=True)
    failed.abort()
    bob = await login(server, "bob@localhost/phone", "bob-secret")
    try:
        await vcard_of(bob, "alice@localhost")
        raise AssertionError("the removed account still has a vCard")
    except IqError as exc:
        assert exc.condition == "service-unavailable"
    await close(bob)


async def test_server_caps_validated_by_slixmpp(start_server: StartServer) -> None:
    """slixmpp reads the caps stream feature, asks disco#info for NODE#VER and checks the hash."""
    server = await start_server(modules=MODULES)
    alice = await login(server, "alice@localhost/desk", "alice-secret", plugins=("xep_0115",))
    caps = alice.plugin["xep_0115"]
    async with asyncio.timeout(10):
        # slixmpp signals nothing when it has verified and stored a verstring: poll
        while (ver := await caps.get_verstring(JID("localhost"))) is None:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    assert ver == server.modules.modules["caps"].ver  # type: ignore[attr-defined]
    info = await caps.get_caps(jid=JID("localhost"))
    assert "vcard-temp" in info["features"] and "jabber:iq:private" in info["features"]
    await close(alice)


async def test_data_survives_a_restart(start_server: StartServer) -> None:
    first = await start_server(modules=MODULES)
    carol = await login(first, "carol@localhost/a", "carol-secret", register=True)
    await publish_vcard(carol, "Carol", IMAGE)
    prefs = Prefs()
    prefs["nick"] = "C."
    await carol.plugin["xep_0049"].store(prefs, timeout=10)
    await close(carol)
    await first.stop()

    second = await start_server(users={}, modules=MODULES)  # same data_dir
    carol = await login(second, "carol@localhost/b", "carol-secret")
    iq = await carol.plugin["xep_0049"].retrieve("test_prefs", timeout=10)
    assert iq["private"]["test_prefs"]["nick"] == "C."
    bob = await login(second, "bob@localhost/phone", "bob-secret")
    seen = await vcard_of(bob, "carol@localhost")
    assert seen["vcard_temp"]["FN"] == "Carol"
    carol.send_presence(pto=bob.boundjid.full)  # the hash was loaded from storage at login
    presence = await asyncio.wait_for(bob.presences.get(), 10)
    assert photo_of(presence) == hashlib.sha1(IMAGE).hexdigest()
    await close(carol)
    await close(bob)


async def test_avatar_hash_reaches_contacts_with_broadcast_presence(
    start_server: StartServer,
) -> None:
    """With the roster and presence modules: a subscribed contact sees the hash."""
    server = await start_server(modules={**MODULES, "roster": {}, "presence": {}})
    alice = await login(server, "alice@localhost/desk", "alice-secret")
    bob = await login(server, "bob@localhost/phone", "bob-secret")
    for client in (alice, bob):  # slixmpp approves and subscribes back by default
        await client.get_roster(timeout=10)
        client.send_presence()
    alice.send_presence_subscription(pto="bob@localhost")
    async with asyncio.timeout(10):
        while True:  # until bob sees alice's presence: the subscription is mutual by then
            presence = await bob.presences.get()
            if presence["from"] == alice.boundjid:
                break
    await publish_vcard(alice, "Alice", IMAGE)
    alice.send_presence(pstatus="new avatar")
    async with asyncio.timeout(10):
        while True:
            presence = await bob.presences.get()
            if presence["from"] == alice.boundjid and presence["status"] == "new avatar":
                break
    assert photo_of(presence) == hashlib.sha1(IMAGE).hexdigest()
    await close(alice)
    await close(bob)


async def register_raw(server: Server, username: str) -> bytes:
    """An in-band registration before login (from 127.0.0.1): the server's reply."""
    raw = await RawClient.open(server)
    try:
        await raw.send(HEADER)
        await raw.read_until(b"</stream:features>")
        await raw.send(
            "<iq type='set' id='r1'><query xmlns='jabber:iq:register'>"
            f"<username>{username}</username><password>fresh-password</password>"
            "</query></iq>"
        )
        reply = b""
        async with asyncio.timeout(10):
            while not re.search(rb"<iq[^>]*/>|</iq>", reply):  # a result is empty
                chunk = await raw.reader.read(65536)
                assert chunk, f"closed before the answer: {reply!r}"
                reply += chunk
        return reply.replace(b'"', b"'")
    finally:
        await raw.close()


async def test_the_registration_limit_per_address_holds_across_a_cluster(
    redis_service: LocalService, start_server: StartServer
) -> None:
    """Two nodes behind one address (a load balancer): the address gets
    `registrations_per_ip` accounts from the cluster, not that many from each node."""
    url = devservices.redis_url(redis_service)
    modules = {**MODULES, "register": {**MODULES["register"], "registrations_per_ip": 2}}
    a = await start_server(modules=modules, cluster={"redis_url": url, "node_name": "node-a"})
    b = await start_server(
        users={}, modules=modules, cluster={"redis_url": url, "node_name": "node-b"}
    )
    assert b"type='result'" in await register_raw(a, "first")
    # A refused registration (a taken name) does not count: its slot is given back.
    assert b"conflict" in await register_raw(b, "first")
    assert b"type='result'" in await register_raw(b, "second")
    for node, name in ((a, "third"), (b, "fourth")):
        reply = await register_raw(node, name)
        assert b"type='error'" in reply and b"too many registrations" in reply, reply
        assert not await node.accounts["localhost"].exists(name)
