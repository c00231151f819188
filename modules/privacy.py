"""Privacy lists (XEP-0016): the jabber:iq:privacy protocol over the shared model.

Storage, evaluation and enforcement live in `_privacy_engine` (shared with
XEP-0191 blocking); this module parses and answers the protocol. Only the
account itself may read or change its lists: anyone else asking gets
<service-unavailable/>, as for any namespace the account does not serve.
"""

from __future__ import annotations

from dataclasses import replace

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field

from xmppd.modulehost import IqRequest
from xmppd.session import ClientSession
from xmppd.stream.errors import StanzaError

from ._privacy_engine import (
    KINDS,
    NS_PRIVACY,
    EngineModule,
    PrivacyData,
    PrivacyItem,
    check_list,
    make_item,
    owner_only,
)

Q = f"{{{NS_PRIVACY}}}"


class PrivacyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_lists: int = Field(50, ge=1, description="privacy lists per user")
    max_items: int = Field(250, ge=1, description="items per privacy list")


class Privacy(EngineModule):
    name = "privacy"
    namespace = NS_PRIVACY
    Options = PrivacyOptions

    # --- get ---------------------------------------------------------------------------------

    async def get(self, request: IqRequest) -> etree._Element:
        owner_only(request)
        children = _children(request.payload)
        data = await self.engine.data(request.target)
        query = etree.Element(f"{Q}query", nsmap={None: NS_PRIVACY})
        if not children:
            session = self.engine.session(request.sender.full)
            active = self.engine.active(session) if session is not None else None
            if active is not None and active in data.lists:
                etree.SubElement(query, f"{Q}active").set("name", active)
            if data.default is not None:
                etree.SubElement(query, f"{Q}default").set("name", data.default)
            for name in data.lists:
                etree.SubElement(query, f"{Q}list").set("name", name)
            return query
        if len(children) > 1:
            raise StanzaError("bad-request", "retrieve one list at a time")
        (child,) = children
        name = child.get("name")
        if child.tag != f"{Q}list" or not name:
            raise StanzaError("bad-request", "expected <list name='...'/>")
        items = data.lists.get(name)
        if items is None:
            raise StanzaError("item-not-found", "no privacy list by that name")
        query.append(_list_element(name, items))
        return query

    # --- set ---------------------------------------------------------------------------------

    async def set(self, request: IqRequest) -> None:
        owner_only(request)
        children = _children(request.payload)
        if len(children) != 1:
            raise StanzaError("bad-request", "one <active/>, <default/> or <list/> per request")
        (child,) = children
        session = self.engine.session(request.sender.full)
        if child.tag == f"{Q}active":
            if session is None:
                raise StanzaError("not-allowed", "active lists belong to a connected resource")
            await self.engine.set_active(session, _optional_name(child))
        elif child.tag == f"{Q}default":
            await self._set_default(request.target, _optional_name(child), session)
        elif child.tag == f"{Q}list":
            await self._set_list(request.target, child, session)
        else:
            raise StanzaError("bad-request", "one <active/>, <default/> or <list/> per request")
        return None

    async def _set_default(self, bare: str, name: str | None, sender: ClientSession | None) -> None:
        def change(data: PrivacyData) -> PrivacyData:
            if name is not None and name not in data.lists:
                raise StanzaError("item-not-found", "no privacy list by that name")
            if (
                data.default is not None
                and name != data.default
                and self.engine.in_use_elsewhere(bare, data, data.default, sender)
            ):
                raise StanzaError("conflict", "another resource is using the default list")
            return replace(data, default=name)

        await self.engine.update(bare, change)

    async def _set_list(
        self, bare: str, element: etree._Element, sender: ClientSession | None
    ) -> None:
        options: PrivacyOptions = self.options  # type: ignore[assignment]
        name = element.get("name")
        if not name:
            raise StanzaError("bad-request", "a list needs a name")
        items = _parse_items(element, options.max_items)
        groups = {i.value for i in items if i.type == "group"}
        if groups:
            known = await self.engine.roster_groups(bare)
            if known is not None and not groups <= known:
                missing = ", ".join(sorted(g for g in groups - known if g))
                raise StanzaError("item-not-found", f"not a roster group: {missing}")

        def change(data: PrivacyData) -> PrivacyData:
            if not items:
                if name not in data.lists:
                    raise StanzaError("item-not-found", "no privacy list by that name")
                if self.engine.in_use_elsewhere(bare, data, name, sender):
                    raise StanzaError("conflict", "the list applies to another resource")
                return data.with_list(name, None)
            if name not in data.lists and len(data.lists) >= options.max_lists:
                raise StanzaError("policy-violation", f"at most {options.max_lists} lists")
            return data.with_list(name, items)

        await self.engine.update(bare, change)
        if not items and sender is not None and self.engine.active(sender) == name:
            self.engine.forget_active(sender)
        push = etree.Element(f"{Q}query", nsmap={None: NS_PRIVACY})
        etree.SubElement(push, f"{Q}list").set("name", name)
        self.engine.push(bare, push)


def _children(payload: etree._Element) -> list[etree._Element]:
    """Element children; text and comments do not count, elements of other namespaces do."""
    if payload.tag != f"{Q}query":
        raise StanzaError("bad-request", "expected <query xmlns='jabber:iq:privacy'/>")
    return [c for c in payload if isinstance(c.tag, str)]


def _optional_name(element: etree._Element) -> str | None:
    name = element.get("name")
    if name == "":
        raise StanzaError("bad-request", "an empty name; omit it to decline")
    return name


def _parse_items(element: etree._Element, max_items: int) -> tuple[PrivacyItem, ...]:
    items: list[PrivacyItem] = []
    for child in element:
        if not isinstance(child.tag, str):
            continue
        if child.tag != f"{Q}item":
            raise StanzaError("bad-request", "a list holds only <item/> elements")
        if len(items) >= max_items:
            raise StanzaError("policy-violation", f"at most {max_items} items per list")
        action = child.get("action")
        if action not in ("allow", "deny"):
            raise StanzaError("bad-request", "'action' must be allow or deny")
        order = child.get("order", "")
        if not order.isascii() or not order.isdigit():
            raise StanzaError("bad-request", "'order' must be a non-negative integer")
        kinds: list[str] = []
        for kind in child:
            if not isinstance(kind.tag, str):
                continue
            local = kind.tag[len(Q) :] if kind.tag.startswith(Q) else None
            if local not in KINDS:
                raise StanzaError("bad-request", f"unknown stanza kind {kind.tag!r}")
            kinds.append(local)
        try:
            item = make_item(
                int(order), action == "allow", child.get("type"), child.get("value"), kinds
            )
        except ValueError as exc:
            raise StanzaError("bad-request", str(exc)) from None
        items.append(item)
    try:
        return check_list(items)
    except ValueError as exc:
        raise StanzaError("bad-request", str(exc)) from None


def _list_element(name: str, items: tuple[PrivacyItem, ...]) -> etree._Element:
    lst = etree.Element(f"{Q}list", nsmap={None: NS_PRIVACY})
    lst.set("name", name)
    for item in items:
        el = etree.SubElement(lst, f"{Q}item")
        if item.type is not None:
            el.set("type", item.type)
            el.set("value", item.value or "")
        el.set("action", "allow" if item.allow else "deny")
        el.set("order", str(item.order))
        for kind in KINDS:
            if kind in item.kinds:
                etree.SubElement(el, f"{Q}{kind}")
    return lst


MODULE = Privacy
