"""Real federation peers for the s2s tests: a test CA, a Prosody server, a tiny DNS server.

Each server runs on its own loopback address with its own domain (Prosody:
a.test on 127.0.18.2; xmppd: b.test on 127.0.18.3), on free ports, with
certificates from a CA made for the test. Name resolution needs neither
/etc/hosts nor the network: xmppd is given static overrides (or the DNS
server here), Prosody a small plugin (tests/fixtures/prosody/) that maps
domains to addresses in its config, since it has no such option itself.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.storage.services import in_ci
from xmppd.s2s.identity import ID_ON_XMPPADDR

PROSODY = "/usr/bin/prosody"
PROSODYCTL = "/usr/bin/prosodyctl"
PLUGINS = Path(__file__).resolve().parent.parent / "fixtures" / "prosody"
PROSODY_ADDRESS = "127.0.18.2"
XMPPD_ADDRESS = "127.0.18.3"
DNS_ADDRESS = "127.0.18.1"


def require(available: bool, missing: str, ci_needs: str) -> None:
    """Skip the calling test module when a peer cannot run here (`missing` says why);
    in CI fail it instead (`ci_needs`): there the federation tests must run."""
    if available:
        return
    if in_ci():
        raise RuntimeError(ci_needs)
    pytest.skip(missing, allow_module_level=True)


def require_prosody() -> None:
    """Skip the calling test module without Prosody; fail it in CI."""
    require(
        Path(PROSODY).exists(),
        "prosody is not installed",
        "CI needs Prosody (apt-get install prosody) for the s2s tests",
    )


# --- certificates ----------------------------------------------------------------------


@dataclass
class CA:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    path: Path  # the CA certificate, PEM
    issuer: CA | None = None  # an intermediate CA's: the CA that signed it


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(
    folder: Path, name: str = "xmppd test CA", issuer: CA | None = None, path_length: int = 0
) -> CA:
    """A root CA, or with `issuer` an intermediate CA it signs (`issuer` then needs a
    `path_length` of 1 or more)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(issuer.cert.subject if issuer is not None else _name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(issuer.key if issuer is not None else key, hashes.SHA256())
    )
    path = folder / f"{name.replace(' ', '-')}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(cert, key, path, issuer)


