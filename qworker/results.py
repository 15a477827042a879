"""Parquet results: converting handler rows and writing files atomically.

Layout of one queue's results folder::

    <task_id>.parquet           one file per task (the default)
    _segments/<name>.parquet    many small results batched into one file
    _quarantine/                files the reducer could not read, with report.jsonl
    _reducer/                   the reducer's state and aggregate

Files being written have a name starting with "." and ending in ".tmp" and
are renamed into place only when complete, so no reader sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ResultError

TASK_ID_COLUMN = "task_id"
RESULT_SUFFIX = ".parquet"
_ID_ONLY_SCHEMA = pa.schema([(TASK_ID_COLUMN, pa.string())])
SEGMENTS_DIR = "_segments"
QUARANTINE_DIR = "_quarantine"
REDUCER_DIR = "_reducer"


def rows_to_table(task_id: str, rows: Any) -> pa.Table:
    """Convert what a handler returned into a table whose first column is ``task_id``.

    ``None`` and zero rows become one row holding only the task id, so every
    finished task has a result row and the reducer can count it.
    """
    table = result_table(task_id, rows)
    return id_only_table([task_id]) if table is None else table


def result_table(task_id: str, rows: Any) -> pa.Table | None:
    """Convert what a handler returned as :func:`rows_to_table` does, but return None for no rows.

    Building a one-row table costs more than a no-op task itself, so sinks
    write the ids of such tasks in bulk with :func:`id_only_table`.
    """
    if rows is None:
        return None
    if isinstance(rows, pa.Table):
        table = rows
        length = rows.num_rows
    elif isinstance(rows, dict):
        table = _table_from_pylist(task_id, [rows])
        length = 1
    elif isinstance(rows, list):
        table = _table_from_pylist(task_id, rows)
        length = len(rows)
    else:
        raise ResultError(
            f"task {task_id!r}: handler returned {type(rows).__name__}; return a pyarrow.Table, a list of dicts, a dict or None"
        )

    if length == 0:
        return None
    if TASK_ID_COLUMN in table.column_names:
        table = table.drop_columns([TASK_ID_COLUMN])
    ids = pa.array([task_id] * length, pa.string())
    return table.add_column(0, TASK_ID_COLUMN, ids) if table.num_columns else pa.table({TASK_ID_COLUMN: ids})


def id_only_table(task_ids: list[str]) -> pa.Table:
    """Return the result rows of tasks that returned no rows: one row per task, holding only its id."""
    return pa.Table.from_arrays([pa.array(task_ids, pa.string())], schema=_ID_ONLY_SCHEMA)


def _table_from_pylist(task_id: str, rows: list[Any]) -> pa.Table:
    if not all(isinstance(row, dict) for row in rows):
        raise ResultError(f"task {task_id!r}: handler returned a list whose items are not all dicts")
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ResultError(f"task {task_id!r}: rows cannot be stored as parquet: {exc}") from None


def task_result_path(results_dir: Path, task_id: str) -> Path:
    return results_dir / f"{task_id}{RESULT_SUFFIX}"


def write_parquet_atomic(table: pa.Table, path: Path, *, fsync: bool = True) -> None:
    """Write ``table`` to a temporary file beside ``path`` and rename it into place.

    With ``fsync`` the file and its folder are flushed to disk before this
    returns, so the result survives a power cut as well as a crash.
    """
    with atomic_file(path, "wb", fsync=fsync) as handle:
        pq.write_table(table, handle)


def write_json_atomic(record: Any, path: Path) -> None:
    """Write ``record`` as JSON to a temporary file beside ``path``, fsync it and rename it into place."""
    with atomic_file(path, "w", fsync=True) as handle:
        json.dump(record, handle, indent=1, sort_keys=True)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str, *, fsync: bool) -> Iterator[IO[Any]]:
    """Yield a temporary file beside ``path``; rename it to ``path`` if the block succeeds, else delete it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temp_path, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield handle
            if fsync:
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete_parquet(path: Path) -> bool:
    """Return whether ``path`` holds a parquet file whose footer can be read."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowException):
        return False
    return True


def iter_result_files(results_dir: Path) -> Iterator[Path]:
    """Yield finished result files (per-task files and segments), skipping temporary ones."""
    for folder in (results_dir, results_dir / SEGMENTS_DIR):
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.name.endswith(RESULT_SUFFIX):
                    continue
                if entry.is_file():
                    yield Path(entry.path)


def result_task_ids(results_dir: Path) -> set[str]:
    """Return the ids of the tasks that have a readable result file, per-task or in a segment.

    An unreadable file counts for nothing, so its tasks look missing, as
    they will once the reducer quarantines the file.
    """
    found: set[str] = set()
    for path in iter_result_files(results_dir):
        if path.parent == results_dir:
            if is_complete_parquet(path):
                found.add(path.name[: -len(RESULT_SUFFIX)])
            continue
        try:
            column = pq.read_table(path, columns=[TASK_ID_COLUMN]).column(TASK_ID_COLUMN)
        except (OSError, KeyError, pa.ArrowException):
            continue
        found.update(value for value in column.to_pylist() if isinstance(value, str))
    return found
