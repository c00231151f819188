"""Run modules with no sockets: the pattern every module test uses.

A `ModuleHarness` is a real router and module host over in-memory stores;
`TestSession` is a real ClientSession whose transport keeps what it is delivered instead of
writing it to a socket. Tests send stanzas as a session would and read what
the modules routed, in microseconds.
"""

from __future__ import annotations

from typing import Any

from lxml import etree

from xmppd.auth.accounts import Accounts
from xmppd.config import Config
from xmppd.modulehost import ModuleHost
from xmppd.router import Router
from xmppd.session import ClientSession
from xmppd.storage.backends.memory import MemoryBlobBackend, MemoryItemBackend
from xmppd.storage.cache import NullCache
from xmppd.storage.factory import Storage
from xmppd.stream.errors import StreamError
from xmppd.xml import ns
from xmppd.xml.parser import StreamParser

STREAM_HEADER = (
    b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>"
)


class RecordingTransport:
    """A Transport that keeps what it is given instead of writing it to a socket."""

    __test__ = False

    def __init__(self) -> None:
        self.received: list[etree._Element] = []
        self.terminated: StreamError | None = None
        self.paused = False
        self.dropped = False

    def send(self, stanza: etree._Element) -> bool:
        self.received.append(stanza)
        return True

    def send_serialized(self, data: bytes) -> None:
        """Kept as elements: the caller parses `data` and calls `send`."""

    def close(self, error: StreamError) -> None:
        self.terminated = error

    def pause_input(self) -> None:
        self.paused = True

    def resume_input(self) -> None:
        self.paused = False

    def drop(self) -> None:
        self.dropped = True


class RecordingRemote:
    """The router's seam for other servers (`Router.remote`: s2s), keeping what goes there."""

    __test__ = False

    def __init__(self) -> None:
        self.routed: list[etree._Element] = []

    def route(self, stanza: etree._Element, bounce: bool = True) -> None:
        self.routed.append(stanza)

    def take(self, to: str) -> list[tuple[str | None, str | None]]:
        """The (from, type) of each presence routed to `to`'s bare JID; forgets everything."""
        routed, self.routed = self.routed, []
        return [
            (s.get("from"), s.get("type"))
            for s in routed
            if s.tag == ns.C_PRESENCE and s.get("to", "").partition("/")[0] == to
        ]


class TestSession(ClientSession):
    """A bound client session whose deliveries land in `received`."""

    __test__ = False  # not a pytest test class

    def __init__(self, jid: str) -> None:
        self.recorder = RecordingTransport()
        super().__init__(jid, self.recorder)

    @property
    def received(self) -> list[etree._Element]:
        return self.recorder.received

    @received.setter
    def received(self, stanzas: list[etree._Element]) -> None:
        self.recorder.received = stanzas

    @property
    def terminated(self) -> StreamError | None:
        return self.recorder.terminated

    @property
    def input_holds(self) -> int:
        """hold_input() calls not yet released."""
        return self._input_holds

    def release_input(self) -> None:
        assert self._input_holds > 0, "released more holds than were taken"
        super().release_input()

    def take(self) -> list[etree._Element]:
        received, self.recorder.received = self.recorder.received, []
        return received


class ModuleHarness:
    def __init__(
        self,
        modules: dict[str, dict[str, Any] | None],
        hosts: list[str] | None = None,
        users: set[str] | None = None,
        storage: Storage | None = None,
    ) -> None:
        """`storage`: another harness's, to run other modules over the same data (a
        restart, a module turned off)."""
        hosts = hosts or ["localhost"]
        self.users = users if users is not None else set()  # bare JIDs that exist
        self.storage = storage or Storage(MemoryItemBackend(), MemoryBlobBackend(), NullCache())
        self.router = Router(hosts, self._user_exists)
        self.host = ModuleHost(self.router, self.storage, hosts)
        self.host.accounts = {
            vhost: Accounts.of(self.storage, vhost) for vhost in hosts
        }
        self.config = Config.model_validate({"hosts": hosts, "modules": modules})

    async def start(self) -> ModuleHarness:
        self.host.load(self.config)
        await self.host.start()
        return self

    async def _user_exists(self, host: str, user: str) -> bool:
        """One of `users`, or an account registered in the host's account store (as on a
        server, where a removed account stops existing the moment it is deleted)."""
        if f"{user}@{host}" in self.users:
            return True
        accounts = self.host.accounts.get(host)
        return accounts is not None and await accounts.exists(user)

    def session(self, jid: str, available: bool = True) -> TestSession:
        session = TestSession(jid)
        session.router = self.router
        self.users.add(session.bare)
        self.router.bind(session)
        session.available = available
        return session

    async def login(self, jid: str, available: bool = True) -> TestSession:
        """A bound session announced to the modules ("session/bound"), as the server does."""
        session = self.session(jid, available)
        await self.host.fire("session/bound", session)
        await self.router.drain()
        return session

    async def end_session(self, session: TestSession) -> None:
        """The connection went away, exactly as the server handles it."""
        self.router.session_ended(session)
        await self.router.drain()

    async def send(self, session: TestSession, xml: str | etree._Element) -> list[etree._Element]:
        """Send a stanza as `session` (from stamped, as the stream does); return its replies."""
        stanza = parse_stanza(xml) if isinstance(xml, str) else xml
        stanza.set("from", session.jid)
        session.receive(stanza)
        await self.router.drain()
        return session.take()

    async def iq(
        self, session: TestSession, type_: str, payload: str, to: str | None = None
    ) -> etree._Element:
        """Send an IQ and return the single reply to it."""
        to_attr = f" to='{to}'" if to else ""
        replies = await self.send(session, f"<iq type='{type_}' id='t1'{to_attr}>{payload}</iq>")
        answers = [r for r in replies if r.tag == ns.C_IQ and r.get("id") == "t1"]
        assert len(answers) == 1, [etree.tostring(r) for r in replies]
        return answers[0]


def without_echo(session: TestSession, stanzas: list[etree._Element]) -> list[etree._Element]:
    """`stanzas` less the echo of `session`'s own broadcast presence, which must be there once.

    Every presence a client broadcasts comes back to it (RFC 6121 4.2.2,
    4.5.2): tests of what else a presence brings check the echo here and
    look at the rest.
    """
    echoes = [
        s
        for s in stanzas
        if s.tag == ns.C_PRESENCE and s.get("from") == session.jid and s.get("to") is None
    ]
    assert len(echoes) == 1, [etree.tostring(s) for s in stanzas]
    return [s for s in stanzas if s is not echoes[0]]


def parse_stanza(xml: str) -> etree._Element:
    """Parse one stanza as the stream parser would (in jabber:client, no xmlns needed)."""
    parser = StreamParser(max_stanza_bytes=1 << 20, max_depth=64)
    events = parser.feed(STREAM_HEADER + xml.encode())
    (stanza,) = [e for e in events if isinstance(e, etree._Element)]
    return stanza
