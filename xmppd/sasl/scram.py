"""SCRAM-SHA-1/-256/-512 and their -PLUS variants (RFC 5802, RFC 7677), server side.

Sans-IO: `ScramServer` takes the client's messages as bytes and returns the
server's, so the stream core decides when to look up keys and how to frame
the exchange. Only salted keys (`ScramKeys`) are ever stored; the password
never leaves `derive_keys` / `verify_password`, which are CPU-heavy (PBKDF2)
and must run off the event loop.

Failure conditions (RFC 6120 section 6.5) raised by `ScramServer`:

* "malformed-request": syntax the grammar of RFC 5802 does not allow, a
  gs2 header that contradicts the chosen mechanism (-PLUS without ``p=``,
  ``p=`` on a plain mechanism, a channel binding type this connection
  cannot provide), the reserved ``m=`` extension, a nonce outside sane
  lengths, a user name SASLprep rejects, invalid UTF-8;
* "incorrect-encoding": bad base64 inside the ``c=`` or ``p=`` attribute;
* "not-authorized": anything that fails verification: channel binding data,
  nonce, proof, an unknown user (only at `finish`, so a client cannot tell
  unknown users from wrong passwords), and the ``y`` flag while a -PLUS
  mechanism was offered (a downgrade RFC 5802 says MUST fail).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from Crypto.Hash import SHA1, SHA256, SHA512
from Crypto.Protocol.KDF import PBKDF2

from xmppd.sasl import SASLFailure
from xmppd.sasl.saslprep import SASLPrepError, saslprep

SCRAM_HASHES: dict[str, str] = {"SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}
"""SCRAM hash names (as in mechanism names) to hashlib names."""

DEFAULT_ITERATIONS = 4096
MIN_ITERATIONS = 4096
"""RFC 7677 section 4: at least 4096; lower counts are refused everywhere."""
MAX_ITERATIONS = 10_000_000
"""Bounds the CPU one PLAIN login or one stored key string can cost."""
SALT_LENGTH = 16
"""Real and fake (unknown user) salts have this length, so length reveals nothing."""
MIN_NONCE_LENGTH = 8
MAX_NONCE_LENGTH = 256
MAX_USERNAME_BYTES = 1023
"""The XMPP localpart limit (RFC 7622); a longer name cannot be an account."""
MAX_MESSAGE_BYTES = 4096
"""Far above any legitimate SCRAM message; stops parsing huge input early."""

_FAKE_SALT_KEY = secrets.token_bytes(32)
_MECHANISM_RE = re.compile(r"SCRAM-(SHA-1|SHA-256|SHA-512)(-PLUS)?")
_ESCAPE_RE = re.compile(r"=(2C|3D)")
_BAD_ESCAPE_RE = re.compile(r"=(?!2C|3D)")
_ATTR_RE = re.compile(r"[A-Za-z]=")


def hashlib_name(hash_name: str) -> str:
    """Accept a SCRAM hash name ("SHA-256") or a hashlib name ("sha256"); return the latter."""
    if hash_name in SCRAM_HASHES:
        return SCRAM_HASHES[hash_name]
    if hash_name in SCRAM_HASHES.values():
        return hash_name
    raise ValueError(f"unsupported SCRAM hash: {hash_name!r}")


def _check_iterations(iterations: int) -> None:
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(
            f"iteration count {iterations} outside [{MIN_ITERATIONS}, {MAX_ITERATIONS}]"
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _hmac(hash_name: str, key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hash_name).digest()


@dataclass(frozen=True)
class ScramKeys:
    """What is stored for one account and one hash: never the password.

    `hash_name` is the hashlib name ("sha256"); a SCRAM name ("SHA-256") is
    accepted and normalised. Keys and salt are kept out of the repr so they
    cannot end up in logs.
    """

    hash_name: str
    salt: bytes = field(repr=False)
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hash_name", hashlib_name(self.hash_name))
        _check_iterations(self.iterations)
        if not self.salt:
            raise ValueError("empty salt")
        size = hashlib.new(self.hash_name).digest_size
        if len(self.stored_key) != size or len(self.server_key) != size:
            raise ValueError(f"{self.hash_name} keys must be {size} bytes")

    def encode(self) -> str:
        """The storage form: "sha256$4096$<salt>$<stored key>$<server key>" (base64)."""
        return "$".join(
            (
                self.hash_name,
                str(self.iterations),
                _b64(self.salt),
                _b64(self.stored_key),
                _b64(self.server_key),
            )
        )

    @classmethod
    def decode(cls, s: str) -> ScramKeys:
        """Parse `encode()` output; ValueError on anything else."""
        parts = s.split("$")
        if len(parts) != 5:
            raise ValueError("SCRAM key string must have 5 '$'-separated fields")
        hash_name, iterations, salt, stored_key, server_key = parts
        if not (iterations.isascii() and iterations.isdigit()):
            raise ValueError(f"bad iteration count {iterations!r}")
        try:
            return cls(
                hash_name,
                base64.b64decode(salt, validate=True),
                int(iterations),
                base64.b64decode(stored_key, validate=True),
                base64.b64decode(server_key, validate=True),
            )
        except binascii.Error as e:
            raise ValueError(f"bad base64 in SCRAM key string: {e}") from None


_PBKDF2_HASHES = {"sha1": SHA1, "sha256": SHA256, "sha512": SHA512}
"""pycryptodome's PBKDF2 rather than hashlib's: OpenSSL 3 re-initialises an
HMAC context through its provider layer at every iteration, which made
hashlib.pbkdf2_hmac-SHA1 1.6x slower here (4,096 rounds: 4.2 ms vs 2.6 ms)
than pycryptodome's loop over precomputed inner/outer digest states. Same
result bit for bit, same work factor; the C call releases the GIL too. This
is the largest part of a PLAIN login's CPU."""


