"""Measure qworker's throughput on no-op tasks with consumer processes, beside a bare SQLite queue.

Each run uses a fresh temporary data directory, the ``noop`` workload and
spawned consumer processes (``ConsumerPool``). Modes:

* drain: push N tasks, then start the consumers in burst mode. Time from
  starting the processes to the last ack.
* end to end: start the consumers (not burst) and wait until they are
  idle. Then push N tasks and time from the first push to the last ack.
  Idle consumers poll with a backoff of up to ``poll_max_s`` (0.5 s by
  default), so this time includes that first-claim delay.
* file sink: drain with one result file per task (the CLI default) on a
  smaller N, for contrast with segment files.
* bare SQLite: the peer in bare_sqlite_queue.py, drained like "drain".
* direct loop: the same no-op handler awaited N times in one event loop.

Times are wall-clock: "last ack" is the largest ``finished_at`` in the queue
file and "first claim" the smallest ``claimed_at``, so the parent's polling
does not add to them. Per-task overhead is elapsed * processes / N: the
process-seconds one task costs, which is its CPU cost only while every
process is busy.

    python benchmarks/throughput.py --tasks 20000 --runs 3
    python benchmarks/throughput.py --profile --tasks 20000
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import anyio

from qworker.arguments import non_negative_int, positive_float, positive_int
from qworker.backends.sqlite import SqliteQueue
from qworker.consumer import ConsumerSettings, ConsumerStats
from qworker.context import TaskContext
from qworker.layout import Layout
from qworker.log import LOG_LEVELS, configure_logging
from qworker.pool import ConsumerPool, ConsumerSpec, run_consumer
from qworker.producer import push_tasks
from qworker.sink import SinkSettings
from qworker.task import Task
from qworker.workloads import get_workload

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bare_sqlite_queue  # noqa: E402 - a sibling file, found through the path entry above

QUEUE = "bench"
WORKLOAD = "noop"
POLL_S = 0.05
IDLE_SAMPLE_S = 0.25
IDLE_CPU_SHARE = 0.1  # a consumer using under 10% of a core over one sample has finished starting up
STOP_WAIT_S = 30.0

logger = logging.getLogger("benchmarks.throughput")


class BenchmarkError(RuntimeError):
    """A run that timed out, lost tasks or had a consumer exit with an error."""


@dataclass(frozen=True)
class RunTiming:
    """One timed run: ``elapsed_s`` from the timer start to the last ack, ``active_s`` from the first claim.

    ``cpu_s`` is the user plus system CPU time of the processes the run
    started and waited for, start-up and idle polling included.
    """

    tasks: int
    elapsed_s: float
    active_s: float
    cpu_s: float = 0.0

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed_s

    @property
    def active_tasks_per_s(self) -> float:
        return self.tasks / self.active_s


@dataclass
class ModeResults:
    """The runs of one mode, and how many processes shared the work."""

    name: str
    processes: int
    runs: list[RunTiming] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [run.tasks_per_s for run in self.runs]

    def median_rate(self) -> float:
        return statistics.median(self.rates())

    def median_active_rate(self) -> float:
        return statistics.median(run.active_tasks_per_s for run in self.runs)

    def per_task_us(self) -> float:
        """Median consumer-process microseconds per task: elapsed * processes / N."""
        return statistics.median(run.elapsed_s * self.processes / run.tasks for run in self.runs) * 1e6

    def cpu_per_task_us(self) -> float:
        return statistics.median(run.cpu_s / run.tasks for run in self.runs) * 1e6


# -- qworker runs --------------------------------------------------------------


def make_tasks(count: int) -> list[Task]:
    return [Task.create(seed) for seed in range(count)]


def consumer_spec(args: argparse.Namespace, data_dir: Path, *, burst: bool, batch_rows: int) -> ConsumerSpec:
    settings = ConsumerSettings(
        slots=args.slots,
        prefetch=args.prefetch,
        burst=burst,
        sink=SinkSettings(batch_rows=batch_rows, batch_s=args.batch_s, fsync=not args.no_fsync),
    )
    return ConsumerSpec(
        data_dir=data_dir, queue=QUEUE, workload=WORKLOAD, settings=settings,
        synchronous=args.synchronous, log_level=args.log_level,
    )


async def push(db_path: Path, tasks: list[Task], synchronous: str) -> None:
    async with SqliteQueue(db_path, QUEUE, synchronous=synchronous) as queue:
        await queue.set_metadata({"workload": WORKLOAD})
        if tasks:
            await push_tasks(queue, tasks)


async def read_done(db_path: Path) -> int:
    async with SqliteQueue(db_path, QUEUE, create=False) as queue:
        stats = await queue.stats()
    if stats.dead:
        raise BenchmarkError(f"{stats.dead} tasks went to the dead letters: rerun with --log-level INFO to see the errors")
    return stats.done


def count_done(connection: sqlite3.Connection) -> int:
    """Count done tasks through the ``tasks_finished`` index, which is cheaper than a full ``stats()``."""
    return connection.execute("SELECT COUNT(*) FROM tasks WHERE queue = ? AND state = 'done'", (QUEUE,)).fetchone()[0]


def read_window(db_path: Path) -> tuple[float, float]:
    """Return the first ``claimed_at`` and the last ``finished_at`` of the queue's done tasks."""
    connection = sqlite3.connect(db_path)
    try:
        first_claim, last_ack = connection.execute(
            "SELECT MIN(claimed_at), MAX(finished_at) FROM tasks WHERE queue = ? AND state = 'done'", (QUEUE,)
        ).fetchone()
    finally:
        connection.close()
    return first_claim, last_ack


