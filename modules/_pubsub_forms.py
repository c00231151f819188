"""Node configuration for the pubsub engine: the pubsub# options, their data forms
(XEP-0004) and the XEP-0060 errors for forms that are wrong.

One table (`FIELDS`) says which options exist, their type and allowed values;
the same table makes the configuration form sent to owners, checks a submitted
one (`apply_form`) and checks publish-options preconditions (`check_preconditions`),
so an option cannot be accepted in one place and unknown in another.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lxml import etree

from xmppd.stream.errors import StanzaError

PUBSUB = "http://jabber.org/protocol/pubsub"
PUBSUB_OWNER = f"{PUBSUB}#owner"
PUBSUB_EVENT = f"{PUBSUB}#event"
PUBSUB_ERRORS = f"{PUBSUB}#errors"
NODE_CONFIG = f"{PUBSUB}#node_config"
PUBLISH_OPTIONS = f"{PUBSUB}#publish-options"
DATA = "jabber:x:data"
_X = f"{{{DATA}}}x"
_FIELD = f"{{{DATA}}}field"
_VALUE = f"{{{DATA}}}value"

ACCESS_MODELS = ("open", "presence", "roster", "whitelist", "authorize")
"""Supported ('authorize', an owner's approval of each subscriber, by the pubsub
service only)."""
SUBSCRIBE_AUTHORIZATION = f"{PUBSUB}#subscribe_authorization"
SUBSCRIBE_OPTIONS = f"{PUBSUB}#subscribe_options"
SUBSCRIPTION_FIELDS = {
    "pubsub#deliver": "Enable delivery?",
    "pubsub#include_body": "Receive message body in addition to payload?",
}
"""The subscription options (XEP-0060 6.3) this service knows, all boolean."""
SUBSCRIPTION_DEFAULTS = {"pubsub#deliver": True, "pubsub#include_body": False}
Config = dict[str, Any]


def pubsub_error(
    condition: str,
    app: str | None = None,
    text: str | None = None,
    type_: str | None = None,
    **attrs: str,
) -> StanzaError:
    """A stanza error with XEP-0060's application condition `app` (section 7 and 8 tables)."""
    element = None
    if app is not None:
        element = etree.Element(f"{{{PUBSUB_ERRORS}}}{app}", nsmap={None: PUBSUB_ERRORS})
        for key, value in attrs.items():
            element.set(key, value)
    return StanzaError(condition, text, type_, app=element)


@dataclass(frozen=True, slots=True)
class Field:
    """One pubsub# option: its form type, label and allowed values."""

    type: str  # boolean, text-single, list-single, list-multi, max-items
    label: str
    options: tuple[str, ...] = ()


FIELDS: dict[str, Field] = {
    "pubsub#title": Field("text-single", "A friendly name for the node"),
    "pubsub#description": Field("text-single", "A description of the node"),
    "pubsub#access_model": Field("list-single", "Who may subscribe and retrieve items",
                                 ACCESS_MODELS),
    "pubsub#publish_model": Field("list-single", "Who may publish",
                                  ("publishers", "subscribers", "open")),
    "pubsub#roster_groups_allowed": Field("list-multi", "Roster groups allowed to subscribe"),
    "pubsub#max_items": Field("max-items", "Max number of items to persist ('max': the most "
                              "the service allows)"),
    "pubsub#persist_items": Field("boolean", "Persist items to storage"),
    "pubsub#deliver_notifications": Field("boolean", "Deliver event notifications"),
    "pubsub#deliver_payloads": Field("boolean", "Deliver payloads with event notifications"),
    "pubsub#notify_retract": Field("boolean", "Notify subscribers when items are removed"),
    "pubsub#notify_delete": Field("boolean", "Notify subscribers when the node is deleted"),
    "pubsub#notify_config": Field("boolean", "Notify subscribers when the configuration "
                                  "changes"),
    "pubsub#send_last_published_item": Field("list-single", "When to send the last published "
                                             "item", ("never", "on_sub", "on_sub_and_presence")),
    "pubsub#notification_type": Field("list-single", "The message type of notifications",
                                      ("headline", "normal")),
    "pubsub#type": Field("text-single", "The type of node data, usually a namespace"),
}


def default_config(access_model: str, max_items: int | str) -> Config:
    """A new node's configuration; PEP nodes default to 'presence' and one item."""
    return {
        "pubsub#title": "",
        "pubsub#description": "",
        "pubsub#access_model": access_model,
        "pubsub#publish_model": "publishers",
        "pubsub#roster_groups_allowed": [],
        "pubsub#max_items": max_items,
        "pubsub#persist_items": True,
        "pubsub#deliver_notifications": True,
        "pubsub#deliver_payloads": True,
        "pubsub#notify_retract": True,
        "pubsub#notify_delete": True,
        "pubsub#notify_config": False,
        "pubsub#send_last_published_item": "on_sub_and_presence",
        "pubsub#notification_type": "headline",
        "pubsub#type": "",
    }


def _form_values(x: etree._Element, form_type: str) -> dict[str, list[str]]:
    """The fields of a submitted form, checked to be one: bad-request otherwise."""
    if x.tag != _X or x.get("type") not in ("submit", None):
        raise StanzaError("bad-request", "expected a submitted jabber:x:data form")
    values: dict[str, list[str]] = {}
    for field in x.findall(_FIELD):
        var = field.get("var")
        if not var:
            raise StanzaError("bad-request", "a form field without 'var'")
        values[var] = [v.text or "" for v in field.findall(_VALUE)]
    found = values.pop("FORM_TYPE", [""])
    if found != [form_type]:
        raise StanzaError("bad-request", f"FORM_TYPE must be {form_type}")
    return values


