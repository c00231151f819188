"""vcard-temp (XEP-0054) and the avatar hash in presence (XEP-0153, as XEP-0398 section 4 asks).

Each account's vCard is one blob in the blob store "vcard" (key: the user
name), world-readable as XEP-0054 says, writable only by its owner. The
server, not the client, puts the SHA-1 of the vCard photo into the user's
available presences: a client that just logged in need not download its own
vCard to learn the hash, and contacts see avatar changes from any resource.
The hash of each user with a session on this node is kept in memory (loaded
at session/bound, updated on every vCard set, read again after a set that
storage failed, whose write may still land), because the presence filter
must not wait for storage. A load that fails keeps nothing: presences go
without the server's hash for LOAD_RETRY_AFTER seconds (not waiting on a
store that is down), then the next one loads again, so the hash comes back
once the store does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import hashlib
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from xmppd.modulehost import IqRequest, Module, ModuleHost, storage_call
from xmppd.session import ClientSession
from xmppd.storage.base import UNCHANGED, Blob, BlobStore, Contended, StorageError, Unchanged
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

VCARD = "vcard-temp"
X_UPDATE = "vcard-temp:x:update"
_VCARD_TAG = f"{{{VCARD}}}vCard"
_X_TAG = f"{{{X_UPDATE}}}x"
_PHOTO_TAG = f"{{{X_UPDATE}}}photo"

LOAD_TIMEOUT = 5.0  # seconds a presence waits for the hash before going out without one
LOAD_RETRY_AFTER = 5.0
"""Seconds after a failed load of a user's hash before a presence loads it again:
meanwhile presences go without it at once, so a long outage costs one read (and
no presence a wait) per user per LOAD_RETRY_AFTER."""
FILTER_PRIORITY = 10_000
"""Runs before every other "stanza/out" filter: they judge the presence as it
goes out, hash included."""
PHOTO_NOTICE = "vcard-photo"
STORE = "vcard"
"""Cluster bus topic: {"bare": ...} whose vCard another node changed."""

log = logging.getLogger(__name__)

Listener = Callable[[str, etree._Element], Awaitable[None]]
"""(bare JID, new vCard) after a client's vCard set was stored (XEP-0398's conversion
to the PEP avatar listens)."""

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


class VCardOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_bytes: StrictInt = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)


class VCard(Module):
    name = "vcard"
    Options = VCardOptions

    def reconfigure(self, options: BaseModel) -> None:
        super().reconfigure(options)
        self.max_bytes = self.options.max_bytes  # type: ignore[attr-defined]

    def setup(self) -> None:
        self.reconfigure(self.options)
        # bare JID -> photo SHA-1 (hex), "" for "no photo"; absent: to be loaded
        self._photo: dict[str, str] = {}
        # bare JID -> when (`clock`) its hash last failed to load: not tried again before
        # LOAD_RETRY_AFTER has passed
        self._failed: dict[str, float] = {}
        self.clock: Callable[[], float] = time.monotonic  # tests move time on
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._listeners: list[Listener] = []
        self.host.add_feature(VCARD)
        self.host.iq(VCARD, "get", self.get, to="account")
        self.host.iq(VCARD, "set", self.set, to="account")
        self.host.filter(
            "stanza/out", self._presence_out, FILTER_PRIORITY, kinds=("presence",)
        )
        self.host.hook("session/bound", self._bound)
        self.host.hook("session/closed", self._closed)
        # Another node changed a vCard: its avatar hash is read again when needed.
        self.host.on_cluster_notice(PHOTO_NOTICE, self._changed_elsewhere, self._photo.clear)

    # --- IQ handlers -------------------------------------------------------------------

    async def get(self, request: IqRequest) -> etree._Element:
        if request.payload.tag != _VCARD_TAG:
            raise StanzaError("bad-request", "the payload must be <vCard xmlns='vcard-temp'/>")
        user = request.target.split("@", 1)[0]
        vcard = await self.load(request.host, user)
        if vcard is not None:
            return vcard
        if request.from_owner:
            # XEP-0054 3.1 allows an empty vCard for one's own: clients handle it best.
            return etree.Element(_VCARD_TAG, nsmap={None: VCARD})
        if not await self.host.user_exists(request.host, user):
            raise StanzaError("service-unavailable")
        raise StanzaError("item-not-found", "this user has no vCard")

    async def set(self, request: IqRequest) -> None:
        if not request.from_owner:
            raise StanzaError("forbidden", "you can only set your own vCard")
        await self.store(request.target, request.payload)
        for listener in self._listeners:
            await listener(request.target, request.payload)

    def listen(self, listener: Listener) -> None:
        """Call `listener` after each vCard a client set (not after `store` calls of
        other modules, so that a conversion never triggers the reverse one)."""
        self._listeners.append(listener)

    # --- the API xmppctl uses (xmppd.userdata), the IQ handlers too ---------------------

    async def load(self, vhost: str, user: str) -> etree._Element | None:
        """The stored vCard of user@vhost, None when there is none (StanzaError when the
        store fails or the stored one is unreadable)."""
        blob = await storage_call(self._store(vhost).get(user), "vCard")
        return _parse(blob) if blob is not None else None

    async def store(self, bare: str, vcard: etree._Element) -> None:
        """Replace the account's vCard (an empty one deletes it), with the checks a
        client's set gets (StanzaError), and keep the avatar hash of its sessions right."""
        if vcard.tag != _VCARD_TAG:
            raise StanzaError("bad-request", "the payload must be <vCard xmlns='vcard-temp'/>")
        if (vcard.text or "").strip() or any((child.tail or "").strip() for child in vcard):
            raise StanzaError("bad-request", "text belongs inside the vCard's fields")
        photo = photo_hash(vcard)
        data = b"" if len(vcard) == 0 else etree.tostring(copy.deepcopy(vcard))
        if len(data) > self.max_bytes:
            raise StanzaError("not-acceptable", f"the vCard is over {self.max_bytes} bytes")
        vhost = bare.rsplit("@", 1)[1]
        lock = self._locks.get(bare)
        if lock is None:
            lock = self._locks[bare] = asyncio.Lock()
        async with lock:  # this node's writers in arrival order: the cached hash ends up right
            try:
                await storage_call(
                    self._write(self._store(vhost), bare.split("@", 1)[0], data), "vCard"
                )
            except StanzaError:
                # A write that timed out may still land: the hash held here and on the
                # other nodes is read again when next needed, not kept as it was.
                self._photo.pop(bare, None)
                self.host.notify_cluster(PHOTO_NOTICE, {"bare": bare})
                raise
            if self.host.sessions(bare):
                self._photo[bare] = photo
                self._failed.pop(bare, None)
            self.host.notify_cluster(PHOTO_NOTICE, {"bare": bare})
            await self.host.cluster_notices_sent()

    def _store(self, vhost: str) -> BlobStore:
        return self.host.blobs(vhost, STORE)

    async def _write(self, store: BlobStore, key: str, data: bytes) -> None:
        """Replace the blob (empty data: delete it), last writer wins even across nodes.

        Each write is conditional on what was just read, so two nodes never
        interleave; an unchanged vCard (clients re-upload it often) costs no write.
        """

        def replace(current: Blob | None) -> bytes | None | Unchanged:
            if current is not None and current.data == data:
                return UNCHANGED
            return data or None

        try:
            await store.modify(key, replace, what="vCard")
        except Contended:
            raise StanzaError(
                "resource-constraint", "the vCard is being changed elsewhere, retry"
            ) from None

    # --- the avatar hash in outgoing presence ---------------------------------------------

    def _presence_out(
        self, stanza: etree._Element, session: ClientSession
    ) -> bool | asyncio.Future[None]:
        """Stamp the hash into an available presence; if it is not known yet, the
        presence (and the client's next stanzas) wait for it to load."""
        if stanza.tag != ns.C_PRESENCE or stanza.get("type") is not None:
            return True
        bare = session.bare
        photo = self._photo.get(bare)
        if photo is None:
            failed = self._failed.get(bare)
            if failed is not None and self.clock() - failed < LOAD_RETRY_AFTER:
                return True  # the store failed a moment ago: no hash, and no wait
            return self._loading_photo(session.host, bare)
        stamp(stanza, photo)
        return True

    def _loading_photo(self, vhost: str, bare: str) -> asyncio.Future[None]:
        loading = self._loading.get(bare)
        if loading is None:
            loading = self._loading[bare] = self.host.spawn(self._load(vhost, bare))
            loading.add_done_callback(lambda _: self._loading.pop(bare, None))
        return loading

    async def _load(self, vhost: str, bare: str) -> None:
        """Read the hash. When the vCard cannot be read nothing is cached, only the
        time of the failure: presences go without a hash, and after LOAD_RETRY_AFTER
        the next one loads again (a cached "unknown" would stay until the user's
        sessions all ended, long after the store is back)."""
        try:
            async with asyncio.timeout(LOAD_TIMEOUT):
                blob = await self._store(vhost).get(bare.split("@", 1)[0])
            photo = "" if blob is None else photo_hash(_parse(blob))
        except (StorageError, TimeoutError, StanzaError) as exc:
            log.warning("avatar hash of %s unavailable: %s", bare, exc)
            if self.host.sessions(bare):
                self._failed[bare] = self.clock()
            return
        # A vCard set that finished meanwhile wrote a newer value: keep it.
        if bare not in self._photo and self.host.sessions(bare):
            self._photo[bare] = photo
            self._failed.pop(bare, None)

    # --- session and account events -----------------------------------------------------

    def _changed_elsewhere(self, notice: dict[str, Any]) -> None:
        self._photo.pop(str(notice["bare"]), None)

    async def _bound(self, session: ClientSession) -> None:
        # Not awaited: a slow store must not hold up other modules' session/bound. A new
        # session loads even after a recent failure: logins are rare, presences are not.
        if session.bare not in self._photo:
            self._loading_photo(session.host, session.bare)

    async def _closed(self, session: ClientSession) -> None:
        if not self.host.sessions(session.bare):
            self._photo.pop(session.bare, None)
            self._failed.pop(session.bare, None)

    async def remove_user(self, vhost: str, username: str) -> bool:
        """Delete the vCard (the avatar is its PHOTO: no other blob) and the cached hash."""
        bare = f"{username}@{vhost}"
        self._photo.pop(bare, None)
        self._failed.pop(bare, None)
        found = await self.purge_user(self.host, vhost, username)
        self.host.notify_cluster(PHOTO_NOTICE, {"bare": bare})
        return found

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        return await host.blobs(vhost, STORE).delete(username)


