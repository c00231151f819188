"""The sans-IO client stream: every protocol rule without a socket."""

from __future__ import annotations

import base64
import resource

import pytest
from lxml import etree

from xmppd.stream import c2s
from xmppd.stream.errors import StreamError
from xmppd.xml import ns

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    b"xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>"
)
CB = {"tls-server-end-point": b"\x01" * 32}


def settings(**kw: object) -> c2s.StreamSettings:
    base: dict[str, object] = dict(
        hosts={"localhost"},
        max_stanza_bytes=65536,
        max_stanza_bytes_unauthenticated=4096,
        max_depth=16,
        mechanisms=["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"],
    )
    base.update(kw)
    return c2s.StreamSettings(**base)  # type: ignore[arg-type]


def parse_out(data: bytes) -> etree._Element:
    """Parse what the server sent as one document (header and close added where missing)."""
    if not data.startswith(b"<?xml"):
        data = (
            b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
            + data
        )
    if not data.rstrip().endswith(b"</stream:stream>"):
        data += b"</stream:stream>"
    return etree.fromstring(data)


def stream_error(data: bytes) -> str:
    root = parse_out(data)
    err = root.find(f"{{{ns.STREAMS}}}error")
    assert err is not None, data
    return etree.QName(err[0]).localname


def secured() -> c2s.C2SStream:
    s = c2s.C2SStream(settings(direct_tls=True))
    s.set_channel_bindings(CB)
    s.receive(HEADER)
    s.output()
    return s


def bound(resource: str = "r1") -> c2s.C2SStream:
    s = secured()
    s.receive(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
        + base64.b64encode(b"\0alice\0pw")
        + b"</auth>"
    )
    s.sasl_success("alice")
    s.receive(HEADER)
    events = s.receive(
        b"<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    assert isinstance(events[0], c2s.BindRequested)
    s.bound(events[0].iq, f"alice@localhost/{resource}")
    s.output()
    return s


def answered(s: c2s.C2SStream, events: list[c2s.Event]) -> etree._Element | None:
    """The stream answered one stanza itself: no StanzaReceived, one StanzaAnswered,
    and nothing written, as the connection delivers the answer through the session
    (stream management counts it); its answer."""
    assert len(events) == 1 and isinstance(events[0], c2s.StanzaAnswered)
    assert s.output() == b""
    return events[0].reply


def test_starttls_required_and_no_mechanisms_before_tls() -> None:
    s = c2s.C2SStream(settings())
    assert s.receive(HEADER) == []
    root = parse_out(s.output())
    features = root.find(f"{{{ns.STREAMS}}}features")
    assert features is not None
    assert features.find(f"{{{ns.TLS}}}starttls/{{{ns.TLS}}}required") is not None
    assert features.find(f"{{{ns.SASL}}}mechanisms") is None


def test_auth_before_starttls_is_refused_with_encryption_required() -> None:
    s = c2s.C2SStream(settings())
    s.receive(HEADER)
    s.output()
    events = s.receive(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>"
    )
    assert events == [c2s.AuthRefused("encryption-required", "PLAIN")]  # for the log
    out = s.output()
    assert b"<encryption-required/>" in out and b"failure" in out
    assert not s.closed


REGISTER_FEATURE = "{http://jabber.org/features/iq-register}register"


@pytest.mark.parametrize("allow_unencrypted", [False, True])
def test_registration_before_tls_is_passed_on_marked_and_never_offered(
    allow_unencrypted: bool,
) -> None:
    """Registration sends a password: its feature is offered over TLS only (even where
    SASL may run in clear), and an IQ sent before TLS goes to its handler, which knows
    from `tls` to refuse it (and logs who asked) instead of the stream ending."""
    def stream(direct_tls: bool) -> c2s.C2SStream:
        return c2s.C2SStream(settings(
            direct_tls=direct_tls,
            allow_unencrypted=allow_unencrypted,
            preauth_features=lambda: [etree.Element(REGISTER_FEATURE)],
            preauth_iq_namespaces=frozenset({"jabber:iq:register"}),
        ))

    offered = f"{{{ns.STREAMS}}}features/{REGISTER_FEATURE}"
    s = stream(direct_tls=False)
    s.receive(HEADER)
    assert parse_out(s.output()).find(offered) is None
    events = s.receive(b"<iq type='get' id='r'><query xmlns='jabber:iq:register'/></iq>")
    assert [type(e) for e in events] == [c2s.PreAuthIQ] and not s.tls and not s.closed
    s = stream(direct_tls=True)
    s.receive(HEADER)
    assert parse_out(s.output()).find(offered) is not None


def test_starttls_then_restart_offers_plus_and_xep0440() -> None:
    s = c2s.C2SStream(settings())
    s.receive(HEADER)
    s.output()
    events = s.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
    assert isinstance(events[0], c2s.TLSRequested)
    assert b"<proceed" in s.output()
    s.tls_started(CB)
    s.receive(HEADER)
    root = parse_out(s.output())
    mechs = [m.text for m in root.iter(f"{{{ns.SASL}}}mechanism")]
    assert mechs == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "PLAIN"]
    cb_types = [e.get("type") for e in root.iter(f"{{{ns.SASL_CB}}}channel-binding")]
    assert cb_types == ["tls-server-end-point"]


