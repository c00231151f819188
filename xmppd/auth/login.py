"""Logging a client in: SASL, the authentication throttle and resource binding.

One place for every transport. A TCP/TLS connection today, a WebSocket
later, hands the sans-IO stream's events here and gets a bound
`ClientSession` back; none of them carries its own copy of the rules about
who may act as whom, how failures slow an attacker down, or which
resource wins a conflict.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from xmppd.auth.accounts import Ban, InvalidUsername, normalize_username
from xmppd.auth.throttle import Check
from xmppd.jid import JID, InvalidJID
from xmppd.sasl import SASLFailure
from xmppd.sasl.mechanisms import scram_hash_of
from xmppd.sasl.plain import parse_plain
from xmppd.sasl.scram import ScramKeys, ScramServer
from xmppd.session import ClientSession, Transport
from xmppd.storage.base import StorageError
from xmppd.stream import c2s
from xmppd.stream.errors import StanzaError, error_from
from xmppd.xml.text import xml_can_carry

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger("xmppd.connection")

_MECHANISM_NAME = re.compile(r"[A-Z0-9_-]{1,20}")
"""What a SASL mechanism name may be (RFC 4422 section 3.1)."""


class StreamLogin:
    """The login of one client stream, from <auth/> to a bound resource.

    `output` is called after every asynchronous step that queued something on
    the stream (a challenge, a failure after its delay), so the transport
    writes it. `conn` is the connection's id, in every log line about it.
    """

    def __init__(
        self,
        node: Server,
        stream: c2s.C2SStream,
        ip: str,
        output: Callable[[], None],
        conn: str = "-",
    ) -> None:
        self.node = node
        self.stream = stream
        self.ip = ip
        self.conn = conn
        self._output = output
        self._mechanism = ""
        self._scram: ScramServer | None = None
        self._pending_mechanism: str | None = None  # <auth/> came without initial response
        self._auth_task: asyncio.Task[None] | None = None
        # The last password check (PLAIN, or a SCRAM proof): it runs to its end (and
        # counts its failure) even when its exchange is given up, and the next check
        # waits for it.
        self._check: asyncio.Task[object] | None = None

    def cancel(self) -> None:
        """The stream is gone: stop whatever exchange is in flight (a password check
        under way still ends and counts, see `_check_plain`)."""
        if self._auth_task is not None:
            self._auth_task.cancel()
            self._auth_task = None

    def start(self, event: c2s.AuthRequested) -> None:
        """A new exchange. The stream starts one only after the last one's outcome
        (C2SStream refuses an <auth/> during an exchange), so a task still here is
        one already given up; cancelled, it cannot answer the new exchange."""
        if self._auth_task is not None:
            self._auth_task.cancel()
        self._mechanism = event.mechanism  # for the log, should a response come out of turn
        if event.data is None:
            self.stream.sasl_challenge(b"")  # RFC 6120 6.4.2: ask for the initial response
            self._scram = None
            self._pending_mechanism = event.mechanism
            return
        self._pending_mechanism = None
        self._auth_task = asyncio.ensure_future(self._auth_first(event.mechanism, event.data))

    def respond(self, data: bytes) -> None:
        if self._auth_task is not None and not self._auth_task.done():
            self._auth_task.cancel()
            self._log_failed(None, "malformed-request")
            self.stream.sasl_failure("malformed-request", "wait for the server's challenge")
            return
        if self._pending_mechanism is not None:
            mechanism, self._pending_mechanism = self._pending_mechanism, None
            self._auth_task = asyncio.ensure_future(self._auth_first(mechanism, data))
        elif self._scram is not None:
            self._auth_task = asyncio.ensure_future(self._auth_final(data))
        else:
            self._log_failed(None, "malformed-request")
            self.stream.sasl_failure("malformed-request")

    def refused(self, condition: str, mechanism: str | None) -> None:
        """The stream refused a SASL element itself (c2s.AuthRefused): logged as any
        failed login, with the mechanism the client named (None: the one under way)."""
        if mechanism is not None:
            # A name the server did not offer is the client's own text: quoted, cut short,
            # so that it cannot write a line of its own into the log.
            self._mechanism = (
                mechanism if _MECHANISM_NAME.fullmatch(mechanism) else repr(mechanism[:40])
            )
        self._log_failed(None, condition)

    def abort(self) -> None:
        if self._auth_task is not None:
            self._auth_task.cancel()
        self._scram = None
        self._pending_mechanism = None

    async def _auth_first(self, mechanism: str, data: bytes) -> None:
        server = self.node
        host = self.stream.host or ""
        try:
            if mechanism == "PLAIN":
                authzid, username, password = parse_plain(data)
                username = _account_name(username)
                account = f"{username}@{host}"
                reserved = await self._reserve(account)
                if reserved is None:
                    self._refuse_banned()
                    return
                plain = asyncio.ensure_future(
                    self._check_plain(host, username, password, reserved)
                )
                self._check = plain
                right, delay = await asyncio.shield(plain)
                if not right:
                    await self._answer_wrong(account, delay)
                    return
                await self._authorize(username, authzid, None)
                return
            scram = ScramServer(
                mechanism,
                self.stream.channel_bindings,
                plus_offered=any(m.endswith("-PLUS") for m in self.stream.offered),
                fake_iterations=server.config.auth.scram_iterations,
                fake_salt_key=server.fake_salt_key,
            )
            username = _account_name(scram.start(data))
            if await server.throttle.refused(self.ip, f"{username}@{host}", self.conn):
                self._refuse_banned()
                return
            credentials = await server.accounts[host].credentials(username)
            keys = None if credentials is None else credentials.get(scram_hash_of(mechanism))
            if credentials is not None and keys is None:
                self._refuse_missing_hash(username, mechanism, credentials)
                return
            self.stream.sasl_challenge(scram.challenge(keys))
            self._scram = scram
        except SASLFailure as failure:
            await self._auth_failed(None, failure.condition, failure.text)
        except (StorageError, ValueError) as exc:
            # Storage down or stored keys unreadable: the client may retry; nothing was changed.
            log.error("authentication for %s failed on the server side: %s", self.ip, exc)
            self.stream.sasl_failure("temporary-auth-failure", "try again later")
        finally:
            self._output()

    async def _reserve(self, account: str) -> Check | None:
        """`AuthThrottle.reserve`, once this stream's last check is over (one check at a
        time per stream): None when the address is banned (the refusal logged)."""
        if self._check is not None and not self._check.done():
            await asyncio.wait([self._check])
        return await self.node.throttle.reserve(self.ip, account, self.conn)

    async def _check_plain(
        self, host: str, username: str, password: str, reserved: Check
    ) -> tuple[bool, float | None]:
        """The PLAIN password check that `AuthThrottle.reserve` let start: whether the
        password is right, and for a wrong one what `AuthThrottle.failed` says.

        A task of its own, shielded: an exchange given up (<abort/>, a closed
        stream) does not stop the key derivation in the executor, so it must
        not end the check either, or the derivation would be neither counted
        nor bounded (a guess, then <abort/>, again and again).
        """
        throttle = self.node.throttle
        try:
            if await self.node.accounts[host].verify_plain(username, password):
                return True, None
            return False, await throttle.failed(self.ip, f"{username}@{host}", self.conn)
        finally:
            await throttle.release(reserved)

    async def _check_scram(
        self, scram: ScramServer, data: bytes, account: str, reserved: Check
    ) -> tuple[bytes | SASLFailure, float | None]:
        """The SCRAM proof check that `AuthThrottle.reserve` let start: the server-final
        message, or the failure and, for wrong credentials, what `AuthThrottle.failed`
        says. The check is a few HMACs, but each is a guess (the client derived the
        key): reserved as a PLAIN check is, or proofs sent at once on many streams
        would all be checked before one failure counted. Shielded, as a PLAIN check,
        so that its failure counts and its reservation ends whatever its stream does.
        """
        throttle = self.node.throttle
        try:
            try:
                return scram.finish(data), None
            except SASLFailure as failure:
                if failure.condition != "not-authorized":
                    return failure, None  # malformed: no guess was checked
                return failure, await throttle.failed(self.ip, account, self.conn)
        finally:
            await throttle.release(reserved)

    async def _auth_final(self, data: bytes) -> None:
        scram, self._scram = self._scram, None
        assert scram is not None and scram.authcid is not None
        username = _account_name(scram.authcid)
        account = f"{username}@{self.stream.host or ''}"
        try:
            reserved = await self._reserve(account)
            if reserved is None:
                self._refuse_banned()
                return
            proof = asyncio.ensure_future(self._check_scram(scram, data, account, reserved))
            self._check = proof
            verdict, delay = await asyncio.shield(proof)
            if not isinstance(verdict, SASLFailure):
                await self._authorize(username, scram.authzid, verdict)
            elif verdict.condition == "not-authorized":
                await self._answer_wrong(account, delay, verdict.text)
            else:
                await self._auth_failed(username, verdict.condition, verdict.text)
        finally:
            self._output()

    async def _authorize(
        self, username: str, authzid: str | None, additional: bytes | None
    ) -> None:
        """Authentication passed: may this user act as `authzid`?

        Only as itself, unless auth.proxy_auth lists it, and then only as an
        existing account of the same host: acting as an arbitrary identity
        after authenticating as another is a known CVE class.
        """
        host = self.stream.host or ""
        own = f"{username}@{host}"
        if authzid is not None:
            try:
                target = JID(authzid)
            except InvalidJID:
                target = None
            if target is None or target.bare != own:
                allowed = (
                    target is not None
                    and own in self.node.config.auth.proxy_auth
                    and target.domain == host
                    and not target.resource
                    and await self.node.accounts[host].exists(target.user)
                )
                if not allowed:
                    self._log_failed(own, "invalid-authzid")
                    self.stream.sasl_failure("invalid-authzid", "you may not act as another user")
                    return
                username = target.user  # type: ignore[union-attr]
        if not await self.node.throttle.admit(self.ip, own, self.conn):
            self._refuse_banned()
            return
        # Last, with no wait between this read and the success: a ban written
        # after it finds the stream authenticated, and `xmppctl ban` ends it.
        accounts = self.node.accounts[host]
        for name in dict.fromkeys((own.rsplit("@", 1)[0], username)):
            try:
                ban = await accounts.ban_of(name)
            except StorageError as exc:
                log.error("authentication for %s failed on the server side: %s", self.ip, exc)
                self.stream.sasl_failure("temporary-auth-failure", "try again later")
                return
            if ban is not None:
                self._refuse_disabled(f"{name}@{host}", ban)
                return
        if self.stream.closed:
            return  # it timed out (and was logged) while the checks above ran: no login
        self.stream.authcid = own.rsplit("@", 1)[0]  # whose ban or password change ends it
        self.stream.sasl_success(username, additional)
        jid = f"{username}@{host}"
        log.info(
            "login: %s from %s with %s%s conn=%s",
            jid,
            self.ip,
            self._mechanism,
            f" (authenticated as {own})" if jid != own else "",
            self.conn,
            extra={
                "event": "login",
                "jid": jid,
                "address": self.ip,
                "mechanism": self._mechanism,
                "conn": self.conn,
            },
        )

    async def _auth_failed(
        self, username: str | None, condition: str, text: str | None = None
    ) -> None:
        """Answer a failed attempt, after a wait that grows with its address's failures.

        Only <not-authorized/> waits: counted against the address and account
        when the user name is known (see `_answer_wrong`), the base delay
        uncounted when it is not yet. Other conditions (a malformed message)
        are answered at once and not counted, since they cost no password check.
        """
        account = f"{username}@{self.stream.host or ''}" if username is not None else None
        if condition == "not-authorized" and account is not None:
            delay = await self.node.throttle.failed(self.ip, account, self.conn)
            await self._answer_wrong(account, delay, text)
            return
        self._log_failed(account, condition)
        if condition == "not-authorized":
            await asyncio.sleep(self.node.throttle.failure_delay)
        self.stream.sasl_failure(condition, text)

    async def _answer_wrong(
        self, account: str, delay: float | None, text: str | None = None
    ) -> None:
        """Answer wrong credentials that `AuthThrottle.failed` counted: <not-authorized/>
        after `delay`, or, when the address was banned before they were counted (None;
        the refusal is logged), as every attempt from a banned address is answered, at
        once: a right password refused then gets the same answer at the same time."""
        if delay is None:
            self._refuse_banned()
            return
        self._log_failed(account, "not-authorized")
        await asyncio.sleep(delay)
        self.stream.sasl_failure("not-authorized", text)

    def _log_failed(self, account: str | None, condition: str) -> None:
        """One INFO line per failed login: the account as given (never the password),
        the address, the mechanism and the SASL condition."""
        log.info(
            "failed login: %s from %s with %s: %s conn=%s",
            repr(account) if account is not None else "(no user name)",
            self.ip,
            self._mechanism or "(no mechanism)",
            condition,
            self.conn,
            extra={
                "event": "login-failed",
                "account": account,
                "address": self.ip,
                "mechanism": self._mechanism,
                "reason": condition,
                "conn": self.conn,
            },
        )

    def _refuse_banned(self) -> None:
        """Refuse an attempt from a banned address, without checking its credentials.

        `<temporary-auth-failure/>` (RFC 6120 6.5.12: retry later) says what
        is true: the refusal ends by itself. `<not-authorized/>` (6.5.10)
        would tell the client the credentials are wrong, and clients then
        ask their user for another password that cannot help either; a
        `<policy-violation/>` stream error would end the stream, which the
        per-stream retry limit already does after a few attempts. The text
        says why, for the user who reads the client's error.
        """
        self.stream.sasl_failure(
            "temporary-auth-failure", "too many failed logins from your address; try again later"
        )

    def _refuse_missing_hash(
        self, username: str, mechanism: str, credentials: dict[str, ScramKeys]
    ) -> None:
        """The account exists but has no keys for this mechanism's hash: an account
        imported from ejabberd or Prosody (XEP-0227) has SHA-1 keys only until a PLAIN
        login gives it the others.

        Mechanisms are offered before the user name is known (RFC 6120 6.4.1), so
        the offer cannot leave this one out. <invalid-mechanism/> (6.5.6) says what is
        true, at once and without counting a failed login: the client should try
        another mechanism, and its user is not told the password is wrong (which
        <not-authorized/> would say). See docs/operations.md for what this reveals.
        """
        usable = [
            m for m in self.stream.offered if m == "PLAIN" or scram_hash_of(m) in credentials
        ]
        self._log_failed(f"{username}@{self.stream.host or ''}", "invalid-mechanism")
        self.stream.sasl_failure(
            "invalid-mechanism",
            f"this account has no {mechanism} credentials yet; it can use {', '.join(usable)}",
        )
    def _refuse_disabled(self, account: str, ban: Ban) -> None:
        """RFC 6120 6.5.1 <account-disabled/>: the credentials were right, the account is
        banned (`xmppctl ban`). Only who knows the password learns it; the text gives
        the operator's reason."""
        log.info(
            "refused the login of %s from %s: the account is banned conn=%s",
            account, self.ip, self.conn,
            extra={
                "event": "login-refused",
                "account": account,
                "address": self.ip,
                "reason": "account-banned",
                "conn": self.conn,
            },
        )
        shown = ban.reason if xml_can_carry(ban.reason) else ""  # stored before it was checked
        text = "this account is disabled" + (f": {shown}" if shown else "")
        self.stream.sasl_failure("account-disabled", text)

    def bind(self, event: c2s.BindRequested, transport: Transport) -> ClientSession | None:
        """Bind the requested resource (or one the server makes) on `transport`.

        A resource that makes no valid JID is refused with <bad-request/> on
        the stream; a session already on that resource is replaced (Router.bind).
        """
        host = self.stream.host or ""
        bare = f"{self.stream.username}@{host}"
        try:
            full = JID(f"{bare}/{event.resource or secrets.token_hex(6)}").full
        except InvalidJID:
            self.stream.send(error_from(event.iq, StanzaError("bad-request", "malformed resource")))
            return None
        session = ClientSession(full, transport, self.node.router)
        session.address = self.ip
        self.node.router.bind(session)
        # Done: their Tasks and coroutines would stay with every session.
        self._auth_task = self._check = None
        self.stream.bound(event.iq, full)
        return session


def _account_name(authcid: str) -> str:
    """The stored account name for a SASL authcid ("Alice" logs in as "alice").

    A name that is no valid localpart is kept as given: it cannot match an
    account, and it still counts against the failure limit."""
    try:
        return normalize_username(authcid)
    except InvalidUsername:
        return authcid
