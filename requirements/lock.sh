#!/usr/bin/env bash
# Re-resolve requirements/runtime.txt and requirements/test.txt from pyproject.toml,
# and requirements/aioxmpp.txt (the aioxmpp test client's own virtualenv) from
# requirements/aioxmpp.in (see requirements/README.md). Extra arguments go to
# `uv pip compile`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
common=(--generate-hashes --universal --python-version 3.11 --quiet)
uv pip compile pyproject.toml "${common[@]}" "$@" -o requirements/runtime.txt
uv pip compile pyproject.toml --extra test "${common[@]}" "$@" -o requirements/test.txt
uv pip compile requirements/aioxmpp.in "${common[@]}" "$@" -o requirements/aioxmpp.txt
