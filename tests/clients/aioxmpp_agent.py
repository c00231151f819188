"""An aioxmpp client driven line by line, for the real-client tests.

Runs in the aioxmpp virtualenv (.venv-aioxmpp, requirements/aioxmpp.txt), never in
the test virtualenv: aioxmpp 0.13.3 needs lxml<5 and xmppd locks lxml 6. So it
imports nothing from xmppd or tests. tests/integration/aioxmpp_client.py starts it
and speaks its protocol:

- stdin, one JSON object a line: a request `{"id": N, "op": NAME, ...arguments}`.
- stdout, one JSON object a line: `{"id": N, "ok": RESULT}` or `{"id": N, "error": TEXT}`
  for each request, in any order; `{"event": KIND, ...}` for what the server pushed
  (pubsub and PEP notifications, room messages, subjects, joins and leaves); first of
  all `{"event": "online", "jid": FULL_JID}` once the stream is up, or one line
  `{"event": "failed", "error": TEXT}` and exit status 1.

The server's certificate is checked for real (PKIX, the host name included) against
`--cafile`, the test server's self-signed certificate: a wrong certificate fails.
Payloads are one element `<note xmlns="urn:xmppd:test:note">TEXT</note>`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import aioxmpp
import aioxmpp.avatar
import aioxmpp.bookmarks
import aioxmpp.forms
import aioxmpp.muc
import aioxmpp.muc.xso
import aioxmpp.pep
import aioxmpp.pubsub
import aioxmpp.pubsub.xso
import aioxmpp.security_layer
import aioxmpp.xso
from aioxmpp.connector import STARTTLSConnector, XMPPOverTLSConnector

NOTE = "urn:xmppd:test:note"


@aioxmpp.pubsub.xso.as_payload_class
class Note(aioxmpp.xso.XSO):
    """The test payload: a namespaced element with text, as a PEP node's payload is."""

    TAG = (NOTE, "note")
    text = aioxmpp.xso.Text(default="")

    def __init__(self, text: str = "") -> None:
        super().__init__()
        self.text = text


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def describe(exc: BaseException) -> str:
    """The exception and the one it happened while handling: a failed TLS handshake
    surfaces in aioopenssl 0.6 as InvalidStateError, the real error in its context."""
    text = f"{type(exc).__name__}: {exc}"
    if exc.__context__ is not None:
        text += f" (while handling {type(exc.__context__).__name__}: {exc.__context__})"
    return text


def text_of(payload: Any) -> str | None:
    return payload.text if isinstance(payload, Note) else None


def trusting(cafile: str) -> Any:
    """aioxmpp's default pyOpenSSL context, trusting only the test certificate."""
    ctx = aioxmpp.security_layer.default_ssl_context()
    ctx.load_verify_locations(cafile)
    return ctx


