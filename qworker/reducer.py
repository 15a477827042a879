"""Incremental reducer: fold a queue's finished result files into one aggregate.

Each run reads only the result files that no earlier run folded, drops the rows
of tasks that are already counted, groups the remaining rows and adds the
partial aggregate to the stored one. State lives in a SQLite database at
``<results_dir>/_reducer/state.db``:

* ``folded_files``: every folded file by relative name, with its size,
  mtime_ns and the rows and tasks it contributed;
* ``counted_tasks``: every counted task id and the file it was counted from;
* ``aggregate``: the current aggregate table, stored as parquet bytes;
* ``meta``: the aggregation that built the state.

Each batch of files is folded in one transaction, so a reducer killed at any
point and run again never counts a task twice and never loses a fold. The
transaction holds the database write lock from the re-check of what is folded
until the commit, so two reducers on one folder never fold the same file twice.
``aggregate.parquet`` is a copy written at the end of each run: after a crash
it lags the state database until the next run.

A task counts once: the first file that contains it, in sorted order of
relative names, supplies all of its rows, and rows of that task in any later
file are dropped. A file is folded once by name, so a per-task file that is
rewritten in place after being folded is not read again.

Files that cannot be read, or lack a column the aggregation needs, are moved
to ``<results_dir>/_quarantine/`` and listed in its ``report.jsonl``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import ConfigError
from .results import (
    QUARANTINE_DIR,
    REDUCER_DIR,
    TASK_ID_COLUMN,
    iter_result_files,
    write_parquet_atomic,
)
from .workloads.base import Aggregation

logger = logging.getLogger("qworker.reducer")

STATE_FILE = "state.db"
AGGREGATE_FILE = "aggregate.parquet"
QUARANTINE_REPORT = "report.jsonl"
ROWS_COLUMN = "rows"
TASKS_COLUMN = "tasks"

DEFAULT_BATCH_FILES = 256
READ_THREADS = 4
BUSY_TIMEOUT_MS = 60_000
# Values per "IN (...)" query. SQLite before 3.32.0 allows at most 999 host
# parameters by default (SQLITE_MAX_VARIABLE_NUMBER, sqlite.org/limits.html).
SQL_CHUNK = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS folded_files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    rows INTEGER NOT NULL,
    tasks INTEGER NOT NULL,
    folded_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS counted_tasks (
    task_id TEXT PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES folded_files (id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS aggregate (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    parquet BLOB NOT NULL,
    updated_at REAL NOT NULL
);
"""

# Names the aggregate uses for its own columns, so no key or sum may take them.
_RESERVED_COLUMNS = (TASK_ID_COLUMN, ROWS_COLUMN, TASKS_COLUMN)


@dataclass(frozen=True)
class QuarantinedFile:
    """A result file moved to the quarantine folder, with the error that caused the move.

    ``path`` is where the file was found and ``moved_to`` is where it is now.
    """

    path: Path
    error: str
    moved_to: Path


@dataclass(frozen=True)
class ReduceReport:
    """Counts from one :meth:`Reducer.run` and the aggregate after it.

    ``rows_folded`` and ``tasks_folded`` count only rows and tasks new to this
    run. ``duplicate_tasks`` is the number of distinct task ids whose rows were
    dropped because an earlier file had already counted them.
    """

    files_folded: int
    files_skipped: int
    rows_folded: int
    tasks_folded: int
    duplicate_tasks: int
    quarantined: tuple[QuarantinedFile, ...]
    total_tasks: int
    aggregate: pa.Table
    elapsed_s: float


@dataclass
class _ReadResult:
    """One result file as read from disk: its table, or why it could not be read."""

    name: str
    path: Path
    size: int = 0
    mtime_ns: int = 0
    table: pa.Table | None = None
    error: str | None = None
    vanished: bool = False


@dataclass
class _RunTally:
    files_folded: int = 0
    files_skipped: int = 0
    rows_folded: int = 0
    tasks_folded: int = 0
    duplicate_task_ids: set[str] = field(default_factory=set)
    quarantined: list[QuarantinedFile] = field(default_factory=list)


@dataclass
class _BatchState:
    """Schema, task ids and rows gathered while one batch is folded in its transaction."""

    # Unified types of the stored aggregate and the files accepted so far.
    schema: pa.Schema
    # Task ids counted by earlier files of this batch, not yet committed.
    counted_task_ids: set[str] = field(default_factory=set)
    kept_tables: list[pa.Table] = field(default_factory=list)


class _InvalidResultFile(Exception):
    """Raised inside the reducer for a result file that must be quarantined."""


