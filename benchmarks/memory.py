"""Measure the resident memory (RSS) of qworker's producer and consumer processes during a long streaming run.

One run on the embedded backend, in a fresh temporary data directory:

* the producer is ``qworker stream --stdin``. This script feeds its standard
  input one JSON record per task (``{"seed": N}``) at a steady ``--rate``
  from a thread, and closes it after ``--tasks`` records;
* the consumers are ``qworker work --processes P --slots S`` (not burst),
  that is, one pool parent and P spawned consumer processes, writing results
  as segment files. They start first, and feeding begins once they have
  finished their imports, so pushing and consuming overlap from the start;
* every ``--interval-s`` seconds the script reads VmRSS from
  /proc/<pid>/status for each of these processes (and for any other child of
  the pool parent, such as multiprocessing's resource tracker), and counts
  the done tasks in the queue file.

Once every task is done, the consumers get SIGTERM. The report gives these
figures per process:

* warm-up RSS: the first sample at which ``--warmup-share`` of the tasks are done;
* final RSS: the last sample taken while the process was alive, which for
  the consumers is the sample with every task done;
* max RSS, and the growth from warm-up to final in percent;
* the least-squares slope of RSS against tasks done after warm-up, which
  separates steady growth (a leak) from a plateau.

The chart of RSS over time goes to ``--out``.

    python benchmarks/memory.py --tasks 200000 --rate 2500 --workload row --csv memory.csv
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio

from qworker.arguments import positive_float, positive_int
from qworker.backends.sqlite import SqliteQueue
from qworker.layout import Layout
from qworker.log import LOG_LEVELS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import IDLE_CPU_SHARE, IDLE_SAMPLE_S, cpu_ticks  # noqa: E402 - a sibling file, found through the path entry above

QUEUE = "memory"
GROWTH_TARGET_PERCENT = 10.0
FEED_TICK_S = 0.05
STOP_WAIT_S = 30.0
KIB_PER_MIB = 1024

# Workloads this benchmark can run: the job's workload name and base config.
WORKLOADS = {
    "noop": ("noop", {}),  # returns None: each task stores a row holding only its task id
    "row": ("sleep", {"sleep_s": 0}),  # returns {"seed", "slept_s"}: one small row per task
}

PRODUCER = "producer"
POOL_PARENT = "pool parent"


class BenchmarkError(RuntimeError):
    """A run that timed out, or a process that exited early or with an error."""


# -- processes and samples ---------------------------------------------------


@dataclass(frozen=True)
class TrackedProcess:
    """A process whose RSS is sampled, with the label the report and chart use."""

    label: str
    pid: int


@dataclass(frozen=True)
class Sample:
    """One sampling round: seconds since the start, tasks fed and done, and RSS in KiB per process label.

    A process that has exited (or not yet started) has no entry in ``rss_kib``.
    """

    elapsed_s: float
    fed: int
    done: int
    rss_kib: dict[str, int]


@dataclass
class ProcessReport:
    """The RSS figures of one process, in KiB."""

    label: str
    pid: int
    warmup_kib: int
    final_kib: int
    max_kib: int
    max_after_warmup_kib: int
    slope_kib_per_100k: float | None  # least-squares slope of RSS against tasks done, after warm-up

    @property
    def growth_percent(self) -> float:
        return (self.final_kib - self.warmup_kib) / self.warmup_kib * 100

    @property
    def max_growth_percent(self) -> float:
        return (self.max_after_warmup_kib - self.warmup_kib) / self.warmup_kib * 100


def read_rss_kib(pid: int) -> int | None:
    """Return the VmRSS of ``pid`` in KiB, or None when the process is gone or a zombie (which has no VmRSS line)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def child_pids(parent_pid: int) -> list[int]:
    """Return the pids whose parent is ``parent_pid``, read from /proc/<pid>/stat (this kernel has no /proc/<pid>/task/<pid>/children)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = text[text.rindex(")") + 2 :].split()  # the command name in brackets may contain spaces
        if int(fields[1]) == parent_pid:
            found.append(int(entry.name))
    return sorted(found)


def command_line(pid: int) -> bytes:
    """Return the command line of ``pid`` with NUL separators, or b"" when the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return b""


