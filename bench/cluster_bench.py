#!/usr/bin/env python3
"""One worker against two: what a cross-node message costs, and how logins scale.

    .venv/bin/python bench/cluster_bench.py            # ~1 min; a report on stdout
    .venv/bin/python bench/cluster_bench.py --users 1000 --rate 2000 --duration 20

For each of `xmppd --workers 1` and `xmppd --workers 2` (the same config, a
cluster on a redis-server this script starts, the embedded SQLite store
shared by the workers with no cache, on this machine's cores), it runs
bench/chatload.py: USERS log in as fast as the server takes them (login
throughput = users / chatload's login time), then RATE msg/s of chat for
DURATION s between random pairs of users, every message counted by id.

With two workers the kernel spreads the connections (SO_REUSEPORT), so
about half the messages cross nodes; the workers' own /metrics say exactly
how many (xmppd_cluster_forwards_total{in}). The workers' CPU (summed,
from /proc, sampled every 50 ms) over the chat phase, divided by the
messages delivered, is the CPU per message. With one worker every message
is local: that is the local cost L. With two, a fraction f crossed:
cost2 = (1 - f) * L + f * X, so a cross-node message costs
X = (cost2 - (1 - f) * L) / f, summed over both nodes. Redis' CPU is
reported beside it (it is the cluster's cost too, though not a node's).

Targets (issue 13): X <= 1.5 L; two workers log in >= 1.8x the users/s of one.

Then (unless --no-placed) two nodes again, one worker each on a port of its
own, user i on node i % 2 (chatload --ports): once with every message
between users of the same node (`--pairs same`: the local cost L2 on two
nodes, under the same load as the cross-node run), once with every message
crossing (`--pairs other`: X measured directly, no subtraction). L2 against
L says what splitting the load over two processes costs by itself; X
against L2 what the crossing costs. The users split exactly in two there,
where SO_REUSEPORT spreads them as the kernel hashes them: the logins/s of
these runs against the `--workers 2` run say whether the spread matters.

Caveats it prints: the load generator runs on the same cores as the
workers, so login throughput with two workers is bounded by what the
generator leaves them; the CPU per message is the steadier figure.
`--worker-cpu 0.5` separates them: each worker runs in a cgroup of its own
with a quota of half a core (bench/cluster_nodes.py CpuCaps; needs root),
so one worker gets 0.5 core, two get 1, and the generator and Redis keep
the rest of a 2-core machine (the bench's groups get 10x the default CPU
weight, so other jobs on the machine yield to them); the report then gives
each worker's CPU over the logins against its quota and says whether every
worker was saturated (if not, the machine or the generator set the pace,
not xmppd). Other work on the machine makes every figure noisy: run it at
a quiet moment. Results: one JSON object per configuration in
bench/results/cluster-<stamp>/results.jsonl, and the report as report.md
there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from cluster_nodes import (  # noqa: E402
    COUNTS,
    DOMAIN,
    CountSampler,
    CpuCaps,
    Sampler,
    Server,
    loop_thread_s,
    machine_busy_s,
    redis,
    register,
    scrape,
    worker_pids,
    write_config,
)

from xmppd.storage.devservices import free_ports  # noqa: E402


def _loop(pid: int, which: int) -> float:
    """loop_thread_s(pid)[which], for a Sampler."""
    return loop_thread_s(pid)[which]


def run_one(
    args: argparse.Namespace, configs: list[Path], ports: list[int], workers: int,
    redis_pid: int, pairs: str = "any",
) -> dict[str, Any]:
    """One run: `xmppd --workers N` (one config), or one single-worker node per config,
    each on its own port (user i on ports[i % len]; `pairs`: chatload's --pairs)."""
    data_dir = configs[0].parent / "data"
    servers: list[Server] = []
    caps = CpuCaps(args.worker_cpu) if args.worker_cpu else None
    try:
        if caps is not None:
            caps.favour([os.getpid(), redis_pid])  # and the generator, started below
        for config in configs:
            servers.append(Server(config, workers if len(configs) == 1 else 1))
        found = worker_pids(data_dir)
        pids, urls = [p for p, _ in found], [u for _, u in found]
        if caps is not None:
            caps.apply(pids)
            throttled = caps.throttled()
        sampler = Sampler(pids)
        each = [Sampler([p]) for p in pids]  # per worker: against its quota
        loop_ran = [Sampler([], partial(_loop, p, 0)) for p in pids]
        loop_waited = [Sampler([], partial(_loop, p, 1)) for p in pids]
        redis = Sampler([redis_pid])
        machine = Sampler([], machine_busy_s)
        counts = CountSampler(pids)
        threads: list[Sampler | CountSampler] = [
            sampler, *each, *loop_ran, *loop_waited, redis, machine, counts
        ]
        for thread in threads:
            thread.start()
        before = asyncio.run(scrape(data_dir, urls))
        chat = subprocess.run(
            [sys.executable, str(BENCH / "chatload.py"),
             "--ports", ",".join(str(port) for port in ports), "--pairs", pairs,
             "--domain", DOMAIN, "--user-prefix", "user", "--pass-prefix", "pass",
             "--users", str(args.users), "--arrival-rate", str(args.login_rate),
             "--rate", str(args.rate), "--duration", str(args.duration),
             "--procs", str(args.procs), "--drain-timeout", "60"],
            capture_output=True, text=True,
        )
        after = asyncio.run(scrape(data_dir, urls))
        for thread in threads:
            thread.stop()
        if caps is not None:
            throttled = {
                pid: (periods - throttled[pid][0], hits - throttled[pid][1])
                for pid, (periods, hits) in caps.throttled().items()
            }
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait()
        if caps is not None:
            caps.remove()
    if not chat.stdout.strip():
        raise SystemExit(f"chatload wrote nothing:\n{chat.stderr[-3000:]}")
    load = json.loads(chat.stdout)
    # The logins proper: from the first to the last user online (chatload's own start,
    # interpreter and imports, is not the server's time).
    started, login_end = load["login_start_epoch"], load["login_end_epoch"]
    login_span = login_end - started
    send_start = load["send_start_epoch"]
    chat_end = load["send_end_epoch"] + (load["drain_s"] or 0.0)
    delivered = after["xmppd_messages_delivered_total"] - before["xmppd_messages_delivered_total"]
    crossed = after.get("xmppd_cluster_forwards_total{in}", 0.0) - before.get(
        "xmppd_cluster_forwards_total{in}", 0.0
    )
    chat_cpu = sampler.at(chat_end) - sampler.at(send_start)
    login_cpu = sampler.at(login_end) - sampler.at(started)
    return {
        "workers": len(pids),
        "placed": len(configs) > 1,
        "pairs": pairs,
        "users": args.users,
        "users_online": load["users_online"],
        "login_s": round(login_span, 2),
        "logins_per_s": round(load["users_online"] / login_span, 1),
        # As reported before: over chatload's login_s, which includes its start.
        "logins_per_s_with_start": round(load["users_online"] / load["login_s"], 1),
        "server_cpu_ms_per_login": round(1000 * login_cpu / max(1, load["users_online"]), 3),
        "logins_per_worker": [
            int(after[f"xmppd_logins_total@{n}"] - before.get(f"xmppd_logins_total@{n}", 0.0))
            for n in range(len(urls))
        ],
        "sent": load["sent"],
        "delivered": int(delivered),
        "exact": load["exact"],
        "missing": load["missing"],
        "cross_node": int(crossed),
        "cross_fraction": round(crossed / delivered, 4) if delivered else 0.0,
        "chat_server_cpu_s": round(chat_cpu, 3),
        "server_cpu_us_per_msg": round(1e6 * chat_cpu / delivered, 1) if delivered else None,
        "redis_cpu_us_per_msg": round(
            1e6 * (redis.at(chat_end) - redis.at(send_start)) / delivered, 1
        ) if delivered else None,
        # Per delivered message, workers summed: CPU (us), wake-ups, syscalls.
        "per_msg": counts.between(send_start, chat_end, int(delivered)),
        "latency_ms": load["latency_ms"],
        "generator_cpu_s": load["generator_cpu_s"],
        "generator_login_cpu_s": load.get("generator_login_cpu_s"),
        # Fraction of a core the workers used while the users logged in.
        "server_login_cores": round(login_cpu / login_span, 2),
        # ... and every process of the machine (of os.cpu_count() cores).
        "machine_login_cores": round(
            (machine.at(login_end) - machine.at(started)) / login_span, 2
        ),
        # Each worker's share of a core over the login phase (against --worker-cpu),
        # and with a quota, the CFS periods it ran in and those in which it hit it.
        "worker_login_cores": [
            round((w.at(login_end) - w.at(started)) / login_span, 2) for w in each
        ],
        # Each worker's event-loop thread over the logins, as fractions of the span:
        # running, runnable but waiting for a core (the machine's limit), and the rest,
        # asleep (waiting for work, i.e. for the clients, or for the GIL).
        "loop_login_ran_waited_slept": [
            [round(x, 2) for x in (ran, waited, 1 - ran - waited)]
            for ran, waited in (
                ((r.at(login_end) - r.at(started)) / login_span,
                 (w.at(login_end) - w.at(started)) / login_span)
                for r, w in zip(loop_ran, loop_waited, strict=True)
            )
        ],
        "worker_cpu_quota": args.worker_cpu,
        "login_rate": args.login_rate,
        "throttled_periods": [list(throttled[p]) for p in pids] if caps is not None else None,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def _cores(run: dict[str, Any]) -> str:
    """The generator's CPU over the login phase, in cores."""
    return f"{run['generator_login_cpu_s'] / run['login_s']:.2f}"


SATURATED = 0.9
"""A capped worker that used this fraction of its quota over the logins was CPU-bound."""


def _quota_line(one: dict[str, Any], two: dict[str, Any]) -> str:
    """With --worker-cpu: each worker's CPU over the logins against its quota, and
    whether every worker was CPU-bound (else the generator set the pace)."""
    quota = one["worker_cpu_quota"]
    idle = [r for r in (one, two) if min(r["worker_login_cores"]) < SATURATED * quota]
    paced = [r for r in idle if r["logins_per_s"] >= SATURATED * r["login_rate"]]
    cores = os.cpu_count() or 1
    if not idle:
        verdict = (
            f"every worker used at least {SATURATED:.0%} of its quota: the workers' CPU "
            "set the login rate, so the ratio is xmppd's scaling"
        )
    else:
        runs = " and ".join(f"{r['workers']} worker(s)" for r in idle)
        full = any(r["machine_login_cores"] >= SATURATED * cores for r in idle)
        # The kernel's spread: the worker with fewer users is done first and then idles
        # while the other finishes (the login phase ends with the last user online).
        uneven = [
            r for r in idle if len(r["worker_login_cores"]) > 1
            and min(r["logins_per_worker"]) < max(r["logins_per_worker"])
            and r["worker_login_cores"].index(min(r["worker_login_cores"]))
            == r["logins_per_worker"].index(min(r["logins_per_worker"]))
        ]
        verdict = f"NOT saturated with {runs} (under {SATURATED:.0%} of the quota): " + (
            "the users logged in as fast as they were offered (--login-rate): offer more"
            if paced else
            "the worker under its quota got fewer users (" + ", ".join(
                str(r["logins_per_worker"]) for r in uneven
            ) + "): done first, it may have idled while the other worked" if uneven else
            "the machine was full (other work), the workers waited for a core; run again "
            "at a quiet moment" if full else
            "the workers waited for work, so the generator set the pace"
        )
    return (
        f"- CPU caps (--worker-cpu): each worker in its own cgroup, at most {quota} core. "
        f"Over the logins each used {one['worker_login_cores']} (1 worker) and "
        f"{two['worker_login_cores']} (2 workers) of a core; CFS periods throttled / run: "
        f"{one['throttled_periods']} and {two['throttled_periods']}: {verdict}."
    )


def report(
    one: dict[str, Any], two: dict[str, Any], same: dict[str, Any] | None = None,
    other: dict[str, Any] | None = None,
) -> str:
    local = one["server_cpu_us_per_msg"]
    f = two["cross_fraction"]
    mixed = two["server_cpu_us_per_msg"]
    cross = (mixed - (1 - f) * local) / f if f else float("nan")
    redis_cross = two["redis_cpu_us_per_msg"] / f if f else float("nan")
    login_ratio = two["logins_per_s"] / one["logins_per_s"]
    # What the workers could take with a core each, from their CPU per login alone.
    capacity = [r["workers"] * 1000 / r["server_cpu_ms_per_login"] for r in (one, two)]
    lines = [
        "# One worker against two (bench/cluster_bench.py)",
        "",
        f"{one['users']} users, chat at the offered rate for the duration; load average at "
        f"the end: 1 worker {' '.join(one['loadavg'])}, 2 workers {' '.join(two['loadavg'])}.",
        "",
        "| workers | logins/s | server CPU ms/login | delivered | exact | crossed nodes | "
        "server CPU us/msg | Redis CPU us/msg | latency ms p50/p99 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (one, two):
        lat = r["latency_ms"] or {}
        lines.append(
            f"| {r['workers']} | {r['logins_per_s']} | {r['server_cpu_ms_per_login']} | "
            f"{r['delivered']} | {r['exact']} | {r['cross_node']} ({100 * r['cross_fraction']:.0f}"
            f" %) | {r['server_cpu_us_per_msg']} | {r['redis_cpu_us_per_msg']} | "
            f"{lat.get('p50')}/{lat.get('p99')} |"
        )
    lines += [
        "",
        f"- Local message (1 worker): {local} us of server CPU.",
        f"- Cross-node message, summed over both workers: {cross:.1f} us = "
        f"{cross / local:.2f}x local (target <= 1.5x: "
        f"{'met' if cross <= 1.5 * local else 'NOT met'}); plus {redis_cross:.1f} us in Redis.",
        f"- Logins: {two['logins_per_s']} users/s with 2 workers against "
        f"{one['logins_per_s']} with 1 = {login_ratio:.2f}x (target >= 1.8x: "
        f"{'met' if login_ratio >= 1.8 else 'NOT met'}). From the CPU per login, with a "
        f"core per worker: {capacity[0]:.0f} users/s with 1 worker, {capacity[1]:.0f} with 2 "
        f"= {capacity[1] / capacity[0]:.2f}x. While the users logged in, the workers used "
        f"{one['server_login_cores']} and {two['server_login_cores']} cores, the generator "
        f"{_cores(one)} and {_cores(two)} (one process: at most 1), the whole machine "
        f"{one['machine_login_cores']} and {two['machine_login_cores']} of its "
        f"{os.cpu_count()}. Users per worker with 2: {two['logins_per_worker']}.",
    ]
    lines.append(
        f"- Each worker's event-loop thread over the logins (fractions of the time: ran / "
        f"runnable but waiting for a core / asleep, waiting for clients or the GIL): 1 worker "
        f"{one['loop_login_ran_waited_slept']}, 2 workers {two['loop_login_ran_waited_slept']}."
    )
    if one["worker_cpu_quota"]:
        lines.append(_quota_line(one, two))
    if same is not None and other is not None:
        local2, cross2 = same["server_cpu_us_per_msg"], other["server_cpu_us_per_msg"]
        f_other = other["cross_fraction"]
        # Every message crossed in `other` (f = 1 but for any routed on the sender's node).
        direct = (cross2 - (1 - f_other) * local2) / f_other if f_other else float("nan")
        lines += [
            "",
            "Placed: two nodes (one worker each, each on its own port), user i on node i % 2;",
            "chatload's --pairs same (no message crosses) then other (every one does):",
            "",
            "| pairs | logins/s | server CPU ms/login | delivered | exact | crossed nodes | "
            "server CPU us/msg | Redis CPU us/msg | latency ms p50/p99 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (same, other):
            lat = r["latency_ms"] or {}
            lines.append(
                f"| {r['pairs']} | {r['logins_per_s']} | {r['server_cpu_ms_per_login']} | "
                f"{r['delivered']} | {r['exact']} | {r['cross_node']} "
                f"({100 * r['cross_fraction']:.0f} %) | {r['server_cpu_us_per_msg']} | "
                f"{r['redis_cpu_us_per_msg']} | {lat.get('p50')}/{lat.get('p99')} |"
            )
        lines += [
            "",
            f"- Local message on two nodes: {local2} us ({local2 / local:.2f}x the local "
            f"message on one worker).",
            f"- Cross-node message, every message crossing: {direct:.1f} us = "
            f"{direct / local2:.2f}x the local message on the same two nodes, "
            f"{direct / local:.2f}x the one on one worker; plus "
            f"{other['redis_cpu_us_per_msg'] / max(f_other, 1e-9):.1f} us in Redis.",
            f"- Logins, the users split exactly in two: {same['logins_per_s']} and "
            f"{other['logins_per_s']} users/s = "
            f"{same['logins_per_s'] / one['logins_per_s']:.2f}x and "
            f"{other['logins_per_s'] / one['logins_per_s']:.2f}x one worker.",
        ]
    lines += [
        "",
        "Per delivered message, the workers summed over the chat phase (from /proc):",
        "",
        "| run | user us | system us | wake-ups | preempted | read syscalls | write syscalls |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in (run for run in (one, two, same, other) if run is not None):
        c = r["per_msg"]
        name = f"placed, {r['pairs']}" if r["placed"] else f"{r['workers']} worker(s)"
        lines.append(f"| {name} | " + " | ".join(str(c[k]) for k in COUNTS) + " |")
    lines += [
        "",
        "Caveat: chatload runs on the same cores as the workers, and other work on the "
        "machine shares them too; the CPU per message and per login are the steadier "
        "figures, the login rate is bounded by what the generator leaves the workers.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--login-rate", type=float, default=2000.0,
                   help="logins offered per second (above what the server takes)")
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of chat")
    p.add_argument("--procs", type=int, default=1, help="chatload processes")
    p.add_argument("--iterations", type=int, default=4096, help="PBKDF2 rounds of the accounts")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument("--worker-cpu", type=float, default=None, metavar="CORES",
                   help="cap each worker at CORES of CPU (its own cgroup; needs root):\n"
                        "0.5 leaves the generator and Redis a core on a 2-core machine")
    p.add_argument("--no-placed", dest="placed", action="store_false",
                   help="skip the runs on two nodes with the users placed (~1 min less)")
    p.add_argument("--no-link", dest="link", action="store_false",
                   help="cluster.link.enabled: false: stanzas between nodes through Redis\n"
                        "only (the path before the direct links; A/B against them)")
    p.add_argument("--link-tcp", action="store_true",
                   help="cluster.link.unix: false: the workers link over TCP, frames sealed,\n"
                        "as nodes on different machines would (A/B against the Unix socket)")
    p.add_argument("--batch-window-ms", type=float, default=None, metavar="MS",
                   help="the nodes' batch_window_ms (default: the server's default)")
    args = p.parse_args()
    extra = (
        "  link: {enabled: false}\n" if not args.link
        else "  link: {unix: false}\n" if args.link_tcp
        else ""
    )
    out = args.out or BENCH / "results" / time.strftime("cluster-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    with redis() as (url, redis_pid), \
            tempfile.TemporaryDirectory(prefix="xmppd-cluster-bench-") as tmp:
        port, port_a, port_b = free_ports(3)
        config = write_config(
            Path(tmp), port, url, args.iterations, extra=extra,
            batch_window_ms=args.batch_window_ms,
        )
        print(f"registering {args.users} users ...", file=sys.stderr)
        register(config, args.users)
        results = []
        for workers in (1, 2):
            print(f"xmppd --workers {workers} ...", file=sys.stderr)
            results.append(run_one(args, [config], [port], workers, redis_pid))
            print(json.dumps(results[-1]), file=sys.stderr)
        if args.placed:
            nodes = [
                write_config(
                    Path(tmp), p, url, args.iterations, f"bench-{n}", f"{n}.yml", extra,
                    args.batch_window_ms,
                )
                for p, n in ((port_a, "a"), (port_b, "b"))
            ]
            for pairs in ("same", "other"):
                print(f"two nodes, each on its own port, --pairs {pairs} ...",
                      file=sys.stderr)
                results.append(run_one(
                    args, nodes, [port_a, port_b], 1, redis_pid, pairs
                ))
                print(json.dumps(results[-1]), file=sys.stderr)
    with open(out / "results.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    text = report(*results)
    (out / "report.md").write_text(text)
    print(text)
    print(f"(written to {out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
