"""xmppctl's everyday commands: status, stats, announce, ban/unban, and an account's data.

Each asks the nodes running on this machine through their admin API
(xmppd.adminapi, xmppd.adminroutes) and, where that makes sense, works on
the stores when none runs:

    status              every running node (and the cluster's nodes from Redis);
                        with none, what the stores hold (accounts per host)
    stats               sessions, stanza rates, store and cache latency, measured
                        over a window (--window, default 1 s) on the running nodes
    announce            a headline from the host to each online session of its users
    ban / unban         the ban is written to the account store first, so it holds
                        with no node running; running nodes then end the sessions
    roster, roster-set, roster-remove, vcard, vcard-set, offline-count
                        through a running node when there is one (pushes reach online
                        clients, its caches see the change), else on the stores
                        through the same modules (xmppd.userdata)

Lists are one line per entry, fields separated by tabs, for scripts.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from xmppd.admin import offline_modules
from xmppd.auth.accounts import AccountNotFound, Accounts
from xmppd.cli.clusterview import ClusterUnreachable, cluster_nodes
from xmppd.cli.ctl import LIST_PAGE, Failure, _account_jid, _load, _report, _served_host
from xmppd.cli.nodes import NodeRefused, Outcome, ask_nodes, note_account_change
from xmppd.config import Config
from xmppd.modulehost import ModuleHost
from xmppd.storage.base import StorageError
from xmppd.storage.factory import open_storage
from xmppd.userdata import (
    SUBSCRIPTIONS,
    UserDataError,
    roster_list,
    roster_remove,
    roster_set,
    vcard_get,
    vcard_set,
)
from xmppd.userdata import offline_count as stored_offline_count

T = TypeVar("T")

STATS_WINDOW = 1.0
"""Seconds between the two readings `stats` takes by default."""


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status", help="the running nodes: uptime, version, hosts, storage, sessions"
    )
    status.set_defaults(run=cmd_status)

    stats = sub.add_parser(
        "stats", help="sessions, stanzas per second, store and cache latency of running nodes"
    )
    stats.add_argument(
        "--window", type=float, default=STATS_WINDOW, metavar="SECONDS",
        help=f"measure the rates over this many seconds (default: {STATS_WINDOW:g})",
    )
    stats.set_defaults(run=cmd_stats)

    announce = sub.add_parser(
        "announce", help="send a headline message from HOST to every online user of HOST"
    )
    announce.add_argument("host", metavar="HOST")
    announce.add_argument("message", metavar="MESSAGE")
    announce.add_argument("--subject", metavar="S", help="the message's subject")
    announce.set_defaults(run=cmd_announce)

    ban = sub.add_parser(
        "ban", help="ban an account: its sessions end, its logins are refused; data is kept"
    )
    ban.add_argument("jid", metavar="USER@HOST")
    ban.add_argument("reason", metavar="REASON", nargs="?", help="told to the user")
    ban.set_defaults(run=cmd_ban)

    unban = sub.add_parser("unban", help="lift an account's ban")
    unban.add_argument("jid", metavar="USER@HOST")
    unban.set_defaults(run=cmd_unban)

    roster = sub.add_parser(
        "roster", help="an account's roster: CONTACT SUBSCRIPTION NAME GROUPS FLAGS"
    )
    roster.add_argument("jid", metavar="USER@HOST")
    roster.set_defaults(run=cmd_roster)

    roster_set_ = sub.add_parser(
        "roster-set", help="add a contact to an account's roster, or change one"
    )
    roster_set_.add_argument("jid", metavar="USER@HOST")
    roster_set_.add_argument("contact", metavar="CONTACT")
    roster_set_.add_argument("--name", metavar="N", help='the contact\'s name ("" removes it)')
    roster_set_.add_argument(
        "--group", action="append", metavar="G", dest="groups",
        help="a group (repeat for several; replaces the item's groups)",
    )
    roster_set_.add_argument(
        "--subscription", choices=SUBSCRIPTIONS,
        help="set the subscription state of this roster's item (no presence is sent)",
    )
    roster_set_.set_defaults(run=cmd_roster_set)

    roster_remove_ = sub.add_parser(
        "roster-remove",
        help="remove a contact from an account's roster (subscriptions end both ways)",
    )
    roster_remove_.add_argument("jid", metavar="USER@HOST")
    roster_remove_.add_argument("contact", metavar="CONTACT")
    roster_remove_.set_defaults(run=cmd_roster_remove)

    vcard = sub.add_parser("vcard", help="print an account's vCard (XML)")
    vcard.add_argument("jid", metavar="USER@HOST")
    vcard.set_defaults(run=cmd_vcard)

    vcard_set_ = sub.add_parser(
        "vcard-set", help="replace an account's vCard with FILE (<vCard xmlns='vcard-temp'/>)"
    )
    vcard_set_.add_argument("jid", metavar="USER@HOST")
    vcard_set_.add_argument("file", metavar="FILE", help="- for standard input")
    vcard_set_.set_defaults(run=cmd_vcard_set)

    offline = sub.add_parser("offline-count", help="how many offline messages wait for an account")
    offline.add_argument("jid", metavar="USER@HOST")
    offline.set_defaults(run=cmd_offline_count)


async def _ask(
    cfg: Config,
    method: str,
    path: str,
    outcome: Outcome,
    request: object = None,
    *,
    everywhere: bool = False,
) -> list[tuple[str, dict[str, Any]]] | None:
    """ask_nodes, a node's error being the command's failure."""
    try:
        return await ask_nodes(
            cfg.data_dir, method, path, outcome, request, everywhere=everywhere
        )
    except NodeRefused as e:
        _report(outcome)
        raise Failure(str(e)) from None


# --------------------------------------------------------------------------- status


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    for line in asyncio.run(_status(cfg)):
        print(line)
    return 0


async def _status(cfg: Config) -> list[str]:
    outcome = Outcome()
    answers = await _ask(cfg, "GET", "/status", outcome, everywhere=True)
    _report(outcome)
    lines: list[str] = []
    for url, status in answers or []:
        node = f", cluster node {status['node']}" if status.get("node") else ""
        lines += [
            f"node {url} (pid {status.get('pid')}{node})",
            f"  version   {status.get('version')}",
            f"  uptime    {_duration(float(status.get('uptime', 0)))}",
            f"  hosts     {', '.join(status.get('hosts', []))}",
            f"  storage   {'; '.join(status.get('storage', []))}",
            f"  sessions  {status.get('sessions')} ({status.get('connections')} connections)",
        ]
    if cfg.cluster is not None:
        lines += await _cluster_lines(cfg)
    if answers is None:
        lines.append(f"no node is running on this machine with data_dir {cfg.data_dir}")
        lines += await _stored_accounts(cfg)
    return lines


async def _cluster_lines(cfg: Config) -> list[str]:
    """The cluster's nodes as Redis knows them (also those on other machines)."""
    assert cfg.cluster is not None
    try:
        rows = await cluster_nodes(cfg.cluster)
    except ClusterUnreachable as e:
        print(f"xmppctl: warning: {e}", file=sys.stderr)
        return []
    lines = [f"cluster: {len(rows)} node(s), {sum(r.sessions for r in rows)} session(s)"]
    lines += [
        f"  {row.name}\t{row.sessions} session(s)\t{'alive' if row.alive else 'no-heartbeat'}"
        for row in rows
    ]
    return lines


