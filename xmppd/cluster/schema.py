"""What the nodes of a cluster keep in Redis, and the messages they exchange.

One place for key names, the encoding of table entries and events, and the
Lua scripts that change the table, so that the writer, the replica loader
and the reaper cannot disagree about them.

Keys (a deployment owns its Redis database; pick one with the URL's /db):

- `xmppd:sessions:<bare>`: a hash, resource -> entry (JSON: node, priority,
  available, since, address, sid, and when set: presence, the last available
  presence as XML; state, the session's shared module state). The truth
  about where each resource is bound and what other nodes need of it.
- `xmppd:node:<node>:sessions`: a set of the full JIDs a node wrote into the
  hashes, so that its sessions can be removed when it dies.
- `xmppd:node:<node>:alive`: the node's heartbeat, a key with a TTL.
- `xmppd:node:<node>:link`: HOST:PORT where the node takes links from the others
  (xmppd.cluster.link), set with each heartbeat; on Linux followed by
  " local=<kernel and network namespace>/<abstract Unix socket name>" for the
  nodes on the same host.
- `xmppd:link:secret`: the key nodes prove to each other on a link, 32 random bytes
  the first node sets (SET NX), unless the config gives one (cluster.secret).
- `xmppd:nodes`: the set of node names that may still have sessions.
- `xmppd:node:<node>:gone`: set when the node is reaped (for GONE_TTL
  seconds), cleared by its next heartbeat: while it is there, forwards to
  the node are refused.
- `xmppd:inbox:<node>`: a stream, the stanzas (and stream ends) other nodes
  send to sessions on that node, several in one entry when a node sends them
  in a row (xmppd.cluster.writer). It holds only what the node has not handled
  yet: the reader trims what it handled (xmppd.cluster.inbox), and the node
  that reaps a dead node moves what is left into its own inbox.
- `xmppd:waiting:<node>`: a stream, copies of the forwarded stanzas that wait
  in the node's memory behind an account's queued jobs, each deleted when its
  turn came (xmppd.cluster.waiting); a reap moves them with the inbox.
- `xmppd:events`: the pub/sub channel of table changes.
- `xmppd:seqs`: a hash, node -> the sequence number of its last table change
  (see "Order" below).

Order. A node's table changes reach the others through pub/sub, its stanzas
through their inboxes (streams): two channels, so a node could hand a
forwarded stanza to its client before it applied the change the sender made
first (a resource's new presence, or its carbons enabled, before the
broadcast or message that follows it). So each change a node writes carries
a sequence number, its events and `xmppd:seqs` say which one it reached, and
each stanza it forwards carries the number of its last change before it; a
receiving node hands the stanza on only once it applied that change
(xmppd.cluster.sync, `ReplicaSync.caught_up`). The numbers start at the
node's clock in microseconds, so a restarted node's numbers are above its
previous life's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PREFIX = "xmppd:"
EVENTS = PREFIX + "events"
NODES = PREFIX + "nodes"
SEQS = PREFIX + "seqs"
SESSIONS_PREFIX = PREFIX + "sessions:"


def sessions_key(bare: str) -> str:
    return SESSIONS_PREFIX + bare


def node_sessions_key(node: str) -> str:
    return f"{PREFIX}node:{node}:sessions"


def alive_key(node: str) -> str:
    return f"{PREFIX}node:{node}:alive"


def link_key(node: str) -> str:
    return f"{PREFIX}node:{node}:link"


LINK_SECRET = PREFIX + "link:secret"


def gone_key(node: str) -> str:
    return f"{PREFIX}node:{node}:gone"


GONE_TTL = 300
"""Seconds a reaped node's forwards are refused, unless it beats again first: longer
than any replica keeps a reaped node's sessions (the "gone" event, or a reload)."""


RESUMABLE = "sm/resumable"
"""The shared session state key (`Entry.state`) the stream management module sets on a
resumable session: when its node dies, the node that reaps it does not announce it
gone, since its client may resume it elsewhere (XEP-0198: no unavailable while a session
awaits resumption); the stream management timeout does, if nobody resumes it."""


