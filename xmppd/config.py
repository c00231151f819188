"""The server configuration: one YAML file loaded into typed models.

Every value keeps the line it came from (`ConfigSource`), so that any
problem, found now or later by a module validating its own options, reads
`FILE:LINE: dotted.key[index]: what is wrong`. The loader checks everything
before the server starts and reports all problems at once: a server that
starts half-configured fails later, far from the cause.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import re
import socket
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError
from slixmpp.jid import JID, InvalidJID

from xmppd.components.config import ComponentsConfig, strong_secret
from xmppd.configfile import locate, not_found
from xmppd.proxyoptions import ProxyProtocolOptions
from xmppd.s2s.config import S2SConfig
from xmppd.sasl.mechanisms import Mechanism
from xmppd.storage.config import StorageConfig

log = logging.getLogger(__name__)

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)

MECHANISMS: tuple[Mechanism, ...] = typing.get_args(Mechanism)
"""Every SASL mechanism the server implements, strongest first (the default order)."""

_DEFAULTS_NAME = "<built-in defaults>"


# --------------------------------------------------------------------------- errors


class ConfigError(Exception):
    """The configuration cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _problem(reason: str, *at: str | int) -> PydanticCustomError:
    """A validation error placed `at` a sub-path of the validator's location.

    Pydantic locates a validator's error at the field or model it validates;
    cross-field checks (a duplicate host, a listener clashing with another)
    are best reported at the exact item, which this carries in the context.
    """
    return PydanticCustomError("xmppd_config", "{reason}", {"reason": reason, "at": at})


@dataclass(frozen=True)
class ConfigSource:
    """Where a configuration came from: the file as named by the operator, the
    folder its relative paths are resolved against, and the line of each key."""

    file: Path | None
    base_dir: Path
    lines: Mapping[Loc, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.file) if self.file is not None else _DEFAULTS_NAME

    def line_of(self, loc: Loc) -> int | None:
        """The line of `loc`, or of its nearest ancestor written in the file."""
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None

    def where(self, loc: Loc) -> str:
        line = self.line_of(loc)
        return self.name if line is None else f"{self.name}:{line}"

    def problem(self, loc: Loc, message: str) -> str:
        """One formatted problem line: `FILE:LINE: dotted.path: message`."""
        path = format_loc(loc)
        return f"{self.where(loc)}: {path}: {message}" if path else f"{self.where(loc)}: {message}"


def format_loc(loc: Loc) -> str:
    """("listeners", 1, "port") -> "listeners[1].port"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


# --------------------------------------------------------------------------- field types


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _tls_version(value: Any) -> Any:
    # YAML reads an unquoted 1.2 as a number; accept it for what it obviously means.
    return str(value) if isinstance(value, float) else value


def _domain(value: str) -> str:
    if not value:
        raise _problem("a host name cannot be empty")
    try:
        jid = JID(value)
    except InvalidJID as e:
        raise _problem(f"{json.dumps(value)} is not a valid domain name ({e})") from None
    if jid.local or jid.resource or not jid.domain:
        raise _problem(f"{json.dumps(value)} is not a bare domain name (no user@ or /resource)")
    return str(jid.domain)


def _bare_jid(value: str) -> str:
    try:
        jid = JID(value)
    except InvalidJID as e:
        raise _problem(f"{json.dumps(value)} is not a valid JID ({e})") from None
    if not jid.local or jid.resource:
        raise _problem(f"{json.dumps(value)} is not a bare JID like user@example.org")
    return str(jid.bare)


def _address(value: str) -> str:
    if value.lower() == "localhost":
        return "localhost"
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _problem(
            f'expected an IP address (like 127.0.0.1, ::1 or 0.0.0.0) or "localhost", '
            f"got {json.dumps(value)}"
        ) from None


def _loopback(address: str) -> bool:
    return address == "localhost" or ipaddress.ip_address(address).is_loopback


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Make a relative path absolute against the config file's folder (set by the loader)."""
    base = (info.context or {}).get("base_dir")
    if base is None:
        return path
    path = path.expanduser()
    return path if path.is_absolute() else Path(base) / path


