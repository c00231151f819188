"""SCRAM server: scramp (an independent implementation) as the client, RFC vectors, abuse."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import scramp

from xmppd.sasl import SASLFailure
from xmppd.sasl.mechanisms import scram_hash_of
from xmppd.sasl.scram import (
    SALT_LENGTH,
    ScramKeys,
    ScramServer,
    derive_keys,
    verify_password,
)

PLAIN_MECHS = ["SCRAM-SHA-1", "SCRAM-SHA-256", "SCRAM-SHA-512"]
PLUS_MECHS = [m + "-PLUS" for m in PLAIN_MECHS]
CB = {"tls-server-end-point": b"\x01" * 32, "tls-unique": b"\x02" * 12}

_KEYS: dict[tuple[str, str], ScramKeys] = {}


def keys_for(mechanism: str, password: str = "pencil") -> ScramKeys:
    """Derive once per (hash, password): PBKDF2 is the slow part of these tests."""
    cache_key = (scram_hash_of(mechanism), password)
    if cache_key not in _KEYS:
        _KEYS[cache_key] = derive_keys(cache_key[0], password)
    return _KEYS[cache_key]


def run(
    server: ScramServer,
    client: scramp.ScramClient,
    keys: ScramKeys | None,
) -> None:
    """A full exchange; the client also checks the server's signature."""
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(keys).decode())
    final = server.finish(client.get_client_final().encode())
    client.set_server_final(final.decode())


# --- happy paths against scramp ------------------------------------------------------------


@pytest.mark.parametrize("mechanism", PLAIN_MECHS)
def test_scramp_client_without_channel_binding(mechanism: str) -> None:
    server = ScramServer(mechanism, {}, plus_offered=False)
    client = scramp.ScramClient([mechanism], "user", "pencil")
    run(server, client, keys_for(mechanism))
    assert server.authcid == "user"
    assert server.authzid is None
    assert server.cb_type is None


@pytest.mark.parametrize("cb_type", ["tls-server-end-point", "tls-unique"])
@pytest.mark.parametrize("mechanism", PLUS_MECHS)
def test_scramp_client_plus(mechanism: str, cb_type: str) -> None:
    server = ScramServer(mechanism, CB, plus_offered=True)
    client = scramp.ScramClient(
        [mechanism], "user", "pencil", channel_binding=(cb_type, CB[cb_type])
    )
    run(server, client, keys_for(mechanism))
    assert server.cb_type == cb_type


@pytest.mark.parametrize("mechanism", PLAIN_MECHS)
def test_y_flag_accepted_when_no_plus_offered(mechanism: str) -> None:
    """A CB-capable client on a server without -PLUS sends 'y'; that is fine."""
    server = ScramServer(mechanism, {}, plus_offered=False)
    cb = ("tls-server-end-point", CB["tls-server-end-point"])
    client = scramp.ScramClient([mechanism], "user", "pencil", channel_binding=cb)
    first = client.get_client_first()
    assert first.startswith("y,,")
    server.start(first.encode())
    client.set_server_first(server.challenge(keys_for(mechanism)).decode())
    client.set_server_final(server.finish(client.get_client_final().encode()).decode())


def test_username_escapes_and_saslprep() -> None:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "a,b=c\u00ad", "pencil")
    run(server, client, keys_for("SCRAM-SHA-256"))
    assert server.authcid == "a,b=c"


def test_password_is_saslprepped_like_the_client_does() -> None:
    """Stored keys come from the SASLprep'd password, so a client whose different
    spelling prepares to the same string logs in, and only such a client."""
    keys = derive_keys("sha256", "I\u00adX")
    # The soft hyphen is mapped to nothing: the keys are those of "IX".
    assert keys == derive_keys("sha256", "IX", salt=keys.salt)

    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "\u2168")  # ROMAN NINE: NFKC "IX"
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(keys).decode())
    final = server.finish(client.get_client_final().encode())
    # Accepted, and the server proves the same salted password as the client derived.
    assert final == b"v=" + base64.b64encode(client.server_signature)

    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    other = scramp.ScramClient(["SCRAM-SHA-256"], "user", "XI")
    server.start(other.get_client_first().encode())
    other.set_server_first(server.challenge(keys).decode())
    expect_failure("not-authorized", server.finish, other.get_client_final().encode())


