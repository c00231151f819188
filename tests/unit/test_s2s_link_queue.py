"""S2SService._send_queue: what waited for a link and the new stream does not take;
_take_back: what a stream took and lost with its connection before writing it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lxml import etree

from xmppd.s2s.config import S2SConfig
from xmppd.s2s.connection import Outgoing
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

    def send(self, item: Outgoing) -> bool:
        if len(self.sent) >= self.room:
            return False
        self.sent.append(item.stanza.get("id"))
        return True


def _message(id_: str) -> etree._Element:
    stanza = etree.Element(ns.C_MESSAGE, nsmap={None: ns.CLIENT})
    stanza.set("id", id_)
    stanza.set("from", "bob@b.test/desk")
    stanza.set("to", "anna@a.test")
    return stanza


def _service(router: _Router) -> S2SService:
    server: Any = SimpleNamespace(
        router=router, config=SimpleNamespace(limits=SimpleNamespace(max_xml_depth=64))
    )
    return S2SService(server, S2SConfig())


def test_what_a_closing_stream_does_not_take_bounces() -> None:
    router = _Router()
    service = _service(router)
    link = Link("b.test", "a.test")
    for id_ in ("m1", "m2", "m3"):
        link.queue.append(Outgoing(_message(id_), True))
    link.queue.append(Outgoing(_message("broadcast"), False))  # bounce=False: never reported
    conn = _Stream(room=1)
    service._send_queue(link, conn)  # type: ignore[arg-type]
    assert conn.sent == ["m1"]
    assert router.bounced == [("m2", "remote-server-timeout"), ("m3", "remote-server-timeout")]
    assert not link.queue


def test_what_a_lost_connection_never_wrote_goes_back_first_and_only_once() -> None:
    """Ahead of what was routed after it, in order; one given back before bounces."""
    router = _Router()
    service = _service(router)
    key = ("b.test", "a.test")
    service.links[key] = Link(*key)
    service.links[key].queue.append(Outgoing(_message("later"), True))
    unwritten = [
        Outgoing(_message("m1"), True),
        Outgoing(_message("again"), True, requeued=True),
        Outgoing(_message("copy"), False, requeued=True),  # bounce=False: never reported
        Outgoing(_message("m2"), True),
    ]
    link = service._take_back(key, unwritten)
    assert link is service.links[key]
    assert [(i.stanza.get("id"), i.requeued) for i in link.queue] == [
        ("m1", True),
        ("m2", True),
        ("later", False),
    ]
    assert router.bounced == [("again", "remote-server-timeout")]
