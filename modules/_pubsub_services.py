"""The record of the pubsub services a host has had: which `<subdomain>.<host>` the
pubsub module served, kept for when it no longer serves them.

An account's removal with the module off (`PubSub.purge_user`) has no options,
so no subdomain, to find the services whose nodes and subscriptions name the
account. Listing the item store's namespaces would find them, but on DynamoDB
that is a Scan of the whole table, and any user can trigger a removal
(in-band): a cost and a denial-of-service lever. So the module notes each
service domain it serves, once, in a small store of the host's own (item
store `pubsub_services` under the virtual host, one item per service domain,
named by it), and the removal reads that: one query per host.

The record is the server's, not any account's: a removal leaves it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from xmppd.modulehost import ModuleHost
from xmppd.storage.base import ConditionFailed, Query

STORE = "pubsub_services"
PAGE = 100
"""Records one query reads; a host has one per subdomain it ever served, so one
query reads them all but for an operator who moved the service a hundred times."""


async def record_services(host: ModuleHost, domains: Mapping[str, str]) -> None:
    """Note each service domain of `domains` (service domain -> its virtual host),
    unless it is noted already: a read, and a write only the first time. Raises
    StorageError if the store fails: the module must not serve a domain whose data
    a later removal could not find."""
    for domain, vhost in domains.items():
        store = host.items(vhost, STORE)
        if await store.get(domain) is not None:
            continue
        try:
            await store.put(domain, {"first_served": int(time.time())}, if_absent=True)
        except ConditionFailed:
            pass  # another node of the cluster noted it meanwhile


async def recorded_services(host: ModuleHost, vhost: str) -> list[str]:
    """The service domains noted under `vhost`, in name order."""
    store = host.items(vhost, STORE)
    found: list[str] = []
    token: str | None = None
    while True:
        page = await store.query(Query(limit=PAGE, page_token=token))
        found.extend(item.name for item in page.items)
        if (token := page.next_token) is None:
            return found
