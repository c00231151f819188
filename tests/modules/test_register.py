"""In-band registration (XEP-0077), without sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

import pytest
from lxml import etree
from redis.asyncio import Redis

from xmppd.auth.accounts import Accounts
from xmppd.config import Config
from xmppd.modules._register_limit import SharedRateLimit
from xmppd.modules.register import RateLimit
from xmppd.storage.base import StorageError
from xmppd.testing import ModuleHarness, parse_stanza

REGISTER = "jabber:iq:register"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
FEATURE = "{http://jabber.org/features/iq-register}register"


def condition(reply: etree._Element) -> str:
    assert reply.get("type") == "error", etree.tostring(reply)
    err = reply.find("{jabber:client}error")
    assert err is not None
    return next(etree.QName(c).localname for c in err if etree.QName(c).namespace == STANZAS)


def fields(username: str | None = None, password: str | None = None, extra: str = "") -> str:
    inner = ""
    if username is not None:
        inner += f"<username>{username}</username>"
    if password is not None:
        inner += f"<password>{password}</password>"
    return f"<query xmlns='{REGISTER}'>{inner}{extra}</query>"


async def start(**options: Any) -> ModuleHarness:
    return await ModuleHarness({"disco": {}, "register": options}).start()


def accounts(harness: ModuleHarness) -> Accounts:
    return harness.host.modules["register"].accounts["localhost"]  # type: ignore[attr-defined,no-any-return]


async def preauth(
    harness: ModuleHarness,
    type_: str,
    payload: str,
    ip: str = "192.0.2.1",
    *,
    encrypted: bool = True,
) -> etree._Element:
    stanza = parse_stanza(f"<iq type='{type_}' id='r1'>{payload}</iq>")
    return await harness.host.handle_preauth_iq(stanza, "localhost", ip, encrypted=encrypted)


def stream_features(harness: ModuleHarness) -> list[str]:
    return [make().tag for make in harness.host.stream_features["preauth"]]


# --- before authentication ------------------------------------------------------------------


async def test_closed_by_default() -> None:
    harness = await start()
    assert FEATURE not in stream_features(harness)
    reply = await preauth(harness, "get", fields())
    assert condition(reply) == "service-unavailable"
    reply = await preauth(harness, "set", fields("newbie", "long-enough"))
    assert condition(reply) == "service-unavailable"
    assert not await accounts(harness).exists("newbie")


@pytest.mark.parametrize("open_", [True, False])
async def test_every_registration_iq_in_clear_is_a_policy_violation(open_: bool) -> None:
    # Before TLS nothing is answered but policy-violation: not the form, and not
    # whether registration is open at all.
    harness = await start(allow_registration=open_)
    for type_, payload in (("get", fields()), ("set", fields("newbie", "long-enough"))):
        reply = await preauth(harness, type_, payload, encrypted=False)
        assert condition(reply) == "policy-violation", (type_, etree.tostring(reply))
    assert not await accounts(harness).exists("newbie")


async def test_open_registration_flow() -> None:
    harness = await start(allow_registration=True)
    assert stream_features(harness) == [FEATURE]
    reply = await preauth(harness, "get", fields())
    assert reply.get("type") == "result" and reply.get("id") == "r1"
    (query,) = reply
    assert [etree.QName(c).localname for c in query] == ["instructions", "username", "password"]
    assert query.findtext(f"{{{REGISTER}}}instructions")

    reply = await preauth(harness, "set", fields("Newbie", "long-enough"))
    assert reply.get("type") == "result"
    assert await accounts(harness).verify_plain("newbie", "long-enough")  # nodeprep'd name

    reply = await preauth(harness, "set", fields("newbie", "other-password"))
    assert condition(reply) == "conflict"
    assert await accounts(harness).verify_plain("newbie", "long-enough")


@pytest.mark.parametrize(
    "payload",
    [
        fields("newbie"),
        fields(password="long-enough"),
        fields("newbie", ""),
        fields("", "long-enough"),
        fields("new@bie", "long-enough"),
        fields("new bie", "long-enough"),
        fields("newbie", "short"),
        fields("newbie", "private\ue000use"),  # SASLprep refuses private-use characters
    ],
    ids=[
        "no-password",
        "no-username",
        "empty-password",
        "empty-username",
        "at-sign",
        "space",
        "short",
        "prohibited-character",
    ],
)
async def test_bad_registrations_are_not_acceptable(payload: str) -> None:
    harness = await start(allow_registration=True)
    reply = await preauth(harness, "set", payload)
    assert condition(reply) == "not-acceptable"
    assert (await accounts(harness).list())[0] == []


async def test_names_with_rights_are_never_registered(caplog: pytest.LogCaptureFixture) -> None:
    """A listed admin or proxy_auth JID with no account is not the first stranger's."""
    harness = ModuleHarness(
        {"disco": {}, "register": {"allow_registration": True}, "adhoc": {}, "admin_commands": {}}
    )
    harness.config = Config.model_validate({
        "hosts": ["localhost"],
        "admins": ["boss@localhost"],
        "auth": {"proxy_auth": ["proxy@localhost"]},
        "modules": harness.config.modules,
    })
    await harness.start()
    caplog.set_level(logging.WARNING, "xmppd.modules.register")
    for name, key in (("Boss", "admins[0]"), ("proxy", "auth.proxy_auth[0]")):
        reply = await preauth(harness, "set", fields(name, "stranger-pw"), ip="203.0.113.9")
        assert condition(reply) == "not-acceptable"
        text = reply.findtext(f"{{jabber:client}}error/{{{STANZAS}}}text")
        assert text == "this user name is not allowed"  # not "reserved": no hint of rights
        jid = f"{name.lower()}@localhost"
        assert f"in-band registration of {jid} from 203.0.113.9 refused: {key} " in caplog.text
    assert (await accounts(harness).list())[0] == []
    reply = await preauth(harness, "set", fields("bossy", "stranger-pw"), ip="203.0.113.9")
    assert reply.get("type") == "result"  # only the listed names


