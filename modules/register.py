"""In-band registration (XEP-0077): create an account before logging in, change its password or
remove it after.

Account creation is off unless `allow_registration` is set, and limited per
client address (in memory on a node alone; in Redis on a cluster, so the limit
holds across the nodes: modules/_register_limit.py). Password changes and account removal
work for logged-in users either way (each can be switched off). A password
change ends the account's other sessions on this node. Removing an account
deletes it, ends its other sessions on this node, deletes every module's data
of it (`ModuleHost.remove_account`, the same removal `xmppctl unregister`
runs), answers, and then ends the session that asked. Both use
<not-authorized/> (XEP-0077 section 3.2).

A name listed in `admins` or `auth.proxy_auth` is never registered in-band
(xmppd/auth/privileged.py): its rights would go to whoever asked first. The
refusal is <not-acceptable/>, worded like that of an invalid name so that it
does not tell a stranger which names carry rights; the log says which key lists it.

Every refused registration leaves one log line (`in-band registration of NAME from
ADDRESS refused: REASON conn=ID`, INFO as a refused login; a reserved name at
WARNING): an operator whose user cannot register sees why, and a stranger trying
names shows. The name is logged as asked, quoted; the password never is. An IQ sent
before TLS is answered too (`<policy-violation/>`), never acted on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from xmppd.auth.accounts import (
    AccountExists,
    AccountNotFound,
    InvalidPassword,
    InvalidUsername,
    normalize_username,
)
from xmppd.auth.privileged import privileged_jids
from xmppd.config import Seconds, format_loc
from xmppd.jid import JID
from xmppd.modulehost import (
    AccountDataRemains,
    ClusterUnreachable,
    IqRequest,
    Module,
    PreAuthRequest,
)
from xmppd.modules._register_limit import SharedRateLimit
from xmppd.storage.base import ConditionFailed, StorageError
from xmppd.stream.errors import StanzaError, StreamError

REGISTER = "jabber:iq:register"
STREAM_FEATURE = "http://jabber.org/features/iq-register"
_QUERY = f"{{{REGISTER}}}query"
_USERNAME = f"{{{REGISTER}}}username"
_PASSWORD = f"{{{REGISTER}}}password"
_REMOVE = f"{{{REGISTER}}}remove"

log = logging.getLogger(__name__)



class RegisterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_registration: StrictBool = False
    min_password_length: StrictInt = Field(default=8, ge=1, le=1023)
    registrations_per_ip: StrictInt = Field(default=3, ge=0)  # 0: no limit
    registration_window: Seconds = Field(default=3600.0, gt=0)  # seconds
    allow_password_change: StrictBool = True
    allow_account_removal: StrictBool = True
    instructions: StrictStr = "Choose a user name and a password for this server."


class RateLimit:
    """At most `limit` events per `window` seconds per key; a reservation can be given back."""

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._swept = clock()

    def reserve(self, key: str) -> float | None:
        """Take a slot now (its stamp, to release it) or None when the key is over its limit."""
        now = self.clock()
        if not self.limit:
            return now
        if now - self._swept > self.window:  # forget idle keys so the dict cannot grow forever
            self._swept = now
            for stale in [k for k, q in self._events.items() if now - q[-1] > self.window]:
                del self._events[stale]
        events = self._events.setdefault(key, deque())
        while events and now - events[0] > self.window:
            events.popleft()
        if len(events) >= self.limit:
            return None
        events.append(now)
        return now

    def release(self, key: str, stamp: float) -> None:
        events = self._events.get(key)
        if events is not None and stamp in events:
            events.remove(stamp)
            if not events:
                del self._events[key]


class Register(Module):
    name = "register"
    toggleable = True  # a reload may enable or disable it
    Options = RegisterOptions

    def setup(self) -> None:
        options: RegisterOptions = self.options  # type: ignore[assignment]
        self.opts = options
        self.accounts = self.host.accounts  # the server's own, with its iteration count
        self.limit = RateLimit(options.registrations_per_ip, options.registration_window)
        self.shared = SharedRateLimit(self.limit, self.host.cluster_redis)
        # Always answer pre-auth registration IQs: without a handler the stream would end.
        self.host.preauth_iq(REGISTER, "get", self._preauth_get)
        self.host.preauth_iq(REGISTER, "set", self._preauth_set)
        if options.allow_registration:
            self.host.add_stream_feature("preauth", _stream_feature)
        self.host.add_feature(REGISTER)
        self.host.iq(REGISTER, "get", self._get, to="both")
        self.host.iq(REGISTER, "set", self._set, to="both")

    def reconfigure(self, options: BaseModel) -> None:
        """A reload: the rate limit keeps its counts, the stream feature follows the switch."""
        super().reconfigure(options)
        new: RegisterOptions = options  # type: ignore[assignment]
        self.opts = new
        self.limit.limit, self.limit.window = new.registrations_per_ip, new.registration_window
        self.host.remove_stream_feature("preauth", _stream_feature)
        if new.allow_registration:
            self.host.add_stream_feature("preauth", _stream_feature)

    # --- before authentication: creating an account -------------------------------------

    async def _preauth_get(self, request: PreAuthRequest) -> etree._Element:
        if not request.encrypted:
            raise self._refused(request, None, "no TLS", _in_clear())
        if not self.opts.allow_registration:
            raise self._refused(request, None, "registration is disabled", _closed())
        query = _query()
        etree.SubElement(query, f"{{{REGISTER}}}instructions").text = self.opts.instructions
        etree.SubElement(query, _USERNAME)
        etree.SubElement(query, _PASSWORD)
        return query

    async def _preauth_set(self, request: PreAuthRequest) -> None:
        query = request.payload
        asked = (query.findtext(_USERNAME) or "").strip() if query.tag == _QUERY else ""
        # Before anything else: a client in clear learns nothing, not even whether
        # registration is open.
        if not request.encrypted:
            raise self._refused(request, asked, "no TLS", _in_clear())
        if not self.opts.allow_registration:
            raise self._refused(request, asked, "registration is disabled", _closed())
        if query.tag != _QUERY:
            raise self._refused(request, None, "malformed request", _malformed())
        if query.find(_REMOVE) is not None:
            raise self._refused(request, asked, "<remove/> before login", StanzaError(
                "unexpected-request", "log in to remove your account"
            ))
        password = query.findtext(_PASSWORD) or ""
        if not asked or not password:
            reason = "no user name" if not asked else "no password"
            raise self._refused(request, asked, reason, StanzaError(
                "not-acceptable", "a user name and a password are required"
            ))
        try:
            username = normalize_username(asked)
        except InvalidUsername:
            raise self._refused(request, asked, "invalid user name", StanzaError(
                "not-acceptable", "this user name is not allowed"
            )) from None
        self._refuse_privileged(username, request)
        try:
            self._check_password(password)
        except StanzaError as exc:
            raise self._refused(request, username, "password too short", exc) from None
        slot = await self.shared.reserve(request.ip)
        if slot is None:
            # XEP-0077 section 3.1.1: not-acceptable for "too many registrations".
            raise self._refused(
                request,
                username,
                f"registration limit reached ({self.limit.limit} per "
                f"{self.limit.window:g} s from the address)",
                StanzaError(
                    "not-acceptable", "too many registrations from your address, try later", "wait"
                ),
            )
        registered = False
        try:
            await self.accounts[request.host].register(username, password)
            registered = True
        except AccountExists:
            taken = StanzaError("conflict", "this user name is taken")
            raise self._refused(request, username, "user name taken", taken) from None
        except InvalidPassword as exc:  # its text never quotes the password
            weak = StanzaError("not-acceptable", str(exc))
            raise self._refused(request, username, f"password refused ({exc})", weak) from None
        except (StorageError, ConditionFailed) as exc:
            log.error(
                "in-band registration of %s from %s failed: account storage: %s conn=%s",
                _shown(username, request.host), request.ip, exc, request.conn,
            )
            raise _unavailable() from None
        finally:
            if not registered:  # only accounts made count against the address
                await self.shared.release(slot)
        log.info(
            "registered %s@%s from %s conn=%s", username, request.host, request.ip, request.conn
        )

    def _refused(
        self, request: PreAuthRequest, asked: str | None, reason: str, error: StanzaError
    ) -> StanzaError:
        """Log a refused registration, once, at INFO as a refused login is (the name as
        asked, quoted: it is a stranger's input; never the password); returns `error`,
        the answer, for the caller to raise."""
        account = f"{asked}@{request.host}" if asked else None
        log.info(
            "in-band registration of %s from %s refused: %s conn=%s",
            _shown(asked, request.host), request.ip, reason, request.conn,
            extra={
                "event": "register-refused",
                "account": account,
                "address": request.ip,
                "reason": reason,
                "conn": request.conn,
            },
        )
        return error

    def _refuse_privileged(self, username: str, request: PreAuthRequest) -> None:
        """Refuse a name the config gives rights to (see the module doc), logged at
        WARNING: someone went for a name with rights, or its account is still missing."""
        config = self.host.config
        if config is None:
            return
        jid = f"{username}@{request.host}"
        loc = privileged_jids(config).get(jid)
        if loc is None:
            return
        log.warning(
            "in-band registration of %s from %s refused: %s (%s) lists it conn=%s",
            jid, request.ip, format_loc(loc), config.source.where(loc), request.conn,
            extra={
                "event": "register-refused",
                "account": jid,
                "address": request.ip,
                "reason": "reserved name",
                "conn": request.conn,
            },
        )
        raise StanzaError("not-acceptable", "this user name is not allowed")

    # --- after authentication: the account's own registration -------------------------

    async def _get(self, request: IqRequest) -> etree._Element:
        username = _own_user(request)
        query = _query()
        etree.SubElement(query, f"{{{REGISTER}}}registered")
        etree.SubElement(query, f"{{{REGISTER}}}instructions").text = (
            "You are registered: send a new password to change it, or <remove/> to delete "
            "your account."
        )
        etree.SubElement(query, _USERNAME).text = username
        etree.SubElement(query, _PASSWORD)
        return query

    async def _set(self, request: IqRequest) -> None:
        username = _own_user(request)
        query = _checked_query(request.payload)
        if query.find(_REMOVE) is not None:
            if len([c for c in query if isinstance(c.tag, str)]) != 1:
                raise StanzaError("bad-request", "<remove/> must be the only child")
            await self._remove(request, username)
        else:
            await self._change_password(request.host, username, query)
            # As ejabberd and Prosody do: the account's other sessions end (the
            # password that opened them may be what leaked); the asker's stays.
            vhost, asker = request.host, str(request.sender)
            request.after_reply.append(
                lambda: self._end_sessions(vhost, username, "the password was changed", asker)
            )

    async def _change_password(self, vhost: str, username: str, query: etree._Element) -> None:
        if not self.opts.allow_password_change:
            raise StanzaError("not-allowed", "in-band password changes are disabled")
        given = query.findtext(_USERNAME)
        password = query.findtext(_PASSWORD)
        if given is None or password is None:
            raise StanzaError("bad-request", "send <username/> and <password/>")
        if not _same_user(given.strip(), username, vhost):
            raise StanzaError("forbidden", "you can only change your own password")
        if not password:
            # XEP-0077 section 3.3: never a null password; the old one stays.
            raise StanzaError("not-acceptable", "the password must not be empty")
        self._check_password(password)
        try:
            await self.accounts[vhost].set_password(username, password)
        except InvalidPassword as exc:
            raise StanzaError("not-acceptable", str(exc)) from None
        except AccountNotFound:
            raise StanzaError("registration-required", "the account no longer exists") from None
        except (StorageError, ConditionFailed) as exc:
            raise _storage_error(exc) from None
        log.info("password changed for %s@%s", username, vhost)

    async def _remove(self, request: IqRequest, username: str) -> None:
        vhost = request.host
        if not self.opts.allow_account_removal:
            raise StanzaError("not-allowed", "in-band account removal is disabled")
        bare, asker = f"{username}@{vhost}", str(request.sender)

        async def end_other_sessions() -> None:
            # Right after the account is deleted, before the modules delete its data:
            # another resource must not write a roster or vCard back in between.
            await self.host.end_account_sessions(
                vhost, username, StreamError("not-authorized", "the account was removed"), asker
            )

        try:
            removed = await self.host.remove_account(vhost, username, end_other_sessions)
        except StorageError as exc:  # the account itself could not be deleted
            raise _storage_error(exc) from None
        except ClusterUnreachable as exc:  # logged; nothing deleted
            raise StanzaError(
                "internal-server-error",
                "the account cannot be removed now (the cluster is unreachable), try again later",
                "wait",
            ) from exc
        except AccountDataRemains as exc:
            # The account is gone: the client is told so and its sessions end as
            # usual; what remains is the operator's to finish.
            log.error("%s; `xmppctl unregister %s` deletes the rest", exc, bare)
            removed = "account"
        if removed != "account":
            raise StanzaError("registration-required", "the account no longer exists")
        log.info("account %s removed in-band", bare)
        # XEP-0077 3.2: the result first, then the account's sessions end.
        request.after_reply.append(
            lambda: self._end_sessions(vhost, username, "the account was removed")
        )

    def _end_sessions(self, vhost: str, username: str, text: str, keep: str | None = None) -> None:
        """End the account's streams on every node, bound or still logging in (one that
        authenticated with the old password may not have bound yet), but `keep`'s. In a
        task of its own, started at once: its first step, which ends the streams this
        node has, runs before the loop reads any client again."""
        self.host.spawn(self.host.end_account_sessions(
            vhost, username, StreamError("not-authorized", text), keep
        ))

    def _check_password(self, password: str) -> None:
        if len(password) < self.opts.min_password_length:
            raise StanzaError(
                "not-acceptable",
                f"the password needs at least {self.opts.min_password_length} characters",
            )


def _shown(asked: str | None, vhost: str) -> str:
    """The user name as asked, for a log line: quoted with its control characters
    escaped (repr), so that a hostile name cannot forge a line of its own."""
    return f"{asked!r}@{vhost}" if asked else "(no user name)"


def _own_user(request: IqRequest) -> str:
    """The user name of the account the request is about: the sender's, or forbidden."""
    sender = request.sender
    own = request.from_owner if "@" in request.target else sender.domain == request.target
    if not own or not sender.user:
        raise StanzaError("forbidden", "you can only manage your own account")
    return sender.user


