"""Reading an archive query (XEP-0313 section 4, XEP-0059) and writing its answers.

Only parsing and XML building: which part of the archive a <query/> asks
for, checked as far as it can be without storage (a date that does not
parse, a bad JID: bad-request; a field we do not know:
feature-not-implemented, as XEP-0313 section 4.1.5 requires), and the <result/>
messages, the <fin/> and the query form. Whether a named id is in the
archive is the module's to check (item-not-found).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from lxml import etree

from xmppd.jid import JID, InvalidJID
from xmppd.modules._dataforms import Field, Submitted, form
from xmppd.stream.errors import StanzaError
from xmppd.xml import ns

MAM = "urn:xmpp:mam:2"
RSM = "http://jabber.org/protocol/rsm"
VALIDATE = "http://jabber.org/protocol/xdata-validate"
FORWARD = "urn:xmpp:forward:0"
DELAY = "urn:xmpp:delay"

QUERY = f"{{{MAM}}}query"
FIELDS = ("with", "start", "end", "before-id", "after-id", "ids")


@dataclass(slots=True)
class Request:
    """What one <query/> asks for; ids are as given (not yet checked against storage)."""

    queryid: str | None = None
    with_bare: str | None = None
    with_full: str | None = None
    start: int | None = None  # microseconds, inclusive
    end: int | None = None
    after_ids: list[str] = field(default_factory=list)  # after-id and RSM <after/>
    before_ids: list[str] = field(default_factory=list)  # before-id and RSM <before>id<
    ids: list[str] = field(default_factory=list)
    max: int | None = None
    last_page: bool = False  # an RSM <before/> (empty or not): page backward
    flip: bool = False


def parse(query: etree._Element) -> Request:
    """The request in `query`; StanzaError bad-request for what cannot be read."""
    request = Request(queryid=query.get("queryid"))
    submitted = Submitted.find(query, MAM)
    if submitted is not None:
        _form(request, submitted)
    rsm = query.find(f"{{{RSM}}}set")
    if rsm is not None:
        _rsm(request, rsm)
    request.flip = query.find(f"{{{MAM}}}flip-page") is not None
    bounded = request.start is not None or request.end is not None
    if request.ids and (request.after_ids or request.before_ids or bounded):
        raise StanzaError("bad-request", "'ids' cannot be combined with other bounds")
    return request


def _form(request: Request, submitted: Submitted) -> None:
    unknown = sorted(set(submitted.values) - set(FIELDS))
    if unknown:
        raise StanzaError("feature-not-implemented", f"unknown field {unknown[0]!r}")
    if with_ := submitted.one("with"):
        try:
            jid = JID(with_)
        except InvalidJID:
            raise StanzaError("bad-request", f"'with' is not a JID: {with_!r}") from None
        if jid.resource:
            request.with_full = str(jid)
        else:
            request.with_bare = jid.bare
    if start := submitted.one("start"):
        request.start = _time(start, "start")
    if end := submitted.one("end"):
        request.end = _time(end, "end")
    if after := submitted.one("after-id"):
        request.after_ids.append(after)
    if before := submitted.one("before-id"):
        request.before_ids.append(before)
    request.ids = submitted.many("ids")


def _rsm(request: Request, rsm: etree._Element) -> None:
    max_text = rsm.findtext(f"{{{RSM}}}max")
    if max_text is not None:
        try:
            request.max = int(max_text.strip())
        except ValueError:
            raise StanzaError("bad-request", "<max/> must be a number") from None
        if request.max < 0:
            raise StanzaError("bad-request", "<max/> must not be negative")
    if (after := rsm.findtext(f"{{{RSM}}}after")) is not None:
        if not after.strip():
            raise StanzaError("bad-request", "<after/> needs an id")
        request.after_ids.append(after.strip())
    before = rsm.find(f"{{{RSM}}}before")
    if before is not None:
        request.last_page = True
        if (before.text or "").strip():
            request.before_ids.append((before.text or "").strip())
    if rsm.find(f"{{{RSM}}}index") is not None:
        raise StanzaError("feature-not-implemented", "paging by <index/> is not supported")


def _time(value: str, name: str) -> int:
    """XEP-0082 DateTime (a time zone is required) to microseconds since the epoch."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise StanzaError("bad-request", f"'{name}' is not a XEP-0082 date: {value!r}") from None
    if moment.tzinfo is None:
        raise StanzaError("bad-request", f"'{name}' needs a time zone (XEP-0082): {value!r}")
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return max(0, (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds)


def stamp(ts: int) -> str:
    """Microseconds to a XEP-0082 DateTime in UTC, in whole seconds: slixmpp, among
    others, fails on fractions (the order is the ids', not the stamps')."""
    return datetime.fromtimestamp(ts // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def result_message(
    to: str, owner: str, queryid: str | None, archive_id: str, ts: int, message: etree._Element
) -> etree._Element:
    """<message><result id><forwarded><delay/>message</forwarded></result></message>."""
    wrapper = etree.Element(ns.C_MESSAGE, nsmap={None: ns.CLIENT})
    wrapper.set("to", to)
    wrapper.set("from", owner)
    result = etree.SubElement(wrapper, f"{{{MAM}}}result", nsmap={None: MAM})
    if queryid is not None:
        result.set("queryid", queryid)
    result.set("id", archive_id)
    forwarded = etree.SubElement(result, f"{{{FORWARD}}}forwarded", nsmap={None: FORWARD})
    etree.SubElement(forwarded, f"{{{DELAY}}}delay", nsmap={None: DELAY}).set("stamp", stamp(ts))
    forwarded.append(message)
    return wrapper


def fin(
    queryid: str | None, first: str | None, last: str | None, complete: bool
) -> etree._Element:
    """<fin complete?><set><first/><last/></set></fin> (an empty <set/> for no results)."""
    element = etree.Element(f"{{{MAM}}}fin", nsmap={None: MAM})
    if queryid is not None:
        element.set("queryid", queryid)
    if complete:
        element.set("complete", "true")
    rsm = etree.SubElement(element, f"{{{RSM}}}set", nsmap={None: RSM})
    if first is not None and last is not None:
        etree.SubElement(rsm, f"{{{RSM}}}first").text = first
        etree.SubElement(rsm, f"{{{RSM}}}last").text = last
    return element


def query_form() -> etree._Element:
    """The form a client asks for with a query get (XEP-0313 section 4.1.5): 'ids' is
    a list-multi open to any value (XEP-0122 <open/>), listing no archive ids."""
    query = etree.Element(QUERY, nsmap={None: MAM})
    x = form(
        "form",
        MAM,
        [
            Field("with", "jid-single"),
            Field("start", "text-single"),
            Field("end", "text-single"),
            Field("before-id", "text-single"),
            Field("after-id", "text-single"),
            Field("ids", "list-multi"),
        ],
    )
    ids = x[-1]
    validate = etree.SubElement(ids, f"{{{VALIDATE}}}validate", nsmap={None: VALIDATE})
    validate.set("datatype", "xs:string")
    etree.SubElement(validate, f"{{{VALIDATE}}}open")
    query.append(x)
    return query


def metadata(first: tuple[str, int] | None, last: tuple[str, int] | None) -> etree._Element:
    """<metadata><start id timestamp/><end id timestamp/></metadata> (XEP-0313 7.1)."""
    element = etree.Element(f"{{{MAM}}}metadata", nsmap={None: MAM})
    for name, edge in (("start", first), ("end", last)):
        if edge is not None:
            child = etree.SubElement(element, f"{{{MAM}}}{name}")
            child.set("id", edge[0])
            child.set("timestamp", stamp(edge[1]))
    return element
