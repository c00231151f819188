"""XMPP Ping (XEP-0199): clients check the server is still there."""

from __future__ import annotations

from xmppd.modulehost import IqRequest, Module

PING = "urn:xmpp:ping"


class Ping(Module):
    name = "ping"
    toggleable = True  # a reload may enable or disable it

    def setup(self) -> None:
        self.host.add_feature(PING)
        self.host.iq(PING, "get", self.pong)

    async def pong(self, request: IqRequest) -> None:
        return None  # an empty result is the answer


MODULE = Ping
