"""vCard4 (RFC 6351 XML, XEP-0292) to vcard-temp (XEP-0054), as far as they overlap.

Prosody 0.12 keeps vCards as vCard4 PEP items and its migrator exports only
those; xmppd serves vcard-temp. The fields clients show are converted: name,
nickname, birthday, e-mail, telephone, address, organisation, title, role,
URL, note, XMPP address and the photo (a data: URI becomes BINVAL, another
URI EXTVAL). Everything else is dropped; `convert` says which fields.
"""

from __future__ import annotations

from lxml import etree

VCARD4 = "urn:ietf:params:xml:ns:vcard-4.0"
VCARD_TEMP = "vcard-temp"
_V4 = f"{{{VCARD4}}}"

_TEXT_FIELDS = {  # vCard4 element -> vcard-temp element, value in <text/>
    "fn": "FN",
    "nickname": "NICKNAME",
    "title": "TITLE",
    "role": "ROLE",
    "note": "NOTE",
}
_N_PARTS = (
    ("surname", "FAMILY"),
    ("given", "GIVEN"),
    ("additional", "MIDDLE"),
    ("prefix", "PREFIX"),
    ("suffix", "SUFFIX"),
)
_ADR_PARTS = (
    ("pobox", "POBOX"),
    ("ext", "EXTADD"),
    ("street", "STREET"),
    ("locality", "LOCALITY"),
    ("region", "REGION"),
    ("code", "PCODE"),
    ("country", "CTRY"),
)


def _value(element: etree._Element, *kinds: str) -> str | None:
    for kind in kinds:
        text = element.findtext(f"{_V4}{kind}")
        if text and text.strip():
            return text.strip()
    return None


def _sub(parent: etree._Element, tag: str, text: str | None = None) -> etree._Element:
    child = etree.SubElement(parent, f"{{{VCARD_TEMP}}}{tag}")
    if text is not None:
        child.text = text
    return child


def _types(element: etree._Element) -> list[str]:
    """vCard4 type parameters ("home", "work", "cell", ...) as vcard-temp flags."""
    found = element.findall(f"{_V4}parameters/{_V4}type/{_V4}text")
    return [t.text.strip().upper() for t in found if t.text and t.text.strip().isalpha()]


def convert(vcard4: etree._Element) -> tuple[etree._Element, list[str]]:
    """The vcard-temp <vCard/> for a <vcard xmlns='urn:ietf:params:xml:ns:vcard-4.0'/>,
    and the names of the vCard4 fields that had no counterpart (dropped)."""
    out = etree.Element(f"{{{VCARD_TEMP}}}vCard", nsmap={None: VCARD_TEMP})
    dropped: list[str] = []
    for field in vcard4:
        if not isinstance(field.tag, str) or not field.tag.startswith(_V4):
            continue
        name = etree.QName(field).localname
        if name in _TEXT_FIELDS:
            value = _value(field, "text")
            if value is not None:
                _sub(out, _TEXT_FIELDS[name], value)
        elif name == "n":
            n = _sub(out, "N")
            for part, tag in _N_PARTS:
                value = _value(field, part)
                if value is not None:
                    _sub(n, tag, value)
        elif name == "bday":
            value = _value(field, "date", "date-time", "text")
            if value is not None:
                _sub(out, "BDAY", value)
        elif name == "email":
            value = _value(field, "text")
            if value is not None:
                email = _sub(out, "EMAIL")
                for flag in _types(field):
                    _sub(email, flag)
                _sub(email, "USERID", value)
        elif name == "tel":
            value = _value(field, "uri", "text")
            if value is not None:
                tel = _sub(out, "TEL")
                for flag in _types(field):
                    _sub(tel, "CELL" if flag == "CELL" else flag)
                _sub(tel, "NUMBER", value.removeprefix("tel:"))
        elif name == "adr":
            adr = _sub(out, "ADR")
            for flag in _types(field):
                _sub(adr, flag)
            for part, tag in _ADR_PARTS:
                value = _value(field, part)
                if value is not None:
                    _sub(adr, tag, value)
        elif name == "org":
            value = _value(field, "text")
            if value is not None:
                org = _sub(out, "ORG")
                _sub(org, "ORGNAME", value)
        elif name == "url":
            value = _value(field, "uri")
            if value is not None:
                _sub(out, "URL", value)
        elif name == "impp":
            value = _value(field, "uri")
            if value is not None and value.startswith("xmpp:"):
                _sub(out, "JABBERID", value.removeprefix("xmpp:"))
            else:
                dropped.append(name)
        elif name == "photo":
            _photo(out, _value(field, "uri"))
        else:
            dropped.append(name)
    return out, dropped


def _photo(out: etree._Element, uri: str | None) -> None:
    if uri is None:
        return
    photo = _sub(out, "PHOTO")
    if uri.startswith("data:") and ";base64," in uri:
        media_type, _, data = uri[5:].partition(";base64,")
        if media_type:
            _sub(photo, "TYPE", media_type)
        _sub(photo, "BINVAL", data)
    else:
        _sub(photo, "EXTVAL", uri)
