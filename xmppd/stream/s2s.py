"""The server-to-server stream as a sans-IO state machine (RFC 6120, 'jabber:server').

One class for both ends of a server connection, like `C2SStream` for
clients: bytes in (`receive`), bytes out (`output`), events for what the
stream cannot decide alone (start TLS now, this domain is authenticated,
route this stanza). It shares the restricted XML parser and its limits
(`StreamParser`) with the client stream and never touches a socket.

- An *incoming* stream (a peer connected to us) offers STARTTLS, then SASL
  EXTERNAL when the driver found the peer's certificate valid for the
  domain the peer names (`tls_started(identities)`), or dialback; after that
  it accepts stanzas whose 'from' is that domain and whose 'to' is the
  domain of ours its header named: the one domain pair it authenticated.
- An *outgoing* stream (we connected) asks for STARTTLS, authenticates
  with SASL EXTERNAL, and then carries our stanzas; RFC 6120 streams are
  one-way, so a stanza the peer sends back on it is a stream error, unless
  the stream was made bidirectional (XEP-0288: `<bidi/>` asked for before
  authentication when the peer offers it; an incoming stream offers it).

Inside the server every stanza is in 'jabber:client' (the router and the
modules know only that); `to_client` and `to_server` move a stanza between
the two content namespaces at this boundary.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Callable, Container
from dataclasses import dataclass
from enum import Enum, auto
from typing import NoReturn

from lxml import etree

from xmppd.jid import parse_jid
from xmppd.stream.base import StreamCore, StreamEnded, attr, renamespace
from xmppd.stream.errors import StanzaError, StreamError
from xmppd.stream.stanzarules import ROUTABLE_TYPES, bad_request, refusal
from xmppd.xml import ns
from xmppd.xml.parser import StreamOpened

_STARTTLS = f"{{{ns.TLS}}}starttls"
_PROCEED = f"{{{ns.TLS}}}proceed"
_TLS_FAILURE = f"{{{ns.TLS}}}failure"
_FEATURES = f"{{{ns.STREAMS}}}features"
_STREAM_ERROR = f"{{{ns.STREAMS}}}error"
_AUTH = f"{{{ns.SASL}}}auth"
_SUCCESS = f"{{{ns.SASL}}}success"
_FAILURE = f"{{{ns.SASL}}}failure"
_MECHANISMS = f"{{{ns.SASL}}}mechanisms"
_STREAM_TAG = f"{{{ns.STREAMS}}}stream"
_DB_RESULT = f"{{{ns.DIALBACK}}}result"
_DB_VERIFY = f"{{{ns.DIALBACK}}}verify"
_DB_FEATURE = f"{{{ns.DIALBACK_FEATURE}}}dialback"
_NS_BIDI_FEATURE = "urn:xmpp:features:bidi"  # XEP-0288
_NS_BIDI = "urn:xmpp:bidi"
_BIDI_FEATURE = f"{{{_NS_BIDI_FEATURE}}}bidi"
_BIDI = f"{{{_NS_BIDI}}}bidi"
_S_STANZAS = frozenset(f"{{{ns.SERVER}}}{name}" for name in ("message", "presence", "iq"))


# --- events handed to the transport driver -------------------------------------------


@dataclass(slots=True)
class TLSRequested:
    """Incoming: <proceed/> is queued, flush it and start TLS as the server.
    Outgoing: the peer sent <proceed/>, start TLS as the client. Then call tls_started()."""


@dataclass(slots=True)
class Authenticated:
    """The peer's domain is authenticated and the stream may carry stanzas: `domain`
    (incoming: the peer's; outgoing: the remote domain we connected to). After SASL it
    comes once the stream restarted (RFC 6120 6.4.6): a stanza sent between <success/>
    and our new stream header would stand where the peer reads that header."""

    domain: str
    mechanism: str


@dataclass(slots=True)
class AuthFailed:
    """Outgoing only: the peer would not authenticate us; the stream is being closed."""

    reason: str


@dataclass(slots=True)
class StanzaReceived:
    """Incoming only: a stanza from the authenticated domain, now in 'jabber:client'."""

    stanza: etree._Element


@dataclass(slots=True)
class StanzaRefused:
    """Incoming only: the peer sent a malformed stanza (xmppd.stream.stanzarules); route
    this <bad-request/> back to its sender. Our stream to the peer carries it: this one
    may be one-way (RFC 6120 4.7.1)."""

    error: etree._Element


@dataclass(slots=True)
class DialbackRequested:
    """Incoming: the peer asks to be `domain` by dialback (XEP-0220 2.1) with `key`;
    ask its authoritative server (db:verify), then call dialback_checked()."""

    domain: str  # the originating domain
    local: str  # the receiving domain (ours)
    key: str
    stream_id: str  # the id we gave this stream


@dataclass(slots=True)
class DialbackVerified:
    """A db:verify stream: the authoritative server's answer (XEP-0220 2.3)."""

    valid: bool


Event = (
    TLSRequested
    | Authenticated
    | AuthFailed
    | StanzaReceived
    | StanzaRefused
    | DialbackRequested
    | DialbackVerified
    | StreamEnded
)


class Phase(Enum):
    CONNECTED = auto()  # before TLS
    SECURED = auto()  # TLS up, not authenticated
    AUTHENTICATED = auto()
    CLOSED = auto()


@dataclass(slots=True)
class S2SSettings:
    hosts: Container[str]  # the domains this server serves (and its served subdomains)
    max_stanza_bytes: int
    max_stanza_bytes_unauthenticated: int
    max_depth: int
    # Dialback keys (XEP-0220, XEP-0185): (receiving domain, originating domain, stream
    # id) -> key. None: no dialback, neither to authenticate us nor to vouch for keys.
    dialback_key: Callable[[str, str, str], str] | None = None
    # Bidirectional streams (XEP-0288): offered on incoming streams, asked for on
    # outgoing ones when the peer offers them.
    bidi: bool = False
    # Incoming: whether a peer domain whose certificate did not validate may
    # authenticate with dialback (`s2s.accept_dialback`, per domain).
    accept_dialback: Callable[[str], bool] | None = None


class S2SStream(StreamCore[Event]):
    """One server connection's XMPP stream, in either direction."""

    def __init__(
        self,
        settings: S2SSettings,
        *,
        outgoing: bool = False,
        local: str | None = None,
        remote: str | None = None,
        dialback: bool = False,
        verify: tuple[str, str] | None = None,
    ) -> None:
        self.settings = settings
        # Outgoing, only to ask the authoritative server about (key, stream id) with
        # db:verify (XEP-0220 2.3): no authentication, no stanzas.
        self.verify = verify
        self.outgoing = outgoing
        # Outgoing: authenticate with dialback when the peer will not take our certificate.
        self.dialback = dialback and settings.dialback_key is not None
        self.peer_stream_id = ""  # outgoing: the id the peer gave our stream (dialback key)
        self.phase = Phase.CONNECTED
        self.local = local  # our domain on this stream (incoming: from the header's 'to')
        self.remote = remote  # the peer's domain (incoming: claimed, then authenticated)
        self.authenticated_domain: str | None = None
        self.mechanism = ""
        self.stream_id = ""
        self._identities: Container[str] = frozenset()
        self._offered_external = False
        # Authenticated and, after SASL, restarted (outgoing: the new features came;
        # incoming: our new header went out): stanzas may flow (`ready`).
        self._ready = False
        self._dialback_sent = False
        self._dialback_offered = False  # outgoing: the peer's features listed dialback
        self._dialback_pending: str | None = None  # incoming: the domain being checked
        self._offered_dialback = False  # incoming: our features listed dialback
        # XEP-0288 agreed: stanzas go both ways on this stream once it is authenticated
        # (incoming: we may send to the peer's domain; outgoing: it may send to ours).
        self.bidi = False
        super().__init__(
            settings.max_stanza_bytes, settings.max_stanza_bytes_unauthenticated, settings.max_depth
        )

    # --- driver API ------------------------------------------------------------------

    def start(self) -> None:
        """Outgoing: open the stream."""
        assert self.outgoing
        self._send_header()

    def tls_started(self, identities: Container[str] = ()) -> None:
        """The TLS handshake finished (after STARTTLS, or at once on a direct TLS
        connection). Incoming: `identities` holds the domains the peer's certificate was
        validated for (PKIX chain and RFC 9525 identity), none when it sent none or one
        that did not validate; asked only once the stream header named the peer."""
        self._identities = identities
        self.phase = Phase.SECURED
        self._restart()
        if self.outgoing:
            self._send_header()

    def send(self, stanza: etree._Element) -> None:
        """Queue a 'jabber:client' stanza for the peer (`ready`)."""
        if self.ready:
            self._out.append(etree.tostring(to_server(stanza)))

    @property
    def verify_only(self) -> bool:
        return self.verify is not None

    def dialback_checked(self, domain: str, valid: bool | None) -> list[Event]:
        """Incoming: the authoritative server's verdict on the key the peer gave for
        `domain` (None: it could not be asked in time). XEP-0220 2.4: valid
        authenticates the stream (no restart); invalid is answered and the stream
        ends with <not-authorized/>; no answer is a db:result error the peer may
        retry after."""
        events: list[Event] = []
        if self.phase is not Phase.SECURED or domain != self._dialback_pending:
            return events
        self._dialback_pending = None
        result = etree.Element(_DB_RESULT, nsmap={"db": ns.DIALBACK})
        result.set("from", self.local or "")
        result.set("to", domain)
        if valid is None:
            result.set("type", "error")
            error = etree.SubElement(result, "error", type="cancel")
            etree.SubElement(error, f"{{{ns.STANZA_ERRORS}}}remote-connection-failed")
            self._out.append(etree.tostring(result))
            return events
        result.set("type", "valid" if valid else "invalid")
        self._out.append(etree.tostring(result))
        if not valid:
            self.fail(StreamError("not-authorized", "the dialback key did not verify"))
            events.append(StreamEnded(None))
            return events
        self.authenticated_domain = domain
        self.mechanism = "dialback"
        self.phase = Phase.AUTHENTICATED
        self._ready = True  # dialback does not restart the stream
        self._parser.max_stanza_bytes = self.settings.max_stanza_bytes
        events.append(Authenticated(domain, "dialback"))
        return events

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def authenticated(self) -> bool:
        return self.phase is Phase.AUTHENTICATED

    @property
    def ready(self) -> bool:
        """Whether stanzas may be sent: authenticated, and restarted after SASL."""
        return self._ready and self.phase is Phase.AUTHENTICATED

    # --- stream header and features ----------------------------------------------------

    def _send_header(self) -> None:
        if not self.stream_id:
            self.stream_id = secrets.token_urlsafe(12)
        attrs = [
            f"xmlns='{ns.SERVER}'",
            f"xmlns:stream='{ns.STREAMS}'",
            f"xmlns:db='{ns.DIALBACK}'",
            "version='1.0'",
        ]
        if not self.outgoing:
            attrs.append(f"id='{self.stream_id}'")
        if self.local:
            attrs.append(f"from='{attr(self.local)}'")
        if self.remote:
            attrs.append(f"to='{attr(self.remote)}'")
        self._out.append(("<?xml version='1.0'?><stream:stream " + " ".join(attrs) + ">").encode())
        self._header_sent = True

    def _on_stream_open(self, opened: StreamOpened, events: list[Event]) -> None:
        if not self.outgoing:
            self.stream_id = secrets.token_urlsafe(12)
            to = (opened.attrs.get("to") or "").strip().lower()
            moved = bool(to) and self.local is not None and to != self.local
            if self.local is None and to in self.settings.hosts:
                self.local = to
            claimed = _header_domain(opened.attrs.get("from") or "")
            if claimed and self.remote is None:
                self.remote = claimed
            self._send_header()
            if claimed in self.settings.hosts:
                # No remote server speaks for a domain we serve (a component's included):
                # whatever its certificate or dialback key, refused before either is tried.
                raise StreamError("invalid-from", f"{claimed} is served here")
            if moved:
                # The first header fixes our side of the domain pair: a restart (after
                # TLS or SASL) to another of our domains would take the peer's
                # authentication there.
                raise StreamError("host-unknown", f"this stream is to {self.local}")
        if opened.tag != _STREAM_TAG:
            if opened.tag.endswith("}stream"):
                raise StreamError("invalid-namespace", "the stream namespace must be " + ns.STREAMS)
            raise StreamError("bad-format", "the root element must be <stream:stream>")
        if opened.nsmap.get(None) != ns.SERVER:
            raise StreamError("invalid-namespace", "the content namespace must be jabber:server")
        prefix = next((p for p, uri in opened.nsmap.items() if uri == ns.STREAMS), None)
        if prefix != "stream":
            raise StreamError("bad-namespace-prefix", "use the prefix 'stream' for " + ns.STREAMS)
        if opened.attrs.get("version", "").split(".")[0] != "1":
            raise StreamError("unsupported-version", "this server speaks XMPP 1.0")
        if self.outgoing:
            self.peer_stream_id = opened.attrs.get("id", "")
            return
        if self.local is None:
            raise StreamError("host-unknown", "this server does not serve that domain")
        self._out.append(etree.tostring(self._features()))
        if self.phase is Phase.AUTHENTICATED and not self._ready:
            # The stream restarted after SASL and our new header went out: only now may
            # stanzas follow it (RFC 6120 6.4.6).
            self._ready = True
            events.append(Authenticated(self.authenticated_domain or "", self.mechanism))

    def _features(self) -> etree._Element:
        features = etree.Element(_FEATURES, nsmap={"stream": ns.STREAMS})
        if self.phase is Phase.CONNECTED:
            starttls = etree.SubElement(features, _STARTTLS, nsmap={None: ns.TLS})
            etree.SubElement(starttls, f"{{{ns.TLS}}}required")
        elif self.phase is Phase.SECURED:
            if self.remote in self._identities:
                self._offered_external = True
                mechs = etree.SubElement(features, _MECHANISMS, nsmap={None: ns.SASL})
                etree.SubElement(mechs, f"{{{ns.SASL}}}mechanism").text = "EXTERNAL"
            elif self._may_dialback(self.remote):
                self._offered_dialback = True
                nsmap = {None: ns.DIALBACK_FEATURE}
                dialback = etree.SubElement(features, _DB_FEATURE, nsmap=nsmap)
                etree.SubElement(dialback, f"{{{ns.DIALBACK_FEATURE}}}errors")
            if self.settings.bidi:
                etree.SubElement(features, _BIDI_FEATURE, nsmap={None: _NS_BIDI_FEATURE})
        return features

    def _mark_closed(self) -> None:
        self.phase = Phase.CLOSED

    # --- top-level elements ------------------------------------------------------------

    def _on_element(self, el: etree._Element, events: list[Event]) -> None:
        tag = el.tag
        if tag == _STREAM_ERROR:
            self._close_out()
            events.append(StreamEnded(None))
        elif self.outgoing:
            self._outgoing_element(el, events)
        elif tag in _S_STANZAS:
            self._on_stanza(el, events)
        elif tag == _STARTTLS and self.phase is Phase.CONNECTED:
            self._out.append(etree.tostring(etree.Element(_PROCEED, nsmap={None: ns.TLS})))
            events.append(TLSRequested())
        elif tag == _AUTH and self.phase is Phase.SECURED:
            self._on_external(el, events)
        elif tag == _BIDI and self.phase is Phase.SECURED and self.settings.bidi:
            self.bidi = True  # XEP-0288 3: asked for before authentication, no answer
        elif tag == _DB_VERIFY and self.phase is not Phase.CONNECTED:
            self._vouch(el)
        elif tag == _DB_RESULT and self.phase is Phase.SECURED and self._offered_dialback:
            self._on_dialback(el, events)
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")

    def _on_external(self, el: etree._Element, events: list[Event]) -> None:
        """SASL EXTERNAL (RFC 6120 6.4, XEP-0178): the authorization identity is the
        peer's domain, given or (empty, '=') the stream header's 'from'."""
        if el.get("mechanism") != "EXTERNAL" or not self._offered_external:
            self._sasl_failure("invalid-mechanism")
        text = (el.text or "").strip()
        try:
            given = text not in ("", "=")
            authzid = base64.b64decode(text, validate=True).decode() if given else ""
        except (binascii.Error, ValueError):
            self._sasl_failure("incorrect-encoding")
        domain = (authzid or self.remote or "").lower()
        if domain != self.remote or domain not in self._identities:
            self._sasl_failure("not-authorized")
        success = etree.Element(_SUCCESS, nsmap={None: ns.SASL})
        self._out.append(etree.tostring(success))
        # Authenticated is reported once the peer restarted the stream (_on_stream_open).
        self.authenticated_domain = domain
        self.mechanism = "EXTERNAL"
        self.phase = Phase.AUTHENTICATED
        self._restart()

    def _may_dialback(self, domain: str | None) -> bool:
        allowed = self.settings.accept_dialback
        return (
            bool(domain)
            and self.settings.dialback_key is not None
            and allowed is not None
            and allowed(domain or "")
        )

    def _on_dialback(self, el: etree._Element, events: list[Event]) -> None:
        """XEP-0220 2.1: the peer gives a key for its domain; one check at a time, for
        the domain its stream header named (one domain pair per stream)."""
        originating = (el.get("from") or "").lower()
        receiving = (el.get("to") or "").lower()
        key = (el.text or "").strip()
        if not originating or not receiving or not key:
            raise StreamError("improper-addressing", "db:result needs 'from', 'to' and a key")
        if receiving != self.local:
            raise StreamError("host-unknown", "this stream is not to that domain")
        if originating != self.remote:
            raise StreamError("invalid-from", "'from' is not the stream header's domain")
        if not self._may_dialback(originating) or self._dialback_pending is not None:
            raise StreamError("not-authorized", "dialback is not allowed here")
        self._dialback_pending = originating
        events.append(DialbackRequested(originating, receiving, key, self.stream_id))

    def _vouch(self, el: etree._Element) -> None:
        """XEP-0220 2.3: a receiving server asks whether a key one of our domains sent it
        (on another stream) is ours; answered on this stream, which it opened to us."""
        key_of = self.settings.dialback_key
        receiving, originating, sid = el.get("from"), el.get("to"), el.get("id")
        if not receiving or not originating or not sid:
            raise StreamError("improper-addressing", "db:verify needs 'from', 'to' and 'id'")
        if originating not in self.settings.hosts:
            raise StreamError("host-unknown", "this server does not serve that domain")
        valid = key_of is not None and hmac.compare_digest(
            (el.text or "").strip(), key_of(receiving, originating, sid)
        )
        answer = etree.Element(_DB_VERIFY, nsmap={"db": ns.DIALBACK})
        answer.set("from", originating)
        answer.set("to", receiving)
        answer.set("id", sid)
        answer.set("type", "valid" if valid else "invalid")
        self._out.append(etree.tostring(answer))

    def _sasl_failure(self, condition: str) -> NoReturn:
        failure = etree.Element(_FAILURE, nsmap={None: ns.SASL})
        etree.SubElement(failure, f"{{{ns.SASL}}}{condition}")
        self._out.append(etree.tostring(failure))
        # One attempt per stream: a peer whose certificate does not do cannot try another.
        raise StreamError("not-authorized", "SASL EXTERNAL failed")

    def _on_stanza(self, el: etree._Element, events: list[Event]) -> None:
        if self.phase is not Phase.AUTHENTICATED:
            raise StreamError("not-authorized", "authenticate first")
        sender, to = el.get("from"), el.get("to")
        if not sender or not to:
            raise StreamError("improper-addressing", "a stanza needs 'from' and 'to'")
        try:
            sender_domain = parse_jid(sender).domain
            to_domain = parse_jid(to).domain
        except StanzaError:
            raise StreamError("improper-addressing", "malformed 'from' or 'to'") from None
        if sender_domain != self.authenticated_domain:
            raise StreamError("invalid-from", "'from' is not the authenticated domain")
        if to_domain != self.local:
            # RFC 6120 8.1.1.2, XEP-0220: only the domain pair authenticated on this
            # stream (one per stream here, no piggybacking); a served subdomain is
            # reached over a stream of its own, opened to it.
            raise StreamError(
                "host-unknown", f"this stream is to {self.local}, not to {to_domain}"
            )
        if to_domain not in self.settings.hosts:
            raise StreamError("host-unknown", "this server does not serve that domain")
        stanza = to_client(el)
        tag = stanza.tag
        if stanza.get("type") not in ROUTABLE_TYPES[tag]:
            text = refusal(stanza, tag)
            if text is not None:
                error = bad_request(stanza, text)
                if error is not None:
                    events.append(StanzaRefused(error))
                return
        events.append(StanzaReceived(stanza))

    def _outgoing_element(self, el: etree._Element, events: list[Event]) -> None:
        tag = el.tag
        if tag == _FEATURES:
            self._outgoing_features(el, events)
        elif tag == _PROCEED and self.phase is Phase.CONNECTED:
            events.append(TLSRequested())
        elif tag == _SUCCESS and self.phase is Phase.SECURED and self.remote:
            # Ready once the restarted stream's features arrive (RFC 6120 6.4.6).
            self.authenticated_domain = self.remote
            self.mechanism = "EXTERNAL"
            self.phase = Phase.AUTHENTICATED
            self._restart()
            self._send_header()
        elif tag == _DB_RESULT and self._dialback_sent and not self.authenticated:
            if el.get("type") != "valid" or el.get("from") != self.remote:
                self.close()
                events.append(AuthFailed(f"dialback refused ({el.get('type')})"))
                events.append(StreamEnded(None))
                return
            # Dialback does not restart the stream: stanzas may follow at once.
            self.authenticated_domain = self.remote
            self.mechanism = "dialback"
            self.phase = Phase.AUTHENTICATED
            self._parser.max_stanza_bytes = self.settings.max_stanza_bytes
            self._ready = True
            events.append(Authenticated(self.remote or "", "dialback"))
        elif tag == _FAILURE and self._dialback_offered and not self._dialback_sent:
            # It did not take our certificate after all (ejabberd offers EXTERNAL to any
            # peer and checks the certificate only then): dialback on the same stream,
            # which a SASL failure leaves open (RFC 6120 6.4.5, XEP-0178 3).
            self._send_dialback()
        elif tag == _DB_VERIFY and self.verify is not None and self.phase is Phase.SECURED:
            valid = (
                el.get("type") == "valid"
                and el.get("from") == self.remote
                and el.get("id") == self.verify[1]
            )
            self.close()
            events.append(DialbackVerified(valid))
            events.append(StreamEnded(None))
        elif tag in _S_STANZAS and self.bidi and self._ready:
            self._on_stanza(el, events)  # XEP-0288: the peer's stanzas on our stream
        elif tag in (_FAILURE, _TLS_FAILURE):
            self.close()
            events.append(AuthFailed(f"{el.tag} from the peer"))
            events.append(StreamEnded(None))
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")

    def _send_dialback(self) -> None:
        """XEP-0220 2.1: offer the peer a key it will check with our authoritative server
        (which is us again: `_vouch` on the stream it opens to us)."""
        key_of = self.settings.dialback_key
        assert key_of is not None and self.local and self.remote
        result = etree.Element(_DB_RESULT, nsmap={"db": ns.DIALBACK})
        result.set("from", self.local)
        result.set("to", self.remote)
        result.text = key_of(self.remote, self.local, self.peer_stream_id)
        self._out.append(etree.tostring(result))
        self._dialback_sent = True

    def _outgoing_features(self, features: etree._Element, events: list[Event]) -> None:
        if self.phase is Phase.CONNECTED:
            if features.find(_STARTTLS) is None:
                self.close()
                events.append(AuthFailed("the peer does not offer TLS"))
                events.append(StreamEnded(None))
                return
            self._out.append(etree.tostring(etree.Element(_STARTTLS, nsmap={None: ns.TLS})))
        elif self.phase is Phase.SECURED and self.verify is not None:
            if self._dialback_sent:
                return
            verify = etree.Element(_DB_VERIFY, nsmap={"db": ns.DIALBACK})
            verify.set("from", self.local or "")
            verify.set("to", self.remote or "")
            verify.set("id", self.verify[1])
            verify.text = self.verify[0]
            self._out.append(etree.tostring(verify))
            self._dialback_sent = True
        elif self.phase is Phase.SECURED:
            mechanisms = features.find(_MECHANISMS)
            names = [] if mechanisms is None else [(m.text or "").strip() for m in mechanisms]
            self._dialback_offered = self.dialback and features.find(_DB_FEATURE) is not None
            if self.settings.bidi and features.find(_BIDI_FEATURE) is not None:
                # XEP-0288 3: asked for before authenticating; the peer does not answer.
                self._out.append(etree.tostring(etree.Element(_BIDI, nsmap={None: _NS_BIDI})))
                self.bidi = True
            if "EXTERNAL" not in names and self._dialback_offered:
                self._send_dialback()
                return
            if "EXTERNAL" not in names:
                self.close()
                events.append(AuthFailed("the peer does not accept our certificate (no EXTERNAL)"))
                events.append(StreamEnded(None))
                return
            auth = etree.Element(_AUTH, nsmap={None: ns.SASL}, mechanism="EXTERNAL")
            auth.text = "="  # the authorization identity is the stream's 'from'
            self._out.append(etree.tostring(auth))
        elif self.authenticated_domain is not None and not self._ready:
            self._ready = True  # the features after the restart carry nothing we use yet
            events.append(Authenticated(self.authenticated_domain, self.mechanism))


def _header_domain(value: str) -> str:
    """The peer's domain as an incoming stream header's 'from' names it ("" if none),
    prepared as stanza addresses are (RFC 7622: case, width, a trailing dot), so that
    it compares with their domains. Anything but a bare domain is <improper-addressing/>
    before it is used: a name logged, shown by `xmppctl s2s`, matched against
    certificates and looked up in DNS for dialback (a character reference such as
    &#10; survives XML's attribute normalisation)."""
    value = value.strip()
    if not value:
        return ""
    try:
        jid = parse_jid(value)
    except StanzaError:
        jid = None
    if jid is None or jid.user or jid.resource:
        raise StreamError("improper-addressing", "the stream header's 'from' is not a domain")
    return str(jid.domain)


def to_client(stanza: etree._Element) -> etree._Element:
    """A stanza read from a server stream, in the namespace the router speaks."""
    return renamespace(stanza, ns.SERVER, ns.CLIENT)


def to_server(stanza: etree._Element) -> etree._Element:
    """A stanza of the router, in the namespace of a server stream."""
    return renamespace(stanza, ns.CLIENT, ns.SERVER)