async def test_removing_before_login_is_unexpected() -> None:
    harness = await start(allow_registration=True)
    reply = await preauth(harness, "set", f"<query xmlns='{REGISTER}'><remove/></query>")
    assert condition(reply) == "unexpected-request"


async def test_rate_limit_per_address() -> None:
    harness = await start(allow_registration=True, registrations_per_ip=2, registration_window=0.3)
    # the window runs on a clock the test moves: on a busy host registering "one" and
    # "two" (password hashing) could take longer than the window, and "three" got in
    now = [time.monotonic()]
    harness.host.modules["register"].limit.clock = lambda: now[0]  # type: ignore[attr-defined]
    for name in ("one", "two"):
        assert (await preauth(harness, "set", fields(name, "long-enough"))).get("type") == "result"
    # a refused attempt (taken name) did not use up a slot, but the address is now at its limit
    reply = await preauth(harness, "set", fields("three", "long-enough"))
    assert condition(reply) == "not-acceptable"
    assert reply.find("{jabber:client}error").get("type") == "wait"  # type: ignore[union-attr]
    assert not await accounts(harness).exists("three")
    reply = await preauth(harness, "set", fields("three", "long-enough"), ip="192.0.2.99")
    assert reply.get("type") == "result"
    now[0] += 0.29
    reply = await preauth(harness, "set", fields("four", "long-enough"))
    assert condition(reply) == "not-acceptable"  # still within the window
    now[0] += 0.02
    reply = await preauth(harness, "set", fields("four", "long-enough"))
    assert reply.get("type") == "result"


async def test_failed_registrations_do_not_count() -> None:
    harness = await start(allow_registration=True, registrations_per_ip=1)
    await accounts(harness).register("taken", "long-enough")
    for _ in range(3):
        assert condition(await preauth(harness, "set", fields("taken", "long-enough"))) == (
            "conflict"
        )
    reply = await preauth(harness, "set", fields("free", "long-enough"))
    assert reply.get("type") == "result"


