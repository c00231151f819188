"""The accounts the configuration gives rights over other accounts.

`admins` run the XEP-0133 commands of their host (modules/admin_commands.py) and
`auth.proxy_auth` accounts may log in as any user of their host (xmppd/auth/login.py).
Those rights go with the name, not with whoever made the account: the first to
register a listed name that has no account yet would hold them. So in-band
registration refuses these names (modules/register.py), and the start and
`xmppctl check` warn about a listed name with no account, which the operator
should create before anything else can.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from xmppd.config import Config, Loc


def privileged_jids(config: Config) -> dict[str, Loc]:
    """Each privileged bare JID with the config key that grants it (the first, when
    two do): ("admins", 0) or ("auth", "proxy_auth", 0)."""
    keys: dict[str, Loc] = {}
    for i, jid in enumerate(config.auth.proxy_auth):  # the wider right first
        keys.setdefault(jid, ("auth", "proxy_auth", i))
    for i, jid in enumerate(config.admins):
        keys.setdefault(jid, ("admins", i))
    return keys


async def without_account(
    config: Config, exists: Callable[[str, str], Awaitable[bool]]
) -> list[str]:
    """One `FILE:LINE: key: ...` warning per privileged JID that has no account yet;
    `exists(host, user)` says whether an account is stored."""
    missing = []
    for jid, loc in privileged_jids(config).items():
        user, _, host = jid.rpartition("@")
        if not await exists(host, user):
            missing.append(config.source.problem(
                loc, f"{jid} has no account: create it with `xmppctl register {jid}`"
            ))
    return missing
