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


class Sampler(threading.Thread):
    """(wall time, CPU seconds summed over `pids`) every SAMPLE_S, until stopped."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.samples: list[tuple[float, float]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.samples.append((time.time(), sum(cpu_s(p) for p in self.pids)))
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


def write_config(workdir: Path, port: int, redis_url: str, iterations: int) -> Path:
    path = workdir / "xmppd.yml"
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
  node_name: bench
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
    """The workers' /metrics, summed over workers: sample name -> value."""
    total: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {read_token(data_dir)}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        for url in urls:
            async with http.get(url + "/metrics") as response:
                text = await response.text()
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    key = sample.name + "".join(f"{{{v}}}" for v in sample.labels.values())
                    total[key] = total.get(key, 0.0) + sample.value
    return total


def run_one(
    args: argparse.Namespace, config: Path, port: int, workers: int, redis_pid: int
) -> dict[str, Any]:
    data_dir = config.parent / "data"
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
        watchdog.cancel()
        threading.Thread(target=lambda: server.stderr.read() if server.stderr else None,
                         daemon=True).start()
        found = worker_pids(data_dir)
        pids, urls = [p for p, _ in found], [u for _, u in found]
        sampler = Sampler(pids)
        redis = Sampler([redis_pid])
        sampler.start()
        redis.start()
        before = asyncio.run(scrape(data_dir, urls))
        started = time.time()
        chat = subprocess.run(
            [sys.executable, str(BENCH / "chatload.py"), "--port", str(port),
             "--domain", DOMAIN, "--user-prefix", "user", "--pass-prefix", "pass",
             "--users", str(args.users), "--arrival-rate", str(args.login_rate),
             "--rate", str(args.rate), "--duration", str(args.duration),
             "--procs", str(args.procs), "--drain-timeout", "60"],
            capture_output=True, text=True,
        )
        after = asyncio.run(scrape(data_dir, urls))
        sampler.done.set()
        redis.done.set()
        sampler.join()
        redis.join()
    finally:
        watchdog.cancel()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    if not chat.stdout.strip():
        raise SystemExit(f"chatload wrote nothing:\n{chat.stderr[-3000:]}")
    load = json.loads(chat.stdout)
    login_end = started + load["login_s"]
    send_start = load["send_start_epoch"]
    chat_end = load["send_end_epoch"] + (load["drain_s"] or 0.0)
    delivered = after["xmppd_messages_delivered_total"] - before["xmppd_messages_delivered_total"]
    crossed = after.get("xmppd_cluster_forwards_total{in}", 0.0) - before.get(
        "xmppd_cluster_forwards_total{in}", 0.0
    )
    chat_cpu = sampler.at(chat_end) - sampler.at(send_start)
    login_cpu = sampler.at(login_end) - sampler.at(started)
    return {
        "workers": workers,
        "users": args.users,
        "users_online": load["users_online"],
        "login_s": load["login_s"],
        "logins_per_s": round(load["users_online"] / load["login_s"], 1),
        "server_cpu_ms_per_login": round(1000 * login_cpu / max(1, load["users_online"]), 3),
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
        "latency_ms": load["latency_ms"],
        "generator_cpu_s": load["generator_cpu_s"],
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


def report(one: dict[str, Any], two: dict[str, Any]) -> str:
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
        f"= {capacity[1] / capacity[0]:.2f}x.",
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
    args = p.parse_args()
    out = args.out or BENCH / "results" / time.strftime("cluster-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    redis = devservices.redis_server().start()
    try:
        with tempfile.TemporaryDirectory(prefix="xmppd-cluster-bench-") as tmp:
            port = free_ports(1)[0]
            config = write_config(
                Path(tmp), port, devservices.redis_url(redis), args.iterations
            )
            print(f"registering {args.users} users ...", file=sys.stderr)
            register(config, args.users)
            assert redis.proc is not None
            results = []
            for workers in (1, 2):
                print(f"xmppd --workers {workers} ...", file=sys.stderr)
                results.append(run_one(args, config, port, workers, redis.proc.pid))
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