class ProcessTracker:
    """The sampled processes: the pool parent, its children and the producer, with their labels.

    Spawned consumers are labelled in pid order: the first ``processes`` are
    "consumer 1..P" and any later ones "solo consumer 1..".
    """

    def __init__(self, pool_pid: int, processes: int) -> None:
        self.pool_pid = pool_pid
        self.processes = [TrackedProcess(POOL_PARENT, pool_pid)]
        self._expected_consumers = processes
        self._consumer_pids: list[int] = []

    def add(self, label: str, pid: int) -> None:
        self.processes.append(TrackedProcess(label, pid))

    def discover_children(self) -> None:
        known = {process.pid for process in self.processes}
        for pid in child_pids(self.pool_pid):
            if pid in known:
                continue
            command = command_line(pid)
            if b"spawn_main" in command:
                # NOTE: this relies on ConsumerPool starting the consumers of the
                # requested lane first and the solo-lane ones after them, in one loop.
                self._consumer_pids.append(pid)
                count = len(self._consumer_pids)
                extra = count - self._expected_consumers
                label = f"consumer {count}" if extra <= 0 else f"solo consumer {extra}"
            elif b"resource_tracker" in command:
                label = "resource tracker"
            else:
                label = f"pool child {pid}"
            self.add(label, pid)

    @property
    def consumer_pids(self) -> list[int]:
        return list(self._consumer_pids)

    def sample(self, elapsed_s: float, fed: int, done: int) -> Sample:
        self.discover_children()
        rss = {}
        for process in self.processes:
            value = read_rss_kib(process.pid)
            if value is not None:
                rss[process.label] = value
        return Sample(elapsed_s=elapsed_s, fed=fed, done=done, rss_kib=rss)


# -- feeding the producer ----------------------------------------------------


class Feeder(threading.Thread):
    """Thread that writes ``tasks`` JSON records to the producer's standard input at ``rate`` records per second, then closes it."""

    def __init__(self, stream: IO[bytes], tasks: int, rate: float) -> None:
        super().__init__(name="memory-feeder", daemon=True)
        self._stream = stream
        self._tasks = tasks
        self._rate = rate
        self._stop_requested = threading.Event()
        self.fed = 0
        self.error: str | None = None

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        started = time.monotonic()
        try:
            while self.fed < self._tasks and not self._stop_requested.is_set():
                due = min(self._tasks, int((time.monotonic() - started) * self._rate))
                if due > self.fed:
                    self._stream.write(b"".join(b'{"seed": %d}\n' % seed for seed in range(self.fed, due)))
                    self._stream.flush()
                    self.fed = due
                self._stop_requested.wait(FEED_TICK_S)
        except BrokenPipeError:
            self.error = f"the producer closed its standard input after {self.fed} records"
        finally:
            with contextlib.suppress(BrokenPipeError):
                self._stream.close()


# -- the run -----------------------------------------------------------------


@dataclass
class RunRecord:
    """The samples and the sampled processes (labels and pids) of one run."""

    tasks: int
    samples: list[Sample] = field(default_factory=list)
    processes: list[TrackedProcess] = field(default_factory=list)
    duration_s: float = 0.0


def write_job(path: Path, workload: str) -> None:
    name, config = WORKLOADS[workload]
    path.write_text(json.dumps({"queue": QUEUE, "workload": name, "config": config}), encoding="utf-8")


async def create_queue(db_path: Path, workload: str) -> None:
    """Create the queue before the consumers start, because they open an existing queue only."""
    async with SqliteQueue(db_path, QUEUE) as queue:
        await queue.set_metadata({"workload": WORKLOADS[workload][0]})


def qworker_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "qworker", *arguments]


