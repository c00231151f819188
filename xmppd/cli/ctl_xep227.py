"""xmppctl import and export: accounts and their data in XEP-0227 files.

`import` reads xmppd's own exports, ejabberd's (`ejabberdctl export_piefxis
DIR`: pass the main file or the folder) and Prosody's (`prosody-migrator` to
its xep227 store: one file per user; pass the folder). Everything is read
and checked first: a file with any problem imports nothing, and the error
lists every problem. Then accounts are created from their SCRAM keys (no
password needed) and their data written; the summary counts, per store,
what was copied, skipped (the account existed) and failed, and names each
failure, so nothing is left half-done without saying so.

`export` writes every account of the served hosts (or those named) to one
file, mode 0600: it holds everyone's salted keys.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from lxml import etree

from xmppd.admin import offline_modules
from xmppd.auth.accounts import Accounts
from xmppd.cli.ctl import Failure, _load, _progress, _served_host
from xmppd.cli.nodes import Outcome, node_records
from xmppd.config import Config
from xmppd.storage.factory import open_storage
from xmppd.xep227 import reader
from xmppd.xep227.stores import Summary, export_user, import_users

LIST_PAGE = 1000


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    importing = sub.add_parser(
        "import", help="import accounts and their data from XEP-0227 files (ejabberd, Prosody)"
    )
    importing.add_argument(
        "paths", nargs="+", metavar="FILE", help="XEP-0227 files, or folders of them"
    )
    importing.add_argument(
        "--max-bytes",
        type=int,
        default=reader.DEFAULT_MAX_BYTES,
        metavar="N",
        help=f"refuse input larger than N bytes in all (default: {reader.DEFAULT_MAX_BYTES})",
    )
    importing.set_defaults(run=cmd_import)

    exporting = sub.add_parser("export", help="export all accounts and their data (XEP-0227)")
    exporting.add_argument("file", metavar="FILE", help="the file to write (mode 0600)")
    exporting.add_argument(
        "--host", action="append", metavar="HOST", help="only this host (repeatable)"
    )
    exporting.set_defaults(run=cmd_export)


def _warn_running(cfg: Config, what: str) -> None:
    """Nodes running on this storage keep a cache the import cannot reach."""
    outcome = Outcome()
    if node_records(cfg.data_dir, outcome):
        outcome.warnings.append(
            f"a node is running on this storage: {what}; restart it afterwards so that "
            "it reads the imported data rather than what it cached"
        )
    for warning in outcome.warnings:
        print(f"xmppctl: warning: {warning}", file=sys.stderr)


def _print_summary(summary: Summary, notes: list[str]) -> None:
    for line in summary.lines():
        print(line)
    for line in notes:
        print(f"note: {line}")
    for line in summary.skips:
        print(f"skipped: {line}")
    for line in summary.failures:
        print(f"xmppctl: failed: {line}", file=sys.stderr)


def cmd_import(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    try:
        data = reader.read([Path(p) for p in args.paths], cfg.hosts, args.max_bytes)
    except reader.BadExport as e:
        raise Failure("nothing was imported:", *e.problems) from None
    _warn_running(cfg, "the import writes the stores directly")
    summary = asyncio.run(_import(cfg, data.users))
    _print_summary(summary, data.notes)
    if summary.failed:
        raise Failure(
            f"{summary.failed} entries failed (listed above); everything else was written"
        )
    return 0


async def _import(cfg: Config, users: list[reader.UserData]) -> Summary:
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        with _progress(len(users), "import", " accounts") as bar:
            return await import_users(cfg, storage, users, bar.update)
    finally:
        await storage.close()


def cmd_export(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    hosts = [_served_host(cfg, h) for h in args.host] if args.host else list(cfg.hosts)
    target = Path(args.file)
    summary = asyncio.run(_export(cfg, hosts, target))
    for line in summary.lines():
        print(line)
    for line in summary.failures:
        print(f"xmppctl: failed: {line}", file=sys.stderr)
    print(f"wrote {target}")
    if summary.failed:
        raise Failure(f"{summary.failed} entries could not be read (listed above)")
    return 0


async def _export(cfg: Config, hosts: list[str], target: Path) -> Summary:
    """Stream the file (a user at a time in memory) to a temporary name, then rename it."""
    summary = Summary()
    partial = target.with_name(f".{target.name}.partial")
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        async with offline_modules(cfg, storage) as modules:
            names = {host: await _names(modules.accounts[host]) for host in hosts}
            # A new file, never one found there: an existing file keeps its mode and
            # owner, and a link leads elsewhere (both would get everyone's keys).
            partial.unlink(missing_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(partial, flags, 0o600)
            with (
                os.fdopen(fd, "wb") as out,
                _progress(sum(map(len, names.values())), "export", " accounts") as bar,
            ):
                with etree.xmlfile(out, encoding="utf-8") as xf:
                    xf.write_declaration()
                    with xf.element(f"{{{reader.PIE}}}server-data", nsmap={None: reader.PIE}):
                        for host in hosts:
                            with xf.element(f"{{{reader.PIE}}}host", jid=host):
                                for name in names[host]:
                                    xf.write(await export_user(modules, host, name, summary))
                                    bar.update(1)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)
        await storage.close()
    return summary


async def _names(accounts: Accounts) -> list[str]:
    names: list[str] = []
    token: str | None = None
    while True:
        page, token = await accounts.list(token, LIST_PAGE)
        names.extend(page)
        if token is None:
            return names
