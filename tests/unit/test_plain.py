"""PLAIN parsing and SASLprep (RFC 4616, RFC 4013)."""

from __future__ import annotations

import unicodedata

import pytest

from xmppd.sasl import CONDITIONS, SASLFailure
from xmppd.sasl.plain import parse_plain
from xmppd.sasl.saslprep import SASLPrepError, saslprep

# --- PLAIN ---------------------------------------------------------------------------------


def test_without_authzid() -> None:
    assert parse_plain(b"\0juliet\0r0m30") == (None, "juliet", "r0m30")


def test_with_authzid_kept_verbatim() -> None:
    assert parse_plain(b"Juliet@Example.com\0juliet\0pw") == ("Juliet@Example.com", "juliet", "pw")


def test_fields_are_saslprepped() -> None:
    data = "\0us\u00ader\0I\u00adX\u00a0\u2168".encode()
    assert parse_plain(data) == (None, "user", "IX IX")


def test_unassigned_code_points_are_allowed_as_query_strings() -> None:
    assert parse_plain("\0u\u0221\0p\u0221".encode()) == (None, "u\u0221", "p\u0221")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"juliet",
        b"\0juliet",
        b"\0juliet\0pw\0",
        b"a\0b\0c\0d",
        b"\0\0pw",
        b"\0juliet\0",
        b"\0\xad\0pw",  # not UTF-8 (a lone continuation byte)
        "\0\u00ad\0pw".encode(),  # empty after SASLprep
        "\0juliet\0\u00ad".encode(),
        b"\0jul\xffiet\0pw",
        b"\0juliet\0p\xc3",
        b"\0jul\x07iet\0pw",
        b"\0juliet\0" + b"p" * 1024,
        b"\0" + b"u" * 1024 + b"\0pw",
        "\0\u0627a\0pw".encode(),  # bidi violation
    ],
)
def test_malformed(data: bytes) -> None:
    with pytest.raises(SASLFailure) as info:
        parse_plain(data)
    assert info.value.condition == "malformed-request"


def test_prohibited_password_error_does_not_describe_the_password() -> None:
    with pytest.raises(SASLFailure) as info:
        parse_plain(b"\0juliet\0secret\x07")
    assert info.value.text is not None and "0007" not in info.value.text


def test_failure_conditions_are_rfc6120_only() -> None:
    assert len(CONDITIONS) == 11
    with pytest.raises(ValueError):
        SASLFailure("bad-auth")
    failure = SASLFailure("aborted")
    assert (failure.condition, failure.text) == ("aborted", None)


# --- SASLprep ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "prepared"),
    [  # RFC 4013 section 3, then a few more mapping cases
        ("I\u00adX", "IX"),
        ("user", "user"),
        ("USER", "USER"),
        ("\u00aa", "a"),
        ("\u2168", "IX"),
        ("a\u00a0b\u3000c", "a b c"),
        ("\u200bzero\ufeffwidth", "zerowidth"),
        ("", ""),
        ("\u05d0\u05d1", "\u05d0\u05d1"),  # right-to-left only is fine
        ("\u05d01\u05d1", "\u05d01\u05d1"),  # neutral digits inside RTL are fine
    ],
)
def test_saslprep_maps(source: str, prepared: str) -> None:
    assert saslprep(source) == prepared
    assert saslprep(prepared) == prepared


@pytest.mark.parametrize(
    "source",
    [
        "\u0007",  # RFC 4013 example: control character
        "\u0627\u0031",  # RFC 4013 example: RandALCat not last
        "\u0031\u0627",  # nor first
        "\u05d0a\u05d1",  # RTL mixed with LTR
        "a\u0080",  # C.2.2
        "\ue000",  # private use
        "\ufdd0",  # non-character
        "\u2ff0",  # inappropriate for canonical representation
        "\u200e",  # change display properties
        "\U000e0001",  # tagging
        "\ufff9",  # inappropriate for plain text
    ],
)
def test_saslprep_prohibits(source: str) -> None:
    with pytest.raises(SASLPrepError) as info:
        saslprep(source)
    # Both ways of catching it work: as a SASL failure and as a ValueError.
    assert isinstance(info.value, SASLFailure) and isinstance(info.value, ValueError)
    assert info.value.condition == "malformed-request"


def test_saslprep_unassigned_only_in_queries() -> None:
    with pytest.raises(SASLPrepError):
        saslprep("a\u0221")  # unassigned in Unicode 3.2, the stringprep version
    assert saslprep("a\u0221", allow_unassigned=True) == "a\u0221"


def test_saslprep_uses_unicode_3_2_normalisation() -> None:
    # U+2F868 normalises differently in Unicode 3.2 than in later versions (a corrigendum).
    source = "\U0002f868"
    assert unicodedata.ucd_3_2_0.normalize("NFKC", source) != unicodedata.normalize("NFKC", source)
    assert saslprep(source) == unicodedata.ucd_3_2_0.normalize("NFKC", source)
