"""`xmppd --workers N`: N processes on one machine, each a node of the cluster.

A Python process uses one core; one process per core is how xmppd uses a
machine. The parent runs no server: it starts N copies of `xmppd` (the
workers), each with the same configuration, a node name of its own
(`<cluster.node_name>-<i>`) and its admin API on `admin.port + i - 1` (or
any free port when admin.port is 0; each records its URL in
data_dir/admin/, where xmppctl finds it). Every worker binds the same
client listeners with SO_REUSEPORT, and the kernel spreads new connections
over them; the workers share sessions through the cluster's Redis, so a
message between two clients on different workers crosses nodes like one
between machines.

Supervision (the policy docs/cluster.md states):

- A worker that fails before it is ready (it reports "ready" on its
  stdout once listening) stops everything with exit status 1: its error
  (Redis unreachable, a port taken) would only repeat.
- A worker that exits afterwards is logged (status or signal) and started
  again after `RESTART_DELAY` under the same node name, which reaps what
  its previous process left in the session table. More than
  `MAX_RESTARTS` restarts within `RESTART_WINDOW` seconds stop everything
  (exit status 1): a crash loop needs an operator.
- SIGTERM or SIGINT: every worker gets SIGTERM and stops cleanly (its
  clients get <system-shutdown/>, its sessions leave the table); one still
  running after `STOP_TIMEOUT` is killed. Exit status 0. SIGHUP reopens the
  parent's log file and is passed to every worker (each reopens its own and
  reloads the configuration, xmppd.reload).

Workers get SIGTERM if the parent dies (PR_SET_PDEATHSIG), so a killed
parent leaves no orphan listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from xmppd.config import Config
from xmppd.logs import LogOutput

log = logging.getLogger("xmppd.workers")

READY = b"ready\n"
"""What a worker writes on its stdout once it serves (its stdout is a pipe to the parent)."""

START_TIMEOUT = 120.0
RESTART_DELAY = 1.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
STOP_TIMEOUT = 30.0

PR_SET_PDEATHSIG = 1
FIRST = asyncio.FIRST_COMPLETED


def worker_problems(config: Config, workers: int) -> list[str]:
    """Why `config` cannot run as `workers` processes: config-style lines (file, line, key)."""
    source = config.source
    problems: list[str] = []
    if workers < 1:
        problems.append(f"xmppd: --workers must be 1 or more, got {workers}")
    if config.cluster is None:
        problems.append(
            source.problem(
                ("cluster",),
                f"--workers {workers} needs a cluster section (at least cluster.redis_url): "
                "each worker is a node of the cluster, and the workers share their sessions "
                "through its Redis",
            )
        )
    for i, listener in enumerate(config.listeners):
        if listener.port == 0:
            problems.append(
                source.problem(
                    ("listeners", i, "port"),
                    "must be a fixed port with --workers: every worker binds the same port",
                )
            )
    return problems


def worker_node_name(base: str, index: int) -> str:
    return f"{base}-{index}"


def worker_config(config: Config, index: int, node_name: str) -> Config:
    """The configuration of worker `index` (1-based): its node name and admin port."""
    assert config.cluster is not None
    admin = config.admin
    port = admin.port + index - 1 if admin.port else 0
    worker = config.model_copy(
        update={
            "cluster": config.cluster.model_copy(update={"node_name": node_name}),
            "admin": admin.model_copy(update={"port": port}),
        }
    )
    worker._source = config.source
    return worker


def die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervising parent dies (Linux; else nothing)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def announce_ready() -> None:
    """Tell the parent this worker serves (stdout is its pipe)."""
    os.write(sys.stdout.fileno(), READY)


@dataclass
class Worker:
    index: int
    node: str
    process: asyncio.subprocess.Process | None = None
    restarts: deque[float] = field(default_factory=deque)


class Supervisor:
    def __init__(
        self, config_path: Path, config: Config, count: int, log_output: LogOutput | None = None
    ) -> None:
        assert config.cluster is not None
        self.config_path = config_path
        self.log_output = log_output
        base = config.cluster.node_name
        self.workers = [Worker(i, worker_node_name(base, i)) for i in range(1, count + 1)]
        self._stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        started = await asyncio.gather(*(self._start(w) for w in self.workers))
        if not all(started):
            await self._stop_all()
            return 1
        log.info("workers: all %d ready (pid %d supervises)", len(self.workers), os.getpid())
        code = await self._supervise()
        await self._stop_all()
        log.info("workers: all stopped")
        return code

    async def _start(self, worker: Worker) -> bool:
        """Start `worker`; True once it reports ready, False if it ends (or hangs) first."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "xmppd", "-c", str(self.config_path),
            "--worker", str(worker.index), "--node-name", worker.node,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            # Its own process group: a Ctrl-C at the terminal reaches the supervisor
            # only, which then stops the workers in order.
            start_new_session=True,
        )
        worker.process = process
        assert process.stdout is not None
        ready = asyncio.ensure_future(process.stdout.readline())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait([ready, stopping], timeout=START_TIMEOUT, return_when=FIRST)
        stopping.cancel()
        if not ready.done():
            ready.cancel()
            if self._stopping.is_set():
                return True  # stopped while starting: _stop_all ends it
        line = ready.result() if ready.done() and not ready.cancelled() else b""
        if line != READY:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            code = await process.wait()
            log.error(
                "workers: worker %d (%s) failed to start (%s)", worker.index, worker.node,
                _status(code),
            )
            return False
        log.info("workers: worker %d (%s) ready, pid %d", worker.index, worker.node, process.pid)
        return True

    async def _supervise(self) -> int:
        """Restart workers that exit until a stop signal (0) or a crash loop (1)."""
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                waits = {
                    asyncio.ensure_future(w.process.wait()): w
                    for w in self.workers
                    if w.process is not None
                }
                done, _ = await asyncio.wait([stop, *waits], return_when=asyncio.FIRST_COMPLETED)
                for pending in waits:
                    pending.cancel()
                if stop in done:
                    return 0
                for finished in done:
                    worker = waits[finished]
                    if not await self._restart(worker):
                        return 1
        finally:
            stop.cancel()

    async def _restart(self, worker: Worker) -> bool:
        assert worker.process is not None
        log.error(
            "workers: worker %d (%s, pid %d) exited (%s)", worker.index, worker.node,
            worker.process.pid, _status(worker.process.returncode),
        )
        now = time.monotonic()
        while worker.restarts and worker.restarts[0] < now - RESTART_WINDOW:
            worker.restarts.popleft()
        if len(worker.restarts) >= MAX_RESTARTS:
            log.error(
                "workers: worker %d restarted %d times within %.0f s; stopping all",
                worker.index, MAX_RESTARTS, RESTART_WINDOW,
            )
            return False
        worker.restarts.append(now)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), RESTART_DELAY)
        if self._stopping.is_set():
            return True
        log.info("workers: starting worker %d (%s) again", worker.index, worker.node)
        return await self._start(worker)

    def _hangup(self) -> None:
        if self.log_output is not None:
            self.log_output.reopen()
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers:
            if worker.process is not None and worker.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(sig)

    async def _stop_all(self) -> None:
        self._signal_all(signal.SIGTERM)
        running = [w.process for w in self.workers if w.process is not None]
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await asyncio.gather(*(p.wait() for p in running))
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    log.error("workers: pid %d did not stop in time; killing it", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in running))


def _status(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
