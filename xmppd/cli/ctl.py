"""xmppctl: check a configuration and manage accounts, with or without a running server.

It opens the configured storage itself, so it works the same against the
embedded SQLite default and a cloud deployment. Every failure ends with one
line `xmppctl: reason` on stderr and a non-zero exit code, never a traceback:
operators script this tool.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from slixmpp.jid import JID, InvalidJID
from tqdm import tqdm

from xmppd import package_version
from xmppd.admin import remove_account
from xmppd.auth.accounts import (
    AccountExists,
    AccountNotFound,
    Accounts,
    InvalidPassword,
    InvalidUsername,
)
from xmppd.cli import checks
from xmppd.cli.nodes import (
    NodeRemovalFailed,
    Outcome,
    drain_nodes,
    node_records,
    note_account_change,
    notify_account_change,
    remove_on_node,
)
from xmppd.config import Config, ConfigError, find_config, load_config
from xmppd.configfile import CONFIG_ENV, SYSTEM_CONFIG
from xmppd.fileaccess import restrict_umask, root_on_foreign_dir
from xmppd.modulehost import AccountDataRemains
from xmppd.server import StartupError, check_writable
from xmppd.storage.base import StorageError
from xmppd.storage.factory import open_storage
from xmppd.storage.migrate import migrate

LIST_PAGE = 1000
"""Accounts fetched per storage query by `list`."""


class Failure(Exception):
    """A reason to stop, shown to the operator as `xmppctl: reason` (one line per
    reason; only a configuration with several problems has more than one)."""

    def __init__(self, *reasons: str) -> None:
        super().__init__("\n".join(reasons))
        self.reasons = reasons


# --------------------------------------------------------------------------- helpers


def _load(path: str | None) -> Config:
    """The configuration -c names, else the one find_config finds (said on stderr)."""
    try:
        if path is None:
            found, why = find_config()
            print(f"xmppctl: {why}", file=sys.stderr)
            cfg = load_config(found)
        else:
            cfg = load_config(Path(path))
    except ConfigError as e:
        raise Failure(*e.problems) from None
    refused = root_on_foreign_dir(cfg.data_dir)
    if refused is not None:
        raise Failure(refused)
    return cfg


def _account_jid(cfg: Config, text: str) -> tuple[str, str]:
    """USER@HOST -> (user, host), HOST being one the configuration serves."""
    try:
        jid = JID(text)
    except InvalidJID as e:
        raise Failure(f"{text!r} is not a valid JID: {e}") from None
    if not jid.local or jid.resource:
        raise Failure(f"expected an account as USER@HOST, got {text!r}")
    return str(jid.local), _served_host(cfg, str(jid.domain))


def _served_host(cfg: Config, host: str) -> str:
    host = host.lower()
    if host not in cfg.hosts:
        served = ", ".join(cfg.hosts)
        raise Failure(f"{host} is not a host of this server ({cfg.source.name} serves {served})")
    return host


def _read_password(password_file: str | None, stdin: TextIO) -> str:
    """The new password: from a file, from piped stdin, or typed twice at a terminal.

    Never from the command line, where any user on the machine could read it."""
    if password_file is not None:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise Failure(f"cannot read {password_file}: {e.strerror or e}") from None
    elif not stdin.isatty():
        password = stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Password (again): ") != password:
            raise Failure("the passwords do not match")
    if not password:
        raise Failure("the password is empty")
    return password


@asynccontextmanager
async def _accounts_of(cfg: Config) -> AsyncIterator[Callable[[str], Accounts]]:
    """Open the configured storage; yield a factory of per-host account stores."""
    storage = await open_storage(cfg.storage, cfg.data_dir)
    try:
        yield lambda host: Accounts.of(storage, host, cfg.auth.scram_iterations)
    finally:
        await storage.close()


def _progress(total: int | None, desc: str, unit: str) -> tqdm[Any]:
    """A progress bar on a terminal's stderr; nothing when output is redirected (a
    script reads the summary on stdout then)."""
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        disable=not (sys.stdout.isatty() and sys.stderr.isatty()),
        unit=unit,
        leave=True,
        dynamic_ncols=True,
    )


# --------------------------------------------------------------------------- commands


def cmd_check(args: argparse.Namespace) -> int:
    """Everything the server checks before it serves (the file with the module options,
    data_dir writable), then the certificate, each store and, with --dns, the DNS
    records (xmppd.cli.checks): errors make the exit code 1, warnings do not.

    Makes nothing: a mistyped data_dir must show as a missing store, not become a
    new empty one that then checks OK."""
    cfg = _load(args.config)
    if cfg.data_dir.exists():
        try:
            check_writable(cfg.data_dir)
        except StartupError as e:
            raise Failure(str(e)) from None
    report = checks.run_checks(cfg, sys.stdout, dns_server=args.dns_server, with_dns=args.dns)
    if report.errors:
        raise Failure(f"{cfg.source.name}: {_count(report.errors, 'error')}")
    warned = f" ({_count(report.warnings, 'warning')})" if report.warnings else ""
    print(f"{cfg.source.name}: OK{warned}")
    return 0


def _count(n: int, what: str) -> str:
    return f"{n} {what}{'s' if n != 1 else ''}"


async def _register(cfg: Config, user: str, host: str, password: str) -> None:
    async with _accounts_of(cfg) as accounts:
        try:
            await accounts(host).register(user, password)
        except AccountExists:
            raise Failure(f"{user}@{host} already exists") from None


def cmd_register(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    user, host = _account_jid(cfg, args.jid)  # a wrong host fails before asking for a password
    asyncio.run(_register(cfg, user, host, _read_password(args.password_file, sys.stdin)))
    print(f"registered {user}@{host}")
    _report(asyncio.run(note_account_change(cfg.data_dir, f"{user}@{host}", "registered")))
    return 0


async def _tell_nodes(cfg: Config, jid: str, change: str) -> None:
    """Tell the running nodes (the store is already written); they end the account's
    sessions. A node that does not answer is a warning: the change itself is made."""
    _report(await notify_account_change(cfg.data_dir, jid, change))


def _say(line: str) -> None:
    """A progress line, on stderr at once (stdout is the result a script reads)."""
    print(f"xmppctl: {line}", file=sys.stderr, flush=True)


def _report(outcome: Outcome) -> None:
    for line in outcome.done:
        print(line)
    for warning in outcome.warnings:
        print(f"xmppctl: warning: {warning}", file=sys.stderr)


async def _passwd(cfg: Config, user: str, host: str, password: str) -> None:
    async with _accounts_of(cfg) as accounts:
        try:
            await accounts(host).set_password(user, password)
        except AccountNotFound:
            raise Failure(f"{user}@{host} does not exist") from None
    print(f"password changed for {user}@{host}")
    # Every session ends, the operator's own included: xmppctl has no "current" one.
    await _tell_nodes(cfg, f"{user}@{host}", "password-changed")


def cmd_passwd(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    user, host = _account_jid(cfg, args.jid)
    asyncio.run(_passwd(cfg, user, host, _read_password(args.password_file, sys.stdin)))
    return 0


async def _unregister(cfg: Config, user: str, host: str) -> str:
    """Remove the account and its data; what to tell the operator.

    A running node does it when there is one, through its own cache (see
    xmppd.adminapi); only when no node could be reached does this process remove it
    from the stores (xmppd.cli.nodes.remove_on_node)."""
    jid = f"{user}@{host}"
    outcome = Outcome()
    try:
        removed = await remove_on_node(cfg.data_dir, jid, outcome, _say)
    except NodeRemovalFailed as e:
        raise Failure(f"{e}: run unregister again to finish") from None
    finally:
        _report(outcome)
    if removed is None:
        storage = await open_storage(cfg.storage, cfg.data_dir)
        try:
            accounts = Accounts.of(storage, host, cfg.auth.scram_iterations)
            removed = await remove_account(cfg, storage, accounts, host, user)
        except AccountDataRemains as e:
            raise Failure(f"{e}: run unregister again to finish") from None
        finally:
            await storage.close()
    if removed == "nothing":
        raise Failure(f"{jid} does not exist")
    if removed == "leftovers":
        return f"{jid} did not exist: deleted the data an earlier removal left"
    return f"unregistered {jid}"


def cmd_drain(args: argparse.Namespace) -> int:
    """Drain the running nodes of this configuration (or the one named): each stops as
    on SIGTERM, its stream management sessions resuming on the other nodes."""
    cfg = _load(args.config)
    outcome = asyncio.run(drain_nodes(cfg.data_dir, args.node))
    _report(outcome)
    return 0 if outcome.done else 1


def cmd_unregister(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    user, host = _account_jid(cfg, args.jid)
    print(asyncio.run(_unregister(cfg, user, host)))
    return 0


async def _list(cfg: Config, host: str, out: TextIO) -> None:
    async with _accounts_of(cfg) as accounts:
        store = accounts(host)
        token: str | None = None
        while True:
            names, token = await store.list(token, LIST_PAGE)
            out.writelines(f"{name}@{host}\n" for name in names)
            if token is None:
                return


def cmd_list(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    asyncio.run(_list(cfg, _served_host(cfg, args.host), sys.stdout))
    return 0


# --------------------------------------------------------------------------- register-bulk


@dataclass(slots=True)
class BulkResult:
    created: int = 0
    skipped: int = 0
    failed: int = 0
    first_failure: str | None = None


def _patterned(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    for n in range(args.start, args.start + args.count):
        yield args.user_pattern.format(n=n), args.password_pattern.format(n=n)


def _check_patterns(args: argparse.Namespace) -> None:
    try:
        first, second = (args.user_pattern.format(n=n) for n in (args.start, args.start + 1))
        args.password_pattern.format(n=args.start)
    except (KeyError, IndexError, ValueError) as e:
        raise Failure(f"bad pattern: {e!r} (use {{n}} for the number)") from None
    if args.count > 1 and first == second:
        raise Failure(
            f"--user-pattern {args.user_pattern!r} gives one name for every account: add {{n}}"
        )


def _read_bulk_file(path: str) -> list[tuple[str, str]]:
    """Lines "user password" (blank lines and # comments skipped), all checked
    before any account is created."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise Failure(f"cannot read {path}: {e.strerror or e}") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(None, 1)
        if len(parts) != 2:
            raise Failure(f'{path}:{number}: expected "user password"')
        pairs.append((parts[0], parts[1]))
    return pairs


async def _register_bulk(
    cfg: Config,
    host: str,
    pairs: list[tuple[str, str]] | Iterator[tuple[str, str]],
    total: int,
    concurrency: int,
) -> BulkResult:
    result = BulkResult()
    todo = iter(pairs)
    async with _accounts_of(cfg) as accounts:
        store = accounts(host)
        with _progress(total, f"register {host}", " accounts") as bar:

            async def worker() -> None:
                # Workers pull from one iterator: at most `concurrency` key
                # derivations in flight, however many accounts are asked for.
                for user, password in todo:
                    try:
                        await store.register(user, password)
                        result.created += 1
                    except AccountExists:
                        result.skipped += 1
                    except (InvalidUsername, InvalidPassword) as e:
                        result.failed += 1
                        result.first_failure = result.first_failure or f"{user!r}: {e}"
                    bar.update(1)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


def cmd_register_bulk(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    host = _served_host(cfg, args.host)
    if args.concurrency < 1:
        raise Failure("--concurrency must be at least 1")
    pairs: list[tuple[str, str]] | Iterator[tuple[str, str]]
    if args.file is not None:
        pairs = _read_bulk_file(args.file)
        total = len(pairs)
    else:
        if args.count < 0:
            raise Failure("--count must be at least 0")
        _check_patterns(args)
        pairs, total = _patterned(args), args.count
    result = asyncio.run(_register_bulk(cfg, host, pairs, total, args.concurrency))
    counts = f"{result.created} created, {result.skipped} already existed, {result.failed} failed"
    print(f"{host}: {counts}")
    if result.failed:
        raise Failure(
            f"{result.failed} accounts could not be created (first: {result.first_failure})"
        )
    return 0


# --------------------------------------------------------------------------- migrate


async def _migrate(src: Config, dst: Config, unchanged: dict[str, int]) -> dict[str, int]:
    """Copy all data, a progress bar per namespace; the counts per store."""
    bars: dict[str, tqdm[Any]] = {}

    def progress(namespace: str, done: int, total: int | None) -> None:
        bar = bars.get(namespace)
        if bar is not None and done < bar.n:  # the blobs of a namespace after its items
            bar.close()
            bar = None
        if bar is None:
            bar = bars[namespace] = _progress(total, namespace, " entries")
        bar.update(done - bar.n)

    try:
        return await migrate(
            src.storage, src.data_dir, dst.storage, dst.data_dir, progress, unchanged
        )
    finally:
        for bar in bars.values():
            bar.close()


def cmd_migrate(args: argparse.Namespace) -> int:
    src, dst = _load(args.source), _load(args.destination)
    if (src.storage, src.data_dir) == (dst.storage, dst.data_dir):
        raise Failure(f"{src.source.name} and {dst.source.name} name the same storage")
    outcome = Outcome()
    if node_records(src.data_dir, outcome):
        outcome.warnings.append(
            f"a node is running on the source storage of {src.source.name}: what it writes "
            "meanwhile may be missed; stop it, or run migrate again once it is stopped"
        )
    _report(outcome)
    unchanged: dict[str, int] = {}
    try:
        counts = asyncio.run(_migrate(src, dst, unchanged))
    except StorageError as e:
        done = ", ".join(f"{store} ({n} already there)" for store, n in unchanged.items())
        raise Failure(
            f"storage: {e}",
            f"stopped part way (stores reached: {done or 'none'}); run migrate again: "
            "what is already there is checked, not copied twice",
        ) from None
    for store in sorted(counts):
        same = unchanged.get(store, 0)
        print(f"{store}: {counts[store] - same} copied, {same} already there, 0 failed")
    print(f"migrated {sum(counts.values())} entries in {len(counts)} stores")
    return 0


# --------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xmppctl", description="Check an xmppd configuration and manage its accounts."
    )
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help=f"configuration file (default: ${CONFIG_ENV}, else {SYSTEM_CONFIG})",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check",
        help="validate the configuration, check the certificate's hosts and expiry, "
        "open every store",
    )
    check.add_argument(
        "--dns", action="store_true", help="also check each host's SRV, A and AAAA records"
    )
    check.add_argument(
        "--dns-server", metavar="ADDRESS[:PORT]", help="ask this DNS server (default: the system's)"
    )
    check.set_defaults(run=cmd_check)

    password_help = (
        "read the password from the first line of F (default: first line of standard "
        "input when piped, else asked twice)"
    )
    register = sub.add_parser("register", help="create an account")
    register.add_argument("jid", metavar="USER@HOST")
    register.add_argument("--password-file", metavar="F", help=password_help)
    register.set_defaults(run=cmd_register)

    passwd = sub.add_parser("passwd", help="change an account's password")
    passwd.add_argument("jid", metavar="USER@HOST")
    passwd.add_argument("--password-file", metavar="F", help=password_help)
    passwd.set_defaults(run=cmd_passwd)

    unregister = sub.add_parser("unregister", help="delete an account")
    unregister.add_argument("jid", metavar="USER@HOST")
    unregister.set_defaults(run=cmd_unregister)

    drain = sub.add_parser(
        "drain", help="stop running nodes as SIGTERM does; their clients resume elsewhere"
    )
    drain.add_argument("node", nargs="?", metavar="NODE", help="cluster node name or pid")
    drain.set_defaults(run=cmd_drain)

    listing = sub.add_parser("list", help="list the accounts of a host, one JID per line")
    listing.add_argument("host", metavar="HOST")
    listing.set_defaults(run=cmd_list)

    bulk = sub.add_parser("register-bulk", help="create many accounts (existing ones are skipped)")
    bulk.add_argument("host", metavar="HOST")
    source = bulk.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--count", type=int, metavar="N", help="create N accounts from the patterns"
    )
    source.add_argument(
        "--file", metavar="F", help='read lines "user password" from F (- for stdin)'
    )
    bulk.add_argument(
        "--user-pattern", default="user{n}", help="user name, {n} is the number (default: user{n})"
    )
    bulk.add_argument("--password-pattern", default="pass{n}", help="password (default: pass{n})")
    bulk.add_argument("--start", type=int, default=1, help="first number (default: 1)")
    bulk.add_argument(
        "--concurrency",
        type=int,
        default=2 * (os.cpu_count() or 1),
        help="accounts created at once (default: twice the CPU count)",
    )
    bulk.set_defaults(run=cmd_register_bulk)

    migrate = sub.add_parser(
        "migrate", help="copy all stored data from one configuration's storage to another's"
    )
    migrate.add_argument("--from", dest="source", required=True, metavar="A.yml")
    migrate.add_argument("--to", dest="destination", required=True, metavar="B.yml")
    migrate.set_defaults(run=cmd_migrate)

    from xmppd.cli import (  # they use this module's helpers
        ctl_admin,
        ctl_components,
        ctl_reload,
        ctl_s2s,
        ctl_sessions,
        ctl_xep227,
    )

    ctl_sessions.add_parsers(sub)
    ctl_s2s.add_parsers(sub)
    ctl_reload.add_parsers(sub)
    ctl_xep227.add_parsers(sub)
    ctl_admin.add_parsers(sub)
    ctl_components.add_parsers(sub)
    return parser


