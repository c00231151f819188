"""StreamParser namespace handling, independent of what lxml passes as `nsmap`.

lxml 6.2.0 passes an empty mapping as start()'s nsmap argument to a target
without start_ns(); 5.x and 6.1 passed the tag's declarations. The parser
must give the same elements under every lxml release CI installs: the
locked one, the oldest supported one and the newest one.
"""

from __future__ import annotations

import lxml
import pytest
from lxml import etree

from xmppd.stream.errors import StreamError
from xmppd.xml.parser import StreamClosed, StreamOpened, StreamParser

HEADER = (
    b"<?xml version='1.0'?><stream:stream xmlns='jabber:client'"
    b" xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback'"
    b" to='localhost' version='1.0'>"
)


def parser() -> StreamParser:
    return StreamParser(max_stanza_bytes=65536, max_depth=32)


def test_stream_header_reports_its_namespace_declarations() -> None:
    events = parser().feed(HEADER)
    assert len(events) == 1, lxml.__version__
    opened = events[0]
    assert isinstance(opened, StreamOpened)
    assert opened.tag == "{http://etherx.jabber.org/streams}stream"
    assert opened.nsmap == {
        None: "jabber:client",
        "stream": "http://etherx.jabber.org/streams",
        "db": "jabber:server:dialback",
    }
    assert opened.attrs == {"to": "localhost", "version": "1.0"}


def test_stanza_inherits_the_stream_default_namespace_and_serializes_alone() -> None:
    p = parser()
    p.feed(HEADER)
    (message,) = p.feed(b"<message to='bob@localhost'><body>hi</body></message>")
    assert message.tag == "{jabber:client}message"
    assert message[0].tag == "{jabber:client}body"
    assert message.nsmap == {None: "jabber:client"}
    assert etree.tostring(message) == (
        b'<message xmlns="jabber:client" to="bob@localhost"><body>hi</body></message>'
    )


def test_prefixes_declared_on_the_root_or_inside_a_stanza_resolve() -> None:
    p = parser()
    p.feed(HEADER)
    (first, second, closed) = p.feed(
        b"<db:result from='a' to='b'>key</db:result>"
        b"<iq type='get' id='1'><x:q xmlns:x='urn:x'><x:i/></x:q></iq>"
        b"</stream:stream>"
    )
    assert first.tag == "{jabber:server:dialback}result"
    assert second[0].tag == "{urn:x}q"
    assert second[0][0].tag == "{urn:x}i"
    assert isinstance(closed, StreamClosed)


def test_a_declaration_does_not_leak_to_the_next_element() -> None:
    p = parser()
    p.feed(HEADER)
    a, b = p.feed(b"<message xmlns='urn:other'/><message/>")
    assert a.tag == "{urn:other}message"
    assert b.tag == "{jabber:client}message"
    assert b.nsmap == {None: "jabber:client"}


def test_namespaces_survive_release_and_resume() -> None:
    p = parser()
    p.feed(HEADER)
    p.feed(b"<presence/>")
    assert p.release()
    (message,) = p.feed(b"<message><db:x/></message>")
    assert message.tag == "{jabber:client}message"
    assert message[0].tag == "{jabber:server:dialback}x"


def test_a_read_that_ends_inside_a_tag_keeps_the_parser() -> None:
    """libxml2 holds back an unfinished start tag with no event: releasing then would
    lose it. Only a read that ends cleanly (one chunk or several) may release."""
    p = parser()
    p.feed(HEADER)
    (first,) = p.feed(b"<message to='bob@localhost'><body>hi</body></message><mess")
    assert first.get("to") == "bob@localhost"
    assert not p.release()
    (message,) = p.feed(b"age to='carol@localhost'/>")
    assert message.get("to") == "carol@localhost"
    body = b"x" * 10000  # a read of several 4 KiB chunks, ending with the end tag
    p.feed(b"<message><body>" + body + b"</body></message>")
    assert p.release()


def test_restart_forgets_the_old_stream_declarations() -> None:
    p = parser()
    p.feed(HEADER)
    p.restart(65536)
    (opened,) = p.feed(
        b"<stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams'>"
    )
    assert isinstance(opened, StreamOpened)
    assert opened.nsmap == {None: "jabber:server", "stream": "http://etherx.jabber.org/streams"}
    (message,) = p.feed(b"<message/>")
    assert message.tag == "{jabber:server}message"