def _existing_file(value: Path | None, info: ValidationInfo) -> Path | None:
    """A file the config names, made absolute. Only a loaded file is checked against the
    disk: a model built in code (tests, tools) may name files that are created later."""
    if value is None:
        return None
    path = _resolve(value, info)
    if info.context is not None and not path.is_file():
        raise _problem(f"no such file: {path}")
    return path


Domain = Annotated[StrictStr, AfterValidator(_domain)]
BareJID = Annotated[StrictStr, AfterValidator(_bare_jid)]
Seconds = Annotated[StrictFloat, Field(allow_inf_nan=False)]


def _no_duplicates(values: list[Any], what: str) -> None:
    first: dict[Any, int] = {}
    for i, value in enumerate(values):
        if value in first:
            raise _problem(f"{json.dumps(value)} is listed twice (also {what}[{first[value]}])", i)
        first[value] = i


def _unique(value: list[Any], info: ValidationInfo) -> list[Any]:
    """A list setting whose entries must all differ (a repeated one is a mistake)."""
    _no_duplicates(value, info.field_name or "")
    return value


# --------------------------------------------------------------------------- models


class ListenerConfig(ProxyProtocolOptions):
    """One listening socket for client connections."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["starttls", "direct_tls"]
    address: Annotated[StrictStr, AfterValidator(_address)]
    port: StrictInt = Field(ge=0, le=65535)  # 0: the OS picks a free port (tests)
    backlog: StrictInt = Field(default=1024, ge=1)


class TLSConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cert: Path | None = None
    key: Path | None = None
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"

    @field_validator("cert", "key")
    @classmethod
    def _absolute(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(value, info)

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.key is None else ("key", "cert")
            raise _problem(f"{given} is set but {missing} is not: give both or neither", given)
        return self


class LimitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_stanza_bytes: StrictInt = Field(default=262144, ge=1024)
    max_stanza_bytes_unauthenticated: StrictInt = Field(default=10240, ge=512)
    max_xml_depth: StrictInt = Field(default=48, ge=2, le=200)
    auth_timeout: Seconds = Field(default=30.0, gt=0)
    max_connections_per_ip: StrictInt = Field(default=200, ge=0)  # 0: unlimited
    auth_failure_delay: Seconds = Field(default=1.0, ge=0)
    auth_failures_before_ban: StrictInt = Field(default=20, ge=1)
    auth_ban_seconds: Seconds = Field(default=3600.0, gt=0)

    @model_validator(mode="after")
    def _unauthenticated_below_max(self) -> LimitsConfig:
        if self.max_stanza_bytes_unauthenticated > self.max_stanza_bytes:
            raise _problem(
                f"must be at most max_stanza_bytes ({self.max_stanza_bytes}), "
                f"got {self.max_stanza_bytes_unauthenticated}",
                "max_stanza_bytes_unauthenticated",
            )
        return self


class AuthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mechanisms: list[Annotated[Mechanism, BeforeValidator(_upper)]] = Field(
        default_factory=lambda: list(MECHANISMS), min_length=1
    )
    scram_iterations: StrictInt = Field(default=4096, ge=4096, le=10_000_000)
    allow_unencrypted: StrictBool = False  # SASL before TLS, never PLAIN: tests/debugging only
    proxy_auth: list[BareJID] = Field(default_factory=list)

    _unique = field_validator("mechanisms", "proxy_auth")(_unique)


class AdminConfig(BaseModel):
    """The node's admin HTTP API (xmppd.adminapi): how xmppctl reaches a running node."""

    model_config = ConfigDict(extra="forbid")

    address: Annotated[StrictStr, AfterValidator(_address)] = "127.0.0.1"
    port: StrictInt = Field(default=5290, ge=0, le=65535)  # 0: the OS picks a free port (tests)
    allow_remote: StrictBool = False  # a non-loopback address must be asked for explicitly
    # HTTPS with the node's certificate (the tls section); None: exactly when the address
    # is not loopback, where the bearer token would otherwise cross a network in clear.
    tls: StrictBool | None = None
    # The CAs xmppctl verifies the API's certificate against (None: the system's, or the
    # self-signed certificate itself when the node uses the embedded default's).
    ca_file: Path | None = None

    @property
    def https(self) -> bool:
        """The API serves HTTPS only (xmppd.adminhttps), never plain HTTP."""
        return self.tls if self.tls is not None else not _is_loopback(self.address)

    @field_validator("ca_file")
    @classmethod
    def _ca_file(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return _existing_file(value, info)

    @model_validator(mode="after")
    def _loopback_unless_allowed(self) -> AdminConfig:
        if not self.allow_remote and not _is_loopback(self.address):
            raise _problem(
                f"{self.address} is not a loopback address: the admin API can end sessions "
                "and must not be reachable from other machines; set admin.allow_remote: true "
                "if a firewall keeps it private",
                "address",
            )
        if self.tls is False and not _is_loopback(self.address):
            raise _problem(
                f"{self.address} is not a loopback address: the API's bearer token would "
                "cross the network in clear; a non-loopback admin API serves HTTPS only "
                "(leave tls out, or set it to true)",
                "tls",
            )
        if self.ca_file is not None and not self.https:
            raise _problem(
                "the admin API serves plain HTTP here (a loopback address without "
                "tls: true), so no certificate is verified: remove ca_file or set tls: true",
                "ca_file",
            )
        return self


class LogConfig(BaseModel):
    """Where log lines go and in what form (xmppd.logs); `log_level` says which."""

    model_config = ConfigDict(extra="forbid")

    file: Path | None = None  # None: standard error, which the service manager keeps
    format: Literal["text", "json"] = "text"

    @field_validator("file")
    @classmethod
    def _absolute(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        return None if value is None else _resolve(value, info)


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _default_node_name() -> str:
    """hostname-pid: unique among the processes of a deployment at any one time."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()) or "node"
    return f"{host[:50].strip('.-_') or 'node'}-{os.getpid()}"


def _node_name(value: str) -> str:
    if not _NODE_NAME.fullmatch(value):
        raise _problem(
            "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
            f"(it names Redis keys), got {json.dumps(value)}"
        )
    return value


def _redis_url(value: str) -> str:
    scheme = value.partition("://")[0]
    if scheme not in ("redis", "rediss", "unix") or "://" not in value:
        raise _problem(
            f"must be a redis://, rediss:// or unix:// URL, got {json.dumps(redact_url(value))}"
        )
    return value


def redact_url(url: str) -> str:
    """`url` without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{hostpart}"


def split_advertised(value: str) -> tuple[str, int | None]:
    """HOST, HOST:PORT or [IPv6]:PORT -> (host, port or None); ValueError if malformed."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port = rest.removeprefix(":") if sep and rest.startswith(":") else ""
        if not host or not port:
            raise ValueError(value)
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""  # a name, an IPv4 address, or a bare IPv6 address
    if not host or any(c.isspace() for c in host):
        raise ValueError(value)
    if not port:
        return host, None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(value)
    return host, int(port)


def _advertise(value: str) -> str:
    try:
        split_advertised(value)
    except ValueError:
        raise _problem(
            "expected HOST or HOST:PORT (like 10.0.0.5 or 10.0.0.5:7400; [IPv6]:PORT), "
            f"got {json.dumps(value)}"
        ) from None
    return value


class LinkConfig(BaseModel):
    """Where a cluster node listens for the direct stanza links of its peers
    (xmppd.cluster.link)."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = True  # false: stanzas between nodes go through Redis only
    host: Annotated[StrictStr, AfterValidator(_address)] = "127.0.0.1"
    port: StrictInt = Field(default=0, ge=0, le=65535)  # 0: the OS picks a free port
    # Linux: nodes in one kernel and network namespace link over an abstract Unix socket;
    # false: over TCP (sealed) like nodes on other machines.
    unix: StrictBool = True


class ClusterConfig(BaseModel):
    """Nodes that share their session table through Redis (xmppd.cluster).

    Without this section a node is alone and touches no Redis."""

    model_config = ConfigDict(extra="forbid")

    redis_url: Annotated[StrictStr, AfterValidator(_redis_url)]
    node_name: Annotated[StrictStr, AfterValidator(_node_name)] = Field(
        default_factory=_default_node_name
    )
    forward_wait: float = Field(default=5.0, gt=0, le=300)
    """Seconds a stanza for another node waits for an unreachable Redis before it is
    routed again on this node (offline storage, an error)."""
    link: LinkConfig = Field(default_factory=LinkConfig)
    link_advertise: Annotated[StrictStr, AfterValidator(_advertise)] | None = None
    """HOST or HOST:PORT the other nodes dial for this node's link (without a port: the
    bound one); None: the bound address."""
    # SecretStr, checked by strong_secret: never in a repr, a log line or an error message.
    secret: SecretStr | None = None
    """The key nodes prove to each other on a link; None: one Redis keeps (SET NX)."""

    @field_validator("secret", mode="before")
    @classmethod
    def _strong(cls, value: object) -> object:
        return None if value is None else strong_secret(value)


def _is_loopback(address: str) -> bool:
    return address == "localhost" or ipaddress.ip_address(address).is_loopback


def _default_listeners() -> list[ListenerConfig]:
    return [
        ListenerConfig(type="starttls", address="127.0.0.1", port=5222),
        ListenerConfig(type="direct_tls", address="127.0.0.1", port=5223),
    ]


DEFAULT_MODULES = (
    "disco",
    "caps",
    "ping",
    "version",
    "time",
    "roster",
    "presence",
    "offline",
    "last",
    "vcard",
    "private",
    "privacy",
    "blocking",
    "carbons",
    "register",
    "stream_management",
    "adhoc",
    "admin_commands",
    "pep",
)


def _default_modules() -> dict[str, dict[str, Any] | None]:
    return {name: {} for name in DEFAULT_MODULES}


_SECTIONS = ("log", "tls", "limits", "auth", "admin", "storage", "modules")


class Config(BaseModel):
    """The whole server configuration; `source` says where each value came from."""

    model_config = ConfigDict(extra="forbid")

    hosts: list[Domain] = Field(default_factory=lambda: ["localhost"], min_length=1)
    # Accounts that may run the XEP-0133 admin commands of their own host.
    admins: list[BareJID] = Field(default_factory=list)
    data_dir: Path = Field(default=Path("data"), validate_default=True)
    log_level: Annotated[Literal["debug", "info", "warning", "error"], BeforeValidator(_lower)] = (
        "info"
    )
    log: LogConfig = Field(default_factory=LogConfig)
    # The C allocator (xmppd.cli.allocator): jemalloc if installed, or required, or never.
    allocator: Literal["auto", "jemalloc", "system"] = "auto"
    # How long input may wait while the server is busy, to be handled in one turn of
    # the event loop (xmppd.batchloop); 0: handled as it comes.
    batch_window_ms: float = Field(default=10.0, ge=0, le=1000)
    listeners: list[ListenerConfig] = Field(default_factory=_default_listeners)
    tls: TLSConfig = Field(default_factory=TLSConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    cluster: ClusterConfig | None = None
    s2s: S2SConfig | None = None  # federation (xmppd/s2s, docs/s2s.md); none without it
    # External components (XEP-0114, docs/components.md); none without it.
    components: ComponentsConfig | None = None
    # Raw options per enabled module; the module host validates each against the
    # module's own model with validate_section(), so errors still carry lines.
    modules: dict[StrictStr, dict[StrictStr, Any] | None] = Field(default_factory=_default_modules)

    _source: ConfigSource = PrivateAttr(
        default_factory=lambda: ConfigSource(file=None, base_dir=Path.cwd())
    )

    @property
    def source(self) -> ConfigSource:
        return self._source

    @model_validator(mode="before")
    @classmethod
    def _empty_sections(cls, data: Any) -> Any:
        # "limits:" with every line under it commented out is YAML null: it means
        # "nothing set here", i.e. the section's defaults (no modules for modules).
        if isinstance(data, dict):
            data = {k: ({} if k in _SECTIONS and v is None else v) for k, v in data.items()}
        return data

    _unique = field_validator("hosts", "admins")(_unique)

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @field_validator("listeners")
    @classmethod
    def _distinct_sockets(cls, value: list[ListenerConfig]) -> list[ListenerConfig]:
        seen: dict[tuple[str, int], int] = {}
        for i, listener in enumerate(value):
            if listener.port == 0:  # each picks its own free port
                continue
            where = (listener.address, listener.port)
            if where in seen:
                raise _problem(
                    f"{listener.address} port {listener.port} is already used by "
                    f"listeners[{seen[where]}]",
                    i,
                )
            seen[where] = i
        return value

    @model_validator(mode="after")
    def _unencrypted_only_on_loopback(self) -> Config:
        """SASL before TLS sends a password's proof in the clear: only where nothing
        crosses a network, so that the switch cannot open a server by mistake."""
        if not self.auth.allow_unencrypted:
            return self
        for i, listener in enumerate(self.listeners):
            if listener.type != "starttls":
                continue
            if not _loopback(listener.address):
                where = f"is on {listener.address}"
            elif listener.proxy_protocol:
                where = "takes clients from a load balancer (proxy_protocol)"
            else:
                continue
            raise _problem(
                f"SASL before TLS is allowed only while every starttls listener is on a "
                f"loopback address with no load balancer in front; listeners[{i}] {where}",
                "auth",
                "allow_unencrypted",
            )
        return self

    @model_validator(mode="after")
    def _proxies_on_own_hosts(self) -> Config:
        for i, jid in enumerate(self.auth.proxy_auth):
            domain = jid.rpartition("@")[2]
            if domain not in self.hosts:
                raise _problem(
                    f"{json.dumps(jid)} is not on one of the hosts ({', '.join(self.hosts)})",
                    "auth",
                    "proxy_auth",
                    i,
                )
        return self

    @model_validator(mode="after")
    def _components_not_hosts(self) -> Config:
        for domain in self.components.domains if self.components is not None else ():
            if domain in self.hosts:
                raise _problem(
                    f"{json.dumps(domain)} is one of the hosts: a component serves a domain "
                    "of its own (like gateway.example.org)",
                    "components",
                    "domains",
                    domain,
                )
        return self

    @model_validator(mode="after")
    def _admins_on_own_hosts(self) -> Config:
        # An admin administers the host of their JID: one of another server would
        # administer nothing, which is a mistake worth stopping for.
        for i, jid in enumerate(self.admins):
            if jid.rpartition("@")[2] not in self.hosts:
                raise _problem(
                    f"{json.dumps(jid)} is not on one of the hosts ({', '.join(self.hosts)})",
                    "admins",
                    i,
                )
        return self


# ------------------------------------------------------------- pydantic errors -> lines

_REPLACED_KEYS: dict[Loc, str] = {
    ("limits", "max_auth_failures_per_account"): (
        "accounts are no longer locked (anyone could lock their owner out); failing "
        'addresses are banned instead: use "limits.auth_failures_before_ban"'
    ),
    ("limits", "max_auth_failures_per_ip"): 'renamed: use "limits.auth_failures_before_ban"',
    ("limits", "auth_lockout"): 'renamed: use "limits.auth_ban_seconds"',
    ("limits", "auth_failure_window"): (
        "failures are now remembered until limits.auth_ban_seconds pass without one: "
        'use "limits.auth_ban_seconds"'
    ),
}
"""Keys an older xmppd read, with what to write instead: an operator's old file
names them, and "unknown key" alone would not say where the setting went."""


def _show(value: Any) -> str:
    """A bad value as the operator wrote it."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


_EXPECTED = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping (key: value)",
    "model_type": "expected a mapping (key: value)",
    "model_attributes_type": "expected a mapping (key: value)",
    "path_type": "expected a file path",
}

_BOUNDS = {
    "greater_than_equal": ("ge", "must be at least"),
    "greater_than": ("gt", "must be greater than"),
    "less_than_equal": ("le", "must be at most"),
    "less_than": ("lt", "must be less than"),
}


def _unwrap(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_members(tp: Any) -> tuple[Any, ...]:
    tp = _unwrap(tp)
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()


def _model_in(tp: Any) -> type[BaseModel] | None:
    """The model `tp` is, or holds as a union member (`X | None`)."""
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for member in _union_members(tp):
        found = _model_in(member)
        if found is not None:
            return found
    return None


def _tagged(tp: Any, part: str | int) -> Any:
    """The member of a tagged union `tp` whose Tag is `part`, else None."""
    for member in _union_members(tp):
        if typing.get_origin(member) is Annotated and any(
            isinstance(meta, Tag) and meta.tag == part for meta in member.__metadata__
        ):
            return member
    return None


def _step(tp: Any, part: str | int) -> Any:
    """The type found one key or index below `tp` (None when unknown)."""
    model = _model_in(tp)
    if model is not None:
        info = model.model_fields.get(str(part))
        return info.annotation if info is not None else None
    tp = _unwrap(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and isinstance(part, int):
        return args[0]
    if origin is dict and isinstance(part, str):
        return args[1]
    return None


def _walk(root: type[BaseModel], loc: Loc) -> tuple[Loc, Any]:
    """Follow pydantic's `loc` through the model types: drop the union tags it
    inserts ("storage.items.dynamodb.table" is "storage.items.table" in the
    file) and return the type found at the end."""
    clean: list[str | int] = []
    tp: Any = root
    for part in loc:
        member = _tagged(tp, part) if tp is not None else None
        if member is not None:
            tp = member
            continue
        clean.append(part)
        tp = _step(tp, part) if tp is not None else None
    return tuple(clean), tp


def _message(e: ErrorDetails, model: type[BaseModel]) -> tuple[Loc, str]:
    """One pydantic error as (location in the file, plain words with the bad value)."""
    kind, value = e["type"], e.get("input")
    ctx: dict[str, Any] = dict(e.get("ctx") or {})
    loc, _ = _walk(model, tuple(e["loc"]))
    if kind == "xmppd_config":
        return loc + tuple(ctx["at"]), str(ctx["reason"])
    if kind == "missing":
        return loc[:-1], f"missing required key {json.dumps(str(loc[-1]))}"
    if kind == "extra_forbidden":
        key = str(loc[-1])
        message = f"unknown key {json.dumps(key)}"
        if model is Config and loc in _REPLACED_KEYS:
            return loc, f"{message}: {_REPLACED_KEYS[loc]}"
        parent = _model_in(_walk(model, tuple(e["loc"])[:-1])[1])
        close = difflib.get_close_matches(key, list(parent.model_fields) if parent else [], n=1)
        return loc, message + (f" (did you mean {json.dumps(close[0])}?)" if close else "")
    if kind in ("invalid_key", "string_type") and loc and loc[-1] == "[key]":
        return loc[:-2], f"keys must be strings, got {_show(value)}"
    if kind == "invalid_key":
        return loc[:-1], f"keys must be strings, got {_show(value)}"
    if kind == "union_tag_invalid":
        # Point at the key that chose the variant (e.g. "backend"), not the whole section.
        keys = [k for k, v in value.items() if v == ctx["tag"]] if isinstance(value, dict) else []
        expected = str(ctx["expected_tags"]).replace("'", '"')
        return loc + tuple(keys[:1]), f"expected one of {expected}, got {_show(ctx['tag'])}"
    if kind == "union_tag_not_found":
        return loc, f"expected a mapping (key: value), got {_show(value)}"
    if kind == "value_error":
        return loc, str(ctx.get("error", e["msg"]))
    if kind == "literal_error":
        return loc, f"expected {str(ctx['expected']).replace(chr(39), chr(34))}, got {_show(value)}"
    if kind in _BOUNDS:
        key, words = _BOUNDS[kind]
        return loc, f"{words} {_num(ctx[key])}, got {_show(value)}"
    if kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        words = "at least" if kind == "too_short" else "at most"
        plural = "" if bound == 1 else "s"
        return loc, f"must list {words} {bound} item{plural}, got {ctx.get('actual_length')}"
    if kind in _EXPECTED:
        message = f"{_EXPECTED[kind]}, got {_show(value)}"
        if kind == "list_type" and isinstance(value, str):
            message += f' (write it as [{value}] or as lines starting with "- ")'
        return loc, message
    return loc, f"{e['msg'][:1].lower()}{e['msg'][1:]}, got {_show(value)}"


def _translate(
    err: ValidationError, model: type[BaseModel], source: ConfigSource, base: Loc
) -> list[tuple[int, str]]:
    """Pydantic's errors as `(line, "FILE:LINE: path: message")` pairs."""
    out: list[tuple[int, str]] = []
    for e in err.errors(include_url=False):
        loc, message = _message(e, model)
        full = base + loc
        out.append((source.line_of(full) or 0, source.problem(full, message)))
    return out


def _error(problems: list[tuple[int, str]]) -> ConfigError:
    """One error with every problem, in file order."""
    return ConfigError([text for _, text in sorted(problems, key=lambda p: p[0])])


# --------------------------------------------------------------------------- YAML -> data + lines

_MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_YAML_VALUES = 100_000
"""Values a file may hold once its aliases are expanded (a real config has hundreds).
Aliases of aliases multiply ("billion laughs": nine levels of nine make 387 million),
and each expanded value is walked here and validated later: past this the file is
refused at once instead of taking minutes and gigabytes."""


class _LineMap:
    """The line of every key and list item of a file, its duplicate keys, and its
    aliases checked: an alias inside the node it names (a cycle), or aliases that
    expand past MAX_YAML_VALUES, stop the load with ConfigError naming file and line."""

    def __init__(self, source_name: str, lines: dict[Loc, int], dups: list[tuple[int, str]]):
        self.name = source_name
        self.lines = lines
        self.dups = dups
        self.values = 0
        self.open: set[int] = set()  # the nodes being walked: `node` and its parents

    def walk(self, node: yaml.Node, loc: Loc, line: int, merged: bool = False) -> None:
        """Record the line of every key and list item under `node` (at `line`); report
        duplicate keys (PyYAML silently keeps the last one, hiding the operator's
        mistake).

        `merged`: `node` is merged in with "<<: *anchor", so keys written in the
        mapping itself (already recorded) win over its keys."""
        if id(node) in self.open:
            raise ConfigError([f"{self.name}:{line}: {format_loc(loc) or 'the file'}: an alias "
                               "refers to a node that contains it"])
        self.values += 1
        if self.values > MAX_YAML_VALUES:
            top = loc[:1]  # the key written in the file: deeper, lines are the anchors'
            raise ConfigError([
                f"{self.name}:{self.lines.get(top, line)}: {format_loc(top) or 'the file'}: "
                f"the aliases expand to more than {MAX_YAML_VALUES} values; write the "
                "values out instead"
            ])
        self.lines.setdefault(loc, node.start_mark.line + 1)
        self.open.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                self._mapping(node, loc, merged)
            elif isinstance(node, yaml.SequenceNode):
                for i, item in enumerate(node.value):
                    self.lines.setdefault(loc + (i,), item.start_mark.line + 1)
                    self.walk(item, loc + (i,), self.lines[loc + (i,)])
        finally:
            self.open.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, loc: Loc, merged: bool) -> None:
        seen: dict[str, int] = {}
        merges: list[tuple[yaml.Node, int]] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merges.append((value_node, line))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = str(key_node.value)
            if merged and loc + (key,) in self.lines:
                continue
            if key in seen:
                where = format_loc(loc + (key,))
                text = f"{self.name}:{line}: {where}: duplicate key (first on line {seen[key]})"
                self.dups.append((line, text))
                continue
            seen[key] = line
            self.lines[loc + (key,)] = line
            self.walk(value_node, loc + (key,), line)
        for value_node, line in merges:
            subs = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            dups, self.dups = self.dups, []  # reported where the anchor is defined
            try:
                for sub in subs:
                    self.walk(sub, loc, line, merged=True)
            finally:
                self.dups = dups


def _parse(
    text: str, name: str, lines: dict[Loc, int], dups: list[tuple[int, str]]
) -> tuple[yaml.Node | None, Any]:
    """The document's root node and its data; fills `lines` and `dups` on the way."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        # Lines first: constructing rewrites merge ("<<") mappings in place.
        _LineMap(name, lines, dups).walk(node, (), node.start_mark.line + 1)
        return node, loader.construct_document(node)
    finally:
        loader.dispose()


def _yaml_problem(name: str, e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}" if mark is not None else name
        what = e.problem or "invalid YAML"
        if e.context:
            what += f" ({e.context})"
        syntax = not isinstance(e, yaml.constructor.ConstructorError)
        return f"{where}: {'YAML syntax error' if syntax else 'YAML error'}: {what}"
    return f"{name}: YAML error: {e}"


def _kind(data: Any) -> str:
    return "a string" if isinstance(data, str) else _show(data)


# --------------------------------------------------------------------------- public API

def find_config() -> tuple[Path, str]:
    """The file `xmppd` and `xmppctl` use without -c (xmppd.configfile.locate), with
    the line saying where it came from, which both commands print; ConfigError when
    there is none.

    Never the built-in defaults: they put data_dir under the current
    directory, so a command run from the wrong folder would silently work on
    a new, empty store there instead of the server's."""
    found = locate()
    if found is None:
        raise ConfigError([not_found()])
    return found


def load_config(path: Path | str | None) -> Config:
    """Load and fully validate a configuration; None gives the built-in defaults.

    Relative paths in the file are made absolute against the file's folder
    (the current directory for the defaults). Raises ConfigError listing every
    problem found."""
    if path is None:
        return _build({}, ConfigSource(file=None, base_dir=Path.cwd()), [])
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{name}: cannot read the file: {e.strerror or e}"]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([f"{name}: not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    lines: dict[Loc, int] = {}
    dups: list[tuple[int, str]] = []
    try:
        node, data = _parse(text, name, lines, dups)
    except yaml.YAMLError as e:
        raise ConfigError([_yaml_problem(name, e)]) from None
    except RecursionError:  # PyYAML composes nested values by recursion
        raise ConfigError([f"{name}: values nested too deeply"]) from None
    if node is None or data is None:  # an empty file (or only comments): all defaults
        data = {}
    elif not isinstance(data, dict):
        raise ConfigError(
            [
                f"{name}:{node.start_mark.line + 1}: the top level must be a mapping of keys to "
                f'values (like "hosts: [example.org]"), got {_kind(data)}'
            ]
        )
    return _build(data, ConfigSource(file=path, base_dir=path.absolute().parent, lines=lines), dups)


def _build(data: dict[str, Any], source: ConfigSource, problems: list[tuple[int, str]]) -> Config:
    try:
        cfg = Config.model_validate(data, context={"base_dir": source.base_dir})
    except ValidationError as e:
        problems = problems + _translate(e, Config, source, ())
        raise _error(problems + _module_problems(data.get("modules"), source)) from None
    problems = problems + _module_problems(cfg.modules, source)
    if problems:
        raise _error(problems)
    cfg._source = source
    if cfg.auth.allow_unencrypted:
        log.warning(
            "%s: auth.allow_unencrypted is on: clients may authenticate before TLS. "
            "Use this only for tests and debugging, never on a network.",
            source.where(("auth", "allow_unencrypted")),
        )
    return cfg


def _module_problems(modules: Any, source: ConfigSource) -> list[tuple[int, str]]:
    """The problems of the module options, with the line of each module for the order.

    Checked here, with the rest of the file, so that one run lists every problem and
    a bad option stops `xmppd` before it opens a store or loads a certificate. A
    `modules` section that is not a mapping of mappings was reported by the core
    model already; the module host is imported only now (it imports the modules)."""
    if modules is None:
        modules = _default_modules()
    if not isinstance(modules, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, dict)) for k, v in modules.items()
    ):
        return []
    from xmppd.modulehost import module_option_problems

    return [
        (source.line_of(("modules", name)) or 0, text)
        for name, text in module_option_problems(modules, source)
    ]


def validate_section(model: type[M], data: Any, source: ConfigSource, path: Loc) -> M:
    """Validate the sub-tree at `path` (e.g. a module's options) against `model`,
    raising ConfigError whose lines point into the original file."""
    try:
        return model.model_validate(data, context={"base_dir": source.base_dir})
    except ValidationError as e:
        raise _error(_translate(e, model, source, path)) from None
