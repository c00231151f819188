"""Entity capabilities of the server (XEP-0115): a hash of its disco#info in the stream features.

A client that has seen this server's verification string before knows its
features without a disco#info round trip at every login (XEP-0115 section
6.3). The string is computed once at start, after every module registered its
features. A client that has not seen it asks disco#info for the node
"NODE#VER", which the disco module answers with the server's own info: the
identities and features the hash was made from.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable
from typing import NamedTuple

from lxml import etree
from pydantic import BaseModel, ConfigDict, StrictStr

from xmppd.modulehost import Module
from xmppd.modules.disco import Disco

CAPS = "http://jabber.org/protocol/caps"
DISCO_INFO = "http://jabber.org/protocol/disco#info"
DATA_FORMS = "jabber:x:data"
_INFO_QUERY = f"{{{DISCO_INFO}}}query"


class Identity(NamedTuple):
    category: str
    type: str
    name: str | None = None
    lang: str | None = None


def verification_string(
    identities: Iterable[Identity],
    features: Iterable[str],
    forms: Iterable[etree._Element] = (),
) -> str:
    """The SHA-1 'ver' of a disco#info result, by the generation method of XEP-0115 section 5.1.

    `forms` are XEP-0128 <x xmlns='jabber:x:data'/> elements; one without a
    hidden FORM_TYPE field is left out, as section 5.4 tells processors to.
    Python compares str by code point, which is the "i;octet" order of UTF-8.
    """
    s: list[str] = []
    for ident in sorted(identities, key=lambda i: (i.category, i.type, i.lang or "", i.name or "")):
        s.append(f"{ident.category}/{ident.type}/{ident.lang or ''}/{ident.name or ''}<")
    s.extend(f"{feature}<" for feature in sorted(set(features)))
    typed = [(form_type, form) for form in forms if (form_type := _form_type(form)) is not None]
    for form_type, form in sorted(typed, key=lambda pair: pair[0]):
        s.append(f"{form_type}<")
        fields = [f for f in form.iter(f"{{{DATA_FORMS}}}field") if f.get("var") != "FORM_TYPE"]
        for field in sorted(fields, key=lambda f: f.get("var") or ""):
            s.append(f"{field.get('var') or ''}<")
            values = [v.text or "" for v in field.iter(f"{{{DATA_FORMS}}}value")]
            s.extend(f"{value}<" for value in sorted(values))
    digest = hashlib.sha1("".join(s).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii")


def _form_type(form: etree._Element) -> str | None:
    for field in form.iter(f"{{{DATA_FORMS}}}field"):
        if field.get("var") == "FORM_TYPE" and field.get("type") == "hidden":
            return field.findtext(f"{{{DATA_FORMS}}}value") or ""
    return None


class CapsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    node: StrictStr = "https://xmppd.example/caps"


class Caps(Module):
    name = "caps"
    Options = CapsOptions
    fixed_options = ("node",)  # in the verification string clients cached

    def setup(self) -> None:
        self.node: str = self.options.node  # type: ignore[attr-defined]
        self.ver = ""
        self.host.add_feature(CAPS)
        self.host.add_stream_feature("bound", self._stream_feature)

    async def start(self) -> None:
        self._advertise()
        # A reload that enables or disables modules changes the features hashed.
        self.host.on("modules/changed", self._modules_changed)

    def _advertise(self) -> None:
        disco = self.host.find_module(Disco)
        if disco is not None and self.ver:
            disco.remove_server_info_node(f"{self.node}#{self.ver}")
        self.ver = verification_string(self._identities(), self.host.features["server"])
        if disco is not None:
            disco.add_server_info_node(f"{self.node}#{self.ver}")

    def _modules_changed(self) -> None:
        self._advertise()

    def _identities(self) -> list[Identity]:
        return [Identity(category, type_, name) for category, type_, name in self.host.identities]

    def _stream_feature(self) -> etree._Element:
        c = etree.Element(f"{{{CAPS}}}c", nsmap={None: CAPS})
        c.set("hash", "sha-1")
        c.set("node", self.node)
        c.set("ver", self.ver)
        return c


MODULE = Caps
