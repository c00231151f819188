"""The `s2s` section of the config file: federation with other XMPP domains.

Standalone pydantic models (xmppd.config holds the section as
`Config.s2s`), so errors carry the file, line and key like every other
section. Without the section the node does no federation: a stanza to
another domain is answered with <remote-server-not-found/>.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)
from slixmpp.jid import JID, InvalidJID

from xmppd.proxyoptions import ProxyProtocolOptions


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"expected an IP address (like 0.0.0.0 or ::), got {value!r}") from None


def _domain(value: str) -> str:
    try:
        jid = JID(value)
    except InvalidJID as e:
        raise ValueError(f"{value!r} is not a valid domain name ({e})") from None
    if jid.local or jid.resource or not jid.domain:
        raise ValueError(f"{value!r} is not a bare domain name")
    return str(jid.domain)


def _dns_server(value: str) -> str:
    host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
    try:
        ipaddress.ip_address(host)
        if port and not 0 < int(port) < 65536:
            raise ValueError
    except ValueError:
        raise ValueError(f"expected an IP address, optionally with :port, got {value!r}") from None
    return value


def _file(value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    base = (info.context or {}).get("base_dir")
    path = value.expanduser()
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if info.context is not None and not path.is_file():
        raise ValueError(f"no such file: {path}")
    return path


Seconds = Annotated[StrictFloat, Field(allow_inf_nan=False, gt=0)]


class S2SListener(ProxyProtocolOptions):
    """A socket where other servers connect: STARTTLS on it (RFC 6120), or TLS from the
    first byte with `direct_tls` (XEP-0368, the `_xmpps-server` SRV record's port);
    behind a load balancer, with its PROXY header first (`proxy_protocol`)."""

    model_config = ConfigDict(extra="forbid")

    address: Annotated[StrictStr, AfterValidator(_address)]
    port: StrictInt = Field(ge=0, le=65535)  # 0: the OS picks (tests)
    direct_tls: StrictBool = False


class DomainPolicy(BaseModel):
    """What applies to one remote domain."""

    model_config = ConfigDict(extra="forbid")

    host: StrictStr | None = None  # connect here instead of asking DNS (with port)
    port: StrictInt = Field(default=5269, ge=1, le=65535)
    direct_tls: StrictBool = False  # that host and port take TLS from the first byte
    ca_file: Path | None = None  # the CAs its certificate must chain to
    # Authenticate to it with dialback when it does not accept our certificate; None:
    # as `s2s.dialback` says.
    dialback: StrictBool | None = None
    # Let it authenticate to us with dialback when its certificate does not validate
    # for it (over TLS always); None: as `s2s.accept_dialback` says.
    accept_dialback: StrictBool | None = None

    _file = field_validator("ca_file")(_file)


def _default_listeners() -> list[S2SListener]:
    return [S2SListener(address="0.0.0.0", port=5269)]


class S2SConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listeners: list[S2SListener] = Field(default_factory=_default_listeners)
    # CAs every peer's certificate may chain to; none: the system's trust store.
    ca_file: Path | None = None
    max_stanza_bytes: StrictInt = Field(default=524288, ge=10240)
    max_stanza_bytes_unauthenticated: StrictInt = Field(default=10240, ge=1024)
    auth_timeout: Seconds = 30.0  # a stream must be authenticated within this
    idle_timeout: Seconds = 600.0  # a stream that carries nothing this long is closed
    # Bytes read per second from one stream (a token bucket holding one second's worth);
    # past it the stream stops being read for a while (TCP backpressure). 0: no limit.
    max_bytes_per_second: StrictInt = Field(default=1048576, ge=0)
    connect_timeout: Seconds = 15.0  # DNS, TCP, TLS and authentication of an outgoing stream
    # Dialback (XEP-0220) when a peer does not accept our certificate (always over TLS).
    dialback: StrictBool = True
    # Incoming dialback (XEP-0220): a peer whose certificate does not validate for its
    # domain may authenticate with dialback instead (over TLS always). Off: valid
    # certificates (SASL EXTERNAL) only.
    accept_dialback: StrictBool = False
    # Bidirectional streams (XEP-0288): one stream carries stanzas both ways.
    bidi: StrictBool = True
    max_queue: StrictInt = Field(default=1000, ge=1)  # stanzas waiting per remote domain
    # Incoming streams open at once from one IP address; past it a new one is refused
    # with <policy-violation/>. 0: no limit.
    max_connections_per_address: StrictInt = Field(default=32, ge=0)
    # DNS servers for SRV and address lookups ("IP" or "IP:port"); none: /etc/resolv.conf.
    dns_servers: list[Annotated[StrictStr, AfterValidator(_dns_server)]] = Field(
        default_factory=list
    )
    domains: dict[Annotated[StrictStr, AfterValidator(_domain)], DomainPolicy] = Field(
        default_factory=dict
    )

    _file = field_validator("ca_file")(_file)

    def policy(self, domain: str) -> DomainPolicy:
        return self.domains.get(domain) or _NO_POLICY

    def ca_file_for(self, domain: str) -> Path | None:
        """The CAs `domain`'s certificate must chain to, both ways: its own `ca_file`,
        else `s2s.ca_file`, else (None) the system's; never another domain's. A trailing
        dot names the same domain (as certificate names are matched, identity.py)."""
        return self.policy(domain.rstrip(".")).ca_file or self.ca_file

    def dialback_to(self, domain: str) -> bool:
        allowed = self.policy(domain).dialback
        return self.dialback if allowed is None else allowed

    def dialback_from(self, domain: str) -> bool:
        allowed = self.policy(domain).accept_dialback
        return self.accept_dialback if allowed is None else allowed


_NO_POLICY = DomainPolicy()
