"""Where to connect for a remote domain (RFC 6120 3.2): a static override, else DNS.

DNS is asked with dnspython's asyncio resolver, so a slow name server never
blocks the loop: `_xmpps-server._tcp.<domain>` (direct TLS, XEP-0368) and
`_xmpp-server._tcp.<domain>` (STARTTLS) SRV records, ordered together by
priority (weighted at random within a priority, RFC 2782), and without any
the domain itself on port 5269. A single SRV record with target "." says
the domain does not offer that kind of connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.rdtypes.IN.SRV
import dns.resolver

from xmppd.s2s.config import S2SConfig

DEFAULT_PORT = 5269


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # a name or an address, for loop.create_connection
    port: int
    direct_tls: bool = False  # TLS from the first byte (XEP-0368), not STARTTLS


class NoService(Exception):
    """The domain says it offers no server-to-server service, or does not exist."""


class Resolver:
    def __init__(self, config: S2SConfig, lifetime: float) -> None:
        self.config = config
        self._dns = dns.asyncresolver.Resolver(configure=not config.dns_servers)
        if config.dns_servers:
            servers, port = [], 53
            for entry in config.dns_servers:
                host, _, given = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
                servers.append(host)
                port = int(given) if given else port
            self._dns.nameservers = servers
            self._dns.port = port
        self._dns.lifetime = lifetime

    async def targets(self, domain: str) -> list[Target]:
        """Where to try, in order. `_xmpps-server` (direct TLS, XEP-0368) and
        `_xmpp-server` (STARTTLS) records are asked at once and ordered together, as one
        RFC 2782 record set (XEP-0368 3): the domain's priorities and weights decide
        which kind is tried first. A lone '.' target says that kind is not offered; only
        when neither kind has any record is the domain itself tried on 5269 (a '.' rules
        that out too)."""
        policy = self.config.policy(domain)
        if policy.host is not None:
            return [Target(policy.host, policy.port, policy.direct_tls)]
        direct, starttls = await asyncio.gather(
            self._srv(f"_xmpps-server._tcp.{domain}."), self._srv(f"_xmpp-server._tcp.{domain}.")
        )
        if direct is None and starttls is None:
            return await self._fallback(domain)
        records = [(r, True) for r in direct or ()] + [(r, False) for r in starttls or ()]
        if not records:
            raise NoService(f"{domain} offers no server-to-server service (SRV target '.')")
        return [
            Target(r.target.to_text(omit_final_dot=True), r.port, tls)
            for r, tls in _srv_order(records)
        ]

    async def _srv(self, name: str) -> list[dns.rdtypes.IN.SRV.SRV] | None:
        """The SRV records at `name`: None if there are none, [] for a lone '.'."""
        try:
            answer = await self._dns.resolve(name, "SRV")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        records: list[dns.rdtypes.IN.SRV.SRV] = list(answer)  # type: ignore[arg-type]
        if len(records) == 1 and records[0].target.to_text() == ".":
            return []
        return records

    async def addresses(self, host: str) -> list[str]:
        """The addresses of an SRV target (or an override's host), asked of the same DNS
        servers as the SRV records: A first, then AAAA. An address stays as it is."""
        try:
            ipaddress.ip_address(host)
            return [host]
        except ValueError:
            pass
        found: list[str] = []
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._dns.resolve(f"{host}.", rdtype)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            found += [record.to_text() for record in answer]
        return found

    async def _fallback(self, domain: str) -> list[Target]:
        """No SRV records: the domain's own addresses on the default port, if it has any."""
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self._dns.resolve(f"{domain}.", rdtype)
            except dns.resolver.NXDOMAIN:
                raise NoService(f"{domain} does not exist in DNS") from None
            except (dns.resolver.NoAnswer, dns.resolver.NoNameservers):
                continue
            return [Target(record.to_text(), DEFAULT_PORT) for record in answer]
        raise NoService(f"{domain} has no SRV record and no address")


def _srv_order(
    records: list[tuple[dns.rdtypes.IN.SRV.SRV, bool]],
) -> list[tuple[dns.rdtypes.IN.SRV.SRV, bool]]:
    """RFC 2782: lowest priority first; within one, weighted random order."""
    ordered: list[tuple[dns.rdtypes.IN.SRV.SRV, bool]] = []
    for priority in sorted({r.priority for r, _ in records}):
        group = [entry for entry in records if entry[0].priority == priority]
        while group:
            total = sum(r.weight for r, _ in group)
            pick = random.uniform(0, total) if total else 0.0
            for entry in group:
                pick -= entry[0].weight
                if pick <= 0:
                    break
            group.remove(entry)
            ordered.append(entry)
    return ordered
