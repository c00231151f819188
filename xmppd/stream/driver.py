"""The asyncio half every server-side stream but the client one shares (s2s, components).

`StreamCore` (base.py) is a stream without a socket; `StreamDriver` is the
protocol that feeds it a connection's bytes and writes what it queued: the
peer's address, the authentication timer, one write per loop iteration for
what was routed to it, and the cut of a peer that stops reading. A subclass
says what a write means for the stanzas in it (`_writing`), what a cut
counts (`_backlog_cut`) and how an ended stream is reported (`_ended`).
The client connection (xmppd/connection.py) keeps its own: it is the
per-message hot path, measured as it is (bench/conn_path.py).
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from xmppd.stream.base import StreamCore
from xmppd.stream.errors import StreamError

StreamT = TypeVar("StreamT", bound=StreamCore[Any])


class StreamDriver(asyncio.Protocol, Generic[StreamT]):
    """The connection of one `StreamT`; the subclass handles its events."""

    def __init__(self, stream: StreamT, max_stanza_bytes: int) -> None:
        self.stream = stream
        self.transport: asyncio.Transport | None = None
        self.peer = "?"  # host:port, for the logs and the admin views
        self._auth_timer: asyncio.TimerHandle | None = None
        self._flush_scheduled = False
        # What may wait in the transport for a peer that does not read: a little over
        # 8 MiB with the default max_stanza_bytes (512 KiB), room for a burst (a presence
        # broadcast to a domain's or a gateway's many contacts) but not for a hung peer's
        # whole traffic.
        self._max_backlog = 16 * max_stanza_bytes + 65536

    # --- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"

    def eof_received(self) -> bool:
        """The peer stopped sending without closing its stream: close our side too (a
        half-open server stream is of no use)."""
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
        self.transport = None

    # --- what a subclass says ---------------------------------------------------------

    def _writing(self, data: bytes) -> None:
        """`data`, what the stream queued since the last flush (maybe nothing), is about
        to be written."""

    def _backlog_cut(self) -> None:
        """The stream was just failed because the peer stopped reading."""

    def _ended(self, error: StreamError) -> None:
        """The stream ended with `error` (not a shutdown's); the transport closes next."""

    def _established(self) -> bool:
        """Whether the peer finished authenticating, which stops the authentication timer
        (`_start_auth_timer`)."""
        return self.stream.authenticated

    # --- sending ----------------------------------------------------------------------

    def close(self, error: StreamError | None = None) -> None:
        if error is None:
            self.stream.close()
        else:
            self.stream.fail(error)
        self._flush()

    def _schedule_flush(self) -> None:
        """One write for all that one loop iteration routed to this stream."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self.transport
        if transport is None or transport.is_closing():
            # Lost or closing (connection_lost may come later, after a TLS layer's own):
            # asyncio drops what is written to an aborted transport, so nothing is
            # written, nor counted as written; the subclass's connection_lost sees it.
            return
        data = self.stream.output()
        self._writing(data)
        hung = False
        if data:
            transport.write(data)
            if transport.get_write_buffer_size() > self._max_backlog and not self.stream.closed:
                # A peer that stops reading must not make us buffer what is sent to it
                # without bound; it would not read the stream error either: abort (close()
                # would wait for a buffer that never drains, and a component's domain
                # would stay taken meanwhile).
                self.stream.fail(StreamError("policy-violation", "you are not reading your stream"))
                self._backlog_cut()
                hung = True
        if self.stream.closed and not transport.is_closing():
            error = self.stream.error
            if error is not None and error.condition != "system-shutdown":
                self._ended(error)
            if hung:
                transport.abort()
            else:
                transport.close()

    # --- authentication timer ---------------------------------------------------------

    def _start_auth_timer(self, seconds: float, text: str) -> None:
        """End the stream with <connection-timeout/> (`text`) unless it is authenticated
        within `seconds`: an unauthenticated peer must not hold a connection forever."""
        self._auth_timer = asyncio.get_running_loop().call_later(seconds, self._auth_timeout, text)

    def _stop_auth_timer(self) -> None:
        """The stream is authenticated."""
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None

    def _auth_timeout(self, text: str) -> None:
        self._auth_timer = None
        if not self._established() and not self.stream.closed:
            self.close(StreamError("connection-timeout", text))
