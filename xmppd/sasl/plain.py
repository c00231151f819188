"""PLAIN (RFC 4616): one message, "[authzid] NUL authcid NUL passwd".

Only parsing lives here; checking the password against stored SCRAM keys is
`Accounts.verify_plain`, which runs PBKDF2 off the event loop.

Conditions: "malformed-request" for anything that is not a well-formed
PLAIN message (wrong number of NULs, empty user name or password, invalid
UTF-8, over-long fields, strings SASLprep rejects). "incorrect-encoding" is,
per RFC 6120 section 6.5.2, about the base64 layer, which the stream core
decodes before calling `parse_plain`; it raises that condition itself.
"""

from __future__ import annotations

from xmppd.sasl import SASLFailure
from xmppd.sasl.saslprep import SASLPrepError, saslprep

MAX_FIELD_BYTES = 1023
"""RFC 4616 requires accepting 255 octets; 1023 is the XMPP localpart limit."""


def parse_plain(data: bytes) -> tuple[str | None, str, str]:
    """Return (authzid or None, authcid, password), the last two SASLprep'd as query strings.

    The authzid is a JID and is returned unprepared: the stream core checks it
    with JID rules and answers "invalid-authzid" itself.
    """
    parts = data.split(b"\0")
    if len(parts) != 3:
        raise SASLFailure("malformed-request", "PLAIN message must contain exactly two NULs")
    if any(len(p) > MAX_FIELD_BYTES for p in parts):
        raise SASLFailure("malformed-request", "PLAIN field too long")
    try:
        authzid, authcid, password = (p.decode("utf-8") for p in parts)
    except UnicodeDecodeError:
        raise SASLFailure("malformed-request", "PLAIN message is not valid UTF-8") from None
    authcid = saslprep(authcid, allow_unassigned=True)
    try:
        password = saslprep(password, allow_unassigned=True)
    except SASLPrepError:
        # Not the detailed reason: it names a character of the password, and texts get logged.
        raise SASLFailure("malformed-request", "password contains prohibited characters") from None
    if not authcid:
        raise SASLFailure("malformed-request", "empty user name")
    if not password:
        raise SASLFailure("malformed-request", "empty password")
    return authzid or None, authcid, password