def inbox_key(node: str) -> str:
    return f"{PREFIX}inbox:{node}"


def waiting_key(node: str) -> str:
    """The copies of the forwarded stanzas that wait in `node`'s memory behind an
    account's queued jobs (xmppd.cluster.waiting): a reap moves them with its inbox."""
    return f"{PREFIX}waiting:{node}"


@dataclass(frozen=True, slots=True)
class Entry:
    """Where one resource is bound and what the router and the modules of other nodes
    need to know of it.

    `presence` is the session's last available presence (`ClientSession.presence`)
    serialised, None while it is unavailable: other nodes answer probes and a new
    resource's question about its siblings with it. `state` holds the session's
    shared module state, the `session.state` keys modules declare in
    `Module.shared_state` (JSON values); keys absent are unset. Both are left out of
    the JSON when empty, so an entry without them is what it was before they existed.
    """

    jid: str
    node: str
    priority: int
    available: bool
    # For operators (xmppctl sessions), not for routing: when the session was bound
    # (Unix time) and its client's address. Absent in entries written before them.
    since: float = 0.0
    address: str = ""
    presence: str | None = None
    state: dict[str, Any] = field(default_factory=dict)
    sid: str = ""
    """The session's id on its node: a request to end a session names it, so that a
    newer session bound on the same resource is not ended by a stale request."""

    def fields(self) -> dict[str, Any]:
        """The JSON object stored in the table (and carried by a "set" event)."""
        data: dict[str, Any] = {
            "node": self.node,
            "priority": self.priority,
            "available": self.available,
            "since": self.since,
            "address": self.address,
            "sid": self.sid,
        }
        if self.presence is not None:
            data["presence"] = self.presence
        if self.state:
            data["state"] = self.state
        return data

    def encode(self) -> str:
        return json.dumps(self.fields())

    @classmethod
    def from_fields(cls, jid: str, data: dict[str, Any]) -> Entry:
        presence = data.get("presence")
        state = data.get("state")
        return cls(
            jid,
            str(data["node"]),
            int(data["priority"]),
            bool(data["available"]),
            since=float(data.get("since", 0.0)),
            address=str(data.get("address", "")),
            presence=str(presence) if presence is not None else None,
            state=dict(state) if isinstance(state, dict) else {},
            sid=str(data.get("sid", "")),
        )

    @classmethod
    def decode(cls, jid: str, value: str | bytes) -> Entry:
        return cls.from_fields(jid, json.loads(value))


# --- events on the channel: {"op": "set" | "unbind" | "seq" | "gone", ...} --------------


def set_event(entry: Entry, seq: int) -> str:
    """The new entry whole: a node applies it as it would the table's."""
    return json.dumps({"op": "set", "jid": entry.jid, "seq": seq, **entry.fields()})


def unbind_event(node: str, jid: str, seq: int) -> str:
    return json.dumps({"op": "unbind", "node": node, "jid": jid, "seq": seq})


def seq_event(node: str, seq: int) -> str:
    """A change that did not apply (another node holds the resource now): only its
    number, so that nobody waits for it."""
    return json.dumps({"op": "seq", "node": node, "seq": seq})


def gone_event(node: str) -> str:
    return json.dumps({"op": "gone", "node": node})


# --- scripts: each change of the table and its event in one atomic step ----------------

BIND = """
-- KEYS[1] sessions hash, KEYS[2] node's set, KEYS[3] seqs; ARGV resource, entry, full JID,
-- channel, event, node, seq
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[6], ARGV[7])
redis.call('PUBLISH', ARGV[4], ARGV[5])
if previous then
  local old = cjson.decode(previous)
  return {old['node'], old['sid'] or ''}
end
return false
"""
"""Bind a resource; returns the node and session id that held it before (a conflict to
end), or nil."""

