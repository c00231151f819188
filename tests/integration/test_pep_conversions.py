"""The conversions between the PEP-based protocols and their legacy twins, with real
slixmpp clients on both storage profiles: XEP-0398 (a XEP-0084 avatar and the
vCard-temp PHOTO with its presence hash) and XEP-0402 5.3 / XEP-0411 (XEP-0402
bookmarks and XEP-0048 bookmarks in private storage or in PEP)."""

from __future__ import annotations

import asyncio
import hashlib

from slixmpp import JID, Presence

from tests.integration.clients import Client, close, insecure_context
from tests.integration.conftest import StartServer, port_of
from tests.integration.test_pep import (
    BOOKMARKS,
    MODULES,
    PUBSUB,
    PepClient,
    befriend,
    bookmark_options,
    listen,
    next_of,
    online,
)
from xmppd.server import Server

CONVERSION_MODULES = {**MODULES, "vcard": {}, "private": {}}
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20
IMAGE_ID = hashlib.sha1(IMAGE).hexdigest()


class LegacyClient(Client):
    """A client without PEP: vCard avatars (XEP-0054, XEP-0153) and private storage."""

    def __init__(self, jid: str, password: str) -> None:
        super().__init__(jid, password)
        self.hashes: asyncio.Queue[tuple[str, str]] = asyncio.Queue()  # (from bare, hash)
        self.add_event_handler("vcard_avatar_update", self._hash)

    def _hash(self, presence: Presence) -> None:
        self.hashes.put_nowait((presence["from"].bare, presence["vcard_temp_update"]["photo"]))


async def legacy(server: Server, jid: str, password: str) -> LegacyClient:
    client = LegacyClient(jid, password)
    for plugin in ("xep_0030", "xep_0054", "xep_0153", "xep_0048"):
        client.register_plugin(plugin)
    client.ssl_context = insecure_context()
    client.enable_direct_tls = True
    client.enable_starttls = False
    client.enable_plaintext = False
    client.connect("127.0.0.1", port_of(server, "direct_tls"))
    await asyncio.wait_for(client.started.wait(), 15)
    client.send_presence()
    return client


async def test_xep0084_avatar_reaches_a_legacy_contact_as_vcard_photo(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=CONVERSION_MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    bob = await legacy(server, "bob@localhost/old", "bob-secret")
    alice = await online(server, "alice@localhost/new", "alice-secret")
    await alice.plugin["xep_0084"].publish_avatar(IMAGE, timeout=10)
    await alice.plugin["xep_0084"].publish_avatar_metadata(
        [{"id": IMAGE_ID, "type": "image/png", "bytes": len(IMAGE)}], timeout=10
    )
    # Alice's next presence carries the hash of her new vCard photo (XEP-0153).
    alice.send_presence(pstatus="new avatar")
    while (got := await next_of(bob.hashes)) != ("alice@localhost", IMAGE_ID):
        assert got[0] == "alice@localhost" and got[1] == ""  # her presence before
    result = await bob.plugin["xep_0054"].get_vcard(JID("alice@localhost"), timeout=10)
    assert result["vcard_temp"]["PHOTO"]["BINVAL"] == IMAGE
    assert result["vcard_temp"]["PHOTO"]["TYPE"] == "image/png"
    for client in (alice, bob):
        await close(client)


async def test_legacy_vcard_photo_reaches_a_modern_contact_as_xep0084_avatar(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=CONVERSION_MODULES)
    await befriend(server, "alice@localhost", "bob@localhost")
    alice: PepClient = await online(server, "alice@localhost/new", "alice-secret")
    bob = await legacy(server, "bob@localhost/old", "bob-secret")
    await bob.plugin["xep_0153"].set_avatar(avatar=IMAGE, mtype="image/png", timeout=10)
    assert await next_of(alice.avatars) == ("bob@localhost", IMAGE_ID)
    result = await alice.plugin["xep_0084"].retrieve_avatar(
        JID("bob@localhost"), IMAGE_ID, timeout=10
    )
    assert result["pubsub"]["items"]["item"]["avatar_data"]["value"] == IMAGE
    for client in (alice, bob):
        await close(client)


async def test_bookmarks_written_through_xep0048_appear_in_xep0402(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=CONVERSION_MODULES)
    modern = await online(server, "alice@localhost/new", "alice-secret", (BOOKMARKS,))
    heard = listen(modern)
    old = await legacy(server, "alice@localhost/old", "alice-secret")
    bookmarks = old.plugin["xep_0048"].stanza.Bookmarks()
    bookmarks.add_conference("council@conference.localhost", "alice", name="Council",
                             autojoin=True)
    bookmarks.add_url("https://xmpp.example/", name="Site")
    await old.plugin["xep_0048"].set_bookmarks(bookmarks, method="xep_0049", timeout=10)
    # The modern client hears of it (XEP-0402 notifications) and reads it back.
    assert await asyncio.wait_for(heard["publish"].get(), 10) == "council@conference.localhost"
    modern.register_plugin("xep_0402")
    items = await modern.plugin["xep_0060"].get_items(JID("alice@localhost"), BOOKMARKS,
                                                      timeout=10)
    stored = {item.get("id"): item for item in items.xml.iter(f"{{{PUBSUB}}}item")}
    assert set(stored) == {"council@conference.localhost"}
    council = stored["council@conference.localhost"].find(f"{{{BOOKMARKS}}}conference")
    assert council is not None and council.get("name") == "Council"
    assert council.get("autojoin") == "true"
    assert council.findtext(f"{{{BOOKMARKS}}}nick") == "alice"
    # XEP-0048 through PEP (XEP-0223, what xep_0048's other method reads) has it too.
    result = await old.plugin["xep_0048"].get_bookmarks(method="xep_0223", timeout=10)
    conferences = result["pubsub"]["items"]["item"]["bookmarks"]["conferences"]
    assert [(c["jid"], c["name"]) for c in conferences] == [
        ("council@conference.localhost", "Council")]
    for client in (modern, old):
        await close(client)


async def test_bookmarks_written_through_xep0402_appear_in_xep0048(
    start_server: StartServer,
) -> None:
    server = await start_server(modules=CONVERSION_MODULES)
    modern = await online(server, "alice@localhost/new", "alice-secret", (BOOKMARKS,))
    modern.register_plugin("xep_0402")
    for room, name in (("council@conference.localhost", "Council"), ("tea@conf.localhost", "Tea")):
        conference = modern.plugin["xep_0402"].stanza.Conference()
        conference["name"] = name
        conference["autojoin"] = room.startswith("council")
        conference["nick"] = "alice"
        await modern.plugin["xep_0060"].publish(
            JID("alice@localhost"), BOOKMARKS, id=room, payload=conference.xml,
            options=bookmark_options(modern), timeout=10)
    await modern.plugin["xep_0060"].retract(
        JID("alice@localhost"), BOOKMARKS, "tea@conf.localhost", notify=True, timeout=10)
    old = await legacy(server, "alice@localhost/old", "alice-secret")
    for method, where in (("xep_0049", ("private", "bookmarks")),
                          ("xep_0223", ("pubsub", "items", "item", "bookmarks"))):
        result = await old.plugin["xep_0048"].get_bookmarks(method=method, timeout=10)
        for key in where:
            result = result[key]
        assert [(c["jid"], c["name"], c["autojoin"], c["nick"])
                for c in result["conferences"]] == [
            ("council@conference.localhost", "Council", True, "alice")], method
    for client in (modern, old):
        await close(client)
