"""Blocking Command (XEP-0191): the urn:xmpp:blocking protocol over the shared model.

The blocklist is part of the user's privacy record and is enforced by the
shared engine in `_privacy_engine`, ahead of any privacy list. Every change
is pushed to all the user's connected resources (not only those that fetched
the blocklist: a resource that never asked simply ignores the push), and the
engine tells newly blocked contacts the user went unavailable, and unblocked
ones the user's current presence.
"""

from __future__ import annotations

from dataclasses import replace

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field

from xmppd.modulehost import IqRequest
from xmppd.stream.errors import StanzaError

from ._privacy_engine import NS_BLOCKING, EngineModule, PrivacyData, owner_only, parse_value_jid

B = f"{{{NS_BLOCKING}}}"


class BlockingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_blocked: int = Field(1000, ge=1, description="JIDs in one user's blocklist")


class Blocking(EngineModule):
    name = "blocking"
    namespace = NS_BLOCKING
    Options = BlockingOptions

    async def get(self, request: IqRequest) -> etree._Element:
        owner_only(request)
        if request.payload.tag != f"{B}blocklist":
            raise StanzaError("bad-request", "expected <blocklist xmlns='urn:xmpp:blocking'/>")
        data = await self.engine.data(request.target)
        return _element("blocklist", data.blocklist)

    async def set(self, request: IqRequest) -> None:
        owner_only(request)
        options: BlockingOptions = self.options  # type: ignore[assignment]
        payload = request.payload
        if payload.tag == f"{B}block":
            jids = _items(payload)
            if not jids:
                raise StanzaError("bad-request", "<block/> needs at least one <item/>")

            def block(data: PrivacyData) -> PrivacyData:
                added = tuple(j for j in jids if j not in data.blocklist)
                if len(data.blocklist) + len(added) > options.max_blocked:
                    raise StanzaError(
                        "policy-violation", f"at most {options.max_blocked} blocked JIDs"
                    )
                return replace(data, blocklist=data.blocklist + added)

            await self.engine.update(request.target, block)
            self.engine.push(request.target, _element("block", jids))
        elif payload.tag == f"{B}unblock":
            jids = _items(payload)  # none: unblock everyone
            gone = set(jids)

            def unblock(data: PrivacyData) -> PrivacyData:
                kept = tuple(j for j in data.blocklist if gone and j not in gone)
                return replace(data, blocklist=kept)

            await self.engine.update(request.target, unblock)
            self.engine.push(request.target, _element("unblock", jids))
        else:
            raise StanzaError("bad-request", "expected <block/> or <unblock/>")
        return None


def _items(payload: etree._Element) -> list[str]:
    """The normalized JIDs of the <item/> children, in order, without repeats."""
    jids: dict[str, None] = {}
    for child in payload:
        if not isinstance(child.tag, str):
            continue
        if child.tag != f"{B}item":
            raise StanzaError("bad-request", "only <item jid='...'/> children are allowed")
        value = child.get("jid")
        if value is None:
            raise StanzaError("bad-request", "an <item/> needs a 'jid'")
        try:
            jids[parse_value_jid(value).full] = None
        except ValueError as exc:
            raise StanzaError("jid-malformed", str(exc)) from None
    return list(jids)


def _element(local: str, jids: list[str] | tuple[str, ...]) -> etree._Element:
    element = etree.Element(f"{B}{local}", nsmap={None: NS_BLOCKING})
    for jid in jids:
        etree.SubElement(element, f"{B}item").set("jid", jid)
    return element


MODULE = Blocking
