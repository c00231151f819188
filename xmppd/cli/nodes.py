"""xmppctl's side of the admin channel: find the running nodes, tell them what changed.

Each running node records its admin API URL in data_dir/admin/ (see
xmppd.adminapi), so xmppctl, with the same configuration, finds every node
on this machine. The stores are always written first: a node that does not
answer (a record left by a node that died) only gets a warning, and with no
node running there is nothing to tell.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
from aiohttp.client import _RequestContextManager

from xmppd.adminapi import RECORD_SUFFIX, WeakToken, admin_dir, read_token
from xmppd.modulehost import ACCOUNT_REMOVAL_WAITS

REQUEST_TIMEOUT = 15.0
"""Seconds per node (to connect, for a removal); a node waits up to 10 s for the sessions
it ends to settle."""
REMOVAL_TIMEOUT = ACCOUNT_REMOVAL_WAITS + REQUEST_TIMEOUT
"""Seconds a node has to remove an account: every wait it bounds, and REQUEST_TIMEOUT
more for its storage work. Giving up earlier would leave a removal that goes well
running while xmppctl did the work again elsewhere."""
WAIT_NOTICE_AFTER = 2.0
"""Seconds after which xmppctl says that it waits for a node's removal."""


@dataclass(slots=True)
class Outcome:
    """What the nodes said: lines for the operator (stdout) and warnings (stderr)."""

    done: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class NodeTrust:
    """How the certificate of a node serving HTTPS is verified: the name it must be
    for, and the CAs it must chain to (None: the system's). The node wrote both in its
    record (xmppd.adminapi), which only the deployment's user can write: the one who
    can read the token anyway."""

    server_name: str | None
    ca_file: str | None


def node_records(data_dir: Path, outcome: Outcome) -> dict[Path, str]:
    """Record file -> admin URL of the nodes running with this data_dir."""
    return {record: url for record, (url, _) in _records(data_dir, outcome).items()}


