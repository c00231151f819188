"""The module host: the small API every feature module is written against.

Modelled on Prosody's module host. A module declares what it handles (IQ
handlers by namespace and type, hooks on events, disco features and
identities, an options model) and asks the host for storage by name. It
never writes to a socket and never imports a backend, so it runs the same
on the embedded default and on a cloud cluster, and tests feed it stanzas
with no network at all (see xmppd.testing).

Events a module can hook (async, `hook`; a True result stops the chain):
  message/offline (stanza, bare)     a message no available resource takes
  presence/<type> (stanza, bare)     subscribe, subscribed, unsubscribe,
                                     unsubscribed, probe to a local user
  presence/broadcast (stanza, session, initial)
                                     a client's own presence changed
  iq/account (stanza, bare)          an IQ get/set from someone else to an
                                     account, before its handler (True: refused)
  session/bound (session), session/closed (session)
  session/lost (jid)                 an available session of another node ended
                                     with that node (killed; reaped): the
                                     unavailable presence it owed its contacts
  server/stopping ()                 the node stops: listeners are closed, client
                                     streams not yet; modules and storage still run
  delivery/failure (stanza, session)  a session's transport could not take it
Sync events (`on`; results ignored): modules/changed ()  a reload enabled or
disabled modules, so the server's disco features may have changed;
stanza/answered (stanza, session)  a stanza a client sent that its stream
answered itself (a <bad-request/> refusal, the legacy session IQ, a second
bind): it reaches no filter nor the router, yet the client counted it as sent;
presence/broadcast (stanza, session, initial)  as the hook, but in the router's
call, right after the echo: nothing for the account is routed in between.
Routing events (sync, `on`; True: taken, nothing below runs): message/bare,
message/full, message/host and the same for presence and iq (a `Routed`),
with the RFC 6121 rules as the router's handlers at the lowest priority;
message/delivered (Routed), once per delivered message, recipients known, once
a chosen session's "stanza/in" filters let it through (after any wait they asked
for; not for one that every chosen session's filters refused).
Module events (sync, `on`, sent with `notify`): message/stored (stanza, bare)
once the offline module stored a message for the account (not when it bounced
it: a full queue, a store that failed).
Filters (sync, `filter`; False drops, an awaitable waits): stanza/out (stanza,
origin session), stanza/in (stanza, session), each for the stanza kinds it names
(all by default), presence/self (stanza, session): a client's own broadcast
presence as the router applies it. A stanza/in filter that drops a delivery the
sender is owed an error for calls `refuse`, not `bounce`: a message given to
several resources is answered only if none took it.
Non-stanza elements: `element`. Timers: `every`. Subdomains: `serve_domain`.
IQs the server sends: `send_iq`. The other nodes of a cluster: `notify_cluster`
and `on_cluster_notice` (a module that keeps per-user state in memory drops it
when another node changes what it was read from).

Session state: a module keeps what belongs to one session in `session.state`
under a key it owns. In a cluster, a session bound on another node is a
replica whose `state` holds only the keys declared with `share_state` (in
setup()) and changed with `set_state`: the session's node writes them with
its directory entry and every other node's replica gets them. Their values
must be JSON values (str, int, bool, lists, dicts; None removes the key);
other keys stay on the session's own node. A node alone pays one set lookup per `set_state`.
The shared keys also go with a session a client resumes on another node (stream
management stores `shared_state` with it and calls `restore_state` there).

Account removal is not an event but a method every module may override,
`Module.remove_user`: the host calls each one in turn (`ModuleHost.remove_account`)
and reports the ones that failed, so that a removal can neither half-happen
silently nor skip a module whose hook raised. The modules installed but not
enabled have their stored data of the account deleted too, by the class method
`Module.purge_user`, without being started.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import pkgutil
import secrets
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

from lxml import etree
from prometheus_client.core import Metric
from pydantic import BaseModel, ConfigDict

from xmppd.auth.accounts import InvalidUsername, normalize_username
from xmppd.cluster.bus import Bus, Handler, LocalBus, Lost, Payload
from xmppd.cluster.directory import node_of
from xmppd.cluster.settle import AccountSettling
from xmppd.directory import LocalDirectory
from xmppd.events import DEFAULT, STANZA_KINDS, kind_chain
from xmppd.jid import JID
from xmppd.ledger import MessageLedger
from xmppd.router import Routed, SharedDelivery
from xmppd.storage.base import BlobStore, ItemStore, StorageError, TooLarge
from xmppd.stream.errors import (
    StanzaError,
    StreamError,
    error_from,
    error_reply,
    stanza_error_of,
)
from xmppd.xml import ns

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from xmppd.auth.accounts import Accounts
    from xmppd.cluster import Cluster
    from xmppd.config import Config, ConfigSource
    from xmppd.router import Router
    from xmppd.session import ClientSession, Transport
    from xmppd.storage.factory import Storage

log = logging.getLogger(__name__)

Scope = Literal["server", "account"]
Removed = Literal["account", "leftovers", "nothing"]
"""What an account removal found: the account (and its data), only data that a
removal which failed part way left behind, or nothing at all."""
T = TypeVar("T")
M = TypeVar("M", bound="Module")

ACCOUNT_WORK_WAIT = 30.0
"""Seconds an account's removal waits at most for the requests its sessions sent before
it to finish (storage that hangs), before it deletes the data anyway."""
OTHER_NODES_WAIT = ACCOUNT_WORK_WAIT + 5.0
"""Seconds it waits at most for the other nodes of a cluster to say they did the same
(each waits ACCOUNT_WORK_WAIT at most, then answers)."""
REDIS_PROBE_WAIT = 2.0
"""Seconds a cluster node's account removal waits at most for Redis to answer a PING
before it starts: one that cannot reach Redis is refused then, not after the other
nodes' OTHER_NODES_WAIT."""
ACCOUNT_CHANGE_SETTLE = 10.0
"""Seconds ending an account's sessions (Server.end_account_sessions) waits at most for
the presence work it started."""
ACCOUNT_REMOVAL_WAITS = REDIS_PROBE_WAIT + ACCOUNT_CHANGE_SETTLE + max(
    ACCOUNT_WORK_WAIT, OTHER_NODES_WAIT
)
"""Seconds remove_account may wait on purpose, one wait after the other: the PING, the
`removed` step ending the account's sessions, then this node's work and the other
nodes' (at once). Its storage work comes on top. Whoever waits for a removal (xmppctl)
must wait longer, or it gives up on one that is going well."""


@dataclass(slots=True)
class IqRequest:
    """An IQ get/set addressed to the server or to an account."""

    stanza: etree._Element
    payload: etree._Element  # the one child element
    sender: JID
    target: str  # the server's domain, or the account's bare JID
    host: str  # the virtual host that answers
    # Run after the reply is routed (e.g. end the sessions of a removed account).
    after_reply: list[Callable[[], None]] = field(default_factory=list)

    @property
    def from_owner(self) -> bool:
        """True when the account asks about itself (its own roster, vCard, ...)."""
        return self.sender.bare == self.target


