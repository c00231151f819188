"""One tsung run and its samples, summed up as one JSON object (one line of results.jsonl).

usage: python tsung_summary.py META_JSON TSUNG_LOG_DIR SAMPLES_CSV   (prints the JSON)

tsung writes two logs: tsung.log, a dump of every statistic once per second
(dumpstats_interval) as "stats: NAME COUNT ..." lines under "# stats: dump at
EPOCH", and tsung-fullstats.log, every single sample as "{sample,NAME,VALUE}"
terms, from which percentiles are computed. The field names are the ones
bench/report.py reads; docs/bench.md says what each measures.
"""

from __future__ import annotations

import gzip
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from samples import cpu_between, read_samples

Dump = dict[str, list[float]]
DUMP_HEADER = re.compile(r"# stats: dump at (\d+)")
SAMPLE = re.compile(r"\{sample,([a-z_0-9]+),\s*(\[[^\]]*\]|[-0-9.e+]+)\}")
NUMBER = re.compile(r"-?\d[\d.e+-]*")


def read_dumps(path: Path) -> list[tuple[int, Dump]]:
    """[(epoch, {statistic: numbers})] in order. A statistic seen twice within one dump
    starts the next one: tsung now and then leaves out the header line."""
    dumps: list[tuple[int, Dump]] = []
    with open(path) as f:
        for line in f:
            header = DUMP_HEADER.match(line)
            if header:
                dumps.append((int(header.group(1)), {}))
                continue
            if not dumps or not line.startswith("stats: "):
                continue
            name, *values = line.split()[1:]
            if name.startswith("{"):  # the controller's own os_mon figures
                continue
            epoch, stats = dumps[-1]
            if name in stats:
                epoch, stats = epoch + 1, {}
                dumps.append((epoch, stats))
            try:
                stats[name] = [float(v) for v in values]
            except ValueError:
                pass
    return dumps


def read_full_samples(log_dir: Path) -> dict[str, list[float]]:
    """Every sample of every statistic (the log may have been gzipped after the run)."""
    plain, packed = log_dir / "tsung-fullstats.log", log_dir / "tsung-fullstats.log.gz"
    try:
        text = plain.read_text() if plain.exists() else gzip.open(packed, "rt").read()
    except OSError:
        return {}
    found: dict[str, list[float]] = {}
    for name, value in SAMPLE.findall(text):
        found.setdefault(name, []).extend(float(n) for n in NUMBER.findall(value))
    return found


def percentile(ordered: list[float], p: float) -> float:
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: list[float]) -> dict[str, float] | None:
    """n, mean, p50, p95, p99, max (milliseconds for tsung's timings)."""
    if not values:
        return None
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 2),
        **{f"p{p}": round(percentile(ordered, p), 2) for p in (50, 95, 99)},
        "max": round(ordered[-1], 2),
    }


def total(dumps: list[tuple[int, Dump]], name: str) -> int:
    """The sum over all dumps of a statistic's per-interval count (its first number)."""
    return int(sum(stats[name][0] for _, stats in dumps if name in stats))


def busy_span(dumps: list[tuple[int, Dump]], name: str) -> tuple[int, int] | None:
    """From the dump before the first one where `name` counted something to the last one
    where it did: the span in which that statistic was active."""
    busy = [i for i, (_, stats) in enumerate(dumps) if stats.get(name, [0])[0] > 0]
    if not busy:
        return None
    first, last = busy[0], busy[-1]
    start = dumps[first - 1][0] if first > 0 else dumps[first][0] - 1
    return start, dumps[last][0]


def summarize(meta: dict[str, Any], log_dir: Path, samples_csv: Path) -> dict[str, Any]:
    dumps = read_dumps(log_dir / "tsung.log")
    full = read_full_samples(log_dir)
    rows = read_samples(str(samples_csv))
    result = dict(meta)

    errors: dict[str, int] = {}
    for _, stats in dumps:
        for name, values in stats.items():
            if name.startswith("error") or name == "nomatch":
                errors[name] = errors.get(name, 0) + int(values[0])
    result["errors"] = {k: v for k, v in errors.items() if v}
    result["users_started"] = total(dumps, "users_count")
    result["users_finished"] = total(dumps, "finish_users_count")
    result["logins_ok"] = total(dumps, "match")  # roster results (the scenario's <match>)
    result["tr_login_count"] = total(dumps, "tr_login")
    result["tsung_max_connected"] = int(
        max((stats["connected"][1] for _, stats in dumps if "connected" in stats), default=0)
    )
    _logins(result, dumps, rows)
    for field, name in (
        ("login_ms", "tr_login"), ("roster_ms", "tr_roster"),
        ("starttls_ms", "xmpp_starttls"), ("tcp_connect_ms", "connect"),
    ):
        result[field] = distribution(full.get(name, []))
    if meta.get("scenario") == "chat":
        _chat(result, meta, dumps, full, rows)
    _memory_and_cpu(result, rows)
    result["tsung_log_dir"] = str(log_dir)
    return result


