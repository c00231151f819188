"""XEP-0060's wire protocol over the engine: request parsing, replies, errors and the
notification messages, for PEP and for the pubsub service alike.

The hosting module gives a request's <pubsub/> element, the requester and the
service; `PubSubProtocol.handle` returns the reply payload and hands each
`Event` and each "send the last item to this JID" to the module's callbacks,
which know who the subscribers are (PEP adds the owner's contacts).
"""

from __future__ import annotations

import bisect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lxml import etree

from xmppd.jid import parse_jid
from xmppd.stream.errors import StanzaError

from ._pubsub_cleanup import prune_index
from ._pubsub_engine import AFFILIATIONS, ITEMS_PAGE, Event, Node, PubSubService
from ._pubsub_forms import (
    DATA,
    PUBSUB,
    PUBSUB_EVENT,
    PUBSUB_OWNER,
    config_form,
    parse_subscription_form,
    publish_options,
    pubsub_error,
    subscription_form,
)

_PS = f"{{{PUBSUB}}}"
_OWNER = f"{{{PUBSUB_OWNER}}}"
_EV = f"{{{PUBSUB_EVENT}}}"
_X = f"{{{DATA}}}x"
RSM = "http://jabber.org/protocol/rsm"
OWNER_PAGE = 100
"""Subscriptions or affiliations in an owner's list asked for without <set/>: the
first page, with a <set/> whose count says how many there are (XEP-0059 2.1)."""
MAX_PAGE = 1000  # the most of them one page holds, whatever <max/> asks

Notify = Callable[[PubSubService, Event], Awaitable[None]]
SendLast = Callable[[PubSubService, Node, str], Awaitable[None]]
AskOwners = Callable[[PubSubService, Node, str, str], Awaitable[None]]
"""(service, node, subscriber JID, subid): a subscription awaits the owners' approval."""
Deleted = Callable[[PubSubService, Node], None]
"""(service, node): a node was deleted and its deletion notified; its subscriptions
are to be cleared (`_pubsub_cleanup.clear_deleted`), off the owner's request."""


@dataclass(frozen=True, slots=True)
class Request:
    service: PubSubService
    requester: str  # full JID of the asker
    type: str  # get | set
    payload: etree._Element  # <pubsub/> in PUBSUB or PUBSUB_OWNER


