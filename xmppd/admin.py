"""Account removal as an operator does it, with the server running or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from xmppd.auth.accounts import Accounts
from xmppd.config import Config
from xmppd.modulehost import ModuleHost, Removed
from xmppd.router import Router
from xmppd.storage.factory import Storage


async def remove_account(
    cfg: Config,
    storage: Storage,
    accounts: Accounts,
    host: str,
    username: str,
) -> Removed:
    """Delete the account, then every module's data of it, from this process.

    The modules of `cfg` are loaded here, against the same storage the nodes
    use (writes go through its cache, so a shared cache such as memcached is
    invalidated), and each deletes what it keeps for the user with the same
    `Module.remove_user` the in-band removal runs: roster (its contacts are
    sent unsubscribe/unsubscribed, which updates local contacts' rosters in
    storage), vCard, private XML, privacy lists and blocklist, offline
    messages and their blobs, last activity, PEP, pubsub, rooms. The modules
    `cfg` leaves off have their stored data of the user deleted too
    (`Module.purge_user`), without being started.

    xmppctl runs this only when no node is running: a running node removes
    the account itself (xmppd.adminapi), through its own cache.

    Raises AccountDataRemains when a module failed: the account is gone
    already, and running this again deletes what is left ("leftovers").
    """
    async with offline_modules(cfg, storage, {host: accounts}) as modules:
        return await modules.remove_account(host, username)


@asynccontextmanager
async def offline_modules(
    cfg: Config, storage: Storage, accounts: dict[str, Accounts] | None = None
) -> AsyncIterator[ModuleHost]:
    """The enabled modules of `cfg`, loaded in this process over `storage`, with no
    session and no listener: what xmppctl changes user data through when no node runs
    (xmppd.userdata), so the modules' own rules apply. On the way out, what they
    routed meanwhile (presences to local contacts, which update their rosters in
    storage) is handled, even after a failure. `accounts` replaces the account
    stores of some hosts."""
    stores = {h: Accounts.of(storage, h, cfg.auth.scram_iterations) for h in cfg.hosts}
    stores.update(accounts or {})
    router = Router(cfg.hosts, lambda h, u: stores[h].exists(u))
    modules = ModuleHost(router, storage, list(cfg.hosts))
    modules.accounts = stores
    modules.load(cfg)
    await modules.start()
    try:
        yield modules
    finally:
        await router.drain()
        await modules.stop()