def test_higher_iteration_count_is_announced() -> None:
    keys = derive_keys("sha1", "pencil", iterations=5000)
    server = ScramServer("SCRAM-SHA-1", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-1"], "user", "pencil")
    server.start(client.get_client_first().encode())
    first = server.challenge(keys).decode()
    assert first.endswith(",i=5000")
    client.set_server_first(first)
    client.set_server_final(server.finish(client.get_client_final().encode()).decode())


# --- failures ------------------------------------------------------------------------------


def expect_failure(condition: str, fn, *args) -> SASLFailure:  # type: ignore[no-untyped-def]
    with pytest.raises(SASLFailure) as info:
        fn(*args)
    assert info.value.condition == condition
    return info.value


@pytest.mark.parametrize("mechanism", PLAIN_MECHS + PLUS_MECHS)
def test_wrong_password(mechanism: str) -> None:
    plus = mechanism.endswith("-PLUS")
    server = ScramServer(mechanism, CB if plus else {}, plus_offered=plus)
    cb = ("tls-server-end-point", CB["tls-server-end-point"]) if plus else None
    client = scramp.ScramClient([mechanism], "user", "wrong", channel_binding=cb)
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(keys_for(mechanism)).decode())
    expect_failure("not-authorized", server.finish, client.get_client_final().encode())


@pytest.mark.parametrize("cb_type", ["tls-server-end-point", "tls-unique"])
def test_wrong_channel_binding_data(cb_type: str) -> None:
    server = ScramServer("SCRAM-SHA-256-PLUS", CB, plus_offered=True)
    client = scramp.ScramClient(
        ["SCRAM-SHA-256-PLUS"], "user", "pencil", channel_binding=(cb_type, b"\x99" * 32)
    )
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(keys_for("SCRAM-SHA-256")).decode())
    failure = expect_failure("not-authorized", server.finish, client.get_client_final().encode())
    assert failure.text == "channel binding mismatch"


def test_y_flag_while_plus_offered_is_a_downgrade() -> None:
    server = ScramServer("SCRAM-SHA-256", CB, plus_offered=True)
    cb = ("tls-server-end-point", CB["tls-server-end-point"])
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "pencil", channel_binding=cb)
    expect_failure("not-authorized", server.start, client.get_client_first().encode())


def test_unavailable_channel_binding_type() -> None:
    server = ScramServer(
        "SCRAM-SHA-256-PLUS", {"tls-server-end-point": b"x" * 32}, plus_offered=True
    )
    client = scramp.ScramClient(
        ["SCRAM-SHA-256-PLUS"], "user", "pencil", channel_binding=("tls-unique", b"u" * 12)
    )
    failure = expect_failure("malformed-request", server.start, client.get_client_first().encode())
    assert failure.text == "unsupported channel binding type"


def test_plus_mechanism_without_channel_binding() -> None:
    server = ScramServer("SCRAM-SHA-256-PLUS", CB, plus_offered=True)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "pencil")  # sends "n,,"
    expect_failure("malformed-request", server.start, client.get_client_first().encode())


def test_channel_binding_on_non_plus_mechanism() -> None:
    server = ScramServer("SCRAM-SHA-256", CB, plus_offered=True)
    expect_failure(
        "malformed-request", server.start, b"p=tls-server-end-point,,n=user,r=abcdefghijkl"
    )


def test_plus_without_any_binding_data_is_a_caller_bug() -> None:
    with pytest.raises(ValueError):
        ScramServer("SCRAM-SHA-256-PLUS", {}, plus_offered=True)
    with pytest.raises(ValueError):
        ScramServer("SCRAM-MD5", {}, plus_offered=False)


def test_tampered_nonce() -> None:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "pencil")
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(keys_for("SCRAM-SHA-256")).decode())
    final = client.get_client_final()
    c, r, p = final.split(",")
    tampered = f"{c},{r[:-1]}{'A' if r[-1] != 'A' else 'B'},{p}"
    assert expect_failure("not-authorized", server.finish, tampered.encode()).text == (
        "nonce mismatch"
    )


def client_final_parts(mechanism: str) -> tuple[ScramServer, str, str, bytes]:
    """A started exchange and the scramp client's final message split into c=, r=, proof."""
    server = ScramServer(mechanism, {}, plus_offered=False)
    client = scramp.ScramClient([mechanism], "user", "pencil")
    server.start(client.get_client_first().encode())
    client.set_server_first(server.challenge(keys_for(mechanism)).decode())
    c, r, p = client.get_client_final().split(",")
    return server, c, r, base64.b64decode(p[2:])


def test_tampered_proof() -> None:
    server, c, r, proof = client_final_parts("SCRAM-SHA-1")
    flipped = bytes([proof[0] ^ 1]) + proof[1:]
    bad = f"{c},{r},p={base64.b64encode(flipped).decode()}"
    expect_failure("not-authorized", server.finish, bad.encode())


