"""A client connection: the asyncio transport around one sans-IO C2SStream.

This is the application half: it decides what the stream cannot (TLS
start, credential checks against storage, resource binding with the
router) and is the Session the router delivers to. Output is coalesced:
stanzas delivered during one loop iteration leave in one write.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import TYPE_CHECKING

from lxml import etree

from xmppd.auth.accounts import InvalidUsername, normalize_username
from xmppd.jid import JID, InvalidJID
from xmppd.sasl import SASLFailure
from xmppd.sasl.channel_binding import connection_channel_bindings
from xmppd.sasl.mechanisms import scram_hash_of
from xmppd.sasl.plain import parse_plain
from xmppd.sasl.scram import ScramServer
from xmppd.storage.base import StorageError
from xmppd.stream import c2s
from xmppd.stream.errors import StanzaError, StreamError, error_from
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger(__name__)

_READ_BUFFER = memoryview(bytearray(65536))
"""Where every connection's reads land (BufferedProtocol). Each read is consumed
by buffer_updated before the loop starts another, so one buffer serves all
connections, and the TLS layer decrypts into it instead of allocating a
256 KiB bytes object per read (uvloop's copying path)."""

PARSER_IDLE_SECONDS = 10.0
"""A stream that received nothing for this long (up to twice as long) frees its XML parser."""


class C2SConnection(asyncio.BufferedProtocol):
    def __init__(self, server: Server, direct_tls: bool) -> None:
        self.server = server
        self.direct_tls = direct_tls
        self.transport: asyncio.Transport | None = None
        self.ip = "?"
        self.stream = c2s.C2SStream(server.stream_settings(direct_tls))
        # Session attributes (xmppd.session.Session)
        self.jid = ""
        self.bare = ""
        self.resource = ""
        self.host = ""
        self.available = False
        self.priority = 0
        self.presence: etree._Element | None = None
        self._scram: ScramServer | None = None
        self._pending_mechanism: str | None = None  # <auth/> came without initial response
        self._auth_task: asyncio.Task[None] | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        self._queued_messages = 0  # message stanzas in the stream's output, not yet written
        self._input_holds = 0  # hold_input() calls not yet released: reading is paused
        self._max_backlog = 4 * server.config.limits.max_stanza_bytes + 65536
        self._counted = False
        self._ended = False
        self._received = True  # data came since the last idle sweep
        # Decrypted bytes that came before start_tls() returned: the client's new stream
        # header may ride with its TLS Finished, and the event loop may hand it to us
        # before our coroutine resumes; it must reach the stream after tls_started().
        self._before_tls: list[bytes] | None = None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if peer else "?"
        loop = asyncio.get_running_loop()
        self._auth_timer = loop.call_later(
            self.server.config.limits.auth_timeout, self._auth_timeout
        )
        if not self.server.connection_opened(self):
            self.stream.fail(
                StreamError("policy-violation", "too many connections from your address")
            )
            self._flush()
            return
        self._counted = True
        _schedule_idle_sweep(self.server)
        if self.direct_tls:
            self.stream.set_channel_bindings(self._channel_bindings())

    def get_buffer(self, sizehint: int) -> memoryview:
        return _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(_READ_BUFFER[:nbytes].tobytes())

    def data_received(self, data: bytes) -> None:
        if self._before_tls is not None:
            self._before_tls.append(data)
            return
        self._received = True
        self._handle(self.stream.receive(data))
        self._flush()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        if self._auth_task is not None:
            self._auth_task.cancel()
        if self._counted:
            self.server.connection_closed(self)
            self._counted = False
        self._end_session()
        if self._queued_messages:
            self._lost_queued()
        self.transport = None

    # --- Session ----------------------------------------------------------------------

    def deliver(self, stanza: etree._Element) -> None:
        if stanza.tag == ns.C_MESSAGE and stanza.get("type") != "error":
            ledger = self.server.router.ledger
            if self.stream.closed:
                ledger.drop("recipient-gone")
                return
            ledger.delivered += 1
            self._queued_messages += 1
        self.stream.send(stanza)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def terminate(self, error: StreamError) -> None:
        self.stream.fail(error)
        self._flush()

    def hold_input(self) -> None:
        self._input_holds += 1
        transport = self.transport
        if self._input_holds == 1 and transport is not None and not transport.is_closing():
            transport.pause_reading()

    def release_input(self) -> None:
        self._input_holds -= 1
        transport = self.transport
        if self._input_holds == 0 and transport is not None and not transport.is_closing():
            transport.resume_reading()

    # --- stream events ----------------------------------------------------------------

    def _handle(self, events: list[c2s.Event]) -> None:
        for event in events:
            if isinstance(event, c2s.StanzaReceived):
                stanza = event.stanza
                if stanza.tag == ns.C_MESSAGE and stanza.get("type") != "error":
                    self.server.router.ledger.received += 1
                self.server.router.route(stanza, self)
            elif isinstance(event, c2s.AuthRequested):
                self._start_auth(event)
            elif isinstance(event, c2s.AuthResponse):
                self._continue_auth(event.data)
            elif isinstance(event, c2s.AuthAborted):
                self._abort_auth()
            elif isinstance(event, c2s.BindRequested):
                self._bind(event)
            elif isinstance(event, c2s.TLSRequested):
                assert self.transport is not None
                # No plaintext byte may reach the parser after <proceed/>.
                self.transport.pause_reading()
                self._before_tls = []
                self._flush()
                asyncio.ensure_future(self._start_tls())
            elif isinstance(event, c2s.PreAuthIQ):
                self.server.router.spawn(self._preauth_iq(event.iq))
            elif isinstance(event, c2s.NonzaReceived):
                self.stream.fail(
                    StreamError("unsupported-stanza-type", f"{event.element.tag} is not supported")
                )
            # StreamEnded needs nothing here: _flush() closes a closed stream's transport.

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None:
            return
        data = self.stream.output()
        if data:
            transport.write(data)
            if self._queued_messages:
                self.server.router.ledger.written += self._queued_messages
                self._queued_messages = 0
            if transport.get_write_buffer_size() > self._max_backlog and not self.stream.closed:
                # A client that stops reading must not make us buffer without bound.
                self.stream.fail(StreamError("policy-violation", "you are not reading your stream"))
                transport.write(self.stream.output())
        if self.stream.closed:
            # The stream is over even if the TLS shutdown takes a while: stop routing here now.
            self._end_session()
            if not transport.is_closing():
                self._log_stream_error()
                transport.close()

    def _log_stream_error(self) -> None:
        """One line at the default level for every stream we end with an error, so a
        refused client (or a server-side regression that refuses them all) shows in
        the log. A shutdown is the operator's own doing and logs nothing per stream."""
        error = self.stream.error
        if error is None or error.condition == "system-shutdown":
            return
        who = self.stream.jid or self.stream.host or "?"
        log.info(
            "stream from %s (%s) refused: %s%s",
            self.ip, who, error.condition, f" ({error.text})" if error.text else "",
        )

    def _lost_queued(self) -> None:
        """The connection went before queued messages reached its transport."""
        self.server.router.ledger.drop("recipient-gone", self._queued_messages)
        self._queued_messages = 0

    def _end_session(self) -> None:
        if self.jid and not self._ended:
            self._ended = True
            self.server.session_ended(self)

    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                transport,
                self,
                self.server.tls.context,
                server_side=True,
                ssl_handshake_timeout=self.server.config.limits.auth_timeout,
            )
        except (TimeoutError, OSError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", self.ip, exc)
            transport.abort()
            return
        if new_transport is None:
            return
        self.transport = new_transport  # type: ignore[assignment]
        self.stream.tls_started(self._channel_bindings())
        early, self._before_tls = b"".join(self._before_tls or ()), None
        if early:
            self.data_received(early)

    def _channel_bindings(self) -> dict[str, bytes]:
        assert self.transport is not None
        ssl_object = self.transport.get_extra_info("ssl_object")
        if ssl_object is None:
            return {}
        return connection_channel_bindings(ssl_object, self.server.tls.cert_der)

    def _auth_timeout(self) -> None:
        if not self.jid and not self.stream.closed:
            self.stream.fail(StreamError("connection-timeout", "authenticate and bind in time"))
            self._flush()

    # --- SASL -------------------------------------------------------------------------

    def _start_auth(self, event: c2s.AuthRequested) -> None:
        if event.data is None:
            self.stream.sasl_challenge(b"")  # RFC 6120 6.4.2: ask for the initial response
            self._scram = None
            self._pending_mechanism = event.mechanism
            return
        self._pending_mechanism = None
        self._auth_task = asyncio.ensure_future(self._auth_first(event.mechanism, event.data))

    def _continue_auth(self, data: bytes) -> None:
        if self._auth_task is not None and not self._auth_task.done():
            self._auth_task.cancel()
            self.stream.sasl_failure("malformed-request", "wait for the server's challenge")
            return
        if self._pending_mechanism is not None:
            mechanism, self._pending_mechanism = self._pending_mechanism, None
            self._auth_task = asyncio.ensure_future(self._auth_first(mechanism, data))
        elif self._scram is not None:
            self._auth_task = asyncio.ensure_future(self._auth_final(data))
        else:
            self.stream.sasl_failure("malformed-request")

    def _abort_auth(self) -> None:
        if self._auth_task is not None:
            self._auth_task.cancel()
        self._scram = None
        self._pending_mechanism = None

    async def _auth_first(self, mechanism: str, data: bytes) -> None:
        server = self.server
        host = self.stream.host or ""
        try:
            if mechanism == "PLAIN":
                authzid, username, password = parse_plain(data)
                username = _account_name(username)
                if await server.throttle.refused(self.ip, f"{username}@{host}"):
                    self._refuse_banned()
                    return
                if not await server.accounts[host].verify_plain(username, password):
                    await self._auth_failed(username, "not-authorized")
                    return
                await self._authorize(username, authzid, None)
                return
            scram = ScramServer(
                mechanism,
                self.stream.channel_bindings,
                plus_offered=any(m.endswith("-PLUS") for m in self.stream.offered),
                fake_iterations=server.config.auth.scram_iterations,
                fake_salt_key=server.fake_salt_key,
            )
            username = _account_name(scram.start(data))
            if await server.throttle.refused(self.ip, f"{username}@{host}"):
                self._refuse_banned()
                return
            keys = await server.accounts[host].scram_keys(username, scram_hash_of(mechanism))
            self.stream.sasl_challenge(scram.challenge(keys))
            self._scram = scram
        except SASLFailure as failure:
            await self._auth_failed(None, failure.condition, failure.text)
        except (StorageError, ValueError) as exc:
            # Storage down or stored keys unreadable: the client may retry; nothing was changed.
            log.error("authentication for %s failed on the server side: %s", self.ip, exc)
            self.stream.sasl_failure("temporary-auth-failure", "try again later")
        finally:
            self._flush()

    async def _auth_final(self, data: bytes) -> None:
        scram, self._scram = self._scram, None
        assert scram is not None and scram.authcid is not None
        username = _account_name(scram.authcid)
        try:
            server_final = scram.finish(data)
        except SASLFailure as failure:
            await self._auth_failed(username, failure.condition, failure.text)
        else:
            await self._authorize(username, scram.authzid, server_final)
        finally:
            self._flush()

    async def _authorize(
        self, username: str, authzid: str | None, additional: bytes | None
    ) -> None:
        """Authentication passed: may this user act as `authzid`?

        Only as itself, unless auth.proxy_auth lists it, and then only as an
        existing account of the same host: acting as an arbitrary identity
        after authenticating as another is a known CVE class.
        """
        host = self.stream.host or ""
        own = f"{username}@{host}"
        if authzid is not None:
            try:
                target = JID(authzid)
            except InvalidJID:
                target = None
            if target is None or target.bare != own:
                allowed = (
                    target is not None
                    and own in self.server.config.auth.proxy_auth
                    and target.domain == host
                    and not target.resource
                    and await self.server.accounts[host].exists(target.user)
                )
                if not allowed:
                    self.stream.sasl_failure("invalid-authzid", "you may not act as another user")
                    return
                username = target.user  # type: ignore[union-attr]
        if not await self.server.throttle.admit(self.ip, own):
            self._refuse_banned()
            return
        self.stream.sasl_success(username, additional)
        log.debug("authenticated %s from %s", own, self.ip)

    async def _auth_failed(
        self, username: str | None, condition: str, text: str | None = None
    ) -> None:
        """Answer a failed attempt, after a wait that grows with its address's failures.

        Only <not-authorized/> waits: counted against the address and account
        when the user name is known, the base delay uncounted when it is not
        yet. Other conditions (a malformed message) are answered at once and
        not counted, since they cost no password check.
        """
        if condition == "not-authorized":
            throttle = self.server.throttle
            delay = throttle.failure_delay
            if username is not None:
                delay = await throttle.failed(self.ip, f"{username}@{self.stream.host or ''}")
            await asyncio.sleep(delay)
        self.stream.sasl_failure(condition, text)

    def _refuse_banned(self) -> None:
        """Refuse an attempt from a banned address, without checking its credentials.

        `<temporary-auth-failure/>` (RFC 6120 6.5.12: retry later) says what
        is true: the refusal ends by itself. `<not-authorized/>` (6.5.10)
        would tell the client the credentials are wrong, and clients then
        ask their user for another password that cannot help either; a
        `<policy-violation/>` stream error would end the stream, which the
        per-stream retry limit already does after a few attempts. The text
        says why, for the user who reads the client's error.
        """
        self.stream.sasl_failure(
            "temporary-auth-failure", "too many failed logins from your address; try again later"
        )

    async def _preauth_iq(self, iq: etree._Element) -> None:
        reply = await self.server.modules.handle_preauth_iq(iq, self.stream.host or "", self.ip)
        self.stream.send(reply)
        self._flush()

    # --- binding ----------------------------------------------------------------------

    def _bind(self, event: c2s.BindRequested) -> None:
        host = self.stream.host or ""
        bare = f"{self.stream.username}@{host}"
        try:
            full = self.server.router.bind(self, bare, event.resource)
        except StanzaError as exc:
            self.stream.send(error_from(event.iq, exc))
            return
        self.jid, self.bare, self.host = full, bare, host
        self.resource = full.split("/", 1)[1]
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self._auth_task = None  # done: its Task and coroutine would stay with every session
        self.stream.bound(event.iq, full)
        self.server.session_started(self)


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


def _account_name(authcid: str) -> str:
    """The stored account name for a SASL authcid ("Alice" logs in as "alice").

    A name that is no valid localpart is kept as given: it cannot match an
    account, and it still counts against the failure limit."""
    try:
        return normalize_username(authcid)
    except InvalidUsername:
        return authcid
