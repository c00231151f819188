#!/usr/bin/env bash
# A private Prosody for the benchmark (single-threaded), pinned to SERVER_CPU, its
# data and log in its temp dir.
#   prosody.sh start | stop | register N | clean | pid | port | dir
# PROSODY_PORT (15322) is its client port.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/../common.sh"
DIR="$(peer_dir prosody)"
PIDFILE="$DIR/server.pid"
PORT="${PROSODY_PORT:-15322}"
CONFIG="$DIR/prosody.cfg.lua"
pid() { cat "$PIDFILE" 2>/dev/null || true; }
# Debian's prosodyctl names its Lua interpreter (first line) and source dir.
prosodyctl_bin() { command -v prosodyctl || echo /usr/bin/prosodyctl; }
lua_bin() { head -1 "$(prosodyctl_bin)" | sed 's|^#! *||; s|^/usr/bin/env *||'; }
source_dir() { sed -n "s/^CFG_SOURCEDIR='\(.*\)';$/\1/p" "$(prosodyctl_bin)" | head -1; }

configure() {
    mkdir -p "$DIR/data" "$DIR/log"
    ensure_cert "$DIR"
    fill "$HERE/prosody.cfg.lua.tmpl" "$CONFIG" WORKDIR="$DIR" PORT="$PORT" DOMAIN="$DOMAIN"
}

start() {
    if alive "$(pid)"; then log "prosody is already running (pid $(pid))"; return; fi
    configure
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    log "starting prosody on port $PORT, cpu $SERVER_CPU"
    # prosody is a Lua script exec'd through env: the recorded pid is the server's
    (cd "$DIR" && HOME="$DIR" exec taskset -c "$SERVER_CPU" prosody --config "$CONFIG" -F >"$DIR/log/stdout.log" 2>&1) &
    echo $! > "$PIDFILE"
    until_listening "$PORT" 60 || { tail -20 "$DIR/log/stdout.log" "$DIR/log/prosody.log" >&2 || true; die "prosody is not listening on $PORT"; }
}

register() {
    [ -f "$CONFIG" ] || configure
    log "making $1 accounts on prosody"
    "$(lua_bin)" "$HERE/prosody_accounts.lua" "$(source_dir)" "$CONFIG" "$DOMAIN" "$1" \
        "$USER_PREFIX" "$PASS_PREFIX" 2>&1 | grep -v -i 'warn.*config' | grep . || true
}

case "${1:-}" in
    start) start ;;
    stop) stop_pid prosody "$(pid)"; rm -f "$PIDFILE" ;;
    register) register "${2:?register N}" ;;
    clean) stop_pid prosody "$(pid)"; drop_peer_dir prosody ;;
    pid) pid ;;
    port) echo "$PORT" ;;
    dir) echo "$DIR" ;;
    *) echo "usage: $0 start|stop|register N|clean|pid|port|dir" >&2; exit 2 ;;
esac