def test_truncated_proof() -> None:
    server, c, r, proof = client_final_parts("SCRAM-SHA-1")
    short = f"{c},{r},p={base64.b64encode(proof[:10]).decode()}"
    expect_failure("not-authorized", server.finish, short.encode())


GOOD_NONCE = "abcdefghijkl"


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"n,,",
        b"n,",
        b"x,,n=user,r=" + GOOD_NONCE.encode(),
        b"n,,r=" + GOOD_NONCE.encode(),
        b"n,,n=user",
        b"n,,n=user,x=" + GOOD_NONCE.encode(),
        b"n,,m=ext,n=user,r=" + GOOD_NONCE.encode(),
        b"n,,n=user,r=" + GOOD_NONCE.encode() + b",m=ext",
        b"n,,n=user,r=" + GOOD_NONCE.encode() + b",junk",
        b"n,,n=us=er,r=" + GOOD_NONCE.encode(),
        b"n,,n=us=2,r=" + GOOD_NONCE.encode(),
        b"n,,n=,r=" + GOOD_NONCE.encode(),
        b"n,,n=\xad,r=" + GOOD_NONCE.encode(),
        b"n,,n=us\x07er,r=" + GOOD_NONCE.encode(),
        b"n,,n=\xff\xfe,r=" + GOOD_NONCE.encode(),
        b"n,,n=user,r=short",
        b"n,,n=user,r=" + b"x" * 257,
        b"n,,n=user,r=abc def ghi jkl",
        b"n,b=admin,n=user,r=" + GOOD_NONCE.encode(),
        b"n,,n=" + b"u" * 1024 + b",r=" + GOOD_NONCE.encode(),
        b"n,,n=user,r=" + GOOD_NONCE.encode() + b"," + b"x=y," * 2000,
    ],
)
def test_malformed_client_first(message: bytes) -> None:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    expect_failure("malformed-request", server.start, message)
    with pytest.raises(RuntimeError):  # a failed exchange is over
        server.challenge(None)


def test_unknown_extension_is_ignored() -> None:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    assert server.start(b"n,,n=user,r=" + GOOD_NONCE.encode() + b",x=whatever") == "user"


def started_server() -> tuple[ScramServer, str]:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False, server_nonce="S" * 16)
    server.start(b"n,,n=user,r=" + GOOD_NONCE.encode())
    server.challenge(keys_for("SCRAM-SHA-256"))
    return server, GOOD_NONCE + "S" * 16


@pytest.mark.parametrize(
    ("template", "condition"),
    [
        ("", "malformed-request"),
        ("c=biws,r={nonce}", "malformed-request"),
        ("r={nonce},c=biws,p=AAAA", "malformed-request"),
        ("c=biws,p=AAAA", "malformed-request"),
        ("c=biws,r={nonce},m=x,p=AAAA", "malformed-request"),
        ("c=biws,r={nonce},junk,p=AAAA", "malformed-request"),
        ("c=bi!s,r={nonce},p=AAAA", "incorrect-encoding"),
        ("c=biws,r={nonce},p=AA=A", "incorrect-encoding"),
        ("c=biws,r={nonce},p=", "not-authorized"),
        ("c=eSws,r={nonce},p=AAAA", "not-authorized"),  # "y,," instead of "n,,"
    ],
)
def test_malformed_client_final(template: str, condition: str) -> None:
    server, nonce = started_server()
    expect_failure(condition, server.finish, template.format(nonce=nonce).encode())
    with pytest.raises(RuntimeError):
        server.finish(b"c=biws")


def test_invalid_utf8_client_final() -> None:
    server, _ = started_server()
    expect_failure("malformed-request", server.finish, b"c=biws,r=\xff,p=AAAA")


def test_steps_out_of_order() -> None:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    with pytest.raises(RuntimeError):
        server.challenge(None)
    server.start(b"n,,n=user,r=" + GOOD_NONCE.encode())
    with pytest.raises(RuntimeError):
        server.start(b"n,,n=user,r=" + GOOD_NONCE.encode())
    with pytest.raises(RuntimeError):
        server.finish(b"c=biws,r=x,p=AAAA")
    with pytest.raises(ValueError):
        server.challenge(keys_for("SCRAM-SHA-1"))  # keys of another hash


# --- authzid -------------------------------------------------------------------------------


