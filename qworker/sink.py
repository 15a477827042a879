"""Where results go before their tasks are acked.

A task is acked only after the file holding its rows is durable. ``FileSink``
writes one file per task. ``SegmentSink`` buffers small results and writes
many tasks as one segment file, which costs one atomic write (and one fsync)
per segment instead of per task.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import anyio
import anyio.to_thread
import pyarrow as pa

from .queue import Lease
from .results import SEGMENTS_DIR, id_only_table, is_complete_parquet, task_result_path, write_parquet_atomic

logger = logging.getLogger("qworker.sink")

OnDurable = Callable[[Sequence[Lease]], Awaitable[None]]


@dataclass(frozen=True)
class SinkSettings:
    """Result storage settings: segment batching and Volume commits.

    ``batch_rows`` > 0 turns on segment files, flushed at that many rows or
    after ``batch_s`` seconds. When results live on a Modal Volume, other
    containers see them only after a commit, so tasks are acked after a
    commit that covers their files: one every ``commit_every`` results or
    ``commit_s`` seconds.
    """

    batch_rows: int = 0
    batch_s: float = 2.0
    fsync: bool = True
    commit_every: int = 500
    commit_s: float = 5.0


class FileSink:
    """Writes ``<task_id>.parquet`` for each task, then reports the task durable."""

    def __init__(self, results_dir: Path, on_durable: OnDurable, *, fsync: bool = True) -> None:
        self.results_dir = results_dir
        self._on_durable = on_durable
        self._fsync = fsync

    def has_result(self, task_id: str) -> bool:
        """Return whether a complete result file exists, as after a crash between write and ack."""
        return is_complete_parquet(task_result_path(self.results_dir, task_id))

    async def store(self, lease: Lease, table: pa.Table | None) -> None:
        """Write the task's result file; ``table`` None records the task id alone."""
        if table is None:
            table = id_only_table([lease.task_id])
        path = task_result_path(self.results_dir, lease.task_id)
        await anyio.to_thread.run_sync(lambda: write_parquet_atomic(table, path, fsync=self._fsync))
        await self._on_durable([lease])

    async def flush(self) -> None:
        """Nothing is buffered: every store wrote its file."""

    async def run(self) -> None:
        await anyio.sleep_forever()


class SegmentSink:
    """Buffers results and writes them as one segment file per flush.

    A segment is flushed when it contains ``batch_rows`` rows or its oldest
    result is ``batch_s`` seconds old, and when the consumer stops.
    """

    def __init__(self, results_dir: Path, on_durable: OnDurable, owner: str, settings: SinkSettings) -> None:
        self.results_dir = results_dir
        self._on_durable = on_durable
        self._owner = owner
        self._settings = settings
        self._buffer: dict[str, tuple[Lease, pa.Table | None]] = {}  # None: the task returned no rows
        self._rows = 0
        self._oldest = 0.0
        self._sequence = 0
        self._lock = anyio.Lock()

    def has_result(self, task_id: str) -> bool:
        # Looking a task up in every segment costs more than running a small task again.
        return False

    async def store(self, lease: Lease, table: pa.Table | None) -> None:
        """Buffer the task's result; ``table`` None records the task id alone."""
        if not self._buffer:
            self._oldest = time.monotonic()
        previous = self._buffer.pop(lease.task_id, None)
        if previous is not None:
            self._rows -= _row_count(previous[1])
        self._buffer[lease.task_id] = (lease, table)
        self._rows += _row_count(table)
        if self._rows >= self._settings.batch_rows:
            await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._buffer:
                return
            entries = list(self._buffer.values())
            self._buffer.clear()
            self._rows = 0
            await self._write(entries)

    async def _write(self, entries: list[tuple[Lease, pa.Table | None]]) -> None:
        tables = [table for _, table in entries if table is not None]
        no_rows = [lease.task_id for lease, table in entries if table is None]
        if no_rows:
            tables.append(id_only_table(no_rows))
        try:
            table = pa.concat_tables(tables, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            logger.warning("segment schemas conflict, writing one segment per schema: %s", exc)
            for group in _group_by_schema(entries):
                await self._write(group)
            return

        self._sequence += 1
        name = f"{int(time.time() * 1000):013d}-{self._owner}-{self._sequence:06d}-{uuid.uuid4().hex[:6]}.parquet"
        path = self.results_dir / SEGMENTS_DIR / name
        fsync = self._settings.fsync
        await anyio.to_thread.run_sync(lambda: write_parquet_atomic(table, path, fsync=fsync))
        logger.debug("segment written path=%s tasks=%d rows=%d", path.name, len(entries), table.num_rows)
        await self._on_durable([entry[0] for entry in entries])

    async def run(self) -> None:
        """Flush segments whose oldest result has waited ``batch_s`` seconds."""
        interval = max(0.005, self._settings.batch_s / 4)
        while True:
            await anyio.sleep(interval)
            if self._buffer and time.monotonic() - self._oldest >= self._settings.batch_s:
                await self.flush()


def _group_by_schema(
    entries: list[tuple[Lease, pa.Table | None]],
) -> list[list[tuple[Lease, pa.Table | None]]]:
    groups: dict[pa.Schema | None, list[tuple[Lease, pa.Table | None]]] = {}
    for entry in entries:
        schema = entry[1].schema if entry[1] is not None else None
        groups.setdefault(schema, []).append(entry)
    return list(groups.values())


def _row_count(table: pa.Table | None) -> int:
    return 1 if table is None else table.num_rows


class CommitBatcher:
    """Holds results written to a Volume until one commit covers many of them, then reports them durable.

    A Volume write is invisible to other containers, and lost if the
    container dies, until ``commit`` runs. One commit per result would cap
    throughput, so results wait for a commit every ``commit_every`` results
    or ``commit_s`` seconds.
    """

    def __init__(self, commit: Callable[[], Awaitable[None]], on_durable: OnDurable, settings: SinkSettings) -> None:
        self._commit = commit
        self._on_durable = on_durable
        self._settings = settings
        self._pending: list[Lease] = []
        self._oldest = 0.0
        self._lock = anyio.Lock()
        self.commits = 0

    async def add(self, leases: Sequence[Lease]) -> None:
        if not self._pending:
            self._oldest = time.monotonic()
        self._pending.extend(leases)
        if len(self._pending) >= self._settings.commit_every:
            await self.commit()

    async def commit(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            leases, self._pending = self._pending, []
            await self._commit()
            self.commits += 1
            logger.debug("volume committed results=%d", len(leases))
            await self._on_durable(leases)

    async def run(self) -> None:
        """Commit results that have waited ``commit_s`` seconds."""
        interval = max(0.005, self._settings.commit_s / 4)
        while True:
            await anyio.sleep(interval)
            if self._pending and time.monotonic() - self._oldest >= self._settings.commit_s:
                await self.commit()
