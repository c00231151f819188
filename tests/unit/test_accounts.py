"""The account store on storage-A's real backends (memory and SQLite)."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import scramp

from xmppd.auth.accounts import (
    KEY_ATTRIBUTES,
    AccountExists,
    AccountNotFound,
    Accounts,
    InvalidPassword,
    InvalidUsername,
    normalize_username,
)
from xmppd.sasl import SASLFailure
from xmppd.sasl.scram import ScramKeys, ScramServer, verify_password
from xmppd.storage.backends.memory import MemoryItemBackend
from xmppd.storage.backends.sqlite import SQLiteItemBackend
from xmppd.storage.base import ConditionFailed, ItemBackend, ItemStore

PASSWORD = "correct horse battery staple"


@pytest.fixture(params=["memory", "sqlite"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ItemBackend]:
    if request.param == "memory":
        yield MemoryItemBackend()
        return
    sqlite = SQLiteItemBackend(tmp_path / "items.db")
    yield sqlite
    await sqlite.close()


@pytest.fixture
def store(backend: ItemBackend) -> ItemStore:
    return ItemStore(backend, "localhost", "accounts")


@pytest.fixture
def accounts(store: ItemStore) -> Accounts:
    return Accounts(store)


class CountingExecutor(ThreadPoolExecutor):
    """Records how many derivations were submitted and how many ran at once."""

    def __init__(self) -> None:
        super().__init__(max_workers=3)
        self.submitted = 0
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.submitted += 1

        def tracked() -> Any:
            with self._lock:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        return super().submit(tracked)


def read_files(directory: Path, pattern: str) -> bytes:
    return b"".join(path.read_bytes() for path in directory.glob(pattern))


def keys_match(keys: ScramKeys | None, password: str) -> bool:
    return keys is not None and verify_password(keys, password)


# --- register / lookups ------------------------------------------------------------------------


async def test_register_then_authenticate(accounts: Accounts) -> None:
    await accounts.register("juliet", PASSWORD)
    assert await accounts.exists("juliet")
    for hash_name in ("sha1", "SHA-256", "sha512"):
        keys = await accounts.scram_keys("juliet", hash_name)
        assert keys is not None and keys.iterations == 4096
        assert keys_match(keys, PASSWORD)
    assert await accounts.verify_plain("juliet", PASSWORD)
    assert not await accounts.verify_plain("juliet", PASSWORD + "!")
    assert not await accounts.verify_plain("romeo", PASSWORD)


async def test_salts_differ_per_hash(accounts: Accounts) -> None:
    await accounts.register("juliet", PASSWORD)
    salts = {(await accounts.scram_keys("juliet", h)).salt for h in ("sha1", "sha256", "sha512")}  # type: ignore[union-attr]
    assert len(salts) == 3


async def scram_login(accounts: Accounts, username: str, password: str) -> None:
    """A SCRAM-SHA-512 exchange of scramp with our server, keys looked up as the
    server does; SASLFailure when the server refuses the client's proof."""
    server = ScramServer("SCRAM-SHA-512", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-512"], username, password)
    authcid = server.start(client.get_client_first().encode())
    keys = await accounts.scram_keys(authcid, "sha512")
    assert keys is not None, f"no keys found for {authcid!r}"
    client.set_server_first(server.challenge(keys).decode())
    final = server.finish(client.get_client_final().encode())
    # The server signs with the stored server key: what the client derived from its password.
    assert final == b"v=" + base64.b64encode(client.server_signature)


async def test_scram_login_with_stored_keys(accounts: Accounts) -> None:
    await accounts.register("juliet", PASSWORD)
    await scram_login(accounts, "Juliet", PASSWORD)  # "Juliet" finds "juliet"
    with pytest.raises(SASLFailure) as refused:
        await scram_login(accounts, "juliet", PASSWORD + "!")
    assert refused.value.condition == "not-authorized"


async def test_no_stored_attribute_contains_the_password(
    accounts: Accounts, store: ItemStore, tmp_path: Path
) -> None:
    await accounts.register("juliet", PASSWORD)
    await accounts.set_password("juliet", PASSWORD + " 2")
    item = await store.get("juliet")
    assert item is not None and set(item.attrs) == set(KEY_ATTRIBUTES.values())
    forms = [PASSWORD, PASSWORD + " 2"]
    forms += [base64.b64encode(p.encode()).decode() for p in forms]
    forms += [p.encode().hex() for p in forms[:2]]
    for value in item.attrs.values():
        assert isinstance(value, str)
        for form in forms:
            assert form not in value
            assert form.lower() not in value.lower()
    # On SQLite, not anywhere in the files either (database and write-ahead log).
    raw = await asyncio.to_thread(read_files, tmp_path, "items.db*")
    assert PASSWORD.encode() not in raw
    assert PASSWORD.encode("utf-16-le") not in raw


async def test_register_twice_fails(accounts: Accounts) -> None:
    await accounts.register("juliet", PASSWORD)
    with pytest.raises(AccountExists):
        await accounts.register("juliet", "other password")
    with pytest.raises(AccountExists):
        await accounts.register("JULIET", "other password")  # nodeprep folds case
    assert await accounts.verify_plain("juliet", PASSWORD)


async def test_concurrent_registrations_one_wins(accounts: Accounts) -> None:
    results = await asyncio.gather(
        *(accounts.register("juliet", f"password {i}") for i in range(4)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 1
    assert all(isinstance(r, AccountExists) for r in results if r is not None)
    winner = results.index(None)
    assert await accounts.verify_plain("juliet", f"password {winner}")


@pytest.mark.parametrize("username", ["", "a b", "a@b", "a/b", 'a"b', "a:b", "x" * 769, "\u0007"])
async def test_invalid_usernames(accounts: Accounts, username: str) -> None:
    with pytest.raises(InvalidUsername):
        await accounts.register(username, PASSWORD)
    assert not await accounts.exists(username)
    assert await accounts.scram_keys(username, "sha1") is None
    assert not await accounts.verify_plain(username, PASSWORD)
    assert not await accounts.unregister(username)
    with pytest.raises(AccountNotFound):
        await accounts.set_password(username, PASSWORD)


def test_normalize_username() -> None:
    assert normalize_username("Juliet") == "juliet"
    assert normalize_username("ÄÖ") == "äö"
    assert normalize_username("\ufb00") == "ff"
    with pytest.raises(ValueError):  # InvalidUsername is a ValueError
        normalize_username("a@b")


@pytest.mark.parametrize("password", ["", "\u00ad", "bell\u0007", "x" * 1024, "unassigned\u0221"])
async def test_bad_passwords_rejected(accounts: Accounts, password: str) -> None:
    with pytest.raises(InvalidPassword):
        await accounts.register("juliet", password)
    assert not await accounts.exists("juliet")
    await accounts.register("juliet", PASSWORD)
    with pytest.raises(InvalidPassword):
        await accounts.set_password("juliet", password)
    assert await accounts.verify_plain("juliet", PASSWORD)


async def test_passwords_are_saslprepped(accounts: Accounts) -> None:
    await accounts.register("juliet", "I\u00adX")
    assert await accounts.verify_plain("juliet", "\u2168")
    assert not await accounts.verify_plain("juliet", "x" * 1024)


# --- change / delete / list --------------------------------------------------------------------


async def test_set_password(accounts: Accounts, store: ItemStore) -> None:
    await accounts.register("juliet", PASSWORD)
    await store.put("juliet", {**(await store.get("juliet")).attrs, "quota": 5})  # type: ignore[union-attr]
    await accounts.set_password("Juliet", "new password")
    assert await accounts.verify_plain("juliet", "new password")
    assert not await accounts.verify_plain("juliet", PASSWORD)
    for hash_name in KEY_ATTRIBUTES:
        assert keys_match(await accounts.scram_keys("juliet", hash_name), "new password")
    assert (await store.get("juliet")).attrs["quota"] == 5  # type: ignore[union-attr]
    with pytest.raises(AccountNotFound):
        await accounts.set_password("romeo", "x")


async def test_unregister(accounts: Accounts) -> None:
    await accounts.register("juliet", PASSWORD)
    assert await accounts.unregister("JULIET")
    assert not await accounts.unregister("juliet")
    assert not await accounts.exists("juliet")
    assert await accounts.scram_keys("juliet", "sha256") is None
    assert not await accounts.verify_plain("juliet", PASSWORD)
    await accounts.register("juliet", "again")  # the name is free again


async def test_list_pages(accounts: Accounts) -> None:
    names = ["delta", "alpha", "echo", "charlie", "bravo"]
    await asyncio.gather(*(accounts.register(n, PASSWORD) for n in names))
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        page, token = await accounts.list(token, limit=2)
        seen += page
        pages += 1
        if token is None:
            break
    assert seen == sorted(names)
    assert pages == 3
    assert await accounts.list() == (sorted(names), None)


async def test_verify_plain_uses_whichever_keys_exist(accounts: Accounts, store: ItemStore) -> None:
    await accounts.register("juliet", PASSWORD)
    item = await store.get("juliet")
    assert item is not None
    await store.put("juliet", {KEY_ATTRIBUTES["sha512"]: item.attrs[KEY_ATTRIBUTES["sha512"]]})
    assert await accounts.scram_keys("juliet", "sha1") is None
    assert await accounts.verify_plain("juliet", PASSWORD)
    assert not await accounts.verify_plain("juliet", "wrong")


# --- concurrency -------------------------------------------------------------------------------


async def test_concurrent_set_password_loses_nothing(accounts: Accounts, store: ItemStore) -> None:
    """Password changes race with each other and with another writer of the same item.

    Every call succeeds, the surviving keys are all of one password (never
    SHA-1 from one call and SHA-256 from another), and the other writer's
    attribute survives every password change.
    """
    await accounts.register("juliet", PASSWORD)

    async def bump_counter() -> None:
        for _ in range(20):
            item = await store.get("juliet")
            assert item is not None
            counter = item.attrs.get("counter", 0)
            assert isinstance(counter, int)
            try:
                await store.put(
                    "juliet", {**item.attrs, "counter": counter + 1}, if_version=item.version
                )
            except ConditionFailed:
                continue
            await asyncio.sleep(0)

    passwords = [f"password {i}" for i in range(6)]
    bumps = asyncio.create_task(bump_counter())
    await asyncio.gather(*(accounts.set_password("juliet", p) for p in passwords))
    await bumps
    item = await store.get("juliet")
    assert item is not None and item.attrs.get("counter", 0) != 0
    keys = [await accounts.scram_keys("juliet", h) for h in KEY_ATTRIBUTES]
    winners = [p for p in passwords if all(keys_match(k, p) for k in keys)]
    assert len(winners) == 1


class InterferingStore(ItemStore):
    """Another node writes the item between set_password's read and its write, once."""

    __slots__ = ("interfered",)

    def __init__(self, backend: ItemBackend) -> None:
        super().__init__(backend, "localhost", "accounts")
        self.interfered = False

    async def put(self, name: str, attrs: Any, **kwargs: Any) -> Any:
        if kwargs.get("if_version") is not None and not self.interfered:
            self.interfered = True
            current = await self.get(name)
            assert current is not None
            await super().put(name, {**current.attrs, "vcard_hash": "abc"})
        return await super().put(name, attrs, **kwargs)


async def test_set_password_retries_instead_of_clobbering(backend: ItemBackend) -> None:
    store = InterferingStore(backend)
    accounts = Accounts(store)
    await accounts.register("juliet", PASSWORD)
    await accounts.set_password("juliet", "new password")
    assert store.interfered
    item = await store.get("juliet")
    assert item is not None and item.attrs["vcard_hash"] == "abc"
    assert await accounts.verify_plain("juliet", "new password")


async def test_derivation_is_concurrent_and_off_the_loop(store: ItemStore) -> None:
    """With a high iteration count the loop keeps ticking while three PBKDF2 run in threads.

    Thresholds are relative to the measured derivation time, so a loaded
    machine slows both sides: derivation on the loop would show one lag about
    as long as the whole registration and almost no ticks.
    """
    executor = CountingExecutor()
    accounts = Accounts(store, iterations=400_000, executor=executor)
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lags.append(time.perf_counter() - before - 0.005)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # let the ticker start before the derivation
    started = time.perf_counter()
    await accounts.register("juliet", PASSWORD)
    elapsed = time.perf_counter() - started
    stop.set()
    await tick
    executor.shutdown()
    assert elapsed > 0.15, "derivation too fast to measure loop lag; raise the iteration count"
    assert max(lags) < elapsed / 3, f"loop blocked {max(lags):.3f}s of {elapsed:.3f}s"
    assert len(lags) >= 10
    assert executor.submitted == 3
    assert executor.max_running == 3
    keys = await accounts.scram_keys("juliet", "sha256")
    assert keys is not None and keys.iterations == 400_000


async def test_unknown_user_plain_costs_a_derivation_too(store: ItemStore) -> None:
    """So PLAIN response times do not tell unknown users from wrong passwords."""
    executor = CountingExecutor()
    accounts = Accounts(store, executor=executor)
    assert not await accounts.verify_plain("ghost", PASSWORD)
    assert executor.submitted == 1
    executor.shutdown()


def test_iteration_bounds(store: ItemStore) -> None:
    with pytest.raises(ValueError):
        Accounts(store, iterations=1000)
    assert Accounts(store, iterations=10_000).iterations == 10_000


async def test_a_ban_is_kept_with_the_account_until_lifted(accounts: Accounts) -> None:
    await accounts.register("Alice", PASSWORD)
    assert await accounts.ban_of("alice") is None
    before = time.time()
    ban = await accounts.ban("ALICE", "spam")
    assert ban.reason == "spam" and before - 1 <= ban.since <= time.time()
    assert await accounts.ban_of("alice") == ban
    # the credentials stay, and a new password keeps the ban
    assert await accounts.verify_plain("alice", PASSWORD)
    await accounts.set_password("alice", "another one")
    assert await accounts.ban_of("alice") == ban
    assert await accounts.unban("alice")
    assert await accounts.ban_of("alice") is None
    assert not await accounts.unban("alice")
    assert await accounts.verify_plain("alice", "another one")
    for missing in (accounts.ban("nobody", ""), accounts.unban("nobody")):
        with pytest.raises(AccountNotFound):
            await missing
    assert await accounts.ban_of("nobody") is None
