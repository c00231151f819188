"""What `xmppctl check` looks at beyond the file: certificates, stores and DNS.

Each check writes findings as it goes, one line each (`subject: ok|warning|error:
text`), so an operator sees a slow DNS server or store while it is being asked,
and a script reads the exit code: errors make it non-zero, warnings do not.

Certificates are matched the way clients match them (RFC 9525, which replaces
RFC 6125): only the subjectAltName dNSName entries count (and iPAddress ones
for a host that is an address), never the subject's CN; a wildcard is a whole
left-most label and stands for exactly one label. prosodyctl's `check certs`
and `check dns` are the model for what is looked at.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TextIO

import aiomcache
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from cryptography import x509
from cryptography.x509.oid import NameOID
from redis.asyncio import Redis

from xmppd.auth.accounts import Accounts
from xmppd.auth.privileged import privileged_jids, without_account
from xmppd.cli import allocator
from xmppd.config import Config, redact_url
from xmppd.storage.base import ItemStore, NoStoreYet
from xmppd.storage.config import MemcachedCacheConfig
from xmppd.storage.factory import describe_backend, open_blobs, open_cache, open_items
from xmppd.storage.memcached import parse_server
from xmppd.tls import TLSError, self_signed_paths, server_tls

EXPIRY_WARNING = datetime.timedelta(days=30)
"""A certificate that expires sooner than this is a warning (Let's Encrypt renews at 30)."""

PROBE_TIMEOUT = 5.0
"""Seconds one store, memcached node or Redis may take to answer the check."""

PROBE_NAMESPACE = "xmppctl-check"
"""Read (never written) to prove that a store answers: no data lives there."""

# Where clients and servers look for the host (RFC 6120 3.2.1, XEP-0368).
CLIENT_SRV = "_xmpp-client._tcp"
DIRECT_TLS_SRV = "_xmpps-client._tcp"
SERVER_SRV = "_xmpp-server._tcp"
DEFAULT_CLIENT_PORT = 5222


@dataclass
class Report:
    """The findings so far, written to `out` as they come."""

    out: TextIO
    errors: int = 0
    warnings: int = 0

    def ok(self, subject: str, text: str) -> None:
        self._line(subject, "ok", text)

    def warning(self, subject: str, text: str) -> None:
        self.warnings += 1
        self._line(subject, "warning", text)

    def error(self, subject: str, text: str) -> None:
        self.errors += 1
        self._line(subject, "error", text)

    def _line(self, subject: str, level: str, text: str) -> None:
        self.out.write(f"{subject}: {level}: {text}\n")
        self.out.flush()


def check_allocator(cfg: Config, report: Report) -> None:
    """Which malloc `xmppd` will run on (xmppd.cli.allocator), before it is started."""
    library = allocator.installed()
    if cfg.allocator == "system":
        report.ok("allocator", "the C library's malloc (allocator: system)")
    elif library is not None:
        report.ok("allocator", f"jemalloc ({library})")
    elif cfg.allocator == "jemalloc":
        report.error("allocator", f"{cfg.source.where(('allocator',))}: {allocator.MISSING}")
    else:
        report.ok("allocator", f"the C library's malloc ({allocator.MISSING})")


# --------------------------------------------------------------------------- certificates


def check_certificates(cfg: Config, report: Report, now: datetime.datetime) -> None:
    """The configured certificate (or the self-signed one in data_dir): it loads with
    its key, which hosts it covers, and when it expires."""
    cert, key = cfg.tls.cert, cfg.tls.key
    if cert is None or key is None:
        cert, key = self_signed_paths(cfg.data_dir)
        if not (cert.exists() and key.exists()):
            report.warning(
                "certificate",
                "tls.cert and tls.key are not set: the server will make a self-signed "
                f"certificate in {cert.parent} at first start, which clients will not trust",
            )
            return
    subject = f"certificate {cert}"
    try:
        server_tls(cert, key, cfg.tls.min_version)
        leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
    except TLSError as e:
        report.error("tls", str(e))  # the message names the file(s)
        return
    report.ok(subject, f"{_name(leaf.subject)}, issued by {_name(leaf.issuer)}")
    _check_validity(leaf, subject, report, now)
    if leaf.subject == leaf.issuer:
        report.warning(subject, "self-signed: clients will not trust it unless told to")
    names = presented_names(leaf)
    for host in cfg.hosts:
        covering = covering_name(names, host)
        if covering is not None:
            report.ok(f"{subject}: {host}", f"covered by {covering}")
            continue
        shown = ", ".join(names) or "no subjectAltName at all"
        why = f"not covered (the certificate names {shown})"
        if _cn_only_match(leaf, host):
            why += "; its CN matches, but clients ignore the CN (RFC 9525)"
        report.error(f"{subject}: {host}", why)


def _check_validity(
    leaf: x509.Certificate, subject: str, report: Report, now: datetime.datetime
) -> None:
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    until = f"{end:%Y-%m-%d %H:%M} UTC"
    if now < start:
        report.error(subject, f"not valid before {start:%Y-%m-%d %H:%M} UTC")
    elif end <= now:
        report.error(subject, f"expired on {until}")
    elif end - now < EXPIRY_WARNING:
        report.warning(subject, f"expires on {until}, in {_days(end - now)}: renew it")
    else:
        report.ok(subject, f"valid until {until} ({_days(end - now)} left)")


def _days(delta: datetime.timedelta) -> str:
    days = delta.days
    return f"{days} day{'s' if days != 1 else ''}" if days else "less than a day"


def _name(name: x509.Name) -> str:
    common = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return f"CN={common[0].value!s}" if common else name.rfc4514_string() or "(empty name)"


def presented_names(cert: x509.Certificate) -> list[str]:
    """The identifiers a client may match: SAN dNSName (as "DNS:name") and iPAddress
    ("IP:address") entries. The CN is not one of them (RFC 9525 6.3)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)] + [
        f"IP:{ip}" for ip in san.get_values_for_type(x509.IPAddress)
    ]


def covering_name(names: list[str], host: str) -> str | None:
    """The first of `names` (as from presented_names) that covers `host`, else None."""
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for name in names:
        kind, _, value = name.partition(":")
        if address is not None:
            if kind == "IP" and ipaddress.ip_address(value) == address:
                return name
        elif kind == "DNS" and dns_name_matches(value, host):
            return name
    return None


def _a_label(name: str) -> str:
    """The ASCII form of a domain (IDNA), lower case, without a final dot."""
    name = name.rstrip(".")
    try:
        return name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return name.lower()


def dns_name_matches(pattern: str, host: str) -> bool:
    """RFC 9525 6.3: an exact match, or a wildcard `*` that is the whole left-most label
    of a pattern with at least two more labels, standing for exactly one label."""
    pattern, host = _a_label(pattern), _a_label(host)
    if not pattern.startswith("*."):
        return "*" not in pattern and pattern == host
    suffix = pattern[2:]
    label, _, rest = host.partition(".")
    return "*" not in suffix and "." in suffix and bool(label) and rest == suffix


def _cn_only_match(cert: x509.Certificate, host: str) -> bool:
    return any(
        dns_name_matches(str(attribute.value), host)
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    )


# --------------------------------------------------------------------------- stores


async def check_stores(cfg: Config, report: Report) -> None:
    """Open each store on its own, read from it, and say how long that took."""
    storage = cfg.storage
    await _probe(report, "items", lambda: _read_items(cfg))
    await _probe(report, "blobs", lambda: _read_blobs(cfg))
    if isinstance(storage.cache, MemcachedCacheConfig):
        # The cache itself turns a dead node into misses; ask each node directly.
        for server in storage.cache.servers:
            await _probe(report, f"cache memcached {server}", partial(_memcached, server))
    else:
        await _probe(report, "cache", lambda: _read_cache(cfg))
    if cfg.cluster is not None:
        url = cfg.cluster.redis_url
        await _probe(report, f"cluster redis {redact_url(url)}", lambda: _redis(url))


async def _probe(report: Report, subject: str, call: Callable[[], Awaitable[str]]) -> None:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            what = await call()
    except TimeoutError:
        report.error(subject, f"no answer within {PROBE_TIMEOUT:g} s")
        return
    except NoStoreYet as e:  # before a first start, or a mistyped path: say which
        report.warning(subject, f"no store at {e.where} yet (the server creates it at first start)")
        return
    except Exception as e:  # any failure of any backend is what the operator must see
        report.error(subject, str(e) or type(e).__name__)
        return
    report.ok(subject, f"{what}, answered in {1000 * (time.perf_counter() - started):.0f} ms")


async def _read_items(cfg: Config) -> str:
    backend = await open_items(cfg.storage.items, cfg.data_dir, read_only=True)
    try:
        await backend.get(PROBE_NAMESPACE, "probe")
        return describe_backend(backend)
    finally:
        await backend.close()


async def _read_blobs(cfg: Config) -> str:
    backend = await open_blobs(cfg.storage.blobs, cfg.data_dir, read_only=True)
    try:
        await backend.get(PROBE_NAMESPACE, "probe")
        return describe_backend(backend)
    finally:
        await backend.close()


async def _read_cache(cfg: Config) -> str:
    cache = await open_cache(cfg.storage.cache)
    try:
        await cache.get(f"{PROBE_NAMESPACE}:probe")
        return cache.describe()
    finally:
        await cache.close()


async def _memcached(server: str) -> str:
    host, port = parse_server(server)
    client = aiomcache.Client(host, port, pool_size=1)
    try:
        version = await client.version()
        return f"memcached {version.decode(errors='replace')}"
    finally:
        await client.close()


async def _redis(url: str) -> str:
    redis = Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT)
    try:
        await redis.ping()
        info = await redis.info("server")
        return f"redis {info.get('redis_version', '?')}"
    finally:
        await redis.aclose()


async def check_privileged_accounts(cfg: Config, report: Report) -> None:
    """Warn about each `admins` or `auth.proxy_auth` JID with no account: until the
    operator creates it, whoever else makes it gets its rights (xmppd.auth.privileged)."""
    if not privileged_jids(cfg):
        return
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            missing = await _privileged_without_account(cfg)
    except Exception:  # the items probe above said why
        return
    for line in missing:
        report.warning("accounts", line)


async def _privileged_without_account(cfg: Config) -> list[str]:
    try:
        backend = await open_items(cfg.storage.items, cfg.data_dir, read_only=True)
    except NoStoreYet:  # before a first start: no account exists yet
        return await without_account(cfg, _no_account)
    try:
        return await without_account(
            cfg, lambda host, user: Accounts(ItemStore(backend, host, "accounts")).exists(user)
        )
    finally:
        await backend.close()


async def _no_account(host: str, user: str) -> bool:
    return False


# --------------------------------------------------------------------------- DNS


@dataclass
class Lookup:
    """One DNS answer: the records as text, the name they were found at (not the
    asked one when it is an alias), or why the lookup failed."""

    records: list[tuple[str, int]] = field(default_factory=list)  # (target or address, port)
    canonical: str | None = None
    failure: str | None = None


def make_resolver(server: str | None) -> dns.resolver.Resolver:
    """The system's resolver, or the one at ADDRESS[:PORT] (`--dns-server`)."""
    if server is None:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        address, port = _server_address(server)
        resolver.nameservers = [address]
        resolver.port = port
    resolver.lifetime = PROBE_TIMEOUT
    return resolver


def _server_address(server: str) -> tuple[str, int]:
    """ADDRESS, ADDRESS:PORT, [IPV6] or [IPV6]:PORT; ValueError if none of them."""
    if server.startswith("["):
        address, _, rest = server[1:].partition("]")
        port = rest.removeprefix(":") or "53"
    elif server.count(":") == 1:
        address, port = server.split(":")
    else:
        address, port = server, "53"
    try:
        ipaddress.ip_address(address)
        return address, int(port)
    except ValueError:
        raise ValueError(f"--dns-server {server}: expected ADDRESS[:PORT]") from None


class DNSUnreachable(Exception):
    """No DNS server answered: the remaining lookups would only wait as long."""


def lookup(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> Lookup:
    try:
        answer = resolver.resolve(name, rdtype, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return Lookup()
    except dns.resolver.LifetimeTimeout as e:
        raise DNSUnreachable(f"{rdtype} lookup of {name}: {e}") from None
    except dns.exception.DNSException as e:
        return Lookup(failure=f"{rdtype} lookup of {name} failed: {e}")
    found = Lookup(canonical=str(answer.canonical_name).rstrip("."))
    for record in answer:
        if rdtype == "SRV":
            found.records.append((str(record.target).rstrip(".") or ".", record.port))
        else:
            found.records.append((record.to_text(), 0))
    return found


def check_dns(cfg: Config, report: Report, resolver: dns.resolver.Resolver) -> None:
    """For each host: its SRV records for clients (STARTTLS and direct TLS) and for
    other servers, and the A and AAAA records of every target they name."""
    try:
        _check_dns(cfg, report, resolver)
    except DNSUnreachable as e:
        servers = ", ".join(map(str, resolver.nameservers))
        report.error("dns", f"no answer from {servers}: {e}; no more DNS checks")


def _check_dns(cfg: Config, report: Report, resolver: dns.resolver.Resolver) -> None:
    starttls = {lst.port for lst in cfg.listeners if lst.type == "starttls"}
    direct = {lst.port for lst in cfg.listeners if lst.type == "direct_tls"}
    for host in cfg.hosts:
        if host == "localhost" or _is_address(host):
            report.warning(f"dns {host}", "not a public DNS name: nothing to look up")
            continue
        ascii_host = _a_label(host)
        targets: dict[str, str] = {}  # target -> the record that names it
        client = _check_srv(report, resolver, host, ascii_host, CLIENT_SRV, starttls, targets)
        if client is not None and not client.records:
            targets.setdefault(ascii_host, f"the fallback of {CLIENT_SRV} (RFC 6120 3.2.2)")
            if DEFAULT_CLIENT_PORT in starttls:
                report.warning(
                    f"dns {CLIENT_SRV}.{host}",
                    f"missing: clients fall back to {host}:{DEFAULT_CLIENT_PORT}",
                )
            else:
                report.error(
                    f"dns {CLIENT_SRV}.{host}",
                    f"missing, and no STARTTLS listener on port {DEFAULT_CLIENT_PORT}: "
                    "clients cannot find the server",
                )
        tls = _check_srv(report, resolver, host, ascii_host, DIRECT_TLS_SRV, direct, targets)
        if tls is not None and not tls.records and direct:
            report.warning(
                f"dns {DIRECT_TLS_SRV}.{host}",
                f"missing: clients will not find the direct TLS port(s) {_ports(direct)} "
                "(XEP-0368)",
            )
        server = _check_srv(report, resolver, host, ascii_host, SERVER_SRV, None, targets)
        if server is not None and not server.records:
            report.warning(
                f"dns {SERVER_SRV}.{host}",
                "missing: other servers will try port 5269 of the host itself",
            )
        for target, named_by in targets.items():
            _check_target(report, resolver, target, named_by)


def _check_srv(
    report: Report,
    resolver: dns.resolver.Resolver,
    host: str,
    ascii_host: str,
    service: str,
    ports: set[int] | None,
    targets: dict[str, str],
) -> Lookup | None:
    """One SRV lookup; its targets are added to `targets`. None when it failed."""
    subject = f"dns {service}.{host}"
    found = lookup(resolver, f"{service}.{ascii_host}.", "SRV")
    if found.failure is not None:
        report.error(subject, found.failure)
        return None
    if [target for target, _ in found.records] == ["."]:
        report.warning(subject, 'the service is switched off (target ".", RFC 2782)')
        return found
    for target, port in found.records:
        targets.setdefault(target, f"{service}.{host}")
        if ports is not None and port not in ports:
            report.warning(
                subject,
                f"{target}:{port}: no listener of that kind on port {port} "
                f"(configured: {_ports(ports) or 'none'})",
            )
        else:
            report.ok(subject, f"{target}:{port}")
    return found


def _check_target(
    report: Report, resolver: dns.resolver.Resolver, target: str, named_by: str
) -> None:
    subject = f"dns {target}"
    if target == "localhost":
        report.warning(subject, f"named by {named_by}: other machines cannot reach localhost")
        return
    found = {rdtype: lookup(resolver, f"{target}.", rdtype) for rdtype in ("A", "AAAA")}
    for answer in found.values():
        if answer.failure is not None:
            report.error(subject, answer.failure)
            return
        if answer.canonical is not None and answer.canonical != target:
            report.warning(
                subject,
                f"is an alias of {answer.canonical}: an SRV target must not be a CNAME "
                "(RFC 2782); name the canonical host",
            )
            break
    addresses = {rdtype: [a for a, _ in answer.records] for rdtype, answer in found.items()}
    if not addresses["A"] and not addresses["AAAA"]:
        report.error(subject, f"no A or AAAA record (named by {named_by}): nobody can connect")
        return
    for rdtype, family in (("A", "IPv4"), ("AAAA", "IPv6")):
        if addresses[rdtype]:
            report.ok(subject, f"{rdtype} {', '.join(addresses[rdtype])}")
        else:
            report.warning(subject, f"no {rdtype} record: {family} clients cannot connect")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _ports(ports: set[int]) -> str:
    return ", ".join(map(str, sorted(ports)))


# --------------------------------------------------------------------------- all


def run_checks(cfg: Config, out: TextIO, *, dns_server: str | None, with_dns: bool) -> Report:
    """Every check above, in the order an operator fixes things."""
    resolver = make_resolver(dns_server) if with_dns else None  # a bad address fails first
    report = Report(out)
    check_certificates(cfg, report, datetime.datetime.now(datetime.UTC))
    asyncio.run(check_stores(cfg, report))
    asyncio.run(check_privileged_accounts(cfg, report))
    check_allocator(cfg, report)
    if resolver is not None:
        check_dns(cfg, report, resolver)
    return report

