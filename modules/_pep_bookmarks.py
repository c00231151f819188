"""Bookmarks that old and new clients share: XEP-0402's compatibility with XEP-0048,
and XEP-0411's conversion between XEP-0048's two stores.

One account's bookmarks live in three places, and a client's write to any
of them is carried to the other two:

* XEP-0402: the PEP node urn:xmpp:bookmarks:1, one item per room (its JID as
  item id);
* XEP-0048 in private XML storage (XEP-0049): one <storage xmlns='storage:bookmarks'/>;
* XEP-0048 in PEP (XEP-0223): the node storage:bookmarks, one item "current"
  holding the same <storage/>.

A <storage/> written by a client (either way) becomes the XEP-0402 items:
new and changed rooms published, rooms no longer there retracted (XEP-0402
5.3.2), each item's <extensions/> kept; and it is copied to the other
XEP-0048 store. A XEP-0402 publish or retract rebuilds the <storage/> from
all the items, with the URL bookmarks XEP-0402 has no place for kept from
private storage, and writes it to both XEP-0048 stores.

No loops: each side tells only of its clients' writes (`Pep.listen`,
`Private.listen`), and the conversion writes through the server APIs
(`Pep.publish`, `Pep.retract`, `Private.store`), which tell nobody. A
conversion that fails is logged; the client's own write stands.

Private by default: the conversion publishes with `enforce`, so a bookmark node
a client made readable by its contacts (published to without publish-options,
or configured so) is made whitelist again in the transaction that copies the
private bookmarks into it, as Prosody's mod_bookmarks reconfigures the node;
and both nodes are made whitelist when a client creates them without options
(`PRIVATE_NODES`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from lxml import etree

from xmppd.modules.private import Private
from xmppd.storage.base import StorageError
from xmppd.stream.errors import StanzaError

from ._pubsub_engine import Event

if TYPE_CHECKING:
    from .pep import Pep

NATIVE = "urn:xmpp:bookmarks:1"
LEGACY = "storage:bookmarks"
FEATURES = (f"{NATIVE}#compat", f"{NATIVE}#compat-pep", "urn:xmpp:bookmarks-conversion:0")
"""XEP-0402 5.3 (both XEP-0048 stores) and XEP-0411 2, on the account."""
_PS_ITEM = "{http://jabber.org/protocol/pubsub}item"
_N = f"{{{NATIVE}}}"
_L = f"{{{LEGACY}}}"
_PS = "pubsub#"
NATIVE_OPTIONS: dict[str, object] = {  # XEP-0402 5.2
    f"{_PS}persist_items": True,
    f"{_PS}max_items": "max",
    f"{_PS}send_last_published_item": "never",
    f"{_PS}access_model": "whitelist",
}
LEGACY_OPTIONS: dict[str, object] = {  # XEP-0223 / XEP-0048 3.3
    f"{_PS}persist_items": True,
    f"{_PS}access_model": "whitelist",
}
PRIVATE_NODES: dict[str, dict[str, object]] = {NATIVE: NATIVE_OPTIONS, LEGACY: LEGACY_OPTIONS}
"""What the bookmark nodes are made with, whoever makes them: a client that publishes
without the publish-options XEP-0402 5.2 requires (MUST) would otherwise leave its
bookmarks, room passwords included, readable by every contact (the PEP default
access model is presence)."""

log = logging.getLogger(__name__)

Room = tuple[str | None, bool, str | None, str | None]
"""What both formats say of a room: name, autojoin, nick, password."""


class BookmarksConversion:
    def __init__(self, pep: Pep) -> None:
        self.pep = pep

    # --- the two listeners ---------------------------------------------------------------

    async def published(self, owner: str, event: Event) -> None:
        try:
            if event.node.name == NATIVE:
                await self._native_changed(owner)
            elif event.node.name == LEGACY and event.kind == "items" and event.item is not None:
                storage = event.item.find(f"{_L}storage")
                if storage is not None:
                    await self._legacy_written(owner, storage, to_private=True)
        except (StanzaError, StorageError) as exc:
            log.warning("bookmarks of %s not converted: %s", owner, exc)

    async def private_set(self, owner: str, namespace: str, query: etree._Element) -> None:
        if namespace != LEGACY:
            return
        storage = query.find(f"{_L}storage")
        if storage is None:
            return
        try:
            await self._legacy_written(owner, storage, to_private=False)
        except (StanzaError, StorageError) as exc:
            log.warning("bookmarks of %s not converted: %s", owner, exc)

    # --- XEP-0048 -> XEP-0402 (and the other XEP-0048 store) ------------------------------

    async def _legacy_written(
        self, owner: str, storage: etree._Element, *, to_private: bool
    ) -> None:
        wanted: dict[str, Room] = {}
        for conference in storage.findall(f"{_L}conference"):
            jid = conference.get("jid")
            if jid:
                wanted[jid] = (
                    conference.get("name"),
                    conference.get("autojoin") in ("true", "1"),
                    conference.findtext(f"{_L}nick"),
                    conference.findtext(f"{_L}password"),
                )
        same: set[str] = set()
        changed: set[str] = set()
        stale: list[str] = []
        async for jid, conference in self._native_conferences(owner):
            if jid not in wanted:
                stale.append(jid)
            elif _room_of(conference) == wanted[jid]:
                same.add(jid)
            else:
                changed.add(jid)
        for jid, room in wanted.items():
            if jid in same:
                continue
            # The item read again, alone, for its <extensions/> (XEP-0402 5.3.2).
            have = await self._native_conference(owner, jid) if jid in changed else None
            extensions = have.find(f"{_N}extensions") if have is not None else None
            item = etree.Element(_PS_ITEM, id=jid)
            item.append(_native(room, extensions))
            await self.pep.publish(owner, NATIVE, item, NATIVE_OPTIONS, enforce=True)
        for jid in stale:
            await self.pep.retract(owner, NATIVE, jid)
        if to_private:
            await self._private_store(owner, storage)
        else:
            await self._publish_legacy(owner, storage)

    # --- XEP-0402 -> both XEP-0048 stores -------------------------------------------------

    async def _native_changed(self, owner: str) -> None:
        """Both XEP-0048 stores rewritten from the XEP-0402 items, read a page at a
        time. The <storage/> grows only to what one of the stores takes (the PEP
        node's `max_item_bytes`, private storage's `max_bytes`): past both, neither
        would store it, and the building stops there (the failure logged)."""
        private = self.pep.host.find_module(Private)
        storage = etree.Element(f"{_L}storage", nsmap={None: LEGACY})
        size = 0
        limit = max(self.pep.limits.max_item_bytes, private.max_bytes if private else 0)
        async for jid, conference in self._native_conferences(owner):
            name, autojoin, nick, password = _room_of(conference)
            legacy = etree.SubElement(storage, f"{_L}conference", jid=jid)
            if name is not None:
                legacy.set("name", name)
            legacy.set("autojoin", "true" if autojoin else "false")
            for tag, text in (("nick", nick), ("password", password)):
                if text is not None:
                    etree.SubElement(legacy, f"{_L}{tag}").text = text
            size += len(etree.tostring(legacy))
            if size > limit:
                raise StanzaError(
                    "resource-constraint", f"XEP-0048 bookmarks are at most {limit} bytes"
                )
        stored = await private.load(owner, LEGACY) if private is not None else None
        if stored is not None:  # URL bookmarks: XEP-0402 has no place for them
            for url in stored.iterfind(f"{_L}storage/{_L}url"):
                storage.append(copy.deepcopy(url))
        await self._private_store(owner, storage)
        await self._publish_legacy(owner, storage)

    # --- reading and writing ---------------------------------------------------------------

    async def _native_conferences(
        self, owner: str
    ) -> AsyncIterator[tuple[str, etree._Element]]:
        """(room JID, <conference/>) of the account's XEP-0402 items, oldest first,
        read a page at a time (`PubSubService.item_pages`): a node of 1,000 items
        of up to 256 KiB (their <extensions/>) is never held at once."""
        service = self.pep.service(owner)
        node = await service.node(NATIVE)
        if node is None:
            return
        async for page in service.item_pages(node):
            for item in page:
                conference = item.find(f"{_N}conference")
                jid = item.get("id")
                if conference is not None and jid:
                    yield jid, conference

    async def _native_conference(self, owner: str, jid: str) -> etree._Element | None:
        """The <conference/> of the account's XEP-0402 item for `jid`, if any."""
        service = self.pep.service(owner)
        node = await service.node(NATIVE)
        items = await service.item_elements(node, [jid]) if node is not None else []
        return items[0].find(f"{_N}conference") if items else None

    async def _private_store(self, owner: str, storage: etree._Element) -> None:
        private = self.pep.host.find_module(Private)
        if private is not None:
            await private.store(owner, storage)

    async def _publish_legacy(self, owner: str, storage: etree._Element) -> None:
        item = etree.Element(_PS_ITEM, id="current")
        item.append(copy.deepcopy(storage))
        await self.pep.publish(owner, LEGACY, item, LEGACY_OPTIONS, enforce=True)


def _room_of(conference: etree._Element) -> Room:
    return (
        conference.get("name"),
        conference.get("autojoin") in ("true", "1"),
        conference.findtext(f"{_N}nick"),
        conference.findtext(f"{_N}password"),
    )


def _native(room: Room, extensions: etree._Element | None) -> etree._Element:
    name, autojoin, nick, password = room
    conference = etree.Element(f"{_N}conference", nsmap={None: NATIVE})
    if name is not None:
        conference.set("name", name)
    if autojoin:
        conference.set("autojoin", "true")
    for tag, text in (("nick", nick), ("password", password)):
        if text is not None:
            etree.SubElement(conference, f"{_N}{tag}").text = text
    if extensions is not None:
        conference.append(copy.deepcopy(extensions))
    return conference
