"""Service administration from a client (XEP-0133), as ad-hoc commands (XEP-0050).

The accounts listed in the config's `admins` run these on their own host
(the domain of their JID): add a user, delete users, end users' sessions,
change a user's password, get the online users or their number, and send an
announcement to everyone online. Gajim and Psi show them in their admin
menus. Everyone else sees none of them in disco and is refused <forbidden/>.

Each goes the way the rest of xmppd does the same thing: accounts through
the host's `Accounts` (passwords become SCRAM keys, never stored or
logged), a deletion through `ModuleHost.remove_account` (what `xmppctl
unregister` and in-band removal run: every module's data goes), and ending
sessions through `ModuleHost.end_account_sessions`, which reaches every node
of a cluster.

The number of registered users is not offered: counting them reads the
whole account store, which on DynamoDB is a scan that grows with the users.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from functools import partial

from lxml import etree

from xmppd.auth.accounts import (
    AccountExists,
    AccountNotFound,
    InvalidPassword,
    InvalidUsername,
    normalize_username,
)
from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import AccountDataRemains, ClusterUnreachable, Module
from xmppd.modules._dataforms import Field, Submitted, form
from xmppd.modules.adhoc import AdHoc, Command, Stage, Step, command_error
from xmppd.storage.base import ConditionFailed, StorageError
from xmppd.stream.errors import StanzaError, StreamError

log = logging.getLogger(__name__)

ADMIN = "http://jabber.org/protocol/admin"
MAX_ITEMS = ("25", "50", "75", "100", "150", "200", "none")

PASSWORD_CHANGED = StreamError("not-authorized", "the password of this account was changed")
REMOVED = StreamError("not-authorized", "the account was removed")
ENDED = StreamError("policy-violation", "ended by an administrator")

_ACCOUNT = Field("accountjid", "jid-single", "The Jabber ID of the account", required=True)
_ACCOUNTS = Field("accountjids", "jid-multi", "The Jabber IDs", required=True)
_SUBMIT = ("complete",)


def _blank(title: str, *fields: Field) -> Stage:
    """The first stage of a command: its empty form, to be completed."""
    return Stage(form("form", ADMIN, fields, title=title), actions=_SUBMIT, default="complete")


class AdminCommands(Module):
    name = "admin_commands"
    requires = ("adhoc",)

    def setup(self) -> None:
        adhoc = self.host.module(AdHoc)
        commands: list[tuple[str, str, Callable[[Step], Awaitable[Stage]]]] = [
            ("add-user", "Add a user", self._add_user),
            ("delete-user", "Delete users", self._delete_user),
            ("end-user-session", "End user sessions", self._end_user_session),
            ("change-user-password", "Change a user's password", self._change_password),
            ("get-online-users-num", "Get the number of online users", self._online_count),
            ("get-online-users-list", "Get the list of online users", self._online_list),
            ("announce", "Send an announcement to online users", self._announce),
        ]
        for node, label, run in commands:
            adhoc.add_command(Command(f"{ADMIN}#{node}", label, self.is_admin, run))

    def is_admin(self, sender: JID, host: str) -> bool:
        """An admin of `host`: listed in `admins` with a JID of that host. Read from the
        host's config at each check, so a reload that replaces the config applies."""
        config = self.host.config
        return config is not None and sender.domain == host and sender.bare in config.admins

    # --- accounts ------------------------------------------------------------------

    async def _add_user(self, step: Step) -> Stage:
        submitted = Submitted.find(step.command, ADMIN)
        if submitted is None:
            verify = Field("password-verify", "text-private", "Retype the password")
            return _blank("Adding a user", _ACCOUNT, _password_field(), verify)
        jid = self._account(step, submitted.one("accountjid"))
        password = submitted.one("password", strip=False)
        if password != submitted.one("password-verify", strip=False):
            raise command_error("bad-request", "bad-payload", "the two passwords differ")
        try:
            await self.host.accounts[step.host].register(jid.user or "", password)
        except AccountExists:
            raise StanzaError("conflict", f"{jid.bare} exists already") from None
        except (InvalidPassword, InvalidUsername) as exc:
            raise command_error("bad-request", "bad-payload", str(exc)) from None
        except (StorageError, ConditionFailed) as exc:
            raise _storage_error(exc) from None
        self.log.info("admin %s added the account %s", step.sender.bare, jid.bare)
        return Stage(notes=[("info", f"{jid.bare} was added")])

    async def _delete_user(self, step: Step) -> Stage:
        submitted = Submitted.find(step.command, ADMIN)
        if submitted is None:
            return _blank("Deleting users", _ACCOUNTS)
        jids = self._accounts(step, submitted.many("accountjids"), full=False)
        if any(jid.bare == step.sender.bare for jid in jids):
            raise StanzaError("not-allowed", "remove your own account in-band (XEP-0077)")
        notes: list[tuple[str, str]] = []
        for jid in jids:
            notes.append(await self._remove(step, jid))
        return Stage(notes=notes)

    async def _remove(self, step: Step, jid: JID) -> tuple[str, str]:
        vhost, user = step.host, jid.user or ""

        async def end_sessions() -> None:
            # Right after the account goes, before its data: as every removal does.
            await self.host.end_account_sessions(vhost, user, REMOVED)

        try:
            removed = await self.host.remove_account(vhost, user, end_sessions)
        except AccountDataRemains as exc:
            self.log.error("%s; `xmppctl unregister %s` deletes the rest", exc, jid.bare)
            return "error", f"{jid.bare} was deleted, but not all of its data: {exc}"
        except ClusterUnreachable as exc:  # logged; nothing deleted
            return "error", f"{exc}: try again once the cluster's Redis answers"
        except StorageError as exc:
            raise _storage_error(exc) from None
        if removed == "nothing":
            return "warn", f"{jid.bare} does not exist"
        self.log.info("admin %s deleted the account %s (%s)", step.sender.bare, jid.bare, removed)
        return "info", f"{jid.bare} was deleted"

    async def _end_user_session(self, step: Step) -> Stage:
        submitted = Submitted.find(step.command, ADMIN)
        if submitted is None:
            return _blank("Ending user sessions", _ACCOUNTS)
        # Older clients send the single field of XEP-0133 before version 1.1.
        given = submitted.many("accountjids") or submitted.many("accountjid")
        notes = []
        for jid in self._accounts(step, given, full=True):
            if jid.resource:
                session = self.host.session(jid.bare, jid.resource)
                count = 0 if session is None else 1
                if session is not None:
                    # One resource, wherever it is bound (the directory reaches its node).
                    end = partial(session.terminate, ENDED)
                    if jid.full == str(step.sender):
                        step.after_reply.append(end)  # the asker's own: after the answer
                    else:
                        end()
            else:
                count = len(self.host.sessions(jid.bare))
                await self._end_account(step, jid, ENDED)
            notes.append(("info", f"{jid.full}: {count} session(s) ended"))
        self.log.info("admin %s ended the sessions of %s", step.sender.bare, ", ".join(given))
        return Stage(notes=notes)

    async def _change_password(self, step: Step) -> Stage:
        submitted = Submitted.find(step.command, ADMIN)
        if submitted is None:
            return _blank("Changing a user's password", _ACCOUNT, _password_field())
        jid = self._account(step, submitted.one("accountjid"))
        password = submitted.one("password", strip=False)
        try:
            await self.host.accounts[step.host].set_password(jid.user or "", password)
        except AccountNotFound:
            raise StanzaError("item-not-found", f"{jid.bare} does not exist") from None
        except InvalidPassword as exc:
            raise command_error("bad-request", "bad-payload", str(exc)) from None
        except (StorageError, ConditionFailed) as exc:
            raise _storage_error(exc) from None
        # As a password change in-band or by xmppctl: the sessions the old one opened end.
        await self._end_account(step, jid, PASSWORD_CHANGED)
        self.log.info("admin %s changed the password of %s", step.sender.bare, jid.bare)
        return Stage(notes=[("info", f"the password of {jid.bare} was changed")])

    # --- who is online, and telling them -----------------------------------------------

    def _online(self, host: str) -> list[str]:
        return sorted(b for b in self.host.online_accounts() if b.rpartition("@")[2] == host)

    async def _online_count(self, step: Step) -> Stage:
        count = Field(
            "onlineusersnum",
            label="The number of online users",
            values=(str(len(self._online(step.host))),),
        )
        return Stage(form("result", ADMIN, [count]))

    async def _online_list(self, step: Step) -> Stage:
        submitted = Submitted.find(step.command, ADMIN)
        if submitted is None:
            options = tuple((value.capitalize(), value) for value in MAX_ITEMS)
            limit = Field(
                "max_items",
                "list-single",
                "Maximum number of items to show",
                values=("100",),
                options=options,
            )
            return _blank("Listing online users", limit)
        chosen = submitted.one("max_items") or "none"
        # isdigit() alone takes "²" and other scripts' digits, which int() refuses.
        if chosen != "none" and not (chosen.isascii() and chosen.isdigit() and len(chosen) < 10):
            raise command_error(
                "bad-request", "bad-payload", "max_items is none or a number (at most 9 digits)"
            )
        online = self._online(step.host)
        if chosen != "none":
            online = online[: int(chosen)]
        jids = Field("onlineuserjids", "jid-multi", "The online users", values=tuple(online))
        return Stage(form("result", ADMIN, [jids]))

    async def _announce(self, step: Step) -> Stage:
        submitted = Submitted.find(step.command, ADMIN)
        if submitted is None:
            subject = Field("subject", label="Subject")
            body = Field("announcement", "text-multi", "Announcement", required=True)
            return _blank("Sending an announcement", subject, body)
        text = submitted.text("announcement")
        if not text:
            raise command_error("bad-request", "bad-payload", "the announcement is empty")
        subject = submitted.one("subject")
        sent = 0
        for bare in self._online(step.host):
            for session in self.host.sessions(bare):
                self.host.ledger.from_service += 1
                self.host.route(_headline(step.host, session.jid, subject, text))
                sent += 1
        self.log.info("admin %s sent an announcement to %d session(s)", step.sender.bare, sent)
        return Stage(notes=[("info", f"the announcement went to {sent} session(s)")])

    # --- helpers -------------------------------------------------------------------

    def _account(self, step: Step, given: str) -> JID:
        (jid,) = self._accounts(step, [given], full=False)
        return jid

    def _accounts(self, step: Step, given: Iterable[str], *, full: bool) -> list[JID]:
        """The JIDs named, each an account of the host the command runs on (with a
        resource only when `full`); bad-payload naming the first that is not."""
        jids = []
        for text in given:
            try:
                jid = JID(text)
                normalize_username(jid.user or "")
            except (InvalidJID, InvalidUsername):
                raise command_error(
                    "bad-request", "bad-payload", f"{text!r} is not an account"
                ) from None
            if jid.domain != step.host or (jid.resource and not full):
                raise command_error(
                    "bad-request", "bad-payload", f"{text} is not an account of {step.host}"
                )
            jids.append(jid)
        if not jids:
            raise command_error("bad-request", "bad-payload", "name at least one account")
        return jids

    async def _end_account(self, step: Step, jid: JID, error: StreamError) -> None:
        """End the account's streams on every node; the asker's own account only after
        the answer is sent, or the asker would never get it."""
        vhost, user = step.host, jid.user or ""
        if jid.bare != step.sender.bare:
            await self.host.end_account_sessions(vhost, user, error)
            return

        def later() -> None:
            self.host.spawn(self.host.end_account_sessions(vhost, user, error))

        step.after_reply.append(later)


def _password_field() -> Field:
    return Field("password", "text-private", "The password", required=True)


def _headline(host: str, to: str, subject: str, text: str) -> etree._Element:
    """The announcement as a headline message from the host (as Prosody sends it)."""
    message = etree.Element("{jabber:client}message", nsmap={None: "jabber:client"})
    message.set("type", "headline")
    message.set("from", host)
    message.set("to", to)
    if subject:
        etree.SubElement(message, "{jabber:client}subject").text = subject
    etree.SubElement(message, "{jabber:client}body").text = text
    return message


def _storage_error(exc: Exception) -> StanzaError:
    log.error("account storage failed: %s", exc)
    return StanzaError("internal-server-error", "storage is unavailable, try again later", "wait")


MODULE = AdminCommands
