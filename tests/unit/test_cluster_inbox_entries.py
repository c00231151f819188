"""The inbox reads XREAD's raw answer (xmppd.cluster.channel): both reply protocols
give the shape `Inbox._handle_all` takes, and an entry's fields split into the entry's
own and its items (several stanzas in one entry, xmppd.cluster.writer)."""

from xmppd.cluster.inbox import _entries, split_fields


def test_a_resp3_answer_is_read_as_redis_py_gave_it() -> None:
    raw = {b"xmppd:inbox:a": [[b"1-0", [b"to", b"u@x/r", b"hops", b"1"]], [b"1-1", [b"wake", b""]]]}
    assert _entries(raw) == [
        (b"xmppd:inbox:a", [(b"1-0", [b"to", b"u@x/r", b"hops", b"1"]), (b"1-1", [b"wake", b""])])
    ]


def test_a_resp2_answer_is_read_the_same_way() -> None:
    raw = [[b"xmppd:inbox:a", [[b"1-0", [b"to", b"u@x/r"]]]]]
    assert _entries(raw) == [(b"xmppd:inbox:a", [(b"1-0", [b"to", b"u@x/r"])])]


def test_nothing_read_is_no_entries() -> None:
    assert _entries(None) == []


def test_an_entry_of_several_items_splits_at_each_to_in_order() -> None:
    fields = [
        b"to", b"u@x/r", b"stanza", b"<m1/>", b"hops", b"1",
        b"to", b"v@x/r", b"sid", b"s1", b"end", b"conflict", b"text", b"",
        b"to", b"u@x/r", b"stanza", b"<m2/>", b"hops", b"2", b"t", b"1.5",
        b"from", b"node-a", b"seq", b"7", b"orphan", b"node-b",
    ]
    head, items = split_fields(fields)
    assert head == {b"from": b"node-a", b"seq": b"7", b"orphan": b"node-b"}
    assert items == [
        {b"to": b"u@x/r", b"stanza": b"<m1/>", b"hops": b"1"},
        {b"to": b"v@x/r", b"sid": b"s1", b"end": b"conflict", b"text": b""},
        {b"to": b"u@x/r", b"stanza": b"<m2/>", b"hops": b"2", b"t": b"1.5"},
    ]


def test_an_entry_of_one_stanza_as_written_before_reads_as_one_item() -> None:
    """One stanza per entry, its latency sample after the sender's fields."""
    fields = [b"to", b"u@x/r", b"stanza", b"<m/>", b"hops", b"1", b"from", b"a", b"seq", b"3",
              b"t", b"2.5"]
    head, items = split_fields(fields)
    assert head == {b"from": b"a", b"seq": b"3"}
    assert items == [{b"to": b"u@x/r", b"stanza": b"<m/>", b"hops": b"1", b"t": b"2.5"}]


def test_a_wake_entry_has_no_items() -> None:
    assert split_fields([b"wake", b""]) == ({b"wake": b""}, [])
