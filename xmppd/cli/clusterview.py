"""xmppctl's view of a cluster, read from its Redis: the nodes and every session.

Redis holds the truth about the cluster (xmppd.cluster.schema), so these
views need no running node on the machine where xmppctl runs, only the
configuration's `cluster.redis_url`. They only read.
"""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from xmppd.cluster import schema
from xmppd.cluster.schema import Entry
from xmppd.cluster.sync import read_table
from xmppd.config import ClusterConfig, redact_url

CONNECT_TIMEOUT = 5.0


class ClusterUnreachable(Exception):
    """Redis did not answer; the message names the URL without its password."""


@dataclass(frozen=True, slots=True)
class NodeRow:
    name: str
    alive: bool  # False: it missed its heartbeats and is about to be reaped
    sessions: int


async def cluster_nodes(config: ClusterConfig) -> list[NodeRow]:
    """Every node in the table, with its session count and whether it still heartbeats."""
    async with _redis(config) as redis:
        try:
            members = await redis.smembers(schema.NODES)
            names = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.exists(schema.alive_key(name))
                    pipe.scard(schema.node_sessions_key(name))
                answers = await pipe.execute()
        except (RedisError, OSError) as e:
            raise _unreachable(config, e) from None
    return [
        NodeRow(name, bool(answers[2 * i]), int(answers[2 * i + 1]))
        for i, name in enumerate(names)
    ]


async def cluster_sessions(config: ClusterConfig, host: str | None) -> list[Entry]:
    """Every bound resource of the cluster (of `host` only if given), by JID."""
    async with _redis(config) as redis:
        try:
            entries = await read_table(redis)
        except (RedisError, OSError) as e:
            raise _unreachable(config, e) from None
    if host is not None:
        entries = [e for e in entries if e.jid.partition("/")[0].rpartition("@")[2] == host]
    return sorted(entries, key=lambda e: e.jid)


def _redis(config: ClusterConfig) -> Redis:
    return Redis.from_url(config.redis_url, socket_connect_timeout=CONNECT_TIMEOUT)


def _unreachable(config: ClusterConfig, e: Exception) -> ClusterUnreachable:
    return ClusterUnreachable(f"cluster: Redis at {redact_url(config.redis_url)}: {e}")
