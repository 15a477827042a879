"""Measure qworker's per-task framework overhead: a direct loop over a handler against qworker running it, beside one SQLite commit.

Handlers:

* ``noop``: the built-in async handler that returns None at once;
* ``small-row``: ``small_row`` below, a sync handler that returns one dict of
  two values, so qworker's run includes a worker-thread hop and the
  conversion of the dict into a result row.

For each handler the script times:

* direct loop: the handler called N times in one process (awaited in one
  event loop for the async handler, called in a plain loop for the sync one),
  with one shared ``TaskContext``;
* qworker drain: N tasks pushed to a fresh queue file, then ``--processes``
  spawned consumer processes (``ConsumerPool``) in burst mode, results in
  segment files (1,000 rows or 0.2 s, fsync on). Elapsed time runs from
  starting the processes to the last ack (the largest ``finished_at``);
* empty drain: the same consumer processes started on an empty queue, which
  gives the CPU time of start-up and shutdown alone.

Per task, in microseconds:

* overhead = (elapsed * processes - direct loop seconds) / N, the
  process-seconds qworker adds. "From first claim" uses the time from the
  first claim to the last ack instead, which leaves out process start-up;
* cpu = user plus system CPU of the consumer processes (``getrusage`` of the
  waited-for children) / N, start-up included; "net" subtracts the CPU of
  the empty drain.

The reference is one SQLite commit measured in the same run: a loop of
``BEGIN IMMEDIATE``, a single-row INSERT and ``COMMIT`` on a fresh WAL file,
with ``synchronous = NORMAL`` and with ``FULL``.

    python benchmarks/overhead.py --tasks 20000 --runs 3
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from qworker.backends.sqlite import SqliteQueue
from qworker.consumer import ConsumerSettings
from qworker.context import TaskContext
from qworker.layout import Layout
from qworker.log import LOG_LEVELS, configure_logging
from qworker.pool import ConsumerPool, ConsumerSpec
from qworker.producer import push_tasks
from qworker.sink import SinkSettings
from qworker.task import Task
from qworker.workloads import get_workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402 - a sibling file, found through the path entry above
    QUEUE,
    BenchmarkError,
    RunTiming,
    check_pool_exit,
    children_cpu_s,
    finished_timing,
    make_tasks,
    positive_float,
    positive_int,
    stop_pool,
)

logger = logging.getLogger("benchmarks.overhead")

SEGMENT_ROWS = 1000
SEGMENT_S = 0.2
SYNCHRONOUS_MODES = ("NORMAL", "FULL")


def small_row(task: Task, ctx: TaskContext) -> dict[str, Any]:
    """Return one small row, as a cheap sync handler that produces a result would."""
    return {"seed": task.seed, "value": 1.0}


# Handler label -> workload name or module:function path that consumer processes import.
# The spawned processes find this module because spawn passes this process's sys.path on.
HANDLERS = {
    "noop": "noop",
    "small-row": "overhead:small_row",
}


@dataclass(frozen=True)
class Case:
    """One handler run by a number of consumer processes."""

    handler: str
    processes: int

    @property
    def name(self) -> str:
        return f"{self.handler}, {self.processes} process{'es' if self.processes > 1 else ''}"


@dataclass
class CaseResults:
    """The runs of one case, and the empty drains of its process count (CPU seconds each)."""

    case: Case
    runs: list[RunTiming] = field(default_factory=list)
    empty_cpu_s: list[float] = field(default_factory=list)


# -- direct loop ---------------------------------------------------------------


def make_context(task: Task, scratch: Path) -> TaskContext:
    return TaskContext(
        task=task,
        logger=logging.LoggerAdapter(logger, {}),
        scratch_root=scratch,
        requested_device="cpu",
        http_factory=lambda: None,  # type: ignore[arg-type, return-value]  # neither handler asks for a client
    )


def time_direct_loop(handler_label: str, tasks: list[Task], scratch: Path) -> float:
    """Return the seconds one process takes to call the handler once per task: awaited in one event loop if async."""
    handler = get_workload(HANDLERS[handler_label]).handler
    context = make_context(tasks[0], scratch)

    if inspect.iscoroutinefunction(handler):
        async def loop() -> float:
            started = time.perf_counter()
            for task in tasks:
                await handler(task, context)
            return time.perf_counter() - started

        return anyio.run(loop)

    started = time.perf_counter()
    for task in tasks:
        handler(task, context)
    return time.perf_counter() - started


# -- qworker drain ---------------------------------------------------------------


def consumer_spec(args: argparse.Namespace, data_dir: Path, handler_label: str) -> ConsumerSpec:
    settings = ConsumerSettings(
        slots=args.slots,
        burst=True,
        device=args.device,
        sink=SinkSettings(batch_rows=SEGMENT_ROWS, batch_s=SEGMENT_S, fsync=True),
    )
    return ConsumerSpec(data_dir=data_dir, queue=QUEUE, workload=HANDLERS[handler_label], settings=settings,
                        log_level=args.log_level)


async def push(db_path: Path, tasks: list[Task], workload: str) -> None:
    async with SqliteQueue(db_path, QUEUE) as queue:
        await queue.set_metadata({"workload": workload})
        if tasks:
            await push_tasks(queue, tasks)


def start_and_wait(pool: ConsumerPool, timeout_s: float, description: str) -> None:
    """Start the pool and wait until every consumer exits; stop it after ``timeout_s``."""
    pool.start()
    try:
        if not pool.wait(timeout_s):
            raise BenchmarkError(f"timed out: {description} did not finish within {timeout_s:g} s (raise --timeout-s)")
    finally:
        stop_pool(pool)
    check_pool_exit(pool)


def run_drain(args: argparse.Namespace, data_dir: Path, *, case: Case, tasks: list[Task]) -> RunTiming:
    """Push the tasks, then time the consumers in burst mode from their start to the last ack."""
    layout = Layout(data_dir)
    anyio.run(push, layout.db_path, tasks, HANDLERS[case.handler])
    pool = ConsumerPool(consumer_spec(args, data_dir, case.handler), case.processes)
    cpu_before = children_cpu_s()
    started_at = time.time()
    start_and_wait(pool, args.timeout_s, f"the drain of {len(tasks)} tasks ({case.name})")
    timing = finished_timing(layout.db_path, len(tasks), started_at)
    return RunTiming(tasks=timing.tasks, elapsed_s=timing.elapsed_s, active_s=timing.active_s,
                     cpu_s=children_cpu_s() - cpu_before)


def run_empty_drain(args: argparse.Namespace, data_dir: Path, *, case: Case) -> float:
    """Return the CPU seconds of the case's consumer processes started on an empty queue: start-up and shutdown."""
    anyio.run(push, Layout(data_dir).db_path, [], HANDLERS[case.handler])
    pool = ConsumerPool(consumer_spec(args, data_dir, case.handler), case.processes)
    cpu_before = children_cpu_s()
    start_and_wait(pool, args.timeout_s, f"the empty drain ({case.name})")
    return children_cpu_s() - cpu_before


