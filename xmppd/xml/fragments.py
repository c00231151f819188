"""Parsing XML this server made itself: stanzas another node or a dropped connection
hands back, records it stored. Entities are never resolved nor fetched and trees
stay within libxml2's default limits, as for what a peer sends, in case a store
holds something it should not. One parser for the process: lxml's parsers are not
shared between threads, and every caller runs on the event loop."""

from __future__ import annotations

from lxml import etree

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)


def parse(data: bytes | str) -> etree._Element:
    """The element `data` serialises; etree.XMLSyntaxError if it does not."""
    return etree.fromstring(data, _PARSER)