def test_rate_limit_forgets_idle_addresses() -> None:
    now = [1000.0]
    limit = RateLimit(1, 10.0, clock=lambda: now[0])
    stamp = limit.reserve("a")
    assert stamp is not None and limit.reserve("a") is None
    limit.release("a", stamp)
    assert limit.reserve("a") is not None
    for i in range(100):
        limit.reserve(f"ip{i}")
    now[0] += 11
    limit.reserve("late")
    assert set(limit._events) == {"late"}
    assert RateLimit(0, 10.0).reserve("x") is not None  # 0: no limit


async def test_the_shared_limit_falls_back_to_the_node_s_counter_when_redis_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Redis that refuses connections (a port nothing listens on): registration stays
    # possible, limited by this node's own count, and the operator is told.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    redis = Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    try:
        shared = SharedRateLimit(RateLimit(1, 60.0), redis)
        with caplog.at_level(logging.WARNING, logger="xmppd.modules.register"):
            slot = await shared.reserve("192.0.2.1")
            assert slot is not None and slot.stamp is not None
            assert await shared.reserve("192.0.2.1") is None
            await shared.release(slot)
            assert await shared.reserve("192.0.2.1") is not None
        assert "counted on this node only" in caplog.text
    finally:
        await redis.aclose()


async def test_concurrent_registrations_of_one_name() -> None:
    harness = await start(allow_registration=True)
    replies = await asyncio.gather(
        *(preauth(harness, "set", fields("race", f"password-{i}"), ip=f"ip{i}") for i in range(4))
    )
    types = sorted(r.get("type") or "" for r in replies)
    assert types == ["error", "error", "error", "result"]
    assert {condition(r) for r in replies if r.get("type") == "error"} == {"conflict"}


async def test_storage_failure_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = await start(allow_registration=True, registrations_per_ip=1)

    async def broken(*args: object, **kwargs: object) -> None:
        raise StorageError("memory", "op", "unreachable")

    monkeypatch.setattr(harness.storage.items, "get", broken)
    reply = await preauth(harness, "set", fields("newbie", "long-enough"))
    assert condition(reply) == "internal-server-error"
    monkeypatch.undo()
    # the failed attempt gave its slot back
    assert (await preauth(harness, "set", fields("newbie", "long-enough"))).get("type") == "result"


# --- after authentication -------------------------------------------------------------------


@pytest.fixture
async def harness() -> ModuleHarness:
    harness = await start()  # registration closed: changes and removal still work
    await accounts(harness).register("alice", "alice-secret")
    await accounts(harness).register("bob", "bob-secret")
    return harness


async def test_registered_user_gets_registered(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "get", fields())
    query = reply[0]
    assert query.find(f"{{{REGISTER}}}registered") is not None
    assert query.findtext(f"{{{REGISTER}}}username") == "alice"


@pytest.mark.parametrize("to", [None, "localhost", "alice@localhost"])
async def test_password_change(harness: ModuleHarness, to: str | None) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", fields("alice", "new-secret!"), to=to)
    assert reply.get("type") == "result"
    assert await accounts(harness).verify_plain("alice", "new-secret!")
    assert not await accounts(harness).verify_plain("alice", "alice-secret")


async def test_password_change_ends_the_other_sessions_after_the_result(
    harness: ModuleHarness,
) -> None:
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/other")
    bob = harness.session("bob@localhost/b")
    reply = await harness.iq(alice, "set", fields("alice", "new-secret!"))
    assert reply.get("type") == "result"
    await asyncio.sleep(0)  # the terminations run right after the result was routed
    assert other.terminated is not None and other.terminated.condition == "not-authorized"
    assert alice.terminated is None and bob.terminated is None


