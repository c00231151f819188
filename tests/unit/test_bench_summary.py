"""The bench harness's summary of a real tsung run (bench/harness/tsung_summary.py).

tests/fixtures/bench-chat-50u/ holds the logs of a real run (`SERVERS=xmppd
bench/run.sh` with the step "chat 50 100 DURATION=10": 50 users, 20 messages
each) and the sampler's CSV; the figures below are what tsung itself logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parents[1] / "fixtures" / "bench-chat-50u"
HARNESS = Path(__file__).parents[2] / "bench" / "harness"
META = {"server": "command", "scenario": "chat", "users": 50, "rate": 100.0,
        "chat_think_s": 0.5, "msgs_per_user": 20}


@pytest.fixture
def summary(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.syspath_prepend(str(HARNESS))
    from tsung_summary import summarize

    result: dict[str, Any] = summarize(dict(META), DATA, DATA / "samples.csv")
    return result


def test_a_chat_run_is_summed_up_from_tsungs_logs(summary: dict[str, Any]) -> None:
    assert summary["users_started"] == summary["users_finished"] == 50
    assert summary["logins_ok"] == summary["tr_login_count"] == 50  # every roster came back
    assert summary["errors"] == {}
    assert (summary["msgs_sent"], summary["msgs_received"], summary["delivery_ratio"]) == (
        1000, 1000, 1.0
    )
    latency = summary["msg_latency_ms"]
    assert latency["n"] == 1000
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert summary["login_ms"]["n"] == 50
    # the steady window: from 2 s after the first message, for 0.6 x 20 x 0.5 s
    assert summary["steady_window_s"] == 6
    assert summary["msg_rate_delivered_per_s"] == pytest.approx(95.3)


def test_the_samples_give_memory_and_cpu(summary: dict[str, Any]) -> None:
    assert summary["server_conns_max"] == 50
    assert summary["server_rss_peak_mb"] >= summary["server_rss_base_mb"] > 0
    assert summary["rss_per_conn_kb"] > 0
    assert summary["server_cpu_ms_per_login"] > 0
    assert summary["server_cpu_util_pct_steady"] is not None