def client_final(
    hash_name: str,
    password: str,
    gs2_header: bytes,
    client_first_bare: str,
    server_first: str,
    cb_data: bytes = b"",
) -> tuple[str, bytes]:
    """RFC 5802 section 3, written out for gs2 headers scramp cannot produce."""
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salted = hashlib.pbkdf2_hmac(
        hash_name, password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"])
    )
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    stored_key = hashlib.new(hash_name, client_key).digest()
    without_proof = f"c={base64.b64encode(gs2_header + cb_data).decode()},r={attrs['r']}"
    auth = f"{client_first_bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth, hash_name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    server_key = hmac.new(salted, b"Server Key", hash_name).digest()
    expected_v = b"v=" + base64.b64encode(hmac.new(server_key, auth, hash_name).digest())
    return f"{without_proof},p={base64.b64encode(proof).decode()}", expected_v


@pytest.mark.parametrize(
    ("gs2_header", "authzid"),
    [
        (b"n,a=admin=2Cx=3D@example.com,", "admin,x=@example.com"),
        (b"n,a=juliet@example.com,", "juliet@example.com"),
        (b"p=tls-unique,a=romeo@example.net,", "romeo@example.net"),
        (b"n,a=,", None),
    ],
)
def test_authzid_passthrough(gs2_header: bytes, authzid: str | None) -> None:
    plus = gs2_header.startswith(b"p=")
    server = ScramServer("SCRAM-SHA-256-PLUS" if plus else "SCRAM-SHA-256", CB, plus_offered=True)
    bare = "n=user,r=" + GOOD_NONCE
    assert server.start(gs2_header + bare.encode()) == "user"
    assert server.authzid == authzid
    server_first = server.challenge(keys_for("SCRAM-SHA-256")).decode()
    cb_data = CB["tls-unique"] if plus else b""
    final, expected = client_final("sha256", "pencil", gs2_header, bare, server_first, cb_data)
    assert server.finish(final.encode()) == expected


def test_authzid_is_bound_into_channel_binding_input() -> None:
    """A client cannot drop or change the authzid between messages (c= covers it)."""
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    bare = "n=user,r=" + GOOD_NONCE
    server.start(b"n,a=admin@example.com," + bare.encode())
    server_first = server.challenge(keys_for("SCRAM-SHA-256")).decode()
    final, _ = client_final("sha256", "pencil", b"n,,", bare, server_first)
    expect_failure("not-authorized", server.finish, final.encode())


# --- unknown users -------------------------------------------------------------------------


def server_first_attrs(user: str, keys: ScramKeys | None, **options: object) -> dict[str, str]:
    server = ScramServer("SCRAM-SHA-256", {}, plus_offered=False, **options)  # type: ignore[arg-type]
    server.start(f"n,,n={user},r={GOOD_NONCE}".encode())
    return dict(a.split("=", 1) for a in server.challenge(keys).decode().split(","))


def test_unknown_user_looks_like_a_known_one_until_finish() -> None:
    known = server_first_attrs("alice", keys_for("SCRAM-SHA-256"))
    ghost = server_first_attrs("ghost", None)
    assert ghost.keys() == known.keys()
    assert len(base64.b64decode(ghost["s"])) == len(base64.b64decode(known["s"])) == SALT_LENGTH
    assert ghost["i"] == known["i"] == "4096"
    # Deterministic: asking again gives the same salt, as for a real account.
    assert server_first_attrs("ghost", None)["s"] == ghost["s"]
    assert server_first_attrs("other", None)["s"] != ghost["s"]
    # Nodes of a cluster that share the secret agree; the claimed count follows the config.
    shared = {"fake_salt_key": b"k" * 32, "fake_iterations": 10000}
    a = server_first_attrs("ghost", None, **shared)
    b = server_first_attrs("ghost", None, **shared)
    assert a["s"] == b["s"] != ghost["s"]
    assert a["i"] == "10000"


def test_unknown_user_fails_at_finish_like_a_wrong_password() -> None:
    ghost = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "ghost", "pencil")
    ghost.start(client.get_client_first().encode())
    client.set_server_first(ghost.challenge(None).decode())  # the client sees nothing odd
    unknown = expect_failure("not-authorized", ghost.finish, client.get_client_final().encode())

    known = ScramServer("SCRAM-SHA-256", {}, plus_offered=False)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "wrong")
    known.start(client.get_client_first().encode())
    client.set_server_first(known.challenge(keys_for("SCRAM-SHA-256")).decode())
    wrong = expect_failure("not-authorized", known.finish, client.get_client_final().encode())
    assert unknown.text == wrong.text


