"""What the cluster benches share: a Redis, `xmppd --workers N` on it, and the workers' figures.

bench/cluster_bench.py (one worker against two) and bench/muc_bench.py (one
room over two workers) each start a redis-server, write a cluster config,
register the users, start `xmppd --workers N`, find the workers by their
admin records, sample their CPU from /proc and scrape their /metrics: the
same steps, kept here once. `CpuCaps` puts each worker in a cgroup of its
own with a CPU quota (cluster_bench's --worker-cpu).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from xmppd.adminapi import admin_dir, read_token
from xmppd.storage import devservices

DOMAIN = "bench.local"
TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_S = 0.05
START_TIMEOUT_S = 60.0


@contextmanager
def redis() -> Iterator[tuple[str, int]]:
    """A redis-server of the bench's own: (its URL, its pid), stopped on the way out."""
    server = devservices.redis_server().start()
    try:
        assert server.proc is not None
        yield devservices.redis_url(server), server.proc.pid
    finally:
        server.stop()


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def loop_thread_s(pid: int) -> tuple[float, float]:
    """(CPU seconds, seconds runnable but waiting for a core) of process `pid`'s main
    thread, xmppd's event loop, so far (from /proc/PID/task/PID/schedstat, in ns; 0s
    once it is gone). Over a span, the rest of the wall time it slept: waiting for
    work (epoll), for the GIL, or for nothing to do."""
    try:
        ran, waited = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[:2]
    except OSError:
        return 0.0, 0.0
    return int(ran) / 1e9, int(waited) / 1e9


def machine_busy_s() -> float:
    """CPU seconds every core of the machine spent busy so far (every process's: this
    machine is shared), from /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / TICKS


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

    def stop(self) -> None:
        self.done.set()
        self.join()

    def between(self, start: float, end: float, messages: int) -> dict[str, float]:
        """Each count from `start` to `end`, per message (CPU in us)."""
        first = next((c for t, c in self.samples if t >= start), self.samples[-1][1])
        last = next((c for t, c in self.samples if t >= end), self.samples[-1][1])
        scale = [1e6 if name.endswith("_s") else 1.0 for name in COUNTS]
        return {
            name: round(k * (b - a) / max(1, messages), 2)
            for name, k, a, b in zip(COUNTS, scale, first, last, strict=True)
        }


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

    def stop(self) -> None:
        self.done.set()
        self.join()

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
    name: str = "xmppd.yml", extra: str = "", batch_window_ms: float | None = None,
) -> Path:
    """A cluster config for the workers: one STARTTLS listener on `port`, the embedded
    store in workdir/data shared by the workers with no cache (no in-process copy to
    go stale), no connection limits; `extra` is appended (a modules section);
    `batch_window_ms` None: the server's default."""
    path = workdir / name
    window = "" if batch_window_ms is None else f"batch_window_ms: {batch_window_ms:g}\n"
    path.write_text(
        f"""\
{window}hosts: [{DOMAIN}]
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
{extra}"""
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


class Server:
    """`xmppd -c CONFIG --workers N`, started and ready: every worker serves. What
    it logs after "ready" goes to `log` (a file) or nowhere."""

    def __init__(self, config: Path, workers: int, log: Path | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "xmppd", "-c", str(config), "--workers", str(workers)],
            stderr=subprocess.PIPE, text=True,
        )
        watchdog = threading.Timer(START_TIMEOUT_S, self.process.kill)  # never hang
        watchdog.start()
        try:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                if f"workers: all {workers} ready" in line:
                    break
            else:
                raise SystemExit(f"xmppd --workers {workers} did not start")
        finally:
            watchdog.cancel()
        sink = open(log, "w") if log is not None else None  # noqa: SIM115 (the thread closes it)
        self.keeper = threading.Thread(target=self._keep, args=(sink,), daemon=True)
        self.keeper.start()

    def _keep(self, sink: TextIO | None) -> None:
        """Read the server's stderr to its end (a full pipe would block it)."""
        assert self.process.stderr is not None
        for line in self.process.stderr:
            if sink is not None:
                sink.write(line)
        if sink is not None:
            sink.close()

    def terminate(self) -> None:
        """SIGTERM: the workers stop cleanly (`wait` for it)."""
        self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        self.process.wait(60)
        self.keeper.join(10)

    def stop(self) -> None:
        self.terminate()
        self.wait()


