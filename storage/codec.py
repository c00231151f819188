"""Compact, typed binary encoding of attribute values (no pickle).

Used for the SQLite attrs column, cache values and paging tokens. It keeps
str, int and bytes distinct, and decoding untrusted input (a corrupted cache
entry, a forged page token) can only raise ValueError, never run code.

Layout of one value: a tag byte, then
  b"s" + u32 length + UTF-8 | b"b" + u32 length + bytes | b"i" + i64.
A mapping is a sequence of (value of the key as "s", value).
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping

from .base import AttrValue

_U32 = struct.Struct(">I")
_I64 = struct.Struct(">q")


def _encode_value(value: AttrValue, out: bytearray) -> None:
    if isinstance(value, bool):
        raise ValueError("bool is not an attribute value")
    if isinstance(value, int):
        out += b"i"
        out += _I64.pack(value)
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        out += b"s"
        out += _U32.pack(len(raw))
        out += raw
    elif isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        out += b"b"
        out += _U32.pack(len(raw))
        out += raw
    else:
        raise ValueError(f"cannot encode {type(value).__name__}")


def _decode_value(data: memoryview, pos: int) -> tuple[AttrValue, int]:
    try:
        tag = data[pos]
        if tag == 0x69:  # "i"
            return _I64.unpack_from(data, pos + 1)[0], pos + 9
        (size,) = _U32.unpack_from(data, pos + 1)
        start, end = pos + 5, pos + 5 + size
        if end > len(data):
            raise ValueError("truncated value")
        if tag == 0x73:  # "s"
            return str(data[start:end], "utf-8"), end
        if tag == 0x62:  # "b"
            return bytes(data[start:end]), end
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed encoded value: {exc}") from None
    raise ValueError(f"unknown value tag {tag:#x}")


def encode_values(values: Iterable[AttrValue]) -> bytes:
    out = bytearray()
    for value in values:
        _encode_value(value, out)
    return bytes(out)


def decode_values(data: bytes | memoryview) -> list[AttrValue]:
    view = memoryview(data)
    values: list[AttrValue] = []
    pos = 0
    while pos < len(view):
        value, pos = _decode_value(view, pos)
        values.append(value)
    return values


def encode_attrs(attrs: Mapping[str, AttrValue]) -> bytes:
    out = bytearray()
    for key, value in attrs.items():
        _encode_value(key, out)
        _encode_value(value, out)
    return bytes(out)


def decode_attrs(data: bytes | memoryview) -> dict[str, AttrValue]:
    flat = decode_values(data)
    if len(flat) % 2:
        raise ValueError("odd number of values in an attribute map")
    attrs: dict[str, AttrValue] = {}
    for i in range(0, len(flat), 2):
        key = flat[i]
        if not isinstance(key, str):
            raise ValueError("attribute name is not a string")
        attrs[key] = flat[i + 1]
    return attrs


def encode_token(values: Iterable[AttrValue]) -> str:
    """An opaque, URL-safe paging token holding the last sort key of a page."""
    return base64.urlsafe_b64encode(encode_values(values)).decode("ascii").rstrip("=")


def name_token(name: str) -> str:
    """The page token that starts a query in name order right after the item name
    `name`, whether an item has that name or not: each backend's name-order token is
    the last name of the page (`encode_token([name])`). What pages by a key a client
    holds (an XEP-0059 <after/> or, descending, <before/>) resume from."""
    return encode_token([name])


def decode_token(token: str, count: int) -> list[AttrValue]:
    """The sort key inside `token`; ValueError if it is not one we made."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad page token: {exc}") from None
    values = decode_values(raw)
    if len(values) != count:
        raise ValueError("bad page token")
    return values
