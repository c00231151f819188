"""The router's delivery rules: a table row per case of RFC 6121 section 8 and RFC 6120 10.

Why a table: the router's internals are being reshaped, and what must not
change is where each stanza goes. Every row names the sessions that are bound
(availability, priority), which accounts exist, the stanza one client sends and
the outcome: which sessions get it, and whether the sender gets an error back
with which condition, or nothing. The rows use only the router's public surface
(Router, bind, route, drain) and TestSession, so a reshaped router is held to
the same table, and a broken rule fails under its own row id.

No modules are loaded: these are the defaults the server falls back on (no
offline storage, no roster, no IQ handlers). Every row runs twice, against an
empty module host (what the server runs) and against a Router alone.

Rows where the router departs from the RFC are strict xfails naming the section:
a normal message to a resource that is gone goes to the account's other
resources, as Prosody and ejabberd do, where RFC 6121 8.5.3.2.1 says to ignore
it or answer with an error.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest
from lxml import etree

from xmppd.jid import JID
from xmppd.router import Router
from xmppd.testing import ModuleHarness, TestSession, parse_stanza

if TYPE_CHECKING:
    from _pytest.mark.structures import ParameterSet

CLIENT = "jabber:client"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
# The error type RFC 6120 8.3.3 gives each condition these rows expect.
ERROR_TYPES = {
    "service-unavailable": "cancel",
    "jid-malformed": "modify",
    "remote-server-not-found": "cancel",
}

HOST = "localhost"
ROMEO = "romeo@localhost/orchard"  # the sender, unless a row says otherwise
JULIET = "juliet@localhost"
BALCONY = f"{JULIET}/balcony"
GARDEN = f"{JULIET}/garden"
CHAMBER = f"{JULIET}/chamber"
TOMB = f"{JULIET}/tomb"  # never bound
NOBODY = "nobody@localhost"  # no such account
MALFORMED = "juliet@@localhost"
REMOTE = "mercutio@example.net"  # a domain this server does not serve

UNKNOWN_PAYLOAD = "<query xmlns='urn:example:unknown'/>"
ERROR_PAYLOAD = f"<error type='cancel'><item-not-found xmlns='{STANZAS}'/></error>"


@dataclass(frozen=True)
class Bound:
    """A session bound when the row starts: sent initial presence or not, and its priority."""

    jid: str
    available: bool = True
    priority: int = 0


@dataclass(frozen=True)
class Row:
    stanza: str
    sessions: tuple[Bound, ...]
    accounts: frozenset[str]  # accounts that exist besides those with a session
    sender: str
    delivered: frozenset[str]  # the sessions that must get the stanza, each once
    error: str | None  # the condition of the error the sender gets back, None: no error
    error_optional: bool  # the RFC lets the server answer `error` or stay silent
    unsubscribed: bool  # the sender gets presence "unsubscribed" from the recipient's bare JID


def row(
    name: str,
    stanza: str,
    *,
    sessions: Sequence[Bound] = (),
    accounts: Collection[str] = (),
    sender: str = ROMEO,
    delivered: Collection[str] = (),
    error: str | None = None,
    error_optional: bool = False,
    unsubscribed: bool = False,
    xfail: str | None = None,
) -> ParameterSet:
    if sender not in {s.jid for s in sessions}:
        sessions = (Bound(sender), *sessions)
    case = Row(
        stanza,
        tuple(sessions),
        frozenset(accounts),
        sender,
        frozenset(delivered),
        error,
        error_optional,
        unsubscribed,
    )
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    return pytest.param(case, id=name, marks=marks)


def _attrs(to: str | None, type_: str | None) -> str:
    to_attr = f" to='{to}'" if to is not None else ""
    type_attr = f" type='{type_}'" if type_ is not None else ""
    return f"id='r1'{to_attr}{type_attr}"


def message(to: str | None, type_: str | None = "chat") -> str:
    body = ERROR_PAYLOAD if type_ == "error" else "<body>Wherefore art thou?</body>"
    return f"<message {_attrs(to, type_)}>{body}</message>"


def presence(to: str | None, type_: str | None = None) -> str:
    return f"<presence {_attrs(to, type_)}/>"


def iq(to: str | None, type_: str = "get") -> str:
    payload = {"get": UNKNOWN_PAYLOAD, "set": UNKNOWN_PAYLOAD, "error": ERROR_PAYLOAD}
    return f"<iq {_attrs(to, type_)}>{payload.get(type_, '')}</iq>"


SUBSCRIPTIONS = ("subscribe", "subscribed", "unsubscribe", "unsubscribed")
TWO_RESOURCES_ONE_CONNECTED = (Bound(BALCONY, priority=5), Bound(GARDEN), Bound(CHAMBER, False))

# One row, one case: kept compact so that the table reads as a table.
# fmt: off
ROWS = [
    # --- message to a bare JID (RFC 6121 8.5.2.1.1, 8.5.2.2.1) ---------------------------
    row("chat-to-bare-one-available", message(JULIET), sessions=[Bound(BALCONY)],
        delivered=[BALCONY]),
    row("chat-to-bare-highest-priority", message(JULIET),
        sessions=[Bound(BALCONY, priority=1), Bound(GARDEN, priority=5)], delivered=[GARDEN]),
    row("chat-to-bare-two-top-priority", message(JULIET),
        sessions=[Bound(BALCONY, priority=5), Bound(GARDEN, priority=5),
                  Bound(CHAMBER, priority=1)],
        delivered=[BALCONY, GARDEN]),
    row("normal-to-bare-highest-priority", message(JULIET, "normal"),
        sessions=[Bound(BALCONY), Bound(GARDEN, priority=3)], delivered=[GARDEN]),
    row("untyped-message-to-bare-is-normal", message(JULIET, None),
        sessions=[Bound(BALCONY, priority=2), Bound(GARDEN)], delivered=[BALCONY]),
    row("chat-to-bare-negative-priority-skipped", message(JULIET),
        sessions=[Bound(BALCONY, priority=-1), Bound(GARDEN)], delivered=[GARDEN]),
    row("chat-to-bare-negative-priority-only", message(JULIET),
        sessions=[Bound(BALCONY, priority=-1)], error="service-unavailable"),
    row("normal-to-bare-negative-priority-only", message(JULIET, "normal"),
        sessions=[Bound(BALCONY, priority=-1)], error="service-unavailable"),
    row("chat-to-bare-connected-not-available", message(JULIET),
        sessions=[Bound(BALCONY, False)], error="service-unavailable"),
    row("chat-to-bare-account-without-session", message(JULIET), accounts=[JULIET],
        error="service-unavailable"),
    row("normal-to-bare-account-without-session", message(JULIET, "normal"),
        accounts=[JULIET], error="service-unavailable"),
    # RFC 6121 8.5.1: no such account, a message is ignored or answered; this server answers.
    row("chat-to-unknown-account", message(NOBODY), error="service-unavailable"),
    row("normal-to-unknown-account", message(NOBODY, "normal"), error="service-unavailable"),
    row("headline-to-unknown-account", message(NOBODY, "headline"),
        error="service-unavailable"),
    # --- headline to a bare JID -------------------------------------------------------------
    row("headline-to-bare-every-non-negative", message(JULIET, "headline"),
        sessions=[Bound(BALCONY, priority=5), Bound(GARDEN), Bound(CHAMBER, priority=-1)],
        delivered=[BALCONY, GARDEN]),
    row("headline-to-bare-negative-priority-only-dropped", message(JULIET, "headline"),
        sessions=[Bound(BALCONY, priority=-1)]),
    row("headline-to-bare-connected-not-available-dropped", message(JULIET, "headline"),
        sessions=[Bound(BALCONY, False)]),
    row("headline-to-bare-account-without-session-dropped", message(JULIET, "headline"),
        accounts=[JULIET]),
    # --- groupchat to a bare JID: never delivered (RFC 6121 8.5.2.1.1, 8.5.2.2.1) -------------
    row("groupchat-to-bare-available", message(JULIET, "groupchat"),
        sessions=[Bound(BALCONY)], error="service-unavailable"),
    row("groupchat-to-bare-account-without-session", message(JULIET, "groupchat"),
        accounts=[JULIET], error="service-unavailable"),
    # --- error messages: never answered (RFC 6120 8.3.1), to bare only ignored ----------------
    row("error-message-to-bare-available-ignored", message(JULIET, "error"),
        sessions=[Bound(BALCONY)]),
    row("error-message-to-bare-account-without-session", message(JULIET, "error"),
        accounts=[JULIET]),
    row("error-message-to-unknown-account", message(NOBODY, "error")),
    row("error-message-to-bound-full-delivered", message(BALCONY, "error"),
        sessions=[Bound(BALCONY), Bound(GARDEN)], delivered=[BALCONY]),
    row("error-message-to-unbound-full-dropped", message(TOMB, "error"),
        sessions=[Bound(BALCONY)]),
    row("error-message-to-unknown-account-full", message(f"{NOBODY}/x", "error")),
    row("error-message-to-server-resource", message(f"{HOST}/x", "error")),
    row("error-message-malformed-to", message(MALFORMED, "error")),
    row("error-message-to-remote-domain", message(REMOTE, "error")),
    # --- message to a full JID (RFC 6121 8.5.3.1, 8.5.3.2.1) ---------------------------------
    row("chat-to-bound-full-lower-priority", message(BALCONY),
        sessions=[Bound(BALCONY), Bound(GARDEN, priority=5)], delivered=[BALCONY]),
    row("chat-to-full-connected-not-available", message(BALCONY),
        sessions=[Bound(BALCONY, False)], delivered=[BALCONY]),
    row("chat-to-full-negative-priority", message(BALCONY),
        sessions=[Bound(BALCONY, priority=-1)], delivered=[BALCONY]),
    row("groupchat-to-bound-full", message(BALCONY, "groupchat"),
        sessions=[Bound(BALCONY), Bound(GARDEN)], delivered=[BALCONY]),
    row("headline-to-bound-full", message(BALCONY, "headline"),
        sessions=[Bound(BALCONY), Bound(GARDEN)], delivered=[BALCONY]),
    row("chat-to-unbound-full-goes-to-bare", message(TOMB),
        sessions=[Bound(BALCONY), Bound(GARDEN, priority=5)], delivered=[GARDEN]),
    row("chat-to-unbound-full-account-without-session", message(TOMB), accounts=[JULIET],
        error="service-unavailable"),
    row("chat-to-unbound-full-unknown-account", message(f"{NOBODY}/x"),
        error="service-unavailable"),
    row("normal-to-unbound-full-account-without-session", message(TOMB, "normal"),
        accounts=[JULIET], error="service-unavailable"),
    row("normal-to-unbound-full-other-resource-available", message(TOMB, "normal"),
        sessions=[Bound(BALCONY)], error="service-unavailable", error_optional=True,
        xfail="RFC 6121 8.5.3.2.1: a normal message to an unbound full JID is ignored or "
        "answered with an error, only chat goes to the bare JID; the router hands it to "
        "the other resources"),
    row("headline-to-unbound-full-account-without-session-dropped",
        message(TOMB, "headline"), accounts=[JULIET]),
    # RFC 6121 8.5.3.2.1: a headline to an unbound full JID is ignored.
    row("headline-to-unbound-full-other-resource-available-dropped", message(TOMB, "headline"),
        sessions=[Bound(BALCONY)]),
    row("groupchat-to-unbound-full", message(TOMB, "groupchat"),
        sessions=[Bound(BALCONY)], error="service-unavailable"),
    # --- presence (RFC 6121 8.5.1, 8.5.2.1.2, 8.5.2.2.2, 8.5.3) -----------------------------
    row("presence-to-bare-every-available", presence(JULIET),
        sessions=[Bound(BALCONY, priority=5), Bound(GARDEN, priority=-1), Bound(CHAMBER, False)],
        delivered=[BALCONY, GARDEN]),
    row("unavailable-to-bare-every-available", presence(JULIET, "unavailable"),
        sessions=[Bound(BALCONY, priority=5), Bound(GARDEN, priority=-1), Bound(CHAMBER, False)],
        delivered=[BALCONY, GARDEN]),
    row("presence-to-bare-account-without-session", presence(JULIET), accounts=[JULIET]),
    row("presence-to-bound-full-only-that-resource", presence(GARDEN),
        sessions=[Bound(BALCONY), Bound(GARDEN)], delivered=[GARDEN]),
    row("unavailable-to-bound-full-only-that-resource", presence(GARDEN, "unavailable"),
        sessions=[Bound(BALCONY), Bound(GARDEN)], delivered=[GARDEN]),
    row("presence-to-full-connected-not-available", presence(BALCONY),
        sessions=[Bound(BALCONY, False)], delivered=[BALCONY]),
    row("presence-to-unbound-full-ignored", presence(TOMB), sessions=[Bound(BALCONY)]),
    row("unavailable-to-unbound-full-ignored", presence(TOMB, "unavailable"),
        sessions=[Bound(BALCONY)]),
    # With no roster module, a subscription presence at the bare JID goes to every
    # available resource; to a full JID it is handled as to the bare JID.
    row("subscribe-to-bare-every-available", presence(JULIET, "subscribe"),
        sessions=TWO_RESOURCES_ONE_CONNECTED, delivered=[BALCONY, GARDEN]),
    *[
        row(f"{type_}-to-unbound-full-as-bare", presence(TOMB, type_),
            sessions=TWO_RESOURCES_ONE_CONNECTED, delivered=[BALCONY, GARDEN])
        for type_ in SUBSCRIPTIONS
    ],
    row("subscribe-to-bound-full-as-bare", presence(BALCONY, "subscribe"),
        sessions=TWO_RESOURCES_ONE_CONNECTED, delivered=[BALCONY, GARDEN]),
    # A probe is the server's to answer (RFC 6121 4.3.2); with no presence module, nobody does.
    row("probe-to-bare-not-delivered", presence(JULIET, "probe"), sessions=[Bound(BALCONY)]),
    row("probe-to-unbound-full-as-bare", presence(TOMB, "probe"), sessions=[Bound(BALCONY)]),
    row("probe-to-bound-full-as-bare", presence(BALCONY, "probe"), sessions=[Bound(BALCONY)]),
    row("presence-to-unknown-account-ignored", presence(NOBODY)),
    row("presence-to-unknown-account-full-ignored", presence(f"{NOBODY}/x")),
    # RFC 6121 8.5.1: a subscription request or a probe to no such account is ignored or
    # answered "unsubscribed"; this server answers, other subscription types are ignored.
    row("subscribe-to-unknown-account-unsubscribed", presence(NOBODY, "subscribe"),
        unsubscribed=True),
    row("subscribe-to-unknown-account-full-unsubscribed", presence(f"{NOBODY}/x", "subscribe"),
        unsubscribed=True),
    row("probe-to-unknown-account-unsubscribed", presence(NOBODY, "probe"), unsubscribed=True),
    *[
        row(f"{type_}-to-unknown-account-ignored", presence(NOBODY, type_))
        for type_ in SUBSCRIPTIONS[1:]
    ],
    # --- IQ (RFC 6121 8.5.1, 8.5.2.1.3, 8.5.3; RFC 6120 8.2.3) ------------------------------
    row("iq-get-to-bound-full", iq(BALCONY), sessions=[Bound(BALCONY), Bound(GARDEN)],
        delivered=[BALCONY]),
    row("iq-set-to-bound-full", iq(BALCONY, "set"), sessions=[Bound(BALCONY), Bound(GARDEN)],
        delivered=[BALCONY]),
    row("iq-get-to-full-connected-not-available", iq(BALCONY),
        sessions=[Bound(BALCONY, False)], delivered=[BALCONY]),
    row("iq-result-to-bound-full", iq(BALCONY, "result"), sessions=[Bound(BALCONY)],
        delivered=[BALCONY]),
    row("iq-error-to-bound-full", iq(BALCONY, "error"), sessions=[Bound(BALCONY)],
        delivered=[BALCONY]),
    row("iq-get-to-unbound-full", iq(TOMB), sessions=[Bound(BALCONY)],
        error="service-unavailable"),
    row("iq-set-to-unbound-full", iq(TOMB, "set"), sessions=[Bound(BALCONY)],
        error="service-unavailable"),
    row("iq-get-to-unknown-account-full", iq(f"{NOBODY}/x"), error="service-unavailable"),
    row("iq-result-to-unbound-full-dropped", iq(TOMB, "result"), sessions=[Bound(BALCONY)]),
    row("iq-error-to-unbound-full-dropped", iq(TOMB, "error"), sessions=[Bound(BALCONY)]),
    row("iq-get-to-bare-unknown-namespace", iq(JULIET), sessions=[Bound(BALCONY)],
        error="service-unavailable"),
    row("iq-set-to-bare-account-without-session", iq(JULIET, "set"), accounts=[JULIET],
        error="service-unavailable"),
    row("iq-get-to-unknown-account", iq(NOBODY), error="service-unavailable"),
    row("iq-result-to-bare-dropped", iq(JULIET, "result"), sessions=[Bound(BALCONY)]),
    # No 'to': the server answers for the sender's own account (RFC 6120 10.3.3).
    row("iq-get-no-to-unknown-namespace", iq(None), error="service-unavailable"),
    row("iq-result-no-to-dropped", iq(None, "result")),
    # --- message with no 'to': as if to the sender's bare JID (RFC 6120 10.3.1) -------------
    row("chat-no-to-own-top-priority", message(None), sender=BALCONY,
        sessions=[Bound(BALCONY), Bound(GARDEN, priority=5)], delivered=[GARDEN]),
    row("chat-no-to-sender-is-top-priority", message(None), sender=BALCONY,
        sessions=[Bound(BALCONY, priority=5), Bound(GARDEN)], delivered=[BALCONY]),
    row("chat-no-to-negative-priority-only", message(None), sender=BALCONY,
        sessions=[Bound(BALCONY, priority=-1)], error="service-unavailable"),
    # --- to the server's domain (RFC 6120 10.5) ---------------------------------------------
    row("iq-get-to-server-unknown-namespace", iq(HOST), error="service-unavailable"),
    row("iq-result-to-server-dropped", iq(HOST, "result")),
    # RFC 6120 8.3.3.19: what no module takes is refused, every message type but error.
    row("chat-to-server-no-handler", message(HOST), error="service-unavailable"),
    row("normal-to-server-no-handler", message(HOST, "normal"), error="service-unavailable"),
    row("headline-to-server-no-handler", message(HOST, "headline"),
        error="service-unavailable"),
    row("groupchat-to-server-no-handler", message(HOST, "groupchat"),
        error="service-unavailable"),
    row("error-message-to-server-ignored", message(HOST, "error")),
    row("presence-to-server-ignored", presence(HOST)),
    row("probe-to-server-ignored", presence(HOST, "probe")),
    row("chat-to-server-resource", message(f"{HOST}/x"), error="service-unavailable"),
    row("iq-get-to-server-resource", iq(f"{HOST}/x"), error="service-unavailable"),
    row("presence-to-server-resource", presence(f"{HOST}/x"), error="service-unavailable"),
    # --- a malformed 'to' (RFC 6120 8.3.3.8) ------------------------------------------------
    row("chat-malformed-to", message(MALFORMED), error="jid-malformed"),
    row("iq-get-malformed-to", iq(MALFORMED), error="jid-malformed"),
    row("presence-malformed-to", presence(MALFORMED), error="jid-malformed"),
    row("iq-result-malformed-to-dropped", iq(MALFORMED, "result")),
    # --- a domain this server does not serve, with no s2s (RFC 6120 10.4.3) -----------------
    row("chat-to-remote-domain", message(REMOTE), error="remote-server-not-found"),
    row("headline-to-remote-domain", message(REMOTE, "headline"),
        error="remote-server-not-found"),
    row("iq-get-to-remote-domain", iq(f"{REMOTE}/x"), error="remote-server-not-found"),
    row("iq-result-to-remote-domain-dropped", iq(f"{REMOTE}/x", "result")),
    row("presence-to-remote-domain", presence(REMOTE), error="remote-server-not-found"),
    row("subscribe-to-remote-domain", presence(REMOTE, "subscribe"),
        error="remote-server-not-found"),
]
# fmt: on


@pytest.fixture(params=["empty-module-host", "router-alone"])
def router_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def make_router(kind: str, accounts: set[str]) -> Router:
    """A router over `accounts` (bare JIDs, kept up to date by the caller)."""
    if kind == "empty-module-host":
        harness = await ModuleHarness({}, hosts=[HOST], users=accounts).start()
        return harness.router

    async def user_exists(domain: str, user: str) -> bool:
        return f"{user}@{domain}" in accounts

    return Router([HOST], user_exists)


def is_copy(stanza: etree._Element, sent: etree._Element) -> bool:
    """`stanza` is `sent` delivered, not something made from it."""
    return stanza.tag == sent.tag and all(
        stanza.get(name) == sent.get(name) for name in ("id", "from", "to", "type")
    )


def assert_error_reply(reply: etree._Element, sent: etree._Element, condition: str) -> None:
    assert reply.tag == sent.tag
    assert reply.get("type") == "error"
    assert reply.get("id") == sent.get("id")
    assert reply.get("to") == sent.get("from")
    assert reply.get("from") == sent.get("to")  # on behalf of what it was sent to
    error = reply.find(f"{{{CLIENT}}}error")
    assert error is not None, etree.tostring(reply)
    assert error.get("type") == ERROR_TYPES[condition]
    conditions = [
        child.tag
        for child in error
        if etree.QName(child).namespace == STANZAS and etree.QName(child).localname != "text"
    ]
    assert conditions == [f"{{{STANZAS}}}{condition}"]


@pytest.mark.parametrize("case", ROWS)
async def test_routing_rule(case: Row, router_kind: str) -> None:
    accounts = set(case.accounts)
    router = await make_router(router_kind, accounts)
    sessions: dict[str, TestSession] = {}
    for bound in case.sessions:
        session = TestSession(bound.jid)
        accounts.add(session.bare)
        router.bind(session)
        session.available = bound.available
        session.priority = bound.priority
        sessions[bound.jid] = session

    stanza = parse_stanza(case.stanza)
    stanza.set("from", case.sender)  # as the stream stamps it
    router.route(stanza, sessions[case.sender])
    await router.drain()

    for jid, session in sessions.items():
        received = session.take()
        copies = [s for s in received if is_copy(s, stanza)]
        others = [s for s in received if not is_copy(s, stanza)]
        shown = [etree.tostring(s) for s in received]
        assert len(copies) == (1 if jid in case.delivered else 0), (jid, shown)
        if jid == case.sender and case.unsubscribed:
            assert [(s.tag, s.get("type"), s.get("from"), s.get("to")) for s in others] == [
                (f"{{{CLIENT}}}presence", "unsubscribed", JID(stanza.get("to")).bare,
                 JID(case.sender).bare)
            ], shown
        elif jid != case.sender or case.error is None:
            assert others == [], (jid, shown)
        elif case.error_optional and not others:
            continue
        else:
            assert len(others) == 1, (jid, shown)
            assert_error_reply(others[0], stanza, case.error)


class RecordingRemote:
    """The seam to other servers (s2s): what the router hands to remote domains."""

    def __init__(self) -> None:
        self.sent: list[etree._Element] = []

    def route(self, stanza: etree._Element, bounce: bool = True) -> None:
        self.sent.append(stanza)


@pytest.mark.parametrize("type_", ["subscribe", "probe"])
async def test_remote_subscribe_or_probe_to_unknown_account_is_answered(
    type_: str, router_kind: str
) -> None:
    """A contact on another server gets the answer a local one gets (RFC 6121 8.5.1)."""
    router = await make_router(router_kind, set())
    remote = router.remote = RecordingRemote()
    stanza = parse_stanza(presence(NOBODY, type_))
    stanza.set("from", REMOTE)  # as the s2s stream delivers it: no local session
    router.route(stanza)
    await router.drain()
    assert [(s.get("type"), s.get("from"), s.get("to")) for s in remote.sent] == [
        ("unsubscribed", NOBODY, REMOTE)
    ]


@pytest.mark.parametrize("other_resource", [True, False])
async def test_a_message_with_no_to_routed_again_reaches_its_account(
    other_resource: bool, router_kind: str
) -> None:
    """A message the client sent with no 'to' (RFC 6120 10.3.1) was delivered to one of
    its account's resources unchanged; routed again from there (stream management's
    unacknowledged stanzas, a session gone on another node) it has no origin, and
    went nowhere: now its stamped 'from' names the account, and it goes to another
    resource or, with none, to offline storage."""
    router = await make_router(router_kind, {JULIET})
    stored: list[tuple[str, etree._Element]] = []

    async def offline(stanza: etree._Element, bare: str) -> bool:
        stored.append((bare, stanza))
        return True

    router.events.hook("message/offline", offline)
    garden = TestSession(GARDEN)
    if other_resource:
        router.bind(garden)
        garden.available = True
    note = parse_stanza(message(None))
    note.set("from", BALCONY)  # stamped when balcony sent it
    router.route(note)
    await router.drain()
    if other_resource:
        assert [is_copy(s, note) for s in garden.received] == [True]
        assert stored == []
    else:
        assert [(bare, is_copy(s, note)) for bare, s in stored] == [(JULIET, True)]