def _fail(*reasons: str, code: int = 1) -> int:
    for reason in reasons:
        print(f"xmppctl: {reason}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit code is 0 on success (argparse exits 2 on bad usage)."""
    args = _parser().parse_args(argv)
    restrict_umask()  # what it writes in data_dir is as private as what the server writes
    try:
        code = int(args.run(args))
        sys.stdout.flush()  # a reader that left shows here, not in Python's flush at exit
        return code
    except Failure as e:
        return _fail(*e.reasons)
    except InvalidUsername as e:
        return _fail(f"invalid user name: {e}")
    except InvalidPassword as e:
        return _fail(f"invalid password: {e}")
    except StorageError as e:
        return _fail(f"storage: {e}")
    except BrokenPipeError:
        # The reader of the output left (`xmppctl list | head`): nothing to report. Python
        # would flush stdout again at exit and fail the same way: it goes nowhere now.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # a file or folder the configuration names
        where = f"{e.filename}: " if e.filename else ""
        return _fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
    except Exception as e:  # an operator tool: one line, not a traceback
        return _fail(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    # Run as xmppd.cli.ctl, not as __main__: the commands of ctl_sessions and
    # ctl_admin raise that module's Failure, which main() must recognise.
    from xmppd.cli import ctl

    sys.exit(ctl.main())
