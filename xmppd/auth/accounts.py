"""The account store of one virtual host, kept in the item store as SCRAM salted keys.

One item per account, named by the nodeprep'd user name, with one attribute
per SCRAM hash ("scram_sha1", "scram_sha256", "scram_sha512") holding
`ScramKeys.encode()`. The password itself is never stored: SCRAM logins use
the keys directly and PLAIN logins re-derive them (PBKDF2 at every PLAIN
login, as ejabberd and Prosody do).

Accounts read the item store directly, never through the cache
(`Storage.direct_items`): xmppctl changes and removes accounts from another
process, which cannot invalidate this process's cache, and a changed or
removed credential must stop working at once. That costs one item read per
login, and one more for the ban (below) once the credentials are checked.

A ban (`xmppctl ban`) is two attributes of the account item, "banned" (when,
Unix seconds) and "ban_reason": stored with the credentials, it holds on every
node and after restarts, and the account keeps its data. Changing the
password keeps it (`set_password` keeps the other attributes).

Every key derivation runs in an executor (the PBKDF2 call releases the
GIL, so threads really run in parallel), never on the event loop.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import secrets
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass

from slixmpp.jid import JID, InvalidJID

from xmppd.sasl.saslprep import SASLPrepError, saslprep
from xmppd.sasl.scram import (
    DEFAULT_ITERATIONS,
    MAX_ITERATIONS,
    MIN_ITERATIONS,
    SCRAM_HASHES,
    ScramKeys,
    derive_keys,
    hashlib_name,
    verify_password,
)
from xmppd.storage.base import (
    MAX_KEY_BYTES,
    UNCHANGED,
    AttrValue,
    ConditionFailed,
    Item,
    ItemStore,
    Query,
    StorageError,
    Unchanged,
)
from xmppd.storage.factory import Storage
from xmppd.xml.text import xml_can_carry

KEY_ATTRIBUTES = {name: f"scram_{name}" for name in SCRAM_HASHES.values()}
"""hashlib name -> item attribute; dict order (sha1 first) is the order PLAIN tries."""
MAX_PASSWORD_BYTES = 1023
"""The longest password PLAIN accepts (see xmppd.sasl.plain); longer ones could never log in."""

log = logging.getLogger("xmppd.accounts")

_KDF_EXECUTOR = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="xmppd-kdf")
"""Shared by every Accounts without its own executor; threads start on first use."""


class AccountExists(Exception):
    """register() for a user name that is taken."""


class AccountNotFound(Exception):
    """set_password() for a user name with no account."""


@dataclass(frozen=True, slots=True)
class Ban:
    """Why and since when an account may not log in."""

    since: int  # Unix seconds
    reason: str  # "" when none was given


BAN_ATTRIBUTES = ("banned", "ban_reason")


class InvalidUsername(ValueError):
    """The user name is not a valid JID localpart (nodeprep, RFC 6122)."""


class InvalidPassword(ValueError):
    """The password is empty, too long, or rejected by SASLprep."""


def normalize_username(username: str) -> str:
    """The canonical (nodeprep'd, so lower-cased) form of `username`, or InvalidUsername.

    Uses slixmpp's JID rules so that the account name is exactly the
    localpart of the JID the user will be bound to.
    """
    if not username or "@" in username or "/" in username:
        raise InvalidUsername(f"not a JID localpart: {username!r}")
    try:
        jid = JID(f"{username}@example.com")
    except InvalidJID as e:
        raise InvalidUsername(f"not a JID localpart: {e}") from None
    if not jid.user or jid.domain != "example.com" or jid.resource:
        raise InvalidUsername(f"not a JID localpart: {username!r}")
    if len(jid.user.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidUsername(f"user name longer than {MAX_KEY_BYTES} bytes (the storage limit)")
    return jid.user


def _check_password(password: str) -> None:
    if not password:
        raise InvalidPassword("empty password")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise InvalidPassword(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    try:
        prepared = saslprep(password)
    except SASLPrepError:
        raise InvalidPassword("password contains prohibited characters") from None
    if not prepared:
        raise InvalidPassword("password is empty after SASLprep")


class Accounts:
    """Register, check and change accounts of one virtual host.

    User names are normalised with `normalize_username` by every method, so
    "Alice" and "alice" are one account. Lookups with a name that cannot be
    an account (invalid) answer "absent" instead of raising, so the SASL path
    treats it like any unknown user.
    """

    def __init__(
        self,
        store: ItemStore,
        iterations: int = DEFAULT_ITERATIONS,
        executor: Executor | None = None,
    ) -> None:
        if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
            raise ValueError(f"iterations must be in [{MIN_ITERATIONS}, {MAX_ITERATIONS}]")
        self._store = store
        self._iterations = iterations
        self._executor = executor if executor is not None else _KDF_EXECUTOR
        # Unknown users in verify_plain cost one PBKDF2 too, so timing does not reveal them.
        self._dummy_keys = ScramKeys(
            "sha1", secrets.token_bytes(16), iterations, bytes(20), bytes(20)
        )

    @classmethod
    def of(
        cls, storage: Storage, host: str, iterations: int = DEFAULT_ITERATIONS
    ) -> Accounts:
        """The accounts of `host`, read from the item store itself (see the module doc)."""
        return cls(ItemStore(storage.direct_items, host, "accounts"), iterations)

    @property
    def iterations(self) -> int:
        """The count new keys get; also what ScramServer should claim for unknown users."""
        return self._iterations

    async def _derive_all(self, password: str) -> dict[str, str]:
        """The three key attributes for `password`, derived concurrently in the executor."""
        loop = asyncio.get_running_loop()
        keys = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._executor, derive_keys, name, password, None, self._iterations
                )
                for name in KEY_ATTRIBUTES
            )
        )
        return {KEY_ATTRIBUTES[k.hash_name]: k.encode() for k in keys}

    async def register(self, username: str, password: str) -> None:
        """Create the account; AccountExists, InvalidUsername, InvalidPassword."""
        name = normalize_username(username)
        _check_password(password)
        if await self._store.get(name) is not None:  # fail before spending the CPU
            raise AccountExists(name)
        attrs = await self._derive_all(password)
        try:
            await self._store.put(name, attrs, if_absent=True)
        except ConditionFailed:
            raise AccountExists(name) from None

    async def set_password(self, username: str, password: str) -> None:
        """Replace the keys of an existing account; AccountNotFound, InvalidPassword, or
        Contended (a ConditionFailed) when other writers of the account win every try.

        A conditional read-modify-write: other attributes written meanwhile by
        someone else are kept, and of concurrent password changes the last
        one wins whole (never a mix of one's SHA-1 and another's SHA-256 keys).
        """
        try:
            name = normalize_username(username)
        except InvalidUsername:
            raise AccountNotFound(username) from None
        _check_password(password)
        attrs = await self._derive_all(password)

        def replace_keys(item: Item | None) -> dict[str, AttrValue]:
            if item is None:
                raise AccountNotFound(name)
            return {**item.attrs, **attrs}

        await self._store.modify(name, replace_keys, what="account")

    async def import_keys(
        self, username: str, keys: builtins.list[ScramKeys], ban: Ban | None = None
    ) -> None:
        """Create the account from salted keys another server made (XEP-0227 import).

        No password is needed: SCRAM logins with these hashes work at once, PLAIN
        verifies against them, and the hashes missing here are added at the next
        PLAIN login (`verify_plain`). A `ban` (from xmppd's own export) is written
        with the keys, so the account never exists unbanned. AccountExists,
        InvalidUsername, ValueError (no keys, or a ban reason XML cannot carry).
        """
        name = normalize_username(username)
        if not keys:
            raise ValueError("no SCRAM keys")
        if ban is not None:
            _check_reason(ban.reason)
        attrs: dict[str, AttrValue] = {KEY_ATTRIBUTES[k.hash_name]: k.encode() for k in keys}
        if ban is not None:
            attrs.update({"banned": ban.since, "ban_reason": ban.reason})
        try:
            await self._store.put(name, attrs, if_absent=True)
        except ConditionFailed:
            raise AccountExists(name) from None

    async def credentials(self, username: str) -> dict[str, ScramKeys] | None:
        """hashlib name -> stored keys, for every hash the account has; None: no account.

        ValueError for a corrupt stored value."""
        item = await self._stored(username)
        if item is None:
            return None
        found: dict[str, ScramKeys] = {}
        for hash_name, attribute in KEY_ATTRIBUTES.items():
            value = item.attrs.get(attribute)
            if isinstance(value, str):
                found[hash_name] = ScramKeys.decode(value)
        return found

    async def unregister(self, username: str) -> bool:
        """Delete the account; False if there was none."""
        try:
            name = normalize_username(username)
        except InvalidUsername:
            return False
        return await self._store.delete(name)

    async def ban(self, username: str, reason: str, since: int | None = None) -> Ban:
        """Ban the account (AccountNotFound); banning it again replaces the reason and time
        (`since`, Unix seconds: now unless given, as by an import). ValueError for a
        reason XML cannot carry: each refused login sends it in its SASL failure.

        Only logins are refused here: the caller ends the account's sessions."""
        try:
            name = normalize_username(username)
        except InvalidUsername:
            raise AccountNotFound(username) from None
        _check_reason(reason)
        ban = Ban(int(time.time()) if since is None else since, reason)

        def add_ban(item: Item | None) -> dict[str, AttrValue]:
            if item is None:
                raise AccountNotFound(name)
            return {**item.attrs, "banned": ban.since, "ban_reason": ban.reason}

        await self._store.modify(name, add_ban, what="account")
        return ban

    async def unban(self, username: str) -> bool:
        """Lift the account's ban; False if it had none (AccountNotFound: no account)."""
        try:
            name = normalize_username(username)
        except InvalidUsername:
            raise AccountNotFound(username) from None
        lifted = False

        def lift(item: Item | None) -> dict[str, AttrValue] | Unchanged:
            nonlocal lifted
            if item is None:
                raise AccountNotFound(name)
            lifted = "banned" in item.attrs
            if not lifted:
                return UNCHANGED
            return {k: v for k, v in item.attrs.items() if k not in BAN_ATTRIBUTES}

        await self._store.modify(name, lift, what="account")
        return lifted

    async def ban_of(self, username: str) -> Ban | None:
        """The account's ban, None when it has none (or there is no such account)."""
        item = await self._stored(username)
        since = item.attrs.get("banned") if item is not None else None
        if item is None or not isinstance(since, int):
            return None
        reason = item.attrs.get("ban_reason", "")
        return Ban(since, reason if isinstance(reason, str) else "")

    async def exists(self, username: str) -> bool:
        return await self._stored(username) is not None

    async def _stored(self, username: str) -> Item | None:
        """The account's stored item; None when there is none (or the name is invalid,
        so that no account can have it)."""
        try:
            name = normalize_username(username)
        except InvalidUsername:
            return None
        return await self._store.get(name)

    async def list(
        self, page_token: str | None = None, limit: int = 1000
    ) -> tuple[builtins.list[str], str | None]:
        """One page of user names in name order, and the next page's token (None at the end)."""
        page = await self._store.query(Query(limit=limit, page_token=page_token))
        return [item.name for item in page.items], page.next_token

    async def scram_keys(self, username: str, hash_name: str) -> ScramKeys | None:
        """The stored keys for one hash ("sha256" or "SHA-256"), None for an unknown user.

        ValueError for an unsupported hash or a corrupt stored value.
        """
        attribute = KEY_ATTRIBUTES[hashlib_name(hash_name)]
        item = await self._stored(username)
        if item is None:
            return None
        value = item.attrs.get(attribute)
        if not isinstance(value, str):
            return None
        return ScramKeys.decode(value)

    async def verify_plain(self, username: str, password: str) -> bool:
        """Check a PLAIN password against the stored keys (SHA-1 first: cheapest PBKDF2)."""
        keys = self._dummy_keys
        try:
            name = normalize_username(username)
        except InvalidUsername:
            name = None
        item = await self._store.get(name) if name is not None else None
        missing: builtins.list[str] = []
        if item is not None:
            for hash_name, attribute in KEY_ATTRIBUTES.items():
                value = item.attrs.get(attribute)
                if not isinstance(value, str):
                    missing.append(hash_name)
                elif keys is self._dummy_keys:
                    keys = ScramKeys.decode(value)
        if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
            return False
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._executor, verify_password, keys, password)
        ok = ok and keys is not self._dummy_keys
        if ok and missing and name is not None:
            await self._add_missing(name, password, missing)
        return ok

    async def _add_missing(self, name: str, password: str, missing: builtins.list[str]) -> None:
        """Give an imported account (keys for one hash only) the other hashes' keys, now
        that a PLAIN login has the password. Best effort: the login succeeds anyway, and
        the next PLAIN login tries again; keys someone wrote meanwhile are kept."""
        loop = asyncio.get_running_loop()
        try:
            derived = await asyncio.gather(
                *(
                    loop.run_in_executor(
                        self._executor, derive_keys, h, password, None, self._iterations
                    )
                    for h in missing
                )
            )
            added = {KEY_ATTRIBUTES[k.hash_name]: k.encode() for k in derived}

            def add(item: Item | None) -> dict[str, AttrValue]:
                if item is None:
                    raise AccountNotFound(name)
                return {**added, **item.attrs}

            await self._store.modify(name, add, what="account")
        except (StorageError, ConditionFailed, AccountNotFound, ValueError) as e:
            log.warning("could not add %s keys for %s: %s", ", ".join(missing), name, e)
        else:
            log.info("added %s keys for %s at its PLAIN login", ", ".join(missing), name)


def _check_reason(reason: str) -> None:
    """ValueError for a ban reason XML cannot carry (control characters, lone surrogates)."""
    if not xml_can_carry(reason):
        raise ValueError("the ban reason has characters XML cannot carry")
