"""One server-to-server connection: the asyncio protocol around one `S2SStream`.

Incoming (a peer connected to our s2s listener) and outgoing (we connected
to deliver stanzas) differ only in who starts TLS and what authentication
means; the service (xmppd/s2s/service.py) owns the connections and decides
what a failure means for the stanzas waiting on them.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from OpenSSL import crypto

from xmppd.ratelimit import TokenBucket
from xmppd.s2s.identity import certificate_covers
from xmppd.s2s.tlsaccept import TLSAcceptLayer, TLSAcceptProtocol, TLSAcceptTransport
from xmppd.stream import s2s
from xmppd.stream.driver import StreamDriver
from xmppd.stream.errors import StreamError
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.s2s.service import S2SService

log = logging.getLogger("xmppd.s2s")

WORK_IN_FLIGHT = 64
"""Stanzas of one stream whose routing still waits on storage (an account looked up,
a message stored offline) before the stream is no longer read, until half of them are
done: a peer that sends faster than storage takes its stanzas is slowed by TCP, not
queued in memory. A client's stream does the same one stanza at a time (its order is
its own); a peer's stanzas are many senders', ordered per recipient by the router."""


class Outgoing(NamedTuple):
    """A stanza for a remote domain, waiting in its link's queue or taken by a stream
    and not yet written (xmppd/s2s/service.py)."""

    stanza: etree._Element
    bounce: bool  # False: answered with no error if it cannot go (a broadcast copy)
    # Already given back once by a connection lost before writing it: it bounces the
    # next time, so a peer that drops every connection cannot keep it forever.
    requeued: bool = False


class S2SConnection(StreamDriver[s2s.S2SStream]):
    def __init__(
        self,
        service: S2SService,
        stream: s2s.S2SStream,
        tls_context: ssl.SSLContext | None,
        direct_tls: bool = False,
        proxied_ip: str | None = None,
    ) -> None:
        """`proxied_ip`: incoming, the peer's address a load balancer's PROXY header gave
        (xmppd.proxyproto), used instead of the TCP peer's (the balancer's) for
        `s2s.max_connections_per_address`, the logs and `xmppctl s2s`."""
        super().__init__(stream, service.config.max_stanza_bytes)
        self._proxied_ip = proxied_ip
        self.service = service
        self.outgoing = stream.outgoing
        # Outgoing STARTTLS (stdlib); None for incoming streams, whose TLS is the
        # service's pyOpenSSL layer (xmppd/s2s/tlsaccept.py: any client certificate).
        self.tls_context = tls_context
        # TLS from the first byte (XEP-0368): outgoing, done by asyncio before
        # connection_made; incoming, started there over the plain TCP transport.
        self.direct_tls = direct_tls
        self.verdict: bool | None = None  # a db:verify stream: the authoritative server's answer
        # Incoming: the dialback check of the key the peer gave (S2SService.check_dialback),
        # cancelled if the stream ends first.
        self.dialback_check: asyncio.Future[object] | None = None
        self.last_active = 0.0  # loop time of the last byte in or out (idle timeout)
        self.since = 0.0  # wall-clock time the connection was made (xmppctl s2s)
        self.stanzas_in = 0
        self.stanzas_out = 0
        # Set once the stream is authenticated (outgoing: ready for stanzas) or ended.
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Its failure may come after the service stopped waiting (a timeout): not an error.
        self.ready.add_done_callback(_seen)
        self._before_tls: list[bytes] | None = None
        rate = service.config.max_bytes_per_second
        self._bucket = TokenBucket(rate, rate) if rate else None
        self._rate_pause: asyncio.TimerHandle | None = None  # reading stopped until then
        self._in_flight = 0  # stanzas whose routing waits on storage (WORK_IN_FLIGHT)
        self._work_pause = False  # reading stopped until half of those are done
        # Stanzas queued for the stream and not yet written (the flush comes later in the
        # loop iteration): if the connection is lost before that write, the remote server
        # never saw them, and connection_lost gives them back to the service.
        self._unwritten: list[Outgoing] = []

    @property
    def remote(self) -> str:
        return self.stream.authenticated_domain or self.stream.remote or "?"

    def view(self) -> dict[str, object]:
        """What `xmppctl s2s` shows of it (GET /s2s on the admin API)."""
        return {
            "direction": "out" if self.outgoing else "in",
            "local": self.stream.local or "",
            "remote": self.remote,
            "mechanism": self.stream.mechanism or "none",
            "tls": "direct" if self.direct_tls else "starttls",
            "bidi": self.stream.bidi,
            "since": self.since,
            "peer": self.peer,
            "stanzas_in": self.stanzas_in,
            "stanzas_out": self.stanzas_out,
        }

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        address = peer[0] if peer else "?"
        if self._proxied_ip is not None:
            # The balancer's own address:port would name every peer behind it alike.
            address = self.peer = self._proxied_ip
        self.last_active = asyncio.get_running_loop().time()
        self.since = time.time()
        if not self.service.connection_opened(self, address):
            self.stream.fail(
                StreamError("policy-violation", "too many connections from your address")
            )
            self._flush()
            return
        if not self.outgoing:
            self._start_auth_timer(self.service.config.auth_timeout, "authenticate in time")
        if self.direct_tls and not self.outgoing:
            self._before_tls = []
            self._accept_tls()
        elif self.direct_tls:
            # asyncio finished the handshake before calling us: the stream starts secured.
            self._secured(transport)  # type: ignore[arg-type]
        elif self.outgoing:
            self.stream.start()
            self._flush()

    def data_received(self, data: bytes) -> None:
        if self._before_tls is not None:
            self._before_tls.append(data)
            return
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        self._handle(self.stream.receive(data))
        self._flush()
        if self._bucket is None:
            return
        delay = self._bucket.take(len(data), self.last_active)
        if delay > 0 and self._rate_pause is None:
            if self.transport is not None and not self.transport.is_closing():
                # Over `s2s.max_bytes_per_second`: stop reading until the debt is paid.
                self.transport.pause_reading()
                self._rate_pause = loop.call_later(delay, self._resume_reading)

    def _resume_reading(self) -> None:
        self._rate_pause = None
        if self._work_pause:
            return  # still waiting for storage: _work_done resumes
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _wait_for(self, pending: Awaitable[object]) -> None:
        """A stanza's routing waits on storage: past WORK_IN_FLIGHT such stanzas, stop
        reading the peer."""
        self._in_flight += 1
        asyncio.ensure_future(pending).add_done_callback(self._work_done)
        if self._in_flight >= WORK_IN_FLIGHT and not self._work_pause:
            self._work_pause = True
            if self.transport is not None and not self.transport.is_closing():
                self.transport.pause_reading()

    def _work_done(self, done: asyncio.Future[object]) -> None:
        self._in_flight -= 1
        if not done.cancelled():
            done.exception()  # the router logged it; retrieved, so asyncio does not again
        if self._work_pause and self._in_flight <= WORK_IN_FLIGHT // 2:
            self._work_pause = False
            if self._rate_pause is None:
                self._resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._rate_pause is not None:
            self._rate_pause.cancel()
        if self.dialback_check is not None:
            self.dialback_check.cancel()
        if not self.ready.done():
            if self.outgoing:  # awaited by the service, which then fails the link
                self.ready.set_exception(ConnectionError(f"connection to {self.remote} lost"))
            else:
                self.ready.cancel()
        unwritten, self._unwritten = self._unwritten, []
        self.service.connection_closed(self, unwritten)

    # --- sending ----------------------------------------------------------------------

    def send(self, item: Outgoing) -> bool:
        """Queue a stanza for the peer; False unless the stream is ready for stanzas
        (authenticated, restarted after SASL, not closing). It counts as sent once
        written (`_writing`)."""
        if self.transport is None or not self.stream.ready:
            return False
        self.stream.send(item.stanza)
        self._unwritten.append(item)
        self._schedule_flush()
        return True

    def abort(self) -> None:
        """Cut the connection with no stream end (given up on while being set up)."""
        if self.transport is not None:
            self.transport.abort()

    # --- StreamDriver -----------------------------------------------------------------

    def _writing(self, data: bytes) -> None:
        if data:
            self.last_active = asyncio.get_running_loop().time()
        # Written now: the messages' fate is the remote server's (the ledger's to_remote);
        # until here a lost connection gives them back instead (connection_lost).
        server = self.service.server
        for item in self._unwritten:
            server.traffic.sent(item.stanza.tag)
            if item.stanza.tag == ns.C_MESSAGE and item.stanza.get("type") != "error":
                server.router.ledger.to_remote += 1
        self.stanzas_out += len(self._unwritten)
        self._unwritten.clear()

    def _established(self) -> bool:
        # After SASL the peer must still restart the stream (RFC 6120 6.4.6): one that
        # never does has not finished either, and is cut at s2s.auth_timeout too.
        return self.stream.ready

    def _backlog_cut(self) -> None:
        self.service.failures["policy-violation"] += 1

    def _ended(self, error: StreamError) -> None:
        log.info(
            "s2s: %s ended: %s%s",
            self._named(self.remote),
            error.condition,
            f" ({error.text})" if error.text else "",
        )

    def _named(self, domain: str) -> str:
        """The stream, for the log: "outgoing stream to a.test (addr:port)", or
        "incoming stream from" `domain`."""
        direction = "outgoing stream to" if self.outgoing else "incoming stream from"
        return f"{direction} {domain} ({self.peer})"

    # --- stream events ----------------------------------------------------------------

    def _handle(self, events: list[s2s.Event]) -> None:
        for event in events:
            if isinstance(event, s2s.StanzaReceived):
                self.stanzas_in += 1
                pending = self.service.received(event.stanza)
                if pending is not None:
                    self._wait_for(pending)
            elif isinstance(event, s2s.StanzaRefused):
                self.service.refused(event.error)
            elif isinstance(event, s2s.TLSRequested):
                assert self.transport is not None
                self.transport.pause_reading()
                self._before_tls = []
                self._flush()
                if self.outgoing:
                    asyncio.ensure_future(self._start_tls())
                else:
                    self._accept_tls()
            elif isinstance(event, s2s.Authenticated):
                self._stop_auth_timer()
                log.info(
                    "s2s: %s authenticated with %s", self._named(event.domain), event.mechanism
                )
                if not self.ready.done():
                    self.ready.set_result(None)
                if not self.outgoing and self.stream.bidi:
                    self.service.bidi_ready(self)
            elif isinstance(event, s2s.DialbackRequested):
                self.service.check_dialback(self, event)
            elif isinstance(event, s2s.DialbackVerified):
                self.verdict = event.valid
                if not self.ready.done():
                    self.ready.set_result(None)
            elif isinstance(event, s2s.AuthFailed):
                log.info("s2s: %s (%s) refused us: %s", self.remote, self.peer, event.reason)
                if not self.ready.done():
                    self.ready.set_exception(ConnectionRefusedError(event.reason))

    def dialback_checked(self, domain: str, valid: bool | None) -> None:
        """The authoritative server's answer on the key `domain` gave us (None: it
        could not be asked); the stream answers the peer (XEP-0220 2.4)."""
        if self.transport is None or self.stream.closed:
            return
        self._handle(self.stream.dialback_checked(domain, valid))
        self._flush()

    def _accept_tls(self) -> None:
        """Incoming TLS (after <proceed/>, or from the first byte) with any client
        certificate taken in the handshake and judged after it (xmppd/s2s/tlsaccept.py)."""
        raw = self.transport
        assert raw is not None and not isinstance(raw, TLSAcceptTransport)
        layer = TLSAcceptLayer(self.service.accept_context(self.direct_tls))
        loop = asyncio.get_running_loop()

        def timeout() -> None:
            log.info("s2s: TLS with %s timed out", self.peer)
            raw.abort()

        timer = loop.call_later(self.service.config.auth_timeout, timeout)

        def done(transport: TLSAcceptTransport | None, exc: Exception | None) -> None:
            timer.cancel()
            if transport is None:
                log.info("s2s: TLS with %s failed: %s", self.peer, exc)
                return
            self.transport = transport
            self._secured(transport)

        tls = TLSAcceptProtocol(raw, layer, self, done)
        raw.set_protocol(tls)
        early, self._before_tls = b"".join(self._before_tls or ()), None
        if early:
            tls.data_received(early)
        if not raw.is_closing():
            raw.resume_reading()

    async def _start_tls(self) -> None:
        transport = self.transport
        assert transport is not None and self.tls_context is not None
        loop = asyncio.get_running_loop()
        try:
            new_transport = await loop.start_tls(
                transport,
                self,
                self.tls_context,
                server_side=not self.outgoing,
                server_hostname=self.stream.remote if self.outgoing else None,
                ssl_handshake_timeout=self.service.config.auth_timeout,
            )
        except (TimeoutError, OSError, ConnectionError, ssl.SSLError) as exc:
            log.info("s2s: TLS with %s (%s) failed: %s", self.remote, self.peer, exc)
            if not self.ready.done():
                self.ready.set_exception(ConnectionRefusedError(f"TLS failed: {exc}"))
            transport.abort()
            return
        if new_transport is None:
            return
        self.transport = new_transport  # type: ignore[assignment]
        if self._secured(new_transport):  # type: ignore[arg-type]
            early, self._before_tls = b"".join(self._before_tls or ()), None
            if early:
                self.data_received(early)

    def _secured(self, transport: asyncio.Transport) -> bool:
        """TLS is up: check the peer's certificate names and tell the stream. OpenSSL
        validated the chain (or there is no certificate); the name is ours to check:
        outgoing, here, for the domain we connected to; incoming, by the stream, for the
        domain its header names (after a direct TLS handshake it has not come yet)."""
        if isinstance(transport, TLSAcceptTransport):  # incoming
            names = _CertificateNames(transport.layer.peer_chain(), self.service.vouches_for)
            self.stream.tls_started(names)
            self._flush()
            return True
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if self.stream.verify_only:
            # A db:verify stream asks the peer's authoritative server, found through
            # DNS (or the config), about a key: its certificate proves nothing more there.
            self.stream.tls_started({self.stream.remote or ""})
            self._flush()
            return True
        remote = self.stream.remote or ""
        if der is None or not remote or not certificate_covers(der, remote):
            reason = f"its certificate is not valid for {remote}"
            log.info("s2s: %s refused: %s", self._named(remote), reason)
            if not self.ready.done():
                self.ready.set_exception(ConnectionRefusedError(reason))
            self.close(StreamError("policy-violation", reason))
            return False
        self.stream.tls_started({remote})
        self._flush()
        return True


class _CertificateNames:
    """The domains an incoming peer's certificate is valid for, asked one at a time:
    named in it (RFC 9525), and its chain (validated in the handshake against every CA
    we trust for any peer) leading to a CA trusted for that domain itself (`vouches`:
    a partner's CA does not speak for other domains)."""

    def __init__(
        self,
        chain: Sequence[crypto.X509],
        vouches: Callable[[str, Sequence[crypto.X509]], bool],
    ) -> None:
        self.chain = chain
        self.der = chain[0].to_cryptography().public_bytes(Encoding.DER) if chain else None
        self.vouches = vouches
        self._answers: dict[str, bool] = {}  # asked for the features, then for EXTERNAL

    def __contains__(self, domain: object) -> bool:
        if self.der is None or not isinstance(domain, str) or not domain:
            return False
        answer = self._answers.get(domain)
        if answer is None:
            answer = certificate_covers(self.der, domain) and self.vouches(domain, self.chain)
            self._answers[domain] = answer
        return answer


def _seen(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()
