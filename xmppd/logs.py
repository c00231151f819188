"""Where a node's log lines go: standard error or a file, as text or one JSON object a line.

Set up once at start from the config (`log_level`, `log.file`, `log.format`)
and changed in place by a reload (xmppd.reload) and by `xmppctl log-level`,
so every logger keeps writing through the one handler installed here.

A log file is opened in append mode and reopened by `reopen()` (SIGHUP):
logrotate moves the file away, sends SIGHUP, and the node writes to a new
file of the same name. JSON lines are for log shippers: the time, level,
logger and message, plus the fields a line was given with `extra=` (the
connection id `conn`, `jid`, `address`, `mechanism`, ...), so a shipper can
index them without parsing the message.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from xmppd.config import Config

LEVELS = ("debug", "info", "warning", "error")

_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}
"""The attributes every LogRecord has: whatever else a record carries came from `extra=`."""


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line; `node` names the worker (xmppd --workers)."""

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.node is not None:
            line["node"] = self.node
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                plain = value is None or isinstance(value, (str, int, float, bool))
                line[key] = value if plain else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class ReopeningFileHandler(logging.StreamHandler[TextIO]):
    """Appends to a file, and reopens it by name on `reopen()` (after logrotate moved it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return self.path.open("a", encoding="utf-8")

    def reopen(self) -> None:
        """Open the file by its name again; on failure keep writing to the old one."""
        new = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, new
        finally:
            self.release()
        old.close()

    def close(self) -> None:
        self.acquire()
        try:
            self.stream.close()
        finally:
            self.release()
        super().close()


class LogOutput:
    """The root logger's one handler, made from the config and changed at run time."""

    def __init__(self, config: Config, node: str | None = None) -> None:
        self.node = node
        self.handler: logging.Handler = self._handler(config)
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(self.handler)
        set_level(config.log_level)

    def _handler(self, config: Config) -> logging.Handler:
        """A handler for the config's file and format; OSError if the file cannot be opened."""
        handler: logging.Handler
        if config.log.file is None:
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = ReopeningFileHandler(config.log.file)
        if config.log.format == "json":
            handler.setFormatter(JSONFormatter(self.node))
        else:
            tag = f"[{self.node}] " if self.node else ""
            handler.setFormatter(
                logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s")
            )
        return handler

    def check(self, config: Config) -> str | None:
        """Why the config's log output cannot be used (the file cannot be opened), or None."""
        path = config.log.file
        if path is None:
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8"):
                pass
        except OSError as exc:
            return f"cannot open the log file {path}: {exc.strerror or exc}"
        return None

    def apply(self, old: Config, new: Config) -> None:
        """Take the new config's file and format (the level is `set_level`'s)."""
        if old.log == new.log:
            return
        handler = self._handler(new)
        root = logging.getLogger()
        root.addHandler(handler)
        root.removeHandler(self.handler)
        self.handler.close()
        self.handler = handler

    def reopen(self) -> None:
        """SIGHUP: reopen the log file (nothing to do on standard error)."""
        if isinstance(self.handler, ReopeningFileHandler):
            self.handler.reopen()


def set_level(level: str) -> None:
    """Log from `level` up (one of LEVELS), from now on, for every logger."""
    logging.getLogger().setLevel(level.upper())


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()
