"""The node's admin HTTP API: how xmppctl, another process, reaches a running node.

xmppctl changes accounts in the stores directly; a running node must then
end the sessions of an account whose password changed or that was removed,
which only the node itself can do. Each node serves this small API (aiohttp)
on the loopback interface by default (config `admin`; off loopback HTTPS
only, xmppd.adminhttps, so the token never crosses a network in clear), and
records its URL (for HTTPS, also what xmppctl verifies it against) in
`data_dir/admin/<pid>-<id>.json` (mode 0600, removed at a clean stop) so that
xmppctl, given the same configuration, finds the nodes running on this
machine (xmppd.cli.nodes). Every request needs `Authorization: Bearer
<token>`, the token being made at first start in `data_dir/admin/token`
(mode 0600): whoever can read it can already read the stores. A second token,
`data_dir/admin/metrics-token`, is accepted for GET /metrics and GET /status
only: a scraper given it can read counts, not end sessions or remove accounts.

Endpoints:
  GET  /status                                  the node: version, pid, hosts, storage, counts
  GET  /metrics                                 Prometheus text format (xmppd.metrics)
  GET  /sessions[?host=H]                       this node's sessions: JID, node, since, address
  POST /kick  {"jid": J, "reason": R}           end a full JID's session, or all of a bare
                                                JID's, on whichever node of the cluster it is
  POST /accounts/{user@host}/remove             remove the account and its data here
  POST /accounts/{user@host}/password-changed   end the account's sessions
  POST /accounts/{user@host}/removed            end the account's sessions
  POST /drain                                   stop the node as SIGTERM does (stream
                                                management sessions resume elsewhere)
  POST /reload                                  read the config file again and apply it,
                                                all or nothing (xmppd.reload), as SIGHUP
  POST /log-level  {"level": L}                 log from L up until a restart (not saved)
  ... and the everyday commands' routes (stats, announce, ban, roster, vCard,
  offline count, components): xmppd.adminroutes

xmppctl unregister asks a running node to remove the account itself: the
node's modules then delete through the node's own cache, which another
process cannot reach (the embedded default's in-process cache), so a new
account of the same name cannot be served the old one's cached data.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from xmppd import logs, metrics, package_version
from xmppd.adminhttps import HTTPSListener
from xmppd.adminroutes import add_routes, path_account
from xmppd.cluster.directory import node_of
from xmppd.jid import JID, InvalidJID
from xmppd.modulehost import AccountDataRemains, ClusterUnreachable
from xmppd.nodetls import NodeTLS
from xmppd.session import ClientSession
from xmppd.storage.base import StorageError
from xmppd.stream.errors import StreamError
from xmppd.xml.text import xml_can_carry

if TYPE_CHECKING:
    from xmppd.server import Server

log = logging.getLogger(__name__)

TOKEN_FILE = "token"
METRICS_TOKEN_FILE = "metrics-token"
READ_ONLY_PATHS = frozenset({"/metrics", "/status"})
"""What the metrics token may GET: counts and the node's description, nothing of a user."""
RECORD_SUFFIX = ".json"

KICK_REASON = "ended by an administrator"

ACCOUNT_CHANGES = {
    # RFC 6120 4.9.3.12 <not-authorized/>: the stream's authentication no longer
    # holds. Not <reset/> (4.9.3.16, Prosody's choice for a password change):
    # clients reconnect at once on it, with the old password, and each such
    # attempt would count as a failed login against their address. Not
    # <conflict/> (ejabberd's choice for a removal): that means another stream
    # replaced this one.
    "password-changed": ("not-authorized", "the password of this account was changed"),
    "removed": ("not-authorized", "the account was removed"),
}
ACCOUNT_NOTES = frozenset({"registered", "unbanned"})
"""What xmppctl did to an account that ends no session, told to the running nodes only
for their log: every change to an account an operator makes leaves a line there."""


