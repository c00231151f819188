"""tests/conftest.py: with CI=true a skip fails the run, a strict xfail does not; on
a developer's machine a skip stays a skip. Run on a small test file of its own, in a
pytest of its own, with that conftest loaded as a plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]

TESTS = '''
import pytest

def test_skipped():
    pytest.skip("no such service")

@pytest.mark.xfail(strict=True, reason="a known departure")
def test_known():
    assert False

def test_passes():
    pass
'''

SKIPPED_MODULE = '''
import pytest

pytest.skip("no such tool", allow_module_level=True)
'''


@pytest.mark.parametrize(
    ("ci", "outcome"),
    [("true", "1 failed, 1 passed, 1 xfailed, 1 error"), ("", "1 passed, 2 skipped, 1 xfailed")],
)
def test_a_skip_fails_in_ci_and_only_there(tmp_path: Path, ci: str, outcome: str) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_some.py").write_text(TESTS)
    (tmp_path / "test_module.py").write_text(SKIPPED_MODULE)
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
            "-c", str(tmp_path / "pytest.ini"), "--continue-on-collection-errors", "-q",
            str(tmp_path),
        ],
        cwd=ROOT, env={**os.environ, "CI": ci}, capture_output=True, text=True, timeout=60,
    )
    assert done.stdout.splitlines()[-1].startswith(outcome), done.stdout
    assert done.returncode == (1 if ci else 0)
    if ci:
        for reason in ("no such service", "no such tool"):
            assert f"skipped in CI, where every test must run: Skipped: {reason}" in done.stdout
