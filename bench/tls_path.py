"""Server CPU per forwarded message of the transport alone: uvloop's SSL, xmppd's TLSLayer, no TLS.

usage: python bench/tls_path.py [--mode uvloop|layer|plain ...] [--users N] [--rate R]
                                [--seconds S] [--size B] [--passes P]

A server process pinned to core 0 (SERVER_CPU) accepts N connections and
forwards fixed-size frames, each naming a target connection in its first
six bytes, to that connection, writing at the end of the loop iteration as
xmppd does (one write per connection per iteration). A client process pinned
to core 1 (CLIENT_CPU) opens the N connections and sends a Poisson stream of
R frames/s to random targets for S seconds, then waits for every frame to
come back. The server's CPU (utime + stime from /proc) over the send phase,
divided by the frames, is what the transport costs per message around an
application that does almost nothing: the part of xmppd's ~100 us per chat
message that bench/conn_path.py leaves out.

Modes: `uvloop` is how xmppd served TLS until this file was written
(`create_server(ssl=...)`, a BufferedProtocol on uvloop's SSL transport);
`layer` is a plain TCP transport with xmppd.tlslayer.TLSLayer in the
protocol; `plain` is no TLS at all (the floor: sockets, loop, the frame
handling). The modes alternate within each pass, so each sees the same
machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from xmppd.tls import ensure_self_signed, server_tls
from xmppd.tlslayer import TLSLayer

_BUF = memoryview(bytearray(65536))


class Forwarder:
    """The application: split frames, queue each for its target, flush after the iteration."""

    conns: list[Forwarder] = []

    def __init__(self, size: int) -> None:
        self.size = size
        self.rest = b""
        self.out: list[bytes] = []
        self.flush_scheduled = False
        Forwarder.conns.append(self)

    def frames(self, data: bytes) -> None:
        if self.rest:
            data = self.rest + data
        size = self.size
        end = len(data) - len(data) % size
        for i in range(0, end, size):
            frame = data[i : i + size]
            Forwarder.conns[int(frame[:6])].queue(frame)
        self.rest = data[end:]

    def queue(self, frame: bytes) -> None:
        self.out.append(frame)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        data = b"".join(self.out)
        self.out.clear()
        self.write(data)

    def write(self, data: bytes) -> None:
        raise NotImplementedError


class UvloopTLS(Forwarder, asyncio.BufferedProtocol):
    """On uvloop's SSL transport (created with ssl= on the listener)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUF

    def buffer_updated(self, nbytes: int) -> None:
        self.frames(_BUF[:nbytes].tobytes())

    def write(self, data: bytes) -> None:
        self.transport.write(data)


class Plain(UvloopTLS):
    """No TLS (listener without ssl=)."""


class LayerTLS(Forwarder, asyncio.BufferedProtocol):
    """Plain TCP transport, TLS in the protocol through TLSLayer (its fast path inlined,
    as xmppd/connection.py does)."""

    context: ssl.SSLContext

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.tls = TLSLayer(self.context)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _BUF

    def buffer_updated(self, nbytes: int) -> None:
        tls = self.tls
        if tls.ready:
            data = tls.receive(_BUF[:nbytes])
        elif tls.handshake(_BUF[:nbytes]):
            data = tls.receive(b"")
        else:
            data = b""
        if data:
            self.frames(data)
        if tls.outgoing.pending:
            self.transport.write(tls.output())

    def write(self, data: bytes) -> None:
        self.transport.write(self.tls.encrypt(data))


async def serve(mode: str, size: int, port_file: Path, cert: Path, key: Path) -> None:
    context = server_tls(cert, key).context
    loop = asyncio.get_running_loop()
    kinds: dict[str, type[Forwarder]] = {"uvloop": UvloopTLS, "layer": LayerTLS, "plain": Plain}
    factory = kinds[mode]
    LayerTLS.context = context
    server = await loop.create_server(
        lambda: factory(size),  # type: ignore[arg-type,return-value]
        "127.0.0.1", 0, ssl=context if mode == "uvloop" else None, backlog=4096,
    )
    port = server.sockets[0].getsockname()[1]
    await asyncio.to_thread(port_file.write_text, str(port))
    await asyncio.Event().wait()


class Client(asyncio.Protocol):
    def __init__(self, size: int, got: list[int], done: asyncio.Event, total: list[int]) -> None:
        self.size, self.got, self.done, self.total = size, got, done, total
        self.pending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.pending += len(data)
        n, self.pending = divmod(self.pending, self.size)
        self.got[0] += n
        if self.got[0] >= self.total[0] > 0:
            self.done.set()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime


async def drive(args: argparse.Namespace, mode: str, port: int, pid: int) -> float:
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    got, total = [0], [0]
    done = asyncio.Event()
    conns: list[Client] = []
    for _ in range(args.users):
        _, c = await loop.create_connection(
            lambda: Client(args.size, got, done, total), "127.0.0.1", port,
            ssl=None if mode == "plain" else ctx,
        )
        conns.append(c)  # type: ignore[arg-type]
    rng = random.Random(1)
    pad = b"x" * (args.size - 6)
    frames = [b"%06d" % rng.randrange(args.users) + pad for _ in range(4096)]
    await asyncio.sleep(1.0)  # handshakes and tickets settle
    sent = 0
    hz = os.sysconf("SC_CLK_TCK")
    before = cpu_ticks(pid)
    start = time.monotonic()
    due = start
    end = start + args.seconds
    while due < end:
        now = time.monotonic()
        while due <= now:
            conns[rng.randrange(args.users)].transport.write(frames[sent & 4095])
            sent += 1
            due += rng.expovariate(args.rate)
        await asyncio.sleep(0.001)
    total[0] = sent
    if got[0] < sent:
        await asyncio.wait_for(done.wait(), 60)
    used = (cpu_ticks(pid) - before) / hz
    for c in conns:
        c.transport.close()
    return used / sent * 1e6


def run_pass(args: argparse.Namespace, mode: str, cert: Path, key: Path, tmp: Path) -> float:
    port_file = tmp / f"port-{mode}"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        ["taskset", "-c", args.server_cpu, sys.executable, __file__, "--serve", mode,
         "--size", str(args.size), "--port-file", str(port_file), "--cert", str(cert),
         "--key", str(key)],
    )
    try:
        for _ in range(500):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.02)
        port = int(port_file.read_text())
        os.sched_setaffinity(0, {int(args.client_cpu)})
        return uvloop.run(drive(args, mode, port, server.pid))
    finally:
        server.terminate()
        server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", action="append", choices=["uvloop", "layer", "plain"])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=6000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--size", type=int, default=300, help="bytes per frame")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--server-cpu", default=os.environ.get("SERVER_CPU", "0"))
    parser.add_argument("--client-cpu", default=os.environ.get("CLIENT_CPU", "1"))
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cert", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        uvloop.run(serve(args.serve, args.size, args.port_file, args.cert, args.key))
        return 0
    modes = args.mode or ["uvloop", "layer", "plain"]
    results: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        cert, key = ensure_self_signed(tmp, ["localhost"])
        for _ in range(args.passes):
            for mode in modes:
                us = run_pass(args, mode, cert, key, tmp)
                results[mode].append(us)
                sys.stderr.write(f"{mode}: {us:.1f} us per message\n")
    summary = {m: {"runs": [round(r, 1) for r in rs], "best": round(min(rs), 1)}
               for m, rs in results.items()}
    sys.stdout.write(json.dumps({"users": args.users, "rate": args.rate, "size": args.size,
                                 "seconds": args.seconds, "results": summary}) + "\n")
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main())
