"""Starting consumers: in this process, or as several spawned processes.

Consumer processes are started with ``spawn``, never ``fork``: a forked child
would inherit the parent's SQLite connection, threads and CUDA state, none of
which survive a fork. Each child runs in its own process group, so a Ctrl-C
at the terminal reaches only the parent, which then asks every child to stop
exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Iterator

import anyio

from .backends.sqlite import SqliteQueue
from .consumer import Consumer, ConsumerSettings, ConsumerStats
from .errors import QworkerError
from .layout import Layout
from .log import configure_logging
from .workloads import get_workload

logger = logging.getLogger("qworker.pool")

PARENT_CHECK_INTERVAL_S = 1.0
EXIT_CONSUMER_ERROR = 3


@dataclass(frozen=True)
class ConsumerSpec:
    """Everything a consumer process needs; picklable so it can cross a spawn."""

    data_dir: Path
    queue: str
    workload: str
    settings: ConsumerSettings = field(default_factory=ConsumerSettings)
    synchronous: str = "NORMAL"
    log_level: str = "INFO"
    log_file: Path | None = None  # "{index}" in the name is replaced by the process index


async def run_consumer(spec: ConsumerSpec, *, handle_signals: bool = True, watch_parent: int | None = None) -> ConsumerStats:
    """Run one consumer in this process until it stops."""
    layout = Layout(spec.data_dir)
    workload = get_workload(spec.workload)
    settings = spec.settings
    if settings.scratch_root is None:
        settings = replace(settings, scratch_root=layout.scratch_dir)

    queue = SqliteQueue(layout.db_path, spec.queue, synchronous=spec.synchronous, create=False)
    async with queue:
        consumer = Consumer(queue, workload, layout.results_dir(spec.queue), settings)
        async with anyio.create_task_group() as group:
            if watch_parent is not None:
                group.start_soon(_stop_when_orphaned, consumer, watch_parent)
            stats = await consumer.run(handle_signals=handle_signals)
            group.cancel_scope.cancel()
    return stats


async def _stop_when_orphaned(consumer: Consumer, parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await anyio.sleep(PARENT_CHECK_INTERVAL_S)
    logger.warning("parent process %d is gone, stopping consumer %s", parent_pid, consumer.owner)
    consumer.stop()


def _consumer_process_main(spec: ConsumerSpec, index: int, parent_pid: int) -> None:
    os.setpgrp()
    log_file = Path(str(spec.log_file).replace("{index}", str(index))) if spec.log_file else None
    configure_logging(spec.log_level, log_file)
    try:
        anyio.run(lambda: run_consumer(spec, watch_parent=parent_pid))
    except QworkerError as exc:
        logger.error("consumer %d cannot start: %s", index, exc)
        sys.exit(EXIT_CONSUMER_ERROR)


class ConsumerPool:
    """Consumer processes started together and stopped together."""

    def __init__(self, spec: ConsumerSpec, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._children = [
            context.Process(target=_consumer_process_main, args=(spec, index, os.getpid()), name=f"consumer-{index}")
            for index in range(processes)
        ]
        self._stop_requests = 0

    @property
    def pids(self) -> list[int]:
        return [child.pid for child in self._children if child.pid is not None]

    def start(self) -> None:
        for child in self._children:
            child.start()
        logger.info("started %d consumer processes pids=%s", len(self._children), ",".join(map(str, self.pids)))

    def is_alive(self) -> bool:
        return any(child.is_alive() for child in self._children)

    def stop(self) -> None:
        """Ask every child to stop: gracefully the first time, interrupting running tasks after that."""
        self._stop_requests += 1
        forwarded = signal.SIGTERM if self._stop_requests == 1 else signal.SIGINT
        for child in self._children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, forwarded)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every child exits or ``timeout_s`` passes; return whether all exited."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for child in self._children:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            child.join(remaining)
        return not self.is_alive()

    def exit_code(self) -> int:
        """Return 0 when every child exited cleanly, else 1 (and log the codes)."""
        codes = [child.exitcode for child in self._children]
        if any(code != 0 for code in codes):
            logger.error("consumer processes exited with codes %s (negative: killed by that signal)", codes)
            return 1
        return 0


@contextlib.contextmanager
def forward_stop_signals(pool: ConsumerPool) -> Iterator[None]:
    """Turn SIGTERM and SIGINT to this process into :meth:`ConsumerPool.stop`; main thread only."""
    def forward(signum: int, frame: FrameType | None) -> None:
        pool.stop()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_consumer_processes(spec: ConsumerSpec, processes: int) -> int:
    """Start ``processes`` consumer processes, wait for all of them and return 0 if all exited cleanly."""
    pool = ConsumerPool(spec, processes)
    with forward_stop_signals(pool):
        pool.start()
        pool.wait()
    return pool.exit_code()
