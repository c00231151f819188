"""The one place that decides where a stanza goes (RFC 6120 section 10, RFC 6121 section 8).

Delivery to a session already bound on this node is synchronous, so a
client's stanzas keep their order and the message path has no storage round
trip. Anything that needs storage or a module (an IQ to the server or to an
account, a message for a user with no available resource) runs as a task.
Addresses this node does not serve go to `remote`, the seam where cluster
forwarding and s2s plug in.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Protocol

from lxml import etree

from xmppd.directory import LocalDirectory, SessionDirectory
from xmppd.jid import JID, parse_jid
from xmppd.ledger import MessageLedger
from xmppd.session import ClientSession
from xmppd.stream.errors import StanzaError, StreamError, error_from, error_reply
from xmppd.xml import ns

if TYPE_CHECKING:
    from xmppd.modulehost import ModuleHost

log = logging.getLogger(__name__)

class RemoteRoute(Protocol):
    """Where stanzas for domains this node does not serve go (s2s, later).

    `bounce` False: a failure to deliver is not reported to the sender (the
    copies of a presence broadcast, see `Router.route`).
    """

    def route(self, stanza: etree._Element, bounce: bool = True) -> None: ...


class NoRemote:
    """Until s2s exists: remote domains are unreachable, and the sender is told so.

    RFC 6120 10.4.3: every stanza to a remote domain that cannot be delivered
    is answered with <remote-server-not-found/>: messages, IQ get/set,
    subscription requests and answers, probes, directed presence. Errors and
    IQ results are never answered (`Router.bounce`), and presence broadcast
    copies are routed with bounce=False.
    """

    def __init__(self, router: Router) -> None:
        self.router = router

    def route(self, stanza: etree._Element, bounce: bool = True) -> None:
        if bounce:
            self.router.bounce(
                stanza, "remote-server-not-found", "no server-to-server connectivity"
            )


class Router:
    def __init__(
        self,
        hosts: Collection[str],
        user_exists: Callable[[str, str], Awaitable[bool]],
        directory: SessionDirectory | None = None,
    ) -> None:
        self.hosts = frozenset(hosts)
        self.user_exists = user_exists  # (host, username) -> bool
        self.directory: SessionDirectory = directory if directory is not None else LocalDirectory()
        self.modules: ModuleHost | None = None
        self.remote: RemoteRoute = NoRemote(self)
        self.ledger = MessageLedger()
        # The local session whose stanza route() is handling now (None: the server's
        # own), so that a filter that has to wait can slow that client down.
        self.current_origin: ClientSession | None = None
        self._tasks: set[asyncio.Future[object]] = set()
        self._serial: dict[str, deque[Callable[[], Awaitable[object] | None]]] = {}

    # --- sessions ----------------------------------------------------------------------

    def bind(self, session: ClientSession) -> None:
        """Make `session` the one bound on its full JID.

        An existing session on the same resource is ended with <conflict/>
        (RFC 6120 section 7.7.2.2, "override"): the newest login wins.
        """
        old = self.directory.add(session)
        if old is not None:
            old.terminate(StreamError("conflict", "replaced by a new connection on this resource"))

    def unbind(self, session: ClientSession) -> None:
        self.directory.remove(session)

    def session_ended(self, session: ClientSession) -> None:
        """The client is gone (clean close or dropped TCP): others see it go unavailable.

        First the "session/ending" filters hand back what modules still hold
        for the session (a presence waiting for its avatar hash), so that
        whatever the server accepted before the stream closed is processed
        now, in order: an unavailable presence sent just before
        </stream:stream> is the session's last word, with its status. Only a
        session still available after that gets a server-made unavailable.
        """
        modules = self.modules
        try:
            if modules is not None:
                modules.run_each("session/ending", session)
        finally:
            self.unbind(session)  # whatever a module did, the session is gone
        if session.available:
            presence = etree.Element(ns.C_PRESENCE, nsmap={None: ns.CLIENT})
            presence.set("type", "unavailable")
            presence.set("from", session.jid)
            self.broadcast_presence(presence, session)
        if modules is not None and modules.has_hook("session/closed"):
            self.spawn(modules.fire("session/closed", session))

    # --- routing -----------------------------------------------------------------------

    def route(
        self, stanza: etree._Element, origin: ClientSession | None = None, *, bounce: bool = True
    ) -> None:
        """Send `stanza` where its 'to' says; errors go back to its sender.

        `origin` is the local session that sent it, None for stanzas the
        server makes; only the former pass the "stanza/out" filters
        (privacy lists, carbons of sent messages, directed presence).
        `bounce` False is for the server's copies of a presence broadcast to
        each contact: an unreachable remote domain is then not reported, one
        error per contact at every presence change being noise to the
        client (the probe at initial presence reports it once).
        """
        previous, self.current_origin = self.current_origin, origin
        try:
            self._route(stanza, origin, bounce)
        finally:
            self.current_origin = previous

    def _route(self, stanza: etree._Element, origin: ClientSession | None, bounce: bool) -> None:
        modules = self.modules
        if origin is not None and modules is not None and modules.filters_out:
            if not modules.run_filters("stanza/out", stanza, origin):
                return
        to = stanza.get("to")
        try:
            if to is None:
                self._to_self(stanza, origin)
                return
            jid = parse_jid(to)
        except StanzaError as exc:
            self.reply_error(stanza, exc)
            return
        if jid.domain not in self.hosts:
            self.remote.route(stanza, bounce)
        elif not jid.user:
            if jid.resource:
                self.bounce(stanza, "service-unavailable")
            else:
                self._to_server(stanza, jid)
        elif jid.bare in self._serial:
            # Something for this user still waits on storage (a subscription
            # answer, say): this stanza goes after it, not ahead of it.
            self._serially(jid.bare, lambda: self._to_user(stanza, jid))
        else:
            self._to_user(stanza, jid)

    def _to_user(self, stanza: etree._Element, jid: JID) -> None:
        if jid.resource:
            self._to_full(stanza, jid)
        else:
            self._to_bare(stanza, jid)

    def deliver(self, session: ClientSession, stanza: etree._Element) -> bool:
        """Hand a stanza to a local session, through the "stanza/in" filters.

        False when the session could not take it (its stream is closing):
        then the "delivery/failure" hook (stanza, session) decides, and by
        default a message goes where one for an offline user goes and an IQ
        request is answered with an error, so nothing vanishes in the gap
        between a stream closing and its session ending.
        """
        modules = self.modules
        if modules is not None and modules.filters_in:
            if not modules.run_filters("stanza/in", stanza, session):
                return True
        if session.deliver(stanza):
            return True
        self._serially(session.bare, lambda: self._undelivered(stanza, session))
        return False

    async def _undelivered(self, stanza: etree._Element, session: ClientSession) -> None:
        modules = self.modules
        if modules is not None and await modules.fire("delivery/failure", stanza, session):
            return
        type_ = stanza.get("type")
        if stanza.tag == ns.C_MESSAGE and type_ not in ("error", "groupchat"):
            await self._unhandled(stanza, "message/offline", session.bare)
        elif stanza.tag == ns.C_IQ and type_ in ("get", "set"):
            self.bounce(stanza, "service-unavailable")

    def _to_self(self, stanza: etree._Element, origin: ClientSession | None) -> None:
        """No 'to': the stanza is for the sender's own account (RFC 6120 section 10.3)."""
        if stanza.tag == ns.C_PRESENCE and origin is not None:
            self.broadcast_presence(stanza, origin)
        elif stanza.tag == ns.C_IQ:
            sender = stanza.get("from") or ""
            self.spawn(self._iq_to_account(stanza, JID(sender).bare, sender))
        elif stanza.tag == ns.C_MESSAGE and origin is not None:
            # RFC 6120 10.3.1: as if addressed to the sender's bare JID.
            self._to_bare(stanza, JID(origin.bare))

    def _to_server(self, stanza: etree._Element, jid: JID) -> None:
        if stanza.tag == ns.C_IQ:
            self.spawn(self._iq_to_server(stanza, jid.domain))
        elif self.modules is not None:
            self.spawn(self._unhandled(stanza, f"{_local(stanza.tag)}/server"))

    def _to_full(self, stanza: etree._Element, jid: JID) -> None:
        session = self.directory.get(jid.bare, jid.resource)
        if session is not None:
            self.deliver(session, stanza)
            return
        kind, type_ = stanza.tag, stanza.get("type")
        if kind == ns.C_MESSAGE:
            if type_ == "groupchat":
                self.bounce(stanza, "service-unavailable")
            elif type_ != "error":
                self._to_bare(stanza, JID(jid.bare))  # as Prosody and ejabberd do
        elif kind == ns.C_PRESENCE:
            if type_ in ns.SUBSCRIPTION_TYPES or type_ == "probe":
                self._to_bare(stanza, JID(jid.bare))
        elif type_ in ("get", "set"):
            self.bounce(stanza, "service-unavailable")

    def _to_bare(self, stanza: etree._Element, jid: JID) -> None:
        bare = jid.bare
        if stanza.tag == ns.C_IQ:
            self.spawn(self._iq_to_account(stanza, bare, stanza.get("from") or ""))
            return
        if not self.directory.has(bare):
            self._serially(bare, lambda: self._to_bare_unknown(stanza, jid))
            return
        self._deliver_bare(stanza, jid)

    async def _to_bare_unknown(self, stanza: etree._Element, jid: JID) -> None:
        """Nobody is bound here for that bare JID: does the account exist? (RFC 6121 8.5.1)"""
        if not await self.user_exists(jid.domain, jid.user):
            if stanza.tag == ns.C_MESSAGE:
                self.bounce(stanza, "service-unavailable")
            return  # presence to no such user is silently ignored
        self._deliver_bare(stanza, jid)

    def _deliver_bare(self, stanza: etree._Element, jid: JID) -> None:
        available = self.directory.available(jid.bare)
        type_ = stanza.get("type")
        if stanza.tag == ns.C_PRESENCE:
            if (
                (type_ in ns.SUBSCRIPTION_TYPES or type_ == "probe")
                and self.modules is not None
                and self.modules.has_hook(f"presence/{type_}")
            ):
                modules = self.modules
                self._serially(
                    jid.bare, lambda: modules.fire(f"presence/{type_}", stanza, jid.bare)
                )
                return
            if type_ == "error" and not available:
                # An error about a subscription request the account sent (stamped
                # with its bare JID, RFC 6121 3.1.2) reaches the client that sent
                # it, even one that has not sent presence yet.
                available = self.directory.resources(jid.bare)
            if type_ != "probe":
                for session in available:
                    self.deliver(session, stanza)
            return
        # message (RFC 6121 8.5.2.1.1 / 8.5.2.2.1)
        if type_ == "error":
            return
        if type_ == "groupchat":
            self.bounce(stanza, "service-unavailable")
            return
        eligible = [s for s in available if s.priority >= 0]
        if eligible and type_ == "headline":
            for session in eligible:
                self.deliver(session, stanza)
        elif eligible:
            top = max(s.priority for s in eligible)
            for session in eligible:
                if session.priority == top:
                    self.deliver(session, stanza)
        else:
            # Offline storage decides, headlines included (a XEP-0334 <store/> hint).
            self._serially(jid.bare, lambda: self._unhandled(stanza, "message/offline", jid.bare))

    def _serially(self, bare: str, job: Callable[[], Awaitable[object] | None]) -> None:
        """Run `job` after the jobs already queued for `bare`.

        Whatever waits on storage for one recipient (is there such an
        account, store it offline, a subscription request) keeps the order
        the stanzas arrived in, whatever order the backend answers in.
        """
        queue = self._serial.get(bare)
        if queue is None:
            queue = self._serial[bare] = deque()
            self.spawn(self._run_serially(bare, queue))
        queue.append(job)

    async def _run_serially(
        self, bare: str, queue: deque[Callable[[], Awaitable[object] | None]]
    ) -> None:
        try:
            while queue:
                job = queue.popleft()
                try:
                    pending = job()
                    if pending is not None:
                        await pending
                except Exception:
                    log.exception("routing to %s failed", bare)
        finally:
            del self._serial[bare]

    def broadcast_presence(self, stanza: etree._Element, origin: ClientSession) -> None:
        """Presence without 'to': the client's own availability (RFC 6121 section 4.2).

        Every available resource of the user gets it here, the sender itself
        included while it is connected (RFC 6121 4.2.2 and 4.5.2: an entity
        is implicitly subscribed to its own presence; clients take the echo
        as the sign they are online). The "presence/self" filters (stanza,
        origin) see it synchronously first; the "presence/broadcast" hook
        (stanza, origin, initial) lets the presence module tell contacts,
        where `initial` says the resource just became available.

        A presence a module held and hands back after the session ended
        (see `session_ended`) is still processed if it is unavailable (its
        status is the user's last word), and dropped if it is available: the
        session is gone, so announcing it would leave it online for good.
        """
        type_ = stanza.get("type")
        if type_ not in (None, "unavailable"):
            self.bounce(stanza, "bad-request", "presence of this type needs a 'to'")
            return
        bound = self.directory.get(origin.bare, origin.resource) is origin
        if type_ is None and not bound:
            return
        modules = self.modules
        if modules is not None and not modules.run_filters("presence/self", stanza, origin):
            return
        initial = type_ is None and not origin.available
        origin.available = type_ is None
        origin.presence = stanza if type_ is None else None
        try:
            origin.priority = int(stanza.findtext(f"{{{ns.CLIENT}}}priority") or 0)
        except ValueError:
            origin.priority = 0
        for session in self.directory.resources(origin.bare):
            if session.available or session is origin:
                self.deliver(session, stanza)
        if modules is not None and modules.has_hook("presence/broadcast"):
            self.spawn(modules.fire("presence/broadcast", stanza, origin, initial))

    # --- IQs handled by modules ---------------------------------------------------------

    async def _iq_to_server(self, stanza: etree._Element, domain: str) -> None:
        if self.modules is None:
            self.bounce(stanza, "service-unavailable")
            return
        await self.modules.handle_iq(stanza, domain, "server")

    async def _iq_to_account(self, stanza: etree._Element, bare: str, sender: str) -> None:
        """The server answers IQs to a bare JID on the account's behalf (RFC 6121 8.5.2)."""
        if stanza.get("type") not in ("get", "set"):
            return
        if self.modules is None:
            self.bounce(stanza, "service-unavailable")
            return
        # Another entity asks about this account: privacy and blocking may refuse it.
        if JID(sender).bare != bare and self.modules.has_hook("iq/account"):
            if await self.modules.fire("iq/account", stanza, bare):
                return
        await self.modules.handle_iq(stanza, bare, "account")

    async def _unhandled(self, stanza: etree._Element, event: str, *args: object) -> None:
        """Give modules a chance (offline storage, messages to the server); else tell the sender."""
        handled = self.modules is not None and await self.modules.fire(event, stanza, *args)
        if not handled and event == "message/offline":
            if stanza.get("type") in (None, "normal", "chat"):
                self.bounce(stanza, "service-unavailable", "the recipient is offline")
            else:
                self.ledger.drop("not-stored")  # a headline, with no offline storage

    # --- errors ------------------------------------------------------------------------

    def bounce(self, stanza: etree._Element, condition: str, text: str | None = None) -> None:
        """Answer `stanza` with an error, unless it is itself an error (no error loops)."""
        if stanza.get("type") == "error" or stanza.get("from") is None:
            return
        if stanza.tag == ns.C_MESSAGE:
            self.ledger.bounced += 1
        if stanza.tag == ns.C_IQ and stanza.get("type") not in ("get", "set"):
            return
        self.route(error_reply(stanza, condition, text))

    def reply_error(self, stanza: etree._Element, exc: StanzaError) -> None:
        if stanza.get("type") == "error" or stanza.get("from") is None:
            return
        if stanza.tag == ns.C_MESSAGE:
            self.ledger.bounced += 1
        self.route(error_from(stanza, exc))

    def spawn(self, coro: Awaitable[object]) -> None:
        task: asyncio.Future[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Future[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("routing task failed", exc_info=exc)

    def pending(self) -> frozenset[asyncio.Future[object]]:
        """The routing tasks in flight now: the work an action started is what
        appears after it (Server.end_account_sessions waits for exactly that)."""
        return frozenset(self._tasks)

    async def drain(self) -> None:
        """Wait for routing tasks in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
