"""Message Archive Management (XEP-0313) for accounts, with stanza ids (XEP-0359).

Every chat or normal message with a body (or a XEP-0334 <store/> hint) is
kept once in the archive of each local party, so that all of a user's
clients can fetch the conversation, whichever was online at the time.
Never archived: errors, groupchat and headlines, messages with
<no-store/> or <no-permanent-store/> (XEP-0334), carbons and archive results.

Where each copy is taken, each once per message on a cluster:

* the sender's: the "stanza/out" filter (last, after privacy and blocking),
  on the node of the sending client, whatever becomes of the message; a
  message to oneself is left to the recipient's side;
* the recipient's: "message/bare" and "message/full" (before the delivery
  rules) strip the <stanza-id/>s that claim to be ours and are not
  (XEP-0359 section 5) and stamp a new one, by the recipient's bare JID,
  on the copy it will get; the message is archived under that id when it
  was delivered ("message/delivered", on the node that routes it, whichever
  node the session is on) or stored offline ("message/stored", which the
  offline module sends: a message it bounces, or that no offline module
  takes, is not archived, its sender being told it did not arrive). A
  message routed again (its session went: another resource, offline
  storage, a cluster node that could not deliver) keeps its stanza-id,
  which carries a MAC (modules/_mam_store.py), and is written again under
  the same name: still once.

Writes are queued and written in batches per host (modules/_mam_writer.py),
each counted as the archive owner's work, which an account removal waits
for; one that fails is tried again a few times (a short failure of the store
loses nothing), then logged, the message having been delivered. The
sender's copy is never stamped on what it sends. A local client with
WRITES_PER_SENDER writes in flight (its own archive's and, for what it sent
to local accounts, theirs) has its next message wait in the "stanza/out"
filter until one is done: a client sending faster than storage takes its
archive is slowed, not queued in memory.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable
from functools import partial
from typing import Literal

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from xmppd.events import HIGHEST
from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import IqRequest, Module, ModuleHost, Routed, storage_call
from xmppd.modules import _mam_query as protocol
from xmppd.modules._mam_store import (
    KEY_STORE,
    STORE,
    Archive,
    Bounds,
    Entry,
    Ids,
    item,
    load_key,
)
from xmppd.modules._mam_writer import Writer
from xmppd.session import ClientSession
from xmppd.storage.base import TooLarge
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns
from xmppd.xml.fragments import parse as parse_fragment

MAM = protocol.MAM
SID = "urn:xmpp:sid:0"
HINTS = "urn:xmpp:hints"
CARBONS = "urn:xmpp:carbons:2"

STANZA_ID = f"{{{SID}}}stanza-id"
BODY = f"{{{ns.CLIENT}}}body"
STORE_HINT = f"{{{HINTS}}}store"
# A message carrying one of these is never archived.
EXCLUDING = frozenset(
    {
        f"{{{HINTS}}}no-store",
        f"{{{HINTS}}}no-permanent-store",
        f"{{{CARBONS}}}sent",
        f"{{{CARBONS}}}received",
        f"{{{MAM}}}result",
    }
)
WRITES_PER_SENDER = 32
"""Archive writes one local sender's messages may have in flight before its next
message waits for one (as the router's WORK_PER_SENDER bounds other work)."""


class MamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_page: StrictInt = Field(default=100, ge=1, le=1000)
    """The most results one query returns, whatever its <max/> asks."""
    default_policy: Literal["always", "never"] = "always"
    """XEP-0441's default: archive every account's messages, or none."""


class Mam(Module):
    name = "mam"
    Options = MamOptions
    options: MamOptions

    def setup(self) -> None:
        self._ids: dict[str, Ids] = {}  # virtual host -> its id key
        self._writers: dict[str, Writer] = {}  # virtual host -> its archive's writes
        # local sender's bare JID -> the archive writes its messages started
        self._writes: dict[str, set[asyncio.Future[None]]] = {}
        for feature in (MAM, f"{MAM}#extended", SID):
            self.host.add_feature(feature, "account")
        self.host.iq(MAM, "set", self.query, to="account")
        self.host.iq(MAM, "get", self.get, to="account")
        # Lowest: a message privacy or blocking drops is not archived as sent.
        self.host.filter("stanza/out", self.on_out, priority=-200, kinds=("message",))
        # Before the delivery rules, after carbons took <private/> away.
        self.host.on("message/bare", self.on_incoming, priority=HIGHEST - 1)
        self.host.on("message/full", self.on_incoming, priority=HIGHEST - 1)
        self.host.on("message/delivered", self.on_delivered)
        # Once offline storage kept it (privacy refused none of it, no bounce).
        self.host.on("message/stored", self.on_stored)

    async def start(self) -> None:
        for vhost in self.host.hosts:
            self._ids[vhost] = Ids(await load_key(self.host.items(vhost, KEY_STORE)))
            self._writers[vhost] = Writer(
                self.host.items(vhost, STORE),
                self.host.spawn_shared,
                partial(self.host.user_exists, vhost),
            )

    # --- what is archived ----------------------------------------------------------------

    def _archivable(self, stanza: etree._Element) -> bool:
        if self.options.default_policy == "never":
            return False
        if stanza.get("type", "normal") not in ("chat", "normal"):
            return False
        wanted = False
        for child in stanza:
            if child.tag in EXCLUDING:
                return False
            if child.tag in (BODY, STORE_HINT):
                wanted = True
        return wanted

    def on_out(
        self, stanza: etree._Element, origin: ClientSession
    ) -> bool | Awaitable[None]:
        """A local client sends a message: the sender's archive keeps it (once the
        sender's earlier writes leave room). Every <stanza-id/> 'by' one of our
        hosts or accounts is removed (XEP-0359 section 5): a client stamps none
        for us. One by its own archive (a received message it passes on) is its
        own business; one by another account's, kept, would be taken for ours
        where that account's messages arrive and archived under it, in place of
        the message the id names."""
        for child in stanza.findall(STANZA_ID):
            if self._ours(child.get("by")):
                stanza.remove(child)
        to = stanza.get("to")
        if not self._archivable(stanza):
            return True
        if len(self._writes.get(origin.bare, ())) >= WRITES_PER_SENDER:
            return self._room(origin.bare)
        if to is None:
            return True
        try:
            peer = JID(to)
        except InvalidJID:
            return True  # the router answers jid-malformed
        owner = origin.bare
        if peer.bare == owner:
            return True  # to oneself: archived once, as received
        ids = self._ids.get(owner.partition("@")[2])
        if ids is not None:
            archive_id = ids.make(owner, owner)
            data = etree.tostring(stanza)
            # The JIDs as a 'with' filter has them: the peer's, normalized (RFC 7622).
            self._track(self._write(owner, archive_id, peer.bare, str(peer), data), owner, owner)
        return True

    def _track(self, future: asyncio.Future[None] | None, owner: str, sender: str | None) -> None:
        """Count a queued write as the owner's work (its removal waits for it) and
        against the local `sender` whose message it archives."""
        if future is None:
            return
        self.host.spawn(future, owner)
        if sender is not None:
            writes = self._writes.setdefault(sender, set())
            writes.add(future)
            future.add_done_callback(lambda done: self._written(sender, done))

    def _written(self, sender: str, future: asyncio.Future[None]) -> None:
        writes = self._writes.get(sender)
        if writes is not None:
            writes.discard(future)
            if not writes:
                del self._writes[sender]

    async def _room(self, sender: str) -> None:
        """Return once fewer than WRITES_PER_SENDER of `sender`'s writes are in flight."""
        while len(writes := self._writes.get(sender, set())) >= WRITES_PER_SENDER:
            await asyncio.wait(set(writes), return_when=asyncio.FIRST_COMPLETED)

    def on_incoming(self, routed: Routed) -> bool:
        """A message to a local account, before delivery: strip forged stanza-ids, and
        stamp the recipient's archive id on one the archive will keep."""
        stanza, owner = routed.stanza, routed.to.bare
        ids = self._ids.get(routed.to.domain)
        if ids is None:
            return False
        kept = self._strip(stanza, owner, ids)
        if kept is None and self._archivable(stanza):
            element = etree.SubElement(stanza, STANZA_ID, nsmap={None: SID})
            element.set("id", ids.make(owner, _sender(stanza)))
            element.set("by", owner)
        return False

    def _strip(self, stanza: etree._Element, owner: str, ids: Ids) -> str | None:
        """Remove every <stanza-id/> 'by' one of our hosts or accounts that this server
        did not make for `owner` (XEP-0359 section 5); the id of the one it made."""
        kept: str | None = None
        sender = _sender(stanza)
        for child in stanza.findall(STANZA_ID):
            by, value = child.get("by") or "", child.get("id") or ""
            if by == owner and kept is None and ids.ours(owner, sender, value):
                kept = value
            elif self._ours(by):
                stanza.remove(child)
        return kept

    def _ours(self, by: str | None) -> bool:
        """True if `by` names one of our hosts or an account on one."""
        try:
            return self.host.serves(JID(by or "").domain)
        except InvalidJID:
            return False

    def _our_id(self, stanza: etree._Element, owner: str) -> str | None:
        ids = self._ids.get(owner.rsplit("@", 1)[-1])
        sender = _sender(stanza)
        for child in stanza.iterchildren(STANZA_ID):
            value = child.get("id") or ""
            if ids is not None and child.get("by") == owner and ids.ours(owner, sender, value):
                return value
        return None

    def on_delivered(self, routed: Routed) -> None:
        owner = routed.to.bare
        archive_id = self._our_id(routed.stanza, owner)
        if archive_id is not None:
            peer, data = self._received(routed.stanza, owner)
            sender = routed.origin.bare if routed.origin is not None else None
            self._track(self._write(owner, archive_id, *peer, data), owner, sender)

    def on_stored(self, stanza: etree._Element, bare: str) -> None:
        """Offline storage kept a message for `bare`: so does its archive. Not before:
        a message offline storage bounces (a full queue, no offline module) is one
        its sender is told did not arrive, and its recipient must not read it."""
        archive_id = self._our_id(stanza, bare)
        if archive_id is not None:
            peer, data = self._received(stanza, bare)
            self._track(self._write(bare, archive_id, *peer, data), bare, None)

    def _received(self, stanza: etree._Element, owner: str) -> tuple[tuple[str, str], bytes]:
        """(the sender's bare and full JID, normalized as a 'with' filter has them, and
        the message as archived: without the stanza-id, which the result carries)."""
        sender = stanza.get("from") or ""
        try:
            jid = JID(sender)
            bare, sender = jid.bare, str(jid)
        except InvalidJID:
            bare = sender
        archived = copy.deepcopy(stanza)
        for child in archived.findall(STANZA_ID):
            if child.get("by") == owner:
                archived.remove(child)
        return (bare, sender), etree.tostring(archived)

    def _write(
        self, owner: str, archive_id: str, with_bare: str, peer: str, data: bytes
    ) -> asyncio.Future[None] | None:
        """Queue the archive item; None when the message cannot be archived (logged)."""
        user, _, vhost = owner.partition("@")
        writer = self._writers.get(vhost)
        if writer is None:
            return None
        try:
            name, attrs = item(user, archive_id, with_bare, peer, data)
        except TooLarge as exc:
            self.log.warning("message %s not archived for %s: %s", archive_id, owner, exc)
            return None
        return writer.add(name, attrs)

    # --- queries ---------------------------------------------------------------------------

    async def get(self, request: IqRequest) -> etree._Element:
        """The query form (XEP-0313 section 5), or the archive's first and last ids."""
        _owner(request)
        tag = request.payload.tag
        if tag == protocol.QUERY:
            return protocol.query_form()
        if tag == f"{{{MAM}}}metadata":
            user, vhost = _owner(request)
            archive = Archive(self.host.items(vhost, STORE))
            first = await storage_call(archive.edge(user, False), "archive")
            last = await storage_call(archive.edge(user, True), "archive")
            return protocol.metadata(_pair(first), _pair(last))
        raise StanzaError("feature-not-implemented", "archiving preferences are not supported")

    async def query(self, request: IqRequest) -> etree._Element:
        """Send the results, then (returning) the <fin/> in the IQ result."""
        user, vhost = _owner(request)
        if request.payload.tag != protocol.QUERY:
            raise StanzaError("feature-not-implemented", "archiving preferences are not supported")
        asked = protocol.parse(request.payload)
        archive = Archive(self.host.items(vhost, STORE))
        limit = self.options.max_page
        if asked.max is not None:
            limit = min(asked.max, limit)
        if asked.ids:
            if len(asked.ids) > self.options.max_page:
                raise StanzaError("bad-request", f"at most {self.options.max_page} ids a query")
            found = await storage_call(archive.get_many(user, asked.ids), "archive")
            missing = [i for i in asked.ids if i not in found]
            if missing:
                raise StanzaError("item-not-found", f"no message {missing[0]!r} in the archive")
            entries = sorted(found.values(), key=lambda e: e.id)[:limit]
            complete = len(found) <= limit
        else:
            for named in (*asked.after_ids, *asked.before_ids):
                if not await storage_call(archive.exists(user, named), "archive"):
                    raise StanzaError("item-not-found", f"no message {named!r} in the archive")
            bounds = Bounds(
                with_bare=asked.with_bare,
                with_full=asked.with_full,
                after=max(asked.after_ids, default=None),
                before=min(asked.before_ids, default=None),
                start=asked.start,
                end=asked.end,
            )
            entries, more = await storage_call(
                archive.page(user, bounds, limit, asked.last_page), "archive"
            )
            complete = not more
        session = self.host.session(request.sender.bare, request.sender.resource)
        if session is None:
            raise StanzaError("not-allowed", "results go to a client of this server")
        owner = request.target
        shown = entries[::-1] if asked.flip else entries
        for entry in shown:
            message = _parse(entry)
            if message is None:
                self.log.error("archived message %s of %s is unreadable", entry.id, owner)
                continue
            self.host.ledger.from_service += 1  # a message the server makes (ledger)
            self.host.deliver(
                session,
                protocol.result_message(
                    request.sender.full, owner, asked.queryid, entry.id, entry.ts, message
                ),
            )
        first = shown[0].id if shown else None
        last = shown[-1].id if shown else None
        return protocol.fin(asked.queryid, first, last, complete)

    # --- account removal ---------------------------------------------------------------------

    async def remove_user(self, vhost: str, username: str) -> bool:
        return await self.purge_user(self.host, vhost, username)

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """Delete the whole archive (prefix "<user>/"), a page of items at a time."""
        return await Archive(host.items(vhost, STORE)).remove(username) > 0

    async def archived(self, vhost: str, username: str) -> int:
        """How many messages the account's archive holds (an export counts them)."""
        return await Archive(self.host.items(vhost, STORE)).count(username)


def _owner(request: IqRequest) -> tuple[str, str]:
    """(user, vhost) of the archive asked about; only its owner may read it."""
    if not request.from_owner or "@" not in request.target:
        raise StanzaError("forbidden", "an archive is read by its owner only")
    user, _, vhost = request.target.partition("@")
    return user, vhost


def _sender(stanza: etree._Element) -> str:
    """The bare JID of the message's sender, as its archive id's MAC has it."""
    try:
        return JID(stanza.get("from") or "").bare
    except InvalidJID:
        return ""


def _pair(entry: Entry | None) -> tuple[str, int] | None:
    return None if entry is None else (entry.id, entry.ts)


def _parse(entry: Entry) -> etree._Element | None:
    try:
        return parse_fragment(entry.stanza)
    except etree.XMLSyntaxError:
        return None


MODULE = Mam
