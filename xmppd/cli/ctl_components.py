"""xmppctl components: which external components (XEP-0114) are connected, and where.

Asks the nodes running on this machine (their admin API, GET /components).
One line per configured component domain, fields separated by tabs:

    DOMAIN  connected  NODE  SINCE (UTC, ISO 8601)  ADDRESS:PORT
    DOMAIN  connected  NODE  -  -      (on a node of another machine: known from Redis)
    DOMAIN  not-connected

NODE is `-` without a cluster.
"""

from __future__ import annotations

import argparse
import asyncio

from xmppd.cli.ctl import Failure, _load, _report
from xmppd.cli.ctl_sessions import LOCAL, _no_node, _row
from xmppd.cli.nodes import Outcome, node_components
from xmppd.config import Config


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    components = sub.add_parser(
        "components", help="the external components: connected or not, node, since, address"
    )
    components.set_defaults(run=cmd_components)


def cmd_components(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if cfg.components is None:
        raise Failure(f"{cfg.source.name} has no components section")
    for line in asyncio.run(_components(cfg)):
        print(line)
    return 0


async def _components(cfg: Config) -> list[str]:
    outcome = Outcome()
    answers = await node_components(cfg.data_dir, outcome)
    _report(outcome)
    if answers is None:
        _no_node(cfg)
        return []
    # The node a component is connected to knows when and from where; the others
    # (clustered) know only which node has it.
    here = {str(a["domain"]): a for a in answers if a.get("here")}
    elsewhere = {str(a["domain"]): str(a["node"]) for a in answers if a.get("node")}
    lines = []
    assert cfg.components is not None
    for domain in sorted(cfg.components.domains):
        if domain in here:
            a = here[domain]
            row = _row(domain, str(a.get("node") or LOCAL), float(a["since"]), str(a["address"]))  # type: ignore[arg-type]
            name, rest = row.split("\t", 1)
            lines.append(f"{name}\tconnected\t{rest}")
        elif domain in elsewhere:
            lines.append(f"{domain}\tconnected\t{elsewhere[domain]}\t-\t-")
        else:
            lines.append(f"{domain}\tnot-connected")
    return lines
