"""The out-of-memory lane and GPU memory admission, with real consumer processes where a process is needed.

These machines have no GPU, so the handlers raise torch's out-of-memory error
themselves, and admission runs with an explicit memory limit in place of the
free memory a CUDA device would report.
"""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pyarrow.parquet as pq
import pytest
import torch

from conftest import dead_letters, make_tasks, push, run_qworker, stats
from qworker.backends.sqlite import SqliteQueue
from qworker.consumer import Consumer, ConsumerSettings
from qworker.context import TaskContext
from qworker.errors import TaskValidationError
from qworker.gpu import GIB, MemoryGate, is_out_of_memory, make_memory_gate, memory_estimate_bytes
from qworker.layout import Layout
from qworker.results import iter_result_files
from qworker.task import SOLO_LANE, Task
from qworker.workloads import Workload
from support_workloads import read_journal


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def result_rows(data_dir: Path, queue: str) -> list[dict]:
    rows = []
    for path in sorted(iter_result_files(Layout(data_dir).results_dir(queue))):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def oom_job(data_dir: Path, journal: Path, *, oom: int, fine: int) -> None:
    tasks = [Task.create(seed, {"oom": True, "journal": str(journal)}) for seed in range(oom)]
    tasks += [Task.create(seed, {"oom": False, "journal": str(journal)}) for seed in range(100, 100 + fine)]
    push(data_dir, "q", "support_workloads:oom_unless_solo", tasks)


# -- recognising out-of-memory errors ------------------------------------------


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory"), torch.cuda.OutOfMemoryError("x")])
def test_torch_oom_recognised(error: Exception) -> None:
    assert is_out_of_memory(error)


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory"), ValueError("oom")])
def test_other_errors_not_oom(error: Exception) -> None:
    assert not is_out_of_memory(error)


# -- the solo lane, through the CLI ----------------------------------------------


