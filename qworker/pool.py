"""Starting consumers: in this process, or as several spawned processes.

Consumer processes are started with ``spawn``, never ``fork``: a forked child
would inherit the parent's SQLite connection, threads and CUDA state, none of
which survive a fork. Each child runs in its own process group, so a Ctrl-C
at the terminal reaches only the parent, which then tells every child to stop
exactly once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import AsyncIterator, Iterator

import anyio

from .backends import MODAL_LOCAL, SQLITE, open_bucket, open_queue
from .http_settings import HttpSettings
from .consumer import Consumer, ConsumerSettings, ConsumerStats
from .errors import QworkerError
from .gpu import make_memory_gate
from .layout import Layout
from .log import configure_logging
from .spawn_entry import EarlySignals, consumer_process_main
from .task import SOLO_LANE
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
    backend: str = SQLITE
    log_level: str = "INFO"
    log_file: Path | None = None  # "{index}" in the name is replaced by the process index
    # Also run a one-slot consumer of the solo lane in this process (in the
    # first process of a pool), for tasks that ran out of GPU memory beside others.
    with_solo: bool = False


async def run_consumer(spec: ConsumerSpec, *, early_signals: EarlySignals | None = None,
                       watch_parent: int | None = None) -> ConsumerStats:
    """Run one consumer in this process until it stops or receives SIGTERM or SIGINT."""
    layout = Layout(spec.data_dir)
    workload = get_workload(spec.workload)
    settings = spec.settings
    if settings.scratch_root is None:
        settings = replace(settings, scratch_root=layout.scratch_dir)

    queue = await open_queue(spec.backend, layout, spec.queue, create=False, synchronous=spec.synchronous)
    async with queue:
        http = (await queue.metadata()).get("http")
        if http and not settings.http.budgets and not settings.http.header_env:
            settings = replace(settings, http=HttpSettings.from_mapping(http))
        commit = _count_local_commit if spec.backend == MODAL_LOCAL else None
        bucket = open_bucket(spec.backend, layout) if settings.http.budgets else None
        # One gate for the consumers of this process, which share its device: a
        # solo-lane task then runs with no default-lane task beside it.
        gate = make_memory_gate(settings.device, settings.gpu_memory_limit_gb)
        consumers = [
            Consumer(queue, workload, layout.results_dir(spec.queue), consumer_settings, commit=commit, bucket=bucket,
                     memory_gate=gate)
            for consumer_settings in _settings_per_consumer(spec, settings)
        ]
        for follower in consumers[1:]:
            follower.follow_in_burst(consumers[0])
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            for signum in early_signals.received if early_signals else ():
                for consumer in consumers:
                    consumer.handle_stop_signal(signum)
            async with anyio.create_task_group() as group:
                group.start_soon(_forward_signals, signals, consumers)
                if watch_parent is not None:
                    group.start_soon(_stop_when_orphaned, consumers, watch_parent)
                stats = await _run_all(consumers)
                group.cancel_scope.cancel()
        if bucket is not None:
            await bucket.flush()
    return stats


def _settings_per_consumer(spec: ConsumerSpec, settings: ConsumerSettings) -> list[ConsumerSettings]:
    """Return the settings of each consumer of this process: the spec's, then the solo lane's when ``spec.with_solo`` is set."""
    if not spec.with_solo or settings.lane == SOLO_LANE:
        return [settings]
    return [settings, settings.for_solo_lane()]


async def _run_all(consumers: list[Consumer]) -> ConsumerStats:
    """Run the consumers side by side until all stop; return the counters of the first."""
    results: list[ConsumerStats | None] = [None] * len(consumers)

    async def run(index: int) -> None:
        results[index] = await consumers[index].run()

    async with anyio.create_task_group() as group:
        for index in range(len(consumers)):
            group.start_soon(run, index)
    assert results[0] is not None
    return results[0]


async def _forward_signals(signals: AsyncIterator[int], consumers: list[Consumer]) -> None:
    async for signum in signals:
        for consumer in consumers:
            consumer.handle_stop_signal(signum)


async def _count_local_commit() -> None:
    """Stand in for ``modal.Volume.commit`` when a local folder plays the Volume: the files are already on disk."""


async def _stop_when_orphaned(consumers: list[Consumer], parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        await anyio.sleep(PARENT_CHECK_INTERVAL_S)
    for consumer in consumers:
        logger.warning("parent process %d is gone, stopping consumer %s", parent_pid, consumer.owner)
        consumer.stop()


def run_consumer_process(spec: ConsumerSpec, index: int, parent_pid: int, early_signals: EarlySignals) -> None:
    """Run one consumer as the main work of a spawned process."""
    os.setpgrp()
    log_file = Path(str(spec.log_file).replace("{index}", str(index))) if spec.log_file else None
    configure_logging(spec.log_level, log_file)
    try:
        anyio.run(lambda: run_consumer(spec, early_signals=early_signals, watch_parent=parent_pid))
    except QworkerError as exc:
        logger.error("consumer %d cannot start: %s", index, exc)
        sys.exit(EXIT_CONSUMER_ERROR)


class ConsumerPool:
    """Consumer processes started together and stopped together.

    With ``spec.with_solo``, the first child also runs the solo-lane consumer.
    A stop signal goes to a child only once it reports that it records stop
    signals: a child still in interpreter start-up would be killed by one.
    """

    def __init__(self, spec: ConsumerSpec, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        specs = [replace(spec, with_solo=spec.with_solo and index == 0) for index in range(processes)]
        self._ready = [context.Event() for _ in specs]
        self._children = [
            context.Process(
                target=consumer_process_main,
                args=(pickle.dumps(child_spec), index, os.getpid(), self._ready[index]),
                name=f"consumer-{index}",
            )
            for index, child_spec in enumerate(specs)
        ]
        self._stop_requests = 0
        self._delivered = [0] * len(specs)

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
        self._deliver_stop_signals()

    def _deliver_stop_signals(self) -> None:
        for index, child in enumerate(self._children):
            while self._delivered[index] < self._stop_requests and self._ready[index].is_set():
                self._delivered[index] += 1
                # The first signal requests a graceful stop, and a later one interrupts running tasks.
                signum = signal.SIGTERM if self._delivered[index] == 1 else signal.SIGINT
                if child.is_alive() and child.pid is not None:
                    os.kill(child.pid, signum)

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait until every child exits or ``timeout_s`` passes; return whether all exited."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.is_alive():
            self._deliver_stop_signals()
            if deadline is not None and time.monotonic() >= deadline:
                return False
            multiprocessing.connection.wait([child.sentinel for child in self._children if child.is_alive()], timeout=0.05)
        return True

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
        logger.info("received %s, asking consumer processes to stop", signal.Signals(signum).name)
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
