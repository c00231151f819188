"""ClusterDirectory's replica rules, without Redis: what the router sees after each event."""

from __future__ import annotations

import asyncio

import pytest
from lxml import etree
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from xmppd.cluster import directory as directory_module
from xmppd.cluster import schema
from xmppd.cluster.directory import ClusterDirectory, RemoteTransport
from xmppd.cluster.schema import Entry
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.writer import Writer
from xmppd.session import ClientSession
from xmppd.stream.errors import StreamError


class Recorder:
    """The directory's Outbox, writing down what would go to Redis."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.entries: list[Entry] = []

    def bound(self, session: ClientSession, entry: Entry, known_owner: str | None) -> None:
        self.calls.append(("bound", session.jid, str(known_owner)))
        self.entries.append(entry)

    def updated(self, session: ClientSession, entry: Entry) -> None:
        self.calls.append(("updated", session.jid, str(entry.available), str(entry.priority)))
        self.entries.append(entry)

    def unbound(self, session: ClientSession) -> None:
        self.calls.append(("unbound", session.jid))

    def forward(self, node: str, jid: str, stanza: etree._Element) -> bool:
        self.calls.append(("forward", node, jid))
        return True

    def terminate(self, node: str, jid: str, sid: str, error: StreamError) -> None:
        self.calls.append(("terminate", node, jid, sid, error.condition))


def directory() -> tuple[ClusterDirectory, Recorder]:
    outbox = Recorder()
    return ClusterDirectory("me", outbox), outbox


def test_remote_sessions_are_sessions_whose_transport_forwards() -> None:
    d, outbox = directory()
    d.apply_set(Entry("bob@x/phone", "other", 3, True))
    session = d.get("bob@x", "phone")
    assert session is not None and isinstance(session.transport, RemoteTransport)
    assert (session.available, session.priority) == (True, 3)
    assert d.has("bob@x") and d.available("bob@x") == [session] and d.count() == 0
    assert session.deliver(etree.Element("message"))
    assert outbox.calls == [("forward", "other", "bob@x/phone")]


def test_an_unbind_from_a_node_that_no_longer_holds_the_resource_is_ignored() -> None:
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "old", 0, True))
    d.apply_set(Entry("bob@x/phone", "new", 0, True))
    d.apply_unbind("old", "bob@x/phone")
    session = d.get("bob@x", "phone")
    assert session is not None and session.transport.node == "new"  # type: ignore[union-attr]
    d.apply_unbind("new", "bob@x/phone")
    assert not d.has("bob@x")


def test_a_dropped_session_refuses_delivery_so_the_router_falls_back() -> None:
    d, outbox = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True))
    session = d.get("bob@x", "phone")
    assert session is not None
    d.apply_node_gone("other")
    assert not d.has("bob@x")
    assert not session.deliver(etree.Element("message"))
    assert outbox.calls == []


def test_a_local_bind_replaces_the_remote_session_and_names_its_node() -> None:
    d, outbox = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True, sid="s1"))
    remote = d.get("bob@x", "phone")
    local = ClientSession("bob@x/phone")
    assert d.add(local) is remote
    assert d.get("bob@x", "phone") is local
    assert outbox.calls == [("bound", "bob@x/phone", "other")]
    assert remote is not None
    remote.terminate(StreamError("conflict"))
    assert outbox.calls[-1] == ("terminate", "other", "bob@x/phone", "s1", "conflict")


def test_a_new_session_on_the_same_node_and_resource_is_a_new_replica_session() -> None:
    """A request to end the old one names the old one's id, not the new one's."""
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True, sid="s1"))
    old = d.get("bob@x", "phone")
    d.apply_set(Entry("bob@x/phone", "other", 0, True, sid="s2"))
    new = d.get("bob@x", "phone")
    assert new is not old and new is not None and old is not None
    assert new.transport.sid == "s2"  # type: ignore[union-attr]
    assert not old.deliver(etree.Element("message"))  # the old one is gone


def test_only_real_changes_of_a_local_session_are_written() -> None:
    d, outbox = directory()
    session = ClientSession("bob@x/phone")
    d.add(session)
    d.presence_changed(session)  # nothing changed
    session.available, session.priority = True, 5
    d.presence_changed(session)
    d.presence_changed(session)
    assert d.remove(session)
    d.presence_changed(session)  # no longer bound
    assert outbox.calls == [
        ("bound", "bob@x/phone", "None"),
        ("updated", "bob@x/phone", "True", "5"),
        ("unbound", "bob@x/phone"),
    ]


def test_events_about_this_node_do_not_enter_the_replica() -> None:
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "me", 0, True))
    assert not d.has("bob@x")


async def test_a_load_replaces_the_replica() -> None:
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True))
    d.apply_set(Entry("carol@x/pc", "other", 0, True))
    kept = d.get("carol@x", "pc")
    await d.load([Entry("carol@x/pc", "other", 2, False), Entry("dave@x/pad", "third", 0, True)])
    assert not d.has("bob@x")
    assert d.get("carol@x", "pc") is kept and kept is not None and kept.priority == 2
    assert d.has("dave@x") and sorted(d.accounts()) == ["carol@x", "dave@x"]


async def test_a_load_lets_the_event_loop_run_between_slices() -> None:
    """A reconnect's table of many sessions is replayed LOAD_SLICE entries per turn:
    the node's clients are served meanwhile (in one call, 100,000 held them 0.2-1.3 s)."""
    d, _ = directory()
    for i in range(3000):
        d.apply_set(Entry(f"gone{i}@x/pc", "other", 0, True))
    table = [Entry(f"u{i}@x/pc", "other", 0, True) for i in range(5000)]
    turns = 0
    loading = True

    async def probe() -> None:
        nonlocal turns
        while loading:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(probe())
    await asyncio.sleep(0)
    await d.load(table)
    loading = False
    await task
    # 5 slices of the table and 3 of the 8,000 accounts to check, a turn after each.
    assert turns >= 5 + 3
    assert sorted(d.accounts()) == sorted(f"u{i}@x" for i in range(5000))
    assert d.remote_count() == 5000