@dataclass(slots=True)
class PreAuthRequest:
    """An IQ from a client that has not authenticated (XEP-0077 registration)."""

    stanza: etree._Element
    payload: etree._Element
    host: str  # the virtual host the stream is for
    ip: str  # the client's address, for rate limits


@dataclass(slots=True)
class ElementRequest:
    """A top-level element that is not a stanza, from a client stream."""

    element: etree._Element
    session: ClientSession | None  # None: authenticated, no resource bound yet
    host: str  # the virtual host of the stream
    reply: Callable[[etree._Element], None]  # write an element on the same stream
    account: str | None = None  # the bare JID the stream authenticated as
    # Before bind only: make this stream carry a session bound on an earlier one
    # (stream management resumption); returns the stream's transport.
    attach: Callable[[ClientSession], Transport | None] | None = None
    # Before bind only: bind this full JID on this stream, taking it over from another
    # node (a session resumed there); returns the new session. None: the stream ended.
    bind_resumed: Callable[[str], ClientSession | None] | None = None


IqHandler = Callable[[IqRequest], Awaitable[etree._Element | None]]
ElementHandler = Callable[[ElementRequest], None]
PreAuthHandler = Callable[[PreAuthRequest], Awaitable[etree._Element | None]]
Hook = Callable[..., Awaitable[bool | None]]
Filter = Callable[..., "bool | Awaitable[object]"]


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Module:
    """Base class of feature modules; subclasses register in `setup()`.

    `requires` names the modules this one cannot work without: the config
    is refused when one is not enabled, and they are set up and started
    first, so `host.module(Class)` finds them in `setup()` and `start()`.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()
    fixed_options: ClassVar[tuple[str, ...]] = ()
    """Options the module reads once (in setup()): a reload that changes one is refused."""
    hosts_fixed: ClassVar[bool] = False
    """The module set something up per host once (a service domain under each): a
    reload that adds or removes a host is refused while it is enabled."""
    toggleable: ClassVar[bool] = False
    """A reload may enable or disable the module: it keeps no state per session and
    needs no event from before it was enabled. The host takes back what its setup()
    and start() registered (`ModuleHost.disable`)."""

    def __init__(self, host: ModuleHost, options: BaseModel) -> None:
        self.host = host
        self.options = options
        self.log = logging.getLogger(f"xmppd.modules.{self.name}")

    def setup(self) -> None:
        """Register handlers, hooks and features. Runs once, before any stanza."""

    async def start(self) -> None:
        """Async start-up (open stores, start timers)."""

    def reconfigure(self, options: BaseModel) -> None:
        """A reload changed the module's options (none of `fixed_options`): use them from
        now on. Right as it is for a module that reads `self.options` where it needs
        them; one that keeps values derived from them updates those too."""
        self.options = options

    async def stop(self) -> None:
        """Release what start() took."""

    def metrics(self) -> Iterable[Metric]:
        """The module's own metrics for /metrics (prometheus_client metric families),
        read when scraped."""
        return ()

    async def remove_user(self, vhost: str, username: str) -> bool:
        """Delete everything this module keeps for the account `username` of `vhost`.

        Called when the account is removed (in-band, by an administrator, or by
        `xmppctl` in a process of its own with no client connected), after the
        account itself is gone. Must delete the data from storage, through the
        host's stores so that caches are invalidated, and drop what this node
        holds in memory for it. Must be idempotent: a removal that failed part
        way is finished by running it again. Returns True if anything was
        found; raises (StorageError, ...) if something could not be deleted.
        """
        return False

    @classmethod
    async def purge_user(cls, host: ModuleHost, vhost: str, username: str) -> bool:
        """Delete from storage what the module keeps for the account while the module
        is NOT enabled: an operator who turned vCards off for a while must not leave
        the removed account's vCard for a new account of the same name to find when
        they turn it on again. Runs on the class, with no setup(), so with no hook,
        route, timer or cluster notice (no node runs the module), and only with the
        module's default options. Same contract as `remove_user` otherwise; a module
        whose `remove_user` deletes stored data overrides this too (a test checks)."""
        return False


class Repeating:
    """A callback on a fixed period, on the running loop; `cancel()` stops it.
    A callback that raises is logged and keeps its schedule."""

    def __init__(self, seconds: float, callback: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._seconds = seconds
        self._callback = callback
        self._handle = self._loop.call_later(seconds, self._tick)

    def _tick(self) -> None:
        self._handle = self._loop.call_later(self._seconds, self._tick)
        try:
            self._callback()
        except Exception:
            log.exception("timer %r failed", self._callback)

    def cancel(self) -> None:
        self._handle.cancel()


class AccountDataRemains(Exception):
    """Some modules could not delete an account's data; `failed` maps module name -> reason.

    Whatever the other modules deleted stays deleted: running the removal
    again finishes the job."""

    def __init__(self, account: str, failed: dict[str, str]) -> None:
        details = "; ".join(f"{name}: {reason}" for name, reason in failed.items())
        super().__init__(f"data of {account} could not all be deleted ({details})")
        self.account = account
        self.failed = failed


class ClusterUnreachable(Exception):
    """An account's removal refused before it deleted anything: this node cannot reach
    Redis, through which the other nodes end the account's sessions and settle its
    work. The message names the account and the cause; the removal (`xmppctl
    unregister`) runs whole once Redis answers."""


@dataclass(slots=True)
class _Snapshot:
    """What is registered with a host at one moment: two of them, taken around a
    module's setup() and start(), tell what that module registered."""

    events: dict[int, tuple[str, str, tuple[int, Any]]]
    iq: set[tuple[str, str, Scope]]
    preauth_iq: set[tuple[str, str]]
    elements: set[str]
    stream_features: list[tuple[str, Callable[[], etree._Element]]]
    features: set[tuple[Scope, str]]
    identities: list[tuple[str, str, str | None]]
    timers: list[Repeating]
    fixed: int  # shared state keys and subdomains: nothing takes those back


@dataclass(slots=True)
class _Registered:
    """What one module registered, to take back when a reload disables it."""

    events: list[tuple[str, str, tuple[int, Any]]] = field(default_factory=list)
    iq: list[tuple[str, str, Scope]] = field(default_factory=list)
    preauth_iq: list[tuple[str, str]] = field(default_factory=list)
    elements: list[str] = field(default_factory=list)
    stream_features: list[tuple[str, Callable[[], etree._Element]]] = field(default_factory=list)
    features: list[tuple[Scope, str]] = field(default_factory=list)
    identities: list[tuple[str, str, str | None]] = field(default_factory=list)
    timers: list[Repeating] = field(default_factory=list)
    undoable: bool = True


