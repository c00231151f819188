"""Entity Time (XEP-0202): the server's clock, in UTC with a zero offset.

Whole seconds: some clients (slixmpp among them) fail on fractional ones."""

from __future__ import annotations

from datetime import UTC, datetime

from lxml import etree

from xmppd.modulehost import IqRequest, Module

TIME = "urn:xmpp:time"


class Time(Module):
    name = "time"
    toggleable = True  # a reload may enable or disable it

    def setup(self) -> None:
        self.host.add_feature(TIME)
        self.host.iq(TIME, "get", self.time)

    async def time(self, request: IqRequest) -> etree._Element:
        now = datetime.now(UTC)
        el = etree.Element(f"{{{TIME}}}time", nsmap={None: TIME})
        etree.SubElement(el, f"{{{TIME}}}tzo").text = "+00:00"
        etree.SubElement(el, f"{{{TIME}}}utc").text = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        return el


MODULE = Time