class CpuCaps:
    """Each worker in a cgroup of its own, with a CPU quota of `cores` (0.5: half a
    core, whatever core it runs on; its threads included).

    Why: on a small machine the load generator and Redis share the cores with
    the workers, so one worker against two measures the share each run got.
    With every worker capped below what the machine has to spare, the
    generator and Redis keep their own share, and N workers can use N quotas.
    cgroup v2 (cpu.max) where the cpu controller is on a cgroup2 mount, else
    cgroup v1 (cpu.cfs_quota_us / cpu.cfs_period_us); needs write access (root).
    """

    PERIOD_US = 100_000
    WEIGHT = 10
    """How many times the default CPU weight the bench's groups get: on a machine
    shared with other jobs, a quota is a ceiling, not a share; the weight makes the
    others yield, so a worker gets its quota and the generator what it needs."""

    def __init__(self, cores: float) -> None:
        self.cores = cores
        self.root, self.v2 = _cpu_cgroup_root()
        self.groups: dict[int, Path] = {}  # pid -> its cgroup

    def favour(self, pids: list[int]) -> None:
        """`pids` (and what they start from now on) in one group, weighted but not
        capped: this script (so the generator it starts) and Redis."""
        self._group(pids, "rest", None)

    def apply(self, pids: list[int]) -> None:
        """Each of `pids` (the workers) in a group of its own, capped at `cores`."""
        for pid in pids:
            self._group([pid], str(pid), int(self.cores * self.PERIOD_US))

    def _group(self, pids: list[int], name: str, quota: int | None) -> None:
        group = self.root / f"xmppd-bench-{os.getpid()}-{name}"
        try:
            group.mkdir(exist_ok=True)
            if self.v2:
                (group / "cpu.weight").write_text(str(100 * self.WEIGHT))
                if quota is not None:
                    (group / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            else:
                (group / "cpu.shares").write_text(str(1024 * self.WEIGHT))
                if quota is not None:
                    (group / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                    (group / "cpu.cfs_quota_us").write_text(str(quota))
            for pid in pids:
                (group / "cgroup.procs").write_text(str(pid))  # every thread of it
        except OSError as exc:
            raise SystemExit(f"--worker-cpu: cannot set up the cgroup {group}: {exc}") from exc
        for pid in pids:
            self.groups[pid] = group

    def throttled(self) -> dict[int, tuple[int, int]]:
        """pid -> (CFS periods it ran in, periods in which it hit its quota), so far."""
        counts = {}
        for pid, group in self.groups.items():
            if group.name.endswith("-rest"):
                continue
            stat = dict(
                line.split() for line in (group / "cpu.stat").read_text().splitlines()
            )
            counts[pid] = (int(stat.get("nr_periods", 0)), int(stat.get("nr_throttled", 0)))
        return counts

    def remove(self) -> None:
        """Move what is left in the groups back to the root, and delete them."""
        for group in set(self.groups.values()):
            try:
                for pid in (group / "cgroup.procs").read_text().split():
                    (self.root / "cgroup.procs").write_text(pid)
                group.rmdir()
            except OSError as exc:
                print(f"--worker-cpu: could not remove {group}: {exc}", file=sys.stderr)
        self.groups.clear()


def _cpu_cgroup_root() -> tuple[Path, bool]:
    """Where to make CPU-capped cgroups, and whether it is cgroup v2; SystemExit with
    the reason when neither version offers a writable cpu controller."""
    tried = []
    with open("/proc/mounts") as mounts:
        entries = [line.split() for line in mounts]
    for _, where, kind, options, *_ in entries:
        root = Path(where)
        if kind == "cgroup2":
            try:
                if "cpu" not in (root / "cgroup.controllers").read_text().split():
                    tried.append(f"{root} (cgroup2): no cpu controller")
                    continue
                control = root / "cgroup.subtree_control"
                if "cpu" not in control.read_text().split():
                    control.write_text("+cpu")
            except OSError as exc:
                tried.append(f"{root} (cgroup2): {exc}")
                continue
            if os.access(root, os.W_OK):
                return root, True
            tried.append(f"{root} (cgroup2): not writable")
        elif kind == "cgroup" and "cpu" in options.split(","):
            if os.access(root, os.W_OK) and (root / "cpu.cfs_quota_us").exists():
                return root, False
            tried.append(f"{root} (cgroup v1 cpu): not writable")
    raise SystemExit(
        "--worker-cpu needs a writable cgroup cpu controller (cgroup v2 cpu.max or v1 "
        "cpu.cfs_quota_us; usually root): "
        + ("; ".join(tried) or "no cgroup mount with a cpu controller in /proc/mounts")
    )
