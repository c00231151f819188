"""The publish-subscribe engine (XEP-0060) that both PEP (modules/pep.py, one service
per account) and the pubsub.<host> service (modules/pubsub.py) run on.

It knows nodes, affiliations, subscriptions, items and access models, and
keeps them in the item and blob stores; it knows nothing of who hosts it,
of sessions or of routing. Every operation returns what happened (an `Event`
for notifications); the hosting module decides who gets them.

Storage, under the `prefix` of one service (PEP: "<user>/", so an account's
nodes go with one prefix deletion; the pubsub service: ""), in one item
store:

* `<prefix>n/<node>`: the node record: configuration, affiliations, the
  item ids in publish order (at most `MAX_ITEMS`, fewer when long ids would
  outgrow one stored item: `_fit`), the last item itself when it is small
  (`LAST_INLINE_BYTES`), and the node's generation (a token new at each
  creation). Contacts' last items are
  what a login needs, and this record reads through the shared cache like
  every item, so a login storm reads the cache, not the store, once per
  contact and node.
* `<prefix>s/<node>/<generation>/<JID>`: one subscription (subscribed or
  pending an owner's approval, its subid and options), so that a node has
  as many subscribers as `max_subscribers` allows (10,000s), read with one
  query by node. The generation keeps a node made again under a deleted
  one's name from inheriting its subscriptions while they are deleted.
  Records written before subscriptions had items of their own carry them
  inline ("s", "p", "o"): they are read as they are and moved out, a batch
  per transaction, by the first subscription change of that node
  (`_migrate`).
* `<prefix>c/<node>/<generation>`: how many subscriptions the node has
  (absent: none), written in the transaction of each subscription change,
  so that the count is exact, `max_subscribers` holds, and a publish to a
  node without subscribers queries none.
* `<prefix>nodes`: how many nodes the service has, written in the transaction
  of each creation and deletion, conditional on what was read, so that
  creating a node reads one item, not every node record, and two cluster
  nodes creating at once cannot pass `max_nodes` (one of them retries and
  reads the other's count). Absent on a service without nodes, and on one
  whose nodes predate it: its next creation counts the node records once
  (`_count_nodes`) and writes it, conditional on the item as read; a deletion
  before then writes a mark ("u") in its place, so that a creation counting
  meanwhile counts again.
* `<prefix>i/<node>/<item id>`: one published item: its XML when at most
  `inline_item_bytes`, else the key of a blob (blob store, same namespace
  name) holding it, and its publisher's bare JID (whose items a publish-only
  entity may retract). Avatars' data nodes are the large ones.
* `/u/<bare JID>`: the nodes a user subscribed to, for the per-user
  subscription limit and so that an account's removal finds its
  subscriptions (no user prefix starts with "/"). An entry whose node is
  gone is dropped when the limit is reached and when the user lists its
  subscriptions (`live_entries`): the safety net under the deletion's own
  clearing (below).
* `/a/<bare JID>`: on PEP, the other accounts' nodes where that JID has an
  affiliation an owner gave it ([prefix, node]), written in the
  transaction of the change, so that an account's removal finds them
  without reading every node of the host (the pubsub service reads its
  nodes instead: its creators' affiliations are not changes).
* `/d/<prefix>/<node>/<generation>`: a deleted node whose subscriptions (and
  their subscribers' index entries) are still to be cleared, written in the
  deletion's transaction; modules/_pubsub_cleanup.py clears them in
  batches after the owner's answer, and again at start-up after a crash.

Every change of a node's items or configuration is one `ItemStore.modify`
of its record, with the item writes in the same transaction (`WithWrites`),
so two nodes of a cluster publishing to one node at once both land and an
item is never stored without the record listing it. Every subscription
change is one `modify` of the node's count, with the subscription and the
subscriber's index in the same transaction: subscribing never contends
with publishing (a hot node's record would otherwise make both retry), and
two nodes subscribing at once both land. A subscription written while its
node is being deleted is left under the deleted generation, where no one
reads it; the subscriber is told the node is gone. Subscription options
change the subscription item alone, conditional on its version. Blobs are written before that
transaction (a new key each time) and the replaced ones deleted after it.
Names (node names, item ids, JIDs) are escaped in keys so that none can
reach another's key space.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

from lxml import etree

from xmppd.storage.base import (
    MAX_ITEM_BYTES,
    UNCHANGED,
    BlobStore,
    ConditionFailed,
    Item,
    ItemStore,
    Query,
    Unchanged,
    WithWrites,
    Write,
)
from xmppd.storage.codec import name_token
from xmppd.stream.errors import StanzaError

from ._pubsub_forms import (
    ACCESS_MODELS,
    SUBSCRIPTION_DEFAULTS,
    Config,
    apply_form,
    check_preconditions,
    default_config,
    pubsub_error,
)

LAST_INLINE_BYTES = 8 * 1024
"""A last item up to this size rides in its node record (and so in the cache)."""
MAX_NAME_BYTES = 300  # node names and item ids, as escaped in keys (URL-quoted)
TRANSACTION_DELETES = 90
"""Writes of items besides the node's own in one transaction (DynamoDB takes 100)."""
SUBSCRIPTION_CHANGES = TRANSACTION_DELETES // 2
"""An owner's subscription changes in one request: each writes a subscription and an index."""
MIGRATE_BATCH = 80
"""Inline subscriptions of an earlier-format record moved out in one transaction."""
MAX_ITEMS = 1000
"""The most `max_items` a service may allow: a node's record lists every item id
(with its blob key), and must fit one stored item (`_fit`)."""
MAX_AFFILIATIONS = 2000
"""The most `max_affiliations` a service may allow: a node's record holds every
affiliation beside its item ids (2,000 JIDs of 40 bytes are 100 KiB of its 256 KiB)."""
NODE_COUNT = "nodes"
"""The name, under a service's prefix, of its node count (no node key: those are "n/...")."""
COUNT_SCAN = 100
"""Node records one query reads while a service's nodes are counted the one time."""
AFFILIATIONS_BYTES = 128 * 1024
"""A node's affiliations as its record holds them (JSON), at most: half the record, so
that long JIDs under `max_affiliations` never crowd out its item ids (`_fit`)."""
AFFILIATION_SCAN = 100
"""Node records one query of a scan for a user's affiliations reads."""
ITEMS_PAGE = 1000
"""The most items one retrieval answers with, whatever it asks for; the rest come in
XEP-0059 pages (XEP-0060 6.5.4: a service may truncate the items it returns)."""
ITEMS_PAGE_BYTES = 256 * 1024
"""The serialised items of one answer, at most (its first item whatever its size):
what clients and servers commonly take in one stanza (Prosody's c2s limit is 256 KiB),
and a bound on what one request holds and parses on the event loop."""
ITEMS_READ = 25
"""Item records read in one batch while a page fills (inline ones are up to 128 KiB)."""
TOMBSTONES = "/d/"
"""Where deleted nodes wait for their subscriptions to be cleared (no prefix starts with "/")."""
AFFILIATIONS = ("owner", "publisher", "publish-only", "member", "none", "outcast")
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


@dataclass(frozen=True, slots=True)
class Limits:
    """What one service allows (module options)."""

    max_item_bytes: int = 256 * 1024
    max_items: int = 256  # per node; what pubsub#max_items 'max' means
    max_nodes: int = 100  # per PEP account, or per service
    max_subscriptions: int = 1000  # per subscribing account
    max_subscribers: int = 100_000  # per node (each an item of its own)
    max_affiliations: int = 1000  # per node: all are kept in the node's record
    inline_item_bytes: int = 32 * 1024  # larger items go to the blob store
    default_max_items: int | str = 1
    default_access_model: str = "presence"

    @classmethod
    def of(cls, options: Any, default_max_items: int | str, default_access_model: str) -> Limits:
        """The limits a module's options set (pep's and pubsub's share these names)."""
        return cls(
            max_item_bytes=options.max_item_bytes,
            max_items=options.max_items,
            max_nodes=options.max_nodes,
            max_subscriptions=options.max_subscriptions,
            max_subscribers=options.max_subscribers,
            max_affiliations=options.max_affiliations,
            inline_item_bytes=options.inline_item_bytes,
            default_max_items=default_max_items,
            default_access_model=default_access_model,
        )


