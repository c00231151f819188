"""XEP-0398: the XEP-0084 (PEP) avatar and the vCard-temp PHOTO kept the same.

A client that publishes its avatar metadata (after the data, as XEP-0084
says) gets the image put into its vCard's PHOTO, so legacy clients, and the
vcard-temp:x:update hash the vcard module stamps into its presences, show
it; an empty <metadata/> (avatar disabled) removes the PHOTO. A client that
sets a vCard with a PHOTO (a legacy client) gets the image published to the
data node and its <info/> to the metadata node, so modern clients see it.

No loops: each side tells only of changes its clients made (`Pep.listen`,
`VCard.listen`), and each conversion writes through the other side's
server API (`VCard.store`, `Pep.publish`), which tells nobody. A conversion
that would change nothing (the same hash on both sides) writes nothing.
A conversion that fails is logged: the client's own write stands.
When a PEP avatar changed the vCard's photo, the account's resources
broadcast their presence again (`Pep.resend_presence`), which the vcard
module stamps with the new hash: XEP-0153 clients among the contacts learn
of the avatar without waiting for the user's next presence change.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import logging
from typing import TYPE_CHECKING

from lxml import etree

from xmppd.modules.vcard import VCARD, VCard, photo_hash
from xmppd.storage.base import StorageError
from xmppd.stream.errors import StanzaError

from ._pubsub_engine import Event

if TYPE_CHECKING:
    from .pep import Pep

CONVERSION = "urn:xmpp:pep-vcard-conversion:0"
AVATAR_DATA = "urn:xmpp:avatar:data"
AVATAR_METADATA = "urn:xmpp:avatar:metadata"
_PS_ITEM = "{http://jabber.org/protocol/pubsub}item"
_METADATA = f"{{{AVATAR_METADATA}}}metadata"
_INFO = f"{{{AVATAR_METADATA}}}info"
_DATA = f"{{{AVATAR_DATA}}}data"
_V = f"{{{VCARD}}}"
DEFAULT_TYPE = "image/png"

log = logging.getLogger(__name__)


class AvatarConversion:
    """Both directions for the accounts of one server (pep and vcard enabled)."""

    def __init__(self, pep: Pep, vcard: VCard) -> None:
        self.pep = pep
        self.vcard = vcard

    # --- PEP -> vCard --------------------------------------------------------------------

    async def published(self, owner: str, event: Event) -> None:
        if event.node.name != AVATAR_METADATA or event.item is None:
            return
        try:
            await self._to_vcard(owner, event.item)
        except (StanzaError, StorageError) as exc:
            log.warning("avatar of %s not converted to its vCard: %s", owner, exc)

    async def _to_vcard(self, owner: str, item: etree._Element) -> None:
        metadata = item.find(_METADATA)
        if metadata is None:
            return
        image: tuple[bytes, str] | None = None  # (image, type); None: no avatar
        infos = metadata.findall(_INFO)
        if infos:
            image = await self._image(owner, infos)
            if image is None:
                return  # only URLs, or data not published: nothing a vCard can hold
        user, vhost = owner.split("@", 1)
        current = await self.vcard.load(vhost, user)
        wanted = hashlib.sha1(image[0]).hexdigest() if image else ""
        if current is not None and photo_hash(current) == wanted:
            return
        if current is None and image is None:
            return
        vcard = copy.deepcopy(current) if current is not None else etree.Element(
            f"{_V}vCard", nsmap={None: VCARD})
        for photo in vcard.findall(f"{_V}PHOTO"):
            vcard.remove(photo)
        if image is not None:
            photo = etree.SubElement(vcard, f"{_V}PHOTO")
            etree.SubElement(photo, f"{_V}TYPE").text = image[1]
            etree.SubElement(photo, f"{_V}BINVAL").text = base64.b64encode(image[0]).decode()
        await self.vcard.store(owner, vcard)
        self.pep.resend_presence(owner)  # the new hash, to contacts now

    async def _image(self, owner: str, infos: list[etree._Element]) -> tuple[bytes, str] | None:
        """The image of the first <info/> (PNG preferred, XEP-0084 4.2.1) whose data is
        in the account's data node and matches its id."""
        infos = sorted(infos, key=lambda i: i.get("type") != DEFAULT_TYPE)
        service = self.pep.service(owner)
        node = await service.node(AVATAR_DATA)
        if node is None:
            return None
        for info in infos:
            avatar_id = info.get("id")
            if info.get("url") or not avatar_id:
                continue
            for found in await service.item_elements(node, [avatar_id]):
                data = found.find(_DATA)
                try:
                    image = base64.b64decode("".join((data.text or "").split()), validate=True) \
                        if data is not None else b""
                except (binascii.Error, ValueError):
                    continue
                if image and hashlib.sha1(image).hexdigest() == avatar_id:
                    return image, info.get("type") or DEFAULT_TYPE
        return None

    # --- vCard -> PEP --------------------------------------------------------------------

    async def vcard_set(self, owner: str, vcard: etree._Element) -> None:
        try:
            await self._to_pep(owner, vcard)
        except (StanzaError, StorageError) as exc:
            log.warning("vCard photo of %s not converted to its avatar: %s", owner, exc)

    async def _to_pep(self, owner: str, vcard: etree._Element) -> None:
        avatar_id = photo_hash(vcard)
        service = self.pep.service(owner)
        node = await service.node(AVATAR_METADATA)
        last = await service.last_item(node) if node is not None else None
        if last is None and not avatar_id:
            return  # no avatar either side
        if last is not None:
            infos = [i.get("id") for i in last.iter(_INFO)]
            if (avatar_id in infos) if avatar_id else not infos:
                return  # the same avatar on both sides already
        metadata_item = etree.Element(_PS_ITEM)
        metadata = etree.SubElement(metadata_item, _METADATA, nsmap={None: AVATAR_METADATA})
        if avatar_id:
            binval = "".join((vcard.findtext(f"{_V}PHOTO/{_V}BINVAL") or "").split())
            kind = (vcard.findtext(f"{_V}PHOTO/{_V}TYPE") or "").strip() or DEFAULT_TYPE
            data_item = etree.Element(_PS_ITEM, id=avatar_id)
            etree.SubElement(data_item, _DATA, nsmap={None: AVATAR_DATA}).text = binval
            await self.pep.publish(owner, AVATAR_DATA, data_item)
            etree.SubElement(metadata, _INFO, id=avatar_id, type=kind,
                             bytes=str(len(base64.b64decode(binval))))
        metadata_item.set("id", avatar_id or "current")
        await self.pep.publish(owner, AVATAR_METADATA, metadata_item)
