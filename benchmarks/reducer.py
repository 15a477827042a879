"""Time qworker's reducer on many per-task result files, beside DuckDB's read_parquet.

The script writes ``--files`` result files of ``--rows`` rows each, in the
layout of qworker's file sink: ``<task_id>.parquet``, one task per file. Each
file has a ``task_id`` column, a string group key ``bucket`` and three numeric
columns: ``payoff`` float64, ``hits`` int64 and ``weight`` float64. The script
then times each of these modes ``--runs`` times, taking turns within each round:

* qworker full: ``Reducer.run()`` with a fresh state over every file, so the
  time includes creating the state database and recording every file and task;
* DuckDB: ``read_parquet`` over the same files with DuckDB's default threads,
  computing the same aggregate (per ``bucket``: the three sums, ``count(*)``
  and ``count(DISTINCT task_id)``). The two aggregates must be equal, or the
  script exits with status 1;
* qworker incremental: ``Reducer.run()`` on a state that has folded every
  file, after K new files were added (K from ``--new-files``). The time per
  new file shows whether a run costs in proportion to the new files only.

The files are written just before the runs (or reused from ``--keep``), so
they are normally in the page cache and the figures measure CPU work, not disk
reads. The ``cpu s`` column is the user plus system time of this process, all
threads included, which shows how much of a slow run was waiting for a CPU.

    python benchmarks/reducer.py --files 10000 --rows 1000 --runs 3
    python benchmarks/reducer.py --files 1000 --profile
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from qworker.arguments import positive_int
from qworker.reducer import Reducer
from qworker.results import REDUCER_DIR, rows_to_table, task_result_path, write_parquet_atomic
from qworker.task import derive_task_id
from qworker.workloads.base import Aggregation

AGGREGATION = Aggregation(keys=("bucket",), sums=("payoff", "hits", "weight"))
MANIFEST = "benchmark.json"
# Relative tolerance for float sums, which DuckDB and qworker add up in different orders.
FLOAT_TOLERANCE = 1e-9


class CheckFailed(RuntimeError):
    """A failed check: qworker's aggregate differs from DuckDB's, or an incremental run folded the wrong number of files."""


@dataclass(frozen=True)
class Timing:
    """Wall-clock and CPU seconds of one run. CPU is user plus system time of all threads of this process."""

    wall_s: float
    cpu_s: float


@dataclass
class Mode:
    """Timings of one measured mode, one per run."""

    name: str
    files: int
    runs: list[Timing] = field(default_factory=list)

    @property
    def times(self) -> list[float]:
        return [run.wall_s for run in self.runs]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(run.cpu_s for run in self.runs)


class Stopwatch:
    """Measures the wall-clock and CPU time of a block. After the block, ``timing`` contains them."""

    def __init__(self) -> None:
        self.timing = Timing(wall_s=0.0, cpu_s=0.0)
        self._wall = 0.0
        self._cpu = 0.0

    def __enter__(self) -> Stopwatch:
        self._wall = time.perf_counter()
        self._cpu = process_cpu_s()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.timing = Timing(wall_s=time.perf_counter() - self._wall, cpu_s=process_cpu_s() - self._cpu)


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Folders:
    """The results folder the reducer and DuckDB read, and the folder that contains the files added later."""

    results: Path
    new: Path
    # A copy of the reducer state after a full reduce of ``results``.
    saved_state: Path


# -- result files ------------------------------------------------------------


def task_id_for(seed: int) -> str:
    return derive_task_id(seed, json.dumps({"benchmark": "reducer"}))


def result_table(seed: int, rows: int, buckets: int) -> pa.Table:
    """Return the rows a handler could return for task ``seed``: random values, seeded for repeatability."""
    uniform = pc.random(rows, initializer=seed)
    names = pa.array([f"bucket-{index:02d}" for index in range(buckets)])
    bucket_index = pc.cast(pc.floor(pc.multiply(uniform, buckets)), pa.int32())
    return pa.table({
        "bucket": pc.take(names, bucket_index),
        "payoff": pc.random(rows, initializer=seed + 2**32),
        "hits": pc.cast(pc.floor(pc.multiply(uniform, 1000)), pa.int64()),
        "weight": pc.multiply(uniform, 3.0),
    })


def write_results(folder: Path, seeds: range, rows: int, buckets: int) -> None:
    """Write one result file per seed, as the file sink does (without fsync, which only slows the set-up)."""
    for seed in seeds:
        task_id = task_id_for(seed)
        table = rows_to_table(task_id, result_table(seed, rows, buckets))
        write_parquet_atomic(table, task_result_path(folder, task_id), fsync=False)


def prepare_folders(root: Path, args: argparse.Namespace) -> Folders:
    """Write the result files under ``root``, or reuse them when ``root`` contains files for the same arguments."""
    folders = Folders(results=root / "results", new=root / "new", saved_state=root / "saved-state")
    manifest = {"files": args.files, "rows": args.rows, "buckets": args.buckets, "new_files": max(args.new_files)}
    manifest_path = root / MANIFEST
    if manifest_path.is_file() and json.loads(manifest_path.read_text()) == manifest:
        print(f"reusing the result files in {root}", flush=True)
        return folders

    for folder in (folders.results, folders.new, folders.saved_state):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    started = time.perf_counter()
    write_results(folders.results, range(args.files), args.rows, args.buckets)
    write_results(folders.new, range(args.files, args.files + max(args.new_files)), args.rows, args.buckets)
    manifest_path.write_text(json.dumps(manifest))
    print(f"wrote {args.files + max(args.new_files)} result files in {time.perf_counter() - started:.1f} s", flush=True)
    return folders


# -- measured modes ----------------------------------------------------------


def run_qworker_full(folders: Folders) -> tuple[Timing, pa.Table]:
    shutil.rmtree(folders.results / REDUCER_DIR, ignore_errors=True)
    with Stopwatch() as stopwatch:
        report = Reducer(folders.results, AGGREGATION).run()
    return stopwatch.timing, report.aggregate


def duckdb_query(folder: Path) -> str:
    pattern = str(folder / "*.parquet").replace("'", "''")
    return (
        "SELECT bucket, sum(payoff) AS payoff, sum(hits) AS hits, sum(weight) AS weight, "
        "count(*) AS rows, count(DISTINCT task_id) AS tasks "
        f"FROM read_parquet('{pattern}') GROUP BY bucket ORDER BY bucket"
    )


def fetch_arrow(relation: duckdb.DuckDBPyRelation) -> pa.Table:
    # DuckDB 2.0 documents to_arrow_table() on relations and keeps fetch_arrow_table()
    # as a deprecated alias. Older releases may have only fetch_arrow_table().
    if hasattr(relation, "to_arrow_table"):
        return relation.to_arrow_table()
    return relation.fetch_arrow_table()


def run_duckdb(folders: Folders) -> tuple[Timing, pa.Table]:
    query = duckdb_query(folders.results)
    with duckdb.connect() as connection, Stopwatch() as stopwatch:
        result = fetch_arrow(connection.sql(query))
    return stopwatch.timing, result


def save_full_state(folders: Folders) -> None:
    """Fold every file in ``results`` and keep a copy of that state for the incremental runs."""
    shutil.rmtree(folders.results / REDUCER_DIR, ignore_errors=True)
    Reducer(folders.results, AGGREGATION).run()
    shutil.rmtree(folders.saved_state, ignore_errors=True)
    shutil.copytree(folders.results / REDUCER_DIR, folders.saved_state)


def run_qworker_incremental(folders: Folders, new_files: int) -> Timing:
    """Restore the saved state, move ``new_files`` files into the results folder and time one run."""
    shutil.rmtree(folders.results / REDUCER_DIR, ignore_errors=True)
    shutil.copytree(folders.saved_state, folders.results / REDUCER_DIR)
    moved = sorted(folders.new.iterdir())[:new_files]
    for path in moved:
        os.replace(path, folders.results / path.name)

    try:
        with Stopwatch() as stopwatch:
            report = Reducer(folders.results, AGGREGATION).run()
    finally:
        for path in moved:
            os.replace(folders.results / path.name, path)

    if report.files_folded != new_files:
        raise CheckFailed(f"incremental run folded {report.files_folded} files, expected {new_files}")
    return stopwatch.timing


# -- checks and report -------------------------------------------------------


def check_equal(qworker: pa.Table, duck: pa.Table) -> None:
    """Raise :class:`CheckFailed` unless both aggregates have the same groups, counts and sums."""
    ours = {row.pop("bucket"): row for row in qworker.to_pylist()}
    theirs = {row.pop("bucket"): row for row in duck.to_pylist()}
    if set(ours) != set(theirs):
        raise CheckFailed(f"groups differ: qworker {sorted(ours)}, DuckDB {sorted(theirs)}")

    for bucket, row in ours.items():
        for column, value in row.items():
            expected = theirs[bucket][column]
            if isinstance(value, float):
                equal = math.isclose(value, expected, rel_tol=FLOAT_TOLERANCE)
            else:
                equal = value == expected
            if not equal:
                raise CheckFailed(f"group {bucket!r} column {column!r}: qworker {value!r}, DuckDB {expected!r}")


def print_table(modes: list[Mode], duck: Mode) -> None:
    header = (f"{'mode':<32} {'files':>6} {'median s':>9} {'min s':>8} {'max s':>8} {'ms/file':>8} {'/ DuckDB':>9}"
              f" {'cpu s':>7}")
    print(header)
    print("-" * len(header))
    for mode in modes:
        per_file_ms = mode.median_s / mode.files * 1000
        print(
            f"{mode.name:<32} {mode.files:>6} {mode.median_s:>9.3f} {min(mode.times):>8.3f} {max(mode.times):>8.3f}"
            f" {per_file_ms:>8.3f} {mode.median_s / duck.median_s:>9.2f} {mode.median_cpu_s:>7.3f}"
        )
    print("ms/file: median / files (new files for the incremental modes); / DuckDB: median / DuckDB's median.")
    print("cpu s: user + system CPU seconds of this process, all threads (median).")


def print_versions() -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"{now}; {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}); Linux {platform.release()};"
        f" python {platform.python_version()}, pyarrow {pa.__version__}, duckdb {duckdb.__version__},"
        f" SQLite {sqlite3.sqlite_version}",
        flush=True,
    )


# -- command line ------------------------------------------------------------


def positive_ints(text: str) -> list[int]:
    return [positive_int(part) for part in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Time qworker's reducer (full and incremental) beside DuckDB's read_parquet.")
    parser.add_argument("--files", type=positive_int, default=10000, help="result files in the full reduce (default: %(default)s)")
    parser.add_argument("--rows", type=positive_int, default=1000, help="rows per result file (default: %(default)s)")
    parser.add_argument("--buckets", type=positive_int, default=16, help="distinct values of the group key (default: %(default)s)")
    parser.add_argument("--new-files", type=positive_ints, default=[100, 1000],
                        help="comma-separated numbers of files added before the incremental runs (default: 100,1000)")
    parser.add_argument("--runs", type=positive_int, default=3, help="runs per mode; the table shows median, min and max (default: %(default)s)")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="write the files to DIR and keep them; a later run with the same arguments reuses them")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, print the CPU time of each phase of one full qworker reduce and its pyinstrument profile")
    return parser


def run_benchmark(args: argparse.Namespace, folders: Folders) -> None:
    full = Mode("qworker full", args.files)
    duck = Mode("DuckDB read_parquet", args.files)
    incremental = {count: Mode(f"qworker incremental (+{count})", count) for count in args.new_files}

    save_full_state(folders)
    # Modes take turns within each round, so drift in machine load spreads over all of them.
    for round_index in range(args.runs):
        timing, ours = run_qworker_full(folders)
        full.runs.append(timing)
        timing, theirs = run_duckdb(folders)
        duck.runs.append(timing)
        check_equal(ours, theirs)
        for count, mode in incremental.items():
            mode.runs.append(run_qworker_incremental(folders, count))

        timed = ", ".join(f"{mode.name} {mode.times[-1]:.3f} s" for mode in (full, duck, *incremental.values()))
        print(f"run {round_index + 1}/{args.runs}: {timed}", flush=True)

    print()
    print_table([full, duck, *incremental.values()], duck)
    print(f"qworker full / DuckDB: {full.median_s / duck.median_s:.2f}x; aggregates equal in every run")


# Private Reducer methods whose thread CPU time --profile adds up, and what each does.
PROFILED_PHASES = {
    "_read_result_file": "read and check one file (read threads)",
    "_group_job": "group a job's rows by file, task and keys (read threads)",
    "_fold_batch": "fold a batch in its transaction (calling thread)",
    "_list_unfolded": "list the folder and look names up (calling thread)",
}


@contextlib.contextmanager
def phase_cpu_totals() -> Iterator[dict[str, float]]:
    """Wrap the methods in PROFILED_PHASES so that each adds its thread CPU seconds to the yielded totals."""
    totals = dict.fromkeys(PROFILED_PHASES, 0.0)
    lock = threading.Lock()
    originals = {name: getattr(Reducer, name) for name in PROFILED_PHASES}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                with lock:
                    totals[name] += time.thread_time() - started
        return wrapper

    for name, method in originals.items():
        setattr(Reducer, name, timed(name, method))
    try:
        yield totals
    finally:
        for name, method in originals.items():
            setattr(Reducer, name, method)


def profile_full_reduce(folders: Folders) -> None:
    """Print the thread CPU time of each phase of one full reduce, then pyinstrument's profile of the calling thread.

    pyinstrument samples only the thread it starts in, so its profile shows
    the calling thread waiting for the read threads, not their work.
    """
    from pyinstrument import Profiler

    shutil.rmtree(folders.results / REDUCER_DIR, ignore_errors=True)
    with phase_cpu_totals() as totals, Stopwatch() as stopwatch:
        report = Reducer(folders.results, AGGREGATION).run()
    print(f"full reduce of {report.files_folded} files: {stopwatch.timing.wall_s:.3f} s wall, {stopwatch.timing.cpu_s:.3f} s CPU")
    for name, seconds in totals.items():
        print(f"  {PROFILED_PHASES[name]:<58} {seconds:7.3f} s CPU  {seconds / report.files_folded * 1e6:7.1f} us/file")
    print("  (the group phase runs inside _read_job, so the read phase excludes it)")

    shutil.rmtree(folders.results / REDUCER_DIR, ignore_errors=True)
    profiler = Profiler(interval=0.0005)
    with profiler:
        Reducer(folders.results, AGGREGATION).run()
    print(profiler.output_text(unicode=False, color=False, show_all=False))


def with_folders(args: argparse.Namespace, action: Callable[[Folders], None]) -> None:
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        action(prepare_folders(args.keep, args))
        return

    root = Path(tempfile.mkdtemp(prefix="qworker-reducer-bench-"))
    try:
        action(prepare_folders(root, args))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    args = build_parser().parse_args()
    print_versions()
    print(f"{args.files} files of {args.rows} rows, {args.buckets} buckets", flush=True)
    try:
        if args.profile:
            with_folders(args, profile_full_reduce)
        else:
            print(f"{args.runs} runs, new files {args.new_files}", flush=True)
            with_folders(args, lambda folders: run_benchmark(args, folders))
    except CheckFailed as exc:
        print(f"reducer benchmark: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
