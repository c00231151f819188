"""Private XML storage (XEP-0049): any XML a client wants back later, readable by its owner only.

One blob per (user, namespace) in the blob store "private", keyed
"<user>/<namespace, percent-encoded>" so an account's data is one prefix.
The blob holds the whole <query xmlns='jabber:iq:private'/> the server
returns for that namespace, so a get is a read with no rebuilding.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from xmppd.modulehost import IqRequest, Module, ModuleHost, storage_call
from xmppd.storage.base import MAX_KEY_BYTES, BlobStore
from xmppd.stream.errors import StanzaError
from xmppd.xml.fragments import parse as parse_fragment

PRIVATE = "jabber:iq:private"
STORE = "private"
_QUERY = f"{{{PRIVATE}}}query"
RESERVED_PREFIXES = ("jabber:", "http://jabber.org/")
"""XEP-0049 section 2.3: these namespaces (and 'vcard-temp') are reserved; refusing them with
not-acceptable keeps clients from shadowing server data such as rosters in private storage."""
RESERVED = frozenset({"vcard-temp"})

log = logging.getLogger(__name__)

Listener = Callable[[str, str, etree._Element], Awaitable[None]]
"""(bare JID, namespace, the stored <query/>) after a client's set was stored (the
XEP-0402/XEP-0411 bookmarks conversion listens)."""



class PrivateOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_bytes: StrictInt = Field(default=64 * 1024, ge=1024, le=16 * 1024 * 1024)
    """The largest stored XML per namespace (serialized)."""


class Private(Module):
    name = "private"
    toggleable = True  # a reload may enable or disable it
    Options = PrivateOptions

    def reconfigure(self, options: BaseModel) -> None:
        super().reconfigure(options)
        self.max_bytes = self.options.max_bytes  # type: ignore[attr-defined]

    def setup(self) -> None:
        self.reconfigure(self.options)
        self.host.add_feature(PRIVATE)
        self.host.iq(PRIVATE, "get", self.get, to="account")
        self.host.iq(PRIVATE, "set", self.set, to="account")
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        """Call `listener` after each namespace a client stored (not after `store`, so
        that a conversion never triggers the reverse one)."""
        self._listeners.append(listener)

    async def get(self, request: IqRequest) -> etree._Element:
        user = _owner(request)
        children = _elements(request.payload)
        if not children:
            raise StanzaError("bad-request", "name the namespace to retrieve with a child element")
        if len(children) > 1:
            raise StanzaError("bad-request", "retrieve one namespace per request")
        namespace = _namespace(children[0])
        blob = await storage_call(
            self._store(request.host).get(_key(user, namespace)), "private XML"
        )
        if blob is not None:
            try:
                return parse_fragment(blob.data)
            except etree.XMLSyntaxError as exc:
                log.error("stored private XML %s is corrupt: %s", blob.key, exc)
                raise StanzaError("internal-server-error", "stored data unreadable") from None
        query = etree.Element(_QUERY, nsmap={None: PRIVATE})
        query.append(etree.Element(children[0].tag, nsmap={None: namespace}))
        return query

    async def set(self, request: IqRequest) -> None:
        user = _owner(request)
        children = _elements(request.payload)
        if not children:
            raise StanzaError("not-acceptable", "nothing to store: add an element")
        by_namespace: dict[str, list[etree._Element]] = {}
        for child in children:
            by_namespace.setdefault(_namespace(child), []).append(child)
        # Check everything before writing anything: a refused set changes nothing.
        blobs: dict[str, bytes] = {}
        for namespace, elements in by_namespace.items():
            query = etree.Element(_QUERY, nsmap={None: PRIVATE})
            for element in elements:
                query.append(copy.deepcopy(element))
            data = etree.tostring(query)
            if len(data) > self.max_bytes:
                raise StanzaError(
                    "not-acceptable", f"data for {namespace} is over {self.max_bytes} bytes"
                )
            blobs[_key(user, namespace)] = data
        store = self._store(request.host)
        for key, data in blobs.items():
            await storage_call(store.put(key, data), "private XML")
        for namespace in by_namespace:
            query = parse_fragment(blobs[_key(user, namespace)])
            for listener in self._listeners:
                await listener(request.target, namespace, query)

    async def load(self, bare: str, namespace: str) -> etree._Element | None:
        """The stored <query/> of `namespace`, None when there is none."""
        user, vhost = bare.split("@", 1)
        blob = await self._store(vhost).get(_key(user, namespace))
        return None if blob is None else parse_fragment(blob.data)

    async def store(self, bare: str, element: etree._Element) -> None:
        """Store `element` as its namespace's data, with a client's checks
        (StanzaError); listeners are not called."""
        user, vhost = bare.split("@", 1)
        query = etree.Element(_QUERY, nsmap={None: PRIVATE})
        query.append(copy.deepcopy(element))
        data = etree.tostring(query)
        if len(data) > self.max_bytes:
            raise StanzaError("not-acceptable", f"the data is over {self.max_bytes} bytes")
        await self._store(vhost).put(_key(user, _namespace(element)), data)

    def _store(self, vhost: str) -> BlobStore:
        return self.host.blobs(vhost, STORE)

    async def remove_user(self, vhost: str, username: str) -> bool:
        return await self.purge_user(self.host, vhost, username)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """Delete every namespace the account stored (all under the prefix "<user>/")."""
        return await host.blobs(vhost, STORE).delete_prefix(f"{username}/") > 0


def _owner(request: IqRequest) -> str:
    if not request.from_owner:
        raise StanzaError("forbidden", "private XML belongs to its owner only")
    return request.target.split("@", 1)[0]


def _elements(query: etree._Element) -> list[etree._Element]:
    if query.tag != _QUERY:
        raise StanzaError("bad-request", "the payload must be <query xmlns='jabber:iq:private'/>")
    return [child for child in query if isinstance(child.tag, str)]


def _namespace(element: etree._Element) -> str:
    namespace = etree.QName(element).namespace
    if not namespace:
        raise StanzaError("not-acceptable", "stored elements need their own namespace")
    if namespace in RESERVED or namespace.startswith(RESERVED_PREFIXES):
        raise StanzaError("not-acceptable", f"{namespace} is a reserved namespace")
    return namespace


def _key(user: str, namespace: str) -> str:
    key = f"{user}/{quote(namespace, safe='')}"
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise StanzaError("not-acceptable", "the namespace is too long")
    return key


MODULE = Private
