"""Channel binding data (RFC 5929 / RFC 9266) and which mechanisms a stream offers."""

from __future__ import annotations

import datetime
import hashlib
import ssl
from pathlib import Path
from typing import Any

import pytest
import scramp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from xmppd.sasl.channel_binding import (
    ChannelBindingUnavailable,
    connection_channel_bindings,
    tls_server_end_point,
)
from xmppd.sasl.mechanisms import ALL_MECHANISMS, is_plus, offered_mechanisms, scram_hash_of
from xmppd.sasl.scram import ScramServer, derive_keys

NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])


def make_cert(key: CertificateIssuerPrivateKeyTypes, algorithm: Any) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(NAME)
        .issuer_name(NAME)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    )
    return builder.sign(key, algorithm)


# DER of the AlgorithmIdentifier OIDs; they have equal lengths, so swapping keeps the structure.
OID_SHA256_RSA = bytes.fromhex("2a864886f70d01010b")
WEAK_RSA_OIDS = {
    "sha1": bytes.fromhex("2a864886f70d010105"),
    "md5": bytes.fromhex("2a864886f70d010104"),
}


def resign_weak(key: rsa.RSAPrivateKey, weak: str) -> x509.Certificate:
    """A genuine SHA-1- or MD5-signed certificate.

    cryptography's builder refuses these hashes for new signatures, so a
    SHA-256 certificate is re-signed by hand: swap the signature algorithm
    OID (in the TBS part and outside it) and replace the signature.
    """
    cert = make_cert(key, hashes.SHA256())
    der, tbs = cert.public_bytes(serialization.Encoding.DER), cert.tbs_certificate_bytes
    algorithm = hashes.SHA1() if weak == "sha1" else hashes.MD5()
    new_tbs = tbs.replace(OID_SHA256_RSA, WEAK_RSA_OIDS[weak])
    new_signature = key.sign(new_tbs, padding.PKCS1v15(), algorithm)
    head, tail = der.split(tbs)
    tail = tail.replace(OID_SHA256_RSA, WEAK_RSA_OIDS[weak]).replace(cert.signature, new_signature)
    weak_cert = x509.load_der_x509_certificate(head + new_tbs + tail)
    public_key = weak_cert.public_key()
    assert isinstance(public_key, rsa.RSAPublicKey)
    public_key.verify(  # proves it really is a valid weak signature
        weak_cert.signature, weak_cert.tbs_certificate_bytes, padding.PKCS1v15(), algorithm
    )
    return weak_cert


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("signature_hash", "expected_hash"),
    [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
        (hashes.SHA224(), "sha224"),
    ],
)
def test_hash_follows_signature(
    rsa_key: rsa.RSAPrivateKey, signature_hash: hashes.HashAlgorithm, expected_hash: str
) -> None:
    cert_der = der(make_cert(rsa_key, signature_hash))
    assert tls_server_end_point(cert_der) == hashlib.new(expected_hash, cert_der).digest()
    # scramp (asn1crypto-based) computes the same client-side value.
    assert tls_server_end_point(cert_der) == bytes(scramp.core.CBindData.from_der(cert_der))


@pytest.mark.parametrize("weak", ["sha1", "md5"])
def test_weak_hashes_are_upgraded_to_sha256(rsa_key: rsa.RSAPrivateKey, weak: str) -> None:
    cert = resign_weak(rsa_key, weak)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == weak
    cert_der = der(cert)
    assert tls_server_end_point(cert_der) == hashlib.sha256(cert_der).digest()
    assert tls_server_end_point(cert_der) == bytes(scramp.core.CBindData.from_der(cert_der))


def test_ecdsa_sha384() -> None:
    cert_der = der(make_cert(ec.generate_private_key(ec.SECP384R1()), hashes.SHA384()))
    assert tls_server_end_point(cert_der) == hashlib.sha384(cert_der).digest()


def test_ed25519_has_no_tls_server_end_point() -> None:
    cert_der = der(make_cert(ed25519.Ed25519PrivateKey.generate(), None))
    with pytest.raises(ChannelBindingUnavailable):
        tls_server_end_point(cert_der)

    class TLS13:
        def version(self) -> str:
            return "TLSv1.3"

    assert connection_channel_bindings(TLS13(), cert_der) == {}


# --- a real TLS connection ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_files(rsa_key: rsa.RSAPrivateKey, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cert = make_cert(rsa_key, hashes.SHA384())
    directory: Path = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / "cert.pem", directory / "key.pem", der(cert)