class Agent:
    """One logged-in aioxmpp client and the requests it serves."""

    def __init__(
        self, client: aioxmpp.PresenceManagedClient, notify: list[str], avatars: bool
    ) -> None:
        self.client = client
        self.pubsub = client.summon(aioxmpp.PubSubClient)
        self.bookmarks = client.summon(aioxmpp.bookmarks.BookmarkClient)
        if avatars:  # its PEP claim (metadata +notify) changes the caps: only when asked
            self.avatar = client.summon(aioxmpp.avatar.AvatarService)
            self.avatar.synchronize_vcard = False
            self.avatar.on_metadata_changed.connect(self._avatar)
        self.pep = client.summon(aioxmpp.pep.PEPClient)
        self.muc = client.summon(aioxmpp.MUCClient)
        self.rooms: dict[str, aioxmpp.muc.Room] = {}
        # Claimed before the stream starts, so that the first presence carries the
        # caps hash with `NODE+notify` (XEP-0163 filtered notifications).
        self.claims = [self.pep.claim_pep_node(node, notify=True) for node in notify]
        for claim in self.claims:
            claim.on_item_publish.connect(functools.partial(self._pep_item, claim.node_namespace))
        self.pubsub.on_item_published.connect(self._pubsub_item)
        self.pubsub.on_item_retracted.connect(self._pubsub_retract)

    def _pep_item(self, node: str, jid: aioxmpp.JID, pep_node: str, item: Any, **_: Any) -> None:
        emit(
            {
                "event": "pep",
                "from": str(jid),
                "node": node,
                "item": item.id_,
                "text": text_of(item.registered_payload),
            }
        )

    def _pubsub_item(self, jid: aioxmpp.JID, node: str, item: Any, **_: Any) -> None:
        emit(
            {
                "event": "pubsub_item",
                "from": str(jid),
                "node": node,
                "item": item.id_,
                "text": text_of(item.registered_payload),
            }
        )

    def _pubsub_retract(self, jid: aioxmpp.JID, node: str, id_: str, **_: Any) -> None:
        emit({"event": "pubsub_retract", "from": str(jid), "node": node, "item": id_})

    def _avatar(self, jid: aioxmpp.JID, metadata: Any) -> None:
        emit(
            {
                "event": "avatar",
                "from": str(jid),
                "ids": [descriptor.normalized_id for descriptor in metadata],
            }
        )

    # --- PEP and pubsub

    async def op_pep_publish(self, node: str, text: str, item: str | None = None) -> str:
        return await self.pep.publish(node, Note(text), id_=item)

    async def op_pubsub_create(self, service: str, node: str) -> str:
        return await self.pubsub.create(aioxmpp.JID.fromstr(service), node)

    async def op_pubsub_publish(
        self, service: str, node: str, text: str, item: str | None = None
    ) -> str:
        jid = aioxmpp.JID.fromstr(service)
        return await self.pubsub.publish(jid, node, Note(text), id_=item)

    async def op_pubsub_retract(self, service: str, node: str, item: str) -> None:
        await self.pubsub.retract(aioxmpp.JID.fromstr(service), node, item, notify=True)

    async def op_pubsub_items(
        self, service: str, node: str, max_items: int | None = None, ids: list[str] | None = None
    ) -> list[list[Any]]:
        jid = aioxmpp.JID.fromstr(service)
        if ids is not None:
            reply = await self.pubsub.get_items_by_id(jid, node, ids)
        else:
            reply = await self.pubsub.get_items(jid, node, max_items=max_items)
        return [[item.id_, text_of(item.registered_payload)] for item in reply.payload.items]

    async def op_pubsub_subscribe(self, service: str, node: str) -> str:
        reply = await self.pubsub.subscribe(aioxmpp.JID.fromstr(service), node)
        return str(reply.payload.subscription)

    async def op_pubsub_unsubscribe(self, service: str, node: str) -> None:
        await self.pubsub.unsubscribe(aioxmpp.JID.fromstr(service), node)

    async def op_pubsub_nodes(self, service: str) -> list[str]:
        return [node for node, _name in await self.pubsub.get_nodes(aioxmpp.JID.fromstr(service))]

    async def op_avatar_publish(self, png_base64: str) -> str:
        """XEP-0084 through aioxmpp's AvatarService: data, then metadata; the id."""
        avatar = aioxmpp.avatar.AvatarSet()
        avatar.add_avatar_image("image/png", image_bytes=base64.b64decode(png_base64))
        await self.avatar.publish_avatar_set(avatar)
        return str(avatar.png_id)

    # --- bookmarks (aioxmpp 0.13: XEP-0048 in XEP-0049 private storage)

    async def op_bookmark_add(self, room: str, name: str, nick: str) -> None:
        bookmark = aioxmpp.bookmarks.Conference(name, aioxmpp.JID.fromstr(room), nick=nick)
        await self.bookmarks.add_bookmark(bookmark)

    async def op_bookmarks(self) -> list[list[Any]]:
        return sorted(
            [str(mark.jid), mark.name, mark.nick]
            for mark in await self.bookmarks.get_bookmarks()
            if isinstance(mark, aioxmpp.bookmarks.Conference)
        )

    # --- MUC

    async def op_muc_join(self, room: str, nick: str) -> dict[str, Any]:
        """Join (creating an instant room if new) and report who is there."""
        jid = aioxmpp.JID.fromstr(room)
        conversation, joined = self.muc.join(jid, nick, autorejoin=False)
        self.rooms[room] = conversation
        created: list[bool] = []
        conversation.on_muc_enter.connect(
            lambda _presence, _occupant, *, muc_status_codes=frozenset(), **__: created.append(
                201 in {int(code) for code in muc_status_codes}
            )
        )
        conversation.on_message.connect(functools.partial(self._room_message, room))
        conversation.on_topic_changed.connect(functools.partial(self._room_subject, room))
        conversation.on_join.connect(functools.partial(self._room_join, room))
        conversation.on_leave.connect(functools.partial(self._room_leave, room))
        await joined
        if created and created[0]:
            await self._instant(jid)
        return {
            "me": conversation.me.nick,
            "created": bool(created and created[0]),
            "occupants": sorted(member.nick for member in conversation.members),
        }

    async def _instant(self, room: aioxmpp.JID) -> None:
        """XEP-0045 10.1.2: accept the default configuration (unlocks the room)."""
        form = aioxmpp.forms.Data(aioxmpp.forms.DataType.SUBMIT)
        await self.muc.set_room_config(room, form)

    def _room_message(
        self, room: str, msg: aioxmpp.Message, member: Any, source: Any, **_: Any
    ) -> None:
        body = msg.body.any() if msg.body else None
        if body is not None:
            emit(
                {
                    "event": "muc_message",
                    "room": room,
                    "nick": member.nick if member else None,
                    "body": body,
                    "source": getattr(source, "name", str(source)),
                }
            )

    def _room_subject(self, room: str, member: Any, new_topic: Any, **_: Any) -> None:
        emit(
            {
                "event": "muc_subject",
                "room": room,
                "nick": member.nick if member else None,
                "subject": new_topic.any() if new_topic else "",
            }
        )

    def _room_join(self, room: str, member: Any, **_: Any) -> None:
        emit({"event": "muc_join", "room": room, "nick": member.nick})

    def _room_leave(self, room: str, member: Any, **_: Any) -> None:
        emit({"event": "muc_leave", "room": room, "nick": member.nick})

    async def op_muc_send(self, room: str, body: str) -> None:
        msg = aioxmpp.Message(type_=aioxmpp.MessageType.GROUPCHAT)
        msg.body[None] = body
        await self.rooms[room].send_message(msg)

    async def op_muc_subject(self, room: str, subject: str) -> None:
        await self.rooms[room].set_topic({None: subject})

    async def op_muc_leave(self, room: str) -> None:
        await self.rooms.pop(room).leave()


