"""Incremental, restricted XML parsing of one XMPP stream.

lxml's SAX-target interface is used rather than a pull parser because it
lets us refuse input *while* libxml2 parses it: a DOCTYPE, comment or
processing instruction raises at once (RFC 6120 section 11.1), and a start
tag past the depth limit stops the parser before it builds anything deeper.
Each top-level child of the stream becomes its own small lxml element, so
nothing accumulates under the stream root.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lxml import etree

from xmppd.stream.errors import StreamError

FEED_CHUNK = 4096  # bytes fed per call: bounds how far a stanza can overshoot the size limit


@dataclass(slots=True)
class StreamOpened:
    """The <stream:stream> start tag: its attributes and namespace declarations."""

    tag: str
    attrs: dict[str, str]
    nsmap: dict[str | None, str]


@dataclass(slots=True)
class StreamClosed:
    """The peer sent </stream:stream>."""


class _Target:
    """SAX target: builds one element per top-level child, enforces restrictions."""

    __slots__ = ("depth", "builder", "default_ns", "events", "max_depth", "stanza_started")

    def __init__(self, max_depth: int) -> None:
        self.depth = 0
        self.builder: Any = None  # etree.TreeBuilder of the stanza being parsed
        self.default_ns: str | None = None
        self.events: list[StreamOpened | StreamClosed | etree._Element] = []
        self.max_depth = max_depth
        self.stanza_started = False  # a top-level element began since the flag was cleared

    def start(self, tag: str, attrib: Any, nsmap: dict[str, str] | None = None) -> None:
        self.depth += 1
        declared = {(k or None): v for k, v in nsmap.items()} if nsmap else {}
        if self.depth == 1:
            self.default_ns = declared.get(None)
            self.events.append(StreamOpened(tag, dict(attrib), declared))
            return
        if self.depth > self.max_depth:
            raise StreamError("policy-violation", f"XML nesting deeper than {self.max_depth}")
        if self.depth == 2:
            self.stanza_started = True
            self.builder = etree.TreeBuilder()
            # Re-declare the stream's default namespace on the stanza so it
            # serializes as <message xmlns='jabber:client'> on its own.
            if self.default_ns is not None and None not in declared:
                declared[None] = self.default_ns
        self.builder.start(tag, attrib, declared or None)

    def end(self, tag: str) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.events.append(StreamClosed())
            return
        self.builder.end(tag)
        if self.depth == 1:
            self.events.append(self.builder.close())
            self.builder = None

    def data(self, text: str) -> None:
        if self.builder is not None:
            self.builder.data(text)
        elif text.strip():
            raise StreamError("bad-format", "text is not allowed between stanzas")

    def comment(self, text: str) -> None:
        raise StreamError("restricted-xml", "XML comments are not allowed")

    def pi(self, target: str, data: str | None = None) -> None:
        raise StreamError("restricted-xml", "processing instructions are not allowed")

    def doctype(self, *args: Any) -> None:
        raise StreamError("restricted-xml", "a DOCTYPE is not allowed")

    def close(self) -> None:
        return None


class StreamParser:
    """Turns the bytes of one stream into StreamOpened, elements and StreamClosed.

    Create a new one at every stream restart (after STARTTLS and SASL).
    `max_stanza_bytes` may be raised once the peer has authenticated.
    """

    __slots__ = ("_target", "_parser", "max_stanza_bytes", "_pending", "_closed")

    def __init__(self, max_stanza_bytes: int, max_depth: int) -> None:
        self._target = _Target(max_depth)
        self._parser = etree.XMLParser(
            target=self._target,
            resolve_entities=False,
            no_network=True,
            load_dtd=False,
            huge_tree=False,
        )
        self.max_stanza_bytes = max_stanza_bytes
        self._pending = 0  # bytes of the stanza now open (an upper bound, see feed)
        self._closed = False

    def feed(self, data: bytes) -> list[StreamOpened | StreamClosed | etree._Element]:
        """Parse `data`; raise StreamError on bad or over-limit input."""
        if self._closed:
            if data.strip():
                raise StreamError("not-well-formed", "data after the end of the stream")
            return []
        target = self._target
        for start in range(0, len(data), FEED_CHUNK):
            chunk = data[start : start + FEED_CHUNK]
            target.stanza_started = False
            try:
                self._parser.feed(chunk)
            except StreamError:
                raise
            except etree.XMLSyntaxError as exc:
                raise StreamError("not-well-formed", _syntax_message(exc)) from None
            if target.depth > 1:
                # The open stanza began in this chunk (count the chunk, an upper
                # bound) or earlier (add the chunk to what it already had).
                self._pending = len(chunk) + (0 if target.stanza_started else self._pending)
                if self._pending > self.max_stanza_bytes:
                    raise StreamError(
                        "policy-violation", f"stanza larger than {self.max_stanza_bytes} bytes"
                    )
            else:
                self._pending = 0
            if target.events and isinstance(target.events[-1], StreamClosed):
                self._closed = True
                break
        events, target.events = target.events, []
        return events


def _syntax_message(exc: etree.XMLSyntaxError) -> str:
    return str(exc.msg or exc).split(", line ")[0]
