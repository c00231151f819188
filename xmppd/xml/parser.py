"""Incremental, restricted XML parsing of one XMPP stream.

lxml's SAX-target interface is used rather than a pull parser because it
lets us refuse input *while* libxml2 parses it: a DOCTYPE, comment or
processing instruction raises at once (RFC 6120 section 11.1), and a start
tag past the depth limit stops the parser before it builds anything deeper.
Each top-level child of the stream becomes its own small lxml element, so
nothing accumulates under the stream root.

A libxml2 push parser holds about 9 KB, much of an idle connection's memory
besides TLS. `release()` ends its document between stanzas, which frees
about 7 KB of it; the next `feed()` restarts it with a stand-in stream header
declaring the stream's namespaces (about 12 us, so the connection decides
when a stream has been idle long enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

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

    __slots__ = (
        "depth",
        "builder",
        "default_ns",
        "events",
        "max_depth",
        "stanza_started",
        "priming",
        "declared",
    )

    def __init__(self, max_depth: int) -> None:
        self.depth = 0
        self.builder: Any = None  # etree.TreeBuilder of the stanza being parsed
        self.default_ns: str | None = None
        self.events: list[StreamOpened | StreamClosed | etree._Element] = []
        self.max_depth = max_depth
        self.stanza_started = False  # a top-level element began since the flag was cleared
        self.priming = False  # parsing the stand-in stream header after release()
        # Namespace declarations of the next start tag, gathered by start_ns().
        self.declared: dict[str | None, str] = {}

    def start_ns(self, prefix: str, uri: str) -> None:
        self.declared[prefix or None] = uri

    def end_ns(self, prefix: str) -> None:
        return None

    def start(self, tag: str, attrib: Any, nsmap: Any = None) -> None:
        # `nsmap` is not read: lxml 6.2 passes an empty mapping for it unless the
        # target has start_ns(), and what it holds has changed between releases.
        # start_ns() events, which every lxml since 4 sends just before the
        # element's start(), are the one source of a tag's declarations.
        self.depth += 1
        declared = self.declared
        if declared:
            self.declared = {}
        else:
            declared = {}  # a fresh one: the stanza's may gain the stream's default below
        if self.depth == 1:
            if not self.priming:
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

    Call restart() at every stream restart (after STARTTLS and SASL).
    `max_stanza_bytes` may be raised once the peer has authenticated.
    """

    __slots__ = (
        "_target",
        "_parser",
        "max_stanza_bytes",
        "_pending",
        "_closed",
        "_header",
        "_releasable",
        "_released",
    )

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
        self._header: bytes | None = None  # stand-in stream header that restarts the parser
        self._releasable = False  # libxml2 holds no unparsed input
        self._released = False

    def restart(self, max_stanza_bytes: int) -> None:
        """Start over for a new stream on the same connection (after STARTTLS or SASL).

        Reuses the libxml2 parser: a new lxml target parser costs about 50 us
        and leaves a reference cycle behind, so its ~9 KB wait for the
        garbage collector. Whatever the old stream left unparsed is dropped.
        """
        if not self._released:
            try:
                self._parser.close()
            except (etree.XMLSyntaxError, StreamError):
                pass  # the old stream's root is still open, or it left garbage behind
        target = self._target
        target.depth = 0
        target.builder = None
        target.default_ns = None
        target.declared = {}
        target.events = []
        target.stanza_started = False
        self.max_stanza_bytes = max_stanza_bytes
        self._pending = 0
        self._closed = False
        self._header = None
        self._releasable = False
        self._released = False

    def release(self) -> bool:
        """Free most of the libxml2 parser's memory if the stream is between stanzas.

        Only when the last data fed ended with a complete end tag (or
        empty-element tag), so libxml2 holds no partial input that would be
        lost. True if it did.
        """
        if self._released or not self._releasable or self._header is None or self._closed:
            return False
        try:
            self._parser.close()  # ends the document: libxml2 frees its input buffers
        except etree.XMLSyntaxError:
            pass  # "premature end of data": the stream root is still open, as expected
        self._released = True
        self._releasable = False
        return True

    def feed(self, data: bytes) -> list[StreamOpened | StreamClosed | etree._Element]:
        """Parse `data`; raise StreamError on bad or over-limit input."""
        if self._closed:
            if data.strip():
                raise StreamError("not-well-formed", "data after the end of the stream")
            return []
        target = self._target
        if self._released:
            self._resume()
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
        if events and self._header is None and isinstance(events[0], StreamOpened):
            self._header = _stand_in_header(events[0])
        self._releasable = target.depth == 1 and _ends_cleanly(data)
        return events

    def _resume(self) -> None:
        """Put the parser back where release() found it: inside the stream root."""
        assert self._header is not None
        target = self._target
        target.depth = 0
        target.priming = True
        try:
            self._parser.feed(self._header)
        finally:
            target.priming = False
        self._released = False


def _ends_cleanly(data: bytes) -> bool:
    """Data ends with an end tag or an empty-element tag (then whitespace): after
    it libxml2 holds nothing back, so ending the document loses no input."""
    tail = data[data.rfind(b"<") :].rstrip()
    return (
        tail.endswith(b">")
        and tail.count(b">") == 1
        and (tail.startswith(b"</") or tail.endswith(b"/>"))
    )


def _stand_in_header(opened: StreamOpened) -> bytes | None:
    """A start tag declaring what the stream's root declared, under the same name.

    Stanzas parsed after it resolve prefixes exactly as under the real root;
    None when the root's name cannot be written back (no prefix for its namespace).
    """
    uri, _, local = (
        opened.tag[1:].partition("}") if opened.tag.startswith("{") else ("", "", opened.tag)
    )
    prefix = next((p for p, u in opened.nsmap.items() if u == uri and p), None) if uri else ""
    if prefix is None:
        return None
    name = f"{prefix}:{local}" if prefix else local
    decls = " ".join(f"xmlns{':' + p if p else ''}={quoteattr(u)}" for p, u in opened.nsmap.items())
    return f"<{name} {decls}>".encode()


def _syntax_message(exc: etree.XMLSyntaxError) -> str:
    return str(exc.msg or exc).split(", line ")[0]
