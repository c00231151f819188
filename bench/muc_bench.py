#!/usr/bin/env python3
"""One room, many occupants over two cluster nodes: fan-out latency and CPU per delivery.

    .venv/bin/python bench/muc_bench.py                      # 1,000 occupants, ~2-3 min
    .venv/bin/python bench/muc_bench.py --occupants 200 --rate 5 --duration 10

`xmppd --workers 2` (a cluster on a redis-server this script starts, the
embedded SQLite store shared by the workers, no cache) with the `muc`
module; OCCUPANTS users log in (the kernel spreads the connections over the
two workers, SO_REUSEPORT) and join one room, so about half the occupants
are on the node that does not run the room (the room's owner,
docs/architecture.md "Multi-user chat"). Then RATE groupchat messages a
second for DURATION s, each from the next occupant in turn; the room sends
each to every occupant (the sender included), so each message is
OCCUPANTS deliveries. Every client counts every copy it gets by the id in
the body.

Figures:
- fan-out latency: for each delivery, send to receipt (the clients stamp
  with one process's monotonic clock); and per message, send to the last
  occupant's receipt (the whole fan-out);
- CPU: the workers' CPU (summed, from /proc, sampled every 50 ms) from the
  first send to the last receipt, per delivery and per groupchat message;
  Redis' beside it;
- how many stanzas crossed nodes (the workers' xmppd_cluster_forwards_total).

The load generator (this process, uvloop, the small client of
bench/chatload.py: stanzas as preformatted bytes, received data scanned,
not parsed) shares the machine's cores with the workers: latency includes
its queueing. The joins (each sends the newcomer's presence to everyone:
OCCUPANTS^2 / 2 presences in all) are not measured. Results: one JSON object
in bench/results/muc-<stamp>/result.json, and the report as report.md there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from chatload import MARKER, Client, Plan  # noqa: E402
from cluster_nodes import (  # noqa: E402
    DOMAIN,
    Sampler,
    Server,
    redis,
    register,
    scrape,
    worker_pids,
    write_config,
)

from xmppd.storage.devservices import free_ports  # noqa: E402

ROOM = f"bench@conference.{DOMAIN}"


def modules(n: int) -> str:
    """The config's modules: MUC, room for `n` occupants."""
    return f"""\
modules:
  disco: {{}}
  roster: {{}}
  presence: {{}}
  muc: {{max_occupants: {n + 10}, max_history: 0}}
"""


class Occupant:
    """What one client got from the room: its join's end (the subject), and the
    receipt time of each benchmark message (by index)."""

    def __init__(self, nonce: bytes) -> None:
        self.nonce = nonce
        self.joined = asyncio.get_running_loop().create_future()
        self.got: dict[int, int] = {}  # message index -> receipt monotonic ns
        self.dups = 0
        self.changed: asyncio.Event | None = None

    def message(self, stanza: bytes | bytearray, now: int) -> None:
        at = stanza.find(MARKER)
        if at < 0:
            if b"<subject" in stanza and not self.joined.done():
                self.joined.set_result(None)
            return
        at += len(MARKER)
        colon = stanza.find(b":", at)
        id_ = bytes(stanza[at:colon])
        if not id_.startswith(self.nonce):
            return
        index = int(id_[len(self.nonce):])
        if index in self.got:
            self.dups += 1
            return
        self.got[index] = now
        if self.changed is not None:
            self.changed.set()