async def _stored_accounts(cfg: Config) -> list[str]:
    """What the stores hold, when no node runs: the accounts of each host. The stores
    not opening is the one failure of `status`."""
    try:
        storage = await open_storage(cfg.storage, cfg.data_dir)
    except (StorageError, OSError) as e:
        raise Failure(
            f"no node is running on this machine with data_dir {cfg.data_dir}, "
            f"and the stores cannot be opened: {e}"
        ) from None
    lines = ["stores: " + "; ".join(storage.describe())]
    try:
        for host in cfg.hosts:
            accounts = Accounts.of(storage, host, cfg.auth.scram_iterations)
            count, token = 0, None
            while True:
                names, token = await accounts.list(token, LIST_PAGE)
                count += len(names)
                if token is None:
                    break
            lines.append(f"  {host}\t{count} account(s)")
    finally:
        await storage.close()
    return lines


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"


# --------------------------------------------------------------------------- stats


def cmd_stats(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    if not 0.1 <= args.window <= 60:
        raise Failure("--window must be between 0.1 and 60 seconds")
    for line in asyncio.run(_stats(cfg, args.window)):
        print(line)
    return 0


async def _stats(cfg: Config, window: float) -> list[str]:
    outcome = Outcome()
    first = await _ask(cfg, "GET", "/stats", outcome, everywhere=True)
    if first is not None:
        await asyncio.sleep(window)
        second = await _ask(cfg, "GET", "/stats", outcome, everywhere=True)
    _report(outcome)
    if first is None:
        raise Failure(
            f"no node is running on this machine with data_dir {cfg.data_dir}: "
            "stats come from the running nodes"
        )
    before = dict(first)
    lines: list[str] = []
    for url, now in second or []:
        then = before.get(url)
        if then is None or then.get("pid") != now.get("pid"):
            continue  # it started in between
        lines += _node_stats(url, then, now)
    if not lines:
        raise Failure("no node answered the second reading: run stats again")
    if cfg.cluster is not None:
        lines += await _cluster_lines(cfg)
    return lines


def _node_stats(url: str, then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    elapsed = max(float(now["clock"]) - float(then["clock"]), 1e-6)

    def rate(key: str) -> str:
        return f"{(int(now[key]) - int(then[key])) / elapsed:.1f}/s"

    lines = [
        f"node {url} (pid {now.get('pid')})",
        f"  sessions  {now['sessions']} ({now['connections']} connections)",
        f"  stanzas   {rate('stanzas')} routed, {rate('messages')} messages from clients "
        f"(over the last {elapsed:.1f} s)",
    ]
    for part, label in (("items", "items"), ("blobs", "blobs"), ("cache", "cache")):
        a, b = then["storage"][part], now["storage"][part]
        calls = int(b["calls"]) - int(a["calls"])
        in_window = (
            f"{(float(b['seconds']) - float(a['seconds'])) / calls * 1000:.2f} ms mean "
            f"over {calls} call(s) in the window"
            if calls
            else "no call in the window"
        )
        overall = (
            f"{float(b['seconds']) / int(b['calls']) * 1000:.2f} ms mean since start"
            if int(b["calls"])
            else "no call since start"
        )
        lines.append(f"  {label:<8}  {in_window}; {overall}, {b['errors']} error(s)")
    return lines


# --------------------------------------------------------------------------- announce


def cmd_announce(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    host = _served_host(cfg, args.host)
    if not args.message.strip():
        raise Failure("the message is empty")
    request = {"host": host, "body": args.message, "subject": args.subject}
    outcome = Outcome()
    try:
        # A cluster node reaches every node's sessions; else each node its own.
        answers = asyncio.run(
            ask_nodes(
                cfg.data_dir, "POST", "/announce", outcome, request,
                everywhere=cfg.cluster is None,
            )
        )
    except NodeRefused as e:
        raise Failure(str(e)) from None
    finally:
        _report(outcome)
    if answers is None:
        if outcome.warnings:
            raise Failure("no running node answered: nothing was sent")
        print(f"no node is running on this machine with data_dir {cfg.data_dir}: "
              "nobody is online, nothing was sent")
        return 0
    for url, body in answers:
        print(f"sent to {body.get('sent', 0)} session(s) through the node at {url}")
    return 0


# --------------------------------------------------------------------------- ban


def cmd_ban(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    user, host = _account_jid(cfg, args.jid)
    asyncio.run(_ban(cfg, user, host, args.reason or ""))
    return 0


async def _ban(cfg: Config, user: str, host: str, reason: str) -> None:
    """The ban goes into the account store first (every node reads it at each login,
    and it outlives restarts), then the running nodes end the account's sessions."""
    jid = f"{user}@{host}"
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        await Accounts.of(storage, host, cfg.auth.scram_iterations).ban(user, reason)
    except AccountNotFound:
        raise Failure(f"{jid} does not exist") from None
    except ValueError as e:
        raise Failure(f"{jid} not banned: {e}") from None
    finally:
        await storage.close()
    print(f"banned {jid}" + (f" ({reason})" if reason else ""))
    outcome = Outcome()
    try:
        answers = await ask_nodes(
            cfg.data_dir, "POST", f"/accounts/{quote(jid, safe='@')}/ban", outcome,
            {"reason": reason}, everywhere=True,
        )
    except NodeRefused as e:
        _report(outcome)
        raise Failure(f"the ban is stored, but its sessions may go on: {e}") from None
    for url, body in answers or []:
        outcome.done.append(f"ended {body.get('ended', 0)} session(s) on the node at {url}")
    if answers is None and cfg.cluster is not None:
        outcome.warnings.append(
            "no node of the cluster was reached from this machine: sessions of "
            f"{jid} on other machines go on (its next login is refused); run ban "
            "where a node runs to end them"
        )
    _report(outcome)


def cmd_unban(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    user, host = _account_jid(cfg, args.jid)
    asyncio.run(_unban(cfg, user, host))
    print(f"unbanned {user}@{host}")
    _report(asyncio.run(note_account_change(cfg.data_dir, f"{user}@{host}", "unbanned")))
    return 0


async def _unban(cfg: Config, user: str, host: str) -> None:
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        lifted = await Accounts.of(storage, host, cfg.auth.scram_iterations).unban(user)
    except AccountNotFound:
        raise Failure(f"{user}@{host} does not exist") from None
    finally:
        await storage.close()
    if not lifted:
        raise Failure(f"{user}@{host} is not banned")


# --------------------------------------------------------------------------- user data


async def _user_data(
    cfg: Config,
    method: str,
    path: str,
    request: object,
    key: str,
    on_stores: Callable[[ModuleHost], Awaitable[T]],
) -> T:
    """The answer's `key` of a running node, asked `method path`; with none running,
    what `on_stores` gives on this process's own modules over the stores."""
    outcome = Outcome()
    try:
        answers = await ask_nodes(cfg.data_dir, method, path, outcome, request)
    except NodeRefused as e:
        raise Failure(str(e)) from None
    finally:
        _report(outcome)
    if answers is not None:
        result: T = answers[0][1][key]
        return result
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        async with offline_modules(cfg, storage) as modules:
            return await on_stores(modules)
    except UserDataError as e:
        raise Failure(str(e)) from None
    finally:
        await storage.close()


def _account_path(cfg: Config, text: str) -> tuple[str, str]:
    """(bare JID, its API path /accounts/{jid}) of an account of a served host."""
    user, host = _account_jid(cfg, text)
    bare = f"{user}@{host}"
    return bare, f"/accounts/{quote(bare, safe='@')}"


def _item_row(item: dict[str, Any]) -> str:
    flags = [flag for flag in ("ask", "pending_in", "approved") if item.get(flag)]
    return "\t".join(
        (
            str(item["jid"]),
            str(item["subscription"]),
            item.get("name") or "-",
            ",".join(item.get("groups") or []) or "-",
            ",".join(f.replace("_", "-") for f in flags) or "-",
        )
    )


def cmd_roster(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    bare, path = _account_path(cfg, args.jid)
    items: list[dict[str, Any]] = asyncio.run(
        _user_data(cfg, "GET", path + "/roster", None, "items",
                   lambda modules: roster_list(modules, bare))
    )
    for item in items:
        print(_item_row(item))
    return 0


def cmd_roster_set(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    bare, path = _account_path(cfg, args.jid)
    request: dict[str, Any] = {}
    if args.name is not None:
        request["name"] = args.name
    if args.groups is not None:
        request["groups"] = args.groups
    if args.subscription is not None:
        request["subscription"] = args.subscription
    item: dict[str, Any] = asyncio.run(
        _user_data(
            cfg, "PUT", f"{path}/roster/{quote(args.contact, safe='@')}", request, "item",
            lambda modules: roster_set(
                modules, bare, args.contact, args.name, args.groups, args.subscription
            ),
        )
    )
    print(_item_row(item))
    return 0


def cmd_roster_remove(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    bare, path = _account_path(cfg, args.jid)

    async def on_stores(modules: ModuleHost) -> str:
        await roster_remove(modules, bare, args.contact)
        return str(args.contact)

    removed = asyncio.run(
        _user_data(
            cfg, "DELETE", f"{path}/roster/{quote(args.contact, safe='@')}", None, "removed",
            on_stores,
        )
    )
    print(f"removed {removed} from the roster of {bare}")
    return 0


def cmd_vcard(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    bare, path = _account_path(cfg, args.jid)
    xml: str | None = asyncio.run(
        _user_data(cfg, "GET", path + "/vcard", None, "vcard",
                   lambda modules: vcard_get(modules, bare))
    )
    if xml is None:
        raise Failure(f"{bare} has no vCard")
    print(xml)
    return 0


def cmd_vcard_set(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    bare, path = _account_path(cfg, args.jid)
    try:
        xml = sys.stdin.read() if args.file == "-" else Path(args.file).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise Failure(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None

    async def on_stores(modules: ModuleHost) -> bool:
        await vcard_set(modules, bare, xml)
        return True

    asyncio.run(_user_data(cfg, "PUT", path + "/vcard", {"vcard": xml}, "stored", on_stores))
    print(f"stored the vCard of {bare}")
    return 0


def cmd_offline_count(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    bare, path = _account_path(cfg, args.jid)
    count: int = asyncio.run(
        _user_data(cfg, "GET", path + "/offline", None, "count",
                   lambda modules: stored_offline_count(modules, bare))
    )
    print(count)
    return 0
