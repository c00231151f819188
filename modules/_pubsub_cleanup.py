"""What a deleted pubsub or PEP node leaves to clear: its subscriptions, each
subscriber's index entry naming it (`/u/<bare JID>`, modules/_pubsub_engine.py)
and, on PEP, the index entry of each JID it gave an affiliation (`/a/<bare JID>`).

A node with 10,000 subscribers takes 10,000 subscription deletes and as many
index writes; the owner's delete does not wait for them. The deletion's own
transaction writes a tombstone, `/d/<prefix>/<node>/<generation>`, and the
subscriptions stay where the notification of the deletion reads them; then
`clear_deleted` (a task of the hosting module, or the account removal itself)
clears them `CLEAR_BATCH` at a time (the affiliations' entries last), each batch
one transaction with an update of the tombstone, so a node of a cluster that
dies part way leaves a tombstone and subscriptions that are all still to clear,
never half of a batch.
`finish_deletions` takes up what a dead node left, at start-up. Two nodes
clearing one tombstone at once only make each other retry.

An index entry is [prefix, node, JID] with no generation: the entry of a node
deleted and made again under its name, to which the user subscribed again, is
the new node's and stays. The lazy check of the index
(`PubSubService.live_entries`) is the safety net under this: an entry whose
node or subscription is gone never counts against the subscriber's limit nor
appears in its list of subscriptions.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

from xmppd.storage.base import (
    UNCHANGED,
    AttrValue,
    Item,
    Query,
    Unchanged,
    WithWrites,
    Write,
)

from ._pubsub_engine import TOMBSTONES, Node, PubSubService, decode_subscription

CLEAR_BATCH = 40
"""Subscriptions cleared in one transaction: each is a delete and at most one index
write, with the tombstone's update under DynamoDB's 100 writes."""


async def clear_deleted(service: PubSubService, key: str) -> int:
    """Clear the subscriptions of the deleted node whose tombstone is `key` (in
    `service`'s store), with their subscribers' index entries, then the tombstone
    and the node's count: how many subscriptions were cleared. The event loop runs
    between batches."""
    cleared = 0
    while (batch := await _clear_batch(service, key)) is not None:
        cleared += batch
        await asyncio.sleep(0)
    return cleared


async def _clear_batch(service: PubSubService, key: str) -> int | None:
    """Clear one batch: how many subscriptions it held (None: the tombstone is gone,
    every one cleared)."""
    done: list[int] = []

    async def change(current: Item | None) -> WithWrites | Unchanged:
        done.clear()
        if current is None:
            return UNCHANGED  # cleared already (here, or by another node)
        return await _batch(service, current, done)

    await service.items.modify(key, change, what="node deletion")
    return done[0] if done else None


async def _batch(service: PubSubService, tombstone: Item, done: list[int]) -> WithWrites:
    """The writes that clear the next batch of subscriptions, and the tombstone as
    it is after them (deleted with the count when none is left)."""
    attrs = tombstone.attrs
    prefix, name, generation = str(attrs["p"]), str(attrs["n"]), str(attrs["g"])
    here = service.at(prefix)
    gone = Node(name, {}, {}, [], None, generation)  # what the keys are made of
    legacy: list[str] = json.loads(str(attrs.get("l", "[]")))
    affiliated: list[str] = json.loads(str(attrs.get("a", "[]")))
    page = await service.items.query(
        Query(prefix=here.subscriptions_prefix(gone), limit=CLEAR_BATCH)
    )
    inline = legacy[: CLEAR_BATCH - len(page.items)]
    if not page.items and not inline:
        if not affiliated:
            return WithWrites(None, [service.items.delete_op(here.counter_key(gone))])
        return await _affiliations_batch(here, name, attrs, affiliated, done)
    writes: list[Write] = [
        service.items.delete_op(item.name, if_version=item.version) for item in page.items
    ]
    by_account: dict[str, set[str]] = defaultdict(set)
    for jid in [decode_subscription(item).jid for item in page.items] + inline:
        by_account[jid.split("/", 1)[0]].add(jid)
    for bare, jids in by_account.items():
        writes += await _unindexed(here, bare, name, jids)
    done[:] = [len(page.items) + len(inline)]
    rest = {**attrs, "l": json.dumps(legacy[len(inline):], separators=(",", ":"))}
    return WithWrites(rest, writes)


async def _affiliations_batch(
    here: PubSubService,
    name: str,
    attrs: dict[str, AttrValue],
    affiliated: list[str],
    done: list[int],
) -> WithWrites:
    """The writes that take the deleted node out of the `/a/` index of the next
    batch of JIDs it gave an affiliation (PEP), unless a node made again under the
    name gave them one too (read after the index, as in `_unindexed`)."""
    batch, rest = affiliated[:CLEAR_BATCH], affiliated[CLEAR_BATCH:]
    writes: list[Write] = []
    for jid in batch:
        key = here.affiliations_key(jid)
        index = await here.items.get(key)
        if index is None:
            continue
        current = await here.node(name)
        if current is not None and jid in current.affiliations:
            continue
        entries: list[list[str]] = json.loads(str(index.attrs["s"]))
        kept = [e for e in entries if e != [here.prefix, name]]
        if len(kept) == len(entries):
            continue
        if not kept:
            writes.append(here.items.delete_op(key, if_version=index.version))
        else:
            kept_attrs = {"s": json.dumps(kept, separators=(",", ":"))}
            writes.append(here.items.put_op(key, kept_attrs, if_version=index.version))
    done[:] = [0]
    return WithWrites({**attrs, "a": json.dumps(rest, separators=(",", ":"))}, writes)


async def _unindexed(here: PubSubService, bare: str, name: str, jids: set[str]) -> list[Write]:
    """The conditional write of `bare`'s index without its entries of the deleted
    node for `jids`; those a node made again under the name holds stay. The node is
    read after the index: a subscription to a new node made after that read changes
    the index, and the write conditional on its version runs again."""
    key = here.index_key(bare)
    index = await here.items.get(key)
    if index is None:
        return []
    entries: list[list[str]] = json.loads(str(index.attrs["s"]))
    kept: list[list[str]] = []
    current: list[Node | None] = []
    for entry in entries:
        if entry[0] == here.prefix and entry[1] == name and entry[2] in jids:
            if not current:
                current.append(await here.node(name))
            node = current[0]
            if node is None or await here.subscription(node, entry[2]) is None:
                continue
        kept.append(entry)
    if len(kept) == len(entries):
        return []
    if not kept:
        return [here.items.delete_op(key, if_version=index.version)]
    attrs = {"s": json.dumps(kept, separators=(",", ":"))}
    return [here.items.put_op(key, attrs, if_version=index.version)]


async def finish_deletions(service: PubSubService, prefix: str | None = None) -> int:
    """Clear every tombstone of `service`'s store (of the services of `prefix`
    alone when given): what a deletion interrupted left. How many subscriptions
    were cleared."""
    start = TOMBSTONES if prefix is None else service.at(prefix).tombstones_prefix()
    keys: list[str] = []
    token: str | None = None
    while True:
        page = await service.items.query(Query(prefix=start, limit=1000, page_token=token))
        keys += [item.name for item in page.items]
        if (token := page.next_token) is None:
            break
    cleared = 0
    for key in keys:
        cleared += await clear_deleted(service, key)
    return cleared


async def prune_index(service: PubSubService, bare: str) -> list[list[str]]:
    """`bare`'s index in `service`'s store without the entries of nodes and
    subscriptions that are gone (written back when one was): the lazy check that
    a subscriber's list never names a deleted node, whatever a deletion left."""
    kept: list[list[str]] = []

    async def change(current: Item | None) -> dict[str, str] | None | Unchanged:
        entries: list[list[str]] = json.loads(str(current.attrs["s"])) if current else []
        kept[:] = await service.live_entries(entries)
        if len(kept) == len(entries):
            return UNCHANGED
        return {"s": json.dumps(kept, separators=(",", ":"))} if kept else None

    await service.items.modify(service.index_key(bare), change, what="subscriptions index")
    return kept