class PubSubProtocol:
    """Answers XEP-0060 requests; `auto_create` is PEP's create-on-publish."""

    def __init__(
        self,
        notify: Notify,
        send_last: SendLast,
        deleted: Deleted,
        *,
        auto_create: bool,
        ask_owners: AskOwners | None = None,
    ) -> None:
        self.notify = notify
        self.send_last = send_last
        self.deleted = deleted
        self.auto_create = auto_create
        self.ask_owners = ask_owners

    async def handle(self, request: Request) -> etree._Element | None:
        children = [c for c in request.payload if isinstance(c.tag, str)]
        if not children:
            raise StanzaError("bad-request", "no pubsub action")
        action = children[0]
        owner = request.payload.tag == f"{_OWNER}pubsub"
        key = (owner, request.type, action.tag.split("}", 1)[-1])
        handler = _HANDLERS.get(key)
        if handler is None:
            raise pubsub_error("feature-not-implemented", "unsupported",
                               feature=_FEATURE_OF.get(key[2], key[2]))
        return await handler(self, request, action, children[1:])

    # --- entity use cases (XEP-0060 section 6, 7) -------------------------------------------

    async def _publish(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        name = _node(action)
        items = [c for c in action if isinstance(c.tag, str)]
        if len(items) > 1 or any(c.tag != f"{_PS}item" for c in items):
            raise pubsub_error("bad-request", "invalid-payload", "publish one <item/>")
        options = _option(rest, "publish-options")
        wanted = publish_options(_form(options), request.service.limits.max_items)
        service = request.service
        item = items[0] if items else None
        if item is not None:
            item = etree.fromstring(etree.tostring(item))  # detached, own namespaces
        event = await service.publish(
            request.requester, name, item, wanted, auto_create=self.auto_create
        )
        await self.notify(service, event)
        reply = _pubsub(PUBSUB)
        publish = etree.SubElement(reply, f"{_PS}publish", node=name)
        etree.SubElement(publish, f"{_PS}item", id=event.item_id or "")
        return reply

    async def _retract(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        name = _node(action)
        items = action.findall(f"{_PS}item")
        if len(items) != 1 or not items[0].get("id"):
            raise pubsub_error("bad-request", "item-required", "retract one item by id")
        event = await request.service.retract(request.requester, name, items[0].get("id") or "")
        if action.get("notify") in ("1", "true") or event.node.config.get("pubsub#notify_retract"):
            await self.notify(request.service, event)

    async def _subscribe(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        name = _node(action)
        if not action.get("jid"):
            raise pubsub_error("bad-request", "invalid-jid", "subscribe needs a jid")
        jid = _address(action.get("jid") or "")
        node, subid, state = await request.service.subscribe(request.requester, name, jid)
        if state == "pending":  # XEP-0060 6.1.6 (authorize): the owners are asked
            if self.ask_owners is not None:
                await self.ask_owners(request.service, node, jid, subid)
        elif node.config.get("pubsub#send_last_published_item", "never") != "never":
            await self.send_last(request.service, node, jid)
        reply = _pubsub(PUBSUB)
        subscription = etree.SubElement(reply, f"{_PS}subscription", node=name, jid=jid)
        subscription.set("subscription", state)
        subscription.set("subid", subid)
        return reply

    async def _options_get(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        """A subscription's options form (XEP-0060 6.3.2)."""
        name, jid = _node(action), _jid(action)
        values = await request.service.get_options(
            request.requester, name, jid, action.get("subid")
        )
        reply = _pubsub(PUBSUB)
        options = etree.SubElement(reply, f"{_PS}options", node=name, jid=jid)
        if action.get("subid"):
            options.set("subid", action.get("subid") or "")
        options.append(subscription_form(values))
        return reply

    async def _options_set(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        """Submit a subscription's options (XEP-0060 6.3.5)."""
        name, jid = _node(action), _jid(action)
        form = action.find(_X)
        if form is None:
            raise pubsub_error("bad-request", "invalid-options", "the options need a form")
        await request.service.set_options(
            request.requester, name, jid, action.get("subid"), parse_subscription_form(form)
        )

    async def _unsubscribe(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        if not action.get("jid"):
            raise pubsub_error("bad-request", "invalid-jid", "unsubscribe needs a jid")
        await request.service.unsubscribe(
            request.requester, _node(action), _address(action.get("jid") or ""),
            action.get("subid"),
        )

    async def _items(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        """Items by id, the newest `max_items` or all (XEP-0060 6.5), in pages: an
        answer holds what `PubSubService.items_page` allows, with a XEP-0059 <set/>
        when asked for one or when it holds fewer than were asked for (6.5.4)."""
        name = _node(action)
        ids = [i.get("id") or "" for i in action.findall(f"{_PS}item")]
        if any(not i for i in ids):
            raise pubsub_error("bad-request", "item-required", "an <item/> needs an id")
        max_items = None
        if (raw := action.get("max_items")) is not None:
            if not raw.isdigit():
                raise StanzaError("bad-request", "max_items is a number")
            max_items = int(raw)
        service = request.service
        node = await service.readable(request.requester, name)
        reply = _pubsub(PUBSUB)
        items = etree.SubElement(reply, f"{_PS}items", node=name)
        if ids:
            items.extend(await service.items_page(node, ids))
            return reply
        page = _option(rest, "set", RSM)
        listed = [entry[0] for entry in node.items]
        if max_items is not None:
            listed = listed[-max_items:] if max_items else []
        chosen, from_end = _chosen(listed, page, newest=max_items is not None)
        found = await service.items_page(node, chosen, from_end=from_end) if chosen else []
        items.extend(found)
        if page is not None or len(found) < len(listed):
            reply.append(_items_set([item.get("id") or "" for item in found], listed))
        return reply

    async def _create(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element | None:
        name = action.get("node")
        configure = _option(rest, "configure")
        node = await request.service.create(request.requester, name, _form(configure))
        if name is not None:
            return None
        reply = _pubsub(PUBSUB)  # an instant node: its name (XEP-0060 8.1.2)
        etree.SubElement(reply, f"{_PS}create", node=node.name)
        return reply

    async def _subscriptions(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        bare = request.requester.split("/", 1)[0]
        wanted = action.get("node")
        reply = _pubsub(PUBSUB)
        listing = etree.SubElement(reply, f"{_PS}subscriptions")
        if wanted is not None:
            listing.set("node", wanted)
        for prefix, name, jid in await prune_index(request.service, bare):
            if prefix != request.service.prefix or wanted not in (None, name):
                continue
            node = await request.service.node(name)
            found = None if node is None else await request.service.subscription(node, jid)
            if found is not None:
                sub = etree.SubElement(listing, f"{_PS}subscription", node=name, jid=jid)
                sub.set("subscription", found.state)
                sub.set("subid", found.subid)
        return reply

    async def _affiliations(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        """The requester's affiliations (XEP-0060 5.7), a XEP-0059 page at a time
        (`OWNER_PAGE` without <set/>), keyed by node name: a scan of the service's
        node records in key order that stops when the page is full
        (`PubSubService.affiliations_page`), so every node is reachable however many
        the service has, and a request holds a page, not the service."""
        bare = request.requester.split("/", 1)[0]
        wanted = action.get("node")
        reply = _pubsub(PUBSUB)
        listing = etree.SubElement(reply, f"{_PS}affiliations")
        if wanted is not None:
            node = await request.service.node(wanted)
            if node is not None and node.affiliation(bare) != "none":
                entry = etree.SubElement(listing, f"{_PS}affiliation", node=wanted)
                entry.set("affiliation", node.affiliation(bare))
            return reply
        limit, after, before = _page_of(rest)
        found = await request.service.affiliations_page(bare, after, before, limit)
        for name, affiliation in found:
            entry = etree.SubElement(listing, f"{_PS}affiliation", node=name)
            entry.set("affiliation", affiliation)
        if _option(rest, "set", RSM) is not None or len(found) == limit:
            reply.append(_result_set([name for name, _ in found], None))
        return reply

    # --- owner use cases (XEP-0060 section 8) ---------------------------------------------

    async def _configure_get(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        name = _node(action)
        node = await request.service.owner_node(request.requester, name)
        reply = _pubsub(PUBSUB_OWNER)
        configure = etree.SubElement(reply, f"{_OWNER}configure", node=name)
        configure.append(config_form(node.config))
        return reply

    async def _default_get(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        node = request.service.new_node("default", request.requester)
        reply = _pubsub(PUBSUB_OWNER)
        etree.SubElement(reply, f"{_OWNER}default").append(config_form(node.config))
        return reply

    async def _configure_set(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        name = _node(action)
        form = action.find(_X)
        if form is None:
            raise StanzaError("bad-request", "configure needs a form")
        if form.get("type") == "cancel":
            return
        event = await request.service.configure(request.requester, name, form)
        if event.node.config.get("pubsub#notify_config"):
            await self.notify(request.service, event)

    async def _delete(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        event = await request.service.delete(request.requester, _node(action))
        try:
            if event.node.config.get("pubsub#notify_delete", True):
                await self.notify(request.service, event)
        finally:
            self.deleted(request.service, event.node)

    async def _purge(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        event = await request.service.purge(request.requester, _node(action))
        if event.node.config.get("pubsub#notify_retract", True):
            await self.notify(request.service, event)

    async def _owner_affiliations_get(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        """The node's affiliations (XEP-0060 8.9.1), by JID, a page at a time (XEP-0059)."""
        name = _node(action)
        node = await request.service.owner_node(request.requester, name)
        limit, after, before = _page_of(rest)
        jids = sorted(node.affiliations)
        if before is not None:
            end = bisect.bisect_left(jids, before) if before else len(jids)
            start = max(0, end - limit)
        else:
            start = bisect.bisect_right(jids, after) if after else 0
            end = start + limit
        chosen = jids[start:end]
        reply = _pubsub(PUBSUB_OWNER)
        listing = etree.SubElement(reply, f"{_OWNER}affiliations", node=name)
        for jid in chosen:
            etree.SubElement(
                listing, f"{_OWNER}affiliation", jid=jid, affiliation=node.affiliations[jid]
            )
        reply.append(_result_set(chosen, len(jids), start))
        return reply

    async def _owner_affiliations_set(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        changes: dict[str, str] = {}
        for entry in action.findall(f"{_OWNER}affiliation"):
            jid, affiliation = entry.get("jid"), entry.get("affiliation")
            if not jid or "/" in jid or affiliation not in AFFILIATIONS:
                raise StanzaError("bad-request", "an affiliation needs a bare jid and a value")
            changes[_address(jid)] = affiliation
        await request.service.set_affiliations(request.requester, _node(action), changes)

    async def _owner_subscriptions_set(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> None:
        changes: dict[str, str] = {}
        for entry in action.findall(f"{_OWNER}subscription"):
            jid, state = entry.get("jid"), entry.get("subscription")
            if not jid or state not in ("subscribed", "none") or _address(jid) in changes:
                raise StanzaError("bad-request", "each subscription: a jid, subscribed or none")
            changes[_address(jid)] = state
        if len({_bare_of(jid) for jid in changes}) != len(changes):
            raise StanzaError("bad-request", "one change per account in a request")
        await request.service.set_subscriptions(request.requester, _node(action), changes)

    async def _owner_subscriptions_get(
        self, request: Request, action: etree._Element, rest: list[etree._Element]
    ) -> etree._Element:
        """The node's subscriptions (XEP-0060 8.8.1), a page at a time (XEP-0059):
        one query of `limit` however many the node has (10,000s)."""
        name = _node(action)
        service = request.service
        node = await service.owner_node(request.requester, name, migrated=True)
        limit, after, before = _page_of(rest)
        subs = await service.subscribers_page(node, after, before, limit) if limit else []
        reply = _pubsub(PUBSUB_OWNER)
        listing = etree.SubElement(reply, f"{_OWNER}subscriptions", node=name)
        for sub in subs:
            entry = etree.SubElement(listing, f"{_OWNER}subscription", jid=sub.jid, subid=sub.subid)
            entry.set("subscription", sub.state)
        reply.append(_result_set([s.jid for s in subs], await service.subscription_count(node)))
        return reply


Action = Callable[
    [PubSubProtocol, Request, etree._Element, list[etree._Element]],
    Awaitable[etree._Element | None],
]
_HANDLERS: dict[tuple[bool, str, str], Action] = {
    (False, "set", "publish"): PubSubProtocol._publish,
    (False, "set", "retract"): PubSubProtocol._retract,
    (False, "set", "subscribe"): PubSubProtocol._subscribe,
    (False, "set", "unsubscribe"): PubSubProtocol._unsubscribe,
    (False, "get", "options"): PubSubProtocol._options_get,
    (False, "set", "options"): PubSubProtocol._options_set,
    (False, "set", "create"): PubSubProtocol._create,
    (False, "get", "items"): PubSubProtocol._items,
    (False, "get", "subscriptions"): PubSubProtocol._subscriptions,
    (False, "get", "affiliations"): PubSubProtocol._affiliations,
    (True, "get", "configure"): PubSubProtocol._configure_get,
    (True, "get", "default"): PubSubProtocol._default_get,
    (True, "set", "configure"): PubSubProtocol._configure_set,
    (True, "set", "delete"): PubSubProtocol._delete,
    (True, "set", "purge"): PubSubProtocol._purge,
    (True, "get", "affiliations"): PubSubProtocol._owner_affiliations_get,
    (True, "set", "affiliations"): PubSubProtocol._owner_affiliations_set,
    (True, "get", "subscriptions"): PubSubProtocol._owner_subscriptions_get,
    (True, "set", "subscriptions"): PubSubProtocol._owner_subscriptions_set,
}
_FEATURE_OF = {
    "default": "retrieve-default-sub",  # the owner's <default/> is answered
    "subscriptions": "manage-subscriptions",
}

FEATURES = (
    "access-open", "access-presence", "access-roster", "access-whitelist",
    "auto-create", "auto-subscribe", "config-node", "create-and-configure", "create-nodes",
    "delete-items", "delete-nodes", "filtered-notifications",
    "instant-nodes", "item-ids", "last-published", "manage-affiliations",
    "modify-affiliations", "multi-items", "outcast-affiliation",
    "persistent-items", "presence-notifications", "publish", "publish-options",
    "rsm",
    "publisher-affiliation", "purge-nodes", "retract-items", "retrieve-affiliations",
    "retrieve-default", "retrieve-items", "retrieve-subscriptions", "subscribe",
    "manage-subscriptions",
    "config-node-max", "subscription-options",
)
"""XEP-0060 features (pubsub#<name>) the engine implements, for disco (not get-pending,
8.7's ad-hoc command, nor meta-data, the node meta-data form: not built)."""


def _page_of(rest: list[etree._Element]) -> tuple[int, str | None, str | None]:
    """The page an owner's list request asks for with XEP-0059 <set/>: (max,
    after, before); before "" is the last page. Without <set/>, the first
    `OWNER_PAGE`."""
    page = _option(rest, "set", RSM)
    if page is None:
        return OWNER_PAGE, None, None
    raw = page.findtext(f"{{{RSM}}}max")
    if raw is not None and not raw.strip().isdigit():
        raise StanzaError("bad-request", "RSM max is a number")
    limit = min(int(raw), MAX_PAGE) if raw is not None else OWNER_PAGE
    before = page.findtext(f"{{{RSM}}}before")
    return limit, page.findtext(f"{{{RSM}}}after"), before


def _result_set(
    chosen: list[str], count: int | None, index: int | None = None
) -> etree._Element:
    """The <set/> of a page of a list (XEP-0059 2.1): its first and last keys (JIDs,
    node names: what to page on from) and how many the list has, when known."""
    answer = etree.Element(f"{{{RSM}}}set", nsmap={None: RSM})
    if chosen:
        first = etree.SubElement(answer, f"{{{RSM}}}first")
        first.text = chosen[0]
        if index is not None:
            first.set("index", str(index))
        etree.SubElement(answer, f"{{{RSM}}}last").text = chosen[-1]
    if count is not None:
        etree.SubElement(answer, f"{{{RSM}}}count").text = str(count)
    return answer


def _bare_of(jid: str) -> str:
    return jid.split("/", 1)[0]


def _chosen(
    listed: list[str], page: etree._Element | None, *, newest: bool
) -> tuple[list[str], bool]:
    """The item ids a retrieval asks for out of `listed` (oldest first) and whether
    the answer fills from their end: XEP-0059 <after/>, <before/> (empty: the last
    page) and <max/> (at most `ITEMS_PAGE`) with a <set/>; without one, all of them,
    the newest first to go in when `newest` (max_items asks for the newest)."""
    if page is None:
        return listed, newest
    limit_text = page.findtext(f"{{{RSM}}}max")
    if limit_text is not None and not limit_text.strip().isdigit():
        raise StanzaError("bad-request", "RSM max is a number")
    limit = min(int(limit_text), ITEMS_PAGE) if limit_text is not None else ITEMS_PAGE
    after, before = page.findtext(f"{{{RSM}}}after"), page.findtext(f"{{{RSM}}}before")
    start, end = 0, len(listed)
    for bound, is_after in ((after, True), (before, False)):
        if bound:
            if bound not in listed:
                raise StanzaError("item-not-found", "no such item to page from")
            if is_after:
                start = listed.index(bound) + 1
            else:
                end = listed.index(bound)
    chosen = listed[start:end]
    if before is not None:
        return (chosen[-limit:] if limit else []), True
    return chosen[:limit], False


def _items_set(returned: list[str], listed: list[str]) -> etree._Element:
    """The XEP-0059 <set/> of an answer holding `returned` out of `listed`."""
    answer = etree.Element(f"{{{RSM}}}set", nsmap={None: RSM})
    if returned:
        first = etree.SubElement(answer, f"{{{RSM}}}first", index=str(listed.index(returned[0])))
        first.text = returned[0]
        etree.SubElement(answer, f"{{{RSM}}}last").text = returned[-1]
    etree.SubElement(answer, f"{{{RSM}}}count").text = str(len(listed))
    return answer


def _pubsub(namespace: str) -> etree._Element:
    return etree.Element(f"{{{namespace}}}pubsub", nsmap={None: namespace})


def _jid(action: etree._Element) -> str:
    jid = action.get("jid")
    if not jid:
        raise pubsub_error("bad-request", "jid-required", "name the subscribed JID")
    return _address(jid)


def _address(jid: str) -> str:
    """`jid` prepared (RFC 7622) as the server prepares a requester's: the engine
    compares JIDs as strings, so an owner's ban of 'Bernardo@Host' must name the
    bernardo@host who asks. jid-malformed when it is no JID."""
    return str(parse_jid(jid))


def _node(action: etree._Element) -> str:
    name = action.get("node")
    if not name:
        raise pubsub_error("bad-request", "nodeid-required", "this needs a node")
    return name


def _option(
    rest: list[etree._Element], name: str, namespace: str | None = None
) -> etree._Element | None:
    """The request's sibling element `name` (in `namespace`, else in pubsub's)."""
    tags = (f"{{{namespace}}}{name}",) if namespace else (f"{_PS}{name}", f"{_OWNER}{name}")
    found = [c for c in rest if c.tag in tags]
    return found[0] if found else None


def _form(element: etree._Element | None) -> etree._Element | None:
    """The data form inside <publish-options/> or <configure/>, if any."""
    if element is None:
        return None
    forms = element.findall(_X)
    if len(forms) > 1:
        raise StanzaError("bad-request", "one form at most")
    return forms[0] if forms else None


BODY_CHARS = 1000  # the most of an item's text a pubsub#include_body body carries


def event_message(
    from_: str,
    to: str,
    event: Event,
    *,
    payload: bool,
    item: etree._Element | None = None,
    include_body: bool = False,
) -> etree._Element:
    """The notification of `event` to one recipient (XEP-0060 7.1.2, 7.2.2, 8.2.5,
    8.4.2, 8.5.2). `item` overrides the event's item (the last item sent on
    subscribe or presence); `payload` False sends the item id only. A recipient
    whose subscription has pubsub#include_body (6.3) gets a <body/> too
    (`include_body`): the item's text (when payloads are delivered), else what
    happened."""
    message = etree.Element("{jabber:client}message", nsmap={None: "jabber:client"})
    message.set("from", from_)
    if to:  # none: a template the fan-out copies for each recipient
        message.set("to", to)
    kind = event.node.config.get("pubsub#notification_type", "headline")
    message.set("type", kind if kind in ("headline", "normal") else "headline")
    name = event.node.name
    if include_body:
        source = item if item is not None else event.item
        text = (
            " ".join("".join(source.itertext()).split())
            if source is not None and payload else ""
        )
        body = etree.SubElement(message, "{jabber:client}body")
        body.text = text[:BODY_CHARS] or f"{event.kind} {event.item_id or ''} on {name}".strip()
    ev = etree.SubElement(message, f"{_EV}event", nsmap={None: PUBSUB_EVENT})
    if event.kind == "items":
        items = etree.SubElement(ev, f"{_EV}items", node=name)
        source = item if item is not None else event.item
        entry = etree.SubElement(items, f"{_EV}item")
        if source is not None:
            entry.set("id", source.get("id") or "")
            if payload:
                for child in source:
                    if isinstance(child.tag, str):
                        entry.append(etree.fromstring(etree.tostring(child)))
        if event.publisher:
            entry.set("publisher", event.publisher)
    elif event.kind == "retract":
        items = etree.SubElement(ev, f"{_EV}items", node=name)
        etree.SubElement(items, f"{_EV}retract", id=event.item_id or "")
    elif event.kind == "configuration":
        etree.SubElement(ev, f"{_EV}configuration", node=name)
    else:
        etree.SubElement(ev, f"{_EV}{event.kind}", node=name)
    return message

