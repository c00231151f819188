"""What the nodes of a cluster keep in Redis, and the messages they exchange.

One place for key names, the encoding of table entries and events, and the
Lua scripts that change the table, so that the writer, the replica loader
and the reaper cannot disagree about them.

Keys (a deployment owns its Redis database; pick one with the URL's /db):

- `xmppd:sessions:<bare>`: a hash, resource -> entry (JSON: node, priority,
  available, and when set: presence, the last available presence as XML;
  state, the session's shared module state). The truth about where each
  resource is bound and what other nodes need of it.
- `xmppd:node:<node>:sessions`: a set of the full JIDs a node wrote into the
  hashes, so that its sessions can be removed when it dies.
- `xmppd:node:<node>:alive`: the node's heartbeat, a key with a TTL.
- `xmppd:nodes`: the set of node names that may still have sessions.
- `xmppd:inbox:<node>`: a stream, the stanzas (and stream ends) other nodes
  send to sessions on that node.
- `xmppd:events`: the pub/sub channel of table changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

PREFIX = "xmppd:"
EVENTS = PREFIX + "events"
NODES = PREFIX + "nodes"
SESSIONS_PREFIX = PREFIX + "sessions:"


def sessions_key(bare: str) -> str:
    return SESSIONS_PREFIX + bare


def node_sessions_key(node: str) -> str:
    return f"{PREFIX}node:{node}:sessions"


def alive_key(node: str) -> str:
    return f"{PREFIX}node:{node}:alive"


def inbox_key(node: str) -> str:
    return f"{PREFIX}inbox:{node}"


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
    presence: str | None = None
    state: dict[str, Any] = field(default_factory=dict)

    def fields(self) -> dict[str, Any]:
        """The JSON object stored in the table (and carried by a "set" event)."""
        data: dict[str, Any] = {
            "node": self.node, "priority": self.priority, "available": self.available
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
            str(presence) if presence is not None else None,
            dict(state) if isinstance(state, dict) else {},
        )

    @classmethod
    def decode(cls, jid: str, value: str | bytes) -> Entry:
        return cls.from_fields(jid, json.loads(value))


# --- events on the channel: {"op": "set" | "unbind" | "gone", ...} ----------------------


def set_event(entry: Entry) -> str:
    """The new entry whole: a node applies it as it would the table's."""
    return json.dumps({"op": "set", "jid": entry.jid, **entry.fields()})


def unbind_event(node: str, jid: str) -> str:
    return json.dumps({"op": "unbind", "node": node, "jid": jid})


def gone_event(node: str) -> str:
    return json.dumps({"op": "gone", "node": node})


# --- scripts: each change of the table and its event in one atomic step ----------------

BIND = """
-- KEYS[1] sessions hash, KEYS[2] node's set; ARGV resource, entry, full JID, channel, event
local previous = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
if previous then return cjson.decode(previous)['node'] end
return false
"""
"""Bind a resource; returns the node that held it before (a conflict to end), or nil."""

UPDATE = """
-- KEYS[1] sessions hash, KEYS[2] node's set; ARGV resource, entry, full JID, node, channel,
-- event
local current = redis.call('HGET', KEYS[1], ARGV[1])
if (not current) or cjson.decode(current)['node'] == ARGV[4] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SADD', KEYS[2], ARGV[3])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return false
"""
"""Write a local session's entry again (availability, priority; or after Redis lost it),
unless another node has taken the resource since: that one is the newer login."""

UNBIND = """
-- KEYS[1] sessions hash, KEYS[2] node's set; ARGV resource, node, full JID, channel, event
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current)['node'] == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SREM', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return false
"""
"""Unbind a resource, unless another node has taken it since (newest login wins)."""

REAP = """
-- KEYS[1] the node's set, KEYS[2] the nodes set; ARGV node, sessions prefix, channel, event
for _, full in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local slash = string.find(full, '/', 1, true)
  local hash = ARGV[2] .. string.sub(full, 1, slash - 1)
  local resource = string.sub(full, slash + 1)
  local current = redis.call('HGET', hash, resource)
  if current and cjson.decode(current)['node'] == ARGV[1] then
    redis.call('HDEL', hash, resource)
  end
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return false
"""
"""Remove every session of a node (stopped, or its heartbeat expired) and say so."""