@dataclass(slots=True)
class Subscription:
    """One subscription to a node: subscribed, or pending an owner's approval
    (access model authorize, XEP-0060 6.1.6)."""

    jid: str  # the subscribed JID, bare or full
    subid: str
    state: Literal["subscribed", "pending"] = "subscribed"
    # subscription options (XEP-0060 6.3) that differ from the defaults
    options: dict[str, bool] = field(default_factory=dict)

    def option(self, name: str) -> bool:
        return self.options.get(name, SUBSCRIPTION_DEFAULTS[name])

    def values(self) -> dict[str, bool]:
        return {**SUBSCRIPTION_DEFAULTS, **self.options}


@dataclass(slots=True)
class Node:
    """One node as stored (its subscriptions are items of their own: `subscribers`)."""

    name: str
    config: Config
    affiliations: dict[str, str]  # bare JID -> affiliation (none: absent)
    items: list[list[str]]  # [id, blob key or ""], oldest first
    last: bytes | None  # the last item's <item/> XML when small, else None
    generation: str = ""  # new at each creation: the subscriptions' key space
    # subscriptions still inline in a record of the earlier format, until _migrate
    legacy: dict[str, Subscription] = field(default_factory=dict)

    def affiliation(self, bare: str) -> str:
        return self.affiliations.get(bare, "none")

    @property
    def owners(self) -> list[str]:
        return [jid for jid, aff in self.affiliations.items() if aff == "owner"]

    def max_items(self, limits: Limits) -> int:
        if not self.config.get("pubsub#persist_items", True):
            return 1  # a transient node keeps only what "last item" needs
        value = self.config.get("pubsub#max_items", 1)
        return limits.max_items if value == "max" else min(int(value), limits.max_items)


@dataclass(slots=True)
class Event:
    """What a change means to subscribers: `kind` is the XEP-0060 event child
    (items, retract, delete, purge, configuration)."""

    kind: Literal["items", "retract", "delete", "purge", "configuration"]
    node: Node
    item: etree._Element | None = None  # the published <item/> (items)
    item_id: str | None = None  # (items, retract)
    publisher: str | None = None


Relation = Callable[[str, str], Awaitable[tuple[str, list[str]] | None]]
"""(owner bare, requester bare) -> (subscription, roster groups) of the requester in
the owner's roster, or None: what the presence and roster access models judge."""


async def no_relation(owner: str, contact: str) -> None:
    """The `Relation` of a service that judges no access, only deletes (an account's
    removal with the module off, and no roster to ask)."""
    return None


def _q(name: str) -> str:
    return quote(name, safe="")


def _bare(jid: str) -> str:
    return jid.split("/", 1)[0]


def encode_node(node: Node) -> dict[str, str | bytes | int]:
    attrs: dict[str, str | bytes | int] = {
        "c": json.dumps(node.config, separators=(",", ":")),
        "a": json.dumps(node.affiliations, separators=(",", ":")),
        "i": json.dumps(node.items, separators=(",", ":")),
        "g": node.generation,
    }
    if node.last is not None:
        attrs["l"] = node.last
    if node.legacy:  # not moved out yet (_migrate): kept in the earlier format
        subscribed = {s.jid: s.subid for s in node.legacy.values() if s.state == "subscribed"}
        pending = {s.jid: s.subid for s in node.legacy.values() if s.state == "pending"}
        options = {s.jid: s.options for s in node.legacy.values() if s.options}
        attrs["s"] = json.dumps(subscribed, separators=(",", ":"))
        if pending:
            attrs["p"] = json.dumps(pending, separators=(",", ":"))
        if options:
            attrs["o"] = json.dumps(options, separators=(",", ":"))
    return attrs


def decode_node(name: str, item: Item) -> Node:
    attrs = item.attrs
    last = attrs.get("l")
    return Node(
        name=name,
        config=json.loads(str(attrs["c"])),
        affiliations=json.loads(str(attrs["a"])),
        items=json.loads(str(attrs["i"])),
        last=last if isinstance(last, bytes) else None,
        generation=str(attrs.get("g", "")),
        legacy=_legacy_subscriptions(attrs),
    )


def _legacy_subscriptions(attrs: dict[str, Any]) -> dict[str, Subscription]:
    """The subscriptions a record of the earlier format holds inline ("s"
    subscribed, "p" pending, "o" options: JID -> subid or options)."""
    if "s" not in attrs:
        return {}
    options: dict[str, dict[str, bool]] = json.loads(str(attrs["o"])) if "o" in attrs else {}
    found: dict[str, Subscription] = {}
    states: tuple[tuple[str, Literal["subscribed", "pending"]], ...] = (
        ("s", "subscribed"), ("p", "pending"))
    for key, state in states:
        for jid, subid in (json.loads(str(attrs[key])) if key in attrs else {}).items():
            found[jid] = Subscription(jid, subid, state, options.get(jid, {}))
    return found


def encode_subscription(sub: Subscription) -> dict[str, str | bytes | int]:
    attrs: dict[str, str | bytes | int] = {"j": sub.jid, "i": sub.subid, "s": sub.state}
    if sub.options:
        attrs["o"] = json.dumps(sub.options, separators=(",", ":"))
    return attrs


def decode_subscription(item: Item) -> Subscription:
    attrs = item.attrs
    state: Literal["subscribed", "pending"] = (
        "pending" if attrs.get("s") == "pending" else "subscribed"
    )
    options = json.loads(str(attrs["o"])) if "o" in attrs else {}
    return Subscription(str(attrs["j"]), str(attrs["i"]), state, options)


def _page_full(page: list[etree._Element], size: int, data: bytes) -> bool:
    """Whether an item of `data` would overfill a page already holding `page` (of `size`
    serialised bytes): `ITEMS_PAGE` items or `ITEMS_PAGE_BYTES`, its first item
    whatever its size."""
    return bool(page) and (len(page) >= ITEMS_PAGE or size + len(data) > ITEMS_PAGE_BYTES)


def parse_item(data: bytes) -> etree._Element:
    return etree.fromstring(data, _PARSER)


