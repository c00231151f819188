"""Writing imported users into xmppd's stores, and reading them out for an export.

The modules enabled in the configuration are loaded in this process (as
`xmppctl unregister` does with no node running) and asked through their own
request handlers, as their owner would ask: a vCard is set with the vCard
module's set, a privacy list with the privacy module's, so every limit and
check the server applies to clients applies to imported data too. The
account itself is written with `Accounts.import_keys` (keys, no password).

Each store's outcome is counted: copied, skipped (the account existed, or
the module that keeps that data is not enabled) and failed (with the
reason), so the summary says exactly what was written.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from lxml import etree

from xmppd.admin import offline_modules
from xmppd.auth.accounts import AccountExists, InvalidPassword, InvalidUsername
from xmppd.config import Config
from xmppd.jid import JID
from xmppd.modulehost import IqRequest, Module, ModuleHost
from xmppd.modules.blocking import Blocking
from xmppd.modules.mam import Mam
from xmppd.modules.offline import PAGE, STORE, Offline, stamped
from xmppd.modules.privacy import Privacy
from xmppd.modules.private import Private
from xmppd.modules.roster import RosterItem, RosterModule, item_element
from xmppd.modules.vcard import VCard
from xmppd.sasl.scram import SCRAM_HASHES
from xmppd.storage.base import Query, StorageError
from xmppd.storage.factory import Storage
from xmppd.stream.errors import StanzaError
from xmppd.xep227.credentials import scram_element
from xmppd.xep227.reader import (
    BAN,
    BLOCKING,
    CLIENT,
    PIE,
    PRIVACY,
    PRIVATE,
    ROSTER,
    RosterEntry,
    UserData,
)
from xmppd.xml import ns

STORES = ("accounts", "roster", "vcard", "private", "privacy", "blocking", "offline", "archive")
"""What the summary counts. "archive" (XEP-0313) is never exported: XEP-0227 has no
place for it; an export counts each account's archived messages as skipped."""
DELAY = "urn:xmpp:delay"

M = TypeVar("M", bound=Module)
Progress = Callable[[int], None]
"""Called with 1 after each account."""


@dataclass(slots=True)
class Counts:
    copied: int = 0
    skipped: int = 0
    failed: int = 0


@dataclass(slots=True)
class Summary:
    """Per store: entries copied, skipped and failed; the failures and reasons for skips."""

    counts: dict[str, Counts] = field(default_factory=lambda: {s: Counts() for s in STORES})
    failures: list[str] = field(default_factory=list)
    skips: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"{store}: {c.copied} copied, {c.skipped} skipped, {c.failed} failed"
            for store, c in self.counts.items()
        ]

    @property
    def failed(self) -> int:
        return sum(c.failed for c in self.counts.values())


def _request(bare: str, payload: etree._Element, type_: str) -> IqRequest:
    """An IQ as the account's owner sends it about itself."""
    iq = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
    iq.set("type", type_)
    iq.set("id", "xep227")
    iq.set("from", bare)
    iq.set("to", bare)
    iq.append(payload)
    return IqRequest(iq, payload, JID(bare), bare, bare.rsplit("@", 1)[-1])


def _element(namespace: str, local: str) -> etree._Element:
    return etree.Element(f"{{{namespace}}}{local}", nsmap={None: namespace})


# --------------------------------------------------------------------------- import


