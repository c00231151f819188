"""xmppctl nodes, sessions and kick: who is connected where, and ending a session.

In a cluster, `nodes` and `sessions` read the cluster's Redis (any machine
with the configuration can run them); `kick` asks a node running on this
machine (its admin API), which ends the session on whichever node holds it.
Without a cluster, all three ask the node(s) running on this machine.

Output is one line per node or session, fields separated by tabs, for
scripts (`cut -f1`):

    nodes:     NAME  SESSIONS  alive|no-heartbeat   (a node without a cluster: its admin URL)
    sessions:  JID  NODE  SINCE (UTC, ISO 8601)  ADDRESS
    kick:      ended JID on NODE
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from slixmpp.jid import JID, InvalidJID

from xmppd.cli.clusterview import ClusterUnreachable, cluster_nodes, cluster_sessions
from xmppd.cli.ctl import Failure, _load, _report, _served_host
from xmppd.cli.nodes import Outcome, kick_on_nodes, node_sessions, node_statuses
from xmppd.config import Config
from xmppd.xml.text import xml_can_carry

LOCAL = "-"
"""The node column of a node outside any cluster (it has no name)."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nodes = sub.add_parser("nodes", help="the running nodes and their session counts")
    nodes.set_defaults(run=cmd_nodes)

    sessions = sub.add_parser(
        "sessions", help="the bound sessions: JID, node, since, client address"
    )
    sessions.add_argument("host", metavar="HOST", nargs="?", help="only this host's sessions")
    sessions.set_defaults(run=cmd_sessions)

    kick = sub.add_parser(
        "kick", help="end a session (USER@HOST/RESOURCE) or all of an account's (USER@HOST)"
    )
    kick.add_argument("jid", metavar="JID")
    kick.add_argument("reason", metavar="REASON", nargs="?", help="told to the client")
    kick.set_defaults(run=cmd_kick)


def cmd_nodes(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for line in asyncio.run(_nodes(cfg)):
        print(line)
    return 0


async def _nodes(cfg: Config) -> list[str]:
    if cfg.cluster is not None:
        try:
            rows = await cluster_nodes(cfg.cluster)
        except ClusterUnreachable as e:
            raise Failure(str(e)) from None
        return [
            f"{row.name}\t{row.sessions}\t{'alive' if row.alive else 'no-heartbeat'}"
            for row in rows
        ]
    outcome = Outcome()
    statuses = await node_statuses(cfg.data_dir, outcome)
    _report(outcome)
    if not statuses:
        _no_node(cfg)
    return [f"{url}\t{status.get('sessions', '?')}\talive" for url, status in statuses]


def cmd_sessions(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    host = _served_host(cfg, args.host) if args.host is not None else None
    for line in asyncio.run(_sessions(cfg, host)):
        print(line)
    return 0


async def _sessions(cfg: Config, host: str | None) -> list[str]:
    if cfg.cluster is not None:
        try:
            entries = await cluster_sessions(cfg.cluster, host)
        except ClusterUnreachable as e:
            raise Failure(str(e)) from None
        return [_row(e.jid, e.node, e.since, e.address) for e in entries]
    outcome = Outcome()
    sessions = await node_sessions(cfg.data_dir, host, outcome)
    _report(outcome)
    if sessions is None:
        _no_node(cfg)
        return []
    return [
        _row(str(s["jid"]), LOCAL, float(s["since"]), str(s["address"]))  # type: ignore[arg-type]
        for s in sorted(sessions, key=lambda s: str(s["jid"]))
    ]


def cmd_kick(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        jid = JID(args.jid)
    except InvalidJID as e:
        raise Failure(f"{args.jid!r} is not a valid JID: {e}") from None
    if not jid.local:
        raise Failure(f"expected USER@HOST or USER@HOST/RESOURCE, got {args.jid!r}")
    _served_host(cfg, str(jid.domain))
    if args.reason and not xml_can_carry(args.reason):
        raise Failure("the reason has characters XML cannot carry")
    outcome = Outcome()
    ended = asyncio.run(
        kick_on_nodes(cfg.data_dir, str(jid), args.reason, cfg.cluster is None, outcome)
    )
    _report(outcome)
    if ended is None:
        raise Failure(
            f"no running node answered on this machine (data_dir {cfg.data_dir}): "
            "run kick where a node of this deployment runs"
        )
    if not ended:
        raise Failure(f"{jid} has no session")
    for session in ended:
        print(f"ended {session['jid']} on {session['node'] or 'this node'}")
    return 0


def _row(jid: str, node: str, since: float, address: str) -> str:
    when = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if since else "?"
    return f"{jid}\t{node}\t{when}\t{address or '?'}"


def _no_node(cfg: Config) -> None:
    print(
        f"xmppctl: no node is running on this machine with data_dir {cfg.data_dir}",
        file=sys.stderr,
    )