def _same_user(given: str, username: str, vhost: str) -> bool:
    """<username/> names the account: as its localpart or its bare JID, in any case."""
    if "@" in given:
        try:
            jid = JID(given)
        except ValueError:
            return False
        return jid.domain == vhost and not jid.resource and jid.user == username
    try:
        return normalize_username(given) == username
    except InvalidUsername:
        return False


def _checked_query(payload: etree._Element) -> etree._Element:
    if payload.tag != _QUERY:
        raise _malformed()
    return payload


def _in_clear() -> StanzaError:
    return StanzaError("policy-violation", "start TLS first: registering sends a password")


def _closed() -> StanzaError:
    return StanzaError("service-unavailable", "in-band registration is closed")


def _malformed() -> StanzaError:
    return StanzaError("bad-request", "the payload must be <query xmlns='jabber:iq:register'/>")


def _unavailable() -> StanzaError:
    return StanzaError("internal-server-error", "storage is unavailable, try again later", "wait")


def _query() -> etree._Element:
    return etree.Element(_QUERY, nsmap={None: REGISTER})


def _stream_feature() -> etree._Element:
    return etree.Element(f"{{{STREAM_FEATURE}}}register", nsmap={None: STREAM_FEATURE})


def _storage_error(exc: Exception) -> StanzaError:
    log.error("account storage failed: %s", exc)
    return _unavailable()


MODULE = Register
