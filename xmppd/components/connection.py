"""One external component's connection: the asyncio protocol around a `ComponentStream`."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from lxml import etree

from xmppd.stream import component
from xmppd.stream.errors import StreamError
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.components.service import ComponentService

log = logging.getLogger("xmppd.components")

# TCP keepalive of a component connection: probes after KEEPIDLE s of silence, every
# KEEPINTVL s, dead after KEEPCNT unanswered (Linux; elsewhere the system's timers).
KEEPIDLE, KEEPINTVL, KEEPCNT = 60, 10, 3


def _keepalive(sock: socket.socket) -> None:
    """A component whose host died leaves a half-open connection that keeps its domain
    (a reconnect is refused with <conflict/>) until the server notices; with nothing
    to send to it, only keepalive probes make it notice."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, "TCP_KEEPIDLE"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)


class ComponentConnection(asyncio.Protocol):
    def __init__(self, service: ComponentService) -> None:
        self.service = service
        self.stream = component.ComponentStream(service.settings)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.since = 0.0  # wall-clock time of the handshake (xmppctl components)
        self._auth_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        # Stanzas queued for the stream and not yet written (the flush comes in the next
        # loop iteration), with whether each may be bounced: if the connection is lost
        # before that write, connection_lost hands them back to be routed again.
        self._unwritten: list[tuple[etree._Element, bool]] = []
        # What may wait in the transport for a component that does not read: 8 MiB with
        # the default max_stanza_bytes, room for a burst (a presence broadcast to a
        # gateway's many contacts) but not for a hung component's whole traffic.
        self._max_backlog = 16 * service.config.max_stanza_bytes + 65536

    @property
    def domain(self) -> str | None:
        """The domain it serves, once authenticated."""
        return self.stream.domain if self.stream.authenticated else None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        self.service.connection_opened(self)
        self._auth_timer = asyncio.get_running_loop().call_later(
            self.service.config.auth_timeout, self._auth_timeout
        )

    def data_received(self, data: bytes) -> None:
        for event in self.stream.receive(data):
            if isinstance(event, component.StanzaReceived):
                self.service.received(event.stanza)
            elif isinstance(event, component.Authenticated):
                if self._auth_timer is not None:
                    self._auth_timer.cancel()
                    self._auth_timer = None
                self.service.authenticated(self)
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self.transport = None
        self.service.connection_closed(self)
        unwritten, self._unwritten = self._unwritten, []
        if unwritten:
            self.service.not_written(self.stream.domain or "", unwritten)

    # --- sending ----------------------------------------------------------------------

    def send(self, stanza: etree._Element, bounce: bool = True) -> bool:
        """Queue a stanza for the component; False once its stream is closing."""
        if self.transport is None or not self.stream.authenticated:
            return False
        self.stream.send(stanza)
        self._unwritten.append((stanza, bounce))
        if not self._flush_scheduled:  # one write for what one loop iteration routed here
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    def close(self, error: StreamError | None = None) -> None:
        if error is None:
            self.stream.close()
        else:
            self.stream.fail(error)
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None:
            return
        data = self.stream.output()
        # Written now: the messages' fate is the component's (the ledger's to_remote);
        # until here a lost connection bounces them instead (connection_lost).
        written = sum(
            1 for s, _ in self._unwritten if s.tag == ns.C_MESSAGE and s.get("type") != "error"
        )
        self.service.server.router.ledger.to_remote += written
        self._unwritten.clear()
        hung = False
        if data:
            transport.write(data)
            if transport.get_write_buffer_size() > self._max_backlog and not self.stream.closed:
                # A component that stops reading must not make us buffer without bound;
                # it would not read the stream error either: abort, so the domain is free
                # now (close() would wait for the buffer to drain, holding it).
                self.stream.fail(StreamError("policy-violation", "you are not reading your stream"))
                hung = True
        if self.stream.closed and not transport.is_closing():
            error = self.stream.error
            if error is not None and error.condition != "system-shutdown":
                self.service.refused(error.condition)
                log.info(
                    "component stream for %s (%s) ended: %s%s",
                    self.stream.domain or "?",
                    self.peer,
                    error.condition,
                    f" ({error.text})" if error.text else "",
                )
            if hung:
                transport.abort()
            else:
                transport.close()

    def _auth_timeout(self) -> None:
        self._auth_timer = None
        if not self.stream.authenticated and not self.stream.closed:
            self.close(StreamError("connection-timeout", "send the handshake in time"))
