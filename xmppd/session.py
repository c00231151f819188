"""A client session, apart from whatever connection carries it.

The node owns the `ClientSession`: its JID, presence and priority, and a
bag of per-session state that modules keep on it. A `Transport` attaches
to it and detaches from it: a TCP/TLS stream today; a WebSocket, a stream
resumed with stream management, or a link to another cluster node later;
or nothing at all while the session waits to be resumed. The router and
the modules see only the session, so a new transport changes neither.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from lxml import etree

from xmppd.stream.errors import StreamError


class Transport(Protocol):
    """What carries a session's stanzas to its client and back."""

    def send(self, stanza: etree._Element) -> bool:
        """Queue a stanza for the client without blocking; False if it cannot be
        taken any more (the stream is closing), so the router falls back."""

    def send_serialized(self, data: bytes) -> bool | None:
        """Queue a stanza another cluster node serialised (`etree.tostring`, in the
        jabber:client namespace) as it is: a crossing is not parsed and serialised
        again on its way to the client. None: this transport needs the element (it
        keeps it, as stream management does), and the caller parses `data` and uses
        `send`; False as for `send`."""

    def close(self, error: StreamError) -> None:
        """End the client's stream with `error` (conflict, system-shutdown, ...)."""

    def pause_input(self) -> None:
        """Stop reading from the client (its TCP window fills)."""

    def resume_input(self) -> None:
        """Read from the client again."""

    def drop(self) -> None:
        """Cut the connection with no stream end, so the client resumes (XEP-0198)."""


log = logging.getLogger(__name__)

SENDER_WAIT = 15.0
"""Seconds a client's next stanzas wait behind one the router is not done with
(a filter's own wait is at most router.FILTER_WAIT, 10 s; storage work queued
for the recipient has no bound of its own)."""


class SessionRouter(Protocol):
    """What a session needs of the node's router to send its client's stanzas."""

    def route(
        self, stanza: etree._Element, origin: ClientSession | None = None, *, bounce: bool = True
    ) -> Awaitable[object] | None: ...

    def spawn(self, coro: Awaitable[object], account: str | None = None) -> Awaitable[object]: ...

    def refuse_unjudged(self, stanza: etree._Element, origin: ClientSession | None = None) -> None:
        ...


class ClientSession:
    """One bound resource of an account on this node.

    `state` is where modules keep what belongs to the session and must go
    with it (carbons enabled, the active privacy list): keyed by a name the
    module owns, dropped with the session, never shared between sessions.
    On a replica of another cluster node's session it holds only the keys
    modules declared shared (`ModuleHost.share_state`).
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
        "since",
        "address",
        "transport",
        "router",
        "_input_holds",
        "_backlog",
        "_when_idle",
        "keep",
        "__weakref__",
    )

    def __init__(
        self, jid: str, transport: Transport | None = None, router: SessionRouter | None = None
    ) -> None:
        self.jid = jid
        self.bare, _, self.resource = jid.partition("/")
        self.host = self.bare.rpartition("@")[2]
        self.available = False  # has sent initial presence (RFC 6121 "available resource")
        self.priority = 0
        self.presence: etree._Element | None = None  # last broadcast presence
        self.state: dict[str, Any] = {}
        # What operators see of it (xmppctl sessions): when it was bound (Unix time)
        # and its client's address ("" for the server's own and unknown ones).
        self.since = time.time()
        self.address = ""
        self.transport = transport
        self.router = router
        self._input_holds = 0
        # Stanzas from the client waiting behind one the router is not done with.
        self._backlog: deque[etree._Element] | None = None
        self._when_idle: list[Callable[[], None]] = []
        # Stream management sets this: asked when a transport of this session ends
        # (the transport, and whether its stream was closed or the TCP connection just
        # dropped); True keeps the session bound, waiting to be resumed on another one.
        self.keep: Callable[[Transport, bool], bool] | None = None

    def __repr__(self) -> str:
        return f"<ClientSession {self.jid}>"

    # --- from the client: one stanza after the other, through the router -------------------

    def receive(self, stanza: etree._Element) -> None:
        """A stanza from the client: routed now, or after those still in the router.

        The pipeline of Prosody's per-session runner, at no cost in the usual
        case: the router takes the stanza synchronously and returns None. When
        a filter has to wait (a privacy record loading), the router returns
        what to wait for; then the client's next stanzas queue here, in order,
        and its connection is not read (TCP backpressure) until the queue is
        empty again.
        """
        if self._backlog is not None:
            self._backlog.append(stanza)
            return
        try:  # _route, inline: this runs for every stanza a client sends
            pending = self.router.route(stanza, self)  # type: ignore[union-attr]
        except Exception:
            self._failed(stanza)
            return
        if pending is not None:
            assert self.router is not None
            self._backlog = deque()
            self.hold_input()
            # The account's work until its stanzas waiting here are routed.
            self.router.spawn(self._run(pending, stanza), self.bare)

    def _failed(self, stanza: etree._Element) -> None:
        """Routing `stanza` raised (a module's bug): logged, and the client told with
        <internal-server-error/>, straight to this session (the router counts the
        bounce), as for a stanza a filter could not judge; nothing is lost unanswered.
        It costs that stanza, never the client's connection or the ones behind it."""
        log.exception("routing a stanza from %s failed", self.jid)
        assert self.router is not None
        self.router.refuse_unjudged(stanza, self)

    def _route(self, stanza: etree._Element) -> Awaitable[object] | None:
        """Route one stanza of the client's (a module's bug that raises: `_failed`)."""
        assert self.router is not None
        try:
            return self.router.route(stanza, self)
        except Exception:
            self._failed(stanza)
            return None

    async def _run(self, pending: Awaitable[object], stanza: etree._Element) -> None:
        """Route the stanzas queued behind `stanza`, whose routing returned `pending`."""
        assert self._backlog is not None
        waiting: Awaitable[object] | None = pending
        try:
            while waiting is not None:
                try:
                    async with asyncio.timeout(SENDER_WAIT):
                        await asyncio.shield(waiting)
                except TimeoutError:
                    # Stuck storage must not stop this client for good: its next
                    # stanzas go on (each recipient's queue still keeps their order).
                    log.warning("%s: a stanza still waits after %g s", self.jid, SENDER_WAIT)
                except Exception:
                    self._failed(stanza)
                waiting = None
                while self._backlog and waiting is None:
                    stanza = self._backlog.popleft()
                    waiting = self._route(stanza)
        finally:
            self._backlog = None
            self.release_input()
            callbacks, self._when_idle = self._when_idle, []
            for callback in callbacks:
                callback()

    @property
    def busy(self) -> bool:
        """True while stanzas from the client are still on their way through the router."""
        return self._backlog is not None

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` once every stanza the client sent has been routed: now, or
        when the pipeline empties (the session's end must come after its last words)."""
        if self._backlog is None:
            callback()
        else:
            self._when_idle.append(callback)

    # --- to the client --------------------------------------------------------------------

    def deliver(self, stanza: etree._Element) -> bool:
        """Hand a stanza to the transport; False if none can take it now."""
        transport = self.transport
        return transport is not None and transport.send(stanza)

    def deliver_serialized(self, data: bytes) -> bool | None:
        """`deliver` for a stanza another node serialised; None: parse it and `deliver`
        (see Transport.send_serialized)."""
        transport = self.transport
        return False if transport is None else transport.send_serialized(data)

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
