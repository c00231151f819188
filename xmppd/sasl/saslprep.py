"""SASLprep (RFC 4013), the stringprep profile for SASL user names and passwords.

Errors: a string SASLprep rejects raises `SASLPrepError`, which is both a
`SASLFailure` with condition "malformed-request" (so a SASL mechanism can let
it propagate to the stream core unchanged) and a `ValueError` (so code that
is not speaking SASL, such as account registration, can catch the ordinary
exception type).

The stdlib `stringprep` tables are those of Unicode 3.2, so normalisation
uses `unicodedata.ucd_3_2_0` too: mixing versions would let two servers with
different Python builds prepare the same password differently.
"""

from __future__ import annotations

import stringprep
import unicodedata
from collections.abc import Callable

from xmppd.sasl import SASLFailure


class SASLPrepError(SASLFailure, ValueError):
    """The string contains something RFC 4013 prohibits."""

    def __init__(self, text: str) -> None:
        super().__init__("malformed-request", text)


_PROHIBITED: tuple[tuple[Callable[[str], bool], str], ...] = (
    (stringprep.in_table_c12, "non-ASCII space"),
    (stringprep.in_table_c21_c22, "control character"),
    (stringprep.in_table_c3, "private use character"),
    (stringprep.in_table_c4, "non-character code point"),
    (stringprep.in_table_c5, "surrogate code point"),
    (stringprep.in_table_c6, "character inappropriate for plain text"),
    (stringprep.in_table_c7, "character inappropriate for canonical representation"),
    (stringprep.in_table_c8, "change display property or deprecated character"),
    (stringprep.in_table_c9, "tagging character"),
)


def saslprep(s: str, allow_unassigned: bool = False) -> str:
    """Prepare `s` per RFC 4013; raise SASLPrepError when it is prohibited.

    `allow_unassigned=True` treats `s` as a "query" string (RFC 3454 section
    7): what a client presents at login. Strings that will be stored, or that
    keys will be derived from, use the default "stored string" rules so that
    a later Unicode version cannot change their meaning.

    An empty result is returned as is; whether empty is acceptable is the
    caller's decision (it never is for a user name or password).
    """
    # RFC 4013 2.1 mapping: non-ASCII spaces to SPACE, "commonly mapped to nothing" removed.
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in s if not stringprep.in_table_b1(c)
    )
    # RFC 4013 2.2: NFKC.
    prepared = unicodedata.ucd_3_2_0.normalize("NFKC", mapped)

    for c in prepared:
        for in_table, what in _PROHIBITED:
            if in_table(c):
                raise SASLPrepError(f"prohibited {what} U+{ord(c):04X}")
        if not allow_unassigned and stringprep.in_table_a1(c):
            raise SASLPrepError(f"unassigned code point U+{ord(c):04X}")

    _check_bidi(prepared)
    return prepared


def _check_bidi(s: str) -> None:
    """RFC 3454 section 6: right-to-left text must be wholly and visibly so."""
    if not any(stringprep.in_table_d1(c) for c in s):
        return
    if any(stringprep.in_table_d2(c) for c in s):
        raise SASLPrepError("mixes right-to-left and left-to-right characters")
    if not (stringprep.in_table_d1(s[0]) and stringprep.in_table_d1(s[-1])):
        raise SASLPrepError("right-to-left text must start and end with a right-to-left character")