class _Importer:
    def __init__(self, modules: ModuleHost, summary: Summary) -> None:
        self.modules = modules
        self.summary = summary

    def _count(self, store: str, outcome: str, n: int = 1) -> None:
        counts = self.summary.counts[store]
        setattr(counts, outcome, getattr(counts, outcome) + n)

    def _fail(self, store: str, user: UserData, reason: str, n: int = 1) -> None:
        self._count(store, "failed", n)
        self.summary.failures.append(f"{user.jid}: {store}: {reason}")

    def _sizes(self, user: UserData) -> dict[str, int]:
        return {
            "roster": len({e.jid for e in user.roster} | set(user.pending)),
            "vcard": int(user.vcard is not None),
            "private": len(user.private),
            "privacy": len(user.privacy_lists),
            "blocking": len(user.blocklist),
            "offline": len(user.offline),
        }

    async def user(self, user: UserData) -> None:
        accounts = self.modules.accounts[user.host]
        try:
            if user.keys:
                await accounts.import_keys(user.name, user.keys, user.ban)
            else:
                assert user.password is not None
                await accounts.register(user.name, user.password)
                if user.ban is not None:
                    await accounts.ban(user.name, user.ban.reason, user.ban.since)
        except AccountExists:
            self._count("accounts", "skipped")
            for store, n in self._sizes(user).items():
                self._count(store, "skipped", n)
            self.summary.skips.append(f"{user.jid} exists already: left as it is")
            return
        except (InvalidUsername, InvalidPassword, ValueError, StorageError) as e:
            self._fail("accounts", user, str(e))
            for store, n in self._sizes(user).items():
                if n:
                    self._fail(store, user, "not written: the account was not created", n)
            return
        self._count("accounts", "copied")
        sizes = self._sizes(user)
        for store, write in (
            ("roster", self._roster),
            ("vcard", self._vcard),
            ("private", self._private),
            ("privacy", self._privacy),
            ("blocking", self._blocking),
            ("offline", self._offline),
        ):
            # A default privacy list alone is written too: it fails, and says so.
            if sizes[store] or (store == "privacy" and user.privacy_default is not None):
                await write(user)

    def _module(self, cls: type[M], store: str, user: UserData) -> M | None:
        module = self.modules.find_module(cls)
        if module is None:
            n = self._sizes(user)[store]
            self._count(store, "skipped", n)
            self.summary.skips.append(f"{user.jid}: {store}: module not enabled ({n} skipped)")
        return module

    async def _ask(self, store: str, user: UserData, call: Awaitable[object], n: int = 1) -> None:
        """Run one module request; count its `n` entries as copied or failed (with why)."""
        try:
            await call
        except StanzaError as e:
            self._fail(store, user, f"{e.condition}: {e.text or ''}".rstrip(": "), n)
        except StorageError as e:
            self._fail(store, user, f"storage: {e}", n)
        else:
            self._count(store, "copied", n)

    async def _roster(self, user: UserData) -> None:
        roster = self._module(RosterModule, "roster", user)
        if roster is None:
            return
        items = {entry.jid: _roster_item(entry) for entry in user.roster}
        for contact in user.pending:
            item = items.get(contact) or RosterItem(jid=contact, in_roster=False)
            item.pending_in = True
            items[contact] = item
        for contact, item in items.items():
            if contact == user.jid:
                self._count("roster", "skipped")
                self.summary.skips.append(f"{user.jid}: roster: itself as a contact")
                continue
            try:  # what a client's roster set is checked for (writing goes around it)
                roster.check_name(item.name)
                roster.check_groups(item.groups)
            except StanzaError as e:
                self._fail("roster", user, f"{contact}: {e.condition}: {e.text}")
                continue
            await self._ask("roster", user, roster.update(user.jid, contact, _replace_with(item)))

    async def _vcard(self, user: UserData) -> None:
        vcard = self._module(VCard, "vcard", user)
        if vcard is not None and user.vcard is not None:
            payload = copy.deepcopy(user.vcard)
            await self._ask("vcard", user, vcard.set(_request(user.jid, payload, "set")))

    async def _private(self, user: UserData) -> None:
        private = self._module(Private, "private", user)
        if private is None:
            return
        for element in user.private:  # one by one: a refused namespace fails alone
            query = _element(PRIVATE, "query")
            query.append(copy.deepcopy(element))
            await self._ask("private", user, private.set(_request(user.jid, query, "set")))

    async def _privacy(self, user: UserData) -> None:
        privacy = self._module(Privacy, "privacy", user)
        if privacy is None:
            return
        for element in user.privacy_lists:
            query = _element(PRIVACY, "query")
            query.append(copy.deepcopy(element))
            await self._ask("privacy", user, privacy.set(_request(user.jid, query, "set")))
        if user.privacy_default is not None:
            query = _element(PRIVACY, "query")
            etree.SubElement(query, f"{{{PRIVACY}}}default").set("name", user.privacy_default)
            try:
                await privacy.set(_request(user.jid, query, "set"))
            except (StanzaError, StorageError) as e:
                self._fail("privacy", user, f"the default list was not set: {e}")

    async def _blocking(self, user: UserData) -> None:
        blocking = self._module(Blocking, "blocking", user)
        if blocking is None:
            return
        block = _element(BLOCKING, "block")
        for jid in user.blocklist:
            etree.SubElement(block, f"{{{BLOCKING}}}item").set("jid", jid)
        await self._ask(
            "blocking",
            user,
            blocking.set(_request(user.jid, block, "set")),
            len(user.blocklist),
        )

    async def _offline(self, user: UserData) -> None:
        offline = self._module(Offline, "offline", user)
        if offline is None:
            return
        for message in user.offline:
            if message.find(f"{{{DELAY}}}delay") is not None:  # keeps when it was first stored
                data = etree.tostring(message)
            else:
                data = stamped(message, user.host)
            try:
                await offline.store(user.host, user.name, data)
            except Exception as e:  # QuotaExceeded, StorageError, ConditionFailed
                self._fail("offline", user, str(e) or type(e).__name__)
            else:
                self._count("offline", "copied")


def _replace_with(item: RosterItem) -> Callable[[RosterItem | None], RosterItem]:
    """A roster change that writes `item` whatever was there (it may run more than once)."""
    return lambda _current: item.copy()


def _roster_item(entry: RosterEntry) -> RosterItem:
    return RosterItem(
        jid=entry.jid,
        name=entry.name,
        subscription=entry.subscription,  # type: ignore[arg-type]
        ask=entry.ask,
        approved=entry.approved,
        groups=list(entry.groups),
    )


