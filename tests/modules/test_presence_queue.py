"""The presence module's queue of subscription changes per account (modules/_queues.py):
one task works it, in the order the changes came; a client is held back by the router,
a flood from another server is bounded and every presence past the bound answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

from lxml import etree

from tests.modules.slow_stores import GatedSQLite
from xmppd.modules.presence import INBOUND_WAITING
from xmppd.modules.roster import RosterModule
from xmppd.router import WORK_PER_SENDER
from xmppd.storage.backends.files import FileBlobBackend
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.testing import ModuleHarness, RecordingRemote, parse_stanza

STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
ALICE = "alice@localhost"


async def slow_harness(tmp_path: Path) -> tuple[ModuleHarness, GatedSQLite, RecordingRemote]:
    """Roster and presence over a store whose writes wait for the test to open its gate,
    with what goes to other servers recorded."""
    items = await GatedSQLite.open(tmp_path / "items.sqlite3")
    storage = Storage(items, await FileBlobBackend.open(tmp_path / "blobs"), NullCache())
    harness = ModuleHarness({"roster": {}, "presence": {}})
    harness.storage = harness.host.storage = storage
    remote = RecordingRemote()
    harness.router.remote = remote
    harness.users.add(ALICE)
    await harness.start()
    return harness, items, remote


def roster_of(harness: ModuleHarness) -> RosterModule:
    module = harness.host.modules["roster"]
    assert isinstance(module, RosterModule)
    return module


async def settle() -> None:
    """Let the loop run what is ready (no store write can finish: the gate is shut)."""
    for _ in range(50):
        await asyncio.sleep(0)


def from_remote(type_: str, sender: str, to: str = ALICE) -> etree._Element:
    stanza = parse_stanza(f"<presence type='{type_}' to='{to}'/>")
    stanza.set("from", sender)
    return stanza


async def test_a_flood_from_another_server_is_bounded_and_the_rest_answered(
    tmp_path: Path,
) -> None:
    """Another server sends alice more subscription requests than may wait while her
    roster store is slow: INBOUND_WAITING wait, each one past that is answered with
    resource-constraint (never dropped unseen), and those taken are made in the order
    they came."""
    harness, items, remote = await slow_harness(tmp_path)
    alice = harness.session(f"{ALICE}/a")
    extra = 20
    senders = [f"x{n}@remote.example" for n in range(INBOUND_WAITING + extra)]
    for sender in senders:
        harness.router.route(from_remote("subscribe", sender))
    await settle()
    errors = [s for s in remote.routed if s.get("type") == "error"]
    assert [e.get("to") for e in errors] == senders[INBOUND_WAITING:]
    for error in errors:
        assert error.get("from") == ALICE
        assert error.find(f"{{jabber:client}}error/{{{STANZAS}}}resource-constraint") is not None
        assert error.find("{jabber:client}error").get("type") == "wait"
    remote.routed.clear()
    items.gate.set()
    await harness.router.drain()
    assert remote.routed == []  # nothing else answered
    requests = [s.get("from") for s in alice.take() if s.get("type") == "subscribe"]
    assert requests == senders[:INBOUND_WAITING]  # delivered in the order sent
    roster = await roster_of(harness).get(ALICE)
    assert sorted(roster.items) == sorted(senders[:INBOUND_WAITING])
    assert all(item.pending_in for item in roster.items.values())
    # The bound is on what waits, not a quota: the next one is taken (a request
    # cancelled; another request would meet the roster's own max_pending).
    harness.router.route(from_remote("unsubscribe", senders[0]))
    await harness.router.drain()
    assert [(s.get("type"), s.get("from")) for s in alice.take()] == [("unsubscribe", senders[0])]
    assert remote.routed == []


async def test_a_client_s_changes_take_one_task_and_keep_their_order(tmp_path: Path) -> None:
    """A client sends 98 subscription changes, back and forth to the same contacts,
    while the store is slow: they wait as queued changes of one task (not a task each,
    the router holding the client past WORK_PER_SENDER), then go out and land in the
    order sent."""
    harness, items, remote = await slow_harness(tmp_path)
    alice = harness.session(f"{ALICE}/a")
    contacts = ["x@remote.example", "y@remote.example"]
    kinds = ["subscribe", "unsubscribe"] * 24 + ["subscribe"]  # 49 per contact
    tasks_before = len(asyncio.all_tasks())
    for kind in kinds:
        for contact in contacts:
            stanza = parse_stanza(f"<presence type='{kind}' to='{contact}'/>")
            stanza.set("from", alice.jid)
            alice.receive(stanza)
    await settle()
    assert alice.input_holds == 1  # held: WORK_PER_SENDER changes wait
    assert len(harness.router.account_work(ALICE)) <= WORK_PER_SENDER + 2
    # the queue's task and the session's pipeline, whatever the number of changes
    assert len(asyncio.all_tasks()) - tasks_before <= 2
    items.gate.set()
    idle = asyncio.Event()
    alice.when_idle(idle.set)
    await idle.wait()
    await harness.router.drain()
    routed = [(s.get("to"), s.get("type")) for s in remote.routed]
    for contact in contacts:
        assert [type_ for to, type_ in routed if to == contact] == kinds, contact
        item = await roster_of(harness).item(ALICE, contact)
        assert item is not None and item.ask  # the last change was a subscribe


async def test_changes_from_the_client_and_from_contacts_share_one_order(
    tmp_path: Path,
) -> None:
    """alice's roster changes in the order the presences came, whoever sent them: a
    contact's request, then her refusal, leave nothing pending and the refusal sent
    on; had the refusal overtaken the request, it would have found nothing to refuse
    and left the request pending."""
    harness, items, remote = await slow_harness(tmp_path)
    alice = harness.session(f"{ALICE}/a")
    contact = "x@remote.example"
    harness.router.route(from_remote("subscribe", contact))
    await settle()
    refusal = parse_stanza(f"<presence type='unsubscribed' to='{contact}'/>")
    refusal.set("from", alice.jid)
    alice.receive(refusal)
    await settle()
    items.gate.set()
    await harness.router.drain()
    assert await roster_of(harness).item(ALICE, contact) is None
    assert [type_ for _, type_ in remote.take(contact)] == ["unsubscribed"]
