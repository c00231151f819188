"""Forwarded stanzas that wait in this node's memory behind an account's queued jobs,
kept in Redis too until their turn came, so that a kill does not lose them.

Why: `ItemHandler` (xmppd.cluster.inbox) queues a stanza for an account with
routing jobs queued here (its stored messages handed over at login) behind them
(`Router.behind`), for up to the offline module's `first_wait`. Meanwhile its
inbox entry is trimmed (1 s or 200 entries after it was read) or its link frame
acknowledged (within ACK_DELAY): killed then, the node would take it along, as
neither its reaper (the inbox) nor its sender (the link) holds it any more.

So such a stanza is also added to this node's waiting stream
(`schema.waiting_key`; one XADD through the writer, in order with the rest)
and the entry or frame that brought it is trimmed or acknowledged only once
that write is answered (`Copy.on_safe`) or once its turn came. The node that
reaps this one moves what the stream holds into its own inbox with what the
inbox held (schema.REAP) and routes it again, as any orphan. When the
stanza's turn comes (handed to its session, or routed again) its copy is
deleted (XDEL, once the work routing it again started is done, offline storage
included, and queued behind whatever that routing queued in the writer: a kill in
between routes it twice, never loses it).

Only a stanza that waits costs a write: the usual one (no queue for its
account) costs nothing here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from xmppd.cluster import schema
from xmppd.cluster.channel import Command

Item = dict[bytes, bytes]
"""One item of an entry or a link frame: its fields (xmppd.cluster.inbox)."""

KEPT = (b"to", b"stanza", b"hops")
"""The fields of an item its copy keeps: what routing it again needs. Not the link's
frame ("li", "ls") nor the sender's numbering ("rn"): an orphan is taken as it is."""


class Commands(Protocol):
    """Where the writes go (xmppd.cluster.writer.Writer): in order with the node's
    other writes, `on_result` called with Redis' answer unless it is an error."""

    def command(self, command: Command, on_result: Callable[[Any], None] | None = None) -> None:
        """Queue `command`."""


class Copy:
    """One waiting stanza's copy in Redis. `on_safe`, set by whoever must not let go of
    the stanza before (the inbox's trim, the link's ack), is called once: when the copy
    is written, or when the stanza's turn came first."""

    __slots__ = ("entry", "released", "safe", "on_safe")

    def __init__(self) -> None:
        self.entry: bytes | None = None  # the copy's stream id, once written
        self.released = False
        self.safe = False
        self.on_safe: Callable[[], None] | None = None

    def _now_safe(self) -> None:
        if not self.safe:
            self.safe = True
            if self.on_safe is not None:
                self.on_safe()


class Waiting:
    """This node's waiting stream: `hold` an item that waits, `release` it once its turn
    came."""

    def __init__(self, writer: Commands, node: str) -> None:
        self.writer = writer
        self.key = schema.waiting_key(node)

    def hold(self, item: Item) -> Copy:
        """Write a copy of `item` (a stanza queued behind its account's jobs)."""
        held = Copy()
        fields: list[bytes] = []
        for name in KEPT:
            value = item.get(name)
            if value is not None:
                fields += (name, value)
        self.writer.command(
            ("XADD", self.key, "*", *fields), lambda answer: self._written(held, answer)
        )
        return held

    def release(self, held: Copy) -> None:
        """The stanza was handed to its session or routed again: its copy goes."""
        held.released = True
        if held.entry is not None:
            self.writer.command(("XDEL", self.key, held.entry))
        held._now_safe()

    def _written(self, held: Copy, answer: Any) -> None:
        held.entry = answer if isinstance(answer, bytes) else str(answer).encode()
        if held.released:  # its turn came before the write was answered
            self.writer.command(("XDEL", self.key, held.entry))
        held._now_safe()
