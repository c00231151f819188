"""One xchat run (bench/xchat.sh) as one JSON line, in the shape of the harness's chat
summaries, so that bench/report.py puts it beside the tsung runs.

usage: python bench/xchat_summary.py RUN_DIR META_JSON

RUN_DIR holds chatload.json (bench/chatload.py's account) and samples.csv
(bench/harness/samples.py). The steady window is chatload's send phase: the barrier
kept everybody online before it, so there is no ramp inside it to trim. The
samples are read and cut with the sampler's own helpers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def summarize(run_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent / "harness"))
    from samples import cpu_between, read_samples  # the sampler's, not a copy

    load = json.loads((run_dir / "chatload.json").read_text())
    rows = read_samples(str(run_dir / "samples.csv"))
    t0, t1 = load["send_start_epoch"], load["send_end_epoch"]
    _, util = cpu_between(rows, "server_cpu_s", t0, t1)
    _, loadgen_util = cpu_between(rows, "loadgen_cpu_s", t0, t1)
    delivered = load["delivered_rate_in_send_phase"]
    res = dict(meta)
    res.update({
        "scenario": "xchat", "rate_unit": "msg/s", "load_generator": "bench/chatload.py",
        "procs": load["procs"], "users_online": load["users_online"],
        "stream_management": load.get("sm", False),
        "msgs_sent": load["sent"],
        "msgs_received": load["received_once"] + load["duplicates"],
        "delivery_ratio": load["delivery_ratio"],
        "received_once": load["received_once"], "duplicates": load["duplicates"],
        "missing": load["missing"], "missing_first": load["missing_first"],
        "bounced": load["bounced"], "exact": load["exact"],
        "steady_window_s": load["duration_s"],
        "msg_rate_sent_per_s": load["send_rate"],
        "msg_rate_delivered_per_s": delivered,
        "msg_latency_ms": load["latency_ms"],
        "server_cpu_util_pct_steady": None if util is None else round(util, 1),
        "server_cpu_us_per_msg": round(1e4 * util / delivered, 1) if util and delivered else None,
        "loadgen_cpu_util_pct_steady": None if loadgen_util is None else round(loadgen_util, 1),
        "generator_lag_max_ms": max((w["max"] for w in load["lag_ms"] if w), default=None),
        "generator_write_backlog_max_bytes": max(load["write_backlog_max_bytes"], default=None),
        "errors": {k: v for k, v in load["login_errors"].items() if v},
        "chatload": {k: v for k, v in load.items() if k != "missing_first"},
    })
    if rows:
        res["server_conns_max"] = int(max(r["server_conns"] for r in rows))
        res["server_rss_base_mb"] = round(rows[0]["server_rss_kb"] / 1024, 1)
        res["server_rss_peak_mb"] = round(max(r["server_rss_kb"] for r in rows) / 1024, 1)
        res["server_cpu_s"] = round(rows[-1]["server_cpu_s"] - rows[0]["server_cpu_s"], 2)
        res["wall_s"] = round(rows[-1]["t"] - rows[0]["t"], 1)
    return res


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    print(json.dumps(summarize(Path(argv[1]), json.loads(argv[2]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
