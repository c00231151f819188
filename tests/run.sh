#!/usr/bin/env bash
# Install what the tests need (Debian packages for the services they start,
# Python packages) and run the whole suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/services.sh
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
exec python3 -m pytest "$@"