class Reducer:
    """Folds the result files under ``results_dir`` into an aggregate, incrementally.

    With ``aggregation`` the aggregate has one row per distinct value of its
    ``keys``, the sum of each of its ``sums`` columns, and ``rows`` and
    ``tasks`` counts. Without it (or with empty keys and sums) the aggregate
    is one row: ``rows``, ``tasks`` and the sum of every integer or
    floating-point column except ``task_id``. In that mode a result column
    named ``rows`` or ``tasks`` is not summed, because those names contain
    the counts.

    A sum column is int64, or float64 once any folded file stores that column
    as floating point. A sum over only nulls is null.
    """

    def __init__(
        self,
        results_dir: Path,
        aggregation: Aggregation | None = None,
        *,
        batch_files: int = DEFAULT_BATCH_FILES,
    ) -> None:
        self.results_dir = Path(results_dir)
        self.aggregation = _validate_aggregation(aggregation or Aggregation())
        if batch_files < 1:
            raise ConfigError(f"batch_files must be at least 1, got {batch_files}")
        self.batch_files = batch_files

    @property
    def state_path(self) -> Path:
        return self.results_dir / REDUCER_DIR / STATE_FILE

    @property
    def aggregate_path(self) -> Path:
        return self.results_dir / REDUCER_DIR / AGGREGATE_FILE

    @property
    def quarantine_dir(self) -> Path:
        return self.results_dir / QUARANTINE_DIR

    def run(self) -> ReduceReport:
        """Fold every result file not folded before, then write ``aggregate.parquet``.

        Raises :class:`ConfigError` when the state was built with another
        aggregation, because the stored aggregate cannot be combined with it.
        Call :meth:`reset` first to fold everything again with the new one.
        """
        started = time.monotonic()
        tally = _RunTally()

        with closing(self._connect()) as conn:
            self._check_aggregation(conn)
            names = self._list_unfolded(conn, tally)

            with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="qworker-reduce") as pool:
                for batch in _chunks(names, self.batch_files):
                    paths = [self.results_dir / name for name in batch]
                    reads = list(pool.map(_read_result_file, batch, paths))
                    self._fold_batch(conn, reads, tally)

            aggregate = self._load_aggregate(conn)
            total_tasks = _count_total_tasks(conn)

        write_parquet_atomic(aggregate, self.aggregate_path)

        report = ReduceReport(
            files_folded=tally.files_folded,
            files_skipped=tally.files_skipped,
            rows_folded=tally.rows_folded,
            tasks_folded=tally.tasks_folded,
            duplicate_tasks=len(tally.duplicate_task_ids),
            quarantined=tuple(tally.quarantined),
            total_tasks=total_tasks,
            aggregate=aggregate,
            elapsed_s=time.monotonic() - started,
        )
        _log_report(self.results_dir, report)
        return report

    def aggregate(self) -> pa.Table:
        """Return the stored aggregate, or an empty table when nothing is folded yet."""
        with closing(self._connect()) as conn:
            return self._load_aggregate(conn)

    def reset(self) -> None:
        """Delete the reducer state and ``aggregate.parquet``, so the next run folds every file again.

        Quarantined files stay in the quarantine folder.
        """
        with closing(self._connect()) as conn:
            with _immediate_transaction(conn):
                for table in ("counted_tasks", "folded_files", "aggregate", "meta"):
                    conn.execute(f"DELETE FROM {table}")
            conn.execute("VACUUM")

        self.aggregate_path.unlink(missing_ok=True)

    # State database

    def _connect(self) -> sqlite3.Connection:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None leaves transactions to the explicit BEGIN
        # IMMEDIATE in _immediate_transaction.
        conn = sqlite3.connect(self.state_path, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_aggregation(self, conn: sqlite3.Connection) -> None:
        expected = _aggregation_json(self.aggregation)
        with _immediate_transaction(conn):
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('aggregation', ?)", (expected,))
            (stored,) = conn.execute("SELECT value FROM meta WHERE key = 'aggregation'").fetchone()

        if stored != expected:
            raise ConfigError(
                f"reducer state in {self.state_path} was built with aggregation {stored}, not {expected}. "
                "Pass the same aggregation, or call Reducer.reset() to fold every result file again."
            )

    def _list_unfolded(self, conn: sqlite3.Connection, tally: _RunTally) -> list[str]:
        names = sorted(path.relative_to(self.results_dir).as_posix() for path in iter_result_files(self.results_dir))
        folded = _select_existing(conn, "SELECT name FROM folded_files WHERE name IN ({})", names)
        tally.files_skipped += len(folded)
        return [name for name in names if name not in folded]

    def _load_aggregate(self, conn: sqlite3.Connection) -> pa.Table:
        row = conn.execute("SELECT parquet FROM aggregate WHERE id = 1").fetchone()
        if row is None:
            return _empty_aggregate(self.aggregation)
        return pq.read_table(pa.BufferReader(row[0]))

    # Folding one batch

    def _fold_batch(self, conn: sqlite3.Connection, reads: list[_ReadResult], tally: _RunTally) -> None:
        """Fold one batch of read files in one transaction.

        The transaction starts before the re-check of folded names and the
        read of the stored aggregate, so a concurrent reducer cannot fold the
        same files or overwrite this batch's aggregate in between.
        """
        with _immediate_transaction(conn):
            folded = _select_existing(conn, "SELECT name FROM folded_files WHERE name IN ({})", [r.name for r in reads])
            stored = self._load_aggregate(conn)
            batch = _BatchState(schema=stored.schema)

            for read in reads:
                if read.name in folded:
                    tally.files_skipped += 1
                elif read.vanished:
                    logger.warning("skipped result file %s because it was removed before it could be read", read.path)
                else:
                    self._fold_file(conn, read, batch, tally)

            if batch.kept_tables:
                rows = pa.concat_tables(batch.kept_tables, promote_options="permissive")
                combined = self._combine(stored, self._aggregate_rows(rows))
                _store_aggregate(conn, combined)

    def _fold_file(self, conn: sqlite3.Connection, read: _ReadResult, batch: _BatchState, tally: _RunTally) -> None:
        """Check one file, quarantine it or record it as folded, and keep the rows of its new tasks."""
        try:
            table = self._prepare_table(read)
            batch.schema = _unify_schema(batch.schema, table.schema)
        except _InvalidResultFile as exc:
            quarantined = self._quarantine(read, str(exc))
            if quarantined is not None:
                tally.quarantined.append(quarantined)
            return

        kept, new_ids, duplicate_ids = _drop_counted_tasks(conn, table, batch.counted_task_ids)
        batch.counted_task_ids.update(new_ids)
        tally.duplicate_task_ids.update(duplicate_ids)

        _record_folded_file(conn, read, kept.num_rows, new_ids)
        tally.files_folded += 1
        tally.rows_folded += kept.num_rows
        tally.tasks_folded += len(new_ids)
        if kept.num_rows:
            batch.kept_tables.append(kept)

    def _prepare_table(self, read: _ReadResult) -> pa.Table:
        """Return the file's ``task_id``, key and sum columns, or raise :class:`_InvalidResultFile`."""
        if read.error is not None:
            raise _InvalidResultFile(read.error)
        assert read.table is not None
        table = read.table

        duplicates = sorted({name for name in table.column_names if table.column_names.count(name) > 1})
        if duplicates:
            raise _InvalidResultFile(f"duplicate column names: {', '.join(duplicates)}")

        columns = {TASK_ID_COLUMN: _task_id_column(table)}
        if self._grouped:
            columns.update(_key_columns(table, self.aggregation.keys))
            columns.update(_declared_sum_columns(table, self.aggregation.sums))
        else:
            columns.update(_numeric_columns(table))
        return pa.table(columns)

    @property
    def _grouped(self) -> bool:
        return bool(self.aggregation.keys or self.aggregation.sums)

    def _quarantine(self, read: _ReadResult, error: str) -> QuarantinedFile | None:
        """Move ``read.path`` into the quarantine folder and append a line to its report.

        Returns None when the file is gone before it can be moved, because
        another reducer quarantined it first or a writer removed it.
        """
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        target = _free_path(self.quarantine_dir, read.path.name)
        try:
            os.replace(read.path, target)
        except FileNotFoundError:
            logger.warning("result file %s was removed before it could be quarantined (%s)", read.path, error)
            return None

        line = {
            "file": read.name,
            "error": error,
            "quarantined_at": time.time(),
            "moved_to": target.relative_to(self.results_dir).as_posix(),
        }
        with open(self.quarantine_dir / QUARANTINE_REPORT, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

        logger.warning("quarantined result file %s as %s: %s", read.path, target, error)
        return QuarantinedFile(path=read.path, error=error, moved_to=target)

    # Aggregation

    def _aggregate_rows(self, rows: pa.Table) -> pa.Table:
        """Group result rows into a partial aggregate with ``rows`` and ``tasks`` counts."""
        keys = list(self.aggregation.keys)
        if self._grouped:
            sums = list(self.aggregation.sums)
        else:
            # A column of type null in every file of this batch contains
            # nothing to sum, so it is left out until a file gives it a type.
            sums = [name for name in rows.column_names if name != TASK_ID_COLUMN and not pa.types.is_null(rows.schema.field(name).type)]

        specs = [(name, "sum") for name in sums]
        specs += [([], "count_all"), (TASK_ID_COLUMN, "count_distinct")]
        grouped = rows.group_by(keys).aggregate(specs)

        columns = {key: grouped.column(key) for key in keys}
        columns.update({name: grouped.column(f"{name}_sum") for name in sums})
        columns[ROWS_COLUMN] = grouped.column("count_all")
        columns[TASKS_COLUMN] = grouped.column(f"{TASK_ID_COLUMN}_count_distinct")
        return pa.table(columns)

    def _combine(self, stored: pa.Table, partial: pa.Table) -> pa.Table:
        """Add a partial aggregate to the stored one, group by group.

        Adding ``tasks`` is exact because each task is counted in one fold only.
        """
        merged = pa.concat_tables([stored, partial], promote_options="permissive")
        keys = list(self.aggregation.keys)
        values = [name for name in merged.column_names if name not in keys]

        grouped = merged.group_by(keys).aggregate([(name, "sum") for name in values])

        columns = {key: grouped.column(key) for key in keys}
        columns.update({name: grouped.column(f"{name}_sum") for name in values})
        combined = pa.table(columns)
        if keys:
            combined = combined.sort_by([(key, "ascending") for key in keys])
        return combined


# Reading and checking result files


def _read_result_file(name: str, path: Path) -> _ReadResult:
    """Read one result file, taking size and mtime from the same open file as the rows."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            table = pq.read_table(handle)
    except FileNotFoundError:
        return _ReadResult(name=name, path=path, vanished=True)
    except (OSError, pa.ArrowException) as exc:
        return _ReadResult(name=name, path=path, error=f"unreadable parquet file: {exc}")
    return _ReadResult(name=name, path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, table=table)


def _task_id_column(table: pa.Table) -> pa.ChunkedArray:
    if TASK_ID_COLUMN not in table.column_names:
        raise _InvalidResultFile(f"missing column {TASK_ID_COLUMN!r}")

    column = table.column(TASK_ID_COLUMN)
    column_type = column.type
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise _InvalidResultFile(f"column {TASK_ID_COLUMN!r} has type {column.type}; expected string")

    if column.null_count:
        raise _InvalidResultFile(f"column {TASK_ID_COLUMN!r} contains {column.null_count} nulls")
    return column.cast(pa.string())


def _key_columns(table: pa.Table, keys: Sequence[str]) -> dict[str, pa.ChunkedArray]:
    columns = {}
    for key in keys:
        if key not in table.column_names:
            raise _InvalidResultFile(f"missing key column {key!r}")

        column = table.column(key)
        # Dictionary-encoded and plain strings do not unify, so keys are decoded.
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        columns[key] = column
    return columns


def _declared_sum_columns(table: pa.Table, sums: Sequence[str]) -> dict[str, pa.ChunkedArray | pa.Array]:
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    for name in sums:
        if name not in table.column_names:
            columns[name] = pa.nulls(table.num_rows)
            continue

        column = table.column(name)
        if not _is_summable(column.type):
            raise _InvalidResultFile(f"sum column {name!r} has type {column.type}; expected an integer or floating-point type")
        columns[name] = _widen_numeric(name, column)
    return columns


def _numeric_columns(table: pa.Table) -> dict[str, pa.ChunkedArray]:
    """Return every integer, floating-point or all-null column except the reserved ones."""
    columns = {}
    for name in table.column_names:
        column = table.column(name)
        if name in _RESERVED_COLUMNS or not _is_summable(column.type):
            continue
        columns[name] = _widen_numeric(name, column)
    return columns


def _is_summable(data_type: pa.DataType) -> bool:
    return pa.types.is_integer(data_type) or pa.types.is_floating(data_type) or pa.types.is_null(data_type)


def _widen_numeric(name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Cast integers to int64 and floats to float64, so every file's sum columns unify."""
    if pa.types.is_integer(column.type):
        target = pa.int64()
    elif pa.types.is_floating(column.type):
        target = pa.float64()
    else:
        return column

    try:
        return column.cast(target)
    except pa.ArrowInvalid as exc:
        raise _InvalidResultFile(f"sum column {name!r} cannot be cast to {target}: {exc}") from None


def _unify_schema(schema: pa.Schema, file_schema: pa.Schema) -> pa.Schema:
    try:
        return pa.unify_schemas([schema, file_schema], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise _InvalidResultFile(f"column types conflict with earlier results: {exc}") from None


# State helpers


def _drop_counted_tasks(
    conn: sqlite3.Connection,
    table: pa.Table,
    counted_in_batch: set[str],
) -> tuple[pa.Table, set[str], set[str]]:
    """Split a file's tasks into new and already counted ones and keep only the new tasks' rows.

    Returns the kept rows, the new task ids and the already counted task ids.
    """
    task_ids = set(pc.unique(table.column(TASK_ID_COLUMN)).to_pylist())
    counted = _select_existing(conn, "SELECT task_id FROM counted_tasks WHERE task_id IN ({})", task_ids)
    duplicate_ids = task_ids & (counted | counted_in_batch)
    new_ids = task_ids - duplicate_ids

    if not duplicate_ids:
        return table, new_ids, duplicate_ids

    mask = pc.is_in(table.column(TASK_ID_COLUMN), value_set=pa.array(sorted(new_ids), pa.string()))
    return table.filter(mask), new_ids, duplicate_ids


def _record_folded_file(conn: sqlite3.Connection, read: _ReadResult, rows: int, task_ids: set[str]) -> None:
    cursor = conn.execute(
        "INSERT INTO folded_files (name, size, mtime_ns, rows, tasks, folded_at) VALUES (?, ?, ?, ?, ?, ?)",
        (read.name, read.size, read.mtime_ns, rows, len(task_ids), time.time()),
    )
    file_id = cursor.lastrowid
    conn.executemany(
        "INSERT INTO counted_tasks (task_id, file_id) VALUES (?, ?)",
        ((task_id, file_id) for task_id in sorted(task_ids)),
    )


def _store_aggregate(conn: sqlite3.Connection, aggregate: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(aggregate, sink)
    conn.execute(
        "INSERT OR REPLACE INTO aggregate (id, parquet, updated_at) VALUES (1, ?, ?)",
        (sink.getvalue().to_pybytes(), time.time()),
    )


def _count_total_tasks(conn: sqlite3.Connection) -> int:
    # Every counted task is counted from exactly one folded file.
    (total,) = conn.execute("SELECT COALESCE(SUM(tasks), 0) FROM folded_files").fetchone()
    return int(total)


def _select_existing(conn: sqlite3.Connection, query: str, values: Iterable[str]) -> set[str]:
    """Return the values that ``query`` (with one ``IN ({})`` placeholder) finds, querying in chunks."""
    found: set[str] = set()
    for chunk in _chunks(list(values), SQL_CHUNK):
        placeholders = ", ".join("?" * len(chunk))
        found.update(row[0] for row in conn.execute(query.format(placeholders), chunk))
    return found


@contextmanager
def _immediate_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """Run the block in one transaction that holds the write lock from its start."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# Small helpers


def _validate_aggregation(aggregation: Aggregation) -> Aggregation:
    names = list(aggregation.keys) + list(aggregation.sums)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(f"aggregation lists {', '.join(repeated)} more than once. Name each key or sum column once.")

    reserved = sorted(set(names) & set(_RESERVED_COLUMNS))
    if reserved:
        raise ConfigError(
            f"aggregation uses reserved column {', '.join(reserved)}. Rename it, because the aggregate "
            f"uses the names {', '.join(_RESERVED_COLUMNS)} for its own columns."
        )
    return Aggregation(keys=tuple(aggregation.keys), sums=tuple(aggregation.sums))


def _aggregation_json(aggregation: Aggregation) -> str:
    return json.dumps({"keys": list(aggregation.keys), "sums": list(aggregation.sums)})


def _empty_aggregate(aggregation: Aggregation) -> pa.Table:
    """Return a zero-row aggregate whose key and sum columns have type null until a folded file gives them a type."""
    columns = {name: pa.array([], pa.null()) for name in (*aggregation.keys, *aggregation.sums)}
    columns[ROWS_COLUMN] = pa.array([], pa.int64())
    columns[TASKS_COLUMN] = pa.array([], pa.int64())
    return pa.table(columns)


def _free_path(folder: Path, name: str) -> Path:
    """Return ``folder / name``, or the first ``<stem>-<n><suffix>`` that does not exist."""
    target = folder / name
    number = 1
    while target.exists():
        target = folder / f"{Path(name).stem}-{number}{Path(name).suffix}"
        number += 1
    return target


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _log_report(results_dir: Path, report: ReduceReport) -> None:
    logger.info(
        "reduced %s: folded %d files (%d rows, %d new tasks), skipped %d already folded, "
        "dropped %d duplicate tasks, quarantined %d files, %d tasks in total, %.2fs",
        results_dir,
        report.files_folded,
        report.rows_folded,
        report.tasks_folded,
        report.files_skipped,
        report.duplicate_tasks,
        len(report.quarantined),
        report.total_tasks,
        report.elapsed_s,
    )
