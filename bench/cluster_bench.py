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
workers (a 2-core machine cannot separate them), so login throughput with
two workers is bounded by what the generator leaves them; the CPU per
message is the steadier figure. Other work on the machine makes every
figure noisy: run it at a quiet moment. Results: one JSON object per
configuration in bench/results/cluster-<stamp>/results.jsonl, and the
report as report.md there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from xmppd.adminapi import admin_dir, read_token
from xmppd.storage import devservices
from xmppd.storage.devservices import free_ports

BENCH = Path(__file__).resolve().parent
DOMAIN = "bench.local"
TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.05
START_TIMEOUT_S = 60.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


COUNTS = ("user_s", "system_s", "wakeups", "preempted", "reads", "writes")
"""Per worker process, from /proc: user and system CPU, voluntary context switches
(each one the process slept and was woken: roughly its event loop's wake-ups) and
involuntary ones, read and write syscalls (recv/send on sockets count)."""


def proc_counts(pid: int) -> list[float]:
    """The COUNTS of process `pid` so far (zeros once it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        status = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        io = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except OSError:
        return [0.0] * len(COUNTS)
    return [
        int(stat[11]) / TICKS, int(stat[12]) / TICKS,
        float(status["voluntary_ctxt_switches"]), float(status["nonvoluntary_ctxt_switches"]),
        float(io["syscr"]), float(io["syscw"]),
    ]


class CountSampler(threading.Thread):
    """The COUNTS summed over `pids`, at the start of the chat phase and at its end: read
    every SAMPLE_S (the phase's bounds are known only once chatload returns), the nearest
    sample at or after each bound is taken."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, list[float]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            counts = [proc_counts(p) for p in self.pids]
            self.samples.append((time.time(), [sum(c) for c in zip(*counts, strict=True)]))
            self.done.wait(SAMPLE_S)

    def between(self, start: float, end: float, messages: int) -> dict[str, float]:
        """Each count from `start` to `end`, per message (CPU in us)."""
        first = next((c for t, c in self.samples if t >= start), self.samples[-1][1])
        last = next((c for t, c in self.samples if t >= end), self.samples[-1][1])
        scale = [1e6 if name.endswith("_s") else 1.0 for name in COUNTS]
        return {
            name: round(k * (b - a) / max(1, messages), 2)
            for name, k, a, b in zip(COUNTS, scale, first, last, strict=True)
        }


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (every process's: this
    machine is shared), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / TICKS


class Sampler(threading.Thread):
    """(wall time, CPU seconds summed over `pids`, or what `measure` says) every
    SAMPLE_S, until stopped."""

    def __init__(self, pids: list[int], measure: Callable[[], float] | None = None) -> None:
        super().__init__(daemon=True)
        self.measure = measure or (lambda: sum(cpu_s(p) for p in pids))
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), self.measure()))
            self.done.wait(SAMPLE_S)

    def at(self, when: float) -> float:
        """CPU seconds at wall time `when`, interpolated between samples."""
        before = [s for s in self.samples if s[0] <= when]
        after = [s for s in self.samples if s[0] >= when]
        if not before:
            return self.samples[0][1]
        if not after:
            return self.samples[-1][1]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def write_config(
    workdir: Path, port: int, redis_url: str, iterations: int, node: str = "bench",
    name: str = "xmppd.yml",
) -> Path:
    path = workdir / name
    path.write_text(
        f"""\
hosts: [{DOMAIN}]
data_dir: {workdir / "data"}
log_level: info   # the supervisor says "workers: all N ready" at info
listeners:
  - {{type: starttls, address: 127.0.0.1, port: {port}, backlog: 4096}}
limits:
  max_connections_per_ip: 0
  auth_timeout: 120.0
auth:
  mechanisms: [SCRAM-SHA-1, PLAIN]
  scram_iterations: {iterations}
admin: {{port: 0}}
storage:
  cache: {{backend: none}}   # shared by the workers: no in-process copy to go stale
cluster:
  redis_url: {redis_url}
  node_name: {node}
"""
    )
    return path


def register(config: Path, users: int) -> None:
    subprocess.run(
        [sys.executable, "-m", "xmppd.cli.ctl", "-c", str(config), "register-bulk", DOMAIN,
         "--count", str(users)],
        check=True, stdout=subprocess.DEVNULL,
    )


