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

Lines are written by a thread of their own, never by the event loop: a
write to a file on a busy disk, or to a standard error that journald is
slow to read, can block for long, and a storm of logins or refused streams
logs a line each. The loop only queues the record. Opening the file
(at start, `reopen()`, a changed `log.file`) also happens on that thread, in
order with the lines, so no line is written to a handler being replaced.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import threading
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from xmppd.config import Config

LEVELS = ("debug", "info", "warning", "error")
CLOSE_WAIT = 5.0
"""Seconds the process waits at exit for the lines still queued to be written."""
MAX_QUEUED = 100_000
"""Lines waiting for the writer at most: while the output is stalled (a full pipe, a
hung disk) and strangers make the node log (refused connections, failed logins), the
queue must not grow the process without bound. Past it, lines are dropped and
counted, and the writer says how many once it catches up."""

log = logging.getLogger(__name__)

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


_Item = logging.LogRecord | Callable[[], None] | None
"""What the writer thread takes: a record to write, a change of its handler to make
in line with the records, or None to stop."""


class _Enqueue(logging.Handler):
    """The root logger's handler: hands each record to the writer thread. Its message
    is made now, as its arguments may change once the caller goes on."""

    def __init__(self, records: queue.SimpleQueue[_Item]) -> None:
        super().__init__()
        self.records = records
        # Lines put and not yet taken, and lines dropped over MAX_QUEUED. Updated from
        # several threads without a lock: a race miscounts by a line, never blocks.
        self.queued = 0
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.queued >= MAX_QUEUED:
            self.dropped += 1
            return
        try:
            record.msg = record.getMessage()
            record.args = None
            self.queued += 1
            self.records.put(record)
        except Exception:
            self.handleError(record)


class LogOutput:
    """The handler that writes, made from the config and changed at run time, and the
    thread it writes on."""

    def __init__(self, config: Config, node: str | None = None) -> None:
        self.node = node
        self.handler: logging.Handler = self._handler(config)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="xmppd-log", daemon=True)
        self._writer.start()
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        self._enqueue = _Enqueue(self._queue)
        root.addHandler(self._enqueue)
        set_level(config.log_level)
        atexit.register(self.close)

    def _write(self) -> None:
        while (item := self._queue.get()) is not None:
            self._take(item)
        # What came after the stop: lines the last changes logged (a file that could
        # not be opened), or other threads' last words.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self._take(item)

    def _take(self, item: logging.LogRecord | Callable[[], None]) -> None:
        try:
            if isinstance(item, logging.LogRecord):
                self._enqueue.queued -= 1
                self.handler.handle(item)  # a failed write is reported by the handler
                if self._enqueue.dropped and not self._enqueue.queued:
                    self._say_dropped()
            else:
                item()
        except Exception:  # the thread must outlive a failure, or logging stops
            traceback.print_exc(file=sys.stderr)

    def _say_dropped(self) -> None:
        dropped, self._enqueue.dropped = self._enqueue.dropped, 0
        self.handler.handle(log.makeRecord(
            log.name, logging.WARNING, __file__, 0,
            "logs: %d lines dropped while the output did not keep up (over %d waiting)",
            (dropped, MAX_QUEUED), None,
        ))

    def close(self) -> None:
        """Write what is queued, then stop the thread (at exit)."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join(CLOSE_WAIT)
        self.handler.flush()

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
        """Take the new config's file and format (the level is `set_level`'s), on the
        writer thread: the lines queued before go to the old output."""
        if old.log == new.log:
            return

        def swap() -> None:
            try:
                handler = self._handler(new)
            except OSError as exc:
                log.error("logs: cannot open %s, still writing the old output: %s",
                          new.log.file, exc.strerror or exc)
                return
            self.handler.close()
            self.handler = handler

        self._queue.put(swap)

    def reopen(self) -> None:
        """SIGHUP: reopen the log file (nothing to do on standard error), on the writer
        thread; if it cannot be opened, the old one is kept and that is logged."""

        def reopen() -> None:
            if isinstance(self.handler, ReopeningFileHandler):
                try:
                    self.handler.reopen()
                except OSError as exc:
                    log.error("logs: cannot reopen the log file, still writing the old one: %s",
                              exc)

        self._queue.put(reopen)


def set_level(level: str) -> None:
    """Log from `level` up (one of LEVELS), from now on, for every logger."""
    logging.getLogger().setLevel(level.upper())


def current_level() -> str:
    return logging.getLevelName(logging.getLogger().level).lower()
