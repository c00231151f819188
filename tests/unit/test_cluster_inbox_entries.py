"""The inbox reads XREAD's raw answer (xmppd.cluster.channel): both reply protocols
give the shape `Inbox._handle_all` takes."""

from xmppd.cluster.inbox import _entries


def test_a_resp3_answer_is_read_as_redis_py_gave_it() -> None:
    raw = {b"xmppd:inbox:a": [[b"1-0", [b"to", b"u@x/r", b"hops", b"1"]], [b"1-1", [b"wake", b""]]]}
    assert _entries(raw) == [
        (b"xmppd:inbox:a", [(b"1-0", {b"to": b"u@x/r", b"hops": b"1"}), (b"1-1", {b"wake": b""})])
    ]


def test_a_resp2_answer_is_read_the_same_way() -> None:
    raw = [[b"xmppd:inbox:a", [[b"1-0", [b"to", b"u@x/r"]]]]]
    assert _entries(raw) == [(b"xmppd:inbox:a", [(b"1-0", {b"to": b"u@x/r"})])]


def test_nothing_read_is_no_entries() -> None:
    assert _entries(None) == []