async def import_users(
    cfg: Config, storage: Storage, users: list[UserData], progress: Progress
) -> Summary:
    """Write every user (see the module doc); the summary of what was written."""
    summary = Summary()
    async with offline_modules(cfg, storage) as modules:
        importer = _Importer(modules, summary)
        for user in users:
            await importer.user(user)
            progress(1)
    return summary


# --------------------------------------------------------------------------- export


async def export_user(
    modules: ModuleHost, host: str, name: str, summary: Summary
) -> etree._Element:
    """The <user/> element of one account, with everything the enabled modules keep."""
    bare = f"{name}@{host}"
    user = etree.Element(f"{{{PIE}}}user", nsmap={None: PIE})
    user.set("name", name)
    credentials = await modules.accounts[host].credentials(name) or {}
    for hash_name in SCRAM_HASHES.values():
        if hash_name in credentials:
            user.append(scram_element(credentials[hash_name]))
    ban = await modules.accounts[host].ban_of(name)
    if ban is not None:  # xmppd's own element: an import must not lift the ban
        banned = etree.SubElement(user, f"{{{BAN}}}banned", nsmap={None: BAN})
        banned.set("since", str(ban.since))
        banned.text = ban.reason
    summary.counts["accounts"].copied += 1
    roster = modules.find_module(RosterModule)
    if roster is not None:
        items = (await roster.get(bare)).items.values()
        query = _element(ROSTER, "query")
        for item in items:
            if item.pending_in:
                presence = etree.SubElement(user, f"{{{CLIENT}}}presence", nsmap={None: CLIENT})
                presence.set("from", item.jid)
                presence.set("to", bare)
                presence.set("type", "subscribe")
            if item.in_roster:
                query.append(item_element(item))
        summary.counts["roster"].copied += len(query)
        if len(query):
            user.append(query)
    vcard = modules.find_module(VCard)
    if vcard is not None:
        card = await vcard.get(_request(bare, _element("vcard-temp", "vCard"), "get"))
        if len(card):
            user.append(card)
            summary.counts["vcard"].copied += 1
    private = modules.find_module(Private)
    if private is not None:
        query = await _private_query(modules, host, name)
        if len(query):
            user.append(query)
            summary.counts["private"].copied += len(query)
    privacy = modules.find_module(Privacy)
    if privacy is not None:
        data = await privacy.engine.data(bare)
        if data.lists:
            query = _element(PRIVACY, "query")
            if data.default is not None:
                etree.SubElement(query, f"{{{PRIVACY}}}default").set("name", data.default)
            for list_name in data.lists:
                ask = _element(PRIVACY, "query")
                etree.SubElement(ask, f"{{{PRIVACY}}}list").set("name", list_name)
                answer = await privacy.get(_request(bare, ask, "get"))
                query.extend(answer.iterchildren(f"{{{PRIVACY}}}list"))
            user.append(query)
            summary.counts["privacy"].copied += len(data.lists)
    blocking = modules.find_module(Blocking)
    if blocking is not None:
        blocklist = await blocking.get(_request(bare, _element(BLOCKING, "blocklist"), "get"))
        if len(blocklist):
            user.append(blocklist)
            summary.counts["blocking"].copied += len(blocklist)
    if modules.find_module(Offline) is not None:
        messages = await _offline_messages(modules, host, name, summary)
        if len(messages):
            user.append(messages)
    mam = modules.find_module(Mam)
    if mam is not None:
        summary.counts["archive"].skipped += await mam.archived(host, name)
    return user


async def _private_query(modules: ModuleHost, host: str, name: str) -> etree._Element:
    """Every namespace the account stored, in one <query xmlns='jabber:iq:private'/>."""
    blobs = modules.blobs(host, "private")
    query = _element(PRIVATE, "query")
    token: str | None = None
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    while True:
        page = await blobs.list(f"{name}/", page_token=token)
        for key in page.keys:
            blob = await blobs.get(key)
            if blob is not None:
                stored = etree.fromstring(blob.data, parser)
                query.extend(c for c in stored if isinstance(c.tag, str))
        if (token := page.next_token) is None:
            return query


async def _offline_messages(
    modules: ModuleHost, host: str, name: str, summary: Summary
) -> etree._Element:
    """The queue in order, read without delivering (nothing is removed)."""
    items, blobs = modules.items(host, STORE), modules.blobs(host, STORE)
    element = _element(PIE, "offline-messages")
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    token: str | None = None
    while True:
        page = await items.query(Query(prefix=f"{name}/", limit=PAGE, page_token=token))
        for item in page.items:
            blob = await blobs.get(str(item.attrs.get("blob", "")))
            if blob is None:
                summary.counts["offline"].failed += 1
                summary.failures.append(f"{name}@{host}: offline: {item.name} has no blob")
                continue
            element.append(etree.fromstring(blob.data, parser))
            summary.counts["offline"].copied += 1
        if (token := page.next_token) is None:
            return element
