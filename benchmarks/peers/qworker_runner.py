"""qworker's embedded backend for the peer comparison: timed runs with spawned consumer processes.

The consumers are qworker's own ``ConsumerPool`` running the built-in
``noop`` workload, whose async handler returns None at once. Completion is
read from the queue file, not from count files. The end of a run is the
largest ``finished_at`` of the done tasks, which qworker writes in the ack
transaction after the task's result row is durable in a segment file. That
is later in a task's life than the peers' end point (their task function
returning), so it does not favour qworker.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from qworker.backends.sqlite import SqliteQueue
from qworker.consumer import ConsumerSettings
from qworker.layout import Layout
from qworker.pool import ConsumerPool, ConsumerSpec
from qworker.producer import push_tasks
from qworker.sink import SinkSettings
from qworker.task import Task

from processes import WorkerError, wait_until_idle
from timing import POLL_S, RunFailed, RunTiming

QUEUE = "peers"
WORKLOAD = "noop"
PROCESSES = 2
SLOTS = 4
SEGMENT_ROWS = 1000
SEGMENT_S = 0.2
STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class QworkerVariant:
    """One qworker configuration; ``synchronous`` is SQLite's synchronous mode for every connection."""

    synchronous: str

    def settings(self) -> dict[str, Any]:
        return {
            "processes": PROCESSES,
            "slots_per_process": SLOTS,
            "concurrency": f"{PROCESSES} processes x {SLOTS} async slots",
            "prefetch": "adaptive (about 50 ms of work ahead of the slots; claims of up to 100 tasks)",
            "sqlite": f"WAL, synchronous={self.synchronous}",
            "leases": "always on (30 s, extended while a task runs)",
            "results": f"one id-only row per task in parquet segment files ({SEGMENT_ROWS} rows or {SEGMENT_S} s per file, fsync on)",
            "workload": "built-in noop: async handler returning None",
            "log_level": "WARNING",
            "completion": "largest finished_at in the queue file (ack time, after the result segment is durable)",
        }


def make_tasks(count: int) -> list[Task]:
    return [Task.create(seed) for seed in range(count)]


def consumer_spec(variant: QworkerVariant, data_dir: Path) -> ConsumerSpec:
    settings = ConsumerSettings(
        slots=SLOTS,
        burst=False,
        sink=SinkSettings(batch_rows=SEGMENT_ROWS, batch_s=SEGMENT_S, fsync=True),
    )
    return ConsumerSpec(data_dir=data_dir, queue=QUEUE, workload=WORKLOAD, settings=settings,
                        synchronous=variant.synchronous, log_level="WARNING")


async def _push(db_path: Path, tasks: list[Task], synchronous: str) -> float:
    """Create the queue if needed and push ``tasks``; return the unix time taken right before the first push."""
    async with SqliteQueue(db_path, QUEUE, synchronous=synchronous) as queue:
        await queue.set_metadata({"workload": WORKLOAD})
        first_push = time.time()
        if tasks:
            await push_tasks(queue, tasks)
    return first_push


def _count_done(connection: sqlite3.Connection) -> int:
    return connection.execute("SELECT COUNT(*) FROM tasks WHERE queue = ? AND state = 'done'", (QUEUE,)).fetchone()[0]


def _finish_window(db_path: Path) -> tuple[int, float, float]:
    """Return the done count, the first and the last ``finished_at`` of the queue's done tasks."""
    connection = sqlite3.connect(db_path)
    try:
        done, first, last = connection.execute(
            "SELECT COUNT(*), MIN(finished_at), MAX(finished_at) FROM tasks WHERE queue = ? AND state = 'done'", (QUEUE,)
        ).fetchone()
    finally:
        connection.close()
    return done, first or 0.0, last or 0.0


def _wait_for_done(db_path: Path, count: int, started_at: float, timeout_s: float, pool: ConsumerPool) -> None:
    connection = sqlite3.connect(db_path)
    try:
        while (done := _count_done(connection)) < count:
            if time.time() > started_at + timeout_s:
                raise RunFailed(f"timed out after {timeout_s:g} s with {done} of {count} tasks done (raise --timeout-s)",
                                done=done, timed_out=True)
            if not pool.is_alive():
                raise RunFailed(f"consumer processes exited with {done} of {count} tasks done", done=done)
            time.sleep(POLL_S)
    finally:
        connection.close()


def _stop(pool: ConsumerPool) -> None:
    """Stop the pool: SIGTERM (graceful) and SIGINT through the pool, then SIGKILL to each PID it started."""
    for _ in range(2):
        if not pool.is_alive():
            return
        pool.stop()
        if pool.wait(STOP_TIMEOUT_S):
            return
    for pid in pool.pids:  # ConsumerPool has no kill method, so signal its children's PIDs directly
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    pool.wait(STOP_TIMEOUT_S)


def run(variant: QworkerVariant, mode: str, tasks: list[Task], data_dir: Path, timeout_s: float) -> RunTiming:
    """Run one timed run of ``mode`` ("end_to_end" or "drain") in the empty folder ``data_dir``."""
    db_path = Layout(data_dir).db_path
    count = len(tasks)
    pool = ConsumerPool(consumer_spec(variant, data_dir), PROCESSES)
    try:
        if mode == "drain":
            anyio.run(_push, db_path, tasks, variant.synchronous)
            started_at = time.time()
            pool.start()
        else:
            anyio.run(_push, db_path, [], variant.synchronous)  # consumers open an existing queue file only
            pool.start()
            try:
                wait_until_idle(lambda: pool.pids, _check_alive(pool), lambda: 0, 0, timeout_s)
            except WorkerError as exc:
                raise RunFailed(str(exc), done=0) from None
            started_at = anyio.run(_push, db_path, tasks, variant.synchronous)
        _wait_for_done(db_path, count, started_at, timeout_s, pool)
    finally:
        _stop(pool)

    done, first_finish, last_finish = _finish_window(db_path)
    return RunTiming(tasks=count, done=done, started_at=started_at, first_finish=first_finish, last_finish=last_finish)


def _check_alive(pool: ConsumerPool) -> Any:
    def check() -> None:
        if not pool.is_alive():
            raise WorkerError("qworker consumer processes exited while starting up: see their log lines above")
    return check