def _logins(
    result: dict[str, Any], dumps: list[tuple[int, Dump]], rows: list[dict[str, float]]
) -> None:
    """The login rate and the server's CPU per login, over the span logins completed in."""
    span = busy_span(dumps, "tr_login")
    if span is None:
        return
    seconds = span[1] - span[0]
    count = result["tr_login_count"]
    result["login_span_s"] = seconds
    result["connect_rate_per_s"] = round(count / seconds, 1) if seconds > 0 else None
    cpu, util = cpu_between(rows, "server_cpu_s", *span)
    if cpu is not None and util is not None and count:
        result["server_cpu_ms_per_login"] = round(1000 * cpu / count, 2)
        result["server_cpu_util_pct_login"] = round(util, 1)


def _chat(
    result: dict[str, Any],
    meta: dict[str, Any],
    dumps: list[tuple[int, Dump]],
    full: dict[str, list[float]],
    rows: list[dict[str, float]],
) -> None:
    """Delivery over the whole run, and rates, latency and CPU in the steady window.

    Each user sends for about D = messages per user x mean think time, but the ends are
    spread (a sum of exponential waits), so the steady window is the part every user is
    still sending in: from 2 s after the first message, for 0.6 D (at least 3 s)."""
    result["msgs_received"] = total(dumps, "xmpp_msg_latency")
    # every no-ack request is a message, but for the final </stream> of each user
    result["msgs_sent"] = max(0, total(dumps, "request_noack") - result["users_finished"])
    sent = result["msgs_sent"]
    result["delivery_ratio"] = round(result["msgs_received"] / sent, 4) if sent else None
    result["msg_latency_ms"] = distribution(full.get("xmpp_msg_latency", []))
    first = next((t for t, stats in dumps if stats.get("request_noack", [0])[0] > 0), None)
    sending = (meta.get("msgs_per_user") or 0) * (meta.get("chat_think_s") or 0)
    if first is None or sending <= 0:
        return
    start = first + 2
    window = [(t, stats) for t, stats in dumps if start < t <= start + max(3, int(0.6 * sending))]
    if not window:
        return
    end = window[-1][0]
    seconds = end - start
    latency = [stats.get("xmpp_msg_latency", [0.0] * 5) for _, stats in window]
    received = sum(lat[0] for lat in latency)
    result["steady_window_s"] = seconds
    result["msg_rate_sent_per_s"] = round(
        sum(stats.get("request_noack", [0])[0] for _, stats in window) / seconds, 1
    )
    result["msg_rate_delivered_per_s"] = round(received / seconds, 1)
    result["msg_latency_steady_mean_ms"] = (
        round(sum(lat[0] * lat[1] for lat in latency) / received, 2) if received else None
    )
    result["msg_latency_steady_max_ms"] = max((lat[3] for lat in latency), default=None)
    _, util = cpu_between(rows, "server_cpu_s", start, end)
    _, loadgen = cpu_between(rows, "loadgen_cpu_s", start, end)
    result["server_cpu_util_pct_steady"] = None if util is None else round(util, 1)
    result["loadgen_cpu_util_pct_steady"] = None if loadgen is None else round(loadgen, 1)


def _memory_and_cpu(result: dict[str, Any], rows: list[dict[str, float]]) -> None:
    """RSS before the run, at its peak, and per connection on the all-connected plateau."""
    if not rows:
        return
    base = rows[0]["server_rss_kb"]
    most = max(r["server_conns"] for r in rows)
    result["server_conns_max"] = int(most)
    result["server_rss_base_mb"] = round(base / 1024, 1)
    result["server_rss_peak_mb"] = round(max(r["server_rss_kb"] for r in rows) / 1024, 1)
    if most > 0:
        plateau = [r for r in rows if r["server_conns"] >= 0.98 * most]
        result["rss_per_conn_kb"] = round(
            (max(r["server_rss_kb"] for r in plateau) - base) / most, 1
        )
        # settled: at the plateau's end, after the login churn
        last = plateau[-1]
        result["rss_settled_mb"] = round(last["server_rss_kb"] / 1024, 1)
        result["rss_per_conn_settled_kb"] = round(
            (last["server_rss_kb"] - base) / last["server_conns"], 1
        )
    result["server_cpu_s"] = round(rows[-1]["server_cpu_s"] - rows[0]["server_cpu_s"], 2)
    loadgen = [r["loadgen_cpu_s"] for r in rows if not math.isnan(r["loadgen_cpu_s"])]
    if len(loadgen) > 1:
        result["loadgen_cpu_s"] = round(loadgen[-1] - loadgen[0], 2)
    result["wall_s"] = round(rows[-1]["t"] - rows[0]["t"], 1)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    meta = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(summarize(meta, Path(sys.argv[2]), Path(sys.argv[3]))))
