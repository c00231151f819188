"""Account removal as an operator does it, with the server running or not."""

from __future__ import annotations

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
    """Delete the account, then every enabled module's data of it, from this process.

    The modules of `cfg` are loaded here, against the same storage the nodes
    use (writes go through its cache, so a shared cache such as memcached is
    invalidated), and each deletes what it keeps for the user with the same
    `Module.remove_user` the in-band removal runs: roster (its contacts are
    sent unsubscribe/unsubscribed, which updates local contacts' rosters in
    storage), vCard, private XML, privacy lists and blocklist, offline
    messages and their blobs, last activity.

    xmppctl runs this only when no node is running: a running node removes
    the account itself (xmppd.adminapi), through its own cache.

    Raises AccountDataRemains when a module failed: the account is gone
    already, and running this again deletes what is left ("leftovers").
    """
    router = Router(cfg.hosts, lambda h, u: accounts.exists(u))
    modules = ModuleHost(router, storage, list(cfg.hosts))
    modules.accounts = {host: accounts}
    modules.load(cfg)
    await modules.start()
    try:
        return await modules.remove_account(host, username)
    finally:
        await router.drain()  # the unsubscriptions sent to contacts, even after a failure
        await modules.stop()