def other_nodes(data_dir: Path) -> list[tuple[int, str]]:
    """(pid, admin URL) of the nodes of other processes running on `data_dir` now
    (blocking: files and /proc). A starting node without a cluster asks: it would not
    see their sessions nor they its."""
    found = []
    for record, (url, _) in _records(data_dir, Outcome()).items():
        try:
            pid = int(json.loads(record.read_text(encoding="utf-8"))["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # it stopped meanwhile
        if pid != os.getpid():
            found.append((pid, url))
    return found


def _records(data_dir: Path, outcome: Outcome) -> dict[Path, tuple[str, NodeTrust]]:
    """Record file -> admin URL and how to verify it, of the nodes running here.

    The admin token goes only to a URL whose port is held by the process that
    wrote the record: a node that died leaves its record behind, and another
    local user could then listen on its port to collect the token. The record
    of a process that is gone is deleted; a port held by another process is a
    warning, and that node is not contacted."""
    folder = admin_dir(data_dir)
    if not folder.is_dir():
        return {}
    found: dict[Path, tuple[str, NodeTrust]] = {}
    for record in sorted(folder.glob(f"*{RECORD_SUFFIX}")):
        try:
            fields = json.loads(record.read_text(encoding="utf-8"))
            url, pid = str(fields["url"]), int(fields["pid"])
            trust = NodeTrust(_optional(fields, "server_name"), _optional(fields, "ca_file"))
        except (OSError, ValueError, KeyError, TypeError) as e:
            outcome.warnings.append(f"{record}: not a node record ({e}); delete it if unused")
            continue
        if not _alive(pid):
            record.unlink(missing_ok=True)
            outcome.warnings.append(f"deleted {record}: its node (pid {pid}) is gone")
            continue
        port = urlsplit(url).port
        if port is None or not _listens(pid, port):
            outcome.warnings.append(
                f"{url} is not served by the node of {record} (pid {pid}): not contacted"
            )
            continue
        found[record] = url, trust
    return found


def _optional(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    return None if value is None else str(value)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: _listens decides
    return True


def _listens(pid: int, port: int) -> bool:
    """Process `pid` holds a TCP socket listening on `port` (Linux /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN; column 9 the inode
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return False
    try:
        fds = list(os.scandir(f"/proc/{pid}/fd"))
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd.path) in inodes:
                return True
        except OSError:
            continue
    return False


class NodeRemovalFailed(Exception):
    """A running node removed the account but not all of its data (or not at all), or
    did not answer in time once asked (it may still be removing it)."""


@contextlib.asynccontextmanager
async def _admin_client(
    data_dir: Path, outcome: Outcome, unread: str
) -> AsyncIterator[tuple[dict[Path, str], AdminHTTP] | None]:
    """The recorded nodes and an HTTP client carrying the admin token; None when no
    node is recorded or the token cannot be read (`unread` ends that warning)."""
    records = _records(data_dir, outcome)
    verified = await asyncio.to_thread(_verifiers, records, outcome)
    nodes = {record: url for record, (url, _) in records.items() if record in verified}
    if not nodes:
        yield None
        return
    try:
        token = read_token(data_dir)
    except OSError as e:
        outcome.warnings.append(
            f"cannot read the admin token {admin_dir(data_dir) / 'token'}: "
            f"{e.strerror or e}; {unread}"
        )
        yield None
        return
    except WeakToken as e:
        outcome.warnings.append(f"{e}; {unread}")
        yield None
        return
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
        yield nodes, AdminHTTP(session, {_origin(nodes[r]): v for r, v in verified.items() if v})


Verifier = tuple[ssl.SSLContext, str | None]
"""The TLS context an https node is verified with, and the name its certificate must be for."""


def _verifiers(
    records: dict[Path, tuple[str, NodeTrust]], outcome: Outcome
) -> dict[Path, Verifier | None]:
    """Record -> how to verify its node (None: plain HTTP, a loopback node); a record
    whose CA file cannot be read is a warning, and its node is not contacted. Blocking
    (CA files, the system's trust store): called in a thread."""
    verifiers: dict[Path, Verifier | None] = {}
    for record, (url, trust) in records.items():
        if urlsplit(url).scheme != "https":
            verifiers[record] = None
            continue
        try:
            context = ssl.create_default_context(cafile=trust.ca_file)
        except (OSError, ssl.SSLError) as e:
            outcome.warnings.append(
                f"cannot read the CA file {trust.ca_file} of {record} (admin.ca_file): "
                f"{getattr(e, 'strerror', None) or e}; the node at {url} was not contacted"
            )
            continue
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        verifiers[record] = context, trust.server_name
    return verifiers


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class AdminHTTP:
    """xmppctl's HTTP client to the nodes: one aiohttp session carrying the token, and
    for each node serving HTTPS the verification its record asks for (its CAs, its
    name: the URL holds the address it listens on, which its certificate is not for)."""

    def __init__(self, session: aiohttp.ClientSession, verifiers: dict[str, Verifier]) -> None:
        self._session = session
        self._verifiers = verifiers

    def request(
        self,
        method: str,
        url: str,
        json: object = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> _RequestContextManager:
        """`timeout`: this request's, else the session's (REQUEST_TIMEOUT)."""
        options: dict[str, Any] = {"json": json}
        if timeout is not None:
            options["timeout"] = timeout
        verifier = self._verifiers.get(_origin(url))
        if verifier is not None:
            options["ssl"], options["server_hostname"] = verifier
        return self._session.request(method, url, **options)

    def get(self, url: str) -> _RequestContextManager:
        return self.request("GET", url)

    def post(
        self, url: str, timeout: aiohttp.ClientTimeout | None = None
    ) -> _RequestContextManager:
        return self.request("POST", url, timeout=timeout)


async def remove_on_node(
    data_dir: Path, jid: str, outcome: Outcome, waiting: Callable[[str], None]
) -> str | None:
    """Ask a running node to remove the account (POST /accounts/{jid}/remove), then
    tell the other nodes to end its sessions. The node's result ("account",
    "leftovers", "nothing"), or None when no node could be reached (none took the
    request): the caller removes it from the stores itself.

    A node that was sent the request has REMOVAL_TIMEOUT to answer (`waiting` gets a
    line saying so once WAIT_NOTICE_AFTER passed); one that does not answer then, or
    answers with an error, is NodeRemovalFailed: it may still be removing the account,
    and a second removal (another node's, or xmppctl's from the stores, which bypasses
    the node's cache) must not run beside it."""
    account = f"/accounts/{quote(jid, safe='@')}"
    unread = "removing the account from the stores directly"
    timeout = aiohttp.ClientTimeout(total=REMOVAL_TIMEOUT, connect=REQUEST_TIMEOUT)
    async with _admin_client(data_dir, outcome, unread) as client:
        if client is None:
            return None
        nodes, http = client
        for record, url in nodes.items():
            notice = asyncio.get_running_loop().call_later(
                WAIT_NOTICE_AFTER,
                waiting,
                f"waiting for the node at {url} to remove {jid} (up to {REMOVAL_TIMEOUT:g} s)",
            )
            try:
                async with http.post(url + account + "/remove", timeout) as response:
                    body = await response.json(content_type=None)
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
                _did_not_answer(outcome, url, record, e)  # not reached: nothing was asked
                continue
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                why = (
                    f"within {REMOVAL_TIMEOUT:g} s" if isinstance(e, TimeoutError)
                    else f"({type(e).__name__}: {e})"
                )
                raise NodeRemovalFailed(
                    f"the node at {url} was asked to remove {jid} but did not answer {why};"
                    " it may still be removing it"
                ) from None
            finally:
                notice.cancel()
            if response.status != 200 or not isinstance(body, dict):
                error = body.get("error", body) if isinstance(body, dict) else body
                raise NodeRemovalFailed(f"the node at {url}: {error}")
            outcome.done.append(f"ended {body.get('ended', 0)} session(s) on the node at {url}")
            others = {r: u for r, u in nodes.items() if r != record}
            await asyncio.gather(
                *(_tell(http, u + account + "/removed", r, outcome) for r, u in others.items())
            )
            return str(body.get("result"))
    return None


async def notify_account_change(data_dir: Path, jid: str, change: str) -> Outcome:
    """POST /accounts/{jid}/{change} to every running node ("password-changed", "removed").

    The few small local files are read in place: this runs in xmppctl, not in a node."""
    outcome = Outcome()
    path = f"/accounts/{quote(jid, safe='@')}/{change}"
    unread = f"the running nodes were not told that {jid} changed"
    async with _admin_client(data_dir, outcome, unread) as client:
        if client is not None:
            nodes, http = client
            await asyncio.gather(
                *(_tell(http, url + path, record, outcome) for record, url in nodes.items())
            )
    return outcome


async def note_account_change(data_dir: Path, jid: str, change: str) -> Outcome:
    """POST /accounts/{jid}/{change} ("registered", "unbanned") to every running node,
    for its log; only a node that does not answer is reported (as a warning)."""
    told = await notify_account_change(data_dir, jid, change)
    return Outcome(warnings=told.warnings)


async def _tell(http: AdminHTTP, url: str, record: Path, outcome: Outcome) -> None:
    node = url.split("/accounts/", 1)[0]
    try:
        async with http.post(url) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}: {body}")
            ended = int(body["ended"])
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
        _did_not_answer(outcome, node, record, e)
        return
    outcome.done.append(f"ended {ended} session(s) on the node at {node}")


async def node_statuses(data_dir: Path, outcome: Outcome) -> list[tuple[str, dict[str, Any]]]:
    """(URL, GET /status) of every node running here that answers."""
    return await _each_node(data_dir, "GET", "/status", outcome)


async def node_sessions(
    data_dir: Path, host: str | None, outcome: Outcome
) -> list[dict[str, object]] | None:
    """The sessions of every node running here (GET /sessions); None when none answers."""
    path = "/sessions" + (f"?host={quote(host)}" if host else "")
    answers = await _each_node(data_dir, "GET", path, outcome)
    if not answers:
        return None
    return [s for _, body in answers for s in body.get("sessions", [])]


async def node_components(data_dir: Path, outcome: Outcome) -> list[dict[str, object]] | None:
    """What every node running here says of its components (GET /components); None
    when none answers."""
    answers = await _each_node(data_dir, "GET", "/components", outcome)
    if not answers:
        return None
    return [c for _, body in answers for c in body.get("components", [])]


async def node_s2s(data_dir: Path, outcome: Outcome) -> list[dict[str, object]] | None:
    """The server-to-server streams of every node running here (GET /s2s), each with
    its node's name as "node" (None outside a cluster); None when no node answers, []
    when none of them federates (no `s2s` section)."""
    answers = await _each_node(data_dir, "GET", "/s2s", outcome)
    if not answers:
        return None
    return [
        {**link, "node": body.get("node")}
        for _, body in answers
        for link in body.get("s2s", [])
    ]


async def kick_on_nodes(
    data_dir: Path, jid: str, reason: str | None, everywhere: bool, outcome: Outcome
) -> list[dict[str, object]] | None:
    """Ask running nodes to end `jid`'s session(s) (POST /kick); the
    sessions ended, or None when no node answered. A cluster node ends them on any
    node, so one that answers is enough; else (`everywhere`) every node is asked, each
    knowing only its own sessions."""
    unread = "no session was ended"
    ended: list[dict[str, object]] = []
    answered = False
    async with _admin_client(data_dir, outcome, unread) as client:
        if client is None:
            return None
        nodes, http = client
        for record, url in nodes.items():
            try:
                request = {"jid": jid, "reason": reason or ""}
                body = await _json(http, "POST", url + "/kick", request)
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                _did_not_answer(outcome, url, record, e)
                continue
            answered = True
            ended.extend(body.get("ended", []))
            if not everywhere:
                break
    return ended if answered else None


class NodeRefused(Exception):
    """A running node answered with an error; the message is its reason. Not a node
    that is gone: the caller must not go around it to the stores."""


async def ask_nodes(
    data_dir: Path,
    method: str,
    path: str,
    outcome: Outcome,
    request: object = None,
    *,
    everywhere: bool = False,
) -> list[tuple[str, dict[str, Any]]] | None:
    """Send one request to the nodes running here: to the first that answers, or to
    each (`everywhere`). Their (URL, JSON answer), or None when none answered (none
    runs, or none could be reached: the warnings are in `outcome`). NodeRefused when
    a node answers with an error (the request is wrong, or the node's stores fail)."""
    answers: list[tuple[str, dict[str, Any]]] = []
    async with _admin_client(data_dir, outcome, "no node was asked") as client:
        if client is None:
            return None
        nodes, http = client
        for record, url in nodes.items():
            try:
                async with http.request(method, url + path, json=request) as response:
                    status = response.status
                    text = await response.text()
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                _did_not_answer(outcome, url, record, e)
                continue
            # It answered, so it runs: an answer that is no JSON (aiohttp's own page
            # for an unexpected error) is its failure too, never a reason to go around it.
            try:
                body = json.loads(text)
            except ValueError:
                body = " ".join(text.split())[:200]
            if status != 200 or not isinstance(body, dict):
                error = body.get("error") if isinstance(body, dict) else None
                raise NodeRefused(f"the node at {url}: {error or f'HTTP {status}: {body}'}")
            answers.append((url, body))
            if not everywhere:
                break
    return answers or None


async def drain_nodes(data_dir: Path, node: str | None) -> Outcome:
    """Ask the running nodes of this data_dir (only the one named `node`, by its cluster
    node name or pid, if given) to drain: each stops as on SIGTERM (POST /drain)."""
    outcome = Outcome()
    unread = "no node was drained"
    async with _admin_client(data_dir, outcome, unread) as client:
        if client is None:
            return outcome
        nodes, http = client
        for record, url in nodes.items():
            try:
                async with http.get(url + "/status") as response:
                    status = await response.json(content_type=None)
                name, pid = status.get("node"), str(status.get("pid"))
                if node is not None and node not in (name, pid):
                    continue
                async with http.post(url + "/drain") as response:
                    if response.status != 200:
                        raise ValueError(f"HTTP {response.status}")
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as e:
                _did_not_answer(outcome, url, record, e)
                continue
            outcome.done.append(f"draining node {name or '-'} (pid {pid}) at {url}")
    if node is not None and not outcome.done and not outcome.warnings:
        outcome.warnings.append(f"no running node here is named {node}")
    return outcome


async def _json(
    http: AdminHTTP, method: str, url: str, request: object = None
) -> dict[str, Any]:
    """A node's JSON answer; ValueError for any status but 200 or a body not an object."""
    async with http.request(method, url, json=request) as response:
        body = await response.json(content_type=None)
        if response.status != 200 or not isinstance(body, dict):
            raise ValueError(f"HTTP {response.status}: {body}")
        return body


def _did_not_answer(outcome: Outcome, url: str, record: object, error: Exception) -> None:
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        outcome.warnings.append(
            f"the node at {url} was not trusted, its certificate did not verify "
            f"({error.certificate_error}): it must chain to admin.ca_file (else the "
            "system's CAs) and be for the first of hosts; the token was not sent"
        )
        return
    outcome.warnings.append(
        f"the node at {url} did not answer ({type(error).__name__}: {error}); "
        f"if it is not running, delete {record}"
    )


async def post_to_nodes(
    data_dir: Path, path: str, request: object, outcome: Outcome
) -> list[tuple[str, dict[str, Any]]]:
    """POST `request` to `path` on every node running here: (URL, answer) of each that
    answered; the others are warnings in `outcome`."""
    return await _each_node(data_dir, "POST", path, outcome, request)


async def _each_node(
    data_dir: Path, method: str, path: str, outcome: Outcome, request: object = None
) -> list[tuple[str, dict[str, Any]]]:
    """(URL, JSON answer) of every node running here that answers; a node that fails
    or answers with an error is a warning in `outcome`, unlike in ask_nodes: these
    requests only read or notify, so one node's failure must not hide the others."""
    answers: list[tuple[str, dict[str, Any]]] = []
    async with _admin_client(data_dir, outcome, "no node was asked") as client:
        if client is None:
            return answers
        nodes, http = client
        for record, url in nodes.items():
            try:
                answers.append((url, await _json(http, method, url + path, request)))
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                _did_not_answer(outcome, url, record, e)
    return answers
