"""The server stream without I/O: both directions, authentication and stanza checks."""

from __future__ import annotations

import dataclasses

import pytest
from lxml import etree

from xmppd.stream import s2s

SETTINGS = s2s.S2SSettings(
    hosts={"b.test"},
    max_stanza_bytes=524288,
    max_stanza_bytes_unauthenticated=10240,
    max_depth=48,
)
HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:server' "
    b"xmlns:stream='http://etherx.jabber.org/streams' from='a.test' to='b.test' version='1.0'>"
)
EXTERNAL = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='EXTERNAL'>=</auth>"


def incoming_authenticated(
    identities: set[str], settings: s2s.S2SSettings = SETTINGS, header: bytes = HEADER
) -> tuple[s2s.S2SStream, list[s2s.Event]]:
    stream = s2s.S2SStream(settings)
    stream.receive(header)
    events = stream.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert isinstance(events[0], s2s.TLSRequested)
    stream.tls_started(identities)
    stream.receive(header)
    stream.output()
    return stream, stream.receive(EXTERNAL)


def ended_with(events: list[s2s.Event]) -> str | None:
    """The stream error condition `events` end with (None: the stream goes on)."""
    last = events[-1] if events else None
    if isinstance(last, s2s.StreamEnded) and last.error is not None:
        assert not any(isinstance(e, s2s.StanzaReceived) for e in events)
        return last.error.condition
    return None


def test_incoming_external_with_a_valid_certificate() -> None:
    stream, events = incoming_authenticated({"a.test"})
    # Authenticated, but stanzas wait for the restart (RFC 6120 6.4.6).
    assert events == [] and stream.authenticated and not stream.ready
    assert b"<success" in stream.output()
    assert stream.receive(HEADER) == [s2s.Authenticated("a.test", "EXTERNAL")]
    assert stream.ready
    received = stream.receive(
        b"<message from='anna@a.test/x' to='bob@b.test'><body>hi</body></message>"
    )
    assert isinstance(received[0], s2s.StanzaReceived)
    stanza = received[0].stanza
    assert stanza.tag == "{jabber:client}message"
    assert stanza.findtext("{jabber:client}body") == "hi"


def test_no_external_without_a_certificate_for_the_domain() -> None:
    stream = s2s.S2SStream(SETTINGS)
    stream.receive(HEADER)
    stream.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    stream.tls_started(set())
    stream.output()
    stream.receive(HEADER)
    assert b"EXTERNAL" not in stream.output()
    events = stream.receive(EXTERNAL)
    assert isinstance(events[-1], s2s.StreamEnded)
    out = stream.output()
    assert b"<invalid-mechanism/>" in out and b"not-authorized" in out


def test_stanza_checks_after_authentication() -> None:
    for stanza, condition in [
        (b"<message from='m@c.test' to='bob@b.test'/>", "invalid-from"),
        (b"<message from='anna@a.test' to='bob@elsewhere.test'/>", "host-unknown"),
        (b"<message to='bob@b.test'/>", "improper-addressing"),
    ]:
        stream, _ = incoming_authenticated({"a.test"})
        stream.receive(HEADER)
        stream.output()
        events = stream.receive(stanza)
        assert isinstance(events[-1], s2s.StreamEnded)
        assert events[-1].error is not None and events[-1].error.condition == condition
        assert not any(isinstance(e, s2s.StanzaReceived) for e in events)


# b.test also serves a subdomain (a MUC service, a component): a peer reaches it over
# a stream opened to it, never over one opened to b.test.
SERVED = dataclasses.replace(SETTINGS, hosts={"b.test", "muc.b.test"})
TO_MUC = HEADER.replace(b"to='b.test'", b"to='muc.b.test'")


