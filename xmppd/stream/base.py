"""The skeleton every server-side stream but the client one shares (s2s, components).

Bytes in (`receive`), bytes out (`output`), the restricted XML parser
(`StreamParser`) and its limits, a stream error or a clean close that ends
the stream. A subclass says what the stream header and each top-level
element mean. `C2SStream` keeps its own copy of this skeleton on purpose:
it is the per-message hot path, and it is measured as it is
(bench/conn_path.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from lxml import etree

from xmppd.stream.errors import StreamError
from xmppd.xml.parser import StreamClosed, StreamOpened, StreamParser


@dataclass(slots=True)
class StreamEnded:
    """The stream is over: flush output() and close the connection."""

    error: StreamError | None


EventT = TypeVar("EventT")


class StreamCore(Generic[EventT]):
    """A sans-IO XML stream; `EventT` is the events its driver handles (StreamEnded
    among them)."""

    def __init__(
        self, max_stanza_bytes: int, max_stanza_bytes_unauthenticated: int, max_depth: int
    ) -> None:
        """The subclass sets its phase first: the parser's limit depends on it."""
        self.error: StreamError | None = None  # the stream error we ended the stream with
        self._header_sent = False
        self._out: list[bytes] = []
        self._limits = (max_stanza_bytes, max_stanza_bytes_unauthenticated)
        self._parser = StreamParser(self._stanza_limit(), max_depth)

    # --- what a subclass says -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    @property
    def authenticated(self) -> bool:
        """Whether the peer proved who it is (the larger stanza limit; the driver's
        authentication timer, unless the driver says otherwise: `_established`)."""
        raise NotImplementedError

    def _mark_closed(self) -> None:
        """Enter the subclass's closed phase."""
        raise NotImplementedError

    def _send_header(self) -> None:
        raise NotImplementedError

    def _on_stream_open(self, opened: StreamOpened, events: list[EventT]) -> None:
        """The peer's stream header (the first, or a restart's); `events` as for
        `_on_element`."""
        raise NotImplementedError

    def _on_element(self, el: etree._Element, events: list[EventT]) -> None:
        raise NotImplementedError

    def _stanza_limit(self) -> int:
        """A stranger gets the smaller limit until it has authenticated."""
        return self._limits[0] if self.authenticated else self._limits[1]

    # --- driver API ------------------------------------------------------------------

    def receive(self, data: bytes) -> list[EventT]:
        """Feed bytes from the peer; returns what the driver must act on."""
        if self.closed:
            return []
        events: list[EventT] = []
        try:
            for item in self._parser.feed(data):
                if isinstance(item, StreamOpened):
                    self._on_stream_open(item, events)
                elif isinstance(item, StreamClosed):
                    self._close_out()
                    events.append(cast(EventT, StreamEnded(None)))
                    break
                else:
                    self._on_element(item, events)
                if self.closed:
                    break
        except StreamError as exc:
            self.fail(exc)
            events.append(cast(EventT, StreamEnded(exc)))
        return events

    def output(self) -> bytes:
        """Bytes queued for the peer since the last call."""
        if not self._out:
            return b""
        data = b"".join(self._out)
        self._out.clear()
        return data

    def release_parser(self) -> bool:
        """Free the XML parser of an idle stream; see StreamParser.release."""
        return self._parser.release()

    def fail(self, error: StreamError) -> None:
        """Send a stream error and close (RFC 6120 section 4.9.1.1)."""
        if self.closed:
            return
        self.error = error
        if not self._header_sent:
            self._send_header()
        self._out.append(etree.tostring(error.to_element()))
        self._close_out()

    def close(self) -> None:
        """Close the stream cleanly from our side."""
        if self.closed:
            return
        if not self._header_sent:
            self._send_header()
        self._close_out()

    # --- helpers ----------------------------------------------------------------------

    def _restart(self) -> None:
        """A new stream on the same connection (after TLS or SASL): a fresh parser."""
        self._parser.restart(self._stanza_limit())
        self._header_sent = False

    def _close_out(self) -> None:
        self._out.append(b"</stream:stream>")
        self._mark_closed()


def _rename(tag: object, old: str, new: str) -> object:
    if isinstance(tag, str) and tag.startswith(old):
        return new + tag[len(old) :]
    return tag


def renamespace(el: etree._Element, old_ns: str, new_ns: str) -> etree._Element:
    """A copy of `el` whose elements in `old_ns` are in `new_ns`, declared as default:
    how a stanza moves between a stream's content namespace ('jabber:server',
    'jabber:component:accept') and the router's 'jabber:client'."""
    old, new = f"{{{old_ns}}}", f"{{{new_ns}}}"

    def copy(src: etree._Element, parent: etree._Element | None) -> etree._Element:
        nsmap = {p: (new_ns if u == old_ns else u) for p, u in src.nsmap.items()}
        tag = _rename(src.tag, old, new)
        dst = (
            etree.Element(tag, src.attrib, nsmap=nsmap)  # type: ignore[arg-type]
            if parent is None
            else etree.SubElement(parent, tag, src.attrib, nsmap=nsmap)  # type: ignore[arg-type]
        )
        dst.text = src.text
        dst.tail = src.tail if parent is not None else None
        for child in src:
            if isinstance(child.tag, str):
                copy(child, dst)
        return dst

    return copy(el, None)


def attr(value: str) -> str:
    """`value` escaped for a single-quoted attribute of a stream header."""
    return value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
