"""A client connection: the asyncio transport around one sans-IO C2SStream.

This is the application half: it runs TLS itself on a plain TCP transport
(direct TLS from the first byte, or STARTTLS when the stream asks: the same
connection switches in place), hands the login to `StreamLogin` (SASL,
throttle, bind) and, once bound, is the `Transport` of its `ClientSession`:
the router delivers to the session, the session writes here. Output is
coalesced: stanzas delivered during one loop turn leave in one write,
encrypted with one call, and one callback (`xmppd.flushes`) writes every
connection written to in the turn.

Why TLS here and not in uvloop's SSL transport: see xmppd/tlslayer.py.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import ssl
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from lxml import etree

from xmppd import batchloop
from xmppd.auth.login import StreamLogin
from xmppd.modulehost import ElementRequest
from xmppd.sasl.channel_binding import connection_channel_bindings
from xmppd.session import ClientSession
from xmppd.stream import c2s
from xmppd.stream.errors import StreamError
from xmppd.tlslayer import TLSLayer
from xmppd.xml import ns
from xmppd.xml.fragments import parse as parse_fragment

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger(__name__)

TLS_SHUTDOWN_SECONDS = 30.0
"""After our close_notify, how long the peer has to answer with its own (or close)
before the TCP connection is cut; uvloop's SSL transport waited as long."""

# What another node's bytes for a client start with (C2SConnection.send_serialized).
_SERIALIZED_KIND = {b"<message": ns.C_MESSAGE, b"<presence": ns.C_PRESENCE, b"<iq": ns.C_IQ}
_CLIENT_NS = f' xmlns="{ns.CLIENT}"'.encode()
_ERROR_TYPE = b' type="error"'
PARSER_IDLE_SECONDS = 10.0
"""A stream that received nothing for this long (up to twice as long) frees its XML parser."""


