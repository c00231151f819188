#!/usr/bin/env bash
# Install what the tests need and run the whole suite. Extra arguments go to pytest.
#
# Debian packages for the services the tests start (.ci/services.sh), then the
# locked Python packages (requirements/test.txt) into the active virtualenv, or
# into .venv here when none is active (Debian's own Python refuses pip installs),
# and the aioxmpp test client's own virtualenv (.venv-aioxmpp, requirements/aioxmpp.txt:
# it needs an lxml that xmppd's lock excludes; tests/clients/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/services.sh
if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
python -m pip install --quiet --disable-pip-version-check -r requirements/test.txt
python -m pip install --quiet --disable-pip-version-check --no-deps -e .
[[ -x .venv-aioxmpp/bin/python ]] || python3 -m venv .venv-aioxmpp
.venv-aioxmpp/bin/python -m pip install --quiet --disable-pip-version-check \
    --require-hashes -r requirements/aioxmpp.txt
exec python -m pytest "$@"
