"""bench/cluster_nodes.py CpuCaps on the machine's real cgroups, and cluster_bench's
verdict on a capped run (bench/cluster_bench.py --worker-cpu).

The cap is checked on a real busy process: capped at a fifth of a core, it
must use about that, where uncapped it would use a whole one. Skipped where
no writable cgroup cpu controller exists (not root, or a container without it);
a failure in CI.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.storage.services import unavailable

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))


def test_a_capped_process_uses_its_quota_and_no_more(bench: None) -> None:
    from cluster_nodes import CpuCaps, cpu_s

    try:
        caps = CpuCaps(0.2)
    except SystemExit as exc:  # CI runs as root, with a writable cpu controller
        unavailable(str(exc))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        caps.apply([busy.pid])
        group = caps.groups[busy.pid]
        assert str(busy.pid) in (group / "cgroup.procs").read_text().split()
        start, used0 = time.monotonic(), cpu_s(busy.pid)
        time.sleep(1.0)  # measuring a rate over wall time: nothing to await
        share = (cpu_s(busy.pid) - used0) / (time.monotonic() - start)
        assert share < 0.3, share  # uncapped, a busy loop takes a whole core
        periods, throttled = caps.throttled()[busy.pid]
        assert throttled > 0 and periods >= throttled
    finally:
        busy.kill()
        busy.wait()
        caps.remove()
    assert not group.exists()


def run(workers: int, cores: list[float], logins: list[int], **extra: Any) -> dict[str, Any]:
    """The fields of a run that the verdict reads."""
    return {
        "workers": workers, "worker_cpu_quota": 0.5, "worker_login_cores": cores,
        "logins_per_worker": logins, "throttled_periods": [[100, 80]] * workers,
        "logins_per_s": 80.0 * workers, "login_rate": 2000.0, "machine_login_cores": 1.5,
    } | extra


def test_the_verdict_says_why_a_worker_was_not_saturated(bench: None) -> None:
    from cluster_bench import _quota_line

    one = run(1, [0.5], [1000])
    assert "every worker used at least 90%" in _quota_line(one, run(2, [0.49, 0.47], [500, 500]))
    uneven = _quota_line(one, run(2, [0.49, 0.38], [530, 470]))
    assert "NOT saturated with 2 worker(s)" in uneven
    assert "got fewer users ([530, 470])" in uneven
    full = _quota_line(one, run(2, [0.38, 0.49], [530, 470], machine_login_cores=2.0))
    assert "the machine was full" in full
    paced = _quota_line(one, run(2, [0.3, 0.3], [500, 500], logins_per_s=100.0,
                                 login_rate=100.0))
    assert "as fast as they were offered" in paced
    generator = _quota_line(one, run(2, [0.3, 0.3], [500, 500]))
    assert "the generator set the pace" in generator