def stop_pool(pool: ConsumerPool) -> None:
    """Stop the pool's processes: SIGTERM, then SIGINT, then SIGKILL to the pool's own pids."""
    for _ in range(2):
        if not pool.is_alive():
            return
        pool.stop()
        if pool.wait(STOP_WAIT_S):
            return
    # NOTE: ConsumerPool has no kill method, so this signals every pid the pool
    # started. A child that has already exited raises ProcessLookupError and is skipped.
    for pid in pool.pids:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    pool.wait(STOP_WAIT_S)


def check_pool_exit(pool: ConsumerPool) -> None:
    if pool.exit_code() != 0:
        raise BenchmarkError("a consumer process exited with an error: see its log lines above")


def run_drain(args: argparse.Namespace, data_dir: Path, tasks: list[Task], *, batch_rows: int) -> RunTiming:
    layout = Layout(data_dir)
    anyio.run(push, layout.db_path, tasks, args.synchronous)
    pool = ConsumerPool(consumer_spec(args, data_dir, burst=True, batch_rows=batch_rows), args.processes)

    started_at = time.time()
    pool.start()
    try:
        if not pool.wait(args.timeout_s):
            raise BenchmarkError(f"timed out: drain of {len(tasks)} tasks did not finish within {args.timeout_s:g} s (raise --timeout-s)")
    finally:
        stop_pool(pool)
    check_pool_exit(pool)
    return finished_timing(layout.db_path, len(tasks), started_at)


def run_end_to_end(args: argparse.Namespace, data_dir: Path, tasks: list[Task], *, batch_rows: int) -> RunTiming:
    layout = Layout(data_dir)
    anyio.run(push, layout.db_path, [], args.synchronous)  # consumers open an existing queue file only
    pool = ConsumerPool(consumer_spec(args, data_dir, burst=False, batch_rows=batch_rows), args.processes)

    pool.start()
    try:
        wait_until_idle(pool, args.timeout_s)
        started_at = time.time()
        anyio.run(push, layout.db_path, tasks, args.synchronous)
        wait_until_done(layout.db_path, len(tasks), started_at + args.timeout_s, pool)
    finally:
        stop_pool(pool)
    check_pool_exit(pool)
    return finished_timing(layout.db_path, len(tasks), started_at)


