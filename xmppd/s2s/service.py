"""Federation for one node: the s2s listeners, the outgoing links, and the router's seam.

`S2SService` is the router's `remote` (xmppd/router.py, `RemoteRoute`): a
stanza to a domain this node does not serve comes here. One link per (our
domain, remote domain) pair carries them: a stream we open (RFC 6120 streams
are one-way), or one the peer opened and made bidirectional (XEP-0288,
`bidi_ready`); while its connection is set up (DNS, TCP, STARTTLS, SASL
EXTERNAL) stanzas wait in its queue, in order, and leave when it is ready.
If it cannot be set up they are answered with <remote-server-timeout/>
(took longer than `s2s.connect_timeout`) or <remote-server-not-found/>
(anything else: no such domain, no route, a certificate that does not
validate, authentication refused). A ready link is reused until it closes
or stays idle for `s2s.idle_timeout`; what its stream took but had not written
when the connection was lost waits for the next one (once, `_take_back`).

Incoming streams authenticate their peer's domain (xmppd/stream/s2s.py
checks every stanza's 'from' against it) and hand stanzas to the router as
if a local component had sent them: no "stanza/out" filters, which are for
local clients.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import dns.exception
from lxml import etree
from OpenSSL import SSL, crypto

from xmppd.jid import parse_jid
from xmppd.s2s.config import S2SConfig
from xmppd.s2s.connection import Outgoing, S2SConnection
from xmppd.s2s.contexts import S2SContexts, make_contexts, pair_digest
from xmppd.s2s.resolve import NoService, Resolver
from xmppd.stream.errors import StanzaError, StreamError
from xmppd.stream.s2s import DialbackRequested, S2SSettings, S2SStream
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger("xmppd.s2s")


class _Served:
    """The domains a peer may address: the node's hosts and its served subdomains,
    read live (a module may serve a subdomain after start)."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def __contains__(self, domain: object) -> bool:
        router = self.server.router
        return domain in router.hosts or domain in router.components


@dataclass(slots=True)
class Link:
    """The outgoing stream from one of our domains to one remote domain."""

    local: str
    remote: str
    queue: deque[Outgoing] = field(default_factory=deque)
    connection: S2SConnection | None = None  # set once ready
    task: asyncio.Future[None] | None = None  # the connection being set up


