"""S2SService._send_queue: what waited for a link and the new stream does not take."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lxml import etree

from xmppd.s2s.config import S2SConfig
from xmppd.s2s.service import Link, S2SService
from xmppd.xml import ns


class _Router:
    def __init__(self) -> None:
        self.bounced: list[tuple[str | None, str]] = []

    def bounce(self, stanza: etree._Element, condition: str, text: str | None = None) -> None:
        self.bounced.append((stanza.get("id"), condition))


class _Stream:
    """Takes `room` stanzas, then is closed (send returns False), as a stream closing
    between its authentication and the queue being sent."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.sent: list[str | None] = []

    def send(self, stanza: etree._Element) -> bool:
        if len(self.sent) >= self.room:
            return False
        self.sent.append(stanza.get("id"))
        return True


def _message(id_: str) -> etree._Element:
    stanza = etree.Element(ns.C_MESSAGE, nsmap={None: ns.CLIENT})
    stanza.set("id", id_)
    stanza.set("from", "bob@b.test/desk")
    stanza.set("to", "anna@a.test")
    return stanza


def test_what_a_closing_stream_does_not_take_bounces() -> None:
    router = _Router()
    server: Any = SimpleNamespace(
        router=router, config=SimpleNamespace(limits=SimpleNamespace(max_xml_depth=64))
    )
    service = S2SService(server, S2SConfig())
    link = Link("b.test", "a.test")
    for id_ in ("m1", "m2", "m3"):
        link.queue.append((_message(id_), True))
    link.queue.append((_message("broadcast"), False))  # bounce=False: never reported
    conn = _Stream(room=1)
    service._send_queue(link, conn)  # type: ignore[arg-type]
    assert conn.sent == ["m1"]
    assert router.bounced == [("m2", "remote-server-timeout"), ("m3", "remote-server-timeout")]
    assert not link.queue
