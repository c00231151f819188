"""The admin API's everyday commands: stats, s2s, announce, ban, and an account's data.

Routes of the node's admin HTTP API (xmppd.adminapi, which authenticates every
request with the token) for xmppctl stats, s2s, announce, ban, roster, roster-set,
roster-remove, vcard, vcard-set and offline-count:

  GET    /stats                               counters xmppctl turns into rates
  GET    /s2s                                 the node's server-to-server streams
  POST   /announce {"host", "body", "subject"}  a headline to every session of host
  POST   /accounts/{user@host}/ban {"reason"}  end the banned account's sessions
  GET    /accounts/{user@host}/roster          the roster items
  PUT    /accounts/{user@host}/roster/{contact} {"name", "groups", "subscription"}
  DELETE /accounts/{user@host}/roster/{contact}
  GET    /accounts/{user@host}/vcard           {"vcard": XML or null}
  PUT    /accounts/{user@host}/vcard {"vcard": XML}
  GET    /accounts/{user@host}/offline         {"count": N}

The ban itself is in the account store, which xmppctl writes before it calls
/ban (xmppd.auth.accounts); the node only ends the sessions, on every node of
a cluster (Server.end_account_sessions). The user data routes run
xmppd.userdata on the node's own modules, so pushes reach online clients and
the node's caches see the change. A refused change answers 400 with
{"error": why}, a store failure 503.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Container
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from lxml import etree

from xmppd import userdata
from xmppd.jid import JID, InvalidJID
from xmppd.storage.base import StorageError
from xmppd.stream.errors import StreamError
from xmppd.xml import ns
from xmppd.xml.text import xml_can_carry

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger("xmppd.adminapi")

T = TypeVar("T")


def add_routes(app: web.Application, server: Server) -> None:
    """Add the routes; before adminapi's own, whose POST /accounts/{jid}/{change}
    would otherwise take POST /accounts/{jid}/ban."""
    routes = AdminRoutes(server)
    add = app.router.add_route
    add("GET", "/stats", routes.stats)
    add("GET", "/components", routes.components)
    add("GET", "/s2s", routes.s2s)
    add("POST", "/announce", routes.announce)
    add("POST", "/accounts/{jid}/ban", routes.ban)
    add("GET", "/accounts/{jid}/roster", routes.roster)
    add("PUT", "/accounts/{jid}/roster/{contact}", routes.roster_set)
    add("DELETE", "/accounts/{jid}/roster/{contact}", routes.roster_remove)
    add("GET", "/accounts/{jid}/vcard", routes.vcard)
    add("PUT", "/accounts/{jid}/vcard", routes.vcard_set)
    add("GET", "/accounts/{jid}/offline", routes.offline_count)


class AdminRoutes:
    def __init__(self, server: Server) -> None:
        self.server = server

    async def stats(self, request: web.Request) -> web.Response:
        """Raw counters since start, with the node's clock: xmppctl reads them twice and
        shows the rates in between (the same counts /metrics exposes)."""
        server = self.server
        storage = server.storage_stats
        return web.json_response(
            {
                "pid": os.getpid(),
                "node": server.cluster.node if server.cluster is not None else None,
                "clock": time.monotonic(),
                "connections": len(server.connections),
                "sessions": server.router.directory.count(),
                "stanzas": server.router.routed,
                "messages": server.router.ledger.received,
                "storage": {
                    part: {"calls": ops.count, "seconds": ops.total, "errors": ops.errors}
                    for part, ops in (
                        ("items", storage.items),
                        ("blobs", storage.blobs),
                        ("cache", storage.cache),
                    )
                },
            }
        )

    async def components(self, request: web.Request) -> web.Response:
        """The configured external components: those connected to this node (since,
        address), and those this node knows are connected to another (clustered)."""
        service = self.server.components
        if service is None:
            return web.json_response({"components": []})
        rows: list[dict[str, Any]] = []
        for domain in sorted(service.config.domains):
            conn = service.serving.get(domain)
            row: dict[str, Any] = {"domain": domain, "node": service.elsewhere.get(domain)}
            if conn is not None:
                node = self.server.cluster.node if self.server.cluster is not None else None
                row.update(node=node, here=True, since=conn.since, address=conn.peer)
            rows.append(row)
        return web.json_response({"components": rows})

    async def s2s(self, request: web.Request) -> web.Response:
        """This node's server-to-server streams, both ways (`xmppctl s2s`); `enabled`
        false without an `s2s` section."""
        service = self.server.s2s
        conns = [] if service is None else list(service.connections)
        conns.sort(key=lambda c: (c.remote, not c.outgoing, c.since))
        links = [c.view() for c in conns]
        node = self.server.cluster.node if self.server.cluster is not None else None
        return web.json_response({"node": node, "enabled": service is not None, "s2s": links})

    async def announce(self, request: web.Request) -> web.Response:
        """XEP-0133 4.23 "send announcement to online users": a headline from the host
        to every session of its users, those on other nodes of a cluster included (the
        directory knows them); nothing is stored for users who are offline."""
        body = await _body(request)
        host = str(body.get("host", "")).lower()
        text = str(body.get("body", ""))
        subject = str(body.get("subject") or "")
        if host not in self.server.config.hosts or not text:
            raise _bad(f'expected {{"host": one of {list(self.server.config.hosts)}, "body"}}')
        if not xml_can_carry(text + subject):  # refused before any session gets one
            raise _bad("the body or subject has characters XML cannot carry")
        directory = self.server.router.directory
        targets = [
            session.jid
            for bare in list(directory.accounts())
            if bare.rpartition("@")[2] == host
            for session in directory.resources(bare)
        ]
        for jid in targets:
            message = etree.Element(ns.C_MESSAGE, nsmap={None: ns.CLIENT})
            message.set("type", "headline")
            message.set("from", host)
            message.set("to", jid)
            message.set("id", f"announce-{secrets.token_hex(6)}")
            if subject:
                etree.SubElement(message, f"{{{ns.CLIENT}}}subject").text = subject
            etree.SubElement(message, f"{{{ns.CLIENT}}}body").text = text
            self.server.router.route(message)
        log.info("admin: announcement to %s: sent to %d session(s)", host, len(targets))
        return web.json_response({"sent": len(targets)})

    async def ban(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        reason = str((await _body(request)).get("reason") or "")
        if not xml_can_carry(reason):  # the stream error that ends each session holds it
            raise _bad("the reason has characters XML cannot carry")
        text = "this account was banned" + (f": {reason}" if reason else "")
        ended = await self.server.end_account_sessions(
            jid.domain, jid.user, StreamError("policy-violation", text)
        )
        log.info("admin: %s banned (%s): ended %d session(s)", jid.bare, reason or "-", ended)
        return web.json_response({"ended": ended})

    async def roster(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        items = await self._run(userdata.roster_list(self.server.modules, jid.bare))
        return web.json_response({"items": items})

    async def roster_set(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        body = await _body(request)
        groups = body.get("groups")
        if groups is not None and not (
            isinstance(groups, list) and all(isinstance(g, str) for g in groups)
        ):
            raise _bad('"groups" is a list of strings')
        name, subscription = body.get("name"), body.get("subscription")
        item = await self._run(
            userdata.roster_set(
                self.server.modules,
                jid.bare,
                request.match_info["contact"],
                name=None if name is None else str(name),
                groups=groups,
                subscription=None if subscription is None else str(subscription),
            )
        )
        log.info("admin: roster of %s: set %s", jid.bare, item["jid"])
        return web.json_response({"item": item})

    async def roster_remove(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        contact = request.match_info["contact"]
        await self._run(userdata.roster_remove(self.server.modules, jid.bare, contact))
        log.info("admin: roster of %s: removed %s", jid.bare, contact)
        return web.json_response({"removed": contact})

    async def vcard(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        xml = await self._run(userdata.vcard_get(self.server.modules, jid.bare))
        return web.json_response({"vcard": xml})

    async def vcard_set(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        xml = (await _body(request)).get("vcard")
        if not isinstance(xml, str):
            raise _bad('expected {"vcard": XML}')
        await self._run(userdata.vcard_set(self.server.modules, jid.bare, xml))
        log.info("admin: vCard of %s replaced", jid.bare)
        return web.json_response({"stored": True})

    async def offline_count(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        count = await self._run(userdata.offline_count(self.server.modules, jid.bare))
        return web.json_response({"count": count})

    async def _run(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except userdata.UserDataError as e:
            raise _bad(str(e)) from None
        except StorageError as e:
            log.error("admin: a request for an account's data failed: %s", e)
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": f"storage: {e}"}), content_type="application/json"
            ) from None

    def _account(self, request: web.Request) -> JID:
        return path_account(request, self.server.accounts)


def path_account(request: web.Request, hosts: Container[str]) -> JID:
    """The account named in the path ({jid}), of one of `hosts` (else 404)."""
    try:
        jid: JID | None = JID(request.match_info["jid"])
    except InvalidJID:
        jid = None
    if jid is None or not jid.user or jid.resource or jid.domain not in hosts:
        raise web.HTTPNotFound(
            text=json.dumps({"error": "expected an account of this node as user@host"}),
            content_type="application/json",
        )
    return jid


async def _body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object ({} for an empty body), else 400."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    return body


def _bad(error: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": error}), content_type="application/json")
