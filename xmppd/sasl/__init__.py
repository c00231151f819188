"""SASL for xmppd: sans-IO mechanisms the stream core drives step by step.

Nothing in this package touches a socket or the event loop; key derivation
(PBKDF2) is plain CPU work that callers run in an executor.
"""

from __future__ import annotations

CONDITIONS = frozenset(
    {
        "aborted",
        "account-disabled",
        "credentials-expired",
        "encryption-required",
        "incorrect-encoding",
        "invalid-authzid",
        "invalid-mechanism",
        "malformed-request",
        "mechanism-too-weak",
        "not-authorized",
        "temporary-auth-failure",
    }
)
"""The SASL failure conditions of RFC 6120 section 6.5."""


class SASLFailure(Exception):
    """A SASL exchange failed; the stream core turns this into a <failure/> element.

    `condition` is always one of CONDITIONS so the core can put it on the
    wire without checking; `text` is a human-readable hint that never says
    whether an account exists.
    """

    def __init__(self, condition: str, text: str | None = None) -> None:
        if condition not in CONDITIONS:
            raise ValueError(f"not an RFC 6120 SASL condition: {condition!r}")
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
