"""One xmppd node: storage, accounts, router, modules and listeners, wired from the config."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xmppd import package_version
from xmppd.adminapi import AdminAPI, WeakToken
from xmppd.auth.accounts import Accounts
from xmppd.auth.privileged import without_account
from xmppd.auth.throttle import AuthThrottle, MemoryFailureCounter, address_key
from xmppd.batchloop import BatchingLoop
from xmppd.cli.nodes import other_nodes
from xmppd.cluster import Cluster, ClusterUnavailable
from xmppd.cluster.caches import share_memory_cache
from xmppd.cluster.throttle import RedisFailureCounter
from xmppd.components.service import ComponentService
from xmppd.config import Config, ConfigError, ListenerConfig, load_config
from xmppd.connection import C2SConnection
from xmppd.fileaccess import open_to_others
from xmppd.flushes import Flushes
from xmppd.logs import LogOutput, set_level
from xmppd.modulehost import ACCOUNT_CHANGE_SETTLE, ModuleHost, validate_module_options
from xmppd.nodetls import NodeTLS, node_tls
from xmppd.openfiles import SANE_HARD_LIMIT, OpenFiles, raise_open_files_limit
from xmppd.pauses import PauseMonitor
from xmppd.reload import ReloadResult, describe_changes, refused_changes
from xmppd.router import Router
from xmppd.s2s.contexts import S2SContexts
from xmppd.s2s.service import S2SService
from xmppd.session import ClientSession
from xmppd.storage.base import PRIVATE_DIR, ItemStore
from xmppd.storage.factory import Storage, open_storage
from xmppd.storage.timing import StorageStats, instrument
from xmppd.stream.c2s import StreamSettings
from xmppd.stream.errors import StreamError
from xmppd.tls import ServerTLS, TLSError
from xmppd.traffic import Traffic

log = logging.getLogger("xmppd")

ACCOUNT_ENDED = "account-ended"
"""The cluster bus topic of end_account_sessions."""


@dataclass(frozen=True, slots=True)
class Listening:
    type: str
    address: str
    port: int


class Server:
    def __init__(
        self,
        config: Config,
        reuse_port: bool = False,
        load: Callable[[], Config] | None = None,
        log_output: LogOutput | None = None,
    ) -> None:
        self.config = config
        # How a reload reads the configuration again (a worker's adds its node name);
        # None for a config made in code, which has no file to read.
        file = config.source.file
        self.load = load if load is not None else (
            (lambda: load_config(file)) if file is not None else None
        )
        # The log handler a reload changes and SIGHUP reopens; None when the caller
        # (a test) set logging up itself.
        self.log_output = log_output
        self._reloading = asyncio.Lock()
        self.ready = False  # start() is done
        # SO_REUSEPORT on the client listeners: `xmppd --workers` runs several nodes
        # on the same ports and the kernel spreads connections over them.
        self.reuse_port = reuse_port
        self.connections: set[C2SConnection] = set()
        self.per_ip: Counter[str] = Counter()
        limits = config.limits
        # Failed logins per address; `throttle.stats` counts failures, bans and refusals.
        self.throttle = AuthThrottle(
            MemoryFailureCounter(limits.auth_ban_seconds),
            limits.auth_failures_before_ban,
            limits.auth_ban_seconds,
            limits.auth_failure_delay,
        )
        self.listening: list[Listening] = []
        self._servers: list[asyncio.Server] = []
        self._settings: dict[bool, StreamSettings] = {}
        self._stopped = False
        self._modules_loaded = False  # start() got to the modules: there are some to stop
        self.storage: Storage
        self.storage_stats = StorageStats()
        self.traffic = Traffic()  # stanzas by kind, connections, logins (xmppd.metrics)
        self.flushes = Flushes()  # the client connections to write at the end of a loop turn
        self.tls: ServerTLS
        self.accounts: dict[str, Accounts]
        self.fake_salt_key: bytes
        self.router: Router
        self.cluster: Cluster | None = None
        self.modules: ModuleHost
        self.s2s: S2SService | None = None  # federation, with an s2s section (docs/s2s.md)
        # External components (XEP-0114), with a components section (docs/components.md).
        self.components: ComponentService | None = None
        self.admin = AdminAPI(self)
        self.pauses = PauseMonitor()
        # Set by SIGTERM/SIGINT and by a drain (xmppctl drain): serve() then stops the node.
        self.stop_requested = asyncio.Event()

    async def start(self) -> None:
        """Open the stores, join the cluster, load the modules, listen.

        If a step fails, what the steps before it started is stopped again (in the
        order `stop` would: listeners, the cluster, the modules, the stores) and the
        error goes on: a node that did not start leaves no cluster membership behind
        (a heartbeat, table entries, an inbox reader: the other nodes would route to
        it, and the tasks would keep an in-process caller from ending), nor open
        stores or bound ports. A failure while undoing is logged, not raised: the
        caller gets the error that stopped the start."""
        undo: list[tuple[str, Callable[[], Awaitable[object]]]] = []
        try:
            await self._start(undo)
        except BaseException:
            self._stopped = True  # stop() has nothing more to do
            for what, step in reversed(undo):
                try:
                    await step()
                except Exception:
                    log.exception("the start failed, and stopping %s again failed too", what)
            raise

    async def _start(self, undo: list[tuple[str, Callable[[], Awaitable[object]]]]) -> None:
        """`start`'s steps; each that started something appends how to stop it to `undo`."""
        config = self.config
        log.info(
            "xmppd %s starting: config %s, hosts %s",
            package_version(), config.source.name, ", ".join(config.hosts),
        )
        log_open_files(raise_open_files_limit())
        ensure_data_dir(config.data_dir)
        if config.cluster is None:
            await refuse_a_second_node(config.data_dir)
        if open_to_others(config.data_dir):
            log.warning(
                "data_dir %s can be read by every local user (it holds the accounts' keys): "
                "chmod -R o-rwx %s", config.data_dir, config.data_dir
            )
        # Off the loop (xmppd.nodetls): the signal handlers and the start's log lines
        # run on it meanwhile.
        tls = await asyncio.to_thread(node_tls, config)
        cert, key = tls.cert, tls.key
        self.tls = tls.client
        log.info("tls: certificate %s, minimum TLS %s", cert, config.tls.min_version)
        if config.auth.allow_unencrypted:
            log.warning(
                "auth.allow_unencrypted is on: SASL is offered before TLS (never in production)"
            )
        self.storage = await open_storage(config.storage, config.data_dir)
        undo.append(("the storage", self.storage.close))
        for line in self.storage.describe():
            log.info("storage: %s", line)
        self.storage_stats = instrument(self.storage)  # latency and errors for /metrics
        if (
            config.cluster is None
            and config.storage.cache.backend == "memory"
            and (
                config.storage.items.backend != "sqlite" or config.storage.blobs.backend != "files"
            )
        ):
            log.warning(
                "storage: the in-process cache is only correct for a single node; when several "
                "nodes share these stores, make them a cluster or use cache.backend memcached"
            )
        self.fake_salt_key = await cluster_secret(self.storage, "scram-fake-salt")
        self.accounts = {
            host: Accounts.of(self.storage, host, config.auth.scram_iterations)
            for host in config.hosts
        }
        for line in await without_account(config, self._user_exists):
            log.warning("%s", line)
        self.cluster = Cluster(config.cluster) if config.cluster is not None else None
        self.router = Router(
            config.hosts,
            self._user_exists,
            directory=self.cluster.directory if self.cluster is not None else None,
        )
        # Stopped after the cluster (undone later, appended first): what the cluster
        # routes again as it stops (its inbox) may need the modules (offline storage).
        undo.append(("the modules", self._stop_modules))
        if self.cluster is not None:
            try:
                await self.cluster.start(self.router)
            except ClusterUnavailable as exc:
                raise StartupError(str(exc)) from None
            undo.append(("the cluster membership", self._leave_cluster))
            share_memory_cache(self.cluster.bus, self.storage.cache)
            # Nothing to flush when notices were lost: the directory ended the sessions
            # the other node knew of; see end_account_sessions.
            self.cluster.bus.subscribe(ACCOUNT_ENDED, self._account_ended, lambda: None)
            shared = RedisFailureCounter(
                self.cluster.redis, config.limits.auth_ban_seconds, self.throttle.counter
            )
            self.throttle.counter = shared
            undo.append(("the login throttle's Redis connection", shared.close))
        self.modules = ModuleHost(
            self.router,
            self.storage,
            list(config.hosts),
            self.cluster.bus if self.cluster is not None else None,
        )
        self.modules.accounts = self.accounts
        self.modules.cluster = self.cluster
        self.modules.account_streams_ender = self.end_account_sessions
        self._modules_loaded = True
        self.modules.load(config)
        await self.modules.start()
        if config.components is not None:
            self.components = ComponentService(self, config.components)
            undo.append(("the components", self.components.stop))
            try:
                await self.components.start()
            except ValueError as exc:  # a module serves that domain already
                raise StartupError(f"components: {exc}") from None
        if self.cluster is not None:
            await self.cluster.serve()  # what the inbox holds may need the modules (offline)
        log.info("modules: %s", ", ".join(self.modules.modules) or "none")
        loop = asyncio.get_running_loop()
        undo.append(("the listeners", self._close_listeners))
        for listener in config.listeners:
            direct = listener.type == "direct_tls"
            server = await loop.create_server(
                self._connection_factory(listener),
                listener.address,
                listener.port,
                backlog=listener.backlog,  # TLS, direct or not, is the connection's own
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            self._servers.append(server)
            for sock in server.sockets:
                address, port = sock.getsockname()[:2]
                self.listening.append(Listening(listener.type, address, port))
                kind = "direct TLS (XEP-0368)" if direct else "STARTTLS"
                behind = (
                    f", PROXY protocol from {', '.join(listener.trusted_proxies)}"
                    if listener.proxy_protocol else ""
                )
                log.info("listening: c2s %s on %s port %d%s", kind, address, port, behind)
        if config.s2s is not None:
            self.s2s = S2SService(self, config.s2s)
            self.router.remote = self.s2s
            undo.append(("server-to-server", self.s2s.stop))
            await self.s2s.start(cert, key, await cluster_secret(self.storage, "s2s-dialback"))
        undo.append(("the admin API", self.admin.stop))
        try:
            await self.admin.start(tls)
        except WeakToken as exc:
            raise StartupError(f"admin: {exc}") from None
        self.pauses.start()
        self.ready = True

    async def _stop_modules(self) -> None:
        """Undo a start: stop the modules set up (nothing if none was yet)."""
        if self._modules_loaded:
            await self.router.drain()
            await self.modules.stop()

    async def _leave_cluster(self) -> None:
        """Undo a start: leave the cluster as `stop` does."""
        assert self.cluster is not None
        await self.cluster.stop()
        await self.router.drain()

    async def _close_listeners(self) -> None:
        """Undo a start: stop listening, and end what connected meanwhile."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close(StreamError("system-shutdown", "the server is shutting down"))
        for server in self._servers:
            await server.wait_closed()

    async def stop(self) -> None:
        """Close listeners, end every stream with <system-shutdown/>, release storage."""
        if self._stopped:
            return
        self._stopped = True
        await self.admin.stop()
        self.pauses.stop()
        for server in self._servers:
            server.close()
        # Stream management hands its sessions over first (to Redis, when clustered)
        # and cuts their connections, so their clients resume on another node.
        await self.modules.fire("server/stopping")
        for conn in list(self.connections):
            conn.close(StreamError("system-shutdown", "the server is shutting down"))
        for server in self._servers:
            await server.wait_closed()
        await self.router.drain()
        if self.components is not None:
            # After the sessions ended: their unavailable presence reached the components.
            await self.components.stop()
        if self.s2s is not None:
            # After the sessions ended: their unavailable presence reaches remote contacts.
            await self.s2s.stop()
        if self.cluster is not None:
            # What the other nodes forwarded until they saw this node's sessions go
            # is routed (to offline storage), which needs the modules still running.
            await self.cluster.stop()
            await self.router.drain()
        if isinstance(self.throttle.counter, RedisFailureCounter):
            await self.throttle.counter.close()  # no login is left to count
        await self.modules.stop()
        await self.storage.close()
        # One line a benchmark or an operator can reconcile with what clients saw.
        log.info("messages since start: %s", json.dumps(self.router.ledger.snapshot()))
        log.info("pauses since start: %s", json.dumps(self.pauses.snapshot()))
        log.info("xmppd stopped")

    # --- reload (SIGHUP, xmppctl reload) ------------------------------------------------

    def hangup(self) -> None:
        """SIGHUP: reopen the log file (logrotate moved it), then reload the configuration."""
        if not self.ready or self._stopped:
            log.warning("SIGHUP ignored: the node is starting or stopping")
            return
        if self.log_output is not None:
            self.log_output.reopen()
        self.router.spawn(self.reload())

    async def reload(self) -> ReloadResult:
        """Read the configuration file again and apply it, all or nothing (xmppd.reload).

        New connections, client and federation, see the change; existing sessions
        and s2s streams keep the stream settings and certificate they started with,
        except that the streams of a host no longer served end with <host-gone/>.
        One log line says what changed, or why nothing did."""
        async with self._reloading:
            old = self.config
            try:
                new, options, tls, federation = await asyncio.to_thread(self._check_reload, old)
                renewed = self._apply_reload(old, new, options, tls, federation)
                await self.modules.toggle(options)
                self._settings.clear()  # the stream features of the modules now enabled
            except ConfigError as exc:
                result = ReloadResult(False, problems=exc.problems)
                log.error("%s", result.summary())
                return result
            result = ReloadResult(True, describe_changes(old, new) + renewed)
            log.info("%s", result.summary())
            return result

    def _check_reload(
        self, old: Config
    ) -> tuple[Config, dict[str, Any], NodeTLS, S2SContexts | None]:
        """Load and check the file against the running node, and make the new TLS
        contexts whole: the client's, the admin API's when it serves HTTPS, and
        federation's when the certificate or key changed, else None (in a thread:
        they read files and parse the key and CAs, which the loop must not wait
        for); ConfigError lists every reason it cannot be applied."""
        if self.load is None:
            raise ConfigError(["this node was not started from a file: there is nothing to reload"])
        try:
            new = self.load()
        except ConfigError:
            raise
        except Exception as exc:  # a loader's bug must not escape: the node keeps its config
            log.exception("reading %s again failed", old.source.name)
            raise ConfigError(
                [f"{old.source.name}: cannot be read ({type(exc).__name__}: {exc})"]
            ) from None
        problems = refused_changes(old, new)
        options: dict[str, Any] = {}
        try:
            options = validate_module_options(new)
        except ConfigError as exc:
            problems.extend(exc.problems)
        else:
            problems.extend(self.modules.reload_problems(new, options))
        if self.log_output is not None:
            unusable = self.log_output.check(new)
            if unusable is not None:
                problems.append(new.source.problem(("log", "file"), unusable))
        if problems:
            raise ConfigError(problems)
        try:
            tls = node_tls(new)
        except (TLSError, OSError) as exc:
            raise ConfigError([new.source.problem(("tls", "cert"), str(exc))]) from None
        federation = None
        if self.s2s is not None:  # the s2s section is the running one: a reload keeps it
            try:
                # Peers would refuse the old certificate once it expires: a renewal must
                # reach new s2s streams too, or the reload applies nothing.
                federation = self.s2s.renewed_contexts(tls.cert, tls.key)
            except TLSError as exc:
                raise ConfigError([f"{new.source.where(('s2s',))}: {exc}"]) from None
        return new, options, tls, federation

    def _apply_reload(
        self,
        old: Config,
        new: Config,
        options: dict[str, Any],
        tls: NodeTLS,
        federation: S2SContexts | None,
    ) -> list[str]:
        """Make the checked `new` config the node's; what changed that the config does
        not show (a renewed certificate). Nothing here may fail or wait: the node is
        changed all at once, in one turn of the loop."""
        before = self.tls.cert_der
        # New handshakes take the new context; a connection keeps the ServerTLS its
        # handshake began with (C2SConnection._begin_tls), so its channel binding
        # names the certificate it was shown.
        self.tls = tls.client
        self.admin.use_tls(tls)  # an HTTPS admin API shows the new certificate too
        if federation is not None:
            assert self.s2s is not None  # made by _check_reload only with federation on
            self.s2s.use_contexts(federation)  # s2s streams keep theirs the same way
        self.config = new
        self.modules.reconfigure(new, options)
        iterations = new.auth.scram_iterations
        for host in new.hosts:
            account = self.accounts.get(host)
            if account is None or account.iterations != iterations:
                self.accounts[host] = Accounts.of(self.storage, host, iterations)
        gone = [host for host in self.accounts if host not in new.hosts]
        for host in gone:
            del self.accounts[host]
        self.router.hosts = frozenset(new.hosts)
        limits = new.limits
        self.throttle.reconfigure(
            limits.auth_failures_before_ban, limits.auth_ban_seconds, limits.auth_failure_delay
        )
        self._settings.clear()  # new streams get the new limits, hosts and mechanisms
        if gone:
            error = StreamError("host-gone", "this server no longer serves the host")
            for conn in [c for c in self.connections if c.stream.host in gone]:
                conn.close(error)
        loop = asyncio.get_running_loop()
        if isinstance(loop, BatchingLoop):  # else a test's loop, which has no window
            loop.window = new.batch_window_ms / 1000
        if new.log_level != old.log_level:
            set_level(new.log_level)  # else a level set by xmppctl log-level stays
        if self.log_output is not None:
            self.log_output.apply(old, new)
        same_files = (new.tls.cert, new.tls.key) == (old.tls.cert, old.tls.key)
        if tls.client.cert_der != before and same_files and new.tls.cert is not None:
            return [f"certificate {tls.cert} (renewed)"]
        return []

    # --- what connections ask of the node ------------------------------------------------

    def stream_settings(self, direct_tls: bool) -> StreamSettings:
        settings = self._settings.get(direct_tls)
        if settings is None:
            limits = self.config.limits
            settings = self._settings[direct_tls] = StreamSettings(
                hosts=frozenset(self.config.hosts),
                max_stanza_bytes=limits.max_stanza_bytes,
                max_stanza_bytes_unauthenticated=limits.max_stanza_bytes_unauthenticated,
                max_depth=limits.max_xml_depth,
                mechanisms=list(self.config.auth.mechanisms),
                allow_unencrypted=self.config.auth.allow_unencrypted,
                direct_tls=direct_tls,
                preauth_features=lambda: [
                    make() for make in self.modules.stream_features["preauth"]
                ],
                extra_features=lambda: [make() for make in self.modules.stream_features["bound"]],
                preauth_iq_namespaces=self.modules.preauth_namespaces,
                on_sasl_outcome=self.traffic.sasl_outcome,
            )
        return settings

    def _connection_factory(self, listener: ListenerConfig) -> Callable[[], asyncio.Protocol]:
        """What a listener accepts with: a client connection, or first the reader of a
        load balancer's PROXY header, which then makes one with the client's address."""
        direct = listener.type == "direct_tls"
        return listener.accepting(lambda client: C2SConnection(self, direct, client))

    def connection_opened(self, conn: C2SConnection) -> bool:
        """Count the connection; False when its address is over the per-IP limit. IPv6
        addresses count per /64, as the login throttle's do (`address_key`): one host
        may use any address of its network."""
        limit = self.config.limits.max_connections_per_ip
        key = address_key(conn.ip)
        if limit and self.per_ip[key] >= limit:
            log.warning(
                "refused a connection from %s: %d connections already conn=%s",
                conn.ip, limit, conn.id,
                extra={
                    "event": "connection-refused",
                    "address": conn.ip,
                    "reason": "max_connections_per_ip",
                    "conn": conn.id,
                },
            )
            return False
        self.per_ip[key] += 1
        self.connections.add(conn)
        self.traffic.connections += 1
        return True

    def connection_closed(self, conn: C2SConnection) -> None:
        self.connections.discard(conn)
        key = address_key(conn.ip)
        self.per_ip[key] -= 1
        if self.per_ip[key] <= 0:
            del self.per_ip[key]

    def session_started(self, session: ClientSession) -> None:
        if self.modules.has_hook("session/bound"):
            self.router.spawn(self.modules.fire("session/bound", session))

    def session_ended(self, session: ClientSession) -> None:
        self.router.session_ended(session)

    async def end_account_sessions(
        self, host: str, username: str, error: StreamError, keep: str | None = None
    ) -> int:
        """End every stream authenticated as the account (bound or not yet), or with its
        credentials as another (auth.proxy_auth), with `error`; but the session bound
        as the full JID `keep` (the one whose request this is: a password change).

        Each goes the way of any ended stream (router.session_ended: unavailable
        presence to contacts, "session/closed"); this returns once the work that
        started here has run, so a caller that then deletes the account's data
        (xmppctl unregister) does not pull the roster from under the presence
        broadcast. In a cluster the sessions this node knows on other nodes are
        ended through the directory (their node's inbox), and a notice on the
        cluster bus ends on every node the streams this node cannot know of: not
        bound yet, or bound too recently for its replica (`_account_ended`).
        """
        bare = f"{username}@{host}"
        sessions = [s for s in self.router.directory.resources(bare) if s.jid != keep]
        # Not bound yet, or bound as another account with this one's credentials (proxy).
        streams = [
            conn
            for conn in self._account_streams(host, username)
            if conn.session is None or conn.stream.username != username
        ]
        if self.cluster is not None:
            self.cluster.bus.publish(
                ACCOUNT_ENDED,
                {"host": host, "user": username, "condition": error.condition, "text": error.text},
            )
        before = self.router.pending()
        for session in sessions:
            session.terminate(error)
        for conn in streams:
            conn.close(error)
        started = self.router.pending() - before
        if started:
            await asyncio.wait(started, timeout=ACCOUNT_CHANGE_SETTLE)
        return len(sessions) + len(streams)

    def _account_streams(self, host: str, username: str) -> list[C2SConnection]:
        """This node's streams authenticated as the account, or with its credentials
        acting as another (auth.proxy_auth), bound or not."""
        return [
            conn
            for conn in self.connections
            if username in (conn.stream.username, conn.stream.authcid)
            and conn.stream.host == host
        ]

    def _account_ended(self, notice: dict[str, Any]) -> None:
        """Another node ended an account's sessions (password changed, account removed):
        end its streams here too, bound or not (ending one twice does nothing)."""
        error = StreamError(str(notice["condition"]), notice.get("text"))
        for conn in self._account_streams(str(notice["host"]), str(notice["user"])):
            conn.close(error)

    async def _user_exists(self, host: str, username: str) -> bool:
        return await self.accounts[host].exists(username)


async def refuse_a_second_node(data_dir: Path) -> None:
    """StartupError when another node already runs on `data_dir` and this one has no
    cluster: each would keep its own sessions and caches, so users on one would look
    offline to the other and read stale rosters, with no error anywhere."""
    others = await asyncio.to_thread(other_nodes, data_dir)
    if others:
        pid, url = others[0]
        raise StartupError(
            f"another node runs on data_dir {data_dir} (pid {pid}, admin API {url}): two "
            "nodes without a cluster section keep separate sessions and caches; stop it, "
            "or make both nodes a cluster (docs/cluster.md)"
        )


def log_open_files(limits: OpenFiles) -> None:
    """Say what the open-files limit allows: a low one fails accepts with no other line."""
    raised = f"raised from {limits.before} to" if limits.soft != limits.before else "soft limit"
    log.info(
        "open files: %s %d (hard limit %d): about %d client connections",
        raised, limits.soft, limits.hard, limits.clients,
    )
    if limits.hard < SANE_HARD_LIMIT:
        log.warning(
            "open files: the hard limit %d allows about %d client connections on this node; "
            "raise it (systemd: LimitNOFILE=%d in the unit; else nofile in limits.conf)",
            limits.hard, limits.clients, SANE_HARD_LIMIT * 16,
        )


class StartupError(Exception):
    """The node cannot start; one line naming what to fix."""


def ensure_data_dir(data_dir: Path) -> None:
    """Make data_dir and check that files can be written in it (StartupError), before
    a store, the certificate or the admin token fails there with a longer story."""
    try:
        data_dir.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            f"data_dir {data_dir} is not writable: {exc.strerror or exc}"
        ) from None
    check_writable(data_dir)


def check_writable(data_dir: Path) -> None:
    """StartupError unless a file can be made in the existing `data_dir`: a probe,
    removed at once (root may lack the right on a network file system, and a folder
    may be mounted read-only, which its mode does not show)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=data_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise StartupError(
            f"data_dir {data_dir} is not writable: {exc.strerror or exc}"
        ) from None


async def cluster_secret(storage: Storage, name: str) -> bytes:
    """A random secret every node of the deployment shares: made once, kept in the item store.

    SCRAM answers unknown users with a salt derived from it; were it per
    node, a user probed on two nodes would get two salts and be unmasked.
    """
    value = await ItemStore(storage.items, "_cluster", "secrets").random_once(name, "value")
    assert isinstance(value, bytes)
    return value


async def serve(
    config: Config,
    reuse_port: bool = False,
    on_ready: Callable[[], None] | None = None,
    load: Callable[[], Config] | None = None,
    log_output: LogOutput | None = None,
) -> None:
    """Run a node until SIGTERM or SIGINT, then shut down cleanly; SIGHUP reopens the
    log file and reloads the configuration (`load` reads it again).

    `on_ready` runs once the node serves (a worker tells its supervisor,
    xmppd.cli.workers)."""
    server = Server(config, reuse_port, load, log_output)
    # SIGHUP's before start(): one sent once "xmppd ready" is logged must find it (the
    # default action ends the process); until then it is ignored (Server.hangup).
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, server.hangup)
    await server.start()
    # Startup objects (modules, config, TLS context) live for the whole run: keep
    # them out of the collector's generations so full collections stay short.
    gc.freeze()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop_requested.set)
    # Only now: whoever waits for this line may stop the node at once, and cleanly.
    log.info("xmppd ready")
    if on_ready is not None:
        on_ready()  # only now: a stop signal from here on is a clean stop
    await server.stop_requested.wait()
    log.info("signal or drain received: shutting down")
    await server.stop()