async def serve(agent: Agent) -> None:
    """Answer requests from stdin until it closes or a `quit` arrives."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        request = json.loads(line)
        if request["op"] == "quit":
            break
        task = asyncio.ensure_future(answer(agent, request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def answer(agent: Agent, request: dict[str, Any]) -> None:
    number = request.pop("id")
    method: Callable[..., Awaitable[Any]] = getattr(agent, "op_" + request.pop("op"))
    try:
        emit({"id": number, "ok": await method(**request)})
    except Exception as exc:  # noqa: BLE001  (reported to the test, which decides)
        emit({"id": number, "error": describe(exc)})


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jid", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--direct-tls", action="store_true")
    parser.add_argument("--cafile", required=True)
    parser.add_argument("--notify", action="append", default=[], help="PEP node to claim")
    parser.add_argument("--avatars", action="store_true", help="XEP-0084 (AvatarService)")
    args = parser.parse_args()
    security = aioxmpp.make_security_layer(
        args.password, ssl_context_factory=functools.partial(trusting, args.cafile)
    )
    connector = XMPPOverTLSConnector() if args.direct_tls else STARTTLSConnector()
    client = aioxmpp.PresenceManagedClient(
        aioxmpp.JID.fromstr(args.jid),
        security,
        override_peer=[("127.0.0.1", args.port, connector)],
    )
    agent = Agent(client, args.notify, args.avatars)
    try:
        async with client.connected():
            emit({"event": "online", "jid": str(client.local_jid)})
            await serve(agent)
    except Exception as exc:  # noqa: BLE001  (the test reads why)
        emit({"event": "failed", "error": describe(exc), "trace": traceback.format_exc()})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