# --- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "salt", "client_nonce", "server_nonce", "proof", "signature"),
    [
        (  # RFC 5802 section 5
            "SCRAM-SHA-1",
            "QSXCR+Q6sek8bf92",
            "fyko+d2lbbFgONRv9qkxdawL",
            "3rfcNHYJY1ZVvWVs7j",
            "v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
            "rmF9pqV8S7suAoZWja4dJRkFsKQ=",
        ),
        (  # RFC 7677 section 3
            "SCRAM-SHA-256",
            "W22ZaJ0SNY7soEsUEjb6gQ==",
            "rOprNGfwEbeRWgbNEkqO",
            "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        ),
    ],
)
def test_rfc_vectors(
    mechanism: str, salt: str, client_nonce: str, server_nonce: str, proof: str, signature: str
) -> None:
    keys = derive_keys(scram_hash_of(mechanism), "pencil", base64.b64decode(salt), 4096)
    server = ScramServer(mechanism, {}, plus_offered=False, server_nonce=server_nonce)
    assert server.start(f"n,,n=user,r={client_nonce}".encode()) == "user"
    nonce = client_nonce + server_nonce
    assert server.challenge(keys) == f"r={nonce},s={salt},i=4096".encode()
    final = f"c=biws,r={nonce},p={proof}".encode()
    assert server.finish(final) == f"v={signature}".encode()
    assert verify_password(keys, "pencil")
    assert not verify_password(keys, "pencil2")


# --- keys ----------------------------------------------------------------------------------


def test_keys_storage_round_trip_and_repr() -> None:
    keys = keys_for("SCRAM-SHA-512")
    encoded = keys.encode()
    assert encoded.startswith("sha512$4096$")
    assert ScramKeys.decode(encoded) == keys
    assert base64.b64encode(keys.stored_key).decode() not in repr(keys)
    assert ScramKeys("SHA-256", b"s", 4096, b"k" * 32, b"k" * 32).hash_name == "sha256"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "sha256$4096$c2FsdA==$AAAA",
        "md5$4096$c2FsdA==$" + "A" * 24 + "$" + "A" * 24,
        "sha1$1000$c2FsdA==$" + "A" * 28 + "$" + "A" * 28,
        "sha1$+4096$c2FsdA==$" + "A" * 28 + "$" + "A" * 28,
        "sha1$4096$c2F!dA==$" + "A" * 28 + "$" + "A" * 28,
        "sha1$4096$c2FsdA==$AAAA$AAAA",
        "sha1$4096$$" + "A" * 28 + "$" + "A" * 28,
    ],
)
def test_keys_decode_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        ScramKeys.decode(bad)


def test_derive_keys_limits() -> None:
    with pytest.raises(ValueError):
        derive_keys("sha256", "pencil", iterations=1000)
    with pytest.raises(ValueError):
        derive_keys("md5", "pencil")
    with pytest.raises(ValueError):
        derive_keys("sha256", "\u00ad")  # empty after SASLprep
    with pytest.raises(ValueError) as info:
        derive_keys("sha256", "secret\x07")
    assert "0007" not in str(info.value)  # the error does not describe the password
    a, b = derive_keys("sha1", "pencil"), derive_keys("sha1", "pencil")
    assert a.salt != b.salt and len(a.salt) == SALT_LENGTH


def test_verify_password_saslprep_and_prohibited() -> None:
    keys = derive_keys("sha1", "I\u00adX")
    assert verify_password(keys, "IX")
    assert verify_password(keys, "\u2168")
    assert not verify_password(keys, "IX\x07")


def test_scramp_agrees_on_derived_keys() -> None:
    for hash_name in ("SHA-1", "SHA-256", "SHA-512"):
        salt = b"0123456789abcdef"
        ours = derive_keys(hash_name, "pencil", salt, 4096)
        s, stored, server, i = scramp.ScramMechanism(f"SCRAM-{hash_name}").make_auth_info(
            "pencil", iteration_count=4096, salt=salt
        )
        assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (
            s,
            stored,
            server,
            i,
        )


@pytest.mark.parametrize("hash_name", ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize(
    "password",
    ["p", "pencil", "ü" * 40, "x" * 64, "y" * 65, "z" * 128, "w" * 129, "ключ漢字" * 50],
)
def test_keys_match_hashlib_pbkdf2(hash_name: str, password: str) -> None:
    """The fast PBKDF2 must agree with OpenSSL's on every key length edge of HMAC
    (passwords shorter than, equal to and longer than the hash's block size)."""
    salt = bytes(range(16))
    keys = derive_keys(hash_name, password, salt, 4096)
    salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, 4096)
    client_key = hmac.new(salted, b"Client Key", hash_name).digest()
    assert keys.stored_key == hashlib.new(hash_name, client_key).digest()
    assert keys.server_key == hmac.new(salted, b"Server Key", hash_name).digest()
    assert verify_password(keys, password)
    assert not verify_password(keys, password + "!")