def start_producer(data_dir: Path, job_path: Path) -> subprocess.Popen[bytes]:
    command = qworker_command("stream", "--job", str(job_path), "--stdin", "--data-dir", str(data_dir))
    return subprocess.Popen(command, stdin=subprocess.PIPE)


def start_consumers(args: argparse.Namespace, data_dir: Path) -> subprocess.Popen[bytes]:
    command = qworker_command(
        "work", "--queue", QUEUE, "--data-dir", str(data_dir),
        "--processes", str(args.processes), "--slots", str(args.slots),
        "--batch-rows", str(args.batch_rows), "--batch-s", str(args.batch_s),
        "--device", args.device, "--log-level", args.log_level,
    )
    return subprocess.Popen(command)


def count_done(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT COUNT(*) FROM tasks WHERE queue = ? AND state = 'done'", (QUEUE,)).fetchone()[0]


def run_streaming(args: argparse.Namespace, data_dir: Path) -> RunRecord:
    """Run the producer and the consumers at once and sample their RSS until every task is done."""
    layout = Layout(data_dir)
    job_path = data_dir / "job.json"
    write_job(job_path, args.workload)
    anyio.run(create_queue, layout.db_path, args.workload)

    record = RunRecord(tasks=args.tasks)
    consumers = start_consumers(args, data_dir)
    producer: subprocess.Popen[bytes] | None = None
    feeder: Feeder | None = None
    connection = sqlite3.connect(f"file:{layout.db_path}?mode=ro", uri=True)
    try:
        tracker = ProcessTracker(consumers.pid, args.processes)
        wait_until_consumers_idle(args, consumers, tracker)
        producer = start_producer(data_dir, job_path)
        assert producer.stdin is not None
        tracker.add(PRODUCER, producer.pid)
        feeder = Feeder(producer.stdin, args.tasks, args.rate)
        started = time.monotonic()
        feeder.start()
        sample_until_done(args, record, tracker, feeder, producer, consumers, connection, started)
        record.duration_s = time.monotonic() - started
        record.processes = list(tracker.processes)
    finally:
        connection.close()
        if feeder is not None:
            feeder.stop()
            feeder.join(STOP_WAIT_S)
        stop_process_tree(consumers)
        if producer is not None:
            stop_process_tree(producer)
    if consumers.returncode != 0:
        raise BenchmarkError(f"qworker work exited with code {consumers.returncode}: see its log lines above")
    if producer is not None and producer.returncode != 0:
        raise BenchmarkError(f"qworker stream exited with code {producer.returncode}: see its log lines above")
    return record


def wait_until_consumers_idle(args: argparse.Namespace, consumers: subprocess.Popen[bytes], tracker: ProcessTracker) -> None:
    """Wait until at least ``--processes`` consumers run and each uses under IDLE_CPU_SHARE of a core over one sample.

    Feeding starts only then, so the consumers' imports (a second or more)
    do not leave a backlog of pushed tasks at the start of the run.
    """
    deadline = time.monotonic() + args.timeout_s
    busy_ticks = IDLE_CPU_SHARE * IDLE_SAMPLE_S * os.sysconf("SC_CLK_TCK")
    previous: dict[int, int] = {}
    while time.monotonic() < deadline:
        if consumers.poll() is not None:
            raise BenchmarkError(f"qworker work exited with code {consumers.returncode} while starting up")
        tracker.discover_children()
        current = {pid: cpu_ticks(pid) for pid in tracker.consumer_pids}
        # A process seen for the first time counts as busy, because its CPU use is known only over a sample.
        busy = [pid for pid, ticks in current.items() if pid not in previous or ticks - previous[pid] > busy_ticks]
        if len(current) >= args.processes and not busy:
            return
        previous = current
        time.sleep(IDLE_SAMPLE_S)
    raise BenchmarkError(f"consumer processes had not finished starting up after {args.timeout_s:g} s")


def sample_until_done(
    args: argparse.Namespace,
    record: RunRecord,
    tracker: ProcessTracker,
    feeder: Feeder,
    producer: subprocess.Popen[bytes],
    consumers: subprocess.Popen[bytes],
    connection: sqlite3.Connection,
    started: float,
) -> None:
    """Take one sample every ``--interval-s`` seconds until every task is done and the producer has exited."""
    deadline = started + args.timeout_s
    next_sample = started
    while True:
        elapsed_s = time.monotonic() - started
        done = count_done(connection)
        sample = tracker.sample(elapsed_s, feeder.fed, done)
        record.samples.append(sample)
        if done >= args.tasks and producer.poll() is not None:
            return

        check_progress(args, feeder, producer, consumers, done, deadline)
        if len(record.samples) % args.progress_every == 0:
            print(f"{elapsed_s:6.0f} s: fed {feeder.fed:,}, done {done:,}, RSS MiB "
                  + ", ".join(f"{label} {kib / KIB_PER_MIB:.1f}" for label, kib in sample.rss_kib.items()), flush=True)
        next_sample += args.interval_s
        time.sleep(max(0.0, next_sample - time.monotonic()))


def check_progress(
    args: argparse.Namespace,
    feeder: Feeder,
    producer: subprocess.Popen[bytes],
    consumers: subprocess.Popen[bytes],
    done: int,
    deadline: float,
) -> None:
    if feeder.error is not None:
        raise BenchmarkError(feeder.error)
    producer_code = producer.poll()
    if producer_code is not None and producer_code != 0:
        raise BenchmarkError(f"qworker stream exited with code {producer_code} after {feeder.fed} records were fed")
    if producer_code is not None and feeder.fed < args.tasks:
        raise BenchmarkError(f"qworker stream exited after {feeder.fed} of {args.tasks} records were fed")
    if consumers.poll() is not None:
        raise BenchmarkError(f"qworker work exited with code {consumers.returncode} with {done} of {args.tasks} tasks done")
    if time.monotonic() > deadline:
        raise BenchmarkError(f"timed out: {done} of {args.tasks} tasks done after {args.timeout_s:g} s (raise --timeout-s)")


def stop_process_tree(process: subprocess.Popen[bytes]) -> None:
    """Stop a process this script started: SIGTERM, then SIGKILL to it and its children after STOP_WAIT_S each.

    ``qworker work`` forwards SIGTERM to its consumer processes, so the
    children are signalled directly only when the parent does not exit in time.
    """
    if process.poll() is None:
        children = child_pids(process.pid)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            print(f"memory: process {process.pid} did not exit {STOP_WAIT_S:g} s after SIGTERM, killing it", file=sys.stderr)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.wait(STOP_WAIT_S)
    if process.stdin is not None:
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()


# -- the report --------------------------------------------------------------


def warmup_index(samples: list[Sample], tasks: int, share: float) -> int:
    """Return the index of the first sample at which ``share`` of the tasks are done."""
    threshold = tasks * share
    for index, sample in enumerate(samples):
        if sample.done >= threshold:
            return index
    raise BenchmarkError(f"no sample had {threshold:.0f} tasks done: the run ended before warm-up")


def summarize(record: RunRecord, share: float) -> list[ProcessReport]:
    """Compute the RSS figures of every process that was alive at the warm-up sample."""
    start = warmup_index(record.samples, record.tasks, share)
    reports = []
    for process in record.processes:
        series = [(sample.done, sample.rss_kib[process.label]) for sample in record.samples if process.label in sample.rss_kib]
        after = [(sample.done, sample.rss_kib[process.label]) for sample in record.samples[start:]
                 if process.label in sample.rss_kib]
        if not after:
            print(f"memory: {process.label} (pid {process.pid}) exited before warm-up, left out of the report", file=sys.stderr)
            continue
        reports.append(ProcessReport(
            label=process.label,
            pid=process.pid,
            warmup_kib=after[0][1],
            final_kib=after[-1][1],
            max_kib=max(rss for _, rss in series),
            max_after_warmup_kib=max(rss for _, rss in after),
            slope_kib_per_100k=slope_per_100k_tasks(after),
        ))
    return reports


def slope_per_100k_tasks(points: list[tuple[int, int]]) -> float | None:
    """Return the least-squares slope of RSS (KiB) against tasks done, per 100,000 tasks, or None when done never changed."""
    done = [float(point[0]) for point in points]
    if len(set(done)) < 2:
        return None
    slope, _ = statistics.linear_regression(done, [float(point[1]) for point in points])
    return slope * 100_000


def print_report(args: argparse.Namespace, record: RunRecord, reports: list[ProcessReport]) -> None:
    start = record.samples[warmup_index(record.samples, record.tasks, args.warmup_share)]
    print(f"\n{record.tasks:,} tasks in {record.duration_s:.0f} s ({record.tasks / record.duration_s:,.0f} tasks/s),"
          f" {len(record.samples)} samples; warm-up sample at {start.elapsed_s:.0f} s with {start.done:,} tasks done")
    header = (f"{'process':<18} {'pid':>7} {'warm-up MiB':>11} {'final MiB':>9} {'max MiB':>8} {'growth %':>8}"
              f" {'max growth %':>12} {'MiB/100k tasks':>14} {'target':>6}")
    print(header)
    print("-" * len(header))
    for report in reports:
        slope = "-" if report.slope_kib_per_100k is None else f"{report.slope_kib_per_100k / KIB_PER_MIB:.2f}"
        verdict = "met" if report.growth_percent < GROWTH_TARGET_PERCENT else "missed"
        print(f"{report.label:<18} {report.pid:>7} {report.warmup_kib / KIB_PER_MIB:>11.1f} {report.final_kib / KIB_PER_MIB:>9.1f}"
              f" {report.max_kib / KIB_PER_MIB:>8.1f} {report.growth_percent:>8.1f} {report.max_growth_percent:>12.1f}"
              f" {slope:>14} {verdict:>6}")
    print(f"growth %: (final - warm-up) / warm-up; max growth %: (max after warm-up - warm-up) / warm-up;"
          f" target: growth under {GROWTH_TARGET_PERCENT:g}%")


def write_csv(path: Path, record: RunRecord) -> None:
    """Write one row per sample and process: elapsed_s, tasks_fed, tasks_done, process, pid, rss_kib."""
    pids = {process.label: process.pid for process in record.processes}
    lines = ["elapsed_s,tasks_fed,tasks_done,process,pid,rss_kib"]
    for sample in record.samples:
        for label, rss in sample.rss_kib.items():
            lines.append(f"{sample.elapsed_s:.3f},{sample.fed},{sample.done},{label},{pids[label]},{rss}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(path: Path, args: argparse.Namespace, record: RunRecord) -> None:
    """Draw RSS over time per process (top) and tasks fed and done (bottom), with the warm-up sample marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    warmup_s = record.samples[warmup_index(record.samples, record.tasks, args.warmup_share)].elapsed_s
    figure, (rss_axes, task_axes) = plt.subplots(2, 1, figsize=(12, 7), sharex=True, height_ratios=(3, 1))
    for process in record.processes:
        points = [(sample.elapsed_s, sample.rss_kib[process.label] / KIB_PER_MIB)
                  for sample in record.samples if process.label in sample.rss_kib]
        rss_axes.plot([point[0] for point in points], [point[1] for point in points],
                      label=f"{process.label} (pid {process.pid})")
    for axes in (rss_axes, task_axes):
        axes.axvline(warmup_s, color="grey", linestyle="--", linewidth=1)
        axes.grid(True, alpha=0.3)
    rss_axes.set_ylabel("RSS (MiB)")
    rss_axes.set_ylim(bottom=0)
    rss_axes.set_title(f"RSS per process: {record.tasks:,} tasks streamed at {args.rate:g}/s,"
                       f" {args.processes} consumers x {args.slots} slots, workload {args.workload}")
    rss_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")

    elapsed = [sample.elapsed_s for sample in record.samples]
    task_axes.plot(elapsed, [sample.fed for sample in record.samples], label="fed to the producer")
    task_axes.plot(elapsed, [sample.done for sample in record.samples], label="done")
    task_axes.set_xlabel("time since the producer started (s); dashed line: warm-up sample")
    task_axes.set_ylabel("tasks")
    task_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")

    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- command line ------------------------------------------------------------


def share(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"invalid share {text!r}: use a number between 0 and 1")
    return value


def load_average() -> str:
    """Describe the 1-minute load average, so a report shows whether other work shared the CPUs."""
    return f"load average {os.getloadavg()[0]:.2f} over 1 min"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Sample the RSS of qworker's producer and consumers while tasks stream through the embedded queue.",
    )
    parser.add_argument("--tasks", type=positive_int, default=200_000, help="tasks to stream (default: %(default)s)")
    parser.add_argument("--rate", type=positive_float, default=2500.0,
                        help="records per second fed to the producer (default: %(default)s)")
    parser.add_argument("--processes", type=positive_int, default=2, help="consumer processes (default: %(default)s)")
    parser.add_argument("--slots", type=positive_int, default=4, help="tasks run at once per process (default: %(default)s)")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="noop",
                        help="noop: the handler returns None; row: the sleep workload with sleep_s 0, which returns"
                             " one row of two values (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="device the consumers resolve, passed to qworker work: auto, cpu (default: %(default)s)")
    parser.add_argument("--batch-rows", type=positive_int, default=1000, help="rows per result segment (default: %(default)s)")
    parser.add_argument("--batch-s", type=positive_float, default=0.2,
                        help="seconds before a partial segment is written (default: %(default)s)")
    parser.add_argument("--interval-s", type=positive_float, default=1.0, help="seconds between samples (default: %(default)s)")
    parser.add_argument("--warmup-share", type=share, default=0.1,
                        help="share of the tasks done at the warm-up sample (default: %(default)s)")
    parser.add_argument("--timeout-s", type=positive_float,
                        help="seconds the run may take before it is stopped (default: twice tasks / rate, plus 120)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "docs" / "img" / "memory.png",
                        help="chart file (PNG) (default: docs/img/memory.png)")
    parser.add_argument("--csv", type=Path, help="write every sample to this CSV file")
    parser.add_argument("--progress-every", type=positive_int, default=10, help="print a progress line every this many samples")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS, help="consumer log level (default: %(default)s)")
    parser.add_argument("--tmp-dir", type=Path, help="folder for the temporary data directory (default: the system temp folder)")
    return parser


@contextlib.contextmanager
def temporary_data_dir(parent: Path | None) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="qworker-memory-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> int:
    args = build_parser().parse_args()
    if args.timeout_s is None:
        args.timeout_s = 2 * args.tasks / args.rate + 120
    if not Path("/proc/self/status").exists():
        print("memory: error: /proc/self/status not found: this benchmark reads RSS from Linux's /proc", file=sys.stderr)
        return 1
    print(f"{args.tasks:,} tasks at {args.rate:g}/s, workload {args.workload}, {args.processes} processes x {args.slots} slots,"
          f" segments of {args.batch_rows} rows or {args.batch_s:g} s, python {sys.version.split()[0]},"
          f" SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, {load_average()}", flush=True)
    try:
        with temporary_data_dir(args.tmp_dir) as data_dir:
            record = run_streaming(args, data_dir)
        reports = summarize(record, args.warmup_share)
    except BenchmarkError as exc:
        print(f"memory: error: {exc}", file=sys.stderr)
        return 1

    print(f"at the end: {load_average()}")
    print_report(args, record, reports)
    if args.csv is not None:
        write_csv(args.csv, record)
        print(f"wrote {len(record.samples)} samples to {args.csv}")
    plot(args.out, args, record)
    print(f"wrote the chart to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
