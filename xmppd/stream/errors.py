"""Stream errors (RFC 6120 section 4.9) and stanza errors (section 8.3)."""

from __future__ import annotations

from lxml import etree

from xmppd.xml import ns

STREAM_CONDITIONS = frozenset(
    {
        "bad-format",
        "bad-namespace-prefix",
        "conflict",
        "connection-timeout",
        "host-gone",
        "host-unknown",
        "improper-addressing",
        "internal-server-error",
        "invalid-from",
        "invalid-namespace",
        "invalid-xml",
        "not-authorized",
        "not-well-formed",
        "policy-violation",
        "remote-connection-failed",
        "reset",
        "resource-constraint",
        "restricted-xml",
        "see-other-host",
        "system-shutdown",
        "undefined-condition",
        "unsupported-encoding",
        "unsupported-feature",
        "unsupported-stanza-type",
        "unsupported-version",
    }
)

# RFC 6120 section 8.3.3: each defined condition with its usual error type.
STANZA_CONDITIONS: dict[str, str] = {
    "bad-request": "modify",
    "conflict": "cancel",
    "feature-not-implemented": "cancel",
    "forbidden": "auth",
    "gone": "cancel",
    "internal-server-error": "cancel",
    "item-not-found": "cancel",
    "jid-malformed": "modify",
    "not-acceptable": "modify",
    "not-allowed": "cancel",
    "not-authorized": "auth",
    "policy-violation": "modify",
    "recipient-unavailable": "wait",
    "redirect": "modify",
    "registration-required": "auth",
    "remote-server-not-found": "cancel",
    "remote-server-timeout": "wait",
    "resource-constraint": "wait",
    "service-unavailable": "cancel",
    "subscription-required": "auth",
    "undefined-condition": "cancel",
    "unexpected-request": "wait",
}


class StreamError(Exception):
    """A condition that ends the stream; the transport sends it and closes."""

    def __init__(self, condition: str, text: str | None = None) -> None:
        assert condition in STREAM_CONDITIONS, condition
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text

    def to_element(self) -> etree._Element:
        err = etree.Element(f"{{{ns.STREAMS}}}error", nsmap={"stream": ns.STREAMS})
        etree.SubElement(
            err, f"{{{ns.STREAM_ERRORS}}}{self.condition}", nsmap={None: ns.STREAM_ERRORS}
        )
        if self.text:
            text = etree.SubElement(err, f"{{{ns.STREAM_ERRORS}}}text")
            text.text = self.text
        return err


class StanzaError(Exception):
    """Raised by handlers to answer a stanza with an error (RFC 6120 section 8.3)."""

    def __init__(
        self,
        condition: str,
        text: str | None = None,
        type_: str | None = None,
        app: etree._Element | None = None,
    ) -> None:
        assert condition in STANZA_CONDITIONS, condition
        super().__init__(f"{condition}: {text}" if text else condition)
        self.condition = condition
        self.text = text
        self.type = type_ or STANZA_CONDITIONS[condition]
        # An application-specific condition (RFC 6120 8.3.4) that says more than the
        # general one, e.g. XEP-0060's <precondition-not-met
        # xmlns='http://jabber.org/protocol/pubsub#errors'/> or XEP-0050's <bad-sessionid/>.
        self.app = app


def error_reply(
    stanza: etree._Element,
    condition: str,
    text: str | None = None,
    type_: str | None = None,
    by: str | None = None,
    app: etree._Element | None = None,
) -> etree._Element:
    """The error answer to `stanza`: addresses swapped, same id (an IQ's always has
    one), an <error/> child (with `app`, an application-specific condition, after
    the text)."""
    tag = stanza.tag if isinstance(stanza.tag, str) else ns.C_MESSAGE
    reply = etree.Element(tag, nsmap={None: ns.CLIENT})
    reply.set("type", "error")
    for src, dst in (("from", "to"), ("to", "from")):
        value = stanza.get(src)
        if value is not None:
            reply.set(dst, value)
    sid = stanza.get("id")
    if sid is not None:
        reply.set("id", sid)
    elif tag == ns.C_IQ:
        # RFC 6120 8.2.3: an IQ response carries the request's id, empty when the
        # request had none (a malformed one, answered with <bad-request/>).
        reply.set("id", "")
    err = etree.SubElement(reply, ns.C_ERROR)
    err.set("type", type_ or STANZA_CONDITIONS[condition])
    if by:
        err.set("by", by)
    etree.SubElement(err, f"{{{ns.STANZA_ERRORS}}}{condition}", nsmap={None: ns.STANZA_ERRORS})
    if text:
        etree.SubElement(err, f"{{{ns.STANZA_ERRORS}}}text").text = text
    if app is not None:
        err.append(app)
    return reply


def error_from(stanza: etree._Element, exc: StanzaError) -> etree._Element:
    return error_reply(stanza, exc.condition, exc.text, exc.type, app=exc.app)


def stanza_error_of(stanza: etree._Element) -> StanzaError:
    """The StanzaError an error stanza carries (undefined-condition when it names none
    we know), so a module awaiting an answer handles it like one it raised itself."""
    error = stanza.find(ns.C_ERROR)
    condition, text = "undefined-condition", None
    if error is not None:
        prefix = f"{{{ns.STANZA_ERRORS}}}"
        for child in error:
            if not isinstance(child.tag, str) or not child.tag.startswith(prefix):
                continue
            name = child.tag.rsplit("}", 1)[1]
            if name == "text":
                text = child.text
            elif name in STANZA_CONDITIONS:
                condition = name
    type_ = error.get("type") if error is not None else None
    return StanzaError(condition, text, type_ if type_ in _ERROR_TYPES else None)


_ERROR_TYPES = frozenset({"auth", "cancel", "continue", "modify", "wait"})