def wait_until_idle(pool: ConsumerPool, timeout_s: float) -> None:
    """Wait until every consumer process has finished starting up (imports, queue file open) and is polling.

    A process counts as idle once it uses under IDLE_CPU_SHARE of a core over
    one IDLE_SAMPLE_S sample, read from /proc. Without /proc it sleeps 3 s.
    """
    if not Path("/proc/self/stat").exists():
        time.sleep(3.0)
        return
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    deadline = time.monotonic() + timeout_s
    previous = {pid: cpu_ticks(pid) for pid in pool.pids}
    while time.monotonic() < deadline:
        time.sleep(IDLE_SAMPLE_S)
        if not pool.is_alive():
            raise BenchmarkError("consumer processes exited while starting up: see their log lines above")
        current = {pid: cpu_ticks(pid) for pid in pool.pids}
        busy = [pid for pid in current if current[pid] - previous[pid] > IDLE_CPU_SHARE * IDLE_SAMPLE_S * ticks_per_s]
        if not busy:
            return
        previous = current
    raise BenchmarkError(f"consumer processes were still busy starting up after {timeout_s:g} s")


def cpu_ticks(pid: int) -> int:
    """Return user plus system CPU time of ``pid`` in clock ticks, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name in brackets may contain spaces
    return int(fields[11]) + int(fields[12])


def wait_until_done(db_path: Path, tasks: int, deadline: float, pool: ConsumerPool) -> None:
    connection = sqlite3.connect(db_path)
    try:
        while count_done(connection) < tasks:
            if time.time() > deadline:
                raise BenchmarkError(f"timed out: {count_done(connection)} of {tasks} tasks done when the time limit ran out (raise --timeout-s)")
            if not pool.is_alive():
                raise BenchmarkError("consumer processes exited before every task was done: see their log lines above")
            time.sleep(POLL_S)
    finally:
        connection.close()


def finished_timing(db_path: Path, tasks: int, started_at: float) -> RunTiming:
    done = anyio.run(read_done, db_path)
    if done != tasks:
        raise BenchmarkError(f"{done} of {tasks} tasks are done after the run")
    first_claim, last_ack = read_window(db_path)
    return RunTiming(tasks=tasks, elapsed_s=last_ack - started_at, active_s=last_ack - first_claim)


def run_bare(args: argparse.Namespace, data_dir: Path) -> RunTiming:
    try:
        timing = bare_sqlite_queue.drain(data_dir / "bare.db", args.tasks, args.processes, timeout_s=args.timeout_s)
    except RuntimeError as exc:
        raise BenchmarkError(str(exc)) from None
    return RunTiming(tasks=args.tasks, elapsed_s=timing.elapsed_s, active_s=timing.active_s)


# -- direct loop -----------------------------------------------------------


def time_direct_loop(tasks: list[Task]) -> float:
    """Return the seconds one event loop takes to await the no-op handler once per task."""
    handler = get_workload(WORKLOAD).handler
    context = TaskContext(
        task=tasks[0],
        logger=logging.LoggerAdapter(logger, {}),
        scratch_root=Path(tempfile.gettempdir()) / "qworker-bench-unused",
        requested_device="cpu",
        http_factory=lambda: None,  # type: ignore[arg-type, return-value]  # the no-op handler never asks for it
    )

    async def loop() -> float:
        started = time.perf_counter()
        for task in tasks:
            await handler(task, context)
        return time.perf_counter() - started

    return anyio.run(loop)


# -- profile ---------------------------------------------------------------


def profile_consumer(args: argparse.Namespace) -> None:
    """Run one consumer in this process in burst mode under cProfile and print the top functions.

    anyio runs every SQLite call and file write in worker threads, so each
    thread started during the run gets its own profiler, and the report
    merges them with the event loop thread's.
    """
    configure_logging(args.log_level)
    with tempfile.TemporaryDirectory(prefix="qworker-bench-", dir=args.tmp_dir) as folder:
        data_dir = Path(folder)
        tasks = make_tasks(args.tasks)
        anyio.run(push, Layout(data_dir).db_path, tasks, args.synchronous)
        spec = consumer_spec(args, data_dir, burst=True, batch_rows=args.batch_rows)

        thread_profiles: list[cProfile.Profile] = []
        lock = threading.Lock()

        def profile_new_thread(frame: object, event: str, arg: object) -> None:
            profile = cProfile.Profile()
            with lock:
                thread_profiles.append(profile)
            profile.enable()  # replaces this hook for the thread

        async def run_bounded() -> ConsumerStats:
            with anyio.fail_after(args.timeout_s):
                return await run_consumer(spec)

        main_profile = cProfile.Profile()
        threading.setprofile(profile_new_thread)
        started = time.perf_counter()
        main_profile.enable()
        try:
            consumer_stats = anyio.run(run_bounded)
        except TimeoutError:
            raise BenchmarkError(f"timed out: the profiled consumer did not finish within {args.timeout_s:g} s (raise --timeout-s)") from None
        finally:
            main_profile.disable()
            threading.setprofile(None)  # type: ignore[arg-type]
        elapsed_s = time.perf_counter() - started

    print(f"profiled one consumer: {consumer_stats.done} of {args.tasks} tasks done in {elapsed_s:.2f} s"
          f" under cProfile ({args.tasks / elapsed_s:,.0f} tasks/s), {len(thread_profiles)} worker threads")
    print_profile("event loop thread", pstats.Stats(main_profile), args.profile_top)
    if thread_profiles:
        worker_stats = pstats.Stats(thread_profiles[0])
        for profile in thread_profiles[1:]:
            worker_stats.add(profile)
        print_profile("worker threads, merged", worker_stats, args.profile_top)
    if args.profile_out:
        combined = pstats.Stats(main_profile)
        for profile in thread_profiles:
            combined.add(profile)
        combined.dump_stats(args.profile_out)
        print(f"wrote the merged profile to {args.profile_out}")


def print_profile(title: str, stats: pstats.Stats, top: int) -> None:
    for order in ("tottime", "cumulative"):
        output = io.StringIO()
        stats.stream = output
        stats.strip_dirs().sort_stats(order).print_stats(top)
        print(f"\n== {title}, by {order} ==")
        print(output.getvalue().strip())


# -- report ----------------------------------------------------------------


def print_table(results: list[ModeResults]) -> None:
    header = (f"{'mode':<34} {'tasks':>7} {'runs':>4} {'median/s':>9} {'min/s':>9} {'max/s':>9} {'active/s':>9}"
              f" {'us/task':>8} {'cpu us':>7}")
    print(header)
    print("-" * len(header))
    for mode in results:
        if not mode.runs:
            continue
        rates = mode.rates()
        print(
            f"{mode.name:<34} {mode.runs[0].tasks:>7} {len(mode.runs):>4} {statistics.median(rates):>9,.0f}"
            f" {min(rates):>9,.0f} {max(rates):>9,.0f} {mode.median_active_rate():>9,.0f} {mode.per_task_us():>8.0f}"
            f" {mode.cpu_per_task_us():>7.0f}"
        )
    print("median/s, min/s, max/s: N / (timer start to last ack); active/s: N / (first claim to last ack);")
    print("us/task: elapsed * processes / N in microseconds (median).")
    print("cpu us: user + system CPU of the started processes per task, start-up included (median).")


def print_comparisons(args: argparse.Namespace, results: dict[str, ModeResults], direct_s: float) -> None:
    direct_us = direct_s / args.tasks * 1e6
    print(f"\ndirect loop: {args.tasks} awaits of the no-op handler in {direct_s * 1000:.1f} ms, {direct_us:.2f} us per task")
    for key in ("drain", "end_to_end"):
        mode = results[key]
        overhead_us = mode.per_task_us() - direct_us
        print(f"{mode.name}: framework overhead {overhead_us:,.0f} us per task (qworker {mode.per_task_us():,.0f} - direct {direct_us:.2f})")

    bare = results["bare"]
    for key in ("drain", "end_to_end"):
        mode = results[key]
        print(
            f"{mode.name} / bare SQLite drain: {mode.median_rate() / bare.median_rate():.2f}x from timer start,"
            f" {mode.median_active_rate() / bare.median_active_rate():.2f}x from first claim"
        )


# -- command line ----------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time qworker on no-op tasks (drain and end to end) beside a bare SQLite queue and a direct loop.",
    )
    parser.add_argument("--tasks", type=positive_int, default=20000, help="tasks per run (default: %(default)s)")
    parser.add_argument("--file-tasks", type=non_negative_int, default=2000,
                        help="tasks per run of the one-file-per-task mode; 0 skips it (default: %(default)s)")
    parser.add_argument("--processes", type=positive_int, default=2, help="consumer processes (default: %(default)s)")
    parser.add_argument("--slots", type=positive_int, default=4, help="tasks run at once per process (default: %(default)s)")
    parser.add_argument("--prefetch", type=non_negative_int, help="tasks leased ahead of a free slot (default: adaptive, about 50 ms of work)")
    parser.add_argument("--batch-rows", type=positive_int, default=1000,
                        help="rows per result segment file (default: %(default)s)")
    parser.add_argument("--batch-s", type=positive_float, default=0.2,
                        help="seconds before a partial segment is flushed (default: %(default)s)")
    parser.add_argument("--no-fsync", action="store_true", help="do not fsync result files")
    parser.add_argument("--synchronous", default="NORMAL", choices=("NORMAL", "FULL"), help="SQLite synchronous mode for qworker")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per mode; the table shows median, min and max (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float, default=300.0,
                        help="seconds one run may take before its processes are stopped (default: %(default)s)")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS, help="consumer log level (default: %(default)s)")
    parser.add_argument("--tmp-dir", type=Path, help="folder for the per-run data directories (default: the system temp folder)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one consumer in this process under cProfile instead of running the benchmark")
    parser.add_argument("--profile-top", type=positive_int, default=25, help="functions listed per profile table (default: %(default)s)")
    parser.add_argument("--profile-out", type=Path, help="write the merged profile to this file (pstats format)")
    return parser


def children_cpu_s() -> float:
    """Return the user plus system CPU seconds of every child process this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_benchmark(args: argparse.Namespace) -> None:
    tasks = make_tasks(args.tasks)
    file_tasks = tasks[: args.file_tasks]
    results = {
        "drain": ModeResults("qworker drain (segments)", args.processes),
        "end_to_end": ModeResults("qworker end to end (segments)", args.processes),
        "file": ModeResults("qworker drain (file per task)", args.processes),
        "bare": ModeResults("bare SQLite drain (batch 100)", args.processes),
    }
    runners: dict[str, Callable[[Path], RunTiming]] = {
        "drain": lambda data_dir: run_drain(args, data_dir, tasks, batch_rows=args.batch_rows),
        "end_to_end": lambda data_dir: run_end_to_end(args, data_dir, tasks, batch_rows=args.batch_rows),
        "file": lambda data_dir: run_drain(args, data_dir, file_tasks, batch_rows=0),
        "bare": lambda data_dir: run_bare(args, data_dir),
    }
    if not file_tasks:
        del runners["file"]

    # Modes take turns within each round, so drift in machine load spreads over all of them.
    for round_index in range(args.runs):
        for key, runner in runners.items():
            data_dir = Path(tempfile.mkdtemp(prefix="qworker-bench-", dir=args.tmp_dir))
            cpu_before = children_cpu_s()
            try:
                timing = runner(data_dir)
            finally:
                shutil.rmtree(data_dir, ignore_errors=True)
            timing = replace(timing, cpu_s=children_cpu_s() - cpu_before)
            results[key].runs.append(timing)
            print(f"run {round_index + 1}/{args.runs} {results[key].name}: {timing.tasks_per_s:,.0f} tasks/s"
                  f" ({timing.elapsed_s:.2f} s, from first claim {timing.active_s:.2f} s)", flush=True)

    direct_s = statistics.median(time_direct_loop(tasks) for _ in range(args.runs))

    print()
    print_table(list(results.values()))
    print_comparisons(args, results, direct_s)


def main() -> int:
    args = build_parser().parse_args()
    configure_logging(args.log_level)
    try:
        if args.profile:
            profile_consumer(args)
        else:
            print(f"{args.processes} processes, slots {args.slots}, prefetch {'adaptive' if args.prefetch is None else args.prefetch},"
                  f" segments of {args.batch_rows} rows or {args.batch_s} s, fsync {not args.no_fsync},"
                  f" synchronous {args.synchronous}, python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version},"
                  f" {os.cpu_count()} CPUs", flush=True)
            run_benchmark(args)
    except BenchmarkError as exc:
        print(f"throughput: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