def _utf8string(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 128
    return bytes([0x0C, len(data)]) + data


def issue(
    ca: CA,
    folder: Path,
    domain: str,
    *,
    dns_names: list[str] | None = None,
    xmpp_addrs: list[str] | None = None,
    common_name: str | None = None,
) -> tuple[Path, Path]:
    """A certificate and key (PEM files) signed by `ca`, naming `domain` as both a
    dNSName and an XmppAddr unless told otherwise; the certificate file also holds
    `ca`'s intermediate CAs, as a server presents them."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [
        x509.DNSName(n) for n in (dns_names if dns_names is not None else [domain])
    ]
    names += [
        x509.OtherName(ID_ON_XMPPADDR, _utf8string(n))
        for n in (xmpp_addrs if xmpp_addrs is not None else [domain])
    ]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name or domain))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    stem = common_name or domain
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    chain, above = [cert], ca
    while above.issuer is not None:  # an intermediate: presented with the certificate
        chain.append(above.cert)
        above = above.issuer
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def xmppd_tls(
    folder: Path,
    ca: CA,
    domain: str = "b.test",
    *,
    dns_names: list[str] | None = None,
    xmpp_addrs: list[str] | None = None,
) -> dict[str, str]:
    """The `tls` section of an xmppd in a federation test: a certificate for `domain`
    from `ca` (the names as `issue` takes them), made in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = issue(ca, folder, domain, dns_names=dns_names, xmpp_addrs=xmpp_addrs)
    return {"cert": str(cert), "key": str(key)}


def xmppd_s2s(
    trusted: CA, listeners: list[dict[str, object]], dns_port: int | None = None, **more: object
) -> dict[str, object]:
    """The `s2s` section of an xmppd in a federation test: `listeners`, the peers'
    certificates checked against `trusted`, 10 s to connect, the test
    DNS server on `dns_port` as the only name server if given; `more`: other keys."""
    section: dict[str, object] = {
        "listeners": listeners,
        "ca_file": str(trusted.path),
        "connect_timeout": 10.0,
    }
    if dns_port is not None:
        section["dns_servers"] = [f"{DNS_ADDRESS}:{dns_port}"]
    return section | more


def free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


# --- Prosody ---------------------------------------------------------------------------


@dataclass
class Prosody:
    domain: str
    address: str
    c2s_port: int
    s2s_port: int
    direct_tls_port: int | None  # its direct TLS s2s port (XEP-0368), if it has one
    folder: Path
    process: asyncio.subprocess.Process

    @property
    def log(self) -> str:
        path = self.folder / "prosody.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _lua(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "{ " + " ".join(f"[{_lua(k)}] = {_lua(v)};" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "{ " + " ".join(f"{_lua(v)};" for v in value) + " }"
    raise TypeError(value)


def write_prosody_config(
    folder: Path,
    ca: CA,
    domain: str,
    address: str,
    peers: dict[str, tuple[int | str, ...]],
    secure_auth: bool,
    direct_tls: bool = False,
    bidi: bool = False,
    cert_ca: CA | None = None,
) -> tuple[Path, int, int, int | None]:
    """The config file (and certificate, from `cert_ca`, default `ca`) of a Prosody;
    returns it and its c2s, s2s and direct TLS s2s ports."""
    if not Path(PROSODY).exists():
        raise FileNotFoundError(f"{PROSODY} is not installed (Debian package prosody)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data").mkdir(exist_ok=True)
    cert, key = issue(cert_ca or ca, folder, domain)
    c2s_port, s2s_port = free_port(address), free_port(address)
    direct_port = free_port(address) if direct_tls else None
    options = {
        "run_as_root": True,
        "daemonize": False,
        "pidfile": str(folder / "prosody.pid"),
        "data_path": str(folder / "data"),
        "plugin_paths": [str(PLUGINS)],
        "interfaces": [address],
        "local_interfaces": [address],
        "c2s_ports": [c2s_port],
        "s2s_ports": [s2s_port],
        "c2s_direct_tls_ports": [],
        "s2s_direct_tls_ports": [direct_port] if direct_port else [],
        "http_ports": [],
        "https_ports": [],
        "component_ports": [],
        "modules_enabled": [
            "roster",
            "saslauth",
            "tls",
            "dialback",
            "disco",
            "ping",
            "test_s2s_hosts",
            *(["s2s_bidi"] if bidi else []),
        ],
        "modules_disabled": [] if bidi else ["s2s_bidi"],
        "authentication": "internal_plain",
        "storage": "internal",
        "c2s_require_encryption": True,
        "s2s_require_encryption": True,
        "s2s_secure_auth": secure_auth,
        "s2s_timeout": 20,
        "use_ipv6": False,
        "test_s2s_hosts": {peer: list(target) for peer, target in peers.items()},
        "ssl": {"certificate": str(cert), "key": str(key), "cafile": str(ca.path)},
        "log": {"debug": str(folder / "prosody.log")},
    }
    lines = [f"{name} = {_lua(value)}" for name, value in options.items()]
    lines.append(f'VirtualHost "{domain}"')
    config = folder / "prosody.cfg.lua"
    config.write_text("\n".join(lines) + "\n")
    return config, c2s_port, s2s_port, direct_port


async def start_prosody(
    folder: Path,
    ca: CA,
    *,
    domain: str = "a.test",
    address: str = PROSODY_ADDRESS,
    users: dict[str, str] | None = None,
    peers: dict[str, tuple[int | str, ...]],
    secure_auth: bool = True,
    direct_tls: bool = False,
    bidi: bool = False,
    cert_ca: CA | None = None,
) -> Prosody:
    """Prosody serving `domain` on `address`, trusting `ca`, reaching each of `peers`
    (domain -> (address, port[, direct TLS port])) there; its `users` (default: anna,
    whom s2s_clients.prosody_user logs in) registered with prosodyctl. `direct_tls`: it
    also listens for direct TLS s2s (XEP-0368); `bidi`: it loads mod_s2s_bidi (XEP-0288),
    which the other tests leave out; `cert_ca`: the CA of its own certificate (default
    `ca`)."""
    config, c2s_port, s2s_port, direct_port = write_prosody_config(
        folder, ca, domain, address, peers, secure_auth, direct_tls, bidi, cert_ca
    )
    ctl = shutil.which("prosodyctl") or PROSODYCTL
    for user, password in (users or {"anna": "anna-secret"}).items():
        done = await asyncio.create_subprocess_exec(
            ctl,
            "--config",
            str(config),
            "register",
            user,
            domain,
            password,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out, _ = await done.communicate()
        if done.returncode != 0:
            raise RuntimeError(f"prosodyctl register failed: {out.decode(errors='replace')}")
    process = await asyncio.create_subprocess_exec(
        PROSODY,
        "--config",
        str(config),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # it logs to prosody.log
    )
    prosody = Prosody(domain, address, c2s_port, s2s_port, direct_port, folder, process)
    try:
        await _listening(prosody)
    except BaseException:
        await prosody.stop()  # not left running when it never came up
        raise
    return prosody


async def _listening(prosody: Prosody) -> None:
    process, address, c2s_port = prosody.process, prosody.address, prosody.c2s_port
    async with asyncio.timeout(15):
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"prosody exited:\n{prosody.log}")
            try:
                _, writer = await asyncio.open_connection(address, c2s_port)
            except OSError:
                await asyncio.sleep(0.05)  # polling a port: nothing to await until it listens
                continue
            writer.close()
            break


# --- a DNS server ----------------------------------------------------------------------


class DNSServer(asyncio.DatagramProtocol):
    """Answers from `records` ((name, type) -> [text of rdata]); NXDOMAIN for the rest."""

    def __init__(self, records: dict[tuple[str, str], list[str]]) -> None:
        self.records = records
        self.queries: list[tuple[str, str]] = []  # (name, type) asked, in order
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(answer(self.records, data, self.queries), addr)

    def close(self) -> None:
        assert self.transport is not None
        self.transport.close()


def answer(
    records: dict[tuple[str, str], list[str]], data: bytes, queries: list[tuple[str, str]]
) -> bytes:
    """The response to one DNS query, from `records`; NXDOMAIN for names not in it."""
    query = dns.message.from_wire(data)
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    question = query.question[0]
    name = question.name.to_text(omit_final_dot=True).lower()
    queries.append((name, dns.rdatatype.to_text(question.rdtype)))
    answers = records.get((name, dns.rdatatype.to_text(question.rdtype)))
    if answers:
        response.answer.append(
            dns.rrset.from_text_list(question.name, 60, dns.rdataclass.IN, question.rdtype, answers)
        )
    elif not any(known == name for known, _ in records):
        response.set_rcode(dns.rcode.NXDOMAIN)
    return bytes(response.to_wire())


async def start_dns(records: dict[tuple[str, str], list[str]]) -> DNSServer:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DNSServer(records), local_addr=(DNS_ADDRESS, 0)
    )
    protocol.port = transport.get_extra_info("sockname")[1]
    return protocol