def test_oom_task_finishes_on_solo_lane(data_dir: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    oom_job(data_dir, journal, oom=3, fine=5)

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--processes", "2")

    assert done.returncode == 0, done.stderr
    counts = stats(data_dir, "q")
    assert counts.done == 8
    assert counts.dead == 0
    assert counts.oom_moves == 3
    assert done.stderr.count("task moved to lane solo") == 3
    rows = result_rows(data_dir, "q")
    assert sorted(row["lane"] for row in rows if row["seed"] < 100) == [SOLO_LANE] * 3
    assert {row["lane"] for row in rows if row["seed"] >= 100} == {"default"}
    assert {row["attempt"] for row in rows} == {1}


def test_status_shows_oom_moves(data_dir: Path, tmp_path: Path) -> None:
    oom_job(data_dir, tmp_path / "journal", oom=2, fine=1)
    run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst")

    text = run_qworker("status", "--data-dir", str(data_dir), "--queue", "q")
    as_json = run_qworker("status", "--data-dir", str(data_dir), "--queue", "q", "--json")

    assert text.returncode == 0, text.stderr
    assert "tasks moved to the solo lane after running out of GPU memory: 2" in text.stdout
    assert json.loads(as_json.stdout)["oom_moves"] == 2


def test_no_solo_leaves_moved_tasks_waiting(data_dir: Path, tmp_path: Path) -> None:
    oom_job(data_dir, tmp_path / "journal", oom=2, fine=2)

    first = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--no-solo")
    waiting = stats(data_dir, "q")
    second = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--lane", "solo")

    assert first.returncode == 0, first.stderr
    assert waiting.done == 2
    assert waiting.lane_depth == {SOLO_LANE: 2}
    assert second.returncode == 0, second.stderr
    assert stats(data_dir, "q").done == 4


def test_oom_on_solo_lane_counts_attempts(data_dir: Path, tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    push(data_dir, "q", "support_workloads:oom_always", make_tasks(1, {"journal": str(journal)}, max_attempts=2))

    done = run_qworker("work", "--data-dir", str(data_dir), "--queue", "q", "--burst", "--retry-base-s", "0.05")

    assert done.returncode == 0, done.stderr
    [dead] = dead_letters(data_dir, "q")
    assert dead.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert dead.task.lane == SOLO_LANE
    assert [(row[1], row[3]) for row in read_journal(journal)] == [(1, "start-default"), (1, "start-solo"), (2, "start-solo")]
    assert stats(data_dir, "q").oom_moves == 1


def test_invalid_memory_estimate_rejected_at_push() -> None:
    with pytest.raises(TaskValidationError) as excinfo:
        Task.create(1, {"gpu_memory_gb": "lots"})

    assert "invalid gpu_memory_gb 'lots'" in str(excinfo.value)


@pytest.mark.parametrize("value", [0, -1.5, float("inf"), True])
def test_memory_estimate_must_be_positive(value: object) -> None:
    with pytest.raises(TaskValidationError):
        memory_estimate_bytes({"gpu_memory_gb": value})


def test_memory_estimate_in_bytes() -> None:
    assert memory_estimate_bytes({"gpu_memory_gb": 1.5}) == int(1.5 * GIB)
    assert memory_estimate_bytes({}) is None


# -- memory admission ------------------------------------------------------------


@pytest.mark.anyio
async def test_gate_admits_within_capacity() -> None:
    gate = MemoryGate(capacity_bytes=10)
    running: list[int] = []
    peak = 0

    async def task(estimate: int) -> None:
        nonlocal peak
        async with gate.admit(estimate):
            running.append(estimate)
            peak = max(peak, sum(running))
            await anyio.sleep(0.01)
            running.remove(estimate)

    async with anyio.create_task_group() as group:
        for estimate in (4, 4, 4, 4, 6, 3):
            group.start_soon(task, estimate)

    assert peak <= 10
    assert gate.in_use_bytes == 0


@pytest.mark.anyio
async def test_gate_runs_oversized_task_alone() -> None:
    gate = MemoryGate(capacity_bytes=10)
    overlaps: list[int] = []
    running = 0

    async def task(estimate: int) -> None:
        nonlocal running
        async with gate.admit(estimate):
            running += 1
            overlaps.append(running)
            await anyio.sleep(0.01)
            running -= 1

    async with anyio.create_task_group() as group:
        group.start_soon(task, 3)
        await anyio.sleep(0)
        group.start_soon(task, 50)
        group.start_soon(task, 3)

    assert overlaps == [1, 1, 1]


@pytest.mark.anyio
async def test_gate_admits_in_arrival_order() -> None:
    gate = MemoryGate(capacity_bytes=10)
    order: list[str] = []

    async def task(name: str, estimate: int, hold_s: float) -> None:
        async with gate.admit(estimate):
            order.append(name)
            await anyio.sleep(hold_s)

    async with anyio.create_task_group() as group:
        group.start_soon(task, "first", 6, 0.05)
        await anyio.sleep(0.01)
        group.start_soon(task, "large", 8, 0.0)
        await anyio.sleep(0.01)
        group.start_soon(task, "small", 2, 0.0)

    assert order == ["first", "large", "small"]


@pytest.mark.anyio
async def test_gate_without_estimate_admits_at_once() -> None:
    gate = MemoryGate(capacity_bytes=1)
    async with gate.admit(1):
        with anyio.fail_after(1):
            async with gate.admit(None):
                pass


def test_gate_capacity_on_cpu() -> None:
    assert make_memory_gate("cpu", None).capacity_bytes is None
    assert make_memory_gate("cpu", 2.0).capacity_bytes == 2 * GIB


@pytest.mark.anyio
async def test_gate_runs_solo_task_alone() -> None:
    gate = MemoryGate(None)
    events: list[str] = []

    async def task(name: str, alone: bool, hold_s: float) -> None:
        async with gate.admit(None, alone=alone):
            events.append(f"start {name}")
            await anyio.sleep(hold_s)
            events.append(f"end {name}")

    async with anyio.create_task_group() as group:
        group.start_soon(task, "a", False, 0.05)
        group.start_soon(task, "b", False, 0.05)
        await anyio.sleep(0.01)
        group.start_soon(task, "solo", True, 0.05)
        await anyio.sleep(0.01)
        group.start_soon(task, "c", False, 0.0)

    solo_start = events.index("start solo")
    assert events.index("end a") < solo_start
    assert events.index("end b") < solo_start
    assert events[solo_start + 1] == "end solo"
    assert events.index("start c") > solo_start


@pytest.mark.anyio
async def test_consumer_admits_by_estimate(tmp_path: Path) -> None:
    running = 0
    peak = 0

    async def handler(task: Task, ctx: TaskContext) -> dict:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1
        return {"seed": task.seed}

    settings = ConsumerSettings(slots=4, burst=True, gpu_memory_limit_gb=1.0, poll_max_s=0.05)
    async with SqliteQueue(tmp_path / "queue.db", "q") as queue:
        await queue.put([Task.create(seed, {"gpu_memory_gb": 0.4}) for seed in range(12)])
        consumer = Consumer(queue, Workload("gated", handler), tmp_path / "results", settings)
        with anyio.fail_after(30):
            final = await consumer.run()

    assert final.done == 12
    assert peak == 2
