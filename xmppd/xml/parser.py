"""Incremental, restricted XML parsing of one XMPP stream.

libxml2 builds the stanzas itself (lxml's pull parser: a tree under the
stream root, with start/end/comment/pi events read after each chunk fed);
each top-level child of the stream is copied out as its own small lxml
document and removed from the root once its end tag is parsed, so nothing
accumulates under the stream root. This replaced a SAX target that built
each stanza through a Python TreeBuilder: the same elements for less than
half the CPU (docs/bench.md, Profile), because libxml2 makes the nodes,
attributes and namespaces without a Python call per element.

The restrictions of RFC 6120 section 11.1 are kept without a callback per
event: a DOCTYPE or comment can only start with "<!" in the prolog, which is
refused before libxml2 sees it; a comment or processing instruction inside
the stream is an event; entities are never loaded from outside and an
undeclared one is a syntax error (`resolve_entities="internal"`, with no
DOCTYPE there is nothing internal either). Depth is checked from the events
of each chunk, so at most one chunk (FEED_CHUNK bytes) of nesting is built
before a stanza too deep is refused, and libxml2's own limit (256 levels)
is reported as the same policy violation.

A libxml2 push parser holds about 9 KB, much of an idle connection's memory
besides TLS. `release()` ends its document between stanzas, which frees
about 7 KB of it; the next `feed()` restarts it with a stand-in stream header
declaring the stream's namespaces (about 12 us, so the connection decides
when a stream has been idle long enough).
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

from lxml import etree

from xmppd.stream.errors import StreamError

FEED_CHUNK = 4096  # bytes fed per call: bounds how far a stanza can overshoot the size limit
_EVENTS = ("start", "end", "comment", "pi")
MAX_DECLARATION = 256  # bytes of an XML declaration kept while it is split across reads


@dataclass(slots=True)
class StreamOpened:
    """The <stream:stream> start tag: its attributes and namespace declarations."""

    tag: str
    attrs: dict[str, str]
    nsmap: dict[str | None, str]


@dataclass(slots=True)
class StreamClosed:
    """The peer sent </stream:stream>."""


class StreamParser:
    """Turns the bytes of one stream into StreamOpened, elements and StreamClosed.

    Call restart() at every stream restart (after STARTTLS and SASL).
    `max_stanza_bytes` may be raised once the peer has authenticated.
    """

    __slots__ = (
        "_parser",
        "_root",
        "_depth",
        "max_depth",
        "max_stanza_bytes",
        "_pending",
        "_closed",
        "_header",
        "_releasable",
        "_released",
        "_priming",
        "_prolog_tail",
        "_in_prolog",
    )

    def __init__(self, max_stanza_bytes: int, max_depth: int) -> None:
        self._parser = etree.XMLPullParser(
            events=_EVENTS,
            resolve_entities="internal",
            no_network=True,
            load_dtd=False,
            huge_tree=False,
            # UTF-8 whatever the data says (RFC 6120 11.6): a stream sent in UTF-16
            # would otherwise hide its "<!DOCTYPE" from _check_prolog's byte search.
            encoding="utf-8",
        )
        self._root: etree._Element | None = None  # the stream root, once its start tag is parsed
        self._depth = 0
        self.max_depth = max_depth
        self.max_stanza_bytes = max_stanza_bytes
        self._pending = 0  # bytes of the stanza now open (an upper bound, see feed)
        self._closed = False
        self._header: bytes | None = None  # stand-in stream header that restarts the parser
        self._releasable = False  # libxml2 holds no unparsed input
        self._released = False
        self._priming = False  # parsing the stand-in stream header after release()
        self._prolog_tail = b""  # an unfinished "<" or declaration ending the prolog fed so far
        self._in_prolog = True  # the root's start tag has not begun yet

    def restart(self, max_stanza_bytes: int) -> None:
        """Start over for a new stream on the same connection (after STARTTLS or SASL).

        Reuses the libxml2 parser: a new lxml parser costs about 50 us and
        leaves a reference cycle behind, so its ~9 KB wait for the garbage
        collector. Whatever the old stream left unparsed is dropped.
        """
        if not self._released:
            self._end_document()
        self._root = None
        self._depth = 0
        self.max_stanza_bytes = max_stanza_bytes
        self._pending = 0
        self._closed = False
        self._header = None
        self._releasable = False
        self._released = False
        self._prolog_tail = b""
        self._in_prolog = True

    def release(self) -> bool:
        """Free most of the libxml2 parser's memory if the stream is between stanzas.

        Only when the last data fed ended with a complete end tag (or
        empty-element tag), so libxml2 holds no partial input that would be
        lost. True if it did.
        """
        if self._released or not self._releasable or self._header is None or self._closed:
            return False
        self._end_document()  # libxml2 frees its input buffers
        self._root = None
        self._released = True
        self._releasable = False
        return True

    def _end_document(self) -> None:
        try:
            self._parser.close()
        except (etree.XMLSyntaxError, StreamError):
            pass  # the stream root is still open (as expected), or it left garbage behind
        for _ in self._parser.read_events():
            pass  # a new document starts with no events of the old one

    def feed(self, data: bytes) -> list[StreamOpened | StreamClosed | etree._Element]:
        """Parse `data`; raise StreamError on bad or over-limit input."""
        if self._closed:
            if data.strip():
                raise StreamError("not-well-formed", "data after the end of the stream")
            return []
        if self._released:
            self._resume()
        out: list[StreamOpened | StreamClosed | etree._Element] = []
        parser = self._parser
        clean: bool | None = None  # whether the chunk ends cleanly, when asked
        for start in range(0, len(data), FEED_CHUNK):
            chunk = data[start : start + FEED_CHUNK]
            if self._in_prolog:
                self._check_prolog(chunk)
            try:
                parser.feed(chunk)
            except etree.XMLSyntaxError as exc:
                # What was parsed before the error may be the reason (nesting past
                # libxml2's own limit is a policy violation, as past ours).
                self._take_events(out)
                raise StreamError("not-well-formed", _syntax_message(exc)) from None
            started = self._take_events(out)
            # Between stanzas, a chunk that does not end cleanly leaves a start tag
            # libxml2 holds back with no event yet: it counts towards the next stanza.
            clean = _ends_cleanly(chunk) if self._depth <= 1 else None
            held = clean is False and (self._pending > 0 or bool(chunk.strip()))
            if self._depth > 1 or held:
                # The open stanza began in this chunk (count the chunk, an upper
                # bound) or earlier (add the chunk to what it already had).
                self._pending = len(chunk) + (0 if started else self._pending)
                if self._pending > self.max_stanza_bytes:
                    raise StreamError(
                        "policy-violation", f"stanza larger than {self.max_stanza_bytes} bytes"
                    )
            else:
                self._pending = 0
            if self._closed:
                break
        root = self._root
        if root is not None and self._depth == 1 and root.text is not None:
            _between_stanzas(root.text)  # whitespace keepalives: checked, then dropped
            root.text = None
        if out and self._header is None and isinstance(out[0], StreamOpened):
            self._header = _stand_in_header(out[0])
        if self._depth != 1:
            self._releasable = False
        elif clean is not None and len(data) <= FEED_CHUNK:
            self._releasable = clean  # the usual read, one chunk: already asked
        else:
            self._releasable = _ends_cleanly(data)
        return out

    def _take_events(self, out: list[StreamOpened | StreamClosed | etree._Element]) -> bool:
        """Turn the parser's events into `out`; True if a stanza (or the stream root)
        started or a stanza ended among them: what is open now began in this chunk."""
        started = False
        depth = self._depth
        try:
            for event, el in self._parser.read_events():
                if event == "start":
                    depth += 1
                    if depth == 2:
                        started = True
                    elif depth > self.max_depth:
                        raise StreamError(
                            "policy-violation", f"XML nesting deeper than {self.max_depth}"
                        )
                    elif depth == 1:
                        started = True
                        self._root = el
                        if not self._priming:
                            out.append(StreamOpened(el.tag, dict(el.attrib), el.nsmap))
                elif event == "end":
                    depth -= 1
                    if depth == 1:
                        started = True
                        tail = el.tail
                        if tail is not None:
                            _between_stanzas(tail)
                            el.tail = None
                        out.append(el.__copy__())  # its own document, namespaces declared on it
                        self._root.remove(el)  # type: ignore[union-attr]
                    elif depth == 0:
                        out.append(StreamClosed())
                        self._closed = True
                        break
                elif event == "comment":
                    raise StreamError("restricted-xml", "XML comments are not allowed")
                else:
                    raise StreamError("restricted-xml", "processing instructions are not allowed")
        finally:
            self._depth = depth
        return started

    def _check_prolog(self, chunk: bytes) -> None:
        """Before the stream root only the XML declaration and whitespace may come: a
        "<!" there starts a DOCTYPE or a comment, refused before libxml2 reads it.
        Only up to the root's "<": what follows it in the same read is stanzas, where a
        CDATA section also starts with "<!" (libxml2 refuses a DOCTYPE there itself)."""
        data = self._prolog_tail + chunk
        if b"\0" in data:  # no UTF-8 XML has one: UTF-16 or UTF-32 (whose "<" is "<\0")
            raise StreamError("unsupported-encoding", "XMPP streams are UTF-8")
        at = data.find(b"<")
        while at != -1:
            mark = data[at + 1 : at + 2]
            if mark == b"!":
                if data.startswith(b"<!--", at):
                    raise StreamError("restricted-xml", "XML comments are not allowed")
                raise StreamError("restricted-xml", "a DOCTYPE is not allowed")
            if mark == b"":
                self._prolog_tail = b"<"  # split: the next read says what it starts
                return
            if mark != b"?":
                self._in_prolog = False  # the root's start tag
                return
            # The XML declaration (or a PI, refused by its event): a "<" inside it
            # is not the root's; the prolog goes on after its "?>".
            end = data.find(b"?>", at + 2)
            if end == -1:
                if len(data) - at > MAX_DECLARATION:
                    raise StreamError("not-well-formed", "XML declaration too long")
                self._prolog_tail = data[at:]
                return
            at = data.find(b"<", end + 2)
        self._prolog_tail = b""

    def _resume(self) -> None:
        """Put the parser back where release() found it: inside the stream root."""
        assert self._header is not None
        self._depth = 0
        self._priming = True
        try:
            self._parser.feed(self._header)
            self._take_events([])
        finally:
            self._priming = False
        self._released = False


def _between_stanzas(text: str) -> None:
    if text.strip():
        raise StreamError("bad-format", "text is not allowed between stanzas")


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
