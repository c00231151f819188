"""One tsung run against one server: start it fresh, make its accounts, load it, sum up.

usage: python bench/harness/tsung_run.py PEER SCENARIO USERS RATE

PEER is a script in bench/harness/peers/ (ejabberd, prosody, or command: any
server started by START_CMD, which is how bench/run.sh runs xmppd). SCENARIO is
login (RATE: users arriving per second) or chat (RATE: messages per second in
total). Prints the run's summary as one JSON line (bench/harness/tsung_summary.py)
and keeps tsung's logs, the scenario and the samples in
RESULTS_DIR/raw/<run>/.

Knobs (environment): HOLD=20 (login: seconds everybody stays online),
LOGIN_RATE=200 (chat: users arriving per second), DURATION=60 (chat: seconds
of sending), MSG_SIZE=64, SERVER_CPU=0 and TSUNG_CPU=1 (taskset cores),
KEEP_SERVER=0 (1: leave the server running), DUMPTRAFFIC=false, RESULTS_DIR
(default bench/results/harness), and DOMAIN, USER_PREFIX, PASS_PREFIX as in
common.sh.

Measured the same way for every server: the server alone on SERVER_CPU, tsung
alone on TSUNG_CPU, a new server process per run (so memory baselines compare),
the server's whole process tree sampled every second (samples.py).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = Path(__file__).resolve().parent
sys.path.insert(0, str(HARNESS))

from tsung_summary import summarize  # noqa: E402  (beside this file)

TSUNG_PORTS = ("15450", "15499")  # the tsung controller's Erlang distribution ports
SETTLE_S = 2  # after registration, before the load


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def knob(name: str, default: str) -> str:
    return os.environ.get(name) or default


def peer(script: Path, *args: str, answer: bool = False) -> str:
    """Run the peer script; its stdout if an `answer` is wanted, else it goes to our
    stderr with the script's own (stdout is the summary's alone)."""
    out = subprocess.PIPE if answer else sys.stderr
    done = subprocess.run([str(script), *args], stdout=out, text=True, check=True)
    return done.stdout.strip() if answer else ""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def plan(scenario: str, users: int, rate: float) -> dict[str, float | int]:
    """Arrival rate, ramp, and for chat the think time and messages per user.

    The arrival phase lasts long enough for twice the users (tsung stops it at
    USERS); the run may take twice the expected time plus two minutes before it is
    stopped as stuck."""
    hold, duration = int(knob("HOLD", "20")), float(knob("DURATION", "60"))
    arrival = float(knob("LOGIN_RATE", "200")) if scenario == "chat" else rate
    ramp = math.ceil(2 * users / arrival) + 2
    values: dict[str, float | int] = {"arrival": arrival, "ramp": ramp, "hold": hold}
    if scenario == "chat":
        values["think"] = round(users / rate, 4)
        values["msgs"] = max(1, round(duration * rate / users))
        expected = ramp + duration + 20
    else:
        values["think"], values["msgs"] = 1, 1
        expected = ramp + hold + 30
    values["limit"] = int(2 * expected + 120)
    return values


def write_scenario(
    scenario: str, out: Path, port: str, users: int, p: dict[str, float | int]
) -> None:
    tsung = shutil.which("tsung")
    assert tsung is not None
    fills = {
        "DTD": str(Path(tsung).resolve().parent.parent / "share/tsung/tsung-1.0.dtd"),
        "LOGIN_STEPS": (HARNESS / "scenarios/login_steps.xml").read_text().rstrip("\n"),
        "PORT": port, "DOMAIN": knob("DOMAIN", "bench.local"), "USERS": str(users),
        "USER_PREFIX": knob("USER_PREFIX", "user"), "PASS_PREFIX": knob("PASS_PREFIX", "pass"),
        "ARRIVAL_RATE": f"{p['arrival']:g}", "RAMP": str(p["ramp"]),
        "LOAD_DURATION": str(p["limit"]), "HOLD": str(p["hold"]),
        "ACK_TIMEOUT_MS": str((int(p["ramp"]) + 120) * 1000),
        "THINK": str(p["think"]), "MSGS": str(p["msgs"]), "MSG_SIZE": knob("MSG_SIZE", "64"),
        "DRAIN": "5", "DUMPTRAFFIC": knob("DUMPTRAFFIC", "false"),
    }
    text = (HARNESS / f"scenarios/{scenario}.xml.tmpl").read_text()
    text = re.sub(r"@([A-Z_]+)@", lambda m: fills[m.group(1)], text)
    out.write_text(text)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """End tsung and its Erlang VM: the process group it was started in, ours alone."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    try:
        return run(argv)
    except subprocess.CalledProcessError as e:
        log(f"{' '.join(map(str, e.cmd))} failed (exit {e.returncode})")
        return 1


