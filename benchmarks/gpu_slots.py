"""Measure Monte Carlo throughput with 1, 2 and 4 slots on one device, and the out-of-memory lane at 4 slots.

Part 1 runs ``--tasks`` Monte Carlo tasks (geometric Asian call, ``--paths``
paths of ``--steps`` steps each) through one in-process consumer with 1, 2
and 4 slots, and prints tasks/s, the speed-up over one slot and the peak
device memory. On CUDA the peak is ``torch.cuda.max_memory_allocated``. On the
CPU it is the peak resident memory of this process above its level before the
run, sampled every 10 ms.

Part 2 sizes each task at ``--task-share`` of the device memory, a quarter
plus a margin, so four at once do not fit. It runs ``--oom-tasks`` of them
with 4 slots beside a one-slot consumer of the solo lane, as ``qworker work``
does. It prints the OOM moves and checks that every task finished, the moved
ones on the solo lane. It runs twice: without memory estimates, where tasks
run out of memory and move, and with ``gpu_memory_gb`` estimates, where the
consumer's memory gate admits only what fits.

On CUDA the memory is the GPU's free memory and the errors are torch's own.
Without CUDA the script says so and stands in for the GPU: the handler
reserves each task's bytes from a simulated device of ``--cpu-device-gb``
GiB and raises ``torch.OutOfMemoryError`` when a reservation does not fit,
as the CUDA allocator does. CPU throughput figures say nothing about a GPU.

    python benchmarks/gpu_slots.py                 # CUDA when torch sees a GPU, else the CPU stand-in
    python benchmarks/gpu_slots.py --tasks 48 --paths 400000
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import anyio
import pyarrow.parquet as pq
import torch

from qworker.backends.sqlite import SqliteQueue
from qworker.consumer import Consumer, ConsumerSettings
from qworker.context import TaskContext, select_device
from qworker.gpu import GIB, make_memory_gate
from qworker.log import configure_logging
from qworker.results import iter_result_files
from qworker.task import SOLO_LANE, Task
from qworker.workloads import Workload
from qworker.workloads import montecarlo

QUEUE = "gpu-slots"
SLOT_COUNTS = (1, 2, 4)
RSS_SAMPLE_S = 0.01
BYTES_PER_ELEMENT = 8  # the chunk's float64 normal draws dominate a task's peak memory


@dataclass
class RunFigures:
    label: str
    slots: int
    tasks: int
    elapsed_s: float
    peak_memory_bytes: int
    done: int = 0
    dead: int = 0
    oom_moves: int = 0
    finished_on_solo: int = 0

    @property
    def tasks_per_s(self) -> float:
        return self.tasks / self.elapsed_s if self.elapsed_s > 0 else 0.0


class SimulatedDeviceMemory:
    """A device memory of fixed size for the CPU stand-in: reservations that do not fit raise torch's OOM error."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.in_use_bytes = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> None:
        with self._lock:
            if self.in_use_bytes + size > self.capacity_bytes:
                free = self.capacity_bytes - self.in_use_bytes
                raise torch.OutOfMemoryError(
                    f"simulated device out of memory: tried to allocate {size / GIB:.2f} GiB with {free / GIB:.2f} GiB"
                    f" free of {self.capacity_bytes / GIB:.2f} GiB"
                )
            self.in_use_bytes += size

    def release(self, size: int) -> None:
        with self._lock:
            self.in_use_bytes -= size


