"""The client-to-server stream as a sans-IO state machine (RFC 6120).

`C2SStream` takes bytes in (`receive`) and gives bytes out (`output`) plus
events that need a decision the stream cannot make alone: start TLS now,
check these SASL credentials, bind this resource, route this stanza. It
never touches a socket, the event loop or storage, so every rule of the
protocol here is testable in microseconds and the same machine serves any
transport (TCP with STARTTLS, direct TLS, later WebSocket).
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum, auto

from lxml import etree

from xmppd.sasl.mechanisms import offered_mechanisms
from xmppd.stream.errors import StreamError, error_reply
from xmppd.stream.stanzarules import ROUTABLE_TYPES, bad_request, refusal
from xmppd.xml import ns
from xmppd.xml.parser import StreamClosed, StreamOpened, StreamParser

_STARTTLS = f"{{{ns.TLS}}}starttls"
_AUTH = f"{{{ns.SASL}}}auth"
_RESPONSE = f"{{{ns.SASL}}}response"
_ABORT = f"{{{ns.SASL}}}abort"
_BIND = f"{{{ns.BIND}}}bind"
_SESSION = f"{{{ns.SESSION}}}session"
_STREAM_TAG = f"{{{ns.STREAMS}}}stream"
MAX_SASL_FAILURES_PER_STREAM = 5  # RFC 6120 section 6.4.5: "at least 2 and no more than 5"
TLS_HANDSHAKE = b"\x16\x03"
"""How a TLS ClientHello record starts: a client that expected direct TLS (XEP-0368)
sent it to the plaintext port, and the operator is told that rather than "not
well-formed XML"."""


# --- events handed to the transport driver -------------------------------------------


@dataclass(slots=True)
class TLSRequested:
    """<proceed/> is queued: flush it, then start the TLS handshake and call tls_started()."""


@dataclass(slots=True)
class AuthRequested:
    mechanism: str
    data: bytes | None  # None: no initial response was sent


@dataclass(slots=True)
class AuthRefused:
    """The stream refused a SASL element itself (no TLS yet, a mechanism it did not
    offer, bad base64, a <response/> with no exchange under way): the <failure/> is
    queued, and the login, which knows the peer's address, logs the refusal."""

    condition: str
    mechanism: str | None  # as the client named it; None: that of the exchange under way


@dataclass(slots=True)
class AuthResponse:
    data: bytes


@dataclass(slots=True)
class AuthAborted:
    pass


@dataclass(slots=True)
class BindRequested:
    iq: etree._Element
    resource: str | None


@dataclass(slots=True)
class PreAuthIQ:
    """An IQ before authentication in a namespace that allows it (in-band registration),
    before TLS as well as after: the handler is told which (`C2SStream.tls`)."""

    iq: etree._Element


@dataclass(slots=True)
class StanzaReceived:
    """A stanza from the bound client, 'from' already stamped with its full JID."""

    stanza: etree._Element
    # Its 'type' (None: absent), read once by the stream's checks: the driver's
    # counts need it too, and an lxml attribute read is the costly part of a check.
    type: str | None


@dataclass(slots=True)
class StanzaAnswered:
    """A stanza from the bound client that the stream answered itself (a <bad-request/>
    refusal, the legacy session IQ, a second bind): it reaches no session, yet the
    client counts it as sent, and so must stream management's h (XEP-0198).

    `reply` (None: an IQ result or error without id, answered by silence) is not
    written by the stream: the driver delivers it through the session, as every
    other stanza to the client, so that stream management counts it in what it
    sent and keeps it until acknowledged. Written here, the client would count one
    stanza the server did not, and its <a h=''/> would run ahead of the server's."""

    stanza: etree._Element
    reply: etree._Element | None


@dataclass(slots=True)
class NonzaReceived:
    """A top-level element that is not a stanza (stream management, CSI, ...), after
    authentication; `bound` says whether a resource is bound yet."""

    element: etree._Element
    bound: bool


@dataclass(slots=True)
class StreamEnded:
    """The stream is over: flush output() and close the connection."""

    error: StreamError | None


Event = (
    TLSRequested
    | AuthRequested
    | AuthRefused
    | AuthResponse
    | AuthAborted
    | BindRequested
    | PreAuthIQ
    | StanzaReceived
    | StanzaAnswered
    | NonzaReceived
    | StreamEnded
)


class Phase(Enum):
    CONNECTED = auto()  # before TLS (STARTTLS listener)
    SECURED = auto()  # TLS up, not authenticated
    AUTHENTICATED = auto()  # SASL done, no resource bound
    BOUND = auto()
    CLOSED = auto()


