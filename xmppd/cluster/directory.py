"""The session directory of a cluster node: its own sessions and a replica of everyone else's.

`ClusterDirectory` answers the router from memory, with no network round
trip: local sessions are the node's real `ClientSession`s (a
`LocalDirectory` inside); a session bound on another node is a
`ClientSession` whose transport is a `RemoteTransport`, which forwards
stanzas to that node. So the router and the modules deliver to a remote
resource exactly as to a local one, and need no change.

Every change to the local sessions (bind, unbind, availability, priority,
last presence, shared module state) goes to the `Outbox` (written to Redis
and published, in order; xmppd.cluster.writer); the replica of the other
nodes' sessions is changed only by what comes back from Redis
(xmppd.cluster.sync): the table loaded at start and after a reconnect, then
the events.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from time import monotonic
from types import MappingProxyType
from typing import Protocol

from lxml import etree

from xmppd.cluster.schema import Entry
from xmppd.directory import LocalDirectory
from xmppd.session import ClientSession
from xmppd.stream.errors import StreamError
from xmppd.xml.fragments import parse as parse_fragment

log = logging.getLogger(__name__)

HOLD = 1.0
"""Seconds a replica session whose node refused a forward to it counts as gone."""

LOAD_SLICE = 1000
"""Table entries (or accounts of the replica checked) per turn of the event loop
while a load replays the table: in one call, 100,000 sessions of other nodes
held the loop for 0.2 s (unchanged) to 1.3 s (new)."""


class Outbox(Protocol):
    """What the directory asks to be written to Redis or sent to other nodes (never waits)."""

    def bound(self, session: ClientSession, entry: Entry, known_owner: str | None) -> None:
        """A local bind (`entry.sid` names the new session); `known_owner`: the node the
        replica had on that resource (ended already), so that a conflict Redis reports
        with that node is not ended twice."""

    def updated(self, session: ClientSession, entry: Entry) -> None:
        """A local session's entry changed (availability, priority, presence, state)."""

    def unbound(self, session: ClientSession) -> None: ...

    def forward(self, node: str, jid: str, stanza: etree._Element) -> bool:
        """Send `stanza` to the session `jid` on `node`; False if it cannot be taken."""

    def terminate(self, node: str, jid: str, sid: str, error: StreamError) -> None:
        """Ask `node` to end the stream of its session `sid` on `jid` with `error` (not
        a newer session bound there since)."""


class RemoteTransport:
    """The transport of a session bound on another node: stanzas go to that node's inbox.

    `send` returns False once the replica has dropped the session (its node
    unbound it, stopped or died), so the router falls back (offline storage
    for a message) instead of sending into the void.

    `sid` is the session's id on its node (Entry.sid): a request to end it names
    it. `presence` is the serialised presence the replica session's `presence`
    was parsed from: an entry that changed something else is not parsed again."""

    __slots__ = ("outbox", "node", "jid", "sid", "gone", "presence")

    def __init__(self, outbox: Outbox, node: str, jid: str, sid: str) -> None:
        self.outbox = outbox
        self.node = node
        self.jid = jid
        self.sid = sid
        self.gone = False
        self.presence: str | None = None

    def send(self, stanza: etree._Element) -> bool:
        if self.gone:
            return False
        return self.outbox.forward(self.node, self.jid, stanza)

    def send_serialized(self, data: bytes) -> None:
        """A node forwards what it got from another only to its own sessions."""

    def close(self, error: StreamError) -> None:
        # Also once gone: the router ends the session a new bind replaced after the
        # replica dropped it; the node checks it still has that session.
        self.outbox.terminate(self.node, self.jid, self.sid, error)

    def pause_input(self) -> None:
        """Its client's input is its own node's to pause."""

    def resume_input(self) -> None:
        """Its client's input is its own node's to resume."""

    def drop(self) -> None:
        """Its client's connection is its own node's to cut."""


def node_of(session: ClientSession) -> str | None:
    """The node a replica session is bound on; None for a local session."""
    transport = session.transport
    return transport.node if isinstance(transport, RemoteTransport) else None


