#!/usr/bin/env bash
# A private ejabberd for the benchmark: one Erlang VM with one scheduler (+S 1:1),
# pinned to SERVER_CPU, its mnesia database, log and cookie in its temp dir.
#   ejabberd.sh start | stop | register N | clean | pid | port | dir
# EJABBERD_PORT (15222) is its client port; its Erlang node listens on 127.0.0.1 only.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/../common.sh"
DIR="$(peer_dir ejabberd)"
PIDFILE="$DIR/server.pid"
PORT="${EJABBERD_PORT:-15222}"
NODE="xmppd_bench_ejabberd@localhost"
VM_ARGS=(+S 1:1 +K true +P 250000)
pid() { cat "$PIDFILE" 2>/dev/null || true; }
# Where Debian's ejabberdctl finds the ejabberd applications.
libs() { sed -n "s/^ERL_LIBS='\(.*\)'$/\1/p" "$(command -v ejabberdctl || echo /usr/sbin/ejabberdctl)" | head -1; }
cookie() {
    [ -s "$DIR/cookie" ] || { od -An -N16 -tx1 /dev/urandom | tr -d ' \n' > "$DIR/cookie"; chmod 600 "$DIR/cookie"; }
    cat "$DIR/cookie"
}
node_flags=(-kernel inet_dist_use_interface "{127,0,0,1}")

start() {
    if alive "$(pid)"; then log "ejabberd is already running (pid $(pid))"; return; fi
    mkdir -p "$DIR/db" "$DIR/log"
    ensure_cert "$DIR"
    fill "$HERE/ejabberd.yml.tmpl" "$DIR/ejabberd.yml" WORKDIR="$DIR" PORT="$PORT" DOMAIN="$DOMAIN"
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    log "starting ejabberd on port $PORT, cpu $SERVER_CPU (node $NODE)"
    (
        cd "$DIR"
        export HOME="$DIR" ERL_LIBS="$(libs)" ERL_MAX_PORTS=65536 ERL_CRASH_DUMP="$DIR/log/erl_crash.dump" \
               EJABBERD_CONFIG_PATH="$DIR/ejabberd.yml" EJABBERD_LOG_PATH="$DIR/log/ejabberd.log"
        # erl execs the VM, so the recorded pid is the VM's
        exec taskset -c "$SERVER_CPU" erl -sname "$NODE" -setcookie "$(cookie)" -noinput \
            "${VM_ARGS[@]}" "${node_flags[@]}" -kernel inet_dist_listen_min 15230 inet_dist_listen_max 15239 \
            -mnesia dir "\"$DIR/db\"" -s ejabberd >"$DIR/log/stdout.log" 2>&1
    ) &
    echo $! > "$PIDFILE"
    until_listening "$PORT" 90 || { tail -20 "$DIR/log/stdout.log" "$DIR/log/ejabberd.log" >&2 || true; die "ejabberd is not listening on $PORT"; }
}

# register N: userI/passI for I in 1..N, through a hidden node calling ejabberd_auth
register() {
    alive "$(pid)" || die "ejabberd is not running"
    log "making $1 accounts on ejabberd"
    HOME="$DIR" ERL_LIBS="$(libs)" erl -sname "bench_register_$$@localhost" -setcookie "$(cookie)" \
        -hidden -noinput "${node_flags[@]}" -kernel inet_dist_listen_min 15240 inet_dist_listen_max 15249 \
        -eval "
            Made = lists:foldl(fun(I, Acc) ->
                N = integer_to_binary(I),
                User = <<\"$USER_PREFIX\", N/binary>>, Pass = <<\"$PASS_PREFIX\", N/binary>>,
                case rpc:call('$NODE', ejabberd_auth, try_register, [User, <<\"$DOMAIN\">>, Pass]) of
                    ok -> Acc + 1;
                    {error, exists} -> Acc;
                    Other -> io:format(\"~s: ~p~n\", [User, Other]), halt(1)
                end
            end, 0, lists:seq(1, $1)),
            io:format(\"~b accounts made, ~b existed~n\", [Made, $1 - Made]),
            halt(0)."
}

case "${1:-}" in
    start) start ;;
    stop) stop_pid ejabberd "$(pid)"; rm -f "$PIDFILE" ;;   # the VM stops cleanly on SIGTERM
    register) register "${2:?register N}" ;;
    clean) stop_pid ejabberd "$(pid)"; drop_peer_dir ejabberd ;;
    pid) pid ;;
    port) echo "$PORT" ;;
    dir) echo "$DIR" ;;
    *) echo "usage: $0 start|stop|register N|clean|pid|port|dir" >&2; exit 2 ;;
esac