async def test_username_as_bare_jid(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", fields("Alice@localhost", "new-secret!"))
    assert reply.get("type") == "result"


@pytest.mark.parametrize(
    ("payload", "to", "expected"),
    [
        (fields("bob", "new-secret!"), None, "forbidden"),
        (fields("bob@localhost", "new-secret!"), None, "forbidden"),
        (fields("bob", "new-secret!"), "bob@localhost", "forbidden"),
        (fields(password="new-secret!"), None, "bad-request"),
        (fields("alice"), None, "bad-request"),
        (fields("alice", ""), None, "not-acceptable"),
        (fields("alice", "short"), None, "not-acceptable"),
        (f"<other xmlns='{REGISTER}'/>", None, "bad-request"),
    ],
    ids=[
        "other-user",
        "other-user-jid",
        "to-other-account",
        "no-username",
        "no-password",
        "empty-password",
        "short",
        "wrong-element",
    ],
)
async def test_refused_password_changes_keep_the_password(
    harness: ModuleHarness, payload: str, to: str | None, expected: str
) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", payload, to=to)
    assert condition(reply) == expected
    assert await accounts(harness).verify_plain("alice", "alice-secret")
    assert await accounts(harness).verify_plain("bob", "bob-secret")


async def test_disabled_changes_and_removal() -> None:
    harness = await start(allow_password_change=False, allow_account_removal=False)
    await accounts(harness).register("alice", "alice-secret")
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(alice, "set", fields("alice", "new-secret!"))
    assert condition(reply) == "not-allowed"
    reply = await harness.iq(alice, "set", f"<query xmlns='{REGISTER}'><remove/></query>")
    assert condition(reply) == "not-allowed"
    assert await accounts(harness).verify_plain("alice", "alice-secret")


async def test_remove_account_ends_its_sessions_after_the_result() -> None:
    harness = await ModuleHarness({"register": {}, "vcard": {}}).start()
    await accounts(harness).register("alice", "alice-secret")
    alice = harness.session("alice@localhost/a")
    other = harness.session("alice@localhost/other")
    bob = harness.session("bob@localhost/b")
    await harness.iq(alice, "set", "<vCard xmlns='vcard-temp'><FN>A</FN></vCard>")
    assert alice.terminated is None

    reply = await harness.iq(alice, "set", f"<query xmlns='{REGISTER}'><remove/></query>")
    assert reply.get("type") == "result"
    await asyncio.sleep(0)  # the terminations run right after the result was routed
    await harness.router.drain()
    for session in (alice, other):
        assert session.terminated is not None
        assert session.terminated.condition == "not-authorized"
    assert bob.terminated is None
    assert not await accounts(harness).exists("alice")
    # the vcard module deleted its data
    assert await harness.host.blobs("localhost", "vcard").get("alice") is None


async def test_result_is_delivered_before_the_session_ends(harness: ModuleHarness) -> None:
    order: list[str] = []
    alice = harness.session("alice@localhost/a")
    alice.deliver = (  # type: ignore[method-assign]
        lambda stanza: order.append(f"deliver {stanza.get('type')}") or True
    )
    alice.terminate = lambda error: order.append(f"terminate {error.condition}")  # type: ignore[method-assign]
    stanza = parse_stanza(f"<iq type='set' id='x'><query xmlns='{REGISTER}'><remove/></query></iq>")
    stanza.set("from", alice.jid)
    harness.router.route(stanza, alice)
    await harness.router.drain()
    await asyncio.sleep(0)
    assert order == ["deliver result", "terminate not-authorized"]


async def test_remove_must_be_alone(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(
        alice, "set", f"<query xmlns='{REGISTER}'><remove/><username>alice</username></query>"
    )
    assert condition(reply) == "bad-request"
    assert await accounts(harness).exists("alice")
    assert alice.terminated is None


async def test_removing_another_account_is_forbidden(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(
        alice, "set", f"<query xmlns='{REGISTER}'><remove/></query>", to="bob@localhost"
    )
    assert condition(reply) == "forbidden"
    assert await accounts(harness).exists("bob")


async def test_disco_feature(harness: ModuleHarness) -> None:
    alice = harness.session("alice@localhost/a")
    reply = await harness.iq(
        alice, "get", "<query xmlns='http://jabber.org/protocol/disco#info'/>", to="localhost"
    )
    assert REGISTER in {f.get("var") for f in reply.iter()}
