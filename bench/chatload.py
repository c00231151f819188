#!/usr/bin/env python3
"""Chat load with an exact count: every message is accounted for by its id.

tsung's chat scenario cannot say whether a server lost a message: each of
its users closes a fixed time after its own last send while others still
send to it, and it does not count what arrives while a user waits on a
global ack. Here every user stays online and reads until every id sent has
come back (or --drain-timeout), then closes its stream and reads on until
the server closes too (RFC 6120 4.4), so "never received" means the server
did not deliver it, and the latency percentiles cover every message.

Users USER_PREFIX1..N (password PASS_PREFIXi, the bench harness's scheme)
log in over STARTTLS + SASL PLAIN + bind + session + initial presence at
--arrival-rate users/s. Once all are online (a barrier) a Poisson stream of
--rate msg/s runs for --duration s, each message from a random user to a
random other one. With --procs K the users are split over K worker
processes (pin them from outside with taskset); this parent runs the
barrier, gives every worker the same start time, decides when the drain is
over and merges the per-id accounts, so a message sent by one worker and
received by another is reconciled exactly.

With --sm every user enables stream management (XEP-0198) after binding, as
mobile clients do, answers each of the server's <r/> with the number of
stanzas it has received, and acknowledges everything before it closes (so
nothing is left for the server to store offline): the server's CPU per
message then includes its acknowledgement traffic and unacked queue.

With --ports P1,P2,... (several nodes of a cluster, each on its own port)
user i connects to the port numbered i modulo their count, and --pairs says
whom each message goes to: `any` user, one on the `same` port as its
sender (nothing crosses nodes), or one on an `other` port (everything
does): bench/cluster_bench.py measures a local and a cross-node message
that way, on the same nodes under the same load.

The client is small on purpose: stanzas are written as preformatted bytes
and incoming data is scanned for `<message` ... `</message>` and our marker
in the body, not parsed as XML, so the generator's core goes to the load.

Output: one JSON object on stdout, a summary on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import resource
import socket
import ssl
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import uvloop

SCRIPT = str(Path(__file__).resolve())  # what a worker process runs
NS = 1_000_000_000
TICK_S = 0.001  # the send scheduler wakes this often and sends every message now due
STEP_TIMEOUT_S = 30.0  # one login step, or the server's answer to our close
PROGRESS_S = 0.2  # how often a worker tells the parent its counts
STREAM_END = b"</stream:stream>"
MARKER = b"chatload:"  # our messages' bodies start with it: MARKER id ':' send-ns
HEADER = (
    "<?xml version='1.0'?><stream:stream xmlns='jabber:client' "
    "xmlns:stream='http://etherx.jabber.org/streams' to='{domain}' version='1.0'>"
)
FEATURES = rb"</stream:features>|<stream:features/>"
SM_NS = b"urn:xmpp:sm:3"
SM_REQUEST = b"<r "  # the server's <r xmlns='urn:xmpp:sm:3'/>, however it quotes
ID_ATTR = re.compile(rb"""\sid=['"]([^'"]*)['"]""")


# ------------------------------------------------------------------ one client


async def starttls_socket(plan: Plan, port: int, header: bytes) -> socket.socket:
    """A socket on which the server has said <proceed/> to STARTTLS.

    The plain-text part is done on the bare socket so that TLS is set up by
    create_connection(sock=..., ssl=...): uvloop's start_tls() on a Protocol
    never delivered the server's first bytes after the handshake here."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (plan.host, port)), STEP_TIMEOUT_S)
        await loop.sock_sendall(sock, header)
        await _read_until(sock, FEATURES)
        await loop.sock_sendall(sock, b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        answer = await _read_until(sock, rb"<proceed[^>]*>|<failure")
        if answer.endswith(b"<failure"):
            raise PermissionError("STARTTLS refused")
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_until(sock: socket.socket, pattern: bytes) -> bytes:
    """What was read up to the end of `pattern`'s first match."""
    loop, data, regex = asyncio.get_running_loop(), b"", re.compile(pattern)
    while not (found := regex.search(data)):
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), STEP_TIMEOUT_S)
        if not chunk:
            raise EOFError("the server closed the connection")
        data += chunk
    return data[: found.end()]


