"""Last Activity (XEP-0012): server uptime, and when an account was last online.

The time and status text of a user's last unavailable presence are kept in
item store "last" (item "<user>": time in Unix seconds, status text). A
session that ends while available makes the router broadcast a server-made
unavailable presence, so one filter ("presence/self") records clean
logouts and dropped connections alike. It runs synchronously as the router
applies the presence, and keeps the logout in memory until its write is
stored: a query that arrives right after the unavailable presence (the
user's last session gone, the write still in flight) answers from there
instead of item-not-found or an older logout. A write that storage fails is
tried again after RETRY_WAITS (answered from memory meanwhile), so a short
failure loses no logout. Queries to a full JID are the client's business
(idle time): the router delivers them to it.
"""

from __future__ import annotations

import asyncio
import time

from lxml import etree

from xmppd.jid import JID
from xmppd.modulehost import IqRequest, Module, ModuleHost
from xmppd.modules.roster import RosterModule
from xmppd.session import ClientSession
from xmppd.storage.base import UNCHANGED, Contended, Item, StorageError, Unchanged
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

LAST = "jabber:iq:last"
STORE = "last"
RETRY_WAITS = (0.5, 1.0, 2.0)
"""Seconds before each new try of a logout's write that storage failed: a short failure
(a lock held a moment, throttling past the backend's own retries) loses no record; a
longer one is logged, and the record keeps an older logout, or none."""


class Last(Module):
    name = "last"
    toggleable = True  # a reload may enable or disable it
    started: float  # time.monotonic() at start: uptime counts from there

    def setup(self) -> None:
        self.host.add_feature(LAST)
        self.host.add_feature(LAST, "account")
        self.host.iq(LAST, "get", self.query, to="both")
        self.host.filter("presence/self", self.on_presence)
        # Logouts on this node whose record is still being written: bare -> (time, status).
        self._writing: dict[str, tuple[int, str]] = {}

    async def start(self) -> None:
        self.started = time.monotonic()

    def _result(self, seconds: int, status: str = "") -> etree._Element:
        query = etree.Element(f"{{{LAST}}}query", nsmap={None: LAST})
        query.set("seconds", str(max(0, seconds)))
        if status:
            query.text = status
        return query

    async def query(self, request: IqRequest) -> etree._Element:
        if "@" not in request.target:
            return self._result(int(time.monotonic() - self.started))  # uptime
        target = JID(request.target)
        if not await self.host.user_exists(target.domain, target.user):
            raise StanzaError("service-unavailable")  # RFC 6121 8.5.1: no such account
        if not await self._may_see(request):
            raise StanzaError("forbidden", "you have no subscription to this user's presence")
        if self.host.available_sessions(target.bare):
            return self._result(0)  # XEP-0012 section 4: online users are active now
        writing = self._writing.get(target.bare)
        if writing is not None:
            return self._result(int(time.time()) - writing[0], writing[1])
        item = await self.host.items(target.domain, STORE).get(target.user)
        if item is None:
            raise StanzaError("item-not-found", "no last activity recorded for this user")
        stamp, status = item.attrs.get("time"), item.attrs.get("status", "")
        seconds = int(time.time()) - stamp if isinstance(stamp, int) else 0
        return self._result(seconds, status if isinstance(status, str) else "")

    async def _may_see(self, request: IqRequest) -> bool:
        """The owner, or a contact the owner shares presence with (subscription from/both)."""
        if request.from_owner:
            return True
        roster = self.host.find_module(RosterModule)
        if roster is None:
            return False
        item = await roster.item(request.target, request.sender.bare)
        return item is not None and item.subscription in ("from", "both")

    def on_presence(self, stanza: etree._Element, session: ClientSession) -> bool:
        if stanza.get("type") == "unavailable":
            status = stanza.findtext(f"{{{ns.CLIENT}}}status") or ""
            writer_running = session.bare in self._writing
            self._writing[session.bare] = (int(time.time()), status)
            if not writer_running:
                self.host.spawn(self._store(session.bare))
        return True  # never stop the broadcast: presence still goes to contacts

    async def _store(self, bare: str) -> None:
        """Write `bare`'s logouts one at a time until the latest is stored.

        One writer per user, so the logout applied last is the one kept even
        when two come within a second (the server's own unavailable at a
        stream's end, then the client's, released late by a filter)."""
        try:
            while True:
                logout = self._writing[bare]
                await self._record_retrying(bare, logout)
                if self._writing.get(bare) is logout:
                    del self._writing[bare]
                    return
        except BaseException:
            self._writing.pop(bare, None)
            raise

    async def _record_retrying(self, bare: str, logout: tuple[int, str]) -> None:
        """`record` the logout, trying again after each of RETRY_WAITS while it is still
        the latest (a newer one is written instead); logged if it is never stored."""
        for wait in (*RETRY_WAITS, None):
            try:
                await self.record(bare, *logout)
                return
            except StorageError as exc:
                if wait is None:
                    self.log.error("last activity of %s not stored: %s", bare, exc)
                    return
                self.log.warning("last activity of %s not stored yet (tried again in %g s): %s",
                                 bare, wait, exc)
            await asyncio.sleep(wait)
            if self._writing.get(bare) is not logout:
                return

    async def remove_user(self, vhost: str, username: str) -> bool:
        return await self.purge_user(self.host, vhost, username)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        return await host.items(vhost, STORE).delete(username)

    async def record(self, bare: str, when: int, status: str) -> None:
        """Keep the latest logout; an older one (another node, a slow task) never wins.

        Nothing is kept for an account that no longer exists: the sessions of a
        removed account end after its data was deleted, and must not leave a
        record that a new account of the same name would inherit."""
        user, _, vhost = bare.partition("@")
        if not await self.host.user_exists(vhost, user):
            return
        attrs: dict[str, str | int] = {"time": when, "status": status}

        def newer(current: Item | None) -> dict[str, str | int] | Unchanged:
            stored = current.attrs.get("time") if current is not None else None
            return UNCHANGED if isinstance(stored, int) and stored > when else attrs

        try:
            await self.host.items(vhost, STORE).modify(user, newer, what="last activity")
        except Contended:
            self.log.error(
                "could not record last activity of %s: too many concurrent writers", bare
            )


MODULE = Last
