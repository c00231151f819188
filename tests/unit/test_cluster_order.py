"""ReplicaSync.caught_up: a forwarded stanza waits for its sender's earlier table change."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from xmppd.cluster import sync as sync_module
from xmppd.cluster.directory import ClusterDirectory
from xmppd.cluster.schema import Entry, seq_event, set_event
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.sync import ReplicaSync


class NoOutbox:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the replica wrote {name}")


def replica() -> tuple[ReplicaSync, ClusterDirectory]:
    directory = ClusterDirectory("me", NoOutbox())  # type: ignore[arg-type]
    return ReplicaSync(None, directory, lambda: None, ClusterStats()), directory  # type: ignore[arg-type]


async def test_a_stanza_waits_until_the_change_before_it_is_applied() -> None:
    sync, directory = replica()
    assert not sync.behind("a", 0)  # a node that made no change yet: nothing to wait for
    assert sync.behind("a", 7)
    waiting = asyncio.ensure_future(sync.caught_up("a", 7))
    sync._apply(set_event(Entry("bob@x/phone", "a", 0, True), 6).encode())
    await asyncio.sleep(0)
    assert not waiting.done()
    sync._apply(set_event(Entry("bob@x/phone", "a", 3, True), 7).encode())
    await asyncio.wait_for(waiting, 1)
    session = directory.get("bob@x", "phone")
    assert session is not None and session.priority == 3  # applied before it returned
    # a change another node's newer login made void still counts (no "set" for it)
    sync._apply(seq_event("a", 8).encode())
    assert not sync.behind("a", 8)


async def test_a_change_that_never_arrives_is_waited_for_a_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sync_module, "ORDER_WAIT", 0.05)
    sync, _ = replica()
    await asyncio.wait_for(sync.caught_up("a", 5), 1)
    assert not sync.behind("a", 5)  # the next stanzas of that node do not wait again


def test_the_numbers_only_go_forward() -> None:
    sync, _ = replica()
    sync._apply(json.dumps({"op": "seq", "node": "a", "seq": 9}).encode())
    sync._apply(json.dumps({"op": "seq", "node": "a", "seq": 4}).encode())  # sent twice
    assert sync.applied == {"a": 9}
