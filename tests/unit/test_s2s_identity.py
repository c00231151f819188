"""Which domains a certificate speaks for: SAN XmppAddr and dNSName, never the CN."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509

from tests.integration.s2s_peers import issue, make_ca
from xmppd.s2s.identity import certificate_covers, certificate_names, dns_matches


def der(tmp_path: Path, domain: str, **kwargs: object) -> bytes:
    ca = make_ca(tmp_path)
    cert_path, _ = issue(ca, tmp_path, domain, **kwargs)  # type: ignore[arg-type]
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.public_bytes(Encoding.DER)


def test_xmppaddr_and_dnsname_are_read(tmp_path: Path) -> None:
    cert = der(tmp_path, "a.test", dns_names=["dns.a.test"], xmpp_addrs=["XMPP.a.test"])
    assert certificate_names(cert) == (frozenset({"xmpp.a.test"}), frozenset({"dns.a.test"}))
    assert certificate_covers(cert, "xmpp.a.test")
    assert certificate_covers(cert, "dns.a.test")
    assert not certificate_covers(cert, "a.test")


def test_the_common_name_is_never_used(tmp_path: Path) -> None:
    cert = der(tmp_path, "a.test", dns_names=[], xmpp_addrs=[], common_name="a.test")
    assert not certificate_covers(cert, "a.test")


def test_a_dn_string_cannot_smuggle_a_name(tmp_path: Path) -> None:
    # CVE-2025-59154: a CN holding ",CN=victim" fooled a DN-string parser.
    cert = der(tmp_path, "evil.test", common_name="evil.test,CN=victim.test")
    assert not certificate_covers(cert, "victim.test")
    assert certificate_covers(cert, "evil.test")


def test_an_xmppaddr_with_a_user_is_not_a_server_identity(tmp_path: Path) -> None:
    cert = der(tmp_path, "a.test", dns_names=[], xmpp_addrs=["user@a.test"])
    assert not certificate_covers(cert, "a.test")


@pytest.mark.parametrize(
    ("pattern", "domain", "matches"),
    [
        ("a.test", "a.test", True),
        ("*.a.test", "x.a.test", True),
        ("*.a.test", "a.test", False),
        ("*.a.test", "y.x.a.test", False),
        ("x*.a.test", "xy.a.test", False),
        ("*.test", "a.test", True),
    ],
)
def test_wildcards_cover_one_leftmost_label(pattern: str, domain: str, matches: bool) -> None:
    assert dns_matches(pattern, domain) is matches
