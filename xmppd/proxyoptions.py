"""The PROXY protocol's two listener options, for client and server listeners alike.

Both listener models (xmppd.config `ListenerConfig`, xmppd.s2s.config
`S2SListener`) extend this one, so that the rule which makes the option safe
(a header is believed only from `trusted_proxies`, so that list must name
someone) is written and reported once, and so is the choice between accepting
connections directly and reading a balancer's header first
(xmppd/proxyproto.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from typing import Annotated, Self

from pydantic import AfterValidator, BaseModel, Field, StrictBool, StrictStr, model_validator
from pydantic_core import PydanticCustomError

from xmppd.proxyproto import Network, ProxyHeaderReader


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise PydanticCustomError(
            "xmppd_config",
            "{reason}",
            {
                "reason": "expected an address or network (like 10.0.0.5 or 10.0.0.0/24), "
                f"got {json.dumps(value)}",
                "at": (),
            },
        ) from None


class ProxyProtocolOptions(BaseModel):
    """What a listener behind a load balancer needs; off by default, as a header is a
    claim that only a balancer may make."""

    # Every connection starts with a PROXY protocol header from a load balancer
    # naming the peer's address (xmppd.proxyproto); only from trusted_proxies.
    proxy_protocol: StrictBool = False
    trusted_proxies: list[Annotated[StrictStr, AfterValidator(_network)]] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )

    @model_validator(mode="after")
    def _some_proxy(self) -> Self:
        if self.proxy_protocol and not self.trusted_proxies:
            reason = (
                "proxy_protocol needs the balancers' addresses: nobody else may claim "
                "to speak for a client"
            )
            raise PydanticCustomError(
                "xmppd_config", "{reason}", {"reason": reason, "at": ("trusted_proxies",)}
            )
        return self

    def proxy_networks(self) -> list[Network]:
        return [ipaddress.ip_network(net) for net in self.trusted_proxies]

    def accepting(
        self, make: Callable[[str | None], asyncio.Protocol]
    ) -> Callable[[], asyncio.Protocol]:
        """The listener's protocol factory: `make(None)`, a connection that takes its
        peer's address from TCP; or, with `proxy_protocol`, first the reader of the
        balancer's header, which then calls `make` with the address the header names."""
        if not self.proxy_protocol:
            return lambda: make(None)
        trusted = self.proxy_networks()
        return lambda: ProxyHeaderReader(trusted, make)