# An Enum member look-up (`Phase.BOUND`) costs ~70 ns on CPython 3.11 against ~5 for a
# global: the check made for every stanza read uses this.
_BOUND = Phase.BOUND


@dataclass(slots=True)
class StreamSettings:
    hosts: Collection[str]
    max_stanza_bytes: int
    max_stanza_bytes_unauthenticated: int
    max_depth: int
    mechanisms: Sequence[str]
    allow_unencrypted: bool = False
    direct_tls: bool = False
    # Stream features modules add: before authentication (e.g. in-band
    # registration) and after it (e.g. roster versioning, stream management).
    preauth_features: Callable[[], list[etree._Element]] = field(default=lambda: [])
    extra_features: Callable[[], list[etree._Element]] = field(default=lambda: [])
    # IQ payload namespaces a client may use before authenticating (XEP-0077).
    preauth_iq_namespaces: frozenset[str] = frozenset()
    # Told the outcome of each SASL attempt (None: success, else the failure condition
    # sent), for the node's counts (xmppd.traffic); the stream itself keeps none.
    on_sasl_outcome: Callable[[str | None], None] = field(default=lambda _: None)


class C2SStream:
    """One client connection's XMPP stream, from the first byte to </stream:stream>."""

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.phase = Phase.SECURED if settings.direct_tls else Phase.CONNECTED
        # The phase is CLOSED: a plain attribute, as every stanza in and out asks it.
        # Once set it stays set: nothing done later (a login finishing after a
        # timeout closed the stream) moves the phase on or reopens the stream.
        self.closed = False
        self.tls = settings.direct_tls
        self.channel_bindings: dict[str, bytes] = {}
        self.host: str | None = None  # the virtual host named in the stream header
        self.username: str | None = None
        # The account whose credentials authenticated the stream: `username`, unless it
        # acts as another (auth.proxy_auth). Set by the login before sasl_success.
        self.authcid: str | None = None
        self.jid: str | None = None  # full JID once bound
        self.bare_jid: str | None = None
        self.stream_id = ""
        self.lang = "en"
        self.offered: list[str] = []
        self._client_from: str | None = None
        self._sasl_active = False
        self._sasl_failures = 0
        self.error: StreamError | None = None  # the stream error we ended the stream with
        self._header_sent = False
        self._out: list[bytes] = []
        self._parser = self._new_parser()

    # --- driver API ------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes from the peer; returns what the driver must act on."""
        if self.closed:
            return []
        events: list[Event] = []
        try:
            if not self.stream_id and not self.tls and data.startswith(TLS_HANDSHAKE):
                raise StreamError(
                    "not-well-formed",
                    "a TLS handshake on a STARTTLS port: use STARTTLS here, or the direct TLS port",
                )
            for item in self._parser.feed(data):
                if isinstance(item, StreamOpened):
                    self._on_stream_open(item)
                elif isinstance(item, StreamClosed):
                    self._close_out()
                    events.append(StreamEnded(None))
                    break
                else:
                    self._on_element(item, events)
                if self.closed:
                    break
        except StreamError as exc:
            self.fail(exc)
            events.append(StreamEnded(exc))
        return events

    @property
    def has_output(self) -> bool:
        """Bytes are queued for the peer: after a read, the connection writes only then
        (a read that routed a stanza queued nothing here)."""
        return bool(self._out)

    def output(self) -> bytes:
        """Bytes queued for the peer since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def release_parser(self) -> bool:
        """Free the XML parser of an idle stream (between stanzas); the next receive()
        makes a new one. True if it was freed. See StreamParser.release."""
        return self._parser.release()

    def tls_started(self, channel_bindings: dict[str, bytes]) -> None:
        """The TLS handshake finished: the client now restarts the stream."""
        if self.closed:
            return
        self.tls = True
        self.channel_bindings = channel_bindings
        self.phase = Phase.SECURED
        self._restart()

    def set_channel_bindings(self, channel_bindings: dict[str, bytes]) -> None:
        """For direct TLS, where the handshake happened before the stream began."""
        self.channel_bindings = channel_bindings

    def sasl_challenge(self, data: bytes) -> None:
        self._send_sasl("challenge", data)

    def sasl_success(self, username: str, additional: bytes | None = None) -> None:
        """The exchange under way succeeded. Ignored when there is none: the stream
        timed out, was aborted, failed or succeeded while the credentials were
        checked, and a late outcome must not authenticate (or answer) it."""
        if self.closed or not self._sasl_active:
            return
        self._send_sasl("success", additional)
        self._sasl_active = False
        self.settings.on_sasl_outcome(None)
        self.username = username
        self.phase = Phase.AUTHENTICATED
        self._restart()
        self._parser.max_stanza_bytes = self.settings.max_stanza_bytes

    def sasl_failure(self, condition: str, text: str | None = None) -> None:
        """The exchange under way failed; the client may try again on the same stream,
        a few times. Ignored when there is none, as a late `sasl_success` is."""
        if self.closed or not self._sasl_active:
            return
        self._sasl_failed(condition, text)

    def _sasl_failed(self, condition: str, text: str | None = None, counted: bool = True) -> None:
        """Send a <failure/>, which ends the exchange under way, if any. Each counts
        towards the per-stream limit but the answer to the client's own <abort/>."""
        failure = etree.Element(f"{{{ns.SASL}}}failure", nsmap={None: ns.SASL})
        etree.SubElement(failure, f"{{{ns.SASL}}}{condition}")
        if text:
            etree.SubElement(failure, f"{{{ns.SASL}}}text").text = text
        self.send(failure)
        self._sasl_active = False
        self.settings.on_sasl_outcome(condition)
        if counted:
            self._sasl_failures += 1
            if self._sasl_failures >= MAX_SASL_FAILURES_PER_STREAM:
                self.fail(
                    StreamError("policy-violation", "too many failed authentication attempts")
                )

    def bound(self, iq: etree._Element, full_jid: str) -> None:
        if self.closed:
            return
        result = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
        result.set("type", "result")
        result.set("id", iq.get("id", ""))
        bind = etree.SubElement(result, _BIND, nsmap={None: ns.BIND})
        etree.SubElement(bind, f"{{{ns.BIND}}}jid").text = full_jid
        self.jid = full_jid
        self.bare_jid = full_jid.split("/", 1)[0]
        self.phase = Phase.BOUND
        self.send(result)

    def resumed(self, full_jid: str) -> None:
        """A session bound on an earlier stream now continues on this one (XEP-0198
        resumption): stanzas flow as after bind, with no bind result of its own."""
        if self.closed:
            return
        self.jid = full_jid
        self.bare_jid = full_jid.split("/", 1)[0]
        self.phase = Phase.BOUND

    def send(self, element: etree._Element) -> None:
        if not self.closed:
            self._out.append(etree.tostring(element))

    def send_bytes(self, data: bytes) -> None:
        """Queue already serialized stanza bytes (forwarding without re-serializing)."""
        if not self.closed:
            self._out.append(data)

    def fail(self, error: StreamError) -> None:
        """Send a stream error and close (RFC 6120 section 4.9.1.1)."""
        if self.closed:
            return
        self.error = error
        if not self._header_sent:
            self._send_header()
        self._out.append(etree.tostring(error.to_element()))
        self._close_out()

    def close(self) -> None:
        """Close the stream cleanly from our side."""
        if self.closed:
            return
        if not self._header_sent:
            self._send_header()
        self._close_out()

    @property
    def authenticated(self) -> bool:
        return self.phase in (Phase.AUTHENTICATED, Phase.BOUND)

    # --- stream header and features ----------------------------------------------------

    def _stanza_limit(self) -> int:
        if self.authenticated:
            return self.settings.max_stanza_bytes
        return self.settings.max_stanza_bytes_unauthenticated

    def _new_parser(self) -> StreamParser:
        return StreamParser(self._stanza_limit(), self.settings.max_depth)

    def _restart(self) -> None:
        self._parser.restart(self._stanza_limit())
        self._header_sent = False

    def _on_stream_open(self, opened: StreamOpened) -> None:
        self.stream_id = secrets.token_urlsafe(12)
        host = (opened.attrs.get("to") or "").strip().lower()
        # A restart (after STARTTLS or SASL) keeps the host of the first header: SASL
        # checked the password against that host's accounts, so a restart naming
        # another host would bind the same username there without its password. One
        # naming none (RFC 6120 4.7.2: 'to' SHOULD be there) goes on with it.
        moved = self.host is not None and host not in ("", self.host)
        if self.host is None and host in self.settings.hosts:
            self.host = host
        self._client_from = opened.attrs.get("from")
        self.lang = opened.attrs.get(ns.XML_LANG, self.lang)
        self._send_header()
        if opened.tag != _STREAM_TAG:
            if opened.tag.endswith("}stream"):
                raise StreamError("invalid-namespace", "the stream namespace must be " + ns.STREAMS)
            raise StreamError("bad-format", "the root element must be <stream:stream>")
        if opened.nsmap.get(None) != ns.CLIENT:
            raise StreamError("invalid-namespace", "the content namespace must be jabber:client")
        prefix = next((p for p, uri in opened.nsmap.items() if uri == ns.STREAMS), None)
        if prefix != "stream":
            raise StreamError("bad-namespace-prefix", "use the prefix 'stream' for " + ns.STREAMS)
        version = opened.attrs.get("version", "")
        if version.split(".")[0] != "1":
            raise StreamError("unsupported-version", "this server speaks XMPP 1.0")
        if self.host is None:
            raise StreamError("host-unknown", "this server does not serve that domain")
        if moved:
            raise StreamError("host-unknown", f"this stream was opened for {self.host}")
        self.send(self._features())

    def _send_header(self) -> None:
        attrs = [
            f"xmlns='{ns.CLIENT}'",
            f"xmlns:stream='{ns.STREAMS}'",
            f"id='{self.stream_id or secrets.token_urlsafe(12)}'",
            "version='1.0'",
            f"xml:lang='{_attr(self.lang)}'",
        ]
        if self.host:
            attrs.append(f"from='{self.host}'")
        if self._client_from:
            attrs.append(f"to='{_attr(self._client_from)}'")
        self._out.append(("<?xml version='1.0'?><stream:stream " + " ".join(attrs) + ">").encode())
        self._header_sent = True

    def _features(self) -> etree._Element:
        features = etree.Element(f"{{{ns.STREAMS}}}features", nsmap={"stream": ns.STREAMS})
        if self.phase is Phase.CONNECTED:
            starttls = etree.SubElement(features, _STARTTLS, nsmap={None: ns.TLS})
            if not self.settings.allow_unencrypted:
                etree.SubElement(starttls, f"{{{ns.TLS}}}required")
        if self.phase in (Phase.CONNECTED, Phase.SECURED):
            self.offered = offered_mechanisms(
                self.settings.mechanisms,
                tls=self.tls,
                channel_bindings=self.channel_bindings.keys(),
                allow_unencrypted=self.settings.allow_unencrypted,
            )
            if self.offered:
                mechs = etree.SubElement(
                    features, f"{{{ns.SASL}}}mechanisms", nsmap={None: ns.SASL}
                )
                for name in self.offered:
                    etree.SubElement(mechs, f"{{{ns.SASL}}}mechanism").text = name
            if self.tls:  # registration sends a password: never offered in clear
                for extra in self.settings.preauth_features():
                    features.append(extra)
            if self.channel_bindings and any(m.endswith("-PLUS") for m in self.offered):
                cb = etree.SubElement(
                    features, f"{{{ns.SASL_CB}}}sasl-channel-binding", nsmap={None: ns.SASL_CB}
                )
                for cb_type in self.channel_bindings:
                    etree.SubElement(cb, f"{{{ns.SASL_CB}}}channel-binding").set("type", cb_type)
        elif self.phase is Phase.AUTHENTICATED:
            etree.SubElement(features, _BIND, nsmap={None: ns.BIND})
            session = etree.SubElement(features, _SESSION, nsmap={None: ns.SESSION})
            etree.SubElement(session, f"{{{ns.SESSION}}}optional")
            for extra in self.settings.extra_features():
                features.append(extra)
        return features

    def _close_out(self) -> None:
        self._out.append(b"</stream:stream>")
        self.phase = Phase.CLOSED
        self.closed = True

    # --- top-level elements ------------------------------------------------------------

    def _on_element(self, el: etree._Element, events: list[Event]) -> None:
        tag = el.tag
        if tag in ns.STANZA_TAGS:
            self._on_stanza(el, tag, events)
        elif tag == _STARTTLS:
            if self.phase is not Phase.CONNECTED:
                raise StreamError("policy-violation", "TLS is already established")
            self.send(etree.Element(f"{{{ns.TLS}}}proceed", nsmap={None: ns.TLS}))
            events.append(TLSRequested())
        elif tag in (_AUTH, _RESPONSE, _ABORT):
            self._on_sasl(el, events)
        elif (
            self.phase in (Phase.AUTHENTICATED, Phase.BOUND)
            and isinstance(tag, str)
            and not tag.startswith(("{jabber:", f"{{{ns.STREAMS}}}"))
        ):
            events.append(NonzaReceived(el, bound=self.phase is Phase.BOUND))
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {el.tag}")

    def _on_sasl(self, el: etree._Element, events: list[Event]) -> None:
        if self.authenticated:
            raise StreamError("policy-violation", "already authenticated")
        if el.tag == _AUTH:
            mechanism = el.get("mechanism", "")
            if self._sasl_active:
                # One exchange at a time (RFC 6120 6.4: the client aborts one with
                # <abort/>). A new <auth/> before the last one's outcome ends that
                # exchange unanswered, is not checked, and counts as a failed attempt:
                # else <auth/>s pipelined in one write would be free guesses in parallel.
                events.append(AuthAborted())
                self._refuse_sasl(
                    events, "aborted", mechanism, "one authentication at a time: await its outcome"
                )
                return
            if not self.tls and not self.settings.allow_unencrypted:
                self._refuse_sasl(events, "encryption-required", mechanism, "negotiate TLS first")
                return
            if mechanism not in self.offered:
                self._refuse_sasl(events, "invalid-mechanism", mechanism)
                return
            text = (el.text or "").strip()
            data: bytes | None
            if not text:
                data = None
            elif text == "=":
                data = b""
            else:
                try:
                    data = base64.b64decode(text, validate=True)
                except (binascii.Error, ValueError):
                    self._refuse_sasl(events, "incorrect-encoding", mechanism)
                    return
            self._sasl_active = True
            events.append(AuthRequested(mechanism, data))
        elif el.tag == _RESPONSE:
            if not self._sasl_active:
                self._refuse_sasl(
                    events, "malformed-request", None, "no authentication in progress"
                )
                return
            try:
                decoded = base64.b64decode((el.text or "").strip(), validate=True)
            except (binascii.Error, ValueError):
                self._refuse_sasl(events, "incorrect-encoding", None)
                return
            events.append(AuthResponse(decoded))
        else:
            if self._sasl_active:
                events.append(AuthAborted())
            self._sasl_failed("aborted", counted=False)

    def _refuse_sasl(
        self, events: list[Event], condition: str, mechanism: str | None, text: str | None = None
    ) -> None:
        """Refuse here, and say so in an event: a refused login is logged, and only the
        connection knows the address to log."""
        self._sasl_failed(condition, text)
        events.append(AuthRefused(condition, mechanism))

    def _on_stanza(self, el: etree._Element, tag: str, events: list[Event]) -> None:
        if self.phase is _BOUND:
            claimed = el.get("from")
            if claimed is not None and claimed not in (self.jid, self.bare_jid):
                raise StreamError("invalid-from", "'from' does not match the authenticated JID")
            el.set("from", self.jid)  # type: ignore[arg-type]
            # A chat message passes on the first test; see xmppd.stream.stanzarules.
            type_ = el.get("type")
            if type_ not in ROUTABLE_TYPES[tag]:
                text = refusal(el, tag)
                if text is not None:
                    # Malformed: <bad-request/>, to the client alone (it goes nowhere else).
                    events.append(StanzaAnswered(el, bad_request(el, text)))
                    return
                type_ = el.get("type")  # a message's unknown type is 'normal' now
            if tag == ns.C_IQ and type_ == "set" and len(el) == 1:
                reply = self._session_setup_reply(el)
                if reply is not None:
                    events.append(StanzaAnswered(el, reply))
                    return
            events.append(StanzaReceived(el, type_))
            return
        # Before TLS too: the handler refuses it (PreAuthRequest.encrypted), and says
        # why to the client and in the log, rather than this ending the stream.
        if self.phase in (Phase.CONNECTED, Phase.SECURED) and tag == ns.C_IQ and len(el) == 1:
            child_tag = el[0].tag
            if isinstance(child_tag, str) and child_tag[1:].split("}", 1)[0] in (
                self.settings.preauth_iq_namespaces
            ):
                events.append(PreAuthIQ(el))
                return
        if self.phase is Phase.AUTHENTICATED and tag == ns.C_IQ:
            bind = el.find(_BIND)
            if el.get("type") == "set" and bind is not None:
                resource = (bind.findtext(f"{{{ns.BIND}}}resource") or "").strip() or None
                events.append(BindRequested(el, resource))
                return
        raise StreamError("not-authorized", "authenticate and bind a resource first")

    def _session_setup_reply(self, iq: etree._Element) -> etree._Element | None:
        """The answer to the legacy session iq (a result) or to a second bind (refused),
        which the stream gives itself; None for any other IQ set."""
        child = iq[0]
        if child.tag == _SESSION:
            reply = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
            reply.set("type", "result")
            reply.set("id", iq.get("id", ""))
            return reply
        if child.tag == _BIND:
            return error_reply(iq, "not-allowed", "a resource is already bound")
        return None

    def _send_sasl(self, name: str, data: bytes | None) -> None:
        el = etree.Element(f"{{{ns.SASL}}}{name}", nsmap={None: ns.SASL})
        if data is not None:
            el.text = base64.b64encode(data).decode() if data else "="
        self.send(el)


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