def in_fresh_folder(parent: Path | None, run: Callable[[Path], Any]) -> Any:
    folder = Path(tempfile.mkdtemp(prefix="qworker-overhead-", dir=parent))
    try:
        return run(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- SQLite commit ---------------------------------------------------------------


def time_commits(folder: Path, synchronous: str, count: int, max_s: float) -> tuple[int, float]:
    """Return how many single-row INSERT + COMMIT transactions ran and their mean seconds each.

    The loop stops after ``count`` commits or ``max_s`` seconds, whichever
    comes first, so a slow disk under FULL still ends in time.
    """
    path = folder / f"commit-{synchronous.lower()}.db"
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
        done = 0
        started = time.perf_counter()
        deadline = started + max_s
        while done < count and time.perf_counter() < deadline:
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("INSERT INTO rows (payload) VALUES (?)", (f"row {done}",))
            connection.execute("COMMIT")
            done += 1
        elapsed = time.perf_counter() - started
    finally:
        connection.close()
    return done, elapsed / done


# -- report ----------------------------------------------------------------------


def median_min_max(values: list[float]) -> str:
    return f"{statistics.median(values):,.1f} ({min(values):,.1f} to {max(values):,.1f})"


def print_tables(results: list[CaseResults], direct_s: dict[str, list[float]], commits: dict[str, list[float]],
                 commit_counts: dict[str, int], tasks: int) -> None:
    print("\nqworker drain against a direct loop, microseconds per task: median (min to max) over the runs")
    header = (f"{'case':<26} {'tasks/s':>8} {'direct':>7} {'overhead':>26} {'overhead from 1st claim':>26}"
              f" {'cpu':>26} {'cpu net of start-up':>26}")
    print(header)
    print("-" * len(header))
    for result in results:
        case = result.case
        direct_us = statistics.median(direct_s[case.handler]) / tasks * 1e6
        overhead = [(run.elapsed_s * case.processes / tasks) * 1e6 - direct_us for run in result.runs]
        active = [(run.active_s * case.processes / tasks) * 1e6 - direct_us for run in result.runs]
        cpu = [run.cpu_s / tasks * 1e6 for run in result.runs]
        empty_cpu_s = statistics.median(result.empty_cpu_s)
        net = [(run.cpu_s - empty_cpu_s) / tasks * 1e6 for run in result.runs]
        rate = statistics.median(run.tasks_per_s for run in result.runs)
        print(f"{case.name:<26} {rate:>8,.0f} {direct_us:>7.2f} {median_min_max(overhead):>26} {median_min_max(active):>26}"
              f" {median_min_max(cpu):>26} {median_min_max(net):>26}")
    print("overhead: (elapsed * processes - direct loop s) / N, elapsed from starting the processes to the last ack;")
    print("from 1st claim: the same with elapsed from the first claim; cpu: consumer CPU / N, start-up included;")
    print("cpu net of start-up: (consumer CPU - CPU of the same processes on an empty queue) / N.")

    print("\ndirect loop seconds for all tasks, per run: "
          + "; ".join(f"{label} {', '.join(f'{value * 1000:.1f} ms' for value in values)}" for label, values in direct_s.items()))
    print("empty drain CPU seconds per run: "
          + "; ".join(f"{result.case.name} {', '.join(f'{value:.2f}' for value in result.empty_cpu_s)}" for result in results))

    print("\nSQLite commit (BEGIN IMMEDIATE, one-row INSERT, COMMIT) on a WAL file, microseconds per commit")
    for synchronous, values in commits.items():
        print(f"synchronous {synchronous:<6} {commit_counts[synchronous]:>6} commits per run: {median_min_max([v * 1e6 for v in values])}")


def print_ratios(results: list[CaseResults], direct_s: dict[str, list[float]], commits: dict[str, list[float]], tasks: int) -> None:
    print("\nmedian overhead per task / median commit:")
    for result in results:
        case = result.case
        direct_us = statistics.median(direct_s[case.handler]) / tasks * 1e6
        overhead_us = statistics.median(run.elapsed_s * case.processes / tasks * 1e6 - direct_us for run in result.runs)
        ratios = ", ".join(f"{overhead_us / (statistics.median(values) * 1e6):.2f} of a {synchronous} commit"
                           for synchronous, values in commits.items())
        print(f"{case.name:<26} {overhead_us:,.1f} us: {ratios}")


# -- command line ----------------------------------------------------------------


def load_average() -> str:
    """Describe the 1-minute load average, so a report shows whether other work shared the CPUs."""
    return f"load average {os.getloadavg()[0]:.2f} over 1 min"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time qworker's per-task overhead against a direct loop over the same handler, beside one SQLite commit.",
    )
    parser.add_argument("--tasks", type=positive_int, default=20000, help="tasks per run (default: %(default)s)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per case (default: %(default)s)")
    parser.add_argument("--processes", type=positive_int, nargs="+", default=[1, 2],
                        help="consumer process counts to run (default: 1 2)")
    parser.add_argument("--handlers", choices=sorted(HANDLERS), nargs="+", default=list(HANDLERS),
                        help="handlers to run (default: all)")
    parser.add_argument("--slots", type=positive_int, default=4, help="tasks run at once per process (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="device the consumers resolve: auto, cpu (default: %(default)s)")
    parser.add_argument("--commits", type=positive_int, default=2000,
                        help="commits per run of the SQLite commit loop (default: %(default)s)")
    parser.add_argument("--commit-max-s", type=positive_float, default=10.0,
                        help="seconds after which one commit loop stops early (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=300.0,
                        help="seconds one drain may take before its processes are stopped (default: %(default)s)")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS, help="consumer log level (default: %(default)s)")
    parser.add_argument("--tmp-dir", type=Path, help="folder for the per-run data directories (default: the system temp folder)")
    return parser


