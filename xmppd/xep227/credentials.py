"""SCRAM keys in XEP-0227's <scram-credentials/>, as each server writes them.

XEP-0227 carries salt, stored key and server key base64-encoded. Prosody 0.12
does exactly that; ejabberd 23.01 base64-encodes its already base64-encoded
database values once more. The depth is not labelled, so it is read from
the keys, whose decoded length must be the hash's digest size: once-decoded
keys of the right size are depth 1, else twice-decoded ones are depth 2. The
salt is decoded to the same depth (a salt has no fixed length to tell by).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from lxml import etree

from xmppd.sasl.scram import SCRAM_HASHES, ScramKeys

NS_SCRAM = "urn:xmpp:pie:0#scram"
MAX_FIELD = 1024
"""Longer than any salt or key anyone stores; bounds the work on hostile input."""


class BadCredentials(ValueError):
    """Unreadable <scram-credentials/>: the reason, without any key material."""


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise BadCredentials(f"{what} is not base64") from None


def _field(element: etree._Element, name: str) -> str:
    text = element.findtext(f"{{{NS_SCRAM}}}{name}")
    if text is None or not text.strip():
        raise BadCredentials(f"<{name}/> is missing")
    if len(text) > MAX_FIELD:
        raise BadCredentials(f"<{name}/> is too long")
    return text.strip()


def _decode_key(text: str, size: int, what: str) -> tuple[bytes, int]:
    """The key and the base64 depth (1 or 2) at which it has `size` bytes."""
    once = _b64(text, what)
    if len(once) == size:
        return once, 1
    try:
        twice = base64.b64decode(once, validate=True)
    except (binascii.Error, ValueError):
        twice = b""
    if len(twice) == size:
        return twice, 2
    raise BadCredentials(f"{what} is not a {size}-byte key, base64-encoded once or twice")


def parse_scram(element: etree._Element) -> ScramKeys:
    """ScramKeys from one <scram-credentials mechanism='SCRAM-SHA-…'/>; BadCredentials."""
    mechanism = element.get("mechanism", "")
    scram_hash = mechanism.removeprefix("SCRAM-")
    if not mechanism.startswith("SCRAM-") or scram_hash not in SCRAM_HASHES:
        raise BadCredentials(f"unsupported mechanism {mechanism!r}")
    hash_name = SCRAM_HASHES[scram_hash]
    size = hashlib.new(hash_name).digest_size
    stored, depth = _decode_key(_field(element, "stored-key"), size, "stored-key")
    server, server_depth = _decode_key(_field(element, "server-key"), size, "server-key")
    if server_depth != depth:
        raise BadCredentials("stored-key and server-key are encoded differently")
    salt = _b64(_field(element, "salt"), "salt")
    if depth == 2:
        salt = _b64(salt.decode("ascii", "replace"), "salt")
    iterations = _field(element, "iter-count")
    if not (iterations.isascii() and iterations.isdigit()):
        raise BadCredentials(f"iter-count {iterations[:20]!r} is not a number")
    try:
        return ScramKeys(hash_name, salt, int(iterations), stored, server)
    except ValueError as e:
        raise BadCredentials(str(e)) from None


def scram_element(keys: ScramKeys) -> etree._Element:
    """<scram-credentials/> as XEP-0227 says (base64 once), for `xmppctl export`."""
    scram_name = {v: k for k, v in SCRAM_HASHES.items()}[keys.hash_name]
    element = etree.Element(
        f"{{{NS_SCRAM}}}scram-credentials", nsmap={None: NS_SCRAM}, mechanism=f"SCRAM-{scram_name}"
    )
    for name, value in (
        ("iter-count", str(keys.iterations)),
        ("salt", base64.b64encode(keys.salt).decode()),
        ("server-key", base64.b64encode(keys.server_key).decode()),
        ("stored-key", base64.b64encode(keys.stored_key).decode()),
    ):
        etree.SubElement(element, f"{{{NS_SCRAM}}}{name}").text = value
    return element
