"""The component stream (XEP-0114) without I/O: the handshake, addressing, limits."""

from __future__ import annotations

import hashlib

import pytest

from xmppd.stream import component
from xmppd.stream.base import StreamEnded

SECRET = "0123456789abcdef-secret"
HEADER = (
    b"<stream:stream xmlns='jabber:component:accept' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='gw.example.org'>"
)


def new_stream(connected: frozenset[str] = frozenset()) -> component.ComponentStream:
    settings = component.ComponentSettings(
        secret_of={"gw.example.org": SECRET}.get,
        may_serve=lambda domain: domain not in connected,
        max_stanza_bytes=2048,
        max_stanza_bytes_unauthenticated=1024,
        max_depth=16,
    )
    return component.ComponentStream(settings)


def handshake(stream: component.ComponentStream, secret: str = SECRET) -> list[component.Event]:
    digest = hashlib.sha1((stream.stream_id + secret).encode()).hexdigest()
    return stream.receive(f"<handshake>{digest}</handshake>".encode())


def condition(stream: component.ComponentStream) -> str | None:
    return stream.error.condition if stream.error is not None else None


def test_handshake_with_the_secret_serves_the_domain() -> None:
    stream = new_stream()
    assert stream.receive(HEADER) == []
    header = stream.output()
    assert b"xmlns='jabber:component:accept'" in header
    assert f"id='{stream.stream_id}'".encode() in header and b"from='gw.example.org'" in header
    assert handshake(stream) == [component.Authenticated("gw.example.org")]
    assert stream.output() == b'<handshake xmlns="jabber:component:accept"/>'
    events = stream.receive(
        b"<message from='bot@gw.example.org/r' to='alice@example.org'><body>hi</body></message>"
    )
    assert isinstance(events[0], component.StanzaReceived)
    stanza = events[0].stanza
    assert stanza.tag == "{jabber:client}message"
    assert stanza.findtext("{jabber:client}body") == "hi"


def test_stanzas_to_the_component_leave_in_its_namespace() -> None:
    stream = new_stream()
    stream.receive(HEADER)
    handshake(stream)
    stream.output()
    events = stream.receive(
        b"<iq type='get' id='1' from='gw.example.org' to='example.org'>"
        b"<ping xmlns='urn:xmpp:ping'/></iq>"
    )
    stream.send(events[0].stanza)  # type: ignore[union-attr]
    assert stream.output().startswith(b'<iq xmlns="jabber:component:accept"')


@pytest.mark.parametrize(
    ("secret", "expected"), [("wrong-secret-0123456789", "not-authorized"), (SECRET, None)]
)
def test_a_wrong_secret_is_not_authorized(secret: str, expected: str | None) -> None:
    stream = new_stream()
    stream.receive(HEADER)
    events = handshake(stream, secret)
    assert condition(stream) == expected
    assert stream.authenticated is (expected is None)
    if expected:
        assert isinstance(events[-1], StreamEnded)


def test_an_unknown_domain_is_host_unknown() -> None:
    stream = new_stream()
    events = stream.receive(HEADER.replace(b"gw.example.org", b"other.example.org"))
    assert isinstance(events[-1], StreamEnded) and condition(stream) == "host-unknown"


def test_a_connected_domain_is_a_conflict() -> None:
    stream = new_stream(connected=frozenset({"gw.example.org"}))
    stream.receive(HEADER)
    handshake(stream)
    assert condition(stream) == "conflict" and not stream.authenticated


@pytest.mark.parametrize(
    ("stanza", "expected"),
    [
        (b"<message from='alice@example.org' to='bob@example.org'/>", "invalid-from"),
        (b"<message from='gw.example.org.evil' to='bob@example.org'/>", "invalid-from"),
        (b"<message to='bob@example.org'/>", "improper-addressing"),
        (b"<message from='gw.example.org'/>", "improper-addressing"),
        (b"<message from='@@' to='bob@example.org'/>", "improper-addressing"),
        (b"<foo xmlns='urn:example'/>", "unsupported-stanza-type"),
    ],
)
def test_bad_stanzas_end_the_stream(stanza: bytes, expected: str) -> None:
    stream = new_stream()
    stream.receive(HEADER)
    handshake(stream)
    events = stream.receive(stanza)
    assert events == [StreamEnded(stream.error)] and condition(stream) == expected


