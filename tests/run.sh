#!/usr/bin/env bash
# Install what the tests need and run the whole suite. Extra arguments go to pytest.
#
# Debian packages for the services the tests start (.ci/services.sh), then the
# locked Python packages (requirements/test.txt) into the active virtualenv, or
# into .venv here when none is active (Debian's own Python refuses pip installs),
# and the aioxmpp test client's own virtualenv (.venv-aioxmpp, or the one of
# $XMPPD_AIOXMPP_PYTHON; requirements/aioxmpp.txt:
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
# The interpreter the tests run aioxmpp with (tests/integration/aioxmpp_client.py):
# $XMPPD_AIOXMPP_PYTHON when set (.ci/run points it into its empty work folder), so the
# lock goes where the tests look.
aioxmpp_python=${XMPPD_AIOXMPP_PYTHON:-.venv-aioxmpp/bin/python}
[[ -x $aioxmpp_python ]] || python3 -m venv "$(dirname "$(dirname "$aioxmpp_python")")"
"$aioxmpp_python" -m pip install --quiet --disable-pip-version-check \
    --require-hashes -r requirements/aioxmpp.txt
exec python -m pytest "$@"
