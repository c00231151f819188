"""xmppctl check: the certificate's hosts and expiry, and --dns against a real DNS server.

The DNS server is a small one run by the test on 127.0.0.1 (dnspython builds its
answers) and named with --dns-server, so the check's real resolver asks it real
questions over UDP.
"""

from __future__ import annotations

import datetime
import socketserver
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.unit.test_ctl import Stdin
from xmppd.cli.checks import dns_name_matches
from xmppd.cli.ctl import main

NOW = datetime.datetime.now(datetime.UTC)


def run(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str
) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", Stdin(""))
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def make_pair(
    folder: Path,
    *,
    cn: str,
    dns_names: list[str] | None,
    days: float = 365,
    issuer_cn: str | None = None,
) -> tuple[Path, Path]:
    """A certificate and its key; `dns_names` None: no subjectAltName at all. With
    `issuer_cn` the certificate is signed by a throwaway CA of that name."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    signer, issuer = key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    if issuer_cn is not None:
        signer = ec.generate_private_key(ec.SECP256R1())
        issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=400))
        .not_valid_after(NOW + datetime.timedelta(days=days))
    )
    if dns_names is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    cert = builder.sign(signer, hashes.SHA256())
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def write(
    tmp_path: Path, hosts: list[str], pair: tuple[Path, Path] | None = None, **more: object
) -> Path:
    config: dict[str, object] = {"hosts": hosts, "data_dir": str(tmp_path / "data"), **more}
    if pair is not None:
        config["tls"] = {"cert": str(pair[0]), "key": str(pair[1])}
    path = tmp_path / "xmppd.yml"
    path.write_text(yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------- certificates


def test_names_match_as_rfc_9525_says() -> None:
    assert dns_name_matches("example.org", "EXAMPLE.org.")
    assert dns_name_matches("*.example.org", "chat.example.org")
    assert not dns_name_matches("*.example.org", "example.org")  # one label, not zero
    assert not dns_name_matches("*.example.org", "a.chat.example.org")  # nor two
    assert not dns_name_matches("c*.example.org", "chat.example.org")  # whole label only
    assert not dns_name_matches("*.org", "example.org")  # not a whole top-level domain
    assert not dns_name_matches("chat.*.org", "chat.example.org")
    assert dns_name_matches("xn--bcher-kva.example", "bücher.example")  # IDN: A-labels


def test_check_says_which_hosts_the_certificate_covers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = make_pair(
        tmp_path / "tls", cn="example.org", dns_names=["example.org", "*.example.org"],
        issuer_cn="Test CA",
    )
    hosts = ["example.org", "chat.example.org", "a.b.example.org", "other.net"]
    config = write(tmp_path, hosts, pair)
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "check")
    subject = f"certificate {pair[0]}"
    assert f"{subject}: ok: CN=example.org, issued by CN=Test CA\n" in out
    assert f"{subject}: example.org: ok: covered by DNS:example.org\n" in out
    assert f"{subject}: chat.example.org: ok: covered by DNS:*.example.org\n" in out
    names = "DNS:example.org, DNS:*.example.org"
    for host in ("a.b.example.org", "other.net"):
        assert f"{subject}: {host}: error: not covered (the certificate names {names})\n" in out
    assert "self-signed" not in out
    assert (code, err) == (1, f"xmppctl: {config}: 2 errors\n")


def test_a_certificate_with_only_a_cn_covers_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = make_pair(tmp_path / "tls", cn="example.org", dns_names=None)
    config = write(tmp_path, ["example.org"], pair)
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "check")
    assert (
        f"certificate {pair[0]}: example.org: error: not covered (the certificate names no "
        "subjectAltName at all); its CN matches, but clients ignore the CN (RFC 9525)\n"
    ) in out
    assert f"certificate {pair[0]}: warning: self-signed: clients will not trust it" in out
    assert (code, err) == (1, f"xmppctl: {config}: 1 error\n")


def test_check_warns_before_the_certificate_expires_and_fails_after(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    pair = make_pair(tmp_path / "soon", cn="x", dns_names=["example.org"], days=10.5)
    config = write(tmp_path, ["example.org"], pair)
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "check")
    end = (NOW + datetime.timedelta(days=10.5)).strftime("%Y-%m-%d %H:%M")
    assert f"certificate {pair[0]}: warning: expires on {end} UTC, in 10 days: renew it\n" in out
    assert (code, err) == (0, "")
    assert out.endswith(f"{config}: OK (4 warnings)\n")  # expiry, self-signed, 2 stores

    pair = make_pair(tmp_path / "old", cn="x", dns_names=["example.org"], days=-1)
    config = write(tmp_path, ["example.org"], pair)
    code, out, err = run(capsys, monkeypatch, "-c", str(config), "check")
    end = (NOW - datetime.timedelta(days=1)).strftime("%Y-%m-%d %H:%M")
    assert f"certificate {pair[0]}: error: expired on {end} UTC\n" in out
    assert (code, err) == (1, f"xmppctl: {config}: 1 error\n")

    pair = make_pair(tmp_path / "good", cn="x", dns_names=["example.org"], days=90.5)
    config = write(tmp_path, ["example.org"], pair)
    code, out, _ = run(capsys, monkeypatch, "-c", str(config), "check")
    end = (NOW + datetime.timedelta(days=90.5)).strftime("%Y-%m-%d %H:%M")
    assert f"certificate {pair[0]}: ok: valid until {end} UTC (90 days left)\n" in out
    assert code == 0


# --------------------------------------------------------------------------- DNS


class TinyDNS(socketserver.BaseRequestHandler):
    """Answers from ZONE: (name, type) -> records; a CNAME is followed; a name that
    is not in the zone at all is NXDOMAIN."""

    zone: dict[tuple[str, str], list[str]] = {}

    def handle(self) -> None:
        data, sock = self.request
        query = dns.message.from_wire(data)
        response = dns.message.make_response(query)
        question = query.question[0]
        name, rdtype = question.name.to_text().lower(), dns.rdatatype.to_text(question.rdtype)
        alias = self.zone.get((name, "CNAME"))
        if alias is not None:
            response.answer.append(dns.rrset.from_text(name, 60, "IN", "CNAME", *alias))
            name = alias[0]
        records = self.zone.get((name, rdtype))
        if records:
            response.answer.append(dns.rrset.from_text(name, 60, "IN", rdtype, *records))
        elif not any(known == name for known, _ in self.zone):
            response.set_rcode(dns.rcode.NXDOMAIN)
        sock.sendto(response.to_wire(), self.client_address)


@pytest.fixture
def dns_server() -> Iterator[str]:
    TinyDNS.zone = {
        ("_xmpp-client._tcp.good.test.", "SRV"): ["5 0 5222 xmpp.good.test."],
        ("_xmpps-client._tcp.good.test.", "SRV"): ["5 0 5223 xmpp.good.test."],
        ("_xmpp-server._tcp.good.test.", "SRV"): ["5 0 5269 xmpp.good.test."],
        ("xmpp.good.test.", "A"): ["192.0.2.1"],
        ("xmpp.good.test.", "AAAA"): ["2001:db8::1"],
        ("_xmpp-client._tcp.bad.test.", "SRV"): ["5 0 5333 alias.bad.test."],
        ("alias.bad.test.", "CNAME"): ["real.bad.test."],
        ("real.bad.test.", "A"): ["192.0.2.2"],
    }
    server = socketserver.UDPServer(("127.0.0.1", 0), TinyDNS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_check_dns_says_what_is_missing(
    tmp_path: Path,
    dns_server: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listeners = [
        {"type": "starttls", "address": "127.0.0.1", "port": 5222},
        {"type": "direct_tls", "address": "127.0.0.1", "port": 5223},
    ]
    hosts = ["good.test", "bad.test", "gone.test", "localhost"]
    config = write(tmp_path, hosts, listeners=listeners)
    argv = ("-c", str(config), "check", "--dns", "--dns-server", dns_server)
    code, out, err = run(capsys, monkeypatch, *argv)
    dns_lines = [line for line in out.splitlines() if line.startswith("dns ")]
    assert dns_lines == [
        "dns _xmpp-client._tcp.good.test: ok: xmpp.good.test:5222",
        "dns _xmpps-client._tcp.good.test: ok: xmpp.good.test:5223",
        "dns _xmpp-server._tcp.good.test: ok: xmpp.good.test:5269",
        "dns xmpp.good.test: ok: A 192.0.2.1",
        "dns xmpp.good.test: ok: AAAA 2001:db8::1",
        "dns _xmpp-client._tcp.bad.test: warning: alias.bad.test:5333: no listener of that "
        "kind on port 5333 (configured: 5222)",
        "dns _xmpps-client._tcp.bad.test: warning: missing: clients will not find the direct "
        "TLS port(s) 5223 (XEP-0368)",
        "dns _xmpp-server._tcp.bad.test: warning: missing: other servers will try port 5269 "
        "of the host itself",
        "dns alias.bad.test: warning: is an alias of real.bad.test: an SRV target must not be "
        "a CNAME (RFC 2782); name the canonical host",
        "dns alias.bad.test: ok: A 192.0.2.2",
        "dns alias.bad.test: warning: no AAAA record: IPv6 clients cannot connect",
        "dns _xmpp-client._tcp.gone.test: warning: missing: clients fall back to gone.test:5222",
        "dns _xmpps-client._tcp.gone.test: warning: missing: clients will not find the direct "
        "TLS port(s) 5223 (XEP-0368)",
        "dns _xmpp-server._tcp.gone.test: warning: missing: other servers will try port 5269 "
        "of the host itself",
        "dns gone.test: error: no A or AAAA record (named by the fallback of _xmpp-client._tcp "
        "(RFC 6120 3.2.2)): nobody can connect",
        "dns localhost: warning: not a public DNS name: nothing to look up",
    ]
    assert (code, err) == (1, f"xmppctl: {config}: 1 error\n")

    # Without --dns nothing is looked up, and a DNS server that does not answer is an error.
    code, out, _ = run(capsys, monkeypatch, "-c", str(config), "check")
    assert "dns " not in out and code == 0
    monkeypatch.setattr("xmppd.cli.checks.PROBE_TIMEOUT", 0.5)
    code, out, err = run(capsys, monkeypatch, *argv[:-1], "127.0.0.1:9")
    dns_lines = [line for line in out.splitlines() if line.startswith("dns")]
    assert len(dns_lines) == 1  # the first lookup that times out ends the DNS checks
    assert dns_lines[0].startswith(
        "dns: error: no answer from 127.0.0.1: SRV lookup of _xmpp-client._tcp.good.test.: "
    )
    assert dns_lines[0].endswith("; no more DNS checks")
    assert (code, err) == (1, f"xmppctl: {config}: 1 error\n")