class PeakRss:
    """Samples this process's resident memory in a thread and keeps the peak above the level at start."""

    def __init__(self) -> None:
        self.baseline = _rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, _rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def main() -> int:
    args = parse_args()
    configure_logging("WARNING")
    device = select_device(args.device)
    on_cuda = device.startswith("cuda")
    if args.paths is None:
        args.paths = 8_000_000 if on_cuda else 200_000
    print_header(device, on_cuda, args)

    capacity = _device_capacity(device) if on_cuda else int(args.cpu_device_gb * GIB)
    simulated = None if on_cuda else SimulatedDeviceMemory(capacity)

    scan = [run_slots(args, device, slots, simulated) for slots in SLOT_COUNTS]
    print_scan(scan)

    chunk_elements = int(capacity * args.task_share / BYTES_PER_ELEMENT)
    without_estimates = run_oom_lane(args, device, chunk_elements, simulated, with_estimates=False)
    with_estimates = run_oom_lane(args, device, chunk_elements, simulated, with_estimates=True)
    ok = print_oom(args, capacity, chunk_elements, [without_estimates, with_estimates])

    if args.json:
        figures = {"device": device, "scan": [vars(run) for run in scan],
                   "oom": [vars(without_estimates), vars(with_estimates)]}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--tasks", type=int, default=24, help="tasks per slot count (default: 24)")
    parser.add_argument("--paths", type=int,
                        help="paths per task in the slot scan (default: 8,000,000 on CUDA, 200,000 on the CPU)")
    parser.add_argument("--steps", type=int, default=64, help="time steps per path (default: 64)")
    parser.add_argument("--oom-tasks", type=int, default=8, help="tasks in each out-of-memory run (default: 8)")
    parser.add_argument("--task-share", type=float, default=0.28,
                        help="share of device memory one task uses in the out-of-memory runs (default: 0.28)")
    parser.add_argument("--cpu-device-gb", type=float, default=1.0,
                        help="size of the simulated device without CUDA, in GiB (default: 1.0)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    if not 0 < args.task_share < 1:
        parser.error(f"invalid --task-share {args.task_share}: use a share between 0 and 1, such as 0.28")
    return args


def print_header(device: str, on_cuda: bool, args: argparse.Namespace) -> None:
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, device {device}")
    if on_cuda:
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        print(f"no CUDA device: the CPU stands in, with a simulated device of {args.cpu_device_gb} GiB for part 2;"
              " throughput figures are CPU figures")


def _device_capacity(device: str) -> int:
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return free


# -- part 1: slots -----------------------------------------------------------


def run_slots(args: argparse.Namespace, device: str, slots: int, simulated: SimulatedDeviceMemory | None) -> RunFigures:
    config = _contract(args.paths, args.steps, montecarlo._CHUNK_ELEMENTS)
    tasks = [Task.create(seed, config) for seed in range(args.tasks)]
    handler = _handler(simulated)

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with PeakRss() as rss:
        figures = anyio.run(_run_job, tasks, handler, device, slots, None, f"{slots} slots")
    figures.peak_memory_bytes = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else rss.growth
    return figures


def print_scan(scan: list[RunFigures]) -> None:
    base = scan[0].tasks_per_s
    print("\npart 1: slots on one device")
    print("| slots | tasks | seconds | tasks/s | speed-up | peak memory MiB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for run in scan:
        print(f"| {run.slots} | {run.tasks} | {run.elapsed_s:.2f} | {run.tasks_per_s:.2f} | {run.tasks_per_s / base:.2f}x"
              f" | {run.peak_memory_bytes / 2**20:,.0f} |")


# -- part 2: out-of-memory lane ------------------------------------------------


def run_oom_lane(
    args: argparse.Namespace, device: str, chunk_elements: int, simulated: SimulatedDeviceMemory | None,
    *, with_estimates: bool,
) -> RunFigures:
    config = _contract(max(2, chunk_elements // args.steps), args.steps, chunk_elements)
    if with_estimates:
        config["gpu_memory_gb"] = chunk_elements * BYTES_PER_ELEMENT * 1.05 / GIB
    tasks = [Task.create(seed, config) for seed in range(args.oom_tasks)]
    limit_gb = simulated.capacity_bytes * 0.9 / GIB if simulated is not None else None

    label = "4 slots, with estimates" if with_estimates else "4 slots, no estimates"
    return anyio.run(_run_job, tasks, _handler(simulated), device, 4, limit_gb, label)


def print_oom(args: argparse.Namespace, capacity: int, chunk_elements: int, runs: list[RunFigures]) -> bool:
    print(f"\npart 2: out-of-memory lane, each task {chunk_elements * BYTES_PER_ELEMENT / GIB:.2f} GiB"
          f" of {capacity / GIB:.2f} GiB ({args.task_share:.0%})")
    print("| run | tasks | done | dead | OOM moves | finished on solo | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        print(f"| {run.label} | {run.tasks} | {run.done} | {run.dead} | {run.oom_moves} | {run.finished_on_solo}"
              f" | {run.elapsed_s:.2f} |")

    problems = [f"{run.label}: {run.done} of {run.tasks} done" for run in runs if run.done != run.tasks]
    problems += [f"{run.label}: {run.finished_on_solo} finished on solo, {run.oom_moves} moved"
                 for run in runs if run.finished_on_solo != run.oom_moves]
    for problem in problems:
        print(f"FAILED {problem}")
    return not problems


# -- running a job -------------------------------------------------------------


def _contract(paths: int, steps: int, chunk_elements: int) -> dict[str, Any]:
    contract = next(c for c in montecarlo.DEFAULT_CONTRACTS if c["contract"] == "asian-atm")
    return {**contract, "paths": paths, "steps": steps, "chunk_elements": chunk_elements}


def _handler(simulated: SimulatedDeviceMemory | None) -> Callable[[Task, TaskContext], dict[str, Any]]:
    """Return the Monte Carlo handler with the task's lane added to its row.

    With a simulated device, the handler also reserves the task's bytes there while it runs.
    """
    def handle(task: Task, ctx: TaskContext) -> dict[str, Any]:
        if simulated is None:
            return {**montecarlo.handle(task, ctx), "lane": task.lane}

        size = _task_bytes(task.config)
        simulated.reserve(size)
        try:
            row = montecarlo.handle(task, ctx)
        finally:
            simulated.release(size)
        return {**row, "lane": task.lane}

    return handle


def _task_bytes(config: dict[str, Any]) -> int:
    steps = int(config["steps"])
    chunk_paths = min(int(config["paths"]), int(config["chunk_elements"]) // steps)
    return chunk_paths * steps * BYTES_PER_ELEMENT


async def _run_job(
    tasks: list[Task], handler: Callable, device: str, slots: int, limit_gb: float | None, label: str
) -> RunFigures:
    folder = Path(tempfile.mkdtemp(prefix="qworker-gpu-slots-"))
    try:
        async with SqliteQueue(folder / "queue.db", QUEUE) as queue:
            await queue.put(tasks)
            workload = Workload("montecarlo-bench", handler, aggregation=montecarlo.AGGREGATION)
            settings = ConsumerSettings(slots=slots, burst=True, device=device, gpu_memory_limit_gb=limit_gb,
                                        poll_max_s=0.05, scratch_root=folder / "scratch")
            gate = make_memory_gate(device, limit_gb)  # shared, as in a `qworker work` process
            main_consumer = Consumer(queue, workload, folder / "results", settings, memory_gate=gate)
            solo = Consumer(queue, workload, folder / "results", settings.for_solo_lane(), memory_gate=gate)
            solo.follow_in_burst(main_consumer)

            started = time.perf_counter()
            async with anyio.create_task_group() as group:
                group.start_soon(main_consumer.run)
                group.start_soon(solo.run)
            elapsed_s = time.perf_counter() - started
            stats = await queue.stats()

        return RunFigures(
            label=label, slots=slots, tasks=len(tasks), elapsed_s=elapsed_s, peak_memory_bytes=0,
            done=stats.done, dead=stats.dead, oom_moves=stats.oom_moves,
            finished_on_solo=_rows_on_lane(folder / "results", SOLO_LANE),
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)



def _rows_on_lane(results: Path, lane: str) -> int:
    count = 0
    for path in iter_result_files(results):
        table = pq.read_table(path)
        if "lane" in table.column_names:
            count += sum(1 for value in table.column("lane").to_pylist() if value == lane)
    return count


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
