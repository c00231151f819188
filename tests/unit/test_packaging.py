"""A normal install (a wheel, not the editable install tests run from) holds every module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOTS = {"xmppd": "xmppd", "modules": "xmppd/modules", "storage": "xmppd/storage"}


def source_files() -> set[str]:
    """Every .py file of every package in the tree, by the path it installs under."""
    found = set()
    for folder, installed in ROOTS.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            relative = path.relative_to(base)
            folders = [base.joinpath(*relative.parts[:i]) for i in range(len(relative.parts))]
            if all((f / "__init__.py").exists() for f in folders):
                found.add(f"{installed}/{relative.as_posix()}")
    return found


@pytest.mark.timeout(300)
def test_the_wheel_holds_every_module_of_the_tree(tmp_path: Path) -> None:
    # Built from a copy: setuptools would reuse a build/ folder left in the tree.
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__")
    for folder in ROOTS:
        shutil.copytree(ROOT / folder, source / folder, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), "."],
        cwd=source, check=True, timeout=280,
    )
    (wheel,) = tmp_path.glob("xmppd-*.whl")
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    expected = source_files()
    assert "xmppd/modules/roster.py" in expected and "xmppd/storage/backends/s3.py" in expected
    assert expected - inside == set()
    assert not [n for n in inside if n.startswith(("modules/", "storage/"))]  # no bare top level
