"""One external component's connection: the asyncio protocol around a `ComponentStream`."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from lxml import etree

from xmppd.stream import component
from xmppd.stream.driver import StreamDriver
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


class ComponentConnection(StreamDriver[component.ComponentStream]):
    def __init__(self, service: ComponentService) -> None:
        super().__init__(
            component.ComponentStream(service.settings), service.config.max_stanza_bytes
        )
        self.service = service
        self.since = 0.0  # wall-clock time of the handshake (xmppctl components)
        # Stanzas queued for the stream and not yet written (the flush comes in the next
        # loop iteration), with whether each may be bounced: if the connection is lost
        # before that write, connection_lost hands them back to be routed again.
        self._unwritten: list[tuple[etree._Element, bool]] = []

    @property
    def domain(self) -> str | None:
        """The domain it serves, once authenticated."""
        return self.stream.domain if self.stream.authenticated else None

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            _keepalive(sock)
        self.service.connection_opened(self)
        self._start_auth_timer(self.service.config.auth_timeout, "send the handshake in time")

    def data_received(self, data: bytes) -> None:
        for event in self.stream.receive(data):
            if isinstance(event, component.StanzaReceived):
                self.service.received(event.stanza)
            elif isinstance(event, component.Authenticated):
                self._stop_auth_timer()
                self.service.authenticated(self)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
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
        self._schedule_flush()
        return True

    # --- StreamDriver -----------------------------------------------------------------

    def _writing(self, data: bytes) -> None:
        # Written now: the messages' fate is the component's (the ledger's to_remote);
        # until here a lost connection bounces them instead (connection_lost).
        written = sum(
            1 for s, _ in self._unwritten if s.tag == ns.C_MESSAGE and s.get("type") != "error"
        )
        self.service.server.router.ledger.to_remote += written
        self._unwritten.clear()

    def _ended(self, error: StreamError) -> None:
        self.service.refused(error.condition)
        log.info(
            "component stream for %s (%s) ended: %s%s",
            self.stream.domain or "?",
            self.peer,
            error.condition,
            f" ({error.text})" if error.text else "",
        )