async def test_a_local_bind_between_two_slices_of_a_load() -> None:
    """A client binds while a load is under way, on a resource the old replica had
    on another node: the load goes on (nothing iterates what the bind changed) and
    ends with the table's replica, the local session first for the router."""
    d, outbox = directory()
    for i in range(3000):
        d.apply_set(Entry(f"gone{i}@x/pc", "other", 0, True))
    table = [Entry(f"u{i}@x/pc", "other", 0, True) for i in range(3000)]
    local_gone, local_new = ClientSession("gone2999@x/pc"), ClientSession("u2999@x/pc")

    async def bind() -> None:
        await asyncio.sleep(0)  # the load has applied its first slice
        d.add(local_gone)  # its remote session, stale, is dropped here, not by the load
        d.add(local_new)  # not in the replica yet: the table puts the remote one back

    task = asyncio.create_task(bind())
    await d.load(table)
    await task
    assert ("bound", "gone2999@x/pc", "other") in outbox.calls
    assert ("bound", "u2999@x/pc", "None") in outbox.calls
    assert d.get("gone2999@x", "pc") is local_gone
    assert d.get("u2999@x", "pc") is local_new
    assert d.resources("u2999@x") == [local_new]
    assert not any(d.has(f"gone{i}@x") for i in range(2999))
    assert d.remote_count() == 3000


def test_cut_off_from_redis_the_other_nodes_sessions_count_as_gone() -> None:
    """Nothing reaches them while Redis does not answer: the router must not choose
    them (offline storage, errors), and sees them again once Redis answers."""
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True))
    local = ClientSession("bob@x/desk")
    d.add(local)
    d.cut(True)
    assert d.get("bob@x", "phone") is None
    assert d.resources("bob@x") == [local]
    assert not d.has("carol@x") and list(d.accounts()) == ["bob@x"]
    d.remove(local)
    assert not d.has("bob@x")
    d.cut(False)
    assert d.get("bob@x", "phone") is not None and d.has("bob@x")


def test_the_replica_carries_since_and_address_and_old_entries_still_decode() -> None:
    entry = Entry("bob@x/phone", "other", 1, True, since=1765000000.5, address="192.0.2.7")
    assert Entry.decode(entry.jid, entry.encode()) == entry
    d, _ = directory()
    d.apply_set(entry)
    session = d.get("bob@x", "phone")
    assert session is not None
    assert (session.since, session.address) == (1765000000.5, "192.0.2.7")
    # written by a node from before these fields: decoded with "unknown" values
    old = Entry.decode("bob@x/pc", b'{"node": "n", "priority": 0, "available": true}')
    assert (old.since, old.address) == (0.0, "")


def test_presence_and_shared_state_go_with_the_entry_and_into_the_replica() -> None:
    """What one node writes of its session (last presence, shared state) is what the
    other node's replica session has: `presence` parsed, `state` as written."""
    d, outbox = directory()
    session = ClientSession("bob@x/phone")
    d.add(session)
    session.available, session.priority = True, 1
    session.presence = etree.fromstring(
        "<presence xmlns='jabber:client'><show>away</show><priority>1</priority></presence>"
    )
    d.presence_changed(session)
    session.state["carbons"] = True
    d.state_changed(session, "carbons")
    d.state_changed(session, "carbons")  # unchanged: not written again
    del session.state["carbons"]
    session.state["privacy/active"] = "work"
    d.state_changed(session, "carbons")
    d.state_changed(session, "privacy/active")
    written = outbox.entries[-1]
    assert [e.state for e in outbox.entries] == [
        {}, {}, {"carbons": True}, {}, {"privacy/active": "work"}
    ]
    assert written.presence is not None and "away" in written.presence
    # the same entry, through its JSON, on another node
    other = ClusterDirectory("elsewhere", Recorder())
    moved = Entry.decode(written.jid, written.encode())
    other.apply_set(moved)
    replica = other.get("bob@x", "phone")
    assert replica is not None and replica.state == {"privacy/active": "work"}
    assert replica.presence is not None
    assert replica.presence.findtext("{jabber:client}show") == "away"
    parsed = replica.presence
    other.apply_set(Entry(moved.jid, "me", 1, True, presence=moved.presence, sid=moved.sid))
    assert replica.presence is parsed and replica.state == {}  # parsed once per change
    other.apply_set(Entry(moved.jid, "me", 1, False, sid=moved.sid))
    assert replica.presence is None and not replica.available


