"""Version drift check: would a user's `pip install` today still serve clients?

The lock (requirements/) is what CI's main run and the README install. A user
who installs xmppd as a library, or ignores the lock, gets the newest releases
pyproject allows instead; lxml 6.2.0 once broke every such install while CI,
on older versions, stayed green. So this script builds two more virtualenvs
from nothing and runs the real-client smoke tests (`-m smoke`: login over
STARTTLS and direct TLS, one message) in each:

- newest: `pip install -e .[test]` with no lock, which takes the newest
  releases in pyproject's ranges. When the smoke tests fail there and pass
  on the lock, each package whose version differs from the lock is tried
  alone on top of the lock, and the ones that break the smoke tests are
  named: that is what to pin below (with a comment) or to fix.
- floor: the lock with lxml moved down to the lowest version pyproject
  allows, plus the parser's unit tests, since the parser is what depends on
  lxml's behaviour most.

Exits non-zero when either fails.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "test.txt"
SMOKE = ["-m", "smoke"]
PARSER_TESTS = ["tests/unit/test_xml_parser.py", "tests/unit/test_c2s_stream.py"]
PIP = ["-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
VENV_TOOLING = frozenset({"pip", "setuptools", "wheel"})


def say(message: str) -> None:
    print(f"drift: {message}", flush=True)


def venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    return path / "bin" / "python"


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), *PIP, *args], check=True, cwd=ROOT)


def install_locked(python: Path) -> None:
    pip(python, "-r", str(LOCK))
    pip(python, "--no-deps", "-e", ".")


def pytest_passes(python: Path, *args: str) -> bool:
    command = [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=ROOT).returncode == 0


def frozen(python: Path) -> dict[str, str]:
    """Installed distributions by canonical name, less the virtualenv's own tooling."""
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins = (line.partition("==") for line in out.splitlines() if "==" in line)
    versions = {re.sub(r"[-_.]+", "-", name).lower(): version for name, _, version in pins}
    return {name: v for name, v in versions.items() if name not in VENV_TOOLING}


def lowest_allowed(package: str) -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        match = re.fullmatch(rf"{package}\s*>=\s*([0-9][^,;\s]*).*", requirement)
        if match:
            return match.group(1)
    raise SystemExit(f"drift: pyproject.toml has no '{package}>=' lower bound")


def check_newest(work: Path) -> bool:
    say("installing the newest releases pyproject allows, without the lock")
    python = venv(work / "newest")
    pip(python, "-e", ".[test]")
    if pytest_passes(python, *SMOKE):
        say("newest releases: the smoke tests pass")
        return True
    say("newest releases: the smoke tests FAIL; trying each moved package alone on the lock")
    probe = venv(work / "probe")
    install_locked(probe)
    if not pytest_passes(probe, *SMOKE):
        say("the smoke tests fail on the lock too: the failure is not drift")
        return False
    # Compare installed environments rather than parse the lock: a universal
    # lock holds several pins of one package under different markers.
    lock, newest = frozen(probe), frozen(python)
    moved = {name: (lock.get(name), v) for name, v in newest.items() if lock.get(name) != v}
    culprits = []
    for name, (old, new) in sorted(moved.items()):
        say(f"  trying {name} {old or '(not in the lock)'} -> {new}")
        pip(probe, f"{name}=={new}")
        if not pytest_passes(probe, *SMOKE, "-x"):
            culprits.append(f"{name} {new} (locked {old})")
        install_locked(probe)
    if culprits:
        say("the new release that breaks a fresh install: " + "; ".join(culprits))
    else:
        say("no single new release breaks them alone; it is a combination of: " + ", ".join(moved))
    return False


def check_lxml_floor(work: Path) -> bool:
    floor = lowest_allowed("lxml")
    say(f"the lock with lxml {floor}, the lowest pyproject allows")
    python = venv(work / "floor")
    install_locked(python)
    pip(python, f"lxml=={floor}")
    ok = pytest_passes(python, *PARSER_TESTS) and pytest_passes(python, *SMOKE)
    say(f"lxml {floor}: the parser and smoke tests {'pass' if ok else 'FAIL'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the virtualenvs")
    work = parser.parse_args().work
    results = [check_newest(work), check_lxml_floor(work)]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