def photo_hash(vcard: etree._Element) -> str:
    """The XEP-0153 hash: SHA-1 (hex) of the decoded PHOTO/BINVAL, "" for no photo.

    Malformed base64 is the client's bad-request: it could never be shown.
    """
    binval = vcard.findtext(f"{{{VCARD}}}PHOTO/{{{VCARD}}}BINVAL")
    if not binval or not binval.strip():
        return ""
    try:
        image = base64.b64decode("".join(binval.split()), validate=True)
    except (binascii.Error, ValueError):
        raise StanzaError("bad-request", "PHOTO/BINVAL is not valid base64") from None
    return hashlib.sha1(image).hexdigest() if image else ""


def stamp(presence: etree._Element, photo: str | None) -> None:
    """Put the server's hash into an available presence (XEP-0398 section 4).

    A client's <photo/> left empty on purpose ("no avatar to advertise") is
    kept; any other update element is replaced by the hash of the stored vCard,
    which XEP-0153 makes authoritative. None (hash unknown): left as sent.
    """
    if photo is None:
        return
    existing = presence.findall(_X_TAG)
    for x in existing:
        element = x.find(_PHOTO_TAG)
        if element is not None and not (element.text or "").strip():
            return
    for x in existing:
        presence.remove(x)
    x = etree.SubElement(presence, _X_TAG, nsmap={None: X_UPDATE})
    etree.SubElement(x, _PHOTO_TAG).text = photo or None


def _parse(blob: Blob) -> etree._Element:
    try:
        return etree.fromstring(blob.data, _PARSER)
    except etree.XMLSyntaxError as exc:
        log.error("stored vCard %s is corrupt: %s", blob.key, exc)
        raise StanzaError("internal-server-error", "the stored vCard is unreadable") from None


MODULE = VCard
