"""xmppd.cli.allocator's choice, one function at a time (the real start with jemalloc
preloaded is tests/integration/test_cli_server.py's)."""

from __future__ import annotations

import ctypes.util
from pathlib import Path

import pytest

from xmppd.cli import allocator

WHERE = "xmppd.yml:3"


def _not_preloaded(name: str = allocator.JEMALLOC) -> bool:
    return False


def test_preloaded_reads_this_process_maps() -> None:
    assert allocator.preloaded("c")  # libc.so.6 is in every CPython process here
    assert not allocator.preloaded("no-such-library-xmppd")


def test_the_setting_is_read_with_its_line_before_the_config_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "xmppd.yml"
    path.write_text("hosts: [localhost]\n\n# the malloc\nallocator: system\n")
    assert allocator.configured(path) == ("system", f"{path}:4")
    path.write_text("hosts: [localhost]\n")
    assert allocator.configured(path) == ("auto", str(path))
    path.write_text("hosts: [localhost\n")  # load_config reports it, with its line
    assert allocator.configured(path) == ("auto", str(path))
    assert allocator.configured(tmp_path / "missing.yml") == ("auto", str(tmp_path / "missing.yml"))


def test_system_never_starts_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "preloaded", _not_preloaded)
    monkeypatch.setattr(allocator.os, "execve", pytest.fail)
    assert "allocator: system" in allocator.choose("system", WHERE)


def test_a_preload_that_did_not_take_does_not_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "preloaded", _not_preloaded)
    monkeypatch.setattr(allocator.os, "execve", pytest.fail)
    monkeypatch.setenv(allocator.REEXEC_MARK, "1")
    assert "did not load" in allocator.choose("auto", WHERE)
    with pytest.raises(allocator.AllocatorError, match=f"^{WHERE}: allocator: jemalloc: "):
        allocator.choose("jemalloc", WHERE)


def test_without_the_library_auto_says_how_and_jemalloc_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(allocator, "preloaded", _not_preloaded)
    monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(allocator.os, "execve", pytest.fail)
    assert "install libjemalloc2" in allocator.choose("auto", WHERE)
    with pytest.raises(allocator.AllocatorError, match="apt install libjemalloc2"):
        allocator.choose("jemalloc", WHERE)


def test_auto_leaves_an_operator_s_preload_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "preloaded", _not_preloaded)
    monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc.so.4")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    monkeypatch.setattr(allocator.os, "execve", pytest.fail)
    assert "LD_PRELOAD=libtcmalloc.so.4" in allocator.choose("auto", WHERE)


def test_the_second_start_has_the_library_preloaded_and_the_mark(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started: list[tuple[str, list[str], dict[str, str]]] = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        started.append((path, argv, env))
        raise OSError("not this time")

    monkeypatch.setattr(allocator, "preloaded", _not_preloaded)
    monkeypatch.delenv(allocator.REEXEC_MARK, raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    monkeypatch.setattr(allocator.os, "execve", execve)
    monkeypatch.setattr(allocator.sys, "stdout", None)  # closed by the caller: no flush
    # A failed exec leaves the process as it is, and says why; asked for, it stops.
    assert "cannot start again with jemalloc: not this time" in allocator.choose("auto", "")
    with pytest.raises(allocator.AllocatorError, match="not this time"):
        allocator.choose("jemalloc", WHERE)
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    with pytest.raises(allocator.AllocatorError):
        allocator.choose("jemalloc", WHERE)  # asked for: ahead of what is there
    assert [env["LD_PRELOAD"] for _, _, env in started] == [
        "libjemalloc.so.2", "libjemalloc.so.2", "libjemalloc.so.2 libother.so"
    ]
    path, argv, env = started[0]
    assert path == allocator.sys.executable and argv == allocator.sys.orig_argv
    assert env[allocator.REEXEC_MARK] == "1"


def test_only_on_linux_and_an_inherited_preload_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libjemalloc.2.dylib")
    monkeypatch.setattr(allocator.sys, "platform", "darwin")  # LD_PRELOAD means nothing there
    assert allocator.installed() is None
    monkeypatch.setattr(allocator, "preloaded", lambda name=allocator.JEMALLOC: True)
    # A worker started again after the file said `system`, with the old environment.
    assert allocator.choose("system", WHERE) == "jemalloc (preloaded by LD_PRELOAD)"