def worker_pids(data_dir: Path) -> list[tuple[int, str]]:
    """(pid, admin URL) of the running workers, from their admin records."""
    found = []
    for record in admin_dir(data_dir).glob("*.json"):
        fields = json.loads(record.read_text())
        found.append((int(fields["pid"]), str(fields["url"])))
    return sorted(found)


async def scrape(data_dir: Path, urls: list[str]) -> dict[str, float]:
    """The workers' /metrics, summed over workers: sample name -> value; and each
    worker's count of logins as "xmppd_logins_total@N" (how the users were spread)."""
    total: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {read_token(data_dir)}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for n, url in enumerate(urls):
            async with http.get(url + "/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = sample.name + "".join(f"{{{v}}}" for v in sample.labels.values())
                    total[key] = total.get(key, 0.0) + sample.value
                    if key == "xmppd_logins_total":
                        total[f"{key}@{n}"] = sample.value
    return total


def start(config: Path, workers: int) -> subprocess.Popen[str]:
    """`xmppd --workers N`, once all its workers are ready."""
    server = subprocess.Popen(
        [sys.executable, "-m", "xmppd", "-c", str(config), "--workers", str(workers)],
        stderr=subprocess.PIPE, text=True,
    )
    watchdog = threading.Timer(START_TIMEOUT_S, server.kill)  # never hang on a failed start
    watchdog.start()
    try:
        assert server.stderr is not None
        for line in server.stderr:
            if f"workers: all {workers} ready" in line:
                break
        else:
            raise SystemExit(f"xmppd --workers {workers} did not start")
    finally:
        watchdog.cancel()
    threading.Thread(target=lambda: server.stderr.read() if server.stderr else None,
                     daemon=True).start()
    return server


def run_one(
    args: argparse.Namespace, configs: list[Path], ports: list[int], workers: int,
    redis_pid: int, pairs: str = "any",
) -> dict[str, Any]:
    """One run: `xmppd --workers N` (one config), or one single-worker node per config,
    each on its own port (user i on ports[i % len]; `pairs`: chatload's --pairs)."""
    data_dir = configs[0].parent / "data"
    servers: list[subprocess.Popen[str]] = []
    try:
        for config in configs:
            servers.append(start(config, workers if len(configs) == 1 else 1))
        found = worker_pids(data_dir)
        pids, urls = [p for p, _ in found], [u for _, u in found]
        sampler = Sampler(pids)
        redis = Sampler([redis_pid])
        machine = Sampler([], machine_busy_s)
        counts = CountSampler(pids)
        counts.start()
        sampler.start()
        redis.start()
        machine.start()
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
        sampler.done.set()
        redis.done.set()
        machine.done.set()
        counts.done.set()
        counts.join()
        sampler.join()
        redis.join()
        machine.join()
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            server.wait(60)
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
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def _cores(run: dict[str, Any]) -> str:
    """The generator's CPU over the login phase, in cores."""
    return f"{run['generator_login_cpu_s'] / run['login_s']:.2f}"


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
    p.add_argument("--no-placed", dest="placed", action="store_false",
                   help="skip the runs on two nodes with the users placed (~1 min less)")
    args = p.parse_args()
    out = args.out or BENCH / "results" / time.strftime("cluster-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    redis = devservices.redis_server().start()
    try:
        with tempfile.TemporaryDirectory(prefix="xmppd-cluster-bench-") as tmp:
            port, port_a, port_b = free_ports(3)
            url = devservices.redis_url(redis)
            config = write_config(Path(tmp), port, url, args.iterations)
            print(f"registering {args.users} users ...", file=sys.stderr)
            register(config, args.users)
            assert redis.proc is not None
            results = []
            for workers in (1, 2):
                print(f"xmppd --workers {workers} ...", file=sys.stderr)
                results.append(run_one(args, [config], [port], workers, redis.proc.pid))
                print(json.dumps(results[-1]), file=sys.stderr)
            if args.placed:
                nodes = [
                    write_config(Path(tmp), p, url, args.iterations, f"bench-{n}", f"{n}.yml")
                    for p, n in ((port_a, "a"), (port_b, "b"))
                ]
                for pairs in ("same", "other"):
                    print(f"two nodes, each on its own port, --pairs {pairs} ...",
                          file=sys.stderr)
                    results.append(run_one(
                        args, nodes, [port_a, port_b], 1, redis.proc.pid, pairs
                    ))
                    print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        redis.stop()
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
