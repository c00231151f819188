"""The caps PEP keeps (XEP-0115, modules/_pep_caps.py): verified hashes are stored in a
bounded table, each account storing few new ones per window, without sockets."""

from __future__ import annotations

import itertools

import pytest

from tests.modules.test_pep import online
from xmppd.modules._pep_caps import CAPS_SLOTS, STORES_PER_WINDOW, CapsStore, slot_of
from xmppd.modules.pep import NOTIFY
from xmppd.storage.base import Query
from xmppd.testing import ModuleHarness


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = ModuleHarness({"roster": {}, "presence": {}, "pep": {}, "disco": {}})
    harness.users.update({"alice@localhost", "bob@localhost"})
    return await harness.start()


async def stored(harness: ModuleHarness) -> int:
    page = await harness.host.items("localhost", "caps").query(Query(prefix="", limit=1000))
    return len(page.items)


async def test_one_account_stores_few_fresh_hashes(harness: ModuleHarness) -> None:
    """Each presence with a fresh, valid hash used to be stored for ever: one account
    inventing client versions grew the store without end. Past its budget, a verified
    answer still serves the resource; another account has its own budget."""
    for i in range(STORES_PER_WINDOW + 5):
        session = await online(harness, f"alice@localhost/r{i}", [f"urn:n{i}"])
        assert set(session.state.get(NOTIFY) or ()) == {f"urn:n{i}"}
    assert await stored(harness) == STORES_PER_WINDOW
    await online(harness, "bob@localhost/b", ["urn:bob"])
    assert await stored(harness) == STORES_PER_WINDOW + 1


async def test_a_slot_answers_only_for_the_hash_it_holds(harness: ModuleHarness) -> None:
    """The table has `CAPS_SLOTS` entries: a hash whose slot another took is unknown
    (asked again), never given the other's features."""
    items = harness.host.items("localhost", "caps")
    caps = CapsStore()
    first = "sha-1/first"
    rival = next(key for key in (f"sha-1/v{i}" for i in itertools.count())
                 if slot_of(key) == slot_of(first))
    assert await caps.store(items, "a@localhost", first, ["urn:a"])
    assert await caps.read(items, rival) is None
    assert await caps.store(items, "b@localhost", rival, ["urn:b"])
    assert await caps.read(items, rival) == ["urn:b"]
    assert await caps.read(items, first) is None
    assert len({slot_of(f"sha-1/{i}") for i in range(20 * CAPS_SLOTS)}) == CAPS_SLOTS
