"""Whether a string can go into XML at all, checked before it is stored or sent.

Operators' words (a kick or ban reason, an announcement, a roster name typed on a
command line) reach the server as JSON or argv strings, which may hold control
characters or lone surrogates. lxml refuses those only when the element is built,
which for a stored ban reason is every later login of the account: so they are
refused where they come in, with an answer naming the field."""

from __future__ import annotations

from lxml import etree


def xml_can_carry(text: str) -> bool:
    """False for text XML 1.0 cannot hold (control characters, lone surrogates)."""
    try:
        etree.Element("x").set("v", text)
    except ValueError:  # UnicodeEncodeError included
        return False
    return True
