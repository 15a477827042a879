"""A bare lease queue on stdlib sqlite3: the peer that benchmarks/throughput.py measures qworker against.

It keeps only what a durable lease queue needs. Tasks are rows in a WAL
database with ``synchronous = NORMAL``. A worker process claims up to
``batch`` ready rows in one ``UPDATE ... RETURNING`` transaction, calls a
no-op handler on each, and acks the whole batch in one more transaction. A
leased row whose ``visible_at`` has passed is ready again, as in qworker.
There are no lanes, retries, result files, lease extension or logging.

Run on its own::

    python benchmarks/bare_sqlite_queue.py --tasks 20000 --processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CLAIM_BATCH = 100
LEASE_S = 30.0
BUSY_TIMEOUT_S = 30.0
IDLE_SLEEP_S = 0.005

_SCHEMA = """
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY,
    payload TEXT NOT NULL,
    state TEXT NOT NULL,
    owner TEXT,
    visible_at REAL NOT NULL,
    claimed_at REAL,
    finished_at REAL
);
CREATE INDEX tasks_ready ON tasks (visible_at) WHERE state IN ('queued', 'leased');
"""

_CLAIM_SQL = """
UPDATE tasks SET state = 'leased', owner = :owner, visible_at = :expires_at, claimed_at = :now
WHERE id IN (
    SELECT id FROM tasks
    WHERE state IN ('queued', 'leased') AND visible_at <= :now
    ORDER BY visible_at
    LIMIT :limit
)
RETURNING id, payload
"""

_ACK_SQL = "UPDATE tasks SET state = 'done', owner = NULL, finished_at = ? WHERE id = ? AND owner = ? AND state = 'leased'"


@dataclass(frozen=True)
class DrainTiming:
    """Wall-clock times (unix seconds) of one drain, read back from the rows."""

    tasks_done: int
    started_at: float  # when the parent started the worker processes
    first_claim_at: float
    last_ack_at: float

    @property
    def elapsed_s(self) -> float:
        """Seconds from starting the processes to the last ack, process start-up included."""
        return self.last_ack_at - self.started_at

    @property
    def active_s(self) -> float:
        """Seconds from the first claim to the last ack."""
        return self.last_ack_at - self.first_claim_at


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def create_queue(path: Path, tasks: int) -> None:
    """Create the database at ``path`` and insert ``tasks`` queued rows in one transaction."""
    connection = connect(path)
    try:
        connection.executescript(_SCHEMA)
        now = time.time()
        rows = ((json.dumps({"seed": seed, "config": {}}), now) for seed in range(tasks))
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO tasks (payload, state, visible_at) VALUES (?, 'queued', ?)", rows)
        connection.execute("COMMIT")
    finally:
        connection.close()


def handle(task: dict) -> None:
    """Return at once, like qworker's ``noop`` workload."""
    return None


def run_worker(path: Path, owner: str, batch: int, deadline: float) -> int:
    """Claim, run and ack batches until no task is waiting or leased, or ``deadline`` (unix seconds) passes.

    Returns how many tasks this worker acked.
    """
    connection = connect(path)
    acked = 0
    try:
        while time.time() < deadline:
            now = time.time()
            params = {"owner": owner, "expires_at": now + LEASE_S, "now": now, "limit": batch}
            connection.execute("BEGIN IMMEDIATE")
            rows = connection.execute(_CLAIM_SQL, params).fetchall()
            connection.execute("COMMIT")

            if not rows:
                pending = connection.execute(
                    "SELECT EXISTS (SELECT 1 FROM tasks WHERE state IN ('queued', 'leased'))"
                ).fetchone()[0]
                if not pending:
                    break
                time.sleep(IDLE_SLEEP_S)
                continue

            for _, payload in rows:
                handle(json.loads(payload))

            finished_at = time.time()
            connection.execute("BEGIN IMMEDIATE")
            connection.executemany(_ACK_SQL, [(finished_at, task_id, owner) for task_id, _ in rows])
            connection.execute("COMMIT")
            acked += len(rows)
    finally:
        connection.close()
    return acked


def read_timing(path: Path, started_at: float) -> DrainTiming:
    connection = connect(path)
    try:
        done, first_claim, last_ack = connection.execute(
            "SELECT COUNT(*), MIN(claimed_at), MAX(finished_at) FROM tasks WHERE state = 'done'"
        ).fetchone()
    finally:
        connection.close()
    if not done:
        raise RuntimeError(f"bare SQLite queue in {str(path)!r} finished no task")
    return DrainTiming(tasks_done=done, started_at=started_at, first_claim_at=first_claim, last_ack_at=last_ack)


def drain(path: Path, tasks: int, processes: int, *, batch: int = CLAIM_BATCH, timeout_s: float = 300.0) -> DrainTiming:
    """Fill a new queue at ``path`` with ``tasks`` rows, drain it with ``processes`` worker processes and time it.

    The workers are fresh interpreters running this file with ``--worker``,
    so they import only the standard library, whatever the calling script
    imports. Raises RuntimeError when they do not finish within ``timeout_s``
    seconds (they are killed) or leave tasks undone.
    """
    create_queue(path, tasks)
    started_at = time.time()
    deadline = started_at + timeout_s
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(path), "--batch", str(batch), "--deadline", repr(deadline)]
    workers = [subprocess.Popen(command) for _ in range(processes)]
    try:
        for worker in workers:
            try:
                worker.wait(max(0.0, deadline + 5.0 - time.time()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    codes = [worker.returncode for worker in workers]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"bare SQLite workers exited with codes {codes} (negative: killed by that signal)")
    timing = read_timing(path, started_at)
    if timing.tasks_done != tasks:
        raise RuntimeError(f"bare SQLite queue finished {timing.tasks_done} of {tasks} tasks within {timeout_s:g} s")
    return timing


def main() -> int:
    parser = argparse.ArgumentParser(description="Drain a bare stdlib sqlite3 lease queue of no-op tasks and print tasks per second.")
    parser.add_argument("--tasks", type=int, default=20000, help="tasks to push and drain (default: %(default)s)")
    parser.add_argument("--processes", type=int, default=2, help="worker processes (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=CLAIM_BATCH, help="tasks claimed and acked per transaction (default: %(default)s)")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="seconds before the workers are killed (default: %(default)s)")
    parser.add_argument("--worker", type=Path, metavar="DB", help=argparse.SUPPRESS)  # set by drain() for its worker processes
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)  # unix seconds, with --worker
    args = parser.parse_args()
    if args.worker is not None:
        if args.deadline is None:
            parser.error("--worker needs --deadline")
        run_worker(args.worker, f"bare.{os.getpid()}", args.batch, args.deadline)
        return 0
    if min(args.tasks, args.processes, args.batch) < 1:
        parser.error("--tasks, --processes and --batch must be 1 or more")

    with tempfile.TemporaryDirectory(prefix="bare-sqlite-queue-") as folder:
        timing = drain(Path(folder) / "queue.db", args.tasks, args.processes, batch=args.batch, timeout_s=args.timeout_s)
    print(
        f"{args.tasks} tasks, {args.processes} processes: {args.tasks / timing.elapsed_s:,.0f} tasks/s from process start"
        f" ({timing.elapsed_s:.2f} s), {args.tasks / timing.active_s:,.0f} tasks/s from first claim ({timing.active_s:.2f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
