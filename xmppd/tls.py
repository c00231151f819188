"""TLS for client connections: the server context and the embedded self-signed certificate."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServerTLS:
    """The client TLS of a node: made whole (off the event loop) at start and by each
    reload, then swapped in; a connection keeps the one its handshake began with."""

    context: ssl.SSLContext
    cert_path: Path
    cert_der: bytes  # what channel binding (tls-server-end-point) is computed from
    # When the certificate expires (Unix time): /metrics shows it, so an alert fires
    # before clients refuse it, whatever renews it.
    not_after: float


class TLSError(Exception):
    """The certificate or key cannot be used; one line that names the file(s)."""


def server_tls(
    cert: Path, key: Path, min_version: str = "1.2", alpn: str = "xmpp-client"
) -> ServerTLS:
    """A server context for `cert` (PEM chain) and `key`; TLSError says what is wrong.
    It reads files and parses keys (a few ms for RSA-4096): a node calls it in a
    thread (xmppd.nodetls). `alpn` is XEP-0368's for clients, "http/1.1" for the
    admin API."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _version(min_version)
    der = _load_pair(ctx, cert, key)
    ctx.set_alpn_protocols([alpn])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    not_after = x509.load_der_x509_certificate(der).not_valid_after_utc.timestamp()
    return ServerTLS(ctx, cert, der, not_after)


def _version(min_version: str) -> ssl.TLSVersion:
    return ssl.TLSVersion.TLSv1_3 if min_version == "1.3" else ssl.TLSVersion.TLSv1_2


def _load_pair(ctx: ssl.SSLContext, cert: Path, key: Path) -> bytes:
    """Load the pair into `ctx`; the certificate's DER (for channel binding), or TLSError."""
    try:
        ctx.load_cert_chain(cert, key)
        return x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
            serialization.Encoding.DER
        )
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise TLSError(_diagnose(cert, key, exc)) from None


def _diagnose(cert: Path, key: Path, exc: Exception) -> str:
    """Why OpenSSL refused the pair, in words an operator can act on (not "[SSL] PEM lib")."""
    try:
        cert_pem, key_pem = cert.read_bytes(), key.read_bytes()
    except OSError as e:
        return f"cannot read {e.filename}: {e.strerror or e}"
    swapped = " (are tls.cert and tls.key swapped?)"
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        hint = swapped if b"PRIVATE KEY" in cert_pem else ""
        return f"certificate {cert}: no PEM certificate in the file{hint}"
    try:
        private_key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        return f"key {key}: the key is encrypted; give it without a passphrase"
    except ValueError:
        hint = swapped if b"CERTIFICATE" in key_pem else ""
        return f"key {key}: no PEM private key in the file{hint}"
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*raw) != private_key.public_key().public_bytes(*raw):
        return f"key {key} does not belong to the certificate {cert}"
    reason = getattr(exc, "reason", None) or exc
    return f"cannot use certificate {cert} with key {key}: {reason}"


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    """Where the embedded default's certificate and key are kept."""
    return data_dir / "tls" / "selfsigned.crt", data_dir / "tls" / "selfsigned.key"


def ensure_self_signed(data_dir: Path, hosts: list[str]) -> tuple[Path, Path]:
    """The embedded default's certificate: made once in data_dir, valid for every host.

    The workers of `xmppd --workers N` start at once on one data_dir: a lock file
    lets one of them make the pair while the others wait and then use it (two
    writers could leave a key that is not the certificate's), and each file is
    written whole under another name first, so no reader sees half of one.
    """
    cert_path, key_path = self_signed_paths(data_dir)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    with open(cert_path.parent / ".selfsigned.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if cert_path.exists() and key_path.exists() and _covers(cert_path, hosts):
            return cert_path, key_path
        key, certificate = _self_signed(hosts)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_whole(key_path, key_pem, 0o600)
        _write_whole(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.warning(
        "made a SELF-SIGNED certificate for %s at %s: clients will not trust it. "
        "Set tls.cert and tls.key to a real certificate before real users connect.",
        ", ".join(hosts),
        cert_path,
    )
    return cert_path, key_path


def _self_signed(hosts: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _write_whole(path: Path, data: bytes, mode: int) -> None:
    """Write `path` under a temporary name in its folder, then rename it into place."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def _covers(cert_path: Path, hosts: list[str]) -> bool:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    dns = set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    return all(h in dns or h in ips for h in hosts)
