#!/usr/bin/env bash
# bench/xchat.sh PEER USERS RATE: one chat run with bench/chatload.py instead of tsung.
#
# What bench/harness/tsung_run.py does for a tsung run, with the harness's own parts:
# harness/peers/PEER.sh stops, starts (pinned to SERVER_CPU) and registers the server,
# harness/samples.py samples its CPU and RSS (and the generator's) and cuts the
# samples to the send phase. chatload runs pinned to TSUNG_CPU.
# Prints one JSON line in the shape of the harness's chat summaries (scenario
# "xchat"), with chatload's exact count beside it. Called by bench/run.sh for plan
# steps "xchat USERS RATE [KNOB=VALUE...]"; the peer's environment (custom target's
# START_CMD, REGISTER_CMD, ...) comes from there.
#
# Knobs: DURATION=20 (s of sending), LOGIN_RATE=200 (users/s), MSG_SIZE=64,
# PROCS=1 (chatload worker processes; all on TSUNG_CPU, which may list several
# cores), DRAIN_TIMEOUT=60, KEEP_SERVER=0, RESULTS_DIR, SM=1 (every user enables
# stream management and answers the server's ack requests; xmppd then needs the
# stream_management module: XMPPD_MODULES).
set -euo pipefail
BENCH="$(cd "$(dirname "$0")" && pwd)"
HARNESS="$BENCH/harness"
. "$HARNESS/common.sh"

SERVER="${1:?usage: xchat.sh PEER USERS RATE}"; USERS="${2:?}"; RATE="${3:?}"
PEER="$HARNESS/peers/$SERVER.sh"
[ -x "$PEER" ] || die "no peer script $PEER"
PYTHON="$(python3 -c 'import sys; print(sys.executable)')"
TSUNG_CPU="${TSUNG_CPU:-1}"
RUN_DIR="${RESULTS_DIR:-$BENCH/results}/raw/$(date +%Y%m%d-%H%M%S)_${SERVER}_xchat_${USERS}u_${RATE}"
mkdir -p "$RUN_DIR"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

SAMPLER_PID=""
cleanup() {
    [ -n "$SAMPLER_PID" ] && kill -TERM "$SAMPLER_PID" 2>/dev/null || true
    [ "${KEEP_SERVER:-0}" = 1 ] || "$PEER" stop || true
}
trap cleanup EXIT

[ "${KEEP_SERVER:-0}" = 1 ] || "$PEER" stop   # a fresh server for every run, as tsung's
"$PEER" start >&2
"$PEER" register "$USERS" >&2
HOST=127.0.0.1; PORT="$("$PEER" port)"; SPID="$("$PEER" pid)"
[ -n "$SPID" ] || die "server pid unknown: nothing to sample"
sleep 2   # let the server settle after registration, as the harness does

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "xchat $SERVER at $HOST:$PORT pid=$SPID: $USERS users, $RATE msg/s for ${DURATION:-20} s, load before: $LOAD_BEFORE"
taskset -c "$TSUNG_CPU" "$PYTHON" "$BENCH/chatload.py" --host "$HOST" --port "$PORT" \
    --domain "$DOMAIN" --user-prefix "$USER_PREFIX" --pass-prefix "$PASS_PREFIX" \
    --users "$USERS" --arrival-rate "${LOGIN_RATE:-200}" --rate "$RATE" \
    --duration "${DURATION:-20}" --size "${MSG_SIZE:-64}" --procs "${PROCS:-1}" \
    --drain-timeout "${DRAIN_TIMEOUT:-60}" ${SM:+--sm} > "$RUN_DIR/chatload.json" 2> "$RUN_DIR/chatload.log" &
LOADGEN_PID=$!
python3 "$HARNESS/samples.py" "$SPID" "$LOADGEN_PID" "$PORT" "$RUN_DIR/samples.csv" 0.5 &
SAMPLER_PID=$!
wait "$LOADGEN_PID" || true   # 1: the count is not exact, which the summary says
wait "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""
tail -1 "$RUN_DIR/chatload.log" >&2
[ -s "$RUN_DIR/chatload.json" ] || die "chatload wrote no result (see $RUN_DIR/chatload.log)"

"$PYTHON" "$BENCH/xchat_summary.py" "$RUN_DIR" \
    "{\"server\": \"$SERVER\", \"users\": $USERS, \"rate\": $RATE, \"target\": \"$HOST:$PORT\",
      \"run_id\": \"$(basename "$RUN_DIR")\", \"loadavg_before\": \"$LOAD_BEFORE\",
      \"loadavg_after\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}" | tee "$RUN_DIR/summary.json"
