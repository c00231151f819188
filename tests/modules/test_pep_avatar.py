"""XEP-0398: the XEP-0084 avatar and the vCard PHOTO kept the same, both ways, with no
loop, without sockets."""

from __future__ import annotations

import base64
import hashlib

import pytest
from lxml import etree

from xmppd.modules.roster import RosterItem
from xmppd.testing import ModuleHarness, TestSession

PS = "http://jabber.org/protocol/pubsub"
DATA = "urn:xmpp:avatar:data"
METADATA = "urn:xmpp:avatar:metadata"
VCARD = "vcard-temp"
UPDATE = "vcard-temp:x:update"
INFO = "http://jabber.org/protocol/disco#info"
CONVERSION = "urn:xmpp:pep-vcard-conversion:0"
IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(200))
IMAGE_ID = hashlib.sha1(IMAGE).hexdigest()
OTHER = b"GIF89a" + bytes(range(100))
OTHER_ID = hashlib.sha1(OTHER).hexdigest()


@pytest.fixture
async def harness() -> ModuleHarness:
    modules = {"roster": {}, "presence": {}, "pep": {}, "vcard": {}, "disco": {}}
    harness = ModuleHarness(modules, users={"alice@localhost", "bob@localhost"})
    return await harness.start()


async def ok(harness: ModuleHarness, session: TestSession, type_: str, payload: str,
             to: str | None = None) -> etree._Element:
    reply = await harness.iq(session, type_, payload, to)
    assert reply.get("type") == "result", etree.tostring(reply)
    return reply


async def publish_avatar(harness: ModuleHarness, session: TestSession, image: bytes,
                         kind: str = "image/png") -> str:
    """XEP-0084 examples 1 and 3: the data, then the metadata."""
    avatar_id = hashlib.sha1(image).hexdigest()
    await ok(harness, session, "set",
             f"<pubsub xmlns='{PS}'><publish node='{DATA}'><item id='{avatar_id}'>"
             f"<data xmlns='{DATA}'>{base64.b64encode(image).decode()}</data>"
             "</item></publish></pubsub>")
    await ok(harness, session, "set", metadata(f"<info bytes='{len(image)}' id='{avatar_id}' "
                                               f"height='64' width='64' type='{kind}'/>",
                                               avatar_id))
    return avatar_id


def metadata(infos: str, item_id: str = "current") -> str:
    return (f"<pubsub xmlns='{PS}'><publish node='{METADATA}'><item id='{item_id}'>"
            f"<metadata xmlns='{METADATA}'>{infos}</metadata></item></publish></pubsub>")


async def vcard_of(harness: ModuleHarness, session: TestSession, jid: str) -> etree._Element:
    reply = await ok(harness, session, "get", f"<vCard xmlns='{VCARD}'/>", jid)
    vcard = reply.find(f"{{{VCARD}}}vCard")
    assert vcard is not None
    return vcard


def photo(vcard: etree._Element) -> tuple[str | None, bytes | None]:
    kind = vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}TYPE")
    binval = vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}BINVAL")
    return kind, None if binval is None else base64.b64decode(binval)


async def pep_items(harness: ModuleHarness, session: TestSession, owner: str,
                    node: str) -> list[etree._Element]:
    reply = await ok(harness, session, "get",
                     f"<pubsub xmlns='{PS}'><items node='{node}'/></pubsub>", owner)
    return reply.findall(f".//{{{PS}}}item")


