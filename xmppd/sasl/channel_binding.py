"""Channel binding data (RFC 5929, RFC 9266) a TLS connection can really provide.

A type is only ever returned when the server can compute the same bytes the
client will, because a -PLUS mechanism advertised for a type we cannot
verify would either lock clients out or, worse, tempt us to skip the check.

* tls-server-end-point: the hash of our own certificate; works on every TLS
  version. Undefined (RFC 5929 section 4.1) when the certificate's signature
  uses no single hash (Ed25519, Ed448), so it is then left out.
* tls-unique: the first Finished message; defined only up to TLS 1.2 (RFC
  9266 forbids it on TLS 1.3, where OpenSSL still returns bytes). On TLS 1.2
  it is only as safe as the handshake: OpenSSL negotiates the extended master
  secret (RFC 7627) whenever the client supports it, which defeats the
  triple-handshake attack, but Python cannot tell whether it did.
* tls-exporter: needs RFC 5705 keying-material export, which Python's ssl
  module does not expose (3.11 has no `export_keying_material`), so with the
  stdlib it is never advertised. If a future ssl object has the method, it is
  used on TLS 1.3 only, where the exporter is always safe (RFC 9266 section 3).
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes

_TLS_UNIQUE_VERSIONS = frozenset({"TLSv1", "TLSv1.1", "TLSv1.2"})
TLS_EXPORTER_LABEL = b"EXPORTER-Channel-Binding"
TLS_EXPORTER_LENGTH = 32


class ChannelBindingUnavailable(ValueError):
    """tls-server-end-point is undefined for this certificate."""


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 4.1: our certificate hashed with its signature's hash (MD5/SHA-1 -> SHA-256).

    Raises ChannelBindingUnavailable when the signature has no single hash or
    an algorithm `cryptography` does not know.
    """
    cert = x509.load_der_x509_certificate(cert_der)
    try:
        algorithm = cert.signature_hash_algorithm
    except UnsupportedAlgorithm as e:
        raise ChannelBindingUnavailable(f"unknown certificate signature algorithm: {e}") from None
    if algorithm is None:
        raise ChannelBindingUnavailable(
            "certificate signature uses no hash; tls-server-end-point is undefined"
        )
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


def connection_channel_bindings(ssl_object: Any, cert_der: bytes) -> dict[str, bytes]:
    """The channel binding types this server-side TLS connection can verify, with their data.

    `ssl_object` is an `ssl.SSLObject` or `ssl.SSLSocket` after the
    handshake (typed loosely so a future object with keying-material export
    fits); `cert_der` is the certificate we presented on it.
    """
    bindings: dict[str, bytes] = {}
    try:
        bindings["tls-server-end-point"] = tls_server_end_point(cert_der)
    except ChannelBindingUnavailable:
        pass
    version = ssl_object.version()
    if version in _TLS_UNIQUE_VERSIONS:
        unique = ssl_object.get_channel_binding("tls-unique")
        if unique:
            bindings["tls-unique"] = unique
    export = getattr(ssl_object, "export_keying_material", None)
    if export is not None and version == "TLSv1.3":
        bindings["tls-exporter"] = export(TLS_EXPORTER_LABEL, TLS_EXPORTER_LENGTH, None)
    return bindings
