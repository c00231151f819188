"""The server's CPU time, resident memory and connections, sampled while a load runs.

usage: python samples.py SERVER_PID LOADGEN_PID PORT OUT_CSV [INTERVAL_S]

Writes one CSV row per interval (default 1 s) until either process is gone or
SIGTERM: t, server_rss_kb, server_cpu_s, loadgen_cpu_s, server_conns. CPU and
RSS are summed over each process's whole tree (an Erlang VM's helpers, xmppd's
worker processes); server_conns counts the established TCP connections whose
local port is PORT. Standard library only: the peers' runs need no virtualenv.

bench/harness/tsung_run.py and bench/xchat_summary.py read the file back with
read_samples() and cut it with cpu_between().
"""

from __future__ import annotations

import csv
import math
import os
import signal
import sys
import time

TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
FIELDS = ("t", "server_rss_kb", "server_cpu_s", "loadgen_cpu_s", "server_conns")


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for thread in threads:
            try:
                with open(f"/proc/{current}/task/{thread}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
            except OSError:
                pass
    return found


def usage(pid: int) -> tuple[float, int]:
    """(CPU seconds, user + system; RSS in KiB) of the tree under `pid`."""
    cpu, rss = 0.0, 0
    for process in descendants(pid):
        try:
            with open(f"/proc/{process}/stat") as f:
                after_name = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        # Fields 14, 15 (utime, stime) and 24 (rss) of proc(5), counted from 1 with the
        # pid and the name before the ")": index 11, 12 and 21 of what follows it.
        cpu += (int(after_name[11]) + int(after_name[12])) / TICKS
        rss += int(after_name[21]) * PAGE_KB
    return cpu, rss


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED (01) on local port `port`."""
    suffix = f":{port:04X}"
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    count += cols[3] == "01" and cols[1].endswith(suffix)
        except OSError:
            pass
    return count


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def sample(server: int, loadgen: int, port: int, out: str, interval: float) -> None:
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(FIELDS)
        while not stopping and running(server):
            now = time.time()
            server_cpu, server_rss = usage(server)
            loadgen_cpu = usage(loadgen)[0] if running(loadgen) else math.nan
            writer.writerow(
                (f"{now:.3f}", server_rss, f"{server_cpu:.2f}", f"{loadgen_cpu:.2f}",
                 established(port))
            )
            f.flush()
            if not running(loadgen):
                return
            time.sleep(max(0.0, interval - (time.time() - now)))


def read_samples(path: str) -> list[dict[str, float]]:
    """The rows of a samples file, as numbers ([] if there is none)."""
    try:
        with open(path, newline="") as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    except OSError:
        return []


def cpu_between(
    rows: list[dict[str, float]], column: str, start: float, end: float
) -> tuple[float | None, float | None]:
    """CPU seconds of `column` from the first to the last sample in [start, end], and
    that as a percentage of one core; (None, None) with fewer than two samples."""
    inside = [r for r in rows if start <= r["t"] <= end and not math.isnan(r[column])]
    if len(inside) < 2:
        return None, None
    seconds = inside[-1][column] - inside[0][column]
    span = inside[-1]["t"] - inside[0]["t"]
    return seconds, (100.0 * seconds / span if span > 0 else None)


if __name__ == "__main__":
    if len(sys.argv) not in (5, 6):
        sys.exit(__doc__)
    sample(
        int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
        float(sys.argv[5]) if len(sys.argv) == 6 else 1.0,
    )
