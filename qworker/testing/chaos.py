"""A fault-injection ("chaos") run of the Monte Carlo job, and the checks that nothing was lost.

The run pushes the Monte Carlo job (4 contracts, few paths per task) with the
chaos workload of this module. A seeded share of its tasks misbehaves on
purpose: poison tasks always raise, transient tasks raise on their first
attempt, and OOM tasks raise ``torch.OutOfMemoryError`` until they run on the
solo lane. Consumer processes work the queue: 2 on the default lane with 4
slots each and 1 on the solo lane with 1 slot, each replaced when it exits.
At times drawn from the same seed, the driver meanwhile:

* sends SIGKILL or SIGTERM to a consumer process;
* truncates finished result files to a fraction of their size, as a crash in
  the middle of a write leaves them on a Volume;
* runs the reducer in a child process, and SIGKILLs one such run after it
  has committed its first batch of files.

Once no task is pending, the driver reduces, which quarantines the truncated
files that no earlier run folded. It runs ``qworker reconcile``, which
delivers again the done tasks without a readable result, waits for the
consumers to finish those, reduces again and stops the consumers.
:func:`run_chaos` then checks that no task was lost or counted twice and that
the dead letters are exactly the poison tasks. It also checks that every OOM
task finished on the solo lane, that every quarantined file's task was
counted, and that every contract's price is within 4 standard errors of its
closed form.

    python benchmarks/chaos.py --backend sqlite --tasks 2000 --seed 7
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import pickle
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import anyio
import pyarrow as pa
import pyarrow.parquet as pq

from ..backends import MODAL_LOCAL, SQLITE, open_queue
from ..backends.modal_queue import ModalQueueSettings
from ..consumer import ConsumerSettings
from ..errors import ConfigError
from ..jobs import job_from_mapping
from ..layout import Layout
from ..log import configure_logging
from ..pool import ConsumerSpec
from ..producer import push_job_tasks
from ..queue import DeadTask, QueueStats
from ..reducer import STATE_FILE, Reducer
from ..results import (
    QUARANTINE_DIR,
    REDUCER_DIR,
    TASK_ID_COLUMN,
    iter_result_files,
    result_task_ids,
)
from ..retry import Backoff
from ..sink import SinkSettings
from ..spawn_entry import consumer_process_main
from ..task import DEFAULT_LANE, SOLO_LANE, Task
from ..workloads import montecarlo
from ..workloads.base import Workload

if TYPE_CHECKING:
    from ..context import TaskContext

logger = logging.getLogger("qworker.chaos")

# -- the chaos workload ------------------------------------------------------------

FAULT_KEY = "fault"
NO_FAULT, POISON, TRANSIENT, OOM = "none", "poison", "transient", "oom"
FAULTS = (NO_FAULT, POISON, TRANSIENT, OOM)

POISON_ERROR = "injected bug: a poison task always fails"
TRANSIENT_ERROR = "injected transient error on the first attempt"
OOM_ERROR = "CUDA out of memory (injected)"
# Start of the error both backends store for a task whose lease expired on its last attempt.
LEASE_EXPIRED_ERROR = "lease expired on attempt"

WORKLOAD_PATH = "qworker.testing.chaos:WORKLOAD"
# Config key: seconds a task sleeps before simulating, so that a run lasts
# long enough for its faults on a fast machine as well as a slow one.
SLEEP_KEY = "sleep_s"


class InjectedBugError(RuntimeError):
    """The deliberate bug of a poison task."""


class InjectedTransientError(RuntimeError):
    """The failure of a transient task on its first attempt."""


def handle(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Raise the fault that the task's config requests, else run the Monte Carlo handler.

    The result row adds the task's lane, attempt and fault, so the checks can
    see on which lane each task finished.
    """
    fault = task.config.get(FAULT_KEY, NO_FAULT)
    if fault == POISON:
        raise InjectedBugError(f"{POISON_ERROR} (seed {task.seed}, contract {task.config['contract']})")
    if fault == TRANSIENT and task.attempt == 1:
        raise InjectedTransientError(TRANSIENT_ERROR)
    if fault == OOM and task.lane == DEFAULT_LANE:
        import torch

        raise torch.OutOfMemoryError(OOM_ERROR)

    time.sleep(task.config.get(SLEEP_KEY, 0.0))
    row = montecarlo.handle(task, ctx)
    row.update({"lane": task.lane, "attempt": task.attempt, FAULT_KEY: fault})
    return row


def validate_config(config: Mapping[str, Any]) -> None:
    """Raise ConfigError, naming the value, unless the Monte Carlo keys and the optional ``fault`` key are valid."""
    montecarlo.validate_config(config)
    fault = config.get(FAULT_KEY, NO_FAULT)
    if fault not in FAULTS:
        raise ConfigError(f"invalid config value {FAULT_KEY}={fault!r}: use one of {', '.join(FAULTS)}")
    sleep_s = config.get(SLEEP_KEY, 0.0)
    if isinstance(sleep_s, bool) or not isinstance(sleep_s, (int, float)) or not 0 <= sleep_s <= 60:
        raise ConfigError(f"invalid config value {SLEEP_KEY}={sleep_s!r}: use a number of seconds from 0 to 60")


WORKLOAD = Workload(
    name="chaos",
    handler=handle,
    validate_config=validate_config,
    aggregation=montecarlo.AGGREGATION,
    summarize=montecarlo.summarize,
    description="The Monte Carlo workload, with poison, transient and out-of-memory faults chosen by the task config.",
)

# -- settings ----------------------------------------------------------------------