def admin_dir(data_dir: Path) -> Path:
    """Where the token and the records of running nodes live."""
    return data_dir / "admin"


MIN_TOKEN_LENGTH = 32
"""Characters a token file must hold at least. An operator may write a token of their
own (shared by the nodes of a cluster through a shared folder); an empty or short one
would let `Authorization: Bearer` with nothing, or a guess, through."""


class WeakToken(Exception):
    """A token file holds fewer than MIN_TOKEN_LENGTH characters; names the file."""


def read_token(data_dir: Path, name: str = TOKEN_FILE) -> str:
    """The deployment's admin token, or its metrics token (OSError when it cannot be
    read, WeakToken when it is too short to be a secret)."""
    path = admin_dir(data_dir) / name
    token = path.read_text(encoding="ascii").strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise WeakToken(
            f"{path} holds {len(token)} characters, fewer than the {MIN_TOKEN_LENGTH} of a "
            "token: write a longer random one (or delete the file: the server makes one)"
        )
    return token


def ensure_token(data_dir: Path, name: str = TOKEN_FILE) -> str:
    """The admin token (or the metrics token), made on first start (mode 0600).

    Written under a temporary name and linked into place, so two nodes
    starting at once agree on one token and no reader sees a partial file.
    """
    folder = admin_dir(data_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = folder / name
    if not path.exists():
        temporary = folder / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
        _write_private(temporary, secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temporary, path)
            log.info("admin: made the API token %s", path)
        except FileExistsError:
            pass  # another node made it first: use theirs
        finally:
            temporary.unlink()
    elif path.stat().st_mode & 0o077:
        log.warning("admin: %s is readable by other users; chmod 600 it", path)
    return read_token(data_dir, name)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


class AdminAPI:
    """The HTTP server of one node; start() after the node is up, stop() before it goes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.url = ""
        self._token = b""
        self._metrics_token = b""  # GET of READ_ONLY_PATHS only
        self._record: Path | None = None
        self._runner: web.AppRunner | None = None
        self._https: HTTPSListener | None = None
        self._started = time.monotonic()

    async def start(self, tls: NodeTLS) -> None:
        """Serve on admin.address: plain HTTP, or HTTPS only with `tls.admin` (admin.tls)."""
        config = self.server.config
        self._token = ensure_token(config.data_dir).encode()
        self._metrics_token = ensure_token(config.data_dir, METRICS_TOKEN_FILE).encode()
        app = web.Application(middlewares=[self._authenticate])
        add_routes(app, self.server)  # stats, announce, ban, user data: xmppd.adminroutes
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sessions", self._sessions)
        app.router.add_post("/kick", self._kick)
        app.router.add_post("/accounts/{jid}/remove", self._remove_account)
        app.router.add_post("/accounts/{jid}/{change}", self._account_changed)
        app.router.add_post("/drain", self._drain)
        app.router.add_post("/reload", self._reload)
        app.router.add_post("/log-level", self._log_level)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        record: dict[str, object] = {"pid": os.getpid(), "hosts": list(config.hosts)}
        if tls.admin is None:
            site = web.TCPSite(self._runner, config.admin.address, config.admin.port)
            await site.start()
            self.url = _url("http", self._runner.addresses[0])
        else:
            assert self._runner.server is not None  # made by setup()
            self._https = HTTPSListener(self._runner.server, tls.admin)
            bound = await self._https.start(config.admin.address, config.admin.port)
            self.url = _url("https", bound)
            # How xmppctl verifies this node (xmppd.cli.nodes): the first host is one the
            # node's certificate is for; a self-signed one is its own CA.
            ca_file = config.admin.ca_file or (tls.cert if tls.self_signed else None)
            record["server_name"] = config.hosts[0]
            record["ca_file"] = str(ca_file) if ca_file is not None else None
        record["url"] = self.url
        self._record = admin_dir(config.data_dir) / (
            f"{os.getpid()}-{secrets.token_hex(4)}{RECORD_SUFFIX}"
        )
        _write_private(self._record, json.dumps(record) + "\n")
        log.info("admin: API on %s (recorded in %s)", self.url, self._record)

    def use_tls(self, tls: NodeTLS) -> None:
        """A reload's certificate, for the handshakes that begin from now on."""
        if self._https is not None and tls.admin is not None:
            self._https.use(tls.admin)

    async def stop(self) -> None:
        if self._record is not None:
            self._record.unlink(missing_ok=True)
            self._record = None
        if self._https is not None:
            await self._https.stop()
            self._https = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _authenticate(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        presented = given.strip().encode()
        valid = bool(presented) and (  # never an empty token, whatever a file holds
            hmac.compare_digest(presented, self._token)
            or (
                request.method == "GET"
                and request.path in READ_ONLY_PATHS
                and hmac.compare_digest(presented, self._metrics_token)
            )
        )
        if scheme.lower() != "bearer" or not valid:
            log.warning(
                "admin: refused %s %s from %s: no valid bearer token",
                request.method, request.path, request.remote,
                extra={"event": "admin-refused", "address": request.remote, "reason": "token"},
            )
            return web.json_response(
                {"error": "a valid bearer token is required"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="xmppd"'},
            )
        return await handler(request)

    async def _status(self, request: web.Request) -> web.Response:
        server = self.server
        return web.json_response(
            {
                "version": package_version(),
                "pid": os.getpid(),
                "node": server.cluster.node if server.cluster is not None else None,
                "hosts": list(server.config.hosts),
                "storage": server.storage.describe(),
                "connections": len(server.connections),
                "sessions": server.router.directory.count(),
                "uptime": round(time.monotonic() - self._started, 1),
                "messages": server.router.ledger.snapshot(),
            }
        )

    async def _sessions(self, request: web.Request) -> web.Response:
        """This node's own sessions (in a cluster, xmppctl reads the others' from Redis)."""
        host = request.query.get("host")
        cluster = self.server.cluster
        node = cluster.node if cluster is not None else None
        local = self.server.router.directory
        sessions = (
            [s for s, _ in cluster.directory.local_entries()]
            if cluster is not None
            else [s for bare in local.accounts() for s in local.resources(bare)]
        )
        return web.json_response(
            {
                "node": node,
                "sessions": [
                    session_view(s, node)
                    for s in sorted(sessions, key=lambda s: s.jid)
                    if host is None or s.host == host
                ],
            }
        )

    async def _kick(self, request: web.Request) -> web.Response:
        """End the named session(s) with <policy-violation/> and the reason, wherever they
        are: a session on another node is ended by that node (the cluster directory)."""
        try:
            body = await request.json()
            jid = JID(str(body["jid"]))
            reason = str(body.get("reason") or KICK_REASON)
            if not xml_can_carry(reason):  # the stream error that ends each session holds it
                raise ValueError("the reason has characters XML cannot carry")
        except (ValueError, KeyError, TypeError, AttributeError, InvalidJID) as e:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f'expected {{"jid": JID, "reason": TEXT}}: {e}'}),
                content_type="application/json",
            ) from None
        directory = self.server.router.directory
        if jid.resource:
            found = directory.get(jid.bare, jid.resource)
            sessions = [found] if found is not None else []
        else:
            sessions = directory.resources(jid.bare)
        error = StreamError("policy-violation", reason)
        ended = []
        for session in sessions:
            ended.append(session_view(session, self._node_of(session)))
            session.terminate(error)
        log.info("admin: kicked %s: ended %d session(s)", jid.full, len(ended))
        return web.json_response({"ended": ended})

    def _node_of(self, session: ClientSession) -> str | None:
        cluster = self.server.cluster
        if cluster is None:
            return None
        return node_of(session) or cluster.node

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=metrics.exposition(self.server), headers={"Content-Type": metrics.CONTENT_TYPE}
        )

    async def _drain(self, request: web.Request) -> web.Response:
        """Stop this node as SIGTERM would (xmppd.server.serve does the stopping): the
        answer leaves first, then the node stops taking connections and hands over."""
        log.info("admin: drain requested")
        asyncio.get_running_loop().call_soon(self.server.stop_requested.set)
        return web.json_response({"draining": True, "pid": os.getpid()})

    async def _reload(self, request: web.Request) -> web.Response:
        """Reload as SIGHUP does (the log file is not reopened: nothing moved it). A
        refused reload is an answer too (200), naming each key that stopped it."""
        log.info("admin: reload requested")
        result = await self.server.reload()
        return web.json_response(
            {
                "pid": os.getpid(),
                "node": self._this_node(),
                "reloaded": result.reloaded,
                "changed": result.changed,
                "problems": result.problems,
                "summary": result.summary(),
            }
        )

    async def _log_level(self, request: web.Request) -> web.Response:
        """Change the log level of this process until it restarts (the file is not changed;
        a reload that changes log_level sets the file's)."""
        try:
            level = str((await request.json())["level"]).lower()
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f'expected {{"level": LEVEL}}: {e}'}),
                content_type="application/json",
            ) from None
        if level not in logs.LEVELS:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"level must be one of {', '.join(logs.LEVELS)}"}),
                content_type="application/json",
            )
        previous = logs.current_level()
        logs.set_level(level)
        log.warning("admin: log level %s (was %s) until restart; not saved", level, previous)
        return web.json_response(
            {"pid": os.getpid(), "node": self._this_node(), "level": level, "previous": previous}
        )

    def _this_node(self) -> str | None:
        return self.server.cluster.node if self.server.cluster is not None else None

    async def _account_changed(self, request: web.Request) -> web.Response:
        change = request.match_info["change"]
        condition = ACCOUNT_CHANGES.get(change)
        if condition is None and change not in ACCOUNT_NOTES:
            raise web.HTTPNotFound(text=f"unknown change {change!r}")
        jid = self._account(request)
        if condition is None:
            log.info("admin: %s %s", jid.bare, change)
            return web.json_response({"ended": 0})
        ended = await self.server.end_account_sessions(
            jid.domain, jid.user, StreamError(*condition)
        )
        log.info("admin: %s %s: ended %d session(s)", jid.bare, change.replace("-", " "), ended)
        return web.json_response({"ended": ended})


    async def _remove_account(self, request: web.Request) -> web.Response:
        jid = self._account(request)
        ended = 0

        async def end_sessions() -> None:
            nonlocal ended
            ended = await self.server.end_account_sessions(
                jid.domain, jid.user, StreamError(*ACCOUNT_CHANGES["removed"])
            )

        try:
            result = await self.server.modules.remove_account(jid.domain, jid.user, end_sessions)
        except ClusterUnreachable as e:  # logged, naming the account and the cause
            return web.json_response({"error": str(e), "ended": ended}, status=503)
        except (AccountDataRemains, StorageError) as e:
            log.error("admin: removing %s failed: %s", jid.bare, e)
            return web.json_response({"error": str(e), "ended": ended}, status=500)
        log.info("admin: %s removed (%s): ended %d session(s)", jid.bare, result, ended)
        return web.json_response({"result": result, "ended": ended})

    def _account(self, request: web.Request) -> JID:
        return path_account(request, self.server.accounts)


def session_view(session: ClientSession, node: str | None) -> dict[str, object]:
    """What xmppctl shows of a session (the same fields as a cluster table entry)."""
    return {"jid": session.jid, "node": node, "since": session.since, "address": session.address}


def _url(scheme: str, address: object) -> str:
    """The URL for a bound socket address, a loopback one for a wildcard bind."""
    host, port = address[0], address[1]  # type: ignore[index]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
