"""What the router sees of a client session, whatever carries it."""

from __future__ import annotations

from typing import Protocol

from lxml import etree

from xmppd.stream.errors import StreamError


class Session(Protocol):
    """Anything that can take stanzas for one full JID.

    A local c2s stream today; a stream-management session awaiting
    resumption or a session on another cluster node later. The router and
    the modules see only this, so new transports change neither.
    """

    jid: str  # full JID
    bare: str
    resource: str
    host: str
    available: bool  # has sent initial presence (RFC 6121 "available resource")
    priority: int
    presence: etree._Element | None  # last broadcast presence

    def deliver(self, stanza: etree._Element) -> None:
        """Queue a stanza for the client; never blocks."""

    def terminate(self, error: StreamError) -> None:
        """End the session with a stream error (conflict, system-shutdown, ...)."""

    def hold_input(self) -> None:
        """Stop taking stanzas from the client until as many release_input() calls.

        Backpressure: what the client sent is waiting on something slow (a
        privacy record loading, say), and reading on would pile its stanzas up
        in memory until one had to be refused. The client's TCP window fills
        instead, and it slows down."""

    def release_input(self) -> None:
        """Undo one hold_input()."""