def test_a_doctype_split_between_reads_is_refused() -> None:
    p = parser()
    p.feed(b"<?xml version='1.0'?><")
    try:
        p.feed(b"!DOCTYPE s [<!ENTITY e 'x'>]>" + HEADER[len(b"<?xml version='1.0'?>") :])
    except StreamError as exc:
        assert exc.condition == "restricted-xml"
    else:
        raise AssertionError("a DOCTYPE was accepted")


def test_text_after_a_stanza_in_a_later_read_is_bad_format_and_keepalives_pass() -> None:
    p = parser()
    p.feed(HEADER)
    p.feed(b"<message/> ")
    assert p.feed(b"  \n") == []
    (presence,) = p.feed(b"<presence/>")
    assert etree.tostring(presence) == b'<presence xmlns="jabber:client"/>'
    try:
        p.feed(b"hello<iq/>")
    except StreamError as exc:
        assert exc.condition == "bad-format"
    else:
        raise AssertionError("text between stanzas was accepted")


def test_cdata_and_predefined_entities_are_text() -> None:
    p = parser()
    p.feed(HEADER)
    (message,) = p.feed(
        b"<message><body><![CDATA[a &x; <b>]]> &amp; &#65;</body></message>"
    )
    assert message[0].text == "a &x; <b> & A"
    assert message.tail is None


def test_nesting_past_libxml2s_own_limit_in_one_read_is_a_policy_violation() -> None:
    p = parser()
    p.feed(HEADER)
    try:
        p.feed(b"<message>" + b"<a>" * 300)
    except StreamError as exc:
        assert exc.condition == "policy-violation"
    else:
        raise AssertionError("nesting past the limit was accepted")


def test_cdata_in_the_same_read_as_the_stream_header_is_accepted() -> None:
    """Only the prolog is checked for "<!": a stanza pipelined with the header may hold
    a CDATA section (after SASL a client may send header and stanzas in one write)."""
    p = parser()
    opened, message = p.feed(HEADER + b"<message><body><![CDATA[<hi>]]></body></message>")
    assert isinstance(opened, StreamOpened)
    assert message[0].text == "<hi>"


def test_a_doctype_or_comment_between_declaration_and_root_is_refused() -> None:
    for data in (b"<!DOCTYPE s>", b"<!-- c -->", b"<?pi <x ?><!DOCTYPE s>"):
        try:
            StreamParser(65536, 32).feed(b"<?xml version='1.0'?>" + data + HEADER[21:])
        except StreamError as exc:
            assert exc.condition == "restricted-xml"
        else:
            raise AssertionError(f"{data!r} was accepted")


def test_a_doctype_after_a_declaration_split_across_reads_is_refused() -> None:
    p = parser()
    p.feed(b"<?xml version='1.0'")
    try:
        p.feed(b"?><!DOCTYPE s [<!ENTITY e 'x'>]>" + HEADER[21:])
    except StreamError as exc:
        assert exc.condition == "restricted-xml"
    else:
        raise AssertionError("a DOCTYPE was accepted")


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_stream_not_in_utf8_is_unsupported_encoding(codec: str) -> None:
    """In UTF-16 a "<!DOCTYPE" is "<\\0!\\0...": the byte search for "<!" missed it and
    libxml2, reading the BOM or guessing, expanded the entities past the size limit."""
    bomb = "<!DOCTYPE s [<!ENTITY a 'aaaaaaaaaaaaaaaa'>]>" + HEADER[21:].decode()
    with pytest.raises(StreamError) as raised:
        parser().feed(("<?xml version='1.0'?>" + bomb + "<message>&a;</message>").encode(codec))
    assert raised.value.condition == "unsupported-encoding"


def test_the_stream_is_read_as_utf8_whatever_its_declaration_says() -> None:
    p = parser()
    p.feed(b"<?xml version='1.0' encoding='ISO-8859-1'?>" + HEADER[21:])
    [message] = p.feed("<message><body>\u00e9</body></message>".encode())
    assert isinstance(message, etree._Element)
    assert message.findtext("{jabber:client}body") == "\u00e9"  # not Latin-1's "\u00c3\u00a9"


def test_a_start_tag_too_long_to_finish_counts_against_the_stanza_limit() -> None:
    """libxml2 gives no event until a start tag ends: its bytes still count, or one
    endless tag would be buffered up to libxml2's own 10 MB limit."""
    p = StreamParser(max_stanza_bytes=10_000, max_depth=32)
    p.feed(HEADER)
    p.feed(b"<message/>  ")
    try:
        p.feed(b"<message to='a@b' x='")
        for _ in range(5):
            p.feed(b"x" * 4096)
    except StreamError as exc:
        assert exc.condition == "policy-violation"
    else:
        raise AssertionError("an endless start tag was buffered")
