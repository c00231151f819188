"""Data forms (XEP-0004): what the ad-hoc commands send and read.

Only what a command needs: build a form or a result with typed fields, and
read a submitted form into values by field name. Field types say how a
client shows a field (a masked entry for text-private, a list for
jid-multi); the server checks every value itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from xmppd.stream.errors import StanzaError

DATA = "jabber:x:data"
_X = f"{{{DATA}}}x"
_FIELD = f"{{{DATA}}}field"
_VALUE = f"{{{DATA}}}value"


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a form: `var`, its type, and what the client shows."""

    var: str
    type: str = "text-single"
    label: str | None = None
    required: bool = False
    values: tuple[str, ...] = ()
    options: tuple[tuple[str, str], ...] = ()  # list-single/-multi: (label, value)


def form(
    type_: str,
    form_type: str,
    fields: Iterable[Field],
    title: str | None = None,
    instructions: str | None = None,
) -> etree._Element:
    """An <x xmlns='jabber:x:data'/> of `type_` ("form" or "result") with its FORM_TYPE."""
    x = etree.Element(_X, nsmap={None: DATA})
    x.set("type", type_)
    if title:
        etree.SubElement(x, f"{{{DATA}}}title").text = title
    if instructions:
        etree.SubElement(x, f"{{{DATA}}}instructions").text = instructions
    for spec in (Field("FORM_TYPE", "hidden", values=(form_type,)), *fields):
        element = etree.SubElement(x, _FIELD)
        element.set("var", spec.var)
        element.set("type", spec.type)
        if spec.label:
            element.set("label", spec.label)
        if spec.required:
            etree.SubElement(element, f"{{{DATA}}}required")
        for label, value in spec.options:
            option = etree.SubElement(element, f"{{{DATA}}}option")
            option.set("label", label)
            etree.SubElement(option, _VALUE).text = value
        for value in spec.values:
            etree.SubElement(element, _VALUE).text = value
    return x


class Submitted:
    """The values of a submitted form by field name (each a list: multi fields)."""

    def __init__(self, values: dict[str, list[str]]) -> None:
        self.values = values

    @classmethod
    def find(cls, parent: etree._Element, form_type: str) -> Submitted | None:
        """The submitted form among `parent`'s children, None if there is none;
        bad-request for a form of another FORM_TYPE or a malformed one."""
        x = parent.find(_X)
        if x is None:
            return None
        if x.get("type") != "submit":
            raise StanzaError("bad-request", "expected a data form of type 'submit'")
        values: dict[str, list[str]] = {}
        for element in x.iterchildren(_FIELD):
            var = element.get("var")
            if not var:
                raise StanzaError("bad-request", "a submitted field has no 'var'")
            values[var] = [value.text or "" for value in element.iterchildren(_VALUE)]
        given = values.pop("FORM_TYPE", None)
        if given is not None and given != [form_type]:
            raise StanzaError("bad-request", f"expected a form of FORM_TYPE {form_type}")
        return cls(values)

    def one(self, var: str, *, strip: bool = True) -> str:
        """The single value of `var` ("" when absent); `strip` False keeps the spaces
        a password may have. bad-request when the field has several values."""
        values = self.values.get(var) or [""]
        if len(values) != 1:
            raise StanzaError("bad-request", f"the field {var!r} takes one value")
        return values[0].strip() if strip else values[0]

    def text(self, var: str) -> str:
        """The lines of a text-multi field `var`, joined into one text."""
        return "\n".join(self.values.get(var, [])).strip()

    def many(self, var: str) -> list[str]:
        """Every non-empty value of `var` (a jid-multi field), stripped."""
        return [v.strip() for v in self.values.get(var, []) if v.strip()]
