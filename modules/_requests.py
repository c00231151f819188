"""Subscription requests kept for a user until answered (RFC 6121 3.1.3), stanza and all.

The roster item's `pending_in` flag says that a request waits; this store
keeps the request itself, so that what it carried (a XEP-0172 <nick/>, a
XEP-0379 <preauth/> token, a <status/>) reaches the user intact at every
initial presence until the request is answered.

Layout: item store "subscription-requests" of the user's virtual host, one
item "<user>/<digest of the requester's bare JID>" per request (a bare JID
can be longer than an item name may be) with the requester's JID ("jid")
and the stanza as received ("stanza", serialized XML). Size: a request over
MAX_REQUEST_BYTES is not kept (the user then gets a plain subscribe, as
before), and there is at most one per roster entry with `pending_in`, which
the roster module bounds (`max_items`, `max_pending`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from lxml import etree

from xmppd.modulehost import ModuleHost
from xmppd.storage.base import ItemStore
from xmppd.xml.fragments import parse as parse_fragment

STORE = "subscription-requests"
MAX_REQUEST_BYTES = 4096



def _name(owner_bare: str, contact_bare: str) -> str:
    user = owner_bare.rsplit("@", 1)[0]
    return f"{user}/{hashlib.sha256(contact_bare.encode()).hexdigest()[:32]}"


class SubscriptionRequests:
    """The kept requests of every user of one module host."""

    def __init__(self, host: ModuleHost) -> None:
        self.host = host

    def _store(self, owner_bare: str) -> ItemStore:
        return self.host.items(owner_bare.rsplit("@", 1)[-1], STORE)

    async def keep(self, owner_bare: str, contact_bare: str, stanza: etree._Element) -> bool:
        """Store `stanza` as the request of `contact_bare`; False if it is too large to keep."""
        data = etree.tostring(stanza)
        if len(data) > MAX_REQUEST_BYTES:
            return False
        await self._store(owner_bare).put(
            _name(owner_bare, contact_bare), {"jid": contact_bare, "stanza": data}
        )
        return True

    async def load(self, owner_bare: str, contacts: Iterable[str]) -> dict[str, etree._Element]:
        """The kept requests of `contacts` (by bare JID); unknown or unreadable ones are absent."""
        names = {_name(owner_bare, contact): contact for contact in contacts}
        if not names:
            return {}
        found = await self._store(owner_bare).batch_get(list(names))
        requests: dict[str, etree._Element] = {}
        for name, item in found.items():
            data = item.attrs.get("stanza")
            if item.attrs.get("jid") != names[name] or not isinstance(data, bytes):
                continue
            try:
                requests[names[name]] = parse_fragment(data)
            except etree.XMLSyntaxError:
                continue
        return requests

    async def forget(self, owner_bare: str, contact_bare: str) -> None:
        await self._store(owner_bare).delete(_name(owner_bare, contact_bare))

    async def forget_all(self, vhost: str, username: str) -> bool:
        """Every request kept for an account (it was removed); True if there were any."""
        return await self.host.items(vhost, STORE).delete_prefix(f"{username}/") > 0