class PubSubService:
    """One pubsub service (an account's PEP or a pubsub.<host>) over the stores.

    `owner` is the account whose PEP this is (None for the pubsub service,
    where each node has its own owners); `relation` answers the presence
    and roster access models."""

    def __init__(
        self,
        items: ItemStore,
        blobs: BlobStore,
        prefix: str,
        limits: Limits,
        relation: Relation,
        owner: str | None = None,
        node_defaults: Mapping[str, Config] | None = None,
    ) -> None:
        self.items = items
        self.blobs = blobs
        self.prefix = prefix
        self.limits = limits
        self.relation = relation
        self.owner = owner
        # Node name -> options a node of that name is made with, whoever makes it
        # and however (PEP: the private bookmarks stay whitelisted when a client
        # publishes to them without the publish-options XEP-0402 asks for).
        self.node_defaults: Mapping[str, Config] = node_defaults or {}

    def at(self, prefix: str) -> PubSubService:
        """The service of another prefix in the same stores (the index and the
        tombstones of a PEP store name the nodes of every account in it)."""
        return PubSubService(
            self.items, self.blobs, prefix, self.limits, self.relation, self.owner,
            self.node_defaults,
        )

    # --- keys -------------------------------------------------------------------------

    def node_key(self, node: str) -> str:
        return f"{self.prefix}n/{_q(node)}"

    def item_key(self, node: str, item_id: str) -> str:
        return f"{self.prefix}i/{_q(node)}/{_q(item_id)}"

    @staticmethod
    def index_key(bare: str) -> str:
        return f"/u/{_q(bare)}"

    @staticmethod
    def affiliations_key(bare: str) -> str:
        return f"/a/{_q(bare)}"

    def node_count_key(self) -> str:
        return f"{self.prefix}{NODE_COUNT}"

    def subscriptions_prefix(self, node: Node) -> str:
        return f"{self.prefix}s/{_q(node.name)}/{node.generation}/"

    def subscription_key(self, node: Node, jid: str) -> str:
        return f"{self.subscriptions_prefix(node)}{_q(jid)}"

    def counter_key(self, node: Node) -> str:
        return f"{self.prefix}c/{_q(node.name)}/{node.generation}"

    def tombstones_prefix(self) -> str:
        """Where this service's deleted nodes wait for their subscriptions to go."""
        return f"{TOMBSTONES}{_q(self.prefix)}/"

    def tombstone_key(self, node: Node) -> str:
        return f"{self.tombstones_prefix()}{_q(node.name)}/{node.generation}"

    # --- reading ------------------------------------------------------------------------

    async def node(self, name: str) -> Node | None:
        item = await self.items.get(self.node_key(name))
        return None if item is None else decode_node(name, item)

    async def existing(self, name: str) -> Node:
        node = await self.node(name)
        if node is None:
            raise StanzaError("item-not-found", "no such node")
        return node

    async def node_names(self, limit: int = 1000) -> list[str]:
        """The service's nodes, by name (at most `limit`)."""
        start = f"{self.prefix}n/"
        names: list[str] = []
        token: str | None = None
        while len(names) < limit:
            page = await self.items.query(
                Query(prefix=start, limit=min(1000, limit), page_token=token)
            )
            names.extend(unquote(item.name[len(start):]) for item in page.items)
            if (token := page.next_token) is None:
                break
        return names[:limit]

    async def listed_nodes(self, bare: str, limit: int) -> list[str]:
        """The names of the service's first `limit` nodes in name order but those its
        access model closes to `bare` for good, with no roster to read (whitelist but
        for those it lets in; a node that made `bare` an outcast): a disco#items
        listing (XEP-0060 5.2), as Prosody hides them. Presence and roster nodes are
        listed (judging them would read an owner's roster per node); their items stay
        refused. The records come `AFFILIATION_SCAN` a query, the loop let run between
        queries, and of each only the configuration is decoded, its affiliations only
        when they name `bare`: a listing never parses 1,000 records' item lists."""
        start = f"{self.prefix}n/"
        needle = json.dumps(bare)  # as the affiliations' JSON holds the JID, if it does
        listed: list[str] = []
        token: str | None = None
        read = 0
        while read < limit:
            page = await self.items.query(
                Query(prefix=start, limit=min(AFFILIATION_SCAN, limit - read), page_token=token)
            )
            for record in page.items:
                name = unquote(record.name[len(start):])
                raw = str(record.attrs["a"])
                affiliations = json.loads(raw) if needle in raw else {}
                node = Node(name, json.loads(str(record.attrs["c"])), affiliations, [], None)
                refusal = judge(node, bare, self.owner, None)
                if refusal is None or refusal.condition == "not-authorized":
                    listed.append(name)
            read += len(page.items)
            if (token := page.next_token) is None:
                break
            await asyncio.sleep(0)  # a store that answers without yielding holds no longer
        return listed

    async def node_pages(self) -> AsyncIterator[list[Node]]:
        """Every node of the service, in name order, `AFFILIATION_SCAN` records a query,
        decoded from the query's own items (no read per node): for a walk that must
        reach them all whatever `max_nodes` says now (an account's removal), holding
        one page, not the service. Nodes made or deleted meanwhile may or may not
        show; the page token resumes after the last name either way."""
        start = f"{self.prefix}n/"
        token: str | None = None
        while True:
            page = await self.items.query(
                Query(prefix=start, limit=AFFILIATION_SCAN, page_token=token)
            )
            nodes = [decode_node(unquote(item.name[len(start):]), item) for item in page.items]
            if nodes:
                yield nodes
            if (token := page.next_token) is None:
                return
            await asyncio.sleep(0)  # a store that answers without yielding holds no longer

    async def affiliations_page(
        self, bare: str, after: str | None, before: str | None, limit: int
    ) -> list[tuple[str, str]]:
        """(node, affiliation) of `bare`'s first `limit` affiliations after the node
        `after` (None: from the start), or with `before` (not None) the last `limit`
        before that node ("": the last page), in node key order. The node records
        are scanned `AFFILIATION_SCAN` at a time, their affiliations taken from the
        query's own items (no read per node), until the page is full: a service of
        10,000 nodes is some queries, not 10,000 reads, and its every node is
        reachable. The pubsub service keeps no per-user index of affiliations: its
        creators' affiliations would need one, written with every creation and
        deletion and bounded per user (an owner of 10,000 nodes outgrows an item),
        for a request clients rarely make."""
        start = f"{self.prefix}n/"
        bound = before if before is not None else after
        token = name_token(start + _q(bound)) if bound else None
        found: list[tuple[str, str]] = []
        while len(found) < limit:
            page = await self.items.query(Query(
                prefix=start, limit=AFFILIATION_SCAN, page_token=token,
                descending=before is not None,
            ))
            for record in page.items:
                affiliation = json.loads(str(record.attrs["a"])).get(bare)
                if affiliation is not None:
                    found.append((unquote(record.name[len(start):]), affiliation))
                    if len(found) == limit:
                        break
            if (token := page.next_token) is None:
                break
            await asyncio.sleep(0)  # a store that answers without yielding holds no longer
        return found[::-1] if before is not None else found

    async def item_elements(self, node: Node, ids: Sequence[str]) -> list[etree._Element]:
        """The stored <item/> elements of `ids` (those that exist), in that order."""
        blob_of = {entry[0]: entry[1] for entry in node.items}
        wanted = [i for i in ids if i in blob_of]
        if not wanted:
            return []
        if len(wanted) == 1 and node.last is not None and node.items[-1][0] == wanted[0]:
            return [parse_item(node.last)]
        found = await self.items.batch_get([self.item_key(node.name, i) for i in wanted])
        elements = []
        for item_id in wanted:
            record = found.get(self.item_key(node.name, item_id))
            data = None if record is None else await self._item_data(record)
            if data is not None:
                elements.append(parse_item(data))
        return elements

    async def last_item(self, node: Node) -> etree._Element | None:
        if not node.items:
            return None
        if node.last is not None:
            return parse_item(node.last)
        found = await self.item_elements(node, [node.items[-1][0]])
        return found[0] if found else None

    async def subscription(self, node: Node, jid: str) -> Subscription | None:
        """`jid`'s subscription to `node` (subscribed or pending), if any."""
        if jid in node.legacy:
            return node.legacy[jid]
        item = await self.items.get(self.subscription_key(node, jid))
        return None if item is None else decode_subscription(item)

    async def subscribers(self, node: Node, prefix: str = "") -> list[Subscription]:
        """Every subscription to `node` (of JIDs whose escaped form starts with
        `prefix`): one query a thousand subscriptions."""
        found = [s for jid, s in node.legacy.items() if _q(jid).startswith(prefix)]
        if not _count_of(await self.items.get(self.counter_key(node))):
            return found  # the count is exact: nothing to query
        start = self.subscriptions_prefix(node) + prefix
        token: str | None = None
        while True:
            page = await self.items.query(Query(prefix=start, limit=1000, page_token=token))
            found.extend(decode_subscription(item) for item in page.items)
            if (token := page.next_token) is None:
                return found
            await asyncio.sleep(0)  # a store that answers without yielding holds no longer

    async def subscribers_page(
        self, node: Node, after: str | None, before: str | None, limit: int
    ) -> list[Subscription]:
        """One page of `node`'s subscriptions in the order of their keys (escaped
        JIDs): the first `limit` after the JID `after` (None: from the start), or
        with `before` (not None) the last `limit` before that JID ("": the last
        page). One query, however many the node has. The node has no inline
        subscriptions left (`_migrated`)."""
        start = self.subscriptions_prefix(node)
        bound = before if before is not None else after
        token = name_token(start + _q(bound)) if bound else None
        page = await self.items.query(Query(
            prefix=start, limit=limit, page_token=token, descending=before is not None
        ))
        items = list(reversed(page.items)) if before is not None else page.items
        return [decode_subscription(item) for item in items]

    async def subscription_count(self, node: Node) -> int:
        """How many subscriptions (subscribed or pending) `node` has."""
        return len(node.legacy) + _count_of(await self.items.get(self.counter_key(node)))

    def _count_write(self, node: Node, counter: Item | None, count: int) -> Write:
        """The conditional write of `node`'s count, for a transaction not on it."""
        key = self.counter_key(node)
        if counter is None:
            return self.items.put_op(key, {"n": count}, if_absent=True)
        return self.items.put_op(key, {"n": count}, if_version=counter.version)

    async def subscriptions_of_account(self, node: Node, bare: str) -> list[Subscription]:
        """The subscriptions of `bare` and of its full JIDs to `node`."""
        return [s for s in await self.subscribers(node, _q(bare)) if _bare(s.jid) == bare]

    async def _held(self, node: Node, bare: str) -> list[str]:
        """The states of `bare`'s subscriptions, when the access model asks for them."""
        if node.config.get("pubsub#access_model") != "authorize":
            return []
        return [s.state for s in await self.subscriptions_of_account(node, bare)]

    async def _migrate(self, name: str) -> None:
        """Move the subscriptions of a record of the earlier format into items of
        their own, `MIGRATE_BATCH` in each transaction with the record that no
        longer lists them (so a concurrent reader sees each one exactly once, in
        the record or as an item), before a subscription change of that node."""
        moved: list[int] = []

        async def change(current: Item | None) -> WithWrites | Unchanged:
            if current is None:
                return UNCHANGED
            node = decode_node(name, current)
            batch = list(node.legacy.values())[:MIGRATE_BATCH]
            moved[:] = [len(batch)]
            if not batch:
                return UNCHANGED
            counter = await self.items.get(self.counter_key(node))
            writes: list[Write] = [
                self._count_write(node, counter, _count_of(counter) + len(batch))
            ]
            for sub in batch:
                del node.legacy[sub.jid]
                writes.append(self.items.put_op(
                    self.subscription_key(node, sub.jid), encode_subscription(sub)
                ))
            return WithWrites(encode_node(node), writes)

        while True:
            moved.clear()
            await self.items.modify(self.node_key(name), change, what="node")
            if not moved or not moved[0]:
                return

    # --- access -------------------------------------------------------------------------

    async def check_access(self, node: Node, requester: str) -> None:
        """May `requester` subscribe to `node` and read its items? XEP-0060 6.1.3 errors."""
        bare = _bare(requester)
        held = await self._held(node, bare)
        if judge(node, bare, self.owner, None, held) is None:
            return
        owners = [self.owner] if self.owner else node.owners
        relations = [await self.relation(owner, bare) for owner in owners]
        refusal = judge(node, bare, self.owner, relations, held)
        if refusal is not None:
            raise refusal

    async def audience(self, node: Node, subs: Sequence[Subscription]) -> list[Subscription]:
        """Those of `subs` (subscribed ones) the node's access model still admits: no
        read for the open, authorize and whitelist models, one roster read per owner
        and subscribing account for presence and roster; the loop runs between
        batches, a node may have 10,000s."""
        verdicts: dict[str, bool] = {}
        admitted: list[Subscription] = []
        model = node.config.get("pubsub#access_model")
        for count, sub in enumerate(subs, 1):
            bare = _bare(sub.jid)
            if bare not in verdicts:
                verdict = judge(node, bare, self.owner, None, ("subscribed",))
                if verdict is None or model not in ("presence", "roster"):
                    verdicts[bare] = verdict is None  # final without the owners' rosters
                else:
                    owners = [self.owner] if self.owner else node.owners
                    relations = [await self.relation(owner, bare) for owner in owners]
                    verdicts[bare] = judge(node, bare, self.owner, relations) is None
            if verdicts[bare]:
                admitted.append(sub)
            if count % 1024 == 0:
                await asyncio.sleep(0)
        return admitted

    async def may_access(self, node: Node, requester: str) -> bool:
        try:
            await self.check_access(node, requester)
        except StanzaError:
            return False
        return True

    def _require_owner(self, node: Node, requester: str) -> None:
        if node.affiliation(_bare(requester)) != "owner":
            raise StanzaError("forbidden", "only an owner may do this")

    # --- node lifecycle --------------------------------------------------------------------

    def new_node(self, name: str, creator: str) -> Node:
        config = default_config(self.limits.default_access_model, self.limits.default_max_items)
        config.update(self.node_defaults.get(name, {}))
        return Node(name, config, {_bare(creator): "owner"}, [], None, secrets.token_hex(4))

    def check_name(self, name: str, what: str = "node names") -> None:
        """Names are escaped into storage keys; these fit every backend's key size."""
        if not name or len(_q(name)) > MAX_NAME_BYTES:
            raise StanzaError("not-acceptable", f"{what} are 1 to {MAX_NAME_BYTES} bytes escaped")

    async def _counted_creation(self) -> Write:
        """The conditional write of the node count one up, for the transaction that
        creates a node (so a rival creation or deletion makes it retry and read the
        new count); `max-nodes-exceeded` when the service has its `max_nodes` already.
        A count not kept yet is made by counting the records, conditional on the
        count item as it was before (absent, or a deletion's mark): a deletion
        meanwhile changes it, and the counting is done again."""
        counter = await self.items.get(self.node_count_key())
        known = counter is not None and "n" in counter.attrs
        count = _count_of(counter) if known else await self._count_nodes()
        if count >= self.limits.max_nodes:
            if not known:  # kept, so that the next refusals read one item
                try:
                    await self.items.transact([self._node_count_put(counter, {"n": count})])
                except ConditionFailed:
                    pass  # a creation or deletion got there first: it keeps it
            raise pubsub_error("not-allowed", "max-nodes-exceeded",
                               f"at most {self.limits.max_nodes} nodes")
        return self._node_count_put(counter, {"n": count + 1})

    async def _counted_deletion(self) -> Write:
        """The conditional write of the node count one down, for the transaction that
        deletes a node, and its deletion with the last node (a service without nodes
        keeps nothing; its next creation counts none with one query). While no count
        is kept, a mark instead, so that a creation counting the records meanwhile
        counts again."""
        counter = await self.items.get(self.node_count_key())
        if counter is None or "n" not in counter.attrs:
            return self._node_count_put(counter, {"u": 1})
        attrs = _count_attrs(_count_of(counter) - 1)
        if attrs is None:
            return self.items.delete_op(self.node_count_key(), if_version=counter.version)
        return self._node_count_put(counter, attrs)

    def _node_count_put(self, counter: Item | None, attrs: dict[str, int]) -> Write:
        """The node count's write, conditional on `counter` as read."""
        key = self.node_count_key()
        if counter is None:
            return self.items.put_op(key, attrs, if_absent=True)
        return self.items.put_op(key, attrs, if_version=counter.version)

    async def _count_nodes(self) -> int:
        """The node records counted, `COUNT_SCAN` a query: only for a service whose
        nodes were made before the count was kept, by its first creation since."""
        start = f"{self.prefix}n/"
        count = 0
        token: str | None = None
        while True:
            page = await self.items.query(Query(prefix=start, limit=COUNT_SCAN, page_token=token))
            count += len(page.items)
            if (token := page.next_token) is None:
                return count

    async def create(
        self, creator: str, name: str | None, form: etree._Element | None
    ) -> Node:
        """Create a node (XEP-0060 8.1); an instant node gets a unique name."""
        if name is None:
            name = secrets.token_hex(8)
        self.check_name(name)
        node = self.new_node(name, creator)
        if form is not None:
            node.config = self._validated(apply_form(node.config, form, self.limits.max_items))

        async def change(current: Item | None) -> WithWrites:
            if current is not None:
                raise StanzaError("conflict", "the node exists already")
            return WithWrites(encode_node(node), [await self._counted_creation()])

        await self.items.modify(self.node_key(name), change, what="node")
        return node

    def _validated(self, config: Config) -> Config:
        """PEP (a service with an `owner`) offers no authorize model: the owner's
        approvals would be messages to its own JID, which its clients get."""
        model = config.get("pubsub#access_model")
        if model not in ACCESS_MODELS or (model == "authorize" and self.owner is not None):
            raise pubsub_error("not-acceptable", "unsupported", feature="access-authorize")
        return config

    async def configure(self, requester: str, name: str, form: etree._Element) -> Event:
        """Apply the owner's node_config form (XEP-0060 8.2.4); fewer max_items drops
        the oldest items."""
        dropped: list[list[str]] = []

        async def change(current: Item | None) -> WithWrites:
            if current is None:
                raise StanzaError("item-not-found", "no such node")
            node = decode_node(name, current)
            self._require_owner(node, requester)
            node.config = self._validated(apply_form(node.config, form, self.limits.max_items))
            dropped[:] = _trim(node, self.limits)
            return WithWrites(encode_node(node), self._deletes(name, dropped))

        await self.items.modify(self.node_key(name), change, what="node")
        node = await self.existing(name)
        await self._drop_items(node, dropped[TRANSACTION_DELETES:])
        await self._delete_blobs(dropped[:TRANSACTION_DELETES])
        return Event("configuration", node)

    async def delete(self, requester: str | None, name: str) -> Event:
        """Delete a node with its items (XEP-0060 8.4): an owner's request, or the
        server's (`requester` None: its account goes). It leaves a tombstone: its
        subscriptions stay where the notification of the deletion reads them, until
        `_pubsub_cleanup.clear_deleted` clears them with their subscribers' index
        entries."""
        deleted: list[Node] = []

        async def change(current: Item | None) -> WithWrites:
            if current is None:
                raise StanzaError("item-not-found", "no such node")
            node = decode_node(name, current)
            if requester is not None:
                self._require_owner(node, requester)
            deleted[:] = [node]
            tombstone: dict[str, str | bytes | int] = {
                "p": self.prefix, "n": name, "g": node.generation,
                "l": json.dumps(sorted(node.legacy), separators=(",", ":")),
                "a": json.dumps(self._indexed(node.affiliations), separators=(",", ":")),
            }
            writes: list[Write] = [self.items.put_op(self.tombstone_key(node), tombstone)]
            writes.append(await self._counted_deletion())
            return WithWrites(None, [*writes, *self._deletes(name, node.items)])

        await self.items.modify(self.node_key(name), change, what="node")
        node = deleted[0]
        # Items deleted in the transaction: a node made again at once keeps its own.
        await self._drop_items(node, node.items[TRANSACTION_DELETES:])
        await self._delete_blobs(node.items[:TRANSACTION_DELETES])
        return Event("delete", node)

    async def purge(self, requester: str, name: str) -> Event:
        """Remove every item of a node (XEP-0060 8.5)."""
        purged: list[list[str]] = []

        def change(current: Item | None) -> WithWrites:
            if current is None:
                raise StanzaError("item-not-found", "no such node")
            node = decode_node(name, current)
            self._require_owner(node, requester)
            purged[:] = node.items
            node.items, node.last = [], None
            return WithWrites(encode_node(node), self._deletes(name, purged))

        await self.items.modify(self.node_key(name), change, what="node")
        node = await self.existing(name)
        await self._drop_items(node, purged[TRANSACTION_DELETES:])
        await self._delete_blobs(purged[:TRANSACTION_DELETES])
        return Event("purge", node)

    async def _drop_items(self, node: Node, entries: list[list[str]]) -> None:
        """Delete item records and blobs a committed change no longer lists."""
        for item_id, _blob in entries:
            await self.items.delete(self.item_key(node.name, item_id))
        await self._delete_blobs(entries)

    async def _delete_blobs(self, entries: list[list[str]]) -> None:
        for _item_id, blob in entries:
            if blob:
                await self.blobs.delete(blob)

    def _deletes(self, name: str, entries: list[list[str]]) -> list[Write]:
        """Deletes of item records for a node's transaction: at most
        `TRANSACTION_DELETES` (DynamoDB takes 100 writes a transaction); the caller
        deletes the rest after the commit (`_drop_items`), unlisted by then."""
        return [
            self.items.delete_op(self.item_key(name, item_id))
            for item_id, _ in entries[:TRANSACTION_DELETES]
        ]

    # --- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        publisher: str,
        name: str,
        item: etree._Element | None,
        wanted: Config,
        *,
        auto_create: bool,
        on_existing: Literal["check", "ignore", "apply"] = "check",
    ) -> Event:
        """Publish one item (XEP-0060 7.1), creating the node first when `auto_create`
        (PEP, XEP-0163 3) with the publish-options as its configuration. On an
        existing node the options are preconditions ("check", a client's publish);
        the server's own publishes must not fail on a client's choices, so they
        "ignore" them, or "apply" them in the publish's transaction when what is
        published must not be seen more widely than they say (private data copied
        into a node a client configured otherwise)."""
        self.check_name(name)
        if item is None:  # every node here persists items and delivers payloads
            raise pubsub_error("bad-request", "item-required", "publish one <item/>")
        item_id = item.get("id") or secrets.token_hex(8)
        self.check_name(item_id, "item ids")
        # An <item/> has an id and, set by the service alone, a publisher (XEP-0060
        # 7.1.2): one a publisher sent would reach every reader of the node as stored.
        item.attrib.clear()
        item.set("id", item_id)
        payloads = [child for child in item if isinstance(child.tag, str)]
        if len(payloads) > 1 or (item.text or "").strip():
            raise pubsub_error("bad-request", "invalid-payload", "one payload element per item")
        if not payloads:
            raise pubsub_error("bad-request", "payload-required", "the item needs a payload")
        data = etree.tostring(item)
        if len(data) > self.limits.max_item_bytes:
            raise pubsub_error("not-acceptable", "payload-too-big",
                               f"items are at most {self.limits.max_item_bytes} bytes")
        blob = ""
        if len(data) > self.limits.inline_item_bytes:
            blob = f"{self.prefix}{_q(name)}/{_q(item_id)}/{secrets.token_hex(6)}"
            await self.blobs.put(blob, data)
        record: dict[str, str | bytes | int] = {"p": _bare(publisher), "t": int(time.time())}
        record["b" if blob else "x"] = blob or data
        dropped: list[list[str]] = []

        async def change(current: Item | None) -> WithWrites:
            counted: list[Write] = []
            if current is None:
                if not auto_create:
                    raise StanzaError("item-not-found", "no such node")
                counted.append(await self._counted_creation())
                node = self.new_node(name, publisher)
                node.config = self._validated({**node.config, **wanted})
            else:
                node = decode_node(name, current)
                if on_existing == "check":
                    check_preconditions(node.config, wanted)
                elif on_existing == "apply":
                    node.config = self._validated({**node.config, **wanted})
            await self._check_publisher(node, publisher)
            previous = [entry for entry in node.items if entry[0] == item_id]
            node.items = [entry for entry in node.items if entry[0] != item_id]
            node.items.append([item_id, blob])
            node.last = data if len(data) <= LAST_INLINE_BYTES else None
            trimmed = _trim(node, self.limits)
            trimmed += _fit(self.node_key(name), node)
            dropped[:] = [*(entry for entry in previous if entry[1]), *trimmed]
            writes: list[Write] = [self.items.put_op(self.item_key(name, item_id), record)]
            writes += counted + self._deletes(name, trimmed)
            return WithWrites(encode_node(node), writes)

        try:
            await self.items.modify(self.node_key(name), change, what="node")
        except BaseException:
            if blob:
                await self.blobs.delete(blob)
            raise
        node = await self.existing(name)
        await self._drop_items(node, dropped[TRANSACTION_DELETES:])
        stale = [entry for entry in dropped[:TRANSACTION_DELETES] if entry[1] != blob]
        await self._delete_blobs(stale)
        return Event("items", node, item, item_id, _bare(publisher))

    async def _check_publisher(self, node: Node, publisher: str) -> None:
        affiliation = node.affiliation(_bare(publisher))
        if affiliation in ("owner", "publisher", "publish-only"):
            return
        model = node.config.get("pubsub#publish_model", "publishers")
        if affiliation != "outcast" and (
            model == "open"
            or (model == "subscribers" and any(
                s.state == "subscribed"
                for s in await self.subscriptions_of_account(node, _bare(publisher))))
        ):
            return
        raise StanzaError("forbidden", "you may not publish to this node")

    async def retract(self, requester: str, name: str, item_id: str) -> Event:
        """Delete one item (XEP-0060 7.2); the node's new last item is read back.
        Owners and publishers delete any item (4.1's MAY); a publish-only entity only
        those it published (4.1: SHOULD), as its item record names it."""
        removed: list[list[str]] = []

        async def change(current: Item | None) -> WithWrites:
            if current is None:
                raise StanzaError("item-not-found", "no such node")
            node = decode_node(name, current)
            affiliation = node.affiliation(_bare(requester))
            if affiliation not in ("owner", "publisher", "publish-only"):
                raise StanzaError("forbidden", "you may not retract from this node")
            removed[:] = [entry for entry in node.items if entry[0] == item_id]
            if not removed:
                raise StanzaError("item-not-found", "no such item")
            if affiliation == "publish-only":
                record = await self.items.get(self.item_key(name, item_id))
                if record is None or record.attrs.get("p") != _bare(requester):
                    raise StanzaError("forbidden", "you may retract only your own items")
            was_last = node.items[-1][0] == item_id
            node.items = [entry for entry in node.items if entry[0] != item_id]
            if was_last:
                node.last = None
                if node.items:
                    newest = await self.item_elements(node, [node.items[-1][0]])
                    if newest:
                        data = etree.tostring(newest[0])
                        node.last = data if len(data) <= LAST_INLINE_BYTES else None
            return WithWrites(encode_node(node), self._deletes(name, removed))

        await self.items.modify(self.node_key(name), change, what="node")
        await self._delete_blobs(removed)
        return Event("retract", await self.existing(name), item_id=item_id)

    # --- retrieval -------------------------------------------------------------------------

    async def readable(self, requester: str, name: str) -> Node:
        """The node, if `requester` may read its items (XEP-0060 6.5.9 errors)."""
        node = await self.existing(name)
        await self.check_access(node, requester)
        return node

    async def items_page(
        self, node: Node, ids: Sequence[str], *, from_end: bool = False
    ) -> list[etree._Element]:
        """The stored <item/>s of `ids` (those that exist), in that order, as many as
        one answer holds (`_page_full`), taken from the start of `ids` or, `from_end`,
        from its end. Reading stops when the page is full, so that one request holds
        and parses a page, not a node (10,000 items of up to 16 MB), however many
        requests run at once."""
        listed = {entry[0] for entry in node.items}
        wanted = [i for i in ids if i in listed]
        if from_end:
            wanted.reverse()
        page: list[etree._Element] = []
        size = 0
        async with aclosing(self._stored_items(node, wanted)) as stored:
            async for data in stored:
                if _page_full(page, size, data):
                    break
                size += len(data)
                page.append(parse_item(data))
        return page[::-1] if from_end else page

    async def item_pages(self, node: Node) -> AsyncIterator[list[etree._Element]]:
        """Every item of `node`, oldest first, a page (`_page_full`) at a time: for the
        server's own reading of a whole node (the bookmark conversion), which then
        holds a page (256 KiB of items, or one), not the node (1,000 items of up
        to 256 KiB). One reading runs under all the pages, so a record read for a
        page that was full already starts the next one rather than being read again."""
        page: list[etree._Element] = []
        size = 0
        async with aclosing(self._stored_items(node, [entry[0] for entry in node.items])) as stored:
            async for data in stored:
                if _page_full(page, size, data):
                    yield page
                    page, size = [], 0
                size += len(data)
                page.append(parse_item(data))
        if page:
            yield page

    async def _stored_items(self, node: Node, ids: list[str]) -> AsyncGenerator[bytes, None]:
        """The XML of the items `ids` of `node` that are still stored, in that order,
        read `ITEMS_READ` records at a time, each batch only when the previous one
        has been taken."""
        for start in range(0, len(ids), ITEMS_READ):
            keys = [self.item_key(node.name, item_id) for item_id in ids[start:start + ITEMS_READ]]
            found = await self.items.batch_get(keys)
            for key in keys:
                record = found.get(key)
                data = None if record is None else await self._item_data(record)
                if data is not None:
                    yield data

    async def _item_data(self, record: Item) -> bytes | None:
        """An item record's XML: inline, or its blob's (None: the blob is gone)."""
        data = record.attrs.get("x")
        if isinstance(data, bytes):
            return data
        blob = await self.blobs.get(str(record.attrs.get("b", "")))
        return None if blob is None else blob.data

    # --- subscriptions ---------------------------------------------------------------------

    async def subscribe(
        self, requester: str, name: str, jid: str
    ) -> tuple[Node, str, Literal["subscribed", "pending"]]:
        """Subscribe `jid` (XEP-0060 6.1): the subid and the state, pending when an
        owner must approve it first (access model authorize, 6.1.6)."""
        if _bare(jid) != _bare(requester):
            raise pubsub_error("bad-request", "invalid-jid", "subscribe your own JID")
        node = await self.existing(name)
        pending = False
        if node.config.get("pubsub#access_model") == "authorize":
            held = await self._held(node, _bare(requester))
            refusal = judge(node, _bare(requester), self.owner, None, held)
            if refusal is not None and refusal.condition == "forbidden":
                raise refusal
            pending = refusal is not None
        else:
            await self.check_access(node, requester)
        node = await self._migrated(name)
        outcome: list[Any] = []

        async def change(counter: Item | None) -> WithWrites | Unchanged:
            existing = await self.subscription(node, jid)
            if existing is not None:
                outcome[:] = [existing.subid, existing.state]
                return UNCHANGED
            self._check_room(_count_of(counter))
            sub = Subscription(jid, secrets.token_hex(8), "pending" if pending else "subscribed")
            outcome[:] = [sub.subid, sub.state]
            key = self.subscription_key(node, jid)
            writes: list[Write] = [self.items.put_op(key, encode_subscription(sub), if_absent=True)]
            writes += await self._index_change(_bare(jid), name, jid, add=True)
            return WithWrites(_count_attrs(_count_of(counter) + 1), writes)

        await self.items.modify(self.counter_key(node), change, what="node subscriptions")
        try:
            return await self._still(node), outcome[0], outcome[1]
        except StanzaError:
            await self._forget(node, jid)  # the deletion's clearing may be over already
            raise

    async def _migrated(self, name: str) -> Node:
        """The node, its subscriptions all items of their own (`_migrate`)."""
        await self._migrate(name)
        return await self.existing(name)

    async def _still(self, node: Node) -> Node:
        """The node after a subscription change: item-not-found when it was deleted
        (or made again) meanwhile, its subscriptions left where no one reads them."""
        now = await self.node(node.name)
        if now is None or now.generation != node.generation:
            raise StanzaError("item-not-found", "the node was deleted")
        return now

    async def _forget(self, node: Node, jid: str) -> None:
        """Take back `jid`'s subscription to `node`, deleted meanwhile, and its index
        entry: what subscribing wrote after the deletion's clearing."""

        async def change(counter: Item | None) -> WithWrites | Unchanged:
            item = await self.items.get(self.subscription_key(node, jid))
            if item is None:
                return UNCHANGED
            writes: list[Write] = [self.items.delete_op(item.name, if_version=item.version)]
            writes += await self._index_change(_bare(jid), node.name, jid, add=False)
            return WithWrites(_count_attrs(_count_of(counter) - 1), writes)

        await self.items.modify(self.counter_key(node), change, what="node subscriptions")

    async def authorize(self, approver: str, name: str, jid: str, allow: bool) -> str:
        """An owner's answer to a pending subscription (XEP-0060 8.6): subscribed or
        none, the state the subscriber is told of."""
        node = await self._migrated(name)
        self._require_owner(node, approver)

        async def change(counter: Item | None) -> WithWrites:
            item = await self.items.get(self.subscription_key(node, jid))
            if item is None or decode_subscription(item).state != "pending":
                raise StanzaError("item-not-found", "no such pending subscription")
            writes, delta = await self._answer(node, item, allow)
            return WithWrites(_count_attrs(_count_of(counter) + delta), writes)

        await self.items.modify(self.counter_key(node), change, what="node subscriptions")
        return "subscribed" if allow else "none"

    async def _answer(self, node: Node, item: Item, allow: bool) -> tuple[list[Write], int]:
        """The writes that approve (subscribed) or deny (removed) a pending
        subscription `item`, and the change of the node's count."""
        sub = decode_subscription(item)
        if allow:
            sub.state = "subscribed"
            put = self.items.put_op(item.name, encode_subscription(sub), if_version=item.version)
            return [put], 0
        index = await self._index_change(_bare(sub.jid), node.name, sub.jid, add=False)
        return [self.items.delete_op(item.name, if_version=item.version), *index], -1

    async def get_options(
        self, requester: str, name: str, jid: str, subid: str | None
    ) -> dict[str, bool]:
        """A subscription's options (XEP-0060 6.3.2), with the 6.3.4 errors."""
        node = await self.existing(name)
        sub = await self.subscription(node, jid)
        self._check_subscription(node, sub, requester, jid, subid)
        assert sub is not None
        return sub.values()

    async def set_options(
        self, requester: str, name: str, jid: str, subid: str | None, values: dict[str, bool]
    ) -> None:
        """Change a subscription's options (XEP-0060 6.3.5); only those that differ
        from the defaults are kept. The subscription's item alone is written."""
        node = await self._migrated(name)

        def change(current: Item | None) -> dict[str, Any]:
            sub = None if current is None else decode_subscription(current)
            self._check_subscription(node, sub, requester, jid, subid)
            assert sub is not None
            merged = {**sub.values(), **values}
            sub.options = {k: v for k, v in merged.items() if SUBSCRIPTION_DEFAULTS.get(k) != v}
            return encode_subscription(sub)

        await self.items.modify(self.subscription_key(node, jid), change, what="subscription")

    def _check_subscription(
        self, node: Node, sub: Subscription | None, requester: str, jid: str, subid: str | None
    ) -> None:
        if _bare(jid) != _bare(requester) and node.affiliation(_bare(requester)) != "owner":
            raise StanzaError("forbidden", "not your subscription")
        if sub is None:
            raise pubsub_error("unexpected-request", "not-subscribed", type_="cancel")
        if subid is not None and sub.subid != subid:
            raise pubsub_error("not-acceptable", "invalid-subid")

    def _check_room(self, count: int) -> None:
        if count >= self.limits.max_subscribers:
            raise StanzaError(
                "not-allowed", f"this node has its {self.limits.max_subscribers} subscribers"
            )

    async def unsubscribe(self, requester: str, name: str, jid: str, subid: str | None) -> None:
        """End a subscription (XEP-0060 6.2)."""
        node = await self._migrated(name)
        if _bare(jid) != _bare(requester) and node.affiliation(_bare(requester)) != "owner":
            raise pubsub_error("bad-request", "invalid-jid", "unsubscribe your own JID")

        async def change(counter: Item | None) -> WithWrites:
            item = await self.items.get(self.subscription_key(node, jid))
            if item is None:
                raise pubsub_error("unexpected-request", "not-subscribed", type_="cancel")
            if subid is not None and decode_subscription(item).subid != subid:
                raise pubsub_error("not-acceptable", "invalid-subid")
            writes: list[Write] = [self.items.delete_op(item.name, if_version=item.version)]
            writes += await self._index_change(_bare(jid), name, jid, add=False)
            return WithWrites(_count_attrs(_count_of(counter) - 1), writes)

        await self.items.modify(self.counter_key(node), change, what="node subscriptions")

    async def _index_change(self, bare: str, name: str, jid: str, *, add: bool) -> list[Write]:
        """The conditional write of the subscriber's index, for the node's transaction."""
        key = self.index_key(bare)
        current = await self.items.get(key)
        entries: list[list[str]] = json.loads(str(current.attrs["s"])) if current else []
        entry = [self.prefix, name, jid]
        entries = [e for e in entries if e != entry]
        if add and len(entries) >= self.limits.max_subscriptions:
            entries = await self.live_entries(entries)  # those of deleted nodes go
        if add:
            if len(entries) >= self.limits.max_subscriptions:
                raise pubsub_error("not-allowed", "too-many-subscriptions",
                                   f"at most {self.limits.max_subscriptions} subscriptions")
            entries.append(entry)
        if not entries:
            if current is None:
                return []
            return [self.items.delete_op(key, if_version=current.version)]
        attrs = {"s": json.dumps(entries, separators=(",", ":"))}
        if current is None:
            return [self.items.put_op(key, attrs, if_absent=True)]
        return [self.items.put_op(key, attrs, if_version=current.version)]

    async def live_entries(self, entries: list[list[str]]) -> list[list[str]]:
        """Those of a subscriber's index `entries` ([prefix, node, JID]) whose node
        exists and holds the subscription: one batch read of the nodes and one of
        the subscriptions (an entry of a deleted node is gone; one of a node deleted
        and made again under its name, left from the deleted one, too)."""
        keys = {self.at(p).node_key(n) for p, n, _jid in entries}
        records = await self.items.batch_get(sorted(keys))
        nodes: dict[tuple[str, str], Node] = {}
        for prefix, name, _jid in entries:
            record = records.get(self.at(prefix).node_key(name))
            if record is not None:
                nodes[(prefix, name)] = decode_node(name, record)
        wanted: dict[str, list[str]] = {}
        live: list[list[str]] = []
        for entry in entries:
            node = nodes.get((entry[0], entry[1]))
            if node is None:
                continue
            if entry[2] in node.legacy:
                live.append(entry)
            else:
                wanted[self.at(entry[0]).subscription_key(node, entry[2])] = entry
        held = await self.items.batch_get(list(wanted)) if wanted else {}
        live += [entry for key, entry in wanted.items() if key in held]
        kept = {tuple(entry) for entry in live}
        return [entry for entry in entries if tuple(entry) in kept]

    async def subscriptions_of(self, bare: str) -> list[list[str]]:
        """[prefix, node, jid] of every subscription `bare` holds in this store."""
        current = await self.items.get(self.index_key(bare))
        return json.loads(str(current.attrs["s"])) if current else []

    async def set_subscriptions(self, requester: str, name: str, changes: dict[str, str]) -> None:
        """Owner subscribes (`subscribed`) or unsubscribes (`none`) others (XEP-0060
        8.8.2), each subscription and its subscriber's index written in the same
        transaction (so at most `SUBSCRIPTION_CHANGES` changes a request)."""
        if len(changes) > SUBSCRIPTION_CHANGES:
            raise StanzaError(
                "not-acceptable", f"at most {SUBSCRIPTION_CHANGES} subscription changes at once"
            )
        node = await self._migrated(name)
        self._require_owner(node, requester)

        async def change(counter: Item | None) -> WithWrites:
            count = _count_of(counter)
            writes: list[Write] = []
            for jid, state in changes.items():
                add = state == "subscribed"
                key = self.subscription_key(node, jid)
                item = await self.items.get(key)
                if item is not None and decode_subscription(item).state == "pending":
                    answer, delta = await self._answer(node, item, add)  # the owner's answer
                    writes += answer
                    count += delta
                    continue
                if add == (item is not None):
                    continue
                if item is None:
                    self._check_room(count)
                    count += 1
                    sub = Subscription(jid, secrets.token_hex(8))
                    writes.append(self.items.put_op(key, encode_subscription(sub), if_absent=True))
                else:
                    count -= 1
                    writes.append(self.items.delete_op(key, if_version=item.version))
                writes += await self._index_change(_bare(jid), name, jid, add=add)
            return WithWrites(_count_attrs(count), writes)

        await self.items.modify(self.counter_key(node), change, what="node subscriptions")
        await self._still(node)

    # --- affiliations (owner use cases) ----------------------------------------------------

    async def set_affiliations(self, requester: str, name: str, changes: dict[str, str]) -> None:
        """Owner changes affiliations (XEP-0060 8.9.2); the last owner cannot be removed.
        On PEP, each JID that gains or loses one has its `/a/` index written in the
        same transaction (so at most `SUBSCRIPTION_CHANGES` changes a request).
        A node keeps at most `max_affiliations` (its record holds them all, and is
        read by every publish): a request that would leave more is refused whole,
        with XEP-0060 8.9.2.4's <not-acceptable/>; one that does not grow a node
        already over a lowered limit passes, so that owners can prune it."""
        if self.owner is not None and len(changes) > SUBSCRIPTION_CHANGES:
            raise StanzaError(
                "not-acceptable", f"at most {SUBSCRIPTION_CHANGES} affiliation changes at once"
            )

        async def change(current: Item | None) -> WithWrites:
            if current is None:
                raise StanzaError("item-not-found", "no such node")
            node = decode_node(name, current)
            self._require_owner(node, requester)
            before = set(self._indexed(node.affiliations))
            before_all = set(node.affiliations)
            for jid, affiliation in changes.items():
                if affiliation == "none":
                    node.affiliations.pop(jid, None)
                else:
                    node.affiliations[jid] = affiliation
            if not node.owners:
                raise StanzaError("not-acceptable", "a node needs an owner")
            count, cap = len(node.affiliations), self.limits.max_affiliations
            if count > cap and count > len(before_all):
                raise StanzaError("not-acceptable", f"a node has at most {cap} affiliations")
            size = len(json.dumps(node.affiliations, separators=(",", ":")).encode())
            if size > AFFILIATIONS_BYTES and size > len(str(current.attrs["a"]).encode()):
                raise StanzaError("not-acceptable",
                                  f"a node's affiliations are at most {AFFILIATIONS_BYTES} bytes")
            after = set(self._indexed(node.affiliations))
            writes: list[Write] = []
            for jid in sorted(before ^ after):
                writes += await self.affiliation_index_change(jid, name, add=jid in after)
            return WithWrites(encode_node(node), writes)

        await self.items.modify(self.node_key(name), change, what="node")
        banned = [jid for jid, affiliation in changes.items() if affiliation == "outcast"]
        if banned:
            node = await self._migrated(name)
            for bare in banned:
                await self._end_subscriptions(node, bare)

    async def _end_subscriptions(self, node: Node, bare: str) -> None:
        """End every subscription of `bare` (its bare and full JIDs) to `node`, with its
        index entries: an outcast may not be subscribed (XEP-0060 4.1). Each batch is
        one transaction with the node's count, as an unsubscription is. One the ban
        raced (a subscription that judged the node before it) stays, refused every
        notification but the node's deletion and purge by `judge`."""
        jids = [s.jid for s in await self.subscriptions_of_account(node, bare)]
        for start in range(0, len(jids), SUBSCRIPTION_CHANGES):
            batch = jids[start:start + SUBSCRIPTION_CHANGES]

            async def change(counter: Item | None, batch: list[str] = batch) -> WithWrites:
                found = await self.items.batch_get(
                    [self.subscription_key(node, jid) for jid in batch]
                )
                writes: list[Write] = [
                    self.items.delete_op(item.name, if_version=item.version)
                    for item in found.values()
                ]
                writes += await self._index_without(bare, node.name, batch)
                return WithWrites(_count_attrs(_count_of(counter) - len(found)), writes)

            await self.items.modify(self.counter_key(node), change, what="node subscriptions")

    async def _index_without(self, bare: str, name: str, jids: list[str]) -> list[Write]:
        """The conditional write of `bare`'s index without its entries of this service's
        node `name` for `jids` (one write, however many of its JIDs go)."""
        key = self.index_key(bare)
        current = await self.items.get(key)
        if current is None:
            return []
        entries: list[list[str]] = json.loads(str(current.attrs["s"]))
        kept = [e for e in entries if not (e[0] == self.prefix and e[1] == name and e[2] in jids)]
        if len(kept) == len(entries):
            return []
        if not kept:
            return [self.items.delete_op(key, if_version=current.version)]
        attrs = {"s": json.dumps(kept, separators=(",", ":"))}
        return [self.items.put_op(key, attrs, if_version=current.version)]

    def _indexed(self, affiliations: dict[str, str]) -> list[str]:
        """The JIDs of `affiliations` that the `/a/` index lists: on PEP, all but the
        account's own (its nodes go with its prefix); none on the pubsub service."""
        if self.owner is None:
            return []
        return sorted(jid for jid in affiliations if jid != self.owner)

    async def affiliation_index_change(self, bare: str, name: str, *, add: bool) -> list[Write]:
        """The conditional write of `bare`'s `/a/` index with or without this node."""
        key = self.affiliations_key(bare)
        current = await self.items.get(key)
        entries: list[list[str]] = json.loads(str(current.attrs["s"])) if current else []
        entry = [self.prefix, name]
        kept = [e for e in entries if e != entry] + ([entry] if add else [])
        if kept == entries:
            return []
        if not kept:
            return [self.items.delete_op(key, if_version=current.version)] if current else []
        attrs = {"s": json.dumps(kept, separators=(",", ":"))}
        if current is None:
            return [self.items.put_op(key, attrs, if_absent=True)]
        return [self.items.put_op(key, attrs, if_version=current.version)]

    async def owner_node(self, requester: str, name: str, *, migrated: bool = False) -> Node:
        """The node, for one of its owners; `migrated`: with no inline subscriptions
        left (`_migrate`), as what reads them by key needs."""
        node = await self.existing(name)
        self._require_owner(node, requester)
        return await self._migrated(name) if migrated and node.legacy else node

    # --- removal ---------------------------------------------------------------------------

    async def drop_affiliations_of(self, bare: str) -> bool:
        """Remove `bare`'s affiliations with the nodes its `/a/` index lists here, and
        the index (account removal)."""
        current = await self.items.get(self.affiliations_key(bare))
        entries: list[list[str]] = json.loads(str(current.attrs["s"])) if current else []
        for prefix, name in entries:
            service = self.at(prefix)

            def change(
                item: Item | None, name: str = name
            ) -> dict[str, str | bytes | int] | Unchanged:
                if item is None:
                    return UNCHANGED
                node = decode_node(name, item)
                if node.affiliations.pop(bare, None) is None:
                    return UNCHANGED
                return encode_node(node)

            await self.items.modify(service.node_key(name), change, what="node")
        return await self.items.delete(self.affiliations_key(bare)) or bool(entries)

    async def drop_subscriptions_of(self, bare: str) -> bool:
        """Remove every subscription `bare` holds here, and its index (account removal)."""
        entries = await self.subscriptions_of(bare)
        for prefix, name, jid in entries:
            service = PubSubService(self.items, self.blobs, prefix, self.limits, self.relation)
            if await service.node(name) is None:
                continue
            node = await service._migrated(name)

            async def change(
                counter: Item | None, key: str = service.subscription_key(node, jid)
            ) -> WithWrites | Unchanged:
                item = await self.items.get(key)
                if item is None:
                    return UNCHANGED
                return WithWrites(
                    _count_attrs(_count_of(counter) - 1),
                    [self.items.delete_op(item.name, if_version=item.version)],
                )

            await self.items.modify(service.counter_key(node), change, what="node subscriptions")
        found = await self.items.delete(self.index_key(bare))
        return found or bool(entries)


