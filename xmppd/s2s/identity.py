"""Which domains a peer's certificate speaks for (RFC 6120 13.7.1.2, RFC 9525).

Read structurally from the subjectAltName extension with `cryptography`:
XmppAddr (id-on-xmppAddr otherName, a UTF8String) and dNSName, never the
subject's common name and never a string rendering of a distinguished name
(Openfire's CVE-2025-59154 came from matching an unescaped DN string). The
chain itself is validated by OpenSSL against the trusted CAs before this is
asked (xmppd/s2s/tls.py); this only says which domains the leaf names.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ObjectIdentifier

ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")


def _utf8string(der: bytes) -> str | None:
    """The text of a DER UTF8String (tag 0x0C), None if `der` is not exactly one."""
    if len(der) < 2 or der[0] != 0x0C:
        return None
    length, offset = der[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or len(der) < 2 + count:
            return None
        length, offset = int.from_bytes(der[2 : 2 + count], "big"), 2 + count
    if len(der) != offset + length:
        return None
    try:
        return der[offset:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def certificate_names(der: bytes) -> tuple[frozenset[str], frozenset[str]]:
    """(XmppAddr domains, dNSName patterns) of a DER certificate, lowercased; empty
    when it has no subjectAltName or cannot be parsed."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return frozenset(), frozenset()
    xmpp: set[str] = set()
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id == ID_ON_XMPPADDR:
            value = _utf8string(other.value)
            # Only a bare domain identifies a server; user@domain or /resource does not.
            if value and "@" not in value and "/" not in value:
                xmpp.add(value.lower().rstrip("."))
    dns = {name.lower().rstrip(".") for name in san.get_values_for_type(x509.DNSName)}
    return frozenset(xmpp), frozenset(dns)


def dns_matches(pattern: str, domain: str) -> bool:
    """RFC 9525 6.3: an exact match, or a wildcard as the whole leftmost label
    ("*.example.org" matches "a.example.org", not "example.org" or "a.b.example.org")."""
    if pattern == domain:
        return True
    if not pattern.startswith("*."):
        return False
    head, _, rest = domain.partition(".")
    return bool(head) and rest == pattern[2:] and "*" not in rest


def certificate_covers(der: bytes, domain: str) -> bool:
    """True if the certificate names `domain` (XmppAddr or dNSName)."""
    domain = domain.lower().rstrip(".")
    xmpp, dns = certificate_names(der)
    return domain in xmpp or any(dns_matches(pattern, domain) for pattern in dns)