class Client(asyncio.Protocol):
    """One user's stream. Logging in waits on patterns in a buffer; once online,
    incoming data goes straight to the scanner that counts our messages."""

    def __init__(self, index: int, tally: Tally) -> None:
        self.index = index
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pattern: re.Pattern[bytes] | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.online = False
        self.server_closed = False  # saw its </stream:stream>
        self.stream_error = False
        # Stream management: stanzas received since <enabled/> (our h), None when off.
        self.handled: int | None = None
        self.acks = 0  # <a/> sent in answer to the server's <r/>
        self.closing = False  # our </stream:stream> is sent
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self.online:
            self.scan(data)
            return
        self.buf += data
        self._match()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(EOFError("the server closed the connection"))
        if not self.done.done():
            self.done.set_result(None)

    # -- login
    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _match(self) -> None:
        if self.waiter is None or self.waiter.done() or self.pattern is None:
            return
        found = self.pattern.search(self.buf)
        if found:
            # what precedes the match (and the match) is consumed: the steps of a
            # login need nothing else, and a stray end tag left over is harmless
            matched = bytes(self.buf[: found.end()])
            del self.buf[: found.end()]
            self.waiter.set_result(matched)

    async def expect(self, pattern: bytes) -> bytes:
        """Everything read up to the end of the first match of `pattern`."""
        self.pattern = re.compile(pattern, re.DOTALL)
        self.waiter = asyncio.get_running_loop().create_future()
        self._match()
        return await asyncio.wait_for(self.waiter, STEP_TIMEOUT_S)

    async def login(self, plan: Plan, ctx: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        header = HEADER.format(domain=plan.domain).encode()
        sock = await starttls_socket(plan, plan.ports[self.index % len(plan.ports)], header)
        await loop.create_connection(lambda: self, sock=sock, ssl=ctx,
                                     server_hostname=plan.domain)
        self.send(header)
        await self.expect(FEATURES)
        user, password = plan.credentials(self.index)
        token = base64.b64encode(f"\0{user}\0{password}".encode())
        self.send(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>"
                  + token + b"</auth>")
        if (await self.expect(rb"<success|<failure")).endswith(b"<failure"):
            raise PermissionError(f"{user}: SASL PLAIN refused")
        self.send(header)
        features = await self.expect(FEATURES)
        self.send(b"<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
                  b"<resource>chatload</resource></bind></iq>")
        await self._result(b"bind")
        if b"urn:ietf:params:xml:ns:xmpp-session" in features:
            self.send(b"<iq type='set' id='sess'>"
                      b"<session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
            await self._result(b"sess")
        if plan.sm:
            self.send(b"<enable xmlns='%s' resume='true'/>" % SM_NS)
            if (await self.expect(rb"<enabled|<failed")).endswith(b"<failed"):
                raise RuntimeError(f"user {self.index}: stream management refused")
            self.handled = 0
        self.send(b"<presence/>")
        await self.expect(rb"<presence")  # our own, back (RFC 6121 4.2.2): we are available
        if self.handled is not None:
            self.handled += 1  # that presence; from now on only messages come
        self.online = True
        self.pattern = self.waiter = None
        rest, self.buf = bytes(self.buf), bytearray()
        if rest:
            self.scan(rest)

    async def _result(self, iq_id: bytes) -> None:
        head = await self.expect(rb"<iq[^>]*\sid=['\"]" + iq_id + rb"['\"][^>]*>")
        if b"error" in head[head.rfind(b"<iq"):]:
            raise RuntimeError(f"user {self.index}: iq {iq_id.decode()} failed")

    # -- online
    def scan(self, data: bytes) -> None:
        """Count every whole <message/> read so far; keep a partial one for later.

        Stream-level events are flags, so text scanned twice (a kept tail) is
        never counted twice."""
        buf = self.buf + data if self.buf else data
        now = time.monotonic_ns()
        pos = 0
        while (start := buf.find(b"<message", pos)) >= 0:
            end = buf.find(b"</message>", start)
            if end < 0:
                break
            self._between(buf[pos:start])
            self.tally.message(buf[start:end], now)
            if self.handled is not None:
                self.handled += 1
            pos = end + 10
        else:
            self._between(buf[pos:])
            # "<messa" or "</stream:str" may be cut off: the next read completes them
            self.buf = bytearray(buf[max(pos, len(buf) - len(STREAM_END)) :])
            return
        self._between(buf[pos:start])
        self.buf = bytearray(buf[start:])

    def _between(self, text: bytes | bytearray) -> None:
        if not text:
            return
        if self.handled is not None and not self.closing and SM_REQUEST in text:
            # Text kept for the next read may hold the same <r/> again: a second
            # answer is harmless, as h only counts what has come.
            self.send(b"<a xmlns='%s' h='%d'/>" % (SM_NS, self.handled))
            self.acks += 1
        if b"stream:error" in text:
            self.stream_error = True
        if STREAM_END in text:
            self.server_closed = True
            if self.transport is not None:
                self.transport.close()  # we answer the server's close with ours (TCP)

    async def close(self) -> str:
        """Send our close and read until the server's: how the stream ended."""
        if self.done.done():
            return "lost_before_close"
        if self.handled is not None:
            self.send(b"<a xmlns='%s' h='%d'/>" % (SM_NS, self.handled))
        self.send(STREAM_END)
        self.closing = True  # nothing may follow our </stream:stream>, not even an <a/>
        try:
            await asyncio.wait_for(asyncio.shield(self.done), STEP_TIMEOUT_S)
        except TimeoutError:
            assert self.transport is not None
            self.transport.abort()
            return "close_timeouts"
        return "closed_cleanly" if self.server_closed else "closed_without_stream_end"


# ------------------------------------------------------------------ one worker


@dataclass
class Plan:
    """What a worker is told on its command line."""

    host: str
    ports: list[int]  # user i connects to ports[i % len(ports)]
    pairs: str  # a message goes to "any" user, one on the "same" port, one on an "other"
    domain: str
    user_prefix: str
    pass_prefix: str
    users: list[int]  # the indices this worker logs in
    arrival_rate: float  # its share, users/s
    rate: float  # its share, msg/s
    duration: float
    size: int
    nonce: str  # tells this run's messages from a stale one (stored offline earlier)
    worker: int
    seed: int
    sm: bool  # enable stream management and answer the server's ack requests

    def credentials(self, index: int) -> tuple[str, str]:
        return f"{self.user_prefix}{index}", f"{self.pass_prefix}{index}"


@dataclass
class Tally:
    """What one worker's clients received: ids of this run, first receipt's latency."""

    nonce: bytes
    got: dict[str, int] = field(default_factory=dict)  # id -> latency ns
    dups: dict[str, int] = field(default_factory=dict)  # id -> extra receipts
    bounced: list[str] = field(default_factory=list)
    stale: int = 0  # ours, but from an earlier run
    foreign: int = 0  # messages without our marker

    def message(self, stanza: bytes | bytearray, now: int) -> None:
        head = stanza[: stanza.find(b">")]
        if b"type='error'" in head or b'type="error"' in head:
            found = ID_ATTR.search(head)
            self.bounced.append(found.group(1).decode() if found else "")
            return
        at = stanza.find(MARKER)
        if at < 0:
            self.foreign += 1
            return
        at += len(MARKER)
        colon = stanza.find(b":", at)
        id_ = stanza[at:colon]
        if not id_.startswith(self.nonce):
            self.stale += 1
            return
        key = id_.decode()
        if key in self.got:
            self.dups[key] = self.dups.get(key, 0) + 1
            return
        stamp = stanza[colon + 1 : stanza.find(b" ", colon)]
        self.got[key] = now - int(stamp)


class Worker:
    """Logs in its users, sends its share of the stream, reads until told to close."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.tally = Tally(plan.nonce.encode())
        self.clients: dict[int, Client] = {}
        self.login_errors: dict[str, int] = {}
        self.sent_ns: list[int] = []  # index = sequence number of the id
        self.unsendable = 0  # due from a user whose connection had gone
        self.sending = True
        self.lag_ns: list[int] = []  # per message: actual write time - scheduled time
        self.cpu_send_s = 0.0
        # Writes never wait: what the server has not taken yet queues in our transports.
        # The latency includes that wait; this says how much was queued at worst.
        self.backlog_max = 0

    async def log_in(self) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the bench's certificates are self-signed
        gap = 1.0 / self.plan.arrival_rate
        logins = []
        for n, index in enumerate(self.plan.users):
            client = Client(index, self.tally)
            logins.append(asyncio.ensure_future(self._log_in(client, ctx, n * gap)))
        await asyncio.gather(*logins)

    async def _log_in(self, client: Client, ctx: ssl.SSLContext, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await client.login(self.plan, ctx)
        except (OSError, EOFError, TimeoutError, PermissionError, RuntimeError) as exc:
            reason = type(exc).__name__
            self.login_errors[reason] = self.login_errors.get(reason, 0) + 1
            if client.transport is not None:
                client.transport.abort()
            return
        self.clients[client.index] = client

    async def send(self, t0: int, online: list[int]) -> None:
        """A Poisson stream from t0 for `duration` s, written on a coarse tick."""
        plan = self.plan
        rng = random.Random(plan.seed)
        senders = sorted(self.clients.values(), key=lambda c: c.index)
        heads = {
            i: f"<message type='chat' to='{plan.user_prefix}{i}@{plan.domain}' id='".encode()
            for i in online
        }
        pad = b"x" * max(0, plan.size - 40)
        prefix = plan.nonce.encode() + b"." + str(plan.worker).encode() + b"."
        end, due = t0 + int(plan.duration * NS), t0 + int(rng.expovariate(plan.rate) * NS)
        await asyncio.sleep(max(0, t0 - time.monotonic_ns()) / NS)
        ports = len(plan.ports)

        def pair(sender: int, to: int) -> bool:
            if plan.pairs == "same":
                return sender % ports == to % ports
            if plan.pairs == "other":
                return sender % ports != to % ports
            return True

        cpu0 = _cpu_s()
        while due < end and senders and len(online) > 1:
            now = time.monotonic_ns()
            while due <= now and due < end:
                sender = senders[rng.randrange(len(senders))]
                to = online[rng.randrange(len(online))]
                while to == sender.index or not pair(sender.index, to):
                    to = online[rng.randrange(len(online))]
                if sender.done.done():
                    self.unsendable += 1
                else:
                    id_ = prefix + str(len(self.sent_ns)).encode()
                    sender.send(b"%s%s'><body>%s%s:%d %s</body></message>"
                                % (heads[to], id_, MARKER, id_, now, pad))
                    self.sent_ns.append(now)
                    self.lag_ns.append(now - due)
                due += int(rng.expovariate(plan.rate) * NS)
            await asyncio.sleep(TICK_S)
        self.cpu_send_s = _cpu_s() - cpu0
        self.sending = False

    def progress(self) -> dict[str, Any]:
        backlog = sum(c.transport.get_write_buffer_size() for c in self.clients.values()
                      if c.transport is not None and not c.done.done())
        self.backlog_max = max(self.backlog_max, backlog)
        return {"ev": "progress", "sent": len(self.sent_ns), "recv": len(self.tally.got),
                "bounced": len(self.tally.bounced), "sending": self.sending}

    async def close(self) -> dict[str, int]:
        ends = await asyncio.gather(*(c.close() for c in self.clients.values()))
        counts = {"stream_errors": sum(c.stream_error for c in self.clients.values())}
        for how in ends:
            counts[how] = counts.get(how, 0) + 1
        return counts

    def result(self, streams: dict[str, int]) -> dict[str, Any]:
        return {
            "ev": "result", "worker": self.plan.worker, "sent_ns": self.sent_ns,
            "got": self.tally.got, "dups": self.tally.dups, "bounced": self.tally.bounced,
            "stale": self.tally.stale, "foreign": self.tally.foreign,
            "unsendable": self.unsendable, "lag_ms": _dist_ms(self.lag_ns),
            "write_backlog_max_bytes": self.backlog_max,
            "cpu_send_s": round(self.cpu_send_s, 3), "cpu_s": round(_cpu_s(), 3),
            "login_errors": self.login_errors, "streams": streams,
            "sm_acks": sum(c.acks for c in self.clients.values()),
        }


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def run_worker(plan: Plan) -> None:
    """The worker's side of the parent's protocol: JSON lines, commands on stdin."""
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    worker = Worker(plan)
    cpu0, start = _cpu_s(), time.time()
    await worker.log_in()
    _say({"ev": "online", "online": sorted(worker.clients), "cpu_login_s": _cpu_s() - cpu0,
          "login_start_epoch": start, "login_end_epoch": time.time()})
    go = json.loads(await commands.readline())
    if go["cmd"] == "go":
        sending = asyncio.ensure_future(worker.send(go["t0"], go["online"]))
        closing = asyncio.ensure_future(commands.readline())
        while not closing.done():
            _say(worker.progress())
            await asyncio.wait([closing, sending], timeout=PROGRESS_S)
            if sending.done():
                sending.result()  # a failure ends the worker: the parent then stops too
    _say(worker.result(await worker.close()))


# ------------------------------------------------------------------ the parent


class Child:
    """A worker process as the parent sees it: its latest report."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.online: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.progress: dict[str, Any] = {"sent": 0, "recv": 0, "bounced": 0, "sending": True}
        self.result: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def listen(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if message["ev"] == "online":
                self.online.set_result(message)
            elif message["ev"] == "progress":
                self.progress = message
            else:
                self.result.set_result(message)
        for future in (self.online, self.result):
            if not future.done():
                future.set_exception(EOFError(f"worker {self.proc.pid} exited"))

    def tell(self, command: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(command) + "\n").encode())


def split(users: int, procs: int) -> list[list[int]]:
    """User indices 1..users in `procs` contiguous blocks of nearly equal size."""
    bounds = [1 + users * k // procs for k in range(procs + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(procs)]


async def spawn(args: argparse.Namespace, nonce: str) -> list[Child]:
    children = []
    for worker, block in enumerate(split(args.users, args.procs)):
        share = len(block) / args.users
        plan = Plan(args.host, args.ports, args.pairs, args.domain, args.user_prefix,
                    args.pass_prefix,
                    block, args.arrival_rate * share, args.rate * share, args.duration,
                    args.size, nonce, worker, args.seed * 1000 + worker, args.sm)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, SCRIPT, "--worker", json.dumps(plan.__dict__),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 30)
        children.append(Child(proc))
    return children


async def drain(children: list[Child], timeout: float) -> float | None:
    """Wait until no worker sends and every id sent came back somehow; seconds the drain
    took after the last send, None if it timed out."""
    while any(c.progress["sending"] for c in children):
        _check(children)
        await asyncio.sleep(PROGRESS_S / 2)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        _check(children)
        totals = [sum(c.progress[k] for c in children) for k in ("sent", "recv", "bounced")]
        if totals[1] + totals[2] >= totals[0]:
            return time.monotonic() - start
        await asyncio.sleep(PROGRESS_S / 2)
    return None


def _check(children: list[Child]) -> None:
    """A worker that died (its output ended early) ends the run."""
    for child in children:
        if child.result.done():
            child.result.result()


async def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    nonce = os.urandom(4).hex()
    children = await spawn(args, nonce)
    listeners = [asyncio.ensure_future(c.listen()) for c in children]
    login_start = time.monotonic()
    barrier = args.barrier_timeout or args.users / args.arrival_rate + 2 * STEP_TIMEOUT_S
    try:
        ready = await asyncio.wait_for(asyncio.gather(*(c.online for c in children)), barrier)
    except TimeoutError:
        ready = None
    login_s = time.monotonic() - login_start
    online = sorted(i for r in ready or [] for i in r["online"])
    t0 = time.monotonic_ns() + NS // 5  # every worker is told before it comes
    epoch0 = time.time() + (t0 - time.monotonic_ns()) / NS
    for child in children:
        child.tell({"cmd": "go", "t0": t0, "online": online} if ready else {"cmd": "stop"})
    drained = await drain(children, args.drain_timeout) if ready else None
    for child in children:
        child.tell({"cmd": "close"})
    results = await asyncio.gather(*(c.result for c in children))
    await asyncio.gather(*listeners, *(c.proc.wait() for c in children))
    summary = account(nonce, results, epoch0, args.duration)
    summary.update({
        "tool": "chatload", "users": args.users, "users_online": len(online),
        "barrier_timed_out": ready is None, "login_s": round(login_s, 2),
        "login_errors": _add(r["login_errors"] for r in results),
        "offered_rate": args.rate, "duration_s": args.duration, "procs": args.procs,
        "sm": args.sm,
        "drain_s": None if drained is None else round(drained, 2),
        "drain_timed_out": bool(ready) and drained is None,
        "generator_cpu_s": round(_cpu_s() + _children_cpu_s(), 3),
        # The workers' CPU while their users logged in: near login_s per worker process
        # means the generator, not the server, set the login rate.
        "generator_login_cpu_s": round(sum(r["cpu_login_s"] for r in ready or []), 3),
        # From the first login to the last user online, without the workers' start
        # (login_s counts from their spawn: interpreter and imports, 0.3-0.6 s here).
        "login_start_epoch": min((r["login_start_epoch"] for r in ready or []), default=None),
        "login_end_epoch": max((r["login_end_epoch"] for r in ready or []), default=None),
    })
    return summary


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _add(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def account(nonce: str, results: list[dict[str, Any]], epoch0: float,
            duration: float) -> dict[str, Any]:
    """The run's exact account, by id, over every worker's sends and receipts."""
    sent = {
        f"{nonce}.{r['worker']}.{seq}": ns for r in results for seq, ns in enumerate(r["sent_ns"])
    }
    times = [ns for r in results for ns in r["sent_ns"]]
    got: dict[str, int] = {}
    receipts: dict[str, int] = {}
    for r in results:
        for id_, latency in r["got"].items():
            receipts[id_] = receipts.get(id_, 0) + 1 + r["dups"].get(id_, 0)
            got.setdefault(id_, latency)
    bounced = {id_ for r in results for id_ in r["bounced"]}
    once = sum(1 for id_ in sent if receipts.get(id_) == 1)
    missing = sorted((id_ for id_ in sent if id_ not in receipts and id_ not in bounced),
                     key=lambda id_: sent[id_])
    span = (max(times) - min(times)) / NS if len(times) > 1 else 0.0
    return {
        "nonce": nonce, "sent": len(sent), "received_once": once,
        "duplicates": sum(1 for id_ in sent if receipts.get(id_, 0) > 1),
        "missing": len(missing), "missing_first": missing[:10],
        "bounced": len(bounced & sent.keys()),
        "unexpected": sum(1 for id_ in receipts if id_ not in sent),
        "stale": sum(r["stale"] for r in results),
        "foreign": sum(r["foreign"] for r in results),
        "unsendable": sum(r["unsendable"] for r in results),
        "delivery_ratio": round(len(receipts.keys() & sent) / len(sent), 6) if sent else None,
        "exact": bool(sent) and once == len(sent),
        "latency_ms": _dist_ms(list(got.values())),
        "send_rate": round(len(sent) / span, 1) if span else None,
        "delivered_rate_in_send_phase": _delivered_rate(sent, got, duration),
        "send_start_epoch": round(epoch0, 3), "send_end_epoch": round(epoch0 + duration, 3),
        "lag_ms": [r["lag_ms"] for r in results],
        "write_backlog_max_bytes": [r["write_backlog_max_bytes"] for r in results],
        "worker_cpu_send_s": [r["cpu_send_s"] for r in results],
        "worker_cpu_s": [r["cpu_s"] for r in results],
        "streams": _add(r["streams"] for r in results),
        "sm_acks": sum(r["sm_acks"] for r in results),
    }


def _delivered_rate(sent: dict[str, int], got: dict[str, int], duration: float) -> float | None:
    """Messages received while the send phase ran, per second of it."""
    if not sent or duration <= 0:
        return None
    t0, t1 = min(sent.values()), min(sent.values()) + int(duration * NS)
    inside = sum(1 for id_, lat in got.items() if id_ in sent and sent[id_] + lat <= t1)
    return round(inside / ((t1 - t0) / NS), 1)


def _dist_ms(values_ns: list[int]) -> dict[str, Any] | None:
    if not values_ns:
        return None
    v = sorted(values_ns)

    def pick(p: float) -> float:
        return round(v[min(len(v) - 1, int(p * len(v)))] / 1e6, 2)

    return {"n": len(v), "mean": round(sum(v) / len(v) / 1e6, 2), "p50": pick(0.5),
            "p95": pick(0.95), "p99": pick(0.99), "max": round(v[-1] / 1e6, 2)}


def human(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"] or {}
    lag = max((w["max"] for w in summary["lag_ms"] if w), default=None)
    return (
        f"chatload: {summary['users_online']}/{summary['users']} users online in "
        f"{summary['login_s']} s (failures: {summary['login_errors'] or 'none'}); sent "
        f"{summary['sent']} at {summary['send_rate']} msg/s "
        f"(offered {summary['offered_rate']:g}), received once {summary['received_once']}, "
        f"duplicates {summary['duplicates']}, missing {summary['missing']}, bounced "
        f"{summary['bounced']}; latency ms p50/p95/p99/max {lat.get('p50')}/{lat.get('p95')}/"
        f"{lat.get('p99')}/{lat.get('max')}; drain {summary['drain_s']} s; generator lag max "
        f"{lag} ms, write backlog max {summary['write_backlog_max_bytes']} B, CPU in send "
        f"phase {summary['worker_cpu_send_s']} s; streams "
        f"{summary['streams']}; stream management acks {summary['sm_acks']}; "
        f"{'EXACT' if summary['exact'] else 'NOT EXACT'}"
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5222)
    p.add_argument("--ports", default="",
                   help="P1,P2,...: user i connects to the port numbered i modulo their count")
    p.add_argument("--pairs", choices=("any", "same", "other"), default="any",
                   help="recipients: any user, one on the sender's port, one on another port")
    p.add_argument("--domain", default=os.environ.get("DOMAIN", "bench.local"))
    p.add_argument("--user-prefix", default=os.environ.get("USER_PREFIX", "user"))
    p.add_argument("--pass-prefix", default=os.environ.get("PASS_PREFIX", "pass"))
    p.add_argument("--users", type=int, default=100)
    p.add_argument("--arrival-rate", type=float, default=200.0, help="logins per second")
    p.add_argument("--rate", type=float, default=500.0, help="messages per second, in total")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of sending")
    p.add_argument("--size", type=int, default=64, help="body bytes (padded, as tsung's)")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--barrier-timeout", type=float, default=0.0,
                   help="seconds for every user to be online (0: users/arrival-rate + 60)")
    p.add_argument("--procs", type=int, default=1, help="worker processes")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--sm", action="store_true",
                   help="enable stream management (XEP-0198) and answer ack requests")
    args = p.parse_args(argv)
    args.ports = [int(port) for port in args.ports.split(",")] if args.ports else [args.port]
    if args.pairs == "other" and len(args.ports) < 2:
        p.error("--pairs other needs at least two --ports")
    if args.users < 2 or args.procs < 1 or args.procs > args.users or args.rate <= 0:
        p.error("need --users >= 2, 1 <= --procs <= --users and --rate > 0")
    return args


def main(argv: list[str]) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if argv[:1] == ["--worker"]:
        uvloop.run(run_worker(Plan(**json.loads(argv[1]))))
        return 0
    summary = uvloop.run(run_parent(parse_args(argv)))
    print(json.dumps(summary))
    print(human(summary), file=sys.stderr)
    return 0 if summary["exact"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