def run(argv: list[str]) -> int:
    if len(argv) != 5 or argv[2] not in ("login", "chat"):
        sys.exit(__doc__)
    name, scenario, users, rate = argv[1], argv[2], int(argv[3]), float(argv[4])
    script = HARNESS / "peers" / f"{name}.sh"
    if not script.is_file():
        sys.exit(f"no peer script {script}")
    for tool in ("tsung", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    keep = knob("KEEP_SERVER", "0") == "1"
    results = Path(knob("RESULTS_DIR", str(HARNESS.parent / "results/harness")))
    run_id = f"{time.strftime('%Y%m%d-%H%M%S')}_{name}_{scenario}_{users}u_{rate:g}"
    run_dir = results / "raw" / run_id
    run_dir.mkdir(parents=True)
    p = plan(scenario, users, rate)
    scratch = Path(tempfile.mkdtemp(prefix="xmppd-bench-tsung."))
    tsung: subprocess.Popen[bytes] | None = None
    sampler: subprocess.Popen[bytes] | None = None
    try:
        if not keep:
            peer(script, "stop")  # a fresh server process for every run
        peer(script, "start")
        peer(script, "register", str(users))
        port, server_pid = peer(script, "port", answer=True), peer(script, "pid", answer=True)
        time.sleep(SETTLE_S)
        write_scenario(scenario, run_dir / "scenario.xml", port, users, p)
        before = loadavg()
        log(
            f"{run_id}: port {port}, pid {server_pid or '?'}, ramp {p['ramp']} s, "
            f"limit {p['limit']} s, load {before}"
        )
        env = dict(
            os.environ,
            HOME=str(scratch),  # tsung writes ~/.tsung
            ERL_FLAGS="-tsung_controller dumpstats_interval 1000 "
            "-kernel inet_dist_use_interface {127,0,0,1}",
        )
        with open(run_dir / "tsung.out", "wb") as out:
            tsung = subprocess.Popen(
                ["taskset", "-c", knob("TSUNG_CPU", "1"), "tsung",
                 "-f", str(run_dir / "scenario.xml"), "-l", str(run_dir), "-n",
                 "-t", TSUNG_PORTS[0], "-T", TSUNG_PORTS[1], "-i", f"bench{os.getpid()}", "start"],
                cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        if server_pid:
            sampler = subprocess.Popen(
                [sys.executable, str(HARNESS / "samples.py"), server_pid, str(tsung.pid), port,
                 str(run_dir / "samples.csv"), "1.0"]
            )
        else:
            log("the server's pid is unknown: no CPU or memory figures")
        started = time.monotonic()
        while tsung.poll() is None:
            time.sleep(1)
            if time.monotonic() - started > p["limit"]:
                log(f"tsung still runs after {p['limit']} s: stopped")
                stop_group(tsung)
            elif server_pid and not Path(f"/proc/{server_pid}").exists():
                log("the server died during the run")
                stop_group(tsung)
        if sampler is not None:
            sampler.terminate()
            sampler.wait(10)
        logs = sorted(d for d in run_dir.iterdir() if d.is_dir() and (d / "tsung.log").exists())
        if not logs:
            sys.stderr.write((run_dir / "tsung.out").read_text()[-2000:])
            sys.exit(f"tsung wrote no tsung.log under {run_dir}")
        meta = {
            "server": name, "scenario": scenario, "users": users, "rate": rate,
            "rate_unit": "msg/s" if scenario == "chat" else "users/s",
            "login_arrival_rate": p["arrival"], "ramp_s": p["ramp"],
            "chat_think_s": p["think"] if scenario == "chat" else None,
            "msgs_per_user": p["msgs"] if scenario == "chat" else None,
            "target": f"127.0.0.1:{port}", "run_id": run_id,
            "loadavg_before": before, "loadavg_after": loadavg(),
        }
        summary = json.dumps(summarize(meta, logs[-1], run_dir / "samples.csv"))
        (run_dir / "summary.json").write_text(summary + "\n")
        with open(results / "results.jsonl", "a") as f:
            f.write(summary + "\n")
        full = logs[-1] / "tsung-fullstats.log"
        if full.exists():
            subprocess.run(["gzip", "-f", str(full)], check=False)
        print(summary)
        return 0
    finally:
        if tsung is not None and tsung.poll() is None:
            stop_group(tsung)
        if sampler is not None and sampler.poll() is None:
            sampler.terminate()
        if not keep:
            subprocess.run([str(script), "stop"], check=False)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