def _parse(var: str, raw: list[str], max_items_cap: int) -> Any:
    """One option's value from its form values; ValueError when it is not allowed."""
    field = FIELDS[var]
    if field.type == "list-multi":
        return list(raw)
    if len(raw) > 1:
        raise ValueError(f"{var} takes one value")
    value = raw[0] if raw else ""
    if field.type == "boolean":
        if value in ("1", "true"):
            return True
        if value in ("0", "false"):
            return False
        raise ValueError(f"{var} is a boolean")
    if field.type == "max-items":
        if value == "max":
            return "max"
        if not value.isdigit() or not 1 <= int(value) <= max_items_cap:
            raise ValueError(f"{var} must be 'max' or 1 to {max_items_cap}")
        return int(value)
    if field.options and value not in field.options:
        raise ValueError(f"{var} must be one of {', '.join(field.options)}")
    if len(value) > 1024:
        raise ValueError(f"{var} is too long")
    return value


def apply_form(config: Config, x: etree._Element, max_items_cap: int) -> Config:
    """`config` with a submitted node_config form applied (a new dict; `config` is
    untouched). An unknown field or a value out of range is not-acceptable and
    changes nothing (XEP-0060 8.2.5)."""
    values = _form_values(x, NODE_CONFIG)
    changed = dict(config)
    for var, raw in values.items():
        if var not in FIELDS:
            raise StanzaError("not-acceptable", f"unsupported option {var}")
        try:
            changed[var] = _parse(var, raw, max_items_cap)
        except ValueError as exc:
            raise StanzaError("not-acceptable", str(exc)) from None
    return changed


def publish_options(x: etree._Element | None, max_items_cap: int) -> Config:
    """The preconditions of a publish (XEP-0060 7.1.5), parsed: an option this service
    does not know, or a value it never allows, is a precondition that cannot be met."""
    if x is None:
        return {}
    wanted: Config = {}
    for var, raw in _form_values(x, PUBLISH_OPTIONS).items():
        if var not in FIELDS:
            raise precondition_not_met(f"unsupported option {var}")
        try:
            wanted[var] = _parse(var, raw, max_items_cap)
        except ValueError as exc:
            raise precondition_not_met(str(exc)) from None
    return wanted


def check_preconditions(config: Mapping[str, Any], wanted: Config) -> None:
    """Conflict with <precondition-not-met/> unless the node's options are as wanted."""
    for var, value in wanted.items():
        if config.get(var) != value:
            raise precondition_not_met(f"{var} is {_text(config.get(var))!r}")


def precondition_not_met(text: str) -> StanzaError:
    return pubsub_error("conflict", "precondition-not-met", text)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def config_form(config: Mapping[str, Any], form_type: str = NODE_CONFIG) -> etree._Element:
    """The owner's configuration form (XEP-0060 8.2.1) with the current values."""
    x = etree.Element(_X, nsmap={None: DATA})
    x.set("type", "form")
    hidden = etree.SubElement(x, _FIELD, var="FORM_TYPE", type="hidden")
    etree.SubElement(hidden, _VALUE).text = form_type
    for var, field in FIELDS.items():
        element = etree.SubElement(x, _FIELD, var=var, label=field.label)
        element.set("type", "text-single" if field.type == "max-items" else field.type)
        value = config.get(var)
        values = value if isinstance(value, list) else [_text(value)]
        for text in values:
            etree.SubElement(element, _VALUE).text = text
        for option in field.options:
            etree.SubElement(etree.SubElement(element, f"{{{DATA}}}option"), _VALUE).text = option
    return x


def subscription_form(values: Mapping[str, bool]) -> etree._Element:
    """The subscription options form (XEP-0060 6.3.2) with the current values."""
    x = etree.Element(_X, nsmap={None: DATA})
    x.set("type", "form")
    hidden = etree.SubElement(x, _FIELD, var="FORM_TYPE", type="hidden")
    etree.SubElement(hidden, _VALUE).text = SUBSCRIBE_OPTIONS
    for var, label in SUBSCRIPTION_FIELDS.items():
        element = etree.SubElement(x, _FIELD, var=var, type="boolean", label=label)
        etree.SubElement(element, _VALUE).text = _text(values[var])
    return x


def parse_subscription_form(x: etree._Element) -> dict[str, bool]:
    """A submitted subscription options form; anything this service does not know or
    a value that is not a boolean is <bad-request/> with <invalid-options/> (6.3.5.2)."""
    try:
        values = _form_values(x, SUBSCRIBE_OPTIONS)
    except StanzaError as exc:
        raise pubsub_error("bad-request", "invalid-options", exc.text) from None
    parsed: dict[str, bool] = {}
    for var, raw in values.items():
        if var not in SUBSCRIPTION_FIELDS or len(raw) != 1 or raw[0] not in (
            "1", "true", "0", "false"
        ):
            raise pubsub_error("bad-request", "invalid-options", f"{var} is not an option here")
        parsed[var] = raw[0] in ("1", "true")
    return parsed