async def run_load(
    args: argparse.Namespace, port: int, before_talk: Callable[[], Awaitable[None]]
) -> dict[str, Any]:
    """Log in, join, talk, wait for every copy: the clients' side of the figures
    (`before_talk` is awaited once everyone is in the room)."""
    nonce = f"{int(time.time())}-".encode()
    plan = Plan(
        host="127.0.0.1", ports=[port], pairs="any", domain=DOMAIN, user_prefix="user",
        pass_prefix="pass", users=[], arrival_rate=0, rate=0, duration=0, size=0, nonce="",
        worker=0, seed=0, sm=False,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    occupants = [Occupant(nonce) for _ in range(args.occupants)]
    clients = [Client(i + 1, occupants[i]) for i in range(args.occupants)]  # type: ignore[arg-type]
    gate = asyncio.Semaphore(50)

    async def login(client: Client) -> None:
        async with gate:
            await client.login(plan, ctx)

    started = time.monotonic()
    await asyncio.gather(*(login(c) for c in clients))
    login_s = time.monotonic() - started
    print(f"{len(clients)} logged in in {login_s:.1f} s; joining ...", file=sys.stderr)

    def join(i: int) -> None:
        clients[i].send(
            f"<presence to='{ROOM}/u{i}'><x xmlns='http://jabber.org/protocol/muc'>"
            "<history maxstanzas='0'/></x></presence>".encode()
        )

    # The first join makes the room (legacy join: an instant room), the rest follow
    # in waves, each waiting for the previous one (a presence to everyone per join).
    clients[0].send(f"<presence to='{ROOM}/u0'/>".encode())
    await asyncio.wait_for(occupants[0].joined, 60)
    started = time.monotonic()
    wave = 50
    for first in range(1, len(clients), wave):
        batch = range(first, min(first + wave, len(clients)))
        for i in batch:
            join(i)
        await asyncio.wait_for(asyncio.gather(*(occupants[i].joined for i in batch)), 120)
    join_s = time.monotonic() - started
    print(f"{len(clients)} in the room in {join_s:.1f} s; talking ...", file=sys.stderr)
    await before_talk()
    connected = sum(not c.done.done() for c in clients)

    count = int(args.rate * args.duration)
    sent_ns: list[int] = []
    send_start = time.time()
    t0 = time.monotonic()
    for k in range(count):
        due = t0 + k / args.rate
        if (wait := due - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        now = time.monotonic_ns()
        sent_ns.append(now)
        sender = clients[k % len(clients)]
        sender.send(
            f"<message to='{ROOM}' type='groupchat'><body>".encode()
            + MARKER + nonce + str(k).encode() + b":" + str(now).encode() + b" hello"
            + b"</body></message>"
        )
    send_end = time.time()
    # Wait until every occupant has every message, or the drain timeout.
    changed = asyncio.Event()
    for occupant in occupants:
        occupant.changed = changed
    deadline = time.monotonic() + args.drain_timeout
    while sum(len(o.got) for o in occupants) < count * len(occupants):
        if (left := deadline - time.monotonic()) <= 0:
            break
        changed.clear()
        try:
            await asyncio.wait_for(changed.wait(), left)
        except TimeoutError:
            break
    drain_end = time.time()
    latencies = sorted(
        got - sent_ns[k] for o in occupants for k, got in o.got.items()
    )
    fanout = sorted(
        max(o.got[k] for o in occupants) - sent_ns[k]
        for k in range(count) if all(k in o.got for o in occupants)
    )
    still = sum(not c.done.done() for c in clients)
    for client in clients:
        if client.transport is not None:
            client.transport.close()
    return {
        "occupants": len(clients),
        "connected_at_talk": connected,
        "connected_at_end": still,
        "login_s": round(login_s, 1),
        "join_s": round(join_s, 1),
        "messages": count,
        "deliveries_expected": count * len(clients),
        "deliveries": len(latencies),
        "duplicates": sum(o.dups for o in occupants),
        "send_start_epoch": send_start,
        "send_end_epoch": send_end,
        "drain_end_epoch": drain_end,
        "delivery_latency_ms": dist_ms(latencies),
        "fanout_latency_ms": dist_ms(fanout),
    }


def dist_ms(values_ns: list[int]) -> dict[str, float] | None:
    if not values_ns:
        return None

    def at(q: float) -> float:
        return round(values_ns[min(len(values_ns) - 1, int(q * len(values_ns)))] / 1e6, 1)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)}


def run(
    args: argparse.Namespace, config: Path, port: int, redis_pid: int, out: Path
) -> dict[str, Any]:
    data_dir = config.parent / "data"
    server = Server(config, 2, out / "server.log")
    try:
        found = worker_pids(data_dir)
        urls = [u for _, u in found]
        workers, redis = Sampler([p for p, _ in found]), Sampler([redis_pid])
        workers.start()
        redis.start()
        before: dict[str, float] = {}

        async def before_talk() -> None:
            before.update(await scrape(data_dir, urls))

        async def load() -> dict[str, Any]:
            return await run_load(args, port, before_talk)

        result = uvloop.run(load())
        after = asyncio.run(scrape(data_dir, urls))
        workers.done.set()
        redis.done.set()
        workers.join()
        redis.join()
    finally:
        server.stop()
    logged = (out / "server.log").read_text()
    start, end = result["send_start_epoch"], result["drain_end_epoch"]
    cpu = workers.at(end) - workers.at(start)
    redis_cpu = redis.at(end) - redis.at(start)
    deliveries = result["deliveries"] or 1
    forwards = after.get("xmppd_cluster_forwards_total{in}", 0.0) - before.get(
        "xmppd_cluster_forwards_total{in}", 0.0
    )
    result.update({
        "server_cpu_s": round(cpu, 3),
        "server_cpu_us_per_delivery": round(1e6 * cpu / deliveries, 1),
        "server_cpu_ms_per_message": round(1e3 * cpu / max(1, result["messages"]), 2),
        "redis_cpu_us_per_delivery": round(1e6 * redis_cpu / deliveries, 1),
        "cross_node_stanzas": int(forwards),
        # A node taken for dead by the other (its heartbeat expired), from the log.
        "reaps": logged.count("missed its heartbeats"),
        # Loop stalls (a 100 ms timer late by more than 0.1 s / 1 s), both workers:
        # from the start to the talk (logins and joins), then during the talk.
        "loop_lags_joins": lags(before),
        "loop_lags_talk": {k: v - lags(before)[k] for k, v in lags(after).items()},
        "loadavg": open("/proc/loadavg").read().split()[:3],
    })
    return result