OTHER_HEADER = HEADER.replace(b"to='localhost'", b"to='other.test'")


def plain_login(s: c2s.C2SStream) -> None:
    """alice logs in with PLAIN on a secured stream; the server's answers are read."""
    s.receive(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
        + base64.b64encode(b"\0alice\0pw")
        + b"</auth>"
    )
    s.sasl_success("alice")
    s.output()


@pytest.mark.parametrize("after", ["starttls", "sasl"])
def test_a_restart_naming_another_host_is_host_unknown(after: str) -> None:
    """Both hosts are served, but the stream stays with the first: SASL checked the
    password against localhost's accounts, so a restart to other.test must not bind
    alice@other.test."""
    s = c2s.C2SStream(settings(hosts={"localhost", "other.test"}, direct_tls=after == "sasl"))
    s.set_channel_bindings(CB)
    s.receive(HEADER)
    s.output()
    if after == "starttls":
        s.receive(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        s.output()
        s.tls_started(CB)
    else:
        plain_login(s)
    s.receive(OTHER_HEADER)
    assert stream_error(s.output()) == "host-unknown"
    assert s.closed and s.host == "localhost"


@pytest.mark.parametrize("restart", [OTHER_HEADER, OTHER_HEADER.replace(b" to='other.test'", b"")])
def test_a_restart_naming_the_same_host_or_none_goes_on(restart: bytes) -> None:
    s = c2s.C2SStream(settings(hosts={"localhost", "other.test"}, direct_tls=True))
    s.set_channel_bindings(CB)
    s.receive(OTHER_HEADER)
    s.output()
    plain_login(s)
    s.receive(restart)
    assert b"urn:ietf:params:xml:ns:xmpp-bind" in s.output()
    assert not s.closed and s.host == "other.test"


def test_no_plus_without_channel_binding() -> None:
    s = c2s.C2SStream(settings(direct_tls=True))
    s.receive(HEADER)
    root = parse_out(s.output())
    mechs = [m.text for m in root.iter(f"{{{ns.SASL}}}mechanism")]
    assert mechs == ["SCRAM-SHA-256", "PLAIN"]
    assert root.find(f".//{{{ns.SASL_CB}}}sasl-channel-binding") is None


@pytest.mark.parametrize(
    ("data", "condition"),
    [
        (b"<message><body>x</bod></message>", "not-well-formed"),
        (b"<message><!-- hi --></message>", "restricted-xml"),
        (b"<?evil x?>", "restricted-xml"),
        (b"<message><body>&custom;</body></message>", "not-well-formed"),
        (b"<foo/>", "unsupported-stanza-type"),
    ],
)
def test_bad_xml_after_header(data: bytes, condition: str) -> None:
    s = secured()
    events = s.receive(data)
    assert isinstance(events[-1], c2s.StreamEnded)
    assert stream_error(s.output()) == condition
    assert s.closed


@pytest.mark.parametrize(
    ("header", "condition"),
    [
        (HEADER.replace(b"to='localhost'", b"to='nowhere.example'"), "host-unknown"),
        (HEADER.replace(b"to='localhost' ", b""), "host-unknown"),
        (HEADER.replace(b"http://etherx.jabber.org/streams", b"urn:wrong"), "invalid-namespace"),
        (HEADER.replace(b"xmlns='jabber:client'", b"xmlns='jabber:wrong'"), "invalid-namespace"),
        (HEADER.replace(b" version='1.0'>", b" version='2.0'>"), "unsupported-version"),
        (HEADER.replace(b" version='1.0'>", b">"), "unsupported-version"),
        (
            HEADER.replace(b"stream:stream", b"s:stream").replace(b"xmlns:stream", b"xmlns:s"),
            "bad-namespace-prefix",
        ),
    ],
)
def test_bad_stream_header(header: bytes, condition: str) -> None:
    s = c2s.C2SStream(settings())
    s.receive(header)
    out = s.output()
    assert out.startswith(
        b"<?xml version='1.0'?><stream:stream "
    )  # header first (RFC 6120 4.9.1.1)
    assert stream_error(out) == condition
    assert s.closed


def test_doctype_and_entity_bomb_are_restricted_xml_with_flat_memory() -> None:
    bomb = (
        b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
        + b"".join(
            b"<!ENTITY lol%d '%s'>" % (i, (b"&lol%d;" % (i - 1) if i else b"&lol;") * 10)
            for i in range(1, 10)
        )
        + b"]>"
        + HEADER[len(b"<?xml version='1.0'?>") :]
        + b"<message>&lol9;</message>"
    )
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    s = c2s.C2SStream(settings())
    events = s.receive(bomb)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert isinstance(events[-1], c2s.StreamEnded)
    assert stream_error(s.output()) == "restricted-xml"
    assert after - before < 20_000  # KB: a billion laughs expanded would be gigabytes


def test_stanza_over_size_limit_before_auth() -> None:
    s = secured()
    events = s.receive(b"<message><body>" + b"x" * 10_000 + b"</body></message>")
    assert isinstance(events[-1], c2s.StreamEnded)
    assert stream_error(s.output()) == "policy-violation"


def test_size_limit_is_raised_after_auth() -> None:
    s = bound()
    big = b"<message to='bob@localhost'><body>" + b"x" * 10_000 + b"</body></message>"
    events = s.receive(big)
    assert isinstance(events[0], c2s.StanzaReceived)
    events = s.receive(b"<message><body>" + b"x" * 70_000 + b"</body></message>")
    assert stream_error(s.output()) == "policy-violation"


def test_nesting_deeper_than_limit() -> None:
    s = bound()
    events = s.receive(b"<message>" + b"<a>" * 10_000)
    assert isinstance(events[-1], c2s.StreamEnded)
    assert stream_error(s.output()) == "policy-violation"


def test_stanzas_before_auth_and_before_bind_are_not_authorized() -> None:
    s = secured()
    s.receive(b"<message to='bob@localhost'><body>hi</body></message>")
    assert stream_error(s.output()) == "not-authorized"
    s = secured()
    s.receive(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>")
    s.sasl_success("alice")
    s.receive(HEADER)
    s.output()
    s.receive(b"<message to='bob@localhost'><body>hi</body></message>")
    assert stream_error(s.output()) == "not-authorized"


def test_non_stanza_elements_after_auth_are_events_for_modules() -> None:
    """Stream management's <resume/> comes between auth and bind, <enable/> after bind:
    the stream hands both on, saying which; before auth one ends the stream."""
    s = secured()
    s.receive(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>")
    s.sasl_success("alice")
    s.receive(HEADER)
    s.output()
    (event,) = s.receive(b"<resume xmlns='urn:xmpp:sm:3' previd='x' h='0'/>")
    assert isinstance(event, c2s.NonzaReceived) and not event.bound
    assert event.element.tag == "{urn:xmpp:sm:3}resume"
    s = bound()
    (event,) = s.receive(b"<enable xmlns='urn:xmpp:sm:3'/>")
    assert isinstance(event, c2s.NonzaReceived) and event.bound
    s = secured()
    s.receive(b"<enable xmlns='urn:xmpp:sm:3'/>")
    assert stream_error(s.output()) == "unsupported-stanza-type"


def test_from_is_stamped_and_spoofing_is_invalid_from() -> None:
    s = bound()
    (event,) = s.receive(b"<message to='bob@localhost'><body>hi</body></message>")
    assert isinstance(event, c2s.StanzaReceived)
    assert event.stanza.get("from") == "alice@localhost/r1"
    (event,) = s.receive(b"<message from='alice@localhost' to='bob@localhost'/>")
    assert isinstance(event, c2s.StanzaReceived)
    assert event.stanza.get("from") == "alice@localhost/r1"
    events = s.receive(b"<message from='mallory@localhost/x' to='bob@localhost'/>")
    assert isinstance(events[-1], c2s.StreamEnded)
    assert stream_error(s.output()) == "invalid-from"


def test_session_iq_answered_by_the_stream() -> None:
    s = bound()
    events = s.receive(
        b"<iq type='set' id='s1'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
    )
    reply = answered(s, events)  # not routed, but counted (XEP-0198 h)
    assert reply is not None
    assert reply.get("type") == "result" and reply.get("id") == "s1"


def test_sasl_failures_end_the_stream_after_five() -> None:
    s = secured()
    for _ in range(5):
        s.receive(
            b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>"
        )
        s.sasl_failure("not-authorized")
    assert s.closed
    assert stream_error(s.output()) == "policy-violation"


PLAIN_AUTH = (
    b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
    + base64.b64encode(b"\0alice\0pw")
    + b"</auth>"
)


def test_an_auth_during_an_exchange_aborts_it_unchecked_and_counts() -> None:
    """<auth/>s pipelined in one write: the second ends the first exchange (whose
    check the login drops) and starts none; each such one counts towards the
    per-stream limit, unlike the client's own <abort/>."""
    s = secured()
    events = s.receive(PLAIN_AUTH * 2)
    assert [type(e) for e in events] == [c2s.AuthRequested, c2s.AuthAborted, c2s.AuthRefused]
    refused = events[2]
    assert isinstance(refused, c2s.AuthRefused)
    assert (refused.condition, refused.mechanism) == ("aborted", "PLAIN")
    assert parse_out(s.output())[0][0].tag == f"{{{ns.SASL}}}aborted"
    events = s.receive(PLAIN_AUTH * 8)  # 4 more pairs: the fifth counted failure ends it
    assert sum(isinstance(e, c2s.AuthRequested) for e in events) == 4
    assert s.closed
    assert stream_error(s.output()) == "policy-violation"
    s = secured()
    for _ in range(5):  # the client's own <abort/> is not counted
        s.receive(PLAIN_AUTH + b"<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    assert not s.closed


def test_a_late_outcome_of_an_exchange_no_longer_under_way_is_ignored() -> None:
    """A login task that outlived its exchange (aborted, or another one succeeded)
    must neither authenticate the stream nor answer it."""
    s = secured()
    s.receive(PLAIN_AUTH + b"<abort xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>")
    s.output()
    s.sasl_success("alice")
    s.sasl_failure("not-authorized")
    assert not s.authenticated and s.output() == b""
    s.receive(PLAIN_AUTH)
    s.sasl_success("alice")
    s.receive(HEADER)
    s.output()
    s.sasl_failure("not-authorized")
    s.sasl_success("mallory")
    assert s.username == "alice" and s.output() == b""


def test_a_login_finishing_after_the_stream_ended_does_not_reopen_it() -> None:
    """The credentials are checked in a task; the auth timeout may end the stream
    meanwhile. The success that comes after must send nothing and leave it closed."""
    s = secured()
    s.receive(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
        + base64.b64encode(b"\0alice\0pw")
        + b"</auth>"
    )
    s.fail(StreamError("connection-timeout", "authenticate in time"))
    s.output()
    s.sasl_success("alice")
    assert s.closed and s.phase is c2s.Phase.CLOSED and s.username is None
    assert s.output() == b""
    assert s.receive(b"<message to='bob@localhost'><body>hi</body></message>") == []
    s.send(etree.Element(ns.C_MESSAGE))
    assert s.output() == b""


def test_auth_with_bad_base64_and_unknown_mechanism() -> None:
    s = secured()
    events = s.receive(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>!!!</auth>"
    )
    assert b"<incorrect-encoding/>" in s.output()
    assert events == [c2s.AuthRefused("incorrect-encoding", "PLAIN")]
    events = s.receive(
        b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='DIGEST-MD5'>AA==</auth>"
    )
    assert b"<invalid-mechanism/>" in s.output()
    assert events == [c2s.AuthRefused("invalid-mechanism", "DIGEST-MD5")]


def test_responses_out_of_an_exchange_are_refused_as_events_for_the_log() -> None:
    s = secured()
    events = s.receive(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>AA==</response>")
    assert b"<malformed-request/>" in s.output()
    assert events == [c2s.AuthRefused("malformed-request", None)]
    s.receive(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='SCRAM-SHA-256'/>")
    events = s.receive(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>!!</response>")
    assert b"<incorrect-encoding/>" in s.output()
    assert events == [c2s.AuthRefused("incorrect-encoding", None)]


def test_a_second_bind_is_answered_by_the_stream() -> None:
    s = bound()
    events = s.receive(
        b"<iq type='set' id='b2'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
    )
    reply = answered(s, events)
    assert reply is not None
    assert reply.get("type") == "error" and reply.get("id") == "b2"
    assert b"not-allowed" in etree.tostring(reply)


def test_stream_close_by_peer_is_answered() -> None:
    s = bound()
    events = s.receive(b"</stream:stream>")
    assert isinstance(events[-1], c2s.StreamEnded) and events[-1].error is None
    assert s.output() == b"</stream:stream>"
    assert s.closed


def test_many_stanzas_in_one_read_are_not_summed_against_the_limit() -> None:
    s = bound()
    one = b"<message to='bob@localhost'><body>" + b"x" * 3000 + b"</body></message>"
    events = s.receive(one * 200)  # 600 KB in one read, each stanza far below 64 KB
    assert len(events) == 200 and all(isinstance(e, c2s.StanzaReceived) for e in events)
    assert not s.closed


def test_a_tls_handshake_on_the_starttls_port_is_named_as_such() -> None:
    stream = c2s.C2SStream(settings())
    events = stream.receive(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert isinstance(events[-1], c2s.StreamEnded)
    error = events[-1].error
    assert error is not None and error.condition == "not-well-formed"
    assert "TLS handshake on a STARTTLS port" in (error.text or "")


PING = b"<ping xmlns='urn:xmpp:ping'/>"
STANZA_ERRORS = "urn:ietf:params:xml:ns:xmpp-stanzas"


@pytest.mark.parametrize(
    ("stanza", "reply_id"),
    [
        # unknown or missing type, to a full JID, to the server, to the account
        (b"<iq to='bob@localhost/b' type='bogus' id='q1'>" + PING + b"</iq>", "q1"),
        (b"<iq to='localhost' type='bogus' id='q2'>" + PING + b"</iq>", "q2"),
        (b"<iq to='alice@localhost' id='q3'>" + PING + b"</iq>", "q3"),
        (b"<iq to='bob@localhost/b' id='q4'>" + PING + b"</iq>", "q4"),
        # no id: the answer's id is empty (RFC 6120 8.2.3)
        (b"<iq to='bob@localhost/b' type='get'>" + PING + b"</iq>", ""),
        (b"<iq to='localhost' type='set'>" + PING + b"</iq>", ""),
        # a get or set without exactly one payload
        (b"<iq to='bob@localhost/b' type='get' id='q5'/>", "q5"),
        (b"<iq to='localhost' type='set' id='q6'>" + PING + PING + b"</iq>", "q6"),
    ],
)
def test_a_malformed_iq_is_answered_with_bad_request(stanza: bytes, reply_id: str) -> None:
    s = bound()
    reply = answered(s, s.receive(stanza))  # nothing routed
    assert reply is not None
    assert reply.tag == ns.C_IQ and reply.get("type") == "error"
    assert reply.get("id") == reply_id
    assert reply.get("to") == "alice@localhost/r1"
    error = reply.find(ns.C_ERROR)
    assert error is not None and error.get("type") == "modify"
    assert error.find(f"{{{STANZA_ERRORS}}}bad-request") is not None
    assert not s.closed


@pytest.mark.parametrize(
    "stanza",
    [
        b"<iq to='bob@localhost/b' type='result'/>",
        b"<iq to='bob@localhost/b' type='error'><error type='cancel'/></iq>",
    ],
)
def test_a_response_without_id_is_neither_routed_nor_answered(stanza: bytes) -> None:
    """RFC 6120 8.2.3: a result or error is never answered; without an id it answers
    nothing either."""
    s = bound()
    # with silence, but the client counts it as sent
    assert answered(s, s.receive(stanza)) is None
    assert not s.closed


def test_a_presence_of_unknown_type_is_answered_with_bad_request() -> None:
    s = bound()
    events = s.receive(b"<presence to='bob@localhost' type='subscribe-please' id='p1'/>")
    reply = answered(s, events)
    assert reply is not None
    assert reply.tag == ns.C_PRESENCE and reply.get("type") == "error"
    assert reply.get("id") == "p1" and reply.get("from") == "bob@localhost"
    error = reply.find(ns.C_ERROR)
    assert error is not None and error.get("type") == "modify"
    assert error.find(f"{{{STANZA_ERRORS}}}bad-request") is not None


def test_a_message_of_unknown_type_is_routed_as_normal() -> None:
    s = bound()
    (event,) = s.receive(b"<message to='bob@localhost' type='shout'><body>hi</body></message>")
    assert isinstance(event, c2s.StanzaReceived)
    assert event.stanza.get("type") == event.type == "normal"
    assert s.output() == b""


@pytest.mark.parametrize(
    "stanza",
    [
        b"<message to='bob@localhost' type='chat'><body>hi</body></message>",
        b"<message to='bob@localhost'><body>hi</body></message>",
        b"<message to='bob@localhost' type='error'><error type='cancel'/></message>",
        b"<presence/>",
        b"<presence type='unavailable'/>",
        b"<presence to='bob@localhost' type='subscribe'/>",
        b"<presence to='bob@localhost' type='probe'/>",
        b"<iq to='localhost' type='get' id='v1'>" + PING + b"</iq>",
        b"<iq to='bob@localhost/b' type='result' id='v2'/>",
        b"<iq to='bob@localhost/b' type='result' id='v3'>" + PING + b"</iq>",
        b"<iq to='bob@localhost/b' type='error' id='v4'><error type='cancel'/></iq>",
    ],
)
def test_well_formed_stanzas_are_routed_unchanged(stanza: bytes) -> None:
    s = bound()
    (event,) = s.receive(stanza)
    assert isinstance(event, c2s.StanzaReceived)
    sent = etree.fromstring(stanza)
    assert event.stanza.get("type") == event.type == sent.get("type")
    assert len(event.stanza) == len(sent)
    assert s.output() == b""
