#!/usr/bin/env bash
# bench/run.sh [quick|full|MODE-FILE]: xmppd, ejabberd and Prosody side by side,
# on the same tsung scenarios, in one run; writes tables and plots.
#
#   bench/run.sh quick     ~10 min: login 1000 users @40/s; chat 1000 users @1000 and @3500 msg/s
#   bench/run.sh full      ~35 min: login 1000 @200/s (saturation) and 5000 @40/s;
#                          chat 1000 users @1000, 2000, 3000, 4000 msg/s (30 s each)
#   bench/run.sh my.plan   lines "SCENARIO USERS RATE [KNOB=VALUE...]"; SCENARIO is
#                          login or chat (tsung), or xchat: bench/chatload.py, which
#                          counts every message by id (bench/xchat.sh; knobs DURATION,
#                          LOGIN_RATE, MSG_SIZE, PROCS, DRAIN_TIMEOUT, SM)
#
# Output: bench/results/<stamp>-<mode>/ with results.jsonl (one JSON summary per
# run, as the harness prints it plus "label"), report.md (tables, ratios, targets),
# *.png (plots) and harness/raw/<run>/ (tsung logs). bench/results/ is gitignored.
#
# The harness is bench/harness/ (README there): the peers' configurations and
# start scripts, the tsung scenarios, the sampler and the summaries; xmppd is run
# through its `command` peer. Needs tsung, taskset and openssl (and ejabberd and
# Prosody for those peers). Environment knobs:
#   SERVERS="xmppd ejabberd prosody"   which servers (in this interleaved order)
#   SERVER_CPU=0 TSUNG_CPU=1           cores (taskset) for the server and tsung
#   XMPPD_PORT=15422                   xmppd's c2s port during the bench
#   XMPPD_CMD                          command running xmppd in the foreground
#                                      (default: this Python, `-m xmppd -c <rendered config>`);
#                                      the harness samples the whole process tree, so a
#                                      command that forks several worker processes is
#                                      measured as one server (pin them with SERVER_CPU=0-1)
#   XMPPD_ALLOCATOR=auto               xmppd's `allocator` (auto: jemalloc when installed;
#                                      system: the C library's malloc, for an A/B)
#   XMPPD_BATCH_WINDOW_MS=10           xmppd's `batch_window_ms` (the server's default; 0:
#                                      input handled as it comes, for an A/B)
#   XMPPD_ENV=MALLOC_MMAP_THRESHOLD_=131072
#                                      environment of xmppd: glibc then maps uvloop's 256 KiB
#                                      per-connection TLS read buffer on its own, so only
#                                      its touched pages are resident (docs/bench.md)
#   XMPPD_MODULES="disco ping ..."     modules enabled (those that exist); default: the
#                                      ones with a counterpart in the peers' configs
#   XMPPD_ITERATIONS=4096              PBKDF2 rounds of the bench accounts (ejabberd: 4096,
#                                      Prosody: 10000); accounts are made once per value
#   NOISE="--cpu 2 --cpu-load 40 --io 1 --vm 1 --vm-bytes 256M"
#                                      run stress-ng with these arguments for the whole
#                                      bench: a noisy neighbour, as on a shared cloud host
#   PROFILE=1                          also record a py-spy profile of xmppd in every run
#                                      (flame graph + top functions in the run's folder)
#   BENCH_STATE_DIR                    where the peers' temp dirs are remembered
#                                      (default bench/results/state; accounts persist there)
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
PROJECT="$(dirname "$BENCH")"
MODE="${1:-quick}"
HARNESS="$BENCH/harness"
SERVERS="${SERVERS:-xmppd ejabberd prosody}"
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"
export XMPPD_PORT="${XMPPD_PORT:-15422}"
export XMPPD_ITERATIONS="${XMPPD_ITERATIONS:-4096}"
export BENCH_STATE_DIR="${BENCH_STATE_DIR:-$BENCH/results/state}"
case "$BENCH_STATE_DIR" in /*) ;; *) BENCH_STATE_DIR="$PWD/$BENCH_STATE_DIR" ;; esac
export DOMAIN="${DOMAIN:-bench.local}"
OUT="${BENCH_OUT:-$BENCH/results/$(date +%Y%m%d-%H%M%S)-$(basename "$MODE" .plan)}"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac  # tsung runs elsewhere: relative paths break
export RESULTS_DIR="$OUT/harness"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# --- what runs: "SCENARIO USERS RATE [KNOB=VALUE...]", each for every server ------------
case "$MODE" in
    quick) PLAN=(
        "login 1000 40 HOLD=10"
        "chat 1000 1000 DURATION=20"
        "chat 1000 3500 DURATION=20") ;;
    full) PLAN=(
        "login 1000 200 HOLD=10"
        "login 5000 40 HOLD=15"
        "chat 1000 1000 DURATION=30"
        "chat 1000 2000 DURATION=30"
        "chat 1000 3000 DURATION=30"
        "chat 1000 4000 DURATION=30") ;;
    *) [ -f "$MODE" ] || die "usage: bench/run.sh quick|full|PLAN-FILE (lines: SCENARIO USERS RATE [KNOB=VALUE...])"
       mapfile -t PLAN < <(grep -v '^\s*\(#\|$\)' "$MODE"); MODE="$(basename "$MODE" .plan)" ;;
esac

# --- checks ------------------------------------------------------------------------------
for tool in tsung taskset openssl; do command -v "$tool" >/dev/null || die "$tool is not installed"; done
for s in $SERVERS; do
    case "$s" in
        xmppd)  # the harness starts xmppd outside the project: it must import this project's code
            where="$(cd / && "$PYTHON" -c 'import xmppd.modules, os; print(os.path.dirname(os.path.dirname(xmppd.modules.__file__)))' 2>/dev/null)" \
                || die "xmppd is not importable by $PYTHON (pip install -e $PROJECT)"
            [ "$where" -ef "$PROJECT" ] || die "$PYTHON imports xmppd from $where, not from $PROJECT (pip install -e $PROJECT)" ;;
        ejabberd) command -v erl >/dev/null && [ -x /usr/sbin/ejabberdctl ] || die "ejabberd is not installed (SERVERS= to skip it)" ;;
        prosody) command -v prosody >/dev/null || die "prosody is not installed (SERVERS= to skip it)" ;;
        *) die "unknown server $s" ;;
    esac
done
if [ ! -f "$PROJECT/modules/roster.py" ]; then
    log "NOTE: xmppd has no roster module yet: tsung's roster <match> fails, so xmppd's"
    log "      logins_ok is 0 and 'nomatch' errors are counted; use tr_login_count instead"
fi

mkdir -p "$OUT" "$RESULTS_DIR" "$BENCH_STATE_DIR"

# --- one certificate for every server ------------------------------------------------------
CERT="$BENCH_STATE_DIR/cert"
if [ ! -f "$CERT/server.pem" ]; then
    mkdir -p "$CERT"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -keyout "$CERT/server.key" \
        -out "$CERT/server.crt" -subj "/CN=$DOMAIN" -addext "subjectAltName=DNS:$DOMAIN" \
        >/dev/null 2>&1 || die "openssl failed"
    cat "$CERT/server.crt" "$CERT/server.key" > "$CERT/server.pem"
    chmod 644 "$CERT"/*
fi
peer_workdir() {  # the harness's temp dir for a server (created on first use)
    case "$1" in
        xmppd) PEER_NAME="xmppd-i$XMPPD_ITERATIONS" TARGET_PORT="$XMPPD_PORT" "$HARNESS/peers/command.sh" dir ;;
        *) "$HARNESS/peers/$1.sh" dir ;;
    esac
}
for s in $SERVERS; do   # the harness makes a certificate only where none is; give it ours
    wd="$(peer_workdir "$s")"; mkdir -p "$wd/cert"; cp "$CERT"/server.* "$wd/cert/"
done

# --- xmppd: config rendered into its temp dir ----------------------------------------------
XWD="$(peer_workdir xmppd 2>/dev/null || true)"
if [[ " $SERVERS " == *" xmppd "* ]]; then
    modules=""
    for m in ${XMPPD_MODULES:-disco ping version time roster presence carbons blocking privacy private vcard offline last stream_management}; do
        [ -f "$PROJECT/modules/$m.py" ] && modules+="  $m: {}"$'\n'
    done
    mkdir -p "$XWD/data"
    "$PYTHON" - "$BENCH/xmppd.yml.tmpl" "$XWD/xmppd.yml" <<PY
import sys
text = open(sys.argv[1]).read()
for key, value in {"DOMAIN": "$DOMAIN", "WORKDIR": "$XWD", "PORT": "$XMPPD_PORT",
                   "CERT_DIR": "$XWD/cert", "ITERATIONS": "$XMPPD_ITERATIONS",
                   "ALLOCATOR": "${XMPPD_ALLOCATOR:-auto}",
                   "BATCH_WINDOW_MS": "${XMPPD_BATCH_WINDOW_MS:-10}",
                   "MODULES": """${modules%$'\n'}"""}.items():
    text = text.replace(f"@{key}@", value)
open(sys.argv[2], "w").write(text)
PY
    "$PYTHON" -m xmppd.cli.ctl -c "$XWD/xmppd.yml" check >/dev/null || die "bench config $XWD/xmppd.yml is invalid"
fi
XMPPD_ENV="${XMPPD_ENV-MALLOC_MMAP_THRESHOLD_=131072}"
XMPPD_CMD="${XMPPD_CMD:-env $XMPPD_ENV $PYTHON -m xmppd -c $XWD/xmppd.yml}"

# --- one harness run -> one JSON line in $OUT/results.jsonl -------------------------------
run_one() {  # SERVER SCENARIO USERS RATE [KNOB=VALUE...]
    local server="$1" scenario="$2" users="$3" rate="$4"; shift 4
    local env=("$@") peer="$server" out line prof=""
    if [ "$server" = xmppd ]; then
        peer=command
        env+=(PEER_NAME="xmppd-i$XMPPD_ITERATIONS" TARGET_PORT="$XMPPD_PORT" START_CMD="$XMPPD_CMD"
              REGISTER_CMD="'$PYTHON' -m xmppd.cli.ctl -c '$XWD/xmppd.yml' register-bulk '$DOMAIN' --count \"\$NUSERS\" --user-pattern \"\${USER_PREFIX}{n}\" --password-pattern \"\${PASS_PREFIX}{n}\"")
        [ "${PROFILE:-0}" = 1 ] && prof="$OUT/profile-$scenario-${users}u-$rate"
    fi
    log "=== $server $scenario users=$users rate=$rate ${*:-} (load $(cut -d' ' -f1-3 /proc/loadavg))"
    out="$OUT/run-$server-$scenario-${users}u-$rate.log"
    local prof_pid="" sched_pid=""
    if [ -n "$prof" ]; then start_profiler "$prof" & prof_pid=$!; fi
    if [ "$server" = xmppd ]; then  # run-queue delay per thread, from the kernel
        rm -f "$XWD/server.pid"
        "$PYTHON" "$BENCH/schedstat_sample.py" "$XWD/server.pid" "$OUT/schedstat-$scenario-${users}u-$rate.txt" &
        sched_pid=$!
    fi
    local load=("$PYTHON" "$HARNESS/tsung_run.py" "$peer" "$scenario" "$users" "$rate")
    # xchat: our own exact-count generator on the same peers, cores and sampler (xchat.sh)
    if [ "$scenario" = xchat ]; then load=("$BENCH/xchat.sh" "$peer" "$users" "$rate"); fi
    if env "${env[@]}" "${load[@]}" > "$out.json" 2> "$out"; then
        line="$(tail -1 "$out.json")"
        # xmppd's own account of the run's messages (its last log line before it stopped),
        # reconciled with tsung's counts in the report
        ledger="null"
        if [ "$server" = xmppd ]; then
            sed -n 's/.*pauses since start: //p' "$XWD/log/stdout.log" | tail -1 \
                > "$OUT/pauses-$scenario-${users}u-$rate.json"
            ledger="$(sed -n 's/.*messages since start: //p' "$XWD/log/stdout.log" | tail -1)"
            [ -n "$ledger" ] || { log "xmppd logged no message ledger (see $XWD/log/stdout.log)"; ledger="null"; }
        fi
        "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); d["label"]=sys.argv[2]; d["xmppd_ledger"]=json.loads(sys.argv[3]); d["knobs"]=sys.argv[4:]; print(json.dumps(d))' \
            "$line" "$server" "$ledger" "$@" >> "$OUT/results.jsonl"
        "$PYTHON" "$BENCH/report.py" --brief "$(tail -1 "$OUT/results.jsonl")"
    else
        log "run failed (see $out)"; tail -5 "$out" >&2
    fi
    if [ -n "$prof_pid" ]; then wait "$prof_pid" 2>/dev/null || true; fi  # not the NOISE process
    if [ -n "$sched_pid" ]; then wait "$sched_pid" 2>/dev/null || true; fi
}

# py-spy attaches to xmppd once the harness has started it (pid file in its temp dir)
start_profiler() {
    local base="$1" pid="" i
    for ((i = 0; i < 600; i++)); do
        pid="$(cat "$XWD/server.pid" 2>/dev/null || true)"
        [ -n "$pid" ] && ss -ltn "sport = :$XMPPD_PORT" | grep -q LISTEN && break
        sleep 0.2
    done
    [ -n "$pid" ] || return 0
    taskset -c "${TSUNG_CPU:-1}" py-spy record --pid "$pid" --rate 200 --nonblocking --format raw \
        -o "$base.folded" >/dev/null 2>&1 || true
    "$PYTHON" "$BENCH/profile_summary.py" "$base.folded" > "$base.txt" 2>/dev/null || true
}
if [ "${PROFILE:-0}" = 1 ]; then command -v py-spy >/dev/null || die "PROFILE=1 needs py-spy (pip install py-spy)"; fi

log "bench $MODE: servers [$SERVERS], output $OUT, load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
{
    echo "mode=$MODE servers=$SERVERS started=$(date -Is) host_cores=$(nproc)"
    echo "python=$("$PYTHON" -V 2>&1) tsung=$(dpkg-query -W -f='${Version}' tsung 2>/dev/null)" \
         "ejabberd=$(dpkg-query -W -f='${Version}' ejabberd 2>/dev/null) prosody=$(dpkg-query -W -f='${Version}' prosody 2>/dev/null)"
    echo "xmppd_batch_window_ms=${XMPPD_BATCH_WINDOW_MS:-10}"
    echo "xmppd_iterations=$XMPPD_ITERATIONS server_cpu=${SERVER_CPU:-0} tsung_cpu=${TSUNG_CPU:-1}"
    echo "xmppd_cmd=$XMPPD_CMD"
    echo "xmppd_modules=$(sed -n '/^modules:/,$p' "$XWD/xmppd.yml" 2>/dev/null | tail -n +2 | tr -d ' {}:' | tr '\n' ' ')"
} > "$OUT/env.txt"
if [ -n "${NOISE:-}" ]; then
    command -v stress-ng >/dev/null || die "NOISE needs stress-ng (apt-get install stress-ng)"
    # shellcheck disable=SC2086
    stress-ng $NOISE --quiet &
    noise_pid=$!
    trap 'kill "$noise_pid" 2>/dev/null || true' EXIT
    echo "noise=stress-ng $NOISE" >> "$OUT/env.txt"
    log "noisy neighbour: stress-ng $NOISE (pid $noise_pid)"
fi
for step in "${PLAN[@]}"; do
    read -r -a args <<< "$step"
    for s in $SERVERS; do run_one "$s" "${args[@]}"; done
done
echo "finished=$(date -Is)" >> "$OUT/env.txt"
if [[ " $SERVERS " == *" xmppd "* ]] && [ -f "$XWD/log/stdout.log" ]; then  # as logged at start
    echo "xmppd_allocator=$(sed -n 's/.*memory allocator: //p' "$XWD/log/stdout.log" | tail -1)" \
        >> "$OUT/env.txt"
fi
"$PYTHON" "$BENCH/report.py" "$OUT"
log "report: $OUT/report.md"
