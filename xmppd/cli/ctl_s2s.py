"""xmppctl s2s: the server-to-server streams of the nodes running on this machine.

Each node reports its own streams through its admin API (GET /s2s); in a
cluster each node opens its own, so the list is per node. One line per
stream, fields separated by tabs, for scripts (`cut -f2`):

    DIRECTION  REMOTE  LOCAL  AUTH  TLS  SINCE  IN  OUT  PEER  NODE  BIDI

DIRECTION is `out` (we opened it, to send) or `in` (the peer did); AUTH is
how the remote side (in) or we (out) authenticated: EXTERNAL, dialback, or
none while not yet; TLS is starttls or direct (XEP-0368); SINCE is when the
connection was made (UTC, ISO 8601); IN and OUT count stanzas; PEER is the
remote address; NODE the node's name in a cluster, else `-`; BIDI is `bidi`
when the stream carries stanzas both ways (XEP-0288), else `-`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime

from xmppd.cli.ctl import Failure, _load, _report
from xmppd.cli.nodes import Outcome, node_s2s


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s2s = sub.add_parser(
        "s2s",
        help="the server-to-server streams: direction, remote domain, authentication, "
        "since, stanzas in and out",
    )
    s2s.add_argument("domain", metavar="DOMAIN", nargs="?", help="only streams with this domain")
    s2s.set_defaults(run=cmd_s2s)


def cmd_s2s(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    outcome = Outcome()
    links = asyncio.run(node_s2s(cfg.data_dir, outcome))
    _report(outcome)
    if links is None:
        raise Failure(f"no node is running on this machine with data_dir {cfg.data_dir}")
    if cfg.s2s is None:
        print("xmppctl: federation is off (the configuration has no s2s section)", file=sys.stderr)
    domain = args.domain.lower() if args.domain else None
    for link in links:
        if domain is None or link["remote"] == domain:
            print(_row(link))
    return 0


def _row(link: dict[str, object]) -> str:
    since = float(link["since"])  # type: ignore[arg-type]
    when = datetime.fromtimestamp(since, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if since else "?"
    fields = [
        link["direction"],
        link["remote"],
        link["local"] or "?",
        link["mechanism"],
        link["tls"],
        when,
        link["stanzas_in"],
        link["stanzas_out"],
        link["peer"],
        link["node"] or "-",
        "bidi" if link.get("bidi") else "-",
    ]
    return "\t".join(str(f) for f in fields)