class ClusterDirectory:
    """A `SessionDirectory` over the whole cluster, answered from memory.

    `count()` is this node's sessions (what /status and the metrics report
    per node); the other questions are about the whole cluster, except while
    cut off (`cut`): Redis has not answered for cluster.forward_wait, so
    nothing reaches the other nodes' sessions, and they count as gone (a
    message goes to this node's resources or offline storage, a request gets
    an error) instead of each stanza waiting in turn.

    A replica session whose node refused a forward (`hold`: Redis answered
    with an error, its inbox was full) counts as gone the same way, alone,
    for HOLD seconds: the stanza refused is routed again without it, and so
    is whatever comes for it meanwhile, at no cost to Redis. After that the
    next stanza tries again: one refused forward per HOLD, not a loop, while
    Redis refuses. Checked on lookup, with nothing to do while nothing is held.
    """

    def __init__(self, node: str, outbox: Outbox) -> None:
        self.node = node
        self.outbox = outbox
        self.local = LocalDirectory()
        # Other nodes' sessions: bare -> resource -> replica session.
        self._remote: dict[str, dict[str, ClientSession]] = {}
        # What was last written for each local session (its id, Entry.sid, included).
        self._written: dict[ClientSession, Entry] = {}
        self._cut_off = False
        # Replica sessions whose node refused a forward -> when they count again.
        self._held: dict[ClientSession, float] = {}

    # --- SessionDirectory --------------------------------------------------------------

    def get(self, bare: str, resource: str) -> ClientSession | None:
        session = self.local.get(bare, resource)
        if session is not None or self._cut_off:
            return session
        resources = self._remote.get(bare)
        if resources is None:
            return None
        session = resources.get(resource)
        if session is not None and self._held and self._is_held(session):
            return None
        return session

    def resources(self, bare: str) -> list[ClientSession]:
        found = self.local.resources(bare)
        remote = self._remote.get(bare) if not self._cut_off else None
        if remote:
            taken = {s.resource for s in found}
            held = self._held
            found.extend(
                s for r, s in remote.items()
                if r not in taken and not (held and self._is_held(s))
            )
        return found

    def available(self, bare: str) -> list[ClientSession]:
        return [s for s in self.resources(bare) if s.available]

    def has(self, bare: str) -> bool:
        return self.local.has(bare) or (bare in self._remote and not self._cut_off)

    def add(self, session: ClientSession) -> ClientSession | None:
        """Bind a local session. The session it replaces may be on another node: the
        router ends it with <conflict/> through its RemoteTransport."""
        replaced = self.local.add(session)
        remote = self._drop_remote(session.bare, session.resource)
        entry = self._written[session] = Entry(
            session.jid,
            self.node,
            session.priority,
            session.available,
            since=session.since,
            address=session.address,
            presence=_xml(session.presence),
            sid=secrets.token_hex(8),
        )
        self.outbox.bound(session, entry, node_of(remote) if remote is not None else None)
        return replaced if replaced is not None else remote

    def remove(self, session: ClientSession) -> bool:
        if not self.local.remove(session):
            return False
        del self._written[session]
        self.outbox.unbound(session)
        return True

    def count(self) -> int:
        return self.local.count()

    def accounts(self) -> Iterator[str]:
        if self._cut_off:
            return self.local.accounts()
        return iter(set(self.local.accounts()) | set(self._remote))

    def remote_count(self) -> int:
        """Sessions of other nodes in the replica (read at scrape time: /metrics)."""
        return sum(len(resources) for resources in self._remote.values())

    def cut(self, cut_off: bool) -> None:
        """Redis has not answered for cluster.forward_wait (True), or answers again."""
        self._cut_off = cut_off

    def hold(self, node: str, jid: str) -> None:
        """`node` refused a forward to its session `jid`: that session counts as gone
        for HOLD seconds (see the class). Nothing if the replica has the resource on
        another node or not at all."""
        bare, _, resource = jid.partition("/")
        session = self._remote.get(bare, {}).get(resource)
        if session is not None and node_of(session) == node:
            self._held[session] = monotonic() + HOLD

    def _is_held(self, session: ClientSession) -> bool:
        until = self._held.get(session)
        if until is None:
            return False
        if monotonic() < until:
            return True
        del self._held[session]
        return False

    # --- local changes the router reports ----------------------------------------------

    def presence_changed(self, session: ClientSession) -> None:
        """The router set a local session's availability, priority and last presence: the
        other nodes need them to pick resources and answer probes; only a change is
        written."""
        written = self._written.get(session)
        if written is None:
            return
        self._write(
            session,
            replace(
                written,
                priority=session.priority,
                available=session.available,
                presence=_xml(session.presence),
            ),
        )

    def state_changed(self, session: ClientSession, key: str) -> None:
        """A module set (or removed) a shared key of a local session's state: written
        with the entry, so the other nodes' replica of the session has it too."""
        written = self._written.get(session)
        if written is None:
            return  # not bound (yet, or any more): nobody else may see the session
        state = dict(written.state)
        if key in session.state:
            state[key] = session.state[key]
        else:
            state.pop(key, None)
        self._write(session, replace(written, state=state))

    def _write(self, session: ClientSession, entry: Entry) -> None:
        if entry != self._written[session]:
            self.outbox.updated(session, entry)  # first: it raises for a value not JSON
            self._written[session] = entry

    def taken_elsewhere(self, session: ClientSession) -> None:
        """The table has `session`'s resource on another node (a newer login whose
        request to end this one was lost while this node was reaped): end it, if it is
        still the one bound here."""
        if self.local.get(session.bare, session.resource) is session:
            log.warning("cluster: %s is bound on another node now; ending it here",
                        session.jid)
            session.terminate(
                StreamError("conflict", "replaced by a new connection on this resource")
            )

    def sid_of(self, session: ClientSession) -> str | None:
        """The id of a session bound here; None for any other."""
        entry = self._written.get(session)
        return entry.sid if entry is not None else None

    def local_entries(self) -> list[tuple[ClientSession, Entry]]:
        """Every session bound here and its entry (written again after Redis lost them)."""
        return list(self._written.items())

    @property
    def written(self) -> Mapping[ClientSession, Entry]:
        """Every session bound here and its entry as last written, live and read-only:
        the writer walks it in slices, yielding to the loop between them, and takes each
        session's entry as it is when its turn comes (`Writer._resync`)."""
        return MappingProxyType(self._written)

    # --- the replica: what the other nodes wrote ---------------------------------------

    def apply_set(self, entry: Entry) -> ClientSession | None:
        """Another node bound a resource, or changed its availability or priority: the
        replica session now (None for an entry of this node's)."""
        if entry.node == self.node:
            return None
        bare, _, resource = entry.jid.partition("/")
        resources = self._remote.setdefault(bare, {})
        session = resources.get(resource)
        if session is None or _where(session) != (entry.node, entry.sid):
            if session is not None:
                self._held.pop(session, None)
                _gone(session)
            session = ClientSession(
                entry.jid, RemoteTransport(self.outbox, entry.node, entry.jid, entry.sid)
            )
            resources[resource] = session
        session.available = entry.available
        session.priority = entry.priority
        session.since = entry.since
        session.address = entry.address
        session.state = dict(entry.state)
        transport = session.transport
        assert isinstance(transport, RemoteTransport)
        if entry.presence != transport.presence:
            transport.presence = entry.presence
            session.presence = _parse(entry.presence)
        return session

    def apply_unbind(self, node: str, jid: str) -> None:
        """`node` unbound `jid`; ignored if the replica has it on another node since."""
        bare, _, resource = jid.partition("/")
        session = self._remote.get(bare, {}).get(resource)
        if session is not None and node_of(session) == node:
            self._drop_remote(bare, resource)

    def apply_node_gone(self, node: str) -> None:
        """`node` stopped or died: none of its sessions is bound any more."""
        dropped = [
            (bare, resource)
            for bare, resources in self._remote.items()
            for resource, session in resources.items()
            if node_of(session) == node
        ]
        for bare, resource in dropped:
            self._drop_remote(bare, resource)
        if dropped:
            log.info("cluster: node %s is gone with %d sessions", node, len(dropped))

    async def load(self, table: Sequence[Entry]) -> None:
        """Replace the replica with the table as read from Redis (start, reconnect):
        every entry applied, then every replica session the table does not have
        dropped, LOAD_SLICE at a time with a turn of the event loop between slices
        (the node's clients wait for no more than one slice).

        Why what runs between two slices does no harm:
        - Events: the one task of ReplicaSync applies them and is the one waiting
          here, so none is applied before the load ends; what came meanwhile waits
          in the subscription and is applied after it, in order, as what came while
          the table was read always was (each event carries a resource's whole state).
        - Order with the inboxes: ReplicaSync advances `applied` (xmppd:seqs) only
          once the load returns, so `caught_up` holds a forwarded stanza until the
          whole table is in.
        - Nothing else adds replica sessions. A local bind (`add`) may drop the one
          of its resource, and the table may then put it back (as when the bind
          comes while the table is read): the router prefers the local session, and
          the other node ends its own one on the conflict Redis reports. The drop
          phase looks each account up again, so what went meanwhile is skipped.
        - Readers (the router, the modules, /metrics) see each resource as before
          the load or as the table has it: an entry not applied yet or a session not
          yet dropped is the staleness any replica has while the table is read again
          (xmppd/cluster/sync.py), for a few milliseconds more.
        """
        kept: set[ClientSession] = set()
        for start in range(0, len(table), LOAD_SLICE):
            for entry in table[start : start + LOAD_SLICE]:
                session = self.apply_set(entry)
                if session is not None:
                    kept.add(session)
            await asyncio.sleep(0)
        accounts = list(self._remote)
        for start in range(0, len(accounts), LOAD_SLICE):
            for bare in accounts[start : start + LOAD_SLICE]:
                for resource, session in list(self._remote.get(bare, {}).items()):
                    if session not in kept:
                        self._drop_remote(bare, resource)
            await asyncio.sleep(0)

    def _drop_remote(self, bare: str, resource: str) -> ClientSession | None:
        resources = self._remote.get(bare)
        if resources is None:
            return None
        session = resources.pop(resource, None)
        if not resources:
            del self._remote[bare]
        if session is not None:
            self._held.pop(session, None)
            _gone(session)
        return session


def _where(session: ClientSession) -> tuple[str, str] | None:
    """The node and session id of a replica session."""
    transport = session.transport
    if isinstance(transport, RemoteTransport):
        return transport.node, transport.sid
    return None


def _xml(presence: etree._Element | None) -> str | None:
    return etree.tostring(presence, encoding="unicode") if presence is not None else None




def _parse(presence: str | None) -> etree._Element | None:
    """The presence another node wrote; one that does not parse counts as none (logged)."""
    if presence is None:
        return None
    try:
        return parse_fragment(presence)
    except etree.XMLSyntaxError as exc:
        log.error("cluster: ignored an unparsable presence in the table (%s)", exc)
        return None


def _gone(session: ClientSession) -> None:
    """A replica session left the table: what still holds it gets False from deliver."""
    transport = session.transport
    if isinstance(transport, RemoteTransport):
        transport.gone = True
