"""xmppctl reload and log-level: change running nodes without restarting them.

Both ask every node running on this machine with this configuration's
data_dir (the `xmppd --workers` of a cluster included) through its admin
API, and print each node's answer, one block per node:

    reload:     NODE (pid P) at URL: reloaded: changed KEY, KEY...
                NODE (pid P) at URL: reload refused, nothing changed:
                  FILE:LINE: KEY: why
    log-level:  NODE (pid P) at URL: log level LEVEL (was LEVEL) until restart

A cluster's nodes on other machines read their own file: run the command
there too (or send their xmppd SIGHUP). The file is checked here first, so
an invalid one gets the usual configuration errors and no node is asked.
Exit status 1 when a node refused the reload or none answered.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from xmppd.cli.ctl import Failure, _load, _report
from xmppd.cli.nodes import Outcome, post_to_nodes
from xmppd.logs import LEVELS


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    reload = sub.add_parser(
        "reload",
        help="make the running nodes read the configuration file again (as SIGHUP does)",
    )
    reload.set_defaults(run=cmd_reload)

    level = sub.add_parser(
        "log-level", help="change the running nodes' log level until they restart (not saved)"
    )
    level.add_argument("level", metavar="LEVEL", choices=LEVELS, help=", ".join(LEVELS))
    level.set_defaults(run=cmd_log_level)


def cmd_reload(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    outcome = Outcome()
    answers = asyncio.run(post_to_nodes(cfg.data_dir, "/reload", None, outcome))
    _report(outcome)
    _answered(answers, cfg.data_dir)
    refused = 0
    for url, body in answers:
        if body.get("reloaded"):
            print(f"{_who(url, body)}: {body.get('summary')}")
            continue
        refused += 1
        print(f"{_who(url, body)}: reload refused, nothing changed:")
        for problem in body.get("problems", []):
            print(f"  {problem}")
    if refused:
        raise Failure(f"{refused} node(s) refused the reload and kept their configuration")
    return 0


def cmd_log_level(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    outcome = Outcome()
    request = {"level": args.level}
    answers = asyncio.run(post_to_nodes(cfg.data_dir, "/log-level", request, outcome))
    _report(outcome)
    _answered(answers, cfg.data_dir)
    for url, body in answers:
        print(
            f"{_who(url, body)}: log level {body.get('level')} (was {body.get('previous')}) "
            "until restart; the configuration file is unchanged"
        )
    return 0


def _who(url: str, body: dict[str, Any]) -> str:
    return f"{body.get('node') or '-'} (pid {body.get('pid')}) at {url}"


def _answered(answers: list[tuple[str, dict[str, Any]]], data_dir: object) -> None:
    if not answers:
        raise Failure(f"no running node answered on this machine (data_dir {data_dir})")