def test_nothing_but_the_handshake_before_it() -> None:
    stream = new_stream()
    stream.receive(HEADER)
    events = stream.receive(b"<message from='gw.example.org' to='bob@example.org'/>")
    assert events == [StreamEnded(stream.error)] and condition(stream) == "not-authorized"


def test_stanza_limits_before_and_after_the_handshake() -> None:
    stream = new_stream()
    stream.receive(HEADER)
    # The parser counts what a stanza still open holds (a whole one was read already).
    stream.receive(b"<handshake>" + b"a" * 1100)
    assert condition(stream) == "policy-violation"
    stream = new_stream()
    stream.receive(HEADER)
    handshake(stream)
    body = b"x" * 1500  # over the unauthenticated limit, under the authenticated one
    assert stream.receive(b"<message from='gw.example.org' to='a@example.org'><body>" + body) == []
    events = stream.receive(b"</body></message>")
    assert isinstance(events[0], component.StanzaReceived) and stream.error is None
    stream.receive(b"<message from='gw.example.org' to='a@example.org'><body>" + body * 2)
    assert condition(stream) == "policy-violation"


def test_wrong_namespace_is_invalid_namespace() -> None:
    stream = new_stream()
    stream.receive(HEADER.replace(b"jabber:component:accept", b"jabber:client"))
    assert condition(stream) == "invalid-namespace"


def test_nesting_past_the_limit_is_a_policy_violation() -> None:
    stream = new_stream()  # max_depth 16, the stream root included
    stream.receive(HEADER)
    handshake(stream)
    nested = b"<x>" * 20 + b"</x>" * 20
    stream.receive(b"<message from='gw.example.org' to='a@example.org'>" + nested + b"</message>")
    assert condition(stream) == "policy-violation"


@pytest.mark.parametrize(
    ("stanza", "reply"),
    [
        (
            b"<iq type='bogus' id='q1' from='bot@gw.example.org' to='example.org'>"
            b"<ping xmlns='urn:xmpp:ping'/></iq>",
            b'<iq xmlns="jabber:component:accept" type="error" to="bot@gw.example.org"'
            b' from="example.org" id="q1">',
        ),
        (
            b"<iq type='get' from='bot@gw.example.org' to='example.org'>"
            b"<ping xmlns='urn:xmpp:ping'/></iq>",
            b'<iq xmlns="jabber:component:accept" type="error" to="bot@gw.example.org"'
            b' from="example.org" id="">',
        ),
        (
            b"<iq type='set' id='q2' from='bot@gw.example.org' to='example.org'/>",
            b'<iq xmlns="jabber:component:accept" type="error" to="bot@gw.example.org"'
            b' from="example.org" id="q2">',
        ),
        (
            b"<presence type='here' from='bot@gw.example.org' to='alice@example.org'/>",
            b'<presence xmlns="jabber:component:accept" type="error" to="bot@gw.example.org"'
            b' from="alice@example.org">',
        ),
    ],
)
def test_a_malformed_stanza_is_answered_on_the_stream_and_not_routed(
    stanza: bytes, reply: bytes
) -> None:
    stream = new_stream()
    stream.receive(HEADER)
    handshake(stream)
    stream.output()
    assert stream.receive(stanza) == []
    out = stream.output()
    assert out.startswith(reply), out
    assert b'<bad-request xmlns="urn:ietf:params:xml:ns:xmpp-stanzas"/>' in out
    assert b'<error type="modify">' in out
    assert condition(stream) is None and not stream.closed


def test_a_component_message_of_unknown_type_is_routed_as_normal() -> None:
    stream = new_stream()
    stream.receive(HEADER)
    handshake(stream)
    (event,) = stream.receive(
        b"<message type='shout' from='bot@gw.example.org' to='alice@example.org'/>"
    )
    assert isinstance(event, component.StanzaReceived)
    assert event.stanza.get("type") == "normal"