def test_stanzas_only_for_the_domain_the_stream_is_to() -> None:
    stream, _ = incoming_authenticated({"a.test"}, SERVED)
    stream.receive(HEADER)
    stream.output()
    events = stream.receive(b"<message from='anna@a.test' to='room@muc.b.test'/>")
    assert ended_with(events) == "host-unknown"
    assert b"this stream is to b.test, not to muc.b.test" in stream.output()
    # The stream opened to the subdomain takes its stanzas, and only those.
    stream, _ = incoming_authenticated({"a.test"}, SERVED, TO_MUC)
    stream.receive(TO_MUC)
    events = stream.receive(b"<message from='anna@a.test' to='room@muc.b.test'/>")
    assert ended_with(events) is None and isinstance(events[0], s2s.StanzaReceived)
    assert ended_with(stream.receive(b"<message from='anna@a.test' to='bob@b.test'/>")) == (
        "host-unknown"
    )


def test_a_restart_cannot_move_the_stream_to_another_of_our_domains() -> None:
    # After TLS, before authenticating.
    stream = s2s.S2SStream(SERVED)
    stream.receive(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    stream.tls_started({"a.test"})
    assert ended_with(stream.receive(TO_MUC)) == "host-unknown"
    # After SASL EXTERNAL for b.test: the restarted header names muc.b.test.
    stream, events = incoming_authenticated({"a.test"}, SERVED)
    assert events == [] and stream.authenticated
    assert ended_with(stream.receive(TO_MUC)) == "host-unknown"
    assert stream.local == "b.test"


@pytest.mark.parametrize(
    ("stanza", "reply_id"),
    [
        (
            b"<iq type='bogus' id='q1' from='anna@a.test/x' to='bob@b.test/y'>"
            b"<ping xmlns='urn:xmpp:ping'/></iq>",
            "q1",
        ),
        (b"<iq from='anna@a.test/x' to='b.test' id='q2'><ping xmlns='urn:xmpp:ping'/></iq>", "q2"),
        (b"<iq type='get' from='anna@a.test/x' to='b.test'><ping xmlns='urn:xmpp:ping'/></iq>", ""),
        (b"<iq type='get' id='q3' from='anna@a.test/x' to='bob@b.test/y'/>", "q3"),
        (
            b"<presence type='online' id='q4' from='anna@a.test/x' to='bob@b.test'/>",
            "q4",
        ),
    ],
)
def test_a_malformed_stanza_is_refused_with_bad_request(stanza: bytes, reply_id: str) -> None:
    """Answered by a StanzaRefused the driver routes back: this stream is one-way."""
    stream, _ = incoming_authenticated({"a.test"})
    stream.receive(HEADER)
    stream.output()
    (event,) = stream.receive(stanza)
    assert isinstance(event, s2s.StanzaRefused)
    sent = etree.fromstring(stanza)
    error = event.error
    assert error.tag == "{jabber:client}" + sent.tag
    assert error.get("type") == "error" and error.get("id") == reply_id
    assert error.get("to") == sent.get("from") and error.get("from") == sent.get("to")
    condition = error.find("{jabber:client}error")
    assert condition is not None and condition.get("type") == "modify"
    assert condition.find("{urn:ietf:params:xml:ns:xmpp-stanzas}bad-request") is not None
    assert stream.output() == b"" and not stream.closed


def test_a_response_without_id_from_a_peer_is_dropped() -> None:
    stream, _ = incoming_authenticated({"a.test"})
    stream.receive(HEADER)
    assert stream.receive(b"<iq type='result' from='anna@a.test/x' to='bob@b.test/y'/>") == []


def test_a_message_of_unknown_type_from_a_peer_is_routed_as_normal() -> None:
    stream, _ = incoming_authenticated({"a.test"})
    stream.receive(HEADER)
    (event,) = stream.receive(b"<message type='shout' from='anna@a.test' to='bob@b.test'/>")
    assert isinstance(event, s2s.StanzaReceived)
    assert event.stanza.get("type") == "normal"


def test_stanzas_before_authentication_are_refused() -> None:
    stream = s2s.S2SStream(SETTINGS)
    stream.receive(HEADER)
    events = stream.receive(b"<message from='anna@a.test' to='bob@b.test'/>")
    assert isinstance(events[-1], s2s.StreamEnded)
    assert events[-1].error is not None and events[-1].error.condition == "not-authorized"


def test_outgoing_negotiates_tls_then_external() -> None:
    stream = s2s.S2SStream(SETTINGS, outgoing=True, local="b.test", remote="a.test")
    stream.start()
    assert b"from='b.test'" in stream.output()
    peer_header = HEADER.replace(b"from='a.test' to='b.test'", b"from='a.test' to='b.test' id='x'")
    features_tls = (
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
        b"<required/></starttls></stream:features>"
    )
    assert stream.receive(peer_header + features_tls) == []
    assert b"<starttls" in stream.output()
    events = stream.receive(b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert events == [s2s.TLSRequested()]
    stream.tls_started()
    assert b"<stream:stream" in stream.output()
    features_sasl = (
        b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>EXTERNAL</mechanism></mechanisms></stream:features>"
    )
    stream.receive(peer_header + features_sasl)
    assert b'mechanism="EXTERNAL"' in stream.output()
    assert stream.receive(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>") == []
    assert b"<stream:stream" in stream.output()
    events = stream.receive(peer_header + b"<stream:features/>")
    assert events == [s2s.Authenticated("a.test", "EXTERNAL")]
    message = etree.fromstring(
        b"<message xmlns='jabber:client' from='bob@b.test' to='anna@a.test'>"
        b"<body>x</body></message>"
    )
    stream.send(message)
    assert stream.output() == (
        b'<message xmlns="jabber:server" from="bob@b.test" to="anna@a.test">'
        b"<body>x</body></message>"
    )


def test_outgoing_gives_up_without_external() -> None:
    stream = s2s.S2SStream(SETTINGS, outgoing=True, local="b.test", remote="a.test")
    stream.start()
    stream.receive(
        HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    )
    stream.tls_started()
    events = stream.receive(HEADER + b"<stream:features/>")
    assert isinstance(events[0], s2s.AuthFailed)
    assert stream.closed


def _key(receiving: str, originating: str, stream_id: str) -> str:
    return f"key:{receiving}:{originating}:{stream_id}"


DIALBACK = s2s.S2SSettings(
    hosts={"b.test"},
    max_stanza_bytes=524288,
    max_stanza_bytes_unauthenticated=10240,
    max_depth=48,
    dialback_key=_key,
)


def test_outgoing_falls_back_to_dialback() -> None:
    stream = s2s.S2SStream(DIALBACK, outgoing=True, local="b.test", remote="a.test", dialback=True)
    stream.start()
    stream.receive(
        HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    )
    stream.tls_started()
    stream.output()
    restarted = HEADER.replace(b"to='b.test'", b"to='b.test' id='sid-2'")
    events = stream.receive(
        restarted + b"<stream:features><dialback xmlns='urn:xmpp:features:dialback'/>"
        b"</stream:features>"
    )
    assert events == []
    sent = stream.output()
    assert b"<db:result" in sent and b">key:a.test:b.test:sid-2</db:result>" in sent
    events = stream.receive(
        b"<db:result xmlns:db='jabber:server:dialback' from='a.test' to='b.test' type='valid'/>"
    )
    assert events == [s2s.Authenticated("a.test", "dialback")]


def test_outgoing_tries_dialback_when_external_fails() -> None:
    # ejabberd offers EXTERNAL to every peer and checks the certificate only when asked:
    # its <failure/> leaves the stream open, and dialback (offered too) follows on it.
    stream = s2s.S2SStream(DIALBACK, outgoing=True, local="b.test", remote="a.test", dialback=True)
    stream.start()
    stream.receive(
        HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    )
    stream.tls_started()
    stream.output()
    restarted = HEADER.replace(b"to='b.test'", b"to='b.test' id='sid-3'")
    stream.receive(
        restarted + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>EXTERNAL</mechanism></mechanisms>"
        b"<dialback xmlns='urn:xmpp:features:dialback'/></stream:features>"
    )
    assert b'mechanism="EXTERNAL"' in stream.output()
    events = stream.receive(
        b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
    )
    assert events == [] and not stream.closed
    assert b">key:a.test:b.test:sid-3</db:result>" in stream.output()
    events = stream.receive(
        b"<db:result xmlns:db='jabber:server:dialback' from='a.test' to='b.test' type='valid'/>"
    )
    assert events == [s2s.Authenticated("a.test", "dialback")]


DIALBACK_FEATURE = b"<dialback xmlns='urn:xmpp:features:dialback'/>"


def test_outgoing_gives_up_when_external_fails_without_dialback() -> None:
    for settings, offered in ((DIALBACK, b""), (SETTINGS, DIALBACK_FEATURE)):
        # Dialback not offered by the peer, or not allowed here.
        stream = s2s.S2SStream(
            settings, outgoing=True, local="b.test", remote="a.test", dialback=True
        )
        stream.start()
        stream.receive(
            HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
            b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        )
        stream.tls_started()
        stream.receive(
            HEADER + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
            b"<mechanism>EXTERNAL</mechanism></mechanisms>" + offered + b"</stream:features>"
        )
        events = stream.receive(
            b"<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'><not-authorized/></failure>"
        )
        assert isinstance(events[0], s2s.AuthFailed) and stream.closed
        assert b"<db:result" not in stream.output()


def test_incoming_vouches_only_for_its_own_keys() -> None:
    for key, verdict in [(b"key:a.test:b.test:s1", b"valid"), (b"forged", b"invalid")]:
        stream = s2s.S2SStream(DIALBACK)
        stream.receive(HEADER)
        stream.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        stream.tls_started(set())
        stream.receive(HEADER)
        stream.output()
        stream.receive(
            b"<db:verify xmlns:db='jabber:server:dialback' from='a.test' to='b.test' id='s1'>"
            + key
            + b"</db:verify>"
        )
        answer = stream.output()
        assert b'type="' + verdict + b'"' in answer
        assert b'from="b.test" to="a.test" id="s1"' in answer


BIDI = s2s.S2SSettings(
    hosts={"b.test"},
    max_stanza_bytes=524288,
    max_stanza_bytes_unauthenticated=10240,
    max_depth=48,
    bidi=True,
)
MESSAGE = etree.fromstring(
    b"<message xmlns='jabber:client' from='bob@b.test' to='anna@a.test'><body>x</body></message>"
)


def test_incoming_offers_bidi_and_then_sends_on_the_stream() -> None:
    stream = s2s.S2SStream(BIDI)
    stream.receive(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    stream.tls_started({"a.test"})
    stream.receive(HEADER)
    assert b"<bidi xmlns=\"urn:xmpp:features:bidi\"/>" in stream.output()
    assert not stream.bidi
    # XEP-0288 3: asked for before authentication, with no answer.
    assert stream.receive(b"<bidi xmlns='urn:xmpp:bidi'/>") == []
    assert stream.output() == b"" and stream.bidi
    assert stream.receive(EXTERNAL) == []
    assert stream.output().startswith(b"<success")
    # Nothing for the peer between <success/> and our restarted header (RFC 6120 6.4.6).
    assert not stream.ready
    assert stream.receive(HEADER) == [s2s.Authenticated("a.test", "EXTERNAL")]
    assert stream.output().startswith(b"<?xml version='1.0'?><stream:stream ")
    stream.send(MESSAGE)
    assert stream.output().startswith(b'<message xmlns="jabber:server" from="bob@b.test"')


def test_bidi_is_neither_offered_nor_taken_when_off() -> None:
    stream = s2s.S2SStream(SETTINGS)
    stream.receive(HEADER + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    stream.tls_started({"a.test"})
    stream.receive(HEADER)
    assert b"bidi" not in stream.output()
    events = stream.receive(b"<bidi xmlns='urn:xmpp:bidi'/>")
    assert isinstance(events[0], s2s.StreamEnded) and not stream.bidi


def outgoing_bidi(
    offered: bool, settings: s2s.S2SSettings = BIDI
) -> tuple[s2s.S2SStream, bytes]:
    """An outgoing stream up to EXTERNAL success and the restarted stream's features;
    what it sent after TLS."""
    stream = s2s.S2SStream(settings, outgoing=True, local="b.test", remote="a.test")
    stream.start()
    stream.receive(
        HEADER + b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
        b"</stream:features><proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    )
    stream.tls_started()
    stream.output()
    bidi = b"<bidi xmlns='urn:xmpp:features:bidi'/>" if offered else b""
    stream.receive(
        HEADER + b"<stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>"
        b"<mechanism>EXTERNAL</mechanism></mechanisms>" + bidi + b"</stream:features>"
    )
    sent = stream.output()
    stream.receive(b"<success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    events = stream.receive(HEADER + b"<stream:features/>")
    assert events == [s2s.Authenticated("a.test", "EXTERNAL")]
    return stream, sent


def test_outgoing_asks_for_bidi_and_takes_the_peers_stanzas() -> None:
    stream, sent = outgoing_bidi(offered=True)
    assert sent.index(b'<bidi xmlns="urn:xmpp:bidi"/>') < sent.index(b"<auth")
    events = stream.receive(
        b"<message from='anna@a.test/home' to='bob@b.test'><body>back</body></message>"
    )
    assert len(events) == 1 and isinstance(events[0], s2s.StanzaReceived)
    assert events[0].stanza.get("from") == "anna@a.test/home"
    # Still only from the authenticated domain.
    events = stream.receive(b"<message from='eve@evil.test' to='bob@b.test'/>")
    assert isinstance(events[0], s2s.StreamEnded) and events[0].error is not None
    assert events[0].error.condition == "invalid-from"


def test_outgoing_bidi_takes_stanzas_only_for_our_domain_of_the_stream() -> None:
    stream, _ = outgoing_bidi(offered=True, settings=dataclasses.replace(BIDI, hosts=SERVED.hosts))
    events = stream.receive(b"<message from='anna@a.test' to='room@muc.b.test'/>")
    assert ended_with(events) == "host-unknown"


def test_outgoing_without_bidi_refuses_the_peers_stanzas() -> None:
    stream, sent = outgoing_bidi(offered=False)
    assert b"bidi" not in sent and not stream.bidi
    events = stream.receive(b"<message from='anna@a.test/home' to='bob@b.test'/>")
    assert isinstance(events[0], s2s.StreamEnded) and events[0].error is not None
    assert events[0].error.condition == "unsupported-stanza-type"


def dialback_stream(
    allowed: set[str], base: s2s.S2SSettings = SETTINGS
) -> tuple[s2s.S2SStream, bytes]:
    """An incoming stream from a.test after TLS with no valid certificate; dialback
    allowed for the domains in `allowed`; returns it and the features it offered."""
    settings = dataclasses.replace(base, dialback_key=_key, accept_dialback=allowed.__contains__)
    stream = s2s.S2SStream(settings)
    stream.receive(HEADER)
    stream.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    stream.tls_started(set())
    stream.output()
    stream.receive(HEADER)
    return stream, stream.output()


DB_RESULT = (
    b"<db:result xmlns:db='jabber:server:dialback' from='a.test' to='b.test'>k3y</db:result>"
)


def test_incoming_dialback_offered_only_where_allowed() -> None:
    _, features = dialback_stream({"a.test"})
    assert b"urn:xmpp:features:dialback" in features and b"EXTERNAL" not in features
    stream, features = dialback_stream({"other.test"})
    assert b"urn:xmpp:features:dialback" not in features
    events = stream.receive(DB_RESULT)  # not offered: refused
    assert isinstance(events[-1], s2s.StreamEnded)
    assert not any(isinstance(e, s2s.DialbackRequested) for e in events)


def test_incoming_dialback_valid_authenticates() -> None:
    stream, _ = dialback_stream({"a.test"})
    events = stream.receive(DB_RESULT)
    assert events == [s2s.DialbackRequested("a.test", "b.test", "k3y", stream.stream_id)]
    assert not stream.authenticated
    assert stream.dialback_checked("a.test", True) == [s2s.Authenticated("a.test", "dialback")]
    assert b"type=\"valid\"" in stream.output()
    received = stream.receive(b"<message from='anna@a.test/x' to='bob@b.test'/>")
    assert isinstance(received[0], s2s.StanzaReceived)


def test_incoming_dialback_covers_only_the_pair_it_verified() -> None:
    stream, _ = dialback_stream({"a.test"}, SERVED)
    stream.receive(DB_RESULT)
    assert stream.dialback_checked("a.test", True) == [s2s.Authenticated("a.test", "dialback")]
    stream.output()
    events = stream.receive(b"<message from='anna@a.test/x' to='room@muc.b.test'/>")
    assert ended_with(events) == "host-unknown"
    # No second pair on the same stream either (no piggybacking, XEP-0220 2.4 / 4.1).
    stream, _ = dialback_stream({"a.test"}, SERVED)
    stream.receive(DB_RESULT)
    stream.dialback_checked("a.test", True)
    piggyback = DB_RESULT.replace(b"to='b.test'", b"to='muc.b.test'")
    assert ended_with(stream.receive(piggyback)) == "unsupported-stanza-type"


def test_incoming_dialback_invalid_or_unanswered() -> None:
    stream, _ = dialback_stream({"a.test"})
    stream.receive(DB_RESULT)
    events = stream.dialback_checked("a.test", False)
    assert isinstance(events[-1], s2s.StreamEnded) and stream.closed
    out = stream.output()
    assert b"type=\"invalid\"" in out and b"<not-authorized" in out
    stream, _ = dialback_stream({"a.test"})
    stream.receive(DB_RESULT)
    assert stream.dialback_checked("a.test", None) == []
    out = stream.output()
    assert b"type=\"error\"" in out and b"remote-connection-failed" in out
    assert not stream.authenticated and not stream.closed


def test_incoming_dialback_for_another_domain_is_refused() -> None:
    for result, condition in [
        (DB_RESULT.replace(b"from='a.test'", b"from='c.test'"), "invalid-from"),
        (DB_RESULT.replace(b"to='b.test'", b"to='x.test'"), "host-unknown"),
    ]:
        stream, _ = dialback_stream({"a.test", "c.test"})
        events = stream.receive(result)
        assert isinstance(events[-1], s2s.StreamEnded)
        assert events[-1].error is not None and events[-1].error.condition == condition


def test_verify_stream_sends_db_verify_and_reports_the_answer() -> None:
    stream = s2s.S2SStream(
        SETTINGS, outgoing=True, local="b.test", remote="a.test", verify=("k3y", "sid1")
    )
    stream.start()
    stream.receive(HEADER.replace(b"from='a.test' to='b.test'", b"from='a.test' id='x'"))
    stream.receive(
        b"<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/></stream:features>"
        b"<proceed xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>"
    )
    stream.tls_started({"a.test"})
    stream.output()
    stream.receive(HEADER + b"<stream:features/>")
    out = stream.output()
    assert b"<db:verify" in out and b"id=\"sid1\"" in out and b">k3y<" in out
    events = stream.receive(
        b"<db:verify xmlns:db='jabber:server:dialback' from='a.test' to='b.test' id='sid1'"
        b" type='valid'/>"
    )
    assert s2s.DialbackVerified(True) in events
