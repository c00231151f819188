"""An operator's view and changes of one account's data: roster, vCard, offline count.

xmppctl roster, roster-set, roster-remove, vcard, vcard-set and offline-count
run these on a running node (its admin API, xmppd.adminroutes), else on a
ModuleHost of xmppctl's own over the same stores (xmppd.admin.offline_modules).
Either way they go through the modules' own API, so an operator's change gets
the checks a client's gets (limits, valid JIDs, vCard size) and has the same
effects: a roster change is pushed to the account's interested resources
(RosterModule.update), a vCard change keeps the avatar hash of its online
sessions right, a removed contact gets its subscriptions cancelled both ways
as RFC 6121 2.5.2 asks for a client's removal.
"""

from __future__ import annotations

from typing import Any, TypeVar, cast, get_args

from lxml import etree

from xmppd.modulehost import Module, ModuleHost
from xmppd.modules.offline import Offline
from xmppd.modules.roster import RosterItem, RosterModule, Subscription
from xmppd.modules.vcard import VCard
from xmppd.stream.errors import StanzaError
from xmppd.xml.fragments import parse as parse_fragment
from xmppd.xml.text import xml_can_carry

M = TypeVar("M", bound=Module)

SUBSCRIPTIONS: tuple[str, ...] = get_args(Subscription)



class UserDataError(Exception):
    """The request is refused, or the data cannot be had: the message says why."""


async def roster_list(modules: ModuleHost, bare: str) -> list[dict[str, Any]]:
    """The items the account's clients see (not the requests of people not in it)."""
    roster = _module(modules, RosterModule)
    await _account(modules, bare)
    items = (await roster.get(bare)).items.values()
    return [item_view(item) for item in sorted(items, key=lambda i: i.jid) if item.in_roster]


async def roster_set(
    modules: ModuleHost,
    bare: str,
    contact: str,
    name: str | None = None,
    groups: list[str] | None = None,
    subscription: str | None = None,
) -> dict[str, Any]:
    """Add or change a contact; what is None stays as it was (a new item: no name, no
    group, subscription "none"). An empty name removes the name.

    The subscription is set as given on this roster only, with no presence
    sent: the contact's roster is its own (run roster-set for it too); a
    state that includes "to" ends a pending request out, one that includes
    "from" one in."""
    roster = _module(modules, RosterModule)
    await _account(modules, bare)
    if subscription is not None and subscription not in SUBSCRIPTIONS:
        raise UserDataError(f"subscription must be one of {', '.join(SUBSCRIPTIONS)}")
    for text, what in ((name, "the name"), *((g, f"the group {g!r}") for g in groups or ())):
        if text is not None:
            _xml_text(text, what)
    try:
        jid = roster.check_contact(contact, bare)
        roster.check_name(name or None)
        checked = roster.check_groups(groups) if groups is not None else None
    except StanzaError as e:
        raise _refused(e) from None

    def change(current: RosterItem | None) -> RosterItem:
        item = current or RosterItem(jid=jid)
        item.in_roster = True
        if name is not None:
            item.name = name or None
        if checked is not None:
            item.groups = list(checked)
        if subscription is not None:
            item.subscription = cast(Subscription, subscription)
            if subscription in ("to", "both"):
                item.ask = False
            if subscription in ("from", "both"):
                item.pending_in = item.approved = False
        return item

    try:
        item = await roster.update(bare, jid, change)
    except StanzaError as e:
        raise _refused(e) from None
    assert item is not None
    return item_view(item)


async def roster_remove(modules: ModuleHost, bare: str, contact: str) -> None:
    roster = _module(modules, RosterModule)
    await _account(modules, bare)
    try:
        await roster.remove(bare, roster.check_contact(contact, bare))
    except StanzaError as e:
        raise _refused(e) from None


async def vcard_get(modules: ModuleHost, bare: str) -> str | None:
    """The stored vCard as XML text, None when the account has none."""
    vcard = _module(modules, VCard)
    user, host = await _account(modules, bare)
    try:
        element = await vcard.load(host, user)
    except StanzaError as e:
        raise _refused(e) from None
    return None if element is None else etree.tostring(element, encoding="unicode")


async def vcard_set(modules: ModuleHost, bare: str, xml: str) -> None:
    """Replace the vCard with `xml`, a <vCard xmlns='vcard-temp'/> element."""
    vcard = _module(modules, VCard)
    await _account(modules, bare)
    try:
        element = parse_fragment(xml.encode())
    except (etree.XMLSyntaxError, UnicodeEncodeError) as e:  # a lone surrogate: no text
        raise UserDataError(f"not well-formed XML: {e}") from None
    docinfo = element.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        # Its entities are not expanded: the stored copy would refer to entities it
        # no longer declares, and every later read of the vCard would fail.
        raise UserDataError("a vCard has no DOCTYPE (entity declarations are refused)")
    try:
        await vcard.store(bare, element)
    except StanzaError as e:
        raise _refused(e) from None


async def offline_count(modules: ModuleHost, bare: str) -> int:
    offline = _module(modules, Offline)
    user, host = await _account(modules, bare)
    return await offline.count(host, user)


def item_view(item: RosterItem) -> dict[str, Any]:
    """A roster item as the admin API and xmppctl show it."""
    return {
        "jid": item.jid,
        "name": item.name,
        "subscription": item.subscription,
        "ask": item.ask,
        "pending_in": item.pending_in,
        "approved": item.approved,
        "groups": item.groups,
    }


def _module(modules: ModuleHost, cls: type[M]) -> M:
    found = modules.find_module(cls)
    if found is None:
        raise UserDataError(f"the {cls.name} module is not enabled")
    return found


async def _account(modules: ModuleHost, bare: str) -> tuple[str, str]:
    """(user, host) of an existing account of a served host, else UserDataError."""
    user, _, host = bare.rpartition("@")
    accounts = modules.accounts.get(host)
    if not user or accounts is None or not await accounts.exists(user):
        raise UserDataError(f"{bare} does not exist")
    return user, host


def _xml_text(text: str, what: str) -> None:
    """Refuse what XML cannot carry (control characters, lone surrogates from a command
    line's undecodable bytes): a client's roster set cannot hold them, and stored they
    would make every later roster answer to the account fail."""
    if not xml_can_carry(text):
        raise UserDataError(f"{what} has characters XML cannot carry")


def _refused(error: StanzaError) -> UserDataError:
    return UserDataError(str(error))
