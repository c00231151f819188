"""Ad-hoc commands (XEP-0050): the server's commands, run by clients through forms.

Other modules register commands (`AdHoc.add_command`), each with who may run
it; this module lists them to those who may (disco#items on the node
"http://jabber.org/protocol/commands"), runs them and keeps the state of a
multi-stage command between its stages. A command is a coroutine called once
per stage with what the client sent (its form, in a `Step`) and the state it
kept; it answers with a `Stage`: a form or result, notes, and the actions
allowed next (none: the command is complete).

Command sessions live in the memory of the node the client is connected to
(the client's IQs all go through it), belong to the full JID that started
them, and end when the command completes or is canceled, after
`session_timeout` seconds without a stage, or when that client's session
ends. A session that ended is answered <not-allowed/><session-expired/>; one
this node never started <bad-request/><bad-sessionid/> (XEP-0050 section 4.6).
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from lxml import etree
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from xmppd.config import Seconds
from xmppd.jid import JID
from xmppd.modulehost import IqRequest, Module
from xmppd.modules._dataforms import DATA
from xmppd.modules.disco import Disco, NodeInfo, NodeItem
from xmppd.session import ClientSession
from xmppd.stream.errors import StanzaError

COMMANDS = "http://jabber.org/protocol/commands"
_COMMAND = f"{{{COMMANDS}}}command"
ACTIONS = frozenset({"execute", "next", "prev", "complete", "cancel"})
_STAGE_ACTIONS = ("prev", "next", "complete")  # the order of <actions/> children
_ENDED_KEPT = 4096  # ended session ids remembered, to answer session-expired


def command_error(condition: str, specific: str, text: str) -> StanzaError:
    """A stanza error with XEP-0050's specific condition (bad-sessionid, ...)."""
    return StanzaError(
        condition, text, app=etree.Element(f"{{{COMMANDS}}}{specific}", nsmap={None: COMMANDS})
    )


@dataclass(slots=True)
class Step:
    """One stage of a command as the client asked for it."""

    sender: JID
    host: str  # the virtual host the command was sent to
    action: str  # "execute" at the first stage; then "next", "prev" or "complete"
    command: etree._Element  # the client's <command/>: a submitted form is a child
    state: dict[str, Any]  # the command's own, kept from stage to stage
    # Run after the answer is sent (e.g. end the asker's own session).
    after_reply: list[Callable[[], None]]


@dataclass(slots=True)
class Stage:
    """A command's answer to one stage."""

    payload: etree._Element | None = None  # a data form (type form or result)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (info|warn|error, text)
    actions: tuple[str, ...] = ()  # "prev", "next", "complete" allowed next; () completes
    default: str | None = None  # what "execute" means at the next stage


@dataclass(frozen=True, slots=True)
class Command:
    node: str
    name: str
    allowed: Callable[[JID, str], bool]  # may this sender run it on this host?
    run: Callable[[Step], Awaitable[Stage]]


@dataclass(slots=True)
class _Session:
    node: str
    state: dict[str, Any]
    actions: tuple[str, ...]
    default: str | None
    expires: float
    busy: bool = False


class AdHocOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_timeout: Seconds = Field(default=600.0, gt=0)  # seconds between two stages
    max_sessions: StrictInt = Field(default=10, ge=1)  # open command sessions per client


