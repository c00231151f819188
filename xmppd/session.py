"""A client session, apart from whatever connection carries it.

The node owns the `ClientSession`: its JID, presence and priority, and a
bag of per-session state that modules keep on it. A `Transport` attaches
to it and detaches from it: a TCP/TLS stream today; a WebSocket, a stream
resumed with stream management, or a link to another cluster node later;
or nothing at all while the session waits to be resumed. The router and
the modules see only the session, so a new transport changes neither.
"""

from __future__ import annotations

from typing import Any, Protocol

from lxml import etree

from xmppd.stream.errors import StreamError


class Transport(Protocol):
    """What carries a session's stanzas to its client and back."""

    def send(self, stanza: etree._Element) -> bool:
        """Queue a stanza for the client without blocking; False if it cannot be
        taken any more (the stream is closing), so the router falls back."""

    def close(self, error: StreamError) -> None:
        """End the client's stream with `error` (conflict, system-shutdown, ...)."""

    def pause_input(self) -> None:
        """Stop reading from the client (its TCP window fills)."""

    def resume_input(self) -> None:
        """Read from the client again."""


class ClientSession:
    """One bound resource of an account on this node.

    `state` is where modules keep what belongs to the session and must go
    with it (carbons enabled, the active privacy list, roster interest):
    keyed by module name, dropped with the session, never shared.
    """

    __slots__ = (
        "jid",
        "bare",
        "resource",
        "host",
        "available",
        "priority",
        "presence",
        "state",
        "transport",
        "_input_holds",
        "__weakref__",
    )

    def __init__(self, jid: str, transport: Transport | None = None) -> None:
        self.jid = jid
        self.bare, _, self.resource = jid.partition("/")
        self.host = self.bare.rpartition("@")[2]
        self.available = False  # has sent initial presence (RFC 6121 "available resource")
        self.priority = 0
        self.presence: etree._Element | None = None  # last broadcast presence
        self.state: dict[str, Any] = {}
        self.transport = transport
        self._input_holds = 0

    def __repr__(self) -> str:
        return f"<ClientSession {self.jid}>"

    def deliver(self, stanza: etree._Element) -> bool:
        """Hand a stanza to the transport; False if none can take it now."""
        transport = self.transport
        return transport is not None and transport.send(stanza)

    def terminate(self, error: StreamError) -> None:
        """End the session's stream with a stream error."""
        if self.transport is not None:
            self.transport.close(error)

    def hold_input(self) -> None:
        """Stop taking stanzas from the client until as many release_input() calls.

        Backpressure: what the client sent is waiting on something slow (a
        privacy record loading, say), and reading on would pile its stanzas up
        in memory until one had to be refused. The client's TCP window fills
        instead, and it slows down."""
        self._input_holds += 1
        if self._input_holds == 1 and self.transport is not None:
            self.transport.pause_input()

    def release_input(self) -> None:
        """Undo one hold_input()."""
        self._input_holds -= 1
        if self._input_holds == 0 and self.transport is not None:
            self.transport.resume_input()

    @property
    def input_held(self) -> bool:
        return self._input_holds > 0
