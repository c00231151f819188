"""The `components` section of the config file: external components (XEP-0114).

Standalone pydantic models (xmppd.config holds the section as
`Config.components`), so errors carry the file, line and key like every
other section. Without the section no component port is opened.

The component protocol has no TLS: the handshake is a SHA-1 of the
secret and a fresh stream id (no replay), but what follows is clear text
and the digest can be attacked offline. So the listener binds to loopback
unless `allow_remote` says a private network protects it, and secrets
must be long enough not to be guessed from one captured handshake.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from xmppd.s2s.config import _domain

MIN_SECRET_CHARS = 16
"""A shorter secret falls to an offline search of one captured handshake."""

Seconds = Annotated[StrictFloat, Field(allow_inf_nan=False, gt=0)]


def strong_secret(value: object) -> object:
    """Check a shared secret before it becomes a SecretStr, in words that never show
    it: pydantic's own errors would quote the value, and a config error is printed
    and logged (on reload too)."""
    if not isinstance(value, str):
        raise ValueError("expected a string (quote it if it looks like a number)")
    if value != value.strip():
        raise ValueError("has leading or trailing spaces (a copy-paste slip?)")
    if len(value) < MIN_SECRET_CHARS:
        raise ValueError(
            f"too short: at least {MIN_SECRET_CHARS} characters "
            "(e.g. the output of `openssl rand -hex 16`)"
        )
    return value


def _address(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"expected an IP address (like 127.0.0.1 or ::1), got {value!r}") from None


class ComponentListener(BaseModel):
    """A socket where components connect."""

    model_config = ConfigDict(extra="forbid")

    address: Annotated[StrictStr, AfterValidator(_address)] = "127.0.0.1"
    port: StrictInt = Field(default=5347, ge=0, le=65535)  # 0: the OS picks (tests)


class Component(BaseModel):
    """One component: the domain is the key of `components.domains`."""

    model_config = ConfigDict(extra="forbid")

    # SecretStr: never in a repr, a log line or an error message.
    secret: SecretStr
    name: StrictStr | None = None  # its name in the parent host's disco#items
    disco: StrictBool = True  # listed in disco#items of the host it is a subdomain of

    _strong = field_validator("secret", mode="before")(strong_secret)


def _default_listeners() -> list[ComponentListener]:
    return [ComponentListener()]


class ComponentsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listeners: list[ComponentListener] = Field(default_factory=_default_listeners)
    # A listener on a non-loopback address must be asked for: the protocol is clear text.
    allow_remote: StrictBool = False
    max_stanza_bytes: StrictInt = Field(default=524288, ge=10240)
    max_stanza_bytes_unauthenticated: StrictInt = Field(default=4096, ge=1024)
    auth_timeout: Seconds = 10.0  # the handshake must come within this
    domains: dict[Annotated[StrictStr, AfterValidator(_domain)], Component] = Field(min_length=1)

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> ComponentsConfig:
        if self.allow_remote:
            return self
        for i, listener in enumerate(self.listeners):
            if not ipaddress.ip_address(listener.address).is_loopback:
                reason = (
                    f"{listener.address} is not a loopback address: the component protocol "
                    "(XEP-0114) is not encrypted; set components.allow_remote: true if a "
                    "private network protects it"
                )
                # Placed at the listener's address (xmppd.config reads "at").
                at = ("listeners", i, "address")
                raise PydanticCustomError("xmppd_config", "{reason}", {"reason": reason, "at": at})
        return self