def _salted_password(hash_name: str, prepared: str, salt: bytes, iterations: int) -> bytes:
    module = _PBKDF2_HASHES[hash_name]
    # Bytes, not str: pycryptodome would encode a str as latin-1. Its stub says str only.
    password: bytes = prepared.encode("utf-8")
    return PBKDF2(
        password,  # type: ignore[arg-type]
        salt,
        module.digest_size,
        iterations,
        hmac_hash_module=module,
    )


def derive_keys(
    hash_name: str, password: str, salt: bytes | None = None, iterations: int = DEFAULT_ITERATIONS
) -> ScramKeys:
    """Derive the stored keys for `password` (RFC 5802 section 3). CPU-heavy: run in a thread.

    The password is SASLprep'd as a stored string; a password SASLprep
    rejects, or one that is empty after preparation, raises SASLPrepError
    (a ValueError). A fresh random salt is used unless one is given.
    """
    name = hashlib_name(hash_name)
    _check_iterations(iterations)
    try:
        prepared = saslprep(password)
    except SASLPrepError:
        # Not the detailed reason: it names a character of the password, and errors get logged.
        raise SASLPrepError("password contains prohibited characters") from None
    if not prepared:
        raise SASLPrepError("empty password")
    if salt is None:
        salt = secrets.token_bytes(SALT_LENGTH)
    salted = _salted_password(name, prepared, salt, iterations)
    client_key = _hmac(name, salted, b"Client Key")
    return ScramKeys(
        hash_name=name,
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.new(name, client_key).digest(),
        server_key=_hmac(name, salted, b"Server Key"),
    )


def verify_password(keys: ScramKeys, password: str) -> bool:
    """True if `password` matches `keys` (for PLAIN). CPU-heavy: run in a thread.

    A password SASLprep rejects cannot match (registration refuses those), so
    it is simply False.
    """
    try:
        prepared = saslprep(password)
    except SASLPrepError:
        return False
    salted = _salted_password(keys.hash_name, prepared, keys.salt, keys.iterations)
    client_key = _hmac(keys.hash_name, salted, b"Client Key")
    return hmac.compare_digest(hashlib.new(keys.hash_name, client_key).digest(), keys.stored_key)


def _decode_utf8(data: bytes) -> str:
    if len(data) > MAX_MESSAGE_BYTES:
        raise SASLFailure("malformed-request", "SCRAM message too long")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLFailure("malformed-request", "SCRAM message is not valid UTF-8") from None


def _unescape_saslname(value: str) -> str:
    """RFC 5802 saslname: ',' and '=' travel as '=2C' and '=3D'; any other '=' is an error."""
    if _BAD_ESCAPE_RE.search(value):
        raise SASLFailure("malformed-request", "'=' in a name must be followed by 2C or 3D")
    return _ESCAPE_RE.sub(lambda m: "," if m[1] == "2C" else "=", value)