def run_benchmark(args: argparse.Namespace) -> None:
    tasks = make_tasks(args.tasks)
    cases = [Case(handler, processes) for handler in args.handlers for processes in args.processes]
    results = [CaseResults(case) for case in cases]
    direct_s: dict[str, list[float]] = {handler: [] for handler in args.handlers}
    commits: dict[str, list[float]] = {synchronous: [] for synchronous in SYNCHRONOUS_MODES}
    commit_counts: dict[str, int] = {}

    # Cases take turns within each round, so drift in machine load spreads over all of them.
    for round_index in range(args.runs):
        for result in results:
            case = result.case
            timing = in_fresh_folder(args.tmp_dir, functools.partial(run_drain, args, case=case, tasks=tasks))
            result.runs.append(timing)
            result.empty_cpu_s.append(in_fresh_folder(args.tmp_dir, functools.partial(run_empty_drain, args, case=case)))
            print(f"run {round_index + 1}/{args.runs} {case.name}: {timing.tasks_per_s:,.0f} tasks/s ({timing.elapsed_s:.2f} s,"
                  f" from first claim {timing.active_s:.2f} s, cpu {timing.cpu_s:.2f} s,"
                  f" empty drain cpu {result.empty_cpu_s[-1]:.2f} s)", flush=True)
        for handler in args.handlers:
            direct_s[handler].append(in_fresh_folder(args.tmp_dir, functools.partial(time_direct_loop, handler, tasks)))
        for synchronous in SYNCHRONOUS_MODES:
            timer = functools.partial(time_commits, synchronous=synchronous, count=args.commits, max_s=args.commit_max_s)
            count, seconds = in_fresh_folder(args.tmp_dir, timer)
            commits[synchronous].append(seconds)
            commit_counts[synchronous] = min(count, commit_counts.get(synchronous, count))

    print_tables(results, direct_s, commits, commit_counts, args.tasks)
    print_ratios(results, direct_s, commits, args.tasks)


def main() -> int:
    args = build_parser().parse_args()
    configure_logging(args.log_level)
    print(f"{args.tasks:,} tasks x {args.runs} runs, handlers {', '.join(args.handlers)}, processes {args.processes},"
          f" slots {args.slots}, device {args.device}, segments of {SEGMENT_ROWS} rows or {SEGMENT_S} s with fsync,"
          f" python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs,"
          f" {load_average()}", flush=True)
    try:
        run_benchmark(args)
    except BenchmarkError as exc:
        print(f"overhead: error: {exc}", file=sys.stderr)
        return 1
    print(f"\nat the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
