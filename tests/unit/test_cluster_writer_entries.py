"""The writer puts the stanzas and stream ends it queued in a row for one node in one
inbox entry (one FORWARD), keeping the queue's order within each node's inbox and
behind any table write queued between them (`Writer._commands`)."""

from __future__ import annotations

from typing import Any

from lxml import etree
from redis.asyncio import Redis

from xmppd.cluster import schema
from xmppd.cluster.inbox import split_fields
from xmppd.cluster.stats import ClusterStats
from xmppd.cluster.writer import PER_ENTRY, Op, Writer
from xmppd.stream.errors import StreamError


def writer() -> Writer:
    return Writer(Redis.from_url("redis://127.0.0.1:1/0"), "me", ClusterStats())


def message(n: int) -> etree._Element:
    return etree.fromstring(f"<message xmlns='jabber:client' id='m{n}'/>")


def forwards(w: Writer) -> list[tuple[str, list[Any]]]:
    """(target inbox, the entry's fields) of each FORWARD, in command order; "-" for
    another command."""
    commands, _ = w._commands(list(w._ops))
    found: list[tuple[str, list[Any]]] = []
    for command in commands:
        if command[0] == "EVALSHA" and command[1] == w._forward.sha:
            found.append((str(command[3]), list(command[6:])))
        else:
            found.append(("-", []))
    return found


def split(fields: list[Any]) -> tuple[dict[bytes, bytes], list[dict[bytes, bytes]]]:
    """The entry as the inbox reads it back (Redis answers every value as bytes)."""
    return split_fields([f if isinstance(f, bytes) else str(f).encode() for f in fields])


def stanza_ids(fields: list[Any]) -> list[str]:
    return [etree.fromstring(i[b"stanza"]).get("id") for i in split(fields)[1] if b"stanza" in i]


def test_stanzas_in_a_row_for_one_node_are_one_entry_in_order() -> None:
    w = writer()
    for n in range(5):
        assert w.forward("b", "u@x/r", message(n))
    found = forwards(w)
    assert [target for target, _ in found] == [schema.inbox_key("b")]
    assert stanza_ids(found[0][1]) == ["m0", "m1", "m2", "m3", "m4"]
    assert split(found[0][1])[0] == {b"from": b"me", b"seq": b"0"}


def test_each_node_gets_its_own_entry_and_every_op_its_entrys_answer() -> None:
    w = writer()
    w.forward("b", "u@x/r", message(0))
    w.forward("c", "v@x/r", message(1))
    w.forward("b", "u@x/r", message(2))
    w.terminate("c", "v@x/r", "sid", StreamError("conflict"))
    commands, owners = w._commands(list(w._ops))
    assert [c[3] for c in commands] == [schema.inbox_key("b"), schema.inbox_key("c")]
    assert owners == [[0, 2], [1, 3]]
    assert stanza_ids(list(commands[0][6:])) == ["m0", "m2"]


def test_a_table_write_between_stanzas_stays_between_them() -> None:
    w = writer()
    w.forward("b", "u@x/r", message(0))
    w._put(Op(("SET", "k", "v")))
    w.forward("b", "u@x/r", message(1))
    found = forwards(w)
    assert [target for target, _ in found] == [schema.inbox_key("b"), "-", schema.inbox_key("b")]
    assert stanza_ids(found[0][1]) == ["m0"]
    assert stanza_ids(found[2][1]) == ["m1"]


def test_an_entry_holds_at_most_per_entry_stanzas() -> None:
    w = writer()
    for n in range(PER_ENTRY + 1):
        w.forward("b", "u@x/r", message(n))
    found = forwards(w)
    assert [len(stanza_ids(fields)) for _, fields in found] == [PER_ENTRY, 1]
