"""Software Version (XEP-0092). The OS is hidden unless the operator opts in:
it helps attackers more than it helps users."""

from __future__ import annotations

import platform

from lxml import etree
from pydantic import BaseModel, ConfigDict

import xmppd
from xmppd.modulehost import IqRequest, Module

VERSION = "jabber:iq:version"


class VersionOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "xmppd"
    show_os: bool = False


class Version(Module):
    name = "version"
    toggleable = True  # a reload may enable or disable it
    Options = VersionOptions

    def setup(self) -> None:
        self.host.add_feature(VERSION)
        self.host.iq(VERSION, "get", self.version)

    async def version(self, request: IqRequest) -> etree._Element:
        options: VersionOptions = self.options  # type: ignore[assignment]
        query = etree.Element(f"{{{VERSION}}}query", nsmap={None: VERSION})
        etree.SubElement(query, f"{{{VERSION}}}name").text = options.name
        etree.SubElement(query, f"{{{VERSION}}}version").text = xmppd.__version__
        if options.show_os:
            etree.SubElement(
                query, f"{{{VERSION}}}os"
            ).text = f"{platform.system()} {platform.release()}"
        return query


MODULE = Version
