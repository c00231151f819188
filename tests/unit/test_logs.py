"""The event loop never writes a log line itself: xmppd.logs' writer thread does.

A stand-in standard error that takes half a second per write (a disk or a
journald that does not keep up): logging a line must return at once, and the
line must still be written, in order, by the time the output is closed.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xmppd import logs
from xmppd.config import load_config
from xmppd.logs import LogOutput

SLOW_WRITE = 0.5


class SlowStream(io.StringIO):
    """Standard error that blocks on every write, and says which thread wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[str] = set()

    def write(self, text: str) -> int:
        self.writers.add(threading.current_thread().name)
        time.sleep(SLOW_WRITE)
        return super().write(text)


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.timeout(30)
def test_a_slow_output_does_not_slow_the_caller(
    monkeypatch: pytest.MonkeyPatch, restore_root_logger: None
) -> None:
    stream = SlowStream()
    monkeypatch.setattr(sys, "stderr", stream)
    output = LogOutput(load_config(None))
    log = logging.getLogger("xmppd.test")
    started = time.monotonic()
    for n in range(4):
        log.warning("line %d of %s", n, "four")
    took = time.monotonic() - started
    output.close()
    assert took < SLOW_WRITE, f"logging took {took:.2f} s: it waited for the writes"
    lines = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    assert lines == [f"line {n} of four" for n in range(4)]
    assert stream.writers == {"xmppd-log"}


@pytest.mark.timeout(30)
def test_a_log_file_that_cannot_be_reopened_is_kept(
    tmp_path: Path, restore_root_logger: None
) -> None:
    """SIGHUP's reopen runs on the writer thread: when the file cannot be opened again
    (here a folder has taken its name), the lines go on to the old one, and say so."""
    config_path = tmp_path / "xmppd.yml"
    config_path.write_text(f"log:\n  file: {tmp_path / 'xmppd.log'}\n")
    output = LogOutput(load_config(config_path))
    log = logging.getLogger("xmppd.test")
    log.warning("before")
    (tmp_path / "xmppd.log").rename(tmp_path / "moved.log")
    (tmp_path / "xmppd.log").mkdir()
    output.reopen()
    log.warning("after")
    output.close()
    text = (tmp_path / "moved.log").read_text()
    assert "before" in text and "after" in text
    assert "cannot reopen the log file, still writing the old one" in text


@pytest.mark.timeout(30)
def test_a_stalled_output_drops_lines_past_the_bound_and_says_how_many(
    monkeypatch: pytest.MonkeyPatch, restore_root_logger: None
) -> None:
    """While the output does not keep up, the queue holds MAX_QUEUED lines at most (here
    3): the rest are dropped, and counted in a line once the writer has caught up."""
    monkeypatch.setattr(logs, "MAX_QUEUED", 3)
    stream = SlowStream()
    monkeypatch.setattr(sys, "stderr", stream)
    output = LogOutput(load_config(None))
    log = logging.getLogger("xmppd.test")
    for n in range(10):
        log.warning("line %d", n)
    output.close()
    lines = [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()]
    kept = len(lines) - 1  # 3 queued, and perhaps one the writer had already taken
    assert kept in (3, 4), lines
    assert lines[:kept] == [f"line {n}" for n in range(kept)]
    assert lines[-1] == (
        f"logs: {10 - kept} lines dropped while the output did not keep up (over 3 waiting)"
    )