async def test_conversion_is_advertised(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    for to in ("localhost", "alice@localhost"):
        reply = await ok(harness, alice, "get", f"<query xmlns='{INFO}'/>", to)
        features = [f.get("var") for f in reply.iter(f"{{{INFO}}}feature")]
        assert CONVERSION in features, to


async def test_published_avatar_becomes_the_vcard_photo_keeping_the_rest(
    harness: ModuleHarness,
) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await ok(harness, alice, "set", f"<vCard xmlns='{VCARD}'><FN>Alice</FN></vCard>")
    await publish_avatar(harness, alice, IMAGE)
    vcard = await vcard_of(harness, bob, "alice@localhost")
    assert photo(vcard) == ("image/png", IMAGE)
    assert vcard.findtext(f"{{{VCARD}}}FN") == "Alice"
    # The hash of the new PHOTO goes into alice's presences (XEP-0153).
    got = await harness.send(alice, "<presence/>")
    hashes = [p.findtext("{vcard-temp:x:update}x/{vcard-temp:x:update}photo")
              for p in got if p.tag == "{jabber:client}presence"]
    assert hashes and set(hashes) == {IMAGE_ID}
    # The conversion wrote no avatar back: the data node holds only alice's item.
    assert [i.get("id") for i in await pep_items(harness, alice, "alice@localhost", DATA)] == [
        IMAGE_ID]
    # A new avatar replaces the photo; disabling the avatar (XEP-0084 example 8) removes it.
    await publish_avatar(harness, alice, OTHER, "image/gif")
    assert photo(await vcard_of(harness, bob, "alice@localhost")) == ("image/gif", OTHER)
    await ok(harness, alice, "set", metadata(""))
    vcard = await vcard_of(harness, bob, "alice@localhost")
    assert photo(vcard) == (None, None)
    assert vcard.findtext(f"{{{VCARD}}}FN") == "Alice"


async def test_metadata_without_matching_data_leaves_the_photo(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await publish_avatar(harness, alice, IMAGE)
    assert photo(await vcard_of(harness, alice, "alice@localhost")) == ("image/png", IMAGE)
    # Only a URL (XEP-0084 4.2.1 with url), then an id whose data was never published:
    # nothing a vCard can hold, so the photo stays.
    await ok(harness, alice, "set", metadata(
        f"<info bytes='3' id='{OTHER_ID}' type='image/png' url='https://a.example/a.png'/>"))
    await ok(harness, alice, "set", metadata(f"<info bytes='3' id='{OTHER_ID}' type='image/png'/>"))
    assert photo(await vcard_of(harness, alice, "alice@localhost")) == ("image/png", IMAGE)


async def test_vcard_photo_becomes_the_pep_avatar(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    # A vCard without a photo publishes no avatar.
    await ok(harness, alice, "set", f"<vCard xmlns='{VCARD}'><FN>Alice</FN></vCard>")
    reply = await harness.iq(alice, "get",
                             f"<pubsub xmlns='{PS}'><items node='{METADATA}'/></pubsub>",
                             "alice@localhost")
    assert reply.find(".//{urn:ietf:params:xml:ns:xmpp-stanzas}item-not-found") is not None
    binval = base64.b64encode(IMAGE).decode()
    await ok(harness, alice, "set",
             f"<vCard xmlns='{VCARD}'><FN>Alice</FN><PHOTO><TYPE>image/png</TYPE>"
             f"<BINVAL>{binval[:40]}\n{binval[40:]}</BINVAL></PHOTO></vCard>")
    owner_view = await pep_items(harness, alice, "alice@localhost", METADATA)
    assert len(owner_view) == 1
    info = owner_view[0].find(f"{{{METADATA}}}metadata/{{{METADATA}}}info")
    assert info is not None
    assert (info.get("id"), info.get("type"), info.get("bytes")) == (
        IMAGE_ID, "image/png", str(len(IMAGE)))
    data = await pep_items(harness, alice, "alice@localhost", DATA)
    assert [i.get("id") for i in data] == [IMAGE_ID]
    assert base64.b64decode(data[0].findtext(f"{{{DATA}}}data") or "") == IMAGE
    # The conversion did not convert back: the stored vCard is the client's, FN kept.
    vcard = await vcard_of(harness, bob, "alice@localhost")
    assert vcard.findtext(f"{{{VCARD}}}FN") == "Alice"
    # The same photo again publishes nothing new; removing the photo disables the avatar.
    await ok(harness, alice, "set",
             f"<vCard xmlns='{VCARD}'><FN>Alice 2</FN><PHOTO><TYPE>image/png</TYPE>"
             f"<BINVAL>{binval}</BINVAL></PHOTO></vCard>")
    assert [i.get("id") for i in await pep_items(harness, alice, "alice@localhost", METADATA)
            ] == [IMAGE_ID]
    await ok(harness, alice, "set", f"<vCard xmlns='{VCARD}'><FN>Alice</FN></vCard>")
    items = await pep_items(harness, alice, "alice@localhost", METADATA)
    assert items[-1].find(f"{{{METADATA}}}metadata") is not None
    assert items[-1].findall(f".//{{{METADATA}}}info") == []


async def test_a_new_pep_avatar_is_broadcast_in_presence(harness: ModuleHarness) -> None:
    """XEP-0398 with XEP-0153 contacts: once a published avatar became the vCard's
    photo, the user's resource broadcasts its presence again with the new hash, so
    a contact sees the avatar change at once; the same avatar again sends nothing."""
    roster = harness.host.modules["roster"]
    for owner, contact in (("alice@localhost", "bob@localhost"),
                           ("bob@localhost", "alice@localhost")):
        await roster.update(  # type: ignore[attr-defined]
            owner, contact, lambda _, c=contact: RosterItem(c, subscription="both")
        )
    bob = harness.session("bob@localhost/b", available=False)
    alice = harness.session("alice@localhost/a", available=False)
    for session in (bob, alice):
        await harness.send(session, "<presence><status>here</status></presence>")
    bob.take()
    await publish_avatar(harness, alice, IMAGE)
    await harness.router.drain()
    presences = [s for s in bob.take() if s.tag == "{jabber:client}presence"]
    assert [p.get("from") for p in presences] == ["alice@localhost/a"]
    assert presences[0].findtext(f"{{{UPDATE}}}x/{{{UPDATE}}}photo") == IMAGE_ID
    assert presences[0].findtext("{jabber:client}status") == "here"
    await publish_avatar(harness, alice, IMAGE)
    await harness.router.drain()
    assert [s for s in bob.take() if s.tag == "{jabber:client}presence"] == []
