"""External components for one node: the listener, the connected components, the routes.

Each configured component domain is served by the router from start
(`ModuleHost.serve_domain`, so the parent host's disco#items lists it, as
Prosody lists its components) whether or not the component is connected:

- connected here: the stanza goes down its stream;
- connected to another node of the cluster: forwarded to that node's inbox
  (`Writer.forward`), whose router does the same there;
- not connected: answered with <remote-server-timeout/> of type 'wait', as
  Prosody's mod_component does (RFC 6120 8.3.3.14: a service named by the
  JID's domain that could not be reached; 'wait': it may come back).

Stanzas from a component are routed like those from a server peer: no
"stanza/out" filters (those are for local clients). The stream already
checked that 'from' is in the component's domain.

One connection per domain in the whole cluster: a second one is refused
with <conflict/> and the first keeps the domain (XEP-0114 leaves the
choice to the server). Replacing would let two instances started by
mistake take the domain from each other for ever, and each replacement
loses what was in flight on the replaced stream; refusing costs a
restarted component whose old TCP connection is not yet seen dead one
failed attempt until it is (its reconnect loop retries).

In a cluster, who serves which domain is a Redis hash (`xmppd:components`,
domain -> node) that every node reads at start and after a lost bus
notice, with bus notices for each change; a domain whose node is no longer
live counts as not connected (the node died: the component reconnects
anywhere); a node started again under the name of a killed one first deletes
what that one left (`_forget_previous_life`). Two nodes taking the same
domain at the same instant are not prevented (each checks its own copy):
the later write wins the hash.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from lxml import etree
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.components.config import ComponentsConfig
from xmppd.components.connection import ComponentConnection
from xmppd.jid import parse_jid
from xmppd.router import Routed
from xmppd.stream.component import ComponentSettings
from xmppd.stream.errors import StanzaError, StreamError
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger("xmppd.components")

TABLE = schema.PREFIX + "components"
"""Redis hash: component domain -> the node it is connected to."""
TOPIC = "components"
"""Bus topic: {"domain": d, "node": n} (connected there) or {"domain": d, "node": null}."""
FORGET = """
local gone = {}
local table = redis.call('HGETALL', KEYS[1])
for i = 1, #table, 2 do
  if table[i + 1] == ARGV[1] then
    redis.call('HDEL', KEYS[1], table[i])
    gone[#gone + 1] = table[i]
  end
end
return gone
"""
"""KEYS[1]: TABLE, ARGV[1]: a node. Delete the entries naming that node (in one step: not
one another node wrote since) and return their domains."""


class ComponentService:
    def __init__(self, server: Server, config: ComponentsConfig) -> None:
        self.server = server
        self.config = config
        self.settings = ComponentSettings(
            secret_of=self._secret_of,
            may_serve=self._may_serve,
            max_stanza_bytes=config.max_stanza_bytes,
            max_stanza_bytes_unauthenticated=config.max_stanza_bytes_unauthenticated,
            max_depth=server.config.limits.max_xml_depth,
        )
        self.connections: set[ComponentConnection] = set()  # handshake or not
        self.serving: dict[str, ComponentConnection] = {}  # domain -> its stream here
        self.elsewhere: dict[str, str] = {}  # clustered: domain -> the other node serving it
        self.listening: list[tuple[str, int]] = []
        # Streams refused or ended by us with a stream error, by condition (/metrics).
        self.refusals: Counter[str] = Counter()
        self._servers: list[asyncio.Server] = []
        # One announcement's table write at a time, in the order they were made: a
        # "gone" (read, then delete) interleaved with the next "here" would delete it.
        self._table_writes = asyncio.Lock()

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Serve every configured domain, then listen. Raises ValueError if a module
        already serves one of the domains."""
        modules = self.server.modules
        for domain, entry in self.config.domains.items():
            handler = functools.partial(self._route, domain)
            if entry.disco:
                modules.serve_domain(domain, handler, entry.name)
            else:
                self.server.router.serve_domain(domain, handler)
        cluster = self.server.cluster
        if cluster is not None:
            cluster.bus.subscribe(TOPIC, self._notice, self._lost)
            cluster.on_nodes_changed(self._nodes_changed)
            await self._forget_previous_life()
            await self._load()
        loop = asyncio.get_running_loop()
        for listener in self.config.listeners:
            server = await loop.create_server(
                lambda: ComponentConnection(self), listener.address, listener.port,
                reuse_address=True,
                # The workers of `xmppd --workers` all bind it, as the client ports.
                reuse_port=self.server.reuse_port or None,
            )
            self._servers.append(server)
            for sock in server.sockets:
                address, port = sock.getsockname()[:2]
                self.listening.append((address, port))
                log.info("listening: components (XEP-0114) on %s port %d", address, port)

    async def stop(self) -> None:
        """After the client sessions ended: their unavailable presence reached the
        components first."""
        for server in self._servers:
            server.close()
        # Out of the cluster's table now, while Redis is still there (their
        # connection_lost may come after the cluster stopped).
        served, self.serving = self.serving, {}
        for domain in served:
            log.info("component %s disconnected (the server is shutting down)", domain)
            await self._announce(domain, False)
        for conn in list(self.connections):
            conn.close(StreamError("system-shutdown", "the server is shutting down"))
        for server in self._servers:
            await server.wait_closed()

    # --- the stream's questions ---------------------------------------------------------

    def _secret_of(self, domain: str) -> str | None:
        entry = self.config.domains.get(domain)
        return entry.secret.get_secret_value() if entry is not None else None

    def _may_serve(self, domain: str) -> bool:
        return domain not in self.serving and domain not in self.elsewhere

    # --- connections --------------------------------------------------------------------

    def connection_opened(self, conn: ComponentConnection) -> None:
        self.connections.add(conn)

    def authenticated(self, conn: ComponentConnection) -> None:
        domain = conn.domain
        assert domain is not None
        conn.since = time.time()
        self.serving[domain] = conn
        log.info("component %s connected (%s)", domain, conn.peer)
        self.server.router.spawn(self._announce(domain, True))

    def connection_closed(self, conn: ComponentConnection) -> None:
        self.connections.discard(conn)
        domain = conn.stream.domain
        if domain is not None and self.serving.get(domain) is conn:
            del self.serving[domain]
            log.info("component %s disconnected (%s)", domain, conn.peer)
            self.server.router.spawn(self._announce(domain, False))

    def refused(self, condition: str) -> None:
        self.refusals[condition] += 1

    def received(self, stanza: etree._Element) -> None:
        """A stanza from a component, its 'from' checked by the stream. Its messages
        enter the ledger as a remote server's do: the component answers for them."""
        self.server.traffic.received(stanza.tag)
        if stanza.tag == ns.C_MESSAGE and stanza.get("type") != "error":
            self.server.router.ledger.from_remote += 1
        self.server.router.route(stanza)

    # --- routing to a component -----------------------------------------------------------

    def _route(self, domain: str, routed: Routed) -> None:
        stanza = routed.stanza
        conn = self.serving.get(domain)
        if conn is not None and conn.send(stanza, routed.bounce):
            self.server.traffic.sent(stanza.tag)
            return
        node = self.elsewhere.get(domain)
        cluster = self.server.cluster
        if node is not None and cluster is not None:
            if cluster.writer.forward(node, stanza.get("to", ""), stanza):
                return
        if routed.bounce:
            self.server.router.reply_error(
                stanza, StanzaError("remote-server-timeout", f"{domain} is not connected", "wait")
            )

    def not_written(self, domain: str, stanzas: list[tuple[etree._Element, bool]]) -> None:
        """Stanzas queued for a connection lost before they were written: routed again,
        now that it no longer serves `domain` (bounced, never silently lost)."""
        for stanza, bounce in stanzas:
            self._route(domain, Routed(stanza, parse_jid(stanza.get("to", "")), None, bounce))

    # --- the cluster's table --------------------------------------------------------------

    async def _announce(self, domain: str, up: bool) -> None:
        """Tell the other nodes (a bus notice now) and the table (for nodes that start
        later or lose notices) that `domain` is connected here, or no longer."""
        cluster = self.server.cluster
        if cluster is None:
            return
        node = cluster.node if up else None
        cluster.bus.publish(TOPIC, {"domain": domain, "node": node})
        async with self._table_writes:
            try:
                if node is not None:
                    await cluster.redis.hset(TABLE, domain, node)
                elif await cluster.redis.hget(TABLE, domain) == cluster.node.encode():
                    # Not a newer node's entry (a race the docstring admits).
                    await cluster.redis.hdel(TABLE, domain)
            except (RedisError, OSError) as exc:
                log.error("components: cannot record %s in Redis: %s", domain, exc)

    async def _forget_previous_life(self) -> None:
        """At start nothing is connected here, but a node killed under this name (a
        worker restarted by `--workers`, a container with a fixed hostname) left its
        entries: live again under the name, they would make the other nodes forward
        to this one and refuse the component with <conflict/>. Delete them and tell
        the nodes that kept a copy."""
        cluster = self.server.cluster
        assert cluster is not None
        try:
            gone = await cluster.redis.register_script(FORGET)(keys=[TABLE], args=[cluster.node])
        except (RedisError, OSError) as exc:
            log.error("components: cannot clear this node's old entries in Redis: %s", exc)
            return
        for domain in map(_text, gone):
            log.info("component %s: the entry of this node's previous run removed", domain)
            cluster.bus.publish(TOPIC, {"domain": domain, "node": None})

    def _notice(self, payload: dict[str, Any]) -> None:
        domain, node = payload.get("domain"), payload.get("node")
        if not isinstance(domain, str) or domain not in self.config.domains:
            return
        if isinstance(node, str) and node != self._node():
            self.elsewhere[domain] = node
        else:
            self.elsewhere.pop(domain, None)

    def _lost(self) -> None:
        self.server.router.spawn(self._load())

    async def _load(self) -> None:
        """Read who serves which domain from Redis (at start, after lost notices)."""
        cluster = self.server.cluster
        assert cluster is not None
        try:
            table = await cluster.redis.hgetall(TABLE)
        except (RedisError, OSError) as exc:
            log.error("components: cannot read the component table from Redis: %s", exc)
            return
        live = cluster.nodes
        self.elsewhere = {
            d: n
            for d, n in ((_text(k), _text(v)) for k, v in table.items())
            if d in self.config.domains and n != cluster.node and n in live
        }

    def _nodes_changed(self, nodes: frozenset[str]) -> None:
        self.elsewhere = {d: n for d, n in self.elsewhere.items() if n in nodes}

    def _node(self) -> str | None:
        cluster = self.server.cluster
        return cluster.node if cluster is not None else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