def lags(metrics: dict[str, float]) -> dict[str, int]:
    """How many times the workers' loops were late by more than 0.1 s and 1 s."""
    count = metrics.get("xmppd_event_loop_lag_seconds_count", 0.0)
    return {
        f"over_{bound}s": int(
            count - metrics.get(f"xmppd_event_loop_lag_seconds_bucket{{{bound}}}", 0.0)
        )
        for bound in ("0.1", "1.0")
    }


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    d, f = r["delivery_latency_ms"] or {}, r["fanout_latency_ms"] or {}
    return "\n".join([
        "# One room over two nodes (bench/muc_bench.py)",
        "",
        f"{r['occupants']} occupants of one room, `xmppd --workers 2` on one Redis; "
        f"{r['messages']} groupchat messages at {args.rate}/s, each from the next "
        f"occupant; load average at the end {' '.join(r['loadavg'])}.",
        "",
        "| deliveries (expected) | duplicates | delivery latency ms p50/p90/p99/max | "
        "whole fan-out ms p50/p90/p99/max | server CPU us/delivery | server CPU ms/message | "
        "Redis CPU us/delivery | stanzas that crossed nodes |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['deliveries']} ({r['deliveries_expected']}) | {r['duplicates']} | "
        f"{d.get('p50')}/{d.get('p90')}/{d.get('p99')}/{d.get('max')} | "
        f"{f.get('p50')}/{f.get('p90')}/{f.get('p99')}/{f.get('max')} | "
        f"{r['server_cpu_us_per_delivery']} | {r['server_cpu_ms_per_message']} | "
        f"{r['redis_cpu_us_per_delivery']} | {r['cross_node_stanzas']} |",
        "",
        f"Logins took {r['login_s']} s, the joins {r['join_s']} s (not measured further); "
        f"clients connected when the talk began: {r['connected_at_talk']}, at the end: "
        f"{r['connected_at_end']}. Nodes reaped by the other (a stalled heartbeat): "
        f"{r['reaps']}. Loop stalls over 0.1 s / 1 s (both workers): logins and joins "
        f"{r['loop_lags_joins']['over_0.1s']} / {r['loop_lags_joins']['over_1.0s']}, "
        f"talk {r['loop_lags_talk']['over_0.1s']} / {r['loop_lags_talk']['over_1.0s']}.",
        "",
        "Caveat: the load generator (one process) runs on the same cores as the two "
        "workers; latencies include its queueing, and CPU per delivery is the steadier "
        "figure.",
    ]) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--occupants", type=int, default=1000)
    p.add_argument("--rate", type=float, default=5.0, help="groupchat messages per second")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of talk")
    p.add_argument("--drain-timeout", type=float, default=60.0)
    p.add_argument("--iterations", type=int, default=4096, help="PBKDF2 rounds of the accounts")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    args = p.parse_args()
    out = args.out or BENCH / "results" / time.strftime("muc-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with redis() as (url, redis_pid), \
            tempfile.TemporaryDirectory(prefix="xmppd-muc-bench-") as tmp:
        port = free_ports(1)[0]
        config = write_config(
            Path(tmp), port, url, args.iterations, extra=modules(args.occupants)
        )
        print(f"registering {args.occupants} users ...", file=sys.stderr)
        register(config, args.occupants)
        result = run(args, config, port, redis_pid, out)
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    text = report(result, args)
    (out / "report.md").write_text(text)
    print(text)
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