MAX_ABS_Z = 4.0
# Tasks per queue item on the Modal adapter. A claim takes whole items and a
# SIGKILL expires every lease its consumer holds, so small items keep the
# attempts that one kill costs close to those on SQLite.
MODAL_TASKS_PER_ITEM = 4
# Reconciler timing for consumers on the Modal adapter, so that expired
# leases, retries and tasks lost by a killed consumer are delivered again
# within seconds instead of the production defaults of 30 s.
MODAL_TIMING_ENV = {"QWORKER_MODAL_RECONCILE_S": "1", "QWORKER_MODAL_LOST_GRACE_S": "2"}
# Seconds between the driver's checks of processes and the schedule, and between stats reads per backend.
TICK_S = 0.05
STATS_POLL_S = {SQLITE: 0.2, MODAL_LOCAL: 1.0}
GRACE_S = 10.0
RETRY_BACKOFF = Backoff(base_s=0.05, max_s=1.0)
# Files per reducer transaction: a regular run during the chaos phase, and
# the run that is killed, which folds few files per batch so that the kill
# lands between two batches.
REDUCER_BATCH_FILES = 16
KILLED_REDUCER_BATCH_FILES = 4
KILLED_REDUCER_MIN_BACKLOG = 5 * KILLED_REDUCER_BATCH_FILES
REDUCER_WATCH_S = 0.005
RECONCILE_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0
# Weights of the fault kinds, one drawn per event.
EVENT_WEIGHTS = {"sigkill": 3, "sigterm": 2, "truncate": 3, "reduce": 2}


@dataclass(frozen=True)
class ChaosOptions:
    """Settings of one chaos run. Shares are fractions of the pushed tasks, times are in seconds."""

    backend: str = SQLITE
    tasks: int = 2000
    seed: int = 7
    paths: int = 2000  # simulated paths per task
    task_s: float = 0.05  # sleep of each task before it simulates
    poison_share: float = 0.01
    transient_share: float = 0.05
    oom_share: float = 0.02
    # A SIGKILL costs an attempt of every task its consumer held, started or
    # prefetched, and faults come every second or so, so innocent tasks need
    # room that poison tasks, retried after at most 1 s, use up in seconds.
    max_attempts: int = 10
    batch_rows: int = 0  # 0: one result file per task
    default_processes: int = 2
    default_slots: int = 4
    event_gap_s: tuple[float, float] = (0.3, 1.5)  # range of the seeded time between two fault events
    max_faults: int | None = None  # stop injecting after this many fault events, so a slow machine still finishes
    max_truncations_per_event: int = 2
    lease_s: float = 5.0
    timeout_s: float = 900.0
    queue: str = "chaos"
    data_dir: Path | None = None  # None: a temporary folder, removed at the end unless keep_data
    keep_data: bool = False
    modal_server_url: str | None = None  # modal-local: a running server to use, or None to start one for the run
    log_level: str = "WARNING"  # of the consumer and reducer processes, which log to files in the data folder

    def __post_init__(self) -> None:
        if self.backend not in (SQLITE, MODAL_LOCAL):
            raise ConfigError(f"invalid backend {self.backend!r}: the chaos run supports {SQLITE} and {MODAL_LOCAL}")
        if self.tasks < len(montecarlo.DEFAULT_CONTRACTS):
            raise ConfigError(f"invalid tasks {self.tasks}: use at least {len(montecarlo.DEFAULT_CONTRACTS)}, one per contract")
        shares = (self.poison_share, self.transient_share, self.oom_share)
        if any(not 0.0 <= share <= 1.0 for share in shares) or sum(shares) > 1.0:
            raise ConfigError(f"invalid fault shares {shares}: each must be from 0 to 1 and their sum at most 1")
        low, high = self.event_gap_s
        if not 0 < low <= high:
            raise ConfigError(f"invalid event gap {self.event_gap_s}: use 0 < low <= high seconds")
        if not 0 <= self.task_s <= 60:
            raise ConfigError(f"invalid task_s {self.task_s}: use a number of seconds from 0 to 60")
        if self.max_attempts < 2:
            raise ConfigError(f"invalid max_attempts {self.max_attempts}: transient tasks need at least 2")


# -- the task plan -----------------------------------------------------------------


@dataclass(frozen=True)
class TaskPlan:
    """The pushed tasks with each task's fault and contract, by task id."""

    tasks: tuple[Task, ...]
    faults: Mapping[str, str]
    contracts: Mapping[str, str]

    def ids_with(self, fault: str) -> set[str]:
        return {task_id for task_id, kind in self.faults.items() if kind == fault}

    def expected_per_contract(self) -> Counter[str]:
        """Return how many tasks per contract the reducer must count: every task but the poison ones."""
        return Counter(self.contracts[task_id] for task_id, kind in self.faults.items() if kind != POISON)