def _attribute(field_: str, key: str) -> str:
    if not field_.startswith(key + "="):
        raise SASLFailure("malformed-request", f"expected the {key}= attribute")
    return field_[2:]


def _check_extensions(fields: list[str]) -> None:
    """RFC 5802: unknown extensions are ignored, but they must be attributes and never m=."""
    for f in fields:
        if not _ATTR_RE.match(f):
            raise SASLFailure("malformed-request", "malformed SCRAM attribute")
        if f[0] == "m":
            raise SASLFailure("malformed-request", "SCRAM extensions (m=) are not supported")


def _valid_nonce(nonce: str) -> bool:
    return MIN_NONCE_LENGTH <= len(nonce) <= MAX_NONCE_LENGTH and all(
        0x21 <= ord(c) <= 0x7E and c != "," for c in nonce
    )


def _b64decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise SASLFailure("incorrect-encoding", f"bad base64 in {what}") from None


class ScramServer:
    """One SCRAM exchange: `start` -> (look up keys) -> `challenge` -> `finish`.

    Calling the steps out of order, or again after a failure, is a bug in the
    caller and raises RuntimeError. Keyword-only extras:

    * `fake_iterations`: the iteration count claimed for unknown users;
      set it to the count real accounts use, or the count gives them away.
    * `fake_salt_key`: the secret the unknown-user salt is derived from;
      nodes of one cluster should share it so answers agree across nodes.
      Defaults to a random per-process secret.
    * `server_nonce`: fixes the server's nonce part (known-answer tests).
    """

    __slots__ = (
        "mechanism",
        "hash_name",
        "plus",
        "authcid",
        "authzid",
        "cb_type",
        "_channel_bindings",
        "_plus_offered",
        "_fake_iterations",
        "_fake_salt_key",
        "_server_nonce",
        "_stage",
        "_cbind_input",
        "_client_first_bare",
        "_nonce",
        "_server_first",
        "_keys",
    )

    def __init__(
        self,
        mechanism: str,
        channel_bindings: Mapping[str, bytes],
        plus_offered: bool,
        *,
        fake_iterations: int = DEFAULT_ITERATIONS,
        fake_salt_key: bytes | None = None,
        server_nonce: str | None = None,
    ) -> None:
        m = _MECHANISM_RE.fullmatch(mechanism)
        if m is None:
            raise ValueError(f"not a SCRAM mechanism: {mechanism!r}")
        self.mechanism = mechanism
        self.hash_name = SCRAM_HASHES[m[1]]
        self.plus = m[2] is not None
        if self.plus and not channel_bindings:
            raise ValueError(f"{mechanism} needs channel binding data for this connection")
        _check_iterations(fake_iterations)
        if server_nonce is not None and not _valid_nonce(server_nonce):
            raise ValueError("server_nonce must be 8-256 printable ASCII characters without ','")
        self._channel_bindings = dict(channel_bindings)
        self._plus_offered = plus_offered or self.plus
        self._fake_iterations = fake_iterations
        self._fake_salt_key = fake_salt_key if fake_salt_key is not None else _FAKE_SALT_KEY
        self._server_nonce = server_nonce or secrets.token_urlsafe(24)
        self._stage = "start"
        self.authcid: str | None = None
        self.authzid: str | None = None
        self.cb_type: str | None = None  # the channel binding type the client used
        self._cbind_input = b""
        self._client_first_bare = ""
        self._nonce = ""
        self._server_first = ""
        self._keys: ScramKeys | None = None

    def _enter(self, expected: str) -> None:
        if self._stage != expected:
            raise RuntimeError(f"SCRAM step called in stage {self._stage!r}, expected {expected!r}")
        self._stage = "failed"  # until the step completes

    def start(self, client_first: bytes) -> str:
        """Parse client-first-message; return the SASLprep'd user name (authcid)."""
        self._enter("start")
        text = _decode_utf8(client_first)
        parts = text.split(",", 2)
        if len(parts) != 3:
            raise SASLFailure("malformed-request", "missing gs2 header")
        flag, authzid, bare = parts
        self._check_gs2_flag(flag)
        if authzid:
            self.authzid = _unescape_saslname(_attribute(authzid, "a")) or None

        fields = bare.split(",")
        if fields[0].startswith("m="):
            raise SASLFailure("malformed-request", "SCRAM extensions (m=) are not supported")
        if len(fields) < 2:
            raise SASLFailure("malformed-request", "client-first-message needs n= and r=")
        username = _unescape_saslname(_attribute(fields[0], "n"))
        client_nonce = _attribute(fields[1], "r")
        _check_extensions(fields[2:])
        if not _valid_nonce(client_nonce):
            raise SASLFailure("malformed-request", "client nonce has a bad length or characters")
        authcid = saslprep(username, allow_unassigned=True)
        if not authcid or len(authcid.encode("utf-8")) > MAX_USERNAME_BYTES:
            raise SASLFailure("malformed-request", "bad user name length")

        gs2_header = f"{flag},{authzid},".encode()
        cb_data = self._channel_bindings[self.cb_type] if self.cb_type else b""
        self._cbind_input = gs2_header + cb_data
        self._client_first_bare = bare
        self._nonce = client_nonce + self._server_nonce
        self.authcid = authcid
        self._stage = "challenge"
        return authcid

    def _check_gs2_flag(self, flag: str) -> None:
        if flag == "n":
            if self.plus:
                raise SASLFailure("malformed-request", f"{self.mechanism} requires channel binding")
        elif flag == "y":
            if self.plus:
                raise SASLFailure("malformed-request", f"{self.mechanism} requires channel binding")
            if self._plus_offered:
                raise SASLFailure(
                    "not-authorized", "channel binding was offered; possible downgrade attack"
                )
        elif flag.startswith("p="):
            cb_type = flag[2:]
            if not self.plus:
                raise SASLFailure(
                    "malformed-request", f"channel binding needs {self.mechanism}-PLUS"
                )
            if cb_type not in self._channel_bindings:
                raise SASLFailure("malformed-request", "unsupported channel binding type")
            self.cb_type = cb_type
        else:
            raise SASLFailure("malformed-request", "bad gs2 channel binding flag")

    def challenge(self, keys: ScramKeys | None) -> bytes:
        """Return server-first-message; pass None for an unknown user (fails at `finish`)."""
        self._enter("challenge")
        if keys is None:
            assert self.authcid is not None
            digest = _hmac(
                "sha256", self._fake_salt_key, f"{self.hash_name}\0{self.authcid}".encode()
            )
            salt, iterations = digest[:SALT_LENGTH], self._fake_iterations
        else:
            if keys.hash_name != self.hash_name:
                raise ValueError(f"{keys.hash_name} keys given to {self.mechanism}")
            salt, iterations = keys.salt, keys.iterations
        self._keys = keys
        self._server_first = f"r={self._nonce},s={_b64(salt)},i={iterations}"
        self._stage = "finish"
        return self._server_first.encode("ascii")

    def finish(self, client_final: bytes) -> bytes:
        """Verify client-final-message; return server-final-message ("v=...")."""
        self._enter("finish")
        text = _decode_utf8(client_final)
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        if not sep:
            raise SASLFailure("malformed-request", "client-final-message needs p= last")
        fields = without_proof.split(",")
        if len(fields) < 2:
            raise SASLFailure("malformed-request", "client-final-message needs c= and r=")
        cbind = _b64decode(_attribute(fields[0], "c"), "channel binding")
        nonce = _attribute(fields[1], "r")
        _check_extensions(fields[2:])
        proof = _b64decode(proof_b64, "proof")

        if not hmac.compare_digest(cbind, self._cbind_input):
            raise SASLFailure("not-authorized", "channel binding mismatch")
        if not hmac.compare_digest(nonce.encode("utf-8"), self._nonce.encode("ascii")):
            raise SASLFailure("not-authorized", "nonce mismatch")

        # For an unknown user the same work is done on zero keys, then refused.
        size = hashlib.new(self.hash_name).digest_size
        stored_key = self._keys.stored_key if self._keys else bytes(size)
        server_key = self._keys.server_key if self._keys else bytes(size)
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}"
        client_signature = _hmac(self.hash_name, stored_key, auth_message.encode("utf-8"))
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=False))
        ok = len(proof) == size and hmac.compare_digest(
            hashlib.new(self.hash_name, client_key).digest(), stored_key
        )
        if not ok or self._keys is None:
            raise SASLFailure("not-authorized")
        server_signature = _hmac(self.hash_name, server_key, auth_message.encode("utf-8"))
        self._stage = "done"
        return b"v=" + _b64(server_signature).encode("ascii")