class C2SConnection(asyncio.Protocol):
    def __init__(self, server: Server, direct_tls: bool, client_ip: str | None = None) -> None:
        """`client_ip`: the address a load balancer's PROXY header gave (xmppd.proxyproto),
        used instead of the TCP peer's for limits, the login throttle and logs."""
        self.server = server
        self.direct_tls = direct_tls
        self._client_ip = client_ip
        # In every log line about this connection (login, logout, refusal), so that
        # one grep finds its story; random, so ids from several nodes do not clash.
        self.id = secrets.token_hex(4)
        self.transport: asyncio.Transport | None = None  # TCP; TLS is self._tls
        self._loop: asyncio.AbstractEventLoop | None = None  # set at connection_made
        self._note_input: Callable[[object], None] = batchloop.input_hook(None)
        self._tls: TLSLayer | None = None
        # The certificate self._tls presents, for channel binding (see _begin_tls).
        self._cert_der = b""
        self._closing = False  # our TLS close_notify is sent: the transport closes next
        self.ip = "?"
        self.stream = c2s.C2SStream(server.stream_settings(direct_tls))
        self.session: ClientSession | None = None  # once a resource is bound
        self.login: StreamLogin | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._shutdown_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._flushes = server.flushes  # one callback per loop turn writes every connection
        # Counted at every stanza in and out: kept here rather than looked up each time.
        self._ledger = server.router.ledger
        self._traffic = server.traffic
        # The message stanzas in the stream's output, not yet written, as the bytes
        # queued there (not the elements, which may go once serialised): routed again
        # if the connection goes first.
        self._queued_messages: list[bytes] = []
        self._max_backlog = 4 * server.config.limits.max_stanza_bytes + 65536
        self._counted = False
        self._ended = False
        self._received = True  # data came since the last idle sweep

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tcp = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        # Kept: asyncio.get_running_loop() costs a getpid() system call on every call,
        # and a connection asks for the loop at every stanza it is sent.
        self._loop = loop = asyncio.get_running_loop()
        self._note_input = batchloop.input_hook(loop)
        peer = transport.get_extra_info("peername")
        self.ip = self._client_ip or (peer[0] if peer else "?")
        # From TCP accept to bound (docs/config.md), the TLS handshake included.
        self._auth_timer = loop.call_later(
            self.server.config.limits.auth_timeout, self._auth_timeout
        )
        # Counted from accept, handshake included: connections that never finish theirs
        # count towards the per-address limit too.
        self._counted = self.server.connection_opened(self)
        if self._counted:
            _schedule_idle_sweep(self.server)
        if self.direct_tls:
            if not self._counted:  # nothing to tell it on before TLS: the node logged why
                tcp.abort()
                return
            self._tls = self._begin_tls()  # the stream opens after the handshake
        else:
            self._open()

    def _open(self) -> None:
        """The stream may begin: at accept, or after the handshake of direct TLS."""
        self.login = StreamLogin(self.server, self.stream, self.ip, self._flush, self.id)
        if not self._counted:
            self.stream.fail(
                StreamError("policy-violation", "too many connections from your address")
            )
            self._flush()
            return
        if self.direct_tls:
            self.stream.set_channel_bindings(self._channel_bindings())

    def data_received(self, data: bytes) -> None:
        """Bytes from the socket: TLS records, or plaintext before STARTTLS.

        A plain Protocol rather than a BufferedProtocol: uvloop reads every
        connection into one loop-wide buffer either way and hands over a
        `bytes` of what was read, so no connection holds a buffer of its own;
        this way each read is one Python call instead of two (get_buffer and
        buffer_updated) and no memoryview."""
        self._note_input(self)
        tls = self._tls
        if tls is None:
            self._plaintext(data)
            return
        try:
            plain = tls.receive(data) if tls.ready else self._handshake(tls, data)
        except ssl.SSLError as exc:
            self._tls_failed(exc)
            return
        if plain:
            if not self._closing:  # after our close_notify, what comes is dropped
                self._plaintext(plain)
        elif plain is None:
            self._peer_closed(tls)
            return
        if tls.outgoing.pending:  # a handshake message or a key update's answer
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(tls.output())

    def _peer_closed(self, tls: TLSLayer) -> None:
        """The client's close_notify: answer ours (unless it answers ours) and close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not self._closing:
            transport.write(tls.shutdown())
        transport.close()

    def _plaintext(self, data: bytes) -> None:
        """Plaintext from the client (decrypted when TLS is on)."""
        self._received = True
        stream = self.stream
        self._handle(stream.receive(data))
        if stream.has_output:  # most reads (a stanza routed) leave nothing for this stream
            self._flush()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
        if self.login is not None:
            self.login.cancel()
        if self._counted:
            self.server.connection_closed(self)
            self._counted = False
        if self.stream.username is not None:  # it logged in (the stream may be closed now)
            self._log_logout(exc)
        self._end_session()
        # Before the queued messages are routed again: none may come back here.
        self.transport = None
        if self._queued_messages:
            self._lost_queued()

    # --- Transport (of the bound session) --------------------------------------------

    def send(self, stanza: etree._Element) -> bool:
        if self.stream.closed or self.transport is None:
            # Closing, or the TCP connection is gone while the session's last
            # stanzas are still in the router: the router falls back.
            return False
        tag = stanza.tag  # lxml builds a new string at every access: once here
        data = etree.tostring(stanza)
        if tag == ns.C_MESSAGE and stanza.get("type") != "error":
            self._ledger.delivered += 1
            self._queued_messages.append(data)
        self._traffic.sent(tag)
        self.stream.send_bytes(data)
        if not self._flush_scheduled:  # _schedule_flush, inline: once per delivered stanza
            self._flush_scheduled = True
            self._flushes.add(self._flush, self._loop)  # type: ignore[arg-type]
        return True

    def send_serialized(self, data: bytes) -> bool | None:
        """`send` for the bytes of a stanza another node serialised: written as they
        are (the same bytes `stream.send` would make of the parsed element). Its kind
        is read from its start, for the counts; a start other than the three stanzas
        in jabber:client's default namespace is left to `send`."""
        space = data.find(b" ")
        tag = _SERIALIZED_KIND.get(data[:space])
        if tag is None or not data.startswith(_CLIENT_NS, space):
            return None
        if self.stream.closed or self.transport is None:
            return False
        # lxml escapes ">" in attribute values: the first one ends the start tag.
        if tag == ns.C_MESSAGE and _ERROR_TYPE not in data[: data.index(b">")]:
            self._ledger.delivered += 1
            self._queued_messages.append(data)
        self._traffic.sent(tag)
        self.stream.send_bytes(data)
        self._schedule_flush()
        return True

    def _reply(self, element: etree._Element) -> None:
        """Write a non-stanza element (a module's answer to one), now or later."""
        self.stream.send(element)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        """Write at the end of this loop turn: what is queued meanwhile leaves in one write."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._flushes.add(self._flush, self._loop)  # type: ignore[arg-type]

    def close(self, error: StreamError) -> None:
        self.stream.fail(error)
        self._flush()

    def pause_input(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_input(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    # --- stream events ----------------------------------------------------------------

    def _handle(self, events: list[c2s.Event]) -> None:
        for event in events:
            if isinstance(event, c2s.StanzaReceived):
                stanza = event.stanza
                tag = stanza.tag
                if tag == ns.C_MESSAGE and event.type != "error":
                    self._ledger.received += 1
                self._traffic.received(tag)
                self.session.receive(stanza)  # type: ignore[union-attr]
            elif isinstance(event, c2s.AuthRequested):
                self.login.start(event)  # type: ignore[union-attr]
            elif isinstance(event, c2s.AuthResponse):
                self.login.respond(event.data)  # type: ignore[union-attr]
            elif isinstance(event, c2s.AuthRefused):
                self.login.refused(event.condition, event.mechanism)  # type: ignore[union-attr]
            elif isinstance(event, c2s.AuthAborted):
                self.login.abort()  # type: ignore[union-attr]
            elif isinstance(event, c2s.BindRequested):
                self._bind(event)
            elif isinstance(event, c2s.TLSRequested):
                # <proceed/> leaves in plaintext; every byte read after it is TLS.
                self._flush()
                self._tls = self._begin_tls()
            elif isinstance(event, c2s.PreAuthIQ):
                self.server.router.spawn(self._preauth_iq(event.iq))
            elif isinstance(event, c2s.NonzaReceived):
                self._element(event.element)
            elif isinstance(event, c2s.StanzaAnswered):
                session = self.session
                assert session is not None  # the stream answers a bound client's only
                self.server.modules.stanza_answered(event.stanza, session)
                if event.reply is not None:
                    # Through the session, as every stanza to the client: stream
                    # management counts and keeps it (XEP-0198 h, resent after a resume).
                    session.deliver(event.reply)
            # StreamEnded needs nothing here: _flush() closes a closed stream's transport.

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or self._closing:
            return
        tls = self._tls
        if tls is not None and not tls.ready:
            # Mid-handshake (STARTTLS after <proceed/>): nothing may be written but TLS,
            # so a stream that ends now (timeout, shutdown) just drops the connection.
            self.stream.output()
            if self.stream.closed:
                self._end_session()
                transport.abort()
            return
        data = self.stream.output()
        if data:
            transport.write(data if tls is None else tls.encrypt(data))
            if self._queued_messages:
                self._ledger.written += len(self._queued_messages)
                self._queued_messages.clear()
            if transport.get_write_buffer_size() > self._max_backlog and not self.stream.closed:
                # A client that stops reading must not make us buffer without bound.
                self.stream.fail(StreamError("policy-violation", "you are not reading your stream"))
                data = self.stream.output()
                transport.write(data if tls is None else tls.encrypt(data))
        if self.stream.closed:
            # The stream is over even if the TLS shutdown takes a while: stop routing here now.
            self._end_session()
            if not transport.is_closing():
                self._log_stream_error()
                self._close_transport()

    def _close_transport(self) -> None:
        """Close the connection; with TLS, send close_notify and give the client
        TLS_SHUTDOWN_SECONDS to answer with its own or close (what it sends
        meanwhile is read and dropped), so that its last reads are not cut by a reset."""
        transport = self.transport
        if transport is None or transport.is_closing() or self._closing:
            return
        tls = self._tls
        if tls is None or not tls.ready:
            transport.close()
            return
        self._closing = True
        transport.write(tls.shutdown())
        self._shutdown_timer = self._loop.call_later(  # type: ignore[union-attr]
            TLS_SHUTDOWN_SECONDS, transport.abort
        )

    def _handshake(self, tls: TLSLayer, data: bytes) -> bytes | None:
        """Advance the TLS handshake with `data`; once it is complete, start (direct
        TLS) or restart (STARTTLS) the stream and return what application data came
        with the client's Finished (the restarted stream's header often does)."""
        if not tls.handshake(data):
            return b""
        if self.direct_tls:  # the stream begins now
            self._open()
            if self.transport is None or self.stream.closed:
                return b""
        else:
            self.stream.tls_started(self._channel_bindings())
        return tls.receive(b"")

    def _tls_failed(self, exc: ssl.SSLError) -> None:
        """A refused handshake or a bad record: nothing more can be read, cut the connection."""
        tls = self._tls
        if tls is not None and not tls.ready:
            log.info("TLS handshake with %s failed: %s conn=%s", self.ip, exc, self.id)
        else:
            log.info("TLS error from %s: %s conn=%s", self.ip, exc, self.id)
        if self.transport is not None:
            if tls is not None and tls.outgoing.pending:  # the alert that says why
                self.transport.write(tls.output())
            self.transport.abort()

    def _log_stream_error(self) -> None:
        """One line at the default level for every stream we end with an error, so a
        refused client (or a server-side regression that refuses them all) shows in
        the log. A shutdown is the operator's own doing and logs nothing per stream."""
        error = self.stream.error
        if error is None or error.condition == "system-shutdown":
            return
        who = self.stream.jid or self.stream.host or "?"
        log.info(
            "stream from %s (%s) refused: %s%s conn=%s",
            self.ip, who, error.condition, f" ({error.text})" if error.text else "", self.id,
            extra={
                "event": "stream-refused",
                "address": self.ip,
                "jid": who,
                "reason": error.condition,
                "conn": self.id,
            },
        )

    def _log_logout(self, exc: Exception | None) -> None:
        """The end of an authenticated connection, with why it ended."""
        error = self.stream.error
        if error is not None:
            why = f"stream error {error.condition}"
        elif self.stream.closed:
            why = "stream closed"
        else:
            why = f"connection lost ({exc})" if exc is not None else "connection closed"
        jid = self.stream.jid or f"{self.stream.username}@{self.stream.host}"
        if self.session is not None:
            jid = self.session.jid
        log.info(
            "logout: %s from %s: %s conn=%s",
            jid, self.ip, why, self.id,
            extra={"event": "logout", "jid": jid, "address": self.ip, "reason": why,
                   "conn": self.id},
        )

    async def _preauth_iq(self, iq: etree._Element) -> None:
        reply = await self.server.modules.handle_preauth_iq(
            iq, self.stream.host or "", self.ip, encrypted=self.stream.tls, conn=self.id
        )
        self.stream.send(reply)
        self._flush()

    def _element(self, element: etree._Element) -> None:
        """A non-stanza element goes to the module that handles it, or ends the stream."""
        host = self.stream.host or ""
        request = ElementRequest(
            element,
            self.session,
            host,
            self._reply,
            account=f"{self.stream.username}@{host}" if self.stream.authenticated else None,
            attach=self._attach if self.session is None else None,
            bind_resumed=self._bind_resumed if self.session is None else None,
        )
        if not self.server.modules.handle_element(request):
            self.stream.fail(
                StreamError("unsupported-stanza-type", f"{element.tag} is not supported")
            )

    def _bind(self, event: c2s.BindRequested) -> None:
        assert self.login is not None
        session = self.login.bind(event, self)
        if session is None:
            return
        self.session = session
        self.login = None  # its work is done; it would stay with every session
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.server.session_started(session)

    def _attach(self, session: ClientSession) -> C2SConnection | None:
        """Carry `session`, bound on an earlier stream, from now on (XEP-0198 resumption);
        the caller makes this connection its transport. None if this stream cannot any
        more (it ended, or bound a resource, while the resumption was looked up)."""
        if self.session is not None or self.stream.closed or self.transport is None:
            return None
        self.session = session
        self.login = None
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.stream.resumed(session.jid)
        return self

    def _bind_resumed(self, jid: str) -> ClientSession | None:
        """Bind `jid` on this stream with no bind request: a session resumed from another
        node (XEP-0198), whose resource this node now takes over. None as for _attach."""
        if self.session is not None or self.stream.closed or self.transport is None:
            return None
        session = ClientSession(jid, self, self.server.router)
        self.server.router.bind(session)
        self._attach(session)
        self.server.session_started(session)
        return session

    def drop(self) -> None:
        """Cut the connection with no stream end: the client sees it drop and resumes its
        session, on another node when this one drains."""
        if self.transport is not None:
            self.transport.abort()

    def _lost_queued(self) -> None:
        """The connection went before queued messages reached its transport.

        A session transport that wraps this connection (stream management) kept
        each of them when it handed it over: they are its to resend on resumption
        or route again when the session ends, not lost. Otherwise the session has
        just ended (`_end_session`): they are routed again as stream management
        does with unacknowledged ones (`rerouted`: their delivery taken back), so
        they reach the account's other resources or offline storage."""
        queued, self._queued_messages = self._queued_messages, []
        session = self.session
        if session is not None and session.transport is not self:
            return
        router = self.server.router
        for message in queued:
            self._ledger.rerouted += 1
            router.route(parse_fragment(message))

    def _end_session(self) -> None:
        session = self.session
        if session is not None and not self._ended:
            self._ended = True
            if session.keep is not None and session.keep(self, self.stream.closed):
                return  # stream management keeps it, waiting to be resumed
            self.server.session_ended(session)

    def _begin_tls(self) -> TLSLayer:
        """This connection's TLS, with the certificate it presents noted: a reload may
        replace `server.tls` before the handshake ends, and tls-server-end-point must
        be computed from the certificate this client is shown, not the renewed one
        (else its SCRAM-*-PLUS fails)."""
        server_tls = self.server.tls
        self._cert_der = server_tls.cert_der
        return TLSLayer(server_tls.context)

    def _channel_bindings(self) -> dict[str, bytes]:
        if self._tls is None:
            return {}
        return connection_channel_bindings(self._tls.ssl_object, self._cert_der)

    def _auth_timeout(self) -> None:
        self._auth_timer = None
        if self._tls is not None and not self._tls.ready and self.transport is not None:
            # Nothing can be written mid-handshake: no stream error, just the cut.
            log.info("TLS handshake with %s timed out conn=%s", self.ip, self.id)
            self.transport.abort()
            return
        if self.session is None and not self.stream.closed:
            self.stream.fail(StreamError("connection-timeout", "authenticate and bind in time"))
            self._flush()

_sweeping: weakref.WeakSet[Server] = weakref.WeakSet()  # nodes whose idle sweep is scheduled


def _schedule_idle_sweep(server: Server) -> None:
    if server not in _sweeping:
        _sweeping.add(server)
        asyncio.get_running_loop().call_later(PARSER_IDLE_SECONDS, _idle_sweep, server)


def _idle_sweep(server: Server) -> None:
    """Free the XML parser of every stream that received nothing since the last sweep.

    Idle connections are most of a server's connections, and a libxml2 parser
    is about 9 KB of each (docs/bench.md); one timer per node rather than one
    per connection keeps the sweep itself free of per-connection state.
    """
    _sweeping.discard(server)
    for conn in server.connections:
        if conn._received:
            conn._received = False
        else:
            conn.stream.release_parser()
    if server.connections:
        _schedule_idle_sweep(server)