class AdHoc(Module):
    name = "adhoc"
    Options = AdHocOptions
    requires = ("disco",)

    @property
    def opts(self) -> AdHocOptions:
        return self.options  # type: ignore[return-value]  # a reload may replace it

    def setup(self) -> None:
        self.commands: dict[str, Command] = {}
        # requester full JID -> session id -> session, oldest first
        self._sessions: dict[str, OrderedDict[str, _Session]] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self.clock: Callable[[], float] = time.monotonic  # tests move time on
        self.host.add_feature(COMMANDS)
        self.host.iq(COMMANDS, "set", self._execute)
        self.host.module(Disco).serve_nodes(self._node_info, self._node_items)
        self.host.hook("session/closed", self._session_closed)

    async def start(self) -> None:
        self.host.every(min(60.0, self.opts.session_timeout), self._expire)

    def add_command(self, command: Command) -> None:
        """Offer `command` on every virtual host (to the senders it allows)."""
        if command.node in self.commands:
            raise ValueError(f"two commands on the node {command.node}")
        self.commands[command.node] = command

    # --- discovery -----------------------------------------------------------------

    def _node_info(self, request: IqRequest, node: str) -> NodeInfo | None:
        if node == COMMANDS:
            return NodeInfo([("automation", "command-list", "Commands")])
        command = self.commands.get(node)
        if command is None:
            return None
        if not command.allowed(request.sender, request.host):
            raise StanzaError("forbidden", "you may not run this command")
        return NodeInfo([("automation", "command-node", command.name)], [COMMANDS, DATA])

    def _node_items(self, request: IqRequest, node: str) -> list[NodeItem] | None:
        if node != COMMANDS:
            return None
        return [
            NodeItem(request.host, c.node, c.name)
            for c in self.commands.values()
            if c.allowed(request.sender, request.host)
        ]

    # --- execution -----------------------------------------------------------------

    async def _execute(self, request: IqRequest) -> etree._Element:
        payload = request.payload
        node = payload.get("node")
        if payload.tag != _COMMAND or not node:
            raise StanzaError("bad-request", "expected <command/> with a 'node'")
        action = payload.get("action") or "execute"
        if action not in ACTIONS:
            raise command_error("bad-request", "malformed-action", f"no action {action!r}")
        command = self.commands.get(node)
        if command is None:
            raise StanzaError("item-not-found", "no such command")
        if not command.allowed(request.sender, request.host):
            raise StanzaError("forbidden", "you may not run this command")
        requester = str(request.sender)
        sessionid = payload.get("sessionid")
        if sessionid is None:
            if action == "cancel":
                raise command_error("bad-request", "bad-sessionid", "nothing to cancel")
            if action == "prev":
                raise command_error("bad-request", "bad-action", "no previous stage")
            # A first stage may come with its form already filled in (and "complete").
            sessionid = secrets.token_urlsafe(12)
            session = _Session(node, {}, (), None, 0.0)
            action = "execute"
        else:
            session = self._session(requester, sessionid, node)
            if action == "cancel":
                self._end(requester, sessionid)
                return _answer(node, sessionid, "canceled", Stage())
            if action == "execute":
                action = session.default or (
                    "complete" if "complete" in session.actions else session.actions[0]
                )
            if action not in session.actions:
                raise command_error("bad-request", "bad-action", f"{action!r} is not allowed now")
        step = Step(
            request.sender, request.host, action, payload, session.state, request.after_reply
        )
        session.busy = True
        try:
            stage = await command.run(step)
        finally:
            session.busy = False
        if stage.actions:
            session.actions, session.default = stage.actions, stage.default
            self._keep(requester, sessionid, session)
            return _answer(node, sessionid, "executing", stage)
        self._end(requester, sessionid)
        return _answer(node, sessionid, "completed", stage)

    def _session(self, requester: str, sessionid: str, node: str) -> _Session:
        """The requester's open session `sessionid` for `node`, or the XEP's error."""
        sessions = self._sessions.get(requester)
        session = sessions.get(sessionid) if sessions is not None else None
        if session is not None and session.expires <= self.clock():
            self._end(requester, sessionid)
            session = None
        if session is None:
            if sessionid in self._ended:
                raise command_error(
                    "not-allowed", "session-expired", "this command session has ended"
                )
            raise command_error("bad-request", "bad-sessionid", "no such command session")
        if session.node != node:
            raise command_error("bad-request", "bad-sessionid", "the session is another command's")
        if session.busy:
            raise StanzaError("unexpected-request", "the previous stage is still running", "wait")
        return session

    def _keep(self, requester: str, sessionid: str, session: _Session) -> None:
        session.expires = self.clock() + self.opts.session_timeout
        sessions = self._sessions.setdefault(requester, OrderedDict())
        sessions[sessionid] = session
        sessions.move_to_end(sessionid)
        while len(sessions) > self.opts.max_sessions:  # the oldest one ends
            self._end(requester, next(iter(sessions)))

    def _end(self, requester: str, sessionid: str) -> None:
        sessions = self._sessions.get(requester)
        if sessions is not None:
            sessions.pop(sessionid, None)
            if not sessions:
                del self._sessions[requester]
        self._ended[sessionid] = None
        while len(self._ended) > _ENDED_KEPT:
            self._ended.popitem(last=False)

    def _expire(self) -> None:
        now = self.clock()
        for requester, sessions in list(self._sessions.items()):
            for sessionid, session in list(sessions.items()):
                if session.expires <= now and not session.busy:
                    self._end(requester, sessionid)

    async def _session_closed(self, session: ClientSession) -> None:
        for sessionid in list(self._sessions.get(session.jid) or ()):
            self._end(session.jid, sessionid)


def _answer(node: str, sessionid: str, status: str, stage: Stage) -> etree._Element:
    command = etree.Element(_COMMAND, nsmap={None: COMMANDS})
    command.set("node", node)
    command.set("sessionid", sessionid)
    command.set("status", status)
    if stage.actions:
        actions = etree.SubElement(command, f"{{{COMMANDS}}}actions")
        if stage.default is not None:
            actions.set("execute", stage.default)
        for name in _STAGE_ACTIONS:
            if name in stage.actions:
                etree.SubElement(actions, f"{{{COMMANDS}}}{name}")
    for type_, text in stage.notes:
        note = etree.SubElement(command, f"{{{COMMANDS}}}note")
        note.set("type", type_)
        note.text = text
    if stage.payload is not None:
        command.append(stage.payload)
    return command


MODULE = AdHoc
