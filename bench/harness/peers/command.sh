#!/usr/bin/env bash
# A server run by a command (xmppd, or any other): the harness's view of it.
#   command.sh start | stop | register N | clean | pid | port | dir
# Environment:
#   PEER_NAME     name of its temp dir (default: command)
#   TARGET_PORT   its client port on 127.0.0.1 (required)
#   START_CMD     runs the server in the foreground; started in the temp dir, pinned
#                 to SERVER_CPU, output in DIR/log/stdout.log, pid in DIR/server.pid
#   REGISTER_CMD  makes the accounts; run by bash with NUSERS, DOMAIN, USER_PREFIX and
#                 PASS_PREFIX set (userN / passN)
set -euo pipefail
. "$(dirname "$0")/../common.sh"
NAME="${PEER_NAME:-command}"
DIR="$(peer_dir "$NAME")"
PIDFILE="$DIR/server.pid"
PORT="${TARGET_PORT:?TARGET_PORT: the port the server listens on}"
pid() { cat "$PIDFILE" 2>/dev/null || true; }

start() {
    [ -n "${START_CMD:-}" ] || die "START_CMD is not set"
    if alive "$(pid)"; then log "$NAME is already running (pid $(pid))"; return; fi
    mkdir -p "$DIR/log"
    ensure_cert "$DIR"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    log "starting $NAME on port $PORT, cpu $SERVER_CPU: $START_CMD"
    (cd "$DIR" && exec taskset -c "$SERVER_CPU" bash -c "exec $START_CMD" >"$DIR/log/stdout.log" 2>&1) &
    echo $! > "$PIDFILE"
    until_listening "$PORT" 60 || { tail -20 "$DIR/log/stdout.log" >&2; die "$NAME is not listening on $PORT"; }
}

register() {
    [ -n "${REGISTER_CMD:-}" ] || { log "no REGISTER_CMD: the accounts must exist"; return; }
    log "making $1 accounts on $NAME"
    NUSERS="$1" DOMAIN="$DOMAIN" USER_PREFIX="$USER_PREFIX" PASS_PREFIX="$PASS_PREFIX" \
        bash -c "$REGISTER_CMD"
}

case "${1:-}" in
    start) start ;;
    stop) stop_pid "$NAME" "$(pid)"; rm -f "$PIDFILE" ;;
    register) register "${2:?register N}" ;;
    clean) stop_pid "$NAME" "$(pid)"; drop_peer_dir "$NAME" ;;
    pid) pid ;;
    port) echo "$PORT" ;;
    dir) echo "$DIR" ;;
    *) echo "usage: $0 start|stop|register N|clean|pid|port|dir" >&2; exit 2 ;;
esac
