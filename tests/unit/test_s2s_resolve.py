"""Where xmppd connects for a remote domain: `_xmpps-server` (XEP-0368) and
`_xmpp-server` SRV records ordered together, '.' targets, the A fallback. Asked of a
real DNS server on 127.0.18.1 (tests/integration/s2s_peers.py), over UDP."""

from __future__ import annotations

import pytest

from tests.integration.s2s_peers import start_dns
from xmppd.s2s.config import S2SConfig
from xmppd.s2s.resolve import NoService, Resolver, Target


async def resolve(
    records: dict[tuple[str, str], list[str]],
) -> tuple[object, list[tuple[str, str]]]:
    dns = await start_dns(records)
    try:
        resolver = Resolver(S2SConfig(dns_servers=[f"127.0.18.1:{dns.port}"]), lifetime=5)
        try:
            found: object = await resolver.targets("a.test")
        except NoService as exc:
            found = exc
        return found, dns.queries
    finally:
        assert dns.transport is not None
        dns.transport.close()


async def test_direct_tls_and_starttls_records_ordered_together() -> None:
    found, queries = await resolve(
        {
            ("_xmpps-server._tcp.a.test", "SRV"): [
                "10 0 5270 tls.a.test.",
                "0 0 5271 first.a.test.",
            ],
            ("_xmpp-server._tcp.a.test", "SRV"): ["5 0 5269 plain.a.test."],
        }
    )
    # By priority across both kinds: the operator decides which kind comes first.
    assert found == [
        Target("first.a.test", 5271, True),
        Target("plain.a.test", 5269, False),
        Target("tls.a.test", 5270, True),
    ]
    assert sorted(queries) == [
        ("_xmpp-server._tcp.a.test", "SRV"),
        ("_xmpps-server._tcp.a.test", "SRV"),
    ]


async def test_within_a_priority_weights_decide() -> None:
    found, _ = await resolve(
        {
            ("_xmpps-server._tcp.a.test", "SRV"): ["0 65535 5270 tls.a.test."],
            ("_xmpp-server._tcp.a.test", "SRV"): ["0 0 5269 plain.a.test."],
        }
    )
    assert found == [Target("tls.a.test", 5270, True), Target("plain.a.test", 5269, False)]


async def test_a_dot_for_direct_tls_leaves_starttls_and_no_address_fallback() -> None:
    found, queries = await resolve(
        {
            ("_xmpps-server._tcp.a.test", "SRV"): ["0 0 0 ."],
            ("_xmpp-server._tcp.a.test", "SRV"): ["0 0 5269 plain.a.test."],
        }
    )
    assert found == [Target("plain.a.test", 5269, False)]
    # XEP-0368 4: a '.' says SRV is in use, so no A/AAAA fallback either.
    found, queries = await resolve(
        {("_xmpps-server._tcp.a.test", "SRV"): ["0 0 0 ."], ("a.test", "A"): ["127.0.18.2"]}
    )
    assert isinstance(found, NoService)
    assert ("a.test", "A") not in queries


async def test_no_record_of_either_kind_falls_back_to_the_domain() -> None:
    found, queries = await resolve({("a.test", "A"): ["127.0.18.2"]})
    assert found == [Target("127.0.18.2", 5269, False)]
    assert queries[2:] == [("a.test", "A")]


@pytest.mark.parametrize("direct_tls", [False, True])
async def test_a_static_override_says_which_kind(direct_tls: bool) -> None:
    config = S2SConfig(
        domains={"a.test": {"host": "127.0.18.2", "port": 5270, "direct_tls": direct_tls}}
    )
    assert await Resolver(config, lifetime=5).targets("a.test") == [
        Target("127.0.18.2", 5270, direct_tls)
    ]
