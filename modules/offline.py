"""Offline messages (XEP-0160): keep chat/normal messages for a user who is away.

Layout, per virtual host:

* blob store "offline": one blob per message, the stanza as sent plus a
  XEP-0203 <delay/> stamped by this server, under a random key
  "<user>/<token>";
* item store "offline": a counter item "<user>" (next sequence number, count,
  bytes: the quota; recent: the random tokens of the last RECENT blobs
  appended) and one index item "<user>/<seq:020d>" per message naming its
  blob.

A message is accepted by writing its blob first and then committing the
counter and the index item in one transaction conditional on the counter's
version. Sequence numbers are therefore handed out in commit order, with no
gaps a reader could see out of order, by any number of nodes at once; on
this node a per-recipient lock keeps concurrent writers from even retrying.
A retry first looks for the message's blob among the counter's recent ones,
then in the index: the lost try may have been its own transaction, sent again
by the backend after a timeout, whose first copy landed; appended again, the
message would be delivered twice, or, delivered and removed meanwhile by
another node, leave an index item whose blob is gone.
Delivery reads the index in name order, hands each message to the session,
and only then deletes index items and counter in one transaction (the blobs
after): a node that dies in between delivers again, never loses. A delivery
at login that a store failure stops is tried again at once after a short
backoff while the new stanzas for the user wait behind it (`first_wait`),
so that a blip does not let them overtake the stored messages; then every
`retry_every` seconds while the session stays: a user who logged in during an
outage gets the stored messages once the store is back, not at some later
login. What a session was
already handed (its removal failed) is not handed to it again, only removed,
even after it went unavailable and came back on the same stream: that is
forgotten only when the session is unbound.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Literal

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field

from xmppd.modulehost import Module, ModuleHost
from xmppd.session import ClientSession
from xmppd.storage.base import (
    UNCHANGED,
    BlobStore,
    ConditionFailed,
    Item,
    ItemStore,
    Query,
    StorageError,
    TooLarge,
    Unchanged,
    WithWrites,
    Write,
)
from xmppd.xml import ns

DELAY = "urn:xmpp:delay"
HINTS = "urn:xmpp:hints"
CHATSTATES = "http://jabber.org/protocol/chatstates"
FEATURE = "msgoffline"
STORE = "offline"

PAGE = 50  # messages per delivery round: one transaction deletes a page (DynamoDB allows 100)
# Seconds between the tries of a login's delivery that a store failure stopped, while
# new stanzas for the account wait behind it (first_wait); the last one repeats.
BACKOFF = (0.25, 0.5, 1.0, 2.0)
# Appended blobs the counter names (their random tokens, "recent"): a retried append
# finds its own landed first copy there even once it was delivered and removed.
RECENT = 16

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, remove_blank_text=False)


class OfflineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_messages: int = Field(default=100, ge=1)
    max_bytes: int = Field(default=1024 * 1024, ge=1024)
    first_wait: float = Field(default=10.0, gt=0)
    """Seconds new stanzas for a user who just came online wait behind the delivery of
    the stored messages (stored first, XEP-0160); a store slower than that lets them go
    on, and the stored messages follow (logged)."""
    retry_every: float = Field(default=10.0, gt=0)
    """Seconds between tries to deliver the stored messages whose delivery at login a
    store failure stopped, while the session stays (once first_wait is over: until
    then the delivery is tried again after BACKOFF, the new stanzas waiting)."""


class QuotaExceeded(Exception):
    """The recipient's queue is full (or one message is larger than the whole quota)."""


Decision = Literal["store", "refuse", "discard"]


