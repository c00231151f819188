"""The storage contract (storage/base.py), run against every registered backend."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from xmppd.storage.base import (
    MAX_ITEM_BYTES,
    MAX_KEY_BYTES,
    BlobBackend,
    BlobStore,
    ConditionFailed,
    Delete,
    Item,
    ItemBackend,
    ItemStore,
    Put,
    Query,
    TooLarge,
    Write,
)
from xmppd.storage.codec import name_token

from .conftest import TEST_MAX_BLOB_BYTES

ODD_NAMES = [
    "a b",
    " padded ",
    "a/b/c",
    "..",
    "../../etc/passwd",
    ".",
    ".hidden",
    "ümlaut",
    "😀",
    "日本語",
    "%41",
    "a%2Fb",
    "~",
    "+",
    "a\\b",
    "a:b",
    "*?<>|\"'",
]


async def all_pages(backend: ItemBackend, namespace: str, query: Query) -> list[Item]:
    items: list[Item] = []
    for _ in range(1000):
        page = await backend.query(namespace, query)
        assert len(page.items) <= query.limit
        items += page.items
        if page.next_token is None:
            return items
        query.page_token = page.next_token
    raise AssertionError("paging never ended")


def names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


# -- items: single operations -------------------------------------------------


async def test_get_missing(item_backend: ItemBackend, ns: str) -> None:
    assert await item_backend.get(ns, "nobody") is None


async def test_put_get_roundtrip_keeps_types(item_backend: ItemBackend, ns: str) -> None:
    attrs = {
        "s": "text",
        "empty_s": "",
        "i": 42,
        "neg": -7,
        "big": 2**63 - 1,
        "small": -(2**63),
        "b": bytes(range(256)),
        "empty_b": b"",
        "one_s": "1",
        "one_b": b"1",
        "one_i": 1,
    }
    item = await item_backend.put(ns, "alice", attrs)
    assert item == Item("alice", attrs, 1)
    got = await item_backend.get(ns, "alice")
    assert got == Item("alice", attrs, 1)
    assert got is not None
    assert type(got.attrs["one_s"]) is str
    assert type(got.attrs["one_b"]) is bytes
    assert type(got.attrs["one_i"]) is int


async def test_empty_attrs(item_backend: ItemBackend, ns: str) -> None:
    await item_backend.put(ns, "bare", {})
    assert await item_backend.get(ns, "bare") == Item("bare", {}, 1)


async def test_put_replaces_attrs_and_bumps_version(item_backend: ItemBackend, ns: str) -> None:
    await item_backend.put(ns, "k", {"a": 1, "b": 2})
    item = await item_backend.put(ns, "k", {"c": "x"})
    assert item.version == 2
    assert await item_backend.get(ns, "k") == Item("k", {"c": "x"}, 2)
    assert (await item_backend.put(ns, "k", {})).version == 3


async def test_version_restarts_after_delete(item_backend: ItemBackend, ns: str) -> None:
    await item_backend.put(ns, "k", {})
    await item_backend.put(ns, "k", {})
    assert await item_backend.delete(ns, "k") is True
    assert (await item_backend.put(ns, "k", {})).version == 1


async def test_if_absent(item_backend: ItemBackend, ns: str) -> None:
    assert (await item_backend.put(ns, "k", {"v": 1}, if_absent=True)).version == 1
    with pytest.raises(ConditionFailed):
        await item_backend.put(ns, "k", {"v": 2}, if_absent=True)
    assert await item_backend.get(ns, "k") == Item("k", {"v": 1}, 1)


async def test_if_version(item_backend: ItemBackend, ns: str) -> None:
    with pytest.raises(ConditionFailed):
        await item_backend.put(ns, "k", {"v": 0}, if_version=1)  # absent
    assert await item_backend.get(ns, "k") is None
    await item_backend.put(ns, "k", {"v": 1})
    assert (await item_backend.put(ns, "k", {"v": 2}, if_version=1)).version == 2
    with pytest.raises(ConditionFailed):
        await item_backend.put(ns, "k", {"v": 3}, if_version=1)  # stale
    with pytest.raises(ConditionFailed):
        await item_backend.put(ns, "k", {"v": 3}, if_version=7)  # from the future
    assert await item_backend.get(ns, "k") == Item("k", {"v": 2}, 2)


async def test_if_absent_and_if_version_exclude_each_other(
    item_backend: ItemBackend, ns: str
) -> None:
    with pytest.raises(ValueError):
        await item_backend.put(ns, "k", {}, if_absent=True, if_version=1)


async def test_delete(item_backend: ItemBackend, ns: str) -> None:
    assert await item_backend.delete(ns, "k") is False
    with pytest.raises(ConditionFailed):
        await item_backend.delete(ns, "k", if_version=1)  # absent
    await item_backend.put(ns, "k", {})
    await item_backend.put(ns, "k", {})
    with pytest.raises(ConditionFailed):
        await item_backend.delete(ns, "k", if_version=1)  # stale
    assert await item_backend.get(ns, "k") is not None
    assert await item_backend.delete(ns, "k", if_version=2) is True
    assert await item_backend.get(ns, "k") is None
    assert await item_backend.delete(ns, "k") is False


@pytest.mark.parametrize(
    "attrs",
    [{"flag": True}, {"n": 2**63}, {"n": -(2**63) - 1}, {"f": 1.5}, {"x": None}, {"": "v"}],
)
async def test_invalid_attrs_rejected(item_backend: ItemBackend, ns: str, attrs: dict) -> None:
    with pytest.raises(ValueError):
        await item_backend.put(ns, "k", attrs)
    assert await item_backend.get(ns, "k") is None


async def test_invalid_names_rejected(item_backend: ItemBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await item_backend.put(ns, "", {})
    longest = "é" * (MAX_KEY_BYTES // 2)  # two bytes each
    await item_backend.put(ns, longest, {})
    assert await item_backend.get(ns, longest) is not None
    with pytest.raises(TooLarge):
        await item_backend.put(ns, longest + "x", {})


async def test_item_size_limit(item_backend: ItemBackend, ns: str) -> None:
    room = MAX_ITEM_BYTES - len("big") - len("v")
    await item_backend.put(ns, "big", {"v": b"\xff" * room})
    got = await item_backend.get(ns, "big")
    assert got is not None and got.attrs["v"] == b"\xff" * room
    with pytest.raises(TooLarge):
        await item_backend.put(ns, "big", {"v": b"\xff" * (room + 1)})
    with pytest.raises(TooLarge):
        await item_backend.put(ns, "big", {"v": "é" * (room // 2 + 1)})
    assert (await item_backend.get(ns, "big")) == got


async def test_odd_names_and_unicode(item_backend: ItemBackend, ns: str) -> None:
    for n, name in enumerate(ODD_NAMES):
        await item_backend.put(ns, name, {"n": n, "ключ 😀": name})
    for n, name in enumerate(ODD_NAMES):
        assert await item_backend.get(ns, name) == Item(name, {"n": n, "ключ 😀": name}, 1)
    listed = await all_pages(item_backend, ns, Query(limit=5))
    assert names(listed) == sorted(ODD_NAMES)


async def test_namespaces_are_isolated(item_backend: ItemBackend, ns: str, ns2: str) -> None:
    await item_backend.put(ns, "k", {"v": 1})
    await item_backend.put(ns2, "k", {"v": 2})
    await item_backend.put(ns2, "k", {"v": 3})
    assert await item_backend.get(ns, "k") == Item("k", {"v": 1}, 1)
    assert await item_backend.get(ns2, "k") == Item("k", {"v": 3}, 2)
    assert names(await all_pages(item_backend, ns, Query())) == ["k"]
    assert await item_backend.delete(ns, "k")
    assert await item_backend.get(ns2, "k") is not None
    # a namespace that is a prefix of another, and names containing "/"
    await item_backend.put(ns + "/x", "y", {"v": "nested"})
    await item_backend.put(ns, "x/y", {"v": "flat"})
    assert (await item_backend.get(ns + "/x", "y")) == Item("y", {"v": "nested"}, 1)
    assert (await item_backend.get(ns, "x/y")) == Item("x/y", {"v": "flat"}, 1)
    assert names(await all_pages(item_backend, ns, Query())) == ["x/y"]


# -- items: queries --------------------------------------------------------------


async def fill(backend: ItemBackend, ns: str) -> None:
    rows = {
        "alice": {"group": "a", "age": 30, "nick": "Al"},
        "bob": {"group": "b", "age": 25, "nick": "Bobby"},
        "carol": {"group": "a", "age": 25},
        "dave": {"group": "a", "age": 41, "nick": "D"},
        "erin": {"group": "b", "age": 30, "nick": "E"},
        "frank": {"group": "a", "age": "30"},  # a str, not the int 30
        "al": {"group": "a", "age": 19, "nick": "A"},
    }
    await backend.batch_put(ns, rows)


async def test_query_all_by_name(item_backend: ItemBackend, ns: str) -> None:
    await fill(item_backend, ns)
    everyone = sorted(["alice", "bob", "carol", "dave", "erin", "frank", "al"])
    assert names(await all_pages(item_backend, ns, Query())) == everyone
    assert names(await all_pages(item_backend, ns, Query(order_by="name"))) == everyone
    assert names(await all_pages(item_backend, ns, Query(descending=True))) == everyone[::-1]
    items = await all_pages(item_backend, ns, Query())
    assert items[0] == Item("al", {"group": "a", "age": 19, "nick": "A"}, 1)


async def test_query_empty_namespace(item_backend: ItemBackend, ns: str) -> None:
    page = await item_backend.query(ns, Query())
    assert page.items == [] and page.next_token is None


async def test_query_where_is_type_sensitive(item_backend: ItemBackend, ns: str) -> None:
    await fill(item_backend, ns)
    found = await all_pages(item_backend, ns, Query(where={"age": 30}))
    assert names(found) == ["alice", "erin"]
    assert names(await all_pages(item_backend, ns, Query(where={"age": "30"}))) == ["frank"]
    assert await all_pages(item_backend, ns, Query(where={"age": b"30"})) == []
    both = Query(where={"group": "a", "age": 25})
    assert names(await all_pages(item_backend, ns, both)) == ["carol"]
    assert await all_pages(item_backend, ns, Query(where={"missing": "x"})) == []


async def test_query_prefix(item_backend: ItemBackend, ns: str) -> None:
    await fill(item_backend, ns)
    assert names(await all_pages(item_backend, ns, Query(prefix="al"))) == ["al", "alice"]
    assert names(await all_pages(item_backend, ns, Query(prefix="alice"))) == ["alice"]
    assert names(await all_pages(item_backend, ns, Query(prefix="z"))) == []
    desc = Query(prefix="al", descending=True)
    assert names(await all_pages(item_backend, ns, desc)) == ["alice", "al"]


async def test_a_name_token_starts_a_query_after_any_name(
    item_backend: ItemBackend, ns: str
) -> None:
    """`name_token(name)` resumes a name-order query right after `name`, in either
    direction, whether an item has that name or not (XEP-0059 pages by a key)."""
    await fill(item_backend, ns)
    for start, forward, backward in (
        ("bob", ["carol", "dave"], ["alice", "al"]),
        ("bz", ["carol", "dave"], ["bob", "alice"]),
    ):
        query = Query(limit=2, page_token=name_token(start))
        assert names((await item_backend.query(ns, query)).items) == forward
        query = Query(limit=2, page_token=name_token(start), descending=True)
        assert names((await item_backend.query(ns, query)).items) == backward
    query = Query(prefix="al", page_token=name_token("al"))
    assert names(await all_pages(item_backend, ns, query)) == ["alice"]


async def test_query_prefix_with_unicode_edges(item_backend: ItemBackend, ns: str) -> None:
    for name in ["a\U0010ffff", "a\U0010ffffb", "b", "a", "a\ue000", "a\ud7ff"]:
        await item_backend.put(ns, name, {})
    got = names(await all_pages(item_backend, ns, Query(prefix="a\U0010ffff")))
    assert got == ["a\U0010ffff", "a\U0010ffffb"]
    got = names(await all_pages(item_backend, ns, Query(prefix="a\ud7ff")))
    assert got == ["a\ud7ff"]


async def test_query_where_and_prefix(item_backend: ItemBackend, ns: str) -> None:
    await fill(item_backend, ns)
    query = Query(where={"group": "a"}, prefix="al", order_by="age")
    assert names(await all_pages(item_backend, ns, query)) == ["al", "alice"]
    query = Query(where={"group": "b"}, prefix="al")
    assert await all_pages(item_backend, ns, query) == []


async def test_query_order_by_attribute(item_backend: ItemBackend, ns: str) -> None:
    await fill(item_backend, ns)
    # ints before strs; ties broken by name; items without the attribute left out
    by_age = ["al", "bob", "carol", "alice", "erin", "dave", "frank"]
    for limit in (100, 2, 1):
        got = await all_pages(item_backend, ns, Query(order_by="age", limit=limit))
        assert names(got) == by_age
        got = await all_pages(item_backend, ns, Query(order_by="age", descending=True, limit=limit))
        assert names(got) == by_age[::-1]
    by_nick = ["al", "alice", "bob", "dave", "erin"]  # "A" < "Al" < "Bobby" < "D" < "E"
    assert names(await all_pages(item_backend, ns, Query(order_by="nick", limit=2))) == by_nick
    query = Query(order_by="nick", descending=True, where={"group": "b"})
    assert names(await all_pages(item_backend, ns, query)) == ["erin", "bob"]


async def test_query_order_by_bytes_attribute(item_backend: ItemBackend, ns: str) -> None:
    await item_backend.batch_put(
        ns, {"x": {"k": b"\x02"}, "y": {"k": b"\x01\xff"}, "z": {"k": b"\x01"}, "w": {"k": 5}}
    )
    got = names(await all_pages(item_backend, ns, Query(order_by="k", limit=2)))
    assert got == ["w", "z", "y", "x"]


async def test_paging_more_than_one_page(item_backend: ItemBackend, ns: str) -> None:
    expected = [f"user{i:03d}" for i in range(23)]
    await item_backend.batch_put(ns, {name: {"i": i} for i, name in enumerate(expected)})
    first = await item_backend.query(ns, Query(limit=10))
    assert first.items and first.next_token is not None
    pages = 0
    query = Query(limit=10)
    seen: list[str] = []
    while True:
        page = await item_backend.query(ns, query)
        pages += 1
        seen += names(page.items)
        if page.next_token is None:
            break
        query.page_token = page.next_token
    assert seen == expected
    assert pages >= 3


# Names and ranks sort alike, so one expectation serves both orders. After the
# first page: an insert behind the cursor (must not show), one ahead (must), a
# delete ahead (must not show) and an update ahead (shows once).
PAGING_CASES = {
    "ascending": (
        False,
        ["m00", "m01", "m02"],
        {"m01a": 15, "m05a": 55},
        "m06",
        "m03",
        ["m03", "m04", "m05", "m05a", "m07", "m08", "m09"],
    ),
    "descending": (
        True,
        ["m09", "m08", "m07"],
        {"m08a": 85, "m05a": 55},
        "m04",
        "m06",
        ["m06", "m05a", "m05", "m03", "m02", "m01", "m00"],
    ),
}


@pytest.mark.parametrize("case", list(PAGING_CASES))
@pytest.mark.parametrize("order_by", [None, "rank"])
async def test_paging_survives_concurrent_writes(
    item_backend: ItemBackend, ns: str, order_by: str | None, case: str
) -> None:
    descending, first, inserts, deleted, updated, rest = PAGING_CASES[case]
    await item_backend.batch_put(ns, {f"m{i:02d}": {"rank": i * 10} for i in range(10)})
    query = Query(order_by=order_by, descending=descending, limit=3)
    page = await item_backend.query(ns, query)
    assert names(page.items) == first
    assert page.next_token is not None
    for name, rank in inserts.items():
        await item_backend.put(ns, name, {"rank": rank})
    await item_backend.delete(ns, deleted)
    await item_backend.put(ns, updated, {"rank": int(updated[1:]) * 10, "touched": 1})
    query.page_token = page.next_token
    assert names(await all_pages(item_backend, ns, query)) == rest


async def test_query_rejects_bad_input(item_backend: ItemBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await item_backend.query(ns, Query(limit=0))
    with pytest.raises(ValueError):
        await item_backend.query(ns, Query(page_token="not a token!"))


# -- items: batches and transactions ---------------------------------------------


async def test_batch_get_and_put(item_backend: ItemBackend, ns: str) -> None:
    assert await item_backend.batch_get(ns, []) == {}
    await item_backend.put(ns, "a", {"v": 0})
    await item_backend.batch_put(ns, {"a": {"v": 1}, "b": {"v": 2}, "😀": {"v": b"3"}})
    got = await item_backend.batch_get(ns, ["a", "b", "😀", "missing", "a"])
    assert got == {
        "a": Item("a", {"v": 1}, 2),
        "b": Item("b", {"v": 2}, 1),
        "😀": Item("😀", {"v": b"3"}, 1),
    }


async def test_batch_get_many(item_backend: ItemBackend, ns: str) -> None:
    many = {f"n{i:04d}": {"i": i} for i in range(260)}
    await item_backend.batch_put(ns, many)
    got = await item_backend.batch_get(ns, list(many) + ["absent"])
    assert {name: item.attrs for name, item in got.items()} == many


async def test_batch_put_validates_first(item_backend: ItemBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await item_backend.batch_put(ns, {"ok": {"v": 1}, "bad": {"v": True}})
    assert await item_backend.get(ns, "ok") is None


async def test_transact_commits_all(item_backend: ItemBackend, ns: str, ns2: str) -> None:
    await item_backend.put(ns, "old", {"v": 1})
    await item_backend.put(ns, "gone", {})
    await item_backend.transact(
        [
            Put(ns, "new", {"v": "n"}, if_absent=True),
            Put(ns, "old", {"v": 2}, if_version=1),
            Delete(ns, "gone", if_version=1),
            Put(ns2, "elsewhere", {"v": b"x"}),
        ]
    )
    assert await item_backend.get(ns, "new") == Item("new", {"v": "n"}, 1)
    assert await item_backend.get(ns, "old") == Item("old", {"v": 2}, 2)
    assert await item_backend.get(ns, "gone") is None
    assert await item_backend.get(ns2, "elsewhere") == Item("elsewhere", {"v": b"x"}, 1)


@pytest.mark.parametrize(
    "failing",
    [
        lambda ns: Put(ns, "old", {"v": 9}, if_version=5),
        lambda ns: Put(ns, "old", {"v": 9}, if_absent=True),
        lambda ns: Put(ns, "absent", {"v": 9}, if_version=1),
        lambda ns: Delete(ns, "old", if_version=2),
        lambda ns: Delete(ns, "absent", if_version=1),
    ],
    ids=["stale-version", "exists", "absent-version", "delete-stale", "delete-absent"],
)
async def test_transact_is_all_or_nothing(
    item_backend: ItemBackend, ns: str, failing: Callable[[str], Write]
) -> None:
    await item_backend.put(ns, "old", {"v": 1})
    await item_backend.put(ns, "keep", {"v": 1})
    with pytest.raises(ConditionFailed):
        await item_backend.transact(
            [
                Put(ns, "new", {"v": 1}),
                Delete(ns, "keep"),
                failing(ns),
                Put(ns, "later", {"v": 1}),
            ]
        )
    assert await item_backend.get(ns, "new") is None
    assert await item_backend.get(ns, "later") is None
    assert await item_backend.get(ns, "keep") == Item("keep", {"v": 1}, 1)
    assert await item_backend.get(ns, "old") == Item("old", {"v": 1}, 1)


async def test_transact_rejects_same_item_twice(item_backend: ItemBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await item_backend.transact([Put(ns, "a", {}), Delete(ns, "a")])
    assert await item_backend.get(ns, "a") is None


async def test_concurrent_read_modify_write_loses_nothing(
    item_backend: ItemBackend, ns: str
) -> None:
    await item_backend.put(ns, "counter", {"n": 0})
    conflicts = 0

    async def increment() -> None:
        nonlocal conflicts
        for _ in range(200):
            item = await item_backend.get(ns, "counter")
            assert item is not None
            await asyncio.sleep(0)  # let the others read the same version
            try:
                await item_backend.put(
                    ns, "counter", {"n": int(item.attrs["n"]) + 1}, if_version=item.version
                )
                return
            except ConditionFailed:
                conflicts += 1
        raise AssertionError("no progress")

    await asyncio.gather(*(increment() for _ in range(20)))
    final = await item_backend.get(ns, "counter")
    assert final is not None
    assert final.attrs["n"] == 20
    assert final.version == 21
    assert conflicts > 0  # the test really raced


async def test_concurrent_if_absent_has_one_winner(item_backend: ItemBackend, ns: str) -> None:
    async def claim(who: int) -> bool:
        try:
            await item_backend.put(ns, "lock", {"owner": who}, if_absent=True)
            return True
        except ConditionFailed:
            return False

    results = await asyncio.gather(*(claim(i) for i in range(10)))
    assert results.count(True) == 1
    item = await item_backend.get(ns, "lock")
    assert item is not None and item.attrs["owner"] == results.index(True)


# -- blobs ---------------------------------------------------------------------------


async def test_blob_roundtrip(blob_backend: BlobBackend, ns: str) -> None:
    assert await blob_backend.get(ns, "k") is None
    etag = await blob_backend.put(ns, "k", b"hello")
    blob = await blob_backend.get(ns, "k")
    assert blob is not None
    assert (blob.key, blob.data, blob.etag) == ("k", b"hello", etag)
    etag2 = await blob_backend.put(ns, "k", b"world")
    assert etag2 != etag
    blob = await blob_backend.get(ns, "k")
    assert blob is not None and (blob.data, blob.etag) == (b"world", etag2)


async def test_blob_empty_and_binary(blob_backend: BlobBackend, ns: str) -> None:
    await blob_backend.put(ns, "empty", b"")
    await blob_backend.put(ns, "bin", bytes(range(256)) * 3)
    empty = await blob_backend.get(ns, "empty")
    assert empty is not None and empty.data == b""
    binary = await blob_backend.get(ns, "bin")
    assert binary is not None and binary.data == bytes(range(256)) * 3


async def test_blob_if_none_match(blob_backend: BlobBackend, ns: str) -> None:
    etag = await blob_backend.put(ns, "k", b"one", if_none_match=True)
    with pytest.raises(ConditionFailed):
        await blob_backend.put(ns, "k", b"two", if_none_match=True)
    blob = await blob_backend.get(ns, "k")
    assert blob is not None and (blob.data, blob.etag) == (b"one", etag)


async def test_blob_if_match(blob_backend: BlobBackend, ns: str) -> None:
    with pytest.raises(ConditionFailed):
        await blob_backend.put(ns, "k", b"x", if_match="0123abcd")  # absent
    assert await blob_backend.get(ns, "k") is None
    first = await blob_backend.put(ns, "k", b"one")
    second = await blob_backend.put(ns, "k", b"two", if_match=first)
    with pytest.raises(ConditionFailed):
        await blob_backend.put(ns, "k", b"three", if_match=first)  # stale
    blob = await blob_backend.get(ns, "k")
    assert blob is not None and (blob.data, blob.etag) == (b"two", second)


async def test_blob_delete(blob_backend: BlobBackend, ns: str) -> None:
    assert await blob_backend.delete(ns, "k") is False
    with pytest.raises(ConditionFailed):
        await blob_backend.delete(ns, "k", if_match="0123abcd")
    first = await blob_backend.put(ns, "k", b"one")
    second = await blob_backend.put(ns, "k", b"two")
    with pytest.raises(ConditionFailed):
        await blob_backend.delete(ns, "k", if_match=first)
    assert await blob_backend.get(ns, "k") is not None
    assert await blob_backend.delete(ns, "k", if_match=second) is True
    assert await blob_backend.get(ns, "k") is None
    await blob_backend.put(ns, "k", b"again")
    assert await blob_backend.delete(ns, "k") is True
    assert await blob_backend.get(ns, "k") is None


async def test_blob_size_limit(blob_backend: BlobBackend, ns: str) -> None:
    data = bytes(range(256)) * (TEST_MAX_BLOB_BYTES // 256)
    etag = await blob_backend.put(ns, "big", data)
    blob = await blob_backend.get(ns, "big")
    assert blob is not None and blob.data == data and blob.etag == etag
    with pytest.raises(TooLarge):
        await blob_backend.put(ns, "big", data + b"!")
    blob = await blob_backend.get(ns, "big")
    assert blob is not None and blob.data == data


async def test_blob_key_limits(blob_backend: BlobBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await blob_backend.put(ns, "", b"x")
    longest = "ü" * (MAX_KEY_BYTES // 2)
    await blob_backend.put(ns, longest, b"x")
    blob = await blob_backend.get(ns, longest)
    assert blob is not None and blob.data == b"x"
    assert (await blob_backend.list(ns, "ü")).keys == [longest]
    with pytest.raises(TooLarge):
        await blob_backend.put(ns, longest + "x", b"x")


async def test_blob_odd_keys(blob_backend: BlobBackend, ns: str) -> None:
    long_parts = ["x" * 300 + "/y", "x" * 200 + "..", "y" * 200 + "./z", "z" * 199 + "é.."]
    keys = ODD_NAMES + ["dir/..", "dir/../..", "a/./b", *long_parts]
    for n, key in enumerate(keys):
        await blob_backend.put(ns, key, str(n).encode())
    for n, key in enumerate(keys):
        blob = await blob_backend.get(ns, key)
        assert blob is not None and blob.key == key and blob.data == str(n).encode()
    assert await list_all(blob_backend, ns, "", 4) == sorted(keys)
    for key in keys:
        assert await blob_backend.delete(ns, key) is True
    assert await list_all(blob_backend, ns, "", 4) == []


async def test_blob_keys_with_empty_segments(blob_backend: BlobBackend, ns: str) -> None:
    keys = ["a//b", "/lead", "trail/", "a", "a/b"]
    for key in keys:
        await blob_backend.put(ns, key, key.encode())
    for key in keys:
        blob = await blob_backend.get(ns, key)
        assert blob is not None and blob.data == key.encode()
    assert await list_all(blob_backend, ns, "", 10) == sorted(keys)
    assert await list_all(blob_backend, ns, "a/", 10) == ["a//b", "a/b"]


async def list_all(backend: BlobBackend, ns: str, prefix: str, limit: int) -> list[str]:
    keys: list[str] = []
    token: str | None = None
    for _ in range(1000):
        page = await backend.list(ns, prefix, limit=limit, page_token=token)
        assert len(page.keys) <= limit
        keys += page.keys
        token = page.next_token
        if token is None:
            return keys
    raise AssertionError("listing never ended")


async def test_blob_list_prefix_and_paging(blob_backend: BlobBackend, ns: str) -> None:
    keys = [f"alice@example.com/{i:03d}" for i in range(25)]
    others = ["alice@example.co", "alice@example.comx/1", "bob@example.com/001", "alice"]
    for key in keys + others:
        await blob_backend.put(ns, key, b"m")
    first = await blob_backend.list(ns, "alice@example.com/", limit=10)
    assert first.keys == keys[:10] and first.next_token is not None
    assert await list_all(blob_backend, ns, "alice@example.com/", 10) == keys
    assert await list_all(blob_backend, ns, "alice@example.com", 7) == sorted(
        keys + ["alice@example.comx/1"]
    )
    assert await list_all(blob_backend, ns, "alice", 100) == sorted(
        keys + ["alice@example.co", "alice@example.comx/1", "alice"]
    )
    assert await list_all(blob_backend, ns, "", 1000) == sorted(keys + others)
    assert await list_all(blob_backend, ns, "nobody/", 10) == []
    page = await blob_backend.list(ns, "zzz")
    assert page.keys == [] and page.next_token is None


async def test_blob_list_survives_concurrent_writes(blob_backend: BlobBackend, ns: str) -> None:
    for i in range(10):
        await blob_backend.put(ns, f"q/{i:02d}", b"")
    first = await blob_backend.list(ns, "q/", limit=4)
    assert first.keys == ["q/00", "q/01", "q/02", "q/03"]
    await blob_backend.put(ns, "q/01a", b"")  # behind the cursor
    await blob_backend.put(ns, "q/05a", b"")  # ahead
    await blob_backend.delete(ns, "q/06")
    rest: list[str] = []
    token = first.next_token
    while token is not None:
        page = await blob_backend.list(ns, "q/", limit=4, page_token=token)
        rest += page.keys
        token = page.next_token
    assert rest == ["q/04", "q/05", "q/05a", "q/07", "q/08", "q/09"]


async def test_blob_namespaces_are_isolated(blob_backend: BlobBackend, ns: str, ns2: str) -> None:
    await blob_backend.put(ns, "k", b"1")
    await blob_backend.put(ns2, "k", b"2")
    await blob_backend.put(ns + "/x", "y", b"nested")
    await blob_backend.put(ns, "x/y", b"flat")
    one, two = await blob_backend.get(ns, "k"), await blob_backend.get(ns2, "k")
    assert one is not None and one.data == b"1"
    assert two is not None and two.data == b"2"
    nested, flat = await blob_backend.get(ns + "/x", "y"), await blob_backend.get(ns, "x/y")
    assert nested is not None and nested.data == b"nested"
    assert flat is not None and flat.data == b"flat"
    assert await list_all(blob_backend, ns, "", 100) == ["k", "x/y"]
    assert await list_all(blob_backend, ns + "/x", "", 100) == ["y"]
    assert await blob_backend.delete(ns, "k")
    assert await blob_backend.get(ns2, "k") is not None


async def test_blob_concurrent_if_match_loses_nothing(blob_backend: BlobBackend, ns: str) -> None:
    await blob_backend.put(ns, "counter", b"0")
    conflicts = 0

    async def increment() -> None:
        nonlocal conflicts
        for _ in range(200):
            blob = await blob_backend.get(ns, "counter")
            assert blob is not None
            await asyncio.sleep(0)
            try:
                value = str(int(blob.data) + 1).encode()
                await blob_backend.put(ns, "counter", value, if_match=blob.etag)
                return
            except ConditionFailed:
                conflicts += 1
        raise AssertionError("no progress")

    await asyncio.gather(*(increment() for _ in range(20)))
    blob = await blob_backend.get(ns, "counter")
    assert blob is not None and blob.data == b"20"
    assert conflicts > 0


async def test_blob_concurrent_if_none_match_has_one_winner(
    blob_backend: BlobBackend, ns: str
) -> None:
    async def claim(who: int) -> bool:
        try:
            await blob_backend.put(ns, "lock", str(who).encode(), if_none_match=True)
            return True
        except ConditionFailed:
            return False

    results = await asyncio.gather(*(claim(i) for i in range(10)))
    assert results.count(True) == 1
    blob = await blob_backend.get(ns, "lock")
    assert blob is not None and blob.data == str(results.index(True)).encode()


async def test_blob_list_rejects_bad_input(blob_backend: BlobBackend, ns: str) -> None:
    with pytest.raises(ValueError):
        await blob_backend.list(ns, limit=0)


async def test_store_delete_prefix_pages_through_items(item_backend: ItemBackend, ns: str) -> None:
    """ItemStore.delete_prefix (a user's data when the account goes) over several pages."""
    vhost, store = ns.split("/", 1)
    items = ItemStore(item_backend, vhost, store)
    await item_backend.batch_put(ns, {f"zed/{n:03d}": {"n": n} for n in range(120)})
    await item_backend.batch_put(ns, {"zed": {}, "zed2/a": {}, "zec/a": {}})
    assert await items.delete_prefix("zed/") == 120
    assert names(await all_pages(item_backend, ns, Query())) == ["zec/a", "zed", "zed2/a"]
    assert await items.delete_prefix("zed/") == 0


async def test_store_delete_prefix_of_blobs(blob_backend: BlobBackend, ns: str) -> None:
    vhost, store = ns.split("/", 1)
    blobs = BlobStore(blob_backend, vhost, store)
    for key in ("zed/a", "zed/b/c", "zed", "zed2/a", "zec/a"):
        await blob_backend.put(ns, key, b"x")
    assert await blobs.delete_prefix("zed/") == 2
    assert sorted((await blob_backend.list(ns)).keys) == ["zec/a", "zed", "zed2/a"]
    assert await blobs.delete_prefix("zed/") == 0
