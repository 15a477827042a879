"""Handlers that misbehave on purpose, for consumer tests run in real processes.

Consumer subprocesses import this module as ``support_workloads``, so tests
put the tests folder on PYTHONPATH.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio

from qworker.context import TaskContext
from qworker.task import Task


def _record(task: Task, event: str) -> None:
    """Append one line per event to the file named by the task's ``journal`` config key."""
    journal = task.config.get("journal")
    if journal:
        with open(journal, "a", encoding="utf-8") as handle:
            handle.write(f"{task.task_id} {task.attempt} {os.getpid()} {event} {time.time():.3f}\n")


def always_fail(task: Task, ctx: TaskContext) -> Any:
    _record(task, "start")
    raise ValueError(f"boom seed={task.seed}")


def flaky(task: Task, ctx: TaskContext) -> Any:
    """Fail until attempt ``succeed_on``, then return one row."""
    _record(task, "start")
    if task.attempt < task.config["succeed_on"]:
        raise RuntimeError(f"transient failure on attempt {task.attempt}")
    return {"seed": task.seed, "attempt": task.attempt}


def slow_sync(task: Task, ctx: TaskContext) -> Any:
    """Sleep ``sleep_s`` seconds in a worker thread; with ``hang_first`` the first attempt sleeps an hour."""
    _record(task, "start")
    sleep_s = 3600.0 if task.config.get("hang_first") and task.attempt == 1 else task.config.get("sleep_s", 0.0)
    time.sleep(sleep_s)
    _record(task, "end")
    return {"seed": task.seed, "value": float(task.seed) * 2}


async def slow_async(task: Task, ctx: TaskContext) -> Any:
    _record(task, "start")
    await anyio.sleep(task.config.get("sleep_s", 0.0))
    _record(task, "end")
    return {"seed": task.seed}


def read_journal(path: Path) -> list[tuple[str, int, int, str]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        task_id, attempt, pid, event, _ = line.split()
        rows.append((task_id, int(attempt), int(pid), event))
    return rows


def bad_rows(task: Task, ctx: TaskContext) -> Any:
    return "not rows"


def fails_until_fixed(task: Task, ctx: TaskContext) -> Any:
    """Fail unless QWORKER_TEST_FIXED is set, standing in for a bug that a later deploy fixes."""
    if not os.environ.get("QWORKER_TEST_FIXED"):
        raise ValueError(f"not fixed yet, seed={task.seed}")
    return {"seed": task.seed}


def oom_unless_solo(task: Task, ctx: TaskContext) -> Any:
    """Run out of GPU memory on the default lane when the config sets ``oom``; succeed on the solo lane."""
    import torch

    _record(task, f"start-{task.lane}")
    if task.config.get("oom") and task.lane != "solo":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (test)")
    return {"seed": task.seed, "lane": task.lane, "attempt": task.attempt}


def oom_always(task: Task, ctx: TaskContext) -> Any:
    """Run out of GPU memory on every lane, as a task too large for the GPU does."""
    import torch

    _record(task, f"start-{task.lane}")
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 200.00 GiB (test)")