UPDATE = """
-- KEYS[1] sessions hash, KEYS[2] node's set, KEYS[3] seqs; ARGV resource, entry, full JID,
-- node, channel, event, seq, event when it does not apply
local current = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[7])
if (not current) or cjson.decode(current)['node'] == ARGV[4] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return false
end
redis.call('PUBLISH', ARGV[5], ARGV[8])
return cjson.decode(current)['node']
"""
"""Write a local session's entry again (availability, priority; or after Redis lost it),
unless another node has taken the resource since: that one is the newer login, and the
script returns its node (the writer then ends the local session: the request to end it
may never have come, refused while this node was reaped); nil if written."""

UNBIND = """
-- KEYS[1] sessions hash, KEYS[2] node's set, KEYS[3] seqs; ARGV resource, node, full JID,
-- channel, event, seq
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['node'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SREM', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[6])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return false
"""
"""Unbind a resource, unless another node has taken it since (newest login wins)."""

REAP = """
-- KEYS[1] the node's set, KEYS[2] the nodes set, KEYS[3] the node's inbox, KEYS[4] the
-- reaper's inbox, KEYS[5] the node's gone key, KEYS[6] its alive key, KEYS[7] its waiting
-- stream; ARGV node, sessions prefix, channel, event, gone TTL, '1' if a live node is
-- left alone
if ARGV[6] == '1' and redis.call('EXISTS', KEYS[6]) == 1 then return {0, {}} end
local removed = {}
for _, full in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local slash = string.find(full, '/', 1, true)
  local hash = ARGV[2] .. string.sub(full, 1, slash - 1)
  local resource = string.sub(full, slash + 1)
  local current = redis.call('HGET', hash, resource)
  if current and cjson.decode(current)['node'] == ARGV[1] then
    redis.call('HDEL', hash, resource)
    table.insert(removed, full)
    table.insert(removed, current)
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[5], '1', 'EX', ARGV[5])
local moved = 0
for _, key in ipairs({KEYS[7], KEYS[3]}) do
  local unhandled = redis.call('XRANGE', key, '-', '+')
  redis.call('DEL', key)
  for _, entry in ipairs(unhandled) do
    local fields = entry[2]
    table.insert(fields, 'orphan')
    table.insert(fields, ARGV[1])
    redis.call('XADD', KEYS[4], '*', unpack(fields))
  end
  moved = moved + #unhandled
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return {moved, removed}
"""
"""Remove every session of a node (stopped, or its heartbeat expired) and say so; move
what its waiting stream holds (stanzas it read and held in memory behind an
account's queued jobs, xmppd.cluster.waiting), then what its inbox still holds
(forwarded to it, not handled, or handled and not trimmed yet), into the reaper's
inbox, marked 'orphan', to be routed again there (the waiting ones first: most
came before what the inbox still holds). Returns how many entries moved, and the
entries it removed (full JID, entry, ...): the reaper tells their contacts they left.
Only one reaper gets them, however many reap at once (the node's set is gone after).
Another node's reap does nothing if the node's alive key exists: the reaper saw it
expired, but the node (its keep-alive thread) may have set it again since and written
its sessions back, which a reap would remove without the node ever noticing. A node
reaping itself (a clean stop, or its previous process at start) passes '0'.

In one script, so that no forward lands between the two: FORWARD refuses once the
node's gone mark is set."""

FORWARD = """
-- KEYS[1] the target's inbox, KEYS[2] its gone key; ARGV max length, then the entry's
-- fields
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return -1 end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
return 1
"""
"""Add an entry (one stanza or several) to a node's inbox unless that node was reaped:
1 added, 0 the node is gone (the sender routes the entry's stanzas again without it),
-1 the inbox is full (its reader fell that far behind; the sender routes them again
too). A forward after the reap must not recreate an inbox that nobody reads.

Why a "gone" mark and not "is the node listed": Redis restarted empty lists no node
until each beats again, and stanzas that waited for it in the writers' queues would
all be refused; the mark is only ever set by a reap."""

FORWARDED, NODE_GONE, INBOX_FULL = 1, 0, -1
