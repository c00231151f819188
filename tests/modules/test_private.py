"""Private XML storage (XEP-0049), without sockets."""

from __future__ import annotations

import pytest
from lxml import etree

from xmppd.storage.base import StorageError
from xmppd.testing import ModuleHarness

PRIVATE = "jabber:iq:private"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
PREFS = "<exodus xmlns='exodus:prefs'><defaultnick>Hamlet</defaultnick></exodus>"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def query(inner: str = "") -> str:
    return f"<query xmlns='{PRIVATE}'>{inner}</query>"


async def all_blobs(harness: ModuleHarness) -> dict[str, bytes]:
    store = harness.host.blobs("localhost", "private")
    page = await store.list()
    return {key: (await store.get(key)).data for key in page.keys}  # type: ignore[union-attr]


@pytest.fixture
async def harness() -> ModuleHarness:
    return await ModuleHarness({"disco": {}, "private": {"max_bytes": 2048}}).start()


async def test_store_and_retrieve(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", query(PREFS))
    assert reply.get("type") == "result" and len(reply) == 0
    reply = await harness.iq(alice, "get", query("<exodus xmlns='exodus:prefs'/>"))
    assert reply.get("type") == "result"
    assert reply.findtext(
        f"{{{PRIVATE}}}query/{{exodus:prefs}}exodus/{{exodus:prefs}}defaultnick"
    ) == ("Hamlet")
    # addressed to the own bare JID explicitly: the same
    reply = await harness.iq(
        alice, "get", query("<exodus xmlns='exodus:prefs'/>"), to="alice@localhost"
    )
    assert reply.findtext(".//{exodus:prefs}defaultnick") == "Hamlet"


async def test_unknown_namespace_returns_the_empty_element(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", query("<storage xmlns='storage:bookmarks'/>"))
    assert reply.get("type") == "result"
    (result_query,) = reply
    (element,) = result_query
    assert element.tag == "{storage:bookmarks}storage" and len(element) == 0


async def test_namespaces_are_separate_and_a_set_replaces_one(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", query(PREFS))
    two = "<storage xmlns='storage:bookmarks'><conference jid='a@muc'/></storage>"
    await harness.iq(alice, "set", query(two + "<storage xmlns='storage:bookmarks'><x/></storage>"))
    reply = await harness.iq(alice, "get", query("<storage xmlns='storage:bookmarks'/>"))
    assert len(reply[0]) == 2  # several elements of one namespace come back together
    await harness.iq(alice, "set", query("<storage xmlns='storage:bookmarks'/>"))
    reply = await harness.iq(alice, "get", query("<storage xmlns='storage:bookmarks'/>"))
    assert len(reply[0]) == 1 and len(reply[0][0]) == 0
    reply = await harness.iq(alice, "get", query("<exodus xmlns='exodus:prefs'/>"))
    assert reply.findtext(".//{exodus:prefs}defaultnick") == "Hamlet"


async def test_users_are_separate_and_others_are_forbidden(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.iq(alice, "set", query(PREFS))
    before = await all_blobs(harness)
    reply = await harness.iq(bob, "get", query("<exodus xmlns='exodus:prefs'/>"))
    assert len(reply[0][0]) == 0  # bob's own, empty
    for type_, payload in (("get", "<exodus xmlns='exodus:prefs'/>"), ("set", PREFS)):
        reply = await harness.iq(bob, type_, query(payload), to="alice@localhost")
        assert condition(reply) == "forbidden"
    assert await all_blobs(harness) == before


@pytest.mark.parametrize(
    ("type_", "payload", "expected"),
    [
        ("get", "", "bad-request"),
        ("get", "<a xmlns='urn:a'/><b xmlns='urn:b'/>", "bad-request"),
        ("set", "", "not-acceptable"),
        ("set", "<nonamespace/>", "not-acceptable"),
        ("get", "<nonamespace/>", "not-acceptable"),
        ("set", "<query xmlns='jabber:iq:roster'/>", "not-acceptable"),
        ("get", "<query xmlns='jabber:iq:roster'/>", "not-acceptable"),
        ("set", "<x xmlns='http://jabber.org/protocol/muc'/>", "not-acceptable"),
        ("set", "<vCard xmlns='vcard-temp'><FN>Hamlet</FN></vCard>", "not-acceptable"),
        ("set", f"<a xmlns='urn:{'n' * 800}'/>", "not-acceptable"),
        ("set", f"<a xmlns='urn:a'>{'x' * 3000}</a>", "not-acceptable"),  # max_bytes 2048
        ("set", f"{PREFS}<query xmlns='jabber:iq:roster'/>", "not-acceptable"),
    ],
    ids=[
        "get-empty",
        "get-two-namespaces",
        "set-empty",
        "set-no-namespace",
        "get-no-namespace",
        "set-reserved-jabber",
        "get-reserved-jabber",
        "set-reserved-jabber-org",
        "set-reserved-vcard",
        "namespace-too-long",
        "too-large",
        "one-bad-of-two",
    ],
)
async def test_refused_requests_change_nothing(
    harness: ModuleHarness, type_: str, payload: str, expected: str
) -> None:
    alice = harness.session("alice@localhost/a")
    await harness.iq(alice, "set", query("<exodus xmlns='exodus:prefs'><old/></exodus>"))
    before = await all_blobs(harness)
    reply = await harness.iq(alice, type_, query(payload))
    assert condition(reply) == expected
    assert await all_blobs(harness) == before


async def test_wrong_payload_element_is_bad_request(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", f"<other xmlns='{PRIVATE}'>{PREFS}</other>")
    assert condition(reply) == "bad-request"


async def test_storage_failure_is_an_error(
    harness: ModuleHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    alice = harness.session("alice@localhost/a")

    async def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("memory", "op", "unreachable")

    monkeypatch.setattr(harness.storage.blobs, "put", broken)
    reply = await harness.iq(alice, "set", query(PREFS))
    assert condition(reply) == "internal-server-error"
    monkeypatch.setattr(harness.storage.blobs, "get", broken)
    reply = await harness.iq(alice, "get", query("<exodus xmlns='exodus:prefs'/>"))
    assert condition(reply) == "internal-server-error"


async def test_account_removed_deletes_only_that_accounts_data(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    bob = harness.session("bob@localhost/b")
    await harness.iq(alice, "set", query(PREFS + "<s xmlns='storage:bookmarks'/>"))
    await harness.iq(bob, "set", query(PREFS))
    assert len(await all_blobs(harness)) == 3
    await harness.host.remove_user_data("localhost", "alice")
    assert [key.split("/")[0] for key in await all_blobs(harness)] == ["bob"]


async def test_disco_feature(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(
        alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", to="localhost"
    )
    assert PRIVATE in {f.get("var") for f in reply.iter()}