def handshake(
    server_files: tuple[Path, Path, bytes], max_version: ssl.TLSVersion
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A client/server TLS handshake over memory BIOs, no sockets."""
    cert_path, key_path, _ = server_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_path, key_path)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert_path)
    client_ctx.maximum_version = max_version
    s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, obj in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    obj.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return server, client
    raise AssertionError("TLS handshake did not complete")


def scram_over(
    server_obj: ssl.SSLObject, client_obj: ssl.SSLObject, cert_der: bytes, cb_type: str
) -> None:
    """SCRAM-SHA-256-PLUS where the client takes its binding data from its own TLS object."""
    bindings = connection_channel_bindings(server_obj, cert_der)
    server = ScramServer("SCRAM-SHA-256-PLUS", bindings, plus_offered=True)
    client = scramp.ScramClient(
        ["SCRAM-SHA-256-PLUS"], "user", "pencil", channel_binding=(cb_type, client_obj)
    )
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(derive_keys("sha256", "pencil")).decode())
    client.set_server_final(server.finish(client.get_client_final().encode()).decode())


def test_tls13_offers_only_server_end_point(server_files: tuple[Path, Path, bytes]) -> None:
    server, client = handshake(server_files, ssl.TLSVersion.TLSv1_3)
    assert server.version() == "TLSv1.3"
    bindings = connection_channel_bindings(server, server_files[2])
    # No tls-unique (undefined on 1.3, though OpenSSL returns bytes for it) and no
    # tls-exporter (Python cannot export keying material).
    assert server.get_channel_binding("tls-unique")
    assert set(bindings) == {"tls-server-end-point"}
    assert not hasattr(server, "export_keying_material")
    assert bindings["tls-server-end-point"] == hashlib.sha384(server_files[2]).digest()
    scram_over(server, client, server_files[2], "tls-server-end-point")


def test_tls12_adds_tls_unique(server_files: tuple[Path, Path, bytes]) -> None:
    server, client = handshake(server_files, ssl.TLSVersion.TLSv1_2)
    assert server.version() == "TLSv1.2"
    bindings = connection_channel_bindings(server, server_files[2])
    assert set(bindings) == {"tls-server-end-point", "tls-unique"}
    assert bindings["tls-unique"] == client.get_channel_binding("tls-unique")
    scram_over(server, client, server_files[2], "tls-unique")
    scram_over(server, client, server_files[2], "tls-server-end-point")


def test_tls_exporter_used_only_where_export_exists_and_on_tls13(
    server_files: tuple[Path, Path, bytes],
) -> None:
    calls = []

    class Exporting:
        def __init__(self, version: str) -> None:
            self._version = version

        def version(self) -> str:
            return self._version

        def get_channel_binding(self, cb_type: str) -> bytes:
            return b"finished"

        def export_keying_material(self, label: bytes, length: int, context: None) -> bytes:
            calls.append((label, length, context))
            return b"E" * length

    bindings = connection_channel_bindings(Exporting("TLSv1.3"), server_files[2])
    assert bindings["tls-exporter"] == b"E" * 32
    assert calls == [(b"EXPORTER-Channel-Binding", 32, None)]
    assert "tls-unique" not in bindings
    assert "tls-exporter" not in connection_channel_bindings(Exporting("TLSv1.2"), server_files[2])


# --- offered mechanisms ------------------------------------------------------------------------


def test_before_tls_nothing_by_default() -> None:
    assert (
        offered_mechanisms(ALL_MECHANISMS, tls=False, channel_bindings=(), allow_unencrypted=False)
        == []
    )


def test_unencrypted_never_plain_nor_plus() -> None:
    assert offered_mechanisms(
        ALL_MECHANISMS, tls=False, channel_bindings=("tls-unique",), allow_unencrypted=True
    ) == ["SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1"]


def test_tls_with_channel_binding_offers_everything_in_preference_order() -> None:
    configured = ["PLAIN", "SCRAM-SHA-1", "SCRAM-SHA-256-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1-PLUS"]
    assert offered_mechanisms(
        configured, tls=True, channel_bindings={"tls-server-end-point"}, allow_unencrypted=False
    ) == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-1-PLUS", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]


def test_tls_without_channel_binding_has_no_plus() -> None:
    assert offered_mechanisms(
        ALL_MECHANISMS, tls=True, channel_bindings=[], allow_unencrypted=False
    ) == ["SCRAM-SHA-512", "SCRAM-SHA-256", "SCRAM-SHA-1", "PLAIN"]


def test_unknown_configured_mechanism_is_an_error() -> None:
    with pytest.raises(ValueError, match="DIGEST-MD5"):
        offered_mechanisms(["DIGEST-MD5"], tls=True, channel_bindings=(), allow_unencrypted=False)


def test_scram_hash_of() -> None:
    assert scram_hash_of("SCRAM-SHA-1") == "sha1"
    assert scram_hash_of("SCRAM-SHA-256-PLUS") == "sha256"
    assert scram_hash_of("SCRAM-SHA-512") == "sha512"
    assert is_plus("SCRAM-SHA-512-PLUS") and not is_plus("SCRAM-SHA-512")
    for bad in ("PLAIN", "SCRAM-MD5", "SCRAM-SHA-256-PLUSX", "SCRAM-SHA3-512"):
        with pytest.raises(ValueError):
            scram_hash_of(bad)