class ModuleHost:
    def __init__(
        self, router: Router, storage: Storage, hosts: list[str], bus: Bus | None = None
    ) -> None:
        self.router = router
        self.storage = storage
        self.hosts = hosts
        self.bus: Bus = bus if bus is not None else LocalBus()
        self.modules: dict[str, Module] = {}
        # The server's account stores by virtual host, and its config (set by load()).
        self.accounts: dict[str, Accounts] = {}
        self.config: Config | None = None
        # The node's cluster membership (Redis), None for a node alone: for modules that
        # keep state every node must reach (stream management).
        self.cluster: Cluster | None = None
        self.resending = False  # a stanza `resend` routes is in the filters now
        # How the node ends every stream of an account, on every node of a cluster
        # (Server.end_account_sessions; set by the server): see end_account_sessions.
        self.account_streams_ender: (
            Callable[[str, str, StreamError, str | None], Awaitable[int]] | None
        ) = None
        self.features: dict[Scope, set[str]] = {"server": set(), "account": set()}
        self.identities: list[tuple[str, str, str | None]] = []
        self.events = router.events
        self._elements: dict[str, tuple[ElementHandler, bool]] = {}
        self.components: dict[str, str | None] = {}  # served subdomain -> its disco name
        self._timers: list[Repeating] = []
        self._awaiting: dict[str, tuple[str, asyncio.Future[etree._Element]]] = {}
        self._iq: dict[tuple[str, str, Scope], IqHandler] = {}
        self._shared: set[str] = set()
        self._registered: dict[str, _Registered] = {}  # module name -> what it registered
        # Every module of this install, enabled or not (set by load()): an account's
        # removal deletes the stored data of the disabled ones too.
        self._installed: dict[str, type[Module]] = {}
        # Other nodes' removals ask this one to settle their account here, and back.
        self._settling = AccountSettling(
            self.bus, lambda: self.node_name, self._settle, self.spawn_shared
        )
        # Sessions may be replicas of other nodes' sessions (xmppd.cluster).
        self.clustered = not isinstance(router.directory, LocalDirectory)
        self._preauth_iq: dict[tuple[str, str], PreAuthHandler] = {}
        self.stream_features: dict[str, list[Callable[[], etree._Element]]] = {
            "preauth": [],
            "bound": [],
        }
        # IQs to the server and to accounts: dispatched by namespace to the modules,
        # above the router's own default (service-unavailable).
        self.events.on("iq/host", self._iq_to_server, DEFAULT + 1)
        self.events.on("iq/bare", self._iq_to_account, DEFAULT + 1)

    # --- the API modules use ---------------------------------------------------------

    def iq(
        self,
        namespace: str,
        type_: Literal["get", "set"],
        handler: IqHandler,
        to: Scope | Literal["both"] = "server",
    ) -> None:
        """Handle IQs of `type_` with a payload in `namespace`, sent to the server or an account."""
        for scope in ("server", "account") if to == "both" else (to,):
            key = (namespace, type_, scope)
            if key in self._iq:
                raise ValueError(f"two handlers for {key}")
            self._iq[key] = handler  # type: ignore[index]

    def hook(self, event: str, handler: Hook, priority: int = 0) -> None:
        """Run async `handler` on `event`; higher priority first; a True result stops the chain."""
        self.events.hook(event, handler, priority)

    def on(self, event: str, handler: Callable[..., bool | None], priority: int = 0) -> None:
        """Handle a routing event synchronously, before the router's default handler.

        `message/bare`, `message/full`, `message/host` (and the same for
        `presence` and `iq`) get the `Routed` stanza; True means the handler
        took it and nothing below runs (the default delivery included).
        `message/delivered` comes after a message was delivered, once, with
        `recipients` filled in (not when every recipient's "stanza/in" filters
        refused it). `modules/changed` (no arguments) comes after a reload
        enabled or disabled modules. `stanza/answered` (stanza, session) comes for a
        stanza a local client sent that its stream answered itself, which no filter and
        no routing event sees: a <bad-request/> refusal, the legacy session IQ, a second
        bind (results ignored). `presence/broadcast` (stanza, session, initial) comes
        in the router's call right after a client's own presence was applied and
        echoed, before the hook of that name (results ignored): what must happen
        before anything else reaches the account starts there (`run_ahead`).
        """
        self.events.on(event, handler, priority)

    def preauth_iq(
        self, namespace: str, type_: Literal["get", "set"], handler: PreAuthHandler
    ) -> None:
        """Handle IQs in `namespace` on streams that have not authenticated yet.

        Only for what must work before login (in-band registration); the
        handler gets no sender JID, only the host and the client's address.
        """
        self._preauth_iq[(namespace, type_)] = handler

    def add_stream_feature(
        self, phase: Literal["preauth", "bound"], make: Callable[[], etree._Element]
    ) -> None:
        """Advertise an element in <stream:features/> before auth or after it."""
        self.stream_features[phase].append(make)

    def remove_stream_feature(
        self, phase: Literal["preauth", "bound"], make: Callable[[], etree._Element]
    ) -> None:
        """Stop advertising what `add_stream_feature` added (a reload turned it off)."""
        if make in self.stream_features[phase]:
            self.stream_features[phase].remove(make)

    def filter(
        self,
        event: str,
        handler: Filter,
        priority: int = 0,
        kinds: Iterable[str] = STANZA_KINDS,
    ) -> None:
        """Run a synchronous `handler` on the stanza path: True passes the stanza on,
        False drops it (the filter sends any error itself).

        "stanza/out" (stanza, origin session): every stanza a local client sends,
        before routing. "stanza/in" (stanza, session): every stanza before it is
        delivered to a local session. These two may also return an awaitable
        when they cannot judge yet (a record is loading): the stanza waits for
        it, in order with the sender's next stanzas (whose connection is not
        read meanwhile) and with everything else for the recipient, and then
        the same filter runs again; one that asks to wait a second time, or
        whose wait fails or passes `router.FILTER_WAIT`, has the stanza refused.
        "presence/self" (stanza, session): a client's own broadcast presence
        (or the server's unavailable for a session that ends) as the router
        applies it, before the echo and before the "presence/broadcast" hooks.

        `kinds` ("message", "presence", "iq"; "stanza/out" and "stanza/in" only):
        the stanzas the filter is called for. A filter about presence alone says
        so, and a chat message does not call it: the router walks one chain per
        kind. Stanzas of no known kind (another namespace) meet every filter.
        """
        kinds = tuple(kinds)
        for kind in kinds:
            if kind not in STANZA_KINDS:
                raise ValueError(f"{kind!r} is not a stanza kind")
        self.events.on(event, handler, priority)
        if event in ("stanza/out", "stanza/in"):
            for kind in kinds:
                self.events.on(kind_chain(event, kind), handler, priority)

    @property
    def filters_in(self) -> list[tuple[int, Filter]]:
        return self.events.chain("stanza/in")

    @property
    def filters_out(self) -> list[tuple[int, Filter]]:
        return self.events.chain("stanza/out")

    def module(self, cls: type[M]) -> M:
        """The enabled module of class `cls` (declare it in `requires`); LookupError if off."""
        found = self.find_module(cls)
        if found is None:
            raise LookupError(f"module {cls.name!r} is not enabled")
        return found

    def find_module(self, cls: type[M]) -> M | None:
        """The enabled module of class `cls`, or None: for optional cooperation."""
        module = self.modules.get(cls.name)
        return module if isinstance(module, cls) else None

    def element(
        self, tag: str, handler: ElementHandler, *, before_bind: bool = False
    ) -> None:
        """Handle a top-level element that is not a stanza (`{namespace}name`):
        stream management, client state indication and the like.

        After resource binding by default; `before_bind` also takes it between
        authentication and bind (a stream management <resume/>). An element no
        module handles ends the stream with <unsupported-stanza-type/>.
        """
        if tag in self._elements:
            raise ValueError(f"two handlers for the element {tag}")
        self._elements[tag] = (handler, before_bind)

    def handle_element(self, request: ElementRequest) -> bool:
        """Give a non-stanza element to its module; False if none takes it here."""
        entry = self._elements.get(request.element.tag)  # type: ignore[arg-type]
        if entry is None or (request.session is None and not entry[1]):
            return False
        entry[0](request)
        return True

    def stanza_answered(self, stanza: etree._Element, session: ClientSession) -> None:
        """A stanza of `session`'s client that its stream answered itself: tell the
        "stanza/answered" handlers (stream management counts it in h). Fired here, off
        the stanza path, as such stanzas are few: routed ones pay nothing for it."""
        self.events.notify("stanza/answered", stanza, session)

    def share_state(self, key: str) -> None:
        """Declare `key` of `session.state` shared: the other nodes of a cluster need it
        (a flag that decides who gets a stanza, routed on the sender's node). Change it
        with `set_state`, with JSON values; a replica session of another node has it in
        its `state`, as its own node last wrote it (on a cluster node, `set_state` raises
        TypeError for a value JSON cannot encode). Prosody has no cluster; ejabberd's
        session table has an `info` list modules add to, the model here."""
        self._shared.add(key)

    def set_state(self, session: ClientSession, key: str, value: Any) -> None:
        """Set `key` of a local session's state to `value` (None removes it); a shared
        key (`share_state`) goes to the other nodes with the session's entry."""
        if value is None:
            session.state.pop(key, None)
        else:
            session.state[key] = value
        if key in self._shared:
            self.router.directory.state_changed(session, key)

    def shared_state(self, session: ClientSession) -> dict[str, Any]:
        """The shared keys of a local session's state: what must go with it when a
        client resumes it on another node (stream management), as a replica has them."""
        return {key: session.state[key] for key in self._shared if key in session.state}

    def restore_state(self, session: ClientSession, state: dict[str, Any]) -> None:
        """Give a session resumed from another node the shared state it had there
        (carbons on, the active privacy list, roster pushes wanted). Keys no module of
        this node declared shared are left out: their module is off here."""
        for key, value in state.items():
            if key in self._shared:
                self.set_state(session, key, value)

    def every(self, seconds: float, callback: Callable[[], None]) -> Repeating:
        """Call `callback` every `seconds` (first after `seconds`) until it is cancelled
        or the host stops. One that needs to wait on something spawns a task."""
        timer = Repeating(seconds, callback)
        self._timers.append(timer)
        return timer

    def serve_domain(
        self, domain: str, handler: Callable[[Routed], None], name: str | None = None
    ) -> None:
        """Serve a subdomain (conference.<host>, pubsub.<host>): every stanza to it
        or to an address at it comes to `handler`, which answers through route().
        Disco items of its parent host list it, with `name`."""
        self.router.serve_domain(domain, handler)
        self.components[domain] = name

    async def send_iq(self, iq: etree._Element, timeout: float = 30.0) -> etree._Element:
        """Send an IQ get/set the server makes and wait for its answer.

        `iq` needs 'to' and 'from' (the server's domain, or an account the
        module acts for); an id is made when it has none. Returns the result
        stanza; raises StanzaError with the answer's condition for an error,
        and TimeoutError when nothing came in `timeout` seconds (the entity
        may be gone: RFC 6120 does not promise an answer across a failure).
        """
        if iq.get("type") not in ("get", "set") or iq.get("to") is None:
            raise ValueError("send_iq sends an IQ get or set with a 'to'")
        iq_id = iq.get("id") or secrets.token_hex(8)
        iq.set("id", iq_id)
        future: asyncio.Future[etree._Element] = asyncio.get_running_loop().create_future()
        self._awaiting[iq_id] = (iq.get("to", ""), future)
        try:
            self.router.route(iq)
            async with asyncio.timeout(timeout):
                answer = await future
        finally:
            self._awaiting.pop(iq_id, None)
        if answer.get("type") == "error":
            raise stanza_error_of(answer)
        return answer

    def add_feature(self, var: str, to: Scope = "server") -> None:
        self.features[to].add(var)

    def add_identity(self, category: str, type_: str, name: str | None = None) -> None:
        self.identities.append((category, type_, name))

    def notify(self, event: str, *args: Any) -> None:
        """Run the `on` handlers of a module's own event (offline storage's
        "message/stored"): another module acts on what this one did, neither
        importing the other. Results are ignored; a handler that raises is logged."""
        self.events.notify(event, *args)

    def notify_cluster(self, topic: str, payload: Payload) -> None:
        """Tell every other node of the cluster (`on_cluster_notice`): a small JSON object,
        typically "drop what you hold for this user". Never waits; does nothing on a
        single node. Notices may be lost; a node that may have missed some is told so
        (the `lost` callback), so use them to forget, never to carry data."""
        self.bus.publish(topic, payload)

    async def cluster_notices_sent(self) -> None:
        """Return once the notices sent so far are in Redis (at most about a second;
        at once on a single node or while Redis fails): await it before answering a
        client whose change another node must apply from its next stanza on."""
        await self.bus.sent()

    def on_cluster_notice(self, topic: str, handler: Handler, lost: Lost) -> None:
        """Call `handler(payload)` for each `topic` notice another node sends, and
        `lost()` when notices may have been missed (this node's connection to Redis
        broke): forget everything then. Neither is ever called on a single node."""
        self.bus.subscribe(topic, handler, lost)

    @property
    def node_name(self) -> str | None:
        """This node's name in the cluster; None on a node alone."""
        return self.cluster.node if self.cluster is not None else None

    def cluster_nodes(self) -> frozenset[str]:
        """The live nodes of the cluster as this node sees them (itself included; a
        node joining or leaving shows within the heartbeat interval, 3 s); empty on
        a node alone. Every node sees the same set once the heartbeats agree: a
        module that places work on one node (a room's owner) computes it from this."""
        return self.cluster.nodes if self.cluster is not None else frozenset()

    def on_cluster_nodes(self, handler: Callable[[frozenset[str]], None]) -> None:
        """Call `handler(nodes)` when the set of live nodes changes (never on a node
        alone). Synchronous, on the heartbeat's task: spawn what waits."""
        if self.cluster is not None:
            self.cluster.on_nodes_changed(handler)

    def on_cluster_lapse(self, handler: Callable[[], None]) -> None:
        """Call `handler()` when this node finds its heartbeat had expired (its event
        loop or Redis stalled past the heartbeat's TTL): the other nodes may have taken
        it for dead meanwhile and taken over what it held (a lease), without its node
        set changing in its own view. Synchronous, on the heartbeat's task."""
        if self.cluster is not None:
            self.cluster.on_lapsed(handler)

    def forward_to_node(self, node: str, stanza: etree._Element) -> bool:
        """Hand `stanza` to `node`'s router, as if it had arrived there without a
        sender session (through its inbox, in order with what this node forwards
        there): for a stanza to a service that one node handles (a room's owner).
        False when it cannot go (no cluster, Redis cut off, the hop limit, the
        writer's queue full): handle it here then. Once queued, a refusal by Redis
        (the node was reaped) routes it again here, with that node avoided."""
        if self.cluster is None or node == self.cluster.node:
            return False
        return self.cluster.writer.forward(node, stanza.get("to", ""), stanza)

    def node_of(self, session: ClientSession) -> str | None:
        """The cluster node `session` is bound on; None for this node's own sessions
        (and on a node alone). A module that sends one stanza to many sessions groups
        those of other nodes by it, to hand each node one `forward_to_node` that it
        expands there, rather than one forward per session (pubsub's fan-out)."""
        return node_of(session)

    @property
    def cluster_redis(self) -> Redis | None:
        """The cluster's Redis client (None on a node alone), for a module's transient
        state that any node must read after another let go of it (multi-user chat's
        live rooms). Keys go under `xmppd:<module>:`; never wait on it in a handler."""
        return self.cluster.redis if self.cluster is not None else None

    def session_node(self, bare: str, resource: str) -> str | None:
        """The node the session bare/resource is bound on (this node's name for a local
        one; None if it is not bound, or on a node alone)."""
        if self.cluster is None:
            return None
        session = self.router.directory.get(bare, resource)
        if session is None:
            return None
        return node_of(session) or self.cluster.node

    def items(self, vhost: str, store: str) -> ItemStore:
        return ItemStore(self.storage.items, vhost, store)

    def blobs(self, vhost: str, store: str) -> BlobStore:
        return BlobStore(self.storage.blobs, vhost, store)

    # --- sessions, delivery and routing: modules go through these, never the router -----

    def session(self, bare: str, resource: str) -> ClientSession | None:
        """The session bound on bare/resource, if any."""
        return self.router.directory.get(bare, resource)

    def sessions(self, bare: str) -> list[ClientSession]:
        """Every bound session of the account, available or not."""
        return self.router.directory.resources(bare)

    def available_sessions(self, bare: str) -> list[ClientSession]:
        """The account's sessions that sent initial presence."""
        return self.router.directory.available(bare)

    def session_count(self) -> int:
        """How many sessions are bound."""
        return self.router.directory.count()

    def online_accounts(self) -> list[str]:
        """The bare JIDs with at least one bound session, on any node of a cluster."""
        return list(self.router.directory.accounts())

    async def end_account_sessions(
        self, vhost: str, username: str, error: StreamError, keep: str | None = None
    ) -> int:
        """End every stream authenticated as the account with `error`, on every node of
        a cluster, bound or not yet (a password change, an administrator's removal),
        but the session bound as the full JID `keep` (the one that asked); returns how
        many this node ended or asked others to end. Returns once the presence work
        that started here has run, as `Server.end_account_sessions` does. A host that
        runs without a node (the module test harness) ends the account's bound
        sessions only, having no streams of its own."""
        if self.account_streams_ender is not None:
            return await self.account_streams_ender(vhost, username, error, keep)
        sessions = [s for s in self.sessions(f"{username}@{vhost}") if s.jid != keep]
        for session in sessions:
            session.terminate(error)
        return len(sessions)

    def is_bound(self, session: ClientSession) -> bool:
        """True while `session` is the one bound on its resource (not ended or replaced)."""
        return self.router.directory.get(session.bare, session.resource) is session

    def end_session(self, session: ClientSession) -> None:
        """End a session that has no stream any more (one stream management kept for
        resumption): unbound, contacts see it go, "session/closed" runs."""
        self.router.session_ended(session)

    def deliver(self, session: ClientSession, stanza: etree._Element) -> bool:
        """Give a stanza to one session, through the "stanza/in" filters; see Router.deliver."""
        return self.router.deliver(session, stanza)

    def shared_delivery(self, stanza: etree._Element) -> SharedDelivery | None:
        """The delivery `stanza` is part of, while a transport is handed it, if the
        delivery rules gave that message to other sessions too (a message to a bare JID
        with two top-priority resources); None otherwise. A module that may take one
        session's delivery back later (stream management) routes it again only if none
        of the others still has it."""
        shared = self.router.shared
        return shared if shared is not None and shared.stanza is stanza else None

    def route(
        self,
        stanza: etree._Element,
        origin: ClientSession | None = None,
        *,
        bounce: bool = True,
    ) -> None:
        """Route a stanza: one the server makes (no `origin`), or one a module held
        for a client and now lets go as that client's (`origin`). `bounce` False:
        see `Router.route`."""
        self.router.route(stanza, origin, bounce=bounce)

    def resend(self, stanza: etree._Element, origin: ClientSession) -> None:
        """Route again, as `origin`'s, a stanza its client sent earlier (its presence,
        changed by the server): the "stanza/out" filters run as for the client's own,
        but `resending` is True meanwhile, so that a filter that counts what the client
        sent (XEP-0198's h) leaves it out; counted, the count runs ahead of the client's."""
        self.resending = True
        try:
            self.router.route(stanza, origin)
        finally:
            self.resending = False

    def bounce(self, stanza: etree._Element, condition: str, text: str | None = None) -> None:
        """Answer `stanza` with a stanza error, unless it is itself an error."""
        self.router.bounce(stanza, condition, text)

    def refuse(self, stanza: etree._Element, condition: str, text: str | None = None) -> None:
        """What a "stanza/in" filter that drops a delivery calls when the sender is owed
        an error (`condition`): for a message the delivery rules gave to several of the
        recipient's sessions, the router answers only if none of them took it; anything
        else is answered at once, as `bounce` does. See `Router.refuse`."""
        self.router.refuse(stanza, condition, text)

    def spawn(self, work: Awaitable[T], account: str | None = None) -> asyncio.Future[T]:
        """Run `work` as a task the node tracks (waited for at shutdown, errors logged).
        Started by an account's stanza, it is that account's work: its removal waits
        for it (`Router.account_work`), and with WORK_PER_SENDER pieces of it in
        flight a stanza of the account that a "stanza/out" filter takes makes the
        client wait for one (`Router._hold_if_busy`). A future (work queued
        elsewhere, run by a task of its own) is tracked as it is, no task made: the
        account's work until it is done. `account` (a local bare JID) makes it that
        account's work whoever's stanza started it: work that writes the account's
        data for others (the presence module's queue of the subscription changes
        contacts send it), which its removal must wait for, or the write would land
        after the account's data was deleted."""
        return self.router.spawn(work, account)

    def run_ahead(self, bare: str, work: Callable[[], Awaitable[object]], wait: float) -> None:
        """Run `work()` before any stanza routed to the local account `bare` from now on
        reaches it (offline messages before new ones, XEP-0160): those wait behind it
        in the account's serial queue, and what `work` delivers to the account goes
        straight. Called from a sync handler, nothing can slip in between. The stanzas
        wait at most `wait` seconds: then they go on, `work` keeps running and what it
        delivers later follows them (logged), so a store that hangs delays the account
        but neither holds it for good nor loses anything."""
        self.router.ahead(bare, work, wait)

    def spawn_shared(self, work: Awaitable[T]) -> asyncio.Future[T]:
        """`spawn` for work that serves many senders (a room's output queue): nobody's,
        so that no account's removal waits on everyone else's traffic."""
        return self.router.spawn_shared(work)

    async def user_exists(self, domain: str, user: str) -> bool:
        return await self.router.user_exists(domain, user)

    def serves(self, domain: str) -> bool:
        """True if `domain` is one of this server's virtual hosts."""
        return domain in self.router.hosts

    @property
    def ledger(self) -> MessageLedger:
        """The node's message accounting (copies made, messages stored or replayed)."""
        return self.router.ledger

    # --- what the router and server use ------------------------------------------------

    def has_hook(self, event: str) -> bool:
        return self.events.hooked(event)

    async def fire(self, event: str, *args: Any) -> bool:
        """Run the async hooks of `event` in order; True if one of them handled it."""
        return await self.events.fire_async(event, *args)

    def _iq_to_server(self, routed: Routed) -> bool:
        if not self._answer(routed.stanza):
            self.spawn(self.handle_iq(routed.stanza, routed.to.domain, "server"))
        return True

    def _iq_to_account(self, routed: Routed) -> bool:
        """The server answers IQs to a bare JID on the account's behalf (RFC 6121 8.5.2)."""
        stanza = routed.stanza
        if not self._answer(stanza) and stanza.get("type") in ("get", "set"):
            self.spawn(self._account_iq(stanza, routed.to.bare))
        return True

    def _answer(self, stanza: etree._Element) -> bool:
        """An IQ result or error that answers a `send_iq`: resolve it. True if it was one;
        results nobody waits for are dropped (RFC 6120 8.2.3: never answered)."""
        type_ = stanza.get("type")
        if type_ not in ("result", "error"):
            return False
        waiting = self._awaiting.get(stanza.get("id") or "")
        if waiting is not None and _same_entity(stanza.get("from"), waiting[0]):
            del self._awaiting[stanza.get("id") or ""]
            if not waiting[1].done():
                waiting[1].set_result(stanza)
        return True

    async def _account_iq(self, stanza: etree._Element, bare: str) -> None:
        # Another entity asks about this account: privacy and blocking may refuse it.
        if JID(stanza.get("from") or "").bare != bare and self.events.hooked("iq/account"):
            if await self.events.fire_async("iq/account", stanza, bare):
                return
        await self.handle_iq(stanza, bare, "account")

    async def handle_iq(self, stanza: etree._Element, target: str, scope: Scope) -> None:
        type_ = stanza.get("type")
        if type_ not in ("get", "set"):
            return  # results and errors addressed to the server: nothing waits for them yet
        if len(stanza) != 1 or not isinstance(stanza[0].tag, str) or stanza.get("id") is None:
            self.router.bounce(stanza, "bad-request", "an IQ get/set needs an id and one child")
            return
        payload = stanza[0]
        namespace = payload.tag[1:].split("}", 1)[0] if payload.tag[0] == "{" else ""
        sender = JID(stanza.get("from", ""))
        host = target.rsplit("@", 1)[-1]
        handler = self._iq.get((namespace, type_, scope))
        handler_target = target
        if handler is None and scope == "account" and sender.bare == target:
            # The account asks its own bare JID, or sends no 'to' at all (RFC 6120
            # 10.3.3, 8.1.1.1): the server handles it on the account's behalf, so
            # what only the server implements (ping, version, time) answers too.
            handler = self._iq.get((namespace, type_, "server"))
            handler_target = host
        if handler is None:
            self.router.bounce(stanza, "service-unavailable")
            return
        request = IqRequest(stanza, payload, sender, handler_target, host)
        try:
            result_payload = await handler(request)
        except StanzaError as exc:
            self.router.route(error_from(stanza, exc))
            return
        except Exception:
            log.exception("IQ handler for %s failed", namespace)
            self.router.route(error_reply(stanza, "internal-server-error"))
            return
        result = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
        result.set("type", "result")
        result.set("id", stanza.get("id", ""))
        result.set("to", stanza.get("from", ""))
        result.set("from", target)
        if result_payload is not None:
            result.append(result_payload)
        self.router.route(result)
        for action in request.after_reply:
            action()

    @property
    def preauth_namespaces(self) -> frozenset[str]:
        return frozenset(namespace for namespace, _ in self._preauth_iq)

    async def handle_preauth_iq(self, stanza: etree._Element, host: str, ip: str) -> etree._Element:
        """The reply to an IQ sent before authentication (never routed anywhere)."""
        payload = stanza[0]
        namespace = payload.tag[1:].split("}", 1)[0]
        handler = self._preauth_iq.get((namespace, stanza.get("type", "")))
        if handler is None:
            return error_reply(stanza, "service-unavailable")
        try:
            result_payload = await handler(PreAuthRequest(stanza, payload, host, ip))
        except StanzaError as exc:
            return error_from(stanza, exc)
        except Exception:
            log.exception("pre-auth IQ handler for %s failed", namespace)
            return error_reply(stanza, "internal-server-error")
        result = etree.Element(ns.C_IQ, nsmap={None: ns.CLIENT})
        result.set("type", "result")
        result.set("id", stanza.get("id", ""))
        if result_payload is not None:
            result.append(result_payload)
        return result

    def load(self, config: Config) -> None:
        """Instantiate and set up every module enabled in the config, each after the
        modules it requires."""
        self.config = config
        # Imported here, at start, not on the loop at the first account removal.
        self._installed = installed_modules()
        for name, options in validate_module_options(config).items():
            before = self._snapshot()
            module = module_class(name)(self, options)
            module.setup()
            self.modules[name] = module
            self._registered[name] = self._since(before)

    async def start(self) -> None:
        for name, module in self.modules.items():
            before = self._snapshot()
            await module.start()
            self._add(name, self._since(before))

    def _snapshot(self) -> _Snapshot:
        return _Snapshot(
            events=self.events.entries(),
            iq=set(self._iq),
            preauth_iq=set(self._preauth_iq),
            elements=set(self._elements),
            stream_features=[(p, m) for p, makes in self.stream_features.items() for m in makes],
            features={(scope, var) for scope, vars_ in self.features.items() for var in vars_},
            identities=list(self.identities),
            timers=list(self._timers),
            fixed=len(self._shared) + len(self.components),
        )

    def _since(self, before: _Snapshot) -> _Registered:
        now = self._snapshot()
        return _Registered(
            events=[e for key, e in now.events.items() if key not in before.events],
            iq=[k for k in now.iq if k not in before.iq],
            preauth_iq=[k for k in now.preauth_iq if k not in before.preauth_iq],
            elements=[k for k in now.elements if k not in before.elements],
            stream_features=[f for f in now.stream_features if f not in before.stream_features],
            features=[f for f in now.features if f not in before.features],
            identities=[i for i in now.identities if i not in before.identities],
            timers=[t for t in now.timers if t not in before.timers],
            undoable=now.fixed == before.fixed,
        )

    def _add(self, name: str, more: _Registered) -> None:
        registered = self._registered.setdefault(name, _Registered())
        for key in _Registered.__slots__:
            if key == "undoable":
                registered.undoable = registered.undoable and more.undoable
            else:
                getattr(registered, key).extend(getattr(more, key))

    async def enable(self, name: str, options: BaseModel) -> None:
        """Set up and start a module a reload enabled (its `requires` are running)."""
        before = self._snapshot()
        module = module_class(name)(self, options)
        self.modules[name] = module
        try:
            module.setup()
            await module.start()
        finally:  # what a failed setup registered is taken back with the rest
            self._registered[name] = self._since(before)

    async def disable(self, name: str) -> None:
        """Take back what a module a reload disabled registered, then stop it."""
        module = self.modules.pop(name)
        done = self._registered.pop(name, _Registered())
        for kind, event, entry in done.events:
            self.events.remove(kind, event, entry)
        for iq in done.iq:
            self._iq.pop(iq, None)
        for preauth in done.preauth_iq:
            self._preauth_iq.pop(preauth, None)
        for tag in done.elements:
            self._elements.pop(tag, None)
        for phase, make in done.stream_features:
            self.remove_stream_feature(phase, make)  # type: ignore[arg-type]
        for scope, var in done.features:
            self.features[scope].discard(var)
        for identity in done.identities:
            if identity in self.identities:
                self.identities.remove(identity)
        for timer in done.timers:
            timer.cancel()
            if timer in self._timers:
                self._timers.remove(timer)
        await module.stop()

    def reload_problems(self, config: Config, options: dict[str, BaseModel]) -> list[str]:
        """Why the reloaded `config` (whose module `options` are valid) cannot be applied
        to the running modules: one config-style line per module or key.

        Only a `toggleable` module may be enabled or disabled: another keeps state per
        session (or shares it through the cluster), which one enabled mid-run would
        lack for the sessions already bound and one disabled would leave behind."""
        problems: list[str] = []
        why = "it keeps state per session or in the cluster; restart the node"
        for name in [n for n in options if n not in self.modules]:
            if not module_class(name).toggleable:
                problems.append(
                    config.source.problem(
                        ("modules", name), f"cannot be enabled by a reload ({why})"
                    )
                )
        for name, module in self.modules.items():
            registered = self._registered.get(name)
            toggleable = module.toggleable and registered is not None and registered.undoable
            if name not in options and not toggleable:
                problems.append(
                    config.source.problem(
                        ("modules",), f"{name}: cannot be disabled by a reload ({why})"
                    )
                )
        if list(config.hosts) != list(self.hosts):
            for name, module in self.modules.items():
                if module.hosts_fixed:
                    problems.append(
                        config.source.problem(
                            ("hosts",),
                            f"cannot change while the module {name} is enabled (it serves"
                            " a domain under each host from its start); restart the node",
                        )
                    )
        for name, module in self.modules.items():
            new = options.get(name)
            for key in module.fixed_options if new is not None else ():
                if getattr(new, key) != getattr(module.options, key):
                    problems.append(
                        config.source.problem(
                            ("modules", name, key),
                            "cannot be changed by a reload (the module reads it once, at "
                            "start); restart the node",
                        )
                    )
        return problems

    def reconfigure(self, config: Config, options: dict[str, BaseModel]) -> None:
        """Apply a reload that `reload_problems` accepted: the changed options to their
        modules, and the new hosts (`toggle` then enables and disables modules)."""
        self.config = config
        self.hosts[:] = config.hosts
        for name, module in self.modules.items():
            if name in options and options[name] != module.options:
                module.reconfigure(options[name])

    async def toggle(self, options: dict[str, BaseModel]) -> None:
        """Disable the modules `options` (in dependency order) leaves out, enable the
        ones it adds; then "modules/changed". A module that fails to set up or start
        is logged and left out."""
        gone = [name for name in self.modules if name not in options]
        added = [name for name in options if name not in self.modules]
        for name in reversed(gone):
            await self.disable(name)
        for name in added:
            try:
                await self.enable(name, options[name])
            except Exception:
                log.exception("module %s could not be enabled; left disabled", name)
                try:
                    await self.disable(name)
                except Exception:
                    log.exception("module %s did not stop cleanly", name)
        if gone or added:
            self.events.notify("modules/changed")

    async def remove_account(
        self,
        vhost: str,
        username: str,
        removed: Callable[[], Awaitable[object]] | None = None,
    ) -> Removed:
        """Delete the account, then every module's data of it.

        The account goes first, so nothing new is stored for it meanwhile
        (stanzas to it bounce, a login fails); `removed` runs right after that
        (it ends the account's streams). Then this node reads nothing more from
        the account's sessions still bound here (the one that asked for the
        removal: it ends after its answer) and waits for the work their stanzas
        set off (`_settle`): a vCard or roster write a client sent right after
        its <remove/> would otherwise land after its module deleted the data,
        and a new account of the name would find it. Every other node of a
        cluster is asked to do the same for the sessions it has, and answers
        when it did (xmppd.cluster.settle).
        Every module is asked even if one fails; then AccountDataRemains names
        the ones that failed, and calling this again (the account being gone
        already) finishes the job.
        A cluster node that cannot reach Redis (no answer to a PING within
        REDIS_PROBE_WAIT) refuses at once with ClusterUnreachable, before it
        deletes anything: it could neither end the account's sessions on the
        other nodes nor hear that their work is done, and would only wait
        OTHER_NODES_WAIT for answers that cannot come.
        """
        try:
            username = normalize_username(username)  # the name modules store under
        except InvalidUsername:
            return "nothing"
        if self.cluster is not None:
            problem = await self.cluster.unreachable(REDIS_PROBE_WAIT)
            if problem is not None:
                log.error(
                    "%s@%s not removed: %s; nothing was deleted (`xmppctl unregister`"
                    " removes it once Redis answers)", username, vhost, problem,
                )
                raise ClusterUnreachable(
                    f"{username}@{vhost} was not removed: {problem}; nothing was deleted"
                )
        existed = await self.accounts[vhost].unregister(username)
        if existed and removed is not None:
            await removed()
        bare = f"{username}@{vhost}"
        # The other nodes settle meanwhile; this one in this task, which `_settle` must
        # know as its own (the removal may be one of the account's requests).
        elsewhere = asyncio.ensure_future(
            self._settling.elsewhere(bare, self.cluster_nodes, OTHER_NODES_WAIT)
        )
        await self._settle(bare)
        if late := await elsewhere:
            log.error(
                "%s: nodes %s did not say within %g s that the account's work there is"
                " done; what it stores once its data is deleted stays until `xmppctl"
                " unregister` runs again", bare, ", ".join(sorted(late)), OTHER_NODES_WAIT,
            )
        found = await self.remove_user_data(vhost, username)
        if existed:
            return "account"
        return "leftovers" if found else "nothing"

    async def _settle(self, bare: str) -> None:
        """Stop reading the account's sessions of this node and wait (ACCOUNT_WORK_WAIT
        at most) until nothing its stanzas set off runs any more, but the caller's
        own task (the removal may be one of the account's requests). The sessions
        stay held: the account is gone, and they end."""
        for session in self.sessions(bare):
            if node_of(session) is None:  # this node's: another node's ends there
                session.hold_input()
        me = asyncio.current_task()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ACCOUNT_WORK_WAIT
        while work := self.router.account_work(bare) - {me}:
            left = deadline - loop.time()
            if left <= 0:
                log.error(
                    "%s: %d requests still run after %g s; what they store once its"
                    " data is deleted stays until `xmppctl unregister` runs again",
                    bare, len(work), ACCOUNT_WORK_WAIT,
                )
                return
            await asyncio.wait(work, timeout=left)

    async def remove_user_data(self, vhost: str, username: str) -> bool:
        """Run every enabled module's `remove_user`, then every other installed module's
        `purge_user` (its data waits in storage for the day it is enabled again); True
        if one found data, AccountDataRemains if one failed."""
        found = False
        failed: dict[str, str] = {}

        async def attempt(name: str, removal: Awaitable[bool]) -> None:
            nonlocal found
            try:
                found = await removal or found
            except Exception as exc:
                log.error("%s: data of %s@%s not deleted: %s", name, username, vhost, exc)
                failed[name] = str(exc) or type(exc).__name__

        for name, module in self.modules.items():
            await attempt(name, module.remove_user(vhost, username))
        for name, cls in self._installed.items():
            if name not in self.modules:
                await attempt(name, cls.purge_user(self, vhost, username))
        if failed:
            raise AccountDataRemains(f"{username}@{vhost}", failed)
        return found

    async def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for module in reversed(list(self.modules.values())):
            await module.stop()


