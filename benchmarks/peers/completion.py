"""Count finished tasks in memory and publish the counts to one small file per process.

Worker side: a task calls :func:`record_finish` when its work is done. That
updates an in-memory count and the time of the last finish, and nothing
else. A daemon thread started on the first call in each process (forked
children start their own) writes ``<pid>.json`` into the folder named by
``$PEERS_COUNT_DIR`` every ``PUBLISH_INTERVAL_S`` seconds while the numbers
change. A task therefore adds no I/O of its own: each process writes at most
20 small files per second, whatever its task rate.

One exception: a process that runs a single task and exits at once, such as
the work horse that RQ's default worker forks for every job, would exit
before its thread writes. With ``$PEERS_FINISH_MODE=append`` such a process
appends one line with its finish time to ``append-<parent pid>.log``
instead: one small unsynced write per task, next to the fork of a whole
process per task.

Harness side: :class:`ProgressReader` sums the files of a folder.
:func:`mark_ready` writes ``ready-<pid>`` once when a worker process has
started, so the harness can wait for every worker before it pushes.

This module uses only the standard library, because both the harness (the
repository's virtual environment) and the peers' workers (their own virtual
environments) import it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

COUNT_DIR_ENV = "PEERS_COUNT_DIR"
FINISH_MODE_ENV = "PEERS_FINISH_MODE"
PUBLISH_INTERVAL_S = 0.05
READY_PREFIX = "ready-"
APPEND_PREFIX = "append-"


class _FinishCounter:
    """Per-process count of finished tasks, first and last finish times, and the thread that publishes them."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child gets a fresh lock (the parent's may have been held at fork time) and no thread.
        self._lock = threading.Lock()
        self._count = 0
        self._first_finish = 0.0
        self._last_finish = 0.0
        self._thread: threading.Thread | None = None

    def record(self) -> None:
        now = time.time()
        with self._lock:
            if self._count == 0:
                self._first_finish = now
            self._count += 1
            self._last_finish = now
            if self._thread is None:  # checked under the lock, so threads finishing at once start one publisher
                self._start_publisher()

    def _start_publisher(self) -> None:
        folder = os.environ.get(COUNT_DIR_ENV)
        if not folder:
            raise RuntimeError(f"${COUNT_DIR_ENV} is not set: the harness sets it to the folder for the count files")
        self._thread = threading.Thread(target=self._publish_forever, args=(Path(folder),), name="finish-publisher", daemon=True)
        self._thread.start()

    def _snapshot(self) -> tuple[int, float, float]:
        with self._lock:
            return self._count, self._first_finish, self._last_finish

    def _publish_forever(self, folder: Path) -> None:
        pid = os.getpid()
        path = folder / f"{pid}.json"
        temp_path = folder / f"{pid}.json.tmp"
        published: tuple[int, float, float] | None = None
        while True:
            snapshot = self._snapshot()
            if snapshot != published:
                count, first_finish, last_finish = snapshot
                temp_path.write_text(json.dumps({"pid": pid, "count": count, "first_finish": first_finish, "last_finish": last_finish}))
                os.replace(temp_path, path)  # the reader sees the old or the new file, never half of one
                published = snapshot
            time.sleep(PUBLISH_INTERVAL_S)


_COUNTER = _FinishCounter()
_APPEND = os.environ.get(FINISH_MODE_ENV, "thread") == "append"


def _append_finish() -> None:
    folder = os.environ[COUNT_DIR_ENV]
    line = f"{time.time()!r}\n".encode()
    descriptor = os.open(os.path.join(folder, f"{APPEND_PREFIX}{os.getppid()}.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, line)  # one short write; a worker runs one work horse at a time, so writes never overlap
    finally:
        os.close(descriptor)


def record_finish() -> None:
    """Count one finished task in this process and note the time (in memory, or one appended line in append mode)."""
    if _APPEND:
        _append_finish()
    else:
        _COUNTER.record()


def mark_ready() -> None:
    """Write ``ready-<pid>`` into ``$PEERS_COUNT_DIR`` once, when a worker process is ready to take tasks."""
    folder = os.environ.get(COUNT_DIR_ENV)
    if folder:
        (Path(folder) / f"{READY_PREFIX}{os.getpid()}").touch()


@dataclass(frozen=True)
class Progress:
    """Sum of the published counts of every worker process, with the earliest and latest finish times (unix seconds)."""

    count: int
    first_finish: float
    last_finish: float
    processes: int


class ProgressReader:
    """Sums the count files of one folder; append files are read on from where the last call stopped."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._append_state: dict[Path, tuple[int, int, float, float]] = {}  # offset, lines, first, last

    def read(self) -> Progress:
        count = 0
        first_finish = float("inf")
        last_finish = 0.0
        processes = 0
        for path in self.folder.glob("*.json"):
            try:
                record = json.loads(path.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue  # os.replace makes both unlikely; the next poll reads the file again
            if not record["count"]:
                continue
            processes += 1
            count += record["count"]
            first_finish = min(first_finish, record["first_finish"])
            last_finish = max(last_finish, record["last_finish"])
        for path in self.folder.glob(f"{APPEND_PREFIX}*.log"):
            lines, first, last = self._read_append(path)
            if lines:
                processes += 1
                count += lines
                first_finish = min(first_finish, first)
                last_finish = max(last_finish, last)
        return Progress(count=count, first_finish=first_finish if processes else 0.0, last_finish=last_finish, processes=processes)

    def _read_append(self, path: Path) -> tuple[int, float, float]:
        offset, lines, first, last = self._append_state.get(path, (0, 0, float("inf"), 0.0))
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is read on the next call
        for line in complete.splitlines():
            finished = float(line)
            lines += 1
            first = min(first, finished)
            last = max(last, finished)
        self._append_state[path] = (offset + len(complete), lines, first, last)
        return lines, first, last


def count_ready(folder: Path) -> int:
    """Return how many worker processes have written their ready marker into ``folder``."""
    return sum(1 for _ in folder.glob(f"{READY_PREFIX}*"))