def judge(
    node: Node,
    bare: str,
    owner: str | None,
    relations: list[tuple[str, list[str]] | None] | None,
    held: Sequence[str] = (),
) -> StanzaError | None:
    """The access model's verdict on `bare` (None: allowed), XEP-0060 6.1.3's error
    otherwise. `relations`: the requester in each owner's roster (subscription,
    groups); None when not read yet, and then only a verdict that needs none is
    final (a refusal for lack of a roster entry is returned as not-authorized).
    `held`: the states of `bare`'s subscriptions to the node, which only the
    authorize model asks for (`PubSubService._held`). Sync, so that a fan-out
    that holds the owner's roster judges each contact without a read."""
    affiliation = node.affiliation(bare)
    if affiliation == "outcast":
        return StanzaError("forbidden", "you are banned from this node")
    if affiliation in ("owner", "publisher", "member") or bare == owner:
        return None
    model = node.config.get("pubsub#access_model", "open")
    if model == "open":
        return None
    if model == "whitelist":
        return pubsub_error("not-allowed", "closed-node")
    if model == "authorize":  # approved subscribers only (XEP-0060 6.5.7.x)
        if "subscribed" in held:
            return None
        if "pending" in held:
            return pubsub_error("not-authorized", "pending-subscription")
        return pubsub_error("not-authorized", "not-subscribed")
    allowed = set(node.config.get("pubsub#roster_groups_allowed", []))
    for relation in relations or ():
        if relation is None or relation[0] not in ("from", "both"):
            continue
        if model == "presence" or allowed & set(relation[1]):
            return None
    if model == "presence":
        return pubsub_error("not-authorized", "presence-subscription-required")
    return pubsub_error("not-authorized", "not-in-roster-group")