async def storage_call(operation: Awaitable[T], what: str) -> T:
    """Await a module's storage call: a backend failure becomes the client's stanza
    error, never a silent drop (over-size: not-acceptable; outage: wait and retry)."""
    try:
        return await operation
    except TooLarge:
        raise StanzaError("not-acceptable", "over the storage size limit") from None
    except StorageError as exc:
        log.error("%s storage failed: %s", what, exc)
        raise StanzaError(
            "internal-server-error", "storage is unavailable, try again later", "wait"
        ) from None


def module_class(name: str) -> type[Module]:
    """The Module subclass of xmppd.modules.<name> (each module file exports MODULE)."""
    mod = importlib.import_module(f"xmppd.modules.{name}")
    cls = getattr(mod, "MODULE", None)
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise ImportError(f"xmppd.modules.{name} has no MODULE class")
    return cls


def installed_modules() -> dict[str, type[Module]]:
    """Every feature module of this install by name, enabled or not: the files of
    xmppd.modules whose name has no leading underscore (those are helpers)."""
    package = importlib.import_module("xmppd.modules")
    return {
        info.name: module_class(info.name)
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    }


def validate_module_options(config: Config) -> dict[str, BaseModel]:
    """Each enabled module's options as its model, each after the modules it requires;
    ConfigError with every problem (load_config found them already for a file)."""
    from xmppd.config import ConfigError, validate_section

    problems = [text for _, text in module_option_problems(config.modules, config.source)]
    if problems:
        raise ConfigError(problems)
    classes = {name: module_class(name) for name in config.modules}
    return {
        name: validate_section(
            classes[name].Options, config.modules[name] or {}, config.source, ("modules", name)
        )
        for name in dependency_order(classes)
    }


