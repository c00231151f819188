"""The external component stream as a sans-IO state machine (XEP-0114, 'jabber:component:accept').

A component (a gateway, a bot service) connects to the server, names the
domain it wants to serve in the stream header's 'to', and proves it knows
that domain's secret with a handshake: the hex SHA-1 of the stream id the
server gave followed by the secret. Then it sends and receives stanzas
for its domain. The protocol has no TLS, SASL or stream features; the
listener is on loopback by default for that reason (docs/components.md).

Like `S2SStream` it shares the restricted XML parser and the receive/output
skeleton (`StreamCore`) and never touches a socket; the driver
(xmppd/component/connection.py) says whether the domain may connect now
(`may_serve`), the stream does the rest.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from lxml import etree

from xmppd.jid import parse_jid
from xmppd.stream.base import StreamCore, StreamEnded, attr, renamespace
from xmppd.stream.errors import StanzaError, StreamError
from xmppd.stream.stanzarules import ROUTABLE_TYPES, bad_request, refusal
from xmppd.xml import ns
from xmppd.xml.parser import StreamOpened

COMPONENT = "jabber:component:accept"
_HANDSHAKE = f"{{{COMPONENT}}}handshake"
_STREAM_TAG = f"{{{ns.STREAMS}}}stream"
_STREAM_ERROR = f"{{{ns.STREAMS}}}error"
_STANZAS = frozenset(f"{{{COMPONENT}}}{name}" for name in ("message", "presence", "iq"))


@dataclass(slots=True)
class Authenticated:
    """The handshake matched: `domain` is served by this stream from now on."""

    domain: str


@dataclass(slots=True)
class StanzaReceived:
    """A stanza from the component, its 'from' in the component's domain, now in
    'jabber:client'."""

    stanza: etree._Element


Event = Authenticated | StanzaReceived | StreamEnded


class Phase(Enum):
    CONNECTED = auto()  # no stream header yet
    OPENED = auto()  # header answered, waiting for the handshake
    AUTHENTICATED = auto()
    CLOSED = auto()


@dataclass(slots=True)
class ComponentSettings:
    # The secret of each component domain this listener accepts; None: not one of them.
    secret_of: Callable[[str], str | None]
    # Whether `domain` may connect now: False if a stream already serves it (<conflict/>).
    may_serve: Callable[[str], bool]
    max_stanza_bytes: int
    max_stanza_bytes_unauthenticated: int
    max_depth: int


def handshake_digest(stream_id: str, secret: str) -> str:
    """XEP-0114 section 3: lowercase hex SHA-1 of the stream id then the secret."""
    return hashlib.sha1((stream_id + secret).encode()).hexdigest()


class ComponentStream(StreamCore[Event]):
    """One external component's connection, from its header to </stream:stream>."""

    def __init__(self, settings: ComponentSettings) -> None:
        self.settings = settings
        self.phase = Phase.CONNECTED
        self.domain: str | None = None  # the domain named in the header (served once authenticated)
        self.stream_id = ""
        super().__init__(
            settings.max_stanza_bytes, settings.max_stanza_bytes_unauthenticated, settings.max_depth
        )

    def send(self, stanza: etree._Element) -> None:
        """Queue a 'jabber:client' stanza for the component (authenticated)."""
        if self.phase is Phase.AUTHENTICATED:
            self._out.append(etree.tostring(renamespace(stanza, ns.CLIENT, COMPONENT)))

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    @property
    def authenticated(self) -> bool:
        return self.phase is Phase.AUTHENTICATED

    # --- StreamCore --------------------------------------------------------------------

    def _mark_closed(self) -> None:
        self.phase = Phase.CLOSED

    def _send_header(self) -> None:
        if not self.stream_id:
            self.stream_id = secrets.token_urlsafe(12)
        attrs = [f"xmlns='{COMPONENT}'", f"xmlns:stream='{ns.STREAMS}'", f"id='{self.stream_id}'"]
        if self.domain:
            attrs.append(f"from='{attr(self.domain)}'")
        self._out.append(("<?xml version='1.0'?><stream:stream " + " ".join(attrs) + ">").encode())
        self._header_sent = True

    def _on_stream_open(self, opened: StreamOpened, events: list[Event]) -> None:
        if self.phase is not Phase.CONNECTED:
            raise StreamError("bad-format", "the stream is already open")
        domain = (opened.attrs.get("to") or "").strip().lower()
        known = bool(domain) and self.settings.secret_of(domain) is not None
        if known:
            self.domain = domain
        self._send_header()
        if opened.tag != _STREAM_TAG:
            if opened.tag.endswith("}stream"):
                raise StreamError("invalid-namespace", "the stream namespace must be " + ns.STREAMS)
            raise StreamError("bad-format", "the root element must be <stream:stream>")
        if opened.nsmap.get(None) != COMPONENT:
            raise StreamError("invalid-namespace", f"the content namespace must be {COMPONENT}")
        prefix = next((p for p, uri in opened.nsmap.items() if uri == ns.STREAMS), None)
        if prefix != "stream":
            raise StreamError("bad-namespace-prefix", "use the prefix 'stream' for " + ns.STREAMS)
        if not known:
            # Named (quoted, cut short: the peer chose it) for the log line of the refusal.
            asked = json.dumps(domain[:100])
            raise StreamError("host-unknown", f"no component is configured for {asked}")
        self.phase = Phase.OPENED

    def _on_element(self, el: etree._Element, events: list[Event]) -> None:
        tag = el.tag
        if tag == _STREAM_ERROR:
            self._close_out()
            events.append(StreamEnded(None))
        elif tag == _HANDSHAKE and self.phase is Phase.OPENED:
            self._on_handshake(el, events)
        elif tag in _STANZAS and self.phase is Phase.AUTHENTICATED:
            self._on_stanza(el, events)
        elif self.phase is not Phase.AUTHENTICATED:
            raise StreamError("not-authorized", "send the handshake first")
        else:
            raise StreamError("unsupported-stanza-type", f"unexpected element {tag}")

    def _on_handshake(self, el: etree._Element, events: list[Event]) -> None:
        domain = self.domain
        assert domain is not None
        secret = self.settings.secret_of(domain)
        given = (el.text or "").strip().lower()
        expected = handshake_digest(self.stream_id, secret) if secret is not None else ""
        # Constant time: how much of a guess matched must not show in the answer's timing.
        if not secret or not hmac.compare_digest(given.encode(), expected.encode()):
            raise StreamError("not-authorized", "the handshake does not match the secret")
        if not self.settings.may_serve(domain):
            raise StreamError("conflict", f"a component already serves {domain}")
        self.phase = Phase.AUTHENTICATED
        self._parser.max_stanza_bytes = self.settings.max_stanza_bytes
        self._out.append(etree.tostring(etree.Element(_HANDSHAKE, nsmap={None: COMPONENT})))
        events.append(Authenticated(domain))

    def _on_stanza(self, el: etree._Element, events: list[Event]) -> None:
        """'from' must be the component's domain or an address at it (RFC 6120 4.9.3.9
        <invalid-from/>, as Prosody ends such a stream); 'from' and 'to'
        are required, as between servers (4.9.3.11 <improper-addressing/>)."""
        sender, to = el.get("from"), el.get("to")
        if not sender or not to:
            raise StreamError("improper-addressing", "a stanza needs 'from' and 'to'")
        try:
            sender_domain = parse_jid(sender).domain
            parse_jid(to)
        except StanzaError:
            raise StreamError("improper-addressing", "malformed 'from' or 'to'") from None
        if sender_domain != self.domain:
            raise StreamError("invalid-from", f"'from' is not in {self.domain}")
        stanza = renamespace(el, COMPONENT, ns.CLIENT)
        tag = stanza.tag
        if stanza.get("type") not in ROUTABLE_TYPES[tag]:
            text = refusal(stanza, tag)
            if text is not None:
                # Malformed (xmppd.stream.stanzarules): answered on this stream, which
                # carries both ways, and routed nowhere.
                error = bad_request(stanza, text)
                if error is not None:
                    self.send(error)
                return
        events.append(StanzaReceived(stanza))
