"""Where a server's time went, per thread, from the kernel: on a CPU or waiting for one.

/proc/PID/task/TID/schedstat holds, per thread, the nanoseconds spent running
and the nanoseconds spent runnable but waiting for a CPU (run-queue delay).
On a busy host the second is the part of a message's latency that no change
in the server can remove. Sampled once a second while the process lives;
prints one summary line per thread and the totals.

    python bench/schedstat_sample.py PIDFILE OUT.txt
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def threads(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, run ns, wait ns)"""
    found = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run, wait, _ = (int(x) for x in (task / "schedstat").read_text().split())
            name = (task / "comm").read_text().strip()
        except (OSError, ValueError):
            continue
        found[int(task.name)] = (name, run, wait)
    return found


def main(pidfile: str, out: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            pid = int(Path(pidfile).read_text())
            break
        except (OSError, ValueError):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
    first: dict[int, tuple[str, int, int]] = {}
    last: dict[int, tuple[str, int, int]] = {}
    started = time.monotonic()
    while Path(f"/proc/{pid}").exists():
        try:
            now = threads(pid)
        except OSError:
            break
        for tid, sample in now.items():
            first.setdefault(tid, sample)
        last.update(now)
        time.sleep(1)
    span = time.monotonic() - started
    lines = [f"schedstat of pid {pid} over {span:.0f} s (seconds on a CPU / waiting for one)"]
    total_run = total_wait = 0.0
    for tid, (name, run, wait) in sorted(last.items()):
        _, run0, wait0 = first[tid]
        run_s, wait_s = (run - run0) / 1e9, (wait - wait0) / 1e9
        total_run += run_s
        total_wait += wait_s
        if run_s > 0.01 or wait_s > 0.01:
            lines.append(f"  {tid} {name}: run {run_s:.2f} s, waiting {wait_s:.2f} s")
    lines.append(f"  all threads: run {total_run:.2f} s, waiting for a CPU {total_wait:.2f} s")
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