def module_option_problems(
    modules: dict[str, dict[str, Any] | None], source: ConfigSource
) -> list[tuple[str, str]]:
    """(module name, problem line) for every enabled module that does not exist,
    lacks a module it requires, or has options its model refuses."""
    from xmppd.config import ConfigError, validate_section

    problems: list[tuple[str, str]] = []
    for name, raw in modules.items():
        try:
            cls = module_class(name)
        except ImportError:
            problems.append((name, source.problem(("modules", name), "no such module")))
            continue
        for needed in cls.requires:
            if needed not in modules:
                why = f"needs module {needed!r} enabled too"
                problems.append((name, source.problem(("modules", name), why)))
        try:
            validate_section(cls.Options, raw or {}, source, ("modules", name))
        except ConfigError as exc:
            problems.extend((name, line) for line in exc.problems)
    return problems


def dependency_order(classes: dict[str, type[Module]]) -> list[str]:
    """Module names with each after the ones it requires, otherwise as configured."""
    ordered: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in ordered:
            return
        if name in visiting:
            raise ValueError(f"modules require each other in a circle: {name}")
        visiting.add(name)
        for needed in classes[name].requires:
            visit(needed)
        visiting.discard(name)
        ordered.append(name)

    for name in classes:
        visit(name)
    return ordered


def _same_entity(answered_by: str | None, asked: str) -> bool:
    """Is an IQ answer from the entity the request went to? An answer with no 'from'
    comes from the server itself or an account's bare JID (RFC 6120 10.3.3); else
    the addresses must match, so another entity cannot answer in its place."""
    if answered_by is None:
        return "/" not in asked
    return answered_by == asked