def _count_attrs(count: int) -> dict[str, int] | None:
    """A count item as written: none at 0 (a node without subscribers, a service
    without nodes, has none)."""
    return {"n": count} if count > 0 else None


def _count_of(counter: Item | None) -> int:
    """The number a node's count item holds (absent: 0)."""
    value = counter.attrs.get("n", 0) if counter is not None else 0
    return value if isinstance(value, int) else 0


def _fit(key: str, node: Node) -> list[list[str]]:
    """Drop the oldest items until the node's record fits a stored item
    (`MAX_ITEM_BYTES`, as `check_item` counts it); the dropped entries. The record
    lists every item id, and ids and blob keys of hundreds of bytes would let
    max_items of them outgrow it: the node then keeps fewer items than max_items
    rather than refusing every publish (with ids of up to 40 characters, 1000
    items, the most max_items allows, fit)."""
    size = len(key.encode()) + sum(
        len(name.encode()) + (8 if isinstance(value, int) else len(
            value if isinstance(value, bytes) else value.encode()))
        for name, value in encode_node(node).items()
    )
    drop = 0
    while size > MAX_ITEM_BYTES and drop < len(node.items) - 1:
        size -= len(json.dumps(node.items[drop], separators=(",", ":")).encode()) + 1
        drop += 1
    dropped, node.items = node.items[:drop], node.items[drop:]
    return dropped


def _trim(node: Node, limits: Limits) -> list[list[str]]:
    """Drop the oldest items over the node's max_items; the dropped entries."""
    keep = node.max_items(limits)
    if len(node.items) <= keep:
        return []
    dropped, node.items = node.items[:-keep], node.items[-keep:]
    return dropped