def decide(stanza: etree._Element) -> Decision:
    """Whether a message for an offline user is stored (XEP-0160, XEP-0334, XEP-0085).

    A bare chat-state notification (typing, gone, ...) is discarded without
    error: XEP-0085 asks servers not to store them and an error for each
    would only bother the sender. <no-store/> refuses anything else, so the
    sender learns it was not delivered (RFC 6121: service-unavailable);
    <store/> keeps even a bare notification, or a headline.
    """
    hints: set[str] = set()
    content = False
    for child in stanza:
        if not isinstance(child.tag, str):
            continue
        qname = etree.QName(child)
        if qname.namespace == HINTS:
            hints.add(qname.localname)
        elif qname.namespace != CHATSTATES:
            content = True
    if "no-store" in hints:
        return "refuse" if content else "discard"
    if stanza.get("type") == "headline":
        # Only with <store/>; today the router drops headlines before this hook.
        return "store" if "store" in hints else "discard"
    if content or "store" in hints:
        return "store"
    return "discard"


def stamped(stanza: etree._Element, domain: str) -> bytes:
    """The stanza as it will be delivered: with the <delay/> saying when we took it."""
    copied = copy.deepcopy(stanza)
    delay = etree.SubElement(copied, f"{{{DELAY}}}delay", nsmap={None: DELAY})
    delay.set("from", domain)
    # Whole seconds: slixmpp, among others, fails on fractional ones.
    delay.set("stamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
    delay.text = "Offline Storage"
    return etree.tostring(copied)


def _int(item: Item | None, attr: str) -> int:
    value = item.attrs.get(attr, 0) if item is not None else 0
    return value if isinstance(value, int) else 0


def _token(key: str) -> str:
    """A blob key's random part, unique to one message ("<user>/<token>")."""
    return key.rpartition("/")[2]


def _recent(counter: Item | None) -> list[str]:
    """The tokens of the last RECENT blobs appended to a queue, oldest first."""
    value = counter.attrs.get("recent", "") if counter is not None else ""
    return value.split() if isinstance(value, str) else []


class KeyedLocks:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        lock, users = entry if entry is not None else (asyncio.Lock(), 0)
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class Offline(Module):
    name = "offline"
    Options = OfflineOptions
    options: OfflineOptions
    fixed_options = ("retry_every",)  # the period of a timer started once

    def setup(self) -> None:
        self.locks = KeyedLocks()
        # Sessions whose last broadcast priority was negative: raising it to
        # >= 0 makes them eligible, like an initial presence (XEP-0160 step 5).
        self._negative: set[ClientSession] = set()
        # Sessions whose delivery a store failure stopped: tried again by the timer.
        self._retry: set[ClientSession] = set()
        # Index items a session was handed whose removal has not succeeded yet: a
        # delivery tried again removes them without handing them over twice. Kept
        # while the session is bound, available or not (on_closed forgets them).
        self._handed: dict[ClientSession, set[str]] = {}
        self.host.every(self.options.retry_every, self._retry_failed)
        self.host.add_feature(FEATURE)
        self.host.hook("message/offline", self.on_offline)
        self.host.on("presence/broadcast", self.on_broadcast)
        self.host.hook("session/closed", self.on_closed)

    # --- storing -----------------------------------------------------------------------

    async def on_offline(self, stanza: etree._Element, bare: str) -> bool:
        decision = decide(stanza)
        ledger = self.host.ledger
        if decision == "discard":
            ledger.drop("not-stored")
            return True
        if decision == "refuse":
            return False  # the router answers service-unavailable
        user, _, vhost = bare.partition("@")
        data = stamped(stanza, vhost)
        # The recipient's work while it is stored, whoever sent it: the account's
        # removal waits for it on every node of a cluster (this node's lock is this
        # node's alone), so the message never lands once the queue is deleted.
        storing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.host.spawn(storing, bare)
        try:
            async with self.locks.hold(bare):
                if not await self.host.user_exists(vhost, user):
                    # Removed since the router took it for existing (a session of it
                    # still bound): stored now, the queue would outlive the account.
                    self.host.bounce(stanza, "service-unavailable")
                    return True
                await self.store(vhost, user, data)
        except QuotaExceeded as exc:
            # XEP-0160 step 3: a full queue is <service-unavailable/>, the same
            # answer as "no offline storage", so it says nothing about presence.
            self.host.bounce(stanza, "service-unavailable", str(exc))
            return True
        except (StorageError, ConditionFailed) as exc:
            self.log.error("storing an offline message for %s failed: %s", bare, exc)
            self.host.bounce(
                stanza, "internal-server-error", "the message could not be stored"
            )
            return True
        finally:
            storing.set_result(None)
        ledger.offline += 1
        # Kept for the account: the archive may keep it too (not one bounced above).
        self.host.notify("message/stored", stanza, bare)
        # The user may have come online while we wrote: then deliver now.
        target = self._best_session(bare)
        if target is not None:
            self.host.spawn(self.deliver_stored(target))
        return True

    async def store(self, vhost: str, user: str, data: bytes) -> None:
        """Append one message to `user`'s queue; QuotaExceeded, StorageError or ConditionFailed."""
        items = self.host.items(vhost, STORE)
        blobs = self.host.blobs(vhost, STORE)
        self._check_quota(await items.get(user), len(data))  # a full queue costs no upload
        key = f"{user}/{secrets.token_hex(16)}"
        try:
            # Unconditional: the key is new (128 random bits). Conditional on its absence,
            # a put the backend sent again after a timeout reported its own first copy,
            # which had landed, as a rival: the message was bounced though stored.
            await blobs.put(key, data)
        except TooLarge as exc:
            raise QuotaExceeded("the message is too large to store") from exc
        tries = 0

        async def append(counter: Item | None) -> WithWrites | Unchanged:
            nonlocal tries
            tries += 1
            if tries > 1 and (
                _token(key) in _recent(counter) or await self._indexed(items, user, key)
            ):
                # A lost try was no rival's: our own transaction, sent again by the
                # backend after a timeout, lost to its first copy, which landed (and
                # may have been delivered and removed since: no longer in the index).
                return UNCHANGED
            return self._append(items, user, counter, key, len(data))

        try:
            await items.modify(user, append, what="offline queue")
        except BaseException:
            await self._drop_blob(blobs, key)
            raise

    async def _indexed(self, items: ItemStore, user: str, key: str) -> bool:
        """Whether `user`'s queue holds the message of blob `key` already (at most
        `max_messages` index items: read only after a lost try whose blob the counter's
        recent ones do not name: a rival's write, or more than RECENT appends since)."""
        token: str | None = None
        while True:
            page = await items.query(Query(prefix=f"{user}/", limit=PAGE, page_token=token))
            if any(item.attrs.get("blob") == key for item in page.items):
                return True
            if (token := page.next_token) is None:
                return False

    def _check_quota(self, counter: Item | None, size: int) -> None:
        if _int(counter, "count") + 1 > self.options.max_messages:
            raise QuotaExceeded("the recipient's offline message queue is full")
        if _int(counter, "bytes") + size > self.options.max_bytes:
            raise QuotaExceeded("the recipient's offline message storage is full")

    def _append(
        self, items: ItemStore, user: str, counter: Item | None, key: str, size: int
    ) -> WithWrites:
        """The counter with one more message, written with that message's index item."""
        self._check_quota(counter, size)
        seq = _int(counter, "next")
        attrs = {
            "next": seq + 1,
            "count": _int(counter, "count") + 1,
            "bytes": _int(counter, "bytes") + size,
            "recent": " ".join([*_recent(counter), _token(key)][-RECENT:]),
        }
        index = items.put_op(f"{user}/{seq:020d}", {"blob": key, "size": size}, if_absent=True)
        return WithWrites(attrs, [index])

    async def _drop_blob(self, blobs: BlobStore, key: str) -> None:
        try:
            await blobs.delete(key)
        except Exception as exc:
            self.log.warning("could not remove unused offline blob %s: %s", key, exc)

    async def count(self, vhost: str, user: str) -> int:
        """How many messages wait for user@vhost (its counter: one read)."""
        return _int(await self.host.items(vhost, STORE).get(user), "count")

    # --- account removal -----------------------------------------------------------------

    async def remove_user(self, vhost: str, username: str) -> bool:
        """Delete the queue: index items, counter, then every blob under "<user>/" (those of
        an interrupted store too). This node's writers for the user are held off meanwhile;
        one that starts later finds the account gone and bounces its message."""
        async with self.locks.hold(f"{username}@{vhost}"):
            return await self.purge_user(self.host, vhost, username)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        items = host.items(vhost, STORE)
        found = await items.delete_prefix(f"{username}/")
        found += await items.delete(username)
        found += await host.blobs(vhost, STORE).delete_prefix(f"{username}/")
        return found > 0

    # --- delivering --------------------------------------------------------------------

    def on_broadcast(self, stanza: etree._Element, session: ClientSession, initial: bool) -> None:
        """Sync, in the router's call: the delivery of the stored messages is queued
        ahead of whatever comes for the account next, so that none overtakes them
        (XEP-0160; RFC 6121 8.5.2). The async hook ran after other hooks and tasks,
        and a message routed meanwhile reached the client before the stored ones."""
        if stanza.get("type") == "unavailable":
            self._negative.discard(session)
            return
        priority = _priority(stanza)
        was_negative = session in self._negative
        if priority < 0:
            self._negative.add(session)
            return
        self._negative.discard(session)
        if initial or was_negative:
            self.host.run_ahead(
                session.bare,
                functools.partial(self.deliver_stored, session, self.options.first_wait),
                self.options.first_wait,
            )

    async def on_closed(self, session: ClientSession) -> bool:
        self._negative.discard(session)
        self._retry.discard(session)
        self._handed.pop(session, None)
        return False

    def _retry_failed(self) -> None:
        """The timer: try again the deliveries a store failure stopped."""
        retry, self._retry = self._retry, set()
        for session in retry:
            if not self.host.is_bound(session):
                self._handed.pop(session, None)  # its messages wait for its next login
            elif self._bound(session) and session not in self._negative:
                self.host.spawn(self.deliver_stored(session), session.bare)
            # Else away (unavailable) or of negative priority: its next available
            # presence of priority >= 0 delivers, and `_handed` is kept for it, as the
            # same session must not be handed again what it got before it went away.

    async def deliver_stored(self, session: ClientSession, within: float = 0.0) -> None:
        """Hand `session` every stored message, oldest first, then forget them.

        After a store failure the delivery is tried again after BACKOFF while that
        ends within `within` seconds of the call: at login (first_wait) the new
        stanzas for the account wait behind it, and a short failure must not let them
        overtake the stored messages. Then the timer tries again every retry_every
        seconds while the session stays."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pauses = iter(BACKOFF)
        while (exc := await self._deliver_once(session)) is not None:
            pause = next(pauses, BACKOFF[-1])
            if not self._bound(session) or loop.time() + pause > deadline:
                break
            self.log.warning(
                "delivering offline messages to %s failed (tried again in %g s): %s",
                session.jid, pause, exc,
            )
            await asyncio.sleep(pause)
        else:
            return
        # What was not removed stays stored: for this session a little later, or for
        # the next login.
        if self._bound(session):
            self._retry.add(session)
            then = f"tried again in {self.options.retry_every:g} s"
        elif self.host.is_bound(session):
            then = "tried again at its next available presence"  # `_handed` kept
        else:
            self._handed.pop(session, None)
            then = "they wait for the next login"
        self.log.error(
            "delivering offline messages to %s failed (%s): %s", session.jid, then, exc
        )

    async def _deliver_once(
        self, session: ClientSession
    ) -> StorageError | ConditionFailed | None:
        """One try of deliver_stored: the store failure that stopped it, or None."""
        user, _, vhost = session.bare.partition("@")
        async with self.locks.hold(session.bare):
            handed = self._handed.setdefault(session, set())
            try:
                # The counter is one (cacheable) read; most logins find nothing stored.
                if _int(await self.host.items(vhost, STORE).get(user), "count") > 0:
                    while await self._deliver_page(session, handed):
                        pass
            except (StorageError, ConditionFailed) as exc:
                return exc
            if handed and self.host.is_bound(session) and not self._bound(session):
                return None  # it went away mid-delivery: what it got may be stored still
            self._handed.pop(session, None)
            return None

    async def _deliver_page(self, session: ClientSession, handed: set[str]) -> bool:
        """Deliver and remove up to PAGE messages; False when done or the session left.
        Index items named in `handed` went to the session already: they are only
        removed. Those handed over here join `handed` until their removal succeeds."""
        user, _, vhost = session.bare.partition("@")
        items = self.host.items(vhost, STORE)
        blobs = self.host.blobs(vhost, STORE)
        page = await items.query(Query(prefix=f"{user}/", limit=PAGE))
        if not page.items:
            return False
        keys = [str(item.attrs.get("blob", "")) for item in page.items]
        wanted = [key for item, key in zip(page.items, keys, strict=True)
                  if key and item.name not in handed]
        found = await asyncio.gather(*(blobs.get(key) for key in wanted))
        data = {blob.key: blob.data for blob in found if blob is not None}
        if not self._bound(session):
            return False  # nothing of this page was handed over: all of it stays
        for item, key in zip(page.items, keys, strict=True):
            if item.name in handed:
                continue
            handed.add(item.name)
            stanza = self._parse(data.get(key), item.name)
            if stanza is not None:
                self.host.ledger.replayed += 1
                self.host.deliver(session, stanza)
        await self._remove(items, user, page.items)
        handed.difference_update(item.name for item in page.items)
        for key in keys:
            if key:
                await self._drop_blob(blobs, key)
        return True

    def _parse(self, data: bytes | None, name: str) -> etree._Element | None:
        if data is None:
            self.log.error("offline message %s has no blob: dropped from the index", name)
            return None
        try:
            return etree.fromstring(data, _PARSER)
        except etree.XMLSyntaxError as exc:
            self.log.error("offline message %s is unreadable, dropped: %s", name, exc)
            return None

    async def _remove(self, items: ItemStore, user: str, delivered: list[Item]) -> None:
        """Delete delivered index items and shrink the counter in one transaction."""
        names = [item.name for item in delivered]

        async def shrink(counter: Item | None) -> WithWrites | Unchanged:
            present = await items.batch_get(names)  # another node may have delivered some
            if not present:
                return UNCHANGED
            deletes: list[Write] = [
                items.delete_op(item.name, if_version=item.version) for item in present.values()
            ]
            if counter is None:
                return WithWrites(None, deletes)
            size = sum(_int(item, "size") for item in present.values())
            attrs = {
                **counter.attrs,  # "next" and "recent" as they are
                "count": max(0, _int(counter, "count") - len(present)),
                "bytes": max(0, _int(counter, "bytes") - size),
            }
            return WithWrites(attrs, deletes)

        await items.modify(user, shrink, what="offline queue")

    def _bound(self, session: ClientSession) -> bool:
        """Still connected here and available: delivering to it reaches the client."""
        return session.available and self.host.is_bound(session)

    def _best_session(self, bare: str) -> ClientSession | None:
        eligible = [s for s in self.host.available_sessions(bare) if s.priority >= 0]
        return max(eligible, key=lambda s: s.priority) if eligible else None


def _priority(presence: etree._Element) -> int:
    try:
        return int(presence.findtext(f"{{{ns.CLIENT}}}priority") or 0)
    except ValueError:
        return 0


MODULE = Offline
