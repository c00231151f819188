"""Account removal as an operator does it, with the server running or not."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from xmppd.auth.accounts import Accounts
from xmppd.config import Config
from xmppd.modulehost import ModuleHost
from xmppd.router import Router
from xmppd.storage.factory import Storage


async def remove_account(
    cfg: Config,
    storage: Storage,
    accounts: Accounts,
    host: str,
    username: str,
    removed: Callable[[], Awaitable[object]] | None = None,
) -> bool:
    """Delete the account, then let every enabled module drop its data.

    The modules run here, in this process, against the same storage the
    nodes use, and fire the same "account/removed" event as in-band removal,
    so a user deleted by `xmppctl` leaves no roster, vCard or offline
    messages behind (contacts' rosters are updated in storage too).
    `removed` runs between the two: xmppctl ends the account's sessions on
    the running nodes there, so their goodbye presence still finds the roster.
    """
    if not await accounts.unregister(username):
        return False
    if removed is not None:
        await removed()
    router = Router(cfg.hosts, lambda h, u: accounts.exists(u))
    modules = ModuleHost(router, storage, list(cfg.hosts))
    modules.accounts = {host: accounts}
    modules.load(cfg)
    await modules.start()
    try:
        await modules.fire("account/removed", host, username)
        await router.drain()
    finally:
        await modules.stop()
    return True