def test_a_state_change_of_a_session_not_bound_is_not_written() -> None:
    d, outbox = directory()
    session = ClientSession("bob@x/phone")
    session.state["carbons"] = True
    d.state_changed(session, "carbons")
    assert outbox.calls == []


def test_shared_state_json_cannot_encode_fails_its_setter_not_the_writer() -> None:
    """The writer encodes when it queues, so the module that set the value gets the
    TypeError, the entry keeps its last good state and nothing broken is queued."""
    # never connects here
    writer = Writer(Redis.from_url("redis://127.0.0.1:1/0"), "me", ClusterStats())
    d = ClusterDirectory("me", writer)
    session = ClientSession("bob@x/phone")
    d.add(session)
    queued = len(writer._ops)
    session.state["carbons"] = {1, 2}  # a set: not JSON
    with pytest.raises(TypeError):
        d.state_changed(session, "carbons")
    assert len(writer._ops) == queued
    session.state["carbons"] = True
    d.state_changed(session, "carbons")
    assert len(writer._ops) == queued + 1


class Clock:
    """The directory's clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_whose_node_refused_a_forward_counts_as_gone_for_a_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What routes a refused stanza again, now or later, must not choose that session
    again (it would be refused again: a loop while Redis refuses writes); the
    account's other resources are still chosen, and the session counts again after
    HOLD seconds."""
    clock = Clock()
    monkeypatch.setattr(directory_module, "monotonic", clock)
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True))
    d.apply_set(Entry("bob@x/pad", "third", 0, True))
    phone, pad = d.get("bob@x", "phone"), d.get("bob@x", "pad")
    d.hold("other", "bob@x/phone")
    assert d.get("bob@x", "phone") is None
    assert d.resources("bob@x") == [pad] and d.available("bob@x") == [pad]
    assert d.has("bob@x")  # the account still has sessions: no storage read to route
    clock.now += directory_module.HOLD - 0.01
    assert d.get("bob@x", "phone") is None
    clock.now += 0.02
    assert d.get("bob@x", "phone") is phone and d.resources("bob@x") == [phone, pad]


async def test_a_hold_names_the_node_and_ends_with_the_session(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A refusal from a node the replica no longer has the resource on changes nothing;
    a table reload keeps the hold on the same session (same node and id), and a new
    session on the resource is not held."""
    monkeypatch.setattr(directory_module, "monotonic", Clock())
    d, _ = directory()
    d.apply_set(Entry("bob@x/phone", "other", 0, True, sid="s1"))
    phone = d.get("bob@x", "phone")
    d.hold("elsewhere", "bob@x/phone")
    d.hold("other", "carol@x/pc")
    assert d.get("bob@x", "phone") is phone
    d.hold("other", "bob@x/phone")
    await d.load([Entry("bob@x/phone", "other", 0, True, sid="s1")])
    assert d.get("bob@x", "phone") is None
    d.apply_set(Entry("bob@x/phone", "other", 0, True, sid="s2"))
    renewed = d.get("bob@x", "phone")
    assert renewed is not None and renewed is not phone


def test_a_forward_redis_refuses_holds_the_session_before_it_is_routed_again() -> None:
    """An error reply or a full inbox: `on_refused` first, so that routing it again
    already sees the session gone; a reaped node: `on_gone` instead."""
    # never connects here
    writer = Writer(Redis.from_url("redis://127.0.0.1:1/0"), "me", ClusterStats())
    calls: list[tuple[str, ...]] = []
    writer.on_refused = lambda node, jid: calls.append(("refused", node, jid))
    writer.on_gone = lambda node: calls.append(("gone", node))
    writer.reroute = lambda stanza, hops, avoid: calls.append(("reroute", str(hops), str(avoid)))
    for answer in (ResponseError("OOM command not allowed"), schema.INBOX_FULL, schema.NODE_GONE):
        calls.clear()
        assert writer.forward("other", "bob@x/phone", etree.Element("message"))
        op = writer._ops.pop()
        assert op.on_result is not None
        op.on_result(answer)
        gone = answer == schema.NODE_GONE
        first = ("gone", "other") if gone else ("refused", "other", "bob@x/phone")
        assert calls == [first, ("reroute", "0", "other")]
    assert writer.stats.forwards_refused == 3
