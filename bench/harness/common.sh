# Helpers sourced by the harness's shell scripts (bench/harness/peers/*.sh, bench/xchat.sh).
#
# Every server runs as a private instance under a temp dir of its own, remembered in
# $BENCH_STATE_DIR/<name>.dir so that accounts survive from one run to the next (the
# first run with N users pays for creating them). Nothing outside those dirs is touched.
HARNESS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH_STATE_DIR="${BENCH_STATE_DIR:-$(dirname "$HARNESS")/results/state}"
mkdir -p "$BENCH_STATE_DIR"
DOMAIN="${DOMAIN:-bench.local}"
SERVER_CPU="${SERVER_CPU:-0}"
USER_PREFIX="${USER_PREFIX:-user}"   # accounts are userN with password passN
PASS_PREFIX="${PASS_PREFIX:-pass}"

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# peer_dir NAME: the instance's temp dir, made on first use
peer_dir() {
    local pointer="$BENCH_STATE_DIR/$1.dir" dir=""
    [ -f "$pointer" ] && dir="$(cat "$pointer")"
    if [ -z "$dir" ] || [ ! -d "$dir" ]; then
        dir="$(mktemp -d "${TMPDIR:-/tmp}/xmppd-bench-$1.XXXXXX")"
        chmod 755 "$dir"
        echo "$dir" > "$pointer"
    fi
    echo "$dir"
}

# drop_peer_dir NAME: delete the instance's temp dir (its accounts with it)
drop_peer_dir() {
    local pointer="$BENCH_STATE_DIR/$1.dir" dir
    [ -f "$pointer" ] || return 0
    dir="$(cat "$pointer")"
    case "$dir" in */xmppd-bench-*) rm -rf "$dir" ;; esac
    rm -f "$pointer"
}

# ensure_cert DIR: DIR/cert/server.{key,crt,pem} for $DOMAIN, unless bench/run.sh put one
ensure_cert() {
    local cert="$1/cert"
    [ -s "$cert/server.pem" ] && return 0
    mkdir -p "$cert"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$DOMAIN" \
        -addext "subjectAltName=DNS:$DOMAIN" \
        -keyout "$cert/server.key" -out "$cert/server.crt" >/dev/null 2>&1 || die "openssl failed"
    cat "$cert/server.crt" "$cert/server.key" > "$cert/server.pem"
    chmod 644 "$cert"/*
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# until_gone PID SECONDS: wait for a process to exit; false if it is still there
until_gone() {
    local deadline=$((SECONDS + $2))
    while alive "$1"; do [ "$SECONDS" -lt "$deadline" ] || return 1; sleep 0.2; done
}

# until_listening PORT SECONDS: wait for 127.0.0.1:PORT to accept a connection
until_listening() {
    local deadline=$((SECONDS + $2))
    until (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# fill TEMPLATE OUT KEY=VALUE...: the template with every @KEY@ replaced
fill() {
    local template="$1" out="$2"; shift 2
    python3 - "$template" "$out" "$@" <<'PY'
import sys
text = open(sys.argv[1]).read()
for pair in sys.argv[3:]:
    key, _, value = pair.partition("=")
    text = text.replace(f"@{key}@", value)
if "@" in text and any(f"@{w}@" in text for w in ("PORT", "DOMAIN", "WORKDIR")):
    sys.exit(f"{sys.argv[1]}: a placeholder was left unfilled")
open(sys.argv[2], "w").write(text)
PY
}

# stop_pid NAME PID: SIGTERM, then SIGKILL after 30 s
stop_pid() {
    alive "$2" || return 0
    log "stopping $1 (pid $2)"
    kill -TERM "$2" 2>/dev/null || true
    until_gone "$2" 30 || { log "$1 ignored SIGTERM: SIGKILL"; kill -KILL "$2" 2>/dev/null || true; }
}