class S2SService:
    def __init__(self, server: Server, config: S2SConfig) -> None:
        self.server = server
        self.config = config
        self.settings = S2SSettings(
            hosts=_Served(server),
            max_stanza_bytes=config.max_stanza_bytes,
            max_stanza_bytes_unauthenticated=config.max_stanza_bytes_unauthenticated,
            max_depth=server.config.limits.max_xml_depth,
            bidi=config.bidi,
            accept_dialback=config.dialback_from,
        )
        self.resolver = Resolver(config, config.connect_timeout)
        self.links: dict[tuple[str, str], Link] = {}
        self.connections: set[S2SConnection] = set()
        # Incoming connections open now per peer IP address (s2s.max_connections_per_address).
        self.per_address: Counter[str] = Counter()
        self._addresses: dict[S2SConnection, str] = {}
        self.listening: list[tuple[str, int]] = []
        self._servers: list[asyncio.Server] = []
        self._tls: S2SContexts  # set by start()
        # Set once start() made the contexts: the router hands this service stanzas from
        # before that (clients are served already), and their links wait for it.
        self._started = asyncio.Event()
        self._sweep: asyncio.TimerHandle | None = None
        self._stopped = False
        # Outgoing streams that could not be set up, by bounce condition (/metrics).
        self.failures: Counter[str] = Counter()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self, cert: Path, key: Path, dialback_secret: bytes) -> None:
        """Listen; `dialback_secret` is shared by every node of a cluster (any of them
        may be asked to vouch for a key another sent)."""
        # In a thread: the node already serves its clients (xmppd/s2s/contexts.py).
        self._tls = await asyncio.to_thread(make_contexts, self.config, cert, key)
        self._started.set()
        secret = hashlib.sha256(dialback_secret).digest()

        def dialback_key(receiving: str, originating: str, stream_id: str) -> str:
            # XEP-0185: HMAC-SHA256(SHA256(secret), receiving ' ' originating ' ' id)
            message = f"{receiving} {originating} {stream_id}".encode()
            return hmac.new(secret, message, hashlib.sha256).hexdigest()

        self.settings.dialback_key = dialback_key
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            # Plain TCP either way: the connection runs TLS itself (xmppd/s2s/tlsaccept.py),
            # after the balancer's PROXY header if there is one.
            server = await loop.create_server(
                listener.accepting(functools.partial(self._incoming, listener.direct_tls)),
                listener.address,
                listener.port,
                reuse_address=True,
                reuse_port=self.server.reuse_port or None,  # xmppd --workers
            )
            self._servers.append(server)
            for sock in server.sockets:
                address, port = sock.getsockname()[:2]
                self.listening.append((address, port))
                log.info(
                    "listening: s2s %s on %s port %d%s",
                    "direct TLS" if listener.direct_tls else "STARTTLS",
                    address,
                    port,
                    f", PROXY protocol from {', '.join(listener.trusted_proxies)}"
                    if listener.proxy_protocol
                    else "",
                )
        self._schedule_sweep()

    def renewed_contexts(self, cert: Path, key: Path) -> S2SContexts | None:
        """For a reload, in its checking thread (blocking): the contexts for our `cert`
        and `key`, or None when the running ones were made from what those files hold
        now. TLSError if they cannot be made: the reload is refused."""
        if pair_digest(cert, key) == self._tls.made_from:
            return None
        return make_contexts(self.config, cert, key)

    def use_contexts(self, contexts: S2SContexts) -> None:
        """Swap in what `renewed_contexts` made, on the loop. New streams present the new
        certificate; a stream keeps the context its TLS began with (outgoing: the one
        it was opened with, `_open`; incoming: the one its handshake started with,
        `S2SConnection._accept_tls`), so links up before a renewal keep the old one."""
        self._tls = contexts

    async def stop(self) -> None:
        self._stopped = True
        if self._sweep is not None:
            self._sweep.cancel()
        for server in self._servers:
            server.close()
        for link in list(self.links.values()):
            if link.task is not None:
                link.task.cancel()
            self._fail(link, "remote-server-timeout", "the server is shutting down")
        for conn in list(self.connections):
            conn.close(StreamError("system-shutdown", "the server is shutting down"))
        for server in self._servers:
            await server.wait_closed()

    # --- the router's seam (RemoteRoute) ------------------------------------------------

    def route(self, stanza: etree._Element, bounce: bool = True) -> None:
        if self._stopped:  # no new connections while the node stops
            if bounce:
                self.server.router.bounce(
                    stanza, "remote-server-timeout", "the server is shutting down"
                )
            return
        try:
            remote = parse_jid(stanza.get("to") or "").domain
            local = parse_jid(stanza.get("from") or "").domain
        except StanzaError:
            if bounce:
                self.server.router.bounce(stanza, "jid-malformed")
            return
        if local not in self.settings.hosts:
            # Not from one of our domains (no 'from', or relayed): we may not send it.
            if bounce:
                self.server.router.bounce(stanza, "remote-server-not-found")
            return
        link = self.links.get((local, remote))
        if link is None:
            link = self.links[(local, remote)] = Link(local, remote)
        item = Outgoing(stanza, bounce)
        if link.connection is not None and link.connection.send(item):
            return
        if len(link.queue) >= self.config.max_queue:
            if bounce:
                self.server.router.bounce(
                    stanza, "resource-constraint", f"too many stanzas waiting for {remote}"
                )
            return
        link.queue.append(item)
        if link.task is None:
            link.connection = None
            link.task = self.server.router.spawn_shared(self._connect(link))

    async def _connect(self, link: Link) -> None:
        conn: S2SConnection | None = None
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                await self._started.wait()
                problem: Exception = NoService(f"{link.remote}: nowhere to connect")
                # SRV targets in order, each one's addresses in turn (RFC 6120 3.2.1).
                for target in await self.resolver.targets(link.remote):
                    for address in await self.resolver.addresses(target.host):
                        try:
                            conn = await self._open(link, address, target.port, target.direct_tls)
                        except (OSError, ConnectionError) as exc:
                            problem = exc
                            log.info(
                                "s2s: %s at %s port %d: %s", link.remote, address, target.port, exc
                            )
                            continue
                        break
                    if conn is not None:
                        break
                if conn is None:
                    raise problem
        except (TimeoutError, dns.exception.Timeout):
            link.task = None
            self._fail(link, "remote-server-timeout", f"no connection to {link.remote} in time")
            return
        except (NoService, OSError, ConnectionError, dns.exception.DNSException) as exc:
            link.task = None
            self._fail(link, "remote-server-not-found", str(exc) or type(exc).__name__)
            return
        except Exception:
            # A bug must not leave the link with a dead task: nothing would connect it
            # again, and its queue would fill until every stanza to the domain bounced.
            log.exception("s2s: connecting to %s failed", link.remote)
            link.task = None
            self._fail(link, "internal-server-error", "the connection failed")
            return
        link.task = None
        link.connection = conn
        self._send_queue(link, conn)

    async def _open(
        self, link: Link, address: str, port: int, direct_tls: bool = False
    ) -> S2SConnection:
        """One outgoing stream, connected and authenticated; cut if that fails or the
        caller stops waiting (the connect timeout). `direct_tls`: TLS from the first
        byte (XEP-0368), with the remote domain as SNI and ALPN 'xmpp-server'; OpenSSL
        validates the chain in the handshake, the name is checked as after STARTTLS."""
        stream = S2SStream(
            self.settings,
            outgoing=True,
            local=link.local,
            remote=link.remote,
            dialback=self.config.dialback_to(link.remote),
        )
        context = self._tls.for_peer(self.config, link.remote)
        factory = functools.partial(S2SConnection, self, stream, context, direct_tls)
        loop = asyncio.get_running_loop()
        if direct_tls:
            _, conn = await loop.create_connection(
                factory,
                address,
                port,
                ssl=self._tls.for_peer(self.config, link.remote, alpn=True),
                server_hostname=link.remote,
                ssl_handshake_timeout=self.config.connect_timeout,
            )
        else:
            _, conn = await loop.create_connection(factory, address, port)
        try:
            await conn.ready
        except BaseException:
            conn.abort()
            raise
        return conn

    def _send_queue(self, link: Link, conn: S2SConnection) -> None:
        """Send what waited for the link, in order. A stream that closes meanwhile takes
        no more: the rest bounce (never lost without a word, nor counted as sent)."""
        while link.queue:
            item = link.queue.popleft()
            if not conn.send(item) and item.bounce:
                self.server.router.bounce(
                    item.stanza, "remote-server-timeout", f"the stream to {link.remote} closed"
                )

    def _fail(self, link: Link, condition: str, text: str) -> None:
        log.info("s2s: %s -> %s failed: %s: %s", link.local, link.remote, condition, text)
        self.failures[condition] += 1
        if not self._stopped and self._restarting(link.local, link.remote):
            # The peer's bidirectional stream becomes the link at its restart, one round
            # trip away (bidi_ready sends the queue); a peer we cannot reach ourselves is
            # what XEP-0288 is for. If that stream closes first, connection_closed tries
            # again and bounces then; one that never restarts is cut at auth_timeout.
            return
        # A link the peer's bidirectional stream carries meanwhile (bidi_ready) stays:
        # only our own attempt failed; connection_closed drops it with that stream.
        if self.links.get((link.local, link.remote)) is link and link.connection is None:
            del self.links[(link.local, link.remote)]
        while link.queue:
            item = link.queue.popleft()
            if item.bounce:
                self.server.router.bounce(item.stanza, condition, text)

    def _restarting(self, local: str, remote: str) -> bool:
        """Whether an incoming bidirectional stream from `remote` to `local` passed SASL
        and waits for the peer's restart to carry our stanzas (only looked at when an
        attempt of ours failed)."""
        return any(
            not conn.outgoing
            and conn.stream.bidi
            and conn.stream.authenticated
            and not conn.stream.ready
            and conn.stream.authenticated_domain == remote
            and conn.stream.local == local
            for conn in self.connections
        )

    # --- connections --------------------------------------------------------------------

    def _incoming(self, direct_tls: bool, proxied_ip: str | None) -> S2SConnection:
        return S2SConnection(
            self, S2SStream(self.settings), None, direct_tls=direct_tls, proxied_ip=proxied_ip
        )

    def accept_context(self, direct_tls: bool) -> SSL.Context:
        return self._tls.accept[direct_tls]

    def vouches_for(self, domain: str, chain: Sequence[crypto.X509]) -> bool:
        """Incoming: whether the peer's validated `chain` leads to a CA trusted for
        `domain` itself (xmppd/s2s/trust.py)."""
        return self._tls.vouches_for(self.config, domain, chain)

    # --- incoming dialback (XEP-0220) ---------------------------------------------------

    def check_dialback(self, conn: S2SConnection, request: DialbackRequested) -> None:
        """Ask the peer's authoritative server about the key its stream gave us (on a
        stream of its own, in the background, for as long as the peer's stream lasts),
        then let the stream answer."""

        async def check() -> None:
            verdict: bool | None = None
            try:
                async with asyncio.timeout(self.config.connect_timeout):
                    verdict = await self._verify_key(request)
            except (TimeoutError, dns.exception.DNSException, NoService, OSError) as exc:
                log.info("s2s: could not verify %s's dialback key: %s", request.domain, exc)
            log.info(
                "s2s: dialback key of %s (%s): %s",
                request.domain,
                conn.peer,
                {None: "not verified", True: "valid", False: "invalid"}[verdict],
            )
            conn.dialback_checked(request.domain, verdict)

        # Ends with the stream (S2SConnection.connection_lost): a peer that asks and hangs
        # up must not leave us connecting to whatever domain it named.
        conn.dialback_check = self.server.router.spawn(check())

    async def _verify_key(self, request: DialbackRequested) -> bool:
        """db:verify (XEP-0220 2.3) on a new stream to the authoritative server of
        `request.domain`, found like any outgoing connection's (config, SRV, A)."""
        problem: Exception = NoService(f"{request.domain}: nowhere to connect")
        for target in await self.resolver.targets(request.domain):
            for address in await self.resolver.addresses(target.host):
                try:
                    return await self._ask(request, address, target.port, target.direct_tls)
                except (OSError, ConnectionError) as exc:
                    problem = exc
        raise problem

    async def _ask(
        self, request: DialbackRequested, address: str, port: int, direct_tls: bool
    ) -> bool:
        stream = S2SStream(
            self.settings,
            outgoing=True,
            local=request.local,
            remote=request.domain,
            verify=(request.key, request.stream_id),
        )
        context = self._tls.verify
        factory = functools.partial(S2SConnection, self, stream, context, direct_tls)
        loop = asyncio.get_running_loop()
        if direct_tls:
            _, conn = await loop.create_connection(
                factory, address, port, ssl=context, server_hostname=request.domain
            )
        else:
            _, conn = await loop.create_connection(factory, address, port)
        try:
            await conn.ready
        finally:
            conn.close()
        if conn.verdict is None:
            raise ConnectionError(f"{request.domain} did not answer db:verify")
        return conn.verdict

    def connection_opened(self, conn: S2SConnection, address: str) -> bool:
        """Count the connection; False for an incoming one from an address that already
        has `s2s.max_connections_per_address` open (one peer cannot take every socket;
        a peer server needs one or two per domain pair)."""
        if not conn.outgoing:
            limit = self.config.max_connections_per_address
            if limit and self.per_address[address] >= limit:
                log.warning(
                    "s2s: refused an incoming stream from %s: %d streams from that address"
                    " already",
                    conn.peer,
                    limit,
                )
                return False
            self.per_address[address] += 1
            self._addresses[conn] = address
        self.connections.add(conn)
        return True

    def bidi_ready(self, conn: S2SConnection) -> None:
        """An incoming stream the peer made bidirectional (XEP-0288) is authenticated:
        it carries our stanzas to that domain too, unless a stream of ours already does
        (then both stay, each until it closes)."""
        stream = conn.stream
        key = (stream.local or "", stream.authenticated_domain or "")
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = Link(*key)
        if link.connection is None:
            link.connection = conn
            self._send_queue(link, conn)

    def connection_closed(self, conn: S2SConnection, unwritten: list[Outgoing]) -> None:
        """`unwritten`: the stanzas it took and lost with the connection before writing
        them (`S2SConnection._unwritten`), in order."""
        self.connections.discard(conn)
        address = self._addresses.pop(conn, None)
        if address is not None:
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]
        stream = conn.stream
        remote = stream.remote if conn.outgoing else stream.authenticated_domain
        key = (stream.local or "", remote or "")
        link = self.links.get(key)
        if link is not None and link.connection is conn:
            link.connection = None  # the next stanza for that domain sets up a new one
        if unwritten:
            link = self._take_back(key, unwritten)
        if link is not None and link.connection is None and link.task is None:
            if link.queue:
                link.task = self.server.router.spawn_shared(self._connect(link))
            else:
                del self.links[key]

    def _take_back(self, key: tuple[str, str], unwritten: list[Outgoing]) -> Link | None:
        """Stanzas a stream took but never wrote, its connection lost: the remote server
        never saw them. They go back to the front of the link's queue, in order, for its
        next stream, once: one given back before (or lost while the node stops) bounces
        with <remote-server-timeout/>, so a peer that drops every connection as it takes
        a stanza cannot keep it forever. Held already, and at most one loop iteration's
        worth, they go back whatever `s2s.max_queue` says."""
        again: list[Outgoing] = []
        for item in unwritten:
            if not item.requeued and not self._stopped:
                again.append(item._replace(requeued=True))
            elif item.bounce:
                self.server.router.bounce(
                    item.stanza, "remote-server-timeout", f"the stream to {key[1]} was lost"
                )
        if not again:
            return self.links.get(key)
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = Link(*key)
        link.queue.extendleft(reversed(again))
        if link.connection is not None:  # a stream made meanwhile: routed stanzas use it
            self._send_queue(link, link.connection)
        return link

    def received(self, stanza: etree._Element) -> Awaitable[object] | None:
        """A stanza from an authenticated peer, checked by its stream: route it here.
        What its routing still waits for (storage), for the connection to stop reading
        a peer faster than storage (`S2SConnection._wait_for`)."""
        self.server.traffic.received(stanza.tag)
        if stanza.tag == ns.C_MESSAGE and stanza.get("type") != "error":
            self.server.router.ledger.from_remote += 1
        return self.server.router.route(stanza)

    def refused(self, error: etree._Element) -> None:
        """The <bad-request/> for a malformed stanza a peer sent (its stream refused it):
        routed back to the sender like any stanza for its domain."""
        self.server.router.route(error)

    def outgoing(self) -> Iterator[S2SConnection]:
        return (c for c in self.connections if c.outgoing)

    # --- idle streams -------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        delay = min(30.0, self.config.idle_timeout / 2)
        self._sweep = asyncio.get_running_loop().call_later(delay, self._close_idle)

    def _close_idle(self) -> None:
        now = asyncio.get_running_loop().time()
        for conn in list(self.connections):
            if now - conn.last_active > self.config.idle_timeout:
                log.info("s2s: closing the idle stream with %s (%s)", conn.remote, conn.peer)
                conn.close()
        self._schedule_sweep()

