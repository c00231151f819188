"""Which unacked messages stream management never routes again: the copies the server
made for one session only (modules/stream_management.py, `_copy_for_one`)."""

from __future__ import annotations

import pytest
from lxml import etree

from xmppd.modules.stream_management import _copy_for_one

CARBON = (
    "<message xmlns='jabber:client' from='{frm}' to='alice@localhost/phone' type='chat'>"
    "<{kind} xmlns='urn:xmpp:carbons:2'><forwarded xmlns='urn:xmpp:forward:0'>"
    "<message xmlns='jabber:client' from='alice@localhost/desk' to='bob@localhost'"
    " type='chat'><body>hi</body></message></forwarded></{kind}></message>"
)
EVENT = (
    "<message xmlns='jabber:client' from='bob@localhost' to='{to}' type='normal'>"
    "<event xmlns='http://jabber.org/protocol/pubsub#event'>"
    "<items node='urn:xmpp:avatar:metadata'/></event></message>"
)


@pytest.mark.parametrize(
    ("xml", "copy"),
    [
        (CARBON.format(frm="alice@localhost", kind="sent"), True),
        (CARBON.format(frm="alice@localhost", kind="received"), True),
        # someone else's message that merely carries a carbon element: an original
        (CARBON.format(frm="mallory@localhost/x", kind="received"), False),
        (EVENT.format(to="alice@localhost/phone"), True),  # that resource's own notification
        (EVENT.format(to="alice@localhost"), False),  # the account's: routed again
        ("<message xmlns='jabber:client' from='bob@localhost/phone'"
         " to='alice@localhost/phone' type='chat'><body>hi</body></message>", False),
    ],
)
def test_copy_for_one(xml: str, copy: bool) -> None:
    assert _copy_for_one(etree.fromstring(xml)) is copy