def plan_tasks(options: ChaosOptions, rng: random.Random) -> TaskPlan:
    """Assign task i to contract i mod 4 and seed i div 4, and draw exact counts of each fault."""
    faults = _draw_faults(options, rng)
    contracts = montecarlo.DEFAULT_CONTRACTS
    tasks = []
    for index in range(options.tasks):
        contract = contracts[index % len(contracts)]
        config = {**contract, "paths": options.paths, SLEEP_KEY: options.task_s, FAULT_KEY: faults[index]}
        tasks.append(Task.create(index // len(contracts), config, max_attempts=options.max_attempts))
    return TaskPlan(
        tasks=tuple(tasks),
        faults={task.task_id: task.config[FAULT_KEY] for task in tasks},
        contracts={task.task_id: task.config["contract"] for task in tasks},
    )


def _draw_faults(options: ChaosOptions, rng: random.Random) -> list[str]:
    order = list(range(options.tasks))
    rng.shuffle(order)
    faults = [NO_FAULT] * options.tasks
    start = 0
    for fault, share in ((POISON, options.poison_share), (TRANSIENT, options.transient_share), (OOM, options.oom_share)):
        count = round(share * options.tasks)
        for index in order[start : start + count]:
            faults[index] = fault
        start += count
    return faults


# -- consumer processes ---------------------------------------------------------------


@dataclass(frozen=True)
class ConsumerExit:
    """The end of one consumer process: its exit code, the signals the driver had sent it and any crash."""

    index: int
    lane: str
    pid: int
    exit_code: int | None
    signals_sent: tuple[str, ...]  # "SIGKILL", "SIGTERM" and "stop" (the final SIGTERM), in order
    crash: str | None  # the last exception line of a traceback on its standard error

    @property
    def expected(self) -> bool:
        """Return whether the exit matches a signal sent (-9 after SIGKILL, 0 after SIGTERM) with no crash.

        A process that got SIGTERM and then SIGKILL may have finished its
        graceful stop before the SIGKILL arrived, so either code is expected.
        """
        expected_codes = set()
        if "SIGKILL" in self.signals_sent:
            expected_codes.add(-signal.SIGKILL)
        if "SIGTERM" in self.signals_sent or "stop" in self.signals_sent:
            expected_codes.add(0)
        return self.crash is None and self.exit_code in expected_codes


@dataclass
class _Member:
    index: int
    spec: ConsumerSpec
    process: multiprocessing.process.BaseProcess
    ready: Any  # a multiprocessing.Event of the spawn context, set once the child records stop signals
    stderr_path: Path
    signals_sent: list[str] = field(default_factory=list)


def _consumer_entry(pickled_spec: bytes, index: int, parent_pid: int, ready: Any, stderr_path: str) -> None:
    """Send this process's standard error to ``stderr_path``, then run the consumer as ``ConsumerPool`` children do.

    A crash traceback lands in that file, so the driver can report it even
    when a later SIGKILL hides the exit code.
    """
    descriptor = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(descriptor, 2)
    os.close(descriptor)
    consumer_process_main(pickled_spec, index, parent_pid, ready)


def read_crash(stderr_path: Path) -> str | None:
    """Return the last exception line of a traceback in ``stderr_path``, or None when it contains no traceback."""
    try:
        text = stderr_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    if "Traceback (most recent call last)" not in text:
        return None
    # Exception groups print their members behind "|" margins.
    errors = re.findall(r"^[\s|]*(\w+(?:Error|Exception|Interrupt): .*)$", text, flags=re.MULTILINE)
    return errors[-1] if errors else "traceback without an exception line"


class ConsumerFleet:
    """One consumer process per spec, each replaced by a new one when it exits, until :meth:`stop`."""

    def __init__(self, specs: list[ConsumerSpec], logs_dir: Path) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._specs = specs
        self._logs_dir = logs_dir
        self._members: list[_Member | None] = [None] * len(specs)
        self._started = 0
        self._stopping = False
        self.sigkills = 0
        self.sigterms = 0
        self.restarts = 0
        self.exits: list[ConsumerExit] = []

    def start(self) -> None:
        self._logs_dir.mkdir(parents=True, exist_ok=True)
        for position in range(len(self._specs)):
            self._members[position] = self._spawn(position)

    def _spawn(self, position: int) -> _Member:
        spec = self._specs[position]
        ready = self._context.Event()
        index = self._started
        self._started += 1
        stderr_path = self._logs_dir / f"consumer-{index}.stderr"
        process = self._context.Process(
            target=_consumer_entry,
            args=(pickle.dumps(spec), index, os.getpid(), ready, str(stderr_path)),
            name=f"chaos-consumer-{index}",
        )
        process.start()
        logger.info("started consumer %d pid=%s lane=%s", index, process.pid, spec.settings.lane)
        return _Member(index, spec, process, ready, stderr_path)

    def replace_exited(self) -> None:
        """Record each consumer that exited and start its replacement, unless the fleet is stopping."""
        for position, member in enumerate(self._members):
            if member is None or member.process.is_alive():
                continue
            member.process.join()
            self.exits.append(ConsumerExit(
                member.index, member.spec.settings.lane, member.process.pid or 0, member.process.exitcode,
                tuple(member.signals_sent), read_crash(member.stderr_path),
            ))
            if self._stopping:
                self._members[position] = None
                continue
            self._members[position] = self._spawn(position)
            self.restarts += 1

    def send_sigkill(self, choice: float) -> None:
        """SIGKILL the running consumer that ``choice`` (from 0 to 1) picks."""
        alive = [member for member in self._members if member is not None and member.process.is_alive()]
        if self._signal(alive, choice, signal.SIGKILL):
            self.sigkills += 1

    def send_sigterm(self, choice: float) -> None:
        """SIGTERM the consumer that ``choice`` picks among those that record stop signals and got none yet."""
        ready = [
            member for member in self._members
            if member is not None and member.process.is_alive() and member.ready.is_set() and not member.signals_sent
        ]
        if self._signal(ready, choice, signal.SIGTERM):
            self.sigterms += 1

    def _signal(self, candidates: list[_Member], choice: float, signum: signal.Signals) -> bool:
        if not candidates:
            logger.info("no consumer to send %s to", signum.name)
            return False
        member = candidates[min(int(choice * len(candidates)), len(candidates) - 1)]
        if not send_signal(member.process, signum):
            return False
        member.signals_sent.append(signum.name)
        logger.info("sent %s to consumer pid=%s lane=%s", signum.name, member.process.pid, member.spec.settings.lane)
        return True

    def stop(self, timeout_s: float) -> list[str]:
        """SIGTERM every consumer, wait up to ``timeout_s`` and SIGKILL those still running. Return the problems."""
        self._stopping = True
        deadline = time.monotonic() + timeout_s
        while any(member is not None for member in self._members):
            for member in self._members:
                if member is not None and member.ready.is_set() and not member.signals_sent:
                    send_signal(member.process, signal.SIGTERM)
                    member.signals_sent.append("stop")
            self.replace_exited()
            if time.monotonic() >= deadline:
                return [f"consumer pid={pid} did not stop within {timeout_s:.0f} s of SIGTERM" for pid in self.kill_all()]
            time.sleep(TICK_S)
        return []

    def kill_all(self) -> list[int]:
        """SIGKILL every consumer process still running, wait for it and return the PIDs killed."""
        killed = []
        for position, member in enumerate(self._members):
            if member is None:
                continue
            if member.process.is_alive() and send_signal(member.process, signal.SIGKILL):
                killed.append(member.process.pid or 0)
            member.process.join(timeout=10)
            self._members[position] = None
        return killed


def send_signal(process: multiprocessing.process.BaseProcess, signum: signal.Signals) -> bool:
    """Send ``signum`` to a started child process by PID. Return False when it has already been reaped."""
    if process.pid is None or process.exitcode is not None:
        return False
    try:
        os.kill(process.pid, signum)
    except ProcessLookupError:
        return False
    return True


def consumer_specs(options: ChaosOptions, layout: Layout) -> list[ConsumerSpec]:
    """Return the specs of the fleet: ``default_processes`` on the default lane and one on the solo lane.

    Prefetch is fixed at the slot count, so a SIGKILL expires about twice the
    slots' leases. The device is the CPU, because the checks do not depend on a GPU.
    """
    default = ConsumerSettings(
        slots=options.default_slots,
        prefetch=options.default_slots,
        lease_s=options.lease_s,
        grace_s=GRACE_S,
        lane=DEFAULT_LANE,
        device="cpu",
        backoff=RETRY_BACKOFF,
        sink=SinkSettings(batch_rows=options.batch_rows, batch_s=0.5, commit_s=1.0),
        scratch_root=layout.scratch_dir,
    )
    solo = default.for_solo_lane()
    return [_spec(options, layout, default)] * options.default_processes + [_spec(options, layout, solo)]


def _spec(options: ChaosOptions, layout: Layout, settings: ConsumerSettings) -> ConsumerSpec:
    return ConsumerSpec(
        data_dir=layout.data_dir,
        queue=options.queue,
        workload=WORKLOAD_PATH,
        settings=settings,
        backend=options.backend,
        log_level=options.log_level,
        log_file=layout.logs_dir / "consumer-{index}.log",
    )


# -- reducer runs in child processes -----------------------------------------------------


def _reduce_in_child(results_dir: str, batch_files: int, log_file: str, log_level: str) -> None:
    """Run the reducer once, as the target of a spawned reducer process."""
    configure_logging(log_level, Path(log_file))
    Reducer(Path(results_dir), WORKLOAD.aggregation, batch_files=batch_files).run()


class ReducerRuns:
    """Reducer runs in child processes, at most one at a time, one of which is SIGKILLed mid-way."""

    def __init__(self, layout: Layout, queue: str, log_level: str) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._results_dir = layout.results_dir(queue)
        self._log_file = layout.logs_dir / "reducer.log"
        self._log_level = log_level
        self._running: multiprocessing.process.BaseProcess | None = None
        self.runs = 0
        self.kills = 0
        self.skipped = 0
        self.killed_after_files = 0  # files the killed run had folded when the kill came
        self.problems: list[str] = []

    @property
    def state_path(self) -> Path:
        return self._results_dir / REDUCER_DIR / STATE_FILE

    def start(self) -> None:
        """Start a run, or skip this one while the previous run is still going."""
        self.poll()
        if self._running is not None:
            self.skipped += 1
            return
        self._running = self._spawn(REDUCER_BATCH_FILES)

    def _spawn(self, batch_files: int) -> multiprocessing.process.BaseProcess:
        process = self._context.Process(
            target=_reduce_in_child,
            args=(str(self._results_dir), batch_files, str(self._log_file), self._log_level),
            name="chaos-reducer",
        )
        process.start()
        self.runs += 1
        logger.info("started reducer run pid=%s batch_files=%d", process.pid, batch_files)
        return process

    def poll(self) -> None:
        """Record the exit of the running child, if it has exited."""
        process = self._running
        if process is None or process.is_alive():
            return
        process.join()
        self._running = None
        if process.exitcode != 0:
            self.problems.append(f"reducer run pid={process.pid} exited with code {process.exitcode}")

    def wait(self, timeout_s: float) -> None:
        if self._running is not None:
            self._running.join(timeout_s)
        self.poll()

    def backlog(self) -> int:
        """Return how many result files no run has folded yet."""
        files = sum(1 for _ in iter_result_files(self._results_dir))
        return files - (self._folded_count() or 0)

    def run_and_kill(self, timeout_s: float) -> bool:
        """Start a run and SIGKILL it once it has committed a batch. Return False if it finished first."""
        self.wait(timeout_s)
        before = self._folded_count() or 0
        process = self._spawn(KILLED_REDUCER_BATCH_FILES)
        deadline = time.monotonic() + timeout_s
        while process.is_alive() and time.monotonic() < deadline:
            folded = self._folded_count()
            if folded is not None and folded > before and send_signal(process, signal.SIGKILL):
                process.join()
                self.kills += 1
                self.killed_after_files = folded - before
                logger.info("SIGKILLed reducer run pid=%s after it folded %d files", process.pid, folded - before)
                return True
            time.sleep(REDUCER_WATCH_S)
        self._running = process
        self.wait(timeout_s)
        logger.info("reducer run finished before it could be killed mid-way")
        return False

    def _folded_count(self) -> int | None:
        """Return the number of folded files in the reducer state, 0 before the state exists, None if unreadable now."""
        if not self.state_path.exists():
            return 0
        try:
            with contextlib.closing(sqlite3.connect(self.state_path, timeout=0.5)) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM folded_files").fetchone()[0])
        except sqlite3.Error:
            return None

    def kill_running(self) -> None:
        if self._running is not None and send_signal(self._running, signal.SIGKILL):
            self._running.join(timeout=10)
        self._running = None


# -- truncated result files ----------------------------------------------------------


@dataclass(frozen=True)
class TruncatedFile:
    """A result file cut to a fraction of its size, as a crash in the middle of a write leaves it."""

    name: str
    size: int
    truncated_to: int


def truncate_result_file(results_dir: Path, choice: float, fraction: float) -> TruncatedFile | None:
    """Truncate the finished result file that ``choice`` (from 0 to 1) picks to ``fraction`` of its size."""
    files = sorted(iter_result_files(results_dir))
    if not files:
        return None
    path = files[min(int(choice * len(files)), len(files) - 1)]
    try:
        size = path.stat().st_size
        truncated_to = int(size * fraction)
        os.truncate(path, truncated_to)
    except FileNotFoundError:  # a reducer quarantined it in the meantime
        return None
    logger.info("truncated result file %s from %d to %d bytes", path.name, size, truncated_to)
    return TruncatedFile(path.relative_to(results_dir).as_posix(), size, truncated_to)


# -- the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class QuarantineCheck:
    """One quarantined result file: whether ``qworker reconcile`` delivered its task again and the reducer counted it."""

    file: str
    task_id: str | None  # None for a segment file, whose task ids could not be read
    reconciled: bool
    counted: bool  # the reducer counted the task and a readable result file of it exists


@dataclass
class ChaosReport:
    """The figures of one chaos run and the checks that failed (none when it passed)."""

    backend: str
    seed: int
    tasks_pushed: int
    poison_tasks: int
    transient_tasks: int
    oom_tasks: int
    result_files: int = 0
    unreadable_result_files: int = 0
    tasks_counted: int = 0
    tasks_expected: int = 0
    duplicates: int = 0
    lost: list[str] = field(default_factory=list)
    dead_letters: int = 0
    dead_letters_injected_error: int = 0
    dead_letters_lease_expired: int = 0
    oom_moves: int = 0
    oom_tasks_on_solo: int = 0
    truncations: int = 0  # a file may be truncated more than once
    quarantined: list[QuarantineCheck] = field(default_factory=list)
    reconciled: int = 0
    contracts: list[dict[str, Any]] = field(default_factory=list)
    sigkills: int = 0
    sigterms: int = 0
    restarts: int = 0
    reducer_runs: int = 0
    reducer_kills: int = 0
    reducer_killed_after_files: int = 0  # files the killed reducer run had committed when the SIGKILL came
    consumer_crashes: int = 0  # consumer processes that exited with a traceback, which no fault injects
    elapsed_s: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def format(self) -> str:
        """Return the report as aligned text lines, a contract table and the verdict."""
        quarantined_counted = sum(1 for check in self.quarantined if check.counted)
        quarantined_reconciled = sum(1 for check in self.quarantined if check.reconciled)
        lines = [
            f"chaos run on backend {self.backend}, seed {self.seed}",
            (f"  tasks pushed           {self.tasks_pushed} ({self.poison_tasks} poison, {self.transient_tasks}"
             f" transient, {self.oom_tasks} OOM)"),
            f"  result files           {self.result_files} ({self.unreadable_result_files} unreadable)",
            f"  tasks counted          {self.tasks_counted} of {self.tasks_expected} expected",
            f"  duplicates             {self.duplicates}",
            f"  lost tasks             {len(self.lost)}",
            (f"  dead letters           {self.dead_letters} ({self.dead_letters_injected_error} with the injected"
             f" error, {self.dead_letters_lease_expired} with a lease expired on the last attempt)"),
            (f"  OOM moves              {self.oom_moves} for {self.oom_tasks} OOM tasks,"
             f" {self.oom_tasks_on_solo} of them finished on lane solo"),
            f"  truncations            {self.truncations}",
            (f"  quarantined files      {len(self.quarantined)} (their tasks: {quarantined_counted} counted,"
             f" {quarantined_reconciled} delivered again by reconcile)"),
            f"  reconcile delivered    {self.reconciled} tasks",
            (f"  faults                 {self.sigkills} SIGKILL, {self.sigterms} SIGTERM, {self.restarts} consumer"
             f" restarts, {self.reducer_runs} reducer runs, {self.reducer_kills} of them SIGKILLed after folding"
             f" {self.reducer_killed_after_files} files"),
            f"  consumer crashes       {self.consumer_crashes}",
            f"  elapsed                {self.elapsed_s:.1f} s",
            "",
            f"  {'contract':<10} {'tasks':>6} {'price':>9} {'std_error':>9} {'closed_form':>11} {'z':>6}",
        ]
        for row in self.contracts:
            lines.append(
                f"  {row['contract']:<10} {row['tasks']:>6} {_number(row['price'], 9, 4)} {_number(row['std_error'], 9, 4)}"
                f" {_number(row['closed_form'], 11, 4)} {_number(row['z_score'], 6, 2)}"
            )
        lines.append("")
        lines.append("PASSED" if self.passed else f"FAILED: {len(self.failures)} checks")
        lines.extend(f"  check failed: {failure}" for failure in self.failures)
        return "\n".join(lines)


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


# -- the run ---------------------------------------------------------------------------


@dataclass
class _Run:
    """State shared by the phases of one run."""

    options: ChaosOptions
    layout: Layout
    plan: TaskPlan
    rng: random.Random
    fleet: ConsumerFleet
    reducers: ReducerRuns
    deadline: float
    truncated: list[TruncatedFile] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def results_dir(self) -> Path:
        return self.layout.results_dir(self.options.queue)


@dataclass(frozen=True)
class _ReconcileOutcome:
    missing: frozenset[str]  # done tasks without a readable result just before reconcile ran
    delivered: int | None  # as printed by qworker reconcile, or None if its output could not be read
    exit_code: int


def run_chaos(options: ChaosOptions) -> ChaosReport:
    """Run the chaos job on ``options.backend`` and return its report, whose ``passed`` is the verdict."""
    rng = random.Random(options.seed)
    plan = plan_tasks(options, rng)
    with _data_dir(options) as data_dir, _backend_environment(options):
        layout = Layout(data_dir)
        started = time.monotonic()
        _push(options, layout, plan)

        fleet = ConsumerFleet(consumer_specs(options, layout), layout.logs_dir)
        reducers = ReducerRuns(layout, options.queue, options.log_level)
        run = _Run(options, layout, plan, rng, fleet, reducers, deadline=started + options.timeout_s)
        try:
            fleet.start()
            _inject_faults_until_idle(run)
            reconcile = _finish(run)
        finally:
            reducers.kill_running()
            fleet.kill_all()
        elapsed_s = time.monotonic() - started
        return _check(run, reconcile, elapsed_s)


@contextlib.contextmanager
def _data_dir(options: ChaosOptions) -> Iterator[Path]:
    """Yield the data folder: ``options.data_dir``, or a temporary one removed at the end unless ``keep_data``."""
    if options.data_dir is not None:
        options.data_dir.mkdir(parents=True, exist_ok=True)
        yield options.data_dir
        return
    path = Path(tempfile.mkdtemp(prefix="qworker-chaos-"))
    try:
        yield path
    finally:
        if options.keep_data:
            logger.warning("kept the data folder of the chaos run: %s", path)
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _backend_environment(options: ChaosOptions) -> Iterator[None]:
    """For modal-local: set the reconciler timing, and start a local server unless one is given.

    Consumer and reducer processes are spawned with this environment, so they reach the same server.
    """
    if options.backend != MODAL_LOCAL:
        yield
        return

    from .modal_server import LocalModalServer

    with _environment(MODAL_TIMING_ENV):
        if options.modal_server_url is not None:
            with _client_pointed_at(options.modal_server_url):
                yield
            return
        with LocalModalServer() as server, _client_pointed_at(server.url):
            yield


@contextlib.contextmanager
def _client_pointed_at(url: str) -> Iterator[None]:
    """Point this process's modal client, and the environment children inherit, at the server at ``url``."""
    from .modal_server import client_env, close_cached_client

    if os.environ.get("MODAL_SERVER_URL") == url:
        yield
        return
    with _environment(client_env(url)):
        close_cached_client()
        try:
            yield
        finally:
            close_cached_client()


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block and restore their previous values after it."""
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _push(options: ChaosOptions, layout: Layout, plan: TaskPlan) -> None:
    """Empty the queue, then push the plan's tasks with the chaos workload recorded on the queue."""
    job = job_from_mapping(
        {
            "queue": options.queue,
            "workload": WORKLOAD_PATH,
            "config": {"paths": options.paths},
            "variants": montecarlo.DEFAULT_CONTRACTS,
            "max_attempts": options.max_attempts,
        },
        source="chaos run",
    )

    async def push() -> None:
        settings = ModalQueueSettings(tasks_per_item=MODAL_TASKS_PER_ITEM)
        async with await open_queue(options.backend, layout, options.queue, modal_settings=settings) as queue:
            await queue.purge()
            await push_job_tasks(queue, job, plan.tasks)

    anyio.run(push)
    logger.info("pushed %d tasks to queue %s on %s", len(plan.tasks), options.queue, options.backend)


def _inject_faults_until_idle(run: _Run) -> None:
    """Inject seeded faults while tasks are pending, until none is, ``max_faults`` were injected or the deadline passes."""
    watcher = PendingWatcher(run.options, run.layout)
    watcher.start()
    injected = 0
    max_faults = run.options.max_faults
    try:
        next_event = time.monotonic() + run.rng.uniform(*run.options.event_gap_s)
        while not watcher.idle():
            run.fleet.replace_exited()
            run.reducers.poll()
            now = time.monotonic()
            if now >= run.deadline:
                run.problems.append(f"timed out after {run.options.timeout_s:.0f} s with tasks still pending")
                return
            if now >= next_event and (max_faults is None or injected < max_faults):
                _inject_fault(run)
                injected += 1
                next_event = time.monotonic() + run.rng.uniform(*run.options.event_gap_s)
            time.sleep(TICK_S)
    finally:
        watcher.stop()


class PendingWatcher:
    """A background reader of the queue's pending count, so that slow stats calls do not delay the faults.

    On the Modal adapter a stats call scans the whole ledger, which takes
    seconds for a few thousand tasks on a loaded machine.
    """

    def __init__(self, options: ChaosOptions, layout: Layout) -> None:
        self._options = options
        self._layout = layout
        self._pending: int | None = None
        self._error: Exception | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="chaos-pending-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def idle(self) -> bool:
        """Return whether the last read found no pending task. Raise the error of a failed read."""
        if self._error is not None:
            raise self._error
        return self._pending == 0

    def _watch(self) -> None:
        interval_s = STATS_POLL_S[self._options.backend]
        while not self._stopping.is_set():
            try:
                self._pending = anyio.run(_read_stats, self._options, self._layout).pending
            except Exception as exc:  # noqa: BLE001 - handed to the driver thread, which raises it
                self._error = exc
                return
            self._stopping.wait(interval_s)


def _inject_fault(run: _Run) -> None:
    """Draw one fault kind and inject it.

    The number of draws from the run's RNG does not depend on the state of the
    run (which files exist, which processes run), so a seed always gives the
    same sequence of fault kinds and gaps.
    """
    kinds = list(EVENT_WEIGHTS)
    kind = run.rng.choices(kinds, weights=[EVENT_WEIGHTS[name] for name in kinds])[0]
    if kind == "sigkill":
        run.fleet.send_sigkill(run.rng.random())
    elif kind == "sigterm":
        run.fleet.send_sigterm(run.rng.random())
    elif kind == "truncate":
        for _ in range(run.rng.randint(1, run.options.max_truncations_per_event)):
            truncated = truncate_result_file(run.results_dir, run.rng.random(), run.rng.uniform(0.1, 0.9))
            if truncated is not None:
                run.truncated.append(truncated)
    else:
        _reduce(run)


def _reduce(run: _Run) -> None:
    """Start a reducer run, or, until one has been killed, a run to kill once enough files wait to be folded."""
    if run.reducers.kills == 0 and run.reducers.backlog() >= KILLED_REDUCER_MIN_BACKLOG:
        run.reducers.run_and_kill(_time_left(run))
    else:
        run.reducers.start()


def _finish(run: _Run) -> _ReconcileOutcome:
    """Reduce, reconcile, let the consumers run the delivered tasks, reduce again and stop the consumers."""
    if run.reducers.kills == 0:
        run.reducers.run_and_kill(_time_left(run))
    run.reducers.wait(_time_left(run))
    Reducer(run.results_dir, WORKLOAD.aggregation).run()

    reconcile = _reconcile(run)
    _wait_until_idle(run)
    Reducer(run.results_dir, WORKLOAD.aggregation).run()
    run.problems.extend(run.fleet.stop(STOP_TIMEOUT_S))
    return reconcile


def _reconcile(run: _Run) -> _ReconcileOutcome:
    """Run ``qworker reconcile`` and read how many done tasks it delivered again."""
    options = run.options
    missing = frozenset(anyio.run(_done_task_ids, options, run.layout) - result_task_ids(run.results_dir))
    command = [sys.executable, "-m", "qworker", "reconcile", "--queue", options.queue,
               "--data-dir", str(run.layout.data_dir), "--backend", options.backend]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=RECONCILE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        run.problems.append(f"qworker reconcile timed out after {RECONCILE_TIMEOUT_S:.0f} s")
        return _ReconcileOutcome(missing, None, -1)

    output = completed.stdout + completed.stderr
    logger.info("qworker reconcile exited with %d: %s", completed.returncode, output.strip())
    return _ReconcileOutcome(missing, _delivered_count(output), completed.returncode)


def _delivered_count(output: str) -> int | None:
    if "every done task has its result" in output:
        return 0
    match = re.search(r"delivered (\d+) done tasks?", output)
    return int(match.group(1)) if match else None


def _wait_until_idle(run: _Run) -> None:
    while _stats(run).pending:
        if time.monotonic() >= run.deadline:
            run.problems.append(f"timed out after {run.options.timeout_s:.0f} s waiting for reconciled tasks")
            return
        run.fleet.replace_exited()
        time.sleep(STATS_POLL_S[run.options.backend])


def _time_left(run: _Run) -> float:
    return max(1.0, run.deadline - time.monotonic())


def _stats(run: _Run) -> QueueStats:
    return anyio.run(_read_stats, run.options, run.layout)


async def _read_stats(options: ChaosOptions, layout: Layout) -> QueueStats:
    async with await open_queue(options.backend, layout, options.queue, create=False) as queue:
        return await queue.stats()


async def _done_task_ids(options: ChaosOptions, layout: Layout) -> set[str]:
    async with await open_queue(options.backend, layout, options.queue, create=False) as queue:
        return await queue.done_task_ids()


async def _dead_letters(options: ChaosOptions, layout: Layout, limit: int) -> list[DeadTask]:
    async with await open_queue(options.backend, layout, options.queue, create=False) as queue:
        return await queue.dead_letters(limit)


# -- the checks --------------------------------------------------------------------------


@dataclass(frozen=True)
class _ResultScan:
    """The readable result rows by task id, with each task's contract and lane."""

    contracts: dict[str, str]
    lanes: dict[str, str]
    readable_files: int
    unreadable_files: list[str]  # names relative to the results folder


def scan_results(results_dir: Path) -> _ResultScan:
    """Read the task id, contract and lane of every row of every readable result file."""
    contracts: dict[str, str] = {}
    lanes: dict[str, str] = {}
    readable = 0
    unreadable: list[str] = []
    for path in sorted(iter_result_files(results_dir)):
        try:
            table = pq.read_table(path, columns=[TASK_ID_COLUMN, "contract", "lane"])
        except (OSError, pa.ArrowException):
            unreadable.append(path.relative_to(results_dir).as_posix())
            continue
        readable += 1
        for row in table.to_pylist():
            contracts[row[TASK_ID_COLUMN]] = row["contract"]
            lanes[row[TASK_ID_COLUMN]] = row["lane"]
    return _ResultScan(contracts, lanes, readable, unreadable)


def counted_task_ids(results_dir: Path) -> set[str]:
    """Return the task ids the reducer has counted, from its state database."""
    state = results_dir / REDUCER_DIR / STATE_FILE
    with contextlib.closing(sqlite3.connect(state)) as conn:
        return {row[0] for row in conn.execute("SELECT task_id FROM counted_tasks")}


def read_quarantine(results_dir: Path) -> list[dict[str, Any]]:
    """Return the reducer's quarantine records, one per quarantined file."""
    report = results_dir / QUARANTINE_DIR / "report.jsonl"
    if not report.exists():
        return []
    return [json.loads(line) for line in report.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check(run: _Run, reconcile: _ReconcileOutcome, elapsed_s: float) -> ChaosReport:
    """Gather the final state of the queue and the results, and check it against the plan."""
    plan, options = run.plan, run.options
    report = ChaosReport(
        backend=options.backend,
        seed=options.seed,
        tasks_pushed=len(plan.tasks),
        poison_tasks=len(plan.ids_with(POISON)),
        transient_tasks=len(plan.ids_with(TRANSIENT)),
        oom_tasks=len(plan.ids_with(OOM)),
        truncations=len(run.truncated),
        sigkills=run.fleet.sigkills,
        sigterms=run.fleet.sigterms,
        restarts=run.fleet.restarts,
        reducer_runs=run.reducers.runs,
        reducer_kills=run.reducers.kills,
        reducer_killed_after_files=run.reducers.killed_after_files,
        elapsed_s=round(elapsed_s, 1),
        failures=list(run.problems) + list(run.reducers.problems),
    )
    scan = scan_results(run.results_dir)
    counted = counted_task_ids(run.results_dir)
    aggregate = Reducer(run.results_dir, WORKLOAD.aggregation).aggregate()

    _check_counts(report, plan, scan, counted, aggregate)
    _check_dead_letters(report, plan, anyio.run(_dead_letters, options, run.layout, len(plan.tasks) + 1))
    _check_oom(report, plan, scan, _stats(run))
    _check_quarantine(report, run.results_dir, reconcile, counted, scan)
    _check_prices(report, plan, aggregate)
    _check_processes(report, run)
    return report


def _check_counts(report: ChaosReport, plan: TaskPlan, scan: _ResultScan, counted: set[str], aggregate: pa.Table) -> None:
    """Check that every task but the poison ones is counted, and none twice."""
    report.result_files = scan.readable_files
    report.unreadable_result_files = len(scan.unreadable_files)
    report.tasks_counted = len(counted)
    report.tasks_expected = len(plan.tasks) - report.poison_tasks

    readable_per_contract = Counter(scan.contracts.values())
    for row in aggregate.to_pylist():
        report.duplicates += max(0, int(row["tasks"]) - readable_per_contract.get(row["contract"], 0))
    report.lost = sorted(set(plan.faults) - plan.ids_with(POISON) - counted)

    if report.duplicates:
        report.failures.append(f"{report.duplicates} tasks counted twice: the reducer's per-contract task counts"
                               " exceed the distinct task ids in readable results")
    if report.lost:
        report.failures.append(f"{len(report.lost)} tasks lost (pushed, not poison, not counted): {report.lost[:5]}")
    extra = counted - set(plan.faults)
    if extra:
        report.failures.append(f"{len(extra)} counted task ids were never pushed: {sorted(extra)[:5]}")
    # A segment truncated after the reducer folded it stays, because its tasks
    # run again into new segments. A per-task file is replaced by the new run.
    per_task = [name for name in scan.unreadable_files if "/" not in name]
    if per_task:
        report.failures.append(f"{len(per_task)} per-task result files are still unreadable after reconcile: {per_task[:5]}")


def _check_dead_letters(report: ChaosReport, plan: TaskPlan, letters: list[DeadTask]) -> None:
    """Check that the dead letters are exactly the poison tasks, each with the injected error.

    A SIGKILL that lands on a poison task's last attempt buries it with the
    queue's lease-expiry error instead, which is accepted and counted apart.
    """
    poison = plan.ids_with(POISON)
    dead_ids = {letter.task.task_id for letter in letters}
    report.dead_letters = len(letters)
    report.dead_letters_injected_error = sum(1 for letter in letters if POISON_ERROR in letter.error)
    report.dead_letters_lease_expired = sum(1 for letter in letters if letter.error.startswith(LEASE_EXPIRED_ERROR))

    if dead_ids - poison:
        report.failures.append(f"{len(dead_ids - poison)} dead letters are not poison tasks: {sorted(dead_ids - poison)[:5]}")
    if poison - dead_ids:
        report.failures.append(f"{len(poison - dead_ids)} poison tasks are not in the dead letters: {sorted(poison - dead_ids)[:5]}")
    for letter in letters:
        if POISON_ERROR not in letter.error and not letter.error.startswith(LEASE_EXPIRED_ERROR):
            report.failures.append(f"dead letter {letter.task.task_id} has an unexpected error: {letter.error}")


def _check_oom(report: ChaosReport, plan: TaskPlan, scan: _ResultScan, stats: QueueStats) -> None:
    """Check that the queue moved every OOM task at least once and that each one finished on the solo lane."""
    oom = plan.ids_with(OOM)
    report.oom_moves = stats.oom_moves
    report.oom_tasks_on_solo = sum(1 for task_id in oom if scan.lanes.get(task_id) == SOLO_LANE)
    if report.oom_moves < len(oom):
        report.failures.append(f"{report.oom_moves} OOM moves for {len(oom)} OOM tasks: expected at least one per task")
    if report.oom_tasks_on_solo != len(oom):
        report.failures.append(f"{len(oom) - report.oom_tasks_on_solo} OOM tasks have no result row on lane solo")


def _check_quarantine(report: ChaosReport, results_dir: Path, reconcile: _ReconcileOutcome,
                      counted: set[str], scan: _ResultScan) -> None:
    """Check every quarantined file's task is counted with a readable result, and that reconcile ran cleanly."""
    report.reconciled = reconcile.delivered or 0
    for record in read_quarantine(results_dir):
        name = record["file"]
        task_id = Path(name).stem if "/" not in name else None
        check = QuarantineCheck(
            file=name,
            task_id=task_id,
            reconciled=task_id in reconcile.missing,
            counted=task_id in counted and task_id in scan.lanes,
        )
        report.quarantined.append(check)
        if task_id is not None and not check.counted:
            report.failures.append(f"quarantined file {name}: its task is not counted with a readable result")

    if reconcile.exit_code != 0:
        report.failures.append(f"qworker reconcile exited with code {reconcile.exit_code}")
    elif reconcile.delivered != len(reconcile.missing):
        report.failures.append(f"qworker reconcile delivered {reconcile.delivered} tasks again, but"
                               f" {len(reconcile.missing)} done tasks had no readable result")


def _check_prices(report: ChaosReport, plan: TaskPlan, aggregate: pa.Table) -> None:
    """Check each contract's task count and that its price is within MAX_ABS_Z standard errors of closed form."""
    expected = plan.expected_per_contract()
    report.contracts = WORKLOAD.summarize(aggregate).to_pylist() if WORKLOAD.summarize else []
    found = {row["contract"] for row in report.contracts}
    for contract in sorted(set(expected) - found):
        report.failures.append(f"{contract}: no results counted")
    for row in report.contracts:
        if row["tasks"] != expected[row["contract"]]:
            report.failures.append(f"{row['contract']}: {row['tasks']} tasks counted, expected {expected[row['contract']]}")
        if row["z_score"] is None or abs(row["z_score"]) > MAX_ABS_Z:
            report.failures.append(f"{row['contract']}: price {row['price']} is {row['z_score']} standard errors"
                                   f" from its closed form {row['closed_form']:.4f}")


def _check_processes(report: ChaosReport, run: _Run) -> None:
    """Check each consumer exit matches the signal sent, and that one reducer run was killed mid-way."""
    report.consumer_crashes = sum(1 for exit_record in run.fleet.exits if exit_record.crash is not None)
    for exit_record in run.fleet.exits:
        if exit_record.expected:
            continue
        signals = ", ".join(exit_record.signals_sent) or "no signal"
        message = (f"consumer {exit_record.index} pid={exit_record.pid} lane={exit_record.lane} exited with code"
                   f" {exit_record.exit_code} after {signals}")
        if exit_record.crash is not None:
            message += f". It crashed with {exit_record.crash} (traceback in logs/consumer-{exit_record.index}.stderr)"
        report.failures.append(message)
    if run.reducers.kills != 1:
        report.failures.append(f"{run.reducers.kills} reducer runs were SIGKILLed mid-way, expected 1")


def write_json(report: ChaosReport, path: Path) -> None:
    path.write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")

